#include "src/server/hub.h"

#include <algorithm>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <google/protobuf/arena.h>

#include "chat/v1/chat.pb.h"
#include "src/core/snowflake.h"
#include "src/core/utf8.h"
#include "src/server/presence_tracker.h"
#include "src/server/store_common.h"

namespace chat::server {

namespace {

constexpr uint32_t kDefaultHistoryLimit = 50;
constexpr size_t kMinClientMsgIdBytes = 16;
constexpr size_t kMaxClientMsgIdBytes = 128;
constexpr size_t kMaxDeviceIdBytes = 128;
constexpr size_t kMaxContentTypeBytes = 255;
constexpr size_t kMaxPushPreviewBytes = 1024;
// Removal commits the Hub remembers, so that a read older than the last one is asked again only
// if one of them concerns it (older reads are always asked again).
constexpr size_t kRecentRemovals = 1024;
constexpr size_t kRecentRemovedUsers = 65'536;
// Hello.protocol_version this server speaks; 0 (unset) is taken as 1. Additions that an older
// client could not decode are asked for by a Hello field of their own
// (accepts_messages_expired), so clients and servers of either age keep working together.
constexpr uint32_t kProtocolVersion = 1;
// Suggested wait before resending after a failed commit, when the store gives none.
constexpr uint32_t kCommitRetryAfterMs = 1000;
// Token buckets count in thousandths, so a rate of N per second refills N units per millisecond
// and the arithmetic stays in integers.
constexpr int64_t kMilli = 1000;
// Bounds that keep the bucket arithmetic far from int64 overflow whatever the options say: a
// rate is at most 2^40 per second, and one refill adds at most this many milliseconds' worth
// (every sane bucket is full long before).
constexpr int64_t kMaxRate = int64_t{1} << 40;
constexpr int64_t kMaxRefillMs = 1'000'000;

// Fixed fields, string lengths, tags and nesting of one message, its conversation's state
// (title, peer) and a gap, generously: everything in a frame but the bounded strings below.
constexpr size_t kFrameSlackBytes = 2048;
// Per attachment: tags, lengths, size/width/height/duration and sha256 (its strings count
// against max_body_bytes with the body).
constexpr size_t kAttachmentSlackBytes = 96;
// One member in a ReceiptsPage: a user id, two seqs, a role, tags and lengths.
constexpr size_t kMemberReceiptBytes = kMaxUserIdBytes + 32;

}  // namespace

size_t LargestMessageFrameBytes(const ServerOptions& o, codec::Format format) {
  // A user message: body and attachment strings (max_body_bytes together), content_type,
  // client_msg_id, sender and sender_device.
  const size_t user_message = o.max_body_bytes + o.max_attachments * kAttachmentSlackBytes +
                              kMaxContentTypeBytes + kMaxClientMsgIdBytes + 2 * kMaxUserIdBytes;
  // A system event names its actor, a title and the users it is about: the users one request
  // named (at most max_message_bytes, each with its tag and length as in the event), and at
  // most a full conversation of the largest kind (a tag and two length bytes each).
  const uint64_t cap = o.max_group_members == 0 || o.max_channel_members == 0
                           ? 0
                           : std::max(o.max_group_members, o.max_channel_members);
  const size_t users = cap == 0 ? o.max_message_bytes
                                : static_cast<size_t>(std::min<uint64_t>(
                                      o.max_message_bytes, cap * (kMaxUserIdBytes + 3)));
  const size_t system_event = users + 2 * kMaxUserIdBytes + kMaxTitleBytes;
  // A GetReceipts reply lists every member of a group (a channel's, only the caller). With no
  // cap on a group's members it has no bound; it is not counted then.
  const size_t receipts = size_t{o.max_group_members} * kMemberReceiptBytes;
  const size_t binary = std::max({user_message, system_event, receipts}) + kFrameSlackBytes;
  // JSON writes bytes in base64 (4/3) and a string's control characters as \u00XX (6 times);
  // field names are within the slack's factor too.
  return format == codec::Format::kJson ? 6 * binary : binary;
}

namespace {

// A protobuf arena whose first block is part of the object, for the envelopes of one frame,
// one acknowledgement or one delivery: they, their sub-messages and their string objects are
// placed in the block instead of being allocated one by one (strings longer than the
// small-string buffer still allocate their characters; a larger envelope spills into blocks
// the arena allocates and frees with itself).
class LocalArena {
 public:
  LocalArena() : arena_(block_, sizeof(block_)) {}
  LocalArena(const LocalArena&) = delete;
  LocalArena& operator=(const LocalArena&) = delete;

  template <typename T>
  T* Create() {
    return google::protobuf::Arena::CreateMessage<T>(&arena_);
  }

 private:
  alignas(16) char block_[2048];  // declared first: the arena uses it until its destructor ends
  google::protobuf::Arena arena_;
};

// Session::timer_due_ms while the session has no live entry in the timer heap.
constexpr int64_t kNoTimer = std::numeric_limits<int64_t>::min();

// What user() returns before Hello.
const UserId kNoUser;

// Per-connection state. Kept small: an idle server holds thousands of these.
struct Session {
  // The user's id is the key of its entry in the Hub's users_ map, which exists exactly while
  // the user has an authenticated session (a node's key never moves): one copy per user, not
  // one per session.
  const UserId* user_key = nullptr;  // set by a successful Hello
  const UserId& user() const { return user_key != nullptr ? *user_key : kNoUser; }
  bool authenticated() const { return user_key != nullptr; }
  DeviceId device;
  // Before Hello: the hello timeout. After: when the token expires (INT64_MAX for never).
  int64_t deadline_ms = 0;
  int64_t last_frame_ms = 0;        // also when the rate-limit buckets were last refilled
  int64_t timer_due_ms = kNoTimer;  // when this session's live timer heap entry fires
  int64_t message_tokens = 0;       // thousandths of a message
  int64_t byte_tokens = 0;          // thousandths of a byte; negative while in debt
  codec::Format format = codec::Format::kBinary;
  bool format_known = false;
  bool expiry_notices = false;    // Hello.accepts_messages_expired
  uint32_t client_max_bytes = 0;  // Hello.max_message_bytes; 0 = not told
};

// Per-session memory is budgeted (about 2 KB per idle connection, libwebsockets included): with
// the map's next pointer and key, 96 bytes make a 112-byte node, one of jemalloc's size classes.
static_assert(sizeof(Session) <= 96, "Session grew: check the per-connection memory budget");

// The authenticated sessions of one user: nearly always one, kept inline (a vector of one
// would be an allocation per online user); two or more spill to the heap.
class UserSessions {
 public:
  const SessionId* begin() const { return more_ ? more_->data() : &one_; }
  const SessionId* end() const { return begin() + size(); }
  size_t size() const { return more_ ? more_->size() : (one_ != 0 ? 1 : 0); }
  bool empty() const { return size() == 0; }
  void push_back(SessionId id) {
    if (!more_ && one_ == 0) {
      one_ = id;
      return;
    }
    if (!more_) more_ = std::make_unique<std::vector<SessionId>>(1, one_);
    more_->push_back(id);
  }
  void erase(SessionId id) {
    if (!more_) {
      if (one_ == id) one_ = 0;
      return;
    }
    std::erase(*more_, id);
    if (more_->size() == 1) {
      one_ = more_->front();
      more_.reset();
    }
  }

 private:
  SessionId one_ = 0;                             // the only session while more_ is null
  std::unique_ptr<std::vector<SessionId>> more_;  // every session, when two or more
};
static_assert(sizeof(UserSessions) <= 16, "UserSessions grew: one per online user");

// What a store job was submitted for, so its completion is answered the right way.
enum class Purpose : uint8_t {
  kSend,
  kChange,  // group operations: answered with ConversationUpdate
  kReceipt,
  kSync,
  kHistory,
  kGetReceipts,
  kSubscribe,
  kUnsubscribe,
  kTypingOn,
  kTypingOff,
  kPresenceSubscribe,
  kPresenceRecheck,  // subscriptions suspended by a membership removal
  kPushToken,
};

struct PendingAppend {
  SessionId session = 0;
  uint64_t rid = 0;
  std::string client_msg_id;
  Purpose purpose = Purpose::kSend;
};

struct PendingRead {
  SessionId session = 0;
  uint64_t rid = 0;
  ConversationId conversation_id = 0;  // all but Sync
  Purpose purpose = Purpose::kSync;
  uint64_t removals = 0;  // the Hub's count of committed removals when the read was submitted
  // kPresenceSubscribe: the users asked for that the session has not unsubscribed from since
  // (an Unsubscribe may overtake the Subscribe's read).
  std::unordered_set<UserId> still_wanted;
  // kSubscribe: the session asked to unsubscribe from the channel since (its read may be
  // answered first); the Subscribe is then answered without subscribing.
  bool withdrawn = false;
};

// Typing state one connection last forwarded for one conversation.
struct TypingMark {
  ConversationId conversation_id = 0;
  int64_t forwarded_ms = 0;
  bool active = false;
};
// Conversations whose typing state one connection remembers; the oldest is forgotten past it.
constexpr size_t kTypingMarksPerSession = 16;
// Push: pending (user, conversation) notifications, and those waiting for their tokens and badge
// from the store, are bounded; past the cap new ones are dropped, because a lost push is cheaper
// than unbounded memory.
constexpr size_t kMaxPendingPushes = 100'000;
// Users whose tokens and badge one store read fetches, at most, so one read stays short.
constexpr size_t kPushTargetsPerRead = 256;

using Body = v1::Envelope::BodyCase;

// The oneof field's name ("send", "presence_subscribe", ...), for error messages.
std::string BodyName(const v1::Envelope& envelope) {
  const google::protobuf::OneofDescriptor* oneof =
      v1::Envelope::descriptor()->FindOneofByName("body");
  const google::protobuf::FieldDescriptor* field =
      v1::Envelope::GetReflection()->GetOneofFieldDescriptor(envelope, oneof);
  return field != nullptr ? field->name() : "unknown";
}

bool IsClientRequest(Body body) {
  switch (body) {
    case Body::kHello:
    case Body::kSend:
    case Body::kReceipt:
    case Body::kSync:
    case Body::kHistory:
    case Body::kTyping:
    case Body::kPresenceSubscribe:
    case Body::kPresenceUnsubscribe:
    case Body::kCreateGroup:
    case Body::kRenameGroup:
    case Body::kAddMembers:
    case Body::kRemoveMembers:
    case Body::kLeave:
    case Body::kSetRole:
    case Body::kSubscribe:
    case Body::kUnsubscribe:
    case Body::kGetReceipts:
    case Body::kRegisterPushToken:
    case Body::kPing:
    case Body::kSetRetention:
      return true;
    default:
      return false;
  }
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t ClampRate(uint64_t rate) {
  return static_cast<int64_t>(std::min<uint64_t>(rate, kMaxRate));
}

}  // namespace

class Hub::Impl final : private PresenceTracker::Sink {
 public:
  Impl(const ServerOptions& options, uint64_t epoch, HubIo* io)
      : options_(options),
        epoch_(epoch),
        io_(io),
        clock_(options.clock ? options.clock : SystemClock()),
        ids_(options.node_id, clock_),
        message_rate_(ClampRate(options.messages_per_second)),
        message_cap_(ClampRate(options.messages_burst) * kMilli),
        byte_rate_(ClampRate(options.bytes_per_second)),
        byte_cap_(byte_rate_ * kMilli),
        presence_(options, options.presence ? options.presence : NewInProcessPresenceRegistry(),
                  clock_.get(), this),
        next_presence_refresh_ms_(clock_->MonotonicMs() + presence_.refresh_interval_ms()) {}

