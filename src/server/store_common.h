// The MessageStore semantics shared by every implementation: how an append is validated,
// deduplicated, routed and sequenced, and how sync and history pages are cut.
//
// Each store (memory, SQLite) only provides primitive reads and writes through AppendTarget
// and ReadSource; the rules live here once, so the stores cannot drift apart and one
// conformance suite checks them all.
//
// Thread-safety: the functions are stateless; they use the target or source only from the
// calling thread, and the caller provides whatever isolation (transaction, lock) the store
// needs around a call.
#ifndef CHAT_SRC_SERVER_STORE_COMMON_H_
#define CHAT_SRC_SERVER_STORE_COMMON_H_

#include <cstddef>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "chat/status.h"
#include "chat/store.h"
#include "chat/types.h"

namespace chat::server {

// bytes; the longest group title the stores accept. The longest user id (peers, members,
// presence) is chat::kMaxUserIdBytes.
inline constexpr size_t kMaxTitleBytes = 256;

// A user's standing in a conversation.
struct Membership {
  bool exists = false;  // the conversation exists
  ConversationKind kind = ConversationKind::kUnspecified;
  Role role = Role::kUnspecified;  // kUnspecified: never a member
  Seq joined_seq = 0;              // the seq of the change that (last) added the user
  Seq removed_at_seq = 0;          // non-zero: removed (or left) at this seq
};

// What a request needs of its user.
enum class Access {
  kRead,    // read history: current members, and removed members up to their removal
  kMember,  // send, receipts, typing, subscribe, members' receipts, leave
  kAdmin,   // rename, add and remove members, change roles
};

// THE authorization rule: every request that reads or changes conversation data is decided here.
// A missing conversation and one the user never belonged to give the same PermissionDenied, so
// nothing leaks.
Status Authorize(ConversationId conversation_id, const Membership& membership, Access access);

// The lowest watermarks over a conversation's current members, each member's being the highest
// over its devices and at least the seq before its join (CountedFromJoin).
struct LowestMarks {
  Seq delivered_seq = 0;
  Seq read_seq = 0;
  bool operator==(const LowestMarks&) const = default;
};

// What one user's move did to them.
struct LowestMove {
  LowestMarks after;  // the lowest marks now
  // The members are to be told `after`: it rose above what they were told last (0 and 0 before
  // anything was told, which is what every client starts from). Clients keep the highest they
  // heard, so a fall is no news.
  bool news = false;
};

// `told` raised to `now` where `now` is above it; whether it was.
bool RaiseTold(LowestMarks& told, const LowestMarks& now);

// A current member's marks as the lowest marks count them: each at least the seq before
// `joined_seq`, the change that added the member, since what came before was never the
// member's to get or read. A member added later then starts at or above the lowest marks (they
// cannot pass the last seq before its join), so they never fall and what the members were told
// stands: the sender's earlier messages stay read, and its later ones wait for the new member.
MemberReceipt CountedFromJoin(MemberReceipt marks, Seq joined_seq);

// The lowest marks and how many current members hold each.
struct LowestCount {
  LowestMarks marks;
  uint64_t at_delivered = 0;
  uint64_t at_read = 0;
};

// Counts the lowest marks over `members` (Watermarks of the current members, each counted from
// its join by CountedFromJoin), with `mover`'s taken as `mover_marks` whatever the list says. An
// empty list counts nobody, the marks left at the highest Seq.
LowestCount CountLowest(std::span<const MemberReceipt> members, const UserId& mover,
                        const MemberReceipt& mover_marks);

// The head of one conversation, as the sync and history algorithms need it.
struct ConversationHead {
  ConversationId conversation_id = 0;
  Seq last_seq = 0;
  Seq first_seq = 0;       // lowest stored seq, 0 when none is stored
  Seq joined_seq = 0;      // see Membership (UserConversations only)
  Seq removed_at_seq = 0;  // see Membership (UserConversations only)
};

class ReadSource;

// The user's unread count over all of its conversations (Describe's, summed). `known`, if given,
// is one of them described already: its count is not read again.
Result<uint64_t> UnreadTotal(ReadSource& source, const UserId& user, const DeviceId& device,
                             const ConversationInfo* known = nullptr);
// The same over `heads`, the user's conversations as UserConversations read them.
Result<uint64_t> UnreadTotal(ReadSource& source, const UserId& user, const DeviceId& device,
                             std::span<const ConversationHead> heads,
                             const ConversationInfo* known);

// A member's watermarks (the highest over its devices) and one device's delivered mark.
struct DeviceMarks {
  MemberReceipt user;
  Seq device_delivered_seq = 0;
};

// Read primitives of a store, called inside one consistent snapshot.
class ReadSource {
 public:
  virtual ~ReadSource() = default;
  // Heads of the conversations `user` is or was a member of, ascending by id, with the user's
  // joined_seq and removed_at_seq.
  virtual Status UserConversations(const UserId& user, std::vector<ConversationHead>* out) = 0;
  virtual Result<Membership> GetMembership(ConversationId conversation_id, const UserId& user) = 0;
  // The raw head (joined/removed left 0). REQUIRES: the conversation exists.
  virtual Result<ConversationHead> Head(ConversationId conversation_id) = 0;
  // The conversation as `user` on `device` sees it (ConversationInfo documents the fields): a
  // removed user sees last_seq capped at its removal; unread counts the user messages of others
  // that the user may see above both its read watermark and its own last user message (a few
  // lookups in SQLite, a walk over them in memory); with `count_unread` false it is left 0.
  // first_seq is the lowest stored seq, 0 only when none is up to last_seq (as capped): clients
  // drop their copies below it, all of them when it is 0.
  // REQUIRES: `user` is or was a member.
  virtual Result<ConversationInfo> Describe(ConversationId conversation_id, const UserId& user,
                                            const DeviceId& device, bool count_unread = true) = 0;
  // Appends to `out` the messages with from_seq <= seq <= to_seq, ascending, at most `max`.
  virtual Status ReadAscending(ConversationId conversation_id, Seq from_seq, Seq to_seq, size_t max,
                               std::vector<Message>* out) = 0;
  // Appends to `out` the messages with seq < before_seq, descending, at most `max`.
  virtual Status ReadDescending(ConversationId conversation_id, Seq before_seq, size_t max,
                                std::vector<Message>* out) = 0;
  // Watermarks of the current members, ascending by user id; or, when `only` is non-empty, of
  // that member alone, also after its removal.
  virtual Status Watermarks(ConversationId conversation_id, const UserId& only,
                            std::vector<MemberReceipt>* out) = 0;
  // The user's unread count over all of its conversations: the sum of Describe's `unread`,
  // which no device changes. The default sums Describe over UserConversations (UnreadTotal); a
  // store may count it without describing each conversation.
  virtual Result<uint64_t> CountUnread(const UserId& user);
  // Where a receipt from `device` starts: `user`'s watermarks (Watermarks for `only`) and the
  // delivered mark of `device` itself (0 without a cursor); std::nullopt when the user has no
  // member row. The default reads them through Watermarks and Describe.
  virtual Result<std::optional<DeviceMarks>> ReceiptStart(ConversationId conversation_id,
                                                          const UserId& user,
                                                          const DeviceId& device);

