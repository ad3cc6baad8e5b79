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
  // passes to the default VFS again (false).
  void FailWrites(bool fail) { fail_.store(fail); }
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
  std::atomic<int> refused_{0};
};

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_FAULT_VFS_H_
