// The Hub's protocol rules, each asserted as a client would see it: the envelopes a
// connection receives and the close codes it gets.
#include "src/server/hub.h"

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "chat/auth.h"
#include "src/core/jwt.h"
#include "tests/testing/envelopes.h"
#include "tests/testing/hub_harness.h"

namespace chat::testing {
namespace {

using server::SessionId;

v1::Envelope Only(std::vector<v1::Envelope> envelopes) {
  REQUIRE(envelopes.size() == 1);
  return std::move(envelopes[0]);
}

v1::Envelope PingEnvelope(uint64_t rid, int64_t client_time_ms = 0) {
  return MakePing(client_time_ms, rid);
}

v1::Envelope SyncEnvelope(uint64_t rid, std::vector<Cursor> cursors = {}, uint32_t limit = 0) {
  std::vector<std::pair<uint64_t, uint64_t>> pairs;
  for (const Cursor& cursor : cursors) pairs.emplace_back(cursor.conversation_id, cursor.seq);
  return MakeSync(pairs, limit, rid);
}

v1::Envelope HistoryEnvelope(uint64_t rid, ConversationId conversation_id, Seq before_seq,
                             uint32_t limit) {
  return MakeHistory(conversation_id, before_seq, limit, rid);
}

// Checks that `envelope` is an Error with `code` and rid, and returns it.
v1::Error ExpectError(const v1::Envelope& envelope, v1::Error::Code code, uint64_t rid) {
  REQUIRE_MESSAGE(envelope.has_error(), envelope.DebugString());
  CHECK(envelope.error().code() == code);
  CHECK(envelope.rid() == rid);
  return envelope.error();
}

// The session still answers requests.
void ExpectOpen(HubHarness& h, SessionId session) {
  CHECK_FALSE(h.closed(session).has_value());
  h.SendEnvelope(session, PingEnvelope(999));
  v1::Envelope pong = Only(h.Take(session));
  CHECK(pong.has_pong());
  CHECK(pong.rid() == 999);
}

// Sends one message from `session` to `peer`, commits it, and returns the ack.
v1::SendAck SendAndCommit(HubHarness& h, SessionId session, std::string_view peer, uint64_t n,
                          std::string_view body = "hi") {
  h.SendEnvelope(session, SendToPeer(n, peer, ClientMsgId(n), body));
  h.Pump();
  v1::Envelope ack = Only(h.Take(session));
  REQUIRE_MESSAGE(ack.has_send_ack(), ack.DebugString());
  return ack.send_ack();
}

TEST_CASE("hub: hello answers welcome with identity, epoch, time and limits") {
  ServerOptions options;
  options.max_body_bytes = 1000;
  options.sync_page_max = 77;
  HubHarness h(options);
  std::optional<SessionId> session = h.Open();
  REQUIRE(session.has_value());
  h.SendEnvelope(*session, HelloEnvelope(5, h.Token("alice"), "laptop-1"));
  v1::Envelope reply = Only(h.Take(*session));
  REQUIRE(reply.has_welcome());
  CHECK(reply.rid() == 5);
  const v1::Welcome& welcome = reply.welcome();
  CHECK(welcome.user_id() == "alice");
  CHECK(welcome.device_id() == "laptop-1");
  CHECK(welcome.session_id() == *session);
  CHECK(welcome.epoch() == h.store().Epoch());
  CHECK(welcome.server_time_ms() == h.clock().WallMs());
  const v1::Limits& limits = welcome.limits();
  CHECK(limits.max_message_bytes() == options.max_message_bytes);
  CHECK(limits.max_body_bytes() == 1000);
  CHECK(limits.history_page_max() == options.history_page_max);
  CHECK(limits.sync_page_max() == 77);
  CHECK(limits.sync_catchup_max() == options.sync_catchup_max);
  CHECK(limits.heartbeat_interval_ms() == options.heartbeat_interval_ms);
  CHECK(limits.idle_timeout_ms() == options.idle_timeout_ms);
  CHECK(limits.messages_per_second() == options.messages_per_second);
  CHECK(limits.max_attachments() == options.max_attachments);
  CHECK(h.hub().session_count() == 1);
  ExpectOpen(h, *session);
  CHECK(h.violations().empty());
}

TEST_CASE("hub: a request before hello is refused with UNAUTHENTICATED and close 4001") {
  HubHarness h;
  SessionId session = h.Open().value();
  h.SendEnvelope(session, SendToPeer(3, "bob", ClientMsgId(1), "hi"));
  v1::Error error = ExpectError(Only(h.Take(session)), v1::Error::UNAUTHENTICATED, 3);
  CHECK(error.message() == "hello required first");
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseUnauthenticated);
  CHECK(h.queued_appends() == 0);
  CHECK(h.hub().session_count() == 0);
  CHECK(h.violations().empty());
}

TEST_CASE("hub: a malformed token is refused with UNAUTHENTICATED and close 4001") {
  HubHarness h;
  SessionId session = h.Open().value();
  h.SendEnvelope(session, HelloEnvelope(1, "not-a-jwt", "d"));
  v1::Error error = ExpectError(Only(h.Take(session)), v1::Error::UNAUTHENTICATED, 1);
  CHECK_FALSE(error.message().empty());
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseUnauthenticated);
  CHECK(h.hub().session_count() == 0);
}

TEST_CASE("hub: an expired token is refused with UNAUTHENTICATED and close 4001") {
  HubHarness h;
  std::string token = h.Token("alice", 1000);
  // Past exp and the authenticator's default leeway (30 s).
  h.clock().Advance(1000 + 30'000 + 1000);
  SessionId session = h.Open().value();
  h.SendEnvelope(session, HelloEnvelope(1, token, "d"));
  ExpectError(Only(h.Take(session)), v1::Error::UNAUTHENTICATED, 1);
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseUnauthenticated);
}

// Alice says hello with a token valid for `valid_ms`; the session must stay open until
// `closes_after_ms` and then end with UNAUTHENTICATED "token expired" and close 4001.
void ExpectTokenExpiry(HubHarness& h, int64_t valid_ms, int64_t closes_after_ms) {
  SessionId session = h.Open().value();
  h.SendEnvelope(session, HelloEnvelope(1, h.Token("alice", valid_ms), "d"));
  REQUIRE(Only(h.Take(session)).has_welcome());
  h.Advance(closes_after_ms - 1);
  ExpectOpen(h, session);
  h.Advance(1);
  v1::Error error = ExpectError(Only(h.Take(session)), v1::Error::UNAUTHENTICATED, 0);
  CHECK(error.message() == "token expired");
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseUnauthenticated);
  CHECK(h.closed(session)->reason == "token expired");
}

