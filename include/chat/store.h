// MessageStore: where conversations, messages, members and cursors live.
//
// The server core never touches storage directly: it hands batches of messages to a
// MessageStore and asks it for sync and history pages. The store assigns each message its
// conversation's next `seq` in the same transaction that inserts it, enforces the idempotency
// key (sender, client_msg_id), and checks membership in that transaction, so the check and the
// write cannot race. A store whose Append returns OK has made the batch durable: only then does
// the server ack or deliver anything.
//
// Shipped implementations: NewSqliteStore (the default; one file, WAL) and NewMemoryStore (for
// tests and ephemeral servers). MessageStoreWrapper forwards every call and is the base for
// fault injection and metrics.
//
// Thread-safety: Append is called by one thread at a time (the server's writer thread); the
// read methods (Sync, SyncMany, History, Members, Receipts, Presence, Epoch) may be called
// concurrently with each other and with Append from other threads.
#ifndef CHAT_STORE_H_
#define CHAT_STORE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "chat/export.h"
#include "chat/push.h"
#include "chat/status.h"
#include "chat/types.h"

namespace chat {

// What an AppendRequest does. Every membership or metadata change is committed through the
// same writer as messages, as a system message in the conversation (with its own seq), in the
// same transaction as the change, so clients learn it through the same Deliver/Sync path.
enum class ConversationOp : int {
  kNone = 0,           // a user message (Send)
  kCreateGroup = 1,    // a new group or channel: group_kind, title, users; the sender is admin
  kRename = 2,         // title (admins only)
  kAddMembers = 3,     // users (admins only)
  kRemoveMembers = 4,  // users (admins only)
  kLeave = 5,          // the sender leaves (any member)
  kSetRole = 6,        // users[0] gets `role` (admins only)
  kReceipt = 7,        // the sender device's watermarks; commits no message
  kLastSeen = 8,       // presence: `users` were last seen at server_time_ms; commits no message
  // retention_ms (admins of groups and channels, either member of a direct conversation).
  kSetRetention = 9,
  kPushToken = 10,  // the sender device's push token; commits no message
};

// One message (or conversation change, see `op`) to commit.
struct AppendRequest {
  // Either a conversation id, or (conversation_id == 0) the direct conversation between
  // `sender` and `peer`, created by this append if it does not exist yet.
  ConversationId conversation_id = 0;
  UserId peer;
  UserId sender;
  DeviceId sender_device;
  std::string client_msg_id;   // idempotency key, unique per sender
  MessageId message_id = 0;    // assigned by the caller; used when the message is new
  int64_t server_time_ms = 0;  // assigned by the caller
  MessageKind kind = MessageKind::kUser;
  std::string content_type;
  std::string body;
  std::vector<Attachment> attachments;

