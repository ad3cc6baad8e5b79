// SlotPool: equal-sized memory slots carved from 64 KiB slabs.
//
// For one allocation size whose blocks a general allocator would place a power of two apart.
// jemalloc keeps a 952-byte block in its 1,024-byte class, so many such blocks read at the same
// offset all land in the same few cache sets; slots of 960 bytes (15 cache lines) spread over all
// of them and take 64 bytes less each. PoolConnectionMemory serves libwebsockets' connection
// structs from one (src/server/connection_memory.cc, docs/server.md "Allocator").
//
// Slots are handed out from partly used slabs first; a slab is carved lazily, so its untouched
// pages are never faulted in; a slab whose slots are all free is released unless no other empty
// slab is kept (one spare). Slots are 16-byte aligned. Under AddressSanitizer a free slot is
// poisoned (its first 8 bytes hold the free list), so a use after Free is reported, and a slot
// freed twice aborts.
//
// Thread-safety: every member may be called from any thread.
#ifndef CHAT_SRC_CORE_SLOT_POOL_H_
#define CHAT_SRC_CORE_SLOT_POOL_H_

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <unordered_set>

namespace chat {

class SlotPool {
 public:
  static constexpr size_t kSlabBytes = 64 * 1024;

  // slot_bytes: a multiple of 16 in 16..4096.
  explicit SlotPool(size_t slot_bytes);
  // Releases every slab; slots still in use must not be touched afterwards.
  ~SlotPool();
  SlotPool(const SlotPool&) = delete;
  SlotPool& operator=(const SlotPool&) = delete;

  size_t slot_bytes() const { return slot_bytes_; }
  size_t slots_per_slab() const { return slots_per_slab_; }

  // A free slot of slot_bytes() bytes, or nullptr when no memory is left.
  void* Allocate();
  // True when `p` points into one of this pool's slabs (a slot from Allocate, used or not).
  bool Owns(const void* p) const;
  // Returns a slot from Allocate. Freeing anything else is undefined.
  void Free(void* p);

  // Slabs held, slots in use and slabs ever created (for tests and diagnostics).
  size_t slabs() const;
  size_t in_use() const;
  size_t slabs_created() const;

 private:
  struct Slab;

  Slab* NewSlab();
  void Unlink(Slab* slab);
  void PushPartial(Slab* slab);

  const size_t slot_bytes_;
  const size_t slots_per_slab_;
  mutable std::mutex mu_;
  std::unordered_set<uintptr_t> slabs_;  // every slab's address
  Slab* partial_ = nullptr;              // slabs with a free or uncarved slot
  Slab* spare_ = nullptr;                // the one empty slab kept, if any (also in partial_)
  size_t in_use_ = 0;
  size_t slabs_created_ = 0;
};

}  // namespace chat

#endif  // CHAT_SRC_CORE_SLOT_POOL_H_
