// Session: the client's sans-IO protocol state machine, driven with a FakeClock, a fake
// transport (recorded envelopes) and an in-memory cache.
#include "src/client/session.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "chat/log.h"
#include "src/client/cache.h"
#include "tests/testing/cache_file.h"
#include "tests/testing/fake_clock.h"
#include "tests/testing/fault_vfs.h"
#include "tests/testing/temp_dir.h"
#include "tests/unit/client/session_harness.h"

namespace chat::client {
namespace {

// A SyncBatch for group conversation 5 at `last_seq` with a gap from..to (messages to add).
v1::SyncBatch GapBatch(Seq last_seq, Seq from, Seq to) {
  v1::SyncBatch batch;
  auto* conv = batch.add_conversations();
  conv->set_conversation_id(5);
  conv->set_kind(v1::CONVERSATION_KIND_GROUP);
  conv->set_last_seq(last_seq);
  conv->set_first_seq(1);
  auto* gap = batch.add_gaps();
  gap->set_conversation_id(5);
  gap->set_from_seq(from);
  gap->set_to_seq(to);
  return batch;
}

// Connects live with group 5 holding seq 1, reported.
void LiveWithGroupAtSeq1(Harness& h) {
  v1::Envelope first = h.Welcome();
  v1::SyncBatch known;
  auto* c5 = known.add_conversations();
  c5->set_conversation_id(5);
  c5->set_kind(v1::CONVERSATION_KIND_GROUP);
  c5->set_last_seq(1);
  c5->set_first_seq(1);
  *known.add_messages() = Msg(5, 1);
  h.Reply(first, known);
  REQUIRE(h.state() == ConnectionState::kConnected);
}

TEST_CASE("session: connects with Hello, syncs, and reports each state once in order") {
  Harness h;
  v1::Envelope hello = h.OpenToHello();
  CHECK(hello.hello().token() == "token-1");
  CHECK(hello.hello().device_id() == "laptop");
  CHECK(hello.hello().protocol_version() == 1);
  CHECK(hello.hello().accepts_messages_expired());
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

  // A wait of days is followed for 5 minutes at most.
  error.set_rid(h.OpenToHello().rid());
  error.mutable_error()->set_retry_after_ms(4'000'000'000);
  h.session->OnEnvelope(error);
  CHECK(h.session->reconnect_at_ms() - h.Now() == 300'000);
  CHECK(h.listener.errors.back().retry_after_ms() == 300'000);
}

// Nothing is written for `ms` - 1 more milliseconds, then one Ping; returns what was written.
std::vector<v1::Envelope> ExpectPingAfter(Harness& h, int64_t ms) {
  h.clock->Advance(ms - 1);
  h.session->Tick();
  CHECK(h.io.Take().empty());
  h.clock->Advance(1);
  h.session->Tick();
  std::vector<v1::Envelope> written = h.io.Take();
  REQUIRE(written.size() == 1);
  CHECK(written[0].has_ping());
  return written;
}

TEST_CASE("session: pings every heartbeat and drops a link silent for two intervals") {
  Harness h;
  v1::Envelope sync = h.Welcome(7, /*heartbeat_ms=*/10'000);
  h.Reply(sync, {});
  // The first ping comes kRandom % 5001 ms early (up to half an interval).
  const int64_t early = static_cast<int64_t>(kRandom % 5'001);
  REQUIRE(early > 0);
  h.clock->Advance(10'000 - early - 1);
  h.session->Tick();
  CHECK(h.io.Take().empty());
  h.clock->Advance(1);
  h.session->Tick();
  auto written = h.io.Take();
  REQUIRE(written.size() == 1);
  CHECK(written[0].has_ping());
  CHECK(h.session->NextDeadlineMs() <= h.Now() + 10'000);
  // Then one interval apart.
  written = ExpectPingAfter(h, 10'000);

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

TEST_CASE("session: an options' heartbeat longer than the server's is cut to it") {
  SessionOptions o;
  o.heartbeat_interval_ms = 70'000;
  Harness h(o);
  h.ConnectLive();  // the server says 30 s
  h.io.Take();
  // The first ping comes up to half an interval early, then one every 30 s.
  h.clock->Advance(30'000 - static_cast<int64_t>(kRandom % 15'001));
  h.session->Tick();
  auto written = h.io.Take();
  REQUIRE(written.size() == 1);
  CHECK(written[0].has_ping());
  ExpectPingAfter(h, 30'000);
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

TEST_CASE("session: a token that expires again after a working refresh is refreshed at once") {
  Harness h;
  h.ConnectLive();
  v1::Envelope expired;
  expired.mutable_error()->set_code(v1::Error::UNAUTHENTICATED);
  expired.mutable_error()->set_message("token expired");
  h.session->OnEnvelope(expired);
  h.session->OnClosed(4001, "unauthenticated");
  CHECK(h.session->reconnect_at_ms() == h.Now());

  // The fresh token works, and the session runs until that one expires too.
  h.token = "token-2";
  h.ConnectLive();
  h.clock->Advance(2 * 3'600'000);
  h.session->OnEnvelope(expired);
  h.session->OnClosed(4001, "unauthenticated");
  CHECK(h.state() == ConnectionState::kDisconnected);
  CHECK(h.session->reconnect_at_ms() == h.Now());
  h.token = "token-3";
  CHECK(h.OpenToHello().hello().token() == "token-3");
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

TEST_CASE("session: a message past the server's body bound fails and the next one goes at once") {
  SessionOptions o;
  o.max_in_flight = 1;
  Harness h(o);
  h.max_body_bytes = 30;
  OutboxEntry big;
  big.client_msg_id = "msg-big-01234567";
  big.conversation_id = 5;
  big.content_type = "text/plain";
  big.body = std::string(31, 'x');
  REQUIRE(h.cache->AddOutbox(&big, 100).ok());
  h.session->OnOutboxAdded(big);
  h.AddOutbox("msg-b-0123456789");  // a body of 24 bytes
  h.ConnectLive();
  CHECK(SendIds(h.io.Take()) == std::vector<std::string>{"msg-b-0123456789"});
  REQUIRE(h.cache->PendingCount() == 1);
  bool failed = false;
  for (const MessageEvent& e : h.listener.messages) {
    if (e.message.client_msg_id == "msg-big-01234567" && e.status == MessageStatus::kFailed) {
      failed = true;
      CHECK(e.reason.code() == Code::kInvalidArgument);
    }
  }
  CHECK(failed);
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

TEST_CASE("session: an own message whose seq a Gap passed is reported sent when its ack comes") {
  Harness h;
  h.AddOutbox("msg-a-0123456789");
  h.ConnectLive();
  auto sends = h.io.Take();
  REQUIRE(SendIds(sends) == std::vector<std::string>{"msg-a-0123456789"});
  // The link drops before the ack. The message got seq 2, and so many followed it that the
  // next Sync answers with a gap over it.
  h.session->OnClosed(1006, "abnormal");
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch = GapBatch(/*last_seq=*/1002, /*from=*/1, /*to=*/1001);
  *batch.add_messages() = Msg(5, 1002);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  auto resent = h.io.Take();
  REQUIRE(SendIds(resent) == std::vector<std::string>{"msg-a-0123456789"});
  h.session->OnEnvelope(AckFor(resent[0], 2, /*duplicate=*/true));
  CHECK(h.cache->PendingCount() == 0);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1002, 2});
  CHECK(h.listener.messages.back().outgoing);
  CHECK(h.listener.messages.back().message.client_msg_id == "msg-a-0123456789");
  // A second ack changes nothing.
  h.session->OnEnvelope(AckFor(resent[0], 2, /*duplicate=*/true));
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1002, 2});
}

TEST_CASE("session: an own message acked above a hole that a Gap then covers is reported sent") {
  Harness h;
  LiveWithGroupAtSeq1(h);
  h.AddOutbox("msg-a-0123456789");
  auto sends = h.io.Take();
  REQUIRE(SendIds(sends) == std::vector<std::string>{"msg-a-0123456789"});
  // Acked as seq 5 while 2..4 are missing: cached, held back, and a Sync asked for.
  h.session->OnEnvelope(AckFor(sends[0], 5));
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1});
  auto sync = h.io.Take();
  REQUIRE(sync.size() == 1);
  REQUIRE(sync[0].has_sync());
  // The user's other device sent seq 6, delivered here behind the same hole.
  v1::Message other_device = Msg(5, 6, "alice");
  other_device.set_client_msg_id("msg-z-0123456789");
  other_device.set_sender_device("phone");
  h.Deliver(other_device);
  // So much arrived meanwhile that the server answers with a gap over seqs 5 and 6.
  v1::SyncBatch batch = GapBatch(/*last_seq=*/1005, /*from=*/2, /*to=*/1004);
  *batch.add_messages() = Msg(5, 1005);
  h.Reply(sync[0], batch);
  // Both cached messages inside the gap are reported once, in order: the server no longer
  // sends them.
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 5, 6, 1005});
  for (const MessageEvent& e : h.listener.messages) {
    if (e.status == MessageStatus::kSent && (e.message.seq == 5 || e.message.seq == 6)) {
      CHECK(e.outgoing);
    }
  }
}

TEST_CASE("session: others' messages received live behind a hole that a Gap covers are reported") {
  Harness h;
  LiveWithGroupAtSeq1(h);
  // Seqs 3 and 7 arrive live while 2 is missing: cached, not reported, a Sync asked for.
  h.Deliver(Msg(5, 3));
  h.Deliver(Msg(5, 7));
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1});
  auto sync = h.io.Take();
  REQUIRE(sync.size() == 1);
  REQUIRE(sync[0].has_sync());
  // Retention removed 2..8 on the server before the Sync: a gap, then seq 9.
  v1::SyncBatch batch = GapBatch(/*last_seq=*/9, /*from=*/2, /*to=*/8);
  *batch.add_messages() = Msg(5, 9);
  h.Reply(sync[0], batch);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 3, 7, 9});
  std::optional<ConversationRow> row = h.cache->GetConversation(5);
  REQUIRE(row.has_value());
  CHECK(row->cursor == 9);
}

// A listener that takes an application lock in OnError while another thread holds that lock
// and calls into the cache (as Client::Send does) must not deadlock: the error is reported
// once the cache's transaction has ended. The message the cache could not store is not lost
// either: a Sync asks for it after the delay a Sync page not stored waits (kSyncRetryMinMs),
// since nothing else might ask before the next connection.
TEST_CASE("session: a cache write failure reaches OnError after the cache is free") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  Seq seq = 1;
  SUBCASE("a conversation not cached yet") { h.ConnectLive(); }
  SUBCASE("a conversation cached up to the seq before") {
    LiveWithGroupAtSeq1(h);
    seq = 2;
  }
  h.session->Tick();  // the first Ping: the next is a heartbeat away
  h.io.Take();
  const std::vector<Seq> before = h.listener.SentSeqs(5);
  bool cache_free = false;
  int calls = 0;
  std::vector<std::thread> probes;
  h.listener.on_error = [&](const Status&) {
    ++calls;
    // Another thread asks the cache for something; it must not have to wait for this call.
    auto answered = std::make_shared<std::promise<void>>();
    std::future<void> done = answered->get_future();
    probes.emplace_back([cache, answered] {
      (void)cache->UnreadTotal();
      answered->set_value();
    });
    cache_free = done.wait_for(std::chrono::seconds(5)) == std::future_status::ready;
  };
  vfs.FailWrites(true);
  h.Deliver(Msg(5, seq));
  vfs.FailWrites(false);
  for (std::thread& probe : probes) probe.join();
  CHECK(vfs.refused() > 0);
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0].code() == Code::kUnavailable);
  CHECK(calls == 1);
  CHECK(cache_free);
  // Nothing was stored or reported. No Sync goes at once (the cache just failed), one goes
  // after the delay and brings the message.
  CHECK(h.listener.SentSeqs(5) == before);
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
  CHECK(h.session->NextDeadlineMs() <= h.Now() + kSyncRetryMinMs);
  h.clock->Advance(kSyncRetryMinMs);
  h.session->Tick();
  auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(5, seq, 1);
  *batch.add_messages() = Msg(5, seq);
  h.Reply(syncs[0], batch);
  std::vector<Seq> expected = before;
  expected.push_back(seq);
  CHECK(h.listener.SentSeqs(5) == expected);
  CHECK(h.cache->GetConversation(5)->cursor == seq);
  CHECK(h.listener.errors.size() == 1);
  CHECK(h.state() == ConnectionState::kConnected);
}

// A message the cache could not store was not delivered to the application: no Receipt becomes
// due for it, so the session neither wakes at once for one nor repeats the stored watermarks. A
// Receipt owed from before still goes.
TEST_CASE("session: a Deliver the cache could not store makes no Receipt due") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  Seq seq = 1;
  bool owed = false;  // the Receipt for seq 1 is not sent yet
  SUBCASE("a conversation not cached yet") { h.ConnectLive(); }
  SUBCASE("a conversation cached up to the seq before") {
    LiveWithGroupAtSeq1(h);
    seq = 2;
  }
  SUBCASE("a conversation cached up to the seq before, its Receipt owed") {
    LiveWithGroupAtSeq1(h);
    seq = 2;
    owed = true;
  }
  if (!owed) {
    h.session->Tick();  // the first Ping, and the Receipt for seq 1 if cached
    h.io.Take();
  }
  vfs.FailWrites(true);
  h.Deliver(Msg(5, seq));
  vfs.FailWrites(false);
  REQUIRE(h.listener.errors.size() == 1);
  if (!owed) CHECK(h.session->NextDeadlineMs() > h.Now());
  h.clock->Advance(kReceiptIntervalMs);
  const std::vector<v1::Envelope> receipts = TickReceipts(h);
  if (owed) {
    REQUIRE(receipts.size() == 1);
    CHECK(receipts[0].receipt().delivered_seq() == 1);
  } else {
    CHECK(receipts.empty());
  }
}

// The user's own message is stored with its SendAck (and leaves the outbox), then reported by a
// second write. When only that one fails, a Sync asks for the message after the same delay.
TEST_CASE("session: an acked message stored but not reported is asked for by a Sync") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  LiveWithGroupAtSeq1(h);
  h.session->Tick();  // the first Ping: the next is a heartbeat away
  h.io.Take();
  h.AddOutbox("m1", 5);
  auto sends = OfCase(h.io.Take(), v1::Envelope::kSend);
  REQUIRE(sends.size() == 1);
  vfs.FailWritesAfterCommits(1);
  h.session->OnEnvelope(AckFor(sends[0], 2));
  vfs.FailWrites(false);
  REQUIRE(h.cache->GetMessage(5, 2).has_value());
  REQUIRE_FALSE(h.cache->FindOutbox("m1").has_value());
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0].code() == Code::kUnavailable);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1});
  // Not at once (the cache just failed): after the delay.
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
  CHECK(h.session->NextDeadlineMs() <= h.Now() + kSyncRetryMinMs);
  h.clock->Advance(kSyncRetryMinMs);
  h.session->Tick();
  auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(5, 2, 0);
  v1::Message mine = Msg(5, 2, "alice");
  mine.set_client_msg_id("m1");
  *batch.add_messages() = mine;
  h.Reply(syncs[0], batch);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2});
  CHECK(h.listener.messages.back().outgoing);
  CHECK(h.cache->GetConversation(5)->cursor == 2);
  CHECK(h.listener.errors.size() == 1);
}

TEST_CASE("session: an outbox entry acked before its announcement is not reported pending") {
  Harness h;
  h.ConnectLive();
  OutboxEntry entry;
  entry.client_msg_id = "msg-a-0123456789";
  entry.conversation_id = 5;
  entry.content_type = "text/plain";
  entry.body = "hi";
  REQUIRE(h.cache->AddOutbox(&entry, 100).ok());
  // A pump (here: another entry's announcement) sends it before its own announcement ran.
  h.AddOutbox("msg-b-0123456789");
  auto sends = h.io.Take();
  REQUIRE(SendIds(sends) == std::vector<std::string>{"msg-a-0123456789", "msg-b-0123456789"});
  h.session->OnEnvelope(AckFor(sends[0], 1));
  h.session->OnOutboxAdded(entry);
  size_t pending = 0;
  for (const MessageEvent& e : h.listener.messages) {
    if (e.message.client_msg_id == "msg-a-0123456789" && e.status == MessageStatus::kPending)
      ++pending;
  }
  CHECK(pending == 0);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1});
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
  conv->set_first_seq(1);
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
  v1::SyncBatch first = GapBatch(/*last_seq=*/4004, /*from=*/1, /*to=*/4000);
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
  conv->set_first_seq(1);
  *batch.add_messages() = Msg(5, 1);
  *batch.add_messages() = Msg(5, 2);
  h.Reply(sync, batch);
  CHECK(h.cache->MessageCount() == 2);
  h.AddOutbox("msg-kept-01234567", 0, "bob");
  h.io.Take();
  h.session->OnClosed(1001, "restart");
  h.AddOutbox("msg-conv-01234567", 5);  // to conversation 5 of the old store
  h.Reply(h.Welcome(7), {});
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
  // The message to conversation 5 of the old store is failed, not sent to whatever 5 is now.
  REQUIRE(h.listener.messages.back().status == MessageStatus::kFailed);
  CHECK(h.listener.messages.back().message.client_msg_id == "msg-conv-01234567");
  CHECK(h.listener.messages.back().reason.code() == Code::kFailedPrecondition);
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0].code() == Code::kDataLoss);
  // The new store's messages reach the application again, from seq 1.
  v1::SyncBatch rebuilt;
  *rebuilt.add_messages() = Msg(6, 1);
  auto* c6 = rebuilt.add_conversations();
  c6->set_conversation_id(6);
  c6->set_kind(v1::CONVERSATION_KIND_DIRECT);
  c6->set_last_seq(1);
  c6->set_first_seq(1);
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
  // Written by alice while offline: mallory's session must not send them.
  h.AddOutbox("msg-a-0123456789", 5);
  h.AddOutbox("msg-b-0123456789", 0, "bob");
  v1::Envelope fresh = h.Welcome(7, 30'000, 0, "mallory");
  CHECK(fresh.sync().cursors_size() == 0);
  CHECK(h.cache->MessageCount() == 0);
  CHECK(h.cache->UserId() == "mallory");
  CHECK(h.cache->PendingCount() == 0);
  size_t failed = 0;
  for (const MessageEvent& e : h.listener.messages) {
    if (e.status == MessageStatus::kFailed) {
      ++failed;
      CHECK(e.reason == Status(Code::kFailedPrecondition, "signed in as another user: not sent"));
    }
  }
  CHECK(failed == 2);
  h.Reply(fresh, {});
  CHECK(SendIds(h.io.Take()).empty());
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0] ==
        Status(Code::kDataLoss, "signed in as another user: the cache was rebuilt"));
}

