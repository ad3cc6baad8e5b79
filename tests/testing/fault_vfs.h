// FaultVfs: an SQLite VFS over the default one whose file writes fail on demand (SQLITE_FULL,
// as on a full disk), for tests of what the client does when its cache cannot be written.
//
// While a FaultVfs exists it is SQLite's default VFS, so every database opened meanwhile (with
// no VFS named) goes through it; the previous default comes back when it is destroyed. Files
// stay open through it after that only if the FaultVfs outlives them: destroy it last.
//
// Thread-safety: FailWrites may be called from any thread while SQLite uses the VFS.
#ifndef CHAT_TESTS_TESTING_FAULT_VFS_H_
#define CHAT_TESTS_TESTING_FAULT_VFS_H_

#include <sqlite3.h>

#include <atomic>

namespace chat::testing {

class FaultVfs {
 public:
  FaultVfs();
  ~FaultVfs();
  FaultVfs(const FaultVfs&) = delete;
  FaultVfs& operator=(const FaultVfs&) = delete;

  // From now on, every write and sync to a file opened through this VFS fails (true), or
  // passes to the default VFS again (false). Either ends a count of FailWritesAfterCommits.
  void FailWrites(bool fail) {
    commits_left_.store(-1);
    fail_.store(fail);
  }
  // The next `commits` transactions of databases in WAL mode (as the cache is) commit, then
  // every write and sync fails, as after FailWrites(true): for a failure of the transaction
  // after a given one. A commit is taken as written once the page of its WAL frame that marks
  // it a commit is.
  void FailWritesAfterCommits(int commits) {
    fail_.store(commits <= 0);
    commits_left_.store(commits > 0 ? commits : -1);
  }
  // Writes and syncs refused so far.
  int refused() const { return refused_.load(); }

  // A file opened through this VFS (fault_vfs.cc).
  struct File;

 private:
  static int Open(sqlite3_vfs* vfs, const char* name, sqlite3_file* file, int flags,
                  int* out_flags);
  static FaultVfs* Of(sqlite3_file* file);

  sqlite3_vfs vfs_{};
  sqlite3_vfs* base_ = nullptr;
  sqlite3_io_methods methods_{};
  std::atomic<bool> fail_{false};
  std::atomic<int> commits_left_{-1};  // -1: not counting
  std::atomic<int> refused_{0};
};

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_FAULT_VFS_H_