  // --- Presence ---
  // Whether `a` and `b` are both current members of a direct conversation or group.
  virtual Result<bool> SharesConversation(const UserId& a, const UserId& b) = 0;
  // The user's persisted last seen (Unix ms), 0 when never written.
  virtual Result<int64_t> LastSeen(const UserId& user) = 0;
  // Appends to `out` the push tokens registered for `user`, ascending by device id.
  virtual Status PushTokens(const UserId& user, std::vector<PushToken>* out) = 0;
};

// Write primitives of a store, called inside the store's batch transaction. A non-OK Status
// from any of them aborts the whole batch.
class AppendTarget {
 public:
  virtual ~AppendTarget() = default;
  // Reads inside the same transaction (they see the batch's own writes).
  virtual ReadSource& Reader() = 0;
  // The message `sender` committed earlier with `client_msg_id` (non-empty), if any; when
  // retention deleted it within the resend window, what its key kept (ids, sender, kind, time).
  virtual Result<std::optional<Message>> FindByKey(const UserId& sender,
                                                   const std::string& client_msg_id) = 0;
  // The direct conversation between `low` and `high` (low < high), or 0.
  virtual Result<ConversationId> FindDirect(const UserId& low, const UserId& high) = 0;
  // Creates the direct conversation between `low` and `high` (low < high) with both as
  // members (role member, joined at seq 0) and returns its id.
  virtual Result<ConversationId> CreateDirect(const UserId& low, const UserId& high,
                                              int64_t now_ms) = 0;
  // Creates an empty group or channel and returns its id.
  virtual Result<ConversationId> CreateGroup(ConversationKind kind, const std::string& title,
                                             int64_t now_ms) = 0;
  virtual Status SetTitle(ConversationId conversation_id, const std::string& title) = 0;
  // Makes `user` a current member with `role`, joined at `joined_seq` (a removed member is
  // re-added: its removal is cleared).
  virtual Status PutMember(ConversationId conversation_id, const UserId& user, Role role,
                           Seq joined_seq) = 0;
  // REQUIRES: `user` is a current member.
  virtual Status SetRole(ConversationId conversation_id, const UserId& user, Role role) = 0;
  // Marks a current member removed at `seq`; the row stays for its capped reads.
  virtual Status RemoveMember(ConversationId conversation_id, const UserId& user, Seq seq) = 0;
  // Number of current members.
  virtual Result<uint64_t> MemberCount(ConversationId conversation_id) = 0;
  // Stores the watermarks of one device.
  virtual Status PutCursor(ConversationId conversation_id, const UserId& user,
                           const DeviceId& device, Seq delivered_seq, Seq read_seq) = 0;
  // The user's unread count over all of its conversations, `known` (one of them, described in
  // this transaction after its change) counted as it says. A store may keep counts between
  // calls.
  virtual Result<uint64_t> UserUnreadTotal(const UserId& user, const DeviceId& device,
                                           const ConversationInfo& known) {
    return UnreadTotal(Reader(), user, device, &known);
  }
  // The lowest marks of a direct conversation or group after `user`'s own marks (the highest
  // over its devices, counted from its join by CountedFromJoin, as the store counts every
  // member's) moved from `before` to `after`, the move already stored with PutCursor,
  // and whether they are news to the members (see LowestMove; the caller tells them). A store may
  // keep the lowest marks between calls, so that a receipt costs no work per member while others
  // remain at the lowest.
  // REQUIRES: `user` is a current member; no cursor changes but through PutCursor.
  virtual Result<LowestMove> MoveLowest(ConversationId conversation_id, const UserId& user,
                                        const MemberReceipt& before,
                                        const MemberReceipt& after) = 0;
  // The conversation's highest committed seq (0 when it has no messages).
  // REQUIRES: the conversation exists.
  virtual Result<Seq> LastSeq(ConversationId conversation_id) = 0;
  // Stores `message` (its seq is LastSeq + 1) and advances the conversation's last_seq,
  // first_seq and last_activity_ms. AlreadyExists, storing nothing, when its sender already
  // stored a message with its (non-empty) client_msg_id.
  virtual Status Insert(const Message& message) = 0;
  // Current members, ascending.
  virtual Result<std::vector<UserId>> Members(ConversationId conversation_id) = 0;
  // Presence: stores max(stored, last_seen_ms) as the user's last seen.
  virtual Status PutLastSeen(const UserId& user, int64_t last_seen_ms) = 0;
  // Stores a conversation's own retention (see MessageStore::SetRetention).
  // REQUIRES: the conversation exists and retention_ms passed CheckRetention.
  virtual Status SetConversationRetention(ConversationId conversation_id, int64_t retention_ms) = 0;
  // Stores (user, device)'s token, replacing the previous one, stamped `now_ms`; then, when
  // `max_devices` is non-zero, removes the user's least recently stamped tokens past it.
  virtual Status PutPushToken(const UserId& user, const DeviceId& device,
                              const std::string& platform, const std::string& token, int64_t now_ms,
                              uint32_t max_devices) = 0;
  // Removes (user, device)'s token, if any.
  virtual Status DeletePushToken(const UserId& user, const DeviceId& device) = 0;
};

// Applies one AppendRequest. Per-item refusals (InvalidArgument, PermissionDenied) go to
// result->status and the function returns OK; a non-OK return is a storage failure and the
// caller must roll the batch back.
Status AppendOne(AppendTarget& target, const AppendRequest& request, AppendResult* result);

// MessageStore::Sync over `source`.
Result<SyncReply> RunSync(ReadSource& source, const SyncQuery& query);

// MessageStore::SyncMany over `source`, which must stay one snapshot throughout: RunSync for
// each query, with every message range read through a memo shared by the queries, so a range
// (or a later part of one) is copied from an earlier query's read when that read holds every
// message asked for, not read again. A failing query fails on its own, as with Sync, unless
// `snapshot_lost` (when given) says the failure ended the snapshot: then the remaining queries
// get that failure too, rather than replies read from other moments.
// The memo keeps at most kMergedReadBytesMax of messages; past that, ranges are read as usual.
// Returns how many range reads were answered from the memo.
inline constexpr size_t kMergedReadBytesMax = 16 * 1024 * 1024;
size_t RunSyncMany(ReadSource& source, std::span<const SyncQuery> queries,
                   const MessageStore::SyncDone& done,
                   const std::function<bool()>& snapshot_lost = nullptr);

// MessageStore::History over `source`.
Result<HistoryReply> RunHistory(ReadSource& source, const HistoryQuery& query);

// MessageStore::Receipts over `source`.
Result<ReceiptsReply> RunReceipts(ReadSource& source, const ReceiptsQuery& query);

// MessageStore::Presence over `source`.
Result<PresenceReply> RunPresence(ReadSource& source, const PresenceQuery& query);

// InvalidArgument unless `request` is a valid MessageStore::DeleteExpired request.
Status ValidateSweep(const SweepRequest& request);

// What FindByKey answers for a user message that retention deleted while its key stayed (see
// SweepRequest::resend_window_ms): the ids and time a resend's acknowledgement names, no body.
Message DeletedMessage(ConversationId conversation_id, Seq seq, MessageId message_id,
                       const UserId& sender, const std::string& client_msg_id,
                       int64_t server_time_ms);

// When a key of a message deleted at `now_ms` is dropped: the time stored with it (never 0,
// which marks a key whose message is stored).
inline int64_t KeyGoneMs(int64_t now_ms) { return now_ms > 0 ? now_ms : 1; }

// A conversation's own retention that keeps its messages whatever the server default says.
inline constexpr int64_t kKeepForever = -1;

// InvalidArgument unless `retention_ms` is a conversation retention: -1, 0 or positive.
Status CheckRetention(int64_t retention_ms);

// The retention in force for a conversation: its own when set (kKeepForever: none), else the
// default; 0 = keep.
inline int64_t EffectiveRetention(int64_t own_ms, int64_t default_ms) {
  if (own_ms == kKeepForever) return 0;
  return own_ms > 0 ? own_ms : default_ms;
}

// MessageStore::PushTargets over `source`.
Result<std::vector<PushTarget>> RunPushTargets(ReadSource& source, std::span<const UserId> users);

// The message every store uses for a refused membership check, so a missing conversation and
// a foreign one look the same.
Status NotAMember(ConversationId conversation_id);

}  // namespace chat::server

#endif  // CHAT_SRC_SERVER_STORE_COMMON_H_
