// The WAL-buffering VFS: a commit's frames in few writes, commits visible to other connections
// as soon as they are committed (also without a sync), failed writes failing the commit, and
// files that the default VFS reads as its own.

#include "src/server/sqlite_wal_vfs.h"

#include <signal.h>
#include <sqlite3.h>
#include <sys/resource.h>

#include <cstdint>
#include <filesystem>
#include <string>

#include "doctest/doctest.h"
#include "tests/testing/temp_dir.h"

namespace chat {
namespace {

using server::WalBufferingVfsName;
using server::WalBufferingVfsWrites;
using testing::TempDir;

// One connection; `vfs` nullptr is SQLite's default.
class Db {
 public:
  Db(const std::string& path, const char* vfs) {
    REQUIRE(sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, vfs) ==
            SQLITE_OK);
    sqlite3_extended_result_codes(db_, 1);
  }
  ~Db() { sqlite3_close_v2(db_); }
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;

  int Exec(const std::string& sql) {
    return sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, nullptr);
  }
  int64_t Int(const std::string& sql) {
    sqlite3_stmt* stmt = nullptr;
    REQUIRE(sqlite3_prepare_v2(db_, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK);
    REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
    const int64_t value = sqlite3_column_int64(stmt, 0);
    sqlite3_finalize(stmt);
    return value;
  }
  std::string Text(const std::string& sql) {
    sqlite3_stmt* stmt = nullptr;
    REQUIRE(sqlite3_prepare_v2(db_, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK);
    REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
    std::string value = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
    sqlite3_finalize(stmt);
    return value;
  }
  // Inserts `rows` rows of `bytes` random bytes in one transaction.
  int InsertRows(int rows, int bytes) {
    if (int rc = Exec("BEGIN IMMEDIATE"); rc != SQLITE_OK) return rc;
    for (int i = 0; i < rows; ++i) {
      const int rc = Exec("INSERT INTO t(v) VALUES(randomblob(" + std::to_string(bytes) + "))");
      if (rc != SQLITE_OK) {
        Exec("ROLLBACK");
        return rc;
      }
    }
    return Exec("COMMIT");
  }
  sqlite3* raw() { return db_; }

 private:
  sqlite3* db_ = nullptr;
};

void MakeWalTable(Db& db, const char* synchronous) {
  REQUIRE(db.Text("PRAGMA journal_mode=WAL") == "wal");
  REQUIRE(db.Exec(std::string("PRAGMA synchronous=") + synchronous) == SQLITE_OK);
  REQUIRE(db.Exec("PRAGMA wal_autocheckpoint=0") == SQLITE_OK);
  REQUIRE(db.Exec("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB)") == SQLITE_OK);
}

TEST_CASE("the WAL-buffering VFS writes a commit's frames in a few writes, not two per page") {
  REQUIRE(WalBufferingVfsName() != nullptr);
  TempDir dir;
  const std::string path = dir.File("a.db");
  {
    Db db(path, WalBufferingVfsName());
    MakeWalTable(db, "FULL");
    const uint64_t before = WalBufferingVfsWrites();
    // About 60 pages: 120 frame writes without the VFS; 4,120-byte frames, 29 to a buffer.
    REQUIRE(db.InsertRows(60, 3000) == SQLITE_OK);
    const uint64_t writes = WalBufferingVfsWrites() - before;
    CHECK(writes >= 2);
    CHECK(writes <= 4);
    CHECK(db.Int("SELECT count(*) FROM t") == 60);
    // The files are SQLite's own format: the default VFS recovers the copied WAL (checking
    // every frame's checksum) and reads the rows from it.
    std::filesystem::copy_file(path, dir.File("b.db"));
    std::filesystem::copy_file(path + "-wal", dir.File("b.db-wal"));
  }
  Db plain(dir.File("b.db"), nullptr);
  CHECK(plain.Int("SELECT count(*) FROM t") == 60);
  CHECK(plain.Text("PRAGMA integrity_check") == "ok");
}

TEST_CASE("a commit through the WAL-buffering VFS is visible to other connections at once") {
  TempDir dir;
  const std::string path = dir.File("a.db");
  for (const char* synchronous : {"NORMAL", "FULL"}) {
    const std::string mode = synchronous;
    CAPTURE(mode);
    Db writer(path, WalBufferingVfsName());
    MakeWalTable(writer, synchronous);
    Db reader(path, nullptr);
    const int64_t start = reader.Int("SELECT count(*) FROM t");
    int64_t expected = start;
    for (int round = 0; round < 20; ++round) {
      // Small commits stay in the buffer until their commit frame; large ones (200 pages) also
      // write frames before it, which no reader may see before the commit.
      const int rows = round % 5 == 4 ? 200 : 1 + round;
      REQUIRE(writer.InsertRows(rows, 3000) == SQLITE_OK);
      expected += rows;
      REQUIRE(reader.Int("SELECT count(*) FROM t") == expected);
      // A checkpoint by another connection resets the WAL: the writer starts over at its head.
      if (round % 7 == 6) {
        REQUIRE(reader.Exec("PRAGMA wal_checkpoint(TRUNCATE)") == SQLITE_OK);
      }
    }
    CHECK(reader.Text("PRAGMA integrity_check") == "ok");
  }
}

TEST_CASE("a WAL write that fails fails its commit and loses nothing committed before") {
  TempDir dir;
  const std::string path = dir.File("a.db");
  Db db(path, WalBufferingVfsName());
  MakeWalTable(db, "FULL");
  REQUIRE(db.InsertRows(10, 3000) == SQLITE_OK);
  const auto wal_size = static_cast<rlim_t>(std::filesystem::file_size(path + "-wal"));

  // Files may not grow past 16 KiB beyond the WAL's size: the commit's buffered frames (about
  // 200 KiB) cannot all be written. A write past the limit fails with EFBIG (SIGXFSZ ignored).
  struct sigaction ignore = {};
  ignore.sa_handler = SIG_IGN;
  struct sigaction old_action = {};
  REQUIRE(sigaction(SIGXFSZ, &ignore, &old_action) == 0);
  rlimit old_limit = {};
  REQUIRE(getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
  rlimit limit = old_limit;
  limit.rlim_cur = wal_size + 16384;
  REQUIRE(setrlimit(RLIMIT_FSIZE, &limit) == 0);
  const int failed = db.InsertRows(50, 3000);
  REQUIRE(setrlimit(RLIMIT_FSIZE, &old_limit) == 0);
  REQUIRE(sigaction(SIGXFSZ, &old_action, nullptr) == 0);

  CHECK(failed != SQLITE_OK);
  CHECK((failed & 0xff) == SQLITE_IOERR);
  db.Exec("ROLLBACK");  // if SQLite left the transaction open
  CHECK(db.Int("SELECT count(*) FROM t") == 10);
  REQUIRE(db.InsertRows(5, 3000) == SQLITE_OK);
  CHECK(db.Int("SELECT count(*) FROM t") == 15);
  CHECK(db.Text("PRAGMA integrity_check") == "ok");

  // And from a fresh connection of the default VFS, which recovers the WAL itself.
  Db plain(path, nullptr);
  CHECK(plain.Int("SELECT count(*) FROM t") == 15);
  CHECK(plain.Text("PRAGMA integrity_check") == "ok");
}

}  // namespace
}  // namespace chat