  bool OnOpen(SessionId id) {
    if (id == 0 || sessions_.size() >= options_.max_connections ||
        pending_sessions_ >= options_.max_pending_connections || sessions_.count(id) != 0) {
      return false;
    }
    const int64_t now = clock_->MonotonicMs();
    Session& s = sessions_[id];
    s.deadline_ms = now + options_.hello_timeout_ms;
    s.last_frame_ms = now;
    s.message_tokens = message_cap_;
    s.byte_tokens = byte_cap_;
    ++pending_sessions_;
    ArmTimer(id, s);
    return true;
  }

  void OnFrame(SessionId id, std::string_view bytes, bool text) {
    auto it = sessions_.find(id);
    if (it == sessions_.end()) return;  // closed by us; late frames are dropped
    Session& s = it->second;
    const int64_t now = clock_->MonotonicMs();
    // A device whose registry entry may expire before the next refresh pass (PresenceTick)
    // renews it from this frame: one silent past the TTL counts again, and one heard late (a
    // frame after the last pass, but past TTL - refresh interval) does not flicker offline.
    if (s.authenticated() &&
        now - s.last_frame_ms >=
            static_cast<int64_t>(options_.presence_ttl_ms) - presence_.refresh_interval_ms()) {
      presence_.DeviceHeard(s.user(), s.device, now);
    }
    Refill(s, now);  // before last_frame_ms moves: the buckets were last refilled then
    s.last_frame_ms = now;
    const codec::Format frame_format = text ? codec::Format::kJson : codec::Format::kBinary;
    if (!s.format_known) {
      s.format = frame_format;
      s.format_known = true;
    }

    // The runtime normally refuses such a message before it is assembled; this keeps the close
    // code right for any runtime that does not.
    if (bytes.size() > options_.max_message_bytes) {
      SendError(id, s, 0, InvalidArgument("message too large"));
      CloseSession(id, kCloseTooLarge, "message too large");
      return;
    }
    // The bytes are decoded as what the frame says they are; replies keep the session's format.
    LocalArena arena;
    v1::Envelope& envelope = *arena.Create<v1::Envelope>();
    Status decoded = codec::Decode(bytes, frame_format, options_.max_message_bytes, &envelope);
    if (!decoded.ok()) {
      SendError(id, s, 0, decoded);
      CloseSession(id, kCloseInvalidPayload, decoded.message());
      return;
    }
    if (envelope.body_case() == Body::kBatch) {
      if (const int n = envelope.batch().envelopes_size(); n > kMaxClientBatchEnvelopes) {
        SendError(
            id, s, 0,
            InvalidArgument("a batch holds at most " + std::to_string(kMaxClientBatchEnvelopes) +
                            " envelopes, not " + std::to_string(n)));
        CloseSession(id, kClosePolicy, "batch too large");
        return;
      }
      // Each element may close the session, so look it up again before the next one.
      for (v1::Envelope& element : *envelope.mutable_batch()->mutable_envelopes()) {
        Session* current = FindSession(id);
        if (current == nullptr) return;
        HandleEnvelope(id, *current, element);
      }
    } else {
      HandleEnvelope(id, s, envelope);
    }
    // The frame is charged after it was served: a frame larger than the bucket still passes
    // once, and the debt holds back the frames that follow it.
    if (Session* current = FindSession(id)) {
      current->byte_tokens -= static_cast<int64_t>(bytes.size()) * kMilli;
    }
  }

  void OnClose(SessionId id) { Forget(id); }

  void OnAppendDone(uint64_t token, const Status& commit_status, AppendResult result) {
    auto it = pending_appends_.find(token);
    if (it == pending_appends_.end()) return;
    PendingAppend pending = std::move(it->second);
    pending_appends_.erase(it);
    Session* sender = FindSession(pending.session);

    if (!commit_status.ok()) {
      if (sender == nullptr) return;
      // Nothing of the batch was stored. Tell the client when to resend (with the same
      // client_msg_id) unless the store already said.
      Status failure = commit_status;
      if (failure.retry_after_ms() == 0 && IsRetryable(failure.code())) {
        failure.set_retry_after_ms(kCommitRetryAfterMs);
      }
      SendError(pending.session, *sender, pending.rid, failure, pending.client_msg_id);
      return;
    }
    if (!result.status.ok()) {
      if (sender != nullptr) {
        SendError(pending.session, *sender, pending.rid, result.status, pending.client_msg_id);
      }
      return;
    }
    switch (pending.purpose) {
      case Purpose::kChange:
        if (sender != nullptr) {
          v1::Envelope reply;
          reply.set_rid(pending.rid);
          codec::ToProto(result.conversation,
                         reply.mutable_conversation_update()->mutable_conversation());
          Reply(pending.session, *sender, reply);
        }
        FanOutCommitted(result, /*except=*/0);
        return;
      case Purpose::kReceipt:
        AnswerReceipt(pending, sender, result);
        return;
      case Purpose::kPushToken:
        if (sender != nullptr) SendOk(pending.session, *sender, pending.rid);
        return;
      default:
        break;
    }

    if (sender != nullptr) {
      LocalArena arena;
      v1::Envelope& reply = *arena.Create<v1::Envelope>();
      reply.set_rid(pending.rid);
      v1::SendAck* ack = reply.mutable_send_ack();
      ack->set_conversation_id(result.message.conversation_id);
      ack->set_seq(result.message.seq);
      ack->set_message_id(result.message.message_id);
      ack->set_server_time_ms(result.message.server_time_ms);
      ack->set_client_msg_id(std::move(pending.client_msg_id));
      ack->set_duplicate(result.duplicate);
      Reply(pending.session, *sender, reply);
    }
    // A duplicate was delivered when it was first committed.
    if (result.duplicate) return;
    FanOutCommitted(result, pending.session);
  }

  void OnReadDone(uint64_t token, ReadResult result) {
    if (auto* targets = std::get_if<Result<std::vector<PushTarget>>>(&result)) {
      NotifyPushes(token, std::move(*targets));
      return;
    }
    auto it = pending_reads_.find(token);
    if (it == pending_reads_.end()) return;
    PendingRead pending = std::move(it->second);
    pending_reads_.erase(it);
    if (pending.purpose == Purpose::kPresenceSubscribe || pending.purpose == Purpose::kSubscribe) {
      ForgetSubscribeRead(pending.session, token);
    }
    Session* s = FindSession(pending.session);
    if (s == nullptr) return;

    if (auto* presence = std::get_if<Result<PresenceReply>>(&result)) {
      AnswerPresenceRead(pending, *s, *presence);
      return;
    }
    v1::Envelope reply;
    reply.set_rid(pending.rid);
    if (auto* receipts = std::get_if<Result<ReceiptsReply>>(&result)) {
      if (!receipts->ok()) {
        ForgetTypingMark(pending);
        SendError(pending.session, *s, pending.rid, receipts->status());
        return;
      }
      AnswerMembersRead(pending, *s, **receipts);
      return;
    }
    if (auto* sync = std::get_if<Result<SyncReply>>(&result)) {
      if (!sync->ok()) {
        SendError(pending.session, *s, pending.rid, sync->status());
        return;
      }
      v1::SyncBatch* batch = reply.mutable_sync_batch();
      for (const ConversationInfo& info : (*sync)->conversations) {
        codec::ToProto(info, batch->add_conversations());
      }
      for (Message& message : (*sync)->messages) {
        codec::ToProto(std::move(message), batch->add_messages());
      }
      for (const Gap& gap : (*sync)->gaps) {
        v1::Gap* out = batch->add_gaps();
        out->set_conversation_id(gap.conversation_id);
        out->set_from_seq(gap.from_seq);
        out->set_to_seq(gap.to_seq);
      }
      batch->set_has_more((*sync)->has_more);
      batch->set_unread_total((*sync)->unread_total);
    } else {
      auto& history = std::get<Result<HistoryReply>>(result);
      if (!history.ok()) {
        SendError(pending.session, *s, pending.rid, history.status());
        return;
      }
      v1::HistoryPage* page = reply.mutable_history_page();
      page->set_conversation_id(pending.conversation_id);
      for (Message& message : history->messages) {
        codec::ToProto(std::move(message), page->add_messages());
      }
      page->set_has_more(history->has_more);
      page->set_first_seq(history->first_seq);
    }
    Reply(pending.session, *s, reply);
  }

