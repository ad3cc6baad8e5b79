// Cache: the client's SQLite store of conversations, messages, identity and the outbox.
#include "src/client/cache.h"

#include <doctest/doctest.h>
#include <sqlite3.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tests/testing/temp_dir.h"

namespace chat::client {
namespace {

OutboxEntry Entry(const std::string& id, const std::string& body = "b") {
  OutboxEntry e;
  e.client_msg_id = id;
  e.conversation_id = 3;
  e.content_type = "text/plain";
  e.body = body;
  return e;
}

v1::Message Msg(ConversationId c, Seq s) {
  v1::Message m;
  m.set_conversation_id(c);
  m.set_seq(s);
  m.set_body("body-" + std::to_string(s));
  return m;
}

TEST_CASE("cache: the outbox keeps insertion order, rejects a reused id and is bounded") {
  auto cache = Cache::Open("").value();
  OutboxEntry a = Entry("id-a"), b = Entry("id-b"), c = Entry("id-c");
  REQUIRE(cache->AddOutbox(&a, 2).ok());
  REQUIRE(cache->AddOutbox(&b, 2).ok());
  CHECK(a.id < b.id);
  CHECK(cache->AddOutbox(&c, 2).code() == Code::kResourceExhausted);
  OutboxEntry again = Entry("id-a");
  CHECK(cache->AddOutbox(&again, 10).code() == Code::kAlreadyExists);

  REQUIRE(cache->FailOutbox("id-a", PermissionDenied("not a member")).ok());
  CHECK(cache->PendingCount() == 1);
  // A failed message keeps its place until it is discarded.
  Status full = cache->AddOutbox(&c, 2);
  CHECK(full.code() == Code::kResourceExhausted);
  CHECK(full.message() == "outbox is full (2 messages: 1 pending, 1 failed)");
  REQUIRE(cache->AddOutbox(&c, 3).ok());
  auto pending = cache->PendingOutbox(10);
  REQUIRE(pending.size() == 2);
  CHECK(pending[0].client_msg_id == "id-b");
  CHECK(pending[1].client_msg_id == "id-c");
  auto all = cache->ListOutbox();
  REQUIRE(all.size() == 3);
  CHECK(all[0].client_msg_id == "id-a");
  CHECK(all[0].status == MessageStatus::kFailed);
  CHECK(all[0].reason == PermissionDenied("not a member"));
  REQUIRE(cache->RemoveOutbox("id-b").ok());
  CHECK(cache->PendingCount() == 1);
  CHECK_FALSE(cache->FindOutbox("id-b").has_value());
}

TEST_CASE("cache: only a failed message can be discarded, and only once, which frees its place") {
  auto cache = Cache::Open("").value();
  OutboxEntry a = Entry("id-a"), b = Entry("id-b"), c = Entry("id-c");
  REQUIRE(cache->AddOutbox(&a, 2).ok());
  REQUIRE(cache->AddOutbox(&b, 2).ok());
  REQUIRE(cache->FailOutbox("id-a", PermissionDenied("not a member")).ok());
  CHECK(cache->DiscardFailed("id-b").code() == Code::kFailedPrecondition);
  CHECK(cache->DiscardFailed("id-x").code() == Code::kNotFound);
  REQUIRE(cache->DiscardFailed("id-a").ok());
  CHECK(cache->DiscardFailed("id-a").code() == Code::kNotFound);
  CHECK_FALSE(cache->FindOutbox("id-a").has_value());
  CHECK(cache->PendingCount() == 1);
  REQUIRE(cache->AddOutbox(&c, 2).ok());
}

TEST_CASE("cache: messages are stored once per (conversation, seq) and read newest first") {
  auto cache = Cache::Open("").value();
  REQUIRE(cache->PutMessage(Msg(1, 1)).ok());
  REQUIRE(cache->PutMessage(Msg(1, 2)).ok());
  v1::Message changed = Msg(1, 2);
  changed.set_body("other");
  REQUIRE(cache->PutMessage(changed).ok());
  REQUIRE(cache->PutMessage(Msg(1, 4)).ok());
  REQUIRE(cache->PutMessage(Msg(2, 1)).ok());
  CHECK(cache->GetMessage(1, 2)->body() == "body-2");
  CHECK(cache->CountRange(1, 1, 4) == 3);
  CHECK(cache->CountRange(1, 1, UINT64_MAX) == 3);
  auto range = cache->RangeNewestFirst(1, 1, 4, 2);
  REQUIRE(range.size() == 2);
  CHECK(range[0].seq() == 4);
  CHECK(range[1].seq() == 2);
  CHECK(cache->MessageCount() == 4);
}

TEST_CASE("cache: an epoch reset forgets conversations and messages but keeps the outbox") {
  testing::TempDir dir;
  {
    auto cache = Cache::Open(dir.File("c.db")).value();
    REQUIRE(cache->SetIdentity(11, "alice").ok());
    ConversationRow row;
    row.info.conversation_id = 1;
    row.info.peer = "bob";
    row.cursor = 1;
    REQUIRE(cache->PutConversation(row).ok());
    REQUIRE(cache->PutMessage(Msg(1, 1)).ok());
    OutboxEntry e = Entry("id-kept");
    REQUIRE(cache->AddOutbox(&e, 10).ok());
  }
  auto cache = Cache::Open(dir.File("c.db")).value();
  CHECK(cache->Epoch() == 11);
  CHECK(cache->UserId() == "alice");
  REQUIRE(cache->GetConversation(1).has_value());
  CHECK(cache->GetConversation(1)->info.peer == "bob");
  CHECK(cache->GetConversation(1)->cursor == 1);
  // Only inside a transaction, so that it cannot be committed half way.
  CHECK(cache->ResetForEpoch(12, "alice").code() == Code::kFailedPrecondition);
  CHECK(cache->Epoch() == 11);
  CHECK(cache->MessageCount() == 1);
  {
    Cache::Transaction txn(cache.get());
    REQUIRE(cache->ResetForEpoch(12, "alice").ok());
    REQUIRE(txn.Commit().ok());
  }
  CHECK(cache->Epoch() == 12);
  CHECK(cache->UserId() == "alice");
  CHECK(cache->ListConversations().empty());
  CHECK(cache->MessageCount() == 0);
  CHECK(cache->PendingCount() == 1);
  // Rolled back, it leaves the old identity and data.
  REQUIRE(cache->PutMessage(Msg(1, 1)).ok());
  {
    Cache::Transaction txn(cache.get());
    REQUIRE(cache->ResetForEpoch(13, "bob").ok());
  }
  CHECK(cache->Epoch() == 12);
  CHECK(cache->UserId() == "alice");
  CHECK(cache->MessageCount() == 1);
}

TEST_CASE("cache: an uncommitted transaction leaves nothing behind") {
  auto cache = Cache::Open("").value();
  {
    Cache::Transaction txn(cache.get());
    REQUIRE(cache->PutMessage(Msg(1, 1)).ok());
  }
  CHECK(cache->MessageCount() == 0);
  {
    Cache::Transaction txn(cache.get());
    REQUIRE(cache->PutMessage(Msg(1, 1)).ok());
    REQUIRE(txn.Commit().ok());
  }
  CHECK(cache->MessageCount() == 1);
}

TEST_CASE("cache: an unread count kept counts until a write of its row is committed") {
  auto cache = Cache::Open("").value();
  ConversationRow row;
  row.info.conversation_id = 5;
  row.info.unread = 4;
  REQUIRE(cache->PutConversation(row).ok());
  cache->KeepUnread(5, 3, 1);
  cache->KeepUnread(6, 0, 2);  // no row stored: neither listed nor counted
  CHECK(cache->UnreadTotal() == 1);
  // Listed as kept too, with the read watermark told with the count.
  REQUIRE(cache->ListConversationInfos().size() == 1);
  CHECK(cache->ListConversationInfos()[0].unread == 1);
  CHECK(cache->ListConversationInfos()[0].read_seq == 3);
  // A row loaded to be written takes the kept count and the read watermark told with it.
  ConversationRow loaded = *cache->GetConversation(5);
  cache->ApplyKept(&loaded);
  CHECK(loaded.info.read_seq == 3);
  CHECK(loaded.info.unread == 1);
  {
    // A write rolled back keeps the count.
    Cache::Transaction txn(cache.get());
    REQUIRE(cache->PutConversation(row).ok());
  }
  CHECK(cache->UnreadTotal() == 1);
  {
    Cache::Transaction txn(cache.get());
    REQUIRE(cache->PutConversation(row).ok());
    CHECK(cache->UnreadTotal() == 1);  // not before the commit
    // Loaded again in the same transaction, the row is the one written.
    ConversationRow again = *cache->GetConversation(5);
    cache->ApplyKept(&again);
    CHECK(again.info.unread == 4);
    REQUIRE(txn.Commit().ok());
  }
  CHECK(cache->UnreadTotal() == 4);
  CHECK(cache->ListConversationInfos()[0].unread == 4);
  // Nothing was kept of 6: a row made for it later does not take the count told before.
  ConversationRow made;
  made.info.conversation_id = 6;
  cache->ApplyKept(&made);
  CHECK(made.info.unread == 0);
  // Bounded: the oldest goes back to its stored count.
  cache->KeepUnread(5, 3, 1);
  CHECK(cache->UnreadTotal() == 1);
  row.info.unread = 0;
  for (ConversationId id = 100; id < 100 + kMaxKeptUnread; ++id) {
    row.info.conversation_id = id;
    REQUIRE(cache->PutConversation(row).ok());
    cache->KeepUnread(id, 0, 0);
  }
  CHECK(cache->UnreadTotal() == 4);
}

TEST_CASE("cache: the pending count follows removals, failures and rolled back transactions") {
  auto cache = Cache::Open("").value();
  OutboxEntry a = Entry("id-a"), b = Entry("id-b"), c = Entry("id-c");
  REQUIRE(cache->AddOutbox(&a, 2).ok());
  REQUIRE(cache->AddOutbox(&b, 2).ok());
  {
    Cache::Transaction txn(cache.get());
    REQUIRE(cache->RemoveOutbox("id-a").ok());
    REQUIRE(cache->FailOutbox("id-b", PermissionDenied("no")).ok());
    CHECK(cache->PendingCount() == 0);
  }
  // Rolled back: both are pending again, and the outbox is still full.
  CHECK(cache->PendingCount() == 2);
  REQUIRE(cache->FindOutbox("id-a").has_value());
  CHECK(cache->FindOutbox("id-b")->status == MessageStatus::kPending);
  CHECK(cache->AddOutbox(&c, 2).code() == Code::kResourceExhausted);
  CHECK(cache->PendingOutbox(10).size() == 2);
  {
    Cache::Transaction txn(cache.get());
    REQUIRE(cache->RemoveOutbox("id-a").ok());
    REQUIRE(txn.Commit().ok());
  }
  CHECK(cache->PendingCount() == 1);
  // Removing or failing what is not pending changes nothing.
  REQUIRE(cache->RemoveOutbox("id-a").ok());
  REQUIRE(cache->FailOutbox("id-b", PermissionDenied("no")).ok());
  REQUIRE(cache->FailOutbox("id-b", PermissionDenied("again")).ok());
  CHECK(cache->PendingCount() == 0);
  CHECK(cache->FindOutbox("id-b")->reason == PermissionDenied("no"));
  REQUIRE(cache->RemoveOutbox("id-b").ok());
  CHECK(cache->PendingCount() == 0);
  REQUIRE(cache->AddOutbox(&c, 1).ok());
  CHECK(cache->PendingCount() == 1);
  CHECK(cache->ListOutbox().size() == 1);
}

TEST_CASE("cache: a send that cannot have its own transaction is refused and writes nothing") {
  auto cache = Cache::Open("").value();
  {
    Cache::Transaction outer(cache.get());
    OutboxEntry a = Entry("id-a");
    CHECK(cache->AddOutbox(&a, 10).code() == Code::kUnavailable);
    REQUIRE(outer.Commit().ok());
  }
  CHECK(cache->ListOutbox().empty());
  CHECK(cache->PendingCount() == 0);
  OutboxEntry a = Entry("id-a");
  REQUIRE(cache->AddOutbox(&a, 10).ok());
  CHECK(cache->FindOutbox("id-a")->id == a.id);
}

TEST_CASE("cache: a full range is read newest first in one piece, a range with a hole is not") {
  auto cache = Cache::Open("").value();
  for (Seq s : {1, 2, 3, 5, 6}) REQUIRE(cache->PutMessage(Msg(1, s)).ok());
  REQUIRE(cache->PutMessage(Msg(2, 4)).ok());
  std::vector<Message> page;
  REQUIRE(cache->FullRangeNewestFirst(1, 1, 3, &page));
  REQUIRE(page.size() == 3);
  CHECK(page[0].seq == 3);
  CHECK(page[0].body == "body-3");
  CHECK(page[2].seq == 1);
  REQUIRE(cache->FullRangeNewestFirst(1, 5, 6, &page));
  REQUIRE(page.size() == 2);
  CHECK(page[0].seq == 6);
  // Seq 4 of conversation 1 is missing (conversation 2 has one).
  CHECK_FALSE(cache->FullRangeNewestFirst(1, 3, 6, &page));
  CHECK_FALSE(cache->FullRangeNewestFirst(1, 6, 7, &page));
  CHECK_FALSE(cache->FullRangeNewestFirst(1, 0, 2, &page));
  CHECK_FALSE(cache->FullRangeNewestFirst(1, 3, 2, &page));
}

TEST_CASE("cache: a closed cache refuses writes with Unavailable and reads nothing") {
  auto cache = Cache::Open("").value();
  OutboxEntry a = Entry("id-a");
  REQUIRE(cache->AddOutbox(&a, 10).ok());
  REQUIRE(cache->PutMessage(Msg(1, 1)).ok());
  cache->Close();
  OutboxEntry b = Entry("id-b");
  CHECK(cache->AddOutbox(&b, 10).code() == Code::kUnavailable);
  CHECK(cache->PutMessage(Msg(1, 2)).code() == Code::kUnavailable);
  CHECK(cache->ListOutbox().empty());
  CHECK_FALSE(cache->GetMessage(1, 1).has_value());
  std::vector<Message> page;
  CHECK_FALSE(cache->FullRangeNewestFirst(1, 1, 1, &page));
  Cache::Transaction txn(cache.get());
  CHECK(txn.Commit().code() == Code::kUnavailable);
}

// Runs `sql` on a plain SQLite file.
void ExecOnFile(const std::string& path, const char* sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  char* err = nullptr;
  const int rc = sqlite3_exec(db, sql, nullptr, nullptr, &err);
  CHECK_MESSAGE(rc == SQLITE_OK, (err ? err : ""));
  sqlite3_free(err);
  sqlite3_close(db);
}

// A cache file as schema version 2 wrote it: an AUTOINCREMENT outbox with an index on status.
void WriteVersion2Cache(const std::string& path) {
  const char* sql = R"sql(
PRAGMA journal_mode=WAL;
CREATE TABLE meta(key TEXT PRIMARY KEY, value BLOB);
INSERT INTO meta VALUES('user_id', 'alice');
CREATE TABLE conversations(conversation_id INTEGER PRIMARY KEY, state BLOB NOT NULL,
  cursor INTEGER NOT NULL, last_activity_ms INTEGER NOT NULL,
  delivered_all_seq INTEGER NOT NULL DEFAULT 0, read_all_seq INTEGER NOT NULL DEFAULT 0);
INSERT INTO conversations VALUES(1, x'', 1, 0, 0, 0);
CREATE TABLE messages(conversation_id INTEGER NOT NULL, seq INTEGER NOT NULL,
  message BLOB NOT NULL, PRIMARY KEY(conversation_id, seq)) WITHOUT ROWID;
CREATE TABLE outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, client_msg_id TEXT NOT NULL UNIQUE,
  conversation_id INTEGER NOT NULL, peer TEXT NOT NULL, content_type TEXT NOT NULL,
  body BLOB NOT NULL, created_ms INTEGER NOT NULL, status INTEGER NOT NULL,
  reason_code INTEGER NOT NULL, reason_message TEXT NOT NULL);
CREATE INDEX outbox_status ON outbox(status);
INSERT INTO outbox VALUES(5, 'id-old-1', 0, 'bob', 'text/plain', 'one', 1, 0, 0, '');
INSERT INTO outbox VALUES(7, 'id-old-2', 3, '', 'text/plain', 'two', 2, 2, 4, 'denied');
INSERT INTO outbox VALUES(9, 'id-old-3', 0, 'bob', 'text/plain', 'three', 3, 0, 0, '');
PRAGMA user_version=2;
)sql";
  ExecOnFile(path, sql);
}

