#include "src/server/sqlite_wal_vfs.h"

#include <sqlite3.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace chat::server {
namespace {

// A WAL frame's header: page number, then the database size in pages, non-zero only in the
// frame that commits a transaction (https://sqlite.org/fileformat2.html#walformat).
constexpr int kFrameHeaderBytes = 24;

std::atomic<uint64_t> g_wal_writes{0};
sqlite3_vfs* g_base = nullptr;  // the VFS wrapped; set once, before registration

// An open WAL file: the base VFS's file follows at kBaseOffset. SQLite allocates szOsFile bytes
// and never runs constructors, so xOpen sets every field.
struct WalFile {
  sqlite3_file file;    // pMethods = kWalMethods once open
  sqlite3_file* base;   // the wrapped VFS's file
  unsigned char* held;  // kWalBufferBytes, allocated on the first write; owned
  sqlite3_int64 held_at;
  size_t held_bytes;
  bool commit_page_next;  // the last write was a commit frame's header
};
constexpr size_t kBaseOffset = (sizeof(WalFile) + 15) / 16 * 16;

WalFile* Wal(sqlite3_file* file) { return reinterpret_cast<WalFile*>(file); }

int BaseWrite(WalFile* f, const void* data, int bytes, sqlite3_int64 offset) {
  g_wal_writes.fetch_add(1, std::memory_order_relaxed);
  return f->base->pMethods->xWrite(f->base, data, bytes, offset);
}

// Writes what is held. Nothing is held afterwards, even when the write failed: SQLite fails the
// transaction, and its frames are rewritten by the next one.
int Flush(WalFile* f) {
  if (f->held_bytes == 0) return SQLITE_OK;
  const int bytes = static_cast<int>(f->held_bytes);
  f->held_bytes = 0;
  return BaseWrite(f, f->held, bytes, f->held_at);
}

int WalClose(sqlite3_file* file) {
  WalFile* f = Wal(file);
  const int flushed = Flush(f);
  const int closed = f->base->pMethods->xClose(f->base);
  std::free(f->held);
  f->held = nullptr;
  return flushed != SQLITE_OK ? flushed : closed;
}

int WalRead(sqlite3_file* file, void* out, int bytes, sqlite3_int64 offset) {
  WalFile* f = Wal(file);
  if (int rc = Flush(f); rc != SQLITE_OK) return rc;
  return f->base->pMethods->xRead(f->base, out, bytes, offset);
}

int WalWrite(sqlite3_file* file, const void* data, int bytes, sqlite3_int64 offset) {
  WalFile* f = Wal(file);
  const auto size = static_cast<size_t>(bytes);
  const bool follows =
      f->held_bytes > 0 && offset == f->held_at + static_cast<sqlite3_int64>(f->held_bytes);
  if (f->held_bytes > 0 && (!follows || f->held_bytes + size > kWalBufferBytes)) {
    if (int rc = Flush(f); rc != SQLITE_OK) return rc;
  }
  if (size >= kWalBufferBytes) return BaseWrite(f, data, bytes, offset);
  if (f->held == nullptr) {
    f->held = static_cast<unsigned char*>(std::malloc(kWalBufferBytes));
    if (f->held == nullptr) return BaseWrite(f, data, bytes, offset);
  }
  if (f->held_bytes == 0) f->held_at = offset;
  std::memcpy(f->held + f->held_bytes, data, size);
  f->held_bytes += size;

  // The page after a commit frame's header ends the transaction's frames: SQLite publishes
  // them next, without a sync under synchronous=NORMAL.
  if (f->commit_page_next) {
    f->commit_page_next = false;
    return Flush(f);
  }
  if (bytes == kFrameHeaderBytes) {
    const auto* h = static_cast<const unsigned char*>(data);
    f->commit_page_next = (h[4] | h[5] | h[6] | h[7]) != 0;
  }
  return SQLITE_OK;
}

int WalTruncate(sqlite3_file* file, sqlite3_int64 size) {
  WalFile* f = Wal(file);
  if (int rc = Flush(f); rc != SQLITE_OK) return rc;
  return f->base->pMethods->xTruncate(f->base, size);
}

int WalSync(sqlite3_file* file, int flags) {
  WalFile* f = Wal(file);
  if (int rc = Flush(f); rc != SQLITE_OK) return rc;
  return f->base->pMethods->xSync(f->base, flags);
}

int WalFileSize(sqlite3_file* file, sqlite3_int64* size) {
  WalFile* f = Wal(file);
  if (int rc = Flush(f); rc != SQLITE_OK) return rc;
  return f->base->pMethods->xFileSize(f->base, size);
}

int WalLock(sqlite3_file* file, int lock) {
  sqlite3_file* base = Wal(file)->base;
  return base->pMethods->xLock(base, lock);
}

int WalUnlock(sqlite3_file* file, int lock) {
  sqlite3_file* base = Wal(file)->base;
  return base->pMethods->xUnlock(base, lock);
}

int WalCheckReservedLock(sqlite3_file* file, int* out) {
  sqlite3_file* base = Wal(file)->base;
  return base->pMethods->xCheckReservedLock(base, out);
}

int WalFileControl(sqlite3_file* file, int op, void* arg) {
  WalFile* f = Wal(file);
  if (int rc = Flush(f); rc != SQLITE_OK) return rc;
  return f->base->pMethods->xFileControl(f->base, op, arg);
}

int WalSectorSize(sqlite3_file* file) {
  sqlite3_file* base = Wal(file)->base;
  return base->pMethods->xSectorSize(base);
}

int WalDeviceCharacteristics(sqlite3_file* file) {
  sqlite3_file* base = Wal(file)->base;
  return base->pMethods->xDeviceCharacteristics(base);
}

// Version 1: SQLite maps shared memory and pages only through the database file, never the WAL.
const sqlite3_io_methods kWalMethods = {
    1,
    WalClose,
    WalRead,
    WalWrite,
    WalTruncate,
    WalSync,
    WalFileSize,
    WalLock,
    WalUnlock,
    WalCheckReservedLock,
    WalFileControl,
    WalSectorSize,
    WalDeviceCharacteristics,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

// Every file but a WAL is the base VFS's own, opened in place (szOsFile covers it); the base
// VFS is called with its own pointer.
int Open(sqlite3_vfs*, const char* name, sqlite3_file* file, int flags, int* out_flags) {
  if ((flags & SQLITE_OPEN_WAL) == 0) return g_base->xOpen(g_base, name, file, flags, out_flags);
  WalFile* f = Wal(file);
  f->file.pMethods = nullptr;
  f->base = reinterpret_cast<sqlite3_file*>(reinterpret_cast<char*>(file) + kBaseOffset);
  f->base->pMethods = nullptr;
  f->held = nullptr;
  f->held_at = 0;
  f->held_bytes = 0;
  f->commit_page_next = false;
  const int rc = g_base->xOpen(g_base, name, f->base, flags, out_flags);
  if (rc != SQLITE_OK) {
    // SQLite closes only what it sees open: ours is not, the base file may be.
    if (f->base->pMethods != nullptr) f->base->pMethods->xClose(f->base);
    return rc;
  }
  f->file.pMethods = &kWalMethods;
  return SQLITE_OK;
}

}  // namespace

const char* WalBufferingVfsName() {
  static const char* const name = []() -> const char* {
    if (sqlite3_initialize() != SQLITE_OK) return nullptr;
    sqlite3_vfs* base = sqlite3_vfs_find(nullptr);
    if (base == nullptr) return nullptr;
    g_base = base;
    // The base VFS's other methods are called with this VFS's pointer, whose fields (the path
    // limit, pAppData) are the base's own.
    static sqlite3_vfs vfs = *base;
    vfs.zName = "chat-wal-buffering";
    vfs.pNext = nullptr;
    vfs.szOsFile = static_cast<int>(kBaseOffset) + base->szOsFile;
    vfs.xOpen = Open;
    if (sqlite3_vfs_register(&vfs, 0) != SQLITE_OK) return nullptr;
    return vfs.zName;
  }();
  return name;
}

uint64_t WalBufferingVfsWrites() { return g_wal_writes.load(std::memory_order_relaxed); }

}  // namespace chat::server