  void OnMessagesExpired(std::span<const ExpiredRange> expired) {
    for (const ExpiredRange& range : expired) {
      LocalArena arena;
      v1::Envelope& notice = *arena.Create<v1::Envelope>();
      v1::MessagesExpired* body = notice.mutable_messages_expired();
      body->set_conversation_id(range.conversation_id);
      body->set_first_seq(range.first_seq);
      body->set_up_to_seq(range.up_to_seq);
      codec::Frame binary;
      codec::Frame json;
      auto send = [&](SessionId target) {
        Session* s = FindSession(target);
        // An older client has no MessagesExpired in its schema: it would fail to decode the
        // frame and drop the connection. It learns the same from its next Sync.
        if (s == nullptr || !s->expiry_notices) return;
        SendShared(target, *s, notice, binary, json);
      };
      // Channels fan out on read: only the connections that watch one hear of it, as with its
      // messages. A removal unsubscribes the removed member's connections, and the store lists
      // no removed member, so none of them is told.
      if (range.kind == ConversationKind::kChannel) {
        auto subs = subscribers_.find(range.conversation_id);
        if (subs == subscribers_.end()) continue;
        for (SessionId target : subs->second) send(target);
        continue;
      }
      for (const UserId& user : range.recipients) {
        auto it = users_.find(user);
        if (it == users_.end()) continue;
        for (SessionId target : it->second) send(target);
      }
    }
  }

  void Tick() {
    const int64_t now = clock_->MonotonicMs();
    // Only sessions whose deadline has come are looked at, so a tick over many idle sessions
    // costs nothing but the heap's top.
    while (!timers_.empty() && timers_.top().first <= now) {
      const auto [due, id] = timers_.top();
      timers_.pop();
      Session* s = FindSession(id);
      if (s == nullptr || s->timer_due_ms != due) continue;  // stale entry
      s->timer_due_ms = kNoTimer;
      if (!s->authenticated() && now >= s->deadline_ms) {
        CloseSession(id, kCloseUnauthenticated, "hello timeout");
      } else if (now >= s->deadline_ms) {
        // The client reconnects with a fresh token from its token provider.
        SendError(id, *s, 0, Unauthenticated("token expired"));
        CloseSession(id, kCloseUnauthenticated, "token expired");
      } else if (now >= s->last_frame_ms + static_cast<int64_t>(options_.idle_timeout_ms)) {
        CloseSession(id, kCloseIdleTimeout, "idle timeout");
      } else {
        ArmTimer(id, *s);
      }
    }
    FlushPushes(now);
    PresenceTick(now);
  }

  void CloseAll() {
    presence_.PersistAll();
    std::vector<SessionId> ids;
    ids.reserve(sessions_.size());
    for (const auto& [id, s] : sessions_) ids.push_back(id);
    for (SessionId id : ids) CloseSession(id, kCloseGoingAway, "server shutting down");
  }

  size_t session_count() const { return sessions_.size(); }
  size_t pending_appends() const { return pending_appends_.size(); }

 private:
  Session* FindSession(SessionId id) {
    auto it = sessions_.find(id);
    return it == sessions_.end() ? nullptr : &it->second;
  }

  // A token expiry (Unix ms, 0 = never) on the monotonic clock the timers use.
  int64_t DeadlineOf(int64_t expires_at_ms, int64_t wall_now) const {
    constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
    if (expires_at_ms == 0) return kNever;
    const int64_t now = clock_->MonotonicMs();
    if (expires_at_ms <= wall_now) return now;
    const int64_t left = expires_at_ms - wall_now;  // positive: cannot overflow
    return left >= kNever - now ? kNever : now + left;
  }

  // A session has at most one live heap entry, the earliest: a later due waits until that entry
  // fires and Tick re-arms, so the heap holds about one entry per session, not one per re-arm
  // (the hello timeout's entry used to stay behind, stale, after every Hello).
  void ArmTimer(SessionId id, Session& s) {
    int64_t due = s.last_frame_ms + static_cast<int64_t>(options_.idle_timeout_ms);
    due = std::min(due, s.deadline_ms);
    if (s.timer_due_ms != kNoTimer && s.timer_due_ms <= due) return;
    s.timer_due_ms = due;
    timers_.emplace(due, id);
  }

  // Buckets are refilled lazily when a session sends, which is equivalent to refilling them on
  // every tick and keeps Tick independent of the number of sessions. They were last refilled at
  // the session's previous frame (or its opening), so last_frame_ms serves as the refill time.
  void Refill(Session& s, int64_t now) {
    const int64_t elapsed = std::min(now - s.last_frame_ms, kMaxRefillMs);
    if (elapsed <= 0) return;
    s.message_tokens = std::min(message_cap_, s.message_tokens + elapsed * message_rate_);
    s.byte_tokens = std::min(byte_cap_, s.byte_tokens + elapsed * byte_rate_);
  }

  // Takes one message token. Returns ResourceExhausted with the wait until a request would be
  // accepted when the message or the byte bucket is empty.
  Status TakeToken(Session& s) {
    int64_t wait_ms = 0;
    if (s.message_tokens < kMilli) {
      wait_ms = message_rate_ > 0 ? CeilDiv(kMilli - s.message_tokens, message_rate_) : kMilli;
    }
    if (s.byte_tokens < 0) {
      wait_ms = std::max(wait_ms, byte_rate_ > 0 ? CeilDiv(-s.byte_tokens, byte_rate_) : kMilli);
    }
    if (wait_ms > 0) {
      const int64_t capped = std::min<int64_t>(wait_ms, UINT32_MAX);
      return ResourceExhausted("rate limit exceeded")
          .set_retry_after_ms(static_cast<uint32_t>(std::max<int64_t>(capped, 1)));
    }
    s.message_tokens -= kMilli;
    return Status::Ok();
  }

  // `envelope` is the decoded frame's: handlers may move its strings out (it is dropped after).
  void HandleEnvelope(SessionId id, Session& s, v1::Envelope& envelope) {
    const Body body = envelope.body_case();
    if (!IsClientRequest(body)) {
      const std::string name = BodyName(envelope);
      SendError(id, s, envelope.rid(), InvalidArgument("not a client request: " + name));
      CloseSession(id, kCloseProtocolError, "not a client request");
      return;
    }
    if (!s.authenticated() && body != Body::kHello) {
      SendError(id, s, envelope.rid(), Unauthenticated("hello required first"));
      CloseSession(id, kCloseUnauthenticated, "hello required first");
      return;
    }
    if (s.authenticated() && body == Body::kHello) {
      SendError(id, s, envelope.rid(), FailedPrecondition("already authenticated"));
      CloseSession(id, kClosePolicy, "already authenticated");
      return;
    }
    // Every request costs a token, malformed ones included, so no kind of request can flood
    // the loop or the store's queues. For Send this is the first of its checks. (client_msg_id
    // is for the error below only: HandleSend moves the Send's strings out.)
    const std::string_view client_msg_id = body == Body::kSend
                                               ? std::string_view(envelope.send().client_msg_id())
                                               : std::string_view();
    if (body == Body::kSend) {
      if (auto held = held_sends_.find(id); held != held_sends_.end()) {
        // Refused without taking a token (as a refusal by the rate limit takes none), so the
        // refusals of what the client had in flight cannot hold its resend back.
        if (held->second.client_msg_id != client_msg_id &&
            clock_->MonotonicMs() - held->second.since_ms < kHeldSendTimeoutMs) {
          SendError(id, s, envelope.rid(), HeldSendStatus(), client_msg_id);
          return;
        }
        // The refused one again (what follows it may follow it), or the hold ran out.
        held_sends_.erase(held);
      }
    }
    Status status = TakeToken(s);
    if (status.ok()) status = codec::Validate(envelope);
    if (!status.ok()) {
      // A Send refused for now (the rate limit) is sent again later: until then the session's
      // later Sends are refused, so they are not stored before it.
      // (An id of the wrong length is refused for good on its resend: nothing to wait for.)
      if (body == Body::kSend && IsRetryable(status.code()) &&
          client_msg_id.size() >= kMinClientMsgIdBytes &&
          client_msg_id.size() <= kMaxClientMsgIdBytes) {
        held_sends_.try_emplace(id, HeldSend{std::string(client_msg_id), clock_->MonotonicMs()});
      }
      SendError(id, s, envelope.rid(), status, client_msg_id);
      return;
    }
    switch (body) {
      case Body::kHello:
        HandleHello(id, s, envelope);
        return;
      case Body::kSend:
        HandleSend(id, s, envelope);
        return;
      case Body::kSync:
        HandleSync(id, s, envelope);
        return;
      case Body::kHistory:
        HandleHistory(id, s, envelope);
        return;
      case Body::kPing:
        HandlePing(id, s, envelope);
        return;
      case Body::kCreateGroup:
      case Body::kRenameGroup:
      case Body::kAddMembers:
      case Body::kRemoveMembers:
      case Body::kLeave:
      case Body::kSetRole:
      case Body::kSetRetention:
        HandleChange(id, s, envelope);
        return;
      case Body::kReceipt:
        HandleReceipt(id, s, envelope);
        return;
      case Body::kGetReceipts:
        SubmitMembersRead(id, s, envelope.rid(), envelope.get_receipts().conversation_id(),
                          Purpose::kGetReceipts);
        return;
      case Body::kSubscribe:
        SubmitMembersRead(id, s, envelope.rid(), envelope.subscribe().conversation_id(),
                          Purpose::kSubscribe);
        return;
      case Body::kUnsubscribe: {
        const ConversationId conversation_id = envelope.unsubscribe().conversation_id();
        // A Subscribe of the same channel still being checked must not subscribe when its
        // read comes back after this one's.
        ForEachSubscribeRead(id, [&](PendingRead& read) {
          if (read.purpose == Purpose::kSubscribe && read.conversation_id == conversation_id) {
            read.withdrawn = true;
          }
        });
        SubmitMembersRead(id, s, envelope.rid(), conversation_id, Purpose::kUnsubscribe);
        return;
      }
      case Body::kTyping:
        HandleTyping(id, s, envelope);
        return;
      case Body::kRegisterPushToken:
        HandleRegisterPushToken(id, s, envelope);
        return;
      case Body::kPresenceSubscribe:
        HandlePresenceSubscribe(id, s, envelope);
        return;
      case Body::kPresenceUnsubscribe:
        HandlePresenceUnsubscribe(id, s, envelope);
        return;
      default:
        HandleUnsupported(id, s, envelope);
        return;
    }
  }

