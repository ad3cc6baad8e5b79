// The server runtime: libwebsockets transport, store threads and timers around the sans-IO Hub.
//
// Threads (see include/chat/server.h): the loop thread runs lws_service and owns the Hub, every
// Connection and every lws call except lws_cancel_service. StoreThreads runs the store calls and
// posts completions, then wakes the loop with lws_cancel_service behind an atomic flag, so any
// number of completions costs one wake-up. LWS_CALLBACK_EVENT_WAIT_CANCELLED drains them into
// the Hub.
//
// The loop is libev's (epoll on Linux) rather than lws's default poll(2) loop, whose every
// wake-up scans every descriptor: with 10,000 connections that scan dominated the server's CPU.
// The server owns the libev loop (an lws "foreign" loop), so it can run it one iteration at a time
// and leave it at shutdown, and libev never touches the process's signals.
#include <arpa/inet.h>
#include <ev.h>
#include <libwebsockets.h>
#include <net/if.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "chat/log.h"
#include "chat/server.h"
#include "src/core/codec.h"
#include "src/core/lws_log.h"
#include "src/core/threads.h"
#include "src/core/utf8.h"
#include "src/server/hub.h"
#include "src/server/store_threads.h"

namespace chat {

namespace {

using server::SessionId;

constexpr char kProtocolName[] = "chat.v1";
// One WebSocket write packs queued envelopes up to this size into one Batch frame.
constexpr size_t kMaxWriteBytes = 256 * 1024;
// Hub::Tick period. Never below 10 ms: sub-ms lws timers busy-spin the 4.1 loop.
constexpr uint32_t kTickMs = 100;
// ServerOptions::receive_buffer_bytes. lws answers a ping or a close frame from the first
// buffer's worth of it, so the buffer holds the largest control frame (125 bytes) whole.
constexpr size_t kMinReceiveBufferBytes = 128;
constexpr size_t kMaxReceiveBufferBytes = 64 * 1024;
// The longest a commit group may wait for more messages under load (commit_delay_ms).
constexpr uint32_t kMaxCommitDelayMs = 1000;
// A connection asked to close has this long to take its queued frames and the close frame.
constexpr int kCloseFlushSeconds = 5;
// After the server's close frame, the peer has this long to end its stream (or, where lws still
// reads, answer with its own close frame), and what it still sends meanwhile is read and dropped
// up to kDrainMaxBytes; then the socket is closed anyway. The byte bound is above what Linux
// can hold in flight by default (the peer's send buffer, up to 4 MiB, and our receive buffer,
// up to 6 MiB), so a peer that reads while it writes has read the close frame before a reset
// could destroy it. See docs/server.md, "How a connection is closed".
constexpr int kDrainSeconds = 2;
constexpr size_t kDrainMaxBytes = 16 * 1024 * 1024;
// Once its close frame is written, what a connection sends is read by the server itself (see
// ServerImpl::ReadInsteadOfLws), this much at a time, into one buffer for all connections.
constexpr size_t kDrainReadBytes = 64 * 1024;
// A connection closed before its Hello succeeded (refused with 1013 under overload or past
// max_connections, a Hello timeout, a refused token, an oversized first message) is drained for
// only this long: refusals come in storms, exactly when descriptors must be freed, and a client
// that behaves has sent no more than its Hello (at most max_hello_bytes) and answers the close
// frame within a round trip. lws_set_timeout counts whole seconds (Debian's lws 4.1 declares
// lws_set_timeout_us but does not export it), so this bound is a timer of the wsi.
constexpr lws_usec_t kUnwelcomedDrainUs = 250 * LWS_US_PER_MS;
// Shutdown: how long to wait for submitted appends to commit and be acked, then how long for
// the clients to answer the close frames.
constexpr auto kShutdownCommitWait = std::chrono::seconds(5);
constexpr auto kShutdownCloseWait = std::chrono::seconds(3);
// A refused connection is told to come back after kRetryAfterBaseMs plus up to
// kRetryAfterJitterMs, so a reconnect storm spreads itself out.
constexpr uint32_t kRetryAfterBaseMs = 1000;
constexpr uint32_t kRetryAfterJitterMs = 2000;
// The shared write buffer is released after a write larger than this.
constexpr size_t kKeepWriteCapacity = 1024 * 1024;
// Queued reads past which a Sync or History is refused with UNAVAILABLE.
constexpr size_t kReadQueueMax = 10'000;
// lws_write's frame type for a close frame. lws 4.1 keeps LWS_WRITE_CLOSE (4) out of its public
// enum, between LWS_WRITE_HTTP (3) and LWS_WRITE_PING (5), for its own close path; the server
// writes its close frame itself (see ServerImpl::WriteCloseFrame).
constexpr auto kWriteClose = static_cast<lws_write_protocol>(4);
// A WebSocket close reason is at most 123 bytes.
constexpr size_t kMaxCloseReasonBytes = 123;
// What a queued envelope costs beyond its bytes: its slot in Connection::outbound. Counted
// against max_outbound_bytes with the bytes, so a flood of tiny envelopes is bounded too.
constexpr size_t kQueuedFrameOverhead = sizeof(codec::Frame);

// Per-connection state, created at ESTABLISHED and erased at CLOSED; it lives in
// ServerImpl::connections_ (whose nodes never move) and the wsi's opaque user pointer points at
// it. Kept small: an idle server holds thousands.
// What only some connections need (a message arriving in pieces, the state of a close) is
// allocated when needed.
struct Connection {
  SessionId id = 0;
  lws* wsi = nullptr;
  std::vector<codec::Frame> outbound;  // encoded envelopes waiting for a write
  // What outbound costs: each envelope's bytes plus kQueuedFrameOverhead (see QueuedCost).
  size_t outbound_bytes = 0;
  std::unique_ptr<std::string> rx;  // the message being reassembled from fragments
  uint16_t close_code = 0;
  uint16_t peer_close_code = 0;
  // Envelopes written together are packed into one Batch frame of at most this many KiB: 256
  // (kMaxWriteBytes), or half the client's bound from Hello if smaller (0: one per frame).
  uint16_t pack_limit_kib = kMaxWriteBytes / 1024;
  bool assembling : 1 = false;
  bool rx_text : 1 = false;
  bool format_known : 1 = false;
  bool text : 1 = false;    // the session speaks JSON in text frames
  bool in_hub : 1 = false;  // the Hub knows this session: tell it when the connection goes
  bool closing : 1 = false;
  bool paused : 1 = false;         // reads paused while the writer queue is full
  bool flush_pending : 1 = false;  // listed in ServerImpl::to_flush_
  // Closing: the close frame was written (the peer's input is being drained), and the write
  // side was shut down after it.
  bool close_sent : 1 = false;
  bool write_shut : 1 = false;
  // Hello succeeded: messages up to max_message_bytes, not max_hello_bytes.
  bool welcomed : 1 = false;
};

// With the map's next pointer and key, 64 bytes make an 80-byte node (a jemalloc size class).
static_assert(sizeof(Connection) <= 64, "Connection grew: check the per-connection memory budget");

class ServerImpl;

// A connection the server began closing: few at a time, so kept in ServerImpl::closing_ rather
// than in every Connection.
struct Closing {
  std::string reason;        // of the close frame
  size_t drained_bytes = 0;  // read and dropped since the close began
  // Once the close frame is written, the server reads the socket itself (see
  // ServerImpl::ReadInsteadOfLws); the watcher's data points back here.
  ev_io reader = {};
  ServerImpl* owner = nullptr;
  SessionId id = 0;
  // The drain is over (the peer ended its stream, the stream failed, or the byte bound): the
  // next writeable callback closes the connection.
  bool ended = false;
};

// What one queued envelope counts against max_outbound_bytes. A frame shared by several
// connections counts in full for each.
size_t QueuedCost(const codec::Frame& frame) { return frame->size() + kQueuedFrameOverhead; }

// The close reason fits in a close frame and does not end inside a UTF-8 sequence.
std::string CloseReasonBytes(std::string_view reason) {
  return std::string(Utf8Prefix(reason, kMaxCloseReasonBytes));
}

bool IsAllInterfaces(const std::string& address) {
  return address.empty() || address == "0.0.0.0" || address == "::" || address == "*";
}

// lws quietly listens on every interface when it cannot use the one it was given, so the
// address is checked here: an IP literal must belong to this host, anything else must name an
// interface.
Status CheckListenAddress(const std::string& address) {
  if (IsAllInterfaces(address)) return Status::Ok();
  sockaddr_in v4 = {};
  sockaddr_in6 v6 = {};
  int family = AF_UNSPEC;
  if (inet_pton(AF_INET, address.c_str(), &v4.sin_addr) == 1) {
    v4.sin_family = AF_INET;
    family = AF_INET;
  } else if (inet_pton(AF_INET6, address.c_str(), &v6.sin6_addr) == 1) {
    v6.sin6_family = AF_INET6;
    family = AF_INET6;
  }
  if (family == AF_UNSPEC) {
    if (if_nametoindex(address.c_str()) != 0) return Status::Ok();
    return InvalidArgument("listen_address: not an IP address or interface name: " + address);
  }
  const int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Unavailable("listen_address: cannot create a socket");
  const int rc = family == AF_INET ? bind(fd, reinterpret_cast<sockaddr*>(&v4), sizeof(v4))
                                   : bind(fd, reinterpret_cast<sockaddr*>(&v6), sizeof(v6));
  close(fd);
  if (rc != 0) {
    return InvalidArgument("listen_address: " + address + " is not an address of this host");
  }
  return Status::Ok();
}

Status Positive(uint64_t value, const char* field) {
  if (value == 0) return InvalidArgument(std::string(field) + " must be > 0");
  return Status::Ok();
}

Status Validate(const ServerOptions& o) {
  if (!o.store) return InvalidArgument("store is required");
  if (!o.authenticator) return InvalidArgument("authenticator is required");
  if (o.node_id > 1023) return InvalidArgument("node_id must be <= 1023");
  if (o.tls_cert_path.empty() != o.tls_key_path.empty()) {
    return InvalidArgument("tls_cert_path and tls_key_path must be set together");
  }
  Status address = CheckListenAddress(o.listen_address);
  if (!address.ok()) return address;
  if (!o.tls_cert_path.empty() && access(o.tls_cert_path.c_str(), R_OK) != 0) {
    return InvalidArgument("tls_cert_path: cannot read " + o.tls_cert_path);
  }
  if (!o.tls_key_path.empty() && access(o.tls_key_path.c_str(), R_OK) != 0) {
    return InvalidArgument("tls_key_path: cannot read " + o.tls_key_path);
  }
  if (o.receive_buffer_bytes < kMinReceiveBufferBytes ||
      o.receive_buffer_bytes > kMaxReceiveBufferBytes) {
    return InvalidArgument("receive_buffer_bytes must be in " +
                           std::to_string(kMinReceiveBufferBytes) + ".." +
                           std::to_string(kMaxReceiveBufferBytes));
  }
  const std::pair<uint64_t, const char*> positive[] = {
      {o.max_message_bytes, "max_message_bytes"},
      {o.max_body_bytes, "max_body_bytes"},
      {o.hello_timeout_ms, "hello_timeout_ms"},
      {o.idle_timeout_ms, "idle_timeout_ms"},
      {o.heartbeat_interval_ms, "heartbeat_interval_ms"},
      {o.max_outbound_bytes, "max_outbound_bytes"},
      {o.messages_per_second, "messages_per_second"},
      {o.messages_burst, "messages_burst"},
      {o.bytes_per_second, "bytes_per_second"},
      {o.max_devices_per_user, "max_devices_per_user"},
      {o.max_pending_connections, "max_pending_connections"},
      {o.max_connections, "max_connections"},
      {o.history_page_max, "history_page_max"},
      {o.sync_page_max, "sync_page_max"},
      {o.sync_catchup_max, "sync_catchup_max"},
      {o.commit_batch_max, "commit_batch_max"},
      {o.writer_queue_max, "writer_queue_max"},
      {o.reader_threads, "reader_threads"},
      {o.max_channel_subscriptions, "max_channel_subscriptions"},
      {o.typing_expires_ms, "typing_expires_ms"},
      {o.presence_coalesce_ms, "presence_coalesce_ms"},
      {o.max_presence_subscriptions, "max_presence_subscriptions"},
  };
  for (const auto& [value, field] : positive) {
    Status s = Positive(value, field);
    if (!s.ok()) return s;
  }
  if (o.max_hello_bytes < 1024) return InvalidArgument("max_hello_bytes must be >= 1024");
  if (o.heartbeat_interval_ms >= o.idle_timeout_ms) {
    // Clients heartbeat at this interval; at or above the idle timeout they would be closed.
    return InvalidArgument("heartbeat_interval_ms must be < idle_timeout_ms");
  }
  if (o.presence_ttl_ms <= o.heartbeat_interval_ms) {
    // A client heartbeating on time must never look silent.
    return InvalidArgument("presence_ttl_ms must be > heartbeat_interval_ms");
  }
  if (o.retention_ms < 0) return InvalidArgument("retention_ms must not be negative");
  if (o.retention_resend_window_ms < 0) {
    return InvalidArgument("retention_resend_window_ms must not be negative");
  }
  if (o.commit_delay_ms > kMaxCommitDelayMs) {
    // A wait for company longer than this only holds acks back (and a graceful stop's).
    return InvalidArgument("commit_delay_ms must be <= " + std::to_string(kMaxCommitDelayMs));
  }
  if (Status s = Positive(o.retention_batch_max, "retention_batch_max"); !s.ok()) return s;
  return Status::Ok();
}

// A standard-layout holder, so the timer callback can get back to its server from the sul.
struct TickTimer {
  lws_sorted_usec_list_t sul;
  ServerImpl* owner;
};

// The lws per-session memory of the HTTP protocol (plain data: lws zeroes it).
struct HttpState {
  int healthz_pending;
};

class ServerImpl final : public Server, private server::HubIo {
 public:
  explicit ServerImpl(ServerOptions options)
      : options_(std::move(options)), rng_(std::random_device{}()) {}

