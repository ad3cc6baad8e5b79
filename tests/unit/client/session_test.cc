// Session: the client's sans-IO protocol state machine, driven with a FakeClock, a fake
// transport (recorded envelopes) and an in-memory cache.
#include "src/client/session.h"

#include <doctest/doctest.h>

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "src/client/cache.h"
#include "tests/testing/fake_clock.h"

namespace chat::client {
namespace {

class FakeIo : public SessionIo {
 public:
  void Open() override { ++opens; }
  void Drop() override { ++drops; }
  bool Write(const v1::Envelope& envelope) override {
    if (full) return false;
    written.push_back(envelope);
    return true;
  }
  // Removes and returns the written envelopes.
  std::vector<v1::Envelope> Take() { return std::exchange(written, {}); }

  int opens = 0;
  int drops = 0;
  bool full = false;
  std::vector<v1::Envelope> written;
};

class Recorder : public ClientListener {
 public:
  void OnConnectionState(ConnectionState state) override { states.push_back(state); }
  void OnMessage(const MessageEvent& event) override { messages.push_back(event); }
  void OnConversationUpdated(const ConversationInfo& info) override {
    conversations.push_back(info);
  }
  void OnError(const Status& status) override { errors.push_back(status); }

  std::vector<Seq> SentSeqs(ConversationId conversation) const {
    std::vector<Seq> out;
    for (const MessageEvent& e : messages) {
      if (e.status == MessageStatus::kSent && e.message.conversation_id == conversation) {
        out.push_back(e.message.seq);
      }
    }
    return out;
  }

  std::vector<ConnectionState> states;
  std::vector<MessageEvent> messages;
  std::vector<ConversationInfo> conversations;
  std::vector<Status> errors;
};

constexpr uint64_t kRandom = 999'999'999'999;

v1::Message Msg(ConversationId conversation, Seq seq, const std::string& sender = "bob") {
  v1::Message m;
  m.set_conversation_id(conversation);
  m.set_seq(seq);
  m.set_message_id(1000 + seq);
  m.set_sender(sender);
  m.set_sender_device("phone");
  m.set_client_msg_id("cmid-" + sender + "-" + std::to_string(conversation) + "-" +
                      std::to_string(seq) + "-padding");
  m.set_server_time_ms(1'735'689'600'000 + static_cast<int64_t>(seq));
  m.set_kind(v1::MESSAGE_KIND_USER);
  m.set_content_type("text/plain");
  m.set_body("m" + std::to_string(seq));
  return m;
}

struct Harness {
  explicit Harness(SessionOptions o = {}, std::shared_ptr<Cache> shared_cache = nullptr) {
    if (o.device_id.empty()) o.device_id = "laptop";
    if (!o.token_provider) {
      o.token_provider = [this] {
        ++token_calls;
        return token;
      };
    }
    cache = shared_cache ? shared_cache : std::shared_ptr<Cache>(Cache::Open("").value());
    session =
        std::make_unique<Session>(o, cache.get(), &io, &listener, clock, [this] { return random; });
  }

  int64_t Now() const { return clock->MonotonicMs(); }

  // Start (or reconnect) up to the Hello, and return the Hello envelope.
  v1::Envelope OpenToHello() {
    if (state() == ConnectionState::kDisconnected && io.opens == 0) session->Start();
    clock->SetMonotonicMs(session->reconnect_at_ms());
    session->Tick();
    REQUIRE(state() == ConnectionState::kConnecting);
    session->OnOpen();
    auto written = io.Take();
    REQUIRE(written.size() == 1);
    REQUIRE(written[0].has_hello());
    return written[0];
  }

  // Welcome and answer the first Sync with `batch`; returns the Sync request.
  v1::Envelope Welcome(uint64_t epoch = 7, uint32_t heartbeat_ms = 30'000,
                       uint32_t messages_per_second = 0, const std::string& user = "alice") {
    v1::Envelope hello = OpenToHello();
    v1::Envelope welcome;
    welcome.set_rid(hello.rid());
    welcome.mutable_welcome()->set_user_id(user);
    welcome.mutable_welcome()->set_device_id("laptop");
    welcome.mutable_welcome()->set_epoch(epoch);
    welcome.mutable_welcome()->mutable_limits()->set_heartbeat_interval_ms(heartbeat_ms);
    welcome.mutable_welcome()->mutable_limits()->set_messages_per_second(messages_per_second);
    session->OnEnvelope(welcome);
    auto written = io.Take();
    REQUIRE(written.size() == 1);
    REQUIRE(written[0].has_sync());
    return written[0];
  }