  void HandleHello(SessionId id, Session& s, const v1::Envelope& envelope) {
    const uint64_t rid = envelope.rid();
    const v1::Hello& hello = envelope.hello();
    if (hello.device_id().size() > kMaxDeviceIdBytes) {
      SendError(id, s, rid, InvalidArgument("device_id must be at most 128 bytes"));
      return;
    }
    if (hello.protocol_version() > kProtocolVersion) {
      // A newer client: refuse plainly rather than misread what it sends.
      SendError(id, s, rid,
                FailedPrecondition("unsupported protocol_version " +
                                   std::to_string(hello.protocol_version()) +
                                   "; this server speaks " + std::to_string(kProtocolVersion)));
      CloseSession(id, kCloseProtocolError, "unsupported protocol version");
      return;
    }
    if (hello.max_message_bytes() != 0) {
      const size_t needed = LargestMessageFrameBytes(options_, s.format);
      if (hello.max_message_bytes() < needed) {
        SendError(
            id, s, rid,
            FailedPrecondition("max_message_bytes " + std::to_string(hello.max_message_bytes()) +
                               " is below the largest message this server may send (" +
                               std::to_string(needed) + " bytes)"));
        CloseSession(id, kCloseClientLimitTooLow, "max_message_bytes too low");
        return;
      }
    }
    const int64_t wall_now = clock_->WallMs();
    Result<Identity> identity = options_.authenticator->Verify(hello.token(), wall_now);
    if (!identity.ok()) {
      // Whatever the authenticator says, the client sees UNAUTHENTICATED with its reason.
      SendError(id, s, rid, Unauthenticated(identity.status().message()));
      CloseSession(id, kCloseUnauthenticated, "unauthenticated");
      return;
    }
    if (identity->user_id.empty() || identity->user_id.size() > kMaxUserIdBytes ||
        !IsValidUtf8(identity->user_id)) {
      // The stores take user ids of up to 128 bytes, and the frame bound counts on it. Ids go
      // into protobuf strings, which clients refuse to decode unless they are UTF-8 (a custom
      // authenticator may hand out anything).
      SendError(id, s, rid, Unauthenticated("the token's user id must be 1 to 128 bytes of UTF-8"));
      CloseSession(id, kCloseUnauthenticated, "unauthenticated");
      return;
    }
    const auto user_entry = users_.try_emplace(std::move(identity->user_id)).first;
    UserSessions& devices = user_entry->second;
    if (devices.size() >= options_.max_devices_per_user) {
      if (devices.empty()) users_.erase(user_entry);
      SendError(id, s, rid, ResourceExhausted("too many devices for this user"));
      CloseSession(id, kCloseTooManyDevices, "too many devices");
      return;
    }
    const bool device_known = std::any_of(devices.begin(), devices.end(), [&](SessionId other) {
      const Session* o = FindSession(other);
      return o != nullptr && o->device == hello.device_id();
    });
    devices.push_back(id);
    s.user_key = &user_entry->first;
    s.device = hello.device_id();
    s.client_max_bytes = hello.max_message_bytes();
    s.expiry_notices = hello.accepts_messages_expired();
    io_->Welcomed(id, s.client_max_bytes);
    s.deadline_ms = DeadlineOf(identity->expires_at_ms, wall_now);
    --pending_sessions_;
    ArmTimer(id, s);

    v1::Envelope reply;
    reply.set_rid(rid);
    v1::Welcome* welcome = reply.mutable_welcome();
    welcome->set_user_id(s.user());
    welcome->set_device_id(s.device);
    welcome->set_session_id(id);
    welcome->set_epoch(epoch_);
    welcome->set_server_time_ms(clock_->WallMs());
    v1::Limits* limits = welcome->mutable_limits();
    limits->set_max_message_bytes(ClampU32(options_.max_message_bytes));
    limits->set_max_body_bytes(ClampU32(options_.max_body_bytes));
    limits->set_history_page_max(options_.history_page_max);
    limits->set_sync_page_max(options_.sync_page_max);
    limits->set_sync_catchup_max(options_.sync_catchup_max);
    limits->set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
    limits->set_idle_timeout_ms(options_.idle_timeout_ms);
    limits->set_messages_per_second(options_.messages_per_second);
    limits->set_max_attachments(options_.max_attachments);
    limits->set_max_group_members(options_.max_group_members);
    limits->set_max_presence_subscriptions(options_.max_presence_subscriptions);
    Reply(id, s, reply);
    // The user's devices sync what the open collapse windows hold: no push for it.
    for (auto it = pending_pushes_.lower_bound(PushKey{s.user(), 0});
         it != pending_pushes_.end() && it->first.first == s.user();) {
      it = pending_pushes_.erase(it);
    }
    if (!device_known) {
      presence_.DeviceUp(s.user(), s.device);
    } else {
      // The device reconnected while its old connection lingers (not closed yet, perhaps
      // silent past the presence TTL): it is live again from now, not from the next refresh.
      presence_.DeviceHeard(s.user(), s.device, clock_->MonotonicMs());
    }
  }

  // The request takes the decoded Send's strings instead of copying them (a body may be up to
  // max_body_bytes); only the pending entry keeps a copy of client_msg_id, for the reply.
  void HandleSend(SessionId id, Session& s, v1::Envelope& envelope) {
    v1::Send& send = *envelope.mutable_send();
    const uint64_t rid = envelope.rid();
    Status status = CheckSend(s, send);
    if (!status.ok()) {
      SendError(id, s, rid, status, send.client_msg_id());
      return;
    }

    AppendJob job;
    job.token = next_token_++;
    job.session = id;
    pending_appends_.emplace(job.token, PendingAppend{id, rid, send.client_msg_id()});
    AppendRequest& request = job.request;
    if (send.to_case() == v1::Send::kConversationId) {
      request.conversation_id = send.conversation_id();
    } else {
      request.peer = std::move(*send.mutable_peer());
    }
    request.sender = s.user();
    request.sender_device = s.device;
    request.client_msg_id = std::move(*send.mutable_client_msg_id());
    request.message_id = ids_.Next();
    request.server_time_ms = clock_->WallMs();
    request.kind = MessageKind::kUser;
    request.content_type = std::move(*send.mutable_content_type());
    request.body = std::move(*send.mutable_body());
    request.attachments.reserve(send.attachments_size());
    for (const v1::Attachment& attachment : send.attachments()) {
      request.attachments.push_back(codec::FromProto(attachment));
    }
    io_->SubmitAppend(std::move(job));
  }

  Status CheckSend(const Session& s, const v1::Send& send) const {
    const size_t id_bytes = send.client_msg_id().size();
    if (id_bytes < kMinClientMsgIdBytes || id_bytes > kMaxClientMsgIdBytes) {
      return InvalidArgument("client_msg_id must be 16..128 bytes");
    }
    if (send.body().empty() && send.attachments_size() == 0) {
      return InvalidArgument("empty body");
    }
    if (send.body().size() > options_.max_body_bytes) {
      return InvalidArgument("body too large");
    }
    if (static_cast<uint32_t>(send.attachments_size()) > options_.max_attachments) {
      return InvalidArgument("too many attachments");
    }
    if (send.content_type().size() > kMaxContentTypeBytes) {
      return InvalidArgument("content_type must be at most 255 bytes");
    }
    // What the attachments describe counts against the body's bound, so a message cannot grow
    // past it through their strings.
    size_t described = send.body().size();
    for (const v1::Attachment& a : send.attachments()) {
      described += a.url().size() + a.mime_type().size() + a.name().size() + a.sha256().size();
    }
    if (described > options_.max_body_bytes) {
      return InvalidArgument("body and attachments too large");
    }
    if (send.to_case() == v1::Send::kPeer) {
      if (send.peer().empty() || send.peer().size() > kMaxUserIdBytes) {
        return InvalidArgument("peer must be 1..128 bytes");
      }
      if (send.peer() == s.user()) return InvalidArgument("cannot send to yourself");
    }
    return Status::Ok();
  }

  void HandleSync(SessionId id, Session& s, const v1::Envelope& envelope) {
    const v1::Sync& sync = envelope.sync();
    SyncQuery query;
    query.user = s.user();
    query.device = s.device;
    query.cursors.reserve(sync.cursors_size());
    for (const v1::Cursor& cursor : sync.cursors()) {
      Cursor& c = query.cursors.emplace_back();
      c.conversation_id = cursor.conversation_id();
      c.seq = cursor.seq();
      c.lowest_seq = cursor.lowest_seq();
      // Unset: a client that predates them, never sent states for them (see RunSync).
      if (cursor.has_delivered_all_seq()) c.delivered_all_seq = cursor.delivered_all_seq();
      if (cursor.has_read_all_seq()) c.read_all_seq = cursor.read_all_seq();
    }
    const uint32_t requested = sync.limit() != 0 ? sync.limit() : options_.sync_page_max;
    query.limit = std::min(requested, options_.sync_page_max);
    query.catchup_max = options_.sync_catchup_max;
    query.max_bytes = ReplyMaxBytes(s);
    SubmitRead(id, envelope.rid(), 0, Purpose::kSync, std::move(query));
  }

  void HandleHistory(SessionId id, Session& s, const v1::Envelope& envelope) {
    const v1::History& history = envelope.history();
    HistoryQuery query;
    query.user = s.user();
    query.conversation_id = history.conversation_id();
    query.before_seq = history.before_seq();
    const uint32_t requested = history.limit() != 0 ? history.limit() : kDefaultHistoryLimit;
    query.limit = std::min(requested, options_.history_page_max);
    query.max_bytes = ReplyMaxBytes(s);
    SubmitRead(id, envelope.rid(), query.conversation_id, Purpose::kHistory, std::move(query));
  }

  // A Sync reply or History page carries messages up to half the connection's outbound bound,
  // so it fits beside the deliveries queued with it, and up to half what the client said it
  // accepts, however large the bodies; the client asks again for the rest.
  // In JSON a byte may take six (a control character is written \u00XX).
  uint64_t ReplyMaxBytes(const Session& s) const {
    uint64_t bound = options_.max_outbound_bytes / 2;
    if (s.client_max_bytes != 0) bound = std::min<uint64_t>(bound, s.client_max_bytes / 2);
    if (s.format == codec::Format::kJson) bound /= 6;
    return std::max<uint64_t>(bound, 1);
  }