  // Conversation changes (op != kNone).
  ConversationOp op = ConversationOp::kNone;
  ConversationKind group_kind = ConversationKind::kUnspecified;  // kCreateGroup
  std::string title;                                             // kCreateGroup, kRename
  std::vector<UserId> users;  // kCreateGroup, k*Members, kSetRole, kLastSeen
  // kLastSeen: when each of `users` was last seen (wall ms, in the same order); empty: all of
  // them at server_time_ms.
  std::vector<int64_t> user_times_ms;
  Role role = Role::kUnspecified;  // kSetRole
  Seq delivered_seq = 0;           // kReceipt
  Seq read_seq = 0;                // kReceipt
  // kReceipt: in a direct conversation, or a group of at most this many current members (0 = any
  // group), the other members are told every move of the sender's watermarks
  // (AppendResult::recipients lists them); in a larger group only news of the lowest watermarks
  // over all members (see AppendResult::all_seq_moved), so that a receipt costs no work per
  // member and a message read by all costs about one update per member, not one per pair.
  uint32_t receipt_update_max_members = 0;
  // kCreateGroup, kAddMembers: member caps (creator included) by the conversation's kind, which
  // only the store knows for an existing conversation; 0 = no cap.
  uint32_t max_group_members = 0;
  uint32_t max_channel_members = 0;
  // kLeave, kRemoveMembers: the message id of the promotion that follows when the last admin
  // goes (see AppendResult::also).
  MessageId spare_message_id = 0;
  // kSetRetention: the conversation's own retention, as MessageStore::SetRetention takes it.
  int64_t retention_ms = 0;
  // kPushToken: the token of (sender, sender_device) and its platform; an empty token removes
  // the device's token. A user keeps at most max_push_tokens devices (the least recently
  // registered go first); 0 = no cap.
  std::string push_platform;
  std::string push_token;
  uint32_t max_push_tokens = 0;
};

// A member's watermarks in a conversation: the highest over the member's devices.
struct MemberReceipt {
  UserId user;
  Role role = Role::kUnspecified;
  Seq delivered_seq = 0;
  Seq read_seq = 0;
};

struct AppendResult {
  // OK, or why this item was refused: PermissionDenied (sender not a member, or the
  // conversation does not exist), InvalidArgument (peer is the sender).
  Status status;
  // The committed message with its seq, or for a duplicate the message committed earlier (only
  // its ids, sender, kind and server time when retention has deleted it since).
  Message message;
  bool duplicate = false;  // (sender, client_msg_id) was committed before
  bool created = false;    // this append created the direct conversation
  // Users to deliver `message` (and `also`) to, sender included, at commit time: every member
  // of a direct conversation or group, plus the users a change removed (they get their own
  // removal message). Channels never list their members: only the actor and the users a change
  // is about; live delivery to everyone else goes to subscribed sessions. kReceipt: the members
  // to tell (see AppendRequest::receipt_update_max_members), empty when nobody else is told; in a
  // channel or after the sender's removal, only the sender.
  std::vector<UserId> recipients;
  ConversationKind kind = ConversationKind::kUnspecified;
  // Conversation changes: further system messages committed after `message` in the same
  // transaction (the promotion of a new admin after the last one left).
  std::vector<Message> also;
  // Users who lost access with this change (removed or left).
  std::vector<UserId> removed;
  // Changes and receipts: the conversation as the sender's device sees it after the commit.
  ConversationInfo conversation;
  // kReceipt: whether the sender's user-wide watermarks moved; the sender's watermarks over all of
  // its devices; the sender's unread count across every conversation; and (direct and groups) the
  // lowest watermarks over all current members (each counted from the seq before its join, see
  // ConversationInfo::delivered_all_seq), and whether they are news to the members: above
  // what they were last told (a receipt, or a member's removal before it, raised them; 0 and 0
  // before anything was told, where every client starts; a store keeps what it told across
  // restarts).
  bool receipt_changed = false;
  MemberReceipt sender_receipt;
  uint64_t unread_total = 0;
  Seq delivered_all_seq = 0;
  Seq read_all_seq = 0;
  bool all_seq_moved = false;
};

struct SyncQuery {
  UserId user;
  DeviceId device;
  std::vector<Cursor> cursors;  // conversations the client knows; others count as seq 0
  uint32_t limit = 500;         // messages in this reply, at most
  uint32_t catchup_max = 1000;  // per conversation; more missing => newest page + Gap
  // The reply's messages stop before they pass about this many bytes (at least one message
  // is carried; has_more is then set); 0 = no bound.
  uint64_t max_bytes = 0;
};

struct SyncReply {
  // Conversations with messages above the client's cursor (new ones included), those whose
  // messages retention deleted from Cursor::lowest_seq up, and those whose lowest watermarks
  // (ConversationInfo::delivered_all_seq, read_all_seq) are above the ones the cursor names, by
  // id. Each one's first_seq is what retention left (see ConversationInfo::first_seq): clients
  // delete their copies below it.
  std::vector<ConversationInfo> conversations;
  // Messages above the cursors in ascending (conversation_id, seq), at most `limit`.
  std::vector<Message> messages;
  // Ranges left out because more than catchup_max were missing (or removed by retention).
  std::vector<Gap> gaps;
  // True when `limit` or `max_bytes` cut the reply: sync again with advanced cursors.
  bool has_more = false;
  // The user's unread messages across all of its conversations.
  uint64_t unread_total = 0;
};

struct HistoryQuery {
  UserId user;
  ConversationId conversation_id = 0;
  Seq before_seq = 0;  // exclusive; 0 = from the newest
  uint32_t limit = 50;
  // The page stops before its messages pass about this many bytes (at least one message is
  // carried); 0 = no bound.
  uint64_t max_bytes = 0;
};

struct HistoryReply {
  std::vector<Message> messages;  // newest first
  bool has_more = false;          // older messages exist
  // Where the user's readable log starts: the conversation's first_seq raised to the seq that
  // added the user, 0 when nothing readable is stored (a removed user's: nothing up to its
  // removal). Not what retention left: clients do not delete their copies on it.
  Seq first_seq = 0;
};

// Who has read what in one conversation, and the asking user's standing in it.
struct ReceiptsQuery {
  UserId user;
  ConversationId conversation_id = 0;
};

struct ReceiptsReply {
  ConversationKind kind = ConversationKind::kUnspecified;
  Role role = Role::kUnspecified;  // the asking user's role
  // Current members by user id. A channel lists only the asking user: its members' cursors are
  // private, and listing 100k members would be no answer.
  std::vector<MemberReceipt> members;
};

// --- Presence ---
// Last seen is written through Append (ConversationOp::kLastSeen: `users` were online at
// `server_time_ms`, or each at its entry of `user_times_ms`, wall clock; a store keeps the latest
// value per user and ignores older ones; `sender` is not needed) and read with
// MessageStore::Presence.

// Whether `user` may see each target's presence, and the targets' last seen.
struct PresenceQuery {
  UserId user;
  std::vector<UserId> targets;
};

struct PresenceContact {
  UserId user;
  // The asking user and this one are both current members of at least one direct conversation
  // or group. Channels do not count: a broadcast audience must not expose presence.
  bool shares_conversation = false;
  int64_t last_seen_ms = 0;  // persisted last seen (Unix ms); 0 = never seen
};

struct PresenceReply {
  std::vector<PresenceContact> targets;  // one per query target, in query order
};

// One bounded retention pass; see MessageStore::DeleteExpired.
struct SweepRequest {
  int64_t now_ms = 0;                // wall clock, milliseconds since the Unix epoch
  int64_t default_retention_ms = 0;  // for conversations without their own; 0 = keep forever
  uint32_t max_messages = 1000;      // deleted in this call (one transaction), at most; >= 1
  // A deleted message's idempotency key (sender, client_msg_id) is kept this long after the
  // deletion, so a device that resends the message (its ack was lost, then it stayed offline
  // past the retention) is answered with the original's seq as a duplicate instead of storing
  // it again. 0: the key goes with its message. Default 7 days.
  int64_t resend_window_ms = 7LL * 24 * 60 * 60 * 1000;
};

// One conversation whose oldest messages a retention pass deleted.
struct ExpiredRange {
  ConversationId conversation_id = 0;
  ConversationKind kind = ConversationKind::kUnspecified;
  Seq first_seq = 0;  // the lowest seq still stored after the pass; 0 when none is
  // The highest seq the pass deleted: every seq up to it is gone (first_seq - 1 when first_seq
  // is not 0; else the conversation's last seq when the pass ran).
  Seq up_to_seq = 0;
  // Who is told, as AppendResult::recipients: every current member of a direct conversation or
  // group, at the pass's commit. Channels never list their members (they are told through the
  // connections subscribed to them); removed members are never listed.
  std::vector<UserId> recipients;
};

struct SweepResult {
  uint64_t deleted = 0;       // messages deleted by this call
  uint64_t keys_dropped = 0;  // keys of deleted messages dropped, their resend window over
  bool has_more = false;      // the bound cut the pass: expired messages or keys (may) remain
  // One entry per conversation the pass deleted messages of, by ascending id: at most
  // max_messages entries (each deleted at least one message).
  std::vector<ExpiredRange> expired;
};

// What a push notification needs to know about one user; see MessageStore::PushTargets.
struct PushTarget {
  UserId user;
  std::vector<PushToken> tokens;  // the user's registered devices, by device id
  uint64_t unread_total = 0;      // unread messages across the user's conversations (the badge)
};

class CHAT_EXPORT MessageStore {
 public:
  MessageStore() = default;
  MessageStore(const MessageStore&) = delete;
  MessageStore& operator=(const MessageStore&) = delete;
  virtual ~MessageStore() = default;