// A cache file as schema version 4 wrote it (marked, conversations without receipt_due): direct
// conversation 1 with bob, given to the application up to seq 2 and read here up to seq 1, its
// two messages, and one pending outbox message.
void WriteVersion4Cache(const std::string& path) {
  ExecOnFile(path, R"sql(
PRAGMA journal_mode=WAL;
CREATE TABLE meta(key TEXT PRIMARY KEY, value BLOB);
INSERT INTO meta VALUES('epoch', 7);
INSERT INTO meta VALUES('user_id', 'alice');
CREATE TABLE conversations(conversation_id INTEGER PRIMARY KEY, state BLOB NOT NULL,
  cursor INTEGER NOT NULL, last_activity_ms INTEGER NOT NULL,
  delivered_all_seq INTEGER NOT NULL DEFAULT 0, read_all_seq INTEGER NOT NULL DEFAULT 0);
CREATE TABLE messages(conversation_id INTEGER NOT NULL, seq INTEGER NOT NULL,
  message BLOB NOT NULL, PRIMARY KEY(conversation_id, seq)) WITHOUT ROWID;
CREATE TABLE outbox(id INTEGER PRIMARY KEY, client_msg_id TEXT NOT NULL,
  conversation_id INTEGER NOT NULL, peer TEXT NOT NULL, content_type TEXT NOT NULL,
  body BLOB NOT NULL, created_ms INTEGER NOT NULL, status INTEGER NOT NULL,
  reason_code INTEGER NOT NULL, reason_message TEXT NOT NULL);
INSERT INTO outbox VALUES(4, 'id-v4', 1, '', 'text/plain', 'queued', 5, 0, 0, '');
PRAGMA application_id=1667785076;
PRAGMA user_version=4;
)sql");
  v1::ConversationState state;
  state.set_conversation_id(1);
  state.set_kind(v1::CONVERSATION_KIND_DIRECT);
  state.set_peer("bob");
  state.set_last_seq(2);
  state.set_delivered_seq(2);
  state.set_read_seq(1);
  state.set_unread(1);
  std::vector<std::pair<std::string, std::string>> rows = {
      {"INSERT INTO conversations VALUES(1, ?, 2, 100, 1, 0)", state.SerializeAsString()},
      {"INSERT INTO messages VALUES(1, 1, ?)", Msg(1, 1).SerializeAsString()},
      {"INSERT INTO messages VALUES(1, 2, ?)", Msg(1, 2).SerializeAsString()}};
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  for (const auto& [sql, blob] : rows) {
    sqlite3_stmt* stmt = nullptr;
    REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK);
    sqlite3_bind_blob(stmt, 1, blob.data(), static_cast<int>(blob.size()), SQLITE_TRANSIENT);
    CHECK(sqlite3_step(stmt) == SQLITE_DONE);
    sqlite3_finalize(stmt);
  }
  sqlite3_close(db);
}

