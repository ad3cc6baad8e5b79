// FakeClock: a chat::Clock whose wall and monotonic time only move when a test says so.
//
// Tests hand it to the sans-IO cores (Hub, Session) and drive timeouts, heartbeats, backoff and
// token expiry deterministically. Advance() moves both clocks together, the way real time passes;
// SetWallMs() can step the wall clock anywhere (including backwards, like NTP), while
// SetMonotonicMs() refuses to go backwards because real monotonic clocks never do.
//
// Thread-safety: every method may be called from any thread at any time.
#ifndef CHAT_TESTS_TESTING_FAKE_CLOCK_H_
#define CHAT_TESTS_TESTING_FAKE_CLOCK_H_

#include <algorithm>
#include <cstdint>
#include <mutex>

#include "chat/clock.h"

namespace chat::testing {

class FakeClock final : public Clock {
 public:
  // 2025-01-01T00:00:00Z: a plausible "now" that is after the snowflake epoch (2024-01-01) and far
  // from any overflow, so ids and token times computed from it look like real ones.
  static constexpr int64_t kDefaultWallMs = 1'735'689'600'000;
  // Monotonic time starts well above zero so code that treats 0 as "never" is exercised honestly.
  static constexpr int64_t kDefaultMonotonicMs = 1'000'000;

  explicit FakeClock(int64_t wall_ms = kDefaultWallMs, int64_t monotonic_ms = kDefaultMonotonicMs)
      : wall_ms_(wall_ms), monotonic_ms_(monotonic_ms) {}

  FakeClock(const FakeClock&) = delete;
  FakeClock& operator=(const FakeClock&) = delete;

  int64_t WallMs() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return wall_ms_;
  }

  int64_t MonotonicMs() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return monotonic_ms_;
  }

  // Moves both clocks forward by `ms`. Negative values are ignored for the monotonic clock (it
  // never decreases) but still applied to the wall clock, which lets a test model a step back.
  void Advance(int64_t ms) {
    std::lock_guard<std::mutex> lock(mu_);
    wall_ms_ += ms;
    monotonic_ms_ += std::max<int64_t>(ms, 0);
  }

  // Sets the wall clock to any value, forwards or backwards.
  void SetWallMs(int64_t ms) {
    std::lock_guard<std::mutex> lock(mu_);
    wall_ms_ = ms;
  }

  // Moves the monotonic clock to `ms`; a value in the past is ignored, since a real monotonic
  // clock cannot go back and code under test is entitled to rely on that.
  void SetMonotonicMs(int64_t ms) {
    std::lock_guard<std::mutex> lock(mu_);
    monotonic_ms_ = std::max(monotonic_ms_, ms);
  }

  // Moves only the wall clock by `ms` (positive or negative), leaving monotonic time alone.
  void StepWall(int64_t ms) {
    std::lock_guard<std::mutex> lock(mu_);
    wall_ms_ += ms;
  }

 private:
  mutable std::mutex mu_;
  int64_t wall_ms_;
  int64_t monotonic_ms_;
};

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_FAKE_CLOCK_H_