// Live at epoch 7 with direct conversation 5 holding seqs 1 and 2, then disconnected.
void CachedAtEpoch7(Harness& h) {
  v1::Envelope sync = h.Welcome(7);
  v1::SyncBatch batch;
  auto* conv = batch.add_conversations();
  conv->set_conversation_id(5);
  conv->set_kind(v1::CONVERSATION_KIND_DIRECT);
  conv->set_last_seq(2);
  conv->set_first_seq(1);
  *batch.add_messages() = Msg(5, 1);
  *batch.add_messages() = Msg(5, 2);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  h.io.Take();
  h.session->OnClosed(1001, "restart");
}

// Told in the middle of the rebuild, the application (or a crash) must find it either not
// begun or whole: a new epoch with old-store messages still pending would send them to
// whatever their conversation ids name in the new store.
TEST_CASE("session: an epoch rebuild is stored whole before its failed messages are reported") {
  Harness h;
  CachedAtEpoch7(h);
  h.AddOutbox("msg-a-0123456789", 5);
  h.AddOutbox("msg-b-0123456789", 6);
  h.AddOutbox("msg-c-0123456789", 0, "bob");
  int failed = 0;
  h.listener.on_message = [&](const MessageEvent& e) {
    if (e.status != MessageStatus::kFailed) return;
    ++failed;
    bool old_store_pending = false;
    for (const OutboxEntry& entry : h.cache->PendingOutbox(100)) {
      old_store_pending |= entry.conversation_id != 0;
    }
    CHECK(h.cache->Epoch() == 8);
    CHECK_FALSE(old_store_pending);
    CHECK(h.cache->MessageCount() == 0);
  };
  v1::Envelope fresh = h.Welcome(8);
  CHECK(failed == 2);
  CHECK(fresh.sync().cursors_size() == 0);
  CHECK(h.cache->PendingCount() == 1);  // the message to a peer still goes
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0] ==
        Status(Code::kDataLoss, "server epoch changed: the cache was rebuilt"));
}

// A rebuild that cannot be stored must not leave the new epoch on the old store's data: its
// cursors (often above the new store's seqs) would hide the new messages for good.
TEST_CASE("session: an epoch rebuild the cache cannot store keeps the old epoch and disconnects") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  CachedAtEpoch7(h);
  h.AddOutbox("msg-a-0123456789", 5);
  h.io.Take();
  // The disk is full as the new store's Welcome comes, and has room again once that is told.
  h.listener.on_error = [&](const Status&) { vfs.FailWrites(false); };
  vfs.FailWrites(true);
  v1::Envelope hello = h.OpenToHello();
  v1::Envelope welcome;
  welcome.set_rid(hello.rid());
  welcome.mutable_welcome()->set_user_id("alice");
  welcome.mutable_welcome()->set_epoch(8);
  h.session->OnEnvelope(welcome);
  vfs.FailWrites(false);
  CHECK(vfs.refused() > 0);
  CHECK(h.cache->Epoch() == 7);
  CHECK(h.state() == ConnectionState::kDisconnected);
  CHECK(h.io.drops == 1);
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0].code() == Code::kUnavailable);
  CHECK(h.cache->MessageCount() == 2);
  REQUIRE(h.cache->GetConversation(5).has_value());
  CHECK(h.cache->GetConversation(5)->cursor == 2);
  CHECK(h.cache->PendingCount() == 1);
  for (const MessageEvent& e : h.listener.messages) CHECK(e.status != MessageStatus::kFailed);
  // The next connection rebuilds.
  h.listener.on_error = nullptr;
  v1::Envelope fresh = h.Welcome(8);
  CHECK(fresh.sync().cursors_size() == 0);
  CHECK(h.cache->Epoch() == 8);
  CHECK(h.cache->MessageCount() == 0);
  CHECK(h.cache->PendingCount() == 0);
  REQUIRE(h.listener.errors.size() == 2);
  CHECK(h.listener.errors[1].code() == Code::kDataLoss);
}

TEST_CASE("session: History answers from the cache when it holds the range") {
  Harness h;
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  auto* conv = batch.add_conversations();
  conv->set_conversation_id(5);
  conv->set_kind(v1::CONVERSATION_KIND_DIRECT);
  conv->set_last_seq(3);
  conv->set_first_seq(1);
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

// --- Groups, channels, receipts, unread counts, typing ---

// Live, with group 5 holding bob's messages 1..3, all unread.
void ConnectWithGroup(Harness& h) {
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(5, 3, 3);
  for (Seq seq = 1; seq <= 3; ++seq) *batch.add_messages() = Msg(5, seq);
  batch.set_unread_total(3);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
}

v1::Envelope ReceiptUpdateFor(ConversationId conversation, const std::string& user,
                              Seq delivered_all, Seq read_all) {
  v1::Envelope e;
  v1::ReceiptUpdate* u = e.mutable_receipt_update();
  u->set_conversation_id(conversation);
  u->set_user_id(user);
  u->set_device_id("phone");
  u->set_delivered_seq(delivered_all);
  u->set_read_seq(read_all);
  u->set_delivered_all_seq(delivered_all);
  u->set_read_all_seq(read_all);
  return e;
}

TEST_CASE("session: delivered receipts are coalesced, one per conversation at most every 100 ms") {
  Harness h;
  ConnectWithGroup(h);
  h.session->Tick();
  auto first = OfCase(h.io.Take(), v1::Envelope::kReceipt);
  REQUIRE(first.size() == 1);  // the synced messages reached the application
  CHECK(first[0].receipt().conversation_id() == 5);
  CHECK(first[0].receipt().delivered_seq() == 3);
  CHECK(first[0].receipt().read_seq() == 0);

  h.Deliver(Msg(5, 4));
  h.Deliver(Msg(5, 5));
  h.Deliver(Msg(5, 6));
  CHECK(OfCase(h.io.Take(), v1::Envelope::kReceipt).empty());  // not before the tick
  CHECK(TickReceipts(h).empty());                              // not within the interval
  CHECK(h.session->NextDeadlineMs() == h.Now() + kReceiptIntervalMs);
  h.clock->Advance(kReceiptIntervalMs);
  auto receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().delivered_seq() == 6);
  CHECK(TickReceipts(h).empty());

  // This user's own message (from another device) marks the conversation read up to it.
  h.Deliver(Msg(5, 7, "alice"));
  h.clock->Advance(kReceiptIntervalMs);
  receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().delivered_seq() == 7);
  CHECK(receipts[0].receipt().read_seq() == 7);
}

// The state of conversation `id` of `kind` with `members` members, holding messages 1..3.
v1::ConversationState StateOf(ConversationId id, v1::ConversationKind kind, uint32_t members) {
  v1::ConversationState state = GroupState(id, 3, 3);
  state.set_kind(kind);
  state.set_member_count(members);
  if (kind == v1::CONVERSATION_KIND_DIRECT) state.set_peer("bob");
  return state;
}

// Connects live with the conversations of `states`, each holding bob's messages 1..3, lets the
// Receipts for those go and the interval pass: a Receipt due now goes at the next Tick.
void ConnectWith(Harness& h, const std::vector<v1::ConversationState>& states) {
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  for (const v1::ConversationState& state : states) {
    *batch.add_conversations() = state;
    for (Seq seq = 1; seq <= 3; ++seq) *batch.add_messages() = Msg(state.conversation_id(), seq);
  }
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  h.clock->Advance(kLargeGroupDeliveredDelayMs);
  h.session->Tick();
  h.io.Take();
  h.clock->Advance(kReceiptIntervalMs);
}

// A large group's delivered-only Receipt due now: none goes until kLargeGroupDeliveredDelayMs has
// passed (checked a millisecond before), then the Receipts written at that moment.
std::vector<v1::Envelope> ReceiptsOnceDelayed(Harness& h) {
  h.clock->Advance(kLargeGroupDeliveredDelayMs - 1);
  CHECK(TickReceipts(h).empty());
  h.clock->Advance(1);
  return TickReceipts(h);
}

TEST_CASE("session: in a group of over 32 members delivered receipts wait 1 s, then go as one") {
  Harness h;
  ConnectWith(h, {StateOf(5, v1::CONVERSATION_KIND_GROUP, 40)});
  const int64_t first = h.Now();
  for (Seq seq = 4; seq <= 13; ++seq) {  // one message every 100 ms
    h.Deliver(Msg(5, seq));
    h.clock->Advance(seq < 13 ? kReceiptIntervalMs : kReceiptIntervalMs - 1);
    CHECK(TickReceipts(h).empty());
  }
  REQUIRE(h.Now() == first + kLargeGroupDeliveredDelayMs - 1);
  h.clock->Advance(1);
  auto receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().conversation_id() == 5);
  CHECK(receipts[0].receipt().delivered_seq() == 13);
  CHECK(receipts[0].receipt().read_seq() == 0);

  // The next delivery waits its own second.
  h.Deliver(Msg(5, 14));
  receipts = ReceiptsOnceDelayed(h);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().delivered_seq() == 14);
}

TEST_CASE("session: in a group of over 32 members a read receipt goes at once, with delivered") {
  Harness h;
  ConnectWith(h, {StateOf(5, v1::CONVERSATION_KIND_GROUP, 40)});
  const int64_t first = h.Now();
  h.Deliver(Msg(5, 4));
  h.Deliver(Msg(5, 5));
  h.clock->Advance(2 * kReceiptIntervalMs);
  CHECK(TickReceipts(h).empty());
  h.session->MarkRead(5, 4);
  auto receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().delivered_seq() == 5);
  CHECK(receipts[0].receipt().read_seq() == 4);
  // That one carried the delivered mark: nothing is left waiting for the second to pass.
  h.clock->SetMonotonicMs(first + kLargeGroupDeliveredDelayMs);
  CHECK(TickReceipts(h).empty());

  // The user's own message (sent from another device) marks the conversation read up to it.
  h.Deliver(Msg(5, 6));
  h.Deliver(Msg(5, 7, "alice"));
  h.clock->Advance(kReceiptIntervalMs);
  receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().delivered_seq() == 7);
  CHECK(receipts[0].receipt().read_seq() == 7);
}

TEST_CASE("session: direct conversations, groups up to 32 members and channels keep the pace") {
  Harness h;
  ConnectWith(
      h, {StateOf(5, v1::CONVERSATION_KIND_GROUP, 40), StateOf(6, v1::CONVERSATION_KIND_GROUP, 10),
          StateOf(7, v1::CONVERSATION_KIND_GROUP, kLargeGroupMembers),
          StateOf(8, v1::CONVERSATION_KIND_DIRECT, 2),
          StateOf(9, v1::CONVERSATION_KIND_CHANNEL, 1'000)});
  for (ConversationId conversation : {5, 6, 7, 8, 9}) h.Deliver(Msg(conversation, 4));
  auto receipts = TickReceipts(h);
  std::vector<ConversationId> sent;
  for (const v1::Envelope& e : receipts) {
    sent.push_back(e.receipt().conversation_id());
    CHECK(e.receipt().delivered_seq() == 4);
  }
  CHECK(sent == std::vector<ConversationId>{6, 7, 8, 9});
  receipts = ReceiptsOnceDelayed(h);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().conversation_id() == 5);
}

TEST_CASE("session: a delayed delivered receipt wakes the session when it is due, by itself") {
  Harness h;
  ConnectWith(h, {StateOf(5, v1::CONVERSATION_KIND_GROUP, 40)});
  const int64_t first = h.Now();
  h.Deliver(Msg(5, 4));
  // As the client's loop does: sleep until the session's deadline, then tick. Nothing else
  // happens meanwhile.
  int wakeups = 0;
  std::vector<v1::Envelope> receipts;
  while (receipts.empty() && wakeups < 100) {
    h.clock->SetMonotonicMs(std::max(h.Now(), h.session->NextDeadlineMs()));
    receipts = TickReceipts(h);
    ++wakeups;
  }
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().delivered_seq() == 4);
  CHECK(h.Now() == first + kLargeGroupDeliveredDelayMs);
  CHECK(wakeups == 1);  // not once every 100 ms meanwhile
}

TEST_CASE("session: MarkRead sends read_seq, updates unread and the total, never moves back") {
  Harness h;
  ConnectWithGroup(h);
  CHECK(h.listener.unread_totals == std::vector<uint64_t>{3});
  h.session->Tick();
  h.io.Take();

  h.listener.conversations.clear();
  h.session->MarkRead(5, 2);
  REQUIRE(h.listener.conversations.size() == 1);
  CHECK(h.listener.conversations[0].read_seq == 2);
  CHECK(h.listener.conversations[0].unread == 1);
  CHECK(h.listener.unread_totals == std::vector<uint64_t>{3, 1});
  h.clock->Advance(kReceiptIntervalMs);
  auto receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().read_seq() == 2);
  CHECK(receipts[0].receipt().delivered_seq() == 3);

  // Backward and equal moves do nothing.
  h.session->MarkRead(5, 1);
  h.session->MarkRead(5, 2);
  h.clock->Advance(kReceiptIntervalMs);
  CHECK(TickReceipts(h).empty());
  CHECK(h.listener.conversations.size() == 1);

  // Beyond the newest message given to the application it is capped there; 0 means all.
  h.session->MarkRead(5, 99);
  CHECK(h.cache->GetConversation(5)->info.read_seq == 3);
  CHECK(h.cache->GetConversation(5)->info.unread == 0);
  CHECK(h.listener.unread_totals.back() == 0);

  // Unknown conversations are ignored.
  h.session->MarkRead(77, 1);
  h.clock->Advance(kReceiptIntervalMs);
  h.session->Tick();
  auto last = OfCase(h.io.Take(), v1::Envelope::kReceipt);
  REQUIRE(last.size() == 1);
  CHECK(last[0].receipt().conversation_id() == 5);
  CHECK(last[0].receipt().read_seq() == 3);
}

TEST_CASE("session: others' new messages count as unread, and replying marks them read") {
  Harness h;
  ConnectWithGroup(h);
  h.Deliver(Msg(5, 4));
  CHECK(h.cache->GetConversation(5)->info.unread == 4);
  CHECK(h.listener.unread_totals.back() == 4);
  h.Deliver(Msg(5, 5, "alice"));
  CHECK(h.cache->GetConversation(5)->info.unread == 0);
  CHECK(h.cache->GetConversation(5)->info.read_seq == 5);
  CHECK(h.listener.unread_totals.back() == 0);
  h.Deliver(Msg(5, 6));
  CHECK(h.cache->GetConversation(5)->info.unread == 1);
}

// The server counts a user's own message as having read the conversation up to it, so a MarkRead
// below the user's last message leaves unread only others' messages after that one. Here the
// user's message is one the cursor passed in a gap and History paged in.
TEST_CASE("session: MarkRead below the user's own last message counts only others' after it") {
  Harness h;
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch = GapBatch(/*last_seq=*/6, /*from=*/1, /*to=*/3);
  batch.mutable_conversations(0)->set_unread(3);
  for (Seq seq = 4; seq <= 6; ++seq) *batch.add_messages() = Msg(5, seq);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  REQUIRE(h.cache->GetConversation(5)->info.unread == 3);
  h.io.Take();
  std::vector<Result<HistoryResult>> results;
  h.session->History(5, 4, 10, [&](Result<HistoryResult> r) { results.push_back(std::move(r)); });
  auto written = OfCase(h.io.Take(), v1::Envelope::kHistory);
  REQUIRE(written.size() == 1);
  v1::Envelope page;
  page.set_rid(written[0].rid());
  page.mutable_history_page()->set_conversation_id(5);
  *page.mutable_history_page()->add_messages() = Msg(5, 3, "alice");  // from her phone
  *page.mutable_history_page()->add_messages() = Msg(5, 2);
  *page.mutable_history_page()->add_messages() = Msg(5, 1);
  h.session->OnEnvelope(page);
  REQUIRE(results.size() == 1);
  REQUIRE(results[0].ok());

  h.listener.conversations.clear();
  h.session->MarkRead(5, 1);
  REQUIRE(h.listener.conversations.size() == 1);
  CHECK(h.listener.conversations[0].read_seq == 1);
  CHECK(h.listener.conversations[0].unread == 3);  // bob's 4 to 6, not his 2
  CHECK(h.cache->GetConversation(5)->info.unread == 3);
  CHECK(h.listener.unread_totals.back() == 3);
}

TEST_CASE("session: a read receipt from another of the user's devices sets read_seq and unread") {
  Harness h;
  ConnectWithGroup(h);
  h.listener.conversations.clear();
  v1::Envelope update = ReceiptUpdateFor(5, "alice", 3, 0);
  update.mutable_receipt_update()->set_read_seq(2);
  update.mutable_receipt_update()->set_unread(1);
  update.mutable_receipt_update()->set_unread_total(1);
  h.session->OnEnvelope(update);
  REQUIRE(h.listener.conversations.size() == 1);
  CHECK(h.listener.conversations[0].read_seq == 2);
  CHECK(h.listener.conversations[0].unread == 1);
  CHECK(h.listener.unread_totals.back() == 1);
  REQUIRE(h.listener.receipts.size() == 1);
  CHECK(h.listener.receipts[0].user_id == "alice");

  // An older watermark (a late update) does not move it back.
  update.mutable_receipt_update()->set_read_seq(1);
  update.mutable_receipt_update()->set_unread(2);
  h.session->OnEnvelope(update);
  CHECK(h.cache->GetConversation(5)->info.read_seq == 2);
  CHECK(h.cache->GetConversation(5)->info.unread == 1);
  CHECK(h.listener.conversations.size() == 1);
}