  // Identifies the data set: a random value chosen when the store was created. A client that
  // sees a different epoch knows its cache describes another store and rebuilds it.
  virtual uint64_t Epoch() const = 0;

  // Commits `batch` in one transaction. Items refused on their own (see AppendResult::status)
  // do not abort the others. `results` receives one entry per item, in order.
  // Returns non-OK if the transaction failed: then nothing of the batch is stored and every
  // item must be reported to its sender as failed.
  virtual Status Append(std::span<const AppendRequest> batch,
                        std::vector<AppendResult>* results) = 0;

  // Messages the user's device is missing. Never returns conversations the user is not in.
  // Each ConversationInfo in the reply (and in AppendResult::conversation) carries first_seq as
  // the lowest seq still stored. A store reports first_seq 0 with a non-zero last_seq only when
  // every message up to last_seq is deleted, since clients then drop their cached copies of all
  // of them.
  virtual Result<SyncReply> Sync(const SyncQuery& query) = 0;

  // A page of a conversation, newest first. PermissionDenied if the user is not a member or
  // the conversation does not exist (the two are not distinguished, so nothing leaks).
  virtual Result<HistoryReply> History(const HistoryQuery& query) = 0;

  // Current members of a conversation. NotFound if it does not exist.
  virtual Result<std::vector<UserId>> Members(ConversationId conversation_id) = 0;