TEST_CASE("hub: a session ends with UNAUTHENTICATED and close 4001 when its token expires") {
  ServerOptions options;
  options.idle_timeout_ms = 600'000;
  HubHarness h(options);
  // Valid for 60 s, plus the authenticator's default leeway (30 s).
  ExpectTokenExpiry(h, 60'000, 90'000);
  CHECK(h.hub().session_count() == 0);
  // A fresh token gets the user back in.
  SessionId again = h.Open().value();
  h.SendEnvelope(again, HelloEnvelope(2, h.Token("alice", 60'000), "d"));
  CHECK(Only(h.Take(again)).has_welcome());
}

TEST_CASE(
    "hub: a token that expires before the hello timeout would have ends the session on time") {
  ServerOptions options;
  options.hello_timeout_ms = 60'000;
  options.idle_timeout_ms = 600'000;
  HubHarness h(options);
  // Valid for 1 s plus the default leeway (30 s): the session's timer must move earlier than
  // the hello timeout it was armed with.
  ExpectTokenExpiry(h, 1'000, 31'000);
}

TEST_CASE("hub: a hello with a newer protocol_version gets FAILED_PRECONDITION and close 1002") {
  HubHarness h;
  SessionId session = h.Open().value();
  v1::Envelope hello = HelloEnvelope(1, h.Token("alice"), "d");
  hello.mutable_hello()->set_protocol_version(2);
  h.SendEnvelope(session, hello);
  v1::Error error = ExpectError(Only(h.Take(session)), v1::Error::FAILED_PRECONDITION, 1);
  CHECK(error.message() == "unsupported protocol_version 2; this server speaks 1");
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseProtocolError);
  CHECK(h.hub().session_count() == 0);
  // Version 1 and an unset version (0) are accepted.
  for (uint32_t version : {0u, 1u}) {
    SessionId ok = h.Open().value();
    v1::Envelope good = HelloEnvelope(1, h.Token("alice"), "d" + std::to_string(version));
    good.mutable_hello()->set_protocol_version(version);
    h.SendEnvelope(ok, good);
    CHECK(Only(h.Take(ok)).has_welcome());
  }
}

TEST_CASE("hub: a hello whose max_message_bytes is below the largest message frame is refused") {
  HubHarness h;
  for (const bool text : {false, true}) {
    CAPTURE(text);
    const codec::Format format = text ? codec::Format::kJson : codec::Format::kBinary;
    const size_t needed = server::LargestMessageFrameBytes(h.options(), format);
    SessionId session = h.Open().value();
    v1::Envelope hello = HelloEnvelope(1, h.Token("alice"), text ? "json" : "binary");
    hello.mutable_hello()->set_max_message_bytes(static_cast<uint32_t>(needed - 1));
    h.SendEnvelope(session, hello, format);
    v1::Error error = ExpectError(Only(h.Take(session)), v1::Error::FAILED_PRECONDITION, 1);
    CHECK(error.message() == "max_message_bytes " + std::to_string(needed - 1) +
                                 " is below the largest message this server may send (" +
                                 std::to_string(needed) + " bytes)");
    REQUIRE(h.closed(session).has_value());
    CHECK(h.closed(session)->code == server::kCloseClientLimitTooLow);
    // At the bound, and unset (0: not told), the hello is accepted.
    for (uint32_t max : {static_cast<uint32_t>(needed), 0u}) {
      SessionId ok = h.Open().value();
      v1::Envelope good = HelloEnvelope(
          1, h.Token("alice"), std::string(text ? "json" : "binary") + std::to_string(max));
      good.mutable_hello()->set_max_message_bytes(max);
      h.SendEnvelope(ok, good, format);
      CHECK(Only(h.Take(ok)).has_welcome());
    }
  }
  CHECK(h.hub().session_count() == 4);
}

// A valid JWT for `user`, signed as SignJwt would, for ids SignJwt refuses to mint (an
// application's own auth service may).
std::string RawToken(HubHarness& h, const std::string& user) {
  const int64_t exp = h.clock().WallMs() / 1000 + 3600;
  return jwt::SignRaw(kHubTestSecret, R"({"alg":"HS256","typ":"JWT"})",
                      "{\"sub\":" + jwt::QuoteJson(user) + ",\"exp\":" + std::to_string(exp) + "}");
}

TEST_CASE("hub: a token whose user id is over 128 bytes is refused with close 4001") {
  HubHarness h;
  SessionId session = h.Open().value();
  h.SendEnvelope(session, HelloEnvelope(1, RawToken(h, std::string(129, 'u')), "d"));
  v1::Error error = ExpectError(Only(h.Take(session)), v1::Error::UNAUTHENTICATED, 1);
  CHECK(error.message() == "the token's user id must be 1 to 128 bytes of UTF-8");
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseUnauthenticated);
  // 128 bytes are accepted.
  SessionId ok = h.Open().value();
  h.SendEnvelope(ok, HelloEnvelope(1, h.Token(std::string(128, 'u')), "d"));
  CHECK(Only(h.Take(ok)).has_welcome());
}

// An authenticator of the application's own whose user id is the token itself, except that
// "bad" stands for an id that is not UTF-8 (a token is a protobuf string, so always UTF-8).
class TokenIsUser final : public Authenticator {
 public:
  Result<Identity> Verify(std::string_view token, int64_t /*now_ms*/) const override {
    return Identity{token == "bad" ? std::string("mall\xffory") : std::string(token), 0};
  }
};

// Ids go into protobuf strings, which clients cannot decode unless they are UTF-8.
TEST_CASE("hub: a user id that is not UTF-8 is refused with close 4001") {
  ServerOptions options;
  options.authenticator = std::make_shared<TokenIsUser>();
  HubHarness h(options);
  SessionId session = h.Open().value();
  h.SendEnvelope(session, HelloEnvelope(1, "bad", "d"));
  v1::Error error = ExpectError(Only(h.Take(session)), v1::Error::UNAUTHENTICATED, 1);
  CHECK(error.message() == "the token's user id must be 1 to 128 bytes of UTF-8");
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseUnauthenticated);
  SessionId ok = h.Open().value();
  h.SendEnvelope(ok, HelloEnvelope(1, "zo\xc3\xab", "d"));
  CHECK(Only(h.Take(ok)).has_welcome());
}