TEST_CASE("session: others' receipts move own messages to delivered, then read") {
  Harness h;
  ConnectWithGroup(h);
  h.AddOutbox("cmid-0000000000000001");
  auto sends = OfCase(h.io.Take(), v1::Envelope::kSend);
  REQUIRE(sends.size() == 1);
  h.session->OnEnvelope(AckFor(sends[0], 4));
  const size_t updates = h.listener.conversations.size();

  h.session->OnEnvelope(ReceiptUpdateFor(5, "bob", 4, 0));
  CHECK(h.listener.statuses == std::vector<std::string>{"5:4:delivered"});
  CHECK(h.cache->GetConversation(5)->info.delivered_all_seq == 4);
  CHECK(h.cache->GetConversation(5)->info.read_all_seq == 0);
  // The application's ConversationInfo carries the marks as they rise.
  REQUIRE(h.listener.conversations.size() == updates + 1);
  CHECK(h.listener.conversations.back().delivered_all_seq == 4);
  REQUIRE(h.listener.receipts.size() == 1);
  CHECK(h.listener.receipts[0].user_id == "bob");
  CHECK(h.listener.receipts[0].delivered_all_seq == 4);

  h.session->OnEnvelope(ReceiptUpdateFor(5, "carol", 4, 4));
  CHECK(h.listener.statuses == std::vector<std::string>{"5:4:delivered", "5:4:read"});
  CHECK(h.cache->GetConversation(5)->info.read_all_seq == 4);

  CHECK(h.listener.conversations.back().read_all_seq == 4);

  // Watermarks never move back, and a repeat reports no status and no update.
  const size_t before_repeat = h.listener.conversations.size();
  h.session->OnEnvelope(ReceiptUpdateFor(5, "bob", 2, 1));
  CHECK(h.listener.statuses.size() == 2);
  CHECK(h.listener.conversations.size() == before_repeat);
  CHECK(h.cache->GetConversation(5)->info.delivered_all_seq == 4);
  CHECK(h.cache->GetConversation(5)->info.read_all_seq == 4);

  // A conversation not in the cache is ignored.
  h.session->OnEnvelope(ReceiptUpdateFor(99, "bob", 4, 4));
  CHECK(h.listener.statuses.size() == 2);
  CHECK(!h.cache->GetConversation(99));
}

TEST_CASE("session: the reply to this device's own Receipt updates unread without OnReceipt") {
  Harness h;
  ConnectWithGroup(h);
  h.session->MarkRead(5, 3);
  auto receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  v1::Envelope reply = ReceiptUpdateFor(5, "alice", 3, 3);
  reply.set_rid(receipts[0].rid());
  h.session->OnEnvelope(reply);
  CHECK(h.listener.receipts.empty());
  CHECK(h.cache->GetConversation(5)->info.unread == 0);
}

TEST_CASE("session: a refused receipt is logged, not reported as an error") {
  Harness h;
  ConnectWithGroup(h);
  auto receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  v1::Envelope error;
  error.set_rid(receipts[0].rid());
  error.mutable_error()->set_code(v1::Error::FAILED_PRECONDITION);
  error.mutable_error()->set_message("receipt is not supported by this server yet");
  h.session->OnEnvelope(error);
  CHECK(h.listener.errors.empty());
  CHECK(h.state() == ConnectionState::kConnected);
}

TEST_CASE("session: the synced state keeps a read watermark the server has not seen yet") {
  Harness h;
  ConnectWithGroup(h);
  h.session->MarkRead(5, 3);
  h.session->OnClosed(1006, "abnormal");  // before the Receipt went out
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(5, 3, 3);
  h.Reply(sync, batch);
  CHECK(h.cache->GetConversation(5)->info.read_seq == 3);
  CHECK(h.cache->GetConversation(5)->info.unread == 0);
  auto receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().read_seq() == 3);
}

// The server's Sync reply lists only conversations with new messages or a gap: a Receipt lost
// with the link must come back by itself, not from MergeState.
TEST_CASE("session: a receipt the server never answered is sent again after a reconnect") {
  Harness h;
  ConnectWithGroup(h);
  h.session->MarkRead(5, 3);
  auto receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().read_seq() == 3);
  h.session->OnClosed(1006, "abnormal");  // before the server answered

  h.Reply(h.Welcome(), {});
  REQUIRE(h.state() == ConnectionState::kConnected);
  h.clock->Advance(kReceiptIntervalMs);
  receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().conversation_id() == 5);
  CHECK(receipts[0].receipt().delivered_seq() == 3);
  CHECK(receipts[0].receipt().read_seq() == 3);

  // Answered: the next reconnect sends nothing.
  v1::Envelope reply = ReceiptUpdateFor(5, "alice", 3, 3);
  reply.set_rid(receipts[0].rid());
  h.session->OnEnvelope(reply);
  h.session->OnClosed(1006, "abnormal");
  h.Reply(h.Welcome(), {});
  h.clock->Advance(kReceiptIntervalMs);
  CHECK(TickReceipts(h).empty());
}

TEST_CASE("session: a receipt refused for now is sent again after the server's delay") {
  Harness h;
  ConnectWithGroup(h);
  h.session->MarkRead(5, 3);
  auto receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  v1::Envelope limited;
  limited.set_rid(receipts[0].rid());
  limited.mutable_error()->set_code(v1::Error::RESOURCE_EXHAUSTED);
  limited.mutable_error()->set_message("rate limit");
  limited.mutable_error()->set_retry_after_ms(2'000);
  h.session->OnEnvelope(limited);
  CHECK(h.listener.errors.empty());
  CHECK(h.state() == ConnectionState::kConnected);

  h.clock->Advance(1'999);
  CHECK(TickReceipts(h).empty());
  h.clock->Advance(1);
  receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().conversation_id() == 5);
  CHECK(receipts[0].receipt().read_seq() == 3);

  // Refused for good: neither sent again later nor after a reconnect.
  v1::Envelope denied;
  denied.set_rid(receipts[0].rid());
  denied.mutable_error()->set_code(v1::Error::PERMISSION_DENIED);
  denied.mutable_error()->set_message("not a member");
  h.session->OnEnvelope(denied);
  CHECK(h.listener.errors.empty());
  h.clock->Advance(5'000);
  CHECK(TickReceipts(h).empty());
  h.session->OnClosed(1006, "abnormal");
  h.Reply(h.Welcome(), {});
  h.clock->Advance(kReceiptIntervalMs);
  CHECK(TickReceipts(h).empty());
}

TEST_CASE("session: receipts not written when the queue filled are sent on the next connection") {
  Harness h;
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(5, 1, 1);
  *batch.add_conversations() = GroupState(6, 1, 1);
  *batch.add_messages() = Msg(5, 1);
  *batch.add_messages() = Msg(6, 1);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  h.io.Take();
  h.io.full = true;
  h.session->Tick();  // the first Receipt fails to queue and drops the link
  CHECK(h.state() == ConnectionState::kDisconnected);
  h.io.full = false;

  h.Reply(h.Welcome(), {});
  h.clock->Advance(kReceiptIntervalMs);
  auto receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 2);
  CHECK(receipts[0].receipt().conversation_id() == 5);
  CHECK(receipts[1].receipt().conversation_id() == 6);
}

// The app is closed or the process ends with receipts unanswered: the next run's Sync lists only
// conversations with news, so the cache's receipt_due flags are what sends them again.
// The app started again on the cache at `path`: a new session connects, and the server has
// nothing new for it (an empty Sync reply, as the real server sends). `receipts`: the Receipts
// it sent on its first turn.
struct Restarted {
  explicit Restarted(const std::string& path)
      : h({}, std::shared_ptr<Cache>(Cache::Open(path).value())) {
    h.Reply(h.Welcome(), {});
    receipts = TickReceipts(h);
  }
  Harness h;
  std::vector<v1::Envelope> receipts;
};

TEST_CASE("session: a receipt the server has not answered is sent again after a restart") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  {
    std::shared_ptr<Cache> cache(Cache::Open(path).value());
    Harness h({}, cache);
    ConnectWithGroup(h);
    auto receipts = TickReceipts(h);
    REQUIRE(receipts.size() == 1);
    v1::Envelope reply = ReceiptUpdateFor(5, "alice", 3, 0);
    reply.set_rid(receipts[0].rid());
    h.session->OnEnvelope(reply);  // the delivered receipt was answered: nothing owed
    h.session->MarkRead(5, 2);
    h.session->Stop();  // Close() before the read receipt went out
  }
  {
    std::shared_ptr<Cache> cache(Cache::Open(path).value());
    Harness h({}, cache);
    h.Reply(h.Welcome(), {});  // nothing new: the Sync lists no conversation
    REQUIRE(h.state() == ConnectionState::kConnected);
    auto receipts = TickReceipts(h);
    REQUIRE(receipts.size() == 1);
    CHECK(receipts[0].receipt().conversation_id() == 5);
    CHECK(receipts[0].receipt().delivered_seq() == 3);
    CHECK(receipts[0].receipt().read_seq() == 2);
    v1::Envelope reply = ReceiptUpdateFor(5, "alice", 3, 2);
    reply.set_rid(receipts[0].rid());
    h.session->OnEnvelope(reply);
    // Not stopped: the process ends.
  }
  std::shared_ptr<Cache> cache(Cache::Open(path).value());
  Harness h({}, cache);
  h.Reply(h.Welcome(), {});
  h.session->Tick();
  h.clock->Advance(kReceiptIntervalMs);
  CHECK(TickReceipts(h).empty());
  CHECK(h.cache->GetConversation(5)->info.read_seq == 2);
}

TEST_CASE("session: delivered and own-message watermarks not yet sent go out after a restart") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  {
    std::shared_ptr<Cache> cache(Cache::Open(path).value());
    Harness h({}, cache);
    ConnectWithGroup(h);  // bob's 1..3 reached the application
  }
  {
    Restarted restarted(path);
    Harness& h = restarted.h;
    auto receipts = restarted.receipts;
    REQUIRE(receipts.size() == 1);
    CHECK(receipts[0].receipt().delivered_seq() == 3);
    CHECK(receipts[0].receipt().read_seq() == 0);
    v1::Envelope reply = ReceiptUpdateFor(5, "alice", 3, 0);
    reply.set_rid(receipts[0].rid());
    h.session->OnEnvelope(reply);
    h.Deliver(Msg(5, 4));  // live, not from a Sync
  }
  {
    Restarted restarted(path);
    Harness& h = restarted.h;
    auto receipts = restarted.receipts;
    REQUIRE(receipts.size() == 1);
    CHECK(receipts[0].receipt().delivered_seq() == 4);
    CHECK(receipts[0].receipt().read_seq() == 0);
    v1::Envelope reply = ReceiptUpdateFor(5, "alice", 4, 0);
    reply.set_rid(receipts[0].rid());
    h.session->OnEnvelope(reply);
    h.Deliver(Msg(5, 5, "alice"));  // sent from the phone: read up to it
  }
  Restarted restarted(path);
  auto receipts = restarted.receipts;
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().delivered_seq() == 5);
  CHECK(receipts[0].receipt().read_seq() == 5);
}

TEST_CASE("session: a large group's delayed delivered receipt is not delayed past a reconnect") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  {
    std::shared_ptr<Cache> cache(Cache::Open(path).value());
    Harness h({}, cache);
    ConnectWith(h, {StateOf(5, v1::CONVERSATION_KIND_GROUP, 40)});
    h.Deliver(Msg(5, 4));
    CHECK(TickReceipts(h).empty());
    // The connection drops within the second: the next one sends what is owed at once.
    h.session->OnClosed(1006, "abnormal");
    h.session->Reconnect();
    const int64_t reconnected = h.Now();
    h.Reply(h.Welcome(), {});
    auto receipts = TickReceipts(h);
    REQUIRE(receipts.size() == 1);
    CHECK(receipts[0].receipt().delivered_seq() == 4);
    CHECK(h.Now() < reconnected + kLargeGroupDeliveredDelayMs);

    h.Deliver(Msg(5, 5));
    h.session->Stop();  // Close() within the second
  }
  // So does the next start.
  Restarted restarted(path);
  REQUIRE(restarted.receipts.size() == 1);
  CHECK(restarted.receipts[0].receipt().delivered_seq() == 5);
}

TEST_CASE("session: after a restart, receipts refused for now or lost go again, not refused ones") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  {
    std::shared_ptr<Cache> cache(Cache::Open(path).value());
    Harness h({}, cache);
    ConnectWithGroup(h);
    h.session->MarkRead(5, 3);
    auto receipts = TickReceipts(h);
    REQUIRE(receipts.size() == 1);
    v1::Envelope limited;
    limited.set_rid(receipts[0].rid());
    limited.mutable_error()->set_code(v1::Error::RESOURCE_EXHAUSTED);
    limited.mutable_error()->set_retry_after_ms(2'000);
    h.session->OnEnvelope(limited);
    h.clock->Advance(2'000);
    h.session->Tick();
    REQUIRE(OfCase(h.io.Take(), v1::Envelope::kReceipt).size() == 1);
    h.session->OnClosed(1006, "abnormal");  // unanswered
  }
  {
    Restarted restarted(path);
    Harness& h = restarted.h;
    auto receipts = restarted.receipts;
    REQUIRE(receipts.size() == 1);
    CHECK(receipts[0].receipt().read_seq() == 3);
    // Refused for good (say, the user was removed meanwhile): not owed any more.
    v1::Envelope denied;
    denied.set_rid(receipts[0].rid());
    denied.mutable_error()->set_code(v1::Error::PERMISSION_DENIED);
    h.session->OnEnvelope(denied);
  }
  std::shared_ptr<Cache> cache(Cache::Open(path).value());
  Harness h({}, cache);
  h.Reply(h.Welcome(), {});
  CHECK(TickReceipts(h).empty());
}

// A refusal for good settles only the watermarks it refused: a later Receipt, waiting or
// unanswered, is still owed.
TEST_CASE("session: a receipt refused for good leaves a later one owed") {
  for (const bool later_sent : {false, true}) {
    CAPTURE(later_sent);
    testing::TempDir dir;
    const std::string path = dir.File("cache.db");
    {
      std::shared_ptr<Cache> cache(Cache::Open(path).value());
      Harness h({}, cache);
      ConnectWithGroup(h);
      h.session->MarkRead(5, 2);
      h.session->Tick();
      auto first = OfCase(h.io.Take(), v1::Envelope::kReceipt);
      REQUIRE(first.size() == 1);
      h.session->MarkRead(5, 3);
      if (later_sent) {
        h.clock->Advance(kReceiptIntervalMs);
        h.session->Tick();
        REQUIRE(OfCase(h.io.Take(), v1::Envelope::kReceipt).size() == 1);
      }
      v1::Envelope denied;
      denied.set_rid(first[0].rid());
      denied.mutable_error()->set_code(v1::Error::INVALID_ARGUMENT);
      h.session->OnEnvelope(denied);
      CHECK(h.cache->GetConversation(5)->receipt_due);
    }
    Restarted restarted(path);
    auto receipts = restarted.receipts;
    REQUIRE(receipts.size() == 1);
    CHECK(receipts[0].receipt().read_seq() == 3);
  }
}

// The server never moves watermarks back and caps them at what it has: an answer below the
// marks its Receipt carried is all it will take, and the device takes it as its marks. Sending
// them again would get the same answer, so nothing is owed any more, on this connection, the
// next one, or after a restart.
TEST_CASE("session: a receipt answered below the marks it carried is not owed any more") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  {
    std::shared_ptr<Cache> cache(Cache::Open(path).value());
    Harness h({}, cache);
    ConnectWithGroup(h);
    h.session->MarkRead(5, 3);
    auto receipts = TickReceipts(h);
    REQUIRE(receipts.size() == 1);
    CHECK(receipts[0].receipt().delivered_seq() == 3);
    CHECK(receipts[0].receipt().read_seq() == 3);
    v1::Envelope capped = ReceiptUpdateFor(5, "alice", 2, 2);
    capped.set_rid(receipts[0].rid());
    h.session->OnEnvelope(capped);
    CHECK_FALSE(h.cache->GetConversation(5)->receipt_due);
    CHECK(h.cache->GetConversation(5)->info.read_seq == 2);
    CHECK(h.cache->GetConversation(5)->info.delivered_seq == 2);
    h.session->OnClosed(1006, "abnormal");
    h.Reply(h.Welcome(), {});
    h.clock->Advance(kReceiptIntervalMs);
    CHECK(TickReceipts(h).empty());
  }
  Restarted restarted(path);
  CHECK(restarted.receipts.empty());
}

// Group 5 as a Sync lists it when the server holds this device's watermarks at `delivered` and
// `read`.
v1::ConversationState CappedGroupState(Seq last_seq, Seq delivered, Seq read) {
  v1::ConversationState state = GroupState(5, last_seq, 1);
  state.set_delivered_seq(delivered);
  state.set_read_seq(read);
  return state;
}

// Reconnects with a Sync that lists `state`; returns the Receipts sent once live.
std::vector<v1::Envelope> ResyncWith(Harness& h, const v1::ConversationState& state) {
  h.session->OnClosed(1006, "abnormal");
  v1::SyncBatch batch;
  *batch.add_conversations() = state;
  h.Reply(h.Welcome(), batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  h.clock->Advance(kReceiptIntervalMs);
  h.session->Tick();
  return OfCase(h.io.Take(), v1::Envelope::kReceipt);
}

// After the server answered the watermarks lower, Syncs that show them as it answered owe no
// Receipt, Sync after Sync; and the user reading up to the old mark again is told to the server.
TEST_CASE("session: watermarks the server capped are this device's, so a later read is sent") {
  Harness h;
  ConnectWithGroup(h);
  h.session->MarkRead(5, 3);
  auto receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  v1::Envelope capped = ReceiptUpdateFor(5, "alice", 2, 2);
  capped.set_rid(receipts[0].rid());
  h.session->OnEnvelope(capped);
  for (int sync = 0; sync < 3; ++sync) {
    CAPTURE(sync);
    CHECK(ResyncWith(h, CappedGroupState(3, 2, 2)).empty());
    CHECK(h.cache->GetConversation(5)->info.read_seq == 2);
    CHECK_FALSE(h.cache->GetConversation(5)->receipt_due);
  }
  h.session->MarkRead(5, 3);
  h.clock->Advance(kReceiptIntervalMs);
  receipts = TickReceipts(h);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].receipt().read_seq() == 3);
}