  void HandlePing(SessionId id, Session& s, const v1::Envelope& envelope) {
    v1::Envelope reply;
    reply.set_rid(envelope.rid());
    v1::Pong* pong = reply.mutable_pong();
    pong->set_client_time_ms(envelope.ping().client_time_ms());
    pong->set_server_time_ms(clock_->WallMs());
    Reply(id, s, reply);
  }

  // Requests in the schema that this server does not serve yet. Each becomes its own handler
  // in HandleEnvelope's switch when it is implemented.
  void HandleUnsupported(SessionId id, Session& s, const v1::Envelope& envelope) {
    SendError(id, s, envelope.rid(),
              FailedPrecondition(BodyName(envelope) + " is not supported by this server yet"));
  }

  void SubmitRead(SessionId id, uint64_t rid, ConversationId conversation_id, Purpose purpose,
                  decltype(ReadJob::query) query) {
    ReadJob job;
    job.token = next_token_++;
    PendingRead pending{id, rid, conversation_id, purpose, removals_, {}, false};
    if (purpose == Purpose::kPresenceSubscribe) {
      const auto& targets = std::get<PresenceQuery>(query).targets;
      pending.still_wanted.insert(targets.begin(), targets.end());
    }
    if (purpose == Purpose::kPresenceSubscribe || purpose == Purpose::kSubscribe) {
      subscribe_reads_.emplace(id, job.token);
    }
    job.query = std::move(query);
    pending_reads_.emplace(job.token, std::move(pending));
    io_->SubmitRead(std::move(job));
  }

  // Calls `fn` on each (PresenceSubscribe or Subscribe) read of `session` still in flight.
  template <typename Fn>
  void ForEachSubscribeRead(SessionId session, const Fn& fn) {
    auto [first, last] = subscribe_reads_.equal_range(session);
    for (auto it = first; it != last; ++it) {
      auto read = pending_reads_.find(it->second);
      if (read != pending_reads_.end()) fn(read->second);
    }
  }

  void ForgetSubscribeRead(SessionId session, uint64_t token) {
    auto [first, last] = subscribe_reads_.equal_range(session);
    for (auto it = first; it != last; ++it) {
      if (it->second == token) {
        subscribe_reads_.erase(it);
        return;
      }
    }
  }

  // Requests that need the user's standing and the members (GetReceipts, Subscribe,
  // Unsubscribe, Typing) read them from the store, which authorizes them (store_common's
  // Authorize), and are answered in AnswerMembersRead.
  void SubmitMembersRead(SessionId id, const Session& s, uint64_t rid,
                         ConversationId conversation_id, Purpose purpose) {
    SubmitRead(id, rid, conversation_id, purpose,
               ReceiptsQuery{.user = s.user(), .conversation_id = conversation_id});
  }

  // Group operations go to the writer like messages: the store authorizes them and commits
  // each as a system message in the same transaction as the change.
  void HandleChange(SessionId id, Session& s, const v1::Envelope& envelope) {
    AppendJob job;
    job.token = next_token_++;
    AppendRequest& request = job.request;
    request.sender = s.user();
    request.sender_device = s.device;
    request.message_id = ids_.Next();
    request.server_time_ms = clock_->WallMs();
    request.kind = MessageKind::kSystem;
    request.max_group_members = options_.max_group_members;
    request.max_channel_members = options_.max_channel_members;
    switch (envelope.body_case()) {
      case Body::kCreateGroup: {
        const v1::CreateGroup& create = envelope.create_group();
        request.op = ConversationOp::kCreateGroup;
        request.group_kind = static_cast<ConversationKind>(create.kind());
        request.title = create.title();
        request.users.assign(create.members().begin(), create.members().end());
        break;
      }
      case Body::kRenameGroup:
        request.op = ConversationOp::kRename;
        request.conversation_id = envelope.rename_group().conversation_id();
        request.title = envelope.rename_group().title();
        break;
      case Body::kAddMembers:
        request.op = ConversationOp::kAddMembers;
        request.conversation_id = envelope.add_members().conversation_id();
        request.users.assign(envelope.add_members().users().begin(),
                             envelope.add_members().users().end());
        break;
      case Body::kRemoveMembers:
        request.op = ConversationOp::kRemoveMembers;
        request.conversation_id = envelope.remove_members().conversation_id();
        request.users.assign(envelope.remove_members().users().begin(),
                             envelope.remove_members().users().end());
        request.spare_message_id = ids_.Next();
        break;
      case Body::kLeave:
        request.op = ConversationOp::kLeave;
        request.conversation_id = envelope.leave().conversation_id();
        request.spare_message_id = ids_.Next();
        break;
      case Body::kSetRetention:
        request.op = ConversationOp::kSetRetention;
        request.conversation_id = envelope.set_retention().conversation_id();
        request.retention_ms = envelope.set_retention().retention_ms();
        break;
      default:  // kSetRole
        request.op = ConversationOp::kSetRole;
        request.conversation_id = envelope.set_role().conversation_id();
        request.users = {envelope.set_role().user()};
        request.role = static_cast<Role>(envelope.set_role().role());
        break;
    }
    pending_appends_.emplace(job.token, PendingAppend{id, envelope.rid(), {}, Purpose::kChange});
    io_->SubmitAppend(std::move(job));
  }

  void HandleReceipt(SessionId id, Session& s, const v1::Envelope& envelope) {
    const v1::Receipt& receipt = envelope.receipt();
    AppendJob job;
    job.token = next_token_++;
    job.request.op = ConversationOp::kReceipt;
    job.request.conversation_id = receipt.conversation_id();
    job.request.sender = s.user();
    job.request.sender_device = s.device;
    job.request.delivered_seq = receipt.delivered_seq();
    job.request.read_seq = receipt.read_seq();
    job.request.receipt_update_max_members = options_.receipt_updates_max_members;
    pending_appends_.emplace(job.token, PendingAppend{id, envelope.rid(), {}, Purpose::kReceipt});
    io_->SubmitAppend(std::move(job));
  }

  // The requester gets a ReceiptUpdate with its new watermarks and unread counts as the reply;
  // its other devices get the same when the user's marks moved; in direct conversations and
  // groups the other members the store lists get the user's watermarks and the all-members
  // watermarks (in a large group only when those rose above what the members were told).
  void AnswerReceipt(const PendingAppend& pending, Session* sender, const AppendResult& result) {
    const ConversationInfo& info = result.conversation;
    v1::Envelope own;
    v1::ReceiptUpdate* update = own.mutable_receipt_update();
    update->set_conversation_id(info.conversation_id);
    update->set_user_id(result.sender_receipt.user);
    if (sender != nullptr) update->set_device_id(sender->device);
    update->set_delivered_seq(result.sender_receipt.delivered_seq);
    update->set_read_seq(result.sender_receipt.read_seq);
    update->set_delivered_all_seq(result.delivered_all_seq);
    update->set_read_all_seq(result.read_all_seq);
    update->set_unread(info.unread);
    update->set_unread_total(result.unread_total);
    if (sender != nullptr) {
      own.set_rid(pending.rid);
      Reply(pending.session, *sender, own);
      own.set_rid(0);
    }
    const UserId& user = result.sender_receipt.user;
    if (result.receipt_changed) SendToUser(user, own, pending.session);
    // The store lists the members to tell (none when neither the user's marks nor the lowest
    // marks moved for them).
    if (result.kind == ConversationKind::kChannel || result.recipients.empty()) return;
    v1::Envelope others = own;
    others.mutable_receipt_update()->clear_unread();
    others.mutable_receipt_update()->clear_unread_total();
    codec::Frame binary;
    codec::Frame json;
    for (const UserId& member : result.recipients) {
      if (member == user) continue;
      SendToUserShared(member, others, 0, binary, json);
    }
  }

  void HandleTyping(SessionId id, Session& s, const v1::Envelope& envelope) {
    const v1::Typing& typing = envelope.typing();
    const int64_t now = clock_->MonotonicMs();
    std::vector<TypingMark>& marks = typing_[id];
    auto mark = std::find_if(marks.begin(), marks.end(), [&](const TypingMark& m) {
      return m.conversation_id == typing.conversation_id();
    });
    // Repeats of the same state within the interval are dropped silently (the client is told
    // Ok): the other members already show it, and it expires by itself.
    if (mark != marks.end() && mark->active == typing.active() &&
        now - mark->forwarded_ms < static_cast<int64_t>(options_.typing_interval_ms)) {
      SendOk(id, s, envelope.rid());
      return;
    }
    if (mark == marks.end()) {
      if (marks.size() >= kTypingMarksPerSession) marks.erase(marks.begin());
      marks.push_back(TypingMark{typing.conversation_id(), now, typing.active()});
    } else {
      mark->forwarded_ms = now;
      mark->active = typing.active();
    }
    SubmitMembersRead(id, s, envelope.rid(), typing.conversation_id(),
                      typing.active() ? Purpose::kTypingOn : Purpose::kTypingOff);
  }

  // A refused Typing leaves no mark, so a repeat within the interval is refused again rather
  // than dropped with Ok.
  void ForgetTypingMark(const PendingRead& pending) {
    if (pending.purpose != Purpose::kTypingOn && pending.purpose != Purpose::kTypingOff) return;
    auto it = typing_.find(pending.session);
    if (it == typing_.end()) return;
    std::erase_if(it->second, [&](const TypingMark& m) {
      return m.conversation_id == pending.conversation_id;
    });
    if (it->second.empty()) typing_.erase(it);
  }

  bool TypingSuperseded(const PendingRead& pending) const {
    auto it = typing_.find(pending.session);
    if (it == typing_.end()) return false;
    for (const TypingMark& mark : it->second) {
      if (mark.conversation_id == pending.conversation_id) {
        return mark.active != (pending.purpose == Purpose::kTypingOn);
      }
    }
    return false;  // forgotten past kTypingMarksPerSession: nothing later to defer to
  }