  void Reply(const v1::Envelope& request, v1::SyncBatch batch) {
    v1::Envelope reply;
    reply.set_rid(request.rid());
    *reply.mutable_sync_batch() = std::move(batch);
    session->OnEnvelope(reply);
  }

  void ConnectLive(uint64_t epoch = 7) {
    v1::Envelope sync = Welcome(epoch);
    Reply(sync, {});
    REQUIRE(state() == ConnectionState::kConnected);
  }

  void Deliver(const v1::Message& m) {
    v1::Envelope e;
    e.mutable_deliver()->mutable_message()->CopyFrom(m);
    session->OnEnvelope(e);
  }

  OutboxEntry AddOutbox(const std::string& id, ConversationId conversation = 5,
                        const std::string& peer = "") {
    OutboxEntry entry;
    entry.client_msg_id = id;
    entry.conversation_id = conversation;
    entry.peer = peer;
    entry.content_type = "text/plain";
    entry.body = "body of " + id;
    REQUIRE(cache->AddOutbox(&entry, 100).ok());
    session->OnOutboxAdded(entry);
    return entry;
  }

  ConnectionState state() const { return session->state(); }

  std::shared_ptr<testing::FakeClock> clock = std::make_shared<testing::FakeClock>();
  FakeIo io;
  Recorder listener;
  std::shared_ptr<Cache> cache;
  std::string token = "token-1";
  int token_calls = 0;
  uint64_t random = kRandom;
  std::unique_ptr<Session> session;
};

std::vector<std::string> SendIds(const std::vector<v1::Envelope>& envelopes) {
  std::vector<std::string> out;
  for (const auto& e : envelopes) {
    if (e.has_send()) out.push_back(e.send().client_msg_id());
  }
  return out;
}

v1::Envelope AckFor(const v1::Envelope& send, Seq seq, bool duplicate = false) {
  v1::Envelope ack;
  ack.set_rid(send.rid());
  ack.mutable_send_ack()->set_conversation_id(send.send().conversation_id());
  ack.mutable_send_ack()->set_seq(seq);
  ack.mutable_send_ack()->set_message_id(5000 + seq);
  ack.mutable_send_ack()->set_client_msg_id(send.send().client_msg_id());
  ack.mutable_send_ack()->set_duplicate(duplicate);
  return ack;
}

TEST_CASE("session: connects with Hello, syncs, and reports each state once in order") {
  Harness h;
  v1::Envelope hello = h.OpenToHello();
  CHECK(hello.hello().token() == "token-1");
  CHECK(hello.hello().device_id() == "laptop");
  CHECK(hello.hello().protocol_version() == 1);
  CHECK(h.io.opens == 1);

  v1::Envelope welcome;
  welcome.set_rid(hello.rid());
  welcome.mutable_welcome()->set_user_id("alice");
  welcome.mutable_welcome()->set_epoch(7);
  h.session->OnEnvelope(welcome);
  CHECK(h.state() == ConnectionState::kSyncing);
  auto written = h.io.Take();
  REQUIRE(written.size() == 1);
  CHECK(written[0].sync().cursors_size() == 0);
  h.Reply(written[0], {});
  CHECK(h.state() == ConnectionState::kConnected);
  CHECK(h.listener.states == std::vector<ConnectionState>{ConnectionState::kConnecting,
                                                          ConnectionState::kSyncing,
                                                          ConnectionState::kConnected});
  CHECK(h.cache->Epoch() == 7);
  CHECK(h.cache->UserId() == "alice");
}

TEST_CASE("session: reconnect delays follow the backoff with full jitter and reset after 60 s") {
  Harness h;
  h.session->Start();
  std::vector<int64_t> delays;
  for (int i = 0; i < 9; ++i) {
    h.clock->SetMonotonicMs(h.session->reconnect_at_ms());
    h.session->Tick();
    REQUIRE(h.io.opens == i + 1);
    h.session->OnClosed(0, "connection refused");
    REQUIRE(h.state() == ConnectionState::kDisconnected);
    delays.push_back(h.session->reconnect_at_ms() - h.Now());
  }
  // kRandom % (min(30000, 500 * 2^attempt) + 1) for attempts 0..8.
  CHECK(delays == std::vector<int64_t>{15, 0, 1875, 2484, 7623, 15906, 7777, 7777, 7777});

  // A connection that stays up a minute starts the delays over.
  h.ConnectLive();
  h.clock->Advance(60'000);
  h.session->OnEnvelope(v1::Envelope());  // any frame keeps the link alive
  h.session->OnClosed(1001, "server shutting down");
  CHECK(h.session->reconnect_at_ms() - h.Now() == 15);
}

TEST_CASE("session: a short-lived connection does not reset the backoff") {
  Harness h;
  h.ConnectLive();
  h.clock->Advance(59'000);
  h.session->Tick();
  h.io.Take();
  v1::Envelope pong;
  pong.mutable_pong();
  h.session->OnEnvelope(pong);
  h.session->OnClosed(1006, "abnormal");
  CHECK(h.session->attempt() == 1);
  h.ConnectLive();
  h.session->OnClosed(1006, "abnormal");
  CHECK(h.session->attempt() == 2);
  CHECK(h.session->reconnect_at_ms() - h.Now() == 0);  // kRandom % 1001
}

TEST_CASE("session: the server's retry_after_ms is a floor for the reconnect delay") {
  Harness h;
  v1::Envelope hello = h.OpenToHello();
  v1::Envelope error;
  error.set_rid(hello.rid());
  error.mutable_error()->set_code(v1::Error::UNAVAILABLE);
  error.mutable_error()->set_message("overloaded");
  error.mutable_error()->set_retry_after_ms(12'000);
  h.session->OnEnvelope(error);
  CHECK(h.io.drops == 1);
  CHECK(h.state() == ConnectionState::kDisconnected);
  CHECK(h.session->reconnect_at_ms() - h.Now() == 12'000);
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0].code() == Code::kUnavailable);
  CHECK(h.listener.errors[0].retry_after_ms() == 12'000);
}

TEST_CASE("session: pings every heartbeat and drops a link silent for two intervals") {
  Harness h;
  v1::Envelope sync = h.Welcome(7, /*heartbeat_ms=*/10'000);
  h.Reply(sync, {});
  h.clock->Advance(9'999);
  h.session->Tick();
  CHECK(h.io.Take().empty());
  h.clock->Advance(1);
  h.session->Tick();
  auto written = h.io.Take();
  REQUIRE(written.size() == 1);
  CHECK(written[0].has_ping());
  CHECK(h.session->NextDeadlineMs() <= h.Now() + 10'000);

  // A Pong proves the link alive.
  v1::Envelope pong;
  pong.set_rid(written[0].rid());
  pong.mutable_pong();
  h.session->OnEnvelope(pong);
  h.clock->Advance(19'999);
  h.session->Tick();
  CHECK(h.state() == ConnectionState::kConnected);
  CHECK(h.io.drops == 0);
  h.clock->Advance(1);
  h.session->Tick();
  CHECK(h.io.drops == 1);
  CHECK(h.state() == ConnectionState::kDisconnected);
}

TEST_CASE("session: the options' heartbeat overrides the server's") {
  SessionOptions o;
  o.heartbeat_interval_ms = 2'000;
  Harness h(o);
  h.ConnectLive();
  h.clock->Advance(2'000);
  h.session->Tick();
  auto written = h.io.Take();
  REQUIRE(written.size() == 1);
  CHECK(written[0].has_ping());
  h.clock->Advance(2'000);
  h.session->Tick();
  CHECK(h.state() == ConnectionState::kDisconnected);
}

TEST_CASE("session: a connection that does not reach Welcome in time is given up") {
  SessionOptions o;
  o.connect_timeout_ms = 5'000;
  Harness h(o);
  h.OpenToHello();
  h.clock->Advance(4'999);
  h.session->Tick();
  CHECK(h.state() == ConnectionState::kConnecting);
  h.clock->Advance(1);
  h.session->Tick();
  CHECK(h.state() == ConnectionState::kDisconnected);
  CHECK(h.io.drops == 1);
}

TEST_CASE("session: an expired token is refreshed from the provider and retried at once") {
  Harness h;
  h.ConnectLive();
  CHECK(h.token_calls == 1);
  v1::Envelope expired;
  expired.mutable_error()->set_code(v1::Error::UNAUTHENTICATED);
  expired.mutable_error()->set_message("token expired");
  h.session->OnEnvelope(expired);
  h.session->OnClosed(4001, "unauthenticated");
  CHECK(h.session->reconnect_at_ms() == h.Now());
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0].code() == Code::kUnauthenticated);

  h.token = "token-2";
  v1::Envelope hello = h.OpenToHello();
  CHECK(hello.hello().token() == "token-2");
  CHECK(h.token_calls == 2);

  // The provider still gives an expired token: the next attempt waits like any failure.
  v1::Envelope again;
  again.set_rid(hello.rid());
  again.mutable_error()->set_code(v1::Error::UNAUTHENTICATED);
  again.mutable_error()->set_message("token expired");
  h.session->OnEnvelope(again);
  CHECK(h.state() == ConnectionState::kDisconnected);
  CHECK(h.session->reconnect_at_ms() > h.Now());
}

TEST_CASE("session: a forged token is reported and retried with backoff") {
  Harness h;
  v1::Envelope hello = h.OpenToHello();
  v1::Envelope error;
  error.set_rid(hello.rid());
  error.mutable_error()->set_code(v1::Error::UNAUTHENTICATED);
  error.mutable_error()->set_message("bad signature");
  h.session->OnEnvelope(error);
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0] == Status(Code::kUnauthenticated, "bad signature"));
  CHECK(h.session->reconnect_at_ms() - h.Now() == 15);
}

TEST_CASE("session: the outbox drains in order within the in-flight window") {
  SessionOptions o;
  o.max_in_flight = 2;
  Harness h(o);
  // Added while offline: reported pending, nothing written.
  h.AddOutbox("msg-a-0123456789");
  h.AddOutbox("msg-b-0123456789");
  h.AddOutbox("msg-c-0123456789");
  REQUIRE(h.listener.messages.size() == 3);
  CHECK(h.listener.messages[0].status == MessageStatus::kPending);
  CHECK(h.listener.messages[0].message.client_msg_id == "msg-a-0123456789");
  CHECK(h.listener.messages[0].outgoing);

  h.ConnectLive();
  auto sends = h.io.Take();
  CHECK(SendIds(sends) == std::vector<std::string>{"msg-a-0123456789", "msg-b-0123456789"});
  CHECK(sends[0].send().conversation_id() == 5);
  CHECK(sends[0].send().body() == "body of msg-a-0123456789");

  h.session->OnEnvelope(AckFor(sends[0], 1));
  auto more = h.io.Take();
  CHECK(SendIds(more) == std::vector<std::string>{"msg-c-0123456789"});
  CHECK(h.cache->PendingCount() == 2);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1});
  CHECK(h.listener.messages.back().message.client_msg_id == "msg-a-0123456789");
  CHECK(h.listener.messages.back().outgoing);

  // The connection drops with b and c unacknowledged: both go again, in order, same ids.
  h.session->OnClosed(1006, "abnormal");
  h.ConnectLive();
  auto resent = h.io.Take();
  CHECK(SendIds(resent) == std::vector<std::string>{"msg-b-0123456789", "msg-c-0123456789"});
  h.session->OnEnvelope(AckFor(resent[0], 2, /*duplicate=*/true));
  h.session->OnEnvelope(AckFor(resent[1], 3));
  CHECK(h.cache->PendingCount() == 0);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2, 3});
  // A late second ack for the same message changes nothing.
  h.session->OnEnvelope(AckFor(resent[1], 3, true));
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2, 3});
}

TEST_CASE("session: sends are paced below the server's messages_per_second") {
  SessionOptions o;
  o.max_in_flight = 100;
  Harness h(o);
  for (int i = 0; i < 12; ++i) h.AddOutbox("msg-" + std::to_string(100 + i) + "-0123456789");
  v1::Envelope sync = h.Welcome(7, 30'000, /*messages_per_second=*/10);
  h.Reply(sync, {});
  // A full bucket holds 90% of the rate: 9 messages at once.
  auto first = SendIds(h.io.Take());
  REQUIRE(first.size() == 9);
  CHECK(first.front() == "msg-100-0123456789");
  // Then one every 1000 / 9 ms, in order.
  h.clock->Advance(100);
  h.session->Tick();
  CHECK(SendIds(h.io.Take()).empty());
  h.clock->Advance(20);
  h.session->Tick();
  CHECK(SendIds(h.io.Take()) == std::vector<std::string>{"msg-109-0123456789"});
  h.clock->Advance(400);
  h.session->Tick();
  CHECK(SendIds(h.io.Take()) ==
        std::vector<std::string>{"msg-110-0123456789", "msg-111-0123456789"});
}

TEST_CASE("session: an own message seen in Sync before its ack leaves the outbox") {
  Harness h;
  h.AddOutbox("msg-a-0123456789");
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  v1::Message mine = Msg(5, 1, "alice");
  mine.set_client_msg_id("msg-a-0123456789");
  *batch.add_messages() = mine;
  h.Reply(sync, batch);
  CHECK(h.state() == ConnectionState::kConnected);
  CHECK(h.cache->PendingCount() == 0);
  CHECK(SendIds(h.io.Take()).empty());
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1});
  CHECK(h.listener.messages.back().outgoing);
}

TEST_CASE("session: a refused send fails with the server's code and a retryable one is retried") {
  Harness h;
  h.ConnectLive();
  h.AddOutbox("msg-denied-012345", 9);
  auto sends = h.io.Take();
  REQUIRE(sends.size() == 1);
  v1::Envelope denied;
  denied.set_rid(sends[0].rid());
  denied.mutable_error()->set_code(v1::Error::PERMISSION_DENIED);
  denied.mutable_error()->set_message("not a member");
  denied.mutable_error()->set_client_msg_id("msg-denied-012345");
  h.session->OnEnvelope(denied);
  const MessageEvent& failed = h.listener.messages.back();
  CHECK(failed.status == MessageStatus::kFailed);
  CHECK(failed.reason == Status(Code::kPermissionDenied, "not a member"));
  CHECK(h.cache->PendingCount() == 0);
  REQUIRE(h.cache->ListOutbox().size() == 1);
  CHECK(h.cache->ListOutbox()[0].status == MessageStatus::kFailed);

  h.AddOutbox("msg-busy-01234567", 5);
  sends = h.io.Take();
  REQUIRE(sends.size() == 1);
  v1::Envelope busy;
  busy.set_rid(sends[0].rid());
  busy.mutable_error()->set_code(v1::Error::RESOURCE_EXHAUSTED);
  busy.mutable_error()->set_retry_after_ms(3'000);
  h.session->OnEnvelope(busy);
  CHECK(h.listener.messages.back().status == MessageStatus::kPending);
  h.clock->Advance(2'999);
  h.session->Tick();
  CHECK(SendIds(h.io.Take()).empty());
  h.clock->Advance(1);
  h.session->Tick();
  CHECK(SendIds(h.io.Take()) == std::vector<std::string>{"msg-busy-01234567"});
}

TEST_CASE("session: a Deliver that skips ahead is held until Sync fills the gap") {
  Harness h;
  h.ConnectLive();
  h.Deliver(Msg(5, 1));
  // A new conversation: its state is asked for with a Sync from 0.
  auto sync1 = h.io.Take();
  REQUIRE(sync1.size() == 1);
  REQUIRE(sync1[0].has_sync());
  v1::SyncBatch state;
  auto* conv = state.add_conversations();
  conv->set_conversation_id(5);
  conv->set_kind(v1::CONVERSATION_KIND_DIRECT);
  conv->set_peer("bob");
  conv->set_last_seq(1);
  conv->set_unread(1);
  *state.add_messages() = Msg(5, 1);
  h.Reply(sync1[0], state);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1});
  CHECK(h.cache->GetConversation(5)->info.peer == "bob");

  h.Deliver(Msg(5, 3));
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1});
  auto sync2 = h.io.Take();
  REQUIRE(sync2.size() == 1);
  REQUIRE(sync2[0].sync().cursors_size() == 1);
  CHECK(sync2[0].sync().cursors(0).conversation_id() == 5);
  CHECK(sync2[0].sync().cursors(0).seq() == 1);
  h.Deliver(Msg(5, 4));  // arrives while the repair is in flight
  v1::SyncBatch fill;
  *fill.add_messages() = Msg(5, 2);
  *fill.add_messages() = Msg(5, 3);
  *fill.add_messages() = Msg(5, 4);
  h.Reply(sync2[0], fill);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2, 3, 4});
  h.Deliver(Msg(5, 4));  // a duplicate from the wire
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2, 3, 4});
  CHECK(h.cache->GetConversation(5)->cursor == 4);
  CHECK(h.cache->GetConversation(5)->info.unread == 4);
}