// Only the answer to a Receipt that carried the current marks settles them: a low answer to an
// earlier one leaves the marks moved since owed, whether their Receipt is waiting or unanswered.
TEST_CASE("session: a low answer to an earlier receipt leaves later watermarks owed") {
  for (const bool later_sent : {false, true}) {
    CAPTURE(later_sent);
    testing::TempDir dir;
    const std::string path = dir.File("cache.db");
    {
      std::shared_ptr<Cache> cache(Cache::Open(path).value());
      Harness h({}, cache);
      ConnectWithGroup(h);
      h.session->MarkRead(5, 2);
      h.session->Tick();
      auto first = OfCase(h.io.Take(), v1::Envelope::kReceipt);
      REQUIRE(first.size() == 1);
      h.session->MarkRead(5, 3);
      if (later_sent) {
        h.clock->Advance(kReceiptIntervalMs);
        h.session->Tick();
        REQUIRE(OfCase(h.io.Take(), v1::Envelope::kReceipt).size() == 1);
      }
      v1::Envelope capped = ReceiptUpdateFor(5, "alice", 2, 1);
      capped.set_rid(first[0].rid());
      h.session->OnEnvelope(capped);
      CHECK(h.cache->GetConversation(5)->receipt_due);
    }
    Restarted restarted(path);
    auto receipts = restarted.receipts;
    REQUIRE(receipts.size() == 1);
    CHECK(receipts[0].receipt().read_seq() == 3);
  }
}

TEST_CASE("session: another device's receipt at this one's watermarks settles what was owed") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  {
    std::shared_ptr<Cache> cache(Cache::Open(path).value());
    Harness h({}, cache);
    ConnectWithGroup(h);
    h.session->MarkRead(5, 3);
    // The phone read as far before this device's Receipt went out.
    h.session->OnEnvelope(ReceiptUpdateFor(5, "alice", 2, 2));
    CHECK(h.cache->GetConversation(5)->receipt_due);  // not as far as this one
    h.session->OnEnvelope(ReceiptUpdateFor(5, "alice", 3, 3));
    CHECK_FALSE(h.cache->GetConversation(5)->receipt_due);
  }
  std::shared_ptr<Cache> cache(Cache::Open(path).value());
  Harness h({}, cache);
  h.Reply(h.Welcome(), {});
  CHECK(TickReceipts(h).empty());
}

// The lowest watermarks come with conversation states as with ReceiptUpdates: a Sync names the
// cached ones in its cursors, and the server lists a state whose marks rose past them.

// Answers each Receipt in `receipts` as the server does, with the lowest watermarks both at
// `all(conversation)`.
void AnswerReceipts(Harness& h, const std::vector<v1::Envelope>& receipts,
                    const std::function<Seq(ConversationId)>& all) {
  for (const v1::Envelope& receipt : receipts) {
    const v1::Receipt& r = receipt.receipt();
    v1::Envelope reply;
    reply.set_rid(receipt.rid());
    v1::ReceiptUpdate* u = reply.mutable_receipt_update();
    u->set_conversation_id(r.conversation_id());
    u->set_user_id("alice");
    u->set_device_id("laptop");
    u->set_delivered_seq(r.delivered_seq());
    u->set_read_seq(r.read_seq());
    u->set_delivered_all_seq(all(r.conversation_id()));
    u->set_read_all_seq(all(r.conversation_id()));
    h.session->OnEnvelope(reply);
  }
}

// Group 5 as the server describes it to alice after her message 2 among bob's 1 and 3, with
// the lowest watermarks `delivered_all` and `read_all`.
v1::ConversationState GroupWithMarks(Seq delivered_all, Seq read_all) {
  v1::ConversationState state = GroupState(5, 3, 1);
  state.set_delivered_seq(3);
  state.set_read_seq(2);
  state.set_delivered_all_seq(delivered_all);
  state.set_read_all_seq(read_all);
  return state;
}

TEST_CASE("session: a Sync names the cached lowest watermarks, and a listed state raises them") {
  Harness h;
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupWithMarks(2, 1);
  *batch.add_messages() = Msg(5, 1);
  *batch.add_messages() = Msg(5, 2, "alice");
  *batch.add_messages() = Msg(5, 3);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  CHECK(h.listener.statuses == std::vector<std::string>{"5:2:delivered", "5:1:read"});
  CHECK(h.cache->GetConversation(5)->info.delivered_all_seq == 2);
  CHECK(h.cache->GetConversation(5)->info.read_all_seq == 1);
  h.session->Tick();
  AnswerReceipts(h, OfCase(h.io.Take(), v1::Envelope::kReceipt),
                 [](ConversationId) { return Seq{1}; });
  REQUIRE(h.cache->ReceiptsDue().empty());
  CHECK(h.listener.statuses.size() == 2);  // lower marks than the cached ones: no news

  // Offline, bob reads alice's message; the ReceiptUpdate saying so reached nobody here. The
  // next connection's Sync names the marks the cache holds...
  h.session->OnClosed(1006, "abnormal");
  v1::Envelope again = h.Welcome();
  REQUIRE(again.sync().cursors_size() == 1);
  const v1::Cursor& cursor = again.sync().cursors(0);
  CHECK(cursor.seq() == 3);
  CHECK(cursor.has_delivered_all_seq());
  CHECK(cursor.delivered_all_seq() == 2);
  CHECK(cursor.has_read_all_seq());
  CHECK(cursor.read_all_seq() == 1);
  // ...and the server lists the state alone, with the raised marks.
  v1::SyncBatch listed;
  *listed.add_conversations() = GroupWithMarks(3, 2);
  h.Reply(again, listed);
  REQUIRE(h.state() == ConnectionState::kConnected);
  CHECK(h.listener.statuses ==
        std::vector<std::string>{"5:2:delivered", "5:1:read", "5:3:delivered", "5:2:read"});
  CHECK(h.cache->GetConversation(5)->info.delivered_all_seq == 3);
  CHECK(h.cache->GetConversation(5)->info.read_all_seq == 2);
  REQUIRE_FALSE(h.listener.conversations.empty());
  CHECK(h.listener.conversations.back().read_all_seq == 2);
  // Nothing is asked with a Receipt: the Sync answered it.
  h.clock->Advance(kReceiptIntervalMs);
  CHECK(TickReceipts(h).empty());

  // A state read before (lower marks) takes nothing back; a later one raises them as a Sync's.
  v1::Envelope update;
  *update.mutable_conversation_update()->mutable_conversation() = GroupWithMarks(1, 0);
  h.session->OnEnvelope(update);
  CHECK(h.listener.statuses.size() == 4);
  CHECK(h.cache->GetConversation(5)->info.delivered_all_seq == 3);
  CHECK(h.cache->GetConversation(5)->info.read_all_seq == 2);
  *update.mutable_conversation_update()->mutable_conversation() = GroupWithMarks(3, 3);
  h.session->OnEnvelope(update);
  CHECK(h.listener.statuses.back() == "5:3:read");
  CHECK(h.cache->GetConversation(5)->info.read_all_seq == 3);
  CHECK(h.listener.conversations.back().read_all_seq == 3);
  // Marks past the state's last seq (3) go no further than it: no message sent later shows as
  // read before anybody read it.
  *update.mutable_conversation_update()->mutable_conversation() = GroupWithMarks(1000, 1000);
  h.session->OnEnvelope(update);
  CHECK(h.cache->GetConversation(5)->info.delivered_all_seq == 3);
  CHECK(h.cache->GetConversation(5)->info.read_all_seq == 3);
  CHECK(h.listener.statuses.back() == "5:3:read");
}

// A rise of the lowest watermarks is told once the row holding it is stored, never before: one
// the cache did not keep is listed again by the next Sync, whose cursor names the marks stored,
// and would be told twice. The same holds whichever way the rise comes.
TEST_CASE(
    "session: a rise of the lowest watermarks the cache could not store is told once, later") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  {
    Harness h({}, std::shared_ptr<Cache>(Cache::Open(path).value()));
    v1::Envelope sync = h.Welcome();
    v1::SyncBatch batch;
    *batch.add_conversations() = GroupWithMarks(2, 1);
    *batch.add_messages() = Msg(5, 1);
    *batch.add_messages() = Msg(5, 2, "alice");
    *batch.add_messages() = Msg(5, 3);
    h.Reply(sync, batch);
    REQUIRE(h.listener.statuses == std::vector<std::string>{"5:2:delivered", "5:1:read"});
    h.session->Stop();
  }
  // The next time, the row of group 5 cannot be written, while the rest of the cache can.
  testing::FailConversationWrites(path, 5, true);
  {
    Harness h({}, std::shared_ptr<Cache>(Cache::Open(path).value()));
    v1::Envelope sync = h.Welcome();
    SUBCASE("from a Sync page") {
      v1::SyncBatch listed;
      *listed.add_conversations() = GroupWithMarks(3, 2);
      h.Reply(sync, listed);
    }
    SUBCASE("from a ConversationUpdate") {
      h.Reply(sync, {});
      v1::Envelope update;
      *update.mutable_conversation_update()->mutable_conversation() = GroupWithMarks(3, 2);
      h.session->OnEnvelope(update);
    }
    SUBCASE("from a ReceiptUpdate") {
      h.Reply(sync, {});
      h.session->OnEnvelope(ReceiptUpdateFor(5, "bob", 3, 2));
      CHECK(h.listener.receipts.size() == 1);  // bob's receipt is told as it comes
    }
    CHECK(h.state() == ConnectionState::kConnected);
    REQUIRE_FALSE(h.listener.errors.empty());
    CHECK(h.listener.errors[0].code() == Code::kUnavailable);
    CHECK(h.listener.statuses.empty());
    // Nor is the conversation told with marks the cache does not hold.
    for (const ConversationInfo& info : h.listener.conversations) {
      CHECK(info.read_all_seq == 1);
    }
    CHECK(h.cache->GetConversation(5)->info.delivered_all_seq == 2);
    CHECK(h.cache->GetConversation(5)->info.read_all_seq == 1);
    h.session->Stop();
  }
  // Once the row can be written again, the next Sync lists the state, and the rise is told.
  testing::FailConversationWrites(path, 5, false);
  Harness h({}, std::shared_ptr<Cache>(Cache::Open(path).value()));
  v1::Envelope sync = h.Welcome();
  REQUIRE(sync.sync().cursors_size() == 1);
  CHECK(sync.sync().cursors(0).delivered_all_seq() == 2);
  CHECK(sync.sync().cursors(0).read_all_seq() == 1);
  v1::SyncBatch listed;
  *listed.add_conversations() = GroupWithMarks(3, 2);
  h.Reply(sync, listed);
  CHECK(h.listener.statuses == std::vector<std::string>{"5:3:delivered", "5:2:read"});
  REQUIRE_FALSE(h.listener.conversations.empty());
  CHECK(h.listener.conversations.back().read_all_seq == 2);
  CHECK(h.cache->GetConversation(5)->info.read_all_seq == 2);
}

// The user's own watermarks and counts (read on another device), a title or the membership come
// in a ReceiptUpdate or a conversation state, and no later Sync lists them again: its cursor does
// not name them. When the cache cannot store the row, they are told all the same, but with the
// lowest marks as stored (their rise is told once a later Sync's state is stored), and without
// what retention deleted in the transaction rolled back.
TEST_CASE("session: read state from another device that the cache cannot store is told") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  {
    // Group 5 holds alice's message 1 and bob's 2 and 3, unread.
    Harness h({}, std::shared_ptr<Cache>(Cache::Open(path).value()));
    v1::Envelope sync = h.Welcome();
    v1::SyncBatch batch;
    *batch.add_conversations() = GroupState(5, 3, 2);
    *batch.add_messages() = Msg(5, 1, "alice");
    *batch.add_messages() = Msg(5, 2);
    *batch.add_messages() = Msg(5, 3);
    h.Reply(sync, batch);
    REQUIRE(h.listener.unread_totals.back() == 2);
    h.session->Stop();
  }
  testing::FailConversationWrites(path, 5, true);
  Harness h({}, std::shared_ptr<Cache>(Cache::Open(path).value()));
  const ConversationInfo stored = h.cache->GetConversation(5)->info;
  REQUIRE(stored.read_seq < 3);
  v1::Envelope sync = h.Welcome();
  // Read up to 3 on the phone, after every member read alice's message 1, which retention then
  // deleted.
  v1::ConversationState read = GroupState(5, 3, 0, "renamed");
  read.set_first_seq(2);
  read.set_delivered_seq(3);
  read.set_read_seq(3);
  read.set_delivered_all_seq(1);
  read.set_read_all_seq(1);
  uint64_t total = 0;
  SUBCASE("from a ReceiptUpdate") {
    h.Reply(sync, {});
    v1::Envelope update = ReceiptUpdateFor(5, "alice", 3, 3);
    update.mutable_receipt_update()->set_delivered_all_seq(1);
    update.mutable_receipt_update()->set_read_all_seq(1);
    update.mutable_receipt_update()->set_unread(0);
    h.session->OnEnvelope(update);
  }
  SUBCASE("from a ConversationUpdate") {
    h.Reply(sync, {});
    v1::Envelope update;
    *update.mutable_conversation_update()->mutable_conversation() = read;
    h.session->OnEnvelope(update);
    REQUIRE_FALSE(h.listener.conversations.empty());
    CHECK(h.listener.conversations.back().title == "renamed");
  }
  SUBCASE("from a Sync page, after its messages are stored") {
    // The page also brings group 6, whose message is stored while its state is rolled back
    // with group 5's.
    v1::SyncBatch page;
    *page.add_conversations() = GroupState(6, 1, 1);
    *page.add_conversations() = read;
    *page.add_messages() = Msg(6, 1);
    h.Reply(sync, page);
    CHECK(h.listener.SentSeqs(6) == std::vector<Seq>{1});
    REQUIRE_FALSE(h.listener.conversations.empty());
    CHECK(h.listener.conversations.back().title == "renamed");
    total = 1;
  }
  CHECK(h.state() == ConnectionState::kConnected);
  REQUIRE_FALSE(h.listener.errors.empty());
  CHECK(h.listener.errors[0].code() == Code::kUnavailable);
  REQUIRE_FALSE(h.listener.conversations.empty());
  const ConversationInfo& told = h.listener.conversations.back();
  CHECK(told.conversation_id == 5);
  CHECK(told.read_seq == 3);
  CHECK(told.unread == 0);
  CHECK(told.delivered_all_seq == 0);
  CHECK(told.read_all_seq == 0);
  CHECK(h.listener.statuses.empty());
  REQUIRE_FALSE(h.listener.unread_totals.empty());
  CHECK(h.listener.unread_totals.back() == total);
  CHECK(h.listener.expired.empty());
  // The cache holds what it held.
  CHECK(h.cache->GetMessage(5, 1).has_value());
  CHECK(h.cache->GetConversation(5)->info.read_seq == stored.read_seq);
  CHECK(h.cache->GetConversation(5)->info.read_all_seq == 0);
}

// A count told but not stored (read on another device, while the cache could not write the row)
// is not taken back by the next total: UnreadTotal() (the cache's) and later OnUnreadTotal calls
// count the conversation as told until its row is written, here by the next Sync's state, and
// Client::Conversations() lists it so, agreeing with them.
TEST_CASE(
    "session: an unread count the cache could not store stays told until the row is written") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  v1::Envelope sync = h.Welcome();
  // Group 5 holds alice's message 1 and bob's 2 and 3, unread; group 6 bob's message 1.
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(5, 3, 2);
  *batch.add_conversations() = GroupState(6, 1, 1);
  *batch.add_messages() = Msg(5, 1, "alice");
  *batch.add_messages() = Msg(5, 2);
  *batch.add_messages() = Msg(5, 3);
  *batch.add_messages() = Msg(6, 1);
  h.Reply(sync, batch);
  REQUIRE(h.listener.unread_totals.back() == 3);

  // Read up to 3 on the phone; the cache cannot store it.
  vfs.FailWrites(true);
  v1::Envelope read = ReceiptUpdateFor(5, "alice", 3, 3);
  read.mutable_receipt_update()->set_delivered_all_seq(0);
  read.mutable_receipt_update()->set_read_all_seq(0);
  read.mutable_receipt_update()->set_unread(0);
  h.session->OnEnvelope(read);
  vfs.FailWrites(false);
  REQUIRE_FALSE(h.listener.errors.empty());
  CHECK(h.listener.conversations.back().unread == 0);
  CHECK(h.listener.unread_totals.back() == 1);
  CHECK(h.cache->GetConversation(5)->info.unread == 2);  // the row holds what it held
  CHECK(h.cache->UnreadTotal() == 1);                    // Client::UnreadTotal()
  // Client::Conversations() agrees with it, and lists the read watermark told with the count.
  CHECK(Listed(*h.cache, 5).value().unread == 0);
  CHECK(Listed(*h.cache, 6).value().unread == 1);
  CHECK(Listed(*h.cache, 5).value().read_seq == 3);

  // A message in group 6 is stored: the total counts group 5 as told, not as stored.
  h.Deliver(Msg(6, 2));
  CHECK(h.listener.SentSeqs(6) == std::vector<Seq>{1, 2});
  CHECK(h.listener.unread_totals.back() == 2);
  CHECK(h.cache->UnreadTotal() == 2);
  CHECK(Listed(*h.cache, 5).value().unread == 0);
  CHECK(Listed(*h.cache, 6).value().unread == 2);

  // The next Sync stores group 5's row: from then on the stored count is the one counted.
  h.session->OnClosed(1006, "abnormal");
  sync = h.Welcome();
  v1::SyncBatch listed;
  v1::ConversationState state = GroupState(5, 3, 0);
  state.set_delivered_seq(3);
  state.set_read_seq(3);
  *listed.add_conversations() = state;
  h.Reply(sync, listed);
  CHECK(h.cache->GetConversation(5)->info.unread == 0);
  CHECK(h.cache->UnreadTotal() == 2);
  h.Deliver(Msg(5, 4));
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2, 3, 4});
  CHECK(h.cache->GetConversation(5)->info.unread == 1);
  CHECK(h.listener.unread_totals.back() == 3);
  CHECK(h.cache->UnreadTotal() == 3);
  CHECK(Listed(*h.cache, 5).value().unread == 1);
}

