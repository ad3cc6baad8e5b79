// Session: request timeouts, the connection recycled when the server serves no request, and the
// bound on requests waiting for answers, driven with a FakeClock and a fake transport.
#include <doctest/doctest.h>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "src/client/session.h"
#include "tests/unit/client/session_harness.h"

namespace chat::client {
namespace {

constexpr int64_t kTimeoutMs = 30'000;  // SessionOptions' default, as ClientOptions'

// The server answers a Ping: the link is alive, whatever the server does with requests.
void Pong(Harness& h) {
  v1::Envelope pong;
  pong.set_rid(999'000);
  pong.mutable_pong()->set_client_time_ms(h.clock->WallMs());
  h.session->OnEnvelope(pong);
}

// Lets `ms` pass on a link kept alive by Pongs (one every 10 s at most), and fires the timers.
void Pass(Harness& h, int64_t ms) {
  do {
    const int64_t step = std::min<int64_t>(ms, 10'000);
    Pong(h);
    h.clock->Advance(step);
    h.session->Tick();
    ms -= step;
  } while (ms > 0);
}

// The server answers a request sent now (a GetReceipts of conversation 77): it serves this
// connection, if not every request.
void ServeOne(Harness& h) {
  h.session->GetReceipts(77, [](Result<std::vector<MemberWatermarks>>) {});
  auto asked = OfCase(h.io.Take(), v1::Envelope::kGetReceipts);
  REQUIRE(asked.size() == 1);
  v1::Envelope page;
  page.set_rid(asked[0].rid());
  page.mutable_receipts_page()->set_conversation_id(77);
  h.session->OnEnvelope(page);
}

v1::ConversationState ChannelState(ConversationId id, Seq last_seq) {
  v1::ConversationState state = GroupState(id, last_seq, 0, "news");
  state.set_kind(v1::CONVERSATION_KIND_CHANNEL);
  return state;
}

bool Mentions(const Status& status, const std::string& text) {
  return status.message().find(text) != std::string_view::npos;
}

TEST_CASE("session: a request not answered in time is called back DeadlineExceeded, once") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  std::vector<Status> renamed;
  std::vector<Status> receipts;
  std::vector<Status> history;
  v1::Envelope rename;
  rename.mutable_rename_group()->set_conversation_id(5);
  rename.mutable_rename_group()->set_title("new");
  h.session->ConversationRequest(
      rename, [&](Result<ConversationInfo> r) { renamed.push_back(r.status()); });
  h.session->GetReceipts(
      5, [&](Result<std::vector<MemberWatermarks>> r) { receipts.push_back(r.status()); });
  h.session->History(5, 0, 10, [&](Result<HistoryResult> r) { history.push_back(r.status()); });
  auto written = h.io.Take();
  auto rename_sent = OfCase(written, v1::Envelope::kRenameGroup);
  auto receipts_sent = OfCase(written, v1::Envelope::kGetReceipts);
  auto history_sent = OfCase(written, v1::Envelope::kHistory);
  REQUIRE(rename_sent.size() == 1);
  REQUIRE(receipts_sent.size() == 1);
  REQUIRE(history_sent.size() == 1);
  CHECK(h.session->NextDeadlineMs() <= h.Now() + kTimeoutMs);
  ServeOne(h);  // the server serves the connection, not these three

  Pass(h, kTimeoutMs - 1);
  CHECK(renamed.empty());
  CHECK(receipts.empty());
  CHECK(history.empty());
  Pass(h, 1);
  REQUIRE(renamed.size() == 1);
  REQUIRE(receipts.size() == 1);
  REQUIRE(history.size() == 1);
  CHECK(renamed[0].code() == Code::kDeadlineExceeded);
  CHECK(receipts[0].code() == Code::kDeadlineExceeded);
  CHECK(history[0].code() == Code::kDeadlineExceeded);
  CHECK(Mentions(renamed[0], "30000 ms"));
  CHECK(h.state() == ConnectionState::kConnected);
  CHECK(h.io.drops == 0);
  CHECK(h.listener.errors.empty());

  // Late answers call nobody again and report nothing; a conversation's state is still taken.
  v1::Envelope update;
  update.set_rid(rename_sent[0].rid());
  *update.mutable_conversation_update()->mutable_conversation() = GroupState(5, 0, 0, "new");
  h.session->OnEnvelope(update);
  v1::Envelope page;
  page.set_rid(receipts_sent[0].rid());
  page.mutable_receipts_page()->set_conversation_id(5);
  h.session->OnEnvelope(page);
  h.session->OnEnvelope(ErrorFor(history_sent[0], v1::Error::UNAVAILABLE, "store busy"));
  Pass(h, kTimeoutMs);
  CHECK(renamed.size() == 1);
  CHECK(receipts.size() == 1);
  CHECK(history.size() == 1);
  CHECK(h.listener.errors.empty());
  REQUIRE(h.cache->GetConversation(5));
  CHECK(h.cache->GetConversation(5)->info.title == "new");
  CHECK(h.state() == ConnectionState::kConnected);
}

TEST_CASE("session: presence and push requests not answered in time get DeadlineExceeded") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  std::vector<Status> presence;
  std::vector<Status> push;
  h.session->SubscribePresence({"bob"}, [&](Status st) { presence.push_back(std::move(st)); });
  h.session->RegisterPushToken("fcm", "token-a", [&](Status st) { push.push_back(std::move(st)); });
  auto written = h.io.Take();
  auto subscribe = OfCase(written, v1::Envelope::kPresenceSubscribe);
  REQUIRE(subscribe.size() == 1);
  REQUIRE(OfCase(written, v1::Envelope::kRegisterPushToken).size() == 1);
  ServeOne(h);

  Pass(h, kTimeoutMs);
  REQUIRE(presence.size() == 1);
  REQUIRE(push.size() == 1);
  CHECK(presence[0].code() == Code::kDeadlineExceeded);
  CHECK(push[0].code() == Code::kDeadlineExceeded);
  // As after a refusal, bob is not watched: a late Ok and his updates are ignored.
  CHECK(h.session->watched().empty());
  h.session->OnEnvelope(OkFor(subscribe[0]));
  v1::Envelope update;
  update.mutable_presence_update()->set_user_id("bob");
  update.mutable_presence_update()->set_online(true);
  h.session->OnEnvelope(update);
  CHECK(h.listener.presence.empty());
  CHECK(presence.size() == 1);
  CHECK(h.listener.errors.empty());

  // The token is kept (the code is retryable) and goes with the next connection.
  h.session->OnClosed(1006, "abnormal");
  h.io.Take();
  h.ConnectLive();
  written = h.io.Take();
  auto again = OfCase(written, v1::Envelope::kRegisterPushToken);
  REQUIRE(again.size() == 1);
  CHECK(again[0].register_push_token().token() == "token-a");
  CHECK(OfCase(written, v1::Envelope::kPresenceSubscribe).empty());
  CHECK(push.size() == 1);
}

// A Subscribe the server does not answer is given up: OnError says so, and its channel is
// synced all the same. Other channels' catch-ups and other conversations' gap repairs go on
// meanwhile, and a late Ok catches the channel up once more.
TEST_CASE("session: a Subscribe given up is reported, and no conversation waits for it") {
  Harness h;
  h.session->Start();
  h.session->Subscribe(8);
  h.session->Subscribe(9);
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  *batch.add_conversations() = ChannelState(8, 1);
  *batch.add_conversations() = ChannelState(9, 1);
  *batch.add_conversations() = GroupState(5, 1, 1);
  *batch.add_messages() = Msg(8, 1);
  *batch.add_messages() = Msg(9, 1);
  *batch.add_messages() = Msg(5, 1);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  auto subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 2);
  REQUIRE(subs[0].subscribe().conversation_id() == 8);