  void AnswerMembersRead(const PendingRead& pending, Session& s, const ReceiptsReply& reply) {
    const ConversationId conversation_id = pending.conversation_id;
    switch (pending.purpose) {
      case Purpose::kGetReceipts: {
        v1::Envelope out;
        out.set_rid(pending.rid);
        v1::ReceiptsPage* page = out.mutable_receipts_page();
        page->set_conversation_id(conversation_id);
        for (const MemberReceipt& member : reply.members) {
          v1::MemberReceipt* m = page->add_members();
          m->set_user_id(member.user);
          m->set_delivered_seq(member.delivered_seq);
          m->set_read_seq(member.read_seq);
          m->set_role(static_cast<v1::Role>(member.role));
        }
        Reply(pending.session, s, out);
        return;
      }
      case Purpose::kSubscribe: {
        if (pending.withdrawn) {
          SendOk(pending.session, s, pending.rid);
          return;
        }
        // The read may predate a removal the Hub has applied since (and whose unsubscribe has
        // already run): ask again rather than subscribe a removed member.
        if (RemovedSince(pending.removals, {s.user()}, conversation_id)) {
          SubmitMembersRead(pending.session, s, pending.rid, conversation_id, Purpose::kSubscribe);
          return;
        }
        // Direct conversations and groups are pushed to every member anyway.
        if (reply.kind == ConversationKind::kChannel) {
          std::vector<ConversationId>& mine = session_channels_[pending.session];
          if (std::find(mine.begin(), mine.end(), conversation_id) == mine.end()) {
            if (mine.size() >= options_.max_channel_subscriptions) {
              SendError(pending.session, s, pending.rid,
                        ResourceExhausted("too many channel subscriptions on this connection"));
              return;
            }
            mine.push_back(conversation_id);
            subscribers_[conversation_id].insert(pending.session);
          }
        }
        SendOk(pending.session, s, pending.rid);
        return;
      }
      case Purpose::kUnsubscribe:
        Unsubscribe(pending.session, conversation_id);
        SendOk(pending.session, s, pending.rid);
        return;
      default: {  // typing
        if (reply.kind == ConversationKind::kChannel) {
          ForgetTypingMark(pending);
          SendError(pending.session, s, pending.rid,
                    FailedPrecondition("typing is not shown in channels"));
          return;
        }
        if (pending.removals != removals_) {
          // A removal since the read may concern the typist or a member it lists: read again
          // (a removed typist is then refused) rather than tell a removed member.
          std::vector<UserId> listed;
          listed.reserve(reply.members.size());
          for (const MemberReceipt& member : reply.members) listed.push_back(member.user);
          if (RemovedSince(pending.removals, listed, conversation_id)) {
            SubmitMembersRead(pending.session, s, pending.rid, conversation_id, pending.purpose);
            return;
          }
        }
        // A later Typing of the other state was taken while this one's read was in flight: it
        // tells the members, so this one must not overtake it (on, off, read in reverse order,
        // would show typing until it expires).
        if (TypingSuperseded(pending)) {
          SendOk(pending.session, s, pending.rid);
          return;
        }
        v1::Envelope update;
        v1::TypingUpdate* typing = update.mutable_typing_update();
        typing->set_conversation_id(conversation_id);
        typing->set_user_id(s.user());
        typing->set_active(pending.purpose == Purpose::kTypingOn);
        typing->set_expires_ms(options_.typing_expires_ms);
        codec::Frame binary;
        codec::Frame json;
        for (const MemberReceipt& member : reply.members) {
          if (member.user == s.user()) continue;
          SendToUserShared(member.user, update, 0, binary, json);
        }
        SendOk(pending.session, s, pending.rid);
        return;
      }
    }
  }

  void Unsubscribe(SessionId id, ConversationId conversation_id) {
    auto mine = session_channels_.find(id);
    if (mine != session_channels_.end()) {
      std::erase(mine->second, conversation_id);
      if (mine->second.empty()) session_channels_.erase(mine);
    }
    auto subs = subscribers_.find(conversation_id);
    if (subs != subscribers_.end()) {
      subs->second.erase(id);
      if (subs->second.empty()) subscribers_.erase(subs);
    }
  }

  // Tokens are stored by the writer like any other change (ConversationOp::kPushToken), which
  // checks them and keeps at most max_devices_per_user devices per user. An empty token
  // unregisters the device. Without a notifier the server has no use for tokens.
  void HandleRegisterPushToken(SessionId id, Session& s, const v1::Envelope& envelope) {
    if (options_.push == nullptr) {
      HandleUnsupported(id, s, envelope);
      return;
    }
    const v1::RegisterPushToken& request = envelope.register_push_token();
    AppendJob job;
    job.token = next_token_++;
    job.request.op = ConversationOp::kPushToken;
    job.request.sender = s.user();
    job.request.sender_device = s.device;
    job.request.server_time_ms = clock_->WallMs();
    job.request.push_platform = request.platform();
    job.request.push_token = request.token();
    job.request.max_push_tokens = std::max<uint32_t>(options_.max_devices_per_user, 1);
    pending_appends_.emplace(job.token, PendingAppend{id, envelope.rid(), {}, Purpose::kPushToken});
    io_->SubmitAppend(std::move(job));
  }

  // Whether a connection (or one of `user`'s) was heard from within presence_ttl_ms, as presence
  // counts a device online. A connection silent for longer may be gone without a close (a phone
  // in a tunnel, a suspended app: the idle timeout ends it later), so its user is pushed.
  bool HeardLately(const Session& s, int64_t now) const {
    return now - s.last_frame_ms < static_cast<int64_t>(options_.presence_ttl_ms);
  }
  bool HeardLately(const UserId& user, int64_t now) {
    auto it = users_.find(user);
    if (it == users_.end()) return false;
    return std::any_of(it->second.begin(), it->second.end(), [&](SessionId id) {
      const Session* s = FindSession(id);
      return s != nullptr && HeardLately(*s, now);
    });
  }

  // A committed user message for `user`, who has no device heard from lately: opens a collapse
  // window for (user, conversation) or folds into the open one.
  void QueuePush(const UserId& user, const Message& message) {
    const PushKey key{user, message.conversation_id};
    auto it = pending_pushes_.find(key);
    if (it == pending_pushes_.end()) {
      if (pending_pushes_.size() >= kMaxPendingPushes) return;
      const int64_t due_ms = clock_->MonotonicMs() + options_.push_collapse_ms;
      it = pending_pushes_.emplace(key, PendingPush{PushNotification{}, due_ms}).first;
      it->second.notification.user = user;
      it->second.notification.conversation_id = message.conversation_id;
      it->second.notification.collapsed = 0;
      push_due_.emplace_back(due_ms, key);
    }
    PushNotification& n = it->second.notification;
    n.sender = message.sender;
    n.seq = message.seq;
    n.server_time_ms = message.server_time_ms;
    // At most kMaxPushPreviewBytes, cut before a UTF-8 sequence that would not fit, so up to
    // kMaxPendingPushes windows hold little memory however large the bodies (push services
    // show a line or two anyway).
    if (options_.push_preview) n.preview = Utf8Prefix(message.body, kMaxPushPreviewBytes);
    ++n.collapsed;
  }

  // Windows that ended are handed to the notifier once the store has told their users' tokens
  // and unread totals, read in one job per kPushTargetsPerRead users. Windows all have the same
  // length, so the queue is in due order. A user who came online meanwhile has seen the
  // messages: no push.
  void FlushPushes(int64_t now) {
    std::vector<PushNotification> due;
    while (!push_due_.empty() && push_due_.front().first <= now) {
      const int64_t due_ms = push_due_.front().first;
      PushKey key = std::move(push_due_.front().second);
      push_due_.pop_front();
      auto it = pending_pushes_.find(key);
      // Gone, or a later window of the same key (the one this entry was for was dropped at a
      // Hello): that one has its own entry.
      if (it == pending_pushes_.end() || it->second.due_ms != due_ms) continue;
      PushNotification notification = std::move(it->second.notification);
      pending_pushes_.erase(it);
      if (HeardLately(key.first, now)) continue;
      if (pushes_reading_ >= kMaxPendingPushes) continue;
      due.push_back(std::move(notification));
      if (due.size() == kPushTargetsPerRead) SubmitPushTargets(&due);
    }
    if (!due.empty()) SubmitPushTargets(&due);
  }

  void SubmitPushTargets(std::vector<PushNotification>* due) {
    PushTargetsQuery query;
    for (const PushNotification& n : *due) query.users.push_back(n.user);
    ReadJob job;
    job.token = next_token_++;
    job.query = std::move(query);
    pushes_reading_ += due->size();
    push_reads_.emplace(job.token, std::move(*due));
    due->clear();
    io_->SubmitRead(std::move(job));
  }

  // The store answered a SubmitPushTargets read. If it failed (overload, a store without push
  // tokens) the notifications still go out, without tokens and with a zero badge: a push that
  // wakes the app is worth more than a correct badge.
  void NotifyPushes(uint64_t token, Result<std::vector<PushTarget>> targets) {
    auto it = push_reads_.find(token);
    if (it == push_reads_.end()) return;
    std::vector<PushNotification> notifications = std::move(it->second);
    push_reads_.erase(it);
    pushes_reading_ -= notifications.size();
    const int64_t now = clock_->MonotonicMs();
    for (PushNotification& n : notifications) {
      // Devices that connected while the store was read have synced.
      if (HeardLately(n.user, now)) continue;
      if (targets.ok()) {
        auto target =
            std::lower_bound(targets->begin(), targets->end(), n.user,
                             [](const PushTarget& t, const UserId& user) { return t.user < user; });
        if (target != targets->end() && target->user == n.user) {
          n.tokens = target->tokens;
          n.unread_total = target->unread_total;
        }
      }
      options_.push->Notify(std::move(n));
    }
  }

  // --- Presence ---

