#include "src/client/cache.h"

#include <sqlite3.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <unordered_map>
#include <utility>

#include "src/core/codec.h"

namespace chat::client {

namespace {

// Bumped when the schema changes. A cache of version 4 to 6 gains the columns added since (see
// kMigrateVersion4 to kMigrateVersion6) and keeps its rows: rebuilt, it would lose its cursors
// (every message would reach the application again) and the watermarks the server has not
// confirmed. Older ones are dropped and rebuilt from the server, except for the outbox, whose rows
// are carried over (see kMigrateOutbox).
constexpr int kSchemaVersion = 7;

// The outbox is one B-tree, keyed by insertion order (the rowid), so a Send() commit writes one
// page to the WAL: every index would add another page to every commit (and its random leaf to
// every checkpoint). So the pending count and the client_msg_id -> id map are kept in memory
// instead of indexes on status and client_msg_id, and ids are plain rowids (max + 1) rather than
// AUTOINCREMENT, which would update sqlite_sequence in every commit. New rows still get the
// highest id, so order is kept.
constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE IF NOT EXISTS conversations(
  conversation_id INTEGER PRIMARY KEY,
  state BLOB NOT NULL,
  cursor INTEGER NOT NULL,
  last_activity_ms INTEGER NOT NULL,
  delivered_all_seq INTEGER NOT NULL DEFAULT 0,
  read_all_seq INTEGER NOT NULL DEFAULT 0,
  receipt_due INTEGER NOT NULL DEFAULT 0,
  expired_through INTEGER NOT NULL DEFAULT 0,
  -- Unused since the Sync carries the lowest watermarks: the seq of the user's latest message,
  -- kept to ask the server for them after a reconnect. Neither read nor written any more; left
  -- in place so that the schema (version 7) stays as it was.
  own_seq INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS messages(
  conversation_id INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  message BLOB NOT NULL,
  PRIMARY KEY(conversation_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox(
  id INTEGER PRIMARY KEY,
  client_msg_id TEXT NOT NULL,
  conversation_id INTEGER NOT NULL,
  peer TEXT NOT NULL,
  content_type TEXT NOT NULL,
  body BLOB NOT NULL,
  created_ms INTEGER NOT NULL,
  status INTEGER NOT NULL,
  reason_code INTEGER NOT NULL,
  reason_message TEXT NOT NULL);
)sql";

// Versions 1 to 3 kept the same outbox columns with a UNIQUE client_msg_id (and, before 3,
// AUTOINCREMENT and an index on status): their rows move into the version 4 table, ids and order
// unchanged.
constexpr const char* kMigrateOutbox = R"sql(
DROP INDEX IF EXISTS outbox_status;
CREATE TABLE outbox_v4(
  id INTEGER PRIMARY KEY,
  client_msg_id TEXT NOT NULL,
  conversation_id INTEGER NOT NULL,
  peer TEXT NOT NULL,
  content_type TEXT NOT NULL,
  body BLOB NOT NULL,
  created_ms INTEGER NOT NULL,
  status INTEGER NOT NULL,
  reason_code INTEGER NOT NULL,
  reason_message TEXT NOT NULL);
INSERT INTO outbox_v4 SELECT id, client_msg_id, conversation_id, peer, content_type, body,
  created_ms, status, reason_code, reason_message FROM outbox ORDER BY id;
DROP TABLE outbox;
ALTER TABLE outbox_v4 RENAME TO outbox;
)sql";

// Version 5 added receipt_due (see ConversationRow): no Receipt is owed for a version 4 row, as
// far as anything recorded says.
constexpr const char* kMigrateVersion4 =
    "ALTER TABLE conversations ADD COLUMN receipt_due INTEGER NOT NULL DEFAULT 0";
// Version 6 added expired_through (see ConversationRow): nothing is known to have expired in a
// version 5 row. Its messages that did are dropped by the next state that says so (the Sync
// tells the server the lowest seq held), which sets it.
constexpr const char* kMigrateVersion5 =
    "ALTER TABLE conversations ADD COLUMN expired_through INTEGER NOT NULL DEFAULT 0";
// Version 7 added own_seq, which is no longer used (see kSchema).
constexpr const char* kMigrateVersion6 =
    "ALTER TABLE conversations ADD COLUMN own_seq INTEGER NOT NULL DEFAULT 0";

// The statements used more than once. Each is compiled once per connection and kept (see
// Cache::Db::Prepare, which keys them by address: only these constants may be passed to it).
constexpr const char* kUserVersion = "PRAGMA user_version";
constexpr const char* kSetUserVersion = "PRAGMA user_version=7";
constexpr const char* kHasOutbox =
    "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'outbox'";
constexpr const char* kApplicationId = "PRAGMA application_id";
// "chat" in ASCII: what SQLite's application_id marks a cache file with (since the SDK's cache
// schema version 4; older caches have 0).
constexpr int64_t kCacheApplicationId = 0x63686174;
constexpr const char* kSetApplicationId = "PRAGMA application_id=1667785076";
// A file not marked yet is a cache only if it has no tables, or (versions 1 to 4, which created
// them together) exactly a cache's: these four, with these columns, and nothing but an interrupted
// migration's outbox_v4 and AUTOINCREMENT's sqlite_sequence besides.
constexpr const char* kTableCount = "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'table'";
constexpr const char* kUnmarkedCacheLayout = R"sql(
SELECT
  (SELECT COUNT(*) FROM sqlite_schema WHERE type = 'table' AND name NOT IN
     ('meta', 'conversations', 'messages', 'outbox', 'outbox_v4', 'sqlite_sequence')) = 0
  AND (SELECT COUNT(*) FROM sqlite_schema WHERE type = 'table' AND name IN
     ('meta', 'conversations', 'messages', 'outbox')) = 4
  AND (SELECT group_concat(name, ',') FROM
     (SELECT name FROM pragma_table_info('meta') ORDER BY cid)) = 'key,value'
  AND (SELECT group_concat(name, ',') FROM
     (SELECT name FROM pragma_table_info('messages') ORDER BY cid)) = 'conversation_id,seq,message'
  AND (SELECT COUNT(*) FROM pragma_table_info('conversations')
     WHERE name IN ('conversation_id', 'state', 'cursor')) = 3
  AND (SELECT COUNT(*) FROM pragma_table_info('outbox')
     WHERE name IN ('id', 'client_msg_id', 'body', 'status')) = 4
)sql";
constexpr const char* kBegin = "BEGIN IMMEDIATE";
constexpr const char* kCommit = "COMMIT";
constexpr const char* kRollback = "ROLLBACK";
constexpr const char* kGetMeta = "SELECT value FROM meta WHERE key = ?";
constexpr const char* kSetMeta = "INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)";
constexpr const char* kGetConversation =
    "SELECT conversation_id, state, cursor, delivered_all_seq, read_all_seq, receipt_due, "
    "expired_through FROM conversations WHERE conversation_id = ?";
// expired_through only goes up, whatever row a caller read before it was raised.
constexpr const char* kPutConversation =
    "INSERT INTO conversations(conversation_id, state, cursor, last_activity_ms, "
    "delivered_all_seq, read_all_seq, receipt_due, expired_through) "
    "VALUES(?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(conversation_id) DO UPDATE SET "
    "state = excluded.state, cursor = excluded.cursor, "
    "last_activity_ms = excluded.last_activity_ms, "
    "delivered_all_seq = excluded.delivered_all_seq, read_all_seq = excluded.read_all_seq, "
    "receipt_due = excluded.receipt_due, "
    "expired_through = MAX(expired_through, excluded.expired_through)";
constexpr const char* kListConversations =
    "SELECT conversation_id, state, cursor, delivered_all_seq, read_all_seq, receipt_due, "
    "expired_through FROM conversations "
    "ORDER BY last_activity_ms DESC, conversation_id DESC";
constexpr const char* kReceiptsDue =
    "SELECT conversation_id FROM conversations WHERE receipt_due != 0 ORDER BY conversation_id";
constexpr const char* kPutMessage =
    "INSERT OR IGNORE INTO messages(conversation_id, seq, message) VALUES(?, ?, ?)";
constexpr const char* kGetMessage =
    "SELECT message FROM messages WHERE conversation_id = ? AND seq = ?";
constexpr const char* kRangeOldestFirst =
    "SELECT message FROM messages WHERE conversation_id = ? AND seq >= ? AND seq <= ? "
    "ORDER BY seq";
constexpr const char* kRangeNewestFirst =
    "SELECT message FROM messages WHERE conversation_id = ? AND seq >= ? AND seq <= ? "
    "ORDER BY seq DESC LIMIT ?";
constexpr const char* kCountRange =
    "SELECT COUNT(*) FROM messages WHERE conversation_id = ? AND seq >= ? AND seq <= ?";
constexpr const char* kHighestSeq = "SELECT MAX(seq) FROM messages WHERE conversation_id = ?";
constexpr const char* kLowestSeq = "SELECT MIN(seq) FROM messages WHERE conversation_id = ?";
// Each MIN() is one seek of the messages' primary key.
constexpr const char* kSyncCursors =
    "SELECT c.conversation_id, c.cursor, (SELECT MIN(m.seq) FROM messages m "
    "WHERE m.conversation_id = c.conversation_id), c.delivered_all_seq, c.read_all_seq "
    "FROM conversations c ORDER BY c.conversation_id";
constexpr const char* kDeleteThrough =
    "DELETE FROM messages WHERE conversation_id = ? AND seq <= ?";
constexpr const char* kCountMessages = "SELECT COUNT(*) FROM messages";
constexpr const char* kAddOutbox =
    "INSERT INTO outbox(client_msg_id, conversation_id, peer, content_type, body, created_ms, "
    "status, reason_code, reason_message) VALUES(?, ?, ?, ?, ?, ?, 0, 0, '')";
constexpr const char* kCountPending = "SELECT COUNT(*) FROM outbox WHERE status = 0";
constexpr const char* kPendingOutbox =
    "SELECT id, client_msg_id, conversation_id, peer, content_type, body, created_ms, status, "
    "reason_code, reason_message FROM outbox WHERE status = 0 ORDER BY id LIMIT ?";
constexpr const char* kListOutbox =
    "SELECT id, client_msg_id, conversation_id, peer, content_type, body, created_ms, status, "
    "reason_code, reason_message FROM outbox ORDER BY id";
constexpr const char* kFindOutbox =
    "SELECT id, client_msg_id, conversation_id, peer, content_type, body, created_ms, status, "
    "reason_code, reason_message FROM outbox WHERE id = ?";
constexpr const char* kOutboxIds = "SELECT client_msg_id, id FROM outbox";
constexpr const char* kRemoveOutbox = "DELETE FROM outbox WHERE id = ? RETURNING status";
constexpr const char* kDiscardFailed = "DELETE FROM outbox WHERE id = ? AND status = 2";
constexpr const char* kFailOutbox =
    "UPDATE outbox SET status = 2, reason_code = ?, reason_message = ? WHERE id = ? AND status = 0";

// ms; how long opening waits for another client that has the same file open.
constexpr int kBusyTimeoutMs = 5000;
// A page's vector is reserved up to this many rows; larger ones grow as they are read.
constexpr Seq kReserveRows = 1000;

// SQLite stores signed 64-bit integers; ids and seqs are unsigned on the wire.
int64_t ToDb(uint64_t v) { return std::bit_cast<int64_t>(v); }
// Seq bounds of range queries compare as signed numbers: keep them non-negative.
int64_t SeqBound(uint64_t v) { return static_cast<int64_t>(std::min<uint64_t>(v, INT64_MAX)); }
uint64_t FromDb(int64_t v) { return std::bit_cast<uint64_t>(v); }

}  // namespace

// Owns the connection and its prepared statements.
class Cache::Db {
 public:
  explicit Db(sqlite3* db) : db_(db) {}
  ~Db() { Close(); }
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;

