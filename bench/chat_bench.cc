// chat-bench: the load generator of bench/run.sh (see /work/shared/BENCH.md and
// docs/performance.md).
//
// One libwebsockets client context drives every connection of a run on one thread, so the
// generator stays cheap next to the server it measures (its own CPU time is reported too). Load is
// open-loop: a 10 ms timer (never finer, see LWS-NOTES pitfall 1) sends every message that is due
// by the schedule, whatever the replies are doing, so queueing in the server shows up in the
// percentiles. Each message body carries the CLOCK_MONOTONIC time it was queued and the sender's
// index, from which the receiver derives send->deliver latency and checks that nothing was lost,
// duplicated or reordered. Every run prints one JSON object on stdout and exits 1 if the workload
// did not complete or lost, duplicated or reordered anything.
#include <arpa/inet.h>
#include <ev.h>
#include <fcntl.h>
#include <libwebsockets.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <deque>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include <google/protobuf/arena.h>
#include <CLI/CLI.hpp>

#include "bench/bench_util.h"
#include "chat/auth.h"
#include "chat/v1/chat.pb.h"

namespace chat::bench {
namespace {

struct Options {
  std::string workload;
  std::string host = "127.0.0.1";
  int port = 0;
  std::string secret_file;
  int server_pid = 0;
  int pairs = 50;
  double rate = 5000;
  double duration_s = 10;
  std::vector<double> rates;
  double step_s = 5;
  double p99_limit_ms = 50;
  int connections = 1000;
  int conversations = 100;
  int messages = 10000;
  int per_client = 2;
  int body_bytes = 64;
  int max_connecting = 256;
  double pace_ms = 1;  // the schedule's tick on the libev loop
  double timeout_s = 120;
  double hold_s = 2;
  int round_trips = 20000;
  int syncs = 1000;      // floor: appends + fdatasync, as a small WAL commit does
  std::string sync_dir;  // floor: where the file for the fdatasync floor goes (empty: none)
  std::string label;
  bool tls = false;
  bool lws_receive = false;  // fanout, channel: keep receiving through lws (see ReadDirectly)
  // fanout
  int groups = 20;
  int members = 500;
  // fanout: every member sends a delivered Receipt for what it received, at most once per this
  // many ms (the client SDK's coalescing is 100 ms); 0: no receipts.
  int receipts_ms = 0;
  int other_conversations = 0;  // receipt-store, push-store
  // channel
  int viewers = 1000;
  int channel_members = 100000;
  int add_batch = 5000;
  // history (through the protocol)
  std::string conversations_file;
  int requests = 10000;
  int page = 50;
};

constexpr char kBenchContentType[] = "application/x-chat-bench";
// A frame from the server longer than this breaks a directly read connection (chatd's largest,
// a Sync page, is far smaller).
constexpr uint64_t kMaxDirectFrameBytes = 64ULL << 20;
// Request ids of control requests (CreateGroup, AddMembers, Subscribe, History) start here, far
// above the message indices that Send uses as rids.
constexpr uint64_t kControlRid = 1ULL << 41;
// The rid of a Sync (below kControlRid).
constexpr uint64_t kSyncRid = 1ULL << 40;
// The rid of a delivered Receipt (fanout --receipts-ms), answered by a ReceiptUpdate.
constexpr uint64_t kReceiptRid = kSyncRid + 1;

class Bench;

// Per-conversation record of what a receiver got: (seq, sender index) pairs in arrival order,
// checked at the end, and the contiguous seq used as the Sync cursor.
struct Received {
  uint64_t conversation_id = 0;
  std::vector<std::pair<uint64_t, uint32_t>> messages;
  uint64_t contiguous_seq = 0;
  // Seqs above contiguous_seq + 1, ascending and distinct. Messages arrive in order, so this
  // grows at its end; a gap that never closes (seqs of messages that are not recorded, such as
  // a group's system messages) keeps every later seq here, hence a deque and not a tree.
  std::deque<uint64_t> ahead;

  void Add(uint64_t seq, uint32_t index) {
    messages.emplace_back(seq, index);
    if (seq <= contiguous_seq) return;
    if (seq == contiguous_seq + 1) {
      ++contiguous_seq;  // the usual case: in order, nothing to remember
    } else if (ahead.empty() || seq > ahead.back()) {
      ahead.push_back(seq);
    } else {
      auto at = std::lower_bound(ahead.begin(), ahead.end(), seq);
      if (*at != seq) ahead.insert(at, seq);
    }
    while (!ahead.empty() && ahead.front() == contiguous_seq + 1) {
      ++contiguous_seq;
      ahead.pop_front();
    }
  }
};

// One client connection (one user, one device). Owned by Bench; the lws wsi points back to it
// through opaque_user_data.
struct Conn {
  int id = 0;
  std::string user;
  std::string device;
  std::string token;
  lws* wsi = nullptr;
  enum class State { kDown, kConnecting, kHello, kReady } state = State::kDown;
  bool want_up = false;
  int64_t reconnect_at_ns = 0;
  int64_t connect_start_ns = 0;
  int64_t ready_ns = 0;
  int connects = 0;
  bool hello_sent = false;
  std::deque<std::string> out;  // each frame with LWS_PRE bytes of headroom in front
  std::string rx;               // a message being reassembled from fragments
  // Receiving without lws (Bench::ReadDirectly): a watcher of our own reads the socket and the
  // frames are parsed here; `partial` holds the bytes of a frame not yet complete.
  bool direct = false;
  bool fragmented = false;  // a fragmented message has begun (rx holds its start)
  ev_io direct_io{};
  std::string partial;
  int64_t last_queued_ns = 0;  // when a frame was last queued, for the heartbeat

  // Sender side: messages go to `target` (a Conn id, -1 for none) as direct messages, or when
  // `conversation` is set, into that group or channel, whose receivers under test are
  // `audience` (Conn ids).
  int target = -1;
  uint64_t conversation = 0;
  std::vector<int> audience;
  uint32_t next_index = 0;
  std::unordered_map<uint32_t, int64_t> unacked;  // index -> queue time
  std::vector<uint32_t> acked_indices;

  // Receiver side, keyed by sender user id; the last sender's record is remembered (most
  // connections hear from one sender), and a node's address never changes.
  std::unordered_map<std::string, Received> received;
  // Conversation -> highest seq in the pages of the Sync under way (system messages included,
  // which `received` does not record), so the next page starts after the last one. Cleared
  // when the Sync completes or the connection goes down.
  std::unordered_map<uint64_t, uint64_t> sync_seen;
  const std::string* last_sender = nullptr;
  Received* last_record = nullptr;
  bool syncing = false;
  bool synced = false;
  bool resync_pending = false;  // listed in Bench::resync_ after an error answered its Sync
  int sync_pages = 0;

  // Replies to control requests (Ok, ConversationUpdate, Error with a rid): how many came, and
  // the conversation of the last ConversationUpdate.
  int64_t replies = 0;
  uint64_t reply_conversation = 0;

  // Delivered receipts (fanout --receipts-ms): the conversation of the last Deliver, the highest
  // seq delivered in it, the seq last reported and when.
  uint64_t receipt_conversation = 0;
  uint64_t receipt_due_seq = 0;
  uint64_t receipt_sent_seq = 0;
  int64_t receipt_sent_ns = 0;
  bool receipt_listed = false;  // in Bench::receipts_due_
};

struct Counters {
  int64_t sent = 0;
  int64_t acked = 0;
  int64_t delivered = 0;
  int64_t synced_messages = 0;
  int64_t errors = 0;
  int64_t duplicate_acks = 0;
  int64_t connect_failures = 0;
  int64_t closes = 0;
  int64_t receipts_sent = 0;
  int64_t receipt_replies = 0;  // ReceiptUpdates answering this process's own Receipts
  int64_t receipt_updates = 0;  // ReceiptUpdates about others (or another device), rid 0
  std::map<std::string, int64_t> error_codes;
  std::map<int, int64_t> close_codes;
};

class Bench {
 public:
  explicit Bench(Options options) : options_(std::move(options)) {}

  bool Init(std::string* error) {
    std::ifstream in(options_.secret_file);
    std::stringstream content;
    content << in.rdbuf();
    secret_ = content.str();
    while (!secret_.empty() && std::isspace(static_cast<unsigned char>(secret_.back()))) {
      secret_.pop_back();
    }
    if (secret_.size() < 32) {
      *error = "cannot read a secret of >= 32 bytes from --secret-file " + options_.secret_file;
      return false;
    }
    // Up to 10,000 connections need as many descriptors; raise the soft limit to the hard one.
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
      limit.rlim_cur = limit.rlim_max;
      setrlimit(RLIMIT_NOFILE, &limit);
    }
    lws_set_log_level(LLL_ERR, nullptr);
    protocols_[0] = {"chat.v1", &Bench::Callback, 0, 1 << 16, 0, nullptr, 0};
    protocols_[1] = {nullptr, nullptr, 0, 0, 0, nullptr, 0};
    lws_context_creation_info info{};
    info.port = CONTEXT_PORT_NO_LISTEN;
    info.protocols = protocols_;
    info.user = this;
    info.fd_limit_per_thread = static_cast<unsigned int>(limit.rlim_cur);
    info.pt_serv_buf_size = 64 * 1024;
    if (options_.tls) info.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
    // The libev (epoll) loop, as chatd runs: lws's own poll(2) loop scans every descriptor on
    // every wake-up, which with thousands of connections made the generator the bottleneck.
    loop_ = ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
    if (loop_ != nullptr) {
      ev_set_userdata(loop_, this);
      void* foreign_loops[1] = {loop_};
      info.options |= LWS_SERVER_OPTION_LIBEV;
      info.foreign_loops = foreign_loops;
      context_ = lws_create_context(&info);
      info.options &= ~static_cast<uint64_t>(LWS_SERVER_OPTION_LIBEV);
      info.foreign_loops = nullptr;
      if (context_ == nullptr) {
        ev_loop_destroy(loop_);
        loop_ = nullptr;
      }
    }
    if (context_ == nullptr) {
      std::fprintf(stderr, "chat-bench: the libev event loop is unavailable; using poll(2)\n");
      context_ = lws_create_context(&info);
    }
    if (context_ == nullptr) {
      *error = "lws_create_context failed";
      return false;
    }
    start_ns_ = NowNs();
    cpu_start_ = CpuSecondsSelf();
    return true;
  }

  ~Bench() {
    if (context_ != nullptr) {
      lws_sul_cancel(&tick_.sul);
      lws_context_destroy(context_);
    }
    if (loop_ != nullptr) ev_loop_destroy(loop_);
  }

  Conn& AddConn(const std::string& user) {
    auto conn = std::make_unique<Conn>();
    conn->id = static_cast<int>(conns_.size());
    conn->user = user;
    conn->device = "bench";
    auto token = SignJwt(secret_, "", user, WallMs(), 24LL * 3600 * 1000);
    if (token.ok()) conn->token = *token;
    conns_.push_back(std::move(conn));
    return *conns_.back();
  }

  // Asks for the connection to be up; Bench connects it (paced by max_connecting) and
  // reconnects it after a refusal or drop while want_up stays set.
  void Up(Conn& conn, int64_t at_ns = 0) {
    conn.want_up = true;
    conn.reconnect_at_ns = at_ns;
  }