  // Subscriptions are checked against the store (who shares a direct conversation or group with
  // the caller) on a reader thread, and answered in AnswerPresenceRead.
  void HandlePresenceSubscribe(SessionId id, Session& s, const v1::Envelope& envelope) {
    std::vector<UserId> users;
    if (Status valid = PresenceUsers(envelope.presence_subscribe().users(), &users); !valid.ok()) {
      SendError(id, s, envelope.rid(), valid);
      return;
    }
    if (Status room = PresenceRoom(id, users); !room.ok()) {
      SendError(id, s, envelope.rid(), room);
      return;
    }
    SubmitRead(id, envelope.rid(), 0, Purpose::kPresenceSubscribe,
               PresenceQuery{.user = s.user(), .targets = std::move(users)});
  }

  void HandlePresenceUnsubscribe(SessionId id, Session& s, const v1::Envelope& envelope) {
    std::vector<UserId> users;
    if (Status valid = PresenceUsers(envelope.presence_unsubscribe().users(), &users);
        !valid.ok()) {
      SendError(id, s, envelope.rid(), valid);
      return;
    }
    for (const UserId& user : users) presence_.Unwatch(id, user);
    // A Subscribe still being checked must not watch them when its read comes back.
    ForEachSubscribeRead(id, [&](PendingRead& read) {
      for (const UserId& user : users) read.still_wanted.erase(user);
    });
    SendOk(id, s, envelope.rid());
  }

  // The request's user ids, checked and without repeats (in request order), in time linear in
  // the list (a frame can hold tens of thousands of short ids).
  static Status PresenceUsers(const google::protobuf::RepeatedPtrField<std::string>& in,
                              std::vector<UserId>* out) {
    std::unordered_set<std::string_view> seen;
    seen.reserve(static_cast<size_t>(in.size()));
    for (const std::string& user : in) {
      if (user.empty() || user.size() > kMaxUserIdBytes) {
        return InvalidArgument("presence user ids must be 1..128 bytes");
      }
      if (seen.insert(user).second) out->push_back(user);
    }
    return Status::Ok();
  }

  // ResourceExhausted if watching `users` too would take the connection past its cap.
  Status PresenceRoom(SessionId id, const std::vector<UserId>& users) const {
    if (presence_.watch_count(id) + presence_.CountNew(id, users) >
        options_.max_presence_subscriptions) {
      return ResourceExhausted("too many presence subscriptions on this connection (max " +
                               std::to_string(options_.max_presence_subscriptions) + ")");
    }
    return Status::Ok();
  }

  void AnswerPresenceRead(const PendingRead& pending, Session& s,
                          const Result<PresenceReply>& reply) {
    const bool subscribe = pending.purpose == Purpose::kPresenceSubscribe;
    if (!reply.ok()) {
      if (subscribe) {
        SendError(pending.session, s, pending.rid, reply.status());
      } else {
        // Without a verdict the safe side is to deliver nothing: the suspended subscriptions
        // are dropped (the client may subscribe again).
        presence_.DropSuspended(pending.session);
      }
      return;
    }
    // What the read found for the users still asked about: a subscribe's minus those the
    // session unsubscribed from meanwhile (a re-check's, all of them).
    std::vector<const PresenceContact*> wanted;
    std::vector<UserId> targets;
    for (const PresenceContact& c : reply->targets) {
      if (subscribe && !pending.still_wanted.contains(c.user)) continue;
      wanted.push_back(&c);
      targets.push_back(c.user);
    }
    // The read may predate a removal the Hub has applied since: ask again if it concerns the
    // watcher or one of the targets.
    std::vector<UserId> concerned = targets;
    concerned.push_back(s.user());
    if (RemovedSince(pending.removals, concerned, 0)) {
      SubmitRead(pending.session, pending.rid, 0, pending.purpose,
                 PresenceQuery{.user = s.user(), .targets = std::move(targets)});
      return;
    }
    if (!subscribe) {
      for (const PresenceContact* c : wanted) {
        presence_.Resolve(pending.session, c->user, c->user == s.user() || c->shares_conversation);
      }
      return;
    }
    for (const PresenceContact* c : wanted) {
      if (c->user != s.user() && !c->shares_conversation) {
        SendError(pending.session, s, pending.rid,
                  PermissionDenied("may not watch the presence of " + c->user +
                                   ": no shared direct conversation or group"));
        return;
      }
    }
    // Other subscribes may have been answered since this one was checked.
    if (Status room = PresenceRoom(pending.session, targets); !room.ok()) {
      SendError(pending.session, s, pending.rid, room);
      return;
    }
    for (const PresenceContact* c : wanted) {
      const PresenceState state =
          presence_.Watch(pending.session, s.user(), c->user, c->last_seen_ms);
      SendPresence(pending.session, c->user, state);
    }
    SendOk(pending.session, s, pending.rid);
  }

  // Records the removal numbered removals_. The records hold at most kRecentRemovals commits and
  // kRecentRemovedUsers users in all, the oldest going first (a read older than every record is
  // read again, so forgetting is safe); a removal naming more users than that forgets them all.
  void RememberRemoval(ConversationId conversation, const std::vector<UserId>& users) {
    if (users.size() > kRecentRemovedUsers) {
      recent_removals_.clear();
      recent_removed_users_ = 0;
      return;
    }
    std::vector<UserId> sorted = users;
    std::sort(sorted.begin(), sorted.end());
    recent_removed_users_ += sorted.size();
    recent_removals_.push_back({removals_, conversation, std::move(sorted)});
    while (recent_removals_.size() > kRecentRemovals ||
           recent_removed_users_ > kRecentRemovedUsers) {
      recent_removed_users_ -= recent_removals_.front().users.size();
      recent_removals_.pop_front();
    }
  }

  // Whether a removal committed after the one numbered `since` (a read's snapshot of removals_)
  // removed one of `users`, from `conversation` if it is not 0. Also true when the records do
  // not reach back that far. Unrelated removals elsewhere do not send a read back to the store,
  // where a busy server's steady removals would otherwise keep it from ever being answered.
  bool RemovedSince(uint64_t since, const std::vector<UserId>& users,
                    ConversationId conversation) const {
    if (since == removals_) return false;
    if (recent_removals_.empty() || recent_removals_.front().number > since + 1) return true;
    for (auto it = recent_removals_.rbegin(); it != recent_removals_.rend() && it->number > since;
         ++it) {
      if (conversation != 0 && it->conversation != conversation) continue;
      for (const UserId& user : users) {
        if (std::binary_search(it->users.begin(), it->users.end(), user)) return true;
      }
    }
    return false;
  }

  // Members were removed: the subscriptions of and on them are suspended and re-checked.
  void RecheckPresence(const std::vector<UserId>& removed) {
    for (auto& [session, targets] : presence_.Suspend(removed)) {
      const Session* s = FindSession(session);
      if (s == nullptr) continue;
      SubmitRead(session, 0, 0, Purpose::kPresenceRecheck,
                 PresenceQuery{.user = s->user(), .targets = std::move(targets)});
    }
  }

  // Keeps this node's live devices fresh in the registry (a device is live while heard from
  // within presence_ttl_ms), then lets the tracker do its timed work.
  void PresenceTick(int64_t now) {
    if (now >= next_presence_refresh_ms_) {
      next_presence_refresh_ms_ = now + presence_.refresh_interval_ms();
      const int64_t ttl = options_.presence_ttl_ms;
      for (const auto& [id, s] : sessions_) {
        if (s.authenticated() && now - s.last_frame_ms < ttl) {
          presence_.DeviceHeard(s.user(), s.device, s.last_frame_ms);
        }
      }
    }
    presence_.Tick();
  }

  // PresenceTracker::Sink.
  void SendPresence(SessionId session, const UserId& user, const PresenceState& state) override {
    Session* s = FindSession(session);
    if (s == nullptr) return;
    v1::Envelope update;
    v1::PresenceUpdate* p = update.mutable_presence_update();
    p->set_user_id(user);
    p->set_online(state.online);
    p->set_devices(state.devices);
    p->set_last_seen_ms(state.last_seen_ms);
    Reply(session, *s, update);
  }

  // Fire and forget: not tracked as a pending append, so shutdown and overload accounting see
  // only client work. A failed write loses one last-seen value, which the next one repairs.
  void PersistLastSeen(std::vector<UserId> users, int64_t wall_ms) override {
    SubmitLastSeen(std::move(users), {}, wall_ms);
  }
  void PersistLastSeenEach(std::vector<UserId> users, std::vector<int64_t> wall_ms) override {
    SubmitLastSeen(std::move(users), std::move(wall_ms), 0);
  }
  // One store write for `users`, at `times_ms` each or, when empty, all at `wall_ms`.
  void SubmitLastSeen(std::vector<UserId> users, std::vector<int64_t> times_ms, int64_t wall_ms) {
    AppendJob job;
    job.token = next_token_++;
    job.request.op = ConversationOp::kLastSeen;
    job.request.users = std::move(users);
    job.request.user_times_ms = std::move(times_ms);
    job.request.server_time_ms = wall_ms;
    io_->SubmitAppend(std::move(job));
  }

  void SendOk(SessionId id, const Session& s, uint64_t rid) {
    v1::Envelope ok;
    ok.set_rid(rid);
    ok.mutable_ok();
    Reply(id, s, ok);
  }

  // `envelope` to `target` (session `s`), encoded at most once per wire format across the calls
  // that share `binary` and `json`.
  void SendShared(SessionId target, const Session& s, const v1::Envelope& envelope,
                  codec::Frame& binary, codec::Frame& json) {
    codec::Frame& frame = s.format == codec::Format::kJson ? json : binary;
    if (!frame) frame = codec::EncodeShared(envelope, s.format);
    io_->Send(target, frame);
  }

  // `envelope` to every connection of `user` but `except`.
  void SendToUser(const UserId& user, const v1::Envelope& envelope, SessionId except) {
    codec::Frame binary;
    codec::Frame json;
    SendToUserShared(user, envelope, except, binary, json);
  }

  // Like SendToUser, encoding at most once per format across calls that share the frames.
  void SendToUserShared(const UserId& user, const v1::Envelope& envelope, SessionId except,
                        codec::Frame& binary, codec::Frame& json) {
    auto it = users_.find(user);
    if (it == users_.end()) return;
    for (SessionId target : it->second) {
      if (target == except) continue;
      Session* s = FindSession(target);
      if (s == nullptr) continue;
      SendShared(target, *s, envelope, binary, json);
    }
  }