// A JSON client that accepts the least the server allows still gets every Sync page within
// it, also when the messages' strings are control characters (six bytes each in JSON).
TEST_CASE("hub: Sync pages to a JSON client stay within its max_message_bytes") {
  HubHarness h;
  const SessionId alice = h.Connect("alice", "a1");
  constexpr int kCount = 12;
  for (int i = 0; i < kCount; ++i) {
    v1::Envelope send =
        SendToPeer(10 + i, "bob", "cmid-" + std::to_string(i) + "-0123456789abcdef", "x");
    v1::Attachment* a = send.mutable_send()->add_attachments();
    a->set_url("u");
    a->set_name(std::string(60'000, '\x01'));
    h.SendEnvelope(alice, send);
    h.Pump();
  }
  for (const v1::Envelope& e : h.Take(alice)) REQUIRE_MESSAGE(e.has_send_ack(), e.DebugString());

  const size_t bound = server::LargestMessageFrameBytes(h.options(), codec::Format::kJson);
  SessionId bob = h.Open().value();
  v1::Envelope hello = HelloEnvelope(1, h.Token("bob"), "b1");
  hello.mutable_hello()->set_max_message_bytes(static_cast<uint32_t>(bound));
  h.SendEnvelope(bob, hello, codec::Format::kJson);
  REQUIRE(Only(h.Take(bob)).has_welcome());
  int received = 0;
  uint64_t cursor = 0;
  ConversationId conversation = 0;
  for (int pages = 0; pages < 50 && received < kCount; ++pages) {
    std::vector<Cursor> cursors;
    if (conversation != 0) cursors.push_back({conversation, cursor});
    h.SendEnvelope(bob, SyncEnvelope(100 + pages, cursors), codec::Format::kJson);
    h.Pump();
    for (const ReceivedFrame& frame : h.TakeFrames(bob)) {
      CHECK(frame.bytes <= bound);
      for (const v1::Envelope& e : frame.envelopes) {
        if (!e.has_sync_batch()) continue;
        for (const v1::Message& m : e.sync_batch().messages()) {
          conversation = m.conversation_id();
          cursor = m.seq();
          ++received;
        }
      }
    }
  }
  CHECK(received == kCount);
}

// The bound covers the largest message of each kind the options allow, in a SyncBatch beside
// its conversation's state and a gap, in both formats (JSON with strings of control
// characters, each written as \u00XX).
TEST_CASE("hub: LargestMessageFrameBytes bounds the largest messages the server can send") {
  for (const bool capped : {false, true}) {
    CAPTURE(capped);
    ServerOptions o;
    o.max_message_bytes = 64 * 1024;
    o.max_body_bytes = 16 * 1024;
    if (capped) {
      // A full group's receipts page is the largest frame here.
      o.max_group_members = 500;
      o.max_channel_members = 40;
    }
    for (const char fill : {'a', '\x01'}) {
      const auto text = [fill](size_t n) { return std::string(n, fill); };
      size_t largest = 0;  // binary
      v1::Envelope envelope;
      envelope.set_rid(UINT64_MAX);
      v1::SyncBatch* batch = envelope.mutable_sync_batch();
      v1::ConversationState* state = batch->add_conversations();
      state->set_conversation_id(UINT64_MAX);
      state->set_kind(v1::CONVERSATION_KIND_GROUP);
      state->set_title(text(256));
      state->set_peer(text(128));
      for (auto set :
           {&v1::ConversationState::set_last_seq, &v1::ConversationState::set_read_seq,
            &v1::ConversationState::set_delivered_seq, &v1::ConversationState::set_unread,
            &v1::ConversationState::set_first_seq, &v1::ConversationState::set_removed_at_seq}) {
        (state->*set)(UINT64_MAX);
      }
      state->set_role(v1::ROLE_ADMIN);
      state->set_member_count(UINT32_MAX);
      state->set_last_activity_ms(INT64_MIN);
      state->set_peer_last_seen_ms(INT64_MIN);
      state->set_retention_ms(INT64_MIN);
      v1::Gap* gap = batch->add_gaps();
      gap->set_conversation_id(UINT64_MAX);
      gap->set_from_seq(UINT64_MAX);
      gap->set_to_seq(UINT64_MAX);
      batch->set_has_more(true);
      const auto fill_message = [&](v1::Message* m) {
        m->set_conversation_id(UINT64_MAX);
        m->set_seq(UINT64_MAX);
        m->set_message_id(UINT64_MAX);
        m->set_server_time_ms(INT64_MIN);
      };
      // A user message: body and attachment strings max_body_bytes together.
      v1::Message user;
      fill_message(&user);
      user.set_sender(text(128));
      user.set_sender_device(text(128));
      user.set_client_msg_id(text(128));
      user.set_kind(v1::MESSAGE_KIND_USER);
      user.set_content_type(text(255));
      size_t strings = 0;
      for (uint32_t i = 0; i < o.max_attachments; ++i) {
        v1::Attachment* a = user.add_attachments();
        a->set_url(text(10));
        a->set_mime_type(text(10));
        a->set_name(text(10));
        strings += 30;
        a->set_size(UINT64_MAX);
        a->set_sha256(std::string(32, '\xff'));
        a->set_width(UINT32_MAX);
        a->set_height(UINT32_MAX);
        a->set_duration_ms(UINT32_MAX);
      }
      user.set_body(std::string(o.max_body_bytes - strings, '\xff'));
      // A system event naming as many users as a request of max_message_bytes can, or as a
      // full conversation has.
      v1::Message system;
      fill_message(&system);
      system.set_kind(v1::MESSAGE_KIND_SYSTEM);
      v1::SystemEvent* event = system.mutable_system();
      event->set_type(v1::SystemEvent::TYPE_CREATED);
      event->set_actor(text(128));
      event->set_title(text(256));
      event->set_role(v1::ROLE_ADMIN);
      event->set_seq(UINT64_MAX);
      event->set_retention_ms(INT64_MIN);
      const size_t named = o.max_message_bytes / (128 + 3);
      for (size_t i = 0; i < named; ++i) event->add_users(text(128));
      for (const v1::Message* message : {&user, &system}) {
        *batch->mutable_messages()->Add() = *message;
        for (const codec::Format format : {codec::Format::kBinary, codec::Format::kJson}) {
          CAPTURE(static_cast<int>(format));
          CAPTURE(fill);
          const size_t encoded = codec::Encode(envelope, format).size();
          CHECK(encoded <= server::LargestMessageFrameBytes(o, format));
          if (format == codec::Format::kBinary) largest = std::max(largest, encoded);
        }
        batch->clear_messages();
      }
      // A group's receipts page, every member listed.
      v1::Envelope receipts;
      receipts.set_rid(UINT64_MAX);
      receipts.mutable_receipts_page()->set_conversation_id(UINT64_MAX);
      for (uint32_t i = 0; i < o.max_group_members; ++i) {
        v1::MemberReceipt* member = receipts.mutable_receipts_page()->add_members();
        member->set_user_id(text(128));
        member->set_delivered_seq(UINT64_MAX);
        member->set_read_seq(UINT64_MAX);
        member->set_role(v1::ROLE_ADMIN);
      }
      for (const codec::Format format : {codec::Format::kBinary, codec::Format::kJson}) {
        const size_t encoded = codec::Encode(receipts, format).size();
        CHECK(encoded <= server::LargestMessageFrameBytes(o, format));
        if (format == codec::Format::kBinary) largest = std::max(largest, encoded);
      }
      // Not loose either: the largest of them is within 4 KiB of the binary bound.
      CHECK(largest + 4096 > server::LargestMessageFrameBytes(o, codec::Format::kBinary));
    }
  }
}

TEST_CASE("hub: a token signed with another secret is refused with close 4001") {
  HubHarness h;
  Result<std::string> forged =
      SignJwt("another-secret-that-is-32-bytes-long!", "", "alice", h.clock().WallMs(), 60'000);
  REQUIRE(forged.ok());
  SessionId session = h.Open().value();
  h.SendEnvelope(session, HelloEnvelope(1, *forged, "d"));
  ExpectError(Only(h.Take(session)), v1::Error::UNAUTHENTICATED, 1);
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseUnauthenticated);
}

TEST_CASE("hub: no hello within hello_timeout_ms closes with 4001") {
  ServerOptions options;
  options.hello_timeout_ms = 5000;
  HubHarness h(options);
  SessionId session = h.Open().value();
  h.Advance(4999);
  CHECK_FALSE(h.closed(session).has_value());
  h.Advance(1);
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseUnauthenticated);
  CHECK(h.closed(session)->reason == "hello timeout");
  CHECK(h.hub().session_count() == 0);
  CHECK(h.violations().empty());
}

TEST_CASE("hub: an authenticated session is not closed by the hello timeout") {
  ServerOptions options;
  options.hello_timeout_ms = 5000;
  options.idle_timeout_ms = 60'000;
  HubHarness h(options);
  SessionId session = h.Connect("alice", "d");
  h.Advance(10'000);
  ExpectOpen(h, session);
}

TEST_CASE("hub: a session silent for idle_timeout_ms closes with 4002, and any frame resets it") {
  ServerOptions options;
  options.idle_timeout_ms = 20'000;
  HubHarness h(options);
  SessionId session = h.Connect("alice", "d");
  h.Advance(19'999);
  CHECK_FALSE(h.closed(session).has_value());
  h.SendEnvelope(session, PingEnvelope(1));
  CHECK(Only(h.Take(session)).has_pong());
  h.Advance(19'999);
  CHECK_FALSE(h.closed(session).has_value());
  h.Advance(1);
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseIdleTimeout);
  CHECK(h.closed(session)->reason == "idle timeout");
  CHECK(h.hub().session_count() == 0);
  CHECK(h.violations().empty());
}

TEST_CASE("hub: each session's hello and idle deadlines fire at their own time") {
  ServerOptions options;
  options.hello_timeout_ms = 5000;
  options.idle_timeout_ms = 20'000;
  HubHarness h(options);
  SessionId a = h.Open().value();
  SessionId b = h.Open().value();
  h.Advance(1000);
  h.SendEnvelope(a, HelloEnvelope(1, h.Token("alice"), "a"));
  CHECK(Only(h.Take(a)).has_welcome());
  h.Advance(2000);
  SessionId c = h.Open().value();
  h.Advance(2000);  // t = 5000
  CHECK(h.closed(b).has_value());
  CHECK_FALSE(h.closed(a).has_value());
  CHECK_FALSE(h.closed(c).has_value());
  h.Advance(2999);  // t = 7999
  CHECK_FALSE(h.closed(c).has_value());
  h.Advance(1);  // t = 8000
  REQUIRE(h.closed(c).has_value());
  CHECK(h.closed(c)->code == server::kCloseUnauthenticated);
  h.Advance(2000);  // t = 10000
  h.SendEnvelope(a, PingEnvelope(2));
  CHECK(Only(h.Take(a)).has_pong());
  h.Advance(19'999);  // t = 29999
  CHECK_FALSE(h.closed(a).has_value());
  h.Advance(1);
  REQUIRE(h.closed(a).has_value());
  CHECK(h.closed(a)->code == server::kCloseIdleTimeout);
  CHECK(h.hub().session_count() == 0);
  CHECK(h.violations().empty());
}

TEST_CASE("hub: a second hello is refused with FAILED_PRECONDITION and close 1008") {
  HubHarness h;
  SessionId session = h.Connect("alice", "d");
  h.SendEnvelope(session, HelloEnvelope(2, h.Token("alice"), "d"));
  v1::Error error = ExpectError(Only(h.Take(session)), v1::Error::FAILED_PRECONDITION, 2);
  CHECK(error.message() == "already authenticated");
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kClosePolicy);
  CHECK(h.hub().session_count() == 0);

  // Even a malformed second hello is the same violation.
  SessionId other = h.Connect("bob", "b");
  h.SendEnvelope(other, HelloEnvelope(3, "", ""));
  ExpectError(Only(h.Take(other)), v1::Error::FAILED_PRECONDITION, 3);
  REQUIRE(h.closed(other).has_value());
  CHECK(h.closed(other)->code == server::kClosePolicy);
}

TEST_CASE("hub: an undecodable binary frame gets INVALID_ARGUMENT and close 1007") {
  HubHarness h;
  SessionId session = h.Connect("alice", "d");
  h.SendRaw(session, std::string("\xff\xff\xff\xff\x0f", 5), /*text=*/false);
  ExpectError(Only(h.Take(session)), v1::Error::INVALID_ARGUMENT, 0);
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseInvalidPayload);
  CHECK(h.violations().empty());
}

TEST_CASE("hub: an undecodable text frame as first frame gets a JSON error and close 1007") {
  HubHarness h;
  SessionId session = h.Open().value();
  h.SendRaw(session, "{\"rid\": \"1\", \"hello\": ", /*text=*/true);
  std::vector<ReceivedFrame> frames = h.TakeFrames(session);
  REQUIRE(frames.size() == 1);
  CHECK(frames[0].format == codec::Format::kJson);
  REQUIRE(frames[0].envelopes.size() == 1);
  ExpectError(frames[0].envelopes[0], v1::Error::INVALID_ARGUMENT, 0);
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseInvalidPayload);
}

TEST_CASE("hub: a message over max_message_bytes gets INVALID_ARGUMENT and close 1009") {
  ServerOptions options;
  options.max_message_bytes = 1000;
  HubHarness h(options);
  SessionId session = h.Connect("alice", "a");
  h.SendEnvelope(session, SendToPeer(1, "bob", ClientMsgId(1), std::string(1000, 'x')));
  ExpectError(Only(h.Take(session)), v1::Error::INVALID_ARGUMENT, 0);
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseTooLarge);
  CHECK(h.queued_appends() == 0);
}