  h.session->OnEnvelope(OkFor(subs[1]));  // channel 9's is answered, channel 8's never
  auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  v1::SyncBatch nine;
  *nine.add_conversations() = ChannelState(9, 2);
  *nine.add_messages() = Msg(9, 2);
  h.Reply(syncs[0], nine);
  CHECK(h.listener.SentSeqs(9) == std::vector<Seq>{1, 2});

  Pass(h, kTimeoutMs - 1);
  CHECK(h.listener.errors.empty());
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
  Pass(h, 1);
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0].code() == Code::kDeadlineExceeded);
  CHECK(Mentions(h.listener.errors[0], "channel 8"));
  CHECK(h.state() == ConnectionState::kConnected);
  CHECK(h.io.drops == 0);
  auto written = h.io.Take();
  CHECK(OfCase(written, v1::Envelope::kSubscribe).empty());  // not sent again on this link
  // Channel 8's catch-up does not wait any longer.
  syncs = OfCase(written, v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  v1::SyncBatch eight;
  *eight.add_conversations() = ChannelState(8, 2);
  *eight.add_messages() = Msg(8, 2);
  h.Reply(syncs[0], eight);
  CHECK(h.listener.SentSeqs(8) == std::vector<Seq>{1, 2});

  // Other conversations go on: a Deliver ahead of group 5's cursor is repaired by a Sync.
  h.Deliver(Msg(5, 3));
  syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  v1::SyncBatch five;
  *five.add_conversations() = GroupState(5, 3, 3);
  *five.add_messages() = Msg(5, 2);
  h.Reply(syncs[0], five);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2, 3});

  // The late Ok: the subscription took effect only now, so the channel is synced once more.
  h.session->OnEnvelope(OkFor(subs[0]));
  syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  v1::SyncBatch late;
  *late.add_conversations() = ChannelState(8, 3);
  *late.add_messages() = Msg(8, 3);
  h.Reply(syncs[0], late);
  CHECK(h.listener.SentSeqs(8) == std::vector<Seq>{1, 2, 3});
  CHECK(h.listener.errors.size() == 1);
  CHECK(h.state() == ConnectionState::kConnected);
}

