// Retention through the real chatd: expired messages disappear and Sync reports their range as
// a gap, never an error.
#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <thread>

#include "tests/integration/server_test_helpers.h"

namespace chat::testing {
namespace {

// Waits (bounded: 30 s) until the sweep has deleted every message of the conversation, as
// History shows it to `client`.
void WaitUntilSwept(WsClient& client, uint64_t conversation_id) {
  bool gone = false;
  for (int attempt = 0; attempt < 300 && !gone; ++attempt) {
    std::optional<v1::Envelope> page = client.Request(MakeHistory(conversation_id, 0, 10));
    REQUIRE(page.has_value());
    REQUIRE_MESSAGE(page->has_history_page(), page->DebugString());
    gone = page->history_page().messages_size() == 0;
    if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  REQUIRE(gone);
}

TEST_CASE("server: --retention-ms deletes old messages and Sync returns a gap for them") {
  ChatdProcess chatd({.extra_flags = {"--retention-ms", "3000", "--retention-sweep-interval-ms",
                                      "100", "--retention-batch-max", "2"}});
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  uint64_t conversation = 0;
  const std::string first_key = NewClientMsgId();
  const v1::SendAck first = MustAck(*alice, MakeSendToPeer("bob", first_key, "old1"));
  for (int i = 2; i <= 5; ++i) {
    conversation =
        MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "old" + std::to_string(i)))
            .conversation_id();
  }
  auto bob = MustLogin(chatd, "bob", "b1");

  // Wait (bounded) until the sweep has removed all five, in batches of two.
  WaitUntilSwept(*bob, conversation);

  // A device resending the first message (its ack lost, offline past the retention) gets the
  // original's ack as a duplicate: the deleted message is not stored again.
  const v1::SendAck resent = MustAck(*alice, MakeSendToPeer("bob", first_key, "old1"));
  CHECK(resent.duplicate());
  CHECK(resent.conversation_id() == first.conversation_id());
  CHECK(resent.seq() == 1);
  CHECK(resent.message_id() == first.message_id());
  CHECK(resent.server_time_ms() == first.server_time_ms());
  CHECK(resent.client_msg_id() == first_key);

  // The conversation goes on at seq 6; a client syncing from 0 gets 1..5 as a gap.
  const v1::SendAck fresh = MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "new"));
  CHECK(fresh.seq() == 6);
  const SyncAllResult sync = MustSyncAll(*bob, {});
  REQUIRE(sync.gaps.size() == 1);
  CHECK(sync.gaps[0].conversation_id() == conversation);
  CHECK(sync.gaps[0].from_seq() == 1);
  CHECK(sync.gaps[0].to_seq() == 5);
  REQUIRE(sync.messages.size() == 1);
  CHECK(sync.messages[0].seq() == 6);
  CHECK(sync.messages[0].body() == "new");

  // History below the first stored seq is an empty page, not an error.
  std::optional<v1::Envelope> below = bob->Request(MakeHistory(conversation, 6, 10));
  REQUIRE(below.has_value());
  REQUIRE_MESSAGE(below->has_history_page(), below->DebugString());
  CHECK(below->history_page().messages_size() == 0);
  CHECK(below->history_page().first_seq() == 6);
  CHECK_FALSE(below->history_page().has_more());
}

v1::Envelope SetRetention(uint64_t conversation_id, int64_t retention_ms) {
  v1::Envelope e;
  e.mutable_set_retention()->set_conversation_id(conversation_id);
  e.mutable_set_retention()->set_retention_ms(retention_ms);
  return e;
}

