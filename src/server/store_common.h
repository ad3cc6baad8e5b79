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
#include <optional>
#include <string>
#include <vector>

#include "chat/status.h"
#include "chat/store.h"
#include "chat/types.h"

namespace chat::server {

// Write primitives of a store, called inside the store's batch transaction. A non-OK Status
// from any of them aborts the whole batch.
class AppendTarget {
 public:
  virtual ~AppendTarget() = default;
  // The message `sender` committed earlier with `client_msg_id` (non-empty), if any.
  virtual Result<std::optional<Message>> FindByKey(const UserId& sender,
                                                   const std::string& client_msg_id) = 0;
  // The direct conversation between `low` and `high` (low < high), or 0.
  virtual Result<ConversationId> FindDirect(const UserId& low, const UserId& high) = 0;
  // Creates the direct conversation between `low` and `high` (low < high) with both as
  // members (role member, joined at seq 0) and returns its id.
  virtual Result<ConversationId> CreateDirect(const UserId& low, const UserId& high,
                                              int64_t now_ms) = 0;
  // Whether `user` is a current member; false for a conversation that does not exist.
  virtual Result<bool> IsMember(ConversationId conversation_id, const UserId& user) = 0;
  // The conversation's highest committed seq (0 when it has no messages).
  // REQUIRES: the conversation exists.
  virtual Result<Seq> LastSeq(ConversationId conversation_id) = 0;
  // Stores `message` (its seq is LastSeq + 1) and advances the conversation's last_seq,
  // first_seq and last_activity_ms.
  virtual Status Insert(const Message& message) = 0;
  // Current members, ascending.
  virtual Result<std::vector<UserId>> Members(ConversationId conversation_id) = 0;
};

// Applies one AppendRequest. Per-item refusals (InvalidArgument, PermissionDenied) go to
// result->status and the function returns OK; a non-OK return is a storage failure and the
// caller must roll the batch back.
Status AppendOne(AppendTarget& target, const AppendRequest& request, AppendResult* result);

// The head of one conversation, as the sync and history algorithms need it.
struct ConversationHead {
  ConversationId conversation_id = 0;
  Seq last_seq = 0;
  Seq first_seq = 0;  // lowest stored seq, 0 when none is stored
};

// Read primitives of a store, called inside one consistent snapshot.
class ReadSource {
 public:
  virtual ~ReadSource() = default;
  // Heads of the conversations `user` is a member of, ascending by id.
  virtual Status UserConversations(const UserId& user, std::vector<ConversationHead>* out) = 0;
  // The head of `conversation_id` if `user` is a member of it; nullopt otherwise (also when
  // the conversation does not exist).
  virtual Result<std::optional<ConversationHead>> MemberHead(ConversationId conversation_id,
                                                             const UserId& user) = 0;
  // The conversation as `user` on `device` sees it (ConversationInfo documents the fields).
  // REQUIRES: `user` is a member.
  virtual Result<ConversationInfo> Describe(ConversationId conversation_id, const UserId& user,
                                            const DeviceId& device) = 0;
  // Appends to `out` the messages with from_seq <= seq <= to_seq, ascending, at most `max`.
  virtual Status ReadAscending(ConversationId conversation_id, Seq from_seq, Seq to_seq, size_t max,
                               std::vector<Message>* out) = 0;
  // Appends to `out` the messages with seq < before_seq, descending, at most `max`.
  virtual Status ReadDescending(ConversationId conversation_id, Seq before_seq, size_t max,
                                std::vector<Message>* out) = 0;
};

// MessageStore::Sync over `source`.
Result<SyncReply> RunSync(ReadSource& source, const SyncQuery& query);

// MessageStore::History over `source`.
Result<HistoryReply> RunHistory(ReadSource& source, const HistoryQuery& query);

// The message every store uses for a refused membership check, so a missing conversation and
// a foreign one look the same.
Status NotAMember(ConversationId conversation_id);

}  // namespace chat::server

#endif  // CHAT_SRC_SERVER_STORE_COMMON_H_