  // Delivers a commit's messages: direct conversations and groups to every online device of
  // the recipients the store listed; channels to the connections subscribed to the channel
  // (plus the users a change is about), so an offline or uninterested member costs nothing.
  // Users the change removed are delivered their removal and then unsubscribed.
  void FanOutCommitted(const AppendResult& result, SessionId except) {
    auto fan_out = [&](const Message& message, const std::vector<UserId>& recipients) {
      if (result.kind == ConversationKind::kChannel) {
        FanOutChannel(message, recipients, except);
      } else {
        FanOut(message, recipients, except);
      }
    };
    // The users a change removed get the change itself, their last message there.
    fan_out(result.message, result.recipients);
    if (!result.removed.empty()) {
      ++removals_;
      RememberRemoval(result.message.conversation_id, result.removed);
      RecheckPresence(result.removed);
    }
    for (const UserId& user : result.removed) {
      auto it = users_.find(user);
      if (it == users_.end()) continue;
      for (SessionId session : it->second) Unsubscribe(session, result.message.conversation_id);
    }
    if (result.also.empty()) return;
    // What the change brought after it (an admin promoted when the last one left) is past
    // their removal: it goes to the others only.
    std::vector<UserId> staying;
    staying.reserve(result.recipients.size());
    for (const UserId& user : result.recipients) {
      if (std::find(result.removed.begin(), result.removed.end(), user) == result.removed.end()) {
        staying.push_back(user);
      }
    }
    for (const Message& message : result.also) fan_out(message, staying);
  }

  void FanOutChannel(const Message& message, const std::vector<UserId>& recipients,
                     SessionId except) {
    LocalArena arena;
    v1::Envelope& deliver = *arena.Create<v1::Envelope>();
    codec::ToProto(message, deliver.mutable_deliver()->mutable_message());
    codec::Frame binary;
    codec::Frame json;
    std::unordered_set<SessionId> sent;
    auto send = [&](SessionId target) {
      if (target == except || !sent.insert(target).second) return;
      Session* s = FindSession(target);
      if (s == nullptr) return;
      SendShared(target, *s, deliver, binary, json);
    };
    auto subs = subscribers_.find(message.conversation_id);
    if (subs != subscribers_.end()) {
      for (SessionId target : subs->second) send(target);
    }
    for (const UserId& user : recipients) {
      auto it = users_.find(user);
      if (it == users_.end()) continue;
      for (SessionId target : it->second) send(target);
    }
  }

  // One Deliver, encoded at most once per wire format, to every online device of every
  // recipient except the connection that sent it.
  void FanOut(const Message& message, const std::vector<UserId>& recipients, SessionId sender) {
    LocalArena arena;
    v1::Envelope& deliver = *arena.Create<v1::Envelope>();
    codec::ToProto(message, deliver.mutable_deliver()->mutable_message());
    codec::Frame binary;
    codec::Frame json;
    const bool push = options_.push != nullptr && message.kind == MessageKind::kUser;
    const int64_t now = push ? clock_->MonotonicMs() : 0;
    for (const UserId& user : recipients) {
      bool heard = false;  // a connection of `user` heard from lately (push only)
      if (auto it = users_.find(user); it != users_.end()) {
        for (SessionId target : it->second) {
          if (target == sender) continue;  // the sender is not pushed either
          Session* s = FindSession(target);
          if (s == nullptr) continue;
          heard = heard || (push && HeardLately(*s, now));
          SendShared(target, *s, deliver, binary, json);
        }
      }
      if (push && !heard && user != message.sender) QueuePush(user, message);
    }
  }

  void Reply(SessionId id, const Session& s, const v1::Envelope& envelope) {
    io_->Send(id, codec::EncodeShared(envelope, s.format));
  }

  void SendError(SessionId id, const Session& s, uint64_t rid, const Status& status,
                 std::string_view client_msg_id = {}) {
    v1::Envelope envelope = codec::ErrorEnvelope(rid, status);
    if (!client_msg_id.empty()) {
      envelope.mutable_error()->set_client_msg_id(std::string(client_msg_id));
    }
    Reply(id, s, envelope);
  }

  // Asks the runtime to close and forgets the session at once: it gets no more frames, replies
  // or deliveries, and OnClose will not be called for it.
  void CloseSession(SessionId id, int code, std::string_view reason) {
    Forget(id);
    io_->Close(id, code, reason);
  }

  void Forget(SessionId id) {
    auto it = sessions_.find(id);
    if (it == sessions_.end()) return;
    Session& s = it->second;
    if (s.authenticated()) {
      // A copy: the users_ entry holding the id may go below, before presence is told.
      const UserId user_id = s.user();
      bool device_left = true;
      auto user = users_.find(user_id);
      if (user != users_.end()) {
        user->second.erase(id);
        for (SessionId other : user->second) {
          const Session* o = FindSession(other);
          if (o != nullptr && o->device == s.device) device_left = false;
        }
        if (user->second.empty()) users_.erase(user);
      }
      // From here until it is erased below the session counts as unauthenticated, user "".
      s.user_key = nullptr;
      // Its own subscriptions first, so the session hears nothing about its own departure.
      presence_.ForgetSession(id);
      if (device_left) presence_.DeviceDown(user_id, s.device);
    } else {
      --pending_sessions_;
    }
    typing_.erase(id);
    held_sends_.erase(id);
    auto channels = session_channels_.find(id);
    if (channels != session_channels_.end()) {
      const std::vector<ConversationId> subscribed = channels->second;
      for (ConversationId conversation_id : subscribed) Unsubscribe(id, conversation_id);
    }
    sessions_.erase(it);
  }

  static uint32_t ClampU32(size_t value) {
    return static_cast<uint32_t>(std::min<size_t>(value, UINT32_MAX));
  }

  const ServerOptions options_;
  const uint64_t epoch_;
  HubIo* const io_;
  const std::shared_ptr<Clock> clock_;
  SnowflakeGenerator ids_;
  // Token bucket parameters in thousandths (see kMilli), per millisecond.
  const int64_t message_rate_;
  const int64_t message_cap_;
  const int64_t byte_rate_;
  const int64_t byte_cap_;

  std::unordered_map<SessionId, Session> sessions_;
  // Sessions one of whose Sends the Hub refused for now (rate limit): the client_msg_id it must
  // send again before any later Send is taken, for up to kHeldSendTimeoutMs from the refusal
  // (the writer holds sessions back the same way).
  struct HeldSend {
    std::string client_msg_id;
    int64_t since_ms = 0;
  };
  std::unordered_map<SessionId, HeldSend> held_sends_;
  // Authenticated sessions by user. Node-based on purpose: each Session::user_key points at its
  // entry's key, so entries must never move (no open-addressing map here).
  std::unordered_map<UserId, UserSessions> users_;
  size_t pending_sessions_ = 0;  // sessions without a successful Hello

  // (due ms, session): one live entry per session; stale entries are skipped when popped.
  using Timer = std::pair<int64_t, SessionId>;
  std::priority_queue<Timer, std::vector<Timer>, std::greater<>> timers_;

  // Live channel subscriptions, both ways, bounded by max_channel_subscriptions per session.
  std::unordered_map<ConversationId, std::unordered_set<SessionId>> subscribers_;
  std::unordered_map<SessionId, std::vector<ConversationId>> session_channels_;
  uint64_t removals_ = 0;  // commits that removed members, to spot reads that predate one
  // The latest of those commits (at most kRecentRemovals): number, conversation, users (sorted).
  struct RemovalRecord {
    uint64_t number = 0;
    ConversationId conversation = 0;
    std::vector<UserId> users;
  };
  std::deque<RemovalRecord> recent_removals_;
  size_t recent_removed_users_ = 0;  // users in recent_removals_
  // Per connection: the typing state last forwarded, per conversation (bounded).
  std::unordered_map<SessionId, std::vector<TypingMark>> typing_;

  // Push: open collapse windows, their due times in order, and the notifications whose tokens
  // and badge are being read (by read token; pushes_reading_ counts them).
  using PushKey = std::pair<UserId, ConversationId>;
  struct PendingPush {
    PushNotification notification;
    int64_t due_ms = 0;  // monotonic: when its window ends
  };
  std::map<PushKey, PendingPush> pending_pushes_;
  std::deque<std::pair<int64_t, PushKey>> push_due_;
  std::unordered_map<uint64_t, std::vector<PushNotification>> push_reads_;
  size_t pushes_reading_ = 0;

  uint64_t next_token_ = 1;
  std::unordered_map<uint64_t, PendingAppend> pending_appends_;
  std::unordered_map<uint64_t, PendingRead> pending_reads_;
  // Session -> tokens of its PresenceSubscribe and Subscribe reads in flight (for the
  // Unsubscribes that may overtake them).
  std::unordered_multimap<SessionId, uint64_t> subscribe_reads_;

  // Presence (declared after clock_, which it uses).
  PresenceTracker presence_;
  int64_t next_presence_refresh_ms_ = 0;  // monotonic: next DeviceHeard pass over the sessions
};

Hub::Hub(const ServerOptions& options, uint64_t epoch, HubIo* io)
    : impl_(std::make_unique<Impl>(options, epoch, io)) {}

Hub::~Hub() = default;

bool Hub::OnOpen(SessionId session) { return impl_->OnOpen(session); }

void Hub::OnFrame(SessionId session, std::string_view bytes, bool text) {
  impl_->OnFrame(session, bytes, text);
}

void Hub::OnClose(SessionId session) { impl_->OnClose(session); }

void Hub::OnAppendDone(uint64_t token, const Status& commit_status, AppendResult result) {
  impl_->OnAppendDone(token, commit_status, std::move(result));
}

void Hub::OnReadDone(uint64_t token, ReadResult result) {
  impl_->OnReadDone(token, std::move(result));
}

void Hub::OnMessagesExpired(std::span<const ExpiredRange> expired) {
  impl_->OnMessagesExpired(expired);
}

void Hub::Tick() { impl_->Tick(); }

void Hub::CloseAll() { impl_->CloseAll(); }

size_t Hub::session_count() const { return impl_->session_count(); }

size_t Hub::pending_appends() const { return impl_->pending_appends(); }

}  // namespace chat::server