// The reconnect rule: a request given up while the server answered other requests only tells
// its caller; one given up while the server answered none since it was sent (the link is alive,
// Pongs come, but nothing is served) also recycles the connection, like a dead link.
TEST_CASE("session: a request given up while the server served no request recycles the link") {
  Harness h;
  h.session->Start();
  h.session->Subscribe(8);
  h.ConnectLive();
  auto subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 1);
  h.session->OnEnvelope(OkFor(subs[0]));
  auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  h.Reply(syncs[0], {});
  h.io.Take();

  // One request lost by a server that serves the rest: the connection stays.
  std::vector<Status> first;
  h.session->GetReceipts(
      5, [&](Result<std::vector<MemberWatermarks>> r) { first.push_back(r.status()); });
  h.io.Take();
  Pass(h, 10'000);
  ServeOne(h);
  Pass(h, kTimeoutMs - 10'000);
  REQUIRE(first.size() == 1);
  CHECK(first[0].code() == Code::kDeadlineExceeded);
  CHECK(h.io.drops == 0);
  CHECK(h.state() == ConnectionState::kConnected);
  h.io.Take();

  // Then the server answers Pings only.
  std::vector<Status> second;
  std::vector<Status> third;
  h.session->GetReceipts(
      5, [&](Result<std::vector<MemberWatermarks>> r) { second.push_back(r.status()); });
  Pass(h, 10'000);
  h.session->GetReceipts(
      6, [&](Result<std::vector<MemberWatermarks>> r) { third.push_back(r.status()); });
  Pass(h, kTimeoutMs - 10'000);
  REQUIRE(second.size() == 1);
  CHECK(second[0].code() == Code::kDeadlineExceeded);
  CHECK(h.io.drops == 1);
  CHECK(h.state() == ConnectionState::kDisconnected);
  // The request still waiting learns that the connection is gone.
  REQUIRE(third.size() == 1);
  CHECK(third[0].code() == Code::kUnavailable);

  // The next connection (after the backoff) subscribes the channel again.
  h.io.Take();
  h.ConnectLive();
  subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 1);
  CHECK(subs[0].subscribe().conversation_id() == 8);
  CHECK(second.size() == 1);
  CHECK(third.size() == 1);
}

TEST_CASE("session: a Sync the server does not answer in time recycles the link") {
  Harness h;
  v1::Envelope sync = h.Welcome();
  REQUIRE(h.state() == ConnectionState::kSyncing);
  h.AddOutbox("queued");
  Pass(h, kTimeoutMs - 1);
  CHECK(h.state() == ConnectionState::kSyncing);
  CHECK(h.io.drops == 0);
  Pass(h, 1);
  CHECK(h.io.drops == 1);
  CHECK(h.state() == ConnectionState::kDisconnected);

  // The next connection syncs again and drains the outbox.
  h.io.Take();
  sync = h.Welcome();
  h.Reply(sync, {});
  REQUIRE(h.state() == ConnectionState::kConnected);
  CHECK(SendIds(h.io.Take()) == std::vector<std::string>{"queued"});

  // A gap repair that is never answered is given up the same way.
  h.Deliver(Msg(5, 3));
  REQUIRE(OfCase(h.io.Take(), v1::Envelope::kSync).size() == 1);
  Pass(h, kTimeoutMs);
  CHECK(h.io.drops == 2);
  CHECK(h.state() == ConnectionState::kDisconnected);
}

// A slow link: a 2 MiB Sync page takes about a minute at 256 kbit/s. While its pieces arrive,
// nothing is given up and the link is not taken for dead (no Pong gets through either); the time
// the frame took does not count against the requests waiting behind it.
TEST_CASE("session: nothing is given up while a large answer arrives in pieces") {
  Harness h;
  v1::Envelope sync = h.Welcome();
  REQUIRE(h.state() == ConnectionState::kSyncing);
  h.AddOutbox("queued");
  std::vector<Status> receipts;
  h.session->GetReceipts(
      5, [&](Result<std::vector<MemberWatermarks>> r) { receipts.push_back(r.status()); });
  h.io.Take();

  h.clock->Advance(2'000);  // the server reads the Sync and starts sending the page
  for (int i = 0; i < 16; ++i) {
    h.session->OnReceiving();
    CHECK(h.session->NextDeadlineMs() > h.Now());
    h.clock->Advance(4'000);
    h.session->Tick();
  }
  // 66 s: past the Sync's deadline and two heartbeat intervals.
  CHECK(h.io.drops == 0);
  CHECK(h.state() == ConnectionState::kSyncing);
  CHECK(receipts.empty());
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(5, 1, 1);
  *batch.add_messages() = Msg(5, 1);
  h.Reply(sync, batch);
  CHECK(h.state() == ConnectionState::kConnected);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1});
  CHECK(SendIds(h.io.Take()) == std::vector<std::string>{"queued"});

  // The GetReceipts sent before the page had 30 s of its own, not counting the 64 s the page
  // took: it is given up at 94 s, not at once.
  Pass(h, 30'000 - 2'000 - 1);
  CHECK(receipts.empty());
  Pass(h, 1);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].code() == Code::kDeadlineExceeded);
  CHECK(h.io.drops == 0);  // the page and the Sync's answer were served since it was sent
  CHECK(h.state() == ConnectionState::kConnected);
}

