#include "src/core/slot_pool.h"

#include <doctest/doctest.h>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)  // clang
#define CHAT_TEST_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)  // gcc
#define CHAT_TEST_ASAN 1
#endif
#if defined(CHAT_TEST_ASAN)
#include <sanitizer/asan_interface.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

namespace chat {
namespace {

// Fills a slot with a byte pattern derived from its address and `tag`.
void Fill(void* slot, size_t bytes, uint8_t tag) {
  auto* p = static_cast<uint8_t*>(slot);
  for (size_t i = 0; i < bytes; ++i) p[i] = static_cast<uint8_t>(tag + i);
}

bool Holds(const void* slot, size_t bytes, uint8_t tag) {
  const auto* p = static_cast<const uint8_t*>(slot);
  for (size_t i = 0; i < bytes; ++i) {
    if (p[i] != static_cast<uint8_t>(tag + i)) return false;
  }
  return true;
}

TEST_CASE("slot pool: slots are distinct, aligned, a slot apart, and keep their bytes") {
  SlotPool pool(960);
  CHECK(pool.slots_per_slab() == (SlotPool::kSlabBytes - 64) / 960);
  std::vector<void*> slots;
  for (size_t i = 0; i < 3 * pool.slots_per_slab() + 5; ++i) {
    void* slot = pool.Allocate();
    REQUIRE(slot != nullptr);
    CHECK(reinterpret_cast<uintptr_t>(slot) % 16 == 0);
    Fill(slot, 960, static_cast<uint8_t>(i));
    slots.push_back(slot);
  }
  CHECK(pool.slabs() == 4);
  CHECK(pool.in_use() == slots.size());
  // Within a slab, consecutive slots are exactly one slot apart: not a power-of-two stride.
  CHECK(static_cast<char*>(slots[1]) - static_cast<char*>(slots[0]) == 960);
  for (size_t i = 0; i < slots.size(); ++i) CHECK(Holds(slots[i], 960, static_cast<uint8_t>(i)));
  std::vector<void*> sorted = slots;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 1; i < sorted.size(); ++i) {
    CHECK(static_cast<char*>(sorted[i]) - static_cast<char*>(sorted[i - 1]) >= 960);
  }
  for (void* slot : slots) pool.Free(slot);
  CHECK(pool.in_use() == 0);
}

TEST_CASE("slot pool: Owns tells its slots from other memory") {
  SlotPool pool(960);
  void* slot = pool.Allocate();
  REQUIRE(slot != nullptr);
  CHECK(pool.Owns(slot));
  CHECK(pool.Owns(static_cast<char*>(slot) + 100));
  auto other = std::make_unique<char[]>(960);
  CHECK_FALSE(pool.Owns(other.get()));
  int on_stack = 0;
  CHECK_FALSE(pool.Owns(&on_stack));
  SlotPool second(960);
  CHECK_FALSE(second.Owns(slot));
  pool.Free(slot);
  CHECK(pool.Owns(slot));  // its slab is kept as the spare
}

TEST_CASE("slot pool: freed slots are reused and empty slabs released, one kept") {
  SlotPool pool(960);
  const size_t per_slab = pool.slots_per_slab();
  std::vector<void*> slots;
  for (size_t i = 0; i < 4 * per_slab; ++i) slots.push_back(pool.Allocate());
  CHECK(pool.slabs() == 4);

  void* freed = slots[7];
  pool.Free(freed);
  CHECK(pool.Allocate() == freed);  // a partly used slab is filled first

  for (void* slot : slots) pool.Free(slot);
  CHECK(pool.in_use() == 0);
  CHECK(pool.slabs() == 1);  // the last emptied slab stays for the next Allocate

  void* again = pool.Allocate();
  REQUIRE(again != nullptr);
  CHECK(pool.slabs() == 1);
  pool.Free(again);
  CHECK(pool.slabs() == 1);
}

TEST_CASE("slot pool: the slots freed in a slab are the ones handed out next") {
  SlotPool pool(960);
  std::vector<void*> slots;
  for (size_t i = 0; i < pool.slots_per_slab(); ++i) slots.push_back(pool.Allocate());
  REQUIRE(pool.slabs() == 1);
  std::vector<void*> freed = {slots[3], slots[10], slots[42], slots[0]};
  for (void* slot : freed) pool.Free(slot);
  std::vector<void*> again;
  for (size_t i = 0; i < freed.size(); ++i) again.push_back(pool.Allocate());
  CHECK(pool.slabs() == 1);
  std::sort(freed.begin(), freed.end());
  std::sort(again.begin(), again.end());
  CHECK(again == freed);
  CHECK(pool.Allocate() != nullptr);  // the slab is full again: the next slot opens a new one
  CHECK(pool.slabs() == 2);
}

TEST_CASE("slot pool: a count of slots hovering at a slab boundary does not churn slabs") {
  SlotPool pool(960);
  std::vector<void*> full;
  for (size_t i = 0; i < pool.slots_per_slab(); ++i) full.push_back(pool.Allocate());
  void* extra = pool.Allocate();  // the second slab's only slot
  REQUIRE(pool.slabs_created() == 2);
  for (int cycle = 0; cycle < 100; ++cycle) {
    pool.Free(full.back());  // room in the first slab
    pool.Free(extra);        // the second slab is empty: kept as the spare
    full.back() = pool.Allocate();
    extra = pool.Allocate();
  }
  CHECK(pool.slabs_created() == 2);
  CHECK(pool.slabs() == 2);
  for (void* slot : full) pool.Free(slot);
  pool.Free(extra);
  CHECK(pool.slabs() == 1);
}

#if defined(CHAT_TEST_ASAN)
TEST_CASE("slot pool: a freed slot is poisoned for AddressSanitizer, an allocated one is not") {
  SlotPool pool(960);
  auto* slot = static_cast<char*>(pool.Allocate());
  REQUIRE(slot != nullptr);
  CHECK_FALSE(__asan_address_is_poisoned(slot + 959));
  void* keep = pool.Allocate();  // so the slab is never empty in this test
  pool.Free(slot);
  CHECK(__asan_address_is_poisoned(slot + 8));
  CHECK(__asan_address_is_poisoned(slot + 959));
  CHECK(pool.Allocate() == slot);
  CHECK_FALSE(__asan_address_is_poisoned(slot + 8));
  pool.Free(slot);
  pool.Free(keep);
}
#endif

TEST_CASE("slot pool: concurrent Allocate and Free keep every slot's bytes") {
  SlotPool pool(960);
  constexpr int kThreads = 4;
  constexpr int kRounds = 4000;
  std::vector<std::thread> threads;
  std::vector<int> corrupted(kThreads, 0);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&pool, &corrupted, t] {
      std::mt19937 rng(static_cast<uint32_t>(t + 1));
      std::vector<std::pair<void*, uint8_t>> held;
      for (int round = 0; round < kRounds; ++round) {
        if (held.empty() || rng() % 3 != 0) {
          void* slot = pool.Allocate();
          if (slot == nullptr) continue;
          const auto tag = static_cast<uint8_t>(rng());
          Fill(slot, 960, tag);
          held.emplace_back(slot, tag);
        } else {
          const size_t i = rng() % held.size();
          if (!Holds(held[i].first, 960, held[i].second)) ++corrupted[t];
          pool.Free(held[i].first);
          held[i] = held.back();
          held.pop_back();
        }
      }
      for (auto& [slot, tag] : held) {
        if (!Holds(slot, 960, tag)) ++corrupted[t];
        pool.Free(slot);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int t = 0; t < kThreads; ++t) CHECK(corrupted[t] == 0);
  CHECK(pool.in_use() == 0);
  CHECK(pool.slabs() == 1);
}

}  // namespace
}  // namespace chat
