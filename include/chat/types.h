// The SDK's vocabulary: ids, messages, conversations, cursors.
//
// A conversation is a totally ordered log: every message in it has a `seq` (1, 2, 3, ...)
// assigned by the server when the message is committed, with no gaps. Clients order by seq,
// never by clock. A message also has a `message_id` (a 64-bit Snowflake, unique across the
// deployment and roughly time-sortable) and the sender's `client_msg_id` (the idempotency key:
// a resend with the same key is answered with the original message_id and seq).
//
// Thread-safety: plain values.
#ifndef CHAT_TYPES_H_
#define CHAT_TYPES_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace chat {

using ConversationId = uint64_t;
using MessageId = uint64_t;
using Seq = uint64_t;
using UserId = std::string;
using DeviceId = std::string;

// The longest user id, in bytes, the server accepts at Hello (a user id is 1 to this many bytes
// of UTF-8); SignJwt mints tokens only for such ids.
inline constexpr size_t kMaxUserIdBytes = 128;

enum class ConversationKind : int { kUnspecified = 0, kDirect = 1, kGroup = 2, kChannel = 3 };
enum class Role : int { kUnspecified = 0, kMember = 1, kAdmin = 2 };
enum class MessageKind : int { kUnspecified = 0, kUser = 1, kSystem = 2 };

// Metadata of a blob stored elsewhere.
struct Attachment {
  std::string url;
  std::string mime_type;
  uint64_t size = 0;   // bytes
  std::string sha256;  // 32 raw bytes, or empty
  std::string name;
  uint32_t width = 0;   // pixels
  uint32_t height = 0;  // pixels
  uint32_t duration_ms = 0;
};

// A membership or metadata change recorded in the conversation's log.
struct SystemEvent {
  enum class Type : int {
    kUnspecified = 0,
    kCreated = 1,
    kMembersAdded = 2,
    kMembersRemoved = 3,
    kMemberLeft = 4,
    kRenamed = 5,
    kRoleChanged = 6,
    kMessagesExpired = 7,
    kRetentionChanged = 8,
  };
  Type type = Type::kUnspecified;
  UserId actor;
  std::vector<UserId> users;
  std::string title;
  Role role = Role::kUnspecified;
  Seq seq = 0;
  int64_t retention_ms = 0;  // kRetentionChanged: 0 = server default, -1 = keep, > 0 = TTL in ms
};

struct Message {
  ConversationId conversation_id = 0;
  Seq seq = 0;
  MessageId message_id = 0;
  UserId sender;
  DeviceId sender_device;
  std::string client_msg_id;
  int64_t server_time_ms = 0;  // Unix ms at commit
  MessageKind kind = MessageKind::kUser;
  std::string content_type;
  std::string body;  // opaque bytes
  std::vector<Attachment> attachments;
  SystemEvent system;  // kind == kSystem
};

// What one user knows about one conversation.
struct ConversationInfo {
  ConversationId conversation_id = 0;
  ConversationKind kind = ConversationKind::kUnspecified;
  std::string title;
  UserId peer;  // direct conversations: the other user
  Seq last_seq = 0;
  Seq read_seq = 0;       // the user's read watermark (all devices)
  Seq delivered_seq = 0;  // the device's delivered watermark
  uint64_t unread = 0;
  // Lowest stored seq (retention deletes the oldest messages); 0 when none is (for a removed
  // user: none up to its removal). Clients drop their copies below it, and take 0 with a
  // non-zero last_seq as "every message up to last_seq is gone": a store reports 0 only then
  // (1 while every message is stored), never for "not known".
  Seq first_seq = 0;
  Role role = Role::kUnspecified;
  uint32_t member_count = 0;
  int64_t last_activity_ms = 0;
  Seq removed_at_seq = 0;         // non-zero: the user was removed at this seq, may read up to it
  int64_t peer_last_seen_ms = 0;  // direct: when the peer was last online (Unix ms); 0 = unknown
  int64_t retention_ms = 0;       // the conversation's own retention: 0 = server default, -1 = keep
  // The lowest watermarks over the current members (each member's the highest over its
  // devices, and at least the seq before its join: what came before was never its to read), as
  // the members were last told: the user's own messages up to them are delivered to / read by
  // every member. 0 in channels and for a removed member.
  Seq delivered_all_seq = 0;
  Seq read_all_seq = 0;
};

// The highest seq a client holds for a conversation with nothing missing below it.
struct Cursor {
  ConversationId conversation_id = 0;
  Seq seq = 0;
  // The lowest seq the client holds (0: none, or not told). Sync lists the conversation's state
  // when retention has deleted that seq, so the client drops what it holds below first_seq.
  Seq lowest_seq = 0;
  // The lowest watermarks the client knows (ConversationInfo::delivered_all_seq, read_all_seq);
  // std::nullopt: not told (a client that predates them). Sync lists the conversation's state
  // when the stored ones are above what the client knows, so it learns marks raised while it
  // was away.
  std::optional<Seq> delivered_all_seq = std::nullopt;
  std::optional<Seq> read_all_seq = std::nullopt;
};

// Seqs [from_seq, to_seq] that a reply left out; fetch them with History.
struct Gap {
  ConversationId conversation_id = 0;
  Seq from_seq = 0;
  Seq to_seq = 0;
};

}  // namespace chat

#endif  // CHAT_TYPES_H_