// A server that trickles a frame which never ends (a byte every 20 s) keeps the link alive, but
// holds nothing for good: the request is given up 8 x request_timeout_ms after it was sent, and
// the link once the frame has taken that long.
TEST_CASE("session: a frame that never ends holds requests and the link for a bounded time") {
  Harness h;
  h.ConnectLive();
  std::vector<Status> receipts;
  h.session->GetReceipts(
      5, [&](Result<std::vector<MemberWatermarks>> r) { receipts.push_back(r.status()); });
  h.io.Take();
  const int64_t sent = h.Now();
  h.clock->Advance(1'000);
  while (h.Now() < sent + 8 * kTimeoutMs - 1) {
    h.session->OnReceiving();
    h.clock->Advance(std::min<int64_t>(20'000, sent + 8 * kTimeoutMs - 1 - h.Now()));
    h.session->Tick();
  }
  CHECK(receipts.empty());
  CHECK(h.session->NextDeadlineMs() == sent + 8 * kTimeoutMs);
  h.clock->Advance(1);
  h.session->OnReceiving();
  h.session->Tick();
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].code() == Code::kDeadlineExceeded);
  CHECK(h.io.drops == 1);  // nothing was served since it was sent

  // With no request waiting, the frame itself may take as long, and no longer.
  h.io.Take();
  h.ConnectLive();
  const int64_t began = h.Now();
  while (h.Now() < began + 8 * kTimeoutMs - 1) {
    h.session->OnReceiving();
    h.clock->Advance(std::min<int64_t>(20'000, began + 8 * kTimeoutMs - 1 - h.Now()));
    h.session->Tick();
  }
  CHECK(h.io.drops == 1);
  CHECK(h.session->NextDeadlineMs() == began + 8 * kTimeoutMs);
  h.clock->Advance(1);
  h.session->Tick();
  CHECK(h.io.drops == 2);
  CHECK(h.state() == ConnectionState::kDisconnected);
}

// A slow link kept full by large Delivers: each takes 10 s to arrive, one right after another,
// so the time excused grows about as fast as the clock. A request the server lost is reported
// all the same, 8 x request_timeout_ms after it was sent; the link, which serves, is kept.
TEST_CASE("session: a request lost behind a stream of slow frames is given up at its ceiling") {
  Harness h;
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(5, 0, 0);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  std::vector<Status> receipts;
  h.session->GetReceipts(
      5, [&](Result<std::vector<MemberWatermarks>> r) { receipts.push_back(r.status()); });
  h.io.Take();
  const int64_t sent = h.Now();
  Seq seq = 0;
  while (h.Now() < sent + 8 * kTimeoutMs) {
    h.session->OnReceiving();
    h.clock->Advance(std::min<int64_t>(10'000, sent + 8 * kTimeoutMs - h.Now()));
    h.session->Tick();
    if (!receipts.empty()) break;
    h.Deliver(Msg(5, ++seq));
  }
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].code() == Code::kDeadlineExceeded);
  CHECK(h.Now() == sent + 8 * kTimeoutMs);
  CHECK(h.io.drops == 0);
  CHECK(h.state() == ConnectionState::kConnected);
  CHECK(h.listener.SentSeqs(5).size() == seq);
}

// Pieces of a frame serve nothing by themselves: the frame counts by its type once whole, and a
// Pong proves only the link alive.
TEST_CASE("session: a frame that arrived in pieces counts as served only by its type") {
  Harness h;
  h.ConnectLive();
  std::vector<Status> receipts;
  h.session->GetReceipts(
      5, [&](Result<std::vector<MemberWatermarks>> r) { receipts.push_back(r.status()); });
  h.io.Take();
  h.clock->Advance(1'000);
  h.session->OnReceiving();
  h.clock->Advance(1'000);
  h.session->OnReceiving();
  Pong(h);  // the frame was a Pong
  Pass(h, kTimeoutMs);
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].code() == Code::kDeadlineExceeded);
  CHECK(h.io.drops == 1);
  CHECK(h.state() == ConnectionState::kDisconnected);
}

// The runtime reads a bounded number of rounds per turn: stopped there, the answers may still be
// in the socket (also when the last round ended on a frame boundary, so no frame is arriving).
TEST_CASE("session: no request is given up while the runtime has input left to read") {
  Harness h;
  h.ConnectLive();
  std::vector<Status> receipts;
  h.session->GetReceipts(
      5, [&](Result<std::vector<MemberWatermarks>> r) { receipts.push_back(r.status()); });
  auto asked = OfCase(h.io.Take(), v1::Envelope::kGetReceipts);
  REQUIRE(asked.size() == 1);
  Pass(h, kTimeoutMs - 1);
  h.session->SetInputPending(true);
  Pass(h, 1);
  CHECK(receipts.empty());
  CHECK(h.session->NextDeadlineMs() > h.Now());
  // The next turn reads the answer.
  v1::Envelope page;
  page.set_rid(asked[0].rid());
  page.mutable_receipts_page()->set_conversation_id(5);
  h.session->OnEnvelope(page);
  h.session->SetInputPending(false);
  h.session->Tick();
  REQUIRE(receipts.size() == 1);
  CHECK(receipts[0].ok());

  // Input left for good is bounded like a frame that never ends.
  h.session->GetReceipts(
      5, [&](Result<std::vector<MemberWatermarks>> r) { receipts.push_back(r.status()); });
  h.session->SetInputPending(true);
  Pass(h, 8 * kTimeoutMs - 1);
  CHECK(receipts.size() == 1);
  Pass(h, 1);
  REQUIRE(receipts.size() == 2);
  CHECK(receipts[1].code() == Code::kDeadlineExceeded);
}

// A server that serves this connection but not its Sync (slow, or it lost it) is asked again
// on the same connection, with twice the time; one that serves nothing is left, and the next
// connection's Sync gets more time too. An answered Sync restores request_timeout_ms.
TEST_CASE("session: a Sync given up is asked again with more time, not in the same loop") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  h.Deliver(Msg(5, 3));  // ahead of the cursor: a Sync repairs the gap
  auto syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  ServeOne(h);
  Pass(h, kTimeoutMs);
  CHECK(h.io.drops == 0);
  CHECK(h.state() == ConnectionState::kConnected);
  auto again = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(again.size() == 1);
  CHECK(again[0].rid() != syncs[0].rid());

  // The late answer to the first is ignored (it served the connection, though); the second
  // has 60 s, the third 120 s.
  v1::SyncBatch late;
  *late.add_conversations() = GroupState(5, 3, 3);
  *late.add_messages() = Msg(5, 1);
  h.Reply(syncs[0], late);
  CHECK(h.listener.SentSeqs(5).empty());
  Pass(h, 2 * kTimeoutMs - 1);
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
  Pass(h, 1);
  CHECK(h.io.drops == 0);
  REQUIRE(OfCase(h.io.Take(), v1::Envelope::kSync).size() == 1);
  Pass(h, 4 * kTimeoutMs - 1);
  CHECK(h.io.drops == 0);
  Pass(h, 1);  // nothing served since the third was sent: the link is left
  CHECK(h.io.drops == 1);
  CHECK(h.state() == ConnectionState::kDisconnected);

  // The next connection's Sync gets 240 s (the most: 8 x request_timeout_ms).
  h.io.Take();
  v1::Envelope sync = h.Welcome();
  Pass(h, 8 * kTimeoutMs - 1);
  CHECK(h.io.drops == 1);
  CHECK(h.state() == ConnectionState::kSyncing);
  v1::SyncBatch batch;
  *batch.add_conversations() = GroupState(5, 3, 3);
  *batch.add_messages() = Msg(5, 1);
  *batch.add_messages() = Msg(5, 2);
  h.Reply(sync, batch);
  CHECK(h.state() == ConnectionState::kConnected);
  CHECK(h.listener.SentSeqs(5) == std::vector<Seq>{1, 2, 3});

  // Answered: the next Sync has request_timeout_ms again.
  h.Deliver(Msg(5, 5));
  REQUIRE(OfCase(h.io.Take(), v1::Envelope::kSync).size() == 1);
  Pass(h, kTimeoutMs);
  CHECK(h.io.drops == 2);
}

// The late answer to a Sync given up and asked again is recognised: an Error is not reported to
// OnError as an error of no request, and its retry_after_ms does not delay the next reconnect.
TEST_CASE("session: a late answer to a Sync asked again is dropped, and forgets it") {
  SessionOptions options;
  options.backoff.base_ms = 100;
  options.backoff.cap_ms = 100;
  Harness h(options);
  h.ConnectLive();
  h.io.Take();
  h.Deliver(Msg(5, 3));  // ahead of the cursor: a Sync repairs the gap
  auto first = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(first.size() == 1);
  ServeOne(h);
  Pass(h, kTimeoutMs);
  auto second = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(second.size() == 1);
  CHECK(h.session->given_up() == 1);
  const size_t errors = h.listener.errors.size();

  v1::Envelope late;
  late.set_rid(first[0].rid());
  late.mutable_error()->set_code(v1::Error::UNAVAILABLE);
  late.mutable_error()->set_message("overloaded");
  late.mutable_error()->set_retry_after_ms(200'000);
  h.session->OnEnvelope(late);
  CHECK(h.listener.errors.size() == errors);
  CHECK(h.session->given_up() == 0);
  CHECK(h.state() == ConnectionState::kConnected);
  h.session->OnClosed(1006, "abnormal");
  CHECK(h.session->reconnect_at_ms() - h.Now() <= 100);

  // A late SyncBatch is dropped the same way, and forgets its Sync.
  h.io.Take();
  h.ConnectLive();
  h.io.Take();
  h.Deliver(Msg(5, 3));
  first = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(first.size() == 1);
  ServeOne(h);
  Pass(h, 2 * kTimeoutMs);  // the Sync given up above gave this one twice the time
  REQUIRE(OfCase(h.io.Take(), v1::Envelope::kSync).size() == 1);
  CHECK(h.session->given_up() == 1);
  h.Reply(first[0], {});
  CHECK(h.session->given_up() == 0);
  CHECK(h.listener.errors.size() == errors);
}

// A server whose writer fans out Delivers (or answers other requests) while nothing answers
// Syncs: each Sync looks served, but one given up with the most time (8 x request_timeout_ms)
// drops the connection, so the client does not stay in catch-up or gap repair for good.
TEST_CASE("session: a Sync given up with the most time drops the connection, served or not") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  h.Deliver(Msg(5, 3));  // ahead of the cursor: a Sync repairs the gap
  REQUIRE(OfCase(h.io.Take(), v1::Envelope::kSync).size() == 1);
  for (int64_t factor : {1, 2, 4}) {
    ServeOne(h);
    Pass(h, factor * kTimeoutMs);
    CHECK(h.io.drops == 0);
    REQUIRE(OfCase(h.io.Take(), v1::Envelope::kSync).size() == 1);
  }
  ServeOne(h);
  Pass(h, 8 * kTimeoutMs - 1);
  CHECK(h.io.drops == 0);
  Pass(h, 1);
  CHECK(h.io.drops == 1);
  CHECK(h.state() == ConnectionState::kDisconnected);
  CHECK(OfCase(h.io.Take(), v1::Envelope::kSync).empty());
}

// An overloaded server (after a restart, its read queue deep) answers no first Sync in time:
// its clients come back ever more slowly, since a connection that never went live is no good one.
TEST_CASE(
    "session: a connection that never got through its first Sync does not reset the backoff") {
  SessionOptions options;
  options.backoff.reset_after_ms = 1'000;
  Harness h(options);
  h.Welcome();
  Pass(h, kTimeoutMs);
  CHECK(h.io.drops == 1);
  CHECK(h.session->attempt() == 1);
  h.io.Take();
  h.Welcome();
  Pass(h, 2 * kTimeoutMs);
  CHECK(h.io.drops == 2);
  CHECK(h.session->attempt() == 2);

  // A connection that went live and lasted reset_after_ms does.
  h.io.Take();
  h.ConnectLive();
  Pass(h, 2'000);
  h.session->OnClosed(1006, "abnormal");
  CHECK(h.session->attempt() == 1);
}

// reset_after_ms counts from going live: a connection whose first Sync took most of it, and that
// failed soon after, is no good one.
TEST_CASE("session: the backoff resets only after reset_after_ms live") {
  SessionOptions options;
  options.backoff.reset_after_ms = 20'000;
  Harness h(options);
  h.Welcome();
  Pass(h, kTimeoutMs);  // the first Sync is given up: attempt 1
  REQUIRE(h.io.drops == 1);
  REQUIRE(h.session->attempt() == 1);
  h.io.Take();
  v1::Envelope sync = h.Welcome();
  Pass(h, 25'000);
  h.Reply(sync, {});
  REQUIRE(h.state() == ConnectionState::kConnected);
  Pass(h, 5'000);
  h.session->OnClosed(1006, "abnormal");
  CHECK(h.session->attempt() == 2);

  h.io.Take();
  h.ConnectLive();
  Pass(h, 20'000);
  h.session->OnClosed(1006, "abnormal");
  CHECK(h.session->attempt() == 1);
}

TEST_CASE("session: past kMaxPendingRequests unanswered requests, calls get ResourceExhausted") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  std::vector<Status> answers;
  auto receipts = [&](Result<std::vector<MemberWatermarks>> r) { answers.push_back(r.status()); };
  for (size_t i = 0; i < kMaxPendingRequests; ++i) h.session->GetReceipts(5, receipts);
  auto sent = OfCase(h.io.Take(), v1::Envelope::kGetReceipts);
  REQUIRE(sent.size() == kMaxPendingRequests);
  CHECK(answers.empty());

  h.session->GetReceipts(5, receipts);
  v1::Envelope leave;
  leave.mutable_leave()->set_conversation_id(5);
  h.session->ConversationRequest(
      leave, [&](Result<ConversationInfo> r) { answers.push_back(r.status()); });
  h.session->History(6, 0, 10, [&](Result<HistoryResult> r) { answers.push_back(r.status()); });
  h.session->SubscribePresence({"bob"}, [&](Status st) { answers.push_back(std::move(st)); });
  h.session->RegisterPushToken("fcm", "t", [&](Status st) { answers.push_back(std::move(st)); });
  h.session->Subscribe(8);
  CHECK(h.io.Take().empty());
  REQUIRE(answers.size() == 5);
  for (const Status& st : answers) {
    CHECK(st.code() == Code::kResourceExhausted);
    CHECK(Mentions(st, "too many requests waiting"));
  }
  CHECK(h.session->watched().empty());
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0].code() == Code::kResourceExhausted);
  CHECK(Mentions(h.listener.errors[0], "channel 8"));

  // An answer makes room for one more.
  answers.clear();
  v1::Envelope page;
  page.set_rid(sent[0].rid());
  page.mutable_receipts_page()->set_conversation_id(5);
  h.session->OnEnvelope(page);
  h.session->GetReceipts(5, receipts);
  CHECK(OfCase(h.io.Take(), v1::Envelope::kGetReceipts).size() == 1);
  h.session->GetReceipts(5, receipts);
  CHECK(h.io.Take().empty());
  REQUIRE(answers.size() == 2);  // the answered one, and the one refused
  CHECK(answers[0].ok());
  CHECK(answers[1].code() == Code::kResourceExhausted);

  // The channel refused for now is remembered: the next connection subscribes it.
  h.session->OnClosed(1006, "abnormal");
  h.io.Take();
  h.ConnectLive();
  auto subs = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(subs.size() == 1);
  CHECK(subs[0].subscribe().conversation_id() == 8);
}

// With kMaxChannelSubscriptions channels, a reconnect sends as many Subscribes; a server slow
// to answer them must not make every call of the application ResourceExhausted meanwhile.
TEST_CASE(
    "session: the client's own requests after a reconnect leave kMaxPendingRequests to the app") {
  Harness h;
  h.session->Start();
  for (ConversationId c = 1; c <= kMaxChannelSubscriptions; ++c) h.session->Subscribe(1000 + c);
  h.ConnectLive();
  REQUIRE(OfCase(h.io.Take(), v1::Envelope::kSubscribe).size() == kMaxChannelSubscriptions);

  std::vector<Status> answers;
  auto receipts = [&](Result<std::vector<MemberWatermarks>> r) { answers.push_back(r.status()); };
  for (size_t i = 0; i < kMaxPendingRequests; ++i) h.session->GetReceipts(5, receipts);
  CHECK(OfCase(h.io.Take(), v1::Envelope::kGetReceipts).size() == kMaxPendingRequests);
  CHECK(answers.empty());
  h.session->GetReceipts(5, receipts);
  CHECK(h.io.Take().empty());
  REQUIRE(answers.size() == 1);
  CHECK(answers[0].code() == Code::kResourceExhausted);
  CHECK(h.listener.errors.empty());
}

// A SubscribePresence made offline goes with the reconnect, and the users it names that were
// watched before are left out of the automatic re-subscription. Given up, its users watched
// before are subscribed once more on their own (PresenceSubscribe is idempotent), by an automatic
// request; that one given up too is reported to OnError, and they go with the next connection.
TEST_CASE(
    "session: a SubscribePresence given up after a reconnect re-subscribes the watched users "
    "once") {
  Harness h;
  h.ConnectLive();
  std::vector<Status> first;
  h.session->SubscribePresence({"carol"}, [&](Status st) { first.push_back(std::move(st)); });
  auto sent = OfCase(h.io.Take(), v1::Envelope::kPresenceSubscribe);
  REQUIRE(sent.size() == 1);
  h.session->OnEnvelope(OkFor(sent[0]));
  REQUIRE(first.size() == 1);
  CHECK(first[0].ok());
  h.session->OnClosed(1006, "abnormal");

  std::vector<Status> second;
  h.session->SubscribePresence({"carol", "dave"},
                               [&](Status st) { second.push_back(std::move(st)); });
  h.io.Take();
  h.ConnectLive();
  sent = OfCase(h.io.Take(), v1::Envelope::kPresenceSubscribe);
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].presence_subscribe().users_size() == 2);
  ServeOne(h);
  Pass(h, kTimeoutMs);
  REQUIRE(second.size() == 1);
  CHECK(second[0].code() == Code::kDeadlineExceeded);
  sent = OfCase(h.io.Take(), v1::Envelope::kPresenceSubscribe);
  REQUIRE(sent.size() == 1);
  REQUIRE(sent[0].presence_subscribe().users_size() == 1);
  CHECK(sent[0].presence_subscribe().users(0) == "carol");
  CHECK(h.session->watched() == std::set<UserId>{"carol"});
  CHECK(h.state() == ConnectionState::kConnected);
  const size_t errors = h.listener.errors.size();
  ServeOne(h);
  Pass(h, kTimeoutMs);
  REQUIRE(h.listener.errors.size() == errors + 1);
  CHECK(h.listener.errors.back().code() == Code::kDeadlineExceeded);
  CHECK(Mentions(h.listener.errors.back(), "presence of carol"));
  CHECK(OfCase(h.io.Take(), v1::Envelope::kPresenceSubscribe).empty());
  CHECK(h.session->watched() == std::set<UserId>{"carol"});
  CHECK(h.state() == ConnectionState::kConnected);

  h.session->OnClosed(1006, "abnormal");
  h.io.Take();
  h.ConnectLive();
  sent = OfCase(h.io.Take(), v1::Envelope::kPresenceSubscribe);
  REQUIRE(sent.size() == 1);
  REQUIRE(sent[0].presence_subscribe().users_size() == 1);
  CHECK(sent[0].presence_subscribe().users(0) == "carol");
}

// Every kind of late answer, an error to a Subscribe included, is dropped without a word and
// forgets its request given up.
TEST_CASE("session: a late answer of any kind to a request given up is dropped, and forgets it") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  int callbacks = 0;
  v1::Envelope rename;
  rename.mutable_rename_group()->set_conversation_id(5);
  rename.mutable_rename_group()->set_title("new");
  h.session->ConversationRequest(rename, [&](Result<ConversationInfo>) { ++callbacks; });
  h.session->GetReceipts(5, [&](Result<std::vector<MemberWatermarks>>) { ++callbacks; });
  h.session->History(5, 0, 10, [&](Result<HistoryResult>) { ++callbacks; });
  h.session->Subscribe(8);
  auto written = h.io.Take();
  auto rename_sent = OfCase(written, v1::Envelope::kRenameGroup);
  auto receipts_sent = OfCase(written, v1::Envelope::kGetReceipts);
  auto history_sent = OfCase(written, v1::Envelope::kHistory);
  auto subscribe_sent = OfCase(written, v1::Envelope::kSubscribe);
  REQUIRE(rename_sent.size() == 1);
  REQUIRE(receipts_sent.size() == 1);
  REQUIRE(history_sent.size() == 1);
  REQUIRE(subscribe_sent.size() == 1);
  ServeOne(h);
  Pass(h, kTimeoutMs);
  CHECK(callbacks == 3);
  REQUIRE(h.listener.errors.size() == 1);  // the Subscribe's DeadlineExceeded
  CHECK(h.session->given_up() == 4);

  v1::Envelope update;
  update.set_rid(rename_sent[0].rid());
  *update.mutable_conversation_update()->mutable_conversation() = GroupState(5, 0, 0, "new");
  h.session->OnEnvelope(update);
  v1::Envelope receipts;
  receipts.set_rid(receipts_sent[0].rid());
  receipts.mutable_receipts_page()->set_conversation_id(5);
  h.session->OnEnvelope(receipts);
  v1::Envelope page;
  page.set_rid(history_sent[0].rid());
  page.mutable_history_page()->set_conversation_id(5);
  *page.mutable_history_page()->add_messages() = Msg(5, 1);
  h.session->OnEnvelope(page);
  h.session->OnEnvelope(ErrorFor(subscribe_sent[0], v1::Error::PERMISSION_DENIED, "not a member"));
  CHECK(h.session->given_up() == 0);
  CHECK(callbacks == 3);
  CHECK(h.listener.errors.size() == 1);
  CHECK(h.cache->MessageCount() == 0);  // the late page is not stored
  CHECK(h.state() == ConnectionState::kConnected);
}

