#include "tests/testing/cache_file.h"

#include <doctest/doctest.h>
#include <sqlite3.h>

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

}  // namespace chat::testing
