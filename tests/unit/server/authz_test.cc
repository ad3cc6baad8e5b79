// The authorization matrix: every client request the schema defines (chat.v1.Envelope's
// `body` oneof, field numbers 11..39) is classified here by what it needs of its user, and is
// tried by a stranger, by a removed member and (where admin is needed) by a plain member. Each
// must be refused with PERMISSION_DENIED, or answered without any content the user may not see,
// and no frame to that connection may carry such content. A request type added to the schema
// fails this test until it is classified.
#include <doctest/doctest.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "src/server/hub.h"
#include "tests/testing/hub_harness.h"

namespace chat::testing {
namespace {

using server::SessionId;

// What a request needs of its user in the conversation it names.
enum class Needs {
  kNotScoped,  // names no conversation (hello, ping, presence, push tokens)
  kCreates,    // creates a conversation: anyone may
  kOwnView,    // Sync: answers only with the user's own conversations
  kRead,       // History: members, and removed members up to their removal
  kOwnMarks,   // Receipt: members, and removed members for their own watermarks (told only them)
  kMember,     // current members
  kAdmin,      // current admins
};

const std::map<std::string, Needs>& Classification() {
  static const auto* table = new std::map<std::string, Needs>{
      {"send", Needs::kMember},
      {"receipt", Needs::kOwnMarks},
      {"sync", Needs::kOwnView},
      {"history", Needs::kRead},
      {"typing", Needs::kMember},
      {"presence_subscribe", Needs::kNotScoped},
      {"presence_unsubscribe", Needs::kNotScoped},
      {"create_group", Needs::kCreates},
      {"rename_group", Needs::kAdmin},
      {"add_members", Needs::kAdmin},
      {"remove_members", Needs::kAdmin},
      {"leave", Needs::kMember},
      {"set_role", Needs::kAdmin},
      {"subscribe", Needs::kMember},
      {"unsubscribe", Needs::kMember},
      {"get_receipts", Needs::kMember},
      {"register_push_token", Needs::kNotScoped},
      {"ping", Needs::kNotScoped},
      // Groups and channels: admins; a direct conversation: either member (retention_test).
      {"set_retention", Needs::kAdmin},
  };
  return *table;
}

// A request of type `name` about conversation `id`.
v1::Envelope Request(const std::string& name, ConversationId id, uint64_t rid) {
  v1::Envelope e;
  e.set_rid(rid);
  if (name == "send") {
    e = SendToConversation(rid, id, ClientMsgId(rid), "intruder");
  } else if (name == "receipt") {
    e.mutable_receipt()->set_conversation_id(id);
    e.mutable_receipt()->set_read_seq(100);
  } else if (name == "sync") {
    e.mutable_sync()->add_cursors()->set_conversation_id(id);
  } else if (name == "history") {
    e.mutable_history()->set_conversation_id(id);
  } else if (name == "typing") {
    e.mutable_typing()->set_conversation_id(id);
    e.mutable_typing()->set_active(true);
  } else if (name == "rename_group") {
    e.mutable_rename_group()->set_conversation_id(id);
    e.mutable_rename_group()->set_title("taken");
  } else if (name == "add_members") {
    e.mutable_add_members()->set_conversation_id(id);
    e.mutable_add_members()->add_users("friend");
  } else if (name == "remove_members") {
    e.mutable_remove_members()->set_conversation_id(id);
    e.mutable_remove_members()->add_users("alice");
  } else if (name == "leave") {
    e.mutable_leave()->set_conversation_id(id);
  } else if (name == "set_role") {
    e.mutable_set_role()->set_conversation_id(id);
    e.mutable_set_role()->set_user("bob");
    e.mutable_set_role()->set_role(v1::ROLE_ADMIN);
  } else if (name == "subscribe") {
    e.mutable_subscribe()->set_conversation_id(id);
  } else if (name == "unsubscribe") {
    e.mutable_unsubscribe()->set_conversation_id(id);
  } else if (name == "get_receipts") {
    e.mutable_get_receipts()->set_conversation_id(id);
  } else if (name == "set_retention") {
    e.mutable_set_retention()->set_conversation_id(id);
    e.mutable_set_retention()->set_retention_ms(1000);
  } else {
    FAIL("no request builder for " << name);
  }
  return e;
}

// Content only current members may see.
constexpr std::string_view kSecret = "SECRET-after-removal";

bool Leaks(const std::vector<v1::Envelope>& envelopes) {
  for (const v1::Envelope& e : envelopes) {
    if (e.SerializeAsString().find(kSecret) != std::string::npos) return true;
    // Watermarks of others and membership are conversation data too.
    if (e.has_receipts_page() || e.has_receipt_update() || e.has_typing_update() ||
        e.has_conversation_update()) {
      return true;
    }
  }
  return false;
}

TEST_CASE("authz: every conversation request refuses strangers, removed members and non-admins") {
  ServerOptions options;
  options.idle_timeout_ms = 1'000'000'000;
  options.hello_timeout_ms = 1'000'000'000;
  options.messages_burst = 10'000;
  HubHarness h(options);
  SessionId alice = h.Connect("alice", "a1");      // admin
  SessionId bob = h.Connect("bob", "b1");          // member
  SessionId rob = h.Connect("rob", "r1");          // removed
  SessionId mallory = h.Connect("mallory", "m1");  // never a member

  v1::Envelope create;
  create.set_rid(1);
  create.mutable_create_group()->set_kind(v1::CONVERSATION_KIND_GROUP);
  create.mutable_create_group()->set_title("private");
  create.mutable_create_group()->add_members("bob");
  create.mutable_create_group()->add_members("rob");
  h.SendEnvelope(alice, create);
  h.Pump();
  const ConversationId id =
      h.Take(alice).at(0).conversation_update().conversation().conversation_id();
  REQUIRE(id != 0);
  v1::Envelope remove;
  remove.set_rid(2);
  remove.mutable_remove_members()->set_conversation_id(id);
  remove.mutable_remove_members()->add_users("rob");
  h.SendEnvelope(alice, remove);
  h.Pump();
  h.SendEnvelope(alice, SendToConversation(3, id, ClientMsgId(3), kSecret));
  h.Pump();
  h.Take(alice);
  h.Take(bob);
  CHECK_FALSE(Leaks(h.Take(rob)));  // rob got his removal, not what followed
  CHECK(h.Take(mallory).empty());

  // Every client request in the schema is classified.
  const google::protobuf::OneofDescriptor* body =
      v1::Envelope::descriptor()->FindOneofByName("body");
  REQUIRE(body != nullptr);
  int tried = 0;
  uint64_t rid = 100;
  for (int i = 0; i < body->field_count(); ++i) {
    const google::protobuf::FieldDescriptor* field = body->field(i);
    // Client requests are numbered below 40 (server-to-client bodies start there); hello (10)
    // is the handshake.
    if (field->number() < 11 || field->number() >= 40) continue;
    const std::string name(field->name());
    CAPTURE(name);
    auto it = Classification().find(name);
    REQUIRE_MESSAGE(it != Classification().end(), "unclassified client request: " << name);
    const Needs needs = it->second;
    if (needs == Needs::kNotScoped || needs == Needs::kCreates) continue;

    struct Who {
      const char* label;
      SessionId session;
      bool applies;
    };
    const std::vector<Who> who = {
        {"stranger", mallory, true},
        {"removed member", rob, true},
        {"plain member", bob, needs == Needs::kAdmin},
    };
    for (const Who& w : who) {
      if (!w.applies) continue;
      CAPTURE(w.label);
      ++tried;
      h.SendEnvelope(w.session, Request(name, id, ++rid));
      h.Pump();
      std::vector<v1::Envelope> got = h.Take(w.session);
      const bool sees_capped_history = needs == Needs::kRead && w.session == rob;
      const bool marks_own_read = needs == Needs::kOwnMarks && w.session == rob;
      if (!marks_own_read) CHECK_FALSE(Leaks(got));
      if (marks_own_read) {
        // His own watermarks, capped at his removal (seq 2), and nothing of the members'.
        REQUIRE(got.size() == 1);
        REQUIRE(got[0].has_receipt_update());
        const v1::ReceiptUpdate& update = got[0].receipt_update();
        CHECK(update.user_id() == "rob");
        CHECK(update.read_seq() == 2);
        CHECK(update.read_all_seq() == 0);
        CHECK(update.delivered_all_seq() == 0);
        CHECK(got[0].SerializeAsString().find(kSecret) == std::string::npos);
      } else if (needs == Needs::kOwnView) {
        // Sync answers with the user's own conversations; for rob that is the log up to his
        // removal, which Leaks() checks.
        REQUIRE(got.size() == 1);
        CHECK(got[0].has_sync_batch());
      } else if (sees_capped_history) {
        REQUIRE(got.size() == 1);
        REQUIRE(got[0].has_history_page());
        CHECK(got[0].history_page().messages(0).system().type() ==
              v1::SystemEvent::TYPE_MEMBERS_REMOVED);
      } else {
        REQUIRE_MESSAGE(got.size() == 1, got.size());
        REQUIRE_MESSAGE(got[0].has_error(), got[0].DebugString());
        CHECK(got[0].error().code() == v1::Error::PERMISSION_DENIED);
        CHECK(got[0].rid() == rid);
      }
    }
  }
  CHECK(tried == 2 * 14 + 5);
  // Nothing any of them did reached the members.
  CHECK(h.Take(alice).empty());
  CHECK(h.Take(bob).empty());
  CHECK(h.violations().empty());
}

}  // namespace
}  // namespace chat::testing
