// Cache: the client's local SQLite store of conversations, messages, the server epoch and the
// outbox.
//
// The cache is what the application sees between connections: Conversations() and History()
// read from it, and the outbox in it survives Close(), reconnects and kill -9 of the process
// (every write is committed before the call returns; WAL, synchronous=NORMAL, so a process crash
// loses nothing and only a power loss may lose the last transactions). The file is locked
// exclusively while the Cache is open: one client per cache file.
//
// Each conversation row carries `cursor`: the highest seq the application has been given with
// nothing missing below it (seqs covered by a server Gap count as given). It is both the Sync
// cursor and the watermark of exactly-once delivery to the application.
//
// Thread-safety: every method is safe from any thread (one mutex). A Transaction holds the mutex
// for its lifetime, so a group of writes is atomic and isolated from other threads.
#ifndef CHAT_SRC_CLIENT_CACHE_H_
#define CHAT_SRC_CLIENT_CACHE_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "chat/client.h"
#include "chat/status.h"
#include "chat/types.h"
#include "chat/v1/chat.pb.h"

namespace chat::client {

struct OutboxEntry {
  int64_t id = 0;  // insertion order
  std::string client_msg_id;
  ConversationId conversation_id = 0;  // 0 when addressed to `peer`
  UserId peer;
  std::string content_type;
  std::string body;
  int64_t created_ms = 0;                          // wall clock
  MessageStatus status = MessageStatus::kPending;  // kPending or kFailed
  Status reason;                                   // kFailed
};

// How an outbox entry of `user`'s device `device` is shown to the application.
MessageEvent OutboxMessageEvent(const OutboxEntry& entry, const UserId& user,
                                const DeviceId& device);

struct ConversationRow {
  // info.delivered_all_seq and info.read_all_seq (this user's messages up to them are delivered
  // to / read by every member) come from ReceiptUpdates and conversation states, and only move
  // forward; they are kept in columns of their own.
  ConversationInfo info;
  Seq cursor = 0;  // see the file comment
  // This user's watermarks here (info.delivered_seq, info.read_seq) moved and the server has not
  // confirmed them yet: a Receipt is owed, also after a restart. Set in the write that moves
  // them; cleared once the server's watermarks are at least these, once it answered a Receipt
  // that carried these (it caps watermarks at what it has: a lower answer is all it takes), or
  // once it refused them for good.
  bool receipt_due = false;
  // Every seq up to this one was deleted by the server's retention, as far as this client was
  // told (a MessagesExpired notice or a conversation state). It only goes up (PutConversation
  // keeps the higher of the stored and the given value) and seqs are never reused, so nothing at
  // or below it is stored again, reported or served: a reply the server read before its sweep
  // may still carry such messages.
  Seq expired_through = 0;
};

// The most conversations whose unread count told but not stored Cache::KeepUnread keeps.
inline constexpr size_t kMaxKeptUnread = 1'024;

class Cache {
 public:
  // `path` "" opens an in-memory database. Unavailable if the file cannot be opened,
  // DataLoss if it is not a database or is another program's (a cache is marked with SQLite's
  // application_id; an unmarked file is taken only if it is empty or holds nothing but a
  // cache's tables at a known version). Another program's file is left unchanged.
  static Result<std::unique_ptr<Cache>> Open(const std::string& path);
  ~Cache();
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;

  // Closes the database and releases the file for another client; every later call fails
  // (Unavailable) or finds nothing.
  void Close();

  // The connection and its kept statements (cache.cc).
  class Db;

  // Groups writes into one SQLite transaction; commits in Commit() or rolls back when
  // destroyed uncommitted.
  class Transaction {
   public:
    explicit Transaction(Cache* cache);
    ~Transaction();
    Transaction(const Transaction&) = delete;
    Transaction& operator=(const Transaction&) = delete;
    Status Commit();
    // False if BEGIN failed: writes made now would commit one by one.
    bool active() const { return active_; }

   private:
    Cache* cache_;
    std::unique_lock<std::recursive_mutex> lock_;
    std::optional<size_t> pending_before_;  // restored by a rollback
    bool active_ = false;
  };

  // --- Server identity ---
  uint64_t Epoch();
  std::string UserId();
  Status SetIdentity(uint64_t epoch, const std::string& user_id);
  // Forgets every conversation and message (the server's store was replaced, or another user
  // signed in) and records the new identity; keeps the outbox's pending and failed messages.
  // REQUIRES: an active Transaction, which also holds the rest of the rebuild (the outbox
  // messages failed for it): committed together, a crash or a failure leaves the old identity,
  // so the next Welcome rebuilds again. FailedPrecondition outside a transaction.
  Status ResetForEpoch(uint64_t epoch, const std::string& user_id);

  // --- Conversations ---
  std::optional<ConversationRow> GetConversation(ConversationId id);
  Status PutConversation(const ConversationRow& row);
  // Most recently active first, as stored.
  std::vector<ConversationRow> ListConversations();
  // The cached conversations as the application was told them (Client::Conversations()), most
  // recently active first: the stored rows, with the read watermarks and counts kept by
  // KeepUnread in place of the stored ones.
  std::vector<ConversationInfo> ListConversationInfos();
  // The conversations whose row has receipt_due set, by id.
  std::vector<ConversationId> ReceiptsDue();
  // The sum of the unread counts ListConversationInfos() lists.
  uint64_t UnreadTotal();
  // `unread`, with the read watermark `read_seq`, was told to the application for
  // `conversation` (a read on another device), but the cache could not write its row:
  // ListConversationInfos() and UnreadTotal() give it instead of the stored count until a write
  // of the row is committed, the cache is reset for a new epoch, or it is closed. Only for a
  // conversation the cache holds a row of: one it has none of is neither listed nor counted, and
  // nothing is kept of it. At most kMaxKeptUnread conversations; past it the oldest goes back to
  // its stored count.
  void KeepUnread(ConversationId conversation, Seq read_seq, uint64_t unread);
  // Puts the read watermark and count kept by KeepUnread for `row`'s conversation in place of
  // `row`'s. A row about to be changed and written is loaded through it: the write then stores
  // what the application was told, which is why committing it ends the keeping, and a write
  // that is not about the count (a last seen, a retention notice, a message) does not take the
  // count back. A row already written in the open transaction is left alone: it holds them.
  void ApplyKept(ConversationRow* row);