// A server that stops answering for a while: the channel re-subscriptions of a reconnect and
// kMaxPendingRequests calls of the application are given up at once. Late errors to any of them,
// the oldest included, are recognised as late, not reported as errors without a request.
TEST_CASE("session: every request given up at once has its late answer recognised") {
  Harness h;
  h.session->Start();
  for (ConversationId c = 1; c <= kMaxChannelSubscriptions; ++c) h.session->Subscribe(1000 + c);
  h.ConnectLive();
  auto requests = OfCase(h.io.Take(), v1::Envelope::kSubscribe);
  REQUIRE(requests.size() == kMaxChannelSubscriptions);
  int callbacks = 0;
  for (size_t i = 0; i + 1 < kMaxPendingRequests; ++i) {
    h.session->GetReceipts(5, [&](Result<std::vector<MemberWatermarks>>) { ++callbacks; });
  }
  for (const v1::Envelope& e : OfCase(h.io.Take(), v1::Envelope::kGetReceipts)) {
    requests.push_back(e);
  }
  REQUIRE(requests.size() == kMaxChannelSubscriptions + kMaxPendingRequests - 1);
  ServeOne(h);  // the last one is answered
  Pass(h, kTimeoutMs);
  CHECK(callbacks == static_cast<int>(kMaxPendingRequests) - 1);
  CHECK(h.state() == ConnectionState::kConnected);
  const size_t errors = h.listener.errors.size();

  for (const v1::Envelope& request : requests) {
    h.session->OnEnvelope(ErrorFor(request, v1::Error::UNAVAILABLE, "overloaded"));
  }
  CHECK(h.listener.errors.size() == errors);
  CHECK(callbacks == static_cast<int>(kMaxPendingRequests) - 1);
  CHECK(h.session->given_up() == 0);
}

