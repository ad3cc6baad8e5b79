#include "chat/client.h"

#include <sys/random.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <utility>

#include "chat/log.h"
#include "src/client/cache.h"
#include "src/client/session.h"
#include "src/client/transport.h"
#include "src/core/codec.h"
#include "src/core/threads.h"

namespace chat {

std::string_view ConnectionStateName(ConnectionState state) {
  switch (state) {
    case ConnectionState::kDisconnected:
      return "disconnected";
    case ConnectionState::kConnecting:
      return "connecting";
    case ConnectionState::kSyncing:
      return "syncing";
    case ConnectionState::kConnected:
      return "connected";
    case ConnectionState::kClosed:
      return "closed";
  }
  return "unknown";
}

void ClientListener::OnConnectionState(ConnectionState) {}
void ClientListener::OnMessage(const MessageEvent&) {}
void ClientListener::OnConversationUpdated(const ConversationInfo&) {}
void ClientListener::OnMessagesExpired(ConversationId, Seq) {}
void ClientListener::OnError(const Status&) {}
void ClientListener::OnTyping(ConversationId, const UserId&, bool) {}
void ClientListener::OnReceipt(const ReceiptEvent&) {}
void ClientListener::OnMessageStatus(ConversationId, Seq, MessageStatus) {}
void ClientListener::OnUnreadTotal(uint64_t) {}
void ClientListener::OnPresence(const PresenceInfo&) {}

namespace {

// The wall clock in milliseconds as 12 hex digits, then 128 random bits from the kernel as 32
// hex digits. The random part makes the id unique; the prefix makes ids sent at about the same
// time sort together, so the server's idempotency index grows at one end rather than
// everywhere (docs/server.md).
Result<std::string> NewClientMsgId() {
  const auto now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  unsigned char bytes[16];
  size_t got = 0;
  while (got < sizeof(bytes)) {
    ssize_t n = getrandom(bytes + got, sizeof(bytes) - got, 0);
    if (n <= 0) return Internal("getrandom failed");
    got += static_cast<size_t>(n);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id;
  id.reserve(44);
  for (int shift = 44; shift >= 0; shift -= 4) {
    id.push_back(kHex[(static_cast<uint64_t>(now_ms) >> shift) & 15]);
  }
  for (unsigned char b : bytes) {
    id.push_back(kHex[b >> 4]);
    id.push_back(kHex[b & 15]);
  }
  return id;
}

Status ValidateOptions(const ClientOptions& o) {
  if (o.url.rfind("ws://", 0) != 0 && o.url.rfind("wss://", 0) != 0) {
    return InvalidArgument("url: must start with ws:// or wss://");
  }
  if (!o.token_provider) return InvalidArgument("token_provider: required");
  if (o.device_id.empty() || o.device_id.size() > 128) {
    return InvalidArgument("device_id: must be 1..128 bytes");
  }
  if (o.outbox_max == 0) return InvalidArgument("outbox_max: must be at least 1");
  if (o.max_in_flight == 0) return InvalidArgument("max_in_flight: must be at least 1");
  if (o.connect_timeout_ms < 100) return InvalidArgument("connect_timeout_ms: at least 100");
  if (o.request_timeout_ms < 100) return InvalidArgument("request_timeout_ms: at least 100");
  if (o.heartbeat_interval_ms != 0 && o.heartbeat_interval_ms < 100) {
    return InvalidArgument("heartbeat_interval_ms: 0 (the server's) or at least 100");
  }
  if (o.max_message_bytes < 1024) return InvalidArgument("max_message_bytes: at least 1024");
  if (o.max_pending_calls == 0) return InvalidArgument("max_pending_calls: must be at least 1");
  if (o.reconnect.base_ms <= 0 || o.reconnect.cap_ms < o.reconnect.base_ms ||
      o.reconnect.reset_after_ms < 0) {
    return InvalidArgument("reconnect: need 0 < base_ms <= cap_ms and reset_after_ms >= 0");
  }
  return Status::Ok();
}

}  // namespace

class Client::Impl final : public ClientListener, public client::SessionIo {
 public:
  explicit Impl(ClientOptions options) : options_(std::move(options)) {
    std::random_device device;
    rng_.seed((static_cast<uint64_t>(device()) << 32) | device());
  }

