// Bad input to the real chatd: each gets its specific error code and/or close code, and the
// server keeps serving a client that was already connected.
#include <doctest/doctest.h>

#include <chrono>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

#include "chat/auth.h"
#include "tests/integration/server_test_helpers.h"

namespace chat::testing {
namespace {

constexpr int kMaxMessageBytes = 64 * 1024;
constexpr int kMaxBodyBytes = 1024;

// A chatd with small limits and a bystander (alice) connected before the bad client acts.
struct Fixture {
  Fixture()
      : chatd({.extra_flags = {"--max-message-bytes", std::to_string(kMaxMessageBytes),
                               "--max-body-bytes", std::to_string(kMaxBodyBytes),
                               "--hello-timeout-ms", "1500"}}) {
    MustStart(chatd);
    bystander = MustLogin(chatd, "alice", "a1");
    bob = MustLogin(chatd, "bob", "b1");
  }

  // The bystander still chats with bob: ack, delivery and ping.
  void CheckStillServing() {
    const v1::SendAck ack = MustAck(*bystander, MakeSendToPeer("bob", NewClientMsgId(), "alive"));
    CHECK(bob->WaitFor([&](const v1::Envelope& e) {
               return IsDeliverOf(e, ack.conversation_id(), ack.seq());
             })
              .has_value());
    MustBarrier(*bystander);
    CHECK_FALSE(bystander->closed());
    CHECK(chatd.running());
  }

  // The bad client gets an Error with `code` (rid 0 when the frame could not be decoded).
  static void ExpectError(WsClient& client, v1::Error::Code code) {
    std::optional<v1::Envelope> error =
        client.WaitFor([](const v1::Envelope& e) { return e.has_error(); });
    REQUIRE_MESSAGE(error.has_value(), "no Error before the close");
    CHECK_MESSAGE(error->error().code() == code, error->DebugString());
  }