// The application's requests can wait for answers during the catch-up too (they are sent
// then): presence and push calls are refused then as when live, not kept for later.
TEST_CASE("session: kMaxPendingRequests applies while the client syncs, as when live") {
  Harness h;
  h.Welcome();
  REQUIRE(h.state() == ConnectionState::kSyncing);
  std::vector<Status> answers;
  auto receipts = [&](Result<std::vector<MemberWatermarks>> r) { answers.push_back(r.status()); };
  for (size_t i = 0; i < kMaxPendingRequests; ++i) h.session->GetReceipts(5, receipts);
  CHECK(OfCase(h.io.Take(), v1::Envelope::kGetReceipts).size() == kMaxPendingRequests);
  h.session->GetReceipts(5, receipts);
  h.session->SubscribePresence({"bob"}, [&](Status st) { answers.push_back(std::move(st)); });
  h.session->RegisterPushToken("fcm", "t", [&](Status st) { answers.push_back(std::move(st)); });
  REQUIRE(answers.size() == 3);
  for (const Status& st : answers) CHECK(st.code() == Code::kResourceExhausted);
  CHECK(h.session->watched().empty());
  CHECK(h.io.Take().empty());
}

// Until the session is live, UnsubscribePresence sends nothing (the server forgot the
// subscriptions with the last connection): it only edits the watched set, so it is never refused.
TEST_CASE("session: UnsubscribePresence while syncing is answered Ok at kMaxPendingRequests") {
  Harness h;
  h.ConnectLive();
  h.session->SubscribePresence({"bob", "carol"}, [](Status) {});
  auto subscribe = OfCase(h.io.Take(), v1::Envelope::kPresenceSubscribe);
  REQUIRE(subscribe.size() == 1);
  v1::Envelope ok;
  ok.set_rid(subscribe[0].rid());
  ok.mutable_ok();
  h.session->OnEnvelope(ok);
  h.session->OnClosed(1006, "abnormal");
  h.io.Take();
  h.Welcome();
  REQUIRE(h.state() == ConnectionState::kSyncing);
  for (size_t i = 0; i < kMaxPendingRequests; ++i) {
    h.session->GetReceipts(5, [](Result<std::vector<MemberWatermarks>>) {});
  }
  h.io.Take();
  std::vector<Status> answers;
  h.session->UnsubscribePresence({"carol"}, [&](Status st) { answers.push_back(std::move(st)); });
  REQUIRE(answers.size() == 1);
  CHECK(answers[0].ok());
  CHECK(h.session->watched() == std::set<UserId>{"bob"});
  CHECK(h.io.Take().empty());
}