  ~ServerImpl() override {
    Shutdown();
    // Open without Run/Start: nothing ran on another thread, so destroy here.
    DestroyContext();
    if (loop_ != nullptr) ev_loop_destroy(loop_);
  }

  Status Init() {
    RouteLwsLogs();

    server::HubIo* io = this;
    hub_ = std::make_unique<server::Hub>(options_, options_.store->Epoch(), io);
    server::StoreThreadsOptions store_options;
    store_options.commit_batch_max = options_.commit_batch_max;
    store_options.commit_delay_ms = options_.commit_delay_ms;
    store_options.commit_delay_min_batch = options_.commit_delay_min_batch;
    store_options.append_queue_soft_max = options_.writer_queue_max;
    store_options.reader_threads = options_.reader_threads;
    // Reads pause at writer_queue_max; the hard bound leaves room for what was already read.
    store_options.append_queue_max = 2 * options_.writer_queue_max;
    store_options.read_queue_max = kReadQueueMax;
    store_options.overload_retry_after_ms = kRetryAfterBaseMs;
    store_options.retention_sweep = options_.retention_sweep_interval_ms > 0;
    store_options.retention_ms = options_.retention_ms;
    store_options.retention_sweep_interval_ms = options_.retention_sweep_interval_ms;
    store_options.retention_batch_max = options_.retention_batch_max;
    store_options.retention_resend_window_ms = options_.retention_resend_window_ms;
    // Messages are stamped with this clock's wall time, so expiry is measured by it too.
    store_options.wall_ms = [clock = options_.clock] { return clock->WallMs(); };
    store_threads_ =
        std::make_unique<server::StoreThreads>(options_.store, store_options, [this] { Wake(); });

    protocols_[0] = {};
    protocols_[0].name = "http";
    protocols_[0].callback = &ServerImpl::HttpCallback;
    protocols_[0].per_session_data_size = sizeof(HttpState);
    protocols_[1] = {};
    protocols_[1].name = kProtocolName;
    protocols_[1].callback = &ServerImpl::ChatCallback;
    // No per-session data: the Connection is found through the wsi's opaque user pointer,
    // which saves lws a block per connection.
    protocols_[1].per_session_data_size = 0;
    // Larger messages arrive in pieces and are reassembled in OnReceive.
    protocols_[1].rx_buffer_size = options_.receive_buffer_bytes;
    // Without it lws caps one send() at rx_buffer_size and copies the rest of a write into its
    // own buffer, drained one such piece per POLLOUT.
    protocols_[1].tx_packet_size = kMaxWriteBytes;
    protocols_[2] = {};

    const bool tls = !options_.tls_cert_path.empty();
    lws_context_creation_info info;
    std::memset(&info, 0, sizeof(info));
    info.options = LWS_SERVER_OPTION_EXPLICIT_VHOSTS;
    if (tls) info.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
    info.port = CONTEXT_PORT_NO_LISTEN;
    info.gid = -1;
    info.uid = -1;
    info.user = this;
    lws_context* context = nullptr;
    // The signal mask is the application's (chatd waits for its signals on a thread of its own).
    loop_ = ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
    if (loop_ != nullptr) {
      void* foreign_loops[1] = {loop_};
      info.options |= LWS_SERVER_OPTION_LIBEV;
      info.foreign_loops = foreign_loops;
      context = lws_create_context(&info);
      info.options &= ~static_cast<uint64_t>(LWS_SERVER_OPTION_LIBEV);
      info.foreign_loops = nullptr;
      if (context == nullptr) {
        ev_loop_destroy(loop_);
        loop_ = nullptr;
      }
    }
    if (context == nullptr) {
      // Without libev's lws plugin (Debian: libwebsockets-evlib-ev) lws's own poll loop still
      // works, only slower with many connections.
      Log(LogLevel::kWarn, "chat: the libev event loop is unavailable; using poll(2)");
      context = lws_create_context(&info);
    }
    if (context == nullptr) return Unavailable("cannot create the libwebsockets context");
    {
      std::lock_guard<std::mutex> lock(ctx_mu_);
      ctx_ = context;
    }

    lws_context_creation_info vinfo;
    std::memset(&vinfo, 0, sizeof(vinfo));
    vinfo.port = options_.port;
    vinfo.iface =
        IsAllInterfaces(options_.listen_address) ? nullptr : options_.listen_address.c_str();
    vinfo.protocols = protocols_;
    vinfo.options = LWS_SERVER_OPTION_FAIL_UPON_UNABLE_TO_BIND;
    in_addr v4;
    if (vinfo.iface != nullptr && inet_pton(AF_INET, vinfo.iface, &v4) == 1) {
      // On an IPv6 socket lws 4.1 does not resolve an IPv4 literal and listens on every
      // interface instead; an IPv4 socket binds to exactly that address.
      vinfo.options |= LWS_SERVER_OPTION_DISABLE_IPV6;
    }
    vinfo.vhost_name = "chat";
    // No lws validity pings: the Hub's heartbeat and idle timeout detect dead peers already, and
    // lws re-arms a per-connection validity timer on every received frame by a sorted insert
    // into one list of all connections' timers, a walk of every connection each time.
    static const lws_retry_bo_t kNoValidityChecks = {};
    vinfo.retry_and_idle_policy = &kNoValidityChecks;
    if (tls) {
      // lws 4.1 enables TLS on a vhost only if its own options carry the global-init flag.
      vinfo.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
      vinfo.ssl_cert_filepath = options_.tls_cert_path.c_str();
      vinfo.ssl_private_key_filepath = options_.tls_key_path.c_str();
      // HTTP/1.1 only: lws would otherwise offer h2, and WebSocket over HTTP/2 (RFC 8441) is
      // not what the runtime's writes are made for (they write outside lws's writeable
      // callback, which h2 streams do not allow).
      vinfo.alpn = "http/1.1";
    }
    vhost_ = lws_create_vhost(context, &vinfo);
    const std::string where = options_.listen_address + ":" + std::to_string(options_.port);
    if (vhost_ == nullptr) {
      return Unavailable("cannot listen on " + where + (tls ? " (or load the TLS files)" : ""));
    }
    const int bound = lws_get_vhost_listen_port(vhost_);
    if (bound <= 0 || bound > 65535) return Unavailable("cannot listen on " + where);
    port_.store(static_cast<uint16_t>(bound));
    tls_ = tls;
    return Status::Ok();
  }