TEST_CASE("hub: a request missing a required field gets INVALID_ARGUMENT with its rid") {
  HubHarness h;
  SessionId session = h.Connect("alice", "d");
  v1::Envelope send = SendToPeer(7, "bob", "", "hi");
  h.SendEnvelope(session, send);
  v1::Error error = ExpectError(Only(h.Take(session)), v1::Error::INVALID_ARGUMENT, 7);
  CHECK(error.message().find("client_msg_id") != std::string::npos);
  CHECK(h.queued_appends() == 0);
  ExpectOpen(h, session);
}

TEST_CASE("hub: an invalid hello gets INVALID_ARGUMENT and the client may try again") {
  HubHarness h;
  SessionId session = h.Open().value();
  h.SendEnvelope(session, HelloEnvelope(1, "", "d"));
  v1::Error error = ExpectError(Only(h.Take(session)), v1::Error::INVALID_ARGUMENT, 1);
  CHECK(error.message() == "missing required field: hello.token");
  h.SendEnvelope(session, HelloEnvelope(2, h.Token("alice"), std::string(129, 'd')));
  error = ExpectError(Only(h.Take(session)), v1::Error::INVALID_ARGUMENT, 2);
  CHECK(error.message() == "device_id must be at most 128 bytes");
  CHECK_FALSE(h.closed(session).has_value());

  h.SendEnvelope(session, HelloEnvelope(3, h.Token("alice"), std::string(128, 'd')));
  v1::Envelope welcome = Only(h.Take(session));
  REQUIRE(welcome.has_welcome());
  CHECK(welcome.welcome().device_id() == std::string(128, 'd'));
}

TEST_CASE("hub: a server-only body from a client gets INVALID_ARGUMENT and close 1002") {
  HubHarness h;
  SessionId session = h.Connect("alice", "d");
  v1::Envelope welcome;
  welcome.set_rid(4);
  welcome.mutable_welcome()->set_user_id("alice");
  h.SendEnvelope(session, welcome);
  v1::Error error = ExpectError(Only(h.Take(session)), v1::Error::INVALID_ARGUMENT, 4);
  CHECK(error.message() == "not a client request: welcome");
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseProtocolError);
}

TEST_CASE("hub: a server-only body before hello also closes with 1002") {
  HubHarness h;
  SessionId session = h.Open().value();
  v1::Envelope ack;
  ack.mutable_send_ack()->set_seq(1);
  h.SendEnvelope(session, ack);
  v1::Error error = ExpectError(Only(h.Take(session)), v1::Error::INVALID_ARGUMENT, 0);
  CHECK(error.message() == "not a client request: send_ack");
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseProtocolError);
}

TEST_CASE("hub: a 1:1 send is acked only after commit and delivered to every other device") {
  HubHarness h;
  SessionId alice1 = h.Connect("alice", "a1");
  SessionId alice2 = h.Connect("alice", "a2");
  SessionId bob1 = h.Connect("bob", "b1");
  SessionId bob2 = h.Connect("bob", "b2");
  SessionId carol = h.Connect("carol", "c1");

  v1::Envelope send = SendToPeer(11, "bob", ClientMsgId(1), "hello bob");
  send.mutable_send()->set_content_type("text/markdown");
  h.SendEnvelope(alice1, send);
  CHECK(h.queued_appends() == 1);
  CHECK(h.hub().pending_appends() == 1);
  for (SessionId s : {alice1, alice2, bob1, bob2, carol}) CHECK(h.Take(s).empty());

  h.clock().Advance(5);
  CHECK(h.Pump() == 1);
  CHECK(h.hub().pending_appends() == 0);
  v1::Envelope ack = Only(h.Take(alice1));
  REQUIRE(ack.has_send_ack());
  CHECK(ack.rid() == 11);
  CHECK(ack.send_ack().seq() == 1);
  CHECK(ack.send_ack().conversation_id() != 0);
  CHECK(ack.send_ack().message_id() != 0);
  CHECK(ack.send_ack().client_msg_id() == ClientMsgId(1));
  CHECK_FALSE(ack.send_ack().duplicate());

  for (SessionId s : {alice2, bob1, bob2}) {
    v1::Envelope deliver = Only(h.Take(s));
    REQUIRE(deliver.has_deliver());
    CHECK(deliver.rid() == 0);
    const v1::Message& m = deliver.deliver().message();
    CHECK(m.conversation_id() == ack.send_ack().conversation_id());
    CHECK(m.seq() == 1);
    CHECK(m.message_id() == ack.send_ack().message_id());
    CHECK(m.server_time_ms() == ack.send_ack().server_time_ms());
    CHECK(m.sender() == "alice");
    CHECK(m.sender_device() == "a1");
    CHECK(m.client_msg_id() == ClientMsgId(1));
    CHECK(m.kind() == v1::MESSAGE_KIND_USER);
    CHECK(m.content_type() == "text/markdown");
    CHECK(m.body() == "hello bob");
  }
  CHECK(h.Take(carol).empty());
  CHECK(h.violations().empty());
}

TEST_CASE("hub: a direct conversation is addressed by peer, then by id from either side") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  SessionId bob = h.Connect("bob", "b");
  v1::SendAck first = SendAndCommit(h, alice, "bob", 1);
  CHECK(Only(h.Take(bob)).deliver().message().seq() == 1);
  const ConversationId conversation = first.conversation_id();

  h.SendEnvelope(bob, SendToConversation(2, conversation, ClientMsgId(2), "by id"));
  h.Pump();
  v1::Envelope ack = Only(h.Take(bob));
  REQUIRE(ack.has_send_ack());
  CHECK(ack.send_ack().conversation_id() == conversation);
  CHECK(ack.send_ack().seq() == 2);
  v1::Envelope deliver = Only(h.Take(alice));
  CHECK(deliver.deliver().message().sender() == "bob");
  CHECK(deliver.deliver().message().body() == "by id");

  h.SendEnvelope(bob, SendToPeer(3, "alice", ClientMsgId(3), "by peer"));
  h.Pump();
  ack = Only(h.Take(bob));
  CHECK(ack.send_ack().conversation_id() == conversation);
  CHECK(ack.send_ack().seq() == 3);
  CHECK(Only(h.Take(alice)).deliver().message().seq() == 3);
}

TEST_CASE("hub: a resend with the same client_msg_id is acked as duplicate and not delivered") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  SessionId bob = h.Connect("bob", "b");
  v1::SendAck first = SendAndCommit(h, alice, "bob", 1);
  CHECK(Only(h.Take(bob)).has_deliver());

  h.SendEnvelope(alice, SendToPeer(2, "bob", ClientMsgId(1), "hi"));
  h.Pump();
  v1::Envelope again = Only(h.Take(alice));
  REQUIRE(again.has_send_ack());
  CHECK(again.rid() == 2);
  CHECK(again.send_ack().duplicate());
  CHECK(again.send_ack().message_id() == first.message_id());
  CHECK(again.send_ack().seq() == first.seq());
  CHECK(again.send_ack().conversation_id() == first.conversation_id());
  CHECK(again.send_ack().client_msg_id() == ClientMsgId(1));
  CHECK(h.Take(bob).empty());
}