// Requests of a lost connection were answered Unavailable with it; their old deadlines passing
// on the next connection calls nobody again, and the new connection's requests keep their own.
TEST_CASE("session: deadlines of a lost connection do not fire on the next one") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  std::vector<Status> old_answers;
  h.session->GetReceipts(
      5, [&](Result<std::vector<MemberWatermarks>> r) { old_answers.push_back(r.status()); });
  h.session->History(5, 0, 10, [&](Result<HistoryResult> r) { old_answers.push_back(r.status()); });
  h.io.Take();
  Pass(h, 10'000);
  h.session->OnClosed(1006, "abnormal");
  REQUIRE(old_answers.size() == 2);
  CHECK(old_answers[0].code() == Code::kUnavailable);
  CHECK(old_answers[1].code() == Code::kUnavailable);

  h.io.Take();
  h.ConnectLive();
  h.io.Take();
  std::vector<Status> new_answers;
  h.session->GetReceipts(
      5, [&](Result<std::vector<MemberWatermarks>> r) { new_answers.push_back(r.status()); });
  h.io.Take();
  ServeOne(h);
  Pass(h, kTimeoutMs - 1);  // well past the old deadlines
  CHECK(old_answers.size() == 2);
  CHECK(new_answers.empty());
  CHECK(h.listener.errors.empty());
  Pass(h, 1);
  REQUIRE(new_answers.size() == 1);
  CHECK(new_answers[0].code() == Code::kDeadlineExceeded);
  CHECK(old_answers.size() == 2);
  CHECK(h.state() == ConnectionState::kConnected);
}