  ~Impl() override { Close(); }

  Status Init() {
    if (!options_.clock) options_.clock = SystemClock();
    auto cache = client::Cache::Open(options_.cache_path);
    if (!cache.ok()) return cache.status();
    cache_ = std::move(cache.value());
    auto transport =
        client::Transport::Create({options_.url, options_.tls_ca_path, options_.max_message_bytes,
                                   std::max<size_t>(options_.max_message_bytes * 2, 1 << 20)});
    if (!transport.ok()) return transport.status();
    transport_ = std::move(transport.value());
    client::SessionOptions so;
    so.device_id = options_.device_id;
    so.token_provider = options_.token_provider;
    so.backoff = {options_.reconnect.base_ms, options_.reconnect.cap_ms,
                  options_.reconnect.reset_after_ms};
    so.heartbeat_interval_ms = options_.heartbeat_interval_ms;
    so.connect_timeout_ms = options_.connect_timeout_ms;
    so.request_timeout_ms = options_.request_timeout_ms;
    so.max_in_flight = options_.max_in_flight;
    so.sync_page_limit = options_.sync_page_limit;
    so.max_message_bytes = options_.max_message_bytes;
    session_ = std::make_unique<client::Session>(so, cache_.get(), this, this, options_.clock,
                                                 [this] { return rng_(); });
    return Status::Ok();
  }

  // --- Public API ---

  Status Start() {
    std::lock_guard lock(api_mu_);
    if (closed_) return FailedPrecondition("client is closed");
    if (started_) return FailedPrecondition("already started");
    if (polled_) return FailedPrecondition("Poll() is in use; Start() cannot be mixed with it");
    started_ = true;
    thread_ = StartThreadWithSignalsBlocked("chat-client", [this] {
      while (!stop_) RunOnce(1000);
      Teardown();
    });
    return Status::Ok();
  }

  Status Poll(int timeout_ms) {
    if (std::this_thread::get_id() == loop_thread_.load()) {
      return FailedPrecondition("Poll() called from inside a callback of this client");
    }
    {
      std::lock_guard lock(api_mu_);
      if (closed_) return FailedPrecondition("client is closed");
      if (started_) return FailedPrecondition("Start() is in use; Poll() cannot be mixed with it");
      polled_ = true;
    }
    std::lock_guard poll_lock(poll_mu_);
    if (torn_down_) return FailedPrecondition("client is closed");
    RunOnce(std::max(0, timeout_ms));
    if (stop_) Teardown();
    return Status::Ok();
  }

  void Close() {
    const bool on_loop = std::this_thread::get_id() == loop_thread_.load();
    bool started = false;
    {
      std::lock_guard lock(api_mu_);
      closed_ = true;
      started = started_;
    }
    state_ = ConnectionState::kClosed;
    if (!on_loop) {
      // Wait for a callback in progress on the loop; none starts after this.
      std::lock_guard cb_lock(cb_mu_);
    }
    stop_ = true;
    Wake();
    if (on_loop) return;  // the loop tears down when the current turn ends
    // Two threads may close at once: one joins the loop thread, the other waits for it.
    std::lock_guard join_lock(join_mu_);
    if (thread_.joinable()) {
      thread_.join();
    } else if (!started) {
      std::lock_guard poll_lock(poll_mu_);
      Teardown();
    }
  }