  sqlite3* get() { return db_; }

  // The statement for `sql`, one of the constants above, compiled on first use and kept until
  // Close(); nullptr when closed or if it does not compile. Keyed by address, so the number of
  // kept statements is bounded by the constants in this file.
  sqlite3_stmt* Prepare(const char* sql) {
    if (db_ == nullptr) return nullptr;
    for (const auto& [key, stmt] : stmts_) {
      if (key == sql) return stmt;
    }
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr) != SQLITE_OK) {
      sqlite3_finalize(stmt);
      return nullptr;
    }
    stmts_.emplace_back(sql, stmt);
    return stmt;
  }

  void Close() {
    for (const auto& entry : stmts_) sqlite3_finalize(entry.second);
    stmts_.clear();
    if (db_ != nullptr) sqlite3_close_v2(db_);
    db_ = nullptr;
  }

  Status Error(std::string_view what) {
    if (db_ == nullptr) return Unavailable("cache: " + std::string(what) + ": the cache is closed");
    return Unavailable(std::string("cache: ") + std::string(what) + ": " + sqlite3_errmsg(db_));
  }

 private:
  sqlite3* db_;
  // Few enough (the constants above) that a linear scan beats hashing.
  std::vector<std::pair<const char*, sqlite3_stmt*>> stmts_;
};