  Status Run() override {
    if (started_.exchange(true)) return FailedPrecondition("Run or Start was already called");
    return RunLoop();
  }

  Status Start() override {
    if (started_.exchange(true)) return FailedPrecondition("Run or Start was already called");
    std::lock_guard<std::mutex> lock(join_mu_);
    // Start() has no caller to return the reason to; RunLoop logs it.
    thread_ = StartThreadWithSignalsBlocked("chat-server", [this] { (void)RunLoop(); });
    return Status::Ok();
  }

  void Shutdown() override {
    shutdown_requested_.store(true);
    WakeUnconditionally();
    // The Start() thread is joined by whoever shuts down, unless that is the loop itself.
    std::lock_guard<std::mutex> lock(join_mu_);
    if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
  }

  uint16_t port() const override { return port_.load(); }

 private:
  enum class Phase { kServing, kCommitting, kClosing, kDone };

  // ---- Loop -------------------------------------------------------------------------------

  Status RunLoop() {
    Status result;
    store_threads_->Start();
    Log(LogLevel::kInfo, std::string("chat: serving on ") + (tls_ ? "wss" : "ws") + "://" +
                             options_.listen_address + ":" + std::to_string(port()));
    tick_.owner = this;
    lws_sul_schedule(ctx_, 0, &tick_.sul, &ServerImpl::OnTick, kTickMs * LWS_US_PER_MS);
    AdvanceShutdown();
    while (phase_ != Phase::kDone) {
      if (loop_ != nullptr) {
        // One iteration at a time, so the phase is checked after every batch of events.
        ev_run(loop_, EVRUN_ONCE);
        EndIteration();
        continue;
      }
      if (lws_service(ctx_, 0) < 0) {
        Log(LogLevel::kError, "chat: the event loop failed; stopping");
        result = Internal("the event loop failed");
        break;
      }
      EndIteration();
    }
    FlushAppends();
    lws_sul_cancel(&tick_.sul);
    // Accepted appends are committed before the writer exits, so a client that resends them
    // gets its original result; nobody is left to ack them now.
    store_threads_->Stop();
    DestroyContext();
    Log(LogLevel::kInfo, "chat: server stopped");
    return result;
  }

