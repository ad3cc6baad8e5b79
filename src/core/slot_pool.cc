#include "src/core/slot_pool.h"

#include <cstdlib>
#include <new>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)  // clang
#define CHAT_SLOT_POOL_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)  // gcc
#define CHAT_SLOT_POOL_ASAN 1
#endif

#if defined(CHAT_SLOT_POOL_ASAN)
#include <sanitizer/asan_interface.h>
#define CHAT_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define CHAT_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define CHAT_POISON(p, n) ((void)(p), (void)(n))
#define CHAT_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace chat {

// The start of every slab; its slots follow at kHeaderBytes.
struct SlotPool::Slab {
  Slab* prev = nullptr;  // in partial_
  Slab* next = nullptr;
  void* free = nullptr;  // freed slots, linked through their first 8 bytes
  uint32_t live = 0;     // slots handed out and not freed
  uint32_t carved = 0;   // slots handed out at least once; the rest were never touched
  bool listed = false;   // in partial_
};

namespace {

constexpr size_t kHeaderBytes = 64;

uintptr_t SlabOf(const void* p) {
  return reinterpret_cast<uintptr_t>(p) & ~uintptr_t{SlotPool::kSlabBytes - 1};
}

size_t CheckedSlotBytes(size_t slot_bytes) {
  if (slot_bytes < 16 || slot_bytes > 4096 || slot_bytes % 16 != 0) std::abort();
  return slot_bytes;
}

}  // namespace

SlotPool::SlotPool(size_t slot_bytes)
    : slot_bytes_(CheckedSlotBytes(slot_bytes)),
      slots_per_slab_((kSlabBytes - kHeaderBytes) / slot_bytes_) {
  static_assert(sizeof(Slab) <= kHeaderBytes);
}

SlotPool::~SlotPool() {
  for (uintptr_t base : slabs_) {
    CHAT_UNPOISON(reinterpret_cast<void*>(base), kSlabBytes);
    std::free(reinterpret_cast<void*>(base));
  }
}

SlotPool::Slab* SlotPool::NewSlab() {
  void* memory = std::aligned_alloc(kSlabBytes, kSlabBytes);
  if (memory == nullptr) return nullptr;
  try {
    slabs_.insert(reinterpret_cast<uintptr_t>(memory));
  } catch (const std::bad_alloc&) {
    std::free(memory);
    return nullptr;
  }
  auto* slab = new (memory) Slab();
  CHAT_POISON(static_cast<char*>(memory) + kHeaderBytes, kSlabBytes - kHeaderBytes);
  ++slabs_created_;
  return slab;
}

void SlotPool::PushPartial(Slab* slab) {
  slab->listed = true;
  slab->prev = nullptr;
  slab->next = partial_;
  if (partial_ != nullptr) partial_->prev = slab;
  partial_ = slab;
}

void SlotPool::Unlink(Slab* slab) {
  if (slab->prev != nullptr) slab->prev->next = slab->next;
  if (slab->next != nullptr) slab->next->prev = slab->prev;
  if (partial_ == slab) partial_ = slab->next;
  slab->prev = slab->next = nullptr;
  slab->listed = false;
}

void* SlotPool::Allocate() {
  std::lock_guard lock(mu_);
  Slab* slab = partial_;
  if (slab == nullptr) {
    slab = NewSlab();
    if (slab == nullptr) return nullptr;
    PushPartial(slab);
  }
  void* slot = nullptr;
  if (slab->free != nullptr) {
    slot = slab->free;
    slab->free = *static_cast<void**>(slot);
  } else {
    slot = reinterpret_cast<char*>(slab) + kHeaderBytes + slab->carved * slot_bytes_;
    ++slab->carved;
  }
  if (slab == spare_) spare_ = nullptr;  // in use again
  ++slab->live;
  ++in_use_;
  if (slab->free == nullptr && slab->carved == slots_per_slab_) Unlink(slab);
  CHAT_UNPOISON(slot, slot_bytes_);
  return slot;
}

bool SlotPool::Owns(const void* p) const {
  std::lock_guard lock(mu_);
  return slabs_.count(SlabOf(p)) != 0 && reinterpret_cast<uintptr_t>(p) - SlabOf(p) >= kHeaderBytes;
}

void SlotPool::Free(void* p) {
  std::lock_guard lock(mu_);
  auto* slab = reinterpret_cast<Slab*>(SlabOf(p));
#if defined(CHAT_SLOT_POOL_ASAN)
  // A slot freed twice is poisoned already: fail loudly rather than corrupt the free list.
  if (__asan_address_is_poisoned(static_cast<char*>(p) + sizeof(void*))) std::abort();
#endif
  CHAT_POISON(static_cast<char*>(p) + sizeof(void*), slot_bytes_ - sizeof(void*));
  *static_cast<void**>(p) = slab->free;
  slab->free = p;
  --slab->live;
  --in_use_;
  if (!slab->listed) PushPartial(slab);
  if (slab->live != 0) return;
  // All free: kept as the spare when there is none (the next Allocate may need it; without one
  // a count of slots hovering at a slab boundary would allocate and release a slab each time),
  // released otherwise.
  if (spare_ == nullptr) {
    spare_ = slab;
    return;
  }
  Unlink(slab);
  slabs_.erase(reinterpret_cast<uintptr_t>(slab));
  CHAT_UNPOISON(slab, kSlabBytes);
  std::free(slab);
}

size_t SlotPool::slabs() const {
  std::lock_guard lock(mu_);
  return slabs_.size();
}

size_t SlotPool::in_use() const {
  std::lock_guard lock(mu_);
  return in_use_;
}

size_t SlotPool::slabs_created() const {
  std::lock_guard lock(mu_);
  return slabs_created_;
}

}  // namespace chat