namespace {

// One use of a kept statement, with typed binders; reset when it goes out of scope. Text and
// blobs are bound without a copy: the bound data must outlive the Stmt's last Step().
class Stmt {
 public:
  Stmt(Cache::Db* db, const char* sql) : stmt_(db->Prepare(sql)) {}
  ~Stmt() {
    if (stmt_ != nullptr) {
      sqlite3_reset(stmt_);
      sqlite3_clear_bindings(stmt_);
    }
  }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  bool ok() const { return stmt_ != nullptr; }
  Stmt& Int(int i, int64_t v) {
    if (ok()) sqlite3_bind_int64(stmt_, i, v);
    return *this;
  }
  Stmt& Text(int i, std::string_view v) {
    if (ok()) sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_STATIC);
    return *this;
  }
  Stmt& Blob(int i, std::string_view v) {
    if (ok()) sqlite3_bind_blob(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_STATIC);
    return *this;
  }
  // SQLITE_ROW, SQLITE_DONE or an error code.
  int Step() { return ok() ? sqlite3_step(stmt_) : SQLITE_MISUSE; }
  // Steps to the end; SQLITE_DONE or an error code.
  int Run() {
    int rc = Step();
    while (rc == SQLITE_ROW) rc = Step();
    return rc;
  }
  int64_t ColInt(int i) { return sqlite3_column_int64(stmt_, i); }
  // The column's bytes, valid until the next Step() or the end of the Stmt.
  std::string_view ColView(int i) {
    const void* p = sqlite3_column_blob(stmt_, i);
    int n = sqlite3_column_bytes(stmt_, i);
    return p ? std::string_view(static_cast<const char*>(p), static_cast<size_t>(n))
             : std::string_view();
  }
  std::string ColText(int i) { return std::string(ColView(i)); }

 private:
  sqlite3_stmt* stmt_;
};

bool ParseView(std::string_view bytes, google::protobuf::MessageLite* out) {
  return out->ParseFromArray(bytes.data(), static_cast<int>(bytes.size()));
}

