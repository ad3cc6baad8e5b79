#include "src/client/cache.h"

#include <sqlite3.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <utility>

#include "src/core/codec.h"

namespace chat::client {

namespace {

// Bumped when the schema changes; an older cache is dropped and rebuilt from the server, except
// for the outbox, whose table keeps its shape across versions.
constexpr int kSchemaVersion = 2;

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE IF NOT EXISTS conversations(
  conversation_id INTEGER PRIMARY KEY,
  state BLOB NOT NULL,
  cursor INTEGER NOT NULL,
  last_activity_ms INTEGER NOT NULL,
  delivered_all_seq INTEGER NOT NULL DEFAULT 0,
  read_all_seq INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS messages(
  conversation_id INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  message BLOB NOT NULL,
  PRIMARY KEY(conversation_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  client_msg_id TEXT NOT NULL UNIQUE,
  conversation_id INTEGER NOT NULL,
  peer TEXT NOT NULL,
  content_type TEXT NOT NULL,
  body BLOB NOT NULL,
  created_ms INTEGER NOT NULL,
  status INTEGER NOT NULL,
  reason_code INTEGER NOT NULL,
  reason_message TEXT NOT NULL);
-- Counting and reading pending sends without scanning the bodies of every queued message.
CREATE INDEX IF NOT EXISTS outbox_status ON outbox(status);
)sql";

// SQLite stores signed 64-bit integers; ids and seqs are unsigned on the wire.
int64_t ToDb(uint64_t v) { return std::bit_cast<int64_t>(v); }
// Seq bounds of range queries compare as signed numbers: keep them non-negative.
int64_t SeqBound(uint64_t v) { return static_cast<int64_t>(std::min<uint64_t>(v, INT64_MAX)); }
uint64_t FromDb(int64_t v) { return std::bit_cast<uint64_t>(v); }

}  // namespace

// Owns the connection and a prepared-statement helper.
class Cache::Db {
 public:
  explicit Db(sqlite3* db) : db_(db) {}
  ~Db() { sqlite3_close_v2(db_); }
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;

  sqlite3* get() { return db_; }

  Status Error(std::string_view what) {
    return Unavailable(std::string("cache: ") + std::string(what) + ": " + sqlite3_errmsg(db_));
  }

