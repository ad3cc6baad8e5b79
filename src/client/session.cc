#include "src/client/session.h"

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <utility>

#include "chat/log.h"
#include "src/core/codec.h"

namespace chat::client {

namespace {

// Attempts beyond this do not grow the delay further (cap_ms is reached long before), and the
// counter must not overflow the shift in BackoffDelayMs.
constexpr uint32_t kMaxAttempt = 30;

// What a frame from the server that breaks the protocol (a server bug, or a hostile server) is
// reported as. Such a frame is refused whole: nothing of it is stored.
Status ProtocolError(std::string_view what) {
  return Internal("protocol error: the server sent " + std::string(what));
}

// The cache keeps seqs as SQLite integers: past INT64_MAX they would not sort, and a cursor
// there would never reach its next seq.
constexpr Seq kMaxCachedSeq = static_cast<Seq>(INT64_MAX);

// Every seq up to the returned one is deleted by retention, as a conversation state tells it:
// below first_seq, or with first_seq 0 (nothing stored) up to the last seq it reports.
Seq ExpiredThrough(const v1::ConversationState& state) {
  return state.first_seq() != 0 ? state.first_seq() - 1 : state.last_seq();
}

bool IsTokenExpired(const v1::Error& error) {
  return error.code() == v1::Error::UNAUTHENTICATED &&
         error.message().find("expired") != std::string::npos;
}

}  // namespace

Session::Session(SessionOptions options, Cache* cache, SessionIo* io, ClientListener* listener,
                 std::shared_ptr<Clock> clock, std::function<uint64_t()> random)
    : options_(std::move(options)),
      cache_(cache),
      io_(io),
      listener_(listener),
      clock_(std::move(clock)),
      random_(std::move(random)) {
  user_id_ = cache_->UserId();
  unread_total_ = cache_->UnreadTotal();
}

ConnectionState Session::state() const {
  switch (phase_) {
    case Phase::kOpening:
    case Phase::kHello:
      return ConnectionState::kConnecting;
    case Phase::kSyncing:
      return ConnectionState::kSyncing;
    case Phase::kLive:
      return ConnectionState::kConnected;
    case Phase::kClosed:
      return ConnectionState::kClosed;
    default:
      return ConnectionState::kDisconnected;
  }
}

void Session::SetPhase(Phase phase) {
  if (phase == Phase::kLive && phase_ != Phase::kLive) live_at_ = Now();
  phase_ = phase;
  ConnectionState now = state();
  if (now != reported_) {
    reported_ = now;
    listener_->OnConnectionState(now);
  }
}

void Session::Start() {
  if (phase_ != Phase::kStopped) return;
  phase_ = Phase::kBackoff;
  reconnect_at_ = Now();
}

void Session::Stop() {
  if (phase_ == Phase::kClosed) return;
  if (phase_ != Phase::kStopped && phase_ != Phase::kBackoff) io_->Drop();
  phase_ = Phase::kClosed;
  reported_ = ConnectionState::kClosed;
  EndReceiving();
  histories_.clear();
  in_flight_.clear();
  in_flight_ids_.clear();
  ops_.clear();
  expired_.clear();
  history_syncs_.clear();
  quiet_rids_.clear();
  receipts_unanswered_.clear();
  unsubscribes_.clear();
  unsubscribes_due_.clear();
  typing_.clear();
  typing_sent_.clear();
  presence_waiting_.clear();
  push_waiting_ = nullptr;
}

bool Session::Write(const v1::Envelope& envelope) {
  if (io_->Write(envelope)) return true;
  Disconnect("outbound queue full");
  return false;
}

void Session::Disconnect(std::string_view why) {
  if (phase_ == Phase::kStopped || phase_ == Phase::kBackoff || phase_ == Phase::kClosed) return;
  Log(LogLevel::kInfo, std::string("chat client: disconnecting: ") + std::string(why));
  io_->Drop();
  ConnectionDown();
}

void Session::ConnectionDown() {
  const int64_t now = Now();
  // Only a connection that got through its catch-up, and lasted reset_after_ms from then, counts
  // as a good one: one that keeps timing out its first Sync (an overloaded server after a
  // restart), or answers it just in time and fails soon after, backs off further every time.
  if (phase_ == Phase::kLive && now - live_at_ >= options_.backoff.reset_after_ms) {
    attempt_ = 0;
  }
  // Requests of the lost connection get no reply: their callbacks learn it now.
  auto histories = std::move(histories_);
  histories_.clear();
  auto ops = std::move(ops_);
  ops_.clear();
  auto typing = std::move(typing_);
  typing_.clear();
  expired_.clear();
  history_syncs_.clear();
  quiet_rids_.clear();
  // Receipts of the lost connection may never have reached the server, and the Sync lists only
  // conversations with news: they go again on the next connection.
  // Only what is still owed goes again.
  for (const auto& [rid, sent] : receipts_unanswered_) {
    std::optional<ConversationRow> row = cache_->GetConversation(sent.conversation);
    if (row && row->receipt_due) MakeReceiptDue(sent.conversation, now);
  }
  receipts_unanswered_.clear();
  // The next connection is subscribed to none of these channels.
  unsubscribes_.clear();
  unsubscribes_due_.clear();
  unsubscribes_retry_at_ = 0;
  typing_sent_.clear();
  in_flight_.clear();
  in_flight_ids_.clear();
  sync_rid_ = 0;
  sync_again_ = false;
  sync_retry_at_ = 0;  // the next connection syncs anyway
  hello_rid_ = 0;
  EndReceiving();
  input_pending_ = false;  // input of the lost connection; the runtime tells anew each turn

  int64_t delay = 0;
  if (token_expired_ && !refreshed_last_) {
    // A fresh token may fix it at once; a second expiry in a row waits like any failure.
    refreshed_last_ = true;
  } else {
    refreshed_last_ = false;
    delay = BackoffDelayMs(options_.backoff, attempt_, random_(), retry_after_ms_);
    attempt_ = std::min(attempt_ + 1, kMaxAttempt);
  }
  token_expired_ = false;
  retry_after_ms_ = 0;
  reconnect_at_ = now + delay;
  SetPhase(Phase::kBackoff);
  for (auto& [rid, pending] : histories) {
    pending.callback(Unavailable("connection lost"));
  }
  std::vector<StatusCallback> cancelled;
  for (auto& [rid, op] : ops) {
    // The application's presence and push requests wait for the next connection instead;
    // the session's own re-subscriptions are made again from the watched set.
    if (!op.presence.empty() && op.status) {
      presence_waiting_.push_back(
          {std::move(op.presence), std::move(op.added), std::exchange(op.status, nullptr)});
    } else if (op.push && op.status) {
      if (op.generation == push_generation_) {
        push_waiting_ = std::exchange(op.status, nullptr);
      } else {
        cancelled.push_back(std::exchange(op.status, nullptr));
      }
    }
  }
  for (auto& [rid, op] : ops) {
    if (op.conversation) op.conversation(Unavailable("connection lost"));
    if (op.receipts) op.receipts(Unavailable("connection lost"));
    if (op.status) op.status(Unavailable("connection lost"));
  }
  for (StatusCallback& callback : cancelled) {
    callback(Cancelled("replaced by a newer RegisterPushToken call"));
  }
  // Typing indicators are live state: without a connection nobody refreshes or ends them.
  for (const auto& [key, expiry] : typing) listener_->OnTyping(key.first, key.second, false);
}

void Session::Reconnect() {
  if (phase_ == Phase::kStopped || phase_ == Phase::kClosed) return;
  if (phase_ != Phase::kBackoff) Disconnect("reconnect requested");
  // The application knows the network changed: try at once rather than after the backoff.
  reconnect_at_ = Now();
}

void Session::Tick() {
  const int64_t now = Now();
  switch (phase_) {
    case Phase::kStopped:
    case Phase::kClosed:
      return;
    case Phase::kBackoff:
      if (now >= reconnect_at_) {
        connect_deadline_ = now + options_.connect_timeout_ms;
        SetPhase(Phase::kOpening);
        io_->Open();
      }
      return;
    case Phase::kOpening:
    case Phase::kHello:
      if (now >= connect_deadline_) Disconnect("connect timeout");
      return;
    case Phase::kSyncing:
    case Phase::kLive:
      if (now - last_rx_ >= 2 * static_cast<int64_t>(heartbeat_ms_)) {
        Disconnect("no frame from the server within two heartbeat intervals");
        return;
      }
      if (receiving_ && now - receiving_since_ >= CeilingMs()) {
        // Bytes keep the link alive, but a frame that never ends holds every request.
        Disconnect("a frame from the server took more than " + std::to_string(CeilingMs()) +
                   " ms to arrive");
        return;
      }
      if (!ExpireRequests(now)) return;
      ExpireTyping();
      FlushReceipts();
      if (!Authenticated()) return;
      if (!unsubscribes_due_.empty() && now >= unsubscribes_retry_at_) {
        for (const auto& [channel, resends] : std::exchange(unsubscribes_due_, {})) {
          if (!SendUnsubscribe(channel, resends)) return;
        }
      }
      if (sync_retry_at_ != 0 && now >= sync_retry_at_ && sync_rid_ == 0) {
        SendSync();
        if (!Authenticated()) return;
      }
      if (now >= next_ping_) {
        v1::Envelope ping;
        ping.mutable_ping()->set_client_time_ms(clock_->WallMs());
        next_ping_ = now + heartbeat_ms_;
        // Refused (the rate limit counts Pings too), a Ping proves the link alive as a Pong
        // would, and the next goes an interval later: nothing for OnError, nor for the next
        // reconnect's delay.
        if (!WriteQuiet(&ping, "ping")) return;
      }
      if (outbox_retry_at_ != 0 && now >= outbox_retry_at_) {
        outbox_retry_at_ = 0;
        PumpOutbox();
      }
      return;
  }
}

int64_t Session::NextDeadlineMs() const {
  switch (phase_) {
    case Phase::kBackoff:
      return reconnect_at_;
    case Phase::kOpening:
    case Phase::kHello:
      return connect_deadline_;
    case Phase::kSyncing:
    case Phase::kLive: {
      int64_t next = std::min(next_ping_, last_rx_ + 2 * static_cast<int64_t>(heartbeat_ms_));
      if (outbox_retry_at_ != 0) next = std::min(next, outbox_retry_at_);
      // While a frame arrives no request is given up before its ceiling: the frame's end (or
      // the dead-link timer, or the frame's own ceiling) comes first.
      if (receiving_) next = std::min(next, receiving_since_ + CeilingMs());
      if (sync_rid_ != 0) next = std::min(next, DueNow(sync_deadline_));
      if (!ops_.empty()) next = std::min(next, DueNow(ops_.begin()->second.deadline));
      if (!histories_.empty()) {
        next = std::min(next, DueNow(histories_.begin()->second.deadline));
      }
      if (!typing_.empty()) {
        for (const auto& [key, expiry] : typing_) next = std::min(next, expiry);
      }
      // Receipts go out at the end of the turn that moved the watermarks (or the interval), or
      // when the first one delayed comes due (a large group's delivered-only ones).
      if (!receipts_due_.empty()) {
        int64_t due = receipts_due_.begin()->second;
        for (const auto& [conversation, at] : receipts_due_) due = std::min(due, at);
        next = std::min(next, std::max({Now(), due, receipts_sent_at_ + kReceiptIntervalMs,
                                        receipts_retry_at_}));
      }
      if (!unsubscribes_due_.empty()) {
        next = std::min(next, std::max(Now(), unsubscribes_retry_at_));
      }
      if (sync_retry_at_ != 0 && sync_rid_ == 0) next = std::min(next, sync_retry_at_);
      return next;
    }
    default:
      return Now() + 60'000;
  }
}

void Session::OnOpen() {
  if (phase_ != Phase::kOpening) return;
  std::string token = options_.token_provider ? options_.token_provider() : std::string();
  v1::Envelope hello;
  hello_rid_ = NextRid();
  hello.set_rid(hello_rid_);
  hello.mutable_hello()->set_token(token);
  hello.mutable_hello()->set_device_id(options_.device_id);
  hello.mutable_hello()->set_client_version("chat-client/0.1");
  hello.mutable_hello()->set_protocol_version(1);
  hello.mutable_hello()->set_accepts_messages_expired(true);
  hello.mutable_hello()->set_max_message_bytes(
      static_cast<uint32_t>(std::min<uint64_t>(options_.max_message_bytes, UINT32_MAX)));
  phase_ = Phase::kHello;
  Write(hello);
}

void Session::OnClosed(int close_code, std::string_view reason) {
  if (phase_ == Phase::kStopped || phase_ == Phase::kBackoff || phase_ == Phase::kClosed) return;
  Log(LogLevel::kInfo, "chat client: connection closed (" + std::to_string(close_code) + " " +
                           std::string(reason) + ")");
  ConnectionDown();
}

void Session::OnReceiving() {
  if (phase_ != Phase::kHello && !Authenticated()) return;
  const int64_t now = Now();
  last_rx_ = now;
  // Not served yet: the frame is counted by its type once complete (a Pong serves nothing).
  if (!receiving_) {
    receiving_ = true;
    receiving_since_ = now;
  }
}

void Session::EndReceiving() {
  if (!receiving_) return;
  excused_ms_ += Now() - receiving_since_;
  receiving_ = false;
}

void Session::OnEnvelope(const v1::Envelope& envelope) {
  EndReceiving();
  HandleEnvelope(envelope);
}

void Session::HandleEnvelope(const v1::Envelope& envelope) {
  if (phase_ != Phase::kHello && !Authenticated()) return;
  last_rx_ = Now();
  if ((envelope.rid() != 0 && envelope.body_case() != v1::Envelope::kPong) ||
      envelope.body_case() == v1::Envelope::kDeliver) {
    ++served_;
  }
  switch (envelope.body_case()) {
    case v1::Envelope::kBatch:
      for (const v1::Envelope& inner : envelope.batch().envelopes()) {
        if (inner.body_case() == v1::Envelope::kBatch) continue;  // never nested
        HandleEnvelope(inner);
        if (phase_ != Phase::kHello && !Authenticated()) return;
      }
      return;
    case v1::Envelope::kWelcome:
      HandleWelcome(envelope);
      return;
    case v1::Envelope::kError:
      HandleError(envelope);
      return;
    default:
      break;
  }
  if (!Authenticated()) return;
  switch (envelope.body_case()) {
    case v1::Envelope::kSendAck:
      HandleSendAck(envelope);
      break;
    case v1::Envelope::kDeliver:
      // Not stored (reported), the message is asked for all the same: nothing else may ask for
      // it before the next connection.
      if (!Ingest({&envelope.deliver().message()}, /*from_sync=*/false)) RetrySyncLater();
      break;
    case v1::Envelope::kSyncBatch:
      if (envelope.rid() != 0 && envelope.rid() == sync_rid_) {
        HandleSyncBatch(envelope.sync_batch());
      } else if (envelope.rid() != 0) {
        expired_.erase(envelope.rid());  // the late answer to a Sync given up
      }
      break;
    case v1::Envelope::kHistoryPage:
      HandleHistoryPage(envelope.rid(), envelope.history_page());
      break;
    case v1::Envelope::kConversationUpdate: {
      const v1::ConversationState& state = envelope.conversation_update().conversation();
      Result<ConversationInfo> info = ProtocolError("a ConversationUpdate for conversation 0");
      if (state.conversation_id() != 0 && state.last_seq() > kMaxCachedSeq) {
        info = ProtocolError("a ConversationUpdate past the largest seq (conversation " +
                             std::to_string(state.conversation_id()) + ", last seq " +
                             std::to_string(state.last_seq()) + ")");
      } else if (state.conversation_id() != 0) {
        info = HandleConversationUpdate(state);
      }
      if (!info.ok()) ReportError(info.status());
      if (auto it = ops_.find(envelope.rid()); envelope.rid() != 0 && it != ops_.end()) {
        PendingOp op = std::move(it->second);
        ops_.erase(it);
        if (op.conversation) op.conversation(std::move(info));
      } else if (envelope.rid() != 0) {
        expired_.erase(envelope.rid());  // a late answer: nothing more will come for it
      }
      break;
    }
    case v1::Envelope::kReceiptsPage:
      if (auto it = ops_.find(envelope.rid()); envelope.rid() != 0 && it != ops_.end()) {
        PendingOp op = std::move(it->second);
        ops_.erase(it);
        std::vector<MemberWatermarks> members;
        for (const v1::MemberReceipt& m : envelope.receipts_page().members()) {
          MemberWatermarks r;
          r.user_id = m.user_id();
          r.delivered_seq = m.delivered_seq();
          r.read_seq = m.read_seq();
          r.role = m.role() == v1::ROLE_ADMIN    ? Role::kAdmin
                   : m.role() == v1::ROLE_MEMBER ? Role::kMember
                                                 : Role::kUnspecified;
          members.push_back(std::move(r));
        }
        if (op.receipts) op.receipts(std::move(members));
      } else if (envelope.rid() != 0) {
        expired_.erase(envelope.rid());
      }
      break;
    case v1::Envelope::kReceiptUpdate:
      HandleReceiptUpdate(envelope.rid(), envelope.receipt_update());
      break;
    case v1::Envelope::kTypingUpdate:
      HandleTypingUpdate(envelope.typing_update());
      break;
    case v1::Envelope::kPresenceUpdate:
      HandlePresenceUpdate(envelope.presence_update());
      break;
    case v1::Envelope::kMessagesExpired:
      HandleMessagesExpired(envelope.messages_expired());
      break;
    case v1::Envelope::kOk:
      HandleOk(envelope.rid());
      break;
    case v1::Envelope::kPong:
      quiet_rids_.erase(envelope.rid());
      break;
    default:
      // The replies of features this client does not use only prove the link alive.
      break;
  }
}

void Session::HandleWelcome(const v1::Envelope& envelope) {
  if (phase_ != Phase::kHello) return;
  const v1::Welcome& welcome = envelope.welcome();
  const uint64_t cached_epoch = cache_->Epoch();
  const std::string cached_user = cache_->UserId();
  if ((cached_epoch != 0 && cached_epoch != welcome.epoch()) ||
      (!cached_user.empty() && cached_user != welcome.user_id())) {
    // The cache describes another data set (a replaced store, or another user): rebuild it.
    if (!RebuildForEpoch(welcome, cached_user)) return;
  } else if (Status st = cache_->SetIdentity(welcome.epoch(), welcome.user_id()); !st.ok()) {
    ReportError(st);
  }
  user_id_ = welcome.user_id();
  // The server's interval is the longest the client may use: the server counts a connection
  // silent past its presence TTL as offline (presence, push).
  const uint32_t server_ms = welcome.limits().heartbeat_interval_ms() != 0
                                 ? welcome.limits().heartbeat_interval_ms()
                                 : kDefaultHeartbeatMs;
  heartbeat_ms_ = options_.heartbeat_interval_ms != 0
                      ? std::min<uint32_t>(options_.heartbeat_interval_ms, server_ms)
                      : server_ms;
  const int64_t now = Now();
  last_rx_ = now;
  // The token worked: when it expires later, that is a first expiry again, refreshed at once.
  refreshed_last_ = false;
  // The first ping comes up to half an interval early, at random, so clients that connected
  // together (after a server restart, say) do not all ping the server in the same moment of
  // every interval; from then on, one interval apart.
  next_ping_ = now + heartbeat_ms_ - static_cast<int64_t>(random_() % (heartbeat_ms_ / 2 + 1));
  outbox_retry_at_ = 0;
  receipts_retry_at_ = 0;
  // Receipts owed from before (a Receipt unanswered when the client was closed or the process
  // ended): the Sync lists only conversations with news, so nothing else would send them.
  // They go at the usual pace: what was owed before this connection is not held back again
  // (kLargeGroupDeliveredDelayMs).
  for (ConversationId conversation : cache_->ReceiptsDue()) MakeReceiptDue(conversation, now);
  // 90% of the server's rate leaves room for Pings, Syncs and History requests.
  const uint32_t per_second = welcome.limits().messages_per_second();
  send_rate_ = per_second * 0.9 / 1000.0;
  send_capacity_ = std::max(1.0, per_second * 0.9);
  send_tokens_ = send_capacity_;
  send_tokens_at_ = now;
  max_body_bytes_ = welcome.limits().max_body_bytes();
  max_frame_bytes_ = welcome.limits().max_message_bytes();
  const uint32_t presence_max = welcome.limits().max_presence_subscriptions();
  presence_limit_ = presence_max == 0 ? kMaxPresenceSubscriptions
                                      : std::min<size_t>(kMaxPresenceSubscriptions, presence_max);
  SetPhase(Phase::kSyncing);
  SendSync();
}

bool Session::RebuildForEpoch(const v1::Welcome& welcome, const std::string& cached_user) {
  stubs_.clear();
  rowless_floors_.clear();  // the old store's
  floors_taken_.clear();
  // The outbox was kept, but what it holds was written by the cached user, some of it to
  // conversation ids of the old store: another user must not send any of it, and an old id
  // may name another conversation in the new store. A message to a peer (by user id) still
  // goes when only the store changed.
  const bool other_user = !cached_user.empty() && cached_user != welcome.user_id();
  std::vector<MessageEvent> failed;
  Status st;
  {
    // One transaction: the new epoch is stored only with every old-store message failed, or a
    // crash half way would leave the rest pending under an epoch that no longer asks for a
    // rebuild, to be sent to whatever their conversation ids name in the new store. Nothing is
    // reported inside it (no CacheTxn needed): the failures are told once it is committed.
    Cache::Transaction txn(cache_);
    st = txn.active() ? cache_->ResetForEpoch(welcome.epoch(), welcome.user_id())
                      : Unavailable("cache: transaction did not start");
    for (const OutboxEntry& entry : cache_->PendingOutbox(kOutboxScanMax)) {
      if (!st.ok()) break;
      Status reason;
      if (other_user) {
        reason = FailedPrecondition("signed in as another user: not sent");
      } else if (entry.conversation_id != 0) {
        reason = FailedPrecondition("the server's store changed: not sent");
      } else {
        continue;
      }
      st = cache_->FailOutbox(entry.client_msg_id, reason);
      MessageEvent event = OutboxMessageEvent(entry, user_id_, options_.device_id);
      event.status = MessageStatus::kFailed;
      event.reason = reason;
      failed.push_back(std::move(event));
    }
    if (st.ok()) st = txn.Commit();
  }
  if (!st.ok()) {
    // Rolled back: the cache keeps the old identity, so the next connection tries again. Used
    // as it is, the old cursors (above the new store's seqs, as often as not) would hide the
    // new store's messages.
    ReportError(Status(st.code(), "the cache could not be rebuilt for the server's new epoch: " +
                                      std::string(st.message())));
    Disconnect("cache rebuild failed");
    return false;
  }
  for (const MessageEvent& event : failed) listener_->OnMessage(event);
  ReportError(DataLoss(other_user ? "signed in as another user: the cache was rebuilt"
                                  : "server epoch changed: the cache was rebuilt"));
  return true;
}

void Session::HandleError(const v1::Envelope& envelope) {
  const v1::Error& error = envelope.error();
  Status status(codec::FromProtoCode(error.code()), error.message());
  // The server's wait is followed up to kMaxRetryAfterMs: a larger one (a server bug, or a
  // hostile one) would park the outbox and the reconnects for days.
  const uint32_t retry_after = std::min<uint32_t>(error.retry_after_ms(), kMaxRetryAfterMs);
  if (retry_after != 0) status.set_retry_after_ms(retry_after);
  const uint64_t rid = envelope.rid();

  if (phase_ == Phase::kHello || (rid != 0 && rid == hello_rid_)) {
    // The server refused the connection; it closes it next.
    if (IsTokenExpired(error)) token_expired_ = true;
    retry_after_ms_ = std::max(retry_after_ms_, retry_after);
    ReportError(status);
    Disconnect("hello refused: " + status.ToString());
    return;
  }
  if (auto it = in_flight_.find(rid); rid != 0 && it != in_flight_.end()) {
    std::string client_msg_id = it->second;
    in_flight_ids_.erase(client_msg_id);
    in_flight_.erase(it);
    if (IsRetryable(status.code())) {
      // Keep it pending; it goes again (same client_msg_id) after the server's delay.
      int64_t wait = std::max<int64_t>(kOutboxRetryMinMs, retry_after);
      outbox_retry_at_ = std::max(outbox_retry_at_, Now() + wait);
      return;
    }
    std::optional<OutboxEntry> entry = cache_->FindOutbox(client_msg_id);
    if (!entry || entry->status != MessageStatus::kPending) return;
    FailPending(*entry, status);
    PumpOutbox();
    return;
  }
  if (auto it = histories_.find(rid); rid != 0 && it != histories_.end()) {
    HistoryCallback callback = std::move(it->second.callback);
    histories_.erase(it);
    callback(status);
    return;
  }
  if (auto it = ops_.find(rid); rid != 0 && it != ops_.end()) {
    PendingOp op = std::move(it->second);
    ops_.erase(it);
    if (!op.presence.empty()) {
      PresenceRefused(std::move(op), status);
      return;
    }
    if (op.push) {
      PushRefused(std::move(op), status);
      return;
    }
    if (op.catch_up) ReportError(status);  // a refused Subscribe: nobody else is told
    if (op.conversation) op.conversation(status);
    if (op.receipts) op.receipts(status);
    if (op.status) op.status(status);
    return;
  }
  if (rid != 0 && expired_.erase(rid) > 0) {
    // Its callback (or OnError) had DeadlineExceeded already; it is not called twice.
    Log(LogLevel::kInfo, "chat client: late answer to a request given up: " + status.ToString());
    return;
  }
  if (auto it = receipts_unanswered_.find(rid); rid != 0 && it != receipts_unanswered_.end()) {
    const ConversationId conversation = it->second.conversation;
    receipts_unanswered_.erase(it);
    // Not worth an OnError per message. Refused for now (rate limit, overload), the Receipt goes
    // again after the server's delay, with the watermarks of then; refused for good, it is not
    // repeated (the next move of the watermarks sends a new one).
    Log(LogLevel::kInfo, "chat client: receipt refused: " + status.ToString());
    if (IsRetryable(status.code())) {
      MakeReceiptDue(conversation, Now());
      receipts_retry_at_ =
          std::max(receipts_retry_at_, Now() + std::max<int64_t>(kReceiptRetryMinMs, retry_after));
    } else {
      ReceiptRefused(conversation);
    }
    return;
  }
  if (auto it = quiet_rids_.find(rid); rid != 0 && it != quiet_rids_.end()) {
    Log(LogLevel::kInfo,
        std::string("chat client: ") + it->second + " refused: " + status.ToString());
    quiet_rids_.erase(it);
    return;
  }
  if (auto it = unsubscribes_.find(rid); rid != 0 && it != unsubscribes_.end()) {
    const SentUnsubscribe sent = it->second;
    unsubscribes_.erase(it);
    UnsubscribeRefused(sent.channel, sent.resends, status);
    return;
  }
  if (rid != 0 && rid == sync_rid_) {
    // Without a successful Sync the cache cannot be trusted to be complete: start over.
    ReportError(status);
    retry_after_ms_ = std::max(retry_after_ms_, retry_after);
    Disconnect("sync failed: " + status.ToString());
    return;
  }
  if (IsTokenExpired(error)) token_expired_ = true;
  retry_after_ms_ = std::max(retry_after_ms_, retry_after);
  ReportError(status);
}

std::optional<ConversationRow> Session::LoadRow(ConversationId conversation) {
  std::optional<ConversationRow> row = cache_->GetConversation(conversation);
  if (row) cache_->ApplyKept(&*row);
  return row;
}

ConversationRow Session::LoadOrStub(ConversationId conversation) {
  if (std::optional<ConversationRow> row = LoadRow(conversation)) return *row;
  return NewRow(conversation);
}

ConversationRow Session::NewRow(ConversationId conversation) {
  ConversationRow row;
  row.info.conversation_id = conversation;
  row.expired_through = KnownFloor(conversation, std::nullopt);
  // Made from a rowless floor in the open CacheTxn: the floor goes once the row is committed.
  if (txn_depth_ > 0 && rowless_floors_.contains(conversation)) {
    floors_taken_.insert(conversation);
  }
  return row;
}

Seq Session::KnownFloor(ConversationId conversation,
                        const std::optional<ConversationRow>& row) const {
  if (row) return row->expired_through;
  auto it = rowless_floors_.find(conversation);
  return it != rowless_floors_.end() ? it->second.through : 0;
}

void Session::KeepRowlessFloor(ConversationId conversation, Seq through) {
  auto it = rowless_floors_.find(conversation);
  if (it == rowless_floors_.end() && rowless_floors_.size() >= kMaxRowlessFloors) {
    // The oldest goes: the newest is the likeliest to be in use (its Sync in flight).
    rowless_floors_.erase(std::min_element(
        rowless_floors_.begin(), rowless_floors_.end(),
        [](const auto& a, const auto& b) { return a.second.order < b.second.order; }));
  }
  rowless_floors_[conversation] = {through, ++rowless_order_};
}

void Session::Apply(ConversationRow* row, const v1::Message& next,
                    std::vector<MessageEvent>* events, bool* others, bool* read_moved) {
  row->cursor = next.seq();
  row->info.last_seq = std::max(row->info.last_seq, next.seq());
  row->info.last_activity_ms = std::max(row->info.last_activity_ms, next.server_time_ms());
  const bool own = !user_id_.empty() && next.sender() == user_id_;
  if (!own && next.kind() != v1::MESSAGE_KIND_SYSTEM && next.seq() > row->info.read_seq) {
    ++row->info.unread;
  }
  if (!own) *others = true;
  if (own && next.kind() != v1::MESSAGE_KIND_SYSTEM) {
    // Replying means the user saw the conversation: the read watermark follows the user's
    // own message. It also lets the members' read_all_seq (which includes this user) reach
    // the user's own messages, so their status can become kRead.
    row->info.read_seq = std::max(row->info.read_seq, next.seq());
    row->info.unread = 0;
    *read_moved = true;
  }
  if (next.kind() == v1::MESSAGE_KIND_SYSTEM) ApplySystemEvent(&row->info, next);
  if (own && !next.client_msg_id().empty()) {
    // Our own message came back (Sync, or another device's echo): it is no longer pending.
    if (std::optional<OutboxEntry> entry = cache_->FindOutbox(next.client_msg_id());
        entry && entry->status == MessageStatus::kPending) {
      (void)cache_->RemoveOutbox(next.client_msg_id());
      if (row->info.peer.empty() && !entry->peer.empty()) {
        row->info.peer = entry->peer;
        row->info.kind = ConversationKind::kDirect;
      }
    }
  }
  events->push_back(EventFor(next));
}

bool Session::Advance(ConversationRow* row, std::vector<MessageEvent>* events, Seq skip_to) {
  const ConversationId id = row->info.conversation_id;
  bool others = false;
  bool read_moved = false;
  while (row->cursor < skip_to) {
    std::optional<v1::Message> next = cache_->FirstInRange(id, row->cursor + 1, skip_to);
    if (!next) {
      row->cursor = skip_to;
      row->info.last_seq = std::max(row->info.last_seq, skip_to);
      break;
    }
    Apply(row, *next, events, &others, &read_moved);
  }
  while (std::optional<v1::Message> next = cache_->GetMessage(id, row->cursor + 1)) {
    Apply(row, *next, events, &others, &read_moved);
  }
  // Messages reached the application: tell the server (coalesced, see FlushReceipts). Only
  // the user's own messages alone need no delivered receipt unless they also moved read_seq.
  const bool delivered_moved = (others || read_moved) && row->cursor > row->info.delivered_seq;
  if (delivered_moved) row->info.delivered_seq = row->cursor;
  if (delivered_moved || read_moved) {
    row->receipt_due = true;
    MakeReceiptDue(id, read_moved ? Now() : DeliveredReceiptAt(row->info));
  }
  return cache_->CountRange(id, row->cursor + 1, kMaxCachedSeq) > 0;
}

MessageEvent Session::EventFor(const v1::Message& message) const {
  MessageEvent event;
  event.message = codec::FromProto(message);
  event.status = MessageStatus::kSent;
  event.outgoing = !user_id_.empty() && message.sender() == user_id_;
  return event;
}

bool Session::Ingest(const std::vector<const v1::Message*>& messages, bool from_sync,
                     const std::set<ConversationId>& stated) {
  std::vector<MessageEvent> events;
  std::vector<ConversationInfo> updated;
  bool missing = false;
  bool new_stub = false;
  {
    CacheTxn txn(this);
    if (!txn.Started()) return false;
    std::map<ConversationId, ConversationRow> rows;
    std::set<ConversationId> first_moved;  // first_seq set from 0 (see below)
    for (const v1::Message* m : messages) {
      // No place in the cache: seqs start at 1 and end at kMaxCachedSeq.
      if (m->conversation_id() == 0 || m->seq() == 0 || m->seq() > kMaxCachedSeq) {
        ReportError(ProtocolError("a message at conversation " +
                                  std::to_string(m->conversation_id()) + ", seq " +
                                  std::to_string(m->seq())));
        continue;
      }
      auto it = rows.find(m->conversation_id());
      if (it == rows.end()) {
        ConversationRow row = LoadOrStub(m->conversation_id());
        if (row.info.kind == ConversationKind::kUnspecified &&
            stubs_.insert(m->conversation_id()).second) {
          new_stub = true;
        }
        it = rows.emplace(m->conversation_id(), std::move(row)).first;
      }
      // Given already, or deleted by retention (a reply the server read before its sweep).
      if (m->seq() <= it->second.cursor || m->seq() <= it->second.expired_through) continue;
      if (Status st = cache_->PutMessage(*m); !st.ok()) {
        ReportError(st);
        return false;
      }
      // A known conversation with first_seq 0 had nothing stored up to its last seq (retention
      // deleted it all, or nothing was ever sent): what the server stores now starts after that,
      // as its own first_seq does. A stub's first_seq is unknown until its state comes.
      ConversationInfo& info = it->second.info;
      if (info.first_seq == 0 && info.kind != ConversationKind::kUnspecified) {
        info.first_seq =
            std::min(m->seq(), std::max(it->second.expired_through, info.last_seq) + 1);
        first_moved.insert(m->conversation_id());
      }
    }
    for (auto& [id, row] : rows) {
      const Seq before = row.cursor;
      missing |= Advance(&row, &events);
      if (row.cursor != before || first_moved.contains(id) || !cache_->GetConversation(id)) {
        if (Status st = cache_->PutConversation(row); !st.ok()) {
          ReportError(st);
          return false;
        }
        if (!stated.contains(id)) updated.push_back(row.info);
      }
    }
    if (Status st = txn.Commit(); !st.ok()) {
      ReportError(st);
      return false;
    }
  }
  for (const MessageEvent& event : events) listener_->OnMessage(event);
  for (const ConversationInfo& info : updated) listener_->OnConversationUpdated(info);
  if (!updated.empty()) ReportUnreadTotal();
  // A Sync reply carries the states of the conversations it brings; a Deliver does not.
  if (missing || (new_stub && !from_sync)) RequestSync();
  return true;
}

void Session::HandleSendAck(const v1::Envelope& envelope) {
  const v1::SendAck& ack = envelope.send_ack();
  std::string client_msg_id = ack.client_msg_id();
  if (auto it = in_flight_.find(envelope.rid()); it != in_flight_.end()) {
    if (client_msg_id.empty()) client_msg_id = it->second;
    in_flight_ids_.erase(it->second);
    in_flight_.erase(it);
  }
  std::optional<OutboxEntry> entry = cache_->FindOutbox(client_msg_id);
  const bool pending = entry && entry->status == MessageStatus::kPending;
  std::string bad;
  if (pending && (ack.conversation_id() == 0 || ack.seq() == 0)) {
    // No place to store it at: kept pending, it would be sent again at once, and acked the
    // same way, without end.
    bad = "a SendAck without a conversation id or seq for " + client_msg_id;
  } else if (pending && ack.seq() > kMaxCachedSeq) {
    bad = "a SendAck past the largest seq for " + client_msg_id;
  } else if (pending && entry->conversation_id != 0 &&
             ack.conversation_id() != entry->conversation_id) {
    // Stored under the conversation the ack names, it would show in a conversation it was
    // not sent to.
    bad = "a SendAck naming conversation " + std::to_string(ack.conversation_id()) + " for " +
          client_msg_id + ", sent to conversation " + std::to_string(entry->conversation_id);
  }
  if (!bad.empty()) {
    // It fails like a refused message.
    const Status error = ProtocolError(bad);
    ReportError(error);
    FailPending(*entry, error);
  } else if (pending) {
    // The committed message is known in full: the ack names its place, the outbox its content.
    v1::Message message;
    message.set_conversation_id(ack.conversation_id());
    message.set_seq(ack.seq());
    message.set_message_id(ack.message_id());
    message.set_sender(user_id_);
    message.set_sender_device(options_.device_id);
    message.set_client_msg_id(client_msg_id);
    message.set_server_time_ms(ack.server_time_ms());
    message.set_kind(v1::MESSAGE_KIND_USER);
    message.set_content_type(entry->content_type);
    message.set_body(entry->body);
    Seq cursor = 0;  // the conversation's, before this message (0 for one created here)
    Seq floor = 0;   // what retention deleted there, as far as this client was told
    bool stored = false;
    {
      CacheTxn txn(this);
      if (txn.Started()) {
        std::optional<ConversationRow> known = cache_->GetConversation(ack.conversation_id());
        floor = KnownFloor(ack.conversation_id(), known);
        if (known) {
          cursor = known->cursor;
        } else if (!entry->peer.empty()) {
          ConversationRow row = NewRow(ack.conversation_id());
          row.info.kind = ConversationKind::kDirect;
          row.info.peer = entry->peer;
          (void)cache_->PutConversation(row);
        }
        // A message retention already deleted (its ack was lost, and the device stayed away
        // longer than the retention) is not stored back.
        if (ack.seq() > floor) (void)cache_->PutMessage(message);
        // Removed now, not when the message reaches the application: it may wait there behind
        // a hole, and must not be sent again meanwhile.
        (void)cache_->RemoveOutbox(client_msg_id);
        if (Status st = txn.Commit(); st.ok()) {
          stored = true;
        } else {
          ReportError(st);
        }
      }
    }
    if (!stored) {
      // Still pending in the outbox: it is sent again (the server answers with the same seq)
      // after a pause, so a cache that keeps failing is not asked again at once.
      outbox_retry_at_ = std::max(outbox_retry_at_, Now() + kOutboxRetryMinMs);
    } else if (ack.seq() <= floor) {
      // Committed, and already deleted by retention: reported sent, once, then gone, so an
      // application showing it pending takes it off the screen.
      listener_->OnMessage(EventFor(message));
      listener_->OnMessagesExpired(ack.conversation_id(), floor);
    } else if (cursor >= ack.seq()) {
      // A Sync gap moved the cursor past this seq while the ack was lost (the link dropped):
      // the message was never reported, and Ingest would skip it. It is reported here, once.
      listener_->OnMessage(EventFor(message));
    } else {
      // Reported now if it is the cursor's next seq, else when the hole below it is filled, or
      // passed by a Sync gap (Advance). Stored but not reported (the cache failed in between),
      // it is out of the outbox and nothing else may ask for it before the next connection.
      if (!Ingest({&message}, /*from_sync=*/false)) RetrySyncLater();
    }
  }
  PumpOutbox();
}

void Session::SendSync() {
  v1::Envelope envelope;
  sync_rid_ = NextRid();
  sync_deadline_ = NewDeadline(SyncTimeoutMs());
  sync_again_ = false;
  sync_retry_at_ = 0;
  envelope.set_rid(sync_rid_);
  v1::Sync* sync = envelope.mutable_sync();
  sync->set_limit(options_.sync_page_limit);
  // One statement for every conversation: a Sync goes once per page.
  for (const Cache::SyncCursor& row : cache_->SyncCursors()) {
    v1::Cursor* cursor = sync->add_cursors();
    cursor->set_conversation_id(row.conversation_id);
    // A conversation known only from a Deliver is synced from the start, so that the server
    // tells its state (kind, peer); its messages below the cursor are skipped on arrival.
    cursor->set_seq(stubs_.contains(row.conversation_id) ? 0 : row.cursor);
    // The server lists the conversation if retention deleted some of what this device holds
    // (it was offline when the notice went out), so it is dropped here too.
    cursor->set_lowest_seq(row.lowest_seq);
    // The server lists the conversation if the lowest watermarks rose past these while this
    // device was away (the ReceiptUpdates saying so reached nobody here), so the user's
    // messages read meanwhile show as read.
    cursor->set_delivered_all_seq(row.delivered_all_seq);
    cursor->set_read_all_seq(row.read_all_seq);
  }
  Write(envelope);
}

void Session::RequestSync() {
  if (!Authenticated()) return;
  if (sync_rid_ != 0) {
    sync_again_ = true;
    return;
  }
  SendSync();
}

Status Session::CheckSyncBatch(const v1::SyncBatch& batch) {
  std::map<ConversationId, Seq> last_seqs;
  for (const v1::ConversationState& state : batch.conversations()) {
    if (state.conversation_id() == 0) return ProtocolError("a state for conversation 0");
    Seq& last = last_seqs[state.conversation_id()];
    last = std::max(last, state.last_seq());
  }
  for (const v1::Gap& gap : batch.gaps()) {
    const ConversationId id = gap.conversation_id();
    const std::string where = " (conversation " + std::to_string(id) + ", seqs " +
                              std::to_string(gap.from_seq()) + " to " +
                              std::to_string(gap.to_seq()) + ")";
    if (id == 0) return ProtocolError("a Sync gap for conversation 0" + where);
    if (gap.from_seq() == 0 || gap.to_seq() < gap.from_seq()) {
      return ProtocolError("an empty Sync gap" + where);
    }
    // The server lists the state of every conversation a reply has a gap for; a gap past its
    // last seq would move the cursor over seqs that do not exist (at UINT64_MAX for good).
    auto last = last_seqs.find(id);
    if (last == last_seqs.end()) return ProtocolError("a Sync gap without its state" + where);
    if (gap.to_seq() > last->second) {
      return ProtocolError("a Sync gap past the last seq " + std::to_string(last->second) + where);
    }
    if (gap.to_seq() > kMaxCachedSeq) {
      return ProtocolError("a Sync gap past the largest seq" + where);
    }
    // A gap starts at the cursor this client sent, and the cursor only moves forward: one above
    // it would leave a hole below it that no Sync fills.
    const std::optional<ConversationRow> row = cache_->GetConversation(id);
    const Seq cursor = row ? row->cursor : 0;
    if (gap.from_seq() - 1 > cursor) {
      return ProtocolError("a Sync gap above the cursor " + std::to_string(cursor) + where);
    }
  }
  // MergeState takes the server's last seq as it is, so it must be one the cache can hold.
  for (const auto& [id, last] : last_seqs) {
    if (last > kMaxCachedSeq) {
      return ProtocolError("a state past the largest seq (conversation " + std::to_string(id) +
                           ", last seq " + std::to_string(last) + ")");
    }
  }
  return Status::Ok();
}

void Session::HandleSyncBatch(const v1::SyncBatch& batch) {
  if (Status error = CheckSyncBatch(batch); !error.ok()) {
    // Refused whole, as a failed Sync: the cursors stay, and the next connection syncs again.
    ReportError(error);
    Disconnect("sync reply refused: " + error.ToString());
    return;
  }
  // A Sync asked for before this page came (a channel subscribed to, a message above a hole)
  // goes whatever becomes of the page; one asked for while it is applied, only if it is stored.
  const bool asked_before = sync_again_;
  std::vector<MessageEvent> events;
  bool progress = false;  // the page holds something to apply
  bool saved = true;      // and the cache stored all of it
  // Gaps first: the newest messages of a conversation come in the same batch as the gap below
  // them, and the cursor must jump over the gap before they can follow it.
  if (batch.gaps_size() > 0) {
    CacheTxn txn(this);
    saved = txn.Started();
    for (const v1::Gap& gap : batch.gaps()) {
      if (!saved) break;
      ConversationRow row = LoadOrStub(gap.conversation_id());
      if (gap.from_seq() <= row.cursor + 1 && gap.to_seq() > row.cursor) {
        // The cached messages inside the gap waited behind a hole below them (this device's
        // own acked sends, or others' received live); the server does not send them. The
        // cursor passes them in order, reporting each (the rest of the batch follows).
        (void)Advance(&row, &events, gap.to_seq());
        progress = true;
        if (Status st = cache_->PutConversation(row); !st.ok()) {
          ReportError(st);
          saved = false;  // rolled back: none of the batch's gaps is applied
        }
      }
    }
    if (saved) {
      if (Status st = txn.Commit(); !st.ok()) {
        ReportError(st);
        saved = false;
      }
    }
  }
  // Reported only once the cursors past them are stored (else the next Sync brings the gap
  // again, and they are reported then, once).
  if (saved) {
    for (const MessageEvent& event : events) listener_->OnMessage(event);
  }
  if (!Authenticated()) return;
  std::vector<const v1::Message*> messages;
  messages.reserve(static_cast<size_t>(batch.messages_size()));
  for (const v1::Message& m : batch.messages()) messages.push_back(&m);
  if (!messages.empty()) progress = true;
  // The conversations the page states are reported once, from their states below, whether
  // those are stored or not.
  std::set<ConversationId> stated;
  for (const v1::ConversationState& state : batch.conversations()) {
    stated.insert(state.conversation_id());
  }
  // Ingest may ask for another Sync (a hole); this one is still in flight, so it is noted.
  if (!Ingest(messages, /*from_sync=*/true, stated)) saved = false;
  if (!Authenticated()) return;
  std::vector<const v1::ConversationState*> states;
  states.reserve(static_cast<size_t>(batch.conversations_size()));
  for (const v1::ConversationState& state : batch.conversations()) states.push_back(&state);
  if (!states.empty()) progress = true;
  // Not stored (reported), they are told without the rise of the lowest marks: the cursors
  // stored still name the marks stored, so the next Sync lists them again.
  StoredStates stored;
  if (!StoreStates(states, &stored)) saved = false;
  ReportStates(stored);
  if (!Authenticated()) return;
  ReportUnreadTotal();

  sync_rid_ = 0;
  sync_timeouts_ = 0;
  // Without progress another page would be the same page: stop rather than loop. Nor is a page
  // the cache could not store all of progress (reported): the cursors sent next would bring it
  // again, at once and for as long as the cache fails. The client goes live with what it holds
  // and asks again after a while, longer after each such page in a row (kSyncRetryMinMs), or
  // sooner when something asks for a Sync (a message above a hole, a channel subscribed to, a
  // state past the cursor). Such a Sync asked for while this one was in flight goes in any case:
  // the server may have read this one before what it is asked for happened. Not one that
  // applying a page not stored asked for: the page itself asks (a message it holds above a gap it
  // could not store), and would come back at once.
  const bool again = saved ? sync_again_ : asked_before;
  sync_again_ = false;
  if (saved) {
    sync_retry_ms_ = 0;
    // A retry armed while the delays were longer (a live message not stored while this Sync was
    // in flight) starts over as well.
    if (sync_retry_at_ != 0) sync_retry_at_ = std::min(sync_retry_at_, Now() + kSyncRetryMinMs);
  } else {
    sync_retry_ms_ =
        sync_retry_ms_ == 0 ? kSyncRetryMinMs : std::min(2 * sync_retry_ms_, kSyncRetryMaxMs);
    sync_retry_at_ = Now() + sync_retry_ms_;
  }
  if ((batch.has_more() && progress && saved) || again) {
    SendSync();
    return;
  }
  if (phase_ == Phase::kSyncing) {
    SetPhase(Phase::kLive);
    // The server forgets subscriptions with the connection.
    for (ConversationId channel : subscriptions_) {
      if (!SendSubscribe(channel, /*automatic=*/true)) return;
    }
    ResumePresenceAndPush();
    if (phase_ != Phase::kLive) return;
    PumpOutbox();
  }
}

void Session::HandleHistoryPage(uint64_t rid, const v1::HistoryPage& page) {
  auto it = histories_.find(rid);
  if (it == histories_.end()) {
    if (rid != 0) expired_.erase(rid);  // a late page is dropped
    return;
  }
  PendingHistory pending = std::move(it->second);
  histories_.erase(it);
  HistoryCallback callback = std::move(pending.callback);
  // A message of another conversation, or outside the range asked for, stored at its seq would
  // take the place of the real one (a second copy of a seq is ignored).
  std::string bad;
  if (page.conversation_id() != pending.conversation) {
    bad = "a History page of conversation " + std::to_string(page.conversation_id()) +
          " for conversation " + std::to_string(pending.conversation);
  }
  for (const v1::Message& m : page.messages()) {
    if (!bad.empty()) break;
    // A newest page (before_seq 0) has no bound but the cache's: a message past it would hold
    // the conversation's last_seq there for good (MergeState keeps it at the cached messages).
    if (m.conversation_id() != pending.conversation || m.seq() == 0 || m.seq() > kMaxCachedSeq ||
        (pending.before_seq != 0 && m.seq() >= pending.before_seq) ||
        (page.first_seq() != 0 && m.seq() < page.first_seq())) {
      bad = "a History message of conversation " + std::to_string(m.conversation_id()) +
            " at seq " + std::to_string(m.seq()) + " for conversation " +
            std::to_string(pending.conversation) + " before seq " +
            std::to_string(pending.before_seq);
    }
  }
  if (!bad.empty()) {
    const Status error = ProtocolError(bad);
    ReportError(error);
    callback(error);
    return;
  }
  HistoryResult result;
  result.conversation_id = page.conversation_id();
  result.has_more = page.has_more();
  {
    CacheTxn txn(this);
    // A page the server read before its retention sweep may hold what this client was told
    // since is deleted: those messages are neither stored nor shown, and nothing older is left.
    const Seq expired_through =
        KnownFloor(pending.conversation, cache_->GetConversation(pending.conversation));
    for (const v1::Message& m : page.messages()) {
      if (m.seq() <= expired_through) {
        result.has_more = false;
        continue;
      }
      (void)cache_->PutMessage(m);
      result.messages.push_back(codec::FromProto(m));
    }
    if (Status st = txn.Commit(); !st.ok()) ReportError(st);
  }
  // The page's first_seq is the lowest seq this user may read: retention's floor, or the seq
  // that (last) added the user, whichever is higher (0: nothing it may read is stored), so it
  // alone does not say that what the cache holds below it expired (a member added again holds
  // messages from before). When the cache holds something below it, a Sync asks: the server
  // lists the conversation's state if retention deleted it (Cursor.lowest_seq), and the state
  // drops it. Once per first_seq and connection: for a member added again it holds on every
  // page (and a server that ignores lowest_seq never lists the state), so each page would
  // otherwise cost a full Sync.
  const Seq lowest = cache_->LowestSeq(pending.conversation);
  const bool nothing_stored = page.first_seq() == 0 && page.messages().empty();
  if (lowest != 0 && (nothing_stored || lowest < page.first_seq()) &&
      history_syncs_.emplace(pending.conversation, page.first_seq()).second) {
    RequestSync();
  }
  callback(std::move(result));
}

ConversationInfo Session::HandleConversationUpdate(const v1::ConversationState& state) {
  StoredStates stored;
  // As in HandleSyncBatch: not stored (reported), it is told without the rise of the lowest
  // marks, to a request's callback as well.
  const bool ok = StoreStates({&state}, &stored);
  ReportStates(stored);
  ReportUnreadTotal();
  const ConversationRow& row = stored.rows.front().row;
  if (row.info.last_seq > row.cursor) {
    if (ok) {
      RequestSync();
    } else {
      // Not stored, the state asks for the messages past the cursor all the same (nothing else
      // may ask before the next connection).
      RetrySyncLater();
    }
  }
  return row.info;
}

void Session::RetrySyncLater() {
  // After the delay a Sync page not stored waits: the cache just failed, and would likely fail
  // that Sync's page too.
  if (sync_retry_at_ == 0) sync_retry_at_ = Now() + std::max(sync_retry_ms_, kSyncRetryMinMs);
}

bool Session::StoreStates(const std::vector<const v1::ConversationState*>& states,
                          StoredStates* stored) {
  if (states.empty()) return true;
  if (StoredStates out; WriteStates(states, &out)) {
    for (const StoredState& s : out.rows) stubs_.erase(s.row.info.conversation_id);
    *stored = std::move(out);
    return true;
  }
  // Rolled back: the rows are merged again from what the cache holds, without writing them. The
  // user's own watermarks and counts, the title and the membership are told as the states say
  // (no Sync lists the conversation again for them: its cursor does not name them), the lowest
  // marks as stored (a rise is told once the next Sync's state is stored, else twice).
  StoredStates out;
  std::map<ConversationId, ConversationRow> rows;  // a second state of one merges into the first
  for (const v1::ConversationState* state : states) {
    auto it = rows.find(state->conversation_id());
    if (it == rows.end()) {
      it = rows.emplace(state->conversation_id(), LoadOrStub(state->conversation_id())).first;
    }
    const ConversationInfo before = it->second.info;
    (void)MergeState(&it->second, *state);
    it->second.info.delivered_all_seq = before.delivered_all_seq;
    it->second.info.read_all_seq = before.read_all_seq;
    out.rows.push_back({it->second, LowestRise{}});
    out.unstored.push_back(it->second.info);
  }
  *stored = std::move(out);
  return false;
}

bool Session::WriteStates(const std::vector<const v1::ConversationState*>& states,
                          StoredStates* out) {
  CacheTxn txn(this);
  // Without a transaction the deletes would commit one by one while a failure later could
  // keep the application from being told.
  if (!txn.Started()) return false;
  for (const v1::ConversationState* state : states) {
    StoredState& s = out->rows.emplace_back();
    s.row = LoadOrStub(state->conversation_id());
    s.rise = MergeState(&s.row, *state);
    // What retention deleted goes with the state that says so (the server lists a
    // conversation whose deleted messages this device holds, see SendSync).
    if (!DropExpired(&s.row, ExpiredThrough(*state), &out->expired)) return false;
    // A failed write ends the transaction uncommitted: SQLite may have rolled it back
    // already, and each write after it would then commit on its own.
    if (Status st = cache_->PutConversation(s.row); !st.ok()) {
      ReportError(st);
      return false;
    }
  }
  if (Status st = txn.Commit(); !st.ok()) {
    ReportError(st);
    return false;
  }
  return true;
}

void Session::ReportStates(const StoredStates& stored) {
  KeepUnstored(stored.unstored);
  for (const auto& [id, through] : stored.expired) listener_->OnMessagesExpired(id, through);
  for (const StoredState& s : stored.rows) ReportStored(s.row.info, s.rise);
}

Session::LowestRise Session::RaiseLowest(ConversationInfo* info, Seq delivered_all_seq,
                                         Seq read_all_seq) {
  LowestRise rise;
  if (delivered_all_seq > info->delivered_all_seq) {
    info->delivered_all_seq = delivered_all_seq;
    rise.delivered = true;
  }
  if (read_all_seq > info->read_all_seq) {
    info->read_all_seq = read_all_seq;
    rise.read = true;
  }
  return rise;
}

void Session::ReportStored(const ConversationInfo& info, LowestRise rise) {
  if (rise.delivered) {
    listener_->OnMessageStatus(info.conversation_id, info.delivered_all_seq,
                               MessageStatus::kDelivered);
  }
  if (rise.read) {
    listener_->OnMessageStatus(info.conversation_id, info.read_all_seq, MessageStatus::kRead);
  }
  listener_->OnConversationUpdated(info);
}

Session::LowestRise Session::MergeState(ConversationRow* row, const v1::ConversationState& state) {
  const ConversationInfo local = row->info;
  ConversationInfo info = codec::FromProto(state);
  info.delivered_all_seq = local.delivered_all_seq;
  info.read_all_seq = local.read_all_seq;
  // Marks past the state's own last seq cannot be true: taken as far as it goes, or one bad
  // state would mark every later message of the user's as read for good.
  const LowestRise rise = RaiseLowest(&info, std::min(state.delivered_all_seq(), state.last_seq()),
                                      std::min(state.read_all_seq(), state.last_seq()));
  // The server's last seq is its word: a wrong one it sent before (a bug, or a hostile server)
  // is replaced, not kept as a maximum for good. A reply read by the server before messages that
  // have reached this client since (live, or held above a hole) is older than the cache, though:
  // last_seq stays at least at the newest message the cache holds.
  info.last_seq =
      std::max({info.last_seq, row->cursor, cache_->HighestSeq(state.conversation_id())});
  // Nor is first_seq ever taken back below what this client was told expired (a state read
  // before the sweep): with nothing stored up to the floor, the lowest stored seq is the one
  // after it, if any is.
  const Seq floor = std::max(row->expired_through, ExpiredThrough(state));
  if (info.first_seq != 0 || info.last_seq > floor) {
    info.first_seq = info.last_seq > floor ? std::max(info.first_seq, floor + 1) : 0;
  }
  if (info.peer == local.peer) {
    // A PresenceUpdate may have told a later last seen than the server's stored state.
    info.peer_last_seen_ms = std::max(info.peer_last_seen_ms, local.peer_last_seen_ms);
  }
  if (local.delivered_seq > info.delivered_seq) {
    // The server has not seen this device's delivered watermark yet: tell it again, as any
    // delivered-only Receipt (one owed from before this connection is due at the usual pace
    // already, since its Welcome).
    info.delivered_seq = local.delivered_seq;
    row->receipt_due = true;
    MakeReceiptDue(info.conversation_id, DeliveredReceiptAt(info));
  }
  if (local.read_seq > info.read_seq) {
    // The server has not seen this device's MarkRead yet: keep it and tell it again.
    info.read_seq = local.read_seq;
    info.unread = std::min(info.unread, local.unread);
    row->receipt_due = true;
    MakeReceiptDue(info.conversation_id, Now());
  }
  row->info = info;
  return rise;
}

bool Session::DropExpired(ConversationRow* row, Seq through, std::vector<Expiry>* expired) {
  if (through == 0) return true;
  const ConversationId conversation = row->info.conversation_id;
  // Every state of a Sync page says how far retention went: most often nothing cached is that
  // old, and one seek of the primary key says so without a DELETE.
  if (const Seq lowest = cache_->LowestSeq(conversation); lowest != 0 && lowest <= through) {
    Result<uint64_t> dropped = cache_->DeleteMessagesThrough(conversation, through);
    if (!dropped.ok()) {
      ReportError(dropped.status());
      return false;
    }
    if (*dropped > 0) expired->emplace_back(conversation, through);
  }
  row->expired_through = std::max(row->expired_through, through);
  return true;
}

void Session::HandleMessagesExpired(const v1::MessagesExpired& notice) {
  const ConversationId id = notice.conversation_id();
  if (id == 0 || notice.first_seq() > kMaxCachedSeq || notice.up_to_seq() > kMaxCachedSeq) {
    ReportError(ProtocolError("a MessagesExpired for conversation " + std::to_string(id) +
                              ", first seq " + std::to_string(notice.first_seq()) + ", up to seq " +
                              std::to_string(notice.up_to_seq())));
    return;
  }
  const Seq through = notice.first_seq() != 0 ? notice.first_seq() - 1 : notice.up_to_seq();
  if (through == 0) return;
  std::vector<Expiry> expired;
  std::optional<ConversationInfo> updated;
  {
    CacheTxn txn(this);
    std::optional<ConversationRow> row = LoadRow(id);
    // History pages of a conversation the cache has no row for are stored too: they go, and the
    // floor is kept apart until a row is made (LoadOrStub), whatever becomes of this transaction,
    // even one that did not start.
    ConversationRow rowless;
    rowless.info.conversation_id = id;
    const Seq floor_before = row ? row->expired_through : 0;
    if (!row && through > KnownFloor(id, std::nullopt)) KeepRowlessFloor(id, through);
    if (!txn.Started()) return;
    if (!DropExpired(row ? &*row : &rowless, through, &expired)) return;
    if (row) {
      const ConversationInfo before = row->info;
      if (notice.first_seq() != 0) {
        row->info.first_seq = std::max(row->info.first_seq, notice.first_seq());
      } else if (row->info.last_seq > through) {
        // Messages committed after the sweep reached this device before its notice: the
        // lowest one stored is the one after the deleted range.
        row->info.first_seq = std::max(row->info.first_seq, through + 1);
      } else {
        // Nothing is stored, so nothing is unread: the server counts stored messages only.
        // (Otherwise the count stays until the server's next state for the conversation.)
        row->info.first_seq = 0;
        row->info.unread = 0;
      }
      if (row->info.first_seq != before.first_seq || row->info.unread != before.unread ||
          row->expired_through != floor_before || !expired.empty()) {
        if (Status st = cache_->PutConversation(*row); !st.ok()) {
          ReportError(st);
          return;  // rolled back
        }
        updated = row->info;
      }
    }
    if (Status st = txn.Commit(); !st.ok()) {
      ReportError(st);
      return;
    }
  }
  for (const auto& [conversation, up_to] : expired) {
    listener_->OnMessagesExpired(conversation, up_to);
  }
  if (updated) {
    listener_->OnConversationUpdated(*updated);
    ReportUnreadTotal();
  }
}

void Session::ApplySystemEvent(ConversationInfo* info, const v1::Message& message) const {
  const v1::SystemEvent& event = message.system();
  const auto n = static_cast<uint32_t>(event.users_size());
  bool me = false;
  for (const std::string& user : event.users()) me |= !user_id_.empty() && user == user_id_;
  switch (event.type()) {
    case v1::SystemEvent::TYPE_CREATED:
    case v1::SystemEvent::TYPE_RENAMED:
      if (!event.title().empty()) info->title = event.title();
      if (event.type() == v1::SystemEvent::TYPE_CREATED && n > 0) info->member_count = n;
      break;
    case v1::SystemEvent::TYPE_MEMBERS_ADDED:
      info->member_count += n;
      if (me) info->removed_at_seq = 0;
      break;
    case v1::SystemEvent::TYPE_MEMBERS_REMOVED:
    case v1::SystemEvent::TYPE_MEMBER_LEFT:
      info->member_count -= std::min(info->member_count, n);
      if (me) info->removed_at_seq = message.seq();
      break;
    case v1::SystemEvent::TYPE_RETENTION_CHANGED:
      info->retention_ms = event.retention_ms();
      break;
    case v1::SystemEvent::TYPE_ROLE_CHANGED:
      if (me) {
        info->role = event.role() == v1::ROLE_ADMIN ? Role::kAdmin : Role::kMember;
      }
      break;
    default:
      break;
  }
}

void Session::HandleReceiptUpdate(uint64_t rid, const v1::ReceiptUpdate& update) {
  std::optional<SentReceipt> answered;
  if (auto it = receipts_unanswered_.find(rid); rid != 0 && it != receipts_unanswered_.end()) {
    answered = it->second;
    receipts_unanswered_.erase(it);
  }
  std::optional<ConversationRow> found = LoadRow(update.conversation_id());
  if (!found) return;  // a conversation this client has not synced yet; Sync brings its state
  ConversationRow row = std::move(*found);
  const bool own = !user_id_.empty() && update.user_id() == user_id_;
  // This is the answer to a Receipt that carried this device's current watermarks. The server
  // never moves them back and caps them at what it has, so what it answered, even below them,
  // is all it takes: the same Receipt again would get the same answer, on every connection.
  const bool answered_current =
      own && answered && answered->conversation == update.conversation_id() &&
      answered->delivered_seq >= row.info.delivered_seq && answered->read_seq >= row.info.read_seq;
  // Or the server holds this user's watermarks here at least as far as this device moved them.
  // Either way no Receipt is owed any more (one due or in flight is merely repeated).
  const bool confirmed = own && row.receipt_due &&
                         (answered_current || (update.delivered_seq() >= row.info.delivered_seq &&
                                               update.read_seq() >= row.info.read_seq));
  if (confirmed) row.receipt_due = false;
  if (answered_current) receipts_due_.erase(update.conversation_id());
  bool info_changed = false;
  if (answered_current) {
    // Answered below what it carried: the server capped the watermarks at the messages it has
    // (its store went back). This device takes its word, so that a Sync showing the same owes no
    // Receipt and a later MarkRead up to the old mark is not taken for one already made.
    if (update.delivered_seq() < row.info.delivered_seq) {
      row.info.delivered_seq = update.delivered_seq();
      info_changed = true;
    }
    if (update.read_seq() < row.info.read_seq) {
      row.info.read_seq = update.read_seq();
      row.info.unread = update.unread();
      info_changed = true;
    }
  }
  if (own && update.read_seq() >= row.info.read_seq) {
    // Exact counts from the server: read on one device is read on all of the user's devices.
    info_changed = info_changed || update.read_seq() != row.info.read_seq ||
                   update.unread() != row.info.unread;
    row.info.read_seq = update.read_seq();
    row.info.unread = update.unread();
  }
  const Seq stored_delivered_all = row.info.delivered_all_seq;
  const Seq stored_read_all = row.info.read_all_seq;
  const LowestRise rise = RaiseLowest(&row.info, update.delivered_all_seq(), update.read_all_seq());
  const bool changed = info_changed || rise.delivered || rise.read;
  bool stored = true;
  if (confirmed || changed) {
    if (Status st = cache_->PutConversation(row); !st.ok()) {
      ReportError(st);
      stored = false;
    }
  }
  // Told below (OnConversationUpdated, after OnReceipt) though not stored: kept from now on.
  if (!stored && info_changed) KeepUnstored({row.info});
  // The reply to this device's own Receipt tells the application nothing new about members.
  if (rid == 0 || !own) {
    ReceiptEvent event;
    event.conversation_id = update.conversation_id();
    event.user_id = update.user_id();
    event.device_id = update.device_id();
    event.delivered_seq = update.delivered_seq();
    event.read_seq = update.read_seq();
    event.delivered_all_seq = update.delivered_all_seq();
    event.read_all_seq = update.read_all_seq();
    listener_->OnReceipt(event);
  }
  if (!stored) {
    // A rise the cache did not keep is told when a Sync lists the conversation's state again
    // (its cursor names the marks stored) and that is stored, as a Sync's rise is
    // (ReportStored). No Sync lists it for the user's own watermarks and counts, though (its
    // cursor does not name them): those are told now, with the lowest marks as stored.
    if (info_changed) {
      row.info.delivered_all_seq = stored_delivered_all;
      row.info.read_all_seq = stored_read_all;
      ReportStored(row.info, LowestRise{});
      ReportUnreadTotal();
    }
    return;
  }
  // ConversationInfo carries the lowest marks too: an application keeping it sees them move.
  if (changed) ReportStored(row.info, rise);
  if (info_changed) ReportUnreadTotal();
}

void Session::HandleTypingUpdate(const v1::TypingUpdate& update) {
  if (update.conversation_id() == 0 || update.user_id().empty()) return;
  if (!user_id_.empty() && update.user_id() == user_id_) return;
  auto key = std::make_pair(update.conversation_id(), update.user_id());
  if (!update.active()) {
    if (typing_.erase(key) > 0) listener_->OnTyping(key.first, key.second, false);
    return;
  }
  const int64_t show =
      update.expires_ms() == 0
          ? kTypingMaxShowMs
          : std::min<int64_t>(kTypingMaxShowMs, static_cast<int64_t>(update.expires_ms()));
  auto it = typing_.find(key);
  if (it != typing_.end()) {
    it->second = Now() + show;  // a refresh: already shown
    return;
  }
  if (typing_.size() >= kMaxTypingShown) return;
  typing_.emplace(key, Now() + show);
  listener_->OnTyping(key.first, key.second, true);
}

void Session::ExpireTyping() {
  const int64_t now = Now();
  for (auto it = typing_.begin(); it != typing_.end();) {
    if (it->second > now) {
      ++it;
      continue;
    }
    auto key = it->first;
    it = typing_.erase(it);
    listener_->OnTyping(key.first, key.second, false);
  }
}

void Session::MakeReceiptDue(ConversationId conversation, int64_t at) {
  auto [it, added] = receipts_due_.try_emplace(conversation, at);
  if (txn_depth_ > 0) {
    receipts_due_before_.try_emplace(conversation,
                                     added ? std::nullopt : std::optional<int64_t>(it->second));
  }
  if (!added) it->second = std::min(it->second, at);
}

int64_t Session::DeliveredReceiptAt(const ConversationInfo& info) const {
  const bool large =
      info.kind == ConversationKind::kGroup && info.member_count > kLargeGroupMembers;
  return Now() + (large ? kLargeGroupDeliveredDelayMs : 0);
}

void Session::FlushReceipts() {
  if (!Authenticated() || receipts_due_.empty()) return;
  const int64_t now = Now();
  if (now < receipts_sent_at_ + kReceiptIntervalMs || now < receipts_retry_at_) return;
  std::vector<ConversationId> due;
  for (auto it = receipts_due_.begin(); it != receipts_due_.end();) {
    if (it->second > now) {
      ++it;
      continue;
    }
    due.push_back(it->first);
    it = receipts_due_.erase(it);
  }
  if (due.empty()) return;  // only delayed ones wait: the interval starts when one goes
  receipts_sent_at_ = now;
  for (auto it = due.begin(); it != due.end(); ++it) {
    std::optional<ConversationRow> row = cache_->GetConversation(*it);
    if (!row) continue;
    v1::Envelope envelope;
    const uint64_t rid = NextRid();
    envelope.set_rid(rid);
    v1::Receipt* receipt = envelope.mutable_receipt();
    receipt->set_conversation_id(*it);
    receipt->set_delivered_seq(row->info.delivered_seq);
    receipt->set_read_seq(row->info.read_seq);
    if (receipts_unanswered_.size() >= kMaxQuietRids) {
      receipts_unanswered_.erase(receipts_unanswered_.begin());
    }
    receipts_unanswered_[rid] = {*it, row->info.delivered_seq, row->info.read_seq};
    if (!Write(envelope)) {
      // The connection was dropped, which made this Receipt due again: the rest wait with it.
      for (auto rest = std::next(it); rest != due.end(); ++rest) MakeReceiptDue(*rest, now);
      return;
    }
  }
}

void Session::ReceiptRefused(ConversationId conversation) {
  // A Receipt with later watermarks, waiting or unanswered, still owes them.
  if (receipts_due_.contains(conversation)) return;
  for (const auto& [rid, sent] : receipts_unanswered_) {
    if (sent.conversation == conversation) return;
  }
  std::optional<ConversationRow> row = LoadRow(conversation);
  if (!row || !row->receipt_due) return;
  row->receipt_due = false;
  if (Status st = cache_->PutConversation(*row); !st.ok()) ReportError(st);
}

bool Session::WriteQuiet(v1::Envelope* envelope, const char* what) {
  const uint64_t rid = NextRid();
  envelope->set_rid(rid);
  if (quiet_rids_.size() >= kMaxQuietRids) quiet_rids_.erase(quiet_rids_.begin());
  quiet_rids_.emplace(rid, what);
  return Write(*envelope);
}

void Session::KeepUnstored(const std::vector<ConversationInfo>& unstored) {
  // The last told of each (a page may list one twice) replaces what the cache holds of it, in
  // every later total (Client::UnreadTotal() too) and listing (Client::Conversations()) until its
  // row is written: else they would take back the news as if it never came. Kept before it is
  // told, so that an application reading either from inside the callback sees what it is told.
  for (const ConversationInfo& info : unstored) {
    cache_->KeepUnread(info.conversation_id, info.read_seq, info.unread);
  }
}

void Session::ReportUnreadTotal() {
  const uint64_t total = cache_->UnreadTotal();
  if (total == unread_total_) return;
  unread_total_ = total;
  listener_->OnUnreadTotal(total);
}

void Session::ConversationRequest(v1::Envelope request, ConversationCallback callback) {
  if (phase_ != Phase::kLive && phase_ != Phase::kSyncing) {
    callback(Unavailable("not connected"));
    return;
  }
  if (RequestsFull()) {
    callback(TooManyRequests());
    return;
  }
  const uint64_t rid = NextRid();
  request.set_rid(rid);
  PendingOp op;
  op.conversation = std::move(callback);
  Track(rid, std::move(op));
  Write(request);
}

void Session::GetReceipts(ConversationId conversation, ReceiptsCallback callback) {
  if (phase_ != Phase::kLive && phase_ != Phase::kSyncing) {
    callback(Unavailable("not connected"));
    return;
  }
  if (RequestsFull()) {
    callback(TooManyRequests());
    return;
  }
  v1::Envelope request;
  const uint64_t rid = NextRid();
  request.set_rid(rid);
  request.mutable_get_receipts()->set_conversation_id(conversation);
  PendingOp op;
  op.receipts = std::move(callback);
  Track(rid, std::move(op));
  Write(request);
}

void Session::Subscribe(ConversationId conversation) {
  if (phase_ == Phase::kClosed) return;
  subscriptions_.insert(conversation);
  unsubscribes_due_.erase(conversation);  // subscribed again: its Unsubscribe is not repeated
  if (phase_ != Phase::kLive) return;     // sent when the session goes live
  if (RequestsFull()) {
    // Remembered all the same: the next connection subscribes it.
    ReportError(Status(Code::kResourceExhausted, "subscribe to channel " +
                                                     std::to_string(conversation) + ": " +
                                                     std::string(TooManyRequests().message())));
    return;
  }
  SendSubscribe(conversation, /*automatic=*/false);
}

bool Session::SendSubscribe(ConversationId channel, bool automatic) {
  v1::Envelope envelope;
  const uint64_t rid = NextRid();
  envelope.set_rid(rid);
  envelope.mutable_subscribe()->set_conversation_id(channel);
  // The channel's messages posted while this connection was not subscribed came by no Deliver
  // (also those posted after the last Sync page was read, when going live): once the server
  // pushes the new ones (its Ok), a Sync fetches those.
  PendingOp op;
  op.automatic = automatic;
  op.catch_up = true;
  op.channel = channel;
  Track(rid, std::move(op));
  return Write(envelope);
}

void Session::Unsubscribe(ConversationId conversation) {
  if (phase_ == Phase::kClosed) return;
  if (subscriptions_.erase(conversation) == 0 || phase_ != Phase::kLive) return;
  SendUnsubscribe(conversation, 0);
}

bool Session::SendUnsubscribe(ConversationId channel, uint32_t resends) {
  v1::Envelope envelope;
  const uint64_t rid = NextRid();
  envelope.set_rid(rid);
  envelope.mutable_unsubscribe()->set_conversation_id(channel);
  if (unsubscribes_.size() >= kMaxQuietRids) unsubscribes_.erase(unsubscribes_.begin());
  unsubscribes_[rid] = {channel, resends};
  return Write(envelope);
}

void Session::UnsubscribeRefused(ConversationId channel, uint32_t resends, const Status& status) {
  // Not worth an OnError: the application is done with the channel, which is forgotten here
  // already, and the refusal says nothing about the connection (nor is its retry_after_ms the
  // next reconnect's).
  const std::string line = "chat client: unsubscribe from channel " + std::to_string(channel) +
                           " refused: " + status.ToString();
  if (!IsRetryable(status.code())) {
    // For good: no longer a member (the server unsubscribed the connection with the removal),
    // no such channel, a server without Unsubscribe. Nothing is left to undo.
    Log(LogLevel::kInfo, line);
    return;
  }
  // For now (rate limit, overload): the server still pushes the channel to this connection, so
  // it goes again after the server's delay, unless the channel was subscribed again or a later
  // Unsubscribe of it waits for its answer.
  const bool superseded =
      subscriptions_.contains(channel) ||
      std::any_of(unsubscribes_.begin(), unsubscribes_.end(),
                  [channel](const auto& entry) { return entry.second.channel == channel; });
  if (superseded) {
    Log(LogLevel::kInfo, line);
    return;
  }
  if (resends >= kMaxUnsubscribeResends || unsubscribes_due_.size() >= kMaxChannelSubscriptions) {
    Log(LogLevel::kInfo,
        line + "; not sent again: the channel is pushed to this connection until it ends");
    return;
  }
  const int64_t wait = std::max<int64_t>(kUnsubscribeRetryMinMs, status.retry_after_ms());
  Log(LogLevel::kInfo, line + "; sent again in " + std::to_string(wait) + " ms");
  unsubscribes_due_[channel] = resends + 1;
  unsubscribes_retry_at_ = std::max(unsubscribes_retry_at_, Now() + wait);
}

void Session::MarkRead(ConversationId conversation, Seq seq) {
  if (phase_ == Phase::kClosed) return;
  std::optional<ConversationRow> found = LoadRow(conversation);
  if (!found) return;
  ConversationRow row = std::move(*found);
  const Seq target = seq == 0 ? row.cursor : std::min(seq, row.cursor);
  if (target <= row.info.read_seq) return;
  row.info.read_seq = target;
  row.info.unread = cache_->CountUnread(conversation, target + 1, row.cursor, user_id_);
  row.receipt_due = true;
  if (Status st = cache_->PutConversation(row); !st.ok()) {
    ReportError(st);
    return;
  }
  MakeReceiptDue(conversation, Now());
  listener_->OnConversationUpdated(row.info);
  ReportUnreadTotal();
}

void Session::SetTyping(ConversationId conversation, bool active) {
  if (phase_ != Phase::kLive) return;
  auto it = typing_sent_.find(conversation);
  if (it == typing_sent_.end()) {
    if (!active) return;  // nothing was said
    if (typing_sent_.size() >= kMaxTypingShown) typing_sent_.clear();
    it = typing_sent_.emplace(conversation, TypingSent{}).first;
  }
  TypingSent& sent = it->second;
  if (active == sent.active && (!active || Now() - sent.at < kTypingRefreshMs)) return;
  sent.active = active;
  sent.at = Now();
  v1::Envelope envelope;
  envelope.mutable_typing()->set_conversation_id(conversation);
  envelope.mutable_typing()->set_active(active);
  // Typing is best effort: not worth an OnError per keystroke.
  WriteQuiet(&envelope, "typing");
}

void Session::SubscribePresence(std::vector<UserId> users, StatusCallback callback) {
  if (phase_ == Phase::kClosed) return;
  if (RequestsFull()) {
    callback(TooManyRequests());
    return;
  }
  std::set<UserId> unique(users.begin(), users.end());
  PresenceRequest request;
  request.callback = std::move(callback);
  for (const UserId& user : unique) {
    if (!presence_.contains(user)) request.added.push_back(user);
    request.users.push_back(user);
  }
  if (presence_.size() + request.added.size() > presence_limit_ ||
      (phase_ != Phase::kLive && presence_waiting_.size() >= presence_limit_)) {
    request.callback(ResourceExhausted("watching more than " + std::to_string(presence_limit_) +
                                       " users' presence"));
    return;
  }
  presence_.insert(request.added.begin(), request.added.end());
  SendPresenceRequest(std::move(request));
}

void Session::SendPresenceRequest(PresenceRequest request) {
  if (request.users.empty()) return;
  if (phase_ != Phase::kLive) {
    // Automatic re-subscriptions are made again from the watched set when live.
    if (request.callback) presence_waiting_.push_back(std::move(request));
    return;
  }
  v1::Envelope envelope;
  const uint64_t rid = NextRid();
  envelope.set_rid(rid);
  for (const UserId& user : request.users) envelope.mutable_presence_subscribe()->add_users(user);
  PendingOp op;
  op.automatic = !request.callback;
  op.status = std::move(request.callback);
  op.presence = std::move(request.users);
  op.added = std::move(request.added);
  op.resumed = request.resumed;
  Track(rid, std::move(op));
  Write(envelope);
}

void Session::UnsubscribePresence(std::vector<UserId> users, StatusCallback callback) {
  if (phase_ == Phase::kClosed) return;
  // Until live (while syncing too) it only edits the watched set: no request, nothing to refuse.
  if (phase_ == Phase::kLive && RequestsFull()) {
    callback(TooManyRequests());
    return;
  }
  const std::set<UserId> gone(users.begin(), users.end());
  for (const UserId& user : gone) presence_.erase(user);
  // Waiting requests forget these users; one left with nobody to watch is answered now.
  std::vector<StatusCallback> emptied;
  std::erase_if(presence_waiting_, [&](PresenceRequest& request) {
    std::erase_if(request.users, [&](const UserId& u) { return gone.contains(u); });
    std::erase_if(request.added, [&](const UserId& u) { return gone.contains(u); });
    if (!request.users.empty()) return false;
    emptied.push_back(std::move(request.callback));
    return true;
  });
  for (StatusCallback& cb : emptied) cb(Cancelled("unsubscribed before the connection was back"));
  if (phase_ != Phase::kLive) {
    // The server forgot every subscription with the connection.
    callback(Status::Ok());
    return;
  }
  v1::Envelope envelope;
  const uint64_t rid = NextRid();
  envelope.set_rid(rid);
  for (const UserId& user : gone) envelope.mutable_presence_unsubscribe()->add_users(user);
  PendingOp op;
  op.status = std::move(callback);
  Track(rid, std::move(op));
  Write(envelope);
}

void Session::RegisterPushToken(std::string platform, std::string token, StatusCallback callback) {
  if (phase_ == Phase::kClosed) return;
  if (RequestsFull()) {
    callback(TooManyRequests());
    return;
  }
  push_ = PushToken{std::move(platform), std::move(token)};
  ++push_generation_;
  if (StatusCallback older = std::exchange(push_waiting_, nullptr)) {
    older(Cancelled("replaced by a newer RegisterPushToken call"));
  }
  if (phase_ != Phase::kLive) {
    push_waiting_ = std::move(callback);
    return;
  }
  SendPushToken(std::move(callback));
}

void Session::SendPushToken(StatusCallback callback) {
  if (!push_) return;
  v1::Envelope envelope;
  const uint64_t rid = NextRid();
  envelope.set_rid(rid);
  envelope.mutable_register_push_token()->set_platform(push_->platform);
  envelope.mutable_register_push_token()->set_token(push_->token);
  PendingOp op;
  op.push = true;
  op.generation = push_generation_;
  op.automatic = !callback;
  op.status = std::move(callback);
  Track(rid, std::move(op));
  Write(envelope);
}

void Session::ResumePresenceAndPush() {
  // The server forgot the subscriptions with the last connection: one request for the users
  // whose own request is not waiting, then the waiting requests with their callbacks.
  std::set<UserId> asked;
  for (const PresenceRequest& request : presence_waiting_) {
    asked.insert(request.users.begin(), request.users.end());
  }
  PresenceRequest again;
  for (const UserId& user : presence_) {
    if (!asked.contains(user)) again.users.push_back(user);
  }
  SendPresenceRequest(std::move(again));
  auto waiting = std::exchange(presence_waiting_, {});
  for (PresenceRequest& request : waiting) {
    request.resumed = true;
    SendPresenceRequest(std::move(request));
  }
  if (phase_ != Phase::kLive) return;
  SendPushToken(std::exchange(push_waiting_, nullptr));
}

void Session::HandleOk(uint64_t rid) {
  if (rid == 0) return;
  if (unsubscribes_.erase(rid) > 0) return;
  auto it = ops_.find(rid);
  if (it == ops_.end()) {
    if (auto late = expired_.find(rid); late != expired_.end()) {
      // A Subscribe given up took effect after all: what the channel got until now is synced.
      const bool subscribe = late->second != 0;
      expired_.erase(late);
      if (subscribe) RequestSync();
    }
    return;
  }
  PendingOp op = std::move(it->second);
  ops_.erase(it);
  if (op.push && op.generation == push_generation_ && push_ && push_->token.empty()) {
    // The device is unregistered: nothing to repeat after a reconnect.
    push_.reset();
  }
  // The channel's catch-up waits for its own Ok only, never for other Subscribes' answers: one
  // the server never answers must not hold back the rest. Oks that come while a Sync is in
  // flight share the one after it (RequestSync).
  if (op.catch_up) RequestSync();
  if (op.status) op.status(Status::Ok());
}

void Session::PresenceRefused(PendingOp op, const Status& status) {
  if (!op.automatic) {
    // The server subscribed none of the request's users.
    for (const UserId& user : op.added) presence_.erase(user);
    PresenceRequest again;
    // Those watched before it were left out of this connection's re-subscription: without
    // another request the server would watch none of them. Also after a timeout: a
    // PresenceSubscribe carried out twice does no harm, and the automatic one goes once (given
    // up in turn, it is reported to OnError and they wait for the next connection).
    if (op.resumed) {
      for (UserId& user : op.presence) {
        if (presence_.contains(user)) again.users.push_back(std::move(user));
      }
    }
    op.status(status);
    SendPresenceRequest(std::move(again));
    return;
  }
  if (status.code() == Code::kPermissionDenied && op.presence.size() > 1) {
    // One of them may no longer be watched: ask for each alone to find out who.
    for (UserId& user : op.presence) {
      if (phase_ != Phase::kLive) return;
      if (!presence_.contains(user)) continue;
      PresenceRequest single;
      single.users.push_back(std::move(user));
      SendPresenceRequest(std::move(single));
    }
    return;
  }
  std::string who;
  for (const UserId& user : op.presence) who += (who.empty() ? "" : ", ") + user;
  if (status.code() == Code::kPermissionDenied || status.code() == Code::kInvalidArgument) {
    // Never going to work (e.g. no longer in a shared conversation): stop asking.
    for (const UserId& user : op.presence) presence_.erase(user);
  }
  Status report(status.code(), "presence of " + who + ": " + std::string(status.message()));
  if (status.retry_after_ms() != 0) report.set_retry_after_ms(status.retry_after_ms());
  ReportError(report);
}

void Session::PushRefused(PendingOp op, const Status& status) {
  if (!IsRetryable(status.code()) && op.generation == push_generation_) {
    // Repeating a refused token after every reconnect would only repeat the error.
    push_.reset();
  }
  if (op.status) {
    op.status(status);
  } else {
    ReportError(Status(status.code(), "push token: " + std::string(status.message())));
  }
}

Session::Deadline Session::NewDeadline(int64_t timeout_ms) const {
  const int64_t now = Now();
  return Deadline{now + timeout_ms, now, served_, ExcusedMs()};
}

int64_t Session::ExcusedMs() const {
  return excused_ms_ + (receiving_ ? Now() - receiving_since_ : 0);
}

int64_t Session::DueAt(const Deadline& deadline) const {
  // Only the time spent receiving since it was sent moves it: ExcusedMs() grows no faster than
  // the clock, so deadlines keep the order of their requests.
  return std::min(deadline.at_ms + (ExcusedMs() - deadline.excused),
                  deadline.sent_ms + CeilingMs());
}

int64_t Session::DueNow(const Deadline& deadline) const {
  return receiving_ || input_pending_ ? deadline.sent_ms + CeilingMs() : DueAt(deadline);
}

int64_t Session::CeilingMs() const {
  const auto timeout = static_cast<int64_t>(options_.request_timeout_ms);
  const auto frame =
      static_cast<int64_t>(std::min<uint64_t>(options_.max_message_bytes, INT64_MAX / 1000) * 1000 /
                           kMinReceiveBytesPerSecond);
  return std::max(kMaxWaitFactor * timeout, timeout + frame);
}

int64_t Session::SyncTimeoutMs() const {
  return static_cast<int64_t>(options_.request_timeout_ms)
         << std::min(sync_timeouts_, kMaxSyncTimeoutDoublings);
}

void Session::Track(uint64_t rid, PendingOp op) {
  op.deadline = NewDeadline(options_.request_timeout_ms);
  ops_[rid] = std::move(op);
}

bool Session::RequestsFull() const {
  // The same rule in every phase; requests wait only on a connection (kSyncing or kLive), so
  // while not connected nothing is refused.
  // The session's own requests are bounded by the subscriptions and the watched users; counted
  // here, 1000 channels re-subscribed after a reconnect would refuse every call of the
  // application until the server answered them.
  const auto own = std::count_if(ops_.begin(), ops_.end(),
                                 [](const auto& entry) { return entry.second.automatic; });
  return ops_.size() - static_cast<size_t>(own) + histories_.size() >= kMaxPendingRequests;
}

Status Session::TooManyRequests() const {
  return ResourceExhausted("too many requests waiting for the server's answer (" +
                           std::to_string(kMaxPendingRequests) + ")");
}

void Session::GiveUp(uint64_t rid, ConversationId channel) {
  if (expired_.size() >= kMaxExpiredRids) expired_.erase(expired_.begin());
  expired_[rid] = channel;
}

bool Session::ExpireRequests(int64_t now) {
  // A frame arriving, or input not read yet, may be the answer of any of them: only their
  // ceilings apply meanwhile.
  const bool sync_expired = sync_rid_ != 0 && DueNow(sync_deadline_) <= now;
  // Taken out before any callback runs, so that nothing answers them twice.
  std::vector<std::pair<uint64_t, PendingOp>> ops;
  while (!ops_.empty() && DueNow(ops_.begin()->second.deadline) <= now) {
    auto node = ops_.extract(ops_.begin());
    ops.emplace_back(node.key(), std::move(node.mapped()));
  }
  std::vector<std::pair<uint64_t, PendingHistory>> histories;
  while (!histories_.empty() && DueNow(histories_.begin()->second.deadline) <= now) {
    auto node = histories_.extract(histories_.begin());
    histories.emplace_back(node.key(), std::move(node.mapped()));
  }
  if (!sync_expired && ops.empty() && histories.empty()) return true;

  const std::string within =
      "no answer from the server within " + std::to_string(options_.request_timeout_ms) + " ms";
  const Status timeout = DeadlineExceeded(within);
  // The server served nothing since one of them was sent: it is wedged, not just slow with
  // one request (or having lost it).
  const bool sync_unserved = sync_expired && sync_deadline_.served == served_;
  bool unserved = sync_unserved;
  std::vector<ConversationId> channels;  // of the Subscribes given up
  for (const auto& [rid, op] : ops) {
    unserved |= op.deadline.served == served_;
    GiveUp(rid, op.channel);
    if (op.catch_up) channels.push_back(op.channel);
  }
  for (const auto& [rid, pending] : histories) {
    unserved |= pending.deadline.served == served_;
    GiveUp(rid, 0);
  }
  for (auto& [rid, pending] : histories) pending.callback(timeout);
  for (auto& [rid, op] : ops) {
    if (!op.presence.empty()) {
      PresenceRefused(std::move(op), timeout);
    } else if (op.push) {
      PushRefused(std::move(op), timeout);
    } else if (!op.catch_up) {
      if (op.conversation) op.conversation(timeout);
      if (op.receipts) op.receipts(timeout);
      if (op.status) op.status(timeout);
    }
  }
  if (!channels.empty()) {
    // One report for all: the re-subscriptions of a reconnect expire together on a server that
    // answers nothing, and 1000 channels are not worth 1000 OnError calls.
    std::string which =
        channels.size() == 1 ? "channel " : std::to_string(channels.size()) + " channels (";
    constexpr size_t kNamed = 10;
    for (size_t i = 0; i < channels.size() && i < kNamed; ++i) {
      which += (i == 0 ? "" : ", ") + std::to_string(channels[i]);
    }
    if (channels.size() > kNamed) which += ", ...";
    if (channels.size() > 1) which += ")";
    ReportError(DeadlineExceeded("subscribe to " + which + ": " + within));
  }
  if (!Authenticated()) return false;
  if (sync_expired) {
    // The next Sync, here or on the next connection, gets more time: a server that needs longer
    // than request_timeout_ms for a page would otherwise be asked for the same page forever.
    const int64_t waited = SyncTimeoutMs();
    const bool longest = sync_timeouts_ >= kMaxSyncTimeoutDoublings;
    sync_timeouts_ = std::min(sync_timeouts_ + 1, kMaxSyncTimeoutDoublings);
    if (sync_unserved || longest) {
      // As for a refused Sync: without its answer the cache is not known to be complete, and
      // every catch-up and gap repair waits behind it. The server serves nothing, or it left
      // unanswered a Sync with the most time whatever else it served (Delivers fanned out while
      // its readers are stuck): reconnect, rather than ask again on this connection forever.
      Disconnect("no answer to a Sync within " + std::to_string(waited) + " ms");
      return false;
    }
    // The server serves this connection, so it is slow or lost this Sync: ask again here.
    Log(LogLevel::kInfo,
        "chat client: no answer to a Sync within " + std::to_string(waited) + " ms; asking again");
    // Its late answer is recognised: a SyncBatch is dropped, an Error only logged.
    GiveUp(std::exchange(sync_rid_, 0), 0);
    SendSync();
    if (!Authenticated()) return false;
  }
  if (unserved) {
    // Like a dead link: a new connection (with backoff) sends the subscriptions again.
    Disconnect("the server answered no request within " +
               std::to_string(options_.request_timeout_ms) + " ms");
    return false;
  }
  // A channel whose Subscribe was given up is caught up all the same; the live messages need the
  // subscription, which the next connection (or the application's next Subscribe) makes.
  if (!channels.empty()) RequestSync();
  return Authenticated();
}

void Session::HandlePresenceUpdate(const v1::PresenceUpdate& update) {
  const UserId& user = update.user_id();
  if (user.empty()) return;
  // Updates still in flight when the user was unwatched are not the application's concern.
  if (!presence_.contains(user)) return;
  PresenceInfo info;
  info.user = user;
  info.online = update.online();
  info.devices = update.devices();
  info.last_seen_ms = update.last_seen_ms();
  listener_->OnPresence(info);
  if (!info.online && info.last_seen_ms > 0) UpdatePeerLastSeen(user, info.last_seen_ms);
}

void Session::UpdatePeerLastSeen(const UserId& user, int64_t last_seen_ms) {
  std::vector<ConversationInfo> updated;
  {
    CacheTxn txn(this);
    for (ConversationRow& row : cache_->ListConversations()) {
      if (row.info.kind != ConversationKind::kDirect || row.info.peer != user ||
          row.info.peer_last_seen_ms >= last_seen_ms) {
        continue;
      }
      row.info.peer_last_seen_ms = last_seen_ms;
      cache_->ApplyKept(&row);
      if (Status st = cache_->PutConversation(row); !st.ok()) {
        ReportError(st);
        return;
      }
      updated.push_back(row.info);
    }
    if (updated.empty()) return;
    if (Status st = txn.Commit(); !st.ok()) {
      ReportError(st);
      return;
    }
  }
  for (const ConversationInfo& info : updated) listener_->OnConversationUpdated(info);
}

void Session::History(ConversationId conversation, Seq before_seq, uint32_t limit,
                      HistoryCallback callback) {
  if (std::optional<ConversationRow> row = cache_->GetConversation(conversation)) {
    const Seq newest = std::max(row->info.last_seq, row->cursor);
    const Seq top = before_seq == 0 ? newest + 1 : std::min(before_seq, newest + 1);
    const Seq floor = std::max<Seq>(1, row->info.first_seq);
    HistoryResult result;
    result.conversation_id = conversation;
    result.from_cache = true;
    if (top <= floor) {
      // Nothing is stored below `top`.
      callback(std::move(result));
      return;
    }
    const Seq to = top - 1;
    const Seq from = to + 1 > floor + limit ? to + 1 - limit : floor;
    if (cache_->FullRangeNewestFirst(conversation, from, to, &result.messages)) {
      result.has_more = from > floor;
      callback(std::move(result));
      return;
    }
  }
  if (phase_ != Phase::kLive && phase_ != Phase::kSyncing) {
    callback(Unavailable("not connected, and the cache does not hold this range"));
    return;
  }
  if (RequestsFull()) {
    callback(TooManyRequests());
    return;
  }
  v1::Envelope envelope;
  const uint64_t rid = NextRid();
  envelope.set_rid(rid);
  envelope.mutable_history()->set_conversation_id(conversation);
  envelope.mutable_history()->set_before_seq(before_seq);
  envelope.mutable_history()->set_limit(limit);
  histories_[rid] = PendingHistory{conversation, before_seq, std::move(callback),
                                   NewDeadline(options_.request_timeout_ms)};
  Write(envelope);
}

void Session::OnOutboxAdded(const OutboxEntry& entry) {
  if (phase_ == Phase::kClosed) return;
  // A pump that ran between Send() and this task may have sent the entry, and its ack may have
  // come: then kSent (or kFailed) was reported already, and a late kPending would undo it.
  if (std::optional<OutboxEntry> now = cache_->FindOutbox(entry.client_msg_id);
      now && now->status == MessageStatus::kPending) {
    MessageEvent event = OutboxMessageEvent(entry, user_id_, options_.device_id);
    event.status = MessageStatus::kPending;
    listener_->OnMessage(event);
  }
  PumpOutbox();
}

bool Session::TakeSendToken() {
  if (send_rate_ <= 0) return true;
  const int64_t now = Now();
  send_tokens_ = std::min(send_capacity_,
                          send_tokens_ + static_cast<double>(now - send_tokens_at_) * send_rate_);
  send_tokens_at_ = now;
  if (send_tokens_ >= 1) {
    send_tokens_ -= 1;
    return true;
  }
  // At least 10 ms: finer timers only make the loop spin.
  const auto wait = static_cast<int64_t>((1 - send_tokens_) / send_rate_) + 1;
  outbox_retry_at_ = now + std::max<int64_t>(10, wait);
  return false;
}

void Session::PumpOutbox() {
  if (phase_ != Phase::kLive || outbox_retry_at_ != 0) return;
  const size_t window = std::max<uint32_t>(1, options_.max_in_flight);
  // Entries failed here leave room in the window: the next ones are fetched again, until a
  // pass fails none (each pass that fails one has one pending entry fewer).
  bool failed = true;
  while (failed && phase_ == Phase::kLive && in_flight_.size() < window) {
    failed = false;
    for (const OutboxEntry& entry : cache_->PendingOutbox(window + in_flight_.size())) {
      if (in_flight_.size() >= window || phase_ != Phase::kLive) break;
      if (in_flight_ids_.contains(entry.client_msg_id)) continue;
      if (max_body_bytes_ != 0 && entry.body.size() > max_body_bytes_) {
        // Fetched again only if recorded: an entry the cache could not fail stays pending,
        // and another pass would find it again without end.
        failed |= FailPending(entry, InvalidArgument("body too large (the server takes at most " +
                                                     std::to_string(max_body_bytes_) + " bytes)"));
        continue;
      }
      v1::Envelope envelope;
      v1::Send* send = envelope.mutable_send();
      if (entry.conversation_id != 0) {
        send->set_conversation_id(entry.conversation_id);
      } else {
        send->set_peer(entry.peer);
      }
      send->set_client_msg_id(entry.client_msg_id);
      send->set_content_type(entry.content_type);
      send->set_body(entry.body);
      // The rid is at most 10 bytes; counted at its largest before it is taken.
      if (max_frame_bytes_ != 0 && envelope.ByteSizeLong() + 11 > max_frame_bytes_) {
        failed |= FailPending(
            entry, InvalidArgument("message too large (the server takes frames of at most " +
                                   std::to_string(max_frame_bytes_) + " bytes)"));
        continue;
      }
      if (!TakeSendToken()) return;
      const uint64_t rid = NextRid();
      envelope.set_rid(rid);
      in_flight_[rid] = entry.client_msg_id;
      in_flight_ids_.insert(entry.client_msg_id);
      if (!Write(envelope)) return;
    }
  }
}

bool Session::FailPending(const OutboxEntry& entry, const Status& reason) {
  if (Status st = cache_->FailOutbox(entry.client_msg_id, reason); !st.ok()) {
    ReportError(st);
    return false;
  }
  MessageEvent event = OutboxMessageEvent(entry, user_id_, options_.device_id);
  event.status = MessageStatus::kFailed;
  event.reason = reason;
  listener_->OnMessage(event);
  return true;
}

void Session::ReportError(const Status& status) {
  Log(LogLevel::kWarn, "chat client: " + status.ToString());
  if (txn_depth_ == 0) {
    listener_->OnError(status);
  } else if (held_errors_.size() < kMaxHeldErrors) {
    held_errors_.push_back(status);
  }
}

Session::CacheTxn::CacheTxn(Session* session) : session_(session) {
  ++session_->txn_depth_;
  txn_.emplace(session_->cache_);
}

Status Session::CacheTxn::Commit() {
  Status st = txn_->Commit();
  committed_ = st.ok();
  return st;
}

bool Session::CacheTxn::Started() {
  if (txn_->active()) return true;
  session_->ReportError(Unavailable("cache: transaction did not start"));
  return false;
}

Session::CacheTxn::~CacheTxn() {
  txn_.reset();  // rolls back if not committed, and frees the cache's mutex
  if (--session_->txn_depth_ > 0) return;
  auto& before = session_->receipts_due_before_;
  if (!committed_) {
    for (const auto& [conversation, at] : before) {
      if (at) {
        session_->receipts_due_[conversation] = *at;
      } else {
        session_->receipts_due_.erase(conversation);
      }
    }
  }
  before.clear();
  // A floor kept without a row is the row's once a row made from it is committed.
  for (ConversationId conversation : std::exchange(session_->floors_taken_, {})) {
    if (committed_ && session_->cache_->GetConversation(conversation)) {
      session_->rowless_floors_.erase(conversation);
    }
  }
  for (const Status& status : std::exchange(session_->held_errors_, {})) {
    session_->listener_->OnError(status);
  }
}

}  // namespace chat::client
