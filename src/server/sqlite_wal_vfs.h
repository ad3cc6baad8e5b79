// A SQLite VFS that writes each transaction's WAL frames with one system call.
//
// SQLite writes a WAL frame as two writes, its 24-byte header and then the page, so a commit of
// 40 pages costs 80 `pwrite`s, and each of them pays for the file blocks it touches (a page
// written at a frame's offset spans two). This VFS forwards everything to the default VFS
// except the writes to WAL files: those that continue where the previous one ended are gathered
// in one bounded buffer per open WAL file and written together. The buffer is written out
// before anything could observe the file without it: before a sync, a read, a size query, a
// truncate or close, before a write elsewhere in the file, when it is full, and right after
// the page of a commit frame (so a commit is in the file when SQLite publishes it to other
// connections through the WAL index, with or without a sync). A failed write of the buffer is
// returned by the call that caused it, so a commit whose frames could not be written fails.
//
// Thread-safety: registering is; each open file is used by one connection at a time, as SQLite
// does.
#ifndef CHAT_SRC_SERVER_SQLITE_WAL_VFS_H_
#define CHAT_SRC_SERVER_SQLITE_WAL_VFS_H_

#include <cstddef>
#include <cstdint>

namespace chat::server {

// The most a WAL file holds back before writing: SQLite's unix VFS writes at most 128 KiB - 1
// bytes per call (and reports a larger write as a full disk).
inline constexpr size_t kWalBufferBytes = size_t{120} << 10;

// Registers the VFS (once; not as the default) and returns its name for sqlite3_open_v2, or
// nullptr when SQLite has no default VFS to wrap or registration failed.
const char* WalBufferingVfsName();

// For tests: `write` system calls made on WAL files through the VFS since the process started.
uint64_t WalBufferingVfsWrites();

}  // namespace chat::server

#endif  // CHAT_SRC_SERVER_SQLITE_WAL_VFS_H_
