// NewSqliteStore: the MessageStore semantics of store_common over one SQLite file in WAL mode.
//
// One writer connection serves Append (the trait promises one caller at a time; a mutex makes a
// misbehaving caller wait instead of corrupting a transaction). Reads go to a small pool of
// read-only connections, each read in its own transaction, so a Sync or History sees one
// consistent snapshot while the writer commits beside it. Every statement is prepared once per
// connection and reused.

#include <openssl/rand.h>
#include <sqlite3.h>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "chat/log.h"
#include "chat/store.h"
#include "chat/v1/chat.pb.h"
#include "src/core/codec.h"
#include "src/core/threads.h"
#include "src/server/store_common.h"

namespace chat {
namespace {

using server::ConversationHead;

// The schema version this build writes. A file with a higher PRAGMA user_version was written
// by a newer build and is refused rather than misread.
constexpr int kSchemaVersion = 10;

// log0 and log1 of schema 5: the columns of messages, in arrival order (rowid), found by
// conversation and seq through their index.
#define CHAT_LOG_TABLE(n)                                                             \
  "CREATE TABLE log" n                                                                \
  "(conversation_id INTEGER NOT NULL, seq INTEGER NOT NULL, "                         \
  "message_id INTEGER NOT NULL, sender TEXT NOT NULL, sender_device TEXT NOT NULL, "  \
  "client_msg_id TEXT NOT NULL, ts INTEGER NOT NULL, kind INTEGER NOT NULL, "         \
  "content_type TEXT NOT NULL, body BLOB NOT NULL, attachments BLOB, system BLOB);\n" \
  "CREATE UNIQUE INDEX log" n "_by_seq ON log" n "(conversation_id, seq);\n"

// Migration N brings a file from user_version N-1 to N; index 0 is migration 1.
constexpr std::array<const char*, kSchemaVersion> kMigrations = {
    R"sql(
CREATE TABLE meta(
  key TEXT PRIMARY KEY,
  value ANY
) WITHOUT ROWID;

CREATE TABLE conversations(
  conversation_id INTEGER PRIMARY KEY,
  kind INTEGER NOT NULL,
  title TEXT NOT NULL DEFAULT '',
  last_seq INTEGER NOT NULL DEFAULT 0,
  first_seq INTEGER NOT NULL DEFAULT 0,
  retention_ms INTEGER NOT NULL DEFAULT 0,
  created_ms INTEGER NOT NULL,
  last_activity_ms INTEGER NOT NULL
);

CREATE TABLE direct(
  user_a TEXT NOT NULL,
  user_b TEXT NOT NULL,
  conversation_id INTEGER NOT NULL,
  PRIMARY KEY(user_a, user_b),
  CHECK(user_a < user_b)
) WITHOUT ROWID;

CREATE TABLE members(
  conversation_id INTEGER NOT NULL,
  user_id TEXT NOT NULL,
  role INTEGER NOT NULL,
  joined_seq INTEGER NOT NULL,
  PRIMARY KEY(conversation_id, user_id)
) WITHOUT ROWID;
CREATE INDEX members_by_user ON members(user_id, conversation_id);

CREATE TABLE messages(
  conversation_id INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  message_id INTEGER NOT NULL,
  sender TEXT NOT NULL,
  sender_device TEXT NOT NULL,
  client_msg_id TEXT NOT NULL,
  ts INTEGER NOT NULL,
  kind INTEGER NOT NULL,
  content_type TEXT NOT NULL,
  body BLOB NOT NULL,
  attachments BLOB,
  system BLOB,
  PRIMARY KEY(conversation_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_by_key ON messages(sender, client_msg_id) WHERE client_msg_id <> '';

CREATE TABLE cursors(
  conversation_id INTEGER NOT NULL,
  user_id TEXT NOT NULL,
  device_id TEXT NOT NULL,
  delivered_seq INTEGER NOT NULL DEFAULT 0,
  read_seq INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY(conversation_id, user_id, device_id)
) WITHOUT ROWID;

CREATE TABLE users(
  user_id TEXT PRIMARY KEY,
  last_seen_ms INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
)sql",
    // 2: removed members keep their row (read access up to their removal).
    R"sql(
ALTER TABLE members ADD COLUMN removed_at_seq INTEGER NOT NULL DEFAULT 0;
)sql",
    // 3: device push tokens, so a restart does not forget them.
    R"sql(
CREATE TABLE push_tokens(
  user_id TEXT NOT NULL,
  device_id TEXT NOT NULL,
  platform TEXT NOT NULL,
  token TEXT NOT NULL,
  registered_ms INTEGER NOT NULL,
  PRIMARY KEY(user_id, device_id)
) WITHOUT ROWID;
)sql",
    // 4: the idempotency index leads with client_msg_id, so time-prefixed ids (the client
    // SDK's) insert next to each other: a commit group touches one or two of its leaves rather
    // than one per sender. Same columns, same uniqueness.
    R"sql(
DROP INDEX messages_by_key;
CREATE UNIQUE INDEX messages_by_key ON messages(client_msg_id, sender) WHERE client_msg_id <> '';
)sql",
    // 5: new messages go to an arrival-order log (log0 or log1, whichever log_state names
    // active) and move into messages in bulk, in (conversation, seq) order (see MergeSteps). The
    // idempotency keys move out of messages into a table of their own, so one key check covers
    // the logs and messages alike.
    R"sql(
CREATE TABLE message_keys(
  client_msg_id TEXT NOT NULL,
  sender TEXT NOT NULL,
  conversation_id INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  PRIMARY KEY(client_msg_id, sender)
) WITHOUT ROWID;
INSERT INTO message_keys(client_msg_id, sender, conversation_id, seq)
  SELECT client_msg_id, sender, conversation_id, seq FROM messages
  WHERE client_msg_id <> '' ORDER BY client_msg_id, sender;
DROP INDEX messages_by_key;

)sql" CHAT_LOG_TABLE("0") CHAT_LOG_TABLE("1") R"sql(

-- active: the log new messages go to. merged_conversation, merged_seq: NULL when the other
-- log is empty; otherwise the other log's rows up to this (conversation_id, seq) are already in
-- messages (readers skip them) and the rest are not yet.
CREATE TABLE log_state(
  id INTEGER PRIMARY KEY CHECK(id = 0),
  active INTEGER NOT NULL CHECK(active IN (0, 1)),
  merged_conversation INTEGER,
  merged_seq INTEGER
);
INSERT INTO log_state(id, active, merged_conversation, merged_seq) VALUES(0, 0, NULL, NULL);
)sql",
    // 6: a key whose message retention deleted stays until its resend window is over, with
    // what a resend's acknowledgement names (message_id, ts). gone_ms: when the message was
    // deleted; 0 while it is stored (new keys leave the three columns at their defaults).
    R"sql(
ALTER TABLE message_keys ADD COLUMN message_id INTEGER NOT NULL DEFAULT 0;
ALTER TABLE message_keys ADD COLUMN ts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE message_keys ADD COLUMN gone_ms INTEGER NOT NULL DEFAULT 0;
CREATE INDEX message_keys_gone ON message_keys(gone_ms) WHERE gone_ms > 0;
)sql",
    // 7: a conversation's current members counted as they come and go, not by a scan of its
    // member rows (a channel's million) for every description of it.
    R"sql(
ALTER TABLE conversations ADD COLUMN member_count INTEGER NOT NULL DEFAULT 0;
UPDATE conversations SET member_count = (SELECT COUNT(*) FROM members m
  WHERE m.conversation_id = conversations.conversation_id AND m.removed_at_seq = 0);
)sql",
    // 8: unread counts without a walk over the unread messages. Each message row keeps its
    // user_ordinal: how many user messages (kind 1) of its conversation were stored up to it and
    // including it. A conversation keeps the count of its last (user_messages) and of the last
    // message retention deleted (gone_user_messages); a member, the seq of its last own user
    // message (sent_seq), above which the messages of others count as unread. Stored messages
    // are numbered from 1, however many were deleted before; a row the merge copied may still
    // be in its log (read from messages only).
    R"sql(
ALTER TABLE messages ADD COLUMN user_ordinal INTEGER NOT NULL DEFAULT 0;
ALTER TABLE log0 ADD COLUMN user_ordinal INTEGER NOT NULL DEFAULT 0;
ALTER TABLE log1 ADD COLUMN user_ordinal INTEGER NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN user_messages INTEGER NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN gone_user_messages INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN sent_seq INTEGER NOT NULL DEFAULT 0;
CREATE TEMP TABLE ordinals(
  conversation_id INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  sender TEXT NOT NULL,
  kind INTEGER NOT NULL,
  user_ordinal INTEGER NOT NULL,
  PRIMARY KEY(conversation_id, seq)
) WITHOUT ROWID;
INSERT INTO ordinals(conversation_id, seq, sender, kind, user_ordinal)
  SELECT conversation_id, seq, sender, kind,
    SUM(kind = 1) OVER (PARTITION BY conversation_id ORDER BY seq)
  FROM (SELECT conversation_id, seq, sender, kind FROM messages
        UNION ALL SELECT conversation_id, seq, sender, kind FROM log0 l WHERE NOT EXISTS
          (SELECT 1 FROM messages m WHERE m.conversation_id = l.conversation_id AND m.seq = l.seq)
        UNION ALL SELECT conversation_id, seq, sender, kind FROM log1 l WHERE NOT EXISTS
          (SELECT 1 FROM messages m WHERE m.conversation_id = l.conversation_id AND m.seq = l.seq));
UPDATE messages SET user_ordinal = o.user_ordinal FROM ordinals o
  WHERE o.conversation_id = messages.conversation_id AND o.seq = messages.seq;
UPDATE log0 SET user_ordinal = o.user_ordinal FROM ordinals o
  WHERE o.conversation_id = log0.conversation_id AND o.seq = log0.seq;
UPDATE log1 SET user_ordinal = o.user_ordinal FROM ordinals o
  WHERE o.conversation_id = log1.conversation_id AND o.seq = log1.seq;
UPDATE conversations SET user_messages = o.n FROM
  (SELECT conversation_id, MAX(user_ordinal) AS n FROM ordinals GROUP BY conversation_id) o
  WHERE o.conversation_id = conversations.conversation_id;
UPDATE members SET sent_seq = o.seq FROM
  (SELECT conversation_id, sender, MAX(seq) AS seq FROM ordinals WHERE kind = 1
   GROUP BY conversation_id, sender) o
  WHERE o.conversation_id = members.conversation_id AND o.sender = members.user_id;
DROP TABLE ordinals;
)sql",
    // 9: the sent_seq of a conversation's two latest distinct senders of user messages lives in
    // the conversation's row, which every message writes anyway, so their next messages write
    // no member row: a direct conversation's, never; a group's, only when a third sender takes
    // a place (the one it takes over goes to its member row). Empty places: the member rows
    // say it all, as migration 8 left them.
    R"sql(
ALTER TABLE conversations ADD COLUMN last_sender TEXT NOT NULL DEFAULT '';
ALTER TABLE conversations ADD COLUMN last_sent_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN prev_sender TEXT NOT NULL DEFAULT '';
ALTER TABLE conversations ADD COLUMN prev_sent_seq INTEGER NOT NULL DEFAULT 0;
)sql",
    // 10: the lowest watermarks the members were last told (server::LowestMove), so that a
    // restart neither tells them again as news nor forgets them: Describe and Sync report them.
    // 0 and 0: nothing told yet (as a version 9 file says of every conversation).
    R"sql(
ALTER TABLE conversations ADD COLUMN told_delivered_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN told_read_seq INTEGER NOT NULL DEFAULT 0;
)sql",
};

#undef CHAT_LOG_TABLE

#define CHAT_MESSAGE_COLUMNS                                                           \
  "conversation_id, seq, message_id, sender, sender_device, client_msg_id, ts, kind, " \
  "content_type, body, attachments, system"
// What a row stores: the columns read back, and its place among the user messages.
#define CHAT_STORED_COLUMNS CHAT_MESSAGE_COLUMNS ", user_ordinal"

// The seq above which conversation ?1's rows of log0 or log1 (n) are visible to readers: every
// row of the active log, and the rows of the other one that the merge has not copied into
// messages yet (none when that log is empty). A constant for the statement.
#define CHAT_LOG_FLOOR(n)                \
  "(SELECT CASE WHEN active = " n        \
  " OR ?1 > merged_conversation THEN 0 " \
  "WHEN ?1 = merged_conversation THEN merged_seq ELSE 9223372036854775807 END FROM log_state)"
// Conversation ?1's messages with seq above `above` and matching `more`, wherever they are:
// messages and the visible rows of the two logs. Each log arm has one lower bound, the larger of
// `above` and its floor, so its index search starts there (given two, SQLite searches from one
// and walks the rows up to the other: the rows already copied). A compound SELECT with ORDER BY
// merges its arms, each read in order from its index.
#define CHAT_ALL_MESSAGES(columns, above, more)                                             \
  "SELECT " columns " FROM messages WHERE conversation_id = ?1 AND seq > " above more       \
  " UNION ALL SELECT " columns " FROM log0 WHERE conversation_id = ?1 AND seq > MAX(" above \
  ", " CHAT_LOG_FLOOR("0") ")" more " UNION ALL SELECT " columns                            \
                           " FROM log1 WHERE conversation_id = ?1 AND seq > MAX(" above     \
                           ", " CHAT_LOG_FLOOR("1") ")" more

// The bytes of a log row's variable-length columns (TEXT by its bytes, not its characters); see
// LogRowBytes.
#define CHAT_LOG_ROW_BYTES                                                       \
  "length(body) + IFNULL(length(attachments), 0) + IFNULL(length(system), 0) + " \
  "length(CAST(sender AS BLOB)) + length(CAST(sender_device AS BLOB)) + "        \
  "length(CAST(client_msg_id AS BLOB)) + length(CAST(content_type AS BLOB))"