TEST_CASE("hub: a resend before the first commit is acked twice and delivered once") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  SessionId bob = h.Connect("bob", "b");
  h.SendEnvelope(alice, SendToPeer(1, "bob", ClientMsgId(1), "hi"));
  h.SendEnvelope(alice, SendToPeer(2, "bob", ClientMsgId(1), "hi"));
  CHECK(h.queued_appends() == 2);
  h.Pump();
  std::vector<v1::Envelope> acks = h.Take(alice);
  REQUIRE(acks.size() == 2);
  CHECK(acks[0].rid() == 1);
  CHECK_FALSE(acks[0].send_ack().duplicate());
  CHECK(acks[1].rid() == 2);
  CHECK(acks[1].send_ack().duplicate());
  CHECK(acks[1].send_ack().message_id() == acks[0].send_ack().message_id());
  CHECK(acks[1].send_ack().seq() == acks[0].send_ack().seq());
  CHECK(Only(h.Take(bob)).has_deliver());
}

TEST_CASE("hub: a failed commit is an error to the sender, never an ack or a delivery") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  SessionId bob = h.Connect("bob", "b");
  h.FailCommits(Unavailable("disk on fire"));
  h.SendEnvelope(alice, SendToPeer(8, "bob", ClientMsgId(1), "hi"));
  h.Pump();
  v1::Error error = ExpectError(Only(h.Take(alice)), v1::Error::UNAVAILABLE, 8);
  CHECK(error.client_msg_id() == ClientMsgId(1));
  CHECK(error.message() == "disk on fire");
  CHECK(error.retry_after_ms() > 0);
  CHECK(h.Take(bob).empty());

  // Nothing was stored: the resend after recovery is the first message, not a duplicate.
  h.FailCommits(Status::Ok());
  v1::SendAck ack = SendAndCommit(h, alice, "bob", 1);
  CHECK(ack.seq() == 1);
  CHECK_FALSE(ack.duplicate());
  CHECK(Only(h.Take(bob)).has_deliver());
}

TEST_CASE("hub: sending to a conversation the user is not in gets PERMISSION_DENIED") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  SessionId bob = h.Connect("bob", "b");
  SessionId carol = h.Connect("carol", "c");
  v1::SendAck ack = SendAndCommit(h, alice, "bob", 1);
  h.Take(bob);

  h.SendEnvelope(carol, SendToConversation(5, ack.conversation_id(), ClientMsgId(9), "intrude"));
  h.Pump();
  v1::Error error = ExpectError(Only(h.Take(carol)), v1::Error::PERMISSION_DENIED, 5);
  CHECK(error.client_msg_id() == ClientMsgId(9));
  CHECK(h.Take(alice).empty());
  CHECK(h.Take(bob).empty());

  // A conversation that does not exist looks the same.
  h.SendEnvelope(carol, SendToConversation(6, 424242, ClientMsgId(10), "nowhere"));
  h.Pump();
  ExpectError(Only(h.Take(carol)), v1::Error::PERMISSION_DENIED, 6);
  ExpectOpen(h, carol);
}

TEST_CASE("hub: an empty body without attachments gets INVALID_ARGUMENT") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  h.SendEnvelope(alice, SendToPeer(1, "bob", ClientMsgId(1), ""));
  v1::Error error = ExpectError(Only(h.Take(alice)), v1::Error::INVALID_ARGUMENT, 1);
  CHECK(error.message() == "empty body");
  CHECK(error.client_msg_id() == ClientMsgId(1));
  CHECK(h.queued_appends() == 0);

  // Attachments alone are a message.
  v1::Envelope with_attachment = SendToPeer(2, "bob", ClientMsgId(2), "");
  with_attachment.mutable_send()->add_attachments()->set_url("https://x/1.png");
  h.SendEnvelope(alice, with_attachment);
  CHECK(h.queued_appends() == 1);
  ExpectOpen(h, alice);
}

TEST_CASE("hub: a body over max_body_bytes gets INVALID_ARGUMENT") {
  ServerOptions options;
  options.max_body_bytes = 10;
  HubHarness h(options);
  SessionId alice = h.Connect("alice", "a");
  h.SendEnvelope(alice, SendToPeer(1, "bob", ClientMsgId(1), std::string(11, 'x')));
  v1::Error error = ExpectError(Only(h.Take(alice)), v1::Error::INVALID_ARGUMENT, 1);
  CHECK(error.message() == "body too large");
  CHECK(error.client_msg_id() == ClientMsgId(1));
  h.SendEnvelope(alice, SendToPeer(2, "bob", ClientMsgId(2), std::string(10, 'x')));
  CHECK(h.queued_appends() == 1);
  ExpectOpen(h, alice);
}

TEST_CASE("hub: a client_msg_id outside 16..128 bytes gets INVALID_ARGUMENT") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  h.SendEnvelope(alice, SendToPeer(1, "bob", std::string(15, 'k'), "hi"));
  v1::Error error = ExpectError(Only(h.Take(alice)), v1::Error::INVALID_ARGUMENT, 1);
  CHECK(error.message() == "client_msg_id must be 16..128 bytes");
  h.SendEnvelope(alice, SendToPeer(2, "bob", std::string(129, 'k'), "hi"));
  ExpectError(Only(h.Take(alice)), v1::Error::INVALID_ARGUMENT, 2);
  CHECK(h.queued_appends() == 0);
  h.SendEnvelope(alice, SendToPeer(3, "bob", std::string(16, 'k'), "hi"));
  h.SendEnvelope(alice, SendToPeer(4, "bob", std::string(128, 'k'), "hi"));
  CHECK(h.queued_appends() == 2);
  ExpectOpen(h, alice);
}

TEST_CASE("hub: more than max_attachments gets INVALID_ARGUMENT") {
  ServerOptions options;
  options.max_attachments = 2;
  HubHarness h(options);
  SessionId alice = h.Connect("alice", "a");
  v1::Envelope send = SendToPeer(1, "bob", ClientMsgId(1), "pics");
  for (int i = 0; i < 3; ++i) send.mutable_send()->add_attachments()->set_url("https://x");
  h.SendEnvelope(alice, send);
  v1::Error error = ExpectError(Only(h.Take(alice)), v1::Error::INVALID_ARGUMENT, 1);
  CHECK(error.message() == "too many attachments");
  CHECK(h.queued_appends() == 0);
  ExpectOpen(h, alice);
}

TEST_CASE("hub: a peer, content type or attachments over their bounds get INVALID_ARGUMENT") {
  ServerOptions options;
  options.max_body_bytes = 100;
  HubHarness h(options);
  SessionId alice = h.Connect("alice", "a");
  h.SendEnvelope(alice, SendToPeer(1, std::string(129, 'p'), ClientMsgId(1), "hi"));
  v1::Error error = ExpectError(Only(h.Take(alice)), v1::Error::INVALID_ARGUMENT, 1);
  CHECK(error.message() == "peer must be 1..128 bytes");
  CHECK(error.client_msg_id() == ClientMsgId(1));
  h.SendEnvelope(alice, SendToPeer(2, "", ClientMsgId(2), "hi"));
  CHECK(ExpectError(Only(h.Take(alice)), v1::Error::INVALID_ARGUMENT, 2).message() ==
        "missing required field: send.conversation_id or send.peer");

  v1::Envelope typed = SendToPeer(3, "bob", ClientMsgId(3), "hi");
  typed.mutable_send()->set_content_type(std::string(256, 't'));
  h.SendEnvelope(alice, typed);
  CHECK(ExpectError(Only(h.Take(alice)), v1::Error::INVALID_ARGUMENT, 3).message() ==
        "content_type must be at most 255 bytes");

  // 60 bytes of body and 41 of attachment strings: one over max_body_bytes.
  v1::Envelope described = SendToPeer(4, "bob", ClientMsgId(4), std::string(60, 'b'));
  v1::Attachment* a = described.mutable_send()->add_attachments();
  a->set_url(std::string(30, 'u'));
  a->set_name(std::string(11, 'n'));
  h.SendEnvelope(alice, described);
  CHECK(ExpectError(Only(h.Take(alice)), v1::Error::INVALID_ARGUMENT, 4).message() ==
        "body and attachments too large");
  CHECK(h.queued_appends() == 0);

  // At the bounds they are accepted.
  h.SendEnvelope(alice, SendToPeer(5, std::string(128, 'p'), ClientMsgId(5), "hi"));
  typed.set_rid(6);
  typed.mutable_send()->set_client_msg_id(ClientMsgId(6));
  typed.mutable_send()->set_content_type(std::string(255, 't'));
  h.SendEnvelope(alice, typed);
  a->set_name(std::string(10, 'n'));
  described.set_rid(7);
  described.mutable_send()->set_client_msg_id(ClientMsgId(7));
  h.SendEnvelope(alice, described);
  CHECK(h.queued_appends() == 3);
  ExpectOpen(h, alice);
}