  // Drops the connection from the client side without a close handshake (as a lost network).
  void Drop(Conn& conn) {
    conn.want_up = false;
    if (conn.wsi != nullptr) {
      lws_set_timeout(conn.wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
    }
  }

  void Queue(Conn& conn, const v1::Envelope& envelope) {
    std::string frame(LWS_PRE, '\0');
    envelope.AppendToString(&frame);
    conn.out.push_back(std::move(frame));
    conn.last_queued_ns = NowNs();
    if (conn.wsi != nullptr) lws_callback_on_writable(conn.wsi);
  }

  // Queues the next message from `conn` to its target, stamped now.
  void SendNext(Conn& conn) { SendIndex(conn, conn.next_index++, NowNs()); }

  void SendIndex(Conn& conn, uint32_t index, int64_t stamp_ns) {
    v1::Envelope envelope;
    envelope.set_rid(static_cast<uint64_t>(index) + 1);
    v1::Send* send = envelope.mutable_send();
    if (conn.conversation != 0) {
      send->set_conversation_id(conn.conversation);
    } else {
      send->set_peer(conns_[static_cast<size_t>(conn.target)]->user);
    }
    char id[64];
    // Time-prefixed like the client SDK's ids (the send's monotonic stamp, so a resend
    // repeats it).
    std::snprintf(id, sizeof id, "%012llx-%s-%010u-bench",
                  static_cast<unsigned long long>(stamp_ns / 1'000'000), conn.user.c_str(), index);
    send->set_client_msg_id(id);
    send->set_content_type(kBenchContentType);
    std::string body(static_cast<size_t>(std::max(options_.body_bytes, 12)), 'x');
    std::memcpy(body.data(), &stamp_ns, sizeof stamp_ns);
    std::memcpy(body.data() + 8, &index, sizeof index);
    send->set_body(std::move(body));
    conn.unacked[index] = stamp_ns;
    ++counters_.sent;
    Queue(conn, envelope);
  }

  void SendSync(Conn& conn) {
    v1::Envelope envelope;
    envelope.set_rid(kSyncRid);
    v1::Sync* sync = envelope.mutable_sync();
    sync->set_limit(500);
    for (const auto& [sender, record] : conn.received) {
      if (record.conversation_id == 0) continue;
      v1::Cursor* cursor = sync->add_cursors();
      cursor->set_conversation_id(record.conversation_id);
      cursor->set_seq(record.contiguous_seq);
    }
    // The server takes the highest cursor given for a conversation.
    for (const auto& [conversation_id, seq] : conn.sync_seen) {
      v1::Cursor* cursor = sync->add_cursors();
      cursor->set_conversation_id(conversation_id);
      cursor->set_seq(seq);
    }
    conn.syncing = true;
    conn.synced = false;
    Queue(conn, envelope);
  }

  // Runs the loop until `done` returns true or the timeout passes; `tick` runs every
  // millisecond on the libev loop (every 10 ms on lws's poll loop, see OnTick).
  template <typename Done, typename Tick>
  bool RunUntil(double timeout_s, Done done, Tick tick) {
    int64_t deadline = NowNs() + static_cast<int64_t>(timeout_s * 1e9);
    tick_fn_ = [&, tick]() mutable { tick(); };
    ScheduleTick();
    if (loop_ != nullptr) {
      const double pace_s = options_.pace_ms / 1000;
      ev_timer_init(&pace_timer_, &Bench::OnPace, pace_s, pace_s);
      pace_timer_.data = this;
      ev_timer_start(loop_, &pace_timer_);
    }
    bool ok = false;
    int64_t checked = 0;
    while (true) {
      // done() may be costly (the storm verifies every conversation): at most once per ms.
      int64_t now = NowNs();
      if (now - checked >= 1'000'000) {
        checked = now;
        if (done()) {
          ok = true;
          break;
        }
        if (now > deadline) break;
      }
      if (loop_ != nullptr) {
        ev_run(loop_, EVRUN_ONCE);
      } else {
        lws_service(context_, 0);
      }
    }
    lws_sul_cancel(&tick_.sul);
    if (loop_ != nullptr) ev_timer_stop(loop_, &pace_timer_);
    tick_fn_ = nullptr;
    return ok;
  }

  bool RunFor(double seconds) {
    int64_t until = NowNs() + static_cast<int64_t>(seconds * 1e9);
    return RunUntil(
        seconds + 1, [until] { return NowNs() >= until; }, [] {});
  }

  bool AllReady(const std::vector<Conn*>& conns) const {
    return std::all_of(conns.begin(), conns.end(),
                       [](const Conn* c) { return c->state == Conn::State::kReady; });
  }
  bool AllDown(const std::vector<Conn*>& conns) const {
    return std::all_of(conns.begin(), conns.end(),
                       [](const Conn* c) { return c->state == Conn::State::kDown; });
  }

  // Every sent message acked and every acked one received by its target.
  bool Settled(const std::vector<Conn*>& senders) const {
    for (const Conn* sender : senders) {
      if (!sender->unacked.empty()) return false;
    }
    return counters_.delivered + counters_.synced_messages >= ExpectedReceipts(senders);
  }
  int64_t ExpectedReceipts(const std::vector<Conn*>& senders) const {
    int64_t total = 0;
    for (const Conn* sender : senders) {
      total += static_cast<int64_t>(sender->acked_indices.size()) *
               static_cast<int64_t>(std::max<size_t>(1, sender->audience.size()));
    }
    return total;
  }

  struct Check {
    int64_t expected = 0;
    int64_t lost = 0;
    int64_t duplicated = 0;
    int64_t reordered = 0;
  };

  // Compares what each sender had acked with what its target (or each of its audience) holds.
  // Duplicated: one sender index stored under two seqs (an idempotency failure). Reordered:
  // ascending seq does not give ascending sender index. Lost: an acked index the target never
  // received.
  Check Verify(const std::vector<Conn*>& senders) const {
    Check check;
    for (const Conn* sender : senders) {
      std::vector<int> receivers = sender->audience;
      if (receivers.empty() && sender->target >= 0) receivers.push_back(sender->target);
      for (int receiver : receivers)
        VerifyOne(*sender, *conns_[static_cast<size_t>(receiver)], &check);
    }
    return check;
  }

  // One receiver's record of one sender's messages against what the sender had acked.
  static void VerifyOne(const Conn& sender, const Conn& target, Check* check) {
    check->expected += static_cast<int64_t>(sender.acked_indices.size());
    auto it = target.received.find(sender.user);
    std::vector<std::pair<uint64_t, uint32_t>> got;
    if (it != target.received.end()) got = it->second.messages;
    std::sort(got.begin(), got.end());
    got.erase(std::unique(got.begin(), got.end()), got.end());
    std::unordered_map<uint32_t, uint64_t> seq_of;
    int64_t last_index = -1;
    for (const auto& [seq, index] : got) {
      if (!seq_of.emplace(index, seq).second) ++check->duplicated;
      if (static_cast<int64_t>(index) <= last_index) ++check->reordered;
      last_index = std::max<int64_t>(last_index, index);
    }
    for (uint32_t index : sender.acked_indices) {
      if (seq_of.find(index) == seq_of.end()) ++check->lost;
    }
  }

  // The standard tail of every result: generator CPU, counters, errors.
  void AddCommon(JsonObject& json) const {
    json.Add("generator_cpu_s", CpuSecondsSelf() - cpu_start_);
    json.Add("generator_wall_s", static_cast<double>(NowNs() - start_ns_) / 1e9);
    json.Add("sent", counters_.sent);
    json.Add("acked", counters_.acked);
    json.Add("delivered", counters_.delivered);
    json.Add("synced_messages", counters_.synced_messages);
    json.Add("send_errors", counters_.errors);
    json.Add("connect_failures", counters_.connect_failures);
    json.Add("closes", counters_.closes);
    JsonObject codes;
    for (const auto& [code, n] : counters_.error_codes) codes.Add(code, n);
    json.Raw("error_codes", codes.str());
    JsonObject closes;
    for (const auto& [code, n] : counters_.close_codes) closes.Add(std::to_string(code), n);
    json.Raw("close_codes", closes.str());
  }

  const Options& options() const { return options_; }
  Counters& counters() { return counters_; }
  Histogram& ack_latency() { return ack_latency_; }
  Histogram& deliver_latency() { return deliver_latency_; }
  std::vector<std::unique_ptr<Conn>>& conns() { return conns_; }
  std::function<void(Conn&)> on_ready;
  // Called with every HistoryPage, and every Error answering a control request.
  std::function<void(Conn&, const v1::Envelope&)> on_history;

 private:
  void ScheduleTick() {
    tick_.owner = this;
    lws_sul_schedule(context_, 0, &tick_.sul, &Bench::OnTick, 10 * LWS_US_PER_MS);
  }

  static void OnTick(lws_sorted_usec_list_t* sul) {
    // The sul is the first member of the standard-layout TickTimer.
    Bench* self = reinterpret_cast<TickTimer*>(sul)->owner;
    self->ConnectDue();
    self->ResyncDue();
    self->SendReceiptsDue();
    self->Heartbeat();
    // On lws's poll loop a timer finer than 10 ms busy-spins (LWS-NOTES pitfall 1).
    if (self->loop_ == nullptr && self->tick_fn_) self->tick_fn_();
    self->ScheduleTick();
  }

  // The schedule's tick on the libev loop: a message waits at most 1 ms in the generator, and
  // a rate arrives as small bursts rather than one burst of 10 ms worth of messages.
  static void OnPace(struct ev_loop* /*loop*/, ev_timer* timer, int /*revents*/) {
    auto* self = static_cast<Bench*>(timer->data);
    if (self->tick_fn_) self->tick_fn_();
  }

  // A message delivered or acknowledged makes a Receipt due on its connection (one
  // conversation per member in fanout: one of another conversation replaces the one reported).
  void NoteDelivered(Conn& conn, uint64_t conversation_id, uint64_t seq) {
    if (conn.receipt_conversation != conversation_id) {
      conn.receipt_conversation = conversation_id;
      conn.receipt_sent_seq = 0;
      conn.receipt_due_seq = 0;
    }
    conn.receipt_due_seq = std::max(conn.receipt_due_seq, seq);
    if (!conn.receipt_listed) {
      conn.receipt_listed = true;
      receipts_due_.push_back(&conn);
    }
  }

  // Like the client SDK: what arrived is reported with one Receipt per conversation, at most
  // once per --receipts-ms (the SDK: 100 ms, and 1,000 ms for one that moves only the delivered
  // watermark in a group of more than 32 members). Checked every 10 ms.
  void SendReceiptsDue() {
    if (receipts_due_.empty()) return;
    const int64_t now = NowNs();
    const int64_t interval = static_cast<int64_t>(options_.receipts_ms) * 1'000'000;
    std::erase_if(receipts_due_, [&](Conn* conn) {
      if (conn->state != Conn::State::kReady || conn->receipt_due_seq <= conn->receipt_sent_seq) {
        conn->receipt_listed = false;
        return true;
      }
      if (now - conn->receipt_sent_ns < interval) return false;
      v1::Envelope receipt;
      receipt.set_rid(kReceiptRid);
      receipt.mutable_receipt()->set_conversation_id(conn->receipt_conversation);
      receipt.mutable_receipt()->set_delivered_seq(conn->receipt_due_seq);
      Queue(*conn, receipt);
      conn->receipt_sent_seq = conn->receipt_due_seq;
      conn->receipt_sent_ns = now;
      conn->receipt_listed = false;
      ++counters_.receipts_sent;
      return true;
    });
  }

  // A Sync answered with an error (the server overloaded, UNAVAILABLE with retry_after_ms) is
  // sent again once the retry time has passed, as a client would; a connection that went down
  // meanwhile syncs when it is back anyway.
  void ResyncDue() {
    if (resync_.empty()) return;
    const int64_t now = NowNs();
    std::erase_if(resync_, [&](const std::pair<int64_t, Conn*>& due) {
      if (due.first > now) return false;
      Conn& conn = *due.second;
      conn.resync_pending = false;
      if (conn.state == Conn::State::kReady && conn.syncing) SendSync(conn);
      return true;
    });
  }

  // Like a real client, pings every connection that has sent nothing for kPingAfterNs plus its
  // own offset (0 to kPingSpreadNs by its id), so the server's idle timeout (90 s for chatd) does
  // not close connections that wait through a long setup phase. The offsets keep the thousands
  // of connections made together from all pinging in the same instant, which would put a burst
  // of work into whichever step is running then. Checked every 100 ms.
  void Heartbeat() {
    constexpr int64_t kPingAfterNs = 20'000'000'000;
    constexpr int64_t kPingSpreadNs = 10'000'000'000;
    constexpr int kBuckets = 100;
    int64_t now = NowNs();
    if (now - last_heartbeat_ns_ < kPingSpreadNs / kBuckets) return;
    last_heartbeat_ns_ = now;
    for (auto& owned : conns_) {
      Conn& conn = *owned;
      const int64_t silent_for = kPingAfterNs + (conn.id % kBuckets) * (kPingSpreadNs / kBuckets);
      if (conn.state != Conn::State::kReady || now - conn.last_queued_ns < silent_for) continue;
      v1::Envelope ping;
      ping.mutable_ping()->set_client_time_ms(WallMs());
      Queue(conn, ping);
    }
  }

  void ConnectDue() {
    int64_t now = NowNs();
    for (auto& owned : conns_) {
      if (connecting_ >= options_.max_connecting) break;
      Conn& conn = *owned;
      if (!conn.want_up || conn.state != Conn::State::kDown || conn.reconnect_at_ns > now) {
        continue;
      }
      Connect(conn);
    }
  }

  void Connect(Conn& conn) {
    conn.state = Conn::State::kConnecting;
    conn.connect_start_ns = NowNs();
    conn.rx.clear();
    ++conn.connects;
    ++connecting_;
    lws_client_connect_info info{};
    info.context = context_;
    info.address = options_.host.c_str();
    info.port = options_.port;
    info.path = "/";
    info.host = options_.host.c_str();
    info.origin = options_.host.c_str();
    info.protocol = "chat.v1";
    info.ietf_version_or_minus_one = -1;
    info.opaque_user_data = &conn;
    info.pwsi = &conn.wsi;
    // No lws validity pings (the generator sends its own Ping after 20 s of silence): lws
    // re-arms a validity timer on every frame by a sorted insert into one list of all
    // connections' timers, which with thousands of connections was most of the generator's CPU.
    static const lws_retry_bo_t kNoValidityChecks = {};
    info.retry_and_idle_policy = &kNoValidityChecks;
    // wss against chatd's self-signed test certificate: encrypted, not authenticated.
    if (options_.tls) {
      info.ssl_connection =
          LCCSCF_USE_SSL | LCCSCF_ALLOW_SELFSIGNED | LCCSCF_SKIP_SERVER_CERT_HOSTNAME_CHECK;
    }
    lws_client_connect_via_info(&info);
  }

  void OnDown(Conn& conn, bool failed) {
    if (conn.state == Conn::State::kConnecting || conn.state == Conn::State::kHello) {
      --connecting_;
    }
    if (failed) ++counters_.connect_failures;
    EndDirect(conn, false);
    conn.state = Conn::State::kDown;
    conn.wsi = nullptr;
    conn.out.clear();
    conn.syncing = false;
    conn.sync_seen.clear();
    if (conn.want_up && conn.reconnect_at_ns <= NowNs()) {
      conn.reconnect_at_ns = NowNs() + 200'000'000 + (conn.id % 100) * 5'000'000;
    }
  }

  void OnWelcome(Conn& conn) {
    conn.state = Conn::State::kReady;
    conn.ready_ns = NowNs();
    conn.last_queued_ns = conn.ready_ns;
    --connecting_;
    // Unacked messages of an earlier connection are resent with their client_msg_id, as a
    // client's outbox would; the server answers duplicates with the original seq.
    std::vector<uint32_t> pending;
    for (const auto& [index, stamp] : conn.unacked) pending.push_back(index);
    std::sort(pending.begin(), pending.end());
    for (uint32_t index : pending) {
      --counters_.sent;
      SendIndex(conn, index, conn.unacked[index]);
    }
    // A connection the server closed (slow consumer, overload) catches up like a real client.
    if (on_ready) {
      on_ready(conn);
    } else if (conn.connects > 1) {
      SendSync(conn);
    }
    if (!conn.out.empty() && conn.wsi != nullptr) lws_callback_on_writable(conn.wsi);
  }

  void OnMessage(Conn& conn, const v1::Message& message) {
    if (message.body().size() < 12) return;
    int64_t stamp = 0;
    uint32_t index = 0;
    std::memcpy(&stamp, message.body().data(), sizeof stamp);
    std::memcpy(&index, message.body().data() + 8, sizeof index);
    if (conn.last_record == nullptr || *conn.last_sender != message.sender()) {
      auto it = conn.received.try_emplace(message.sender()).first;
      conn.last_sender = &it->first;
      conn.last_record = &it->second;
    }
    Received& record = *conn.last_record;
    record.conversation_id = message.conversation_id();
    record.Add(message.seq(), index);
  }

  void OnEnvelope(Conn& conn, const v1::Envelope& envelope) {
    switch (envelope.body_case()) {
      case v1::Envelope::kBatch:
        for (const v1::Envelope& inner : envelope.batch().envelopes()) OnEnvelope(conn, inner);
        break;
      case v1::Envelope::kWelcome:
        OnWelcome(conn);
        break;
      case v1::Envelope::kSendAck: {
        auto index = static_cast<uint32_t>(envelope.rid() - 1);
        auto it = conn.unacked.find(index);
        if (it == conn.unacked.end()) {
          ++counters_.duplicate_acks;
          break;
        }
        ack_latency_.Record(NowNs() - it->second);
        // The client SDK takes its own message as read, and says so in its next Receipt.
        if (options_.receipts_ms > 0) {
          NoteDelivered(conn, envelope.send_ack().conversation_id(), envelope.send_ack().seq());
        }
        conn.unacked.erase(it);
        conn.acked_indices.push_back(index);
        ++counters_.acked;
        break;
      }
      case v1::Envelope::kDeliver: {
        const v1::Message& message = envelope.deliver().message();
        if (options_.receipts_ms > 0 && message.sender() != conn.user) {
          NoteDelivered(conn, message.conversation_id(), message.seq());
        }
        // System messages (group changes) and a sender's own messages are not deliveries under
        // test.
        if (message.content_type() != kBenchContentType || message.sender() == conn.user) break;
        if (message.body().size() >= 8) {
          int64_t stamp = 0;
          std::memcpy(&stamp, message.body().data(), sizeof stamp);
          deliver_latency_.Record(NowNs() - stamp);
        }
        ++counters_.delivered;
        OnMessage(conn, message);
        break;
      }
      case v1::Envelope::kSyncBatch: {
        const v1::SyncBatch& batch = envelope.sync_batch();
        for (const v1::ConversationState& state : batch.conversations()) {
          if (!state.peer().empty())
            conn.received[state.peer()].conversation_id = state.conversation_id();
        }
        for (const v1::Message& message : batch.messages()) {
          OnMessage(conn, message);
          ++counters_.synced_messages;
          uint64_t& seen = conn.sync_seen[message.conversation_id()];
          seen = std::max(seen, message.seq());
        }
        ++conn.sync_pages;
        if (batch.has_more()) {
          SendSync(conn);
        } else {
          conn.syncing = false;
          conn.synced = true;
          conn.sync_seen.clear();
        }
        break;
      }
      case v1::Envelope::kOk:
        if (envelope.rid() != 0) ++conn.replies;
        break;
      case v1::Envelope::kReceiptUpdate:
        ++(envelope.rid() == kReceiptRid ? counters_.receipt_replies : counters_.receipt_updates);
        break;
      case v1::Envelope::kConversationUpdate:
        if (envelope.rid() != 0) {
          conn.reply_conversation = envelope.conversation_update().conversation().conversation_id();
          ++conn.replies;
        }
        break;
      case v1::Envelope::kHistoryPage:
        if (on_history) on_history(conn, envelope);
        break;
      case v1::Envelope::kError: {
        const v1::Error& error = envelope.error();
        ++counters_.error_codes[v1::Error::Code_Name(error.code())];
        if (envelope.rid() >= kControlRid) {
          ++conn.replies;
          if (on_history) on_history(conn, envelope);
        }
        if (!error.client_msg_id().empty() && envelope.rid() != 0) {
          // The message was refused and is not stored: it will not be delivered.
          conn.unacked.erase(static_cast<uint32_t>(envelope.rid() - 1));
          ++counters_.errors;
        }
        if (error.retry_after_ms() > 0) {
          conn.reconnect_at_ns = NowNs() + static_cast<int64_t>(error.retry_after_ms()) * 1'000'000;
        }
        if (envelope.rid() == kSyncRid && conn.syncing && !conn.resync_pending) {
          conn.resync_pending = true;
          const int64_t wait_ms = std::max<int64_t>(100, error.retry_after_ms());
          resync_.emplace_back(NowNs() + wait_ms * 1'000'000, &conn);
        }
        break;
      }
      default:
        break;
    }
  }

  // One whole WebSocket message from the server.
  void OnFrame(Conn& conn, const void* data, size_t len) {
    // Parsed into an arena on a block of this object, so a delivery's messages and strings
    // cost no allocation each (the generator must stay cheaper than the server).
    google::protobuf::ArenaOptions arena_options;
    arena_options.initial_block = parse_block_.data();
    arena_options.initial_block_size = parse_block_.size();
    google::protobuf::Arena arena(arena_options);
    auto* envelope = google::protobuf::Arena::CreateMessage<v1::Envelope>(&arena);
    if (envelope->ParseFromArray(data, static_cast<int>(len))) OnEnvelope(conn, *envelope);
  }

  static void OnDirectReadable(struct ev_loop* loop, ev_io* io, int /*revents*/) {
    auto* self = static_cast<Bench*>(ev_userdata(loop));
    self->ReadSocket(*static_cast<Conn*>(io->data));
  }

  // One read of a direct connection's socket, and every whole frame in what has arrived.
  void ReadSocket(Conn& conn) {
    ssize_t n = recv(conn.direct_io.fd, read_buf_.data(), read_buf_.size(), 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (n <= 0) {
      EndDirect(conn, true);
      return;
    }
    const char* data = read_buf_.data();
    size_t len = static_cast<size_t>(n);
    if (!conn.partial.empty()) {
      conn.partial.append(data, len);
      data = conn.partial.data();
      len = conn.partial.size();
    }
    size_t used = 0;
    while (conn.direct) {
      const size_t frame = ParseFrame(conn, data + used, len - used);
      if (frame == 0) break;
      used += frame;
    }
    if (!conn.direct) return;
    if (data == conn.partial.data()) {
      conn.partial.erase(0, used);
    } else {
      conn.partial.assign(data + used, len - used);
    }
  }

  // Handles the frame at the start of `data` (RFC 6455 section 5.2; a server's frames are not
  // masked) and returns its length, or 0 while it is incomplete or when it broke the
  // connection (then `conn` no longer reads directly).
  size_t ParseFrame(Conn& conn, const char* data, size_t len) {
    if (len < 2) return 0;
    const auto* bytes = reinterpret_cast<const unsigned char*>(data);
    const bool fin = (bytes[0] & 0x80) != 0;
    const int opcode = bytes[0] & 0x0f;
    const bool control = (opcode & 0x08) != 0;
    uint64_t size = bytes[1] & 0x7f;
    size_t header = 2;
    if (size == 126) {
      if (len < 4) return 0;
      size = (uint64_t{bytes[2]} << 8) | bytes[3];
      header = 4;
    } else if (size == 127) {
      if (len < 10) return 0;
      size = 0;
      for (int i = 2; i < 10; ++i) size = (size << 8) | bytes[i];
      header = 10;
    }
    // What no server may send: reserved bits (no extension was negotiated), a mask, an
    // unknown opcode, a fragmented or long control frame, a continuation of nothing, a new
    // message inside a fragmented one, or a frame past any message chatd could send.
    const bool known = opcode <= 0x2 || (opcode >= 0x8 && opcode <= 0xA);
    if ((bytes[0] & 0x70) != 0 || (bytes[1] & 0x80) != 0 || !known ||
        (control && (!fin || size > 125)) || (opcode == 0x0 && !conn.fragmented) ||
        ((opcode == 0x1 || opcode == 0x2) && conn.fragmented) || size > kMaxDirectFrameBytes) {
      ++counters_.error_codes["bad frame from server"];
      EndDirect(conn, true);
      return 0;
    }
    if (len - header < size) return 0;
    const char* payload = data + header;
    switch (opcode) {
      case 0x0:  // continuation
      case 0x1:  // text
      case 0x2:  // binary
        if (fin && !conn.fragmented) {
          OnFrame(conn, payload, size);
        } else {
          conn.rx.append(payload, size);
          conn.fragmented = !fin;
          if (fin) {
            OnFrame(conn, conn.rx.data(), conn.rx.size());
            conn.rx.clear();
          }
        }
        break;
      case 0x8:  // close
        if (size >= 2) ++counters_.close_codes[(bytes[header] << 8) | bytes[header + 1]];
        EndDirect(conn, true);
        return 0;
      default:  // ping, pong: chatd sends neither (no lws validity checks)
        ++counters_.error_codes["unexpected control frame"];
        break;
    }
    return header + size;
  }

 public:
  // From the next connection on (reconnections included), each connection's socket is read
  // here rather than by lws, whose client parser handles every received byte one at a time: in
  // fanout it was a third of this process's CPU, and the generator must stay cheaper than the
  // server it measures. The switch happens when lws reports the connection established, before
  // the Hello is sent, so lws has parsed no byte of any frame. lws keeps writing and closing.
  // Not over TLS, only on the libev loop, and not with --lws-receive.
  void ReadDirectly() {
    read_directly_ = !options_.lws_receive && !options_.tls && loop_ != nullptr;
  }

 private:
  void StartDirect(Conn& conn) {
    if (lws_rx_flow_control(conn.wsi, 0) < 0) return;
    ev_io_init(&conn.direct_io, &Bench::OnDirectReadable, lws_get_socket_fd(conn.wsi), EV_READ);
    conn.direct_io.data = &conn;
    ev_io_start(loop_, &conn.direct_io);
    conn.direct = true;
  }

  // Stops reading `conn` directly; `close`: the server closed or broke the connection, which
  // lws is then told to drop (it reports the close as for any other connection).
  void EndDirect(Conn& conn, bool close) {
    if (!conn.direct) return;
    ev_io_stop(loop_, &conn.direct_io);
    conn.direct = false;
    conn.partial.clear();
    conn.rx.clear();
    conn.fragmented = false;
    if (close && conn.wsi != nullptr) {
      lws_set_timeout(conn.wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
    }
  }

  static int Callback(lws* wsi, lws_callback_reasons reason, void* /*user*/, void* in, size_t len) {
    auto* conn = static_cast<Conn*>(lws_get_opaque_user_data(wsi));
    Bench* self = static_cast<Bench*>(lws_context_user(lws_get_context(wsi)));
    switch (reason) {
      case LWS_CALLBACK_CLIENT_CONNECTION_ERROR:
        if (conn != nullptr && conn->state != Conn::State::kDown) self->OnDown(*conn, true);
        break;
      case LWS_CALLBACK_CLIENT_ESTABLISHED: {
        if (conn == nullptr) return -1;
        conn->wsi = wsi;
        conn->state = Conn::State::kHello;
        conn->hello_sent = false;
        v1::Envelope hello;
        hello.mutable_hello()->set_token(conn->token);
        hello.mutable_hello()->set_device_id(conn->device);
        hello.mutable_hello()->set_protocol_version(1);
        // The hello goes first, ahead of anything queued while the connection was down.
        std::string frame(LWS_PRE, '\0');
        hello.AppendToString(&frame);
        conn->out.push_front(std::move(frame));
        if (self->read_directly_) self->StartDirect(*conn);
        lws_callback_on_writable(wsi);
        break;
      }
      case LWS_CALLBACK_CLIENT_WRITEABLE: {
        if (conn == nullptr || conn->out.empty()) return 0;
        // Only the hello goes before the welcome; the rest waits for it.
        if (conn->state == Conn::State::kHello && conn->hello_sent) return 0;
        if (conn->state == Conn::State::kHello) conn->hello_sent = true;
        std::string& frame = conn->out.front();
        size_t size = frame.size() - LWS_PRE;
        auto* data = reinterpret_cast<unsigned char*>(frame.data()) + LWS_PRE;
        if (lws_write(wsi, data, size, LWS_WRITE_BINARY) < static_cast<int>(size)) return -1;
        conn->out.pop_front();
        if (!conn->out.empty()) lws_callback_on_writable(wsi);
        break;
      }
      case LWS_CALLBACK_CLIENT_RECEIVE: {
        if (conn == nullptr) return -1;
        const bool whole = lws_is_final_fragment(wsi) && lws_remaining_packet_payload(wsi) == 0;
        if (!whole || !conn->rx.empty()) {
          conn->rx.append(static_cast<const char*>(in), len);
          if (!whole) break;
          in = conn->rx.data();
          len = conn->rx.size();
        }
        self->OnFrame(*conn, in, len);
        conn->rx.clear();
        break;
      }
      case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
        if (conn != nullptr && len >= 2) {
          const auto* bytes = static_cast<const unsigned char*>(in);
          ++self->counters_.close_codes[(bytes[0] << 8) | bytes[1]];
        }
        break;
      case LWS_CALLBACK_CLIENT_CLOSED:
        if (conn != nullptr && conn->state != Conn::State::kDown) {
          ++self->counters_.closes;
          self->OnDown(*conn, false);
        }
        break;
      default:
        break;
    }
    return 0;
  }

  Options options_;
  std::string secret_;
  lws_protocols protocols_[2]{};
  alignas(16) std::array<char, 16 * 1024> parse_block_{};  // the parse arena's first block
  std::array<char, 64 * 1024> read_buf_{};                 // direct connections' reads
  bool read_directly_ = false;                             // see ReadDirectly
  lws_context* context_ = nullptr;
  struct ev_loop* loop_ = nullptr;
  struct TickTimer {
    lws_sorted_usec_list_t sul{};
    Bench* owner = nullptr;
  };
  TickTimer tick_;
  ev_timer pace_timer_{};
  std::vector<Conn*> receipts_due_;  // connections with a delivered Receipt to send
  std::function<void()> tick_fn_;
  std::vector<std::unique_ptr<Conn>> conns_;
  int connecting_ = 0;
  int64_t last_heartbeat_ns_ = 0;
  // (due, connection): Syncs to send again after an error; at most one per connection.
  std::vector<std::pair<int64_t, Conn*>> resync_;
  Counters counters_;
  Histogram ack_latency_;
  Histogram deliver_latency_;
  int64_t start_ns_ = 0;
  double cpu_start_ = 0;
};

void AddCheck(JsonObject& json, const Bench::Check& check) {
  json.Add("expected", check.expected);
  json.Add("lost", check.lost);
  json.Add("duplicated", check.duplicated);
  json.Add("reordered", check.reordered);
}

bool CheckOk(const Bench::Check& check) {
  return check.lost == 0 && check.duplicated == 0 && check.reordered == 0;
}

// Paces messages over `senders` at `rate` per second for `seconds`, round-robin, open-loop:
// each tick (1 ms on the libev loop) sends what the schedule says is due by now.
struct Pacer {
  std::vector<Conn*> senders;
  double rate = 0;
  int64_t start_ns = 0;
  int64_t end_ns = 0;
  int64_t sent = 0;
  size_t cursor = 0;

  void Tick(Bench& bench) {
    int64_t now = std::min(NowNs(), end_ns);
    auto due = static_cast<int64_t>(static_cast<double>(now - start_ns) * rate / 1e9);
    for (size_t tried = 0; sent < due && tried < senders.size() * 4; ++tried) {
      Conn* conn = senders[cursor];
      cursor = (cursor + 1) % senders.size();
      if (conn->state != Conn::State::kReady) continue;
      bench.SendNext(*conn);
      ++sent;
    }
  }
  int64_t Total() const {
    return static_cast<int64_t>(static_cast<double>(end_ns - start_ns) * rate / 1e9);
  }
  // Every message of the schedule was sent (or a second passed without the senders ready).
  bool Done() const { return sent >= Total() || NowNs() > end_ns + 1'000'000'000; }
};

// Users bench-<run>-<i> so that runs against one database never share conversations.
std::string UserName(const Options& options, const std::string& role, int i) {
  return options.label + "-" + role + std::to_string(i);
}

// Connects `conns` and waits until all have their Welcome.
bool ConnectAll(Bench& bench, const std::vector<Conn*>& conns, double timeout_s) {
  for (Conn* conn : conns) bench.Up(*conn);
  return bench.RunUntil(
      timeout_s, [&] { return bench.AllReady(conns); }, [] {});
}

// Creates `pairs` pairs of users, both sending to each other.
std::vector<Conn*> MakePairs(Bench& bench, int pairs) {
  std::vector<Conn*> conns;
  for (int i = 0; i < pairs; ++i) {
    Conn& a = bench.AddConn(UserName(bench.options(), "a", i));
    Conn& b = bench.AddConn(UserName(bench.options(), "b", i));
    a.target = b.id;
    b.target = a.id;
    conns.push_back(&a);
    conns.push_back(&b);
  }
  return conns;
}

bool Drain(Bench& bench, const std::vector<Conn*>& senders, double timeout_s) {
  return bench.RunUntil(
      timeout_s, [&] { return bench.Settled(senders); }, [] {});
}

// A step whose schedule took this much longer than the step to send was not offered in full.
constexpr double kBehindScheduleFactor = 1.05;
// A step during which this process used this share of its core or more measured, at least in
// part, how fast this process receives: its latencies include its own queueing.
constexpr double kSaturatedCpuShare = 0.9;

struct StepResult {
  bool ok = true;
  std::string json;
  double p99_ms = 0;
  bool behind = false;     // the schedule took longer to send than the step: not offered in full
  bool saturated = false;  // this process was busy nearly all the time: a bound on the result
  int64_t delivered = 0;
  double achieved = 0;  // deliveries per second over the step (sending and draining)
  double server_cpu_us_per_msg = -1;
};

// A step holds when it drained, the generator kept up, its p99 is under the limit and at least
// 95 % of the deliveries its schedule asked for arrived.
bool Held(const StepResult& step, double offered_deliveries_per_s, double seconds,
          double p99_limit_ms) {
  return step.ok && !step.behind && !step.saturated && step.p99_ms < p99_limit_ms &&
         static_cast<double>(step.delivered) >= 0.95 * offered_deliveries_per_s * seconds;
}

// One open-loop step at `rate`: send for `seconds`, drain, report latencies and server CPU.
StepResult RunStep(Bench& bench, const std::vector<Conn*>& senders, double rate, double seconds) {
  bench.ack_latency() = Histogram();
  bench.deliver_latency() = Histogram();
  Counters start = bench.counters();
  double server_cpu0 = CpuSecondsOf(bench.options().server_pid);
  const std::map<std::string, double> threads0 = ThreadCpuSecondsOf(bench.options().server_pid);
  double self_cpu0 = CpuSecondsSelf();
  Pacer pacer{senders, rate, NowNs(), NowNs() + static_cast<int64_t>(seconds * 1e9)};
  int64_t t0 = NowNs();
  bench.RunUntil(
      seconds + 5, [&] { return pacer.Done(); }, [&] { pacer.Tick(bench); });
  // Sending the schedule took longer than the step when this process could not keep up (its
  // loop busy receiving), or it gave up with messages unsent: then the load offered was lower
  // than the rate says.
  const double send_s = static_cast<double>(NowNs() - t0) / 1e9;
  const bool behind = send_s > seconds * kBehindScheduleFactor || pacer.sent < pacer.Total();
  bool drained = Drain(bench, senders, std::max(10.0, seconds * 2));
  double wall = static_cast<double>(NowNs() - t0) / 1e9;
  double server_cpu = CpuSecondsOf(bench.options().server_pid) - server_cpu0;
  const std::map<std::string, double> threads1 = ThreadCpuSecondsOf(bench.options().server_pid);
  double self_cpu = CpuSecondsSelf() - self_cpu0;
  int64_t sent = bench.counters().sent - start.sent;
  int64_t delivered = bench.counters().delivered - start.delivered;
  StepResult result;
  result.ok = drained;
  result.behind = behind;
  result.delivered = delivered;
  result.saturated = self_cpu >= kSaturatedCpuShare * wall;
  result.p99_ms = static_cast<double>(bench.deliver_latency().Percentile(0.99)) / 1e6;
  // Over the whole step, sending and draining: a step that ran long delivered at a lower rate.
  result.achieved = static_cast<double>(delivered) / std::max(seconds, wall);
  result.server_cpu_us_per_msg =
      sent > 0 && server_cpu >= 0 ? server_cpu * 1e6 / static_cast<double>(sent) : -1.0;
  JsonObject json;
  json.Add("offered_rate", rate);
  json.Add("pace_ms", bench.options().pace_ms);
  json.Add("seconds", seconds);
  json.Add("sent", sent);
  json.Add("acked", bench.counters().acked - start.acked);
  json.Add("delivered", delivered);
  json.Add("delivered_per_s", result.achieved);
  json.Add("drained", drained);
  json.Raw("send_to_ack", bench.ack_latency().Json());
  json.Raw("send_to_deliver", bench.deliver_latency().Json());
  json.Add("server_cpu_s", server_cpu);
  json.Add("server_cpu_us_per_msg", result.server_cpu_us_per_msg);
  json.Raw("server_threads_cpu_s", ThreadCpuJson(threads0, threads1));
  json.Add("generator_cpu_s", self_cpu);
  if (bench.options().receipts_ms > 0) {
    json.Add("receipts_sent", bench.counters().receipts_sent - start.receipts_sent);
    json.Add("receipt_replies", bench.counters().receipt_replies - start.receipt_replies);
    json.Add("receipt_updates_received", bench.counters().receipt_updates - start.receipt_updates);
  }
  json.Add("wall_s", wall);
  json.Add("send_s", send_s);
  json.Add("generator_behind", behind);
  json.Add("generator_saturated", result.saturated);
  result.json = json.str();
  return result;
}

int Finish(Bench& bench, JsonObject& json, bool completed, const Bench::Check& check) {
  json.Add("completed", completed);
  AddCheck(json, check);
  json.Add("server_rss_kb", RssKbOf(bench.options().server_pid));
  json.Add("server_peak_rss_kb", PeakRssKbOf(bench.options().server_pid));
  bench.AddCommon(json);
  std::printf("%s\n", json.str().c_str());
  return completed && CheckOk(check) ? 0 : 1;
}

int RunLatency(Bench& bench) {
  const Options& o = bench.options();
  std::vector<Conn*> conns = MakePairs(bench, o.pairs);
  JsonObject json;
  json.Add("workload", "latency");
  json.Add("pairs", o.pairs);
  bool completed = ConnectAll(bench, conns, o.timeout_s);
  if (completed) {
    StepResult step = RunStep(bench, conns, o.rate, o.duration_s);
    completed = step.ok;
    json.Raw("step", step.json);
    json.Raw("send_to_ack", bench.ack_latency().Json());
    json.Raw("send_to_deliver", bench.deliver_latency().Json());
  }
  return Finish(bench, json, completed, bench.Verify(conns));
}

// The offered rates of `rates` (messages per second, over all senders) one step after another,
// each message reaching `receivers_per_message` connections; the highest step that held (see
// Held). Stops past saturation, where the queues only grow and a drain would take minutes.
struct RisingResult {
  std::string steps_json;
  double best_rate = 0;
  double best_deliveries_per_s = 0;
  double best_cpu_us_per_msg = -1;
  bool settled = true;  // every acked message reached every receiver after the last step
  double settle_s = 0;  // how long that took after the last step's own drain
};

RisingResult RunRising(Bench& bench, const std::vector<Conn*>& senders,
                       const std::vector<double>& rates, double receivers_per_message) {
  const Options& o = bench.options();
  RisingResult out;
  for (double rate : rates) {
    StepResult step = RunStep(bench, senders, rate, o.step_s);
    if (!out.steps_json.empty()) out.steps_json += ",";
    out.steps_json += step.json;
    double offered_deliveries = rate * receivers_per_message;
    if (Held(step, offered_deliveries, o.step_s, o.p99_limit_ms) && rate > out.best_rate) {
      out.best_rate = rate;
      out.best_deliveries_per_s = step.achieved;
      out.best_cpu_us_per_msg = step.server_cpu_us_per_msg;
    }
    // Past saturation the queues only grow; stop before the drain takes minutes.
    if (!step.ok || step.p99_ms > 20 * o.p99_limit_ms || step.achieved < 0.7 * offered_deliveries)
      break;
  }
  // An overloaded last step can end with posts unacked and deliveries still queued in the
  // server: wait for them (bounded by --timeout), so that the check afterwards counts as lost
  // only what never arrives.
  const int64_t t0 = NowNs();
  out.settled = Drain(bench, senders, o.timeout_s);
  out.settle_s = static_cast<double>(NowNs() - t0) / 1e9;
  return out;
}

int RunDirect(Bench& bench) {
  const Options& o = bench.options();
  std::vector<Conn*> conns = MakePairs(bench, o.pairs);
  JsonObject json;
  json.Add("workload", "direct");
  json.Add("pairs", o.pairs);
  bool completed = ConnectAll(bench, conns, o.timeout_s);
  RisingResult rising;
  if (completed) rising = RunRising(bench, conns, o.rates, 1);
  json.Raw("steps", "[" + rising.steps_json + "]");
  json.Add("max_rate_p99_under_limit", rising.best_rate);
  json.Add("p99_limit_ms", o.p99_limit_ms);
  json.Add("server_cpu_us_per_msg_at_max", rising.best_cpu_us_per_msg);
  json.Add("settled", rising.settled);
  json.Add("settle_s", rising.settle_s);
  return Finish(bench, json, completed, bench.Verify(conns));
}

int RunIdle(Bench& bench) {
  const Options& o = bench.options();
  std::vector<Conn*> conns;
  for (int i = 0; i < o.connections; ++i) {
    conns.push_back(&bench.AddConn(UserName(o, "idle", i)));
  }
  int64_t rss0 = RssKbOf(o.server_pid);
  int64_t slab0 = SlabKb();
  int64_t t0 = NowNs();
  // Server RSS sampled as the connections come up, for the memory-against-connections plot.
  std::string curve = "[[0," + std::to_string(rss0) + "]";
  int step = std::max(1, o.connections / 20);
  int next = step;
  for (Conn* conn : conns) bench.Up(*conn);
  bool completed = bench.RunUntil(
      o.timeout_s,
      [&] {
        auto ready = static_cast<int>(std::count_if(conns.begin(), conns.end(), [](const Conn* c) {
          return c->state == Conn::State::kReady;
        }));
        if (ready >= next) {
          curve += ",[" + std::to_string(ready) + "," + std::to_string(RssKbOf(o.server_pid)) + "]";
          while (next <= ready) next += step;
        }
        return ready == static_cast<int>(conns.size());
      },
      [] {});
  double connect_s = static_cast<double>(NowNs() - t0) / 1e9;
  // Right after the last handshake the server may still hold memory the handshakes used and
  // freed (an allocator returns it later); the headline is taken after the hold.
  int64_t rss_connected = RssKbOf(o.server_pid);
  bench.RunFor(o.hold_s);
  int64_t rss1 = RssKbOf(o.server_pid);
  int64_t slab1 = SlabKb();
  bool still_up = bench.AllReady(conns);
  JsonObject json;
  json.Add("workload", "idle");
  json.Add("connections", o.connections);
  json.Add("connect_s", connect_s);
  json.Add("still_up_after_hold", still_up);
  json.Add("server_rss_before_kb", rss0);
  json.Add("server_rss_after_kb", rss1);
  json.Raw("rss_curve", curve + "]");
  double n = std::max(1, o.connections);
  json.Add("hold_s", o.hold_s);
  json.Add("server_rss_bytes_per_conn", static_cast<double>(rss1 - rss0) * 1024.0 / n);
  json.Add("server_rss_bytes_per_conn_connected",
           static_cast<double>(rss_connected - rss0) * 1024.0 / n);
  // System-wide: both ends of every loopback socket and the generator's side are in it.
  json.Add("slab_bytes_per_conn_both_ends", static_cast<double>(slab1 - slab0) * 1024.0 / n);
  return Finish(bench, json, completed && still_up, bench.Verify(conns));
}

int RunSync(Bench& bench) {
  const Options& o = bench.options();
  Conn& syncer = bench.AddConn(UserName(o, "syncer", 0));
  std::vector<Conn*> senders;
  for (int i = 0; i < o.conversations; ++i) {
    Conn& sender = bench.AddConn(UserName(o, "s", i));
    sender.target = syncer.id;
    senders.push_back(&sender);
  }
  JsonObject json;
  json.Add("workload", "sync");
  json.Add("conversations", o.conversations);
  json.Add("messages", o.messages);
  bool completed = ConnectAll(bench, senders, o.timeout_s);
  if (completed) {
    // The syncer is offline: every message is stored for it, none delivered.
    double seconds = static_cast<double>(o.messages) / o.rate;
    Pacer pacer{senders, o.rate, NowNs(), NowNs() + static_cast<int64_t>(seconds * 1e9)};
    bench.RunUntil(
        seconds + 5, [&] { return pacer.Done(); }, [&] { pacer.Tick(bench); });
    completed = bench.RunUntil(
        o.timeout_s,
        [&] {
          return std::all_of(senders.begin(), senders.end(),
                             [](const Conn* s) { return s->unacked.empty(); });
        },
        [] {});
    json.Add("stored", bench.counters().acked);
  }
  if (completed) {
    int64_t t0 = NowNs();
    bench.on_ready = [&bench](Conn& conn) { bench.SendSync(conn); };
    bench.Up(syncer);
    int64_t expected = bench.ExpectedReceipts(senders);
    completed = bench.RunUntil(
        o.timeout_s, [&] { return syncer.synced && bench.counters().synced_messages >= expected; },
        [] {});
    int64_t t1 = NowNs();
    json.Add("reconnect_to_synced_ms", static_cast<double>(t1 - t0) / 1e6);
    json.Add("welcome_to_synced_ms", static_cast<double>(t1 - syncer.ready_ns) / 1e6);
    json.Add("sync_pages", syncer.sync_pages);
  }
  return Finish(bench, json, completed, bench.Verify(senders));
}

int RunConnect(Bench& bench) {
  const Options& o = bench.options();
  std::vector<Conn*> conns;
  for (int i = 0; i < o.connections; ++i) {
    conns.push_back(&bench.AddConn(UserName(o, "c", i)));
  }
  double server_cpu0 = CpuSecondsOf(o.server_pid);
  int64_t t0 = NowNs();
  bool completed = ConnectAll(bench, conns, o.timeout_s);
  double seconds = static_cast<double>(NowNs() - t0) / 1e9;
  double server_cpu = CpuSecondsOf(o.server_pid) - server_cpu0;
  Histogram handshake;
  for (Conn* conn : conns) {
    if (conn->state == Conn::State::kReady)
      handshake.Record(conn->ready_ns - conn->connect_start_ns);
  }
  JsonObject json;
  json.Add("workload", "connect");
  json.Add("connections", o.connections);
  json.Add("max_connecting", o.max_connecting);
  json.Add("seconds", seconds);
  json.Add("handshakes_per_s", static_cast<double>(o.connections) / seconds);
  json.Add("server_cpu_s", server_cpu);
  json.Add("server_cpu_us_per_handshake", server_cpu * 1e6 / std::max(1, o.connections));
  json.Raw("connect_to_welcome", handshake.Json());
  return Finish(bench, json, completed, bench.Verify(conns));
}

// Each of `conns` comes back at its own moment in the second after `from_ns` (a fixed
// xorshift sequence, so every run spreads them the same way).
void UpWithinOneSecond(Bench& bench, const std::vector<Conn*>& conns, int64_t from_ns) {
  uint64_t random = 0x9E3779B97F4A7C15ULL;
  for (Conn* conn : conns) {
    random ^= random << 13;
    random ^= random >> 7;
    random ^= random << 17;
    bench.Up(*conn, from_ns + static_cast<int64_t>(random % 1'000'000'000ULL));
  }
}

int RunStorm(Bench& bench) {
  const Options& o = bench.options();
  std::vector<Conn*> conns = MakePairs(bench, o.connections / 2);
  JsonObject json;
  json.Add("workload", "storm");
  json.Add("connections", static_cast<int>(conns.size()));
  json.Add("messages_per_client_per_phase", o.per_client);
  bool completed = ConnectAll(bench, conns, o.timeout_s);
  auto send_round = [&] {
    for (Conn* conn : conns) {
      for (int k = 0; k < o.per_client; ++k) bench.SendNext(*conn);
    }
  };
  if (completed) {
    send_round();
    completed = Drain(bench, conns, o.timeout_s);
  }
  if (completed) {
    // Everyone drops at once and comes back at a uniformly random moment within 1 s; while
    // they reconnect, those already back send more (to peers that may still be offline) and
    // everyone syncs from its cursors.
    int64_t t0 = NowNs();
    for (Conn* conn : conns) bench.Drop(*conn);
    bench.RunUntil(
        o.timeout_s, [&] { return bench.AllDown(conns); }, [] {});
    int64_t dropped_ns = NowNs();
    double server_cpu0 = CpuSecondsOf(o.server_pid);
    UpWithinOneSecond(bench, conns, dropped_ns);
    bench.on_ready = [&bench, &o](Conn& conn) {
      bench.SendSync(conn);
      for (int k = 0; k < o.per_client; ++k) bench.SendNext(conn);
    };
    completed = bench.RunUntil(
        o.timeout_s,
        [&] {
          if (!bench.AllReady(conns)) return false;
          for (Conn* conn : conns) {
            if (!conn->synced || !conn->unacked.empty()) return false;
          }
          return bench.Verify(conns).lost == 0;
        },
        [] {});
    json.Add("drop_to_all_down_ms", static_cast<double>(dropped_ns - t0) / 1e6);
    json.Add("reconnect_to_all_synced_ms", static_cast<double>(NowNs() - dropped_ns) / 1e6);
    json.Add("server_cpu_s_reconnect", CpuSecondsOf(o.server_pid) - server_cpu0);
  }
  return Finish(bench, json, completed, bench.Verify(conns));
}

// Sends a control request (CreateGroup, AddMembers, Subscribe) from `conn`; the reply is
// counted in conn.replies.
void SendControl(Bench& bench, Conn& conn, v1::Envelope envelope) {
  static uint64_t next_rid = kControlRid;
  envelope.set_rid(next_rid++);
  bench.Queue(conn, envelope);
}

// Waits until each of `conns` has at least `replies` replies to control requests.
bool AwaitReplies(Bench& bench, const std::vector<Conn*>& conns, int64_t replies,
                  double timeout_s) {
  return bench.RunUntil(
      timeout_s,
      [&] {
        return std::all_of(conns.begin(), conns.end(),
                           [replies](const Conn* c) { return c->replies >= replies; });
      },
      [] {});
}

int64_t ErrorCount(Bench& bench) {
  int64_t n = 0;
  for (const auto& [code, count] : bench.counters().error_codes) n += count;
  return n;
}

// How many of `conns` read their sockets directly (Bench::ReadDirectly), for the result.
int CountDirect(const std::vector<Conn*>& conns) {
  return static_cast<int>(
      std::count_if(conns.begin(), conns.end(), [](const Conn* c) { return c->direct; }));
}

// `groups` of `members` connections each (the first is the group's creator), added to `all`.
std::vector<std::vector<Conn*>> AddGroupMembers(Bench& bench, std::vector<Conn*>* all,
                                                std::vector<Conn*>* creators) {
  const Options& o = bench.options();
  std::vector<std::vector<Conn*>> groups(static_cast<size_t>(o.groups));
  for (int g = 0; g < o.groups; ++g) {
    std::string role = "g";
    role += std::to_string(g);
    role += "m";
    for (int m = 0; m < o.members; ++m) {
      Conn& conn = bench.AddConn(UserName(o, role, m));
      groups[static_cast<size_t>(g)].push_back(&conn);
      all->push_back(&conn);
    }
    creators->push_back(groups[static_cast<size_t>(g)].front());
  }
  return groups;
}

// Each creator (connected) creates its group with the other members; a creator's messages go
// to the group afterwards. Waits for the creation's system messages to drain.
bool CreateGroups(Bench& bench, const std::vector<std::vector<Conn*>>& groups,
                  const std::vector<Conn*>& creators) {
  const Options& o = bench.options();
  for (const auto& members : groups) {
    v1::Envelope create;
    create.mutable_create_group()->set_kind(v1::CONVERSATION_KIND_GROUP);
    create.mutable_create_group()->set_title(members.front()->user);
    for (size_t m = 1; m < members.size(); ++m) {
      create.mutable_create_group()->add_members(members[m]->user);
      members.front()->audience.push_back(members[m]->id);
    }
    SendControl(bench, *members.front(), create);
  }
  bool completed = AwaitReplies(bench, creators, 1, o.timeout_s) && ErrorCount(bench) == 0;
  for (Conn* creator : creators) {
    creator->conversation = creator->reply_conversation;
    if (creator->conversation == 0) completed = false;
  }
  // The creation's system messages and updates go to every member: let them drain.
  bench.RunFor(2);
  return completed;
}

// fanout: `groups` groups of `members` online members each (one connection per member, all in
// this process), created through the protocol with CreateGroup; each group's creator posts at
// the step's rate per group and every other member must receive every post in order.
int RunFanout(Bench& bench) {
  const Options& o = bench.options();
  std::vector<Conn*> all;
  std::vector<Conn*> creators;
  std::vector<std::vector<Conn*>> groups = AddGroupMembers(bench, &all, &creators);
  JsonObject json;
  json.Add("workload", "fanout");
  json.Add("groups", o.groups);
  json.Add("members_per_group", o.members);
  json.Add("receipts_ms", o.receipts_ms);
  json.Add("connections", static_cast<int>(all.size()));
  json.Add("p99_limit_ms", o.p99_limit_ms);
  int64_t t0 = NowNs();
  bench.ReadDirectly();
  bool completed = ConnectAll(bench, all, o.timeout_s);
  json.Add("connect_s", static_cast<double>(NowNs() - t0) / 1e9);
  if (completed) completed = CreateGroups(bench, groups, creators);
  RisingResult rising;
  if (completed) {
    json.Add("connections_read_directly", CountDirect(all));
    std::vector<double> rates;  // per group -> over all groups
    for (double per_group : o.rates) rates.push_back(per_group * o.groups);
    rising = RunRising(bench, creators, rates, o.members - 1);
  }
  json.Raw("steps", "[" + rising.steps_json + "]");
  json.Add("max_messages_per_s_p99_under_limit", rising.best_rate);
  json.Add("max_per_group_rate_p99_under_limit", rising.best_rate / std::max(1, o.groups));
  json.Add("max_deliveries_per_s_p99_under_limit", rising.best_deliveries_per_s);
  json.Add("server_cpu_us_per_msg_at_max", rising.best_cpu_us_per_msg);
  json.Add("settled", rising.settled);
  json.Add("settle_s", rising.settle_s);
  return Finish(bench, json, completed, bench.Verify(creators));
}

// Members of groups catching up together: every member but the creators drops, each creator
// posts --per-client messages to its group, and the members come back within 1 s and sync. All
// members of a group sync the same range, the case merged catch-up reads are for.
int RunStormGroups(Bench& bench) {
  const Options& o = bench.options();
  std::vector<Conn*> all;
  std::vector<Conn*> creators;
  std::vector<std::vector<Conn*>> groups = AddGroupMembers(bench, &all, &creators);
  std::vector<Conn*> members;
  for (const auto& group : groups) members.insert(members.end(), group.begin() + 1, group.end());
  JsonObject json;
  json.Add("workload", "storm-groups");
  json.Add("groups", o.groups);
  json.Add("members_per_group", o.members);
  json.Add("messages_per_group", o.per_client);
  bool completed = ConnectAll(bench, all, o.timeout_s) && CreateGroups(bench, groups, creators);
  if (completed) {
    for (Conn* conn : members) bench.Drop(*conn);
    completed = bench.RunUntil(
        o.timeout_s, [&] { return bench.AllDown(members); }, [] {});
  }
  if (completed) {
    for (Conn* creator : creators) {
      for (int k = 0; k < o.per_client; ++k) bench.SendNext(*creator);
    }
    completed = bench.RunUntil(
        o.timeout_s,
        [&] {
          return std::all_of(creators.begin(), creators.end(),
                             [](const Conn* c) { return c->unacked.empty(); });
        },
        [] {});
  }
  if (completed) {
    const int64_t t0 = NowNs();
    const double server_cpu0 = CpuSecondsOf(o.server_pid);
    UpWithinOneSecond(bench, members, t0);
    bench.on_ready = [&bench](Conn& conn) { bench.SendSync(conn); };
    completed = bench.RunUntil(
        o.timeout_s,
        [&] {
          if (!bench.AllReady(members)) return false;
          for (const Conn* conn : members) {
            if (!conn->synced) return false;
          }
          return bench.Settled(creators);
        },
        [] {});
    json.Add("reconnect_to_all_synced_ms", static_cast<double>(NowNs() - t0) / 1e6);
    json.Add("server_cpu_s_reconnect", CpuSecondsOf(o.server_pid) - server_cpu0);
  }
  return Finish(bench, json, completed, bench.Verify(creators));
}

// channel: one channel of `channel_members` members of whom only `viewers` are connected and
// subscribed; the rest are added with AddMembers in batches of `add_batch` and never connect.
// Server RSS is read before and after adding them; then one poster posts at rising rates.
int RunChannel(Bench& bench) {
  const Options& o = bench.options();
  Conn& poster = bench.AddConn(UserName(o, "poster", 0));
  std::vector<Conn*> viewers;
  for (int i = 0; i < o.viewers; ++i) viewers.push_back(&bench.AddConn(UserName(o, "v", i)));
  std::vector<Conn*> all = viewers;
  all.push_back(&poster);
  JsonObject json;
  json.Add("workload", "channel");
  json.Add("viewers", o.viewers);
  json.Add("p99_limit_ms", o.p99_limit_ms);
  bench.ReadDirectly();
  bool completed = ConnectAll(bench, all, o.timeout_s);
  int offline = std::max(0, o.channel_members - 1 - o.viewers);
  if (completed) {
    v1::Envelope create;
    create.mutable_create_group()->set_kind(v1::CONVERSATION_KIND_CHANNEL);
    create.mutable_create_group()->set_title("bench channel");
    for (Conn* viewer : viewers) {
      create.mutable_create_group()->add_members(viewer->user);
      poster.audience.push_back(viewer->id);
    }
    SendControl(bench, poster, create);
    completed = AwaitReplies(bench, {&poster}, 1, o.timeout_s) && ErrorCount(bench) == 0 &&
                poster.reply_conversation != 0;
    poster.conversation = poster.reply_conversation;
  }
  if (completed) {
    // Let the server settle after the creation before the first reading.
    bench.RunFor(0.5);
    int64_t rss0 = RssKbOf(o.server_pid);
    double server_cpu0 = CpuSecondsOf(o.server_pid);
    int64_t t0 = NowNs();
    int64_t requests = 0;
    for (int first = 0; first < offline && completed; first += o.add_batch) {
      v1::Envelope add;
      add.mutable_add_members()->set_conversation_id(poster.conversation);
      for (int i = first; i < std::min(offline, first + o.add_batch); ++i) {
        add.mutable_add_members()->add_users(UserName(o, "off", i));
      }
      SendControl(bench, poster, add);
      ++requests;
      // One request at a time, so the time per batch is the server's.
      completed =
          AwaitReplies(bench, {&poster}, 1 + requests, o.timeout_s) && ErrorCount(bench) == 0;
    }
    double add_s = static_cast<double>(NowNs() - t0) / 1e9;
    double add_cpu = CpuSecondsOf(o.server_pid) - server_cpu0;
    bench.RunFor(0.5);
    int64_t rss1 = RssKbOf(o.server_pid);
    json.Add("members", 1 + o.viewers + offline);
    json.Add("offline_members_added", offline);
    json.Add("add_members_batch", o.add_batch);
    json.Add("add_members_s", add_s);
    json.Add("add_members_per_s", add_s > 0 ? offline / add_s : 0.0);
    json.Add("add_members_server_cpu_s", add_cpu);
    json.Add("server_rss_before_members_kb", rss0);
    json.Add("server_rss_after_members_kb", rss1);
    json.Add("server_rss_bytes_per_offline_member",
             static_cast<double>(rss1 - rss0) * 1024.0 / std::max(1, offline));
  }
  if (completed) {
    for (Conn* viewer : viewers) {
      v1::Envelope subscribe;
      subscribe.mutable_subscribe()->set_conversation_id(poster.conversation);
      SendControl(bench, *viewer, subscribe);
    }
    completed = AwaitReplies(bench, viewers, 1, o.timeout_s) && ErrorCount(bench) == 0;
  }
  RisingResult rising;
  if (completed) {
    json.Add("connections_read_directly", CountDirect(all));
    rising = RunRising(bench, {&poster}, o.rates, o.viewers);
  }
  json.Raw("steps", "[" + rising.steps_json + "]");
  json.Add("max_posts_per_s_p99_under_limit", rising.best_rate);
  json.Add("max_deliveries_per_s_p99_under_limit", rising.best_deliveries_per_s);
  json.Add("server_cpu_us_per_post_at_max", rising.best_cpu_us_per_msg);
  json.Add("settled", rising.settled);
  json.Add("settle_s", rising.settle_s);
  json.Add("server_rss_end_kb", RssKbOf(o.server_pid));
  return Finish(bench, json, completed, bench.Verify({&poster}));
}

// history (through the protocol): `connections` users of the pre-built store (their
// conversations listed in --conversations-file as "user conversation_id" lines) each ask for
// the newest `page` messages of one of their conversations after another, one request in flight
// per connection, `requests` in all. Latency is request -> HistoryPage at the client. A page
// must hold `page` messages in strictly descending, gapless seq order: a gap counts as lost, a
// repeated seq as duplicated, an ascending step as reordered.
int RunHistory(Bench& bench) {
  const Options& o = bench.options();
  std::map<std::string, std::vector<uint64_t>> by_user;
  {
    std::ifstream in(o.conversations_file);
    std::string user;
    uint64_t conversation = 0;
    while (in >> user >> conversation) by_user[user].push_back(conversation);
  }
  JsonObject json;
  json.Add("workload", "history");
  json.Add("page", o.page);
  json.Add("requests", o.requests);
  if (by_user.empty()) {
    std::fprintf(stderr, "chat-bench: no conversations in %s\n", o.conversations_file.c_str());
    return Finish(bench, json, false, {});
  }
  std::vector<Conn*> conns;
  std::vector<const std::vector<uint64_t>*> theirs;
  for (const auto& [user, conversations] : by_user) {
    if (static_cast<int>(conns.size()) >= o.connections) break;
    Conn& conn = bench.AddConn(user);
    conns.push_back(&conn);
    theirs.push_back(&conversations);
  }
  json.Add("connections", static_cast<int>(conns.size()));
  bool completed = ConnectAll(bench, conns, o.timeout_s);
  Histogram latency;
  Bench::Check check;
  int64_t sent = 0;
  int64_t answered = 0;
  std::vector<int64_t> started(bench.conns().size(), 0);
  uint64_t random = 0x9E3779B97F4A7C15ULL;
  std::unordered_map<int, size_t> slot;  // Conn id -> index in conns
  for (size_t i = 0; i < conns.size(); ++i) slot[conns[i]->id] = i;
  auto ask = [&](Conn& conn) {
    if (sent >= o.requests) return;
    const std::vector<uint64_t>& mine = *theirs[slot[conn.id]];
    random ^= random << 13;
    random ^= random >> 7;
    random ^= random << 17;
    v1::Envelope request;
    request.mutable_history()->set_conversation_id(mine[random % mine.size()]);
    request.mutable_history()->set_limit(static_cast<uint32_t>(o.page));
    ++sent;
    started[static_cast<size_t>(conn.id)] = NowNs();
    SendControl(bench, conn, request);
  };
  bench.on_history = [&](Conn& conn, const v1::Envelope& envelope) {
    latency.Record(NowNs() - started[static_cast<size_t>(conn.id)]);
    ++answered;
    if (envelope.has_history_page()) {
      const v1::HistoryPage& page = envelope.history_page();
      check.expected += o.page;
      if (page.messages_size() < o.page && page.has_more()) {
        check.lost += o.page - page.messages_size();
      }
      for (int i = 1; i < page.messages_size(); ++i) {
        uint64_t newer = page.messages(i - 1).seq();
        uint64_t older = page.messages(i).seq();
        if (older == newer) {
          ++check.duplicated;
        } else if (older > newer) {
          ++check.reordered;
        } else if (older + 1 < newer) {
          check.lost += static_cast<int64_t>(newer - older - 1);
        }
      }
    }
    ask(conn);
  };
  double server_cpu0 = CpuSecondsOf(o.server_pid);
  int64_t t0 = NowNs();
  if (completed) {
    for (Conn* conn : conns) ask(*conn);
    completed = bench.RunUntil(
                    o.timeout_s, [&] { return answered >= sent && sent >= o.requests; }, [] {}) &&
                ErrorCount(bench) == 0;
  }
  double seconds = static_cast<double>(NowNs() - t0) / 1e9;
  double server_cpu = CpuSecondsOf(o.server_pid) - server_cpu0;
  bench.on_history = nullptr;
  json.Raw("request_to_page", latency.Json());
  json.Add("pages_per_s", seconds > 0 ? static_cast<double>(answered) / seconds : 0.0);
  json.Add("server_cpu_us_per_page",
           answered > 0 ? server_cpu * 1e6 / static_cast<double>(answered) : -1.0);
  return Finish(bench, json, completed, check);
}

// The floor: a plain TCP ping-pong over loopback, `round_trips` of body_bytes each way.
int RunTcpEchoServer(const Options& o) {
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(o.port));
  inet_pton(AF_INET, o.host.c_str(), &address.sin_addr);
  if (bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      listen(listener, 4) != 0) {
    std::perror("tcp-echo-server");
    return 1;
  }
  socklen_t size = sizeof address;
  getsockname(listener, reinterpret_cast<sockaddr*>(&address), &size);
  std::printf("tcp-echo listening on %d\n", ntohs(address.sin_port));
  std::fflush(stdout);
  int fd = accept(listener, nullptr, nullptr);
  if (fd < 0) return 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  char buffer[65536];
  while (true) {
    ssize_t n = read(fd, buffer, sizeof buffer);
    if (n <= 0) break;
    if (write(fd, buffer, static_cast<size_t>(n)) != n) break;
  }
  close(fd);
  close(listener);
  return 0;
}

int RunFloor(const Options& o) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(o.port));
  inet_pton(AF_INET, o.host.c_str(), &address.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    std::perror("floor: connect");
    return 1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  std::string message(static_cast<size_t>(std::max(o.body_bytes, 1)), 'p');
  std::string reply(message.size(), '\0');
  Histogram rtt;
  double cpu0 = CpuSecondsSelf();
  int64_t t0 = NowNs();
  bool ok = true;
  for (int i = 0; i < o.round_trips && ok; ++i) {
    int64_t start = NowNs();
    ok = write(fd, message.data(), message.size()) == static_cast<ssize_t>(message.size());
    size_t got = 0;
    while (ok && got < reply.size()) {
      ssize_t n = read(fd, reply.data() + got, reply.size() - got);
      ok = n > 0;
      if (ok) got += static_cast<size_t>(n);
    }
    if (ok) rtt.Record(NowNs() - start);
  }
  double seconds = static_cast<double>(NowNs() - t0) / 1e9;
  close(fd);
  // The disk's floor for a durable commit: append three 4,120-byte WAL frames (a small SQLite
  // commit: page + frame header, three pages) and fdatasync, in the directory chatd's database
  // uses. synchronous=FULL pays this once per commit group.
  Histogram sync;
  if (ok && !o.sync_dir.empty()) {
    const std::string path = o.sync_dir + "/floor-fdatasync";
    int file = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    std::string frames(3 * 4120, 'w');
    off_t offset = 0;
    for (int i = 0; i < o.syncs && file >= 0 && ok; ++i) {
      if (i % 1000 == 0) offset = 0;  // SQLite restarts its WAL from the start after a checkpoint
      int64_t start = NowNs();
      ok = pwrite(file, frames.data(), frames.size(), offset) ==
               static_cast<ssize_t>(frames.size()) &&
           fdatasync(file) == 0;
      if (ok) sync.Record(NowNs() - start);
      offset += static_cast<off_t>(frames.size());
    }
    if (file < 0) ok = false;
    if (file >= 0) close(file);
    unlink(path.c_str());
  }
  JsonObject json;
  json.Add("workload", "floor");
  json.Add("completed", ok);
  json.Add("round_trips", rtt.count());
  json.Add("bytes", static_cast<int>(message.size()));
  json.Raw("round_trip", rtt.Json());
  json.Add("round_trips_per_s", static_cast<double>(rtt.count()) / seconds);
  if (sync.count() > 0) json.Raw("append_fdatasync", sync.Json());
  json.Add("generator_cpu_s", CpuSecondsSelf() - cpu0);
  json.Add("lost", static_cast<int64_t>(0));
  json.Add("duplicated", static_cast<int64_t>(0));
  json.Add("reordered", static_cast<int64_t>(0));
  std::printf("%s\n", json.str().c_str());
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace chat::bench

int main(int argc, char** argv) {
  using chat::bench::Options;
  Options o;
  CLI::App app{"chat-bench: load generator for chatd (see bench/run.sh)"};
  app.add_option(
         "--workload", o.workload,
         "latency | direct | idle | sync | connect | storm | storm-groups | fanout | channel | "
         "history | "
         "history-gen | history-store | client | receipt-store | push-store | floor | "
         "tcp-echo-server")
      ->required();
  app.add_option("--host", o.host, "server address")->capture_default_str();
  app.add_option("--port", o.port, "server port (not used by the SDK workloads)");
  app.add_option("--secret-file", o.secret_file, "chatd's HS256 secret, to mint tokens");
  app.add_option("--server-pid", o.server_pid, "chatd's pid, for its CPU time and RSS");
  app.add_option("--label", o.label, "prefix of user ids, unique per run")->required();
  app.add_option("--pairs", o.pairs, "latency/direct: user pairs (both send)")
      ->capture_default_str();
  app.add_option("--rate", o.rate, "latency/sync: messages per second")->capture_default_str();
  app.add_option("--duration", o.duration_s, "latency: seconds of load")->capture_default_str();
  app.add_option("--rates", o.rates,
                 "direct, channel: offered rates (msg/s), stepped up; fanout: per group")
      ->delimiter(',');
  app.add_option("--step-seconds", o.step_s, "direct: seconds per step")->capture_default_str();
  app.add_option("--p99-limit-ms", o.p99_limit_ms, "direct: p99 deliver latency to hold")
      ->capture_default_str();
  app.add_option("--connections", o.connections, "idle/connect/storm/history: connections")
      ->capture_default_str();
  app.add_option("--conversations", o.conversations, "sync, history-gen: conversations")
      ->capture_default_str();
  app.add_option("--messages", o.messages, "sync: messages stored while offline")
      ->capture_default_str();
  app.add_option("--per-client", o.per_client,
                 "storm: messages per client before and after; storm-groups: per group")
      ->capture_default_str();
  app.add_option("--body-bytes", o.body_bytes, "message body size (>= 12)")->capture_default_str();
  app.add_option("--max-connecting", o.max_connecting, "handshakes in flight at once")
      ->capture_default_str();
  app.add_option("--timeout", o.timeout_s, "seconds before a phase counts as failed")
      ->capture_default_str();
  app.add_option("--hold", o.hold_s, "idle: seconds to hold the connections")
      ->capture_default_str();
  app.add_option("--round-trips", o.round_trips, "floor: round trips")->capture_default_str();
  app.add_option("--syncs", o.syncs, "floor: append + fdatasync rounds")->capture_default_str();
  app.add_option("--sync-dir", o.sync_dir, "floor: directory for the fdatasync floor's file");
  app.add_option("--pace-ms", o.pace_ms, "open-loop schedule's tick (libev loop; >= 1)")
      ->check(CLI::Range(1.0, 100.0))
      ->capture_default_str();
  app.add_flag("--tls", o.tls, "connect with wss (accepting a self-signed certificate)");
  app.add_flag("--lws-receive", o.lws_receive,
               "fanout, channel: receive through lws's client parser rather than reading the "
               "sockets directly");
  app.add_option("--groups", o.groups, "fanout, storm-groups: groups")->capture_default_str();
  app.add_option("--members", o.members,
                 "fanout, storm-groups: members per group, creator included")
      ->capture_default_str();
  app.add_option("--other-conversations", o.other_conversations,
                 "receipt-store: the member's direct conversations besides the channel, each "
                 "with a message it has not read; push-store: each user's direct conversations, "
                 "each with two messages the user has not read")
      ->capture_default_str();
  app.add_option("--receipts-ms", o.receipts_ms,
                 "fanout: members send a delivered Receipt for what they received, at most once "
                 "per this many ms (0: none)")
      ->check(CLI::Range(0, 60000))
      ->capture_default_str();
  app.add_option("--viewers", o.viewers, "channel: connected, subscribed members")
      ->capture_default_str();
  app.add_option("--channel-members", o.channel_members,
                 "channel: members in all, poster and viewers included; receipt-store: the "
                 "channel's members")
      ->capture_default_str();
  app.add_option("--add-batch", o.add_batch, "channel: users per AddMembers request")
      ->capture_default_str();
  app.add_option("--conversations-file", o.conversations_file,
                 "history: \"user conversation_id\" lines of the pre-built store");
  app.add_option("--requests", o.requests, "history: History requests in all")
      ->capture_default_str();
  app.add_option("--page", o.page, "history: messages per page")->capture_default_str();
  chat::bench::SdkOptions sdk;
  app.add_option("--store", sdk.store_path,
                 "history-gen, history-store, receipt-store, push-store: the SQLite store file");
  app.add_option("--users", sdk.users, "push-store: users, every one asked for in each call")
      ->capture_default_str();
  app.add_option("--unread-conversations", sdk.unread_conversations,
                 "push-store: of each user's conversations, how many end with two messages it "
                 "has not read; the others end with its answer (-1: all)")
      ->capture_default_str();
  app.add_option("--messages-per-conversation", sdk.messages_per_conversation,
                 "history-gen: messages in each conversation")
      ->capture_default_str();
  app.add_option("--batch", sdk.batch, "history-gen: messages per Append")->capture_default_str();
  app.add_option("--unread", sdk.unread,
                 "receipt-store: posts in the channel that the receipts leave unread")
      ->capture_default_str();
  app.add_option("--burst", sdk.burst,
                 "history-gen: messages a conversation gets in a row before the next one's turn")
      ->capture_default_str();
  app.add_option("--cache-kib", sdk.cache_size_kib,
                 "history-gen, history-store, push-store: SQLite page cache per connection, the "
                 "writer's included (KiB)")
      ->capture_default_str();
  app.add_option("--mmap-bytes", sdk.mmap_size_bytes,
                 "history-gen, history-store, push-store: SQLite memory map per connection (bytes)")
      ->capture_default_str();
  app.add_option("--reads", sdk.reads,
                 "history-store, client: pages read; receipt-store: receipts committed; "
                 "push-store: PushTargets calls")
      ->capture_default_str();
  app.add_option("--sends", sdk.sends, "client: Send() calls")->capture_default_str();
  app.add_option("--url", sdk.url, "client: chatd's ws:// address (empty: no server)");
  app.add_option("--user", sdk.user, "client: user to connect as");
  CLI11_PARSE(app, argc, argv);

  if (o.workload == "history-gen" || o.workload == "history-store" || o.workload == "client" ||
      o.workload == "receipt-store" || o.workload == "push-store") {
    sdk.workload = o.workload;
    sdk.conversations_file = o.conversations_file;
    sdk.conversations = o.conversations;
    sdk.page = o.page;
    sdk.body_bytes = o.body_bytes;
    sdk.secret_file = o.secret_file;
    sdk.label = o.label;
    sdk.timeout_s = o.timeout_s;
    sdk.members = o.channel_members;
    sdk.other_conversations = o.other_conversations;
    if (o.workload == "history-gen") return chat::bench::RunHistoryGen(sdk);
    if (o.workload == "history-store") return chat::bench::RunHistoryStore(sdk);
    if (o.workload == "receipt-store") return chat::bench::RunReceiptStore(sdk);
    if (o.workload == "push-store") return chat::bench::RunPushStore(sdk);
    return chat::bench::RunClient(sdk);
  }

  if (o.workload == "tcp-echo-server") return chat::bench::RunTcpEchoServer(o);
  if (o.workload == "floor") return chat::bench::RunFloor(o);
  if (o.rates.empty()) o.rates = {5000, 10000, 20000, 30000, 40000, 50000, 60000};

  chat::bench::Bench bench(o);
  std::string error;
  if (!bench.Init(&error)) {
    std::fprintf(stderr, "chat-bench: %s\n", error.c_str());
    return 2;
  }
  if (o.workload == "latency") return chat::bench::RunLatency(bench);
  if (o.workload == "direct") return chat::bench::RunDirect(bench);
  if (o.workload == "idle") return chat::bench::RunIdle(bench);
  if (o.workload == "sync") return chat::bench::RunSync(bench);
  if (o.workload == "connect") return chat::bench::RunConnect(bench);
  if (o.workload == "storm") return chat::bench::RunStorm(bench);
  if (o.workload == "storm-groups") return chat::bench::RunStormGroups(bench);
  if (o.workload == "fanout") return chat::bench::RunFanout(bench);
  if (o.workload == "channel") return chat::bench::RunChannel(bench);
  if (o.workload == "history") return chat::bench::RunHistory(bench);
  std::fprintf(stderr, "chat-bench: unknown workload %s\n", o.workload.c_str());
  return 2;
}