  // --- Messages ---
  // Stores a committed message; a second copy of the same (conversation, seq) is ignored.
  Status PutMessage(const v1::Message& message);
  std::optional<v1::Message> GetMessage(ConversationId conversation, Seq seq);
  // The cached message with the lowest seq in from <= seq <= to (rows that do not decode are
  // passed over).
  std::optional<v1::Message> FirstInRange(ConversationId conversation, Seq from, Seq to);
  // Messages with from <= seq <= to, newest first, at most `limit`.
  std::vector<v1::Message> RangeNewestFirst(ConversationId conversation, Seq from, Seq to,
                                            uint32_t limit);
  // The whole range from <= seq <= to (from >= 1), newest first, into `out`: true only if every
  // seq of it is cached. One statement, for History pages answered from the cache.
  bool FullRangeNewestFirst(ConversationId conversation, Seq from, Seq to,
                            std::vector<Message>* out);
  uint64_t CountRange(ConversationId conversation, Seq from, Seq to);
  // The highest seq of a cached message of `conversation`; 0 if none is cached.
  Seq HighestSeq(ConversationId conversation);
  // The lowest seq of a cached message of `conversation`; 0 if none is cached.
  Seq LowestSeq(ConversationId conversation);
  // What a Sync tells the server of each cached conversation, by id: one statement for all.
  struct SyncCursor {
    ConversationId conversation_id = 0;
    Seq cursor = 0;
    Seq lowest_seq = 0;         // of the cached messages; 0 if none is cached
    Seq delivered_all_seq = 0;  // ConversationInfo's, as cached
    Seq read_all_seq = 0;
  };
  std::vector<SyncCursor> SyncCursors();
  // Deletes the cached messages of `conversation` with seq <= through (retention deleted them on
  // the server) and returns how many there were. The outbox is not touched.
  Result<uint64_t> DeleteMessagesThrough(ConversationId conversation, Seq through);
  // Cached user messages with from <= seq <= to sent by others after `me`'s last user message
  // in that range: the unread ones above a read watermark (the user's own message counts as
  // having read the conversation up to it, as the server counts).
  uint64_t CountUnread(ConversationId conversation, Seq from, Seq to, const std::string& me);
  uint64_t MessageCount();

  // --- Outbox ---
  // Appends `entry` (id is assigned) if the outbox holds fewer than `max_rows` messages,
  // pending and failed together; ResourceExhausted otherwise, AlreadyExists if the
  // client_msg_id is taken.
  Status AddOutbox(OutboxEntry* entry, size_t max_rows);
  size_t PendingCount();
  // Pending entries, oldest first, at most `limit`.
  std::vector<OutboxEntry> PendingOutbox(size_t limit);
  // Pending and failed entries, oldest first.
  std::vector<OutboxEntry> ListOutbox();
  std::optional<OutboxEntry> FindOutbox(const std::string& client_msg_id);
  Status RemoveOutbox(const std::string& client_msg_id);
  Status FailOutbox(const std::string& client_msg_id, const Status& reason);
  // Removes a failed message. NotFound if no outbox row has this id, FailedPrecondition if it
  // is still pending (it may be on the wire).
  Status DiscardFailed(const std::string& client_msg_id);

 private:
  explicit Cache(std::unique_ptr<Db> db);
  Status Exec(const char* sql);
  // The id map, read if unknown; nullptr if it cannot be read. REQUIRES: mu_ held.
  std::unordered_map<std::string, int64_t>* OutboxIds();
  std::optional<int64_t> OutboxId(const std::string& client_msg_id);

  std::recursive_mutex mu_;
  std::unique_ptr<Db> db_;
  // Pending outbox rows, counted once and then kept exactly by AddOutbox, RemoveOutbox and
  // FailOutbox, so Send() never counts the outbox; unknown (recounted) after a rollback or a
  // failed write.
  std::optional<size_t> pending_count_;
  // client_msg_id -> id of every outbox row (pending and failed): the outbox table has no index
  // on client_msg_id (see cache.cc). Read on first use, then kept by AddOutbox and RemoveOutbox;
  // read again after a rollback or a failed write.
  std::optional<std::unordered_map<std::string, int64_t>> outbox_ids_;
  // KeepUnread's counts: conversation -> (read watermark, count, order kept), at most
  // kMaxKeptUnread. A row written inside a transaction drops its count only once that commits
  // (kept_written_ holds those rows until then; a rollback empties it).
  struct KeptUnread {
    Seq read_seq = 0;
    uint64_t unread = 0;
    uint64_t order = 0;
  };
  std::unordered_map<ConversationId, KeptUnread> kept_unread_;
  std::unordered_set<ConversationId> kept_written_;
  uint64_t kept_order_ = 0;
};

}  // namespace chat::client

#endif  // CHAT_SRC_CLIENT_CACHE_H_