TEST_CASE("hub: sending to oneself as peer gets INVALID_ARGUMENT") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  h.SendEnvelope(alice, SendToPeer(1, "alice", ClientMsgId(1), "me"));
  v1::Error error = ExpectError(Only(h.Take(alice)), v1::Error::INVALID_ARGUMENT, 1);
  CHECK(error.client_msg_id() == ClientMsgId(1));
  CHECK(h.queued_appends() == 0);
  ExpectOpen(h, alice);
}

TEST_CASE("hub: past the message burst a send gets RESOURCE_EXHAUSTED with retry_after_ms") {
  ServerOptions options;
  options.messages_per_second = 2;
  options.messages_burst = 3;
  HubHarness h(options);
  SessionId alice = h.Connect("alice", "a");
  // Waiting refills the bucket only up to the burst (the Hello took a token too).
  h.Advance(10'000);
  for (uint64_t n = 1; n <= 3; ++n)
    h.SendEnvelope(alice, SendToPeer(n, "bob", ClientMsgId(n), "x"));
  CHECK(h.queued_appends() == 3);
  h.SendEnvelope(alice, SendToPeer(4, "bob", ClientMsgId(4), "x"));
  v1::Error error = ExpectError(Only(h.Take(alice)), v1::Error::RESOURCE_EXHAUSTED, 4);
  CHECK(error.retry_after_ms() > 0);
  CHECK(error.retry_after_ms() <= 500);
  CHECK(error.client_msg_id() == ClientMsgId(4));
  CHECK(h.queued_appends() == 3);
  CHECK_FALSE(h.closed(alice).has_value());

  // After the advised wait the bucket holds a token again. A later message is refused until
  // the refused one comes again, so it cannot be stored before it; the refusal takes no token.
  h.Advance(error.retry_after_ms());
  h.SendEnvelope(alice, SendToPeer(5, "bob", ClientMsgId(5), "x"));
  v1::Error held = ExpectError(Only(h.Take(alice)), v1::Error::UNAVAILABLE, 5);
  CHECK(held.message() ==
        "an earlier message from this connection was not stored; send it again first");
  CHECK(held.retry_after_ms() == 1000);
  CHECK(held.client_msg_id() == ClientMsgId(5));
  CHECK(h.queued_appends() == 3);
  h.SendEnvelope(alice, SendToPeer(6, "bob", ClientMsgId(4), "x"));
  CHECK(h.Take(alice).empty());
  CHECK(h.queued_appends() == 4);
  h.Advance(1000);
  h.SendEnvelope(alice, SendToPeer(7, "bob", ClientMsgId(5), "x"));
  CHECK(h.Take(alice).empty());
  CHECK(h.queued_appends() == 5);
  // Stored in the order sent: 1, 2, 3, then 4 and 5.
  h.Pump();
  std::vector<v1::Envelope> acks = h.Take(alice);
  REQUIRE(acks.size() == 5);
  for (size_t i = 0; i < acks.size(); ++i) {
    REQUIRE(acks[i].has_send_ack());
    CHECK(acks[i].send_ack().client_msg_id() == ClientMsgId(i + 1));
    CHECK(acks[i].send_ack().seq() == i + 1);
  }
}

TEST_CASE("hub: a session held behind a refused send is let go after kHeldSendTimeoutMs") {
  ServerOptions options;
  options.messages_per_second = 1;
  options.messages_burst = 2;
  HubHarness h(options);
  SessionId alice = h.Connect("alice", "a");
  h.Advance(10'000);
  for (uint64_t n = 1; n <= 2; ++n)
    h.SendEnvelope(alice, SendToPeer(n, "bob", ClientMsgId(n), "x"));
  h.SendEnvelope(alice, SendToPeer(3, "bob", ClientMsgId(3), "x"));
  ExpectError(Only(h.Take(alice)), v1::Error::RESOURCE_EXHAUSTED, 3);
  // The client gave message 3 up: its next message is refused until the hold runs out.
  h.Advance(server::kHeldSendTimeoutMs - 1);
  h.SendEnvelope(alice, SendToPeer(4, "bob", ClientMsgId(4), "x"));
  ExpectError(Only(h.Take(alice)), v1::Error::UNAVAILABLE, 4);
  h.Advance(1);
  const size_t queued = h.queued_appends();
  h.SendEnvelope(alice, SendToPeer(5, "bob", ClientMsgId(4), "x"));
  CHECK(h.Take(alice).empty());
  CHECK(h.queued_appends() == queued + 1);
}

TEST_CASE("hub: the message rate limit applies to every request, not only sends") {
  ServerOptions options;
  options.messages_per_second = 1;
  options.messages_burst = 2;
  HubHarness h(options);
  SessionId alice = h.Connect("alice", "a");
  h.Advance(10'000);
  h.SendEnvelope(alice, PingEnvelope(1));
  h.SendEnvelope(alice, SyncEnvelope(2));
  CHECK(Only(h.Take(alice)).has_pong());
  CHECK(h.queued_reads() == 1);
  h.SendEnvelope(alice, HistoryEnvelope(3, 1, 0, 10));
  v1::Error error = ExpectError(Only(h.Take(alice)), v1::Error::RESOURCE_EXHAUSTED, 3);
  CHECK(error.retry_after_ms() == 1000);
  CHECK(h.queued_reads() == 1);
  CHECK_FALSE(h.closed(alice).has_value());
}

TEST_CASE("hub: past bytes_per_second a send gets RESOURCE_EXHAUSTED with retry_after_ms") {
  ServerOptions options;
  options.bytes_per_second = 1000;
  HubHarness h(options);
  SessionId alice = h.Connect("alice", "a");
  h.SendEnvelope(alice, SendToPeer(1, "bob", ClientMsgId(1), std::string(1500, 'x')));
  CHECK(h.queued_appends() == 1);  // the bucket goes into debt on this one
  h.SendEnvelope(alice, SendToPeer(2, "bob", ClientMsgId(2), "x"));
  v1::Error error = ExpectError(Only(h.Take(alice)), v1::Error::RESOURCE_EXHAUSTED, 2);
  CHECK(error.retry_after_ms() > 0);
  CHECK(h.queued_appends() == 1);
}

TEST_CASE("hub: limits at their type's maximum do not overflow the rate limiter") {
  ServerOptions options;
  options.messages_per_second = UINT32_MAX;
  options.messages_burst = UINT32_MAX;
  options.bytes_per_second = SIZE_MAX;
  options.idle_timeout_ms = UINT32_MAX;
  HubHarness h(options);
  // A token that outlives the day the test waits (a session ends when its token expires).
  SessionId alice = h.Open().value();
  h.SendEnvelope(alice, HelloEnvelope(1, h.Token("alice", 2 * 86'400'000), "a"));
  REQUIRE(Only(h.Take(alice)).has_welcome());
  h.Advance(86'400'000);
  h.SendEnvelope(alice, SendToPeer(1, "bob", ClientMsgId(1), "x"));
  CHECK(h.Take(alice).empty());
  CHECK(h.queued_appends() == 1);
}

TEST_CASE("hub: an offline recipient syncs every missed message in order") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  ConversationId conversation = 0;
  for (uint64_t n = 1; n <= 5; ++n) {
    conversation = SendAndCommit(h, alice, "bob", n, "m" + std::to_string(n)).conversation_id();
  }
  SessionId bob = h.Connect("bob", "b");
  CHECK(h.Take(bob).empty());
  h.SendEnvelope(bob, SyncEnvelope(21));
  CHECK(h.queued_reads() == 1);
  CHECK(h.Take(bob).empty());
  h.Pump();
  v1::Envelope reply = Only(h.Take(bob));
  REQUIRE_MESSAGE(reply.has_sync_batch(), reply.DebugString());
  CHECK(reply.rid() == 21);
  const v1::SyncBatch& batch = reply.sync_batch();
  REQUIRE(batch.conversations_size() == 1);
  CHECK(batch.conversations(0).conversation_id() == conversation);
  CHECK(batch.conversations(0).last_seq() == 5);
  CHECK(batch.conversations(0).peer() == "alice");
  REQUIRE(batch.messages_size() == 5);
  for (int i = 0; i < 5; ++i) {
    CHECK(batch.messages(i).seq() == static_cast<uint64_t>(i + 1));
    CHECK(batch.messages(i).body() == "m" + std::to_string(i + 1));
  }
  CHECK(batch.gaps_size() == 0);
  CHECK_FALSE(batch.has_more());
}

TEST_CASE("hub: sync pages are capped by sync_page_max and continue with has_more") {
  ServerOptions options;
  options.sync_page_max = 2;
  HubHarness h(options);
  SessionId alice = h.Connect("alice", "a");
  ConversationId conversation = 0;
  for (uint64_t n = 1; n <= 5; ++n)
    conversation = SendAndCommit(h, alice, "bob", n).conversation_id();
  SessionId bob = h.Connect("bob", "b");

  // The client asks for more than the server allows.
  Seq cursor = 0;
  std::vector<Seq> seen;
  for (int page = 0; page < 3; ++page) {
    h.SendEnvelope(bob, SyncEnvelope(30 + page, {{conversation, cursor}}, 100));
    h.Pump();
    v1::Envelope reply = Only(h.Take(bob));
    REQUIRE(reply.has_sync_batch());
    const v1::SyncBatch& batch = reply.sync_batch();
    CHECK(batch.messages_size() <= 2);
    for (const v1::Message& m : batch.messages()) seen.push_back(m.seq());
    if (!seen.empty()) cursor = seen.back();
    CHECK(batch.has_more() == (page < 2));
  }
  CHECK(seen == std::vector<Seq>{1, 2, 3, 4, 5});
}

TEST_CASE("hub: sync past sync_catchup_max returns the newest messages and a gap") {
  ServerOptions options;
  options.sync_catchup_max = 3;
  HubHarness h(options);
  SessionId alice = h.Connect("alice", "a");
  ConversationId conversation = 0;
  for (uint64_t n = 1; n <= 5; ++n)
    conversation = SendAndCommit(h, alice, "bob", n).conversation_id();
  SessionId bob = h.Connect("bob", "b");
  h.SendEnvelope(bob, SyncEnvelope(1));
  h.Pump();
  v1::Envelope reply = Only(h.Take(bob));
  REQUIRE(reply.has_sync_batch());
  const v1::SyncBatch& batch = reply.sync_batch();
  REQUIRE(batch.messages_size() == 3);
  CHECK(batch.messages(0).seq() == 3);
  CHECK(batch.messages(2).seq() == 5);
  REQUIRE(batch.gaps_size() == 1);
  CHECK(batch.gaps(0).conversation_id() == conversation);
  CHECK(batch.gaps(0).from_seq() == 1);
  CHECK(batch.gaps(0).to_seq() == 2);
}

TEST_CASE("hub: history pages are newest first and continue below before_seq") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  ConversationId conversation = 0;
  for (uint64_t n = 1; n <= 5; ++n)
    conversation = SendAndCommit(h, alice, "bob", n).conversation_id();
  SessionId bob = h.Connect("bob", "b");

  h.SendEnvelope(bob, HistoryEnvelope(40, conversation, 0, 2));
  CHECK(h.Take(bob).empty());
  h.Pump();
  v1::Envelope reply = Only(h.Take(bob));
  REQUIRE_MESSAGE(reply.has_history_page(), reply.DebugString());
  CHECK(reply.rid() == 40);
  const v1::HistoryPage& page = reply.history_page();
  CHECK(page.conversation_id() == conversation);
  REQUIRE(page.messages_size() == 2);
  CHECK(page.messages(0).seq() == 5);
  CHECK(page.messages(1).seq() == 4);
  CHECK(page.has_more());
  CHECK(page.first_seq() == 1);

  h.SendEnvelope(bob, HistoryEnvelope(41, conversation, 4, 0));
  h.Pump();
  reply = Only(h.Take(bob));
  REQUIRE(reply.has_history_page());
  REQUIRE(reply.history_page().messages_size() == 3);
  CHECK(reply.history_page().messages(0).seq() == 3);
  CHECK(reply.history_page().messages(2).seq() == 1);
  CHECK_FALSE(reply.history_page().has_more());
}

TEST_CASE("hub: history is capped by history_page_max") {
  ServerOptions options;
  options.history_page_max = 2;
  HubHarness h(options);
  SessionId alice = h.Connect("alice", "a");
  ConversationId conversation = 0;
  for (uint64_t n = 1; n <= 4; ++n)
    conversation = SendAndCommit(h, alice, "bob", n).conversation_id();
  h.SendEnvelope(alice, HistoryEnvelope(1, conversation, 0, 50));
  h.Pump();
  v1::Envelope reply = Only(h.Take(alice));
  REQUIRE(reply.has_history_page());
  CHECK(reply.history_page().messages_size() == 2);
  CHECK(reply.history_page().has_more());
}

TEST_CASE("hub: history of a conversation the user is not in gets PERMISSION_DENIED") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  ConversationId conversation = SendAndCommit(h, alice, "bob", 1).conversation_id();
  SessionId carol = h.Connect("carol", "c");
  h.SendEnvelope(carol, HistoryEnvelope(9, conversation, 0, 10));
  h.Pump();
  ExpectError(Only(h.Take(carol)), v1::Error::PERMISSION_DENIED, 9);
  ExpectOpen(h, carol);
}