ConversationRow RowFrom(Stmt& s) {
  ConversationRow row;
  v1::ConversationState state;
  if (ParseView(s.ColView(1), &state)) row.info = codec::FromProto(state);
  row.info.conversation_id = FromDb(s.ColInt(0));
  row.cursor = FromDb(s.ColInt(2));
  // The columns hold the marks (a cache older than them kept them only there).
  row.info.delivered_all_seq = FromDb(s.ColInt(3));
  row.info.read_all_seq = FromDb(s.ColInt(4));
  row.receipt_due = s.ColInt(5) != 0;
  row.expired_through = FromDb(s.ColInt(6));
  return row;
}

OutboxEntry OutboxFrom(Stmt& s) {
  OutboxEntry e;
  e.id = s.ColInt(0);
  e.client_msg_id = s.ColText(1);
  e.conversation_id = FromDb(s.ColInt(2));
  e.peer = s.ColText(3);
  e.content_type = s.ColText(4);
  e.body = s.ColText(5);
  e.created_ms = s.ColInt(6);
  e.status = static_cast<MessageStatus>(s.ColInt(7));
  int code = static_cast<int>(s.ColInt(8));
  if (code != 0) e.reason = Status(static_cast<Code>(code), s.ColText(9));
  return e;
}

}  // namespace

Result<std::unique_ptr<Cache>> Cache::Open(const std::string& path) {
  sqlite3* raw = nullptr;
  const std::string name = path.empty() ? ":memory:" : path;
  // Cache's own mutex serializes every use of the connection, so SQLite's is not needed.
  int rc =
      sqlite3_open_v2(name.c_str(), &raw,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
  auto db = std::make_unique<Db>(raw);
  if (rc != SQLITE_OK) {
    return Unavailable("cache: cannot open " + name + ": " + sqlite3_errstr(rc));
  }
  sqlite3_busy_timeout(raw, kBusyTimeoutMs);
  std::unique_ptr<Cache> cache(new Cache(std::move(db)));
  // Exclusive locking, set before WAL is entered: one client owns the file while it is open, so
  // SQLite keeps the WAL index in memory instead of a shared -shm file and takes no file locks per
  // transaction (about ten fcntl calls per Send() otherwise). A second client on the same file
  // gets Unavailable ("database is locked") after the busy timeout.
  // A file that is not a database fails on the first statement that reads it.
  rc = sqlite3_exec(raw, "PRAGMA locking_mode=EXCLUSIVE; SELECT COUNT(*) FROM sqlite_schema;",
                    nullptr, nullptr, nullptr);
  if (rc == SQLITE_NOTADB || rc == SQLITE_CORRUPT) {
    return DataLoss("cache: " + name + " is not a cache database");
  }
  if (rc != SQLITE_OK) return cache->db_->Error("open");
  int version = 0;
  {
    Stmt s(cache->db_.get(), kUserVersion);
    if (s.Step() == SQLITE_ROW) version = static_cast<int>(s.ColInt(0));
  }
  int64_t application_id = 0;
  {
    Stmt s(cache->db_.get(), kApplicationId);
    if (s.Step() == SQLITE_ROW) application_id = s.ColInt(0);
  }
  // Before anything is written (WAL mode included): another program's database, or a cache a
  // newer SDK wrote, is left as it is.
  if (application_id == kCacheApplicationId && version > kSchemaVersion) {
    return FailedPrecondition("cache: " + name +
                              " was written by a newer version of the SDK "
                              "(schema version " +
                              std::to_string(version) + "; this one reads " +
                              std::to_string(kSchemaVersion) + " and older)");
  }
  if (application_id != kCacheApplicationId) {
    int64_t tables = 0;
    {
      Stmt s(cache->db_.get(), kTableCount);
      if (s.Step() == SQLITE_ROW) tables = s.ColInt(0);
    }
    bool cache_layout = tables == 0;
    if (!cache_layout && version >= 1 && version <= kSchemaVersion) {
      Stmt s(cache->db_.get(), kUnmarkedCacheLayout);
      cache_layout = s.Step() == SQLITE_ROW && s.ColInt(0) == 1;
    }
    if (application_id != 0 || (tables == 0 && version != 0) || !cache_layout) {
      return DataLoss("cache: " + name + " is another program's database (application_id " +
                      std::to_string(application_id) + ", user_version " + std::to_string(version) +
                      ", " + std::to_string(tables) +
                      " tables), not a chat cache; it was left unchanged");
    }
  }
  // A checkpoint (which the commit that crosses the threshold runs) costs two fsyncs, whose time
  // hardly depends on how much the WAL holds: 4000 pages (16 MiB at 4 KiB) instead of SQLite's
  // 1000 makes them a quarter as frequent for a burst of Send() calls.
  rc = sqlite3_exec(raw,
                    "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; "
                    "PRAGMA wal_autocheckpoint=4000;",
                    nullptr, nullptr, nullptr);
  if (rc != SQLITE_OK) return cache->db_->Error("pragma");
  if (version != kSchemaVersion || application_id != kCacheApplicationId) {
    Transaction txn(cache.get());
    // Without it, the steps below would commit one by one and could stop half way.
    if (!txn.active()) return cache->db_->Error("begin");
    if (version >= 4 && version <= 6) {
      // The same tables, a column or a few short: everything stays.
      if (version == 4) {
        if (Status st = cache->Exec(kMigrateVersion4); !st.ok()) return st;
      }
      if (version <= 5) {
        if (Status st = cache->Exec(kMigrateVersion5); !st.ok()) return st;
      }
      if (Status st = cache->Exec(kMigrateVersion6); !st.ok()) return st;
    } else if (version != 0 && version != kSchemaVersion) {
      // Another layout of the derived tables: rebuild them from the server. meta (the epoch and
      // user the outbox was written for) keeps its layout and stays, so the outbox is still
      // checked against them at the next Welcome.
      if (Status st = cache->Exec("DROP TABLE IF EXISTS conversations; "
                                  "DROP TABLE IF EXISTS messages;");
          !st.ok()) {
        return st;
      }
      bool has_outbox = false;
      {
        Stmt s(cache->db_.get(), kHasOutbox);
        has_outbox = s.Step() == SQLITE_ROW;
      }
      if (has_outbox && version < 4) {
        if (Status st = cache->Exec(kMigrateOutbox); !st.ok()) return st;
      }
    }
    if (Status st = cache->Exec(kSchema); !st.ok()) return st;
    if (Status st = cache->Exec(kSetUserVersion); !st.ok()) return st;
    if (Status st = cache->Exec(kSetApplicationId); !st.ok()) return st;
    if (Status st = txn.Commit(); !st.ok()) return st;
  }
  return cache;
}

Cache::Cache(std::unique_ptr<Db> db) : db_(std::move(db)) {}
Cache::~Cache() = default;

void Cache::Close() {
  std::lock_guard lock(mu_);
  db_->Close();
  kept_unread_.clear();
  kept_written_.clear();
}

Status Cache::Exec(const char* sql) {
  std::lock_guard lock(mu_);
  if (db_->get() == nullptr) return db_->Error("exec");
  char* err = nullptr;
  int rc = sqlite3_exec(db_->get(), sql, nullptr, nullptr, &err);
  if (rc != SQLITE_OK) {
    std::string msg = err ? err : sqlite3_errstr(rc);
    sqlite3_free(err);
    if (rc == SQLITE_NOTADB || rc == SQLITE_CORRUPT) return DataLoss("cache: " + msg);
    return Unavailable("cache: " + msg);
  }
  return Status::Ok();
}

Cache::Transaction::Transaction(Cache* cache)
    : cache_(cache), lock_(cache->mu_), pending_before_(cache->pending_count_) {
  Stmt s(cache_->db_.get(), kBegin);
  active_ = s.Run() == SQLITE_DONE;
}

Cache::Transaction::~Transaction() {
  if (!active_) return;
  Stmt s(cache_->db_.get(), kRollback);
  // The pending count goes back with the rows (unknown if the rollback itself failed); the id
  // map is read again when next needed.
  cache_->pending_count_ = s.Run() == SQLITE_DONE ? pending_before_ : std::nullopt;
  cache_->outbox_ids_.reset();
  cache_->kept_written_.clear();
}

Status Cache::Transaction::Commit() {
  if (!active_) return Unavailable("cache: transaction did not start");
  Stmt s(cache_->db_.get(), kCommit);
  if (s.Run() == SQLITE_DONE) {
    active_ = false;
    for (ConversationId id : cache_->kept_written_) cache_->kept_unread_.erase(id);
    cache_->kept_written_.clear();
    return Status::Ok();
  }
  // Still open (e.g. SQLITE_BUSY): the destructor rolls it back.
  return cache_->db_->Error("commit");
}

uint64_t Cache::Epoch() {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kGetMeta);
  return s.Text(1, "epoch").Step() == SQLITE_ROW ? FromDb(s.ColInt(0)) : 0;
}