// A count told but not stored stays told through any later write of the row that is not a newer
// count from the server: the write stores the told count (and the read watermark it came with),
// and a message counts on from it.
TEST_CASE("session: a write of the row after an unread count the cache could not store keeps it") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  v1::Envelope sync = h.Welcome();
  // The direct conversation 5 with bob holds alice's message 1 and bob's 2 and 3, unread.
  v1::ConversationState direct = GroupState(5, 3, 2);
  direct.set_kind(v1::CONVERSATION_KIND_DIRECT);
  direct.set_peer("bob");
  direct.set_member_count(2);
  v1::SyncBatch batch;
  *batch.add_conversations() = direct;
  *batch.add_messages() = Msg(5, 1, "alice");
  *batch.add_messages() = Msg(5, 2);
  *batch.add_messages() = Msg(5, 3);
  h.Reply(sync, batch);
  REQUIRE(h.listener.unread_totals.back() == 2);
  h.session->SubscribePresence({"bob"}, [](const Status&) {});
  for (const v1::Envelope& e : OfCase(h.io.Take(), v1::Envelope::kPresenceSubscribe)) {
    h.session->OnEnvelope(OkFor(e));
  }

  // Read up to 3 on the phone; the cache cannot store it.
  vfs.FailWrites(true);
  v1::Envelope read = ReceiptUpdateFor(5, "alice", 3, 3);
  read.mutable_receipt_update()->set_delivered_all_seq(0);
  read.mutable_receipt_update()->set_read_all_seq(0);
  read.mutable_receipt_update()->set_unread(0);
  h.session->OnEnvelope(read);
  vfs.FailWrites(false);
  REQUIRE_FALSE(h.listener.errors.empty());
  REQUIRE(h.listener.unread_totals.back() == 0);
  const size_t updates = h.listener.conversations.size();

  SUBCASE("no other write first") {}
  SUBCASE("bob's last seen") {
    v1::Envelope offline;
    offline.mutable_presence_update()->set_user_id("bob");
    offline.mutable_presence_update()->set_last_seen_ms(7'000);
    h.session->OnEnvelope(offline);
    REQUIRE(h.cache->GetConversation(5)->info.peer_last_seen_ms == 7'000);
  }
  SUBCASE("a retention notice") {
    v1::Envelope notice;
    notice.mutable_messages_expired()->set_conversation_id(5);
    notice.mutable_messages_expired()->set_first_seq(2);
    h.session->OnEnvelope(notice);
    REQUIRE(h.cache->GetConversation(5)->info.first_seq == 2);
  }
  SUBCASE("bob's read") {
    h.session->OnEnvelope(ReceiptUpdateFor(5, "bob", 1, 1));
    REQUIRE(h.cache->GetConversation(5)->info.read_all_seq == 1);
  }
  SUBCASE("a read on this device below the phone's") {
    // Nothing to recount: the phone read further.
    h.session->MarkRead(5, 2);
  }
  if (h.listener.conversations.size() > updates) {
    CHECK(h.listener.conversations.back().unread == 0);
  }
  CHECK(h.listener.unread_totals.back() == 0);
  CHECK(h.cache->UnreadTotal() == 0);
  CHECK(Listed(*h.cache, 5).value().unread == 0);

  // bob's next message counts on from the count told, and the row stores it.
  h.Deliver(Msg(5, 4));
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2, 3, 4});
  CHECK(h.listener.conversations.back().unread == 1);
  CHECK(h.listener.unread_totals.back() == 1);
  CHECK(h.cache->UnreadTotal() == 1);
  CHECK(Listed(*h.cache, 5).value().unread == 1);
  CHECK(h.cache->GetConversation(5)->info.unread == 1);
  CHECK(h.cache->GetConversation(5)->info.read_seq == 3);
}

// A conversation known only from a state the cache could not store is reported, but neither
// listed by Client::Conversations() nor counted by UnreadTotal(): nothing is kept of it, so no
// count outlives it. The next Sync brings its state again.
TEST_CASE("session: a conversation the cache could not store is neither listed nor counted") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  h.ConnectLive();
  h.io.Take();
  vfs.FailWrites(true);
  v1::Envelope update;
  *update.mutable_conversation_update()->mutable_conversation() = GroupState(7, 3, 3);
  h.session->OnEnvelope(update);
  vfs.FailWrites(false);
  REQUIRE_FALSE(h.cache->GetConversation(7).has_value());
  REQUIRE_FALSE(h.listener.conversations.empty());
  CHECK(h.listener.conversations.back().unread == 3);
  CHECK(h.cache->ListConversationInfos().empty());
  CHECK(h.cache->UnreadTotal() == 0);
  CHECK(h.listener.unread_totals.empty());

  SUBCASE("the user is removed before the next Sync") {
    h.clock->Advance(kSyncRetryMinMs);
    h.session->Tick();
    auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
    REQUIRE(syncs.size() == 1);
    h.Reply(syncs[0], {});
    CHECK(h.cache->ListConversationInfos().empty());
    CHECK(h.cache->UnreadTotal() == 0);
    CHECK(h.listener.unread_totals.empty());
  }
  SUBCASE("a message makes its row first") {
    // Message 4 waits above the hole its Sync fills; its row is written now, counting nothing.
    h.Deliver(Msg(7, 4));
    REQUIRE(h.cache->GetConversation(7).has_value());
    CHECK(h.cache->UnreadTotal() == 0);
    CHECK(h.cache->ListConversationInfos().at(0).unread == 0);
    auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
    REQUIRE(syncs.size() == 1);
    v1::SyncBatch batch;
    *batch.add_conversations() = GroupState(7, 4, 4);
    for (Seq seq = 1; seq <= 3; ++seq) *batch.add_messages() = Msg(7, seq);
    h.Reply(syncs[0], batch);
    CHECK(h.listener.SentSeqs(7) == std::vector<Seq>{1, 2, 3, 4});
    CHECK(h.cache->ListConversationInfos().at(0).unread == 4);
    CHECK(h.cache->UnreadTotal() == 4);
    CHECK(h.listener.unread_totals.back() == 4);
  }
}

// An application that refreshes its list and badge from inside OnConversationUpdated reads
// Client::Conversations() and Client::UnreadTotal() (the cache's): a count the cache could not
// store is already what they give when it is told.
TEST_CASE("session: a count the cache could not store is listed as told inside its callback") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  v1::Envelope sync = h.Welcome();
  // Group 5 holds bob's messages 1 and 2, unread.
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(5, 2, 2);
  *batch.add_messages() = Msg(5, 1);
  *batch.add_messages() = Msg(5, 2);
  h.Reply(sync, batch);
  REQUIRE(h.listener.unread_totals.back() == 2);
  // What the application reads inside each OnConversationUpdated for group 5.
  std::vector<std::pair<uint64_t, uint64_t>> seen;  // (listed unread, total)
  h.listener.on_conversation = [&](const ConversationInfo& info) {
    if (info.conversation_id != 5) return;
    if (auto listed = Listed(*h.cache, 5)) {
      seen.emplace_back(listed->unread, h.cache->UnreadTotal());
    }
  };
  // Read up to 2 on the phone; the cache cannot store it.
  v1::ConversationState read = GroupState(5, 2, 0);
  read.set_delivered_seq(2);
  read.set_read_seq(2);
  vfs.FailWrites(true);
  SUBCASE("from a ReceiptUpdate") {
    // OnReceipt comes first: the listing read there is the one told next, too.
    h.listener.on_receipt = [&](const ReceiptEvent&) {
      if (auto listed = Listed(*h.cache, 5)) CHECK(listed->unread == 0);
    };
    v1::Envelope update = ReceiptUpdateFor(5, "alice", 2, 2);
    update.mutable_receipt_update()->set_delivered_all_seq(0);
    update.mutable_receipt_update()->set_read_all_seq(0);
    update.mutable_receipt_update()->set_unread(0);
    h.session->OnEnvelope(update);
    CHECK(h.listener.receipts.size() == 1);
  }
  SUBCASE("from a ConversationUpdate") {
    v1::Envelope update;
    *update.mutable_conversation_update()->mutable_conversation() = read;
    h.session->OnEnvelope(update);
  }
  SUBCASE("from a Sync page") {
    h.session->OnClosed(1006, "abnormal");
    vfs.FailWrites(false);
    sync = h.Welcome();
    vfs.FailWrites(true);
    v1::SyncBatch page;
    *page.add_conversations() = read;
    h.Reply(sync, page);
  }
  vfs.FailWrites(false);
  REQUIRE_FALSE(h.listener.errors.empty());
  REQUIRE(h.listener.conversations.back().unread == 0);
  CHECK(seen == std::vector<std::pair<uint64_t, uint64_t>>{{0, 0}});
  CHECK(h.listener.unread_totals.back() == 0);
}

// Where every member has read the user's latest message, or none is the user's, a reconnect sends
// no Receipt either: what used to be asked after each reconnect comes with the Sync.
TEST_CASE("session: a reconnect sends no Receipt that nothing owes") {
  Harness h;
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  for (ConversationId id : {5, 6}) {
    *batch.add_conversations() = GroupState(id, 2, 0);
    *batch.add_messages() = Msg(id, 1);
    *batch.add_messages() = Msg(id, 2, "alice");
  }
  h.Reply(sync, batch);
  h.session->Tick();
  AnswerReceipts(h, OfCase(h.io.Take(), v1::Envelope::kReceipt),
                 [](ConversationId) { return Seq{1}; });  // bob has not read alice's messages
  REQUIRE(h.cache->ReceiptsDue().empty());
  h.session->OnClosed(1006, "abnormal");
  h.Reply(h.Welcome(), {});
  REQUIRE(h.state() == ConnectionState::kConnected);
  h.clock->Advance(kReceiptIntervalMs);
  CHECK(TickReceipts(h).empty());
}

// A synced state behind the watermarks the server confirmed (its store went back) is told again,
// and that too survives a restart.
TEST_CASE(
    "session: a synced state behind this device's watermarks owes a receipt after a restart") {
  // The state is behind on the delivered watermark only, then on the read one only.
  for (const bool behind_on_read : {false, true}) {
    CAPTURE(behind_on_read);
    testing::TempDir dir;
    const std::string path = dir.File("cache.db");
    {
      std::shared_ptr<Cache> cache(Cache::Open(path).value());
      Harness h({}, cache);
      ConnectWithGroup(h);
      h.session->MarkRead(5, 3);
      auto receipts = TickReceipts(h);
      REQUIRE(receipts.size() == 1);
      v1::Envelope reply = ReceiptUpdateFor(5, "alice", 3, 3);
      reply.set_rid(receipts[0].rid());
      h.session->OnEnvelope(reply);
      REQUIRE_FALSE(h.cache->GetConversation(5)->receipt_due);
      v1::Envelope update;
      v1::ConversationState* state = update.mutable_conversation_update()->mutable_conversation();
      *state = GroupState(5, 3, behind_on_read ? 3 : 0);
      state->set_delivered_seq(behind_on_read ? 3 : 0);
      state->set_read_seq(behind_on_read ? 0 : 3);
      h.session->OnEnvelope(update);
      CHECK(h.cache->GetConversation(5)->info.delivered_seq == 3);
      CHECK(h.cache->GetConversation(5)->info.read_seq == 3);
      CHECK(h.cache->GetConversation(5)->receipt_due);
    }
    Restarted restarted(path);
    auto receipts = restarted.receipts;
    REQUIRE(receipts.size() == 1);
    CHECK(receipts[0].receipt().delivered_seq() == 3);
    CHECK(receipts[0].receipt().read_seq() == 3);
  }
}

v1::Envelope TypingFor(ConversationId conversation, const std::string& user, bool active,
                       uint32_t expires_ms) {
  v1::Envelope e;
  e.mutable_typing_update()->set_conversation_id(conversation);
  e.mutable_typing_update()->set_user_id(user);
  e.mutable_typing_update()->set_active(active);
  e.mutable_typing_update()->set_expires_ms(expires_ms);
  return e;
}