 private:
  sqlite3* db_;
};

namespace {

// A prepared statement with typed binders; finalized on destruction.
class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) { rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr); }
  ~Stmt() { sqlite3_finalize(stmt_); }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  bool ok() const { return rc_ == SQLITE_OK && stmt_ != nullptr; }
  Stmt& Int(int i, int64_t v) {
    if (ok()) sqlite3_bind_int64(stmt_, i, v);
    return *this;
  }
  Stmt& Text(int i, std::string_view v) {
    if (ok()) sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& Blob(int i, std::string_view v) {
    if (ok()) sqlite3_bind_blob(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  // SQLITE_ROW, SQLITE_DONE or an error code.
  int Step() { return ok() ? sqlite3_step(stmt_) : rc_; }
  int64_t ColInt(int i) { return sqlite3_column_int64(stmt_, i); }
  std::string ColText(int i) {
    const void* p = sqlite3_column_blob(stmt_, i);
    int n = sqlite3_column_bytes(stmt_, i);
    return p ? std::string(static_cast<const char*>(p), static_cast<size_t>(n)) : std::string();
  }

 private:
  sqlite3_stmt* stmt_ = nullptr;
  int rc_ = SQLITE_ERROR;
};

ConversationRow RowFrom(Stmt& s) {
  ConversationRow row;
  v1::ConversationState state;
  std::string bytes = s.ColText(1);
  if (state.ParseFromString(bytes)) row.info = codec::FromProto(state);
  row.info.conversation_id = FromDb(s.ColInt(0));
  row.cursor = FromDb(s.ColInt(2));
  row.delivered_all_seq = FromDb(s.ColInt(3));
  row.read_all_seq = FromDb(s.ColInt(4));
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

constexpr const char* kOutboxColumns =
    "id, client_msg_id, conversation_id, peer, content_type, body, created_ms, status, "
    "reason_code, reason_message";

}  // namespace

Result<std::unique_ptr<Cache>> Cache::Open(const std::string& path) {
  sqlite3* raw = nullptr;
  const std::string name = path.empty() ? ":memory:" : path;
  int rc =
      sqlite3_open_v2(name.c_str(), &raw,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  auto db = std::make_unique<Db>(raw);
  if (rc != SQLITE_OK) {
    return Unavailable("cache: cannot open " + name + ": " + sqlite3_errstr(rc));
  }
  sqlite3_busy_timeout(raw, 5000);
  std::unique_ptr<Cache> cache(new Cache(std::move(db)));
  // A file that is not a database fails on the first statement that reads it.
  rc = sqlite3_exec(raw, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;", nullptr, nullptr,
                    nullptr);
  if (rc == SQLITE_NOTADB || rc == SQLITE_CORRUPT) {
    return DataLoss("cache: " + name + " is not a cache database");
  }
  if (rc != SQLITE_OK) return cache->db_->Error("pragma");
  int version = 0;
  {
    Stmt s(raw, "PRAGMA user_version");
    if (s.Step() == SQLITE_ROW) version = static_cast<int>(s.ColInt(0));
  }
  if (version != 0 && version != kSchemaVersion) {
    // An unknown layout of the derived tables: rebuild them from the server.
    if (Status st = cache->Exec("DROP TABLE IF EXISTS meta; DROP TABLE IF EXISTS conversations; "
                                "DROP TABLE IF EXISTS messages;");
        !st.ok()) {
      return st;
    }
  }
  if (Status st = cache->Exec(kSchema); !st.ok()) return st;
  if (Status st = cache->Exec("PRAGMA user_version=2"); !st.ok()) return st;
  return cache;
}

Cache::Cache(std::unique_ptr<Db> db) : db_(std::move(db)) {}
Cache::~Cache() = default;

Status Cache::Exec(const char* sql) {
  std::lock_guard lock(mu_);
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

Cache::Transaction::Transaction(Cache* cache) : cache_(cache), lock_(cache->mu_) {
  active_ = cache_->Exec("BEGIN IMMEDIATE").ok();
}

Cache::Transaction::~Transaction() {
  if (active_) (void)cache_->Exec("ROLLBACK");
}

Status Cache::Transaction::Commit() {
  if (!active_) return Unavailable("cache: transaction did not start");
  active_ = false;
  return cache_->Exec("COMMIT");
}

uint64_t Cache::Epoch() {
  std::lock_guard lock(mu_);
  Stmt s(db_->get(), "SELECT value FROM meta WHERE key = 'epoch'");
  return s.Step() == SQLITE_ROW ? FromDb(s.ColInt(0)) : 0;
}

std::string Cache::UserId() {
  std::lock_guard lock(mu_);
  Stmt s(db_->get(), "SELECT value FROM meta WHERE key = 'user_id'");
  return s.Step() == SQLITE_ROW ? s.ColText(0) : std::string();
}

Status Cache::SetIdentity(uint64_t epoch, const std::string& user_id) {
  std::lock_guard lock(mu_);
  Stmt a(db_->get(), "INSERT OR REPLACE INTO meta(key, value) VALUES('epoch', ?)");
  if (a.Int(1, ToDb(epoch)).Step() != SQLITE_DONE) return db_->Error("set epoch");
  Stmt b(db_->get(), "INSERT OR REPLACE INTO meta(key, value) VALUES('user_id', ?)");
  if (b.Text(1, user_id).Step() != SQLITE_DONE) return db_->Error("set user");
  return Status::Ok();
}

Status Cache::ResetForEpoch(uint64_t epoch) {
  Transaction txn(this);
  if (Status st = Exec("DELETE FROM conversations; DELETE FROM messages;"); !st.ok()) return st;
  {
    Stmt a(db_->get(), "INSERT OR REPLACE INTO meta(key, value) VALUES('epoch', ?)");
    if (a.Int(1, ToDb(epoch)).Step() != SQLITE_DONE) return db_->Error("set epoch");
  }
  return txn.Commit();
}

std::optional<ConversationRow> Cache::GetConversation(ConversationId id) {
  std::lock_guard lock(mu_);
  Stmt s(
      db_->get(),
      "SELECT conversation_id, state, cursor, delivered_all_seq, read_all_seq FROM conversations "
      "WHERE conversation_id = ?");
  if (s.Int(1, ToDb(id)).Step() != SQLITE_ROW) return std::nullopt;
  return RowFrom(s);
}

Status Cache::PutConversation(const ConversationRow& row) {
  std::lock_guard lock(mu_);
  v1::ConversationState state;
  codec::ToProto(row.info, &state);
  Stmt s(db_->get(),
         "INSERT OR REPLACE INTO conversations(conversation_id, state, cursor, last_activity_ms, "
         "delivered_all_seq, read_all_seq) VALUES(?, ?, ?, ?, ?, ?)");
  s.Int(1, ToDb(row.info.conversation_id))
      .Blob(2, state.SerializeAsString())
      .Int(3, ToDb(row.cursor))
      .Int(4, row.info.last_activity_ms)
      .Int(5, ToDb(row.delivered_all_seq))
      .Int(6, ToDb(row.read_all_seq));
  if (s.Step() != SQLITE_DONE) return db_->Error("put conversation");
  return Status::Ok();
}

std::vector<ConversationRow> Cache::ListConversations() {
  std::lock_guard lock(mu_);
  Stmt s(
      db_->get(),
      "SELECT conversation_id, state, cursor, delivered_all_seq, read_all_seq FROM conversations "
      "ORDER BY last_activity_ms DESC, conversation_id DESC");
  std::vector<ConversationRow> rows;
  while (s.Step() == SQLITE_ROW) rows.push_back(RowFrom(s));
  return rows;
}

Status Cache::PutMessage(const v1::Message& message) {
  std::lock_guard lock(mu_);
  Stmt s(db_->get(),
         "INSERT OR IGNORE INTO messages(conversation_id, seq, message) VALUES(?, ?, ?)");
  s.Int(1, ToDb(message.conversation_id()))
      .Int(2, ToDb(message.seq()))
      .Blob(3, message.SerializeAsString());
  if (s.Step() != SQLITE_DONE) return db_->Error("put message");
  return Status::Ok();
}

std::optional<v1::Message> Cache::GetMessage(ConversationId conversation, Seq seq) {
  std::lock_guard lock(mu_);
  Stmt s(db_->get(), "SELECT message FROM messages WHERE conversation_id = ? AND seq = ?");
  if (s.Int(1, ToDb(conversation)).Int(2, ToDb(seq)).Step() != SQLITE_ROW) return std::nullopt;
  v1::Message m;
  if (!m.ParseFromString(s.ColText(0))) return std::nullopt;
  return m;
}

std::vector<v1::Message> Cache::RangeNewestFirst(ConversationId conversation, Seq from, Seq to,
                                                 uint32_t limit) {
  std::lock_guard lock(mu_);
  Stmt s(db_->get(),
         "SELECT message FROM messages WHERE conversation_id = ? AND seq >= ? AND seq <= ? "
         "ORDER BY seq DESC LIMIT ?");
  s.Int(1, ToDb(conversation)).Int(2, SeqBound(from)).Int(3, SeqBound(to)).Int(4, limit);
  std::vector<v1::Message> out;
  while (s.Step() == SQLITE_ROW) {
    v1::Message m;
    if (m.ParseFromString(s.ColText(0))) out.push_back(std::move(m));
  }
  return out;
}

uint64_t Cache::CountRange(ConversationId conversation, Seq from, Seq to) {
  std::lock_guard lock(mu_);
  Stmt s(db_->get(),
         "SELECT COUNT(*) FROM messages WHERE conversation_id = ? AND seq >= ? AND seq <= ?");
  s.Int(1, ToDb(conversation)).Int(2, SeqBound(from)).Int(3, SeqBound(to));
  return s.Step() == SQLITE_ROW ? FromDb(s.ColInt(0)) : 0;
}

uint64_t Cache::UnreadTotal() {
  uint64_t total = 0;
  for (const ConversationRow& row : ListConversations()) total += row.info.unread;
  return total;
}

uint64_t Cache::CountUnread(ConversationId conversation, Seq from, Seq to, const std::string& me) {
  std::lock_guard lock(mu_);
  Stmt s(db_->get(),
         "SELECT message FROM messages WHERE conversation_id = ? AND seq >= ? AND seq <= ?");
  s.Int(1, ToDb(conversation)).Int(2, SeqBound(from)).Int(3, SeqBound(to));
  uint64_t n = 0;
  while (s.Step() == SQLITE_ROW) {
    v1::Message m;
    if (m.ParseFromString(s.ColText(0)) && m.kind() != v1::MESSAGE_KIND_SYSTEM &&
        m.sender() != me) {
      ++n;
    }
  }
  return n;
}

uint64_t Cache::MessageCount() {
  std::lock_guard lock(mu_);
  Stmt s(db_->get(), "SELECT COUNT(*) FROM messages");
  return s.Step() == SQLITE_ROW ? FromDb(s.ColInt(0)) : 0;
}

Status Cache::AddOutbox(OutboxEntry* entry, size_t max_pending) {
  Transaction txn(this);
  if (PendingCount() >= max_pending) {
    return ResourceExhausted("outbox is full (" + std::to_string(max_pending) + " pending)");
  }
  {
    Stmt s(db_->get(),
           "INSERT INTO outbox(client_msg_id, conversation_id, peer, content_type, body, "
           "created_ms, status, reason_code, reason_message) VALUES(?, ?, ?, ?, ?, ?, 0, 0, '')");
    s.Text(1, entry->client_msg_id)
        .Int(2, ToDb(entry->conversation_id))
        .Text(3, entry->peer)
        .Text(4, entry->content_type)
        .Blob(5, entry->body)
        .Int(6, entry->created_ms);
    int rc = s.Step();
    if (rc == SQLITE_CONSTRAINT) return AlreadyExists("client_msg_id already in the outbox");
    if (rc != SQLITE_DONE) return db_->Error("add to outbox");
  }
  entry->id = sqlite3_last_insert_rowid(db_->get());
  entry->status = MessageStatus::kPending;
  Status committed = txn.Commit();
  if (committed.ok() && pending_count_.has_value()) ++*pending_count_;
  return committed;
}

size_t Cache::PendingCount() {
  std::lock_guard lock(mu_);
  if (!pending_count_.has_value()) {
    Stmt s(db_->get(), "SELECT COUNT(*) FROM outbox WHERE status = 0");
    if (s.Step() != SQLITE_ROW) return 0;
    pending_count_ = static_cast<size_t>(s.ColInt(0));
  }
  return *pending_count_;
}

std::vector<OutboxEntry> Cache::PendingOutbox(size_t limit) {
  std::lock_guard lock(mu_);
  std::string sql =
      std::string("SELECT ") + kOutboxColumns + " FROM outbox WHERE status = 0 ORDER BY id LIMIT ?";
  Stmt s(db_->get(), sql.c_str());
  s.Int(1, static_cast<int64_t>(limit));
  std::vector<OutboxEntry> out;
  while (s.Step() == SQLITE_ROW) out.push_back(OutboxFrom(s));
  return out;
}

std::vector<OutboxEntry> Cache::ListOutbox() {
  std::lock_guard lock(mu_);
  std::string sql = std::string("SELECT ") + kOutboxColumns + " FROM outbox ORDER BY id";
  Stmt s(db_->get(), sql.c_str());
  std::vector<OutboxEntry> out;
  while (s.Step() == SQLITE_ROW) out.push_back(OutboxFrom(s));
  return out;
}

std::optional<OutboxEntry> Cache::FindOutbox(const std::string& client_msg_id) {
  std::lock_guard lock(mu_);
  std::string sql =
      std::string("SELECT ") + kOutboxColumns + " FROM outbox WHERE client_msg_id = ?";
  Stmt s(db_->get(), sql.c_str());
  if (s.Text(1, client_msg_id).Step() != SQLITE_ROW) return std::nullopt;
  return OutboxFrom(s);
}

Status Cache::RemoveOutbox(const std::string& client_msg_id) {
  std::lock_guard lock(mu_);
  pending_count_.reset();
  Stmt s(db_->get(), "DELETE FROM outbox WHERE client_msg_id = ?");
  if (s.Text(1, client_msg_id).Step() != SQLITE_DONE) return db_->Error("remove from outbox");
  return Status::Ok();
}

Status Cache::FailOutbox(const std::string& client_msg_id, const Status& reason) {
  std::lock_guard lock(mu_);
  pending_count_.reset();
  Stmt s(db_->get(),
         "UPDATE outbox SET status = 2, reason_code = ?, reason_message = ? "
         "WHERE client_msg_id = ?");
  s.Int(1, static_cast<int>(reason.code())).Text(2, reason.message()).Text(3, client_msg_id);
  if (s.Step() != SQLITE_DONE) return db_->Error("fail outbox message");
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