std::string Cache::UserId() {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kGetMeta);
  return s.Text(1, "user_id").Step() == SQLITE_ROW ? s.ColText(0) : std::string();
}

Status Cache::SetIdentity(uint64_t epoch, const std::string& user_id) {
  std::lock_guard lock(mu_);
  {
    Stmt a(db_.get(), kSetMeta);
    if (a.Text(1, "epoch").Int(2, ToDb(epoch)).Run() != SQLITE_DONE) return db_->Error("set epoch");
  }
  Stmt b(db_.get(), kSetMeta);
  if (b.Text(1, "user_id").Text(2, user_id).Run() != SQLITE_DONE) return db_->Error("set user");
  return Status::Ok();
}

Status Cache::ResetForEpoch(uint64_t epoch, const std::string& user_id) {
  std::lock_guard lock(mu_);
  // Committed one statement at a time, a crash between them would leave the new epoch on
  // data of the old store, and the next Welcome would see no reason to rebuild.
  if (db_->get() == nullptr) return db_->Error("reset");
  if (sqlite3_get_autocommit(db_->get()) != 0) {
    return FailedPrecondition("cache: an epoch reset must be made in a transaction");
  }
  if (Status st = Exec("DELETE FROM conversations; DELETE FROM messages;"); !st.ok()) return st;
  // The counts kept belong to the rows deleted: they go with the commit.
  for (const auto& [id, kept] : kept_unread_) kept_written_.insert(id);
  return SetIdentity(epoch, user_id);
}