  ChatdProcess chatd;
  std::unique_ptr<WsClient> bystander;
  std::unique_ptr<WsClient> bob;
};

// The server refuses the message at its start, while the client is still sending the rest of
// it: it sends its close frame at once and reads and drops the rest until the client answers,
// rather than closing the socket under the client's writes (the kernel would answer them with a
// reset, and a client that sees the reset first reports 1006). So the client sees 1009 every
// time; the server keeps serving the others and has delivered nothing.
void CheckClosedTooLarge(WsClient& bad, Fixture& f) {
  CHECK(bad.WaitClosed().value_or(-1) == 1009);
  CHECK(bad.close_reason() == "message too large");
  f.CheckStillServing();
  CHECK(CountDelivers(MustBarrier(*f.bob)) == 0);
  bool logged = false;
  for (int i = 0; i < 100 && !logged; ++i) {  // bounded: 10 s
    logged = f.chatd.log().find("code=1009 (server)") != std::string::npos;
    if (!logged) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  CHECK(logged);
}

TEST_CASE("server bad input: garbage bytes -> INVALID_ARGUMENT, close 1007") {
  Fixture f;
  auto bad = MustLogin(f.chatd, "mallory", "m1");
  REQUIRE(
      bad->SendRaw(std::string("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01garbage", 18)).ok());
  Fixture::ExpectError(*bad, v1::Error::INVALID_ARGUMENT);
  CHECK(bad->WaitClosed().value_or(-1) == 1007);
  f.CheckStillServing();
}

TEST_CASE("server bad input: garbage followed at once by an 8 MiB message -> close 1007") {
  Fixture f;
  auto bad = MustLogin(f.chatd, "mallory", "m1");
  // The server closes on the garbage while the client is still sending the large message queued
  // behind it; the rest is read and dropped, so the client still gets the Error and the code.
  std::vector<std::string> messages = {
      std::string("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01garbage", 18),
      MakeSendToPeer("bob", NewClientMsgId(), std::string(8 << 20, 'g')).SerializeAsString()};
  REQUIRE(bad->SendRaw(std::move(messages)).ok());
  Fixture::ExpectError(*bad, v1::Error::INVALID_ARGUMENT);
  CHECK(bad->WaitClosed().value_or(-1) == 1007);
  f.CheckStillServing();
  CHECK(CountDelivers(MustBarrier(*f.bob)) == 0);
}

TEST_CASE("server bad input: truncated protobuf -> INVALID_ARGUMENT, close 1007") {
  Fixture f;
  auto bad = MustLogin(f.chatd, "mallory", "m1");
  const std::string whole =
      MakeSendToPeer("bob", NewClientMsgId(), std::string(200, 'x'), 7).SerializeAsString();
  REQUIRE(bad->SendRaw(whole.substr(0, whole.size() - 50)).ok());
  Fixture::ExpectError(*bad, v1::Error::INVALID_ARGUMENT);
  CHECK(bad->WaitClosed().value_or(-1) == 1007);
  f.CheckStillServing();
  // Nothing of the truncated Send reached bob.
  CHECK(CountDelivers(MustBarrier(*f.bob)) == 0);
}

TEST_CASE("server bad input: garbage before Hello -> close 1007") {
  Fixture f;
  auto bad = MustConnect(f.chatd);
  REQUIRE(bad->SendRaw("\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff").ok());
  CHECK(bad->WaitClosed().value_or(-1) == 1007);
  f.CheckStillServing();
}

TEST_CASE("server bad input: a message over --max-message-bytes in one frame -> close 1009") {
  Fixture f;
  auto bad = MustLogin(f.chatd, "mallory", "m1");
  const std::string big =
      MakeSendToPeer("bob", NewClientMsgId(), std::string(kMaxMessageBytes + 1000, 'x'))
          .SerializeAsString();
  REQUIRE(bad->SendRaw(big).ok());
  CheckClosedTooLarge(*bad, f);
}

TEST_CASE("server bad input: a message over --max-message-bytes in 64 fragments -> close 1009") {
  Fixture f;
  auto bad = MustLogin(f.chatd, "mallory", "m1");
  // Each fragment is small; only the assembled message is over the limit.
  const std::string big =
      MakeSendToPeer("bob", NewClientMsgId(), std::string(2 * kMaxMessageBytes, 'y'))
          .SerializeAsString();
  REQUIRE(bad->SendFragments(big, 64).ok());
  CheckClosedTooLarge(*bad, f);
}

TEST_CASE("server bad input: an 8 MiB message sent at once -> close 1009") {
  Fixture f;
  auto bad = MustLogin(f.chatd, "mallory", "m1");
  const std::string big =
      MakeSendToPeer("bob", NewClientMsgId(), std::string(8 << 20, 'x')).SerializeAsString();
  REQUIRE(bad->SendRaw(big).ok());
  CheckClosedTooLarge(*bad, f);
}

TEST_CASE("server bad input: an 8 MiB message in 512 fragments sent at once -> close 1009") {
  Fixture f;
  auto bad = MustLogin(f.chatd, "mallory", "m1");
  const std::string big =
      MakeSendToPeer("bob", NewClientMsgId(), std::string(8 << 20, 'y')).SerializeAsString();
  REQUIRE(bad->SendFragments(big, 512).ok());
  CheckClosedTooLarge(*bad, f);
}

TEST_CASE("server bad input: over TLS, an 8 MiB message sent at once -> close 1009") {
  ChatdProcess chatd(
      {.extra_flags = {"--max-message-bytes", std::to_string(kMaxMessageBytes)}, .tls = true});
  MustStart(chatd);
  auto bad = MustLogin(chatd, "mallory", "m1");
  const std::string big =
      MakeSendToPeer("bob", NewClientMsgId(), std::string(8 << 20, 'x')).SerializeAsString();
  REQUIRE(bad->SendRaw(big).ok());
  CHECK(bad->WaitClosed().value_or(-1) == 1009);
  CHECK(bad->close_reason() == "message too large");
  auto alice = MustLogin(chatd, "alice", "a1");
  MustBarrier(*alice);
}

TEST_CASE("server bad input: a message over --max-hello-bytes before Hello -> close 1009") {
  Fixture f;
  auto bad = MustConnect(f.chatd);
  // A Hello carrying a 20 KiB token: over the 16 KiB allowed before Hello, though well under
  // --max-message-bytes. It is refused as too large, not read as a bad token.
  v1::Envelope hello;
  hello.mutable_hello()->set_token(std::string(20 * 1024, 'a'));
  hello.mutable_hello()->set_device_id("m1");
  REQUIRE(bad->SendEnvelope(hello).ok());
  CheckClosedTooLarge(*bad, f);
  CHECK(f.chatd.log().find("over max_hello_bytes") != std::string::npos);
}

TEST_CASE("server: after Hello a message over --max-hello-bytes is read as usual") {
  Fixture f;
  auto client = MustLogin(f.chatd, "carol", "c1");
  // 20 KiB: read and answered (the body is over --max-body-bytes), the connection stays.
  std::optional<v1::Envelope> reply =
      client->Request(MakeSendToPeer("bob", NewClientMsgId(), std::string(20 * 1024, 'z')));
  REQUIRE(reply.has_value());
  REQUIRE_MESSAGE(reply->has_error(), reply->DebugString());
  CHECK(reply->error().code() == v1::Error::INVALID_ARGUMENT);
  CHECK(reply->error().message() == "body too large");
  MustBarrier(*client);
  CHECK_FALSE(client->closed());
}

TEST_CASE("server bad input: chatd refuses --max-hello-bytes below 1024") {
  ChatdProcess chatd({.extra_flags = {"--max-hello-bytes", "1000"}});
  const Status started = chatd.Start();
  CHECK_FALSE(started.ok());
  CHECK(chatd.log().find("max_hello_bytes must be >= 1024") != std::string::npos);
}

// One frame of tiny envelopes must not turn into a flood of work and replies.
TEST_CASE("server bad input: a Batch of 257 envelopes -> INVALID_ARGUMENT, close 1008") {
  Fixture f;
  auto client = MustLogin(f.chatd, "carol", "c1");
  // 256 are served: every ping gets its pong.
  v1::Envelope batch;
  for (int i = 0; i < 256; ++i) *batch.mutable_batch()->add_envelopes() = MakePing(0, 1000 + i);
  REQUIRE(client->SendEnvelope(batch).ok());
  for (int i = 0; i < 256; ++i) {
    std::optional<v1::Envelope> pong = client->WaitForRid(1000 + i);
    REQUIRE(pong.has_value());
    CHECK_MESSAGE(pong->has_pong(), pong->DebugString());
  }
  *batch.mutable_batch()->add_envelopes() = MakePing(0, 2000);
  auto bad = MustLogin(f.chatd, "mallory", "m1");
  REQUIRE(bad->SendEnvelope(batch).ok());
  std::optional<v1::Envelope> error =
      bad->WaitFor([](const v1::Envelope& e) { return e.has_error(); });
  REQUIRE(error.has_value());
  CHECK(error->error().code() == v1::Error::INVALID_ARGUMENT);
  CHECK(error->error().message() == "a batch holds at most 256 envelopes, not 257");
  CHECK(bad->WaitClosed().value_or(-1) == 1008);
  // None of them was served.
  CHECK(bad->Drain().empty());
  f.CheckStillServing();
}

TEST_CASE("server: a message under --max-message-bytes in many fragments is accepted") {
  Fixture f;
  auto client = MustLogin(f.chatd, "carol", "c1");
  v1::Envelope send = MakeSendToPeer("bob", NewClientMsgId(), std::string(kMaxBodyBytes, 'z'), 9);
  REQUIRE(client->SendFragments(send.SerializeAsString(), 16).ok());
  std::optional<v1::Envelope> reply = client->WaitForRid(9);
  REQUIRE(reply.has_value());
  REQUIRE_MESSAGE(reply->has_send_ack(), reply->DebugString());
  std::optional<v1::Envelope> deliver = f.bob->WaitFor([&](const v1::Envelope& e) {
    return IsDeliverOf(e, reply->send_ack().conversation_id(), 1);
  });
  REQUIRE(deliver.has_value());
  CHECK(deliver->deliver().message().body() == std::string(kMaxBodyBytes, 'z'));
}

TEST_CASE("server bad input: invalid JSON text frame -> INVALID_ARGUMENT, close 1007") {
  Fixture f;
  auto bad = MustLogin(f.chatd, "mallory", "m1", Wire::kJson);
  REQUIRE(bad->SendRaw("{\"rid\":\"3\",\"send\":{\"peer\":\"bob\",", /*binary=*/false).ok());
  Fixture::ExpectError(*bad, v1::Error::INVALID_ARGUMENT);
  CHECK(bad->WaitClosed().value_or(-1) == 1007);
  CHECK(bad->undecodable_frames() == 0);  // the error itself came back as valid JSON
  f.CheckStillServing();
}

TEST_CASE("server bad input: Send before Hello -> UNAUTHENTICATED, close 4001") {
  Fixture f;
  auto bad = MustConnect(f.chatd);
  const v1::Error error = MustFail(*bad, MakeSendToPeer("bob", NewClientMsgId(), "sneaky"));
  CHECK(error.code() == v1::Error::UNAUTHENTICATED);
  CHECK(bad->WaitClosed().value_or(-1) == 4001);
  f.CheckStillServing();
  CHECK(CountDelivers(MustBarrier(*f.bob)) == 0);
}

TEST_CASE("server bad input: no Hello within --hello-timeout-ms -> close 4001") {
  Fixture f;
  auto idle = MustConnect(f.chatd);
  CHECK(idle->WaitClosed(10'000) == 4001);
  f.CheckStillServing();
}

void ExpectHelloRefused(Fixture& f, const std::string& token) {
  auto bad = MustConnect(f.chatd);
  std::optional<v1::Envelope> reply = bad->Hello(token, "m1");
  REQUIRE(reply.has_value());
  REQUIRE_MESSAGE(reply->has_error(), reply->DebugString());
  CHECK(reply->error().code() == v1::Error::UNAUTHENTICATED);
  CHECK(bad->WaitClosed().value_or(-1) == 4001);
  f.CheckStillServing();
}

TEST_CASE("server bad input: a malformed token -> UNAUTHENTICATED, close 4001") {
  Fixture f;
  ExpectHelloRefused(f, "not.a.jwt");
}

TEST_CASE(
    "server bad input: an empty token -> INVALID_ARGUMENT and the connection stays "
    "unauthenticated") {
  Fixture f;
  auto bad = MustConnect(f.chatd);
  std::optional<v1::Envelope> reply = bad->Hello("", "m1");
  REQUIRE(reply.has_value());
  REQUIRE_MESSAGE(reply->has_error(), reply->DebugString());
  // The token is a required field: the request is refused as invalid before authentication.
  CHECK(reply->error().code() == v1::Error::INVALID_ARGUMENT);
  // Still unauthenticated: anything but Hello now closes with 4001.
  CHECK(MustFail(*bad, MakeSendToPeer("bob", NewClientMsgId(), "x")).code() ==
        v1::Error::UNAUTHENTICATED);
  CHECK(bad->WaitClosed().value_or(-1) == 4001);
  f.CheckStillServing();
}

TEST_CASE("server bad input: an expired token -> UNAUTHENTICATED, close 4001") {
  Fixture f;
  ExpectHelloRefused(f, f.chatd.Token("mallory", /*ttl_ms=*/-600'000));
}

TEST_CASE("server bad input: a token signed with another secret -> UNAUTHENTICATED, close 4001") {
  Fixture f;
  const int64_t now_ms = static_cast<int64_t>(std::time(nullptr)) * 1000;
  Result<std::string> forged = SignJwt(std::string(64, 'f'), "", "alice", now_ms, 3'600'000);
  REQUIRE(forged.ok());
  ExpectHelloRefused(f, *forged);
}

TEST_CASE("server bad input: a token with a tampered payload -> UNAUTHENTICATED, close 4001") {
  Fixture f;
  // Swap the payload of a valid token for mallory with the payload of one for alice.
  const std::string mallory = f.chatd.Token("mallory");
  const std::string alice = f.chatd.Token("alice");
  const size_t m1 = mallory.find('.'), m2 = mallory.rfind('.');
  const size_t a1 = alice.find('.'), a2 = alice.rfind('.');
  REQUIRE(m1 != std::string::npos);
  REQUIRE(a1 != std::string::npos);
  const std::string tampered =
      mallory.substr(0, m1) + alice.substr(a1, a2 - a1) + mallory.substr(m2);
  ExpectHelloRefused(f, tampered);
}

TEST_CASE("server bad input: Send to a conversation the user is not in -> PERMISSION_DENIED") {
  Fixture f;
  const v1::SendAck ack =
      MustAck(*f.bystander, MakeSendToPeer("bob", NewClientMsgId(), "between us"));
  REQUIRE(
      f.bob
          ->WaitFor([&](const v1::Envelope& e) { return IsDeliverOf(e, ack.conversation_id(), 1); })
          .has_value());
  auto carol = MustLogin(f.chatd, "carol", "c1");
  const std::string id = NewClientMsgId();
  const v1::Error denied =
      MustFail(*carol, MakeSendToConversation(ack.conversation_id(), id, "let me in"));
  CHECK(denied.code() == v1::Error::PERMISSION_DENIED);
  CHECK(denied.client_msg_id() == id);
  // A conversation that does not exist looks the same.
  CHECK(MustFail(*carol,
                 MakeSendToConversation(ack.conversation_id() + 1000, NewClientMsgId(), "anyone?"))
            .code() == v1::Error::PERMISSION_DENIED);
  // Not a protocol violation: the connection stays usable.
  MustBarrier(*carol);
  CHECK_FALSE(carol->closed());
  CHECK(CountDelivers(MustBarrier(*f.bob)) == 0);
  CHECK(CountDelivers(MustBarrier(*f.bystander)) == 0);
  // The conversation still holds only the one message.
  CHECK(MustHistoryAll(*f.bob, ack.conversation_id()).size() == 1);
  f.CheckStillServing();
}

TEST_CASE("server bad input: empty and oversized bodies -> INVALID_ARGUMENT, connection stays") {
  Fixture f;
  auto carol = MustLogin(f.chatd, "carol", "c1");
  const std::string empty_id = NewClientMsgId();
  const v1::Error empty = MustFail(*carol, MakeSendToPeer("bob", empty_id, ""));
  CHECK(empty.code() == v1::Error::INVALID_ARGUMENT);
  CHECK(empty.client_msg_id() == empty_id);

  const std::string big_id = NewClientMsgId();
  const v1::Error big =
      MustFail(*carol, MakeSendToPeer("bob", big_id, std::string(kMaxBodyBytes + 1, 'b')));
  CHECK(big.code() == v1::Error::INVALID_ARGUMENT);
  CHECK(big.client_msg_id() == big_id);

  // A client_msg_id shorter than 16 bytes is refused too.
  CHECK(MustFail(*carol, MakeSendToPeer("bob", "short", "hello")).code() ==
        v1::Error::INVALID_ARGUMENT);

  // Exactly at the limit is fine, and the connection was never closed.
  const v1::SendAck ok =
      MustAck(*carol, MakeSendToPeer("bob", NewClientMsgId(), std::string(kMaxBodyBytes, 'b')));
  CHECK(ok.seq() == 1);
  CHECK_FALSE(carol->closed());
  f.CheckStillServing();
}

TEST_CASE("server bad input: a second Hello -> FAILED_PRECONDITION, close 1008") {
  Fixture f;
  auto bad = MustLogin(f.chatd, "mallory", "m1");
  std::optional<v1::Envelope> reply = bad->Hello(f.chatd.Token("mallory"), "m1");
  REQUIRE(reply.has_value());
  REQUIRE_MESSAGE(reply->has_error(), reply->DebugString());
  CHECK(reply->error().code() == v1::Error::FAILED_PRECONDITION);
  CHECK(bad->WaitClosed().value_or(-1) == 1008);
  f.CheckStillServing();
}

TEST_CASE("server bad input: a server-only message from a client -> close 1002") {
  Fixture f;
  auto bad = MustLogin(f.chatd, "mallory", "m1");
  v1::Envelope welcome;
  welcome.set_rid(5);
  welcome.mutable_welcome()->set_user_id("alice");
  const v1::Error error = MustFail(*bad, welcome);
  CHECK(error.code() == v1::Error::INVALID_ARGUMENT);
  CHECK(bad->WaitClosed().value_or(-1) == 1002);
  f.CheckStillServing();
}

}  // namespace
}  // namespace chat::testing

namespace chat::testing {
namespace {

TEST_CASE("server limits: an authenticated client silent past --idle-timeout-ms -> close 4002") {
  ChatdProcess chatd(
      {.extra_flags = {"--idle-timeout-ms", "500", "--heartbeat-interval-ms", "200"}});
  MustStart(chatd);
  auto idle = MustLogin(chatd, "alice", "a1");
  CHECK(idle->WaitClosed(10'000) == 4002);
  CHECK(chatd.running());
}

TEST_CASE("server limits: past the message rate -> RESOURCE_EXHAUSTED with retry_after_ms") {
  ChatdProcess chatd({.extra_flags = {"--messages-per-second", "1", "--messages-burst", "3"}});
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  // The burst allows a few requests at once (Hello included); within a handful one is refused.
  std::optional<v1::Error> refused;
  int acked = 0;
  for (int i = 0; i < 10 && !refused.has_value(); ++i) {
    const std::string id = NewClientMsgId();
    std::optional<v1::Envelope> reply = alice->Request(MakeSendToPeer("bob", id, "hi"));
    REQUIRE(reply.has_value());
    if (reply->has_error()) {
      refused = reply->error();
      CHECK(reply->error().client_msg_id() == id);
    } else {
      REQUIRE_MESSAGE(reply->has_send_ack(), reply->DebugString());
      ++acked;
    }
  }
  REQUIRE(refused.has_value());
  CHECK(refused->code() == v1::Error::RESOURCE_EXHAUSTED);
  CHECK(refused->retry_after_ms() > 0);
  CHECK(acked >= 1);
  CHECK(acked <= 3);
  // Throttling is not a protocol violation.
  CHECK_FALSE(alice->closed());
}

TEST_CASE("server limits: past --max-devices-per-user -> RESOURCE_EXHAUSTED, close 4004") {
  ChatdProcess chatd({.extra_flags = {"--max-devices-per-user", "1"}});
  MustStart(chatd);
  auto first = MustLogin(chatd, "alice", "a1");
  auto second = MustConnect(chatd);
  std::optional<v1::Envelope> reply = second->Hello(chatd.Token("alice"), "a2");
  REQUIRE(reply.has_value());
  REQUIRE_MESSAGE(reply->has_error(), reply->DebugString());
  CHECK(reply->error().code() == v1::Error::RESOURCE_EXHAUSTED);
  CHECK(second->WaitClosed().value_or(-1) == 4004);
  // The first device is unaffected, and another user may still connect.
  MustBarrier(*first);
  auto bob = MustLogin(chatd, "bob", "b1");
  MustAck(*bob, MakeSendToPeer("alice", NewClientMsgId(), "hi"));
}

TEST_CASE("server: bad presence subscriptions -> PERMISSION_DENIED or INVALID_ARGUMENT") {
  ChatdProcess chatd;
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  v1::Envelope stranger;
  stranger.mutable_presence_subscribe()->add_users("bob");
  CHECK(MustFail(*alice, stranger).code() == v1::Error::PERMISSION_DENIED);
  v1::Envelope empty_id;
  empty_id.mutable_presence_subscribe()->add_users("");
  CHECK(MustFail(*alice, empty_id).code() == v1::Error::INVALID_ARGUMENT);
  v1::Envelope no_users;
  no_users.mutable_presence_subscribe();
  CHECK(MustFail(*alice, no_users).code() == v1::Error::INVALID_ARGUMENT);
  CHECK_FALSE(alice->closed());
  MustBarrier(*alice);
}

}  // namespace
}  // namespace chat::testing