// Every statement the store runs, prepared at most once per connection.
enum class Sql : int {
  kBegin,
  kBeginImmediate,
  kCommit,
  kRollback,
  kUserVersion,
  kGetEpoch,
  kFindByKey,
  kFindDirect,
  kInsertConversation,
  kInsertDirect,
  kInsertMember,
  kMembership,
  kHead,
  kInsertGroup,
  kSetTitle,
  kPutMember,
  kSetRole,
  kRemoveMember,
  kCountMemberIn,
  kCountMemberOut,
  kPutCursor,
  kWatermarks,
  kWatermarksOf,
  kCountedWatermarks,
  kReceiptStart,
  kLastSeq,
  kInsertMessage,
  kInsertLog0,
  kInsertLog1,
  kInsertKey,
  kDeleteKey,
  kBuryKey,
  kDropKeys,
  kLogState,
  kCountLog0,
  kCountLog1,
  kSwitchLog,
  kSliceEnd0,
  kSliceEnd1,
  kMergeLog0,
  kMergeLog1,
  kClearLog0,
  kClearLog1,
  kSetMerged,
  kMergeFinished,
  kSavepoint,
  kRelease,
  kRollbackTo,
  kDeleteThroughLog0,
  kDeleteThroughLog1,
  kAdvanceConversation,
  kMarkSent,
  kMembers,
  kConversationExists,
  kUserConversations,
  kDescribe,
  kUserUnread,
  kTold,
  kSetTold,
  kMemberCount,
  kPeer,
  kUserOrdinal,
  kRangeAscending,
  kRangeDescending,
  kRetentionCandidates,
  kRetentionScan,
  kDeleteThrough,
  kSetFirstSeq,
  kSetRetention,
  kSharesConversation,
  kLastSeen,
  kPutLastSeen,
  kPushTokens,
  kPutPushToken,
  kTrimPushTokens,
  kDeletePushToken,
  kCount,
};

