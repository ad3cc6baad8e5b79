// Groups, receipts and unread counts through the real chatd, across a restart of the server.
#include <doctest/doctest.h>

#include <string>

#include "tests/integration/server_test_helpers.h"

namespace chat::testing {
namespace {

v1::Envelope MakeReceipt(uint64_t conversation_id, uint64_t delivered, uint64_t read) {
  v1::Envelope e;
  e.mutable_receipt()->set_conversation_id(conversation_id);
  e.mutable_receipt()->set_delivered_seq(delivered);
  e.mutable_receipt()->set_read_seq(read);
  return e;
}

const v1::ConversationState* Find(const v1::SyncBatch& batch, uint64_t conversation_id) {
  for (const v1::ConversationState& c : batch.conversations()) {
    if (c.conversation_id() == conversation_id) return &c;
  }
  return nullptr;
}

TEST_CASE("server group: membership, receipts and unread counts survive a chatd restart") {
  ChatdProcess chatd;
  MustStart(chatd);
  uint64_t group = 0;
  {
    auto alice = MustLogin(chatd, "alice", "a1");
    auto phone = MustLogin(chatd, "bob", "phone");
    auto tablet = MustLogin(chatd, "bob", "tablet");

    v1::Envelope create;
    create.mutable_create_group()->set_kind(v1::CONVERSATION_KIND_GROUP);
    create.mutable_create_group()->set_title("team");
    create.mutable_create_group()->add_members("bob");
    create.mutable_create_group()->add_members("carol");
    std::optional<v1::Envelope> created = alice->Request(create);
    REQUIRE(created.has_value());
    REQUIRE_MESSAGE(created->has_conversation_update(), created->DebugString());
    group = created->conversation_update().conversation().conversation_id();
    CHECK(created->conversation_update().conversation().role() == v1::ROLE_ADMIN);

    for (int i = 0; i < 4; ++i) {
      MustAck(*alice, MakeSendToConversation(group, NewClientMsgId(), "m" + std::to_string(i)));
    }
    // seq 1 is CREATED, 2..5 are alice's messages. Bob reads up to 3 on his phone.
    std::optional<v1::Envelope> read = phone->Request(MakeReceipt(group, 5, 3));
    REQUIRE(read.has_value());
    REQUIRE_MESSAGE(read->has_receipt_update(), read->DebugString());
    CHECK(read->receipt_update().unread() == 2);
    CHECK(read->receipt_update().unread_total() == 2);

    // The tablet hears of it; alice sees bob's watermark.
    bool tablet_told = false;
    for (const v1::Envelope& e : MustBarrier(*tablet)) {
      if (e.has_receipt_update()) {
        tablet_told = true;
        CHECK(e.receipt_update().unread() == 2);
        CHECK(e.receipt_update().read_seq() == 3);
      }
    }
    CHECK(tablet_told);
    bool alice_told = false;
    for (const v1::Envelope& e : MustBarrier(*alice)) {
      if (e.has_receipt_update()) {
        alice_told = true;
        CHECK(e.receipt_update().user_id() == "bob");
        CHECK(e.receipt_update().read_seq() == 3);
      }
    }
    CHECK(alice_told);

    v1::Envelope remove;
    remove.mutable_remove_members()->set_conversation_id(group);
    remove.mutable_remove_members()->add_users("carol");
    std::optional<v1::Envelope> removed = alice->Request(remove);
    REQUIRE(removed.has_value());
    REQUIRE_MESSAGE(removed->has_conversation_update(), removed->DebugString());
    CHECK(removed->conversation_update().conversation().member_count() == 2);
  }

  Result<int> stopped = chatd.Terminate();
  REQUIRE(stopped.ok());
  MustStart(chatd);

  auto tablet = MustLogin(chatd, "bob", "tablet");
  std::optional<v1::Envelope> sync = tablet->Request(MakeSync({}));
  REQUIRE(sync.has_value());
  REQUIRE(sync->has_sync_batch());
  CHECK(sync->sync_batch().unread_total() == 2);
  const v1::ConversationState* state = Find(sync->sync_batch(), group);
  REQUIRE(state != nullptr);
  CHECK(state->kind() == v1::CONVERSATION_KIND_GROUP);
  CHECK(state->title() == "team");
  CHECK(state->read_seq() == 3);
  CHECK(state->unread() == 2);
  CHECK(state->role() == v1::ROLE_MEMBER);
  CHECK(state->last_seq() == 6);

  // carol, removed at seq 6, reads up to it and may not post.
  auto carol = MustLogin(chatd, "carol", "c1");
  std::optional<v1::Envelope> history = carol->Request(MakeHistory(group, 0, 50));
  REQUIRE(history.has_value());
  REQUIRE(history->has_history_page());
  CHECK(history->history_page().messages_size() == 6);
  CHECK(history->history_page().messages(0).system().type() ==
        v1::SystemEvent::TYPE_MEMBERS_REMOVED);
  CHECK(MustFail(*carol, MakeSendToConversation(group, NewClientMsgId(), "hello?")).code() ==
        v1::Error::PERMISSION_DENIED);
  auto alice = MustLogin(chatd, "alice", "a1");
  MustAck(*alice, MakeSendToConversation(group, NewClientMsgId(), "after restart"));
  CHECK(CountDelivers(MustBarrier(*carol)) == 0);
  CHECK(CountDelivers(MustBarrier(*tablet)) == 1);
}

}  // namespace
}  // namespace chat::testing