std::optional<ConversationRow> Cache::GetConversation(ConversationId id) {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kGetConversation);
  if (s.Int(1, ToDb(id)).Step() != SQLITE_ROW) return std::nullopt;
  return RowFrom(s);
}

Status Cache::PutConversation(const ConversationRow& row) {
  std::lock_guard lock(mu_);
  v1::ConversationState state;
  codec::ToProto(row.info, &state);
  const std::string bytes = state.SerializeAsString();
  Stmt s(db_.get(), kPutConversation);
  s.Int(1, ToDb(row.info.conversation_id))
      .Blob(2, bytes)
      .Int(3, ToDb(row.cursor))
      .Int(4, row.info.last_activity_ms)
      .Int(5, ToDb(row.info.delivered_all_seq))
      .Int(6, ToDb(row.info.read_all_seq))
      .Int(7, row.receipt_due ? 1 : 0)
      .Int(8, SeqBound(row.expired_through));
  if (s.Run() != SQLITE_DONE) return db_->Error("put conversation");
  if (kept_unread_.contains(row.info.conversation_id)) {
    if (sqlite3_get_autocommit(db_->get()) != 0) {
      kept_unread_.erase(row.info.conversation_id);
    } else {
      kept_written_.insert(row.info.conversation_id);
    }
  }
  return Status::Ok();
}

std::vector<ConversationRow> Cache::ListConversations() {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kListConversations);
  std::vector<ConversationRow> rows;
  while (s.Step() == SQLITE_ROW) rows.push_back(RowFrom(s));
  return rows;
}

Status Cache::PutMessage(const v1::Message& message) {
  std::lock_guard lock(mu_);
  const std::string bytes = message.SerializeAsString();
  Stmt s(db_.get(), kPutMessage);
  s.Int(1, ToDb(message.conversation_id())).Int(2, ToDb(message.seq())).Blob(3, bytes);
  if (s.Run() != SQLITE_DONE) return db_->Error("put message");
  return Status::Ok();
}

std::optional<v1::Message> Cache::GetMessage(ConversationId conversation, Seq seq) {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kGetMessage);
  if (s.Int(1, ToDb(conversation)).Int(2, ToDb(seq)).Step() != SQLITE_ROW) return std::nullopt;
  v1::Message m;
  if (!ParseView(s.ColView(0), &m)) return std::nullopt;
  return m;
}

std::optional<v1::Message> Cache::FirstInRange(ConversationId conversation, Seq from, Seq to) {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kRangeOldestFirst);
  s.Int(1, ToDb(conversation)).Int(2, SeqBound(from)).Int(3, SeqBound(to));
  while (s.Step() == SQLITE_ROW) {
    v1::Message m;
    if (ParseView(s.ColView(0), &m)) return m;
  }
  return std::nullopt;
}

std::vector<v1::Message> Cache::RangeNewestFirst(ConversationId conversation, Seq from, Seq to,
                                                 uint32_t limit) {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kRangeNewestFirst);
  s.Int(1, ToDb(conversation)).Int(2, SeqBound(from)).Int(3, SeqBound(to)).Int(4, limit);
  std::vector<v1::Message> out;
  while (s.Step() == SQLITE_ROW) {
    v1::Message m;
    if (ParseView(s.ColView(0), &m)) out.push_back(std::move(m));
  }
  return out;
}

bool Cache::FullRangeNewestFirst(ConversationId conversation, Seq from, Seq to,
                                 std::vector<Message>* out) {
  if (from == 0 || to < from) return false;
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kRangeNewestFirst);
  s.Int(1, ToDb(conversation))
      .Int(2, SeqBound(from))
      .Int(3, SeqBound(to))
      .Int(4, ToDb(to - from + 1));
  out->clear();
  out->reserve(static_cast<size_t>(std::min<Seq>(to - from + 1, kReserveRows)));
  // One parsed message reused for every row keeps its allocations between rows.
  v1::Message m;
  Seq expected = to;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) {
    if (!ParseView(s.ColView(0), &m) || m.seq() != expected) return false;
    out->push_back(codec::FromProto(m));
    --expected;
  }
  return rc == SQLITE_DONE && expected + 1 == from;
}

uint64_t Cache::CountRange(ConversationId conversation, Seq from, Seq to) {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kCountRange);
  s.Int(1, ToDb(conversation)).Int(2, SeqBound(from)).Int(3, SeqBound(to));
  return s.Step() == SQLITE_ROW ? FromDb(s.ColInt(0)) : 0;
}

std::vector<ConversationId> Cache::ReceiptsDue() {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kReceiptsDue);
  std::vector<ConversationId> ids;
  while (s.Step() == SQLITE_ROW) ids.push_back(FromDb(s.ColInt(0)));
  return ids;
}

std::vector<ConversationInfo> Cache::ListConversationInfos() {
  std::lock_guard lock(mu_);
  std::vector<ConversationInfo> infos;
  for (ConversationRow& row : ListConversations()) {
    if (auto kept = kept_unread_.find(row.info.conversation_id); kept != kept_unread_.end()) {
      row.info.read_seq = kept->second.read_seq;
      row.info.unread = kept->second.unread;
    }
    infos.push_back(std::move(row.info));
  }
  return infos;
}

