#include "src/client/session.h"

#include <algorithm>
#include <cstdint>
#include <utility>

#include "chat/log.h"
#include "src/core/codec.h"

namespace chat::client {

namespace {

// Attempts beyond this do not grow the delay further (cap_ms is reached long before), and the
// counter must not overflow the shift in BackoffDelayMs.
constexpr uint32_t kMaxAttempt = 30;

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
  histories_.clear();
  in_flight_.clear();
  in_flight_ids_.clear();
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
  if (Authenticated() && now - connected_at_ >= options_.backoff.reset_after_ms) attempt_ = 0;
  // Requests of the lost connection get no reply: their callbacks learn it now.
  auto histories = std::move(histories_);
  histories_.clear();
  in_flight_.clear();
  in_flight_ids_.clear();
  sync_rid_ = 0;
  sync_again_ = false;
  hello_rid_ = 0;

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
      if (now >= next_ping_) {
        v1::Envelope ping;
        ping.set_rid(NextRid());
        ping.mutable_ping()->set_client_time_ms(clock_->WallMs());
        next_ping_ = now + heartbeat_ms_;
        if (!Write(ping)) return;
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
  phase_ = Phase::kHello;
  Write(hello);
}

void Session::OnClosed(int close_code, std::string_view reason) {
  if (phase_ == Phase::kStopped || phase_ == Phase::kBackoff || phase_ == Phase::kClosed) return;
  Log(LogLevel::kInfo, "chat client: connection closed (" + std::to_string(close_code) + " " +
                           std::string(reason) + ")");
  ConnectionDown();
}

void Session::OnEnvelope(const v1::Envelope& envelope) {
  if (phase_ != Phase::kHello && !Authenticated()) return;
  last_rx_ = Now();
  switch (envelope.body_case()) {
    case v1::Envelope::kBatch:
      for (const v1::Envelope& inner : envelope.batch().envelopes()) {
        if (inner.body_case() == v1::Envelope::kBatch) continue;  // never nested
        OnEnvelope(inner);
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
      Ingest({&envelope.deliver().message()}, /*from_sync=*/false);
      break;
    case v1::Envelope::kSyncBatch:
      if (envelope.rid() == sync_rid_) HandleSyncBatch(envelope.sync_batch());
      break;
    case v1::Envelope::kHistoryPage:
      HandleHistoryPage(envelope.rid(), envelope.history_page());
      break;
    case v1::Envelope::kConversationUpdate:
      HandleConversationUpdate(envelope.conversation_update().conversation());
      break;
    default:
      // Pong and the replies of features this client does not use only prove the link alive.
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
    stubs_.clear();
    if (Status st = cache_->ResetForEpoch(welcome.epoch()); !st.ok()) ReportError(st);
    ReportError(DataLoss(cached_user.empty() || cached_user == welcome.user_id()
                             ? "server epoch changed: the cache was rebuilt"
                             : "signed in as another user: the cache was rebuilt"));
  }
  if (Status st = cache_->SetIdentity(welcome.epoch(), welcome.user_id()); !st.ok()) {
    ReportError(st);
  }
  user_id_ = welcome.user_id();
  heartbeat_ms_ = options_.heartbeat_interval_ms != 0 ? options_.heartbeat_interval_ms
                  : welcome.limits().heartbeat_interval_ms() != 0
                      ? welcome.limits().heartbeat_interval_ms()
                      : kDefaultHeartbeatMs;
  const int64_t now = Now();
  connected_at_ = now;
  last_rx_ = now;
  next_ping_ = now + heartbeat_ms_;
  outbox_retry_at_ = 0;
  // 90% of the server's rate leaves room for Pings, Syncs and History requests.
  const uint32_t per_second = welcome.limits().messages_per_second();
  send_rate_ = per_second * 0.9 / 1000.0;
  send_capacity_ = std::max(1.0, per_second * 0.9);
  send_tokens_ = send_capacity_;
  send_tokens_at_ = now;
  SetPhase(Phase::kSyncing);
  SendSync();
}

void Session::HandleError(const v1::Envelope& envelope) {
  const v1::Error& error = envelope.error();
  Status status(codec::FromProtoCode(error.code()), error.message());
  if (error.retry_after_ms() != 0) status.set_retry_after_ms(error.retry_after_ms());
  const uint64_t rid = envelope.rid();

  if (phase_ == Phase::kHello || (rid != 0 && rid == hello_rid_)) {
    // The server refused the connection; it closes it next.
    if (IsTokenExpired(error)) token_expired_ = true;
    retry_after_ms_ = std::max(retry_after_ms_, error.retry_after_ms());
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
      int64_t wait = std::max<int64_t>(kOutboxRetryMinMs, error.retry_after_ms());
      outbox_retry_at_ = std::max(outbox_retry_at_, Now() + wait);
      return;
    }
    std::optional<OutboxEntry> entry = cache_->FindOutbox(client_msg_id);
    if (!entry || entry->status != MessageStatus::kPending) return;
    if (Status st = cache_->FailOutbox(client_msg_id, status); !st.ok()) ReportError(st);
    MessageEvent event;
    event.message.conversation_id = entry->conversation_id;
    event.message.client_msg_id = entry->client_msg_id;
    event.message.content_type = entry->content_type;
    event.message.body = entry->body;
    event.message.sender = user_id_;
    event.message.sender_device = options_.device_id;
    event.peer = entry->peer;
    event.status = MessageStatus::kFailed;
    event.outgoing = true;
    event.reason = status;
    listener_->OnMessage(event);
    PumpOutbox();
    return;
  }
  if (auto it = histories_.find(rid); rid != 0 && it != histories_.end()) {
    HistoryCallback callback = std::move(it->second.callback);
    histories_.erase(it);
    callback(status);
    return;
  }
  if (rid != 0 && rid == sync_rid_) {
    // Without a successful Sync the cache cannot be trusted to be complete: start over.
    ReportError(status);
    retry_after_ms_ = std::max(retry_after_ms_, error.retry_after_ms());
    Disconnect("sync failed: " + status.ToString());
    return;
  }
  if (IsTokenExpired(error)) token_expired_ = true;
  retry_after_ms_ = std::max(retry_after_ms_, error.retry_after_ms());
  ReportError(status);
}

ConversationRow Session::LoadOrStub(ConversationId conversation) {
  if (std::optional<ConversationRow> row = cache_->GetConversation(conversation)) return *row;
  ConversationRow row;
  row.info.conversation_id = conversation;
  return row;
}

bool Session::Advance(ConversationRow* row, std::vector<MessageEvent>* events) {
  const ConversationId id = row->info.conversation_id;
  while (std::optional<v1::Message> next = cache_->GetMessage(id, row->cursor + 1)) {
    row->cursor = next->seq();
    row->info.last_seq = std::max(row->info.last_seq, next->seq());
    row->info.last_activity_ms = std::max(row->info.last_activity_ms, next->server_time_ms());
    const bool own = !user_id_.empty() && next->sender() == user_id_;
    if (!own && next->kind() != v1::MESSAGE_KIND_SYSTEM && next->seq() > row->info.read_seq) {
      ++row->info.unread;
    }
    if (own && !next->client_msg_id().empty()) {
      // Our own message came back (Sync, or another device's echo): it is no longer pending.
      if (std::optional<OutboxEntry> entry = cache_->FindOutbox(next->client_msg_id());
          entry && entry->status == MessageStatus::kPending) {
        (void)cache_->RemoveOutbox(next->client_msg_id());
        if (row->info.peer.empty() && !entry->peer.empty()) {
          row->info.peer = entry->peer;
          row->info.kind = ConversationKind::kDirect;
        }
      }
    }
    events->push_back(EventFor(*next));
  }
  return cache_->CountRange(id, row->cursor + 1, static_cast<Seq>(INT64_MAX)) > 0;
}

MessageEvent Session::EventFor(const v1::Message& message) const {
  MessageEvent event;
  event.message = codec::FromProto(message);
  event.status = MessageStatus::kSent;
  event.outgoing = !user_id_.empty() && message.sender() == user_id_;
  return event;
}

void Session::Ingest(const std::vector<const v1::Message*>& messages, bool from_sync) {
  std::vector<MessageEvent> events;
  std::vector<ConversationInfo> updated;
  bool missing = false;
  bool new_stub = false;
  {
    Cache::Transaction txn(cache_);
    std::map<ConversationId, ConversationRow> rows;
    for (const v1::Message* m : messages) {
      if (m->conversation_id() == 0 || m->seq() == 0) continue;
      auto it = rows.find(m->conversation_id());
      if (it == rows.end()) {
        ConversationRow row = LoadOrStub(m->conversation_id());
        if (row.info.kind == ConversationKind::kUnspecified &&
            stubs_.insert(m->conversation_id()).second) {
          new_stub = true;
        }
        it = rows.emplace(m->conversation_id(), std::move(row)).first;
      }
      if (m->seq() <= it->second.cursor) continue;
      if (Status st = cache_->PutMessage(*m); !st.ok()) {
        ReportError(st);
        return;
      }
    }
    for (auto& [id, row] : rows) {
      const Seq before = row.cursor;
      missing |= Advance(&row, &events);
      if (row.cursor != before || !cache_->GetConversation(id)) {
        if (Status st = cache_->PutConversation(row); !st.ok()) {
          ReportError(st);
          return;
        }
        updated.push_back(row.info);
      }
    }
    if (Status st = txn.Commit(); !st.ok()) {
      ReportError(st);
      return;
    }
  }
  for (const MessageEvent& event : events) listener_->OnMessage(event);
  for (const ConversationInfo& info : updated) listener_->OnConversationUpdated(info);
  // A Sync reply carries the states of the conversations it brings; a Deliver does not.
  if (missing || (new_stub && !from_sync)) RequestSync();
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
  if (entry && entry->status == MessageStatus::kPending && ack.conversation_id() != 0 &&
      ack.seq() != 0) {
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
    {
      Cache::Transaction txn(cache_);
      if (!cache_->GetConversation(ack.conversation_id()) && !entry->peer.empty()) {
        ConversationRow row;
        row.info.conversation_id = ack.conversation_id();
        row.info.kind = ConversationKind::kDirect;
        row.info.peer = entry->peer;
        (void)cache_->PutConversation(row);
      }
      (void)cache_->PutMessage(message);
      // Removed now, not when the message reaches the application: it may wait there behind
      // a hole, and must not be sent again meanwhile.
      (void)cache_->RemoveOutbox(client_msg_id);
      if (Status st = txn.Commit(); !st.ok()) ReportError(st);
    }
    Ingest({&message}, /*from_sync=*/false);
  }
  PumpOutbox();
}

void Session::SendSync() {
  v1::Envelope envelope;
  sync_rid_ = NextRid();
  sync_again_ = false;
  envelope.set_rid(sync_rid_);
  v1::Sync* sync = envelope.mutable_sync();
  sync->set_limit(options_.sync_page_limit);
  for (const ConversationRow& row : cache_->ListConversations()) {
    v1::Cursor* cursor = sync->add_cursors();
    cursor->set_conversation_id(row.info.conversation_id);
    // A conversation known only from a Deliver is synced from the start, so that the server
    // tells its state (kind, peer); its messages below the cursor are skipped on arrival.
    cursor->set_seq(stubs_.contains(row.info.conversation_id) ? 0 : row.cursor);
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

void Session::HandleSyncBatch(const v1::SyncBatch& batch) {
  std::vector<MessageEvent> events;
  std::vector<ConversationInfo> updated;
  bool progress = false;
  // Gaps first: the newest messages of a conversation come in the same batch as the gap below
  // them, and the cursor must jump over the gap before they can follow it.
  if (batch.gaps_size() > 0) {
    Cache::Transaction txn(cache_);
    for (const v1::Gap& gap : batch.gaps()) {
      ConversationRow row = LoadOrStub(gap.conversation_id());
      if (gap.from_seq() <= row.cursor + 1 && gap.to_seq() > row.cursor) {
        row.cursor = gap.to_seq();
        row.info.last_seq = std::max(row.info.last_seq, gap.to_seq());
        progress = true;
        if (Status st = cache_->PutConversation(row); !st.ok()) ReportError(st);
      }
    }
    if (Status st = txn.Commit(); !st.ok()) ReportError(st);
  }
  std::vector<const v1::Message*> messages;
  messages.reserve(static_cast<size_t>(batch.messages_size()));
  for (const v1::Message& m : batch.messages()) messages.push_back(&m);
  if (!messages.empty()) progress = true;
  // Ingest may ask for another Sync (a hole); this one is still in flight, so it is noted.
  Ingest(messages, /*from_sync=*/true);
  if (!Authenticated()) return;
  {
    Cache::Transaction txn(cache_);
    for (const v1::ConversationState& state : batch.conversations()) {
      ConversationRow row = LoadOrStub(state.conversation_id());
      ConversationInfo info = codec::FromProto(state);
      info.last_seq = std::max(info.last_seq, row.info.last_seq);
      row.info = info;
      stubs_.erase(state.conversation_id());
      if (Status st = cache_->PutConversation(row); !st.ok()) ReportError(st);
      updated.push_back(row.info);
      progress = true;
    }
    if (Status st = txn.Commit(); !st.ok()) ReportError(st);
  }
  for (const ConversationInfo& info : updated) listener_->OnConversationUpdated(info);
  if (!Authenticated()) return;

  sync_rid_ = 0;
  // Without progress another page would be the same page: stop rather than loop.
  if ((batch.has_more() || sync_again_) && progress) {
    SendSync();
    return;
  }
  if (phase_ == Phase::kSyncing) {
    SetPhase(Phase::kLive);
    PumpOutbox();
  }
}

void Session::HandleHistoryPage(uint64_t rid, const v1::HistoryPage& page) {
  auto it = histories_.find(rid);
  if (it == histories_.end()) return;
  HistoryCallback callback = std::move(it->second.callback);
  histories_.erase(it);
  HistoryResult result;
  result.conversation_id = page.conversation_id();
  result.has_more = page.has_more();
  {
    Cache::Transaction txn(cache_);
    for (const v1::Message& m : page.messages()) {
      (void)cache_->PutMessage(m);
      result.messages.push_back(codec::FromProto(m));
    }
    if (Status st = txn.Commit(); !st.ok()) ReportError(st);
  }
  callback(std::move(result));
}

void Session::HandleConversationUpdate(const v1::ConversationState& state) {
  ConversationRow row = LoadOrStub(state.conversation_id());
  row.info = codec::FromProto(state);
  stubs_.erase(state.conversation_id());
  if (Status st = cache_->PutConversation(row); !st.ok()) ReportError(st);
  listener_->OnConversationUpdated(row.info);
  if (row.info.last_seq > row.cursor) RequestSync();
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
    if (cache_->CountRange(conversation, from, to) == to - from + 1) {
      result.has_more = from > floor;
      for (const v1::Message& m : cache_->RangeNewestFirst(conversation, from, to, limit)) {
        result.messages.push_back(codec::FromProto(m));
      }
      callback(std::move(result));
      return;
    }
  }
  if (phase_ != Phase::kLive && phase_ != Phase::kSyncing) {
    callback(Unavailable("not connected, and the cache does not hold this range"));
    return;
  }
  v1::Envelope envelope;
  const uint64_t rid = NextRid();
  envelope.set_rid(rid);
  envelope.mutable_history()->set_conversation_id(conversation);
  envelope.mutable_history()->set_before_seq(before_seq);
  envelope.mutable_history()->set_limit(limit);
  histories_[rid] = PendingHistory{conversation, std::move(callback)};
  Write(envelope);
}

void Session::OnOutboxAdded(const OutboxEntry& entry) {
  if (phase_ == Phase::kClosed) return;
  MessageEvent event;
  event.message.conversation_id = entry.conversation_id;
  event.message.client_msg_id = entry.client_msg_id;
  event.message.content_type = entry.content_type;
  event.message.body = entry.body;
  event.message.sender = user_id_;
  event.message.sender_device = options_.device_id;
  event.peer = entry.peer;
  event.status = MessageStatus::kPending;
  event.outgoing = true;
  listener_->OnMessage(event);
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
  if (in_flight_.size() >= window) return;
  for (const OutboxEntry& entry : cache_->PendingOutbox(window + in_flight_.size())) {
    if (in_flight_.size() >= window) break;
    if (in_flight_ids_.contains(entry.client_msg_id)) continue;
    if (!TakeSendToken()) return;
    v1::Envelope envelope;
    const uint64_t rid = NextRid();
    envelope.set_rid(rid);
    v1::Send* send = envelope.mutable_send();
    if (entry.conversation_id != 0) {
      send->set_conversation_id(entry.conversation_id);
    } else {
      send->set_peer(entry.peer);
    }
    send->set_client_msg_id(entry.client_msg_id);
    send->set_content_type(entry.content_type);
    send->set_body(entry.body);
    in_flight_[rid] = entry.client_msg_id;
    in_flight_ids_.insert(entry.client_msg_id);
    if (!Write(envelope)) return;
  }
}

void Session::ReportError(const Status& status) {
  Log(LogLevel::kWarn, "chat client: " + status.ToString());
  listener_->OnError(status);
}

}  // namespace chat::client