  void DestroyContext() {
    lws_context* context = nullptr;
    {
      std::lock_guard<std::mutex> lock(ctx_mu_);
      context = ctx_;
      ctx_ = nullptr;
    }
    // CLOSED callbacks run inside; they find the Hub still alive.
    if (context != nullptr) lws_context_destroy(context);
    connections_.clear();
    for (auto& [id, closing] : closing_) StopReading(closing);
    closing_.clear();
  }

  // Called from any thread. Coalesces: one lws_cancel_service per drain of the loop.
  void Wake() {
    if (wake_pending_.exchange(true)) return;
    WakeUnconditionally();
  }

  void WakeUnconditionally() {
    std::lock_guard<std::mutex> lock(ctx_mu_);
    if (ctx_ != nullptr) lws_cancel_service(ctx_);
  }

  static void OnTick(lws_sorted_usec_list_t* sul) {
    TickTimer* timer = reinterpret_cast<TickTimer*>(sul);
    ServerImpl* self = timer->owner;
    self->hub_->Tick();
    // A backstop: a drain normally resumes paused reads, and this catches a wake-up merged
    // into one whose drain had already read the pending count.
    self->ResumeReadsIfDrained();
    self->AdvanceShutdown();
    if (self->phase_ != Phase::kDone) {
      lws_sul_schedule(self->ctx_, 0, &timer->sul, &ServerImpl::OnTick, kTickMs * LWS_US_PER_MS);
    }
  }

  void DrainCompletions() {
    // An exchange (acquire), not a store: it reads the writer's Wake, so the pending count
    // that the writer lowered before that Wake is seen below.
    (void)wake_pending_.exchange(false);
    store_threads_->TakeCompletions(&appends_done_, &reads_done_, &expired_done_);
    for (server::AppendDone& done : appends_done_) {
      // A failure may have held its connection back after the connection closed (and was
      // forgotten): forget it again, or the hold would stay.
      if (!done.commit_status.ok() && done.session != 0 && !connections_.contains(done.session)) {
        store_threads_->ForgetSession(done.session);
      }
      hub_->OnAppendDone(done.token, done.commit_status, std::move(done.result));
    }
    for (server::ReadDone& done : reads_done_) {
      hub_->OnReadDone(done.token, std::move(done.result));
    }
    // After the appends: those committed before a sweep are delivered before its notice.
    if (!expired_done_.empty()) hub_->OnMessagesExpired(expired_done_);
    appends_done_.clear();
    reads_done_.clear();
    expired_done_.clear();
    ResumeReadsIfDrained();
  }

  // Shutdown runs as phases on the loop: stop accepting and pause reads, wait for the
  // submitted appends to be committed and acked, close every session (1001) after its queued
  // frames, wait for the connections to go, then leave the loop.
  void AdvanceShutdown() {
    const auto now = std::chrono::steady_clock::now();
    if (phase_ == Phase::kServing) {
      if (!shutdown_requested_.load()) return;
      Log(LogLevel::kInfo, "chat: shutting down");
      phase_ = Phase::kCommitting;
      deadline_ = now + kShutdownCommitWait;
      for (auto& [id, conn] : connections_) {
        if (!conn.paused && !conn.closing) {
          conn.paused = true;
          lws_rx_flow_control(conn.wsi, 0);
        }
      }
    }
    if (phase_ == Phase::kCommitting) {
      if (hub_->pending_appends() > 0 && now < deadline_) return;
      if (hub_->pending_appends() > 0) {
        Log(LogLevel::kWarn, "chat: shutdown: " + std::to_string(hub_->pending_appends()) +
                                 " messages still committing; their senders get no ack");
      }
      // Reads resume so the peers' close answers are seen; frames after CloseAll are dropped.
      for (auto& [id, conn] : connections_) {
        if (conn.paused) {
          conn.paused = false;
          lws_rx_flow_control(conn.wsi, 1);
        }
      }
      paused_.clear();
      hub_->CloseAll();
      phase_ = Phase::kClosing;
      deadline_ = now + kShutdownCloseWait;
    }
    if (phase_ == Phase::kClosing) {
      if (!connections_.empty() && now < deadline_) return;
      phase_ = Phase::kDone;
    }
  }

  void EndIteration() {
    ForgetClosing();
    FlushAppends();
    FlushWrites();
  }

  // The Hub forgets a session the runtime began closing on its own (slow consumer, 1009) at the
  // end of the iteration, not when the close completes: a peer that does not read may keep the
  // connection for kCloseFlushSeconds, and presence and push would count its user online
  // meanwhile. Not at once, since the close may begin inside a Hub call (Send).
  void ForgetClosing() {
    while (!to_forget_.empty()) {
      std::vector<SessionId> ids;
      ids.swap(to_forget_);
      for (SessionId id : ids) hub_->OnClose(id);  // may begin more closes
    }
  }

  void ResumeReadsIfDrained() {
    if (paused_.empty() || phase_ != Phase::kServing) return;
    if (AppendsPending() * 2 >= options_.writer_queue_max) return;
    for (SessionId id : paused_) {
      auto it = connections_.find(id);
      if (it == connections_.end() || !it->second.paused) continue;
      it->second.paused = false;
      lws_rx_flow_control(it->second.wsi, 1);
    }
    paused_.clear();
  }

  // ---- HubIo ------------------------------------------------------------------------------