uint64_t Cache::UnreadTotal() {
  std::lock_guard lock(mu_);
  // Every count kept is of a listed row (KeepUnread), so the total is the listing's.
  uint64_t total = 0;
  for (const ConversationInfo& info : ListConversationInfos()) total += info.unread;
  return total;
}

void Cache::KeepUnread(ConversationId conversation, Seq read_seq, uint64_t unread) {
  std::lock_guard lock(mu_);
  // Without a row there is nothing to list the count in, and nothing would end the keeping if no
  // row is ever made (the user was removed before the next Sync): the next Sync brings the state.
  if (!GetConversation(conversation)) return;
  auto it = kept_unread_.find(conversation);
  if (it == kept_unread_.end() && kept_unread_.size() >= kMaxKeptUnread) {
    kept_unread_.erase(std::min_element(
        kept_unread_.begin(), kept_unread_.end(),
        [](const auto& a, const auto& b) { return a.second.order < b.second.order; }));
  }
  kept_unread_[conversation] = {read_seq, unread, ++kept_order_};
}

void Cache::ApplyKept(ConversationRow* row) {
  std::lock_guard lock(mu_);
  const ConversationId id = row->info.conversation_id;
  auto kept = kept_unread_.find(id);
  if (kept == kept_unread_.end() || kept_written_.contains(id)) return;
  row->info.read_seq = kept->second.read_seq;
  row->info.unread = kept->second.unread;
}

Seq Cache::HighestSeq(ConversationId conversation) {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kHighestSeq);
  // MAX() of no rows is NULL, which reads as 0.
  return s.Int(1, ToDb(conversation)).Step() == SQLITE_ROW ? FromDb(s.ColInt(0)) : 0;
}

Seq Cache::LowestSeq(ConversationId conversation) {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kLowestSeq);
  // MIN() of no rows is NULL, which reads as 0.
  return s.Int(1, ToDb(conversation)).Step() == SQLITE_ROW ? FromDb(s.ColInt(0)) : 0;
}

std::vector<Cache::SyncCursor> Cache::SyncCursors() {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kSyncCursors);
  std::vector<SyncCursor> out;
  while (s.Step() == SQLITE_ROW) {
    // MIN() of no rows is NULL, which reads as 0.
    out.push_back({FromDb(s.ColInt(0)), FromDb(s.ColInt(1)), FromDb(s.ColInt(2)),
                   FromDb(s.ColInt(3)), FromDb(s.ColInt(4))});
  }
  return out;
}

Result<uint64_t> Cache::DeleteMessagesThrough(ConversationId conversation, Seq through) {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kDeleteThrough);
  s.Int(1, ToDb(conversation)).Int(2, SeqBound(through));
  if (s.Run() != SQLITE_DONE) return db_->Error("delete expired messages");
  return static_cast<uint64_t>(sqlite3_changes64(db_->get()));
}

uint64_t Cache::CountUnread(ConversationId conversation, Seq from, Seq to, const std::string& me) {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kRangeOldestFirst);
  s.Int(1, ToDb(conversation)).Int(2, SeqBound(from)).Int(3, SeqBound(to));
  uint64_t n = 0;
  v1::Message m;
  while (s.Step() == SQLITE_ROW) {
    if (!ParseView(s.ColView(0), &m) || m.kind() == v1::MESSAGE_KIND_SYSTEM) continue;
    // Oldest first: the user's own message clears what came before it.
    if (!me.empty() && m.sender() == me) {
      n = 0;
    } else {
      ++n;
    }
  }
  return n;
}

uint64_t Cache::MessageCount() {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kCountMessages);
  return s.Step() == SQLITE_ROW ? FromDb(s.ColInt(0)) : 0;
}

std::unordered_map<std::string, int64_t>* Cache::OutboxIds() {
  if (!outbox_ids_.has_value()) {
    Stmt s(db_.get(), kOutboxIds);
    if (!s.ok()) return nullptr;
    std::unordered_map<std::string, int64_t> ids;
    int rc;
    while ((rc = s.Step()) == SQLITE_ROW) ids.emplace(s.ColText(0), s.ColInt(1));
    if (rc != SQLITE_DONE) return nullptr;
    outbox_ids_ = std::move(ids);
  }
  return &*outbox_ids_;
}

std::optional<int64_t> Cache::OutboxId(const std::string& client_msg_id) {
  std::unordered_map<std::string, int64_t>* ids = OutboxIds();
  if (ids == nullptr) return std::nullopt;
  auto it = ids->find(client_msg_id);
  if (it == ids->end()) return std::nullopt;
  return it->second;
}