constexpr std::array<const char*, static_cast<size_t>(Sql::kCount)> kSql = {
    "BEGIN",
    "BEGIN IMMEDIATE",
    "COMMIT",
    "ROLLBACK",
    "PRAGMA user_version",
    "SELECT value FROM meta WHERE key = 'epoch'",
    "SELECT conversation_id, seq, message_id, ts, gone_ms FROM message_keys "
    "WHERE sender = ?1 AND client_msg_id = ?2",
    "SELECT conversation_id FROM direct WHERE user_a = ?1 AND user_b = ?2",
    "INSERT INTO conversations(kind, created_ms, last_activity_ms, member_count) "
    "VALUES(?1, ?2, ?2, 2)",
    "INSERT INTO direct(user_a, user_b, conversation_id) VALUES(?1, ?2, ?3)",
    "INSERT INTO members(conversation_id, user_id, role, joined_seq) VALUES(?1, ?2, ?3, ?4)",
    "SELECT c.kind, m.role, m.joined_seq, m.removed_at_seq FROM conversations c "
    "LEFT JOIN members m ON m.conversation_id = c.conversation_id AND m.user_id = ?2 "
    "WHERE c.conversation_id = ?1",
    "SELECT last_seq, first_seq FROM conversations WHERE conversation_id = ?1",
    "INSERT INTO conversations(kind, title, created_ms, last_activity_ms) VALUES(?1, ?2, ?3, ?3)",
    "UPDATE conversations SET title = ?2 WHERE conversation_id = ?1",
    "INSERT INTO members(conversation_id, user_id, role, joined_seq, removed_at_seq) "
    "VALUES(?1, ?2, ?3, ?4, 0) ON CONFLICT(conversation_id, user_id) DO UPDATE SET "
    "role = excluded.role, joined_seq = excluded.joined_seq, removed_at_seq = 0",
    "UPDATE members SET role = ?3 WHERE conversation_id = ?1 AND user_id = ?2",
    "UPDATE members SET removed_at_seq = ?3 "
    "WHERE conversation_id = ?1 AND user_id = ?2 AND removed_at_seq = 0",
    "UPDATE conversations SET member_count = member_count + 1 WHERE conversation_id = ?1 AND "
    "NOT EXISTS (SELECT 1 FROM members WHERE conversation_id = ?1 AND user_id = ?2 AND "
    "removed_at_seq = 0)",
    "UPDATE conversations SET member_count = member_count - 1 WHERE conversation_id = ?1 AND "
    "EXISTS (SELECT 1 FROM members WHERE conversation_id = ?1 AND user_id = ?2 AND "
    "removed_at_seq = 0)",
    "INSERT INTO cursors(conversation_id, user_id, device_id, delivered_seq, read_seq) "
    "VALUES(?1, ?2, ?3, ?4, ?5) ON CONFLICT(conversation_id, user_id, device_id) DO UPDATE SET "
    "delivered_seq = excluded.delivered_seq, read_seq = excluded.read_seq",
    "SELECT m.user_id, m.role, COALESCE(MAX(k.delivered_seq), 0), COALESCE(MAX(k.read_seq), 0) "
    "FROM members m LEFT JOIN cursors k "
    "ON k.conversation_id = m.conversation_id AND k.user_id = m.user_id "
    "WHERE m.conversation_id = ?1 AND m.removed_at_seq = 0 GROUP BY m.user_id ORDER BY m.user_id",
    // One member's: a lookup by the key, not a walk over the members (a channel's million).
    "SELECT m.user_id, m.role, COALESCE(MAX(k.delivered_seq), 0), COALESCE(MAX(k.read_seq), 0) "
    "FROM members m LEFT JOIN cursors k "
    "ON k.conversation_id = m.conversation_id AND k.user_id = m.user_id "
    "WHERE m.conversation_id = ?1 AND m.user_id = ?2 GROUP BY m.user_id",
    // The current members' marks and the seq that added each, for the lowest marks.
    "SELECT m.user_id, m.role, COALESCE(MAX(k.delivered_seq), 0), COALESCE(MAX(k.read_seq), 0), "
    "m.joined_seq FROM members m LEFT JOIN cursors k "
    "ON k.conversation_id = m.conversation_id AND k.user_id = m.user_id "
    "WHERE m.conversation_id = ?1 AND m.removed_at_seq = 0 GROUP BY m.user_id ORDER BY m.user_id",
    // The same member's cursors one by one: its marks and one device's, in one lookup.
    "SELECT m.role, k.device_id, k.delivered_seq, k.read_seq FROM members m LEFT JOIN cursors k "
    "ON k.conversation_id = m.conversation_id AND k.user_id = m.user_id "
    "WHERE m.conversation_id = ?1 AND m.user_id = ?2",
    "SELECT last_seq, user_messages, last_sender, last_sent_seq, prev_sender, prev_sent_seq "
    "FROM conversations WHERE conversation_id = ?1",
    "INSERT INTO messages(" CHAT_STORED_COLUMNS
    ") VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    "INSERT INTO log0(" CHAT_STORED_COLUMNS
    ") VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    "INSERT INTO log1(" CHAT_STORED_COLUMNS
    ") VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    "INSERT INTO message_keys(client_msg_id, sender, conversation_id, seq) VALUES(?1, ?2, ?3, ?4)",
    "DELETE FROM message_keys WHERE client_msg_id = ?1 AND sender = ?2",
    "UPDATE message_keys SET message_id = ?3, ts = ?4, gone_ms = ?5 "
    "WHERE client_msg_id = ?1 AND sender = ?2",
    // At most ?2 keys whose message was deleted at or before ?1 (through the partial index).
    "DELETE FROM message_keys WHERE (client_msg_id, sender) IN (SELECT client_msg_id, sender "
    "FROM message_keys WHERE gone_ms > 0 AND gone_ms <= ?1 LIMIT ?2)",
    "SELECT active, merged_conversation, merged_seq FROM log_state",
    "SELECT COUNT(*), TOTAL(" CHAT_LOG_ROW_BYTES ") FROM log0",
    "SELECT COUNT(*), TOTAL(" CHAT_LOG_ROW_BYTES ") FROM log1",
    "UPDATE log_state SET active = 1 - active, merged_conversation = 0, merged_seq = 0",
    // The row ?3 rows past the first one after (?1, ?2): the last of a slice of ?3 + 1 rows.
    "SELECT conversation_id, seq FROM log0 WHERE (conversation_id, seq) > (?1, ?2) "
    "ORDER BY conversation_id, seq LIMIT 1 OFFSET ?3",
    "SELECT conversation_id, seq FROM log1 WHERE (conversation_id, seq) > (?1, ?2) "
    "ORDER BY conversation_id, seq LIMIT 1 OFFSET ?3",
    "INSERT INTO messages(" CHAT_STORED_COLUMNS ") SELECT " CHAT_STORED_COLUMNS
    " FROM log0 WHERE (conversation_id, seq) > (?1, ?2) AND (conversation_id, seq) <= (?3, ?4) "
    "ORDER BY conversation_id, seq",
    "INSERT INTO messages(" CHAT_STORED_COLUMNS ") SELECT " CHAT_STORED_COLUMNS
    " FROM log1 WHERE (conversation_id, seq) > (?1, ?2) AND (conversation_id, seq) <= (?3, ?4) "
    "ORDER BY conversation_id, seq",
    "DELETE FROM log0",
    "DELETE FROM log1",
    "UPDATE log_state SET merged_conversation = ?1, merged_seq = ?2",
    "UPDATE log_state SET merged_conversation = NULL, merged_seq = NULL",
    "SAVEPOINT merge",
    "RELEASE merge",
    "ROLLBACK TO merge",
    "DELETE FROM log0 WHERE conversation_id = ?1 AND seq <= ?2",
    "DELETE FROM log1 WHERE conversation_id = ?1 AND seq <= ?2",
    "UPDATE conversations SET last_seq = ?2, last_activity_ms = ?3, user_messages = ?4, "
    "first_seq = CASE WHEN first_seq = 0 THEN ?2 ELSE first_seq END, last_sender = ?5, "
    "last_sent_seq = ?6, prev_sender = ?7, prev_sent_seq = ?8 WHERE conversation_id = ?1",
    "UPDATE members SET sent_seq = ?3 WHERE conversation_id = ?1 AND user_id = ?2",
    "SELECT user_id FROM members WHERE conversation_id = ?1 AND removed_at_seq = 0 "
    "ORDER BY user_id",
    "SELECT 1 FROM conversations WHERE conversation_id = ?1",
    "SELECT c.conversation_id, c.last_seq, c.first_seq, m.joined_seq, m.removed_at_seq "
    "FROM members m JOIN conversations c ON c.conversation_id = m.conversation_id "
    "WHERE m.user_id = ?1 ORDER BY m.conversation_id",
    "SELECT c.kind, c.title, c.last_seq, c.first_seq, c.last_activity_ms, m.role, "
    "m.joined_seq, m.removed_at_seq, c.retention_ms, c.member_count, "
    "CASE ?2 WHEN c.last_sender THEN c.last_sent_seq WHEN c.prev_sender THEN c.prev_sent_seq "
    "ELSE m.sent_seq END, "
    "c.user_messages, c.gone_user_messages, "
    "(SELECT MAX(read_seq) FROM cursors WHERE conversation_id = ?1 AND user_id = ?2), "
    "(SELECT delivered_seq FROM cursors "
    "WHERE conversation_id = ?1 AND user_id = ?2 AND device_id = ?3), "
    "c.told_delivered_seq, c.told_read_seq FROM members m "
    "JOIN conversations c ON c.conversation_id = m.conversation_id "
    "WHERE m.conversation_id = ?1 AND m.user_id = ?2",
    // Of each conversation of user ?1, what its unread count needs: kDescribe's columns for it.
    "SELECT c.conversation_id, c.last_seq, c.first_seq, c.user_messages, c.gone_user_messages, "
    "m.joined_seq, m.removed_at_seq, "
    "CASE ?1 WHEN c.last_sender THEN c.last_sent_seq WHEN c.prev_sender THEN c.prev_sent_seq "
    "ELSE m.sent_seq END, "
    "(SELECT MAX(read_seq) FROM cursors k "
    "WHERE k.conversation_id = m.conversation_id AND k.user_id = ?1) "
    "FROM members m JOIN conversations c ON c.conversation_id = m.conversation_id "
    "WHERE m.user_id = ?1",
    "SELECT told_delivered_seq, told_read_seq FROM conversations WHERE conversation_id = ?1",
    "UPDATE conversations SET told_delivered_seq = ?2, told_read_seq = ?3 "
    "WHERE conversation_id = ?1",
    "SELECT member_count FROM conversations WHERE conversation_id = ?1",
    "SELECT user_id FROM members WHERE conversation_id = ?1 AND user_id <> ?2 "
    "ORDER BY user_id LIMIT 1",
    CHAT_ALL_MESSAGES("seq, user_ordinal", "0", " AND seq <= ?2") " ORDER BY seq DESC LIMIT 1",
    CHAT_ALL_MESSAGES(CHAT_MESSAGE_COLUMNS, "?2 - 1", " AND seq <= ?3") " ORDER BY seq LIMIT ?4",
    CHAT_ALL_MESSAGES(CHAT_MESSAGE_COLUMNS, "0", " AND seq < ?2") " ORDER BY seq DESC LIMIT ?3",
    "SELECT conversation_id, first_seq, CASE WHEN retention_ms > 0 THEN retention_ms ELSE ?1 END, "
    "kind FROM conversations WHERE first_seq > 0 "
    "AND (retention_ms > 0 OR (retention_ms = 0 AND ?1 > 0)) ORDER BY conversation_id",
    CHAT_ALL_MESSAGES("seq, ts, client_msg_id, sender, message_id, user_ordinal", "?2 - 1",
                      "") " ORDER BY seq LIMIT ?3",
    "DELETE FROM messages WHERE conversation_id = ?1 AND seq <= ?2",
    "UPDATE conversations SET first_seq = ?2, gone_user_messages = ?3 WHERE conversation_id = ?1",
    "UPDATE conversations SET retention_ms = ?2 WHERE conversation_id = ?1",
    // Presence: a direct conversation or group (kinds 1 and 2) with both as current members.
    "SELECT 1 FROM members a JOIN members b ON b.conversation_id = a.conversation_id "
    "AND b.user_id = ?2 AND b.removed_at_seq = 0 "
    "JOIN conversations c ON c.conversation_id = a.conversation_id AND c.kind IN (1, 2) "
    "WHERE a.user_id = ?1 AND a.removed_at_seq = 0 LIMIT 1",
    "SELECT last_seen_ms FROM users WHERE user_id = ?1",
    "INSERT INTO users(user_id, last_seen_ms) VALUES(?1, ?2) ON CONFLICT(user_id) DO UPDATE SET "
    "last_seen_ms = MAX(last_seen_ms, excluded.last_seen_ms)",
    "SELECT device_id, platform, token FROM push_tokens WHERE user_id = ?1 ORDER BY device_id",
    "INSERT INTO push_tokens(user_id, device_id, platform, token, registered_ms) "
    "VALUES(?1, ?2, ?3, ?4, ?5) ON CONFLICT(user_id, device_id) DO UPDATE SET "
    "platform = excluded.platform, token = excluded.token, registered_ms = excluded.registered_ms",
    // Keeps the ?3 most recently registered devices other than ?2 (ties: the higher device id).
    "DELETE FROM push_tokens WHERE user_id = ?1 AND device_id IN ("
    "SELECT device_id FROM push_tokens WHERE user_id = ?1 AND device_id <> ?2 "
    "ORDER BY registered_ms DESC, device_id DESC LIMIT -1 OFFSET ?3)",
    "DELETE FROM push_tokens WHERE user_id = ?1 AND device_id = ?2",
};

#undef CHAT_ALL_MESSAGES
#undef CHAT_LOG_FLOOR
#undef CHAT_LOG_ROW_BYTES
#undef CHAT_STORED_COLUMNS
#undef CHAT_MESSAGE_COLUMNS

// SQLITE_TRANSIENT spelled without the old-style cast of its macro: SQLite copies the value.
const sqlite3_destructor_type kTransient = reinterpret_cast<sqlite3_destructor_type>(intptr_t{-1});
// SQLITE_STATIC: SQLite reads the caller's bytes until the statement is reset.
const sqlite3_destructor_type kStatic = nullptr;

// Maps a SQLite result code to the Status a caller can act on: contention and I/O trouble may
// pass (retry), a damaged file will not, anything else is a bug or a broken invariant.
Status SqliteStatus(int rc, std::string_view what, std::string_view detail) {
  std::string message = "sqlite: ";
  message += what;
  message += ": ";
  message += detail;
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_IOERR:
    case SQLITE_FULL:
    case SQLITE_CANTOPEN:
    case SQLITE_READONLY:
    case SQLITE_PROTOCOL:
    case SQLITE_NOMEM:
      return Unavailable(message);
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return DataLoss(message);
    default:
      return Internal(message);
  }
}

// One SQLite connection with its prepared statements. Used by one thread at a time.
class Connection {
 public:
  static Result<std::unique_ptr<Connection>> Open(const std::string& path, bool read_only,
                                                  uint32_t busy_timeout_ms) {
    const int flags =
        (read_only ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE) |
        SQLITE_OPEN_NOMUTEX;
    sqlite3* db = nullptr;
    const int rc = sqlite3_open_v2(path.c_str(), &db, flags, nullptr);
    if (rc != SQLITE_OK) {
      std::string detail = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
      sqlite3_close_v2(db);
      return Unavailable("cannot open " + path + ": " + detail);
    }
    sqlite3_extended_result_codes(db, 1);
    sqlite3_busy_timeout(db, static_cast<int>(std::min<uint32_t>(busy_timeout_ms, INT32_MAX)));
    return std::unique_ptr<Connection>(new Connection(db));
  }

  ~Connection() {
    for (sqlite3_stmt* stmt : statements_) sqlite3_finalize(stmt);
    sqlite3_close_v2(db_);
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Runs SQL text that is executed once (schema, pragmas); not cached. `first` (if given) gets
  // the first column of the last row it returned.
  Status Exec(const char* sql, std::string_view what, std::string* first = nullptr) {
    char* error = nullptr;
    auto keep = [](void* out, int columns, char** values, char** /*names*/) {
      if (out != nullptr && columns > 0 && values[0] != nullptr) {
        *static_cast<std::string*>(out) = values[0];
      }
      return 0;
    };
    const int rc = sqlite3_exec(db_, sql, keep, first, &error);
    if (rc == SQLITE_OK) return Status::Ok();
    std::string detail = error != nullptr ? error : sqlite3_errstr(rc);
    sqlite3_free(error);
    return SqliteStatus(rc, what, detail);
  }

  // The cached statement for `id`, prepared on first use.
  Result<sqlite3_stmt*> Statement(Sql id) {
    sqlite3_stmt*& stmt = statements_[static_cast<size_t>(id)];
    if (stmt == nullptr) {
      const int rc = sqlite3_prepare_v3(db_, kSql[static_cast<size_t>(id)], -1,
                                        SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
      if (rc != SQLITE_OK) {
        sqlite3_finalize(stmt);
        stmt = nullptr;
        return Error(rc, "prepare");
      }
    }
    return stmt;
  }

  Status Error(int rc, std::string_view what) const {
    return SqliteStatus(rc, what, sqlite3_errmsg(db_));
  }

  int64_t LastInsertRowid() const { return sqlite3_last_insert_rowid(db_); }

  sqlite3* raw() const { return db_; }

 private:
  explicit Connection(sqlite3* db) : db_(db) { statements_.fill(nullptr); }

  sqlite3* db_;
  std::array<sqlite3_stmt*, static_cast<size_t>(Sql::kCount)> statements_;
};

// One use of a cached statement: binds parameters in order, steps, reads columns, and resets
// the statement when it goes out of scope so it holds no lock and no stale bindings.
class Query {
 public:
  Query(Connection& conn, Sql id) : conn_(conn) {
    Result<sqlite3_stmt*> stmt = conn.Statement(id);
    if (stmt.ok()) {
      stmt_ = *stmt;
    } else {
      status_ = stmt.status();
    }
  }
  ~Query() {
    if (stmt_ != nullptr) {
      sqlite3_reset(stmt_);
      sqlite3_clear_bindings(stmt_);
    }
  }
  Query(const Query&) = delete;
  Query& operator=(const Query&) = delete;

  Query& Int(int64_t value) {
    if (status_.ok()) Check(sqlite3_bind_int64(stmt_, ++next_, value));
    return *this;
  }
  // Ids and seqs are uint64 in the API; SQLite integers are int64, so they are stored by bit
  // pattern (values above INT64_MAX never occur in practice but survive a round trip).
  Query& U64(uint64_t value) { return Int(static_cast<int64_t>(value)); }
  // Text and Blob bind the caller's bytes without copying them: they must stay valid until
  // the Query ends (the statement is reset there). A temporary std::string is copied instead.
  Query& Text(std::string_view value) { return BindText(value, kStatic); }
  Query& Text(std::string&& value) { return BindText(value, kTransient); }
  Query& Text(const std::string&& value) = delete;  // would bind a temporary without a copy
  // Binds NULL for an empty value when `null_if_empty`, else a (possibly empty) blob.
  Query& Blob(std::string_view value, bool null_if_empty = false) {
    return BindBlob(value, null_if_empty, kStatic);
  }
  Query& Blob(std::string&& value, bool null_if_empty = false) {
    return BindBlob(value, null_if_empty, kTransient);
  }
  Query& Blob(const std::string&& value, bool null_if_empty = false) = delete;

  // True for a row, false when done.
  Result<bool> Step() {
    if (!status_.ok()) return status_;
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    return conn_.Error(rc, "step");
  }
  // Runs a statement that returns no rows.
  Status Run() {
    Result<bool> row = Step();
    return row.ok() ? Status::Ok() : row.status();
  }

  int64_t ColumnInt(int i) const { return sqlite3_column_int64(stmt_, i); }
  uint64_t ColumnU64(int i) const { return static_cast<uint64_t>(ColumnInt(i)); }
  bool ColumnNull(int i) const { return sqlite3_column_type(stmt_, i) == SQLITE_NULL; }
  double ColumnDouble(int i) const { return sqlite3_column_double(stmt_, i); }
  std::string ColumnBytes(int i) const { return std::string(ColumnView(i)); }
  // The column's bytes, valid until the next Step or the end of the query.
  std::string_view ColumnView(int i) const {
    // Ask for the pointer first: it may convert the value, which changes its size.
    const void* data = sqlite3_column_blob(stmt_, i);
    const int size = sqlite3_column_bytes(stmt_, i);
    if (data == nullptr || size <= 0) return std::string_view();
    return std::string_view(static_cast<const char*>(data), static_cast<size_t>(size));
  }

 private:
  Query& BindText(std::string_view value, sqlite3_destructor_type lifetime) {
    if (status_.ok()) {
      Check(sqlite3_bind_text64(stmt_, ++next_, value.data(), value.size(), lifetime, SQLITE_UTF8));
    }
    return *this;
  }
  Query& BindBlob(std::string_view value, bool null_if_empty, sqlite3_destructor_type lifetime) {
    if (!status_.ok()) return *this;
    ++next_;
    if (value.empty() && null_if_empty) {
      Check(sqlite3_bind_null(stmt_, next_));
    } else if (value.empty()) {
      Check(sqlite3_bind_zeroblob(stmt_, next_, 0));
    } else {
      Check(sqlite3_bind_blob64(stmt_, next_, value.data(), value.size(), lifetime));
    }
    return *this;
  }
  void Check(int rc) {
    if (rc != SQLITE_OK) status_ = conn_.Error(rc, "bind");
  }

  Connection& conn_;
  sqlite3_stmt* stmt_ = nullptr;
  Status status_;
  int next_ = 0;
};

// Starts a transaction with `begin`. One still open (a COMMIT and then its ROLLBACK failed)
// is rolled back first, or every later BEGIN on the connection would fail with "cannot start a
// transaction within a transaction".
Status Begin(Connection& conn, Sql begin) {
  if (sqlite3_get_autocommit(conn.raw()) == 0) {
    Log(LogLevel::kWarn, "chat: sqlite store: rolling back a transaction left open");
    if (Status s = Query(conn, Sql::kRollback).Run(); !s.ok()) return s;
  }
  return Query(conn, begin).Run();
}

// Attachments are stored as a chat.v1.Message carrying only its attachments, and a system
// event as a chat.v1.SystemEvent: compact, and readable by any later schema.
std::string EncodeAttachments(const std::vector<Attachment>& attachments) {
  if (attachments.empty()) return std::string();
  v1::Message holder;
  for (const Attachment& a : attachments) codec::ToProto(a, holder.add_attachments());
  return holder.SerializeAsString();
}

std::string EncodeSystem(const Message& message) {
  if (message.kind != MessageKind::kSystem) return std::string();
  v1::Message holder;
  codec::ToProto(message, &holder);
  return holder.system().SerializeAsString();
}

// Reads the CHAT_MESSAGE_COLUMNS of the current row into `out`, a default-constructed Message.
Status ReadMessageInto(const Query& q, Message* out) {
  Message& m = *out;
  m.conversation_id = q.ColumnU64(0);
  m.seq = q.ColumnU64(1);
  m.message_id = q.ColumnU64(2);
  m.sender.assign(q.ColumnView(3));
  m.sender_device.assign(q.ColumnView(4));
  m.client_msg_id.assign(q.ColumnView(5));
  m.server_time_ms = q.ColumnInt(6);
  m.kind = static_cast<MessageKind>(q.ColumnInt(7));
  m.content_type.assign(q.ColumnView(8));
  m.body.assign(q.ColumnView(9));
  const std::string_view attachments = q.ColumnView(10);
  const std::string_view system = q.ColumnView(11);
  if (!attachments.empty() || !system.empty()) {
    v1::Message holder;
    if (!attachments.empty() &&
        !holder.ParseFromArray(attachments.data(), static_cast<int>(attachments.size()))) {
      return DataLoss("undecodable attachments in conversation " +
                      std::to_string(m.conversation_id) + " seq " + std::to_string(m.seq));
    }
    if (!system.empty() &&
        !holder.mutable_system()->ParseFromArray(system.data(), static_cast<int>(system.size()))) {
      return DataLoss("undecodable system event in conversation " +
                      std::to_string(m.conversation_id) + " seq " + std::to_string(m.seq));
    }
    Message decoded = codec::FromProto(holder);
    m.attachments = std::move(decoded.attachments);
    m.system = std::move(decoded.system);
  }
  return Status::Ok();
}

// Appends every row of `q` to `out` as a message, each built in place.
Status ReadMessages(Query& q, std::vector<Message>* out) {
  for (;;) {
    Result<bool> row = q.Step();
    if (!row.ok()) return row.status();
    if (!*row) return Status::Ok();
    if (Status s = ReadMessageInto(q, &out->emplace_back()); !s.ok()) {
      out->pop_back();
      return s;
    }
  }
}

// The single integer of a one-row query, or `fallback` when it returns no row.
Result<int64_t> ScalarInt(Query& q, int64_t fallback) {
  Result<bool> row = q.Step();
  if (!row.ok()) return row.status();
  return *row ? q.ColumnInt(0) : fallback;
}

Result<std::vector<UserId>> ReadMembers(Connection& conn, ConversationId conversation_id) {
  Query q(conn, Sql::kMembers);
  q.U64(conversation_id);
  std::vector<UserId> out;
  for (;;) {
    Result<bool> row = q.Step();
    if (!row.ok()) return row.status();
    if (!*row) return out;
    out.push_back(q.ColumnBytes(0));
  }
}

// What the writer connection remembers between its transactions, so a message in a known
// conversation costs three statements (idempotency probe, insert, advance; a fourth, a member's
// sent_seq, only when a third sender takes one of the two latest senders' places) instead of
// seven: each conversation's tail (last seq, user_ordinal, its two latest senders), its members,
// and the memberships looked up for authorization; and the direct conversation of each pair of
// users it looked up or created, so a message addressed by peer costs no lookup either. For
// receipts: each conversation's lowest watermarks, and each user's unread count per conversation
// with the conversation's stamp.
// Only the writer connection changes these rows, and every change goes through the writer's
// SqliteTarget or its retention sweep, which keep the cache in step; a rolled-back transaction
// clears it. Bounded: past kMaxConversations conversations or kMaxMemberIds cached member ids it
// starts over, and the pairs past kMaxDirects, the unread counts past kMaxUnreadCounts and the
// stamps past kMaxStamps (which only makes the counts be counted again).
class WriterCache {
 public:
  // A sender and the seq of its last user message.
  struct Sent {
    UserId user;  // empty: a free place
    Seq seq = 0;
  };
  // A conversation's row as the writer keeps it up to date: its last message's seq and
  // user_ordinal, and its two latest distinct senders of user messages, the latest first
  // (schema 9).
  struct Tail {
    Seq last_seq = 0;  // 0: not known
    uint64_t user_messages = 0;
    std::array<Sent, 2> senders;
  };

  // The cached tail, or nullptr. Valid until the next call that changes the cache.
  Tail* FindTail(ConversationId conversation_id) {
    auto it = conversations_.find(conversation_id);
    if (it == conversations_.end() || it->second.tail.last_seq == 0) return nullptr;
    return &it->second.tail;
  }
  Tail* PutTail(ConversationId conversation_id, Tail tail) {
    Tail& kept = Entry(conversation_id).tail;
    kept = std::move(tail);
    return &kept;
  }

  const server::Membership* FindMembership(ConversationId conversation_id,
                                           const UserId& user) const {
    auto it = conversations_.find(conversation_id);
    if (it == conversations_.end()) return nullptr;
    auto m = it->second.memberships.find(user);
    return m == it->second.memberships.end() ? nullptr : &m->second;
  }
  void PutMembership(ConversationId conversation_id, const UserId& user,
                     const server::Membership& membership) {
    // A conversation that does not exist yet may be created later: never remember its absence.
    if (!membership.exists) return;
    Entry(conversation_id).memberships[user] = membership;
    ++ids_;
  }

  const std::vector<UserId>* FindMembers(ConversationId conversation_id) const {
    auto it = conversations_.find(conversation_id);
    if (it == conversations_.end() || !it->second.members) return nullptr;
    return &*it->second.members;
  }
  void PutMembers(ConversationId conversation_id, const std::vector<UserId>& members) {
    if (members.size() > kMaxMemberIds) return;  // read each time rather than break the bound
    // Counted after Entry, which may start over: what is stored is always counted.
    Entry(conversation_id).members = members;
    ids_ += members.size();
  }

  // A member was added, changed or removed: what was known of the conversation's members goes.
  void ForgetMembers(ConversationId conversation_id) {
    Touch(conversation_id);
    auto it = conversations_.find(conversation_id);
    if (it == conversations_.end()) return;
    it->second.memberships.clear();
    it->second.members.reset();
    it->second.lowest.reset();
  }

  // The lowest watermarks over the current members and how many hold them, as the last receipt
  // left them.
  server::LowestCount* FindLowest(ConversationId conversation_id) {
    auto it = conversations_.find(conversation_id);
    if (it == conversations_.end() || !it->second.lowest) return nullptr;
    return &*it->second.lowest;
  }
  void PutLowest(ConversationId conversation_id, const server::LowestCount& lowest) {
    Entry(conversation_id).lowest = lowest;
  }
  // What the members were told of the lowest marks, if known here (else the conversation's row
  // says).
  std::optional<server::LowestMarks> FindTold(ConversationId conversation_id) const {
    auto it = conversations_.find(conversation_id);
    return it == conversations_.end() ? std::nullopt : it->second.told;
  }
  void PutTold(ConversationId conversation_id, const server::LowestMarks& told) {
    Entry(conversation_id).told = told;
  }

  // The direct conversation of `low` and `high` (low < high), or 0 if not known. A pair's
  // conversation never changes once created (direct rows are never deleted).
  ConversationId FindDirect(const UserId& low, const UserId& high) const {
    auto it = directs_.find(DirectKey(low, high));
    return it == directs_.end() ? 0 : it->second;
  }
  void PutDirect(const UserId& low, const UserId& high, ConversationId conversation_id) {
    if (directs_.size() >= kMaxDirects) directs_.clear();
    directs_.emplace(DirectKey(low, high), conversation_id);
  }

  // A conversation's stamp: it changes whenever something its members' unread counts depend on
  // may have changed (a message, retention, a membership), and a stamp once given is never
  // given again, also after the stamps were dropped.
  uint64_t Stamp(ConversationId conversation_id) {
    if (stamps_.size() >= kMaxStamps && !stamps_.contains(conversation_id)) stamps_.clear();
    auto [it, added] = stamps_.try_emplace(conversation_id, 0);
    if (added) it->second = ++last_stamp_;
    return it->second;
  }
  void Touch(ConversationId conversation_id) { stamps_.erase(conversation_id); }

  // A user's unread counts, one for each conversation it is or was a member of, each as of its
  // conversation's stamp (0: to be counted again).
  struct Counted {
    uint64_t stamp = 0;
    uint64_t unread = 0;
  };
  using UserUnread = std::unordered_map<ConversationId, Counted>;
  // The user's counts if every conversation of the user is among them, or nullptr.
  UserUnread* FindUnread(const UserId& user) {
    auto it = unread_.find(user);
    return it == unread_.end() ? nullptr : &it->second;
  }
  // Keeps `counts` as the user's (replacing what was kept), unless they alone pass the bound.
  void PutUnread(const UserId& user, UserUnread counts) {
    ForgetUnread(user);
    if (counts.size() > kMaxUnreadCounts) return;
    if (unread_counts_ + counts.size() > kMaxUnreadCounts) {
      unread_.clear();
      unread_counts_ = 0;
    }
    unread_counts_ += counts.size();
    unread_.emplace(user, std::move(counts));
  }
  void ForgetUnread(const UserId& user) {
    auto it = unread_.find(user);
    if (it == unread_.end()) return;
    unread_counts_ -= it->second.size();
    unread_.erase(it);
  }
  // The user joined the conversation: its count there is to be counted, the others still hold.
  void JoinUnread(const UserId& user, ConversationId conversation_id) {
    UserUnread* counts = FindUnread(user);
    if (counts == nullptr || counts->contains(conversation_id)) return;
    if (unread_counts_ >= kMaxUnreadCounts) {
      ForgetUnread(user);
      return;
    }
    counts->try_emplace(conversation_id);
    ++unread_counts_;
  }
  // The user's read mark moved in the conversation: its count there is to be counted again.
  void StaleUnread(const UserId& user, ConversationId conversation_id) {
    if (UserUnread* counts = FindUnread(user)) {
      if (auto it = counts->find(conversation_id); it != counts->end()) it->second.stamp = 0;
    }
  }

  void Clear() {
    conversations_.clear();
    directs_.clear();
    ids_ = 0;
    unread_.clear();
    unread_counts_ = 0;
    stamps_.clear();
  }

 private:
  static constexpr size_t kMaxConversations = 10'000;
  static constexpr size_t kMaxMemberIds = 100'000;
  static constexpr size_t kMaxDirects = 10'000;
  static constexpr size_t kMaxUnreadCounts = 100'000;
  static constexpr size_t kMaxStamps = 100'000;

  // The first id's length, then both ids: unambiguous whatever bytes the ids hold.
  static std::string DirectKey(const UserId& low, const UserId& high) {
    std::string key = std::to_string(low.size());
    key.reserve(key.size() + 1 + low.size() + high.size());
    key.push_back(':');
    key.append(low).append(high);
    return key;
  }

  struct Conversation {
    Tail tail;
    std::optional<std::vector<UserId>> members;
    std::unordered_map<UserId, server::Membership> memberships;
    std::optional<server::LowestCount> lowest;
    // What the members were told (server::LowestMove): kept across membership changes, which
    // may raise the lowest marks with nobody told yet.
    std::optional<server::LowestMarks> told;
  };

  Conversation& Entry(ConversationId conversation_id) {
    if (ids_ > kMaxMemberIds ||
        (conversations_.size() >= kMaxConversations && !conversations_.contains(conversation_id))) {
      Clear();
    }
    return conversations_[conversation_id];
  }

  std::unordered_map<ConversationId, Conversation> conversations_;
  std::unordered_map<std::string, ConversationId> directs_;
  std::unordered_map<UserId, UserUnread> unread_;
  size_t unread_counts_ = 0;  // counts held
  std::unordered_map<ConversationId, uint64_t> stamps_;
  uint64_t last_stamp_ = 0;
  size_t ids_ = 0;  // member ids and memberships held, an upper bound (forgotten ones still count)
};

// Pages up to this many messages get their vector reserved up front; larger limits grow it as
// rows arrive, so a huge limit on a short conversation does not allocate for nothing.
constexpr size_t kReservePageMax = 256;

class SqliteSource final : public server::ReadSource {
 public:
  // `cache`: the writer's, or nullptr for a reader connection.
  explicit SqliteSource(Connection& conn, WriterCache* cache = nullptr)
      : conn_(conn), cache_(cache) {}

  Status UserConversations(const UserId& user, std::vector<ConversationHead>* out) override {
    Query q(conn_, Sql::kUserConversations);
    q.Text(user);
    for (;;) {
      Result<bool> row = q.Step();
      if (!row.ok()) return row.status();
      if (!*row) return Status::Ok();
      out->push_back(
          {q.ColumnU64(0), q.ColumnU64(1), q.ColumnU64(2), q.ColumnU64(3), q.ColumnU64(4)});
    }
  }

  Result<server::Membership> GetMembership(ConversationId conversation_id,
                                           const UserId& user) override {
    if (cache_ != nullptr) {
      if (const server::Membership* known = cache_->FindMembership(conversation_id, user)) {
        return *known;
      }
    }
    Result<server::Membership> membership = ReadMembership(conversation_id, user);
    if (cache_ != nullptr && membership.ok()) {
      cache_->PutMembership(conversation_id, user, *membership);
    }
    return membership;
  }

  Result<server::Membership> ReadMembership(ConversationId conversation_id, const UserId& user) {
    Query q(conn_, Sql::kMembership);
    q.U64(conversation_id).Text(user);
    Result<bool> row = q.Step();
    if (!row.ok()) return row.status();
    server::Membership out;
    if (!*row) return out;
    out.exists = true;
    out.kind = static_cast<ConversationKind>(q.ColumnInt(0));
    out.role = static_cast<Role>(q.ColumnInt(1));  // NULL (no row) reads as 0: unspecified
    out.joined_seq = q.ColumnU64(2);
    out.removed_at_seq = q.ColumnU64(3);
    return out;
  }

  Result<ConversationHead> Head(ConversationId conversation_id) override {
    Query q(conn_, Sql::kHead);
    q.U64(conversation_id);
    Result<bool> row = q.Step();
    if (!row.ok()) return row.status();
    if (!*row) return server::NotAMember(conversation_id);
    return ConversationHead{conversation_id, q.ColumnU64(0), q.ColumnU64(1), 0, 0};
  }

  Result<ConversationInfo> Describe(ConversationId conversation_id, const UserId& user,
                                    const DeviceId& device, bool count_unread) override {
    ConversationInfo info;
    info.conversation_id = conversation_id;
    MemberCounts member;
    {
      Query q(conn_, Sql::kDescribe);
      q.U64(conversation_id).Text(user).Text(device);
      Result<bool> row = q.Step();
      if (!row.ok()) return row.status();
      if (!*row) return server::NotAMember(conversation_id);
      info.kind = static_cast<ConversationKind>(q.ColumnInt(0));
      info.title = q.ColumnBytes(1);
      info.first_seq = q.ColumnU64(3);
      info.last_activity_ms = q.ColumnInt(4);
      info.role = static_cast<Role>(q.ColumnInt(5));
      info.removed_at_seq = q.ColumnU64(7);
      info.retention_ms = q.ColumnInt(8);
      info.member_count = static_cast<uint32_t>(q.ColumnInt(9));
      member.counts = {q.ColumnU64(2), info.first_seq, q.ColumnU64(11), q.ColumnU64(12)};
      member.joined_seq = q.ColumnU64(6);
      member.removed_at_seq = info.removed_at_seq;
      member.sent_seq = q.ColumnU64(10);
      // The user's read mark is the highest over its devices (none: NULL, read as 0).
      member.read_seq = q.ColumnU64(13);
      info.last_seq = member.last_seq();
      info.read_seq = member.read_mark();
      info.delivered_seq = q.ColumnU64(14);
      // Nothing a removed member may read is stored any more: say so, not what came later.
      if (info.first_seq > info.last_seq) info.first_seq = 0;
      // A channel's stay 0 (no receipt tells them); a removed member is told nothing of them.
      if (info.removed_at_seq == 0) {
        info.delivered_all_seq = q.ColumnU64(15);
        info.read_all_seq = q.ColumnU64(16);
      }
    }
    if (info.kind == ConversationKind::kDirect) {
      Query q(conn_, Sql::kPeer);
      q.U64(conversation_id).Text(user);
      Result<bool> row = q.Step();
      if (!row.ok()) return row.status();
      if (*row) info.peer = q.ColumnBytes(0);
    }
    if (!info.peer.empty()) {
      Result<int64_t> last_seen = LastSeen(info.peer);
      if (!last_seen.ok()) return last_seen.status();
      info.peer_last_seen_ms = *last_seen;
    }
    if (count_unread) {
      Result<uint64_t> unread = Unread(conversation_id, member);
      if (!unread.ok()) return unread.status();
      info.unread = *unread;
    }
    return info;
  }

  // Describe's unread, summed, from one statement over the user's member rows (kUserUnread):
  // no title, peer, last seen or marks of others, and the ordinal lookups only where something
  // is unread.
  Result<uint64_t> CountUnread(const UserId& user) override {
    std::vector<std::pair<ConversationId, MemberCounts>> rows;
    {
      Query q(conn_, Sql::kUserUnread);
      q.Text(user);
      for (;;) {
        Result<bool> row = q.Step();
        if (!row.ok()) return row.status();
        if (!*row) break;
        MemberCounts member;
        member.counts = {q.ColumnU64(1), q.ColumnU64(2), q.ColumnU64(3), q.ColumnU64(4)};
        member.joined_seq = q.ColumnU64(5);
        member.removed_at_seq = q.ColumnU64(6);
        member.sent_seq = q.ColumnU64(7);
        member.read_seq = q.ColumnU64(8);
        // Only what has something unread waits for its lookups: a user in many conversations
        // holds a row for few of them.
        if (member.any_unread()) rows.emplace_back(q.ColumnU64(0), member);
      }
    }
    uint64_t total = 0;
    for (const auto& [conversation_id, member] : rows) {
      Result<uint64_t> unread = Unread(conversation_id, member);
      if (!unread.ok()) return unread.status();
      total += *unread;
    }
    return total;
  }

  // What a conversation's row says of its stored user messages.
  struct UserCounts {
    Seq last_seq = 0;
    Seq first_seq = 0;                // 0: nothing stored
    uint64_t user_messages = 0;       // the user_ordinal of the message at last_seq
    uint64_t gone_user_messages = 0;  // that of the last message retention deleted
  };

  // What a member's unread count in a conversation depends on, as stored.
  struct MemberCounts {
    UserCounts counts;
    Seq joined_seq = 0;
    Seq removed_at_seq = 0;  // non-zero: removed at this seq
    Seq sent_seq = 0;        // the member's own last user message
    Seq read_seq = 0;        // the highest over its devices
    // A removed member sees the log up to its removal.
    Seq last_seq() const {
      return removed_at_seq != 0 ? std::min(counts.last_seq, removed_at_seq) : counts.last_seq;
    }
    Seq read_mark() const { return std::min(read_seq, last_seq()); }
    // Where others' unread messages start: above what the member read, its own last message
    // (whoever replies has seen what came before) and its join.
    Seq unread_above() const {
      return std::max({read_mark(), joined_seq == 0 ? 0 : joined_seq - 1, sent_seq});
    }
    bool any_unread() const { return unread_above() < last_seq(); }
  };

  // Others' user messages above member.unread_above(), up to what the member may read. Two
  // lookups at most, however many are unread; none when nothing is.
  Result<uint64_t> Unread(ConversationId conversation_id, const MemberCounts& member) {
    if (!member.any_unread()) return uint64_t{0};
    const Seq last = member.last_seq();
    const Seq above = member.unread_above();
    Result<uint64_t> through_last = UserMessagesThrough(conversation_id, last, member.counts);
    if (!through_last.ok()) return through_last.status();
    Result<uint64_t> through_above = UserMessagesThrough(conversation_id, above, member.counts);
    if (!through_above.ok()) return through_above.status();
    return *through_last > *through_above ? *through_last - *through_above : 0;
  }

  // The number of user messages up to `seq` (counting from the stored ones on): the
  // user_ordinal of the message there, or of the nearest one stored below should that row be
  // missing (a damaged file counts the missing rows too, rather than failing every read that
  // counts).
  // Those retention deleted are left out of every count alike.
  Result<uint64_t> UserMessagesThrough(ConversationId conversation_id, Seq seq,
                                       const UserCounts& counts) {
    if (seq >= counts.last_seq) return counts.user_messages;
    if (counts.first_seq == 0 || seq < counts.first_seq) return counts.gone_user_messages;
    Query q(conn_, Sql::kUserOrdinal);
    q.U64(conversation_id).U64(seq);
    Result<bool> row = q.Step();
    if (!row.ok()) return row.status();
    return *row ? q.ColumnU64(1) : counts.gone_user_messages;
  }

  Status ReadAscending(ConversationId conversation_id, Seq from_seq, Seq to_seq, size_t max,
                       std::vector<Message>* out) override {
    Query q(conn_, Sql::kRangeAscending);
    q.U64(conversation_id).U64(from_seq).U64(to_seq).Int(Limit(max));
    return ReadMessages(q, out);
  }

  Status ReadDescending(ConversationId conversation_id, Seq before_seq, size_t max,
                        std::vector<Message>* out) override {
    // A page is small and usually full: one allocation instead of moving every Message again
    // each time the vector grows.
    out->reserve(out->size() + std::min<size_t>(max, kReservePageMax));
    Query q(conn_, Sql::kRangeDescending);
    q.U64(conversation_id).U64(before_seq).Int(Limit(max));
    return ReadMessages(q, out);
  }

  Status Watermarks(ConversationId conversation_id, const UserId& only,
                    std::vector<MemberReceipt>* out) override {
    Query q(conn_, only.empty() ? Sql::kWatermarks : Sql::kWatermarksOf);
    q.U64(conversation_id);
    if (!only.empty()) q.Text(only);
    for (;;) {
      Result<bool> row = q.Step();
      if (!row.ok()) return row.status();
      if (!*row) return Status::Ok();
      out->push_back(
          {q.ColumnBytes(0), static_cast<Role>(q.ColumnInt(1)), q.ColumnU64(2), q.ColumnU64(3)});
    }
  }

  Result<std::optional<server::DeviceMarks>> ReceiptStart(ConversationId conversation_id,
                                                          const UserId& user,
                                                          const DeviceId& device) override {
    Query q(conn_, Sql::kReceiptStart);
    q.U64(conversation_id).Text(user);
    std::optional<server::DeviceMarks> out;
    for (;;) {
      Result<bool> row = q.Step();
      if (!row.ok()) return row.status();
      if (!*row) return out;
      if (!out) out = server::DeviceMarks{{user, static_cast<Role>(q.ColumnInt(0)), 0, 0}, 0};
      // No cursor yet: one row of NULLs, which read as 0.
      const Seq delivered = q.ColumnU64(2);
      out->user.delivered_seq = std::max(out->user.delivered_seq, delivered);
      out->user.read_seq = std::max(out->user.read_seq, q.ColumnU64(3));
      if (q.ColumnView(1) == device) out->device_delivered_seq = delivered;
    }
  }

  Result<bool> SharesConversation(const UserId& a, const UserId& b) override {
    Query q(conn_, Sql::kSharesConversation);
    q.Text(a).Text(b);
    return q.Step();
  }

  Result<int64_t> LastSeen(const UserId& user) override {
    Query q(conn_, Sql::kLastSeen);
    q.Text(user);
    Result<bool> row = q.Step();
    if (!row.ok()) return row.status();
    return *row ? q.ColumnInt(0) : int64_t{0};
  }

  Status PushTokens(const UserId& user, std::vector<PushToken>* out) override {
    Query q(conn_, Sql::kPushTokens);
    q.Text(user);
    for (;;) {
      Result<bool> row = q.Step();
      if (!row.ok()) return row.status();
      if (!*row) return Status::Ok();
      out->push_back(PushToken{q.ColumnBytes(0), q.ColumnBytes(1), q.ColumnBytes(2)});
    }
  }

 private:
  static int64_t Limit(size_t max) {
    return static_cast<int64_t>(std::min<size_t>(max, size_t{INT64_MAX}));
  }

  Connection& conn_;
  WriterCache* const cache_;
};

// The statements of log0 and log1, indexed by the log's number.
constexpr std::array<Sql, 2> kInsertLog = {Sql::kInsertLog0, Sql::kInsertLog1};
constexpr std::array<Sql, 2> kCountLog = {Sql::kCountLog0, Sql::kCountLog1};
constexpr std::array<Sql, 2> kSliceEnd = {Sql::kSliceEnd0, Sql::kSliceEnd1};
constexpr std::array<Sql, 2> kMergeLog = {Sql::kMergeLog0, Sql::kMergeLog1};
constexpr std::array<Sql, 2> kClearLog = {Sql::kClearLog0, Sql::kClearLog1};

// Bound of SqliteStoreOptions::recent_log_rows: a log is read through its index by every
// History and Sync, and the writer keeps its pages in its cache.
constexpr uint32_t kMaxRecentLogRows = 1'000'000;

// A commit copies this many log rows for each row it added (see MergeSteps): more than one, so
// a merge finishes before the active log fills, with the switch and the emptying commit in it.
constexpr uint64_t kMergePace = 2;

// Past this many bytes of rows (LogRowBytes) the active log is switched as if it held
// recent_log_rows, so large messages or long ids do not make a log of gigabytes.
constexpr uint64_t kMaxLogBytes = uint64_t{32} << 20;
constexpr uint64_t kLogRowBytes = 128;  // what a row costs besides its variable-length columns

// What a log row of `m` takes, about: its variable-length columns (CHAT_LOG_ROW_BYTES counts the
// same of stored rows) and kLogRowBytes for the rest (integers, headers, its index entry).
uint64_t LogRowBytes(const Message& m, size_t encoded_bytes) {
  return encoded_bytes + m.sender.size() + m.sender_device.size() + m.client_msg_id.size() +
         m.content_type.size() + kLogRowBytes;
}
// A message with more bytes than this in its body, attachments and system event goes straight
// into messages: it fills pages of its own anyway, and through the log it would be written
// three times (log, copy, zeroing).
constexpr size_t kLogBodyMax = 4096;

// (conversation_id, seq) of a log row; the merge copies rows in this order.
struct LogKey {
  int64_t conversation_id = 0;
  int64_t seq = 0;
};

// The writer's copy of log_state, and how much the active log holds (counted at open and by
// every committed insert into it).
struct LogState {
  int active = 0;
  std::optional<LogKey> merged;  // nullopt: the other log is empty
  uint64_t active_rows = 0;
  uint64_t active_bytes = 0;
};

class SqliteTarget final : public server::AppendTarget {
 public:
  // `insert`: the statement that stores a new message (into the active log, or into messages).
  SqliteTarget(Connection& conn, WriterCache& cache, Sql insert)
      : conn_(conn), cache_(cache), reader_(conn, &cache), insert_(insert) {}

  server::ReadSource& Reader() override { return reader_; }

  // Messages stored through Insert; of them, those that went into the log, and their
  // LogRowBytes.
  uint64_t inserted_rows() const { return inserted_rows_; }
  uint64_t logged_rows() const { return logged_rows_; }
  uint64_t logged_bytes() const { return logged_bytes_; }

  Result<std::optional<Message>> FindByKey(const UserId& sender,
                                           const std::string& client_msg_id) override {
    ConversationId conversation_id = 0;
    Seq seq = 0;
    {
      Query q(conn_, Sql::kFindByKey);
      q.Text(sender).Text(client_msg_id);
      Result<bool> row = q.Step();
      if (!row.ok()) return row.status();
      if (!*row) return std::optional<Message>();
      conversation_id = q.ColumnU64(0);
      seq = q.ColumnU64(1);
      if (q.ColumnInt(4) > 0) {
        return std::optional<Message>(server::DeletedMessage(
            conversation_id, seq, q.ColumnU64(2), sender, client_msg_id, q.ColumnInt(3)));
      }
    }
    std::vector<Message> found;
    if (Status s = reader_.ReadAscending(conversation_id, seq, seq, 1, &found); !s.ok()) return s;
    if (found.empty()) {
      Status lost = DataLoss("client_msg_id " + client_msg_id + " of " + sender +
                             " names conversation " + std::to_string(conversation_id) + " seq " +
                             std::to_string(seq) + ", which is not stored");
      Log(LogLevel::kWarn, "chat: sqlite store: " + lost.ToString());
      return lost;
    }
    return std::optional<Message>(std::move(found.front()));
  }

  Result<ConversationId> FindDirect(const UserId& low, const UserId& high) override {
    if (const ConversationId known = cache_.FindDirect(low, high); known != 0) return known;
    Query q(conn_, Sql::kFindDirect);
    q.Text(low).Text(high);
    Result<int64_t> id = ScalarInt(q, 0);
    if (!id.ok()) return id.status();
    const auto found = static_cast<ConversationId>(*id);
    // An absent pair is not remembered: the batch may create it next.
    if (found != 0) cache_.PutDirect(low, high, found);
    return found;
  }

  Result<ConversationId> CreateDirect(const UserId& low, const UserId& high,
                                      int64_t now_ms) override {
    {
      Query q(conn_, Sql::kInsertConversation);
      q.Int(static_cast<int>(ConversationKind::kDirect)).Int(now_ms);
      if (Status s = q.Run(); !s.ok()) return s;
    }
    const auto id = static_cast<ConversationId>(conn_.LastInsertRowid());
    {
      Query q(conn_, Sql::kInsertDirect);
      q.Text(low).Text(high).U64(id);
      if (Status s = q.Run(); !s.ok()) return s;
    }
    for (const UserId* user : {&low, &high}) {
      Query q(conn_, Sql::kInsertMember);
      q.U64(id).Text(*user).Int(static_cast<int>(Role::kMember)).Int(0);
      if (Status s = q.Run(); !s.ok()) return s;
    }
    cache_.ForgetMembers(id);
    cache_.JoinUnread(low, id);
    cache_.JoinUnread(high, id);
    cache_.PutDirect(low, high, id);
    return id;
  }

  Result<ConversationId> CreateGroup(ConversationKind kind, const std::string& title,
                                     int64_t now_ms) override {
    Query q(conn_, Sql::kInsertGroup);
    q.Int(static_cast<int>(kind)).Text(title).Int(now_ms);
    if (Status s = q.Run(); !s.ok()) return s;
    return static_cast<ConversationId>(conn_.LastInsertRowid());
  }

  Status SetTitle(ConversationId conversation_id, const std::string& title) override {
    Query q(conn_, Sql::kSetTitle);
    q.U64(conversation_id).Text(title);
    return q.Run();
  }

  Status PutMember(ConversationId conversation_id, const UserId& user, Role role,
                   Seq joined_seq) override {
    cache_.ForgetMembers(conversation_id);
    cache_.JoinUnread(user, conversation_id);  // a re-added member: ForgetMembers restamps it
    {
      Query count(conn_, Sql::kCountMemberIn);  // before the row says it is current
      count.U64(conversation_id).Text(user);
      if (Status s = count.Run(); !s.ok()) return s;
    }
    Query q(conn_, Sql::kPutMember);
    q.U64(conversation_id).Text(user).Int(static_cast<int>(role)).U64(joined_seq);
    return q.Run();
  }

  Status SetRole(ConversationId conversation_id, const UserId& user, Role role) override {
    cache_.ForgetMembers(conversation_id);
    Query q(conn_, Sql::kSetRole);
    q.U64(conversation_id).Text(user).Int(static_cast<int>(role));
    return q.Run();
  }

  Status RemoveMember(ConversationId conversation_id, const UserId& user, Seq seq) override {
    cache_.ForgetMembers(conversation_id);
    {
      Query count(conn_, Sql::kCountMemberOut);  // while the row still says it is current
      count.U64(conversation_id).Text(user);
      if (Status s = count.Run(); !s.ok()) return s;
    }
    Query q(conn_, Sql::kRemoveMember);
    q.U64(conversation_id).Text(user).U64(seq);
    return q.Run();
  }

  Result<uint64_t> MemberCount(ConversationId conversation_id) override {
    Query q(conn_, Sql::kMemberCount);
    q.U64(conversation_id);
    Result<int64_t> count = ScalarInt(q, 0);
    if (!count.ok()) return count.status();
    return static_cast<uint64_t>(*count);
  }

  Status PutCursor(ConversationId conversation_id, const UserId& user, const DeviceId& device,
                   Seq delivered_seq, Seq read_seq) override {
    cache_.StaleUnread(user, conversation_id);
    Query q(conn_, Sql::kPutCursor);
    q.U64(conversation_id).Text(user).Text(device).U64(delivered_seq).U64(read_seq);
    return q.Run();
  }

  // The user's counts are kept between receipts: only the conversations whose stamp changed
  // since are counted again, and the list of the user's conversations is read again only after
  // it joined one (or the cache was dropped).
  Result<uint64_t> UserUnreadTotal(const UserId& user, const DeviceId& device,
                                   const ConversationInfo& known) override {
    WriterCache::UserUnread* kept = cache_.FindUnread(user);
    if (kept == nullptr || !kept->contains(known.conversation_id)) {
      std::vector<ConversationHead> heads;
      if (Status s = reader_.UserConversations(user, &heads); !s.ok()) return s;
      WriterCache::UserUnread counts;
      counts.reserve(heads.size());
      for (const ConversationHead& head : heads) counts.try_emplace(head.conversation_id);
      cache_.PutUnread(user, std::move(counts));  // each to be counted (stamp 0)
      kept = cache_.FindUnread(user);
      if (kept == nullptr) {  // more than the cache may hold: counted every time
        return server::UnreadTotal(reader_, user, device, heads, &known);
      }
    }
    // `kept` stays valid through the loop: Stamp and Describe (a read of the connection, which
    // never reaches the cache) leave the users' counts alone.
    uint64_t total = 0;
    for (auto& [conversation_id, counted] : *kept) {
      const uint64_t stamp = cache_.Stamp(conversation_id);
      if (conversation_id == known.conversation_id) {
        counted = {stamp, known.unread};
      } else if (counted.stamp != stamp) {
        Result<ConversationInfo> info =
            reader_.Describe(conversation_id, user, device, /*count_unread=*/true);
        if (!info.ok()) return info.status();
        counted = {stamp, info->unread};
      }
      total += counted.unread;
    }
    return total;
  }

  // With the lowest marks known from the last receipt and how many members hold each, a move
  // from above them changes nothing and one from them only counts down: the members are read
  // again only when the last one at the lowest moves (a message every member has got).
  Result<server::LowestMove> MoveLowest(ConversationId conversation_id, const UserId& user,
                                        const MemberReceipt& before,
                                        const MemberReceipt& after) override {
    server::LowestCount* known = cache_.FindLowest(conversation_id);
    if (known != nullptr && before.delivered_seq >= known->marks.delivered_seq &&
        before.read_seq >= known->marks.read_seq) {
      bool emptied = false;
      if (before.delivered_seq == known->marks.delivered_seq &&
          after.delivered_seq > before.delivered_seq && --known->at_delivered == 0) {
        emptied = true;
      }
      if (before.read_seq == known->marks.read_seq && after.read_seq > before.read_seq &&
          --known->at_read == 0) {
        emptied = true;
      }
      if (!emptied) return Tell(conversation_id, known->marks);
    }
    std::vector<MemberReceipt> members;
    Query q(conn_, Sql::kCountedWatermarks);
    q.U64(conversation_id);
    for (;;) {
      Result<bool> row = q.Step();
      if (!row.ok()) return row.status();
      if (!*row) break;
      members.push_back(server::CountedFromJoin(
          {q.ColumnBytes(0), static_cast<Role>(q.ColumnInt(1)), q.ColumnU64(2), q.ColumnU64(3)},
          q.ColumnU64(4)));
    }
    const server::LowestCount now = server::CountLowest(members, user, after);
    cache_.PutLowest(conversation_id, now);
    return Tell(conversation_id, now.marks);
  }

  // The lowest marks are `now`: news when above what the members were told, which the
  // conversation's row keeps (in the batch's transaction, so a rollback takes it back too) and
  // the cache knows once it has read or written it.
  Result<server::LowestMove> Tell(ConversationId conversation_id, server::LowestMarks now) {
    std::optional<server::LowestMarks> told = cache_.FindTold(conversation_id);
    if (!told) {
      Query q(conn_, Sql::kTold);
      q.U64(conversation_id);
      Result<bool> row = q.Step();
      if (!row.ok()) return row.status();
      if (!*row) return Internal("receipt: the conversation's row is gone");
      told = server::LowestMarks{q.ColumnU64(0), q.ColumnU64(1)};  // 0 and 0 when nothing was
    }
    const bool news = server::RaiseTold(*told, now);
    cache_.PutTold(conversation_id, *told);
    if (news) {
      Query q(conn_, Sql::kSetTold);
      q.U64(conversation_id).U64(told->delivered_seq).U64(told->read_seq);
      if (Status s = q.Run(); !s.ok()) return s;
    }
    return server::LowestMove{now, news};
  }

  Result<Seq> LastSeq(ConversationId conversation_id) override {
    Result<WriterCache::Tail*> tail = FindTail(conversation_id);
    if (!tail.ok()) return tail.status();
    return (*tail)->last_seq;
  }

  Status Insert(const Message& m) override {
    cache_.Touch(m.conversation_id);
    if (!m.client_msg_id.empty()) {
      Query q(conn_, Sql::kInsertKey);
      q.Text(m.client_msg_id).Text(m.sender).U64(m.conversation_id).U64(m.seq);
      if (Status s = q.Run(); !s.ok()) {
        // The key is taken: the statement stored nothing and the transaction goes on.
        if (sqlite3_extended_errcode(conn_.raw()) == SQLITE_CONSTRAINT_PRIMARYKEY) {
          return AlreadyExists("client_msg_id is already stored for this sender");
        }
        return s;
      }
    }
    Result<WriterCache::Tail*> found = FindTail(m.conversation_id);
    if (!found.ok()) return found.status();
    WriterCache::Tail& tail = **found;
    const bool user_message = m.kind == MessageKind::kUser;
    const uint64_t user_ordinal = tail.user_messages + (user_message ? 1 : 0);
    const std::string attachments = EncodeAttachments(m.attachments);
    const std::string system = EncodeSystem(m);
    // Attachments count with the body (their strings may take most of max_body_bytes).
    const size_t row_bytes = m.body.size() + attachments.size() + system.size();
    const bool logged = insert_ != Sql::kInsertMessage && row_bytes <= kLogBodyMax;
    {
      Query q(conn_, logged ? insert_ : Sql::kInsertMessage);
      q.U64(m.conversation_id)
          .U64(m.seq)
          .U64(m.message_id)
          .Text(m.sender)
          .Text(m.sender_device)
          .Text(m.client_msg_id)
          .Int(m.server_time_ms)
          .Int(static_cast<int>(m.kind))
          .Text(m.content_type)
          .Blob(m.body)
          .Blob(attachments, /*null_if_empty=*/true)
          .Blob(system, /*null_if_empty=*/true)
          .U64(user_ordinal);
      if (Status s = q.Run(); !s.ok()) return s;
    }
    ++inserted_rows_;
    if (logged) {
      ++logged_rows_;
      logged_bytes_ += LogRowBytes(m, row_bytes);
    }
    // The sender has seen what came before its own message: unread counts start above it.
    if (user_message) {
      if (Status s = NoteSender(m, &tail.senders); !s.ok()) return s;
    }
    Query q(conn_, Sql::kAdvanceConversation);
    q.U64(m.conversation_id)
        .U64(m.seq)
        .Int(m.server_time_ms)
        .U64(user_ordinal)
        .Text(tail.senders[0].user)
        .U64(tail.senders[0].seq)
        .Text(tail.senders[1].user)
        .U64(tail.senders[1].seq);
    if (Status s = q.Run(); !s.ok()) return s;
    // In place: the cache is the row's copy (a failed statement rolls the batch back and clears
    // the cache).
    tail.last_seq = m.seq;
    tail.user_messages = user_ordinal;
    return Status::Ok();
  }

  Result<std::vector<UserId>> Members(ConversationId conversation_id) override {
    if (const std::vector<UserId>* known = cache_.FindMembers(conversation_id)) return *known;
    Result<std::vector<UserId>> members = ReadMembers(conn_, conversation_id);
    if (members.ok()) cache_.PutMembers(conversation_id, *members);
    return members;
  }

  Status PutLastSeen(const UserId& user, int64_t last_seen_ms) override {
    Query q(conn_, Sql::kPutLastSeen);
    q.Text(user).Int(last_seen_ms);
    return q.Run();
  }

  Status SetConversationRetention(ConversationId conversation_id, int64_t retention_ms) override {
    Query q(conn_, Sql::kSetRetention);
    q.U64(conversation_id).Int(retention_ms);
    return q.Run();
  }

  Status PutPushToken(const UserId& user, const DeviceId& device, const std::string& platform,
                      const std::string& token, int64_t now_ms, uint32_t max_devices) override {
    {
      Query q(conn_, Sql::kPutPushToken);
      q.Text(user).Text(device).Text(platform).Text(token).Int(now_ms);
      if (Status s = q.Run(); !s.ok()) return s;
    }
    if (max_devices == 0) return Status::Ok();
    Query q(conn_, Sql::kTrimPushTokens);
    q.Text(user).Text(device).Int(int64_t{max_devices} - 1);
    return q.Run();
  }

  Status DeletePushToken(const UserId& user, const DeviceId& device) override {
    Query q(conn_, Sql::kDeletePushToken);
    q.Text(user).Text(device);
    return q.Run();
  }

 private:
  Result<WriterCache::Tail*> FindTail(ConversationId conversation_id) {
    if (WriterCache::Tail* known = cache_.FindTail(conversation_id)) return known;
    Query q(conn_, Sql::kLastSeq);
    q.U64(conversation_id);
    Result<bool> row = q.Step();
    if (!row.ok()) return row.status();
    if (!*row) {
      return Internal("conversation " + std::to_string(conversation_id) + " has no row");
    }
    return cache_.PutTail(conversation_id, {q.ColumnU64(0),
                                            q.ColumnU64(1),
                                            {WriterCache::Sent{q.ColumnBytes(2), q.ColumnU64(3)},
                                             WriterCache::Sent{q.ColumnBytes(4), q.ColumnU64(5)}}});
  }

  // Message m's sender takes the first place of the conversation's two latest senders (its
  // sent_seq is m's seq); a sender pushed out of both places has its sent_seq written to its
  // member row, which is where Describe reads it for anyone not in them.
  Status NoteSender(const Message& m, std::array<WriterCache::Sent, 2>* senders) {
    auto& [latest, earlier] = *senders;
    if (latest.user != m.sender) {
      if (earlier.user == m.sender) {
        std::swap(latest, earlier);  // a reply in a two-sided exchange: no string copied
      } else {
        if (!earlier.user.empty()) {
          Query q(conn_, Sql::kMarkSent);
          q.U64(m.conversation_id).Text(earlier.user).U64(earlier.seq);
          if (Status s = q.Run(); !s.ok()) return s;
        }
        earlier = std::move(latest);
        latest.user = m.sender;
      }
    }
    latest.seq = m.seq;
    return Status::Ok();
  }

  Connection& conn_;
  WriterCache& cache_;
  SqliteSource reader_;
  const Sql insert_;
  uint64_t inserted_rows_ = 0;
  uint64_t logged_rows_ = 0;
  uint64_t logged_bytes_ = 0;
};

uint64_t NewEpoch() {
  uint64_t epoch = 0;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(&epoch), sizeof(epoch)) != 1) {
    std::random_device rd;
    epoch = (uint64_t{rd()} << 32) | rd();
  }
  // 0 reads as "no epoch known" on a client; never hand it out.
  return epoch == 0 ? 1 : epoch;
}

class SqliteStore final : public MessageStore {
 public:
  static Result<std::shared_ptr<MessageStore>> Open(const SqliteStoreOptions& options) {
    if (options.path.empty()) return InvalidArgument("path is required");
    if (options.reader_connections == 0) {
      return InvalidArgument("reader_connections must be at least 1");
    }
    if (options.cache_size_kib == 0) return InvalidArgument("cache_size_kib must be at least 1");
    if (options.writer_cache_size_kib == 0) {
      return InvalidArgument("writer_cache_size_kib must be at least 1");
    }
    if (options.mmap_size_bytes > uint64_t{INT64_MAX}) {
      return InvalidArgument("mmap_size_bytes must be at most 2^63 - 1");
    }
    if (options.recent_log_rows > kMaxRecentLogRows) {
      return InvalidArgument("recent_log_rows must be at most 1,000,000");
    }
    if (options.recent_log_slice_rows == 0 || options.recent_log_slice_rows > kMaxRecentLogRows) {
      return InvalidArgument("recent_log_slice_rows must be 1 to 1,000,000");
    }
    Result<std::unique_ptr<Connection>> writer =
        Connection::Open(options.path, /*read_only=*/false, options.busy_timeout_ms);
    if (!writer.ok()) return writer.status();
    Connection& w = **writer;
    if (Status s = ConfigureCache(w, options.writer_cache_size_kib, options); !s.ok()) return s;

    // The version is checked before anything is changed, so a newer file is left untouched.
    {
      Query q(w, Sql::kUserVersion);
      Result<int64_t> version = ScalarInt(q, 0);
      if (!version.ok()) return version.status();
      if (*version > kSchemaVersion) return TooNew(*version);
    }
    if (Status s = EnableWal(w, options.path); !s.ok()) return s;
    if (Status s = w.Exec(
            options.synchronous_full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL",
            "set synchronous");
        !s.ok()) {
      return s;
    }
    if (Status s = Migrate(w); !s.ok()) return s;
    // The merge's savepoint keeps the original of every page it changes in a statement journal,
    // which SQLite spills to a temporary file past 64 KiB (an open, writes and an unlink every
    // few commits). In memory it is bounded by what one merge step changes. Set after the
    // migrations, whose index builds over a whole store sort in temporary files.
    if (Status s = w.Exec("PRAGMA temp_store=MEMORY", "keep temporary data in memory"); !s.ok()) {
      return s;
    }
    // Checkpoints run on a thread of their own (see Checkpointer), not inside a commit.
    if (Status s = w.Exec("PRAGMA wal_autocheckpoint=0", "turn off inline checkpoints"); !s.ok()) {
      return s;
    }

    uint64_t epoch = 0;
    {
      Query q(w, Sql::kGetEpoch);
      Result<bool> row = q.Step();
      if (!row.ok()) return row.status();
      if (!*row) return DataLoss("store has no epoch: " + options.path);
      epoch = q.ColumnU64(0);
    }
    Result<LogState> log = ReadLogState(w);
    if (!log.ok()) return log.status();

    std::vector<std::unique_ptr<Connection>> readers;
    for (uint32_t i = 0; i < options.reader_connections; ++i) {
      Result<std::unique_ptr<Connection>> reader =
          Connection::Open(options.path, /*read_only=*/true, options.busy_timeout_ms);
      if (!reader.ok()) return reader.status();
      if (Status s = ConfigureCache(**reader, options.cache_size_kib, options); !s.ok()) return s;
      readers.push_back(std::move(*reader));
    }
    Result<std::unique_ptr<Connection>> checkpointer =
        Connection::Open(options.path, /*read_only=*/false, options.busy_timeout_ms);
    if (!checkpointer.ok()) return checkpointer.status();
    if (Status s = (*checkpointer)
                       ->Exec(options.synchronous_full ? "PRAGMA synchronous=FULL"
                                                       : "PRAGMA synchronous=NORMAL",
                              "set synchronous");
        !s.ok()) {
      return s;
    }
    return std::shared_ptr<MessageStore>(
        new SqliteStore(epoch, std::move(*writer), std::move(readers), std::move(*checkpointer),
                        *log, options.recent_log_rows, options.recent_log_slice_rows));
  }

  uint64_t Epoch() const override { return epoch_; }

  Status Append(std::span<const AppendRequest> batch, std::vector<AppendResult>* results) override {
    results->clear();
    results->resize(batch.size());
    std::lock_guard lock(writer_mu_);
    LogState next = log_;
    Status s = Begin(*writer_, Sql::kBeginImmediate);
    if (s.ok()) {
      // Into the active log, unless the store stores straight into messages or the log is twice
      // its size (merge steps have been failing): then into messages, which readers see too.
      const bool to_log = log_rows_ > 0 && log_.active_rows < 2 * uint64_t{log_rows_} &&
                          log_.active_bytes < 2 * kMaxLogBytes;
      SqliteTarget target(*writer_, cache_, to_log ? kInsertLog[log_.active] : Sql::kInsertMessage);
      for (size_t i = 0; i < batch.size() && s.ok(); ++i) {
        s = server::AppendOne(target, batch[i], &(*results)[i]);
      }
      next.active_rows += target.logged_rows();
      next.active_bytes += target.logged_bytes();
      if (s.ok()) {
        Result<LogState> merged = MergeSteps(next, target.inserted_rows());
        s = merged.status();
        if (s.ok()) next = *merged;
      }
      if (s.ok()) s = Query(*writer_, Sql::kCommit).Run();
      // After a failed COMMIT the transaction may still be open (SQLITE_BUSY) or already
      // rolled back by SQLite; ROLLBACK covers the first and harmlessly fails in the second.
      if (!s.ok()) {
        (void)Query(*writer_, Sql::kRollback).Run();
        // The cache may hold what the rolled-back statements wrote.
        cache_.Clear();
      }
    }
    if (!s.ok()) {
      results->clear();
      return s;
    }
    log_ = next;
    return s;
  }

  // Moves log rows on, inside the batch's transaction (no commit of their own), copying
  // kMergePace times as many rows as the batch added (at least one), so the merge keeps ahead of
  // the inserts while each commit's share stays in proportion to it: the logs switch once the
  // active one is full and the other empty, and the other one's rows are copied into messages in
  // slices of at most recent_log_slice_rows, in conversation and seq order, so a leaf of messages
  // is written once for all of its conversation's rows in the slice rather than once per commit
  // that added one; the last slice empties that log. The steps run under a savepoint: when they
  // fail, they are undone and the batch commits anyway (the messages are stored either way; the
  // next batch tries again). Returns the state after the steps; an error only when the savepoint
  // could not be undone.
  Result<LogState> MergeSteps(const LogState& state, uint64_t batch_rows) {
    const uint64_t full_rows = std::max<uint64_t>(log_rows_, 1);
    auto full = [&](const LogState& st) {
      return st.active_rows >= full_rows || st.active_bytes >= kMaxLogBytes;
    };
    if (!state.merged.has_value() && !full(state)) return state;
    if (Status s = Query(*writer_, Sql::kSavepoint).Run(); !s.ok()) return s;
    LogState next = state;
    Status s;
    // With no log in use (recent_log_rows 0), what is left of one goes a slice per commit.
    uint64_t budget = std::max<uint64_t>(kMergePace * batch_rows, log_rows_ == 0 ? slice_rows_ : 1);
    while (s.ok()) {
      if (!next.merged.has_value()) {
        if (!full(next)) break;
        s = Query(*writer_, Sql::kSwitchLog).Run();
        next.active = 1 - next.active;
        next.merged = LogKey{};
        next.active_rows = 0;
        next.active_bytes = 0;
        continue;
      }
      if (budget == 0) break;
      Result<uint64_t> copied =
          MergeSlice(1 - next.active, std::min<uint64_t>(budget, slice_rows_), &next.merged);
      s = copied.status();
      if (s.ok()) budget -= std::min(budget, *copied);
    }
    if (s.ok()) s = Query(*writer_, Sql::kRelease).Run();
    if (s.ok()) {
      merge_failing_ = false;
      return next;
    }
    if (!merge_failing_) {
      Log(LogLevel::kWarn,
          "chat: moving logged messages into messages failed (messages are stored; retried "
          "with the next batch): " +
              s.ToString());
    }
    merge_failing_ = true;
    if (Status undo = Query(*writer_, Sql::kRollbackTo).Run(); !undo.ok()) return undo;
    if (Status undo = Query(*writer_, Sql::kRelease).Run(); !undo.ok()) return undo;
    return state;
  }

  // Copies the next `limit` rows of log `other` past `*merged` into messages and advances
  // `*merged`; when fewer are left, copies the rest, empties the log and resets `*merged`.
  // Returns how many rows were copied.
  Result<uint64_t> MergeSlice(int other, uint64_t limit, std::optional<LogKey>* merged) {
    const LogKey from = **merged;
    std::optional<LogKey> to;
    {
      Query q(*writer_, kSliceEnd[other]);
      q.Int(from.conversation_id).Int(from.seq).Int(static_cast<int64_t>(limit) - 1);
      Result<bool> row = q.Step();
      if (!row.ok()) return row.status();
      // The slice's last row; none when fewer than `limit` are left.
      if (*row) to = LogKey{q.ColumnInt(0), q.ColumnInt(1)};
    }
    uint64_t copied = 0;
    {
      Query q(*writer_, kMergeLog[other]);
      const LogKey end = to.value_or(LogKey{INT64_MAX, INT64_MAX});
      q.Int(from.conversation_id).Int(from.seq).Int(end.conversation_id).Int(end.seq);
      if (Status s = q.Run(); !s.ok()) return s;
      copied = static_cast<uint64_t>(sqlite3_changes64(writer_->raw()));
    }
    if (to.has_value()) {
      Query q(*writer_, Sql::kSetMerged);
      q.Int(to->conversation_id).Int(to->seq);
      if (Status s = q.Run(); !s.ok()) return s;
      *merged = to;
      return copied;
    }
    if (Status st = Query(*writer_, kClearLog[other]).Run(); !st.ok()) return st;
    if (Status st = Query(*writer_, Sql::kMergeFinished).Run(); !st.ok()) return st;
    merged->reset();
    return copied;
  }

  static Result<LogState> ReadLogState(Connection& conn) {
    LogState out;
    {
      Query q(conn, Sql::kLogState);
      Result<bool> row = q.Step();
      if (!row.ok()) return row.status();
      if (!*row) return DataLoss("the store has no log_state row");
      out.active = static_cast<int>(q.ColumnInt(0));
      if (out.active != 0 && out.active != 1) return DataLoss("log_state names no log");
      if (!q.ColumnNull(1)) out.merged = LogKey{q.ColumnInt(1), q.ColumnInt(2)};
    }
    Query q(conn, kCountLog[out.active]);
    Result<bool> row = q.Step();
    if (!row.ok()) return row.status();
    out.active_rows = q.ColumnU64(0);
    out.active_bytes = static_cast<uint64_t>(q.ColumnDouble(1)) + out.active_rows * kLogRowBytes;
    return out;
  }

  Result<SweepResult> DeleteExpired(const SweepRequest& request) override {
    if (Status s = server::ValidateSweep(request); !s.ok()) return s;
    std::lock_guard lock(writer_mu_);
    SweepResult result;
    LogState next = log_;
    Status s = Begin(*writer_, Sql::kBeginImmediate);
    if (s.ok()) {
      s = Sweep(request, &result);
      if (s.ok() && result.deleted > 0) {
        // Rows it deleted from the active log no longer count toward its size (else the log
        // would be switched and merged early, by what retention already removed).
        Result<LogState> counted = ReadLogState(*writer_);
        s = counted.status();
        if (s.ok()) next = *counted;
      }
      if (s.ok()) s = Query(*writer_, Sql::kCommit).Run();
      if (!s.ok()) (void)Query(*writer_, Sql::kRollback).Run();
    }
    if (!s.ok()) return s;
    log_ = next;
    return result;
  }

  Status SetRetention(ConversationId conversation_id, int64_t retention_ms) override {
    if (Status s = server::CheckRetention(retention_ms); !s.ok()) return s;
    std::lock_guard lock(writer_mu_);
    {
      Query q(*writer_, Sql::kConversationExists);
      q.U64(conversation_id);
      Result<bool> exists = q.Step();
      if (!exists.ok()) return exists.status();
      if (!*exists) {
        return NotFound("conversation " + std::to_string(conversation_id) + " does not exist");
      }
    }
    Query q(*writer_, Sql::kSetRetention);
    q.U64(conversation_id).Int(retention_ms);
    return q.Run();
  }

  Result<SyncReply> Sync(const SyncQuery& query) override {
    return WithReader<SyncReply>([&](Connection& conn) {
      SqliteSource source(conn);
      return server::RunSync(source, query);
    });
  }

  // One read transaction for all of them: RunSyncMany needs one snapshot.
  void SyncMany(std::span<const SyncQuery> queries, const SyncDone& done) override {
    size_t answered = 0;
    Result<bool> ran = WithReader<bool>([&](Connection& conn) -> Result<bool> {
      SqliteSource source(conn);
      server::RunSyncMany(
          source, queries,
          [&](size_t i, Result<SyncReply> reply) {
            ++answered;
            done(i, std::move(reply));
          },
          // After some errors SQLite rolls the read transaction back by itself.
          [&] { return sqlite3_get_autocommit(conn.raw()) != 0; });
      return true;
    });
    const Status failure = ran.ok() ? Internal("SyncMany left a query unanswered") : ran.status();
    for (size_t i = answered; i < queries.size(); ++i) done(i, failure);
  }

  Result<HistoryReply> History(const HistoryQuery& query) override {
    return WithReader<HistoryReply>([&](Connection& conn) {
      SqliteSource source(conn);
      return server::RunHistory(source, query);
    });
  }

  Result<ReceiptsReply> Receipts(const ReceiptsQuery& query) override {
    return WithReader<ReceiptsReply>([&](Connection& conn) {
      SqliteSource source(conn);
      return server::RunReceipts(source, query);
    });
  }

  Result<PresenceReply> Presence(const PresenceQuery& query) override {
    return WithReader<PresenceReply>([&](Connection& conn) {
      SqliteSource source(conn);
      return server::RunPresence(source, query);
    });
  }

  Result<std::vector<UserId>> Members(ConversationId conversation_id) override {
    return WithReader<std::vector<UserId>>([&](Connection& conn) -> Result<std::vector<UserId>> {
      Query q(conn, Sql::kConversationExists);
      q.U64(conversation_id);
      Result<bool> exists = q.Step();
      if (!exists.ok()) return exists.status();
      if (!*exists) {
        return NotFound("conversation " + std::to_string(conversation_id) + " does not exist");
      }
      return ReadMembers(conn, conversation_id);
    });
  }

  Result<std::vector<PushTarget>> PushTargets(std::span<const UserId> users) override {
    return WithReader<std::vector<PushTarget>>([&](Connection& conn) {
      SqliteSource source(conn);
      return server::RunPushTargets(source, users);
    });
  }

 private:
  SqliteStore(uint64_t epoch, std::unique_ptr<Connection> writer,
              std::vector<std::unique_ptr<Connection>> readers,
              std::unique_ptr<Connection> checkpointer, LogState log, uint32_t log_rows,
              uint32_t slice_rows)
      : epoch_(epoch),
        log_rows_(log_rows),
        slice_rows_(slice_rows),
        writer_(std::move(writer)),
        log_(log),
        readers_(std::move(readers)),
        checkpointer_(std::move(checkpointer)) {
    for (auto& reader : readers_) idle_.push_back(reader.get());
    // The store may be opened before the application blocks its signals.
    checkpoint_thread_ =
        StartThreadWithSignalsBlocked("chat-checkpoint", [this] { CheckpointLoop(); });
    sqlite3_wal_hook(writer_->raw(), &SqliteStore::OnWalCommit, this);
  }

 public:
  ~SqliteStore() override {
    sqlite3_wal_hook(writer_->raw(), nullptr, nullptr);
    {
      std::lock_guard lock(checkpoint_mu_);
      checkpoint_stop_ = true;
    }
    checkpoint_cv_.notify_one();
    checkpoint_thread_.join();
  }

 private:
  // Called by SQLite on the writer's thread after each commit with the WAL's size in pages.
  static int OnWalCommit(void* self, sqlite3* db, const char* /*schema*/, int pages) {
    if (pages >= kCheckpointWalMaxPages) {
      // The writer commits faster than the checkpoints complete (a WAL is started over only
      // when a checkpoint has copied all of it): copy it here, between two transactions, as
      // SQLite's own automatic checkpoint would, so the WAL stays bounded. A checkpoint the
      // thread is running would make this one SQLITE_BUSY: wait for it, then copy the rest.
      auto* store = static_cast<SqliteStore*>(self);
      std::lock_guard running(store->checkpoint_run_mu_);
      (void)sqlite3_wal_checkpoint_v2(db, nullptr, SQLITE_CHECKPOINT_PASSIVE, nullptr, nullptr);
    } else if (pages >= kCheckpointPages) {
      static_cast<SqliteStore*>(self)->RequestCheckpoint();
    }
    return SQLITE_OK;
  }

  void RequestCheckpoint() {
    {
      std::lock_guard lock(checkpoint_mu_);
      if (checkpoint_wanted_) return;
      checkpoint_wanted_ = true;
    }
    checkpoint_cv_.notify_one();
  }

  // Copies the WAL's pages back into the database file on a connection of its own. A PASSIVE
  // checkpoint never waits for the writer or the readers: commits go on appending to the WAL
  // meanwhile, and once every frame is copied the writer's next transaction starts the WAL
  // over from its beginning. Inline (SQLite's default) every thousandth page made one commit
  // wait for the copy and its fsyncs.
  void CheckpointLoop() {
    std::unique_lock lock(checkpoint_mu_);
    for (;;) {
      checkpoint_cv_.wait(lock, [this] { return checkpoint_stop_ || checkpoint_wanted_; });
      if (checkpoint_stop_) return;
      checkpoint_wanted_ = false;
      lock.unlock();
      int log_frames = 0;
      int copied_frames = 0;
      int rc = Checkpoint(&log_frames, &copied_frames);
      // The WAL starts over from its beginning only when a write transaction begins with every
      // frame copied. Under steady commits the pass above never gets there: by the writer's
      // next BEGIN it has appended more. So copy what is left with commits held off (a short
      // pause: most pages are in the database already); the next transaction then restarts
      // the WAL. Without this the WAL grew to the writer's own limit and every commit past
      // kCheckpointPages asked for another pass over the few frames written since the last.
      if (rc == SQLITE_OK && log_frames > 0 && log_frames - copied_frames <= kCheckpointTailPages) {
        std::lock_guard no_commits(writer_mu_);
        rc = Checkpoint(nullptr, nullptr);
      }
      if (rc != SQLITE_OK && (rc & 0xff) != SQLITE_BUSY) {
        Log(LogLevel::kWarn,
            "chat: sqlite checkpoint failed: " + checkpointer_->Error(rc, "checkpoint").ToString());
      }
      lock.lock();
    }
  }

  // A PASSIVE checkpoint on the checkpoint thread's connection: the WAL's size and how much of
  // it is now in the database, in frames.
  int Checkpoint(int* log_frames, int* copied_frames) {
    std::lock_guard running(checkpoint_run_mu_);
    return sqlite3_wal_checkpoint_v2(checkpointer_->raw(), nullptr, SQLITE_CHECKPOINT_PASSIVE,
                                     log_frames, copied_frames);
  }

  // One retention pass inside the writer's open transaction. The candidates are read first, so
  // no statement is stepping over a table while it is changed.
  Status Sweep(const SweepRequest& request, SweepResult* result) {
    struct Candidate {
      ConversationId conversation_id;
      Seq first_seq;
      int64_t retention_ms;
      ConversationKind kind;
    };
    struct DeletedKey {
      std::string client_msg_id;
      std::string sender;
      MessageId message_id;
      int64_t ts;
    };
    std::vector<Candidate> candidates;
    std::vector<DeletedKey> keys;
    {
      // Keys whose resend window is over go first, within the same bound (with the window at 0
      // too: keys kept under an earlier, longer window).
      Query q(*writer_, Sql::kDropKeys);
      q.Int(request.now_ms - request.resend_window_ms).Int(request.max_messages);
      if (Status s = q.Run(); !s.ok()) return s;
      result->keys_dropped = static_cast<uint64_t>(sqlite3_changes64(writer_->raw()));
      if (result->keys_dropped == request.max_messages) {
        result->has_more = true;
        return Status::Ok();
      }
    }
    {
      Query q(*writer_, Sql::kRetentionCandidates);
      q.Int(request.default_retention_ms);
      for (;;) {
        Result<bool> row = q.Step();
        if (!row.ok()) return row.status();
        if (!*row) break;
        candidates.push_back({q.ColumnU64(0), q.ColumnU64(1), q.ColumnInt(2),
                              static_cast<ConversationKind>(q.ColumnInt(3))});
      }
    }
    for (const Candidate& c : candidates) {
      // With no room left the scan still reads one row, to tell whether more is expired.
      const uint64_t room = request.max_messages - result->deleted - result->keys_dropped;
      const int64_t cutoff = request.now_ms - c.retention_ms;
      // Only the oldest run goes, so the stored range stays contiguous even if the clock that
      // stamped the messages stepped back. One row past the room tells what follows the cut.
      Seq through = 0;
      uint64_t gone_user_messages = 0;  // through's user_ordinal
      Seq next = 0;
      uint64_t expired = 0;
      keys.clear();
      {
        Query q(*writer_, Sql::kRetentionScan);
        q.U64(c.conversation_id).U64(c.first_seq).Int(static_cast<int64_t>(room) + 1);
        for (;;) {
          Result<bool> row = q.Step();
          if (!row.ok()) return row.status();
          if (!*row) break;
          if (expired == room || q.ColumnInt(1) >= cutoff) {
            next = q.ColumnU64(0);
            if (expired == room && q.ColumnInt(1) < cutoff) result->has_more = true;
            break;
          }
          through = q.ColumnU64(0);
          gone_user_messages = q.ColumnU64(5);
          ++expired;
          if (!q.ColumnView(2).empty()) {
            keys.push_back({std::string(q.ColumnView(2)), std::string(q.ColumnView(3)),
                            q.ColumnU64(4), q.ColumnInt(1)});
          }
        }
      }
      if (expired == 0) continue;
      // The keys stay for the resend window (without one they go with their messages).
      for (const DeletedKey& key : keys) {
        Query q(*writer_, request.resend_window_ms > 0 ? Sql::kBuryKey : Sql::kDeleteKey);
        q.Text(key.client_msg_id).Text(key.sender);
        if (request.resend_window_ms > 0) {
          q.U64(key.message_id).Int(key.ts).Int(server::KeyGoneMs(request.now_ms));
        }
        if (Status s = q.Run(); !s.ok()) return s;
      }
      for (Sql table : {Sql::kDeleteThrough, Sql::kDeleteThroughLog0, Sql::kDeleteThroughLog1}) {
        Query q(*writer_, table);
        q.U64(c.conversation_id).U64(through);
        if (Status s = q.Run(); !s.ok()) return s;
      }
      {
        cache_.Touch(c.conversation_id);
        Query q(*writer_, Sql::kSetFirstSeq);
        q.U64(c.conversation_id).U64(next).U64(gone_user_messages);
        if (Status s = q.Run(); !s.ok()) return s;
      }
      ExpiredRange& range = result->expired.emplace_back();
      range.conversation_id = c.conversation_id;
      range.kind = c.kind;
      range.first_seq = next;
      range.up_to_seq = through;
      if (c.kind != ConversationKind::kChannel) {
        // The writer's cache knows them if the conversation is busy. Otherwise they are read and
        // not kept: the cache is the send path's, and the cold conversations a pass goes through
        // (up to max_messages of them) would push its hot ones out.
        if (const std::vector<UserId>* known = cache_.FindMembers(c.conversation_id)) {
          range.recipients = *known;
        } else {
          Result<std::vector<UserId>> members = ReadMembers(*writer_, c.conversation_id);
          if (!members.ok()) return members.status();
          range.recipients = std::move(*members);
        }
      }
      result->deleted += expired;
      if (result->has_more) return Status::Ok();
    }
    return Status::Ok();
  }

  // The store's readers see the writer's commits through the WAL. SQLite quietly keeps another
  // journal mode where WAL cannot work (":memory:", where each connection would get a database
  // of its own; a file system without shared memory), so the mode it reports is checked.
  static Status EnableWal(Connection& w, const std::string& path) {
    std::string mode;
    if (Status s = w.Exec("PRAGMA journal_mode=WAL", "enable WAL", &mode); !s.ok()) return s;
    if (mode == "wal") return Status::Ok();
    return InvalidArgument("the SQLite store needs WAL mode, which \"" + path +
                           "\" cannot use (journal mode \"" + mode +
                           "\"): give the path of a file on a local file system");
  }

  // Sizes the connection's page cache (negative cache_size: KiB rather than pages) and its
  // memory map.
  static Status ConfigureCache(Connection& conn, uint32_t cache_kib,
                               const SqliteStoreOptions& options) {
    const std::string cache = "PRAGMA cache_size = -" + std::to_string(cache_kib);
    if (Status s = conn.Exec(cache.c_str(), "set cache_size"); !s.ok()) return s;
    const std::string mmap = "PRAGMA mmap_size = " + std::to_string(options.mmap_size_bytes);
    return conn.Exec(mmap.c_str(), "set mmap_size");
  }

  static Status TooNew(int64_t version) {
    return DataLoss("schema version " + std::to_string(version) +
                    " is newer than this build supports (" + std::to_string(kSchemaVersion) + ")");
  }

  // Brings the file to kSchemaVersion. The version is read again inside the write transaction
  // so two processes opening a new file at once do not both migrate it.
  static Status Migrate(Connection& w) {
    if (Status s = Query(w, Sql::kBeginImmediate).Run(); !s.ok()) return s;
    int64_t from = 0;  // the file's version
    Status s = [&]() -> Status {
      Result<int64_t> version = 0;
      {
        // Done with before the migrations run: a statement still open on the connection makes
        // DROP INDEX fail with "database table is locked".
        Query q(w, Sql::kUserVersion);
        version = ScalarInt(q, 0);
      }
      if (!version.ok()) return version.status();
      if (*version > kSchemaVersion) return TooNew(*version);
      from = *version;
      for (int64_t v = *version; v < kSchemaVersion; ++v) {
        if (Status m = w.Exec(kMigrations[static_cast<size_t>(v)], "migrate"); !m.ok()) {
          return m;
        }
        if (v == 0) {
          const std::string epoch = std::to_string(static_cast<int64_t>(NewEpoch()));
          const std::string sql = "INSERT INTO meta(key, value) VALUES('epoch', " + epoch + ")";
          if (Status e = w.Exec(sql.c_str(), "write epoch"); !e.ok()) return e;
        }
        const std::string pragma = "PRAGMA user_version = " + std::to_string(v + 1);
        if (Status p = w.Exec(pragma.c_str(), "set user_version"); !p.ok()) return p;
      }
      return Status::Ok();
    }();
    if (s.ok()) s = Query(w, Sql::kCommit).Run();
    if (!s.ok()) {
      (void)Query(w, Sql::kRollback).Run();
      return s;
    }
    // A migration of a store with data may have rewritten every message (8 numbers them): its
    // pages go into the database file now, and the WAL back to nothing, rather than in the
    // first commits' checkpoint while clients wait.
    if (from > 0 && from < kSchemaVersion) {
      return w.Exec("PRAGMA wal_checkpoint(TRUNCATE)", "checkpoint the migration");
    }
    return Status::Ok();
  }

  // Runs `fn` on an idle reader connection inside one read transaction (one snapshot).
  template <typename T, typename Fn>
  Result<T> WithReader(Fn fn) {
    Connection* conn = nullptr;
    {
      std::unique_lock lock(readers_mu_);
      readers_cv_.wait(lock, [&] { return !idle_.empty(); });
      conn = idle_.back();
      idle_.pop_back();
    }
    Result<T> result = [&]() -> Result<T> {
      if (Status s = Begin(*conn, Sql::kBegin); !s.ok()) return s;
      Result<T> r = fn(*conn);
      // Ending a read transaction only releases its snapshot; a failure here loses nothing.
      (void)Query(*conn, Sql::kCommit).Run();
      return r;
    }();
    {
      std::lock_guard lock(readers_mu_);
      idle_.push_back(conn);
    }
    readers_cv_.notify_one();
    return result;
  }

  const uint64_t epoch_;
  const uint32_t log_rows_;    // SqliteStoreOptions::recent_log_rows
  const uint32_t slice_rows_;  // SqliteStoreOptions::recent_log_slice_rows
  std::mutex writer_mu_;
  const std::unique_ptr<Connection> writer_;  // guarded by writer_mu_
  LogState log_;                              // guarded by writer_mu_
  bool merge_failing_ = false;                // guarded by writer_mu_; logged once per streak
  WriterCache cache_;                         // guarded by writer_mu_
  const std::vector<std::unique_ptr<Connection>> readers_;
  std::mutex readers_mu_;
  std::condition_variable readers_cv_;
  std::vector<Connection*> idle_;  // guarded by readers_mu_

  // Checkpoints start when a commit leaves this many pages in the WAL (16 MiB of 4 KiB pages).
  static constexpr int kCheckpointPages = 4000;
  // Past this the writer checkpoints itself (64 MiB of 4 KiB pages).
  static constexpr int kCheckpointWalMaxPages = 4 * kCheckpointPages;
  // A checkpoint that left at most this many frames uncopied copies them with commits held.
  // More means a reader holds an old snapshot (holding commits would not help) or the writer
  // outran the pass; either way the next commit asks for another pass.
  static constexpr int kCheckpointTailPages = 1000;
  const std::unique_ptr<Connection> checkpointer_;  // used by checkpoint_thread_ only
  std::mutex checkpoint_run_mu_;  // held while a checkpoint runs, by either thread
  std::mutex checkpoint_mu_;
  std::condition_variable checkpoint_cv_;
  bool checkpoint_wanted_ = false;  // guarded by checkpoint_mu_
  bool checkpoint_stop_ = false;    // guarded by checkpoint_mu_
  std::thread checkpoint_thread_;
};

}  // namespace

Result<std::shared_ptr<MessageStore>> NewSqliteStore(SqliteStoreOptions options) {
  return SqliteStore::Open(options);
}

}  // namespace chat