  Result<std::string> Send(ConversationId conversation, std::string_view peer,
                           std::string_view content_type, std::string_view body) {
    if (closed_) return FailedPrecondition("client is closed");
    if (conversation == 0 && peer.empty()) return InvalidArgument("conversation: must not be 0");
    if (content_type.empty()) return InvalidArgument("content_type: must not be empty");
    // Larger than any message this client accepts: its own copy could never come back to it.
    if (body.size() > options_.max_message_bytes) {
      return InvalidArgument("body: larger than max_message_bytes (" +
                             std::to_string(options_.max_message_bytes) + ")");
    }
    Result<std::string> id = NewClientMsgId();
    if (!id.ok()) return id.status();
    client::OutboxEntry entry;
    entry.client_msg_id = *id;
    entry.conversation_id = conversation;
    entry.peer = std::string(peer);
    entry.content_type = std::string(content_type);
    entry.body = std::string(body);
    entry.created_ms = options_.clock->WallMs();
    if (Status st = cache_->AddOutbox(&entry, options_.outbox_max); !st.ok()) return st;
    std::string client_msg_id = entry.client_msg_id;
    // The outbox bounds these posts, so they are not counted against max_pending_calls.
    (void)Post([this, entry = std::move(entry)] { session_->OnOutboxAdded(entry); },
               /*bounded=*/false);
    return client_msg_id;
  }

  Status History(ConversationId conversation, Seq before_seq, uint32_t limit,
                 HistoryCallback callback) {
    if (closed_) return FailedPrecondition("client is closed");
    if (conversation == 0) return InvalidArgument("conversation: must not be 0");
    if (limit == 0) return InvalidArgument("limit: must be at least 1");
    if (!callback) return InvalidArgument("callback: required");
    return Post(
        [this, conversation, before_seq, limit, callback = std::move(callback)]() mutable {
          session_->History(conversation, before_seq, limit,
                            [this, callback = std::move(callback)](Result<HistoryResult> r) {
                              Gate([&] { callback(std::move(r)); });
                            });
        },
        /*bounded=*/true);
  }

  Result<std::vector<ConversationInfo>> Conversations() {
    if (closed_) return FailedPrecondition("client is closed");
    return cache_->ListConversationInfos();
  }

  Result<std::vector<MessageEvent>> Outbox() {
    if (closed_) return FailedPrecondition("client is closed");
    std::vector<MessageEvent> out;
    const std::string me = cache_->UserId();
    for (const client::OutboxEntry& e : cache_->ListOutbox()) {
      out.push_back(client::OutboxMessageEvent(e, me, options_.device_id));
    }
    return out;
  }

  Status Discard(std::string_view client_msg_id) {
    if (closed_) return FailedPrecondition("client is closed");
    if (client_msg_id.empty()) return InvalidArgument("client_msg_id: must not be empty");
    return cache_->DiscardFailed(std::string(client_msg_id));
  }

  // Posts a group operation; the callback runs through the gate like every callback.
  Status Request(v1::Envelope request, ConversationCallback callback) {
    if (closed_) return FailedPrecondition("client is closed");
    if (!callback) return InvalidArgument("callback: required");
    return Post(
        [this, request = std::move(request), callback = std::move(callback)]() mutable {
          session_->ConversationRequest(std::move(request), [this, callback = std::move(callback)](
                                                                Result<ConversationInfo> r) {
            Gate([&] { callback(std::move(r)); });
          });
        },
        /*bounded=*/true);
  }

  Status GetReceipts(ConversationId conversation, ReceiptsCallback callback) {
    if (closed_) return FailedPrecondition("client is closed");
    if (conversation == 0) return InvalidArgument("conversation: must not be 0");
    if (!callback) return InvalidArgument("callback: required");
    return Post(
        [this, conversation, callback = std::move(callback)]() mutable {
          session_->GetReceipts(conversation, [this, callback = std::move(callback)](
                                                  Result<std::vector<MemberWatermarks>> r) {
            Gate([&] { callback(std::move(r)); });
          });
        },
        /*bounded=*/true);
  }