Status Cache::AddOutbox(OutboxEntry* entry, size_t max_rows) {
  std::lock_guard lock(mu_);
  std::unordered_map<std::string, int64_t>* ids = OutboxIds();
  if (ids == nullptr) return db_->Error("read the outbox");
  // Failed messages stay until the application discards them: they count, so the outbox (and
  // the id map) stays bounded.
  if (ids->size() >= max_rows) {
    const size_t pending = std::min(PendingCount(), ids->size());
    return ResourceExhausted("outbox is full (" + std::to_string(ids->size()) +
                             " messages: " + std::to_string(pending) + " pending, " +
                             std::to_string(ids->size() - pending) + " failed)");
  }
  if (ids->contains(entry->client_msg_id)) {
    return AlreadyExists("client_msg_id already in the outbox");
  }
  Transaction txn(this);
  // Outside a transaction the insert would commit by itself, even if this call then failed.
  if (!txn.active()) return db_->Error("begin");
  {
    Stmt s(db_.get(), kAddOutbox);
    s.Text(1, entry->client_msg_id)
        .Int(2, ToDb(entry->conversation_id))
        .Text(3, entry->peer)
        .Text(4, entry->content_type)
        .Blob(5, entry->body)
        .Int(6, entry->created_ms);
    if (s.Run() != SQLITE_DONE) return db_->Error("add to outbox");
  }
  entry->id = sqlite3_last_insert_rowid(db_->get());
  entry->status = MessageStatus::kPending;
  if (Status st = txn.Commit(); !st.ok()) return st;
  if (pending_count_.has_value()) ++*pending_count_;
  // Not reset by a rollback: the transaction above is over.
  ids->emplace(entry->client_msg_id, entry->id);
  return Status::Ok();
}

size_t Cache::PendingCount() {
  std::lock_guard lock(mu_);
  if (!pending_count_.has_value()) {
    Stmt s(db_.get(), kCountPending);
    if (s.Step() != SQLITE_ROW) return 0;
    pending_count_ = static_cast<size_t>(s.ColInt(0));
  }
  return *pending_count_;
}

std::vector<OutboxEntry> Cache::PendingOutbox(size_t limit) {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kPendingOutbox);
  s.Int(1, static_cast<int64_t>(limit));
  std::vector<OutboxEntry> out;
  while (s.Step() == SQLITE_ROW) out.push_back(OutboxFrom(s));
  return out;
}

std::vector<OutboxEntry> Cache::ListOutbox() {
  std::lock_guard lock(mu_);
  Stmt s(db_.get(), kListOutbox);
  std::vector<OutboxEntry> out;
  while (s.Step() == SQLITE_ROW) out.push_back(OutboxFrom(s));
  return out;
}

std::optional<OutboxEntry> Cache::FindOutbox(const std::string& client_msg_id) {
  std::lock_guard lock(mu_);
  std::optional<int64_t> id = OutboxId(client_msg_id);
  if (!id) return std::nullopt;
  Stmt s(db_.get(), kFindOutbox);
  if (s.Int(1, *id).Step() != SQLITE_ROW) return std::nullopt;
  return OutboxFrom(s);
}

Status Cache::RemoveOutbox(const std::string& client_msg_id) {
  std::lock_guard lock(mu_);
  std::optional<int64_t> id = OutboxId(client_msg_id);
  if (!id) return Status::Ok();
  Stmt s(db_.get(), kRemoveOutbox);
  s.Int(1, *id);
  bool was_pending = false;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) was_pending = s.ColInt(0) == 0;
  if (rc != SQLITE_DONE) {
    pending_count_.reset();
    outbox_ids_.reset();
    return db_->Error("remove from outbox");
  }
  outbox_ids_->erase(client_msg_id);
  if (was_pending && pending_count_.has_value() && *pending_count_ > 0) --*pending_count_;
  return Status::Ok();
}

Status Cache::FailOutbox(const std::string& client_msg_id, const Status& reason) {
  std::lock_guard lock(mu_);
  std::optional<int64_t> id = OutboxId(client_msg_id);
  if (!id) return Status::Ok();
  Stmt s(db_.get(), kFailOutbox);
  s.Int(1, static_cast<int>(reason.code())).Text(2, reason.message()).Int(3, *id);
  if (s.Run() != SQLITE_DONE) {
    pending_count_.reset();
    return db_->Error("fail outbox message");
  }
  if (sqlite3_changes(db_->get()) > 0 && pending_count_.has_value() && *pending_count_ > 0) {
    --*pending_count_;
  }
  return Status::Ok();
}

Status Cache::DiscardFailed(const std::string& client_msg_id) {
  std::lock_guard lock(mu_);
  if (OutboxIds() == nullptr) return db_->Error("read the outbox");
  std::optional<int64_t> id = OutboxId(client_msg_id);
  if (!id) return NotFound("no message with this client_msg_id in the outbox");
  Stmt s(db_.get(), kDiscardFailed);
  s.Int(1, *id);
  if (s.Run() != SQLITE_DONE) {
    outbox_ids_.reset();
    return db_->Error("discard from outbox");
  }
  if (sqlite3_changes(db_->get()) == 0) {
    return FailedPrecondition("the message is pending; only a failed message can be discarded");
  }
  outbox_ids_->erase(client_msg_id);
  return Status::Ok();
}

MessageEvent OutboxMessageEvent(const OutboxEntry& entry, const UserId& user,
                                const DeviceId& device) {
  MessageEvent event;
  event.message.conversation_id = entry.conversation_id;
  event.message.client_msg_id = entry.client_msg_id;
  event.message.content_type = entry.content_type;
  event.message.body = entry.body;
  event.message.sender = user;
  event.message.sender_device = device;
  event.peer = entry.peer;
  event.status = entry.status;
  event.outgoing = true;
  event.reason = entry.reason;
  return event;
}

}  // namespace chat::client
