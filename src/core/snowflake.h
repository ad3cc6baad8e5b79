// Snowflake message ids: 41 bits of milliseconds since 2024-01-01T00:00:00Z, 10 bits of node
// id, 12 bits of counter. Ids from one generator strictly increase, even when the wall clock
// steps back (the generator keeps using its last millisecond) or 4096 ids are asked within one
// millisecond (it borrows the next millisecond rather than sleeping).
#ifndef CHAT_SRC_CORE_SNOWFLAKE_H_
#define CHAT_SRC_CORE_SNOWFLAKE_H_

#include <cstdint>
#include <memory>
#include <mutex>

#include "chat/clock.h"
#include "chat/status.h"
#include "chat/types.h"

namespace chat {

inline constexpr int64_t kSnowflakeEpochMs = 1704067200000;  // 2024-01-01T00:00:00Z
inline constexpr int kSnowflakeNodeBits = 10;
inline constexpr int kSnowflakeCounterBits = 12;
inline constexpr uint32_t kSnowflakeMaxNode = (1u << kSnowflakeNodeBits) - 1;

// Thread-safe.
class SnowflakeGenerator {
 public:
  // REQUIRES: node <= kSnowflakeMaxNode, clock != nullptr.
  SnowflakeGenerator(uint32_t node, std::shared_ptr<Clock> clock);

  MessageId Next();

  // Parts of an id, for logs and tests.
  static int64_t TimestampMs(MessageId id);  // Unix ms
  static uint32_t Node(MessageId id);
  static uint32_t Counter(MessageId id);

 private:
  const uint32_t node_;
  const std::shared_ptr<Clock> clock_;
  std::mutex mu_;
  // ms since kSnowflakeEpochMs of the last id, -1 before the first; guarded by mu_.
  int64_t last_ms_ = -1;
  uint32_t counter_ = 0;  // guarded by mu_
};

}  // namespace chat

#endif  // CHAT_SRC_CORE_SNOWFLAKE_H_