int64_t UserVersion(const std::string& path) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &stmt, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
  const int64_t version = sqlite3_column_int64(stmt, 0);
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return version;
}

int64_t CountRows(const std::string& path, const char* table) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  const std::string sql = std::string("SELECT COUNT(*) FROM ") + table;
  REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
  const int64_t n = sqlite3_column_int64(stmt, 0);
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return n;
}

std::string JournalMode(const std::string& path) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &stmt, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
  std::string mode(reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0)));
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return mode;
}

TEST_CASE("cache: another program's SQLite file is refused with DataLoss and left unchanged") {
  testing::TempDir dir;
  // An app's own database, with tables named like the cache's and a version of its own.
  const std::string app = dir.File("app.db");
  ExecOnFile(app, R"sql(
CREATE TABLE messages(id INTEGER PRIMARY KEY, text TEXT);
CREATE TABLE conversations(id INTEGER PRIMARY KEY, title TEXT);
INSERT INTO messages VALUES(1, 'keep me');
PRAGMA user_version=12;
)sql");
  Result<std::unique_ptr<Cache>> opened = Cache::Open(app);
  REQUIRE_FALSE(opened.ok());
  CHECK(opened.status().code() == Code::kDataLoss);
  CHECK(opened.status().message().find("another program's database") != std::string::npos);
  CHECK(CountRows(app, "messages") == 1);
  CHECK(JournalMode(app) == "delete");
  // Version 0, but with a table a cache never has.
  const std::string other = dir.File("other.db");
  ExecOnFile(other,
             "CREATE TABLE settings(k TEXT, v TEXT); INSERT INTO settings VALUES('a', 'b');");
  opened = Cache::Open(other);
  REQUIRE_FALSE(opened.ok());
  CHECK(opened.status().code() == Code::kDataLoss);
  CHECK(opened.status().message().find("another program's database") != std::string::npos);
  CHECK(CountRows(other, "settings") == 1);
  // A version an old cache had, with tables named as a cache's but laid out otherwise; and
  // version 0 (SQLite's default) with such a table.
  for (const char* version : {"2", "0"}) {
    CAPTURE(version);
    const std::string lookalike = dir.File(std::string("lookalike-") + version + ".db");
    ExecOnFile(lookalike, (std::string(R"sql(
CREATE TABLE meta(key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE conversations(id INTEGER PRIMARY KEY, title TEXT);
CREATE TABLE messages(id INTEGER PRIMARY KEY, text TEXT);
CREATE TABLE outbox(id INTEGER PRIMARY KEY, text TEXT);
INSERT INTO messages VALUES(1, 'keep me');
PRAGMA user_version=)sql") +
                           version + ";")
                              .c_str());
    CHECK(Cache::Open(lookalike).status().code() == Code::kDataLoss);
    CHECK(CountRows(lookalike, "messages") == 1);
    CHECK(JournalMode(lookalike) == "delete");  // not switched to WAL either
  }
  // Another program's application_id.
  const std::string marked = dir.File("marked.db");
  ExecOnFile(marked, "PRAGMA application_id=42;");
  CHECK(Cache::Open(marked).status().code() == Code::kDataLoss);
  // A cache written by a newer SDK is refused, not downgraded.
  const std::string newer = dir.File("newer.db");
  ExecOnFile(newer,
             "PRAGMA application_id=1667785076; PRAGMA user_version=8; "
             "CREATE TABLE outbox(id INTEGER PRIMARY KEY, v6 TEXT);");
  opened = Cache::Open(newer);
  CHECK(opened.status().code() == Code::kFailedPrecondition);
  CHECK(opened.status().message().find("newer version of the SDK") != std::string::npos);
  CHECK(JournalMode(newer) == "delete");
  // An empty SQLite file becomes a cache, marked as one.
  const std::string empty = dir.File("empty.db");
  ExecOnFile(empty, "PRAGMA user_version=0;");
  REQUIRE(Cache::Open(empty).ok());
  REQUIRE(Cache::Open(empty).ok());
}

TEST_CASE("cache: an outbox of schema version 2 is carried over with its ids and order") {
  testing::TempDir dir;
  WriteVersion2Cache(dir.File("c.db"));
  for (int open = 0; open < 2; ++open) {
    auto opened = Cache::Open(dir.File("c.db"));
    REQUIRE(opened.ok());
    auto& cache = *opened;
    // The derived tables are rebuilt from the server; the user the outbox was written for
    // stays, so a Welcome for another user still fails its messages.
    CHECK(cache->UserId() == "alice");
    // The rebuilt conversations table is the current one, receipt_due included.
    if (open == 0) {
      CHECK_FALSE(cache->GetConversation(1).has_value());
      ConversationRow row;
      row.info.conversation_id = 1;
      row.receipt_due = true;
      REQUIRE(cache->PutConversation(row).ok());
    } else {
      REQUIRE(cache->GetConversation(1).has_value());
      CHECK(cache->GetConversation(1)->receipt_due);
    }
    std::vector<OutboxEntry> all = cache->ListOutbox();
    REQUIRE(all.size() == (open == 0 ? 3 : 4));
    CHECK(all[0].id == 5);
    CHECK(all[0].client_msg_id == "id-old-1");
    CHECK(all[0].peer == "bob");
    CHECK(all[0].body == "one");
    CHECK(all[1].status == MessageStatus::kFailed);
    CHECK(all[1].reason == PermissionDenied("denied"));
    CHECK(all[2].client_msg_id == "id-old-3");
    if (open == 0) {
      CHECK(cache->PendingCount() == 2);
      OutboxEntry next = Entry("id-new");
      REQUIRE(cache->AddOutbox(&next, 10).ok());
      CHECK(next.id > 9);
    } else {
      CHECK(cache->PendingCount() == 3);
      CHECK(all[3].client_msg_id == "id-new");
    }
  }
}

TEST_CASE("cache: a version 4 to 6 cache keeps its conversations, messages and outbox") {
  for (const int version : {4, 5, 6}) {
    CAPTURE(version);
    testing::TempDir dir;
    const std::string path = dir.File("c.db");
    WriteVersion4Cache(path);
    if (version >= 5) {
      ExecOnFile(path,
                 "ALTER TABLE conversations ADD COLUMN receipt_due INTEGER NOT NULL DEFAULT 0; "
                 "PRAGMA user_version=5;");
    }
    if (version == 6) {
      ExecOnFile(path,
                 "ALTER TABLE conversations ADD COLUMN expired_through INTEGER NOT NULL DEFAULT 0; "
                 "PRAGMA user_version=6;");
    }
    {
      auto opened = Cache::Open(path);
      REQUIRE(opened.ok());
      auto& cache = *opened;
      CHECK(cache->Epoch() == 7);
      CHECK(cache->UserId() == "alice");
      std::optional<ConversationRow> row = cache->GetConversation(1);
      REQUIRE(row.has_value());
      CHECK(row->info.peer == "bob");
      CHECK(row->info.delivered_seq == 2);
      CHECK(row->info.read_seq == 1);
      CHECK(row->info.unread == 1);
      CHECK(row->cursor == 2);
      CHECK(row->info.delivered_all_seq == 1);
      CHECK(row->info.read_all_seq == 0);
      CHECK_FALSE(row->receipt_due);
      CHECK(row->expired_through == 0);
      CHECK(cache->ReceiptsDue().empty());
      CHECK(cache->MessageCount() == 2);
      REQUIRE(cache->GetMessage(1, 2).has_value());
      CHECK(cache->GetMessage(1, 2)->body() == "body-2");
      std::vector<OutboxEntry> outbox = cache->ListOutbox();
      REQUIRE(outbox.size() == 1);
      CHECK(outbox[0].id == 4);
      CHECK(outbox[0].client_msg_id == "id-v4");
      CHECK(cache->PendingCount() == 1);
      // The new columns are written and read like the others.
      row->receipt_due = true;
      row->expired_through = 1;
      REQUIRE(cache->PutConversation(*row).ok());
    }
    CHECK(UserVersion(path) == 7);
    auto cache = Cache::Open(path).value();
    REQUIRE(cache->GetConversation(1).has_value());
    CHECK(cache->GetConversation(1)->receipt_due);
    CHECK(cache->GetConversation(1)->cursor == 2);
    CHECK(cache->GetConversation(1)->expired_through == 1);
    CHECK(cache->ReceiptsDue() == std::vector<ConversationId>{1});
    CHECK(cache->MessageCount() == 2);
  }
}

TEST_CASE("cache: a conversation's expired_through only goes up") {
  auto cache = Cache::Open("").value();
  ConversationRow row;
  row.info.conversation_id = 5;
  row.cursor = 3;
  row.expired_through = 6;
  REQUIRE(cache->PutConversation(row).ok());
  // A row read before the floor was raised, written back: the rest of it is taken.
  row.expired_through = 2;
  row.cursor = 8;
  REQUIRE(cache->PutConversation(row).ok());
  CHECK(cache->GetConversation(5)->expired_through == 6);
  CHECK(cache->GetConversation(5)->cursor == 8);
  CHECK(cache->ListConversations()[0].expired_through == 6);
  row.expired_through = 9;
  REQUIRE(cache->PutConversation(row).ok());
  CHECK(cache->GetConversation(5)->expired_through == 9);
}

TEST_CASE("cache: the lowest watermarks are kept in their columns and named in the Sync cursors") {
  auto cache = Cache::Open("").value();
  ConversationRow row;
  row.info.conversation_id = 5;
  row.info.kind = ConversationKind::kGroup;
  row.cursor = 4;
  row.info.delivered_all_seq = 4;
  row.info.read_all_seq = 2;
  REQUIRE(cache->PutConversation(row).ok());
  std::optional<ConversationRow> got = cache->GetConversation(5);
  REQUIRE(got.has_value());
  CHECK(got->info.delivered_all_seq == 4);
  CHECK(got->info.read_all_seq == 2);
  CHECK(cache->ListConversations().at(0).info.read_all_seq == 2);
  const std::vector<Cache::SyncCursor> cursors = cache->SyncCursors();
  REQUIRE(cursors.size() == 1);
  CHECK(cursors[0].delivered_all_seq == 4);
  CHECK(cursors[0].read_all_seq == 2);
}

TEST_CASE("cache: receipt_due is kept per conversation and listed by id") {
  auto cache = Cache::Open("").value();
  for (ConversationId id : {9, 3, 5}) {
    ConversationRow row;
    row.info.conversation_id = id;
    row.receipt_due = id != 5;
    REQUIRE(cache->PutConversation(row).ok());
  }
  CHECK(cache->ReceiptsDue() == std::vector<ConversationId>{3, 9});
  ConversationRow row = *cache->GetConversation(9);
  CHECK(row.receipt_due);
  row.receipt_due = false;
  REQUIRE(cache->PutConversation(row).ok());
  CHECK(cache->ReceiptsDue() == std::vector<ConversationId>{3});
  CHECK_FALSE(cache->GetConversation(5)->receipt_due);
}

TEST_CASE("cache: SyncCursors lists each conversation's cursor and lowest cached seq") {
  auto cache = Cache::Open("").value();
  for (ConversationId id : {9, 5, 7}) {
    ConversationRow row;
    row.info.conversation_id = id;
    row.cursor = id;
    REQUIRE(cache->PutConversation(row).ok());
  }
  for (Seq s : {4, 3, 6}) REQUIRE(cache->PutMessage(Msg(5, s)).ok());
  REQUIRE(cache->PutMessage(Msg(9, 2)).ok());
  REQUIRE(cache->PutMessage(Msg(8, 1)).ok());  // History of a conversation without a row
  const std::vector<Cache::SyncCursor> cursors = cache->SyncCursors();
  REQUIRE(cursors.size() == 3);
  CHECK(cursors[0].conversation_id == 5);
  CHECK(cursors[0].cursor == 5);
  CHECK(cursors[0].lowest_seq == 3);
  CHECK(cursors[1].conversation_id == 7);
  CHECK(cursors[1].lowest_seq == 0);
  CHECK(cursors[2].conversation_id == 9);
  CHECK(cursors[2].lowest_seq == 2);
}

}  // namespace
}  // namespace chat::client