TEST_CASE("session: Sync pages until has_more is false, and a Gap moves the cursor") {
  Harness h;
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch first;
  auto* conv = first.add_conversations();
  conv->set_conversation_id(5);
  conv->set_kind(v1::CONVERSATION_KIND_GROUP);
  conv->set_last_seq(4004);
  auto* gap = first.add_gaps();
  gap->set_conversation_id(5);
  gap->set_from_seq(1);
  gap->set_to_seq(4000);
  *first.add_messages() = Msg(5, 4001);
  *first.add_messages() = Msg(5, 4002);
  first.set_has_more(true);
  h.Reply(sync, first);
  CHECK(h.state() == ConnectionState::kSyncing);
  auto next = h.io.Take();
  REQUIRE(next.size() == 1);
  REQUIRE(next[0].sync().cursors_size() == 1);
  CHECK(next[0].sync().cursors(0).seq() == 4002);
  v1::SyncBatch second;
  *second.add_messages() = Msg(5, 4003);
  *second.add_messages() = Msg(5, 4004);
  h.Reply(next[0], second);
  CHECK(h.state() == ConnectionState::kConnected);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{4001, 4002, 4003, 4004});
}

TEST_CASE("session: a changed server epoch clears the cache and syncs from scratch") {
  Harness h;
  v1::Envelope sync = h.Welcome(7);
  v1::SyncBatch batch;
  auto* conv = batch.add_conversations();
  conv->set_conversation_id(5);
  conv->set_kind(v1::CONVERSATION_KIND_DIRECT);
  conv->set_last_seq(2);
  *batch.add_messages() = Msg(5, 1);
  *batch.add_messages() = Msg(5, 2);
  h.Reply(sync, batch);
  CHECK(h.cache->MessageCount() == 2);
  h.AddOutbox("msg-kept-01234567", 0, "bob");
  h.io.Take();

  h.session->OnClosed(1001, "restart");
  v1::Envelope same = h.Welcome(7);
  CHECK(same.sync().cursors_size() == 1);
  h.Reply(same, {});
  CHECK(h.listener.errors.empty());
  h.io.Take();

  h.session->OnClosed(1001, "restart");
  v1::Envelope fresh = h.Welcome(8);
  CHECK(fresh.sync().cursors_size() == 0);
  CHECK(h.cache->MessageCount() == 0);
  CHECK(h.cache->ListConversations().empty());
  CHECK(h.cache->Epoch() == 8);
  CHECK(h.cache->PendingCount() == 1);
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0].code() == Code::kDataLoss);
  // The new store's messages reach the application again, from seq 1.
  v1::SyncBatch rebuilt;
  *rebuilt.add_messages() = Msg(6, 1);
  auto* c6 = rebuilt.add_conversations();
  c6->set_conversation_id(6);
  c6->set_kind(v1::CONVERSATION_KIND_DIRECT);
  c6->set_last_seq(1);
  h.Reply(fresh, rebuilt);
  CHECK(h.listener.SentSeqs(6) == std::vector<Seq>{1});
  CHECK(SendIds(h.io.Take()) == std::vector<std::string>{"msg-kept-01234567"});
}