  // The members' watermarks and the user's standing. PermissionDenied unless the user is a
  // current member (a missing conversation looks the same).
  virtual Result<ReceiptsReply> Receipts(const ReceiptsQuery& query) = 0;

  // Presence: who of query.targets shares a direct conversation or group with query.user, and
  // their last seen (see PresenceReply). A target that shares nothing is reported with
  // shares_conversation false, never as an error. The default implementation returns
  // FailedPrecondition (not supported by this store).
  virtual Result<PresenceReply> Presence(const PresenceQuery& query);

  // Retention: deletes, in one transaction, at most request.max_messages expired messages. A
  // message is expired when its server time is older than now_ms minus its conversation's
  // retention_ms (or default_retention_ms when the conversation has none). Only the oldest run
  // of a conversation is deleted, so what stays is always the contiguous range
  // [first_seq, last_seq]; first_seq advances (0 once nothing is stored), last_seq never moves,
  // and Sync reports the deleted range as a Gap. A deleted message's idempotency key stays for
  // request.resend_window_ms: a resend of it within that time is acknowledged as a duplicate
  // with the original's conversation, seq, message_id and server time (Append's result holds
  // them, without body). Keys whose window is over are dropped by the same calls, and count
  // with the messages toward max_messages. SweepResult::expired names each conversation whose
  // messages the call deleted, with its new first_seq and the members to tell (the server sends
  // their online devices a MessagesExpired notice). Called by one thread at a time, like Append.
  // InvalidArgument if max_messages is 0 or default_retention_ms or resend_window_ms is
  // negative. The default
  // implementation returns FailedPrecondition (not supported by this store).
  virtual Result<SweepResult> DeleteExpired(const SweepRequest& request);

  // Sets a conversation's own retention in milliseconds: 0 follows the server-wide default, -1
  // keeps the conversation's messages forever even when a default is set, a positive value is
  // the conversation's time to live. This is the embedding application's way in; a client's
  // SetRetention request is an Append with ConversationOp::kSetRetention, which also records the
  // change as a system message. NotFound if the conversation does not exist; InvalidArgument for
  // a value below -1. The default implementation returns FailedPrecondition (not supported).
  virtual Status SetRetention(ConversationId conversation_id, int64_t retention_ms);

  // ---- Push tokens ----
  //
  // A device's push token is written by Append with ConversationOp::kPushToken, so it is
  // committed by the writer like every other change and survives a restart of a persistent
  // store. Tokens are keyed by (user, device): a new token replaces the device's previous one,
  // an empty token removes it.

  // For each distinct user of `users`, in ascending order: the registered tokens and the
  // unread total (as Sync reports it), read in one snapshot. A user with no tokens and no
  // conversations still gets an entry. The default implementation returns FailedPrecondition.
  virtual Result<std::vector<PushTarget>> PushTargets(std::span<const UserId> users);

  // Several Syncs answered from one snapshot, each message range that more than one of them
  // wants read from storage once (members of a conversation catching up from the same or
  // nearby cursors, as after a restart). `done(i, reply)` is called exactly once per query, in
  // order, on the calling thread and before SyncMany returns, with what Sync(queries[i]) would
  // return at that snapshot; it must not call the store. A failure is that query's own, unless
  // it ended the snapshot (a storage error after which the read transaction is gone): then it
  // answers the remaining queries too. The runtime passes the Syncs that wait for a reader at
  // the same time. The default calls Sync for each query.
  using SyncDone = std::function<void(size_t index, Result<SyncReply> reply)>;
  virtual void SyncMany(std::span<const SyncQuery> queries, const SyncDone& done);
};

// Forwards every call to `target`; override what a test or a metric needs. SyncMany is not
// forwarded: the default calls this wrapper's Sync for each query, so an overridden Sync sees
// every query (the target's merging is lost; a wrapper that wants it overrides SyncMany).
class CHAT_EXPORT MessageStoreWrapper : public MessageStore {
 public:
  explicit MessageStoreWrapper(std::shared_ptr<MessageStore> target) : target_(std::move(target)) {}
  uint64_t Epoch() const override { return target_->Epoch(); }
  Status Append(std::span<const AppendRequest> batch, std::vector<AppendResult>* results) override {
    return target_->Append(batch, results);
  }
  Result<SyncReply> Sync(const SyncQuery& query) override { return target_->Sync(query); }
  Result<HistoryReply> History(const HistoryQuery& query) override {
    return target_->History(query);
  }
  Result<std::vector<UserId>> Members(ConversationId conversation_id) override {
    return target_->Members(conversation_id);
  }
  Result<ReceiptsReply> Receipts(const ReceiptsQuery& query) override {
    return target_->Receipts(query);
  }
  Result<PresenceReply> Presence(const PresenceQuery& query) override {
    return target_->Presence(query);
  }
  Result<SweepResult> DeleteExpired(const SweepRequest& request) override {
    return target_->DeleteExpired(request);
  }
  Status SetRetention(ConversationId conversation_id, int64_t retention_ms) override {
    return target_->SetRetention(conversation_id, retention_ms);
  }
  Result<std::vector<PushTarget>> PushTargets(std::span<const UserId> users) override {
    return target_->PushTargets(users);
  }