TEST_CASE("hub: ping answers pong with the client's and the server's time") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  h.SendEnvelope(alice, PingEnvelope(12, 123456));
  v1::Envelope reply = Only(h.Take(alice));
  REQUIRE(reply.has_pong());
  CHECK(reply.rid() == 12);
  CHECK(reply.pong().client_time_ms() == 123456);
  CHECK(reply.pong().server_time_ms() == h.clock().WallMs());
}

TEST_CASE("hub: past max_devices_per_user a hello gets RESOURCE_EXHAUSTED and close 4004") {
  ServerOptions options;
  options.max_devices_per_user = 2;
  HubHarness h(options);
  SessionId first = h.Connect("alice", "a1");
  h.Connect("alice", "a2");
  h.Connect("bob", "b1");  // other users are not affected
  SessionId third = h.Open().value();
  h.SendEnvelope(third, HelloEnvelope(3, h.Token("alice"), "a3"));
  ExpectError(Only(h.Take(third)), v1::Error::RESOURCE_EXHAUSTED, 3);
  REQUIRE(h.closed(third).has_value());
  CHECK(h.closed(third)->code == server::kCloseTooManyDevices);

  // A device that leaves frees its place.
  h.Disconnect(first);
  h.Connect("alice", "a3");
  CHECK(h.violations().empty());
}

TEST_CASE("hub: past max_pending_connections a new connection is refused") {
  ServerOptions options;
  options.max_pending_connections = 2;
  HubHarness h(options);
  SessionId a = h.Open().value();
  REQUIRE(h.Open().has_value());
  CHECK_FALSE(h.Open().has_value());
  // A hello makes room.
  h.SendEnvelope(a, HelloEnvelope(1, h.Token("alice"), "a"));
  CHECK(Only(h.Take(a)).has_welcome());
  CHECK(h.Open().has_value());
  CHECK_FALSE(h.Open().has_value());
}

TEST_CASE("hub: past max_connections a new connection is refused") {
  ServerOptions options;
  options.max_connections = 2;
  HubHarness h(options);
  SessionId a = h.Connect("alice", "a");
  h.Connect("bob", "b");
  CHECK_FALSE(h.Open().has_value());
  h.Disconnect(a);
  CHECK(h.hub().session_count() == 1);
  CHECK(h.Open().has_value());
}