  void Send(SessionId session, codec::Frame frame) override {
    auto it = connections_.find(session);
    if (it == connections_.end() || frame == nullptr) return;
    Connection& conn = it->second;
    if (conn.closing) return;
    // One frame always fits an empty queue, so a large reply (a full sync page) can be sent;
    // the bound applies to what piles up behind it.
    if (!conn.outbound.empty() &&
        conn.outbound_bytes + QueuedCost(frame) > options_.max_outbound_bytes) {
      Log(LogLevel::kWarn, "chat: session " + std::to_string(session) +
                               " closed as a slow consumer (" +
                               std::to_string(conn.outbound_bytes) + " bytes queued)");
      conn.outbound.clear();
      conn.outbound_bytes = 0;
      BeginClose(conn, server::kCloseSlowConsumer, "slow consumer");
      return;
    }
    conn.outbound_bytes += QueuedCost(frame);
    conn.outbound.push_back(std::move(frame));
    if (!conn.flush_pending) {
      conn.flush_pending = true;
      to_flush_.push_back(session);
    }
  }

  // At the end of every loop iteration, each connection that was sent something writes it at
  // once, everything queued in one frame: no round through the event loop for a WRITEABLE
  // callback, so no epoll_ctl to ask for POLLOUT and another to drop it. lws takes a write
  // outside its callback (4.1: it buffers what the socket does not accept and asks for
  // WRITEABLE itself); a connection with such a remainder, or more than one write's worth
  // queued, or a close under way, goes through the WRITEABLE callback as before.
  void FlushWrites() {
    for (SessionId id : to_flush_) {
      auto it = connections_.find(id);
      if (it == connections_.end()) continue;
      Connection& conn = it->second;
      conn.flush_pending = false;
      if (conn.closing || conn.outbound.empty()) continue;
      if (lws_partial_buffered(conn.wsi) != 0) {
        lws_callback_on_writable(conn.wsi);
        continue;
      }
      if (!WriteQueued(conn)) {
        // Outside a callback a failed connection cannot be closed by returning -1.
        lws_set_timeout(conn.wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
        continue;
      }
      if (!conn.outbound.empty()) lws_callback_on_writable(conn.wsi);
    }
    to_flush_.clear();
  }

  void Welcomed(SessionId session, size_t client_max_bytes) override {
    auto it = connections_.find(session);
    if (it == connections_.end()) return;
    it->second.welcomed = true;
    if (client_max_bytes == 0) return;
    // Half, for the Batch's own framing; under 2 KiB that is 0: each envelope goes alone.
    it->second.pack_limit_kib =
        static_cast<uint16_t>(std::min<size_t>(client_max_bytes / 2 / 1024, kMaxWriteBytes / 1024));
  }

  void Close(SessionId session, int code, std::string_view reason) override {
    auto it = connections_.find(session);
    if (it == connections_.end()) return;
    Connection& conn = it->second;
    conn.in_hub = false;  // the Hub has forgotten it already
    if (conn.closing) return;
    BeginClose(conn, code, reason);
  }

  // Appends wait here until the end of the loop iteration, then go to the writer together: one
  // wake-up of the writer per iteration instead of one per message, and everything that arrived
  // in one pass over the ready connections becomes one commit group (one fsync with FULL).
  void SubmitAppend(server::AppendJob job) override {
    batched_appends_.push_back(std::move(job));
    // The session whose frame produced this append stops being read until the writer catches
    // up; its data waits in the kernel, and TCP pushes back on the client. Not one whose close
    // began (within a Batch, after a slow-consumer close): its input is drained, not paused.
    if (current_ != nullptr && !current_->paused && !current_->closing &&
        AppendsPending() >= options_.writer_queue_max) {
      current_->paused = true;
      paused_.push_back(current_->id);
      lws_rx_flow_control(current_->wsi, 0);
    }
  }

  void SubmitRead(server::ReadJob job) override { store_threads_->SubmitRead(std::move(job)); }

  void FlushAppends() {
    if (!batched_appends_.empty()) store_threads_->SubmitAppends(&batched_appends_);
  }

  // Accepted appends not yet completed, including those waiting for the end of the iteration.
  size_t AppendsPending() const {
    return store_threads_->appends_pending() + batched_appends_.size();
  }

  // ---- Connections ------------------------------------------------------------------------

  void BeginClose(Connection& conn, int code, std::string_view reason) {
    conn.closing = true;
    if (conn.in_hub) {
      conn.in_hub = false;
      to_forget_.push_back(conn.id);
    }
    conn.close_code = static_cast<uint16_t>(code);
    closing_[conn.id].reason = CloseReasonBytes(reason);
    if (conn.paused) {
      // The peer's answer to the close frame must be read.
      conn.paused = false;
      lws_rx_flow_control(conn.wsi, 1);
    }
    // A peer that does not read its queued frames is dropped after a while.
    lws_set_timeout(conn.wsi, PENDING_TIMEOUT_USER_OK, kCloseFlushSeconds);
    lws_callback_on_writable(conn.wsi);
  }

  // The server's side of the closing handshake, by hand: lws 4.1, asked to close (a callback
  // returning -1 after lws_close_reason), writes the close frame and closes the socket at once,
  // with whatever the peer is still sending unread. The kernel answers that input with a reset,
  // and a peer still writing (the rest of an oversized message, say) fails its write and drops
  // the connection, usually before it read the close frame: it sees 1006, not the code.
  // So the close frame is written here, the write side is shut down after it (the peer reads
  // the frame, then the end of the stream), and the connection stays open, its input read and
  // dropped, until the peer ends the stream (or, where lws still reads, answers with its close
  // frame: see ReadInsteadOfLws); at most kDrainSeconds (kUnwelcomedDrainUs before Hello
  // succeeded) and kDrainMaxBytes. Returns false when the write failed.
  bool WriteCloseFrame(Connection& conn) {
    auto it = closing_.find(conn.id);
    const std::string_view reason =
        it != closing_.end() ? std::string_view(it->second.reason) : std::string_view();
    unsigned char buffer[LWS_PRE + 2 + kMaxCloseReasonBytes];
    unsigned char* payload = buffer + LWS_PRE;
    payload[0] = static_cast<unsigned char>(conn.close_code >> 8);
    payload[1] = static_cast<unsigned char>(conn.close_code & 0xff);
    std::memcpy(payload + 2, reason.data(), reason.size());
    // lws_close_reason is not called: lws sends no close frame of its own when it closes the
    // connection later.
    if (lws_write(conn.wsi, payload, 2 + reason.size(), kWriteClose) < 0) return false;
    conn.close_sent = true;
    lws_set_timeout(conn.wsi, PENDING_TIMEOUT_USER_OK, kDrainSeconds);
    if (!conn.welcomed) lws_set_timer_usecs(conn.wsi, kUnwelcomedDrainUs);
    if (it != closing_.end()) ReadInsteadOfLws(conn, it->second);
    ShutWriteWhenFlushed(conn);
    return true;
  }

  // After the close frame lws must not see the peer's input: lws 4.1 answers a PING by itself,
  // with a PONG written at the next writeable event, and tells the application nothing (its
  // server side has no callback for a PING, and lws_close_reason, which makes its client side
  // drop PINGs, does not stop its server side from answering them). Nothing may follow a close
  // frame, and on plain TCP the write side is shut: the PONG's write fails and lws closes the
  // socket at once, with the peer's input unread, so the kernel answers with a reset (a client
  // that pings while it uploads fails its next write and never reads the close frame).
  // So lws stops reading here (its reads are paused for good) and the server reads and drops
  // what the peer sends itself, until the peer ends its stream: it has the close frame and
  // then the end of the server's stream, and ends its own after answering (its answer is
  // dropped unseen with the rest). The bounds of the drain end it as before. Over TLS the
  // records are decrypted with lws's own SSL object (the server's side stays open, see
  // ShutWriteWhenFlushed). lws's own poll loop (without the libev plugin) has no watcher to
  // give: there lws goes on reading, and a PING is still answered after the close frame.
  void ReadInsteadOfLws(Connection& conn, Closing& closing) {
    if (loop_ == nullptr) return;
    lws_rx_flow_control(conn.wsi, 0);
    // For good: a pause for the writer's queue must not be lifted later (lws would then read
    // alongside the watcher, from the middle of a frame).
    conn.paused = false;
    closing.owner = this;
    closing.id = conn.id;
    ev_io_init(&closing.reader, &ServerImpl::OnDrainReadable, lws_get_socket_fd(conn.wsi), EV_READ);
    closing.reader.data = &closing;
    ev_io_start(loop_, &closing.reader);
    // What the TLS library holds from before lws stopped reading is not news to the socket.
    SSL* ssl = tls_ ? lws_get_ssl(conn.wsi) : nullptr;
    if (ssl != nullptr && SSL_has_pending(ssl) == 1) ReadAndDrop(closing);
  }

  static void OnDrainReadable(struct ev_loop* /*loop*/, ev_io* watcher, int /*revents*/) {
    auto* closing = static_cast<Closing*>(watcher->data);
    closing->owner->ReadAndDrop(*closing);
  }

  // One read per wake-up, as lws reads each connection once per loop iteration.
  void ReadAndDrop(Closing& closing) {
    auto it = connections_.find(closing.id);
    if (it == connections_.end()) {
      StopReading(closing);
      return;
    }
    drain_buffer_.resize(kDrainReadBytes);
    bool peer_ended = false;  // over TLS: the end came with the bytes read
    const ssize_t n = tls_ ? ReadTls(it->second.wsi, &peer_ended)
                           : recv(closing.reader.fd, drain_buffer_.data(), drain_buffer_.size(), 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (n > 0 && Drain(&it->second, static_cast<size_t>(n)) == 0 && !peer_ended) return;
    // The peer ended its stream (all it sent was read: the socket closes without a reset), or
    // the stream failed, or the peer sent past kDrainMaxBytes. The close happens in the next
    // writeable callback (the write side is shut, so the socket is writeable at once): lws
    // closes a connection at once only from inside one of its callbacks, and a timeout set from
    // here would wait for lws's next timer pass, up to 100 ms away.
    StopReading(closing);
    closing.ended = true;
    lws_callback_on_writable(it->second.wsi);
  }

  // One read into drain_buffer_ through the connection's TLS session, as recv(2) answers: the
  // bytes decrypted (every record the socket holds, up to the buffer's size), or -1 with errno
  // EAGAIN when no record is complete yet. `*ended` is set when the stream ended after what was
  // read: the peer's close_notify, the end of the TCP stream, or a failed session (a peer that
  // sends its close frame and close_notify together has nothing more to send).
  ssize_t ReadTls(lws* wsi, bool* ended) {
    SSL* ssl = lws_get_ssl(wsi);
    if (ssl == nullptr) {
      *ended = true;
      return 0;
    }
    size_t total = 0;
    while (total < drain_buffer_.size()) {
      ERR_clear_error();
      const int cap = static_cast<int>(std::min<size_t>(drain_buffer_.size() - total, INT_MAX));
      const int n = SSL_read(ssl, drain_buffer_.data() + total, cap);
      if (n > 0) {
        total += static_cast<size_t>(n);
        continue;
      }
      const int error = SSL_get_error(ssl, n);
      if (error != SSL_ERROR_WANT_READ && error != SSL_ERROR_WANT_WRITE) *ended = true;
      break;
    }
    ERR_clear_error();  // nothing of the drain's is left in this thread's queue for lws's calls
    if (total > 0 || *ended) return static_cast<ssize_t>(total);
    errno = EAGAIN;
    return -1;
  }

  void StopReading(Closing& closing) {
    if (ev_is_active(&closing.reader)) ev_io_stop(loop_, &closing.reader);
  }

  // Shuts the write side down once lws has written all of the close frame (it keeps what the
  // socket did not take and asks for WRITEABLE to write it).
  void ShutWriteWhenFlushed(Connection& conn) {
    if (lws_partial_buffered(conn.wsi) != 0) {
      lws_callback_on_writable(conn.wsi);
      return;
    }
    if (!tls_) {
      conn.write_shut = true;
      shutdown(lws_get_socket_fd(conn.wsi), SHUT_WR);
      return;
    }
    // Over TLS the end of the stream is TLS's close_notify (a FIN under the session would make
    // the peer's TLS library report a truncated stream), and the socket stays open both ways.
    // It goes now where the server reads the drain itself; where lws goes on reading (its own
    // poll loop), lws could still have a PONG to write, so it goes when lws closes the socket.
    SSL* ssl = lws_get_ssl(conn.wsi);
    if (loop_ != nullptr && ssl != nullptr) {
      ERR_clear_error();
      const int done = SSL_shutdown(ssl);
      const int error = done < 0 ? SSL_get_error(ssl, done) : SSL_ERROR_NONE;
      ERR_clear_error();
      if (error == SSL_ERROR_WANT_WRITE) {
        lws_callback_on_writable(conn.wsi);  // the socket is full: the rest of it goes then
        return;
      }
    }
    conn.write_shut = true;
  }

  // Input that arrives after a close began is read and dropped (see WriteCloseFrame). Returns
  // -1, which closes the socket, once the peer sent more than kDrainMaxBytes of it.
  int Drain(Connection* conn, size_t len) {
    auto it = closing_.find(conn->id);
    if (it == closing_.end()) return -1;
    it->second.drained_bytes += len;
    if (it->second.drained_bytes <= kDrainMaxBytes) return 0;
    Log(LogLevel::kWarn, "chat: session " + std::to_string(conn->id) + " sent over " +
                             std::to_string(kDrainMaxBytes) + " bytes after its close began");
    return -1;
  }

  int OnEstablished(lws* wsi) {
    if (phase_ != Phase::kServing) return -1;
    const SessionId id = ++last_session_id_;
    Connection* conn = &connections_[id];
    conn->id = id;
    conn->wsi = wsi;
    lws_set_opaque_user_data(wsi, conn);
    // Looking the peer up costs a system call per connection: only when the line is kept.
    if (GetLogLevel() <= LogLevel::kInfo) {
      char peer[64] = {};
      const char* name = lws_get_peer_simple(wsi, peer, sizeof(peer));
      Log(LogLevel::kInfo, "chat: connect session=" + std::to_string(conn->id) +
                               " peer=" + (name != nullptr ? name : "?"));
    }

    const bool overloaded = AppendsPending() >= options_.writer_queue_max;
    if (!overloaded && hub_->OnOpen(conn->id)) {
      conn->in_hub = true;
      return 0;
    }
    // Refused: say why and when to come back, then close with 1013.
    Status refusal = Unavailable(overloaded ? "server overloaded, try again later"
                                            : "too many connections, try again later");
    refusal.set_retry_after_ms(
        kRetryAfterBaseMs + std::uniform_int_distribution<uint32_t>(0, kRetryAfterJitterMs)(rng_));
    Log(LogLevel::kWarn, "chat: session " + std::to_string(conn->id) +
                             " refused: " + std::string(refusal.message()));
    codec::Frame frame =
        codec::EncodeShared(codec::ErrorEnvelope(0, refusal), codec::Format::kBinary);
    conn->outbound_bytes = QueuedCost(frame);
    conn->outbound.push_back(std::move(frame));
    BeginClose(*conn, server::kCloseTryAgainLater, "try again later");
    return 0;
  }

  void OnClosed(lws* wsi) {
    auto* conn = static_cast<Connection*>(lws_get_opaque_user_data(wsi));
    if (conn == nullptr) return;
    lws_set_opaque_user_data(wsi, nullptr);
    const int code = conn->closing                ? conn->close_code
                     : conn->peer_close_code != 0 ? conn->peer_close_code
                                                  : 1006;
    if (GetLogLevel() <= LogLevel::kInfo) {
      Log(LogLevel::kInfo, "chat: disconnect session=" + std::to_string(conn->id) + " code=" +
                               std::to_string(code) + (conn->closing ? " (server)" : " (peer)"));
    }
    if (conn->in_hub) hub_->OnClose(conn->id);
    if (current_ == conn) current_ = nullptr;
    const SessionId id = conn->id;
    // Its messages of this loop pass go to the writer before its hold is forgotten, so one
    // sent after a refused one is refused, not stored ahead of it.
    FlushAppends();
    store_threads_->ForgetSession(id);
    // Before lws closes the descriptor (CLOSED comes first).
    if (auto it = closing_.find(id); it != closing_.end()) StopReading(it->second);
    closing_.erase(id);
    connections_.erase(id);  // conn is gone from here on
    if (phase_ == Phase::kClosing && connections_.empty()) AdvanceShutdown();
  }

  int OnReceive(Connection* conn, const char* data, size_t len) {
    // After a close was asked for, nothing more is read into the Hub.
    if (conn->closing) return Drain(conn, len);
    if (!conn->assembling) {
      conn->assembling = true;
      conn->rx_text = !lws_frame_is_binary(conn->wsi);
      conn->rx.reset();
    }
    const bool final = lws_is_final_fragment(conn->wsi) != 0;
    // The frame's announced remainder counts too, so a huge frame is refused at its start.
    const size_t assembled = conn->rx != nullptr ? conn->rx->size() : 0;
    const size_t announced = assembled + len + lws_remaining_packet_payload(conn->wsi);
    // Before Hello a connection is unauthenticated: it may hold only a Hello's worth.
    const size_t limit = conn->welcomed
                             ? options_.max_message_bytes
                             : std::min(options_.max_message_bytes, options_.max_hello_bytes);
    if (announced > limit) {
      Log(LogLevel::kWarn, "chat: session " + std::to_string(conn->id) + " sent a message over " +
                               (conn->welcomed ? "max_message_bytes" : "max_hello_bytes") +
                               "; closing with 1009");
      conn->rx.reset();
      conn->assembling = false;
      // The peer is most likely still sending the rest of the message: it is read and dropped
      // while the close frame goes out (see WriteCloseFrame), not answered with a reset.
      BeginClose(*conn, server::kCloseTooLarge, "message too large");
      return 0;
    }
    if (final && assembled == 0) {
      // The common case: the whole message in one piece, handed over without a copy.
      conn->assembling = false;
      Deliver(conn, std::string_view(data, len));
      return 0;
    }
    // Released after the message: an idle connection keeps no reassembly buffer.
    if (conn->rx == nullptr) conn->rx = std::make_unique<std::string>();
    conn->rx->append(data, len);
    if (!final) return 0;
    conn->assembling = false;
    const std::unique_ptr<std::string> message = std::move(conn->rx);
    Deliver(conn, *message);
    return 0;
  }

  void Deliver(Connection* conn, std::string_view bytes) {
    if (!conn->format_known) {
      // The Hub picks the session's format from its first message the same way.
      conn->format_known = true;
      conn->text = conn->rx_text;
    }
    if (!conn->in_hub) return;
    current_ = conn;
    hub_->OnFrame(conn->id, bytes, conn->rx_text);
    current_ = nullptr;
  }

  // Writes the queued envelopes that fit in one write (several packed in one Batch frame) and
  // drops them from the queue; false when the write failed.
  bool WriteQueued(Connection& conn) {
    size_t n = 0;
    size_t bytes = 0;
    size_t cost = 0;  // of the envelopes written, as counted in outbound_bytes
    const size_t limit = size_t{conn.pack_limit_kib} * 1024;
    while (n < conn.outbound.size() && (n == 0 || bytes + conn.outbound[n]->size() <= limit)) {
      bytes += conn.outbound[n]->size();
      cost += QueuedCost(conn.outbound[n]);
      ++n;
    }
    const codec::Format format = conn.text ? codec::Format::kJson : codec::Format::kBinary;
    // A lone envelope is written as it is (what PackBatch would return) without the
    // intermediate copy; lws needs LWS_PRE bytes of headroom, hence the one copy that stays.
    std::string packed;
    const std::string* payload = conn.outbound.front().get();
    if (n > 1) {
      packed = codec::PackBatch(std::span<const codec::Frame>(conn.outbound.data(), n), format);
      payload = &packed;
    }
    const size_t size = payload->size();
    write_buffer_.resize(LWS_PRE + size);
    std::memcpy(write_buffer_.data() + LWS_PRE, payload->data(), size);
    const int written = lws_write(conn.wsi, write_buffer_.data() + LWS_PRE, size,
                                  conn.text ? LWS_WRITE_TEXT : LWS_WRITE_BINARY);
    if (write_buffer_.capacity() > kKeepWriteCapacity) {
      write_buffer_.clear();
      write_buffer_.shrink_to_fit();
    }
    if (n == conn.outbound.size()) {
      // Emptied: an idle connection keeps no queue storage (the next frame allocates again).
      std::vector<codec::Frame>().swap(conn.outbound);
    } else {
      conn.outbound.erase(conn.outbound.begin(),
                          conn.outbound.begin() + static_cast<std::ptrdiff_t>(n));
    }
    conn.outbound_bytes -= cost;
    if (written < static_cast<int>(size)) {
      Log(LogLevel::kWarn, "chat: write failed on session " + std::to_string(conn.id));
      return false;
    }
    return true;
  }

  int OnWriteable(Connection* conn) {
    if (conn->close_sent) {
      auto it = closing_.find(conn->id);
      if (it != closing_.end() && it->second.ended) return -1;  // see ReadAndDrop
    }
    if (!conn->outbound.empty()) {
      if (!WriteQueued(*conn)) return -1;
      // One write per callback; the rest (or the close frame) goes on the next one.
      if (!conn->outbound.empty() || conn->closing) lws_callback_on_writable(conn->wsi);
      return 0;
    }
    if (conn->closing && !conn->close_sent) return WriteCloseFrame(*conn) ? 0 : -1;
    if (conn->close_sent && !conn->write_shut) ShutWriteWhenFlushed(*conn);
    return 0;  // otherwise spurious: lws finished a buffered partial send
  }

  // ---- lws callbacks ----------------------------------------------------------------------

  static ServerImpl* From(lws* wsi) {
    return static_cast<ServerImpl*>(lws_context_user(lws_get_context(wsi)));
  }

  static int ChatCallback(lws* wsi, lws_callback_reasons reason, void* /*user*/, void* in,
                          size_t len) {
    ServerImpl* self = From(wsi);
    auto* conn = static_cast<Connection*>(lws_get_opaque_user_data(wsi));
    switch (reason) {
      case LWS_CALLBACK_EVENT_WAIT_CANCELLED:
        self->DrainCompletions();
        self->AdvanceShutdown();
        return 0;
      case LWS_CALLBACK_ESTABLISHED:
        return self->OnEstablished(wsi);
      case LWS_CALLBACK_RECEIVE:
        if (conn == nullptr) return -1;
        return self->OnReceive(conn, static_cast<const char*>(in), len);
      case LWS_CALLBACK_SERVER_WRITEABLE:
        if (conn == nullptr) return 0;
        return self->OnWriteable(conn);
      case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
        if (conn == nullptr) return 0;
        if (in != nullptr && len >= 2) {
          const auto* code = static_cast<const unsigned char*>(in);
          conn->peer_close_code = static_cast<uint16_t>((code[0] << 8) | code[1]);
        }
        // The answer to the server's close frame ends the handshake: close the socket (lws
        // would echo the frame otherwise). A close the peer began is echoed by lws.
        return conn->close_sent ? -1 : 0;
      case LWS_CALLBACK_TIMER:
        // The drain of a connection that never completed Hello is over (see WriteCloseFrame):
        // lws closes the socket, as when the kDrainSeconds timeout ends a drain.
        return conn != nullptr && conn->close_sent ? -1 : 0;
      case LWS_CALLBACK_CLOSED:
        self->OnClosed(wsi);
        return 0;
      default:
        return 0;
    }
  }

  static int HttpCallback(lws* wsi, lws_callback_reasons reason, void* user, void* in, size_t len) {
    ServerImpl* self = From(wsi);
    auto* state = static_cast<HttpState*>(user);
    switch (reason) {
      case LWS_CALLBACK_FILTER_NETWORK_CONNECTION:
        // New connections are refused once shutdown began.
        return self->phase_ == Phase::kServing ? 0 : -1;
      case LWS_CALLBACK_ESTABLISHED:
        // A WebSocket without the chat.v1 subprotocol lands here: refuse it.
        return -1;
      case LWS_CALLBACK_HTTP: {
        const char* path = static_cast<const char*>(in);
        const bool get = lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI) > 0;
        if (self->options_.serve_healthz && get && path != nullptr &&
            std::string_view(path) == "/healthz") {
          unsigned char buffer[LWS_PRE + 512];
          unsigned char* start = buffer + LWS_PRE;
          unsigned char* p = start;
          unsigned char* end = buffer + sizeof(buffer) - 1;
          if (lws_add_http_common_headers(wsi, HTTP_STATUS_OK, "text/plain", 3, &p, end) != 0 ||
              lws_finalize_write_http_header(wsi, start, &p, end) != 0) {
            return -1;
          }
          state->healthz_pending = 1;
          lws_callback_on_writable(wsi);
          return 0;
        }
        if (lws_return_http_status(wsi, HTTP_STATUS_NOT_FOUND, nullptr) != 0) return -1;
        return lws_http_transaction_completed(wsi) != 0 ? -1 : 0;
      }
      case LWS_CALLBACK_HTTP_WRITEABLE: {
        if (state == nullptr || state->healthz_pending == 0) return 0;
        state->healthz_pending = 0;
        unsigned char buffer[LWS_PRE + 8];
        std::memcpy(buffer + LWS_PRE, "ok\n", 3);
        if (lws_write(wsi, buffer + LWS_PRE, 3, LWS_WRITE_HTTP_FINAL) != 3) return -1;
        return lws_http_transaction_completed(wsi) != 0 ? -1 : 0;
      }
      default:
        return lws_callback_http_dummy(wsi, reason, user, in, len);
    }
  }

  const ServerOptions options_;
  std::unique_ptr<server::Hub> hub_;
  std::unique_ptr<server::StoreThreads> store_threads_;
  lws_protocols protocols_[3] = {};
  lws_vhost* vhost_ = nullptr;
  bool tls_ = false;
  std::atomic<uint16_t> port_{0};

  std::mutex ctx_mu_;  // guards ctx_ against destruction while another thread wakes the loop
  lws_context* ctx_ = nullptr;
  // The libev loop lws runs on, or null when lws uses its own poll loop. Destroyed with the
  // server, after the context.
  struct ev_loop* loop_ = nullptr;
  std::atomic<bool> wake_pending_{false};
  std::atomic<bool> shutdown_requested_{false};
  std::atomic<bool> started_{false};
  std::mutex join_mu_;  // guards thread_
  std::thread thread_;

  // Loop thread only.
  TickTimer tick_ = {};
  Phase phase_ = Phase::kServing;
  std::chrono::steady_clock::time_point deadline_;
  // Node-based: a Connection stays where it is while others come and go (lws holds pointers).
  std::unordered_map<SessionId, Connection> connections_;
  // Each connection the server began closing.
  std::unordered_map<SessionId, Closing> closing_;
  SessionId last_session_id_ = 0;
  Connection* current_ = nullptr;  // whose frame the Hub is handling
  std::vector<SessionId> paused_;
  std::vector<server::AppendDone> appends_done_;
  std::vector<server::AppendJob> batched_appends_;  // loop thread: submitted at iteration end
  std::vector<SessionId> to_flush_;   // loop thread: connections to write at iteration end
  std::vector<SessionId> to_forget_;  // loop thread: for Hub::OnClose at iteration end
  std::vector<server::ReadDone> reads_done_;
  std::vector<ExpiredRange> expired_done_;  // loop thread: retention passes to announce
  std::vector<unsigned char> write_buffer_;
  std::vector<char> drain_buffer_;  // what a closing connection still sends is read into it
  std::mt19937 rng_;
};

}  // namespace

Result<std::unique_ptr<Server>> Server::Open(ServerOptions options) {
  Status valid = Validate(options);
  if (!valid.ok()) return valid;
  if (!options.clock) options.clock = SystemClock();
  auto server = std::make_unique<ServerImpl>(std::move(options));
  Status init = server->Init();
  if (!init.ok()) {
    Log(LogLevel::kError, "chat: cannot open the server: " + init.ToString());
    return init;
  }
  return std::unique_ptr<Server>(std::move(server));
}

}  // namespace chat