  Status Subscribe(ConversationId conversation, bool subscribe) {
    if (closed_) return FailedPrecondition("client is closed");
    if (conversation == 0) return InvalidArgument("conversation: must not be 0");
    {
      std::lock_guard lock(api_mu_);
      if (subscribe) {
        if (!subscriptions_.contains(conversation) &&
            subscriptions_.size() >= kMaxChannelSubscriptions) {
          return ResourceExhausted("too many channel subscriptions");
        }
        subscriptions_.insert(conversation);
      } else {
        subscriptions_.erase(conversation);
      }
    }
    return Post(
        [this, conversation, subscribe] {
          if (subscribe) {
            session_->Subscribe(conversation);
          } else {
            session_->Unsubscribe(conversation);
          }
        },
        /*bounded=*/true);
  }

  Status Presence(std::vector<UserId> users, bool subscribe, StatusCallback callback) {
    if (closed_) return FailedPrecondition("client is closed");
    if (users.empty()) return InvalidArgument("users: must not be empty");
    for (const UserId& user : users) {
      if (user.empty()) return InvalidArgument("users: an id is empty");
    }
    if (!callback) return InvalidArgument("callback: required");
    if (users.size() > kMaxPresenceSubscriptions) {
      return ResourceExhausted("more than " + std::to_string(kMaxPresenceSubscriptions) +
                               " users in one call");
    }
    auto gated = [this, callback = std::move(callback)](Status st) {
      Gate([&] { callback(std::move(st)); });
    };
    return Post(
        [this, users = std::move(users), subscribe, gated = std::move(gated)]() mutable {
          if (subscribe) {
            session_->SubscribePresence(std::move(users), std::move(gated));
          } else {
            session_->UnsubscribePresence(std::move(users), std::move(gated));
          }
        },
        /*bounded=*/true);
  }

  Status RegisterPushToken(std::string_view platform, std::string_view token,
                           StatusCallback callback) {
    if (closed_) return FailedPrecondition("client is closed");
    if (platform.empty() || platform.size() > kMaxPushPlatformBytes) {
      return InvalidArgument("platform: must be 1.." + std::to_string(kMaxPushPlatformBytes) +
                             " bytes");
    }
    if (token.size() > kMaxPushTokenBytes) {
      return InvalidArgument("token: longer than " + std::to_string(kMaxPushTokenBytes) + " bytes");
    }
    if (!callback) return InvalidArgument("callback: required");
    return Post(
        [this, platform = std::string(platform), token = std::string(token),
         callback = std::move(callback)]() mutable {
          session_->RegisterPushToken(std::move(platform), std::move(token),
                                      [this, callback = std::move(callback)](Status st) {
                                        Gate([&] { callback(std::move(st)); });
                                      });
        },
        /*bounded=*/true);
  }

  Status MarkRead(ConversationId conversation, Seq seq) {
    if (closed_) return FailedPrecondition("client is closed");
    if (conversation == 0) return InvalidArgument("conversation: must not be 0");
    return Post([this, conversation, seq] { session_->MarkRead(conversation, seq); },
                /*bounded=*/true);
  }

  Status SetTyping(ConversationId conversation, bool active) {
    if (closed_) return FailedPrecondition("client is closed");
    if (conversation == 0) return InvalidArgument("conversation: must not be 0");
    return Post([this, conversation, active] { session_->SetTyping(conversation, active); },
                /*bounded=*/true);
  }

  Result<MessageStatus> MessageStatusOf(ConversationId conversation, Seq seq) {
    if (closed_) return FailedPrecondition("client is closed");
    if (conversation == 0) return InvalidArgument("conversation: must not be 0");
    if (seq == 0) return InvalidArgument("seq: must not be 0");
    std::optional<client::ConversationRow> row = cache_->GetConversation(conversation);
    if (!row) return NotFound("conversation is not cached");
    if (seq <= row->info.read_all_seq) return MessageStatus::kRead;
    if (seq <= row->info.delivered_all_seq) return MessageStatus::kDelivered;
    return MessageStatus::kSent;
  }

  Result<uint64_t> UnreadTotal() {
    if (closed_) return FailedPrecondition("client is closed");
    return cache_->UnreadTotal();
  }

