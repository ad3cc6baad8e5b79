#include "tests/testing/cache_file.h"

#include <doctest/doctest.h>
#include <sqlite3.h>

#include <string>

namespace chat::testing {

std::vector<Seq> FileSeqs(const std::string& path, ConversationId conversation) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, "SELECT seq FROM messages WHERE conversation_id = ? ORDER BY seq",
                             -1, &stmt, nullptr) == SQLITE_OK);
  sqlite3_bind_int64(stmt, 1, static_cast<int64_t>(conversation));
  std::vector<Seq> seqs;
  while (sqlite3_step(stmt) == SQLITE_ROW) {
    seqs.push_back(static_cast<Seq>(sqlite3_column_int64(stmt, 0)));
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return seqs;
}

void FailConversationWrites(const std::string& path, ConversationId conversation, bool fail) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE, nullptr) == SQLITE_OK);
  const std::string name = "fail_conversation_" + std::to_string(conversation);
  // A write of a row is an upsert, whose BEFORE INSERT trigger fires whether it inserts or not.
  const std::string sql = fail ? "CREATE TRIGGER IF NOT EXISTS " + name +
                                     " BEFORE INSERT ON conversations WHEN NEW.conversation_id = " +
                                     std::to_string(conversation) +
                                     " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
                               : "DROP TRIGGER IF EXISTS " + name;
  char* error = nullptr;
  const int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error);
  const std::string message = error != nullptr ? error : "";
  sqlite3_free(error);
  sqlite3_close(db);
  INFO(message);
  REQUIRE(rc == SQLITE_OK);
}

}  // namespace chat::testing