TEST_CASE("session: typing is shown, refreshed, and expires by itself after expires_ms") {
  Harness h;
  ConnectWithGroup(h);
  h.session->OnEnvelope(TypingFor(5, "bob", true, 5'000));
  CHECK(h.listener.typing == std::vector<std::string>{"5:bob:on"});
  CHECK(h.session->NextDeadlineMs() <= h.Now() + 5'000);
  h.clock->Advance(4'000);
  h.session->OnEnvelope(TypingFor(5, "bob", true, 5'000));  // refresh: not reported again
  h.clock->Advance(4'999);
  h.session->Tick();
  CHECK(h.listener.typing.size() == 1);
  h.clock->Advance(1);
  h.session->Tick();
  CHECK(h.listener.typing == std::vector<std::string>{"5:bob:on", "5:bob:off"});

  // An explicit stop, and a server expiry beyond 6 s is capped at 6 s.
  h.session->OnEnvelope(TypingFor(5, "carol", true, 60'000));
  h.session->OnEnvelope(TypingFor(5, "carol", false, 0));
  h.session->OnEnvelope(TypingFor(5, "dave", true, 60'000));
  h.clock->Advance(6'000);
  h.session->Tick();
  CHECK(h.listener.typing == std::vector<std::string>{"5:bob:on", "5:bob:off", "5:carol:on",
                                                      "5:carol:off", "5:dave:on", "5:dave:off"});
}

TEST_CASE("session: typing indicators end when the connection is lost") {
  Harness h;
  ConnectWithGroup(h);
  h.session->OnEnvelope(TypingFor(5, "bob", true, 6'000));
  h.session->OnEnvelope(TypingFor(5, "alice", true, 6'000));  // this user: not shown
  h.session->OnClosed(1006, "abnormal");
  CHECK(h.listener.typing == std::vector<std::string>{"5:bob:on", "5:bob:off"});
}

TEST_CASE("session: SetTyping sends a start, refreshes at most every 3 s, and a stop") {
  Harness h;
  ConnectWithGroup(h);
  h.io.Take();
  h.session->SetTyping(5, false);  // nothing to stop
  CHECK(OfCase(h.io.Take(), v1::Envelope::kTyping).empty());
  h.session->SetTyping(5, true);
  h.session->SetTyping(5, true);
  h.clock->Advance(kTypingRefreshMs - 1);
  h.session->SetTyping(5, true);
  auto typing = OfCase(h.io.Take(), v1::Envelope::kTyping);
  REQUIRE(typing.size() == 1);
  CHECK(typing[0].typing().conversation_id() == 5);
  CHECK(typing[0].typing().active());
  h.clock->Advance(1);
  h.session->SetTyping(5, true);
  CHECK(OfCase(h.io.Take(), v1::Envelope::kTyping).size() == 1);
  h.session->SetTyping(5, false);
  typing = OfCase(h.io.Take(), v1::Envelope::kTyping);
  REQUIRE(typing.size() == 1);
  CHECK(!typing[0].typing().active());

  // Offline it is dropped.
  h.session->OnClosed(1006, "abnormal");
  h.session->SetTyping(5, true);
  CHECK(OfCase(h.io.Take(), v1::Envelope::kTyping).empty());
}

TEST_CASE("session: a group operation calls back with the new state and caches it") {
  Harness h;
  h.ConnectLive();
  Result<ConversationInfo> got = Internal("not called");
  int calls = 0;
  v1::Envelope request;
  request.mutable_create_group()->set_kind(v1::CONVERSATION_KIND_GROUP);
  request.mutable_create_group()->set_title("team");
  request.mutable_create_group()->add_members("bob");
  h.session->ConversationRequest(request, [&](Result<ConversationInfo> r) {
    ++calls;
    got = std::move(r);
  });
  auto written = OfCase(h.io.Take(), v1::Envelope::kCreateGroup);
  REQUIRE(written.size() == 1);
  CHECK(written[0].rid() != 0);
  CHECK(written[0].create_group().title() == "team");
  CHECK(calls == 0);

  v1::Envelope reply;
  reply.set_rid(written[0].rid());
  *reply.mutable_conversation_update()->mutable_conversation() = GroupState(9, 1, 0);
  h.session->OnEnvelope(reply);
  REQUIRE(calls == 1);
  REQUIRE(got.ok());
  CHECK(got->conversation_id == 9);
  CHECK(got->kind == ConversationKind::kGroup);
  CHECK(got->title == "team");
  CHECK(got->role == Role::kAdmin);
  REQUIRE(h.cache->GetConversation(9));
  CHECK(h.cache->GetConversation(9)->info.title == "team");
  // The created system message (seq 1) is fetched.
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).size() == 1);
  h.session->OnEnvelope(reply);  // a second reply with the same rid calls nobody
  CHECK(calls == 1);
}

// A group operation's callback gets the conversation as the application is told it, also when
// the cache cannot store it: merged with what this device knows (its read watermark not yet
// answered, what retention deleted), the lowest marks as stored, not the server's state as sent.
TEST_CASE("session: a group operation the cache cannot store calls back with the merged state") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  {
    // Group 5 with bob's messages 1..3, read up to 3 here (not yet answered), seq 1 expired.
    Harness h({}, std::shared_ptr<Cache>(Cache::Open(path).value()));
    ConnectWithGroup(h);
    h.session->MarkRead(5, 3);
    v1::Envelope expired;
    expired.mutable_messages_expired()->set_conversation_id(5);
    expired.mutable_messages_expired()->set_first_seq(2);
    h.session->OnEnvelope(expired);
    REQUIRE(h.cache->GetConversation(5)->info.read_seq == 3);
    REQUIRE(h.cache->GetConversation(5)->expired_through == 1);
    REQUIRE(h.cache->GetConversation(5)->info.read_all_seq == 0);
    h.session->Stop();
  }
  testing::FailConversationWrites(path, 5, true);
  Harness h({}, std::shared_ptr<Cache>(Cache::Open(path).value()));
  h.ConnectLive();
  Result<ConversationInfo> got = Internal("not called");
  v1::Envelope request;
  request.mutable_rename_group()->set_conversation_id(5);
  request.mutable_rename_group()->set_title("renamed");
  h.session->ConversationRequest(request, [&](Result<ConversationInfo> r) { got = std::move(r); });
  auto written = OfCase(h.io.Take(), v1::Envelope::kRenameGroup);
  REQUIRE(written.size() == 1);
  // The server read the state before this device's Receipt and retention's sweep, and its
  // lowest marks run past its last seq.
  v1::Envelope reply;
  reply.set_rid(written[0].rid());
  v1::ConversationState state = GroupState(5, 3, 3, "renamed");
  state.set_delivered_all_seq(1000);
  state.set_read_all_seq(1000);
  *reply.mutable_conversation_update()->mutable_conversation() = state;
  h.session->OnEnvelope(reply);
  REQUIRE_FALSE(h.listener.errors.empty());
  CHECK(h.listener.errors[0].code() == Code::kUnavailable);
  REQUIRE(got.ok());
  CHECK(got->title == "renamed");
  CHECK(got->read_seq == 3);
  CHECK(got->unread == 0);
  CHECK(got->first_seq == 2);
  CHECK(got->last_seq == 3);
  CHECK(got->delivered_all_seq == 0);
  CHECK(got->read_all_seq == 0);
  REQUIRE_FALSE(h.listener.conversations.empty());
  const ConversationInfo& told = h.listener.conversations.back();
  CHECK(told.title == "renamed");
  CHECK(told.read_seq == 3);
  CHECK(told.read_all_seq == 0);
  CHECK(h.listener.statuses.empty());
}

TEST_CASE("session: a refused group operation calls back with the server's error") {
  Harness h;
  h.ConnectLive();
  Status got;
  int calls = 0;
  v1::Envelope request;
  request.mutable_rename_group()->set_conversation_id(5);
  request.mutable_rename_group()->set_title("new");
  h.session->ConversationRequest(request, [&](Result<ConversationInfo> r) {
    ++calls;
    got = r.status();
  });
  auto written = OfCase(h.io.Take(), v1::Envelope::kRenameGroup);
  REQUIRE(written.size() == 1);
  v1::Envelope error;
  error.set_rid(written[0].rid());
  error.mutable_error()->set_code(v1::Error::PERMISSION_DENIED);
  error.mutable_error()->set_message("only admins may rename");
  h.session->OnEnvelope(error);
  CHECK(calls == 1);
  CHECK(got.code() == Code::kPermissionDenied);
  CHECK(h.listener.errors.empty());
}

TEST_CASE("session: group operations and GetReceipts fail Unavailable offline and on a lost link") {
  Harness h;
  Status offline;
  v1::Envelope leave;
  leave.mutable_leave()->set_conversation_id(5);
  h.session->ConversationRequest(leave, [&](Result<ConversationInfo> r) { offline = r.status(); });
  CHECK(offline.code() == Code::kUnavailable);
  CHECK(h.io.Take().empty());

  h.ConnectLive();
  Status lost_op;
  Status lost_receipts;
  h.session->ConversationRequest(leave, [&](Result<ConversationInfo> r) { lost_op = r.status(); });
  h.session->GetReceipts(
      5, [&](Result<std::vector<MemberWatermarks>> r) { lost_receipts = r.status(); });
  CHECK(lost_op.ok());
  h.session->OnClosed(1006, "abnormal");
  CHECK(lost_op.code() == Code::kUnavailable);
  CHECK(lost_receipts.code() == Code::kUnavailable);
}

TEST_CASE("session: GetReceipts returns every member's watermarks") {
  Harness h;
  h.ConnectLive();
  Result<std::vector<MemberWatermarks>> got = Internal("not called");
  h.session->GetReceipts(5, [&](Result<std::vector<MemberWatermarks>> r) { got = std::move(r); });
  auto written = OfCase(h.io.Take(), v1::Envelope::kGetReceipts);
  REQUIRE(written.size() == 1);
  CHECK(written[0].get_receipts().conversation_id() == 5);
  v1::Envelope page;
  page.set_rid(written[0].rid());
  page.mutable_receipts_page()->set_conversation_id(5);
  v1::MemberReceipt* bob = page.mutable_receipts_page()->add_members();
  bob->set_user_id("bob");
  bob->set_delivered_seq(7);
  bob->set_read_seq(4);
  bob->set_role(v1::ROLE_ADMIN);
  h.session->OnEnvelope(page);
  REQUIRE(got.ok());
  REQUIRE(got->size() == 1);
  CHECK((*got)[0].user_id == "bob");
  CHECK((*got)[0].delivered_seq == 7);
  CHECK((*got)[0].read_seq == 4);
  CHECK((*got)[0].role == Role::kAdmin);
}

v1::Message SystemMsg(ConversationId conversation, Seq seq, v1::SystemEvent::Type type,
                      std::vector<std::string> users, const std::string& title = "") {
  v1::Message m = Msg(conversation, seq, "bob");
  m.set_kind(v1::MESSAGE_KIND_SYSTEM);
  m.clear_body();
  m.clear_content_type();
  m.mutable_system()->set_type(type);
  m.mutable_system()->set_actor("bob");
  for (auto& u : users) m.mutable_system()->add_users(u);
  m.mutable_system()->set_title(title);
  return m;
}

TEST_CASE("session: system messages update title and membership and reach the app as system") {
  Harness h;
  ConnectWithGroup(h);  // member_count 3, unread 3
  h.listener.messages.clear();
  h.Deliver(SystemMsg(5, 4, v1::SystemEvent::TYPE_RENAMED, {}, "renamed"));
  h.Deliver(SystemMsg(5, 5, v1::SystemEvent::TYPE_MEMBERS_ADDED, {"dave", "erin"}));
  h.Deliver(SystemMsg(5, 6, v1::SystemEvent::TYPE_MEMBERS_REMOVED, {"erin"}));
  ConversationRow row = *h.cache->GetConversation(5);
  CHECK(row.info.title == "renamed");
  CHECK(row.info.member_count == 4);
  CHECK(row.info.removed_at_seq == 0);
  CHECK(row.info.unread == 3);  // system messages are not unread
  REQUIRE(h.listener.messages.size() == 3);
  CHECK(h.listener.messages[0].message.kind == MessageKind::kSystem);
  CHECK(h.listener.messages[0].message.system.type == SystemEvent::Type::kRenamed);
  CHECK(h.listener.messages[0].message.system.title == "renamed");
  CHECK(h.listener.messages[1].message.system.users == std::vector<UserId>{"dave", "erin"});
  CHECK(h.listener.conversations.back().title == "renamed");

  h.Deliver(SystemMsg(5, 7, v1::SystemEvent::TYPE_MEMBERS_REMOVED, {"alice"}));
  CHECK(h.cache->GetConversation(5)->info.removed_at_seq == 7);
  CHECK(h.cache->GetConversation(5)->info.member_count == 3);
}

TEST_CASE("session: a retention change message sets the conversation's retention") {
  Harness h;
  ConnectWithGroup(h);
  v1::Message forever = SystemMsg(5, 4, v1::SystemEvent::TYPE_RETENTION_CHANGED, {});
  forever.mutable_system()->set_retention_ms(-1);
  h.Deliver(forever);
  CHECK(h.cache->GetConversation(5)->info.retention_ms == -1);
  CHECK(h.listener.conversations.back().retention_ms == -1);
  REQUIRE_FALSE(h.listener.messages.empty());
  CHECK(h.listener.messages.back().message.system.type == SystemEvent::Type::kRetentionChanged);
  CHECK(h.listener.messages.back().message.system.retention_ms == -1);
  v1::Message day = SystemMsg(5, 5, v1::SystemEvent::TYPE_RETENTION_CHANGED, {});
  day.mutable_system()->set_retention_ms(86'400'000);
  h.Deliver(day);
  CHECK(h.cache->GetConversation(5)->info.retention_ms == 86'400'000);
}

TEST_CASE("session: channel subscriptions are sent when live and again after a reconnect") {
  Harness h;
  h.session->Start();
  h.session->Subscribe(8);  // offline: remembered
  CHECK(h.io.Take().empty());
  h.ConnectLive();
  auto subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 1);
  CHECK(subs[0].subscribe().conversation_id() == 8);

  h.session->Subscribe(9);
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSubscribe).size() == 1);
  h.session->Unsubscribe(8);
  auto unsubs = OfCase(h.io.Take(), v1::Envelope::kUnsubscribe);
  REQUIRE(unsubs.size() == 1);
  CHECK(unsubs[0].unsubscribe().conversation_id() == 8);
  h.session->Unsubscribe(8);  // not subscribed: nothing sent
  CHECK(OfCase(h.io.Take(), v1::Envelope::kUnsubscribe).empty());

  h.session->OnClosed(1006, "abnormal");
  h.ConnectLive();
  subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 1);
  CHECK(subs[0].subscribe().conversation_id() == 9);
}

// Live, with channel 8 holding seq 1, reported, and not subscribed.
void ConnectWithChannel(Harness& h) {
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  v1::ConversationState* channel = batch.add_conversations();
  *channel = GroupState(8, 1, 1, "news");
  channel->set_kind(v1::CONVERSATION_KIND_CHANNEL);
  *batch.add_messages() = Msg(8, 1);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  h.io.Take();
}

TEST_CASE("session: subscribing while live syncs what the channel got while unsubscribed") {
  Harness h;
  ConnectWithChannel(h);
  h.session->Subscribe(8);
  auto subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 1);
  h.session->OnEnvelope(OkFor(subs[0]));
  // Live messages flow from the Ok on; those posted before it are fetched.
  auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  REQUIRE(syncs[0].sync().cursors_size() == 1);
  CHECK(syncs[0].sync().cursors(0).conversation_id() == 8);
  CHECK(syncs[0].sync().cursors(0).seq() == 1);
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(8, 3, 3, "news");
  batch.mutable_conversations(0)->set_kind(v1::CONVERSATION_KIND_CHANNEL);
  *batch.add_messages() = Msg(8, 2);
  *batch.add_messages() = Msg(8, 3);
  h.Reply(syncs[0], batch);
  CHECK(h.listener.SentSeqs(8) == std::vector<Seq>{1, 2, 3});
  CHECK(h.cache->GetConversation(8)->info.last_seq == 3);

  // A refused Subscribe is reported and syncs nothing.
  h.session->Subscribe(9);
  subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 1);
  v1::Envelope denied;
  denied.set_rid(subs[0].rid());
  denied.mutable_error()->set_code(v1::Error::PERMISSION_DENIED);
  denied.mutable_error()->set_message("not a member");
  h.session->OnEnvelope(denied);
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0].code() == Code::kPermissionDenied);
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
}

TEST_CASE("session: a Subscribe answered while a Sync is in flight syncs again after it") {
  Harness h;
  ConnectWithChannel(h);
  h.Deliver(Msg(5, 2));  // a conversation not known yet: a Sync goes out
  auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  h.session->Subscribe(8);
  auto subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 1);
  h.session->OnEnvelope(OkFor(subs[0]));
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());  // one at a time
  // The Sync in flight was read before the subscription: its empty reply does not end it.
  h.Reply(syncs[0], {});
  syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  h.Reply(syncs[0], {});
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
}

// The Subscribes go out after the last Sync page: a channel message posted between the server
// answering that page and registering the Subscribe came by no Deliver. Each Ok starts a Sync
// for its channel; the Oks that come while one is in flight share the next.
TEST_CASE("session: each Ok to the Subscribes sent on going live starts a catch-up Sync") {
  Harness h;
  h.session->Start();
  h.session->Subscribe(8);
  h.session->Subscribe(9);
  for (int connection = 0; connection < 2; ++connection) {
    CAPTURE(connection);
    const Seq before = static_cast<Seq>(connection) + 1;
    v1::Envelope sync = h.Welcome();
    v1::SyncBatch batch;
    v1::ConversationState* channel = batch.add_conversations();
    *channel = GroupState(8, before, 0, "news");
    channel->set_kind(v1::CONVERSATION_KIND_CHANNEL);
    *batch.add_messages() = Msg(8, before);
    h.Reply(sync, batch);
    REQUIRE(h.state() == ConnectionState::kConnected);
    auto written = h.io.Take();
    auto subs = OfCase(written, v1::Envelope::kSubscribe);
    REQUIRE(subs.size() == 2);
    REQUIRE(subs[0].subscribe().conversation_id() == 8);
    CHECK(OfCase(written, v1::Envelope::kSync).empty());
    h.session->OnEnvelope(OkFor(subs[0]));
    auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
    REQUIRE(syncs.size() == 1);  // at once: channel 9's answer is not waited for
    h.session->OnEnvelope(OkFor(subs[1]));
    CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());  // one at a time
    // Posted after the last page was read, before the subscription took effect.
    v1::SyncBatch missed;
    *missed.add_conversations() = GroupState(8, before + 1, 0, "news");
    missed.mutable_conversations(0)->set_kind(v1::CONVERSATION_KIND_CHANNEL);
    *missed.add_messages() = Msg(8, before + 1);
    h.Reply(syncs[0], missed);
    CHECK(h.cache->GetConversation(8)->cursor == before + 1);
    // The server may have read that Sync before it registered channel 9: one more for 9.
    syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
    REQUIRE(syncs.size() == 1);
    h.Reply(syncs[0], {});
    CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
    h.session->OnClosed(1006, "abnormal");
  }
  CHECK(h.listener.SentSeqs(8) == std::vector<Seq>{1, 2, 3});
  // Without subscriptions, going live costs no further Sync.
  h.session->Unsubscribe(8);
  h.session->Unsubscribe(9);
  h.ConnectLive();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSubscribe).empty());
}

// A Subscribe the server does not answer delays no other channel's catch-up. It stays pending
// until it is given up (session_timeout_test.cc) or the connection ends, and goes again on the
// next connection.
TEST_CASE("session: a Subscribe the server never answers holds back no other channel's catch-up") {
  Harness h;
  h.session->Start();
  h.session->Subscribe(8);
  h.session->Subscribe(9);
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(8, 1, 0, "news");
  batch.mutable_conversations(0)->set_kind(v1::CONVERSATION_KIND_CHANNEL);
  *batch.add_messages() = Msg(8, 1);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  auto subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 2);
  REQUIRE(subs[1].subscribe().conversation_id() == 9);
  h.session->OnEnvelope(OkFor(subs[1]));  // channel 8's is never answered
  auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  v1::SyncBatch missed;
  *missed.add_conversations() = GroupState(9, 1, 1, "sport");
  missed.mutable_conversations(0)->set_kind(v1::CONVERSATION_KIND_CHANNEL);
  *missed.add_messages() = Msg(9, 1);
  h.Reply(syncs[0], missed);
  CHECK(h.listener.SentSeqs(9) == std::vector<Seq>{1});
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
  CHECK(h.state() == ConnectionState::kConnected);

  // The next connection subscribes both again.
  h.session->OnClosed(1006, "abnormal");
  h.ConnectLive();
  subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 2);
  h.session->OnEnvelope(OkFor(subs[0]));
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).size() == 1);
}

// Live, subscribed to channel 8 (its Subscribe answered and its catch-up Sync done).
void ConnectSubscribed(Harness& h) {
  h.session->Start();
  h.session->Subscribe(8);
  h.ConnectLive();
  auto subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 1);
  h.session->OnEnvelope(OkFor(subs[0]));
  auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  h.Reply(syncs[0], {});
  REQUIRE(h.io.Take().empty());
}

// Unsubscribe(8) while live; returns the Unsubscribe sent.
v1::Envelope UnsubscribeChannel8(Harness& h) {
  h.session->Unsubscribe(8);
  auto unsubs = OfCase(h.io.Take(), v1::Envelope::kUnsubscribe);
  REQUIRE(unsubs.size() == 1);
  CHECK(unsubs[0].unsubscribe().conversation_id() == 8);
  return unsubs[0];
}

v1::Envelope RateLimited(const v1::Envelope& request, uint32_t retry_after_ms) {
  v1::Envelope e = ErrorFor(request, v1::Error::RESOURCE_EXHAUSTED, "rate limit exceeded");
  e.mutable_error()->set_retry_after_ms(retry_after_ms);
  return e;
}

// The channel is forgotten client-side already: a member removed from it (whom the server
// unsubscribed with the removal) has nothing to be told, and the connection is fine.
TEST_CASE("session: an Unsubscribe refused for good is logged only, and not sent again") {
  std::vector<std::string> lines;
  SetLogSink([&](LogLevel level, std::string_view line) {
    if (level == LogLevel::kInfo && line.find("unsubscribe") != std::string_view::npos) {
      lines.emplace_back(line);
    }
  });
  Harness h;
  ConnectSubscribed(h);
  v1::Envelope unsub = UnsubscribeChannel8(h);
  h.session->OnEnvelope(ErrorFor(unsub, v1::Error::PERMISSION_DENIED, "not a member"));
  SetLogSink(nullptr);
  CHECK(h.listener.errors.empty());
  CHECK(h.state() == ConnectionState::kConnected);
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].find("channel 8") != std::string::npos);
  CHECK(lines[0].find("not a member") != std::string::npos);
  h.clock->Advance(5'000);
  h.session->Tick();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kUnsubscribe).empty());
  h.session->OnClosed(1006, "abnormal");
  CHECK(h.session->reconnect_at_ms() - h.Now() == 15);  // the backoff's alone (kRandom % 501)
  h.ConnectLive();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSubscribe).empty());
}

