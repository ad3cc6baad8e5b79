#include "tests/testing/fault_vfs.h"

#include <doctest/doctest.h>

#include <cstring>

namespace chat::testing {

// The wrapper's file: the base VFS's file follows it in the same allocation (szOsFile covers
// both).
struct FaultVfs::File {
  sqlite3_file base;  // pMethods = &FaultVfs::methods_ once opened
  FaultVfs* owner;
  bool wal;          // a write-ahead log
  bool commit_page;  // the next write is the page of a commit frame (WAL)
  sqlite3_file* real() { return reinterpret_cast<sqlite3_file*>(this + 1); }
};

namespace {

sqlite3_file* Real(sqlite3_file* f) { return reinterpret_cast<FaultVfs::File*>(f)->real(); }

}  // namespace

FaultVfs* FaultVfs::Of(sqlite3_file* file) { return reinterpret_cast<File*>(file)->owner; }

namespace {

// The size of a WAL file's header and of each frame's header; a frame's header is written on its
// own, then its page. Bytes 4..7 of a frame's header (the database's size in pages after a
// commit) are nonzero only in the last frame of a commit.
constexpr sqlite3_int64 kWalHeaderBytes = 32;
constexpr int kWalFrameHeaderBytes = 24;

bool IsCommitFrameHeader(const void* buf, int n, sqlite3_int64 off) {
  if (n != kWalFrameHeaderBytes || off < kWalHeaderBytes) return false;
  const auto* bytes = static_cast<const unsigned char*>(buf);
  return (bytes[4] | bytes[5] | bytes[6] | bytes[7]) != 0;
}

}  // namespace

FaultVfs::FaultVfs() {
  base_ = sqlite3_vfs_find(nullptr);
  REQUIRE(base_ != nullptr);
  vfs_ = *base_;
  vfs_.zName = "chat-test-fault";
  vfs_.pAppData = this;
  vfs_.szOsFile = static_cast<int>(sizeof(File)) + base_->szOsFile;
  vfs_.pNext = nullptr;
  vfs_.xOpen = &FaultVfs::Open;

  methods_.iVersion = 3;
  methods_.xClose = [](sqlite3_file* f) {
    sqlite3_file* real = Real(f);
    return real->pMethods != nullptr ? real->pMethods->xClose(real) : SQLITE_OK;
  };
  methods_.xRead = [](sqlite3_file* f, void* buf, int n, sqlite3_int64 off) {
    return Real(f)->pMethods->xRead(Real(f), buf, n, off);
  };
  methods_.xWrite = [](sqlite3_file* f, const void* buf, int n, sqlite3_int64 off) {
    FaultVfs* owner = Of(f);
    if (owner->fail_.load()) {
      owner->refused_.fetch_add(1);
      return SQLITE_FULL;
    }
    const int rc = Real(f)->pMethods->xWrite(Real(f), buf, n, off);
    auto* file = reinterpret_cast<File*>(f);
    if (rc != SQLITE_OK || !file->wal) return rc;
    if (file->commit_page) {
      file->commit_page = false;
      if (owner->commits_left_.load() > 0 && owner->commits_left_.fetch_sub(1) == 1) {
        owner->fail_.store(true);
      }
    } else {
      file->commit_page = IsCommitFrameHeader(buf, n, off);
    }
    return rc;
  };
  methods_.xTruncate = [](sqlite3_file* f, sqlite3_int64 size) {
    return Real(f)->pMethods->xTruncate(Real(f), size);
  };
  methods_.xSync = [](sqlite3_file* f, int flags) {
    if (FaultVfs* owner = Of(f); owner->fail_.load()) {
      owner->refused_.fetch_add(1);
      return SQLITE_IOERR_FSYNC;
    }
    return Real(f)->pMethods->xSync(Real(f), flags);
  };
  methods_.xFileSize = [](sqlite3_file* f, sqlite3_int64* size) {
    return Real(f)->pMethods->xFileSize(Real(f), size);
  };
  methods_.xLock = [](sqlite3_file* f, int lock) {
    return Real(f)->pMethods->xLock(Real(f), lock);
  };
  methods_.xUnlock = [](sqlite3_file* f, int lock) {
    return Real(f)->pMethods->xUnlock(Real(f), lock);
  };
  methods_.xCheckReservedLock = [](sqlite3_file* f, int* out) {
    return Real(f)->pMethods->xCheckReservedLock(Real(f), out);
  };
  methods_.xFileControl = [](sqlite3_file* f, int op, void* arg) {
    return Real(f)->pMethods->xFileControl(Real(f), op, arg);
  };
  methods_.xSectorSize = [](sqlite3_file* f) { return Real(f)->pMethods->xSectorSize(Real(f)); };
  methods_.xDeviceCharacteristics = [](sqlite3_file* f) {
    return Real(f)->pMethods->xDeviceCharacteristics(Real(f));
  };
  methods_.xShmMap = [](sqlite3_file* f, int page, int size, int extend, void volatile** out) {
    return Real(f)->pMethods->xShmMap(Real(f), page, size, extend, out);
  };
  methods_.xShmLock = [](sqlite3_file* f, int offset, int n, int flags) {
    return Real(f)->pMethods->xShmLock(Real(f), offset, n, flags);
  };
  methods_.xShmBarrier = [](sqlite3_file* f) { Real(f)->pMethods->xShmBarrier(Real(f)); };
  methods_.xShmUnmap = [](sqlite3_file* f, int del) {
    return Real(f)->pMethods->xShmUnmap(Real(f), del);
  };
  methods_.xFetch = [](sqlite3_file* f, sqlite3_int64 off, int n, void** out) {
    return Real(f)->pMethods->xFetch(Real(f), off, n, out);
  };
  methods_.xUnfetch = [](sqlite3_file* f, sqlite3_int64 off, void* p) {
    return Real(f)->pMethods->xUnfetch(Real(f), off, p);
  };
  REQUIRE(sqlite3_vfs_register(&vfs_, /*makeDflt=*/1) == SQLITE_OK);
}

FaultVfs::~FaultVfs() {
  sqlite3_vfs_unregister(&vfs_);
  sqlite3_vfs_register(base_, /*makeDflt=*/1);
}

int FaultVfs::Open(sqlite3_vfs* vfs, const char* name, sqlite3_file* file, int flags,
                   int* out_flags) {
  auto* self = static_cast<FaultVfs*>(vfs->pAppData);
  auto* wrapped = reinterpret_cast<File*>(file);
  std::memset(wrapped, 0, sizeof(File));
  wrapped->owner = self;
  wrapped->wal = (flags & SQLITE_OPEN_WAL) != 0;
  sqlite3_file* real = wrapped->real();
  std::memset(real, 0, static_cast<size_t>(self->base_->szOsFile));
  const int rc = self->base_->xOpen(self->base_, name, real, flags, out_flags);
  // SQLite calls xClose only when pMethods is set; a failed open leaves it unset.
  if (real->pMethods != nullptr) wrapped->base.pMethods = &self->methods_;
  return rc;
}

}  // namespace chat::testing