TEST_CASE("server: SetRetention by an admin is told to members, a plain member is refused") {
  ChatdProcess chatd;
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  auto bob = MustLogin(chatd, "bob", "b1");
  v1::Envelope create;
  create.mutable_create_group()->set_kind(v1::CONVERSATION_KIND_GROUP);
  create.mutable_create_group()->set_title("team");
  create.mutable_create_group()->add_members("bob");
  std::optional<v1::Envelope> created = alice->Request(create);
  REQUIRE(created.has_value());
  REQUIRE_MESSAGE(created->has_conversation_update(), created->DebugString());
  const uint64_t group = created->conversation_update().conversation().conversation_id();

  std::optional<v1::Envelope> set = alice->Request(SetRetention(group, 604'800'000));
  REQUIRE(set.has_value());
  REQUIRE_MESSAGE(set->has_conversation_update(), set->DebugString());
  CHECK(set->conversation_update().conversation().retention_ms() == 604'800'000);
  std::optional<v1::Envelope> told = bob->WaitFor([](const v1::Envelope& e) {
    return e.has_deliver() &&
           e.deliver().message().system().type() == v1::SystemEvent::TYPE_RETENTION_CHANGED;
  });
  REQUIRE(told.has_value());
  CHECK(told->deliver().message().system().actor() == "alice");
  CHECK(told->deliver().message().system().retention_ms() == 604'800'000);

  CHECK(MustFail(*bob, SetRetention(group, 0)).code() == v1::Error::PERMISSION_DENIED);
  CHECK(MustFail(*alice, SetRetention(group, -7)).code() == v1::Error::INVALID_ARGUMENT);
  // The refused requests changed nothing: a sync still shows the admin's value.
  const SyncAllResult sync = MustSyncAll(*bob, {});
  bool found = false;
  for (const v1::SyncBatch& batch : sync.batches) {
    for (const v1::ConversationState& c : batch.conversations()) {
      if (c.conversation_id() != group) continue;
      found = true;
      CHECK(c.retention_ms() == 604'800'000);
    }
  }
  CHECK(found);
}

TEST_CASE("server: retention -1 keeps a conversation while the server default expires others") {
  ChatdProcess chatd(
      {.extra_flags = {"--retention-ms", "3000", "--retention-sweep-interval-ms", "100"}});
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  auto bob = MustLogin(chatd, "bob", "b1");
  const uint64_t kept =
      MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "keep me")).conversation_id();
  // Either member of a direct conversation may opt it out.
  std::optional<v1::Envelope> set = bob->Request(SetRetention(kept, -1));
  REQUIRE(set.has_value());
  REQUIRE_MESSAGE(set->has_conversation_update(), set->DebugString());
  CHECK(set->conversation_update().conversation().retention_ms() == -1);
  const uint64_t other =
      MustAck(*alice, MakeSendToPeer("carol", NewClientMsgId(), "expire me")).conversation_id();

  // Wait (bounded) until the default has expired the other conversation.
  WaitUntilSwept(*alice, other);
  // Older than the default by now, and still there: the message and the change.
  const std::vector<v1::Message> history = MustHistoryAll(*alice, kept);
  REQUIRE(history.size() == 2);
  CHECK(history[0].body() == "keep me");
  CHECK(history[1].system().type() == v1::SystemEvent::TYPE_RETENTION_CHANGED);
}

TEST_CASE("server: --retention-resend-window-ms 0 forgets a deleted message's key") {
  ChatdProcess chatd({.extra_flags = {"--retention-ms", "1000", "--retention-sweep-interval-ms",
                                      "100", "--retention-resend-window-ms", "0"}});
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  const std::string key = NewClientMsgId();
  const v1::SendAck first = MustAck(*alice, MakeSendToPeer("bob", key, "old"));
  WaitUntilSwept(*alice, first.conversation_id());
  // The key went with the message: the resend is stored as a new one.
  const v1::SendAck resent = MustAck(*alice, MakeSendToPeer("bob", key, "old"));
  CHECK_FALSE(resent.duplicate());
  CHECK(resent.seq() == 2);
}

TEST_CASE("server: chatd refuses a negative --retention-resend-window-ms") {
  ChatdProcess chatd({.extra_flags = {"--retention-resend-window-ms", "-1"}});
  const Status started = chatd.Start();
  CHECK_FALSE(started.ok());
  CHECK(chatd.log().find("retention_resend_window_ms must not be negative") != std::string::npos);
}

TEST_CASE("server: chatd refuses --retention-batch-max 0 with a message naming the field") {
  ChatdProcess chatd({.extra_flags = {"--retention-batch-max", "0"}});
  const Status started = chatd.Start();
  CHECK_FALSE(started.ok());
  CHECK(chatd.log().find("retention_batch_max must be > 0") != std::string::npos);
}

}  // namespace
}  // namespace chat::testing