  Status Reconnect() {
    if (closed_) return FailedPrecondition("client is closed");
    return Post([this] { session_->Reconnect(); }, /*bounded=*/true);
  }

  ConnectionState state() const { return state_.load(); }

  // --- ClientListener: the gate between the Session and the application's listener ---

  void OnConnectionState(ConnectionState state) override {
    if (!closed_) state_ = state;
    Gate([&] {
      if (options_.listener) options_.listener->OnConnectionState(state);
    });
  }
  void OnMessage(const MessageEvent& event) override {
    Gate([&] {
      if (options_.listener) options_.listener->OnMessage(event);
    });
  }
  void OnConversationUpdated(const ConversationInfo& info) override {
    Gate([&] {
      if (options_.listener) options_.listener->OnConversationUpdated(info);
    });
  }
  void OnMessagesExpired(ConversationId conversation, Seq up_to_seq) override {
    Gate([&] {
      if (options_.listener) options_.listener->OnMessagesExpired(conversation, up_to_seq);
    });
  }
  void OnError(const Status& status) override {
    Gate([&] {
      if (options_.listener) options_.listener->OnError(status);
    });
  }
  void OnTyping(ConversationId conversation, const UserId& user, bool active) override {
    Gate([&] {
      if (options_.listener) options_.listener->OnTyping(conversation, user, active);
    });
  }
  void OnReceipt(const ReceiptEvent& event) override {
    Gate([&] {
      if (options_.listener) options_.listener->OnReceipt(event);
    });
  }
  void OnMessageStatus(ConversationId conversation, Seq up_to_seq, MessageStatus status) override {
    Gate([&] {
      if (options_.listener) options_.listener->OnMessageStatus(conversation, up_to_seq, status);
    });
  }
  void OnUnreadTotal(uint64_t total) override {
    Gate([&] {
      if (options_.listener) options_.listener->OnUnreadTotal(total);
    });
  }
  void OnPresence(const PresenceInfo& info) override {
    Gate([&] {
      if (options_.listener) options_.listener->OnPresence(info);
    });
  }

  // --- SessionIo ---

  void Open() override { transport_->Connect(); }
  void Drop() override { transport_->Drop(); }
  bool Write(const v1::Envelope& envelope) override {
    return transport_->Send(codec::Encode(envelope, codec::Format::kBinary));
  }

 private:
  template <typename F>
  void Gate(F&& f) {
    if (closed_) return;
    std::lock_guard lock(cb_mu_);
    if (closed_) return;
    f();
  }

  Status Post(std::function<void()> task, bool bounded) {
    {
      std::lock_guard lock(tasks_mu_);
      if (bounded && tasks_.size() >= options_.max_pending_calls) {
        return ResourceExhausted("too many calls waiting for the client's loop");
      }
      tasks_.push_back(std::move(task));
    }
    Wake();
    return Status::Ok();
  }

  void Wake() {
    // Coalesced: one lws_cancel_service per loop turn is enough.
    if (wake_pending_.exchange(true)) return;
    std::lock_guard lock(tasks_mu_);
    if (transport_ && !torn_down_) transport_->Wake();
  }

  void RunTasks() {
    std::deque<std::function<void()>> tasks;
    {
      std::lock_guard lock(tasks_mu_);
      tasks.swap(tasks_);
    }
    for (auto& task : tasks) {
      if (stop_) return;
      task();
    }
  }

  void FeedEvents() {
    for (client::TransportEvent& event : transport_->TakeEvents()) {
      if (stop_) return;
      switch (event.type) {
        case client::TransportEvent::Type::kOpen:
          session_->OnOpen();
          break;
        case client::TransportEvent::Type::kClosed:
          session_->OnClosed(event.close_code, event.data);
          break;
        case client::TransportEvent::Type::kReceiving:
          session_->OnReceiving();
          break;
        case client::TransportEvent::Type::kMessage: {
          v1::Envelope envelope;
          Status st = codec::Decode(event.data,
                                    event.binary ? codec::Format::kBinary : codec::Format::kJson,
                                    options_.max_message_bytes, &envelope);
          if (!st.ok()) {
            Log(LogLevel::kWarn,
                "chat client: undecodable frame from the server: " + st.ToString());
            transport_->Drop();
            session_->OnClosed(1007, "undecodable frame");
            break;
          }
          session_->OnEnvelope(envelope);
          break;
        }
      }
    }
  }