TEST_CASE("session: a cache of another user is rebuilt") {
  Harness h;
  v1::Envelope sync = h.Welcome(7);
  v1::SyncBatch batch;
  *batch.add_messages() = Msg(5, 1);
  auto* conv = batch.add_conversations();
  conv->set_conversation_id(5);
  conv->set_kind(v1::CONVERSATION_KIND_DIRECT);
  h.Reply(sync, batch);
  h.session->OnClosed(1000, "bye");
  v1::Envelope fresh = h.Welcome(7, 30'000, 0, "mallory");
  CHECK(fresh.sync().cursors_size() == 0);
  CHECK(h.cache->MessageCount() == 0);
  CHECK(h.cache->UserId() == "mallory");
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0] ==
        Status(Code::kDataLoss, "signed in as another user: the cache was rebuilt"));
}

TEST_CASE("session: History answers from the cache when it holds the range") {
  Harness h;
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  auto* conv = batch.add_conversations();
  conv->set_conversation_id(5);
  conv->set_kind(v1::CONVERSATION_KIND_DIRECT);
  conv->set_last_seq(3);
  for (Seq s = 1; s <= 3; ++s) *batch.add_messages() = Msg(5, s);
  h.Reply(sync, batch);
  h.io.Take();

  std::vector<Result<HistoryResult>> results;
  auto cb = [&](Result<HistoryResult> r) { results.push_back(std::move(r)); };
  h.session->History(5, 0, 2, cb);
  REQUIRE(results.size() == 1);
  REQUIRE(results[0].ok());
  CHECK(results[0]->from_cache);
  CHECK(results[0]->has_more);
  REQUIRE(results[0]->messages.size() == 2);
  CHECK(results[0]->messages[0].seq == 3);
  CHECK(results[0]->messages[1].seq == 2);
  CHECK(h.io.Take().empty());
}

