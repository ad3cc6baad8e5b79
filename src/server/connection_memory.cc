// PoolConnectionMemory (chat/server.h): libwebsockets' connection structs from 960-byte slots.
//
// libwebsockets' connection struct (952 bytes in Debian's 4.1 with its libev plugin) lands in
// jemalloc's 1,024-byte class, so the structs of all connections sit 1 KiB apart, and lws reads a
// field of every one of them whenever it adds or closes a connection (its descriptor-table
// check): at that stride the reads share a few cache sets and miss. Connection structs ("new
// server wsi", "listen wsi", "event pipe wsi", ... by lws's allocation reason) of that size are
// served from 960-byte slots instead (docs/server.md, "Allocator"); every other lws allocation,
// and a struct of another size, keeps the process's malloc.
#include <libwebsockets.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string_view>

#include "chat/server.h"
#include "src/core/slot_pool.h"

namespace chat {
namespace {

constexpr size_t kLwsSlotBytes = 960;
constexpr size_t kLwsSlotMinBytes = 897;  // smaller blocks keep the allocator's own size classes

bool IsConnectionStruct(const char* reason) {
  constexpr std::string_view kSuffix = " wsi";
  return reason != nullptr && std::string_view(reason).ends_with(kSuffix);
}

SlotPool& LwsSlots() {
  static auto* const pool = new SlotPool(kLwsSlotBytes);  // outlives lws: never freed
  return *pool;
}

// lws_set_allocator's contract: realloc(nullptr, n) allocates, realloc(p, 0) frees. A block
// lws allocated before the pool was installed is not the pool's and goes back to malloc.
void* LwsRealloc(void* ptr, size_t size, const char* reason) {
  SlotPool& slots = LwsSlots();
  if (ptr != nullptr && slots.Owns(ptr)) {
    if (size == 0) {
      slots.Free(ptr);
      return nullptr;
    }
    if (size <= slots.slot_bytes()) return ptr;
    void* moved = std::malloc(size);
    if (moved == nullptr) return nullptr;  // as realloc: the block stays valid
    std::memcpy(moved, ptr, slots.slot_bytes());
    slots.Free(ptr);
    return moved;
  }
  if (size == 0) {
    std::free(ptr);
    return nullptr;
  }
  if (ptr == nullptr && size >= kLwsSlotMinBytes && size <= slots.slot_bytes() &&
      IsConnectionStruct(reason)) {
    if (void* slot = slots.Allocate()) return slot;
  }
  return std::realloc(ptr, size);
}

}  // namespace

void PoolConnectionMemory() {
  static std::once_flag once;
  std::call_once(once, [] {
    (void)LwsSlots();  // created before lws can ask for a slot from another thread
    lws_set_allocator(&LwsRealloc);
  });
}

}  // namespace chat
