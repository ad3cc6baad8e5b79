// Idempotent Send through the real chatd: a resend with the same client_msg_id is answered with
// the original message_id and seq (duplicate = true) and never delivered again, whether it comes
// on the same connection, a new one, or after the server restarted.
#include <doctest/doctest.h>

#include <string>

#include "tests/integration/server_test_helpers.h"

namespace chat::testing {
namespace {

void CheckSameMessage(const v1::SendAck& original, const v1::SendAck& resent) {
  CHECK(resent.duplicate());
  CHECK(resent.conversation_id() == original.conversation_id());
  CHECK(resent.seq() == original.seq());
  CHECK(resent.message_id() == original.message_id());
  CHECK(resent.client_msg_id() == original.client_msg_id());
}

// Bob holds exactly one copy of the message: nothing more arrives live, and a full sync of the
// conversation shows it once, followed by `then_body` if given.
void CheckStoredOnce(WsClient& bob, const v1::SendAck& original, const std::string& body) {
  CHECK(CountDelivers(MustBarrier(bob)) == 0);
  const SyncAllResult sync = MustSyncAll(bob, {});
  REQUIRE(sync.messages.size() == 1);
  CHECK(sync.messages[0].message_id() == original.message_id());
  CHECK(sync.messages[0].seq() == original.seq());
  CHECK(sync.messages[0].body() == body);
}

TEST_CASE("server: a resend on the same connection and after reconnect is a duplicate") {
  ChatdProcess chatd;
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  auto bob = MustLogin(chatd, "bob", "b1");
  const std::string id = NewClientMsgId();

  const v1::SendAck original = MustAck(*alice, MakeSendToPeer("bob", id, "once"));
  CHECK_FALSE(original.duplicate());
  REQUIRE(bob->WaitFor([&](const v1::Envelope& e) {
               return IsDeliverOf(e, original.conversation_id(), original.seq());
             })
              .has_value());

  SUBCASE("same connection") {
    CheckSameMessage(original, MustAck(*alice, MakeSendToPeer("bob", id, "once")));
    // Addressed by conversation id instead of peer, it is still the same message.
    CheckSameMessage(
        original, MustAck(*alice, MakeSendToConversation(original.conversation_id(), id, "once")));
  }
  SUBCASE("new connection of the same device") {
    REQUIRE(alice->Close().ok());
    CHECK(alice->WaitClosed().has_value());
    auto again = MustLogin(chatd, "alice", "a1");
    CheckSameMessage(original, MustAck(*again, MakeSendToPeer("bob", id, "once")));
  }
  SUBCASE("another device of the sender") {
    auto other = MustLogin(chatd, "alice", "a2");
    CheckSameMessage(original, MustAck(*other, MakeSendToPeer("bob", id, "once")));
  }
  CheckStoredOnce(*bob, original, "once");
}

TEST_CASE("server: the same client_msg_id from another sender is a different message") {
  ChatdProcess chatd;
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  auto carol = MustLogin(chatd, "carol", "c1");
  const std::string id = NewClientMsgId();
  const v1::SendAck from_alice = MustAck(*alice, MakeSendToPeer("bob", id, "alice's"));
  const v1::SendAck from_carol = MustAck(*carol, MakeSendToPeer("bob", id, "carol's"));
  CHECK_FALSE(from_carol.duplicate());
  CHECK(from_carol.message_id() != from_alice.message_id());
}

void RunRestartCase(bool kill9) {
  ChatdProcess chatd;
  MustStart(chatd);
  const std::string id = NewClientMsgId();
  v1::SendAck original;
  {
    auto alice = MustLogin(chatd, "alice", "a1");
    original = MustAck(*alice, MakeSendToPeer("bob", id, "durable"));
    CHECK(original.seq() == 1);
    if (kill9) {
      REQUIRE(chatd.Kill9().ok());
      CHECK(alice->WaitClosed().has_value());
    } else {
      Result<int> code = chatd.Terminate();
      REQUIRE(code.ok());
      CHECK(*code == 0);
      CHECK(alice->WaitClosed().value_or(-1) == 1001);
    }
  }
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  auto bob = MustLogin(chatd, "bob", "b1");
  CheckSameMessage(original, MustAck(*alice, MakeSendToPeer("bob", id, "durable")));
  CheckStoredOnce(*bob, original, "durable");

  // The next message continues the sequence without reusing or skipping a seq.
  const v1::SendAck next = MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "next"));
  CHECK_FALSE(next.duplicate());
  CHECK(next.seq() == 2);
  CHECK(next.message_id() > original.message_id());
  std::optional<v1::Envelope> deliver = bob->WaitFor(
      [&](const v1::Envelope& e) { return IsDeliverOf(e, next.conversation_id(), 2); });
  REQUIRE(deliver.has_value());
  CHECK(deliver->deliver().message().body() == "next");
}

TEST_CASE("server: a resend after a graceful restart is a duplicate") { RunRestartCase(false); }

TEST_CASE("server: a resend after kill -9 and restart is a duplicate") { RunRestartCase(true); }

}  // namespace
}  // namespace chat::testing