  void RunOnce(int timeout_ms) {
    // Marks "inside the loop" for Close(): a Close() from a callback cannot wait for the loop.
    loop_thread_ = std::this_thread::get_id();
    struct Leave {
      std::atomic<std::thread::id>* id;
      ~Leave() { *id = std::thread::id(); }
    } leave{&loop_thread_};
    if (!session_started_) {
      session_started_ = true;
      session_->Start();
    }
    wake_pending_ = false;
    RunTasks();
    ReadThenTick();
    if (stop_) return;
    int64_t wait = session_->NextDeadlineMs() - options_.clock->MonotonicMs();
    wait = std::clamp<int64_t>(wait, 0, timeout_ms);
    bool idle;
    {
      std::lock_guard lock(tasks_mu_);
      idle = tasks_.empty();
    }
    transport_->Service(idle ? static_cast<int>(wait) : 0);
    FeedEvents();
    RunTasks();
    ReadThenTick();
  }

  // Input first, then the timers: after a gap in the loop (Poll() not called for a while, or
  // slow callbacks) the answers that came meanwhile wait in the socket, and the requests they
  // answer must not be given up, nor the link taken for dead, for want of reading them.
  void ReadThenTick() {
    ReadInput();
    if (stop_) return;
    session_->Tick();
    FeedEvents();
  }

  // Reads and handles what the socket holds now, without waiting. lws reads a bounded chunk per
  // service, so it goes on while bytes come, up to kMaxReadRounds. Stopped there, the bytes left
  // in the socket may hold answers (also when the last round ended on a frame boundary): the
  // session gives up no request until a later turn has read everything.
  void ReadInput() {
    static constexpr int kMaxReadRounds = 256;
    for (int round = 0; round < kMaxReadRounds && !stop_; ++round) {
      const uint64_t before = transport_->received_bytes();
      transport_->Service(0);
      FeedEvents();
      if (transport_->received_bytes() == before) {
        session_->SetInputPending(false);
        return;
      }
    }
    session_->SetInputPending(true);
  }

  void Teardown() {
    if (torn_down_) return;
    if (transport_) transport_->CloseGracefully(200);
    if (session_) session_->Stop();
    state_ = ConnectionState::kClosed;
    std::unique_ptr<client::Transport> transport;
    {
      std::lock_guard lock(tasks_mu_);
      torn_down_ = true;
      transport = std::move(transport_);
      tasks_.clear();
    }
    transport.reset();
    // Releases the cache file (locked while open) for the next client on the same path.
    if (cache_) cache_->Close();
  }

  ClientOptions options_;
  std::unique_ptr<client::Cache> cache_;
  std::unique_ptr<client::Transport> transport_;
  std::unique_ptr<client::Session> session_;
  std::mt19937_64 rng_;  // loop thread only

  std::mutex api_mu_;
  std::atomic<bool> closed_{false};
  std::atomic<bool> stop_{false};
  bool started_ = false;                    // guarded by api_mu_
  bool polled_ = false;                     // guarded by api_mu_
  std::set<ConversationId> subscriptions_;  // guarded by api_mu_; bounds Subscribe()
  bool session_started_ = false;            // loop thread only
  bool torn_down_ = false;                  // guarded by tasks_mu_ for writers; read on the loop
  std::atomic<ConnectionState> state_{ConnectionState::kDisconnected};
  std::atomic<std::thread::id> loop_thread_{};  // the thread inside RunOnce(), if any

  std::mutex tasks_mu_;
  std::deque<std::function<void()>> tasks_;
  std::atomic<bool> wake_pending_{false};