TEST_CASE("hub: a JSON session gets JSON frames while a binary session gets binary") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a", codec::Format::kJson);
  SessionId bob_binary = h.Connect("bob", "b1", codec::Format::kBinary);
  SessionId bob_json = h.Connect("bob", "b2", codec::Format::kJson);
  h.SendEnvelope(alice, SendToPeer(1, "bob", ClientMsgId(1), "hi"), codec::Format::kJson);
  h.Pump();

  std::vector<ReceivedFrame> ack = h.TakeFrames(alice);
  REQUIRE(ack.size() == 1);
  CHECK(ack[0].format == codec::Format::kJson);
  REQUIRE(ack[0].envelopes.size() == 1);
  CHECK(ack[0].envelopes[0].has_send_ack());

  std::vector<ReceivedFrame> binary = h.TakeFrames(bob_binary);
  REQUIRE(binary.size() == 1);
  CHECK(binary[0].format == codec::Format::kBinary);
  CHECK(binary[0].envelopes.at(0).deliver().message().body() == "hi");

  std::vector<ReceivedFrame> json = h.TakeFrames(bob_json);
  REQUIRE(json.size() == 1);
  CHECK(json[0].format == codec::Format::kJson);
  CHECK(json[0].envelopes.at(0).deliver().message().body() == "hi");
}

TEST_CASE("hub: the first frame fixes the session's format for every reply") {
  HubHarness h;
  SessionId json = h.Connect("alice", "a", codec::Format::kJson);
  // A binary frame later is still understood, but the reply stays JSON.
  h.SendEnvelope(json, PingEnvelope(1), codec::Format::kBinary);
  std::vector<ReceivedFrame> frames = h.TakeFrames(json);
  REQUIRE(frames.size() == 1);
  CHECK(frames[0].format == codec::Format::kJson);
  CHECK(frames[0].envelopes.at(0).has_pong());

  SessionId binary = h.Connect("bob", "b", codec::Format::kBinary);
  h.SendEnvelope(binary, PingEnvelope(2), codec::Format::kJson);
  frames = h.TakeFrames(binary);
  REQUIRE(frames.size() == 1);
  CHECK(frames[0].format == codec::Format::kBinary);
  CHECK(frames[0].envelopes.at(0).has_pong());
}

TEST_CASE("hub: requests this server does not serve yet get FAILED_PRECONDITION") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  std::vector<std::pair<std::string, v1::Envelope>> requests;
  auto add = [&](std::string name, auto set) {
    v1::Envelope envelope;
    set(envelope);
    requests.emplace_back(std::move(name), std::move(envelope));
  };
  add("register_push_token", [](v1::Envelope& e) {
    e.mutable_register_push_token()->set_platform("fcm");
    e.mutable_register_push_token()->set_token("t");
  });

  uint64_t rid = 100;
  for (auto& [name, envelope] : requests) {
    CAPTURE(name);
    envelope.set_rid(++rid);
    h.SendEnvelope(alice, envelope);
    v1::Error error = ExpectError(Only(h.Take(alice)), v1::Error::FAILED_PRECONDITION, rid);
    CHECK(error.message() == name + " is not supported by this server yet");
  }
  CHECK(h.queued_appends() == 0);
  CHECK(h.queued_reads() == 0);
  ExpectOpen(h, alice);
}

TEST_CASE("hub: a client batch is processed element by element") {
  HubHarness h;
  SessionId session = h.Open().value();
  v1::Envelope batch;
  *batch.mutable_batch()->add_envelopes() = HelloEnvelope(1, h.Token("alice"), "a");
  *batch.mutable_batch()->add_envelopes() = PingEnvelope(2, 7);
  *batch.mutable_batch()->add_envelopes() = SendToPeer(3, "bob", ClientMsgId(1), "hi");
  h.SendEnvelope(session, batch);
  std::vector<v1::Envelope> got = h.Take(session);
  REQUIRE(got.size() == 2);
  CHECK(got[0].has_welcome());
  CHECK(got[0].rid() == 1);
  CHECK(got[1].has_pong());
  CHECK(got[1].rid() == 2);
  CHECK(h.queued_appends() == 1);
}

TEST_CASE("hub: a batch far larger than the decoder's first arena block is served in full") {
  for (codec::Format format : {codec::Format::kBinary, codec::Format::kJson}) {
    CAPTURE(static_cast<int>(format));
    HubHarness h;
    SessionId alice = h.Connect("alice", "a", format);
    SessionId bob = h.Connect("bob", "b");
    constexpr uint64_t kSends = 60;  // tens of KiB of decoded envelopes and strings
    v1::Envelope batch;
    for (uint64_t n = 1; n <= kSends; ++n) {
      *batch.mutable_batch()->add_envelopes() =
          SendToPeer(n, "bob", ClientMsgId(n), "message number " + std::to_string(n) + " of 60");
    }
    h.SendEnvelope(alice, batch, format);
    h.Pump();
    std::vector<v1::Envelope> acks = h.Take(alice);
    std::vector<v1::Envelope> delivered = h.Take(bob);
    REQUIRE(acks.size() == kSends);
    REQUIRE(delivered.size() == kSends);
    for (uint64_t n = 1; n <= kSends; ++n) {
      CHECK(acks[n - 1].rid() == n);
      CHECK(acks[n - 1].send_ack().client_msg_id() == ClientMsgId(n));
      CHECK(acks[n - 1].send_ack().seq() == n);
      const v1::Message& message = delivered[n - 1].deliver().message();
      CHECK(message.client_msg_id() == ClientMsgId(n));
      CHECK(message.body() == "message number " + std::to_string(n) + " of 60");
    }
    CHECK(h.violations().empty());
  }
}

TEST_CASE("hub: a batch stops at the element that closes the session") {
  HubHarness h;
  SessionId session = h.Open().value();
  v1::Envelope batch;
  *batch.mutable_batch()->add_envelopes() = PingEnvelope(1);
  *batch.mutable_batch()->add_envelopes() = PingEnvelope(2);
  h.SendEnvelope(session, batch);
  ExpectError(Only(h.Take(session)), v1::Error::UNAUTHENTICATED, 1);
  REQUIRE(h.closed(session).has_value());
  CHECK(h.closed(session)->code == server::kCloseUnauthenticated);
  CHECK(h.violations().empty());
}

TEST_CASE("hub: fan-out still happens when the sending session closed before the commit") {
  HubHarness h;
  SessionId alice1 = h.Connect("alice", "a1");
  SessionId alice2 = h.Connect("alice", "a2");
  SessionId bob = h.Connect("bob", "b");
  h.SendEnvelope(alice1, SendToPeer(1, "bob", ClientMsgId(1), "bye"));
  h.Disconnect(alice1);
  h.Pump();
  CHECK(Only(h.Take(bob)).deliver().message().body() == "bye");
  CHECK(Only(h.Take(alice2)).deliver().message().body() == "bye");
  CHECK(h.Take(alice1).empty());
  CHECK(h.violations().empty());
}

TEST_CASE("hub: replies for a session that closed meanwhile are dropped") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  SendAndCommit(h, alice, "bob", 1);
  h.SendEnvelope(alice, SyncEnvelope(1));
  h.SendEnvelope(alice, HistoryEnvelope(2, 1, 0, 10));
  h.Disconnect(alice);
  CHECK(h.Pump() == 2);
  CHECK(h.violations().empty());
}

TEST_CASE("hub: a closed session is no longer a fan-out target") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  SessionId bob1 = h.Connect("bob", "b1");
  SessionId bob2 = h.Connect("bob", "b2");
  h.Disconnect(bob1);
  SendAndCommit(h, alice, "bob", 1);
  CHECK(Only(h.Take(bob2)).has_deliver());
  CHECK(h.violations().empty());
  CHECK(h.hub().session_count() == 2);
}

TEST_CASE("hub: CloseAll closes every session with 1001") {
  HubHarness h;
  SessionId alice = h.Connect("alice", "a");
  SessionId pending = h.Open().value();
  h.SendEnvelope(alice, SendToPeer(1, "bob", ClientMsgId(1), "late"));
  h.hub().CloseAll();
  for (SessionId s : {alice, pending}) {
    REQUIRE(h.closed(s).has_value());
    CHECK(h.closed(s)->code == server::kCloseGoingAway);
    CHECK(h.closed(s)->reason == "server shutting down");
  }
  CHECK(h.hub().session_count() == 0);
  // The append already submitted still completes, with nobody left to tell, and so does the
  // last-seen write for the users who were online.
  CHECK(h.Pump() == 2);
  CHECK(h.hub().pending_appends() == 0);
  CHECK(h.violations().empty());
}

}  // namespace
}  // namespace chat::testing
