#include "src/core/snowflake.h"

#include <utility>

namespace chat {

namespace {

constexpr int kTimestampBits = 41;
constexpr int64_t kMaxTimestamp = (int64_t{1} << kTimestampBits) - 1;
constexpr uint32_t kMaxCounter = (1u << kSnowflakeCounterBits) - 1;
constexpr int kTimestampShift = kSnowflakeNodeBits + kSnowflakeCounterBits;

}  // namespace

SnowflakeGenerator::SnowflakeGenerator(uint32_t node, std::shared_ptr<Clock> clock)
    : node_(node & kSnowflakeMaxNode), clock_(std::move(clock)) {}

MessageId SnowflakeGenerator::Next() {
  // A wall clock before the epoch (a badly set host) counts as the epoch itself; ids then still
  // increase through the counter and the borrowed milliseconds below.
  int64_t now = clock_->WallMs() - kSnowflakeEpochMs;
  if (now < 0) now = 0;
  if (now > kMaxTimestamp) now = kMaxTimestamp;

  std::lock_guard<std::mutex> lock(mu_);
  if (now > last_ms_) {
    last_ms_ = now;
    counter_ = 0;
  } else if (counter_ < kMaxCounter) {
    // Same millisecond, or the clock stepped back: keep the last millisecond so ids never
    // decrease, and count up within it.
    ++counter_;
  } else {
    // 4096 ids in one millisecond: borrow the next one instead of sleeping. The generator runs
    // ahead of the clock until real time catches up.
    ++last_ms_;
    counter_ = 0;
  }
  return (static_cast<uint64_t>(last_ms_) << kTimestampShift) |
         (static_cast<uint64_t>(node_) << kSnowflakeCounterBits) | counter_;
}

int64_t SnowflakeGenerator::TimestampMs(MessageId id) {
  return static_cast<int64_t>(id >> kTimestampShift) + kSnowflakeEpochMs;
}

uint32_t SnowflakeGenerator::Node(MessageId id) {
  return static_cast<uint32_t>(id >> kSnowflakeCounterBits) & kSnowflakeMaxNode;
}

uint32_t SnowflakeGenerator::Counter(MessageId id) {
  return static_cast<uint32_t>(id) & kMaxCounter;
}

}  // namespace chat