 protected:
  MessageStore& target() { return *target_; }

 private:
  std::shared_ptr<MessageStore> target_;
};

struct SqliteStoreOptions {
  std::string path;  // database file; created if missing
  // true: synchronous=FULL (an acked message survives power loss). false: NORMAL (survives a
  // crash of the process, may lose the last commits on power loss). Default true.
  bool synchronous_full = true;
  uint32_t reader_connections = 2;  // read-only connections for concurrent Sync/History
  uint32_t busy_timeout_ms = 5000;
  // SQLite's page cache of each reader connection, in KiB, allocated only as pages are read.
  // Default 2000, SQLite's own default: a History page reads a handful of pages, and the
  // kernel's page cache, not this one, keeps a large file fast.
  uint32_t cache_size_kib = 2000;
  // The writer connection's page cache, in KiB, allocated only as pages are read. New messages
  // go to the end of the message log and of the idempotency keys, and the merge writes the
  // newest leaf of each conversation it copies; pages that do not fit are read again (pread)
  // for every commit that touches them. Default 16 MiB.
  uint32_t writer_cache_size_kib = 16 * 1024;
  // How much of the file each connection reads through a shared memory map instead of read(2)
  // into its page cache, in bytes; 0 (the default) maps nothing. Mapped pages are the kernel's
  // page cache, shared by all connections and counted once, not per connection. SQLite caps the
  // value at its compile-time limit (2 GiB in Debian's build). An I/O error on a mapped page
  // kills the process with SIGBUS instead of returning an error, hence off by default.
  uint64_t mmap_size_bytes = 0;
  // New messages are stored in the order they arrive, in a log that grows at one end, and moved
  // into the conversation-ordered table in bulk: once the log holds this many messages (or 32 MiB
  // of bodies, attachments and ids plus 128 bytes per message, so at most about 260,000), the
  // writer switches to a second log and copies the first into the table, in slices of at most
  // recent_log_slice_rows messages, twice as many per commit as the commit added, inside that
  // commit. A conversation's new messages are so written into its pages together instead of
  // one commit at a time. Bodies over 4 KiB go straight into the table. Readers see both logs and
  // the table as one. 0 stores every message straight into the conversation-ordered table (and
  // empties logs left from before). Default 16,384; at most 1,000,000.
  uint32_t recent_log_rows = 16'384;
  // Messages copied from a log into the table per step (see recent_log_rows); a commit waits
  // for its steps. Default 256; 1 to 1,000,000.
  uint32_t recent_log_slice_rows = 256;
};

// Opens (creating and migrating as needed) a SQLite store. InvalidArgument for an empty path or
// one where SQLite cannot use WAL mode (":memory:"); Unavailable if the file cannot be opened;
// DataLoss if the schema is newer than this build. The store starts one thread of its own (all
// signals blocked) that copies the WAL back into the database file once it holds 4,000 pages, so no
// commit waits for the copy (commits pause only while it copies the last few pages, so the WAL can
// start over); past 16,000 pages the committing thread checkpoints itself. The file must not be
// written by another process while the store is open: the writer keeps last seqs and members in
// memory.
CHAT_EXPORT Result<std::shared_ptr<MessageStore>> NewSqliteStore(SqliteStoreOptions options);

// A store that keeps everything in memory and forgets it on destruction.
CHAT_EXPORT std::shared_ptr<MessageStore> NewMemoryStore();

}  // namespace chat

#endif  // CHAT_STORE_H_