// Until the server takes it, the channel is pushed to this connection: the Unsubscribe goes
// again after the server's delay, on this connection only (the next one is not subscribed).
TEST_CASE("session: an Unsubscribe refused for now goes again after the server's delay") {
  Harness h;
  ConnectSubscribed(h);
  v1::Envelope unsub = UnsubscribeChannel8(h);
  h.session->OnEnvelope(RateLimited(unsub, 2'000));
  CHECK(h.listener.errors.empty());
  CHECK(h.state() == ConnectionState::kConnected);
  CHECK(h.session->NextDeadlineMs() <= h.Now() + 2'000);
  h.clock->Advance(1'999);
  h.session->Tick();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kUnsubscribe).empty());
  h.clock->Advance(1);
  h.session->Tick();
  auto unsubs = OfCase(h.io.Take(), v1::Envelope::kUnsubscribe);
  REQUIRE(unsubs.size() == 1);
  CHECK(unsubs[0].unsubscribe().conversation_id() == 8);
  CHECK(unsubs[0].rid() != unsub.rid());

  // Answered: nothing more.
  h.session->OnEnvelope(OkFor(unsubs[0]));
  h.clock->Advance(5'000);
  h.session->Tick();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kUnsubscribe).empty());
  CHECK(h.listener.errors.empty());

  // The server's delay is not the next reconnect's.
  h.session->Subscribe(8);
  auto subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 1);
  h.session->OnEnvelope(OkFor(subs[0]));
  h.io.Take();
  unsub = UnsubscribeChannel8(h);
  h.session->OnEnvelope(RateLimited(unsub, 20'000));
  h.session->OnClosed(1006, "abnormal");
  CHECK(h.session->reconnect_at_ms() - h.Now() == 15);  // the backoff's alone (kRandom % 501)
  h.ConnectLive();
  h.clock->Advance(20'000);
  h.session->Tick();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kUnsubscribe).empty());
  CHECK(h.listener.errors.empty());
}

TEST_CASE("session: an Unsubscribe refused for now waits at least a second, and goes 5 times") {
  Harness h;
  ConnectSubscribed(h);
  v1::Envelope unsub = UnsubscribeChannel8(h);
  for (uint32_t resends = 0; resends < kMaxUnsubscribeResends; ++resends) {
    CAPTURE(resends);
    h.session->OnEnvelope(RateLimited(unsub, 0));
    h.clock->Advance(kUnsubscribeRetryMinMs - 1);
    h.session->Tick();
    CHECK(OfCase(h.io.Take(), v1::Envelope::kUnsubscribe).empty());
    h.clock->Advance(1);
    h.session->Tick();
    auto unsubs = OfCase(h.io.Take(), v1::Envelope::kUnsubscribe);
    REQUIRE(unsubs.size() == 1);
    unsub = unsubs[0];
  }
  // Then the server's pushes of the channel are taken until the connection ends.
  h.session->OnEnvelope(RateLimited(unsub, 0));
  h.clock->Advance(10'000);
  h.session->Tick();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kUnsubscribe).empty());
  CHECK(h.listener.errors.empty());
  CHECK(h.state() == ConnectionState::kConnected);
}

TEST_CASE("session: an Unsubscribe refused for now is not sent again once subscribed again") {
  Harness h;
  ConnectSubscribed(h);
  v1::Envelope unsub = UnsubscribeChannel8(h);
  h.session->OnEnvelope(RateLimited(unsub, 2'000));
  h.session->Subscribe(8);
  auto subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 1);
  h.clock->Advance(2'000);
  h.session->Tick();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kUnsubscribe).empty());

  // Unsubscribed again before the refusal of the first came: the second covers it.
  h.session->OnEnvelope(OkFor(subs[0]));
  h.io.Take();
  unsub = UnsubscribeChannel8(h);
  h.session->Subscribe(8);
  subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 1);
  v1::Envelope second = UnsubscribeChannel8(h);
  h.session->OnEnvelope(RateLimited(unsub, 1'000));
  h.clock->Advance(1'000);
  h.session->Tick();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kUnsubscribe).empty());
  h.session->OnEnvelope(RateLimited(second, 1'000));
  h.clock->Advance(1'000);
  h.session->Tick();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kUnsubscribe).size() == 1);
  CHECK(h.listener.errors.empty());
}

// The refusal proves the link alive as well as a Pong; the next Ping goes an interval later.
TEST_CASE("session: a Ping refused by the rate limit is logged only, and delays no reconnect") {
  Harness h;
  h.ConnectLive();
  h.clock->Advance(30'000);
  h.session->Tick();
  auto pings = OfCase(h.io.Take(), v1::Envelope::kPing);
  REQUIRE(pings.size() == 1);
  h.session->OnEnvelope(RateLimited(pings[0], 60'000));
  CHECK(h.listener.errors.empty());
  CHECK(h.state() == ConnectionState::kConnected);
  // Not sent again before the next interval.
  ExpectPingAfter(h, 30'000);
  h.session->OnClosed(1006, "abnormal");
  CHECK(h.session->reconnect_at_ms() - h.Now() == 15);  // the backoff's alone (kRandom % 501)
}

// An ack the cache cannot record leaves the message pending: it is not reported (the app would
// otherwise see it twice, once more on the resend's ack), and goes again after a pause.
TEST_CASE("session: an ack the cache cannot store is reported once, on the resend's ack") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  h.ConnectLive();
  h.AddOutbox("msg-a-0123456789");
  auto sends = h.io.Take();
  REQUIRE(SendIds(sends) == std::vector<std::string>{"msg-a-0123456789"});
  vfs.FailWrites(true);
  h.session->OnEnvelope(AckFor(sends[0], 1));
  vfs.FailWrites(false);
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.SentSeqs(5).empty());
  CHECK(h.cache->PendingCount() == 1);
  CHECK(SendIds(h.io.Take()).empty());  // not at once
  h.clock->Advance(kOutboxRetryMinMs);
  h.session->Tick();
  auto resent = h.io.Take();
  REQUIRE(SendIds(resent) == std::vector<std::string>{"msg-a-0123456789"});
  h.session->OnEnvelope(AckFor(resent[0], 1, /*duplicate=*/true));
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1});
  CHECK(h.cache->PendingCount() == 0);
}

// A gap the cache cannot store is not applied at all: the cached messages inside it are not
// reported, and the next Sync, which brings the gap again, reports them once.
TEST_CASE("session: a gap the cache cannot store reports nothing, and the next Sync's does") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  LiveWithGroupAtSeq1(h);
  h.Deliver(Msg(5, 3));
  auto sync = h.io.Take();
  REQUIRE(sync.size() == 1);
  REQUIRE(sync[0].has_sync());
  vfs.FailWrites(true);
  h.Reply(sync[0], GapBatch(/*last_seq=*/3, /*from=*/2, /*to=*/2));
  vfs.FailWrites(false);
  CHECK_FALSE(h.listener.errors.empty());
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1});
  REQUIRE(h.cache->GetConversation(5).has_value());
  CHECK(h.cache->GetConversation(5)->cursor == 1);
  // The link drops and comes back: the Sync from the stored cursor brings the gap again.
  h.session->OnClosed(1006, "abnormal");
  v1::Envelope again = h.Welcome();
  h.Reply(again, GapBatch(/*last_seq=*/3, /*from=*/2, /*to=*/2));
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 3});
  CHECK(h.cache->GetConversation(5)->cursor == 3);
}

// A Sync page of group 5, which holds seqs 1 to `last`, paged three at a time from `from`.
v1::SyncBatch GroupPage(Seq from, Seq last = 6) {
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(5, last, last);
  for (Seq seq = from; seq < from + 3 && seq <= last; ++seq) *batch.add_messages() = Msg(5, seq);
  batch.set_has_more(from + 3 <= last);
  return batch;
}

// A page the cache could not store moved nothing: the next Sync would name the same cursors and
// get the same page. A server answering each with has_more would otherwise be asked again at
// once, for as long as the cache fails. The client stops and goes live with what it holds; the
// next connection, a message of a conversation it has not cached, or the retry a second later
// syncs again.
TEST_CASE("session: a Sync page the cache cannot store is not asked for again at once") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  // Group 5 holds seqs 1 to 6; the server pages them three at a time.
  const auto page = [](Seq from) { return GroupPage(from); };
  v1::Envelope sync = h.Welcome();
  vfs.FailWrites(true);
  int syncs = 0;
  for (std::vector<v1::Envelope> asked{sync}; !asked.empty() && syncs < 10;
       asked = OfCase(h.io.Take(), v1::Envelope::kSync)) {
    ++syncs;
    h.Reply(asked[0], page(1));
  }
  vfs.FailWrites(false);
  CHECK(vfs.refused() > 0);
  CHECK(syncs == 1);
  REQUIRE_FALSE(h.listener.errors.empty());
  CHECK(h.listener.errors[0].code() == Code::kUnavailable);
  CHECK(h.state() == ConnectionState::kConnected);
  CHECK(h.listener.SentSeqs(5).empty());
  CHECK_FALSE(h.cache->GetConversation(5).has_value());

  // The cache works again. What syncs next:
  v1::Envelope again;
  SUBCASE("the next connection") {
    h.session->OnClosed(1006, "abnormal");
    again = h.Welcome();
  }
  SUBCASE("a live message of a conversation not cached yet") {
    h.Deliver(Msg(5, 7));
    auto asked = OfCase(h.io.Take(), v1::Envelope::kSync);
    REQUIRE(asked.size() == 1);
    again = asked[0];
  }
  SUBCASE("the retry") {
    h.clock->Advance(kSyncRetryMinMs);
    h.session->Tick();
    auto asked = OfCase(h.io.Take(), v1::Envelope::kSync);
    REQUIRE(asked.size() == 1);
    again = asked[0];
  }
  h.Reply(again, page(1));
  auto next = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(next.size() == 1);
  REQUIRE(next[0].sync().cursors_size() == 1);
  CHECK(next[0].sync().cursors(0).seq() == 3);
  h.Reply(next[0], page(4));
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
  CHECK(h.state() == ConnectionState::kConnected);
  std::vector<Seq> want{1, 2, 3, 4, 5, 6};
  if (h.cache->GetMessage(5, 7)) want.push_back(7);
  CHECK(h.listener.SentSeqs(5) == want);
  CHECK(h.cache->GetConversation(5)->cursor == want.back());
}

// A page whose gap could not be stored leaves the messages above the gap waiting behind a hole,
// and applying the page asks for a Sync to fill it. That Sync would bring the same page at once:
// it goes no more than the page's own next page does, for as long as the cache fails.
TEST_CASE("session: a Sync page whose gap the cache cannot store does not ask for itself again") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  {
    // Group 5 at cursor 1, with seq 3 received live above the hole.
    Harness h({}, std::shared_ptr<Cache>(Cache::Open(path).value()));
    LiveWithGroupAtSeq1(h);
    h.Deliver(Msg(5, 3));
    REQUIRE(OfCase(h.io.Take(), v1::Envelope::kSync).size() == 1);
    h.session->Stop();
  }
  testing::FailConversationWrites(path, 5, true);
  Harness h({}, std::shared_ptr<Cache>(Cache::Open(path).value()));
  v1::Envelope sync = h.Welcome();
  REQUIRE(sync.sync().cursors_size() == 1);
  REQUIRE(sync.sync().cursors(0).seq() == 1);
  v1::SyncBatch page = GapBatch(/*last_seq=*/3, /*from=*/2, /*to=*/2);
  *page.add_messages() = Msg(5, 3);
  int want = 1;
  SUBCASE("nothing else asks") {}
  SUBCASE("a Sync asked for before the page came still goes, once") {
    // A live message above the hole, while the Sync is in flight.
    h.Deliver(Msg(5, 4));
    CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
    want = 2;
  }
  int syncs = 0;
  for (std::vector<v1::Envelope> asked{sync}; !asked.empty() && syncs < 10;
       asked = OfCase(h.io.Take(), v1::Envelope::kSync)) {
    ++syncs;
    h.Reply(asked[0], page);
  }
  CHECK(syncs == want);
  REQUIRE_FALSE(h.listener.errors.empty());
  CHECK(h.state() == ConnectionState::kConnected);
  CHECK(h.listener.SentSeqs(5).empty());
  CHECK(h.cache->GetConversation(5)->cursor == 1);
}

// Nor is the rest of the Sync left to the next connection (a group the user was added to while
// offline may come on a later page): the client asks again after 1 s, twice as long after each
// page in a row that the cache could not store (at most a minute), and starts over once one is
// stored.
TEST_CASE("session: a Sync page the cache cannot store is asked for again after a backoff") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  // Group 5 holds seqs 1 to 6; the server pages them three at a time.
  const auto page = [](Seq from, Seq last = 6) { return GroupPage(from, last); };
  // No Sync for `ms` - 1 ms, then one; returns it.
  const auto sync_after = [&h](int64_t ms) {
    CHECK(h.session->NextDeadlineMs() <= h.Now() + ms);
    h.clock->Advance(ms - 1);
    h.session->Tick();
    CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
    h.clock->Advance(1);
    h.session->Tick();
    auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
    REQUIRE(syncs.size() == 1);
    return syncs[0];
  };
  v1::Envelope sync = h.Welcome(7, /*heartbeat_ms=*/300'000);  // the link needs no Ping meanwhile
  vfs.FailWrites(true);
  const int64_t delays[] = {kSyncRetryMinMs, 2'000,  4'000,           8'000,
                            16'000,          32'000, kSyncRetryMaxMs, kSyncRetryMaxMs};
  for (int64_t delay : delays) {
    CAPTURE(delay);
    h.Reply(sync, page(1));
    CHECK(h.state() == ConnectionState::kConnected);
    CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());  // not at once
    sync = sync_after(delay);
  }
  CHECK(h.listener.SentSeqs(5).empty());

  // The cache works again: the retry syncs everything.
  vfs.FailWrites(false);
  h.Reply(sync, page(1));
  auto next = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(next.size() == 1);
  h.Reply(next[0], page(4));
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2, 3, 4, 5, 6});
  h.clock->Advance(4 * kSyncRetryMinMs);  // past the next retry there would have been
  h.session->Tick();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());

  // A page stored starts the delays over: the next page not stored is asked for after 1 s.
  h.Deliver(Msg(5, 8));  // above a hole
  next = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(next.size() == 1);
  vfs.FailWrites(true);
  h.Reply(next[0], page(7, 8));
  sync = sync_after(kSyncRetryMinMs);
  vfs.FailWrites(false);
  h.Reply(sync, page(7, 8));
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2, 3, 4, 5, 6, 7, 8});
  CHECK(vfs.refused() > 0);
  CHECK(h.state() == ConnectionState::kConnected);
}

// A live message the cache could not store while the Sync retries were backing off is asked for
// after the longer delay then, but a page stored meanwhile starts the delays over for it too: its
// Sync goes kSyncRetryMinMs after that page, not after the delay of the pages not stored.
TEST_CASE("session: a page stored brings a retry armed during a backoff back to the first delay") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  v1::Envelope sync = h.Welcome(7, /*heartbeat_ms=*/300'000);  // the link needs no Ping meanwhile
  // Three pages in a row not stored: the next retry waits 4 s.
  vfs.FailWrites(true);
  for (int64_t delay : {kSyncRetryMinMs, 2 * kSyncRetryMinMs}) {
    h.Reply(sync, GroupPage(1));
    h.clock->Advance(delay);
    h.session->Tick();
    auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
    REQUIRE(syncs.size() == 1);
    sync = syncs[0];
  }
  h.Reply(sync, GroupPage(1));
  h.clock->Advance(4 * kSyncRetryMinMs);
  h.session->Tick();
  auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  // While that Sync is in flight, a message of group 6 comes that the cache cannot store.
  h.Deliver(Msg(6, 1));
  REQUIRE(h.listener.SentSeqs(6).empty());
  vfs.FailWrites(false);
  // The server read the Sync before the message, and had nothing new (the page is stored).
  h.Reply(syncs[0], {});
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
  CHECK(h.session->NextDeadlineMs() <= h.Now() + kSyncRetryMinMs);
  h.clock->Advance(kSyncRetryMinMs);
  h.session->Tick();
  syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(6, 1, 1);
  *batch.add_messages() = Msg(6, 1);
  h.Reply(syncs[0], batch);
  CHECK(h.listener.SentSeqs(6) == std::vector<Seq>{1});
}

// A ConversationUpdate saying a conversation holds messages past the cursor makes the client
// fetch them. When the cache cannot store that state the news is not forgotten: the client asks
// after the delay a Sync page not stored waits (kSyncRetryMinMs), as nothing else might ask before
// the next connection. Also when a Sync is in flight that the server may have read before the
// messages came.
TEST_CASE("session: a ConversationUpdate past the cursor that the cache cannot store still syncs") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  LiveWithGroupAtSeq1(h);
  h.io.Take();
  std::vector<v1::Envelope> in_flight;
  SUBCASE("no Sync in flight") {}
  SUBCASE("a Sync in flight, read by the server before the messages") {
    h.Deliver(Msg(6, 1));  // a conversation not cached yet
    in_flight = OfCase(h.io.Take(), v1::Envelope::kSync);
    REQUIRE(in_flight.size() == 1);
  }
  vfs.FailWrites(true);
  v1::Envelope update;
  *update.mutable_conversation_update()->mutable_conversation() = GroupState(5, 3, 2, "renamed");
  h.session->OnEnvelope(update);
  vfs.FailWrites(false);
  REQUIRE_FALSE(h.listener.errors.empty());
  CHECK(h.listener.errors[0].code() == Code::kUnavailable);
  REQUIRE_FALSE(h.listener.conversations.empty());
  CHECK(h.listener.conversations.back().last_seq == 3);
  CHECK(h.cache->GetConversation(5)->info.last_seq == 1);
  if (!in_flight.empty()) {
    v1::SyncBatch before;
    *before.add_conversations() = GroupState(6, 1, 1);
    *before.add_messages() = Msg(6, 1);
    h.Reply(in_flight[0], before);
    CHECK(h.listener.SentSeqs(6) == std::vector<Seq>{1});
  }
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());  // not at once: the cache just failed
  CHECK(h.session->NextDeadlineMs() <= h.Now() + kSyncRetryMinMs);
  h.clock->Advance(kSyncRetryMinMs);
  h.session->Tick();
  auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(5, 3, 2, "renamed");
  *batch.add_messages() = Msg(5, 2);
  *batch.add_messages() = Msg(5, 3);
  h.Reply(syncs[0], batch);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2, 3});
  CHECK(h.cache->GetConversation(5)->cursor == 3);
  CHECK(h.cache->GetConversation(5)->info.title == "renamed");
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
  CHECK(h.state() == ConnectionState::kConnected);
}