TEST_CASE("session: History asks the server for what the cache lacks, and fails when offline") {
  Harness h;
  std::vector<Result<HistoryResult>> results;
  auto cb = [&](Result<HistoryResult> r) { results.push_back(std::move(r)); };
  h.session->History(5, 0, 10, cb);
  REQUIRE(results.size() == 1);
  CHECK(results[0].status().code() == Code::kUnavailable);

  h.ConnectLive();
  h.session->History(5, 0, 10, cb);
  auto written = h.io.Take();
  REQUIRE(written.size() == 1);
  REQUIRE(written[0].has_history());
  CHECK(written[0].history().conversation_id() == 5);
  CHECK(written[0].history().limit() == 10);
  v1::Envelope page;
  page.set_rid(written[0].rid());
  page.mutable_history_page()->set_conversation_id(5);
  *page.mutable_history_page()->add_messages() = Msg(5, 2);
  *page.mutable_history_page()->add_messages() = Msg(5, 1);
  h.session->OnEnvelope(page);
  REQUIRE(results.size() == 2);
  REQUIRE(results[1].ok());
  CHECK_FALSE(results[1]->from_cache);
  CHECK(results[1]->messages.size() == 2);

  // A request refused by the server reports its code; one cut by a disconnect, Unavailable.
  h.session->History(9, 0, 10, cb);
  written = h.io.Take();
  v1::Envelope denied;
  denied.set_rid(written[0].rid());
  denied.mutable_error()->set_code(v1::Error::PERMISSION_DENIED);
  h.session->OnEnvelope(denied);
  REQUIRE(results.size() == 3);
  CHECK(results[2].status().code() == Code::kPermissionDenied);
  h.session->History(10, 0, 10, cb);
  h.session->OnClosed(1006, "abnormal");
  REQUIRE(results.size() == 4);
  CHECK(results[3].status().code() == Code::kUnavailable);
}

TEST_CASE("session: a full transport queue drops the connection") {
  Harness h;
  h.ConnectLive();
  h.io.full = true;
  h.AddOutbox("msg-a-0123456789");
  CHECK(h.state() == ConnectionState::kDisconnected);
  CHECK(h.io.drops == 1);
  CHECK(h.cache->PendingCount() == 1);
}

TEST_CASE("session: Reconnect drops the link and connects again at once") {
  Harness h;
  h.ConnectLive();
  h.session->Reconnect();
  CHECK(h.io.drops == 1);
  CHECK(h.state() == ConnectionState::kDisconnected);
  CHECK(h.session->reconnect_at_ms() == h.Now());
  h.session->Tick();
  CHECK(h.io.opens == 2);
}

TEST_CASE("session: after Stop nothing is written or reported") {
  Harness h;
  h.ConnectLive();
  size_t states = h.listener.states.size();
  h.session->Stop();
  CHECK(h.io.drops == 1);
  h.Deliver(Msg(5, 1));
  h.clock->Advance(120'000);
  h.session->Tick();
  CHECK(h.io.Take().empty());
  CHECK(h.listener.messages.empty());
  CHECK(h.listener.states.size() == states);
}

}  // namespace
}  // namespace chat::client