  std::mutex cb_mu_;    // held while a callback runs
  std::mutex poll_mu_;  // held while Poll() runs
  std::mutex join_mu_;  // held by Close() while it joins thread_
  std::thread thread_;
};

Result<std::unique_ptr<Client>> Client::Open(ClientOptions options) {
  if (Status st = ValidateOptions(options); !st.ok()) return st;
  auto impl = std::make_unique<Impl>(std::move(options));
  if (Status st = impl->Init(); !st.ok()) return st;
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

Status Client::Start() { return impl_->Start(); }
Status Client::Poll(int timeout_ms) { return impl_->Poll(timeout_ms); }
void Client::Close() { impl_->Close(); }
Result<std::string> Client::Send(ConversationId conversation, std::string_view content_type,
                                 std::string_view body) {
  if (conversation == 0) return InvalidArgument("conversation: must not be 0");
  return impl_->Send(conversation, "", content_type, body);
}
Result<std::string> Client::SendTo(std::string_view peer, std::string_view content_type,
                                   std::string_view body) {
  if (peer.empty()) return InvalidArgument("peer: must not be empty");
  return impl_->Send(0, peer, content_type, body);
}
Status Client::History(ConversationId conversation, Seq before_seq, uint32_t limit,
                       HistoryCallback callback) {
  return impl_->History(conversation, before_seq, limit, std::move(callback));
}
Result<std::vector<ConversationInfo>> Client::Conversations() { return impl_->Conversations(); }
Result<std::vector<MessageEvent>> Client::Outbox() { return impl_->Outbox(); }
Status Client::Discard(std::string_view client_msg_id) { return impl_->Discard(client_msg_id); }
Status Client::Reconnect() { return impl_->Reconnect(); }

namespace {

Status CheckUsers(const std::vector<UserId>& users, std::string_view field, bool allow_empty) {
  if (users.empty() && !allow_empty) {
    return InvalidArgument(std::string(field) + ": must not be empty");
  }
  for (const UserId& user : users) {
    if (user.empty() || user.size() > 128) {
      return InvalidArgument(std::string(field) + ": user ids must be 1..128 bytes");
    }
  }
  return Status::Ok();
}

Status CheckTitle(std::string_view title) {
  if (title.empty()) return InvalidArgument("title: must not be empty");
  return Status::Ok();
}

}  // namespace

Status Client::CreateGroup(std::string_view title, std::vector<UserId> members,
                           ConversationKind kind, ConversationCallback callback) {
  if (kind != ConversationKind::kGroup && kind != ConversationKind::kChannel) {
    return InvalidArgument("kind: must be kGroup or kChannel");
  }
  if (Status st = CheckTitle(title); !st.ok()) return st;
  if (Status st = CheckUsers(members, "members", /*allow_empty=*/true); !st.ok()) return st;
  v1::Envelope request;
  v1::CreateGroup* create = request.mutable_create_group();
  create->set_kind(kind == ConversationKind::kGroup ? v1::CONVERSATION_KIND_GROUP
                                                    : v1::CONVERSATION_KIND_CHANNEL);
  create->set_title(std::string(title));
  for (UserId& member : members) create->add_members(std::move(member));
  return impl_->Request(std::move(request), std::move(callback));
}

Status Client::RenameGroup(ConversationId conversation, std::string_view title,
                           ConversationCallback callback) {
  if (conversation == 0) return InvalidArgument("conversation: must not be 0");
  if (Status st = CheckTitle(title); !st.ok()) return st;
  v1::Envelope request;
  request.mutable_rename_group()->set_conversation_id(conversation);
  request.mutable_rename_group()->set_title(std::string(title));
  return impl_->Request(std::move(request), std::move(callback));
}

Status Client::SetRetention(ConversationId conversation, int64_t retention_ms,
                            ConversationCallback callback) {
  if (conversation == 0) return InvalidArgument("conversation: must not be 0");
  if (retention_ms < -1) {
    return InvalidArgument("retention_ms: 0 (server default), -1 (keep) or a positive ms");
  }
  v1::Envelope request;
  request.mutable_set_retention()->set_conversation_id(conversation);
  request.mutable_set_retention()->set_retention_ms(retention_ms);
  return impl_->Request(std::move(request), std::move(callback));
}

Status Client::AddMembers(ConversationId conversation, std::vector<UserId> users,
                          ConversationCallback callback) {
  if (conversation == 0) return InvalidArgument("conversation: must not be 0");
  if (Status st = CheckUsers(users, "users", /*allow_empty=*/false); !st.ok()) return st;
  v1::Envelope request;
  request.mutable_add_members()->set_conversation_id(conversation);
  for (UserId& user : users) request.mutable_add_members()->add_users(std::move(user));
  return impl_->Request(std::move(request), std::move(callback));
}

Status Client::RemoveMembers(ConversationId conversation, std::vector<UserId> users,
                             ConversationCallback callback) {
  if (conversation == 0) return InvalidArgument("conversation: must not be 0");
  if (Status st = CheckUsers(users, "users", /*allow_empty=*/false); !st.ok()) return st;
  v1::Envelope request;
  request.mutable_remove_members()->set_conversation_id(conversation);
  for (UserId& user : users) request.mutable_remove_members()->add_users(std::move(user));
  return impl_->Request(std::move(request), std::move(callback));
}

Status Client::Leave(ConversationId conversation, ConversationCallback callback) {
  if (conversation == 0) return InvalidArgument("conversation: must not be 0");
  v1::Envelope request;
  request.mutable_leave()->set_conversation_id(conversation);
  return impl_->Request(std::move(request), std::move(callback));
}

Status Client::SetRole(ConversationId conversation, std::string_view user, Role role,
                       ConversationCallback callback) {
  if (conversation == 0) return InvalidArgument("conversation: must not be 0");
  if (user.empty() || user.size() > 128) return InvalidArgument("user: must be 1..128 bytes");
  if (role != Role::kMember && role != Role::kAdmin) {
    return InvalidArgument("role: must be kMember or kAdmin");
  }
  v1::Envelope request;
  request.mutable_set_role()->set_conversation_id(conversation);
  request.mutable_set_role()->set_user(std::string(user));
  request.mutable_set_role()->set_role(role == Role::kAdmin ? v1::ROLE_ADMIN : v1::ROLE_MEMBER);
  return impl_->Request(std::move(request), std::move(callback));
}

Status Client::Subscribe(ConversationId conversation) {
  return impl_->Subscribe(conversation, true);
}
Status Client::Unsubscribe(ConversationId conversation) {
  return impl_->Subscribe(conversation, false);
}
Status Client::MarkRead(ConversationId conversation, Seq seq) {
  return impl_->MarkRead(conversation, seq);
}
Status Client::SetTyping(ConversationId conversation, bool active) {
  return impl_->SetTyping(conversation, active);
}
Status Client::SubscribePresence(std::vector<UserId> users, StatusCallback callback) {
  return impl_->Presence(std::move(users), /*subscribe=*/true, std::move(callback));
}

Status Client::UnsubscribePresence(std::vector<UserId> users, StatusCallback callback) {
  return impl_->Presence(std::move(users), /*subscribe=*/false, std::move(callback));
}

Status Client::RegisterPushToken(std::string_view platform, std::string_view token,
                                 StatusCallback callback) {
  return impl_->RegisterPushToken(platform, token, std::move(callback));
}

Status Client::GetReceipts(ConversationId conversation, ReceiptsCallback callback) {
  return impl_->GetReceipts(conversation, std::move(callback));
}
Result<MessageStatus> Client::MessageStatusOf(ConversationId conversation, Seq seq) {
  return impl_->MessageStatusOf(conversation, seq);
}
Result<uint64_t> Client::UnreadTotal() { return impl_->UnreadTotal(); }
ConnectionState Client::state() const { return impl_->state(); }

}  // namespace chat