// What a ConversationUpdate the cache could not store told (a new title, a read on another
// device) is not taken back by the Sync page that brings its messages: the page's messages are
// stored on the old row before its state is, and the conversation is reported once, from the
// state, not first as the old row with the messages applied.
TEST_CASE(
    "session: a Sync page after a ConversationUpdate not stored does not report the old row") {
  testing::FaultVfs vfs;
  testing::TempDir dir;
  std::shared_ptr<Cache> cache(Cache::Open(dir.File("cache.db")).value());
  Harness h({}, cache);
  LiveWithGroupAtSeq1(h);
  h.io.Take();
  REQUIRE(h.cache->UnreadTotal() == 0);
  // Renamed, and bob's messages 2 and 3 read on the phone; the cache cannot store it.
  v1::ConversationState told = GroupState(5, 3, 0, "renamed");
  told.set_delivered_seq(3);
  told.set_read_seq(3);
  vfs.FailWrites(true);
  v1::Envelope update;
  *update.mutable_conversation_update()->mutable_conversation() = told;
  h.session->OnEnvelope(update);
  vfs.FailWrites(false);
  REQUIRE_FALSE(h.listener.errors.empty());
  REQUIRE_FALSE(h.listener.conversations.empty());
  CHECK(h.listener.conversations.back().title == "renamed");
  CHECK(h.listener.conversations.back().unread == 0);
  const size_t reports = h.listener.conversations.size();
  const size_t totals = h.listener.unread_totals.size();
  h.clock->Advance(kSyncRetryMinMs);
  h.session->Tick();
  auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  v1::SyncBatch batch;
  *batch.add_conversations() = told;
  *batch.add_messages() = Msg(5, 2);
  *batch.add_messages() = Msg(5, 3);
  h.Reply(syncs[0], batch);
  REQUIRE(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2, 3});
  // Reported once, as told; the total, 0 all along, is not reported again.
  REQUIRE(h.listener.conversations.size() == reports + 1);
  const ConversationInfo& info = h.listener.conversations.back();
  CHECK(info.conversation_id == 5);
  CHECK(info.title == "renamed");
  CHECK(info.unread == 0);
  CHECK(h.listener.unread_totals.size() == totals);
  CHECK(h.cache->GetConversation(5)->info.title == "renamed");
  CHECK(h.cache->UnreadTotal() == 0);
}

// A Sync page whose messages and state the cache stores reports each conversation it states
// once, from the state, not also before it as the row with the messages applied.
TEST_CASE("session: a Sync page reports each conversation it states once") {
  Harness h;
  LiveWithGroupAtSeq1(h);
  h.session->OnClosed(1006, "abnormal");
  v1::Envelope sync = h.Welcome();
  const size_t reports = h.listener.conversations.size();
  const size_t totals = h.listener.unread_totals.size();
  // bob's messages 2 and 3 and group 6's 1, with both states.
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(5, 3, 2, "renamed");
  *batch.add_conversations() = GroupState(6, 1, 1);
  *batch.add_messages() = Msg(5, 2);
  *batch.add_messages() = Msg(5, 3);
  *batch.add_messages() = Msg(6, 1);
  h.Reply(sync, batch);
  REQUIRE(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2, 3});
  REQUIRE(h.listener.SentSeqs(6) == std::vector<Seq>{1});
  REQUIRE(h.listener.conversations.size() == reports + 2);
  const ConversationInfo& five = h.listener.conversations[reports];
  CHECK(five.conversation_id == 5);
  CHECK(five.title == "renamed");
  CHECK(five.unread == 2);
  CHECK(five.last_seq == 3);
  CHECK(h.listener.conversations[reports + 1].conversation_id == 6);
  CHECK(h.listener.unread_totals.size() == totals + 1);
  CHECK(h.listener.unread_totals.back() == 3);
}

// A Sync reply with an impossible gap is refused whole, as a failed Sync: the cursor stays
// where it was (a gap to UINT64_MAX would wedge the conversation for good, since the cursor's
// next seq wraps to 0), the error says why, and the next connection syncs again.
TEST_CASE("session: a Sync gap past the last seq, inverted or above the cursor is refused") {
  struct Bad {
    Seq last_seq, from, to;
  };
  const Bad cases[] = {
      {/*last_seq=*/3, /*from=*/2, /*to=*/UINT64_MAX},           // past the conversation's last seq
      {/*last_seq=*/UINT64_MAX, /*from=*/2, /*to=*/UINT64_MAX},  // past any seq the cache holds
      {/*last_seq=*/9, /*from=*/5, /*to=*/2},                    // ends below its start
      {/*last_seq=*/9, /*from=*/4, /*to=*/8},  // leaves seqs 2 and 3 behind a hole
  };
  for (const Bad& bad : cases) {
    CAPTURE(bad.to);
    Harness h;
    LiveWithGroupAtSeq1(h);
    h.Deliver(Msg(5, 3));
    auto sync = h.io.Take();
    REQUIRE(sync.size() == 1);
    REQUIRE(sync[0].has_sync());
    v1::SyncBatch batch = GapBatch(bad.last_seq, bad.from, bad.to);
    *batch.add_messages() = Msg(5, bad.last_seq);
    h.Reply(sync[0], batch);
    REQUIRE(h.cache->GetConversation(5).has_value());
    CHECK(h.cache->GetConversation(5)->cursor == 1);
    CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1});
    REQUIRE(h.listener.errors.size() == 1);
    CHECK(h.listener.errors[0].code() == Code::kInternal);
    CHECK(h.listener.errors[0].message().find("protocol error: the server sent ") == 0);
    CHECK(h.listener.errors[0].message().find("Sync gap") != std::string::npos);
    CHECK(h.state() == ConnectionState::kDisconnected);
    // The next connection asks from the same cursor, and a good reply is applied.
    v1::Envelope again = h.Welcome();
    REQUIRE(again.sync().cursors_size() == 1);
    CHECK(again.sync().cursors(0).seq() == 1);
    h.Reply(again, GapBatch(/*last_seq=*/3, /*from=*/2, /*to=*/2));
    CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 3});
  }
}

// A gap or state for conversation 0 would make a phantom conversation 0 that Conversations()
// lists; a ConversationUpdate for it likewise.
TEST_CASE("session: a gap or conversation state for conversation 0 is refused") {
  for (int which = 0; which < 2; ++which) {
    CAPTURE(which);
    Harness h;
    v1::Envelope sync = h.Welcome();
    v1::SyncBatch batch;
    auto* conv = batch.add_conversations();
    conv->set_conversation_id(which == 0 ? 5 : 0);
    conv->set_kind(v1::CONVERSATION_KIND_GROUP);
    conv->set_last_seq(5);
    auto* gap = batch.add_gaps();
    gap->set_conversation_id(which == 0 ? 0 : 5);
    gap->set_from_seq(1);
    gap->set_to_seq(4);
    *batch.add_messages() = Msg(5, 5);
    h.Reply(sync, batch);
    CHECK(h.cache->ListConversations().empty());
    CHECK(h.listener.messages.empty());
    REQUIRE(h.listener.errors.size() == 1);
    CHECK(h.listener.errors[0].code() == Code::kInternal);
    CHECK(h.state() == ConnectionState::kDisconnected);
  }
  Harness h;
  h.ConnectLive();
  std::vector<Result<ConversationInfo>> results;
  v1::Envelope rename;
  rename.mutable_rename_group()->set_conversation_id(5);
  rename.mutable_rename_group()->set_title("t");
  h.session->ConversationRequest(
      rename, [&](Result<ConversationInfo> r) { results.push_back(std::move(r)); });
  auto written = h.io.Take();
  REQUIRE(written.size() == 1);
  v1::Envelope update;
  update.set_rid(written[0].rid());
  update.mutable_conversation_update()->mutable_conversation()->set_title("t");
  h.session->OnEnvelope(update);
  CHECK(h.cache->ListConversations().empty());
  REQUIRE(results.size() == 1);
  CHECK(results[0].status().code() == Code::kInternal);
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0] == results[0].status());
}

// The server is authoritative for last_seq: a wrong one it sent once (a bug, or a hostile
// server) gives way to its next report, and the cache answers History again. A reply the server
// read before messages that reached the client since does not take last_seq below them.
TEST_CASE("session: the server's next last_seq replaces a wrong one, never below the cache") {
  Harness h;
  ConnectWithGroup(h);
  h.io.Take();
  v1::Envelope wrong;
  *wrong.mutable_conversation_update()->mutable_conversation() = GroupState(5, 1'000'000, 0);
  h.session->OnEnvelope(wrong);
  CHECK(h.cache->GetConversation(5)->info.last_seq == 1'000'000);
  auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  v1::SyncBatch right;
  *right.add_conversations() = GroupState(5, 3, 3);
  h.Reply(syncs[0], right);
  CHECK(h.cache->GetConversation(5)->info.last_seq == 3);
  REQUIRE_FALSE(h.listener.conversations.empty());
  CHECK(h.listener.conversations.back().last_seq == 3);
  std::vector<Result<HistoryResult>> results;
  h.session->History(5, 0, 10, [&](Result<HistoryResult> r) { results.push_back(std::move(r)); });
  REQUIRE(results.size() == 1);
  REQUIRE(results[0].ok());
  CHECK(results[0]->from_cache);
  CHECK(results[0]->messages.size() == 3);
  CHECK(OfCase(h.io.Take(), v1::Envelope::kHistory).empty());

  // 4 reached the application and 6 waits above a hole when a state from before them comes.
  h.Deliver(Msg(5, 4));
  h.Deliver(Msg(5, 6));
  v1::Envelope stale;
  *stale.mutable_conversation_update()->mutable_conversation() = GroupState(5, 3, 0);
  h.session->OnEnvelope(stale);
  CHECK(h.cache->GetConversation(5)->info.last_seq == 6);
  CHECK(h.listener.conversations.back().last_seq == 6);
}

// A last seq past INT64_MAX has no place in the cache: the state is refused, not taken.
TEST_CASE("session: a conversation state with a last seq past INT64_MAX is refused") {
  constexpr Seq kPast = static_cast<Seq>(INT64_MAX) + 1;
  {
    Harness h;
    v1::Envelope sync = h.Welcome();
    v1::SyncBatch batch;
    *batch.add_conversations() = GroupState(5, kPast, 0);
    h.Reply(sync, batch);
    CHECK(h.cache->ListConversations().empty());
    REQUIRE(h.listener.errors.size() == 1);
    CHECK(h.listener.errors[0].code() == Code::kInternal);
    CHECK(h.listener.errors[0].message().find("past the largest seq") != std::string::npos);
    CHECK(h.state() == ConnectionState::kDisconnected);
  }
  Harness h;
  ConnectWithGroup(h);
  h.io.Take();
  std::vector<Result<ConversationInfo>> results;
  v1::Envelope rename;
  rename.mutable_rename_group()->set_conversation_id(5);
  rename.mutable_rename_group()->set_title("t");
  h.session->ConversationRequest(
      rename, [&](Result<ConversationInfo> r) { results.push_back(std::move(r)); });
  auto written = h.io.Take();
  REQUIRE(written.size() == 1);
  v1::Envelope update;
  update.set_rid(written[0].rid());
  *update.mutable_conversation_update()->mutable_conversation() = GroupState(5, kPast, 0, "t");
  h.session->OnEnvelope(update);
  REQUIRE(results.size() == 1);
  CHECK(results[0].status().code() == Code::kInternal);
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0] == results[0].status());
  CHECK(h.cache->GetConversation(5)->info.last_seq == 3);
  CHECK(h.cache->GetConversation(5)->info.title == "team");
  CHECK(h.state() == ConnectionState::kConnected);
}

// A History page with a message of another conversation, at seq 0, or at or above before_seq
// is refused whole: stored, such a message would take the place of the real one at its seq.
TEST_CASE("session: a History page with a message outside the range asked for is refused") {
  const v1::Message bad_messages[] = {Msg(6, 3), Msg(5, 0), Msg(5, 10), Msg(5, 12)};
  for (const v1::Message& bad : bad_messages) {
    CAPTURE(bad.conversation_id());
    CAPTURE(bad.seq());
    Harness h;
    h.ConnectLive();
    std::vector<Result<HistoryResult>> results;
    h.session->History(5, /*before_seq=*/10, 10,
                       [&](Result<HistoryResult> r) { results.push_back(std::move(r)); });
    auto written = h.io.Take();
    REQUIRE(written.size() == 1);
    REQUIRE(written[0].has_history());
    v1::Envelope page;
    page.set_rid(written[0].rid());
    page.mutable_history_page()->set_conversation_id(5);
    *page.mutable_history_page()->add_messages() = bad;
    *page.mutable_history_page()->add_messages() = Msg(5, 2);
    h.session->OnEnvelope(page);
    REQUIRE(results.size() == 1);
    CHECK(results[0].status().code() == Code::kInternal);
    REQUIRE(h.listener.errors.size() == 1);
    CHECK(h.listener.errors[0] == results[0].status());
    CHECK(h.cache->MessageCount() == 0);
    CHECK(h.state() == ConnectionState::kConnected);
  }
}

// A newest page (before_seq 0) has no upper bound but the cache's: a message past INT64_MAX is
// refused like the others. Stored, it would hold last_seq there for good (a conversation's
// last_seq is never below the messages the cache holds) and wrap the next page's bound to 0. A
// page newer than the conversation's last_seq is taken, and raises it.
TEST_CASE(
    "session: a newest History page past the largest seq is refused, and a newer one is taken") {
  Harness h;
  h.ConnectLive();
  auto history = [&](std::vector<v1::Message> messages) {
    std::vector<Result<HistoryResult>> results;
    h.session->History(5, /*before_seq=*/0, 10,
                       [&](Result<HistoryResult> r) { results.push_back(std::move(r)); });
    auto written = OfCase(h.io.Take(), v1::Envelope::kHistory);
    REQUIRE(written.size() == 1);
    v1::Envelope page;
    page.set_rid(written[0].rid());
    page.mutable_history_page()->set_conversation_id(5);
    for (const v1::Message& m : messages) *page.mutable_history_page()->add_messages() = m;
    h.session->OnEnvelope(page);
    REQUIRE(results.size() == 1);
    return results[0];
  };
  Result<HistoryResult> refused = history({Msg(5, static_cast<Seq>(INT64_MAX) + 1), Msg(5, 2)});
  CHECK(refused.status().code() == Code::kInternal);
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0] == refused.status());
  CHECK(h.cache->MessageCount() == 0);

  // The server's state is taken as it is.
  v1::Envelope update;
  *update.mutable_conversation_update()->mutable_conversation() = GroupState(5, 2, 0);
  h.session->OnEnvelope(update);
  REQUIRE(h.cache->GetConversation(5));
  CHECK(h.cache->GetConversation(5)->info.last_seq == 2);

  // A page with messages the state did not know of yet raises last_seq to them.
  Result<HistoryResult> taken = history({Msg(5, 4), Msg(5, 3)});
  REQUIRE(taken.ok());
  CHECK(taken->messages.size() == 2);
  h.session->OnEnvelope(update);
  CHECK(h.cache->GetConversation(5)->info.last_seq == 4);
  CHECK(h.listener.errors.size() == 1);
}

// An ack without a place (seq or conversation 0) cannot be stored: kept pending, the message
// would be sent again at once and acked the same way, without end.
// A delivered message with no place in the cache is reported, not dropped silently; the other
// messages are kept.
TEST_CASE("session: a delivered message at conversation 0, seq 0 or past INT64_MAX is reported") {
  Harness h;
  ConnectWithGroup(h);
  h.listener.errors.clear();
  h.listener.messages.clear();
  std::vector<v1::Message> bad = {Msg(0, 4), Msg(5, 0), Msg(5, static_cast<Seq>(INT64_MAX) + 1)};
  for (const v1::Message& m : bad) h.Deliver(m);
  REQUIRE(h.listener.errors.size() == 3);
  for (const Status& error : h.listener.errors) {
    CHECK(error.code() == Code::kInternal);
    CHECK(error.message().starts_with("protocol error: the server sent a message at conversation"));
  }
  CHECK(h.listener.messages.empty());
  h.Deliver(Msg(5, 4));
  REQUIRE(h.listener.messages.size() == 1);
  CHECK(h.listener.messages[0].message.seq == 4);
  CHECK(h.state() == ConnectionState::kConnected);
}

// Also one naming another conversation than the message was sent to, or a seq past INT64_MAX.
TEST_CASE("session: a SendAck that names no place or a wrong one fails the message, once") {
  for (int which = 0; which < 4; ++which) {
    CAPTURE(which);
    Harness h;
    h.ConnectLive();
    h.AddOutbox("msg-a-0123456789");
    h.AddOutbox("msg-b-0123456789");
    auto sends = h.io.Take();
    REQUIRE(SendIds(sends).size() == 2);
    v1::Envelope ack = AckFor(sends[0], which == 0 ? 0 : 1);
    if (which == 1) ack.mutable_send_ack()->set_conversation_id(0);
    if (which == 2) ack.mutable_send_ack()->set_conversation_id(6);
    if (which == 3) ack.mutable_send_ack()->set_seq(static_cast<Seq>(INT64_MAX) + 1);
    h.session->OnEnvelope(ack);
    CHECK(SendIds(h.io.Take()).empty());
    h.clock->Advance(kOutboxRetryMinMs);
    h.session->Tick();
    CHECK(SendIds(h.io.Take()).empty());
    REQUIRE(h.listener.errors.size() == 1);
    CHECK(h.listener.errors[0].code() == Code::kInternal);
    REQUIRE(h.listener.messages.back().status == MessageStatus::kFailed);
    CHECK(h.listener.messages.back().message.client_msg_id == "msg-a-0123456789");
    CHECK(h.listener.messages.back().reason == h.listener.errors[0]);
    CHECK(h.cache->PendingCount() == 1);
    CHECK_FALSE(h.cache->GetConversation(0).has_value());
    CHECK_FALSE(h.cache->GetConversation(6).has_value());
    // The next message is unaffected.
    h.session->OnEnvelope(AckFor(sends[1], 1));
    CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1});
  }
}

}  // namespace
}  // namespace chat::client