// Stop() drops the requests waiting, with their callbacks: none runs after it, timers or not.
TEST_CASE("session: after Stop(), requests waiting are never called back") {
  Harness h;
  h.ConnectLive();
  int callbacks = 0;
  h.session->GetReceipts(5, [&](Result<std::vector<MemberWatermarks>>) { ++callbacks; });
  h.session->History(5, 0, 10, [&](Result<HistoryResult>) { ++callbacks; });
  h.session->Subscribe(8);
  h.session->Stop();
  CHECK(h.state() == ConnectionState::kClosed);
  h.clock->Advance(10 * kTimeoutMs);
  h.session->Tick();
  h.session->OnReceiving();
  h.session->Tick();
  CHECK(callbacks == 0);
  CHECK(h.listener.errors.empty());
  CHECK(h.state() == ConnectionState::kClosed);
}

// A server that answers nothing after a reconnect: the channel re-subscriptions are given up
// together, and the application hears of it once, not once per channel.
TEST_CASE("session: Subscribes given up together are reported to OnError once") {
  Harness h;
  h.session->Start();
  for (ConversationId c = 1; c <= 12; ++c) h.session->Subscribe(100 + c);
  h.ConnectLive();
  REQUIRE(OfCase(h.io.Take(), v1::Envelope::kSubscribe).size() == 12);
  Pass(h, kTimeoutMs);
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0].code() == Code::kDeadlineExceeded);
  CHECK(Mentions(h.listener.errors[0], "subscribe to 12 channels (101, 102,"));
  CHECK(Mentions(h.listener.errors[0], "110, ...)"));
  CHECK(h.io.drops == 1);  // nothing served: the link is recycled
}

}  // namespace
}  // namespace chat::client
