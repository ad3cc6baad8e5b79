#include "src/core/backoff.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

namespace chat {
namespace {

constexpr uint64_t kMaxRandom = std::numeric_limits<uint64_t>::max();

// min(cap, base * 2^attempt) computed in floating point, as an independent reference; exact for
// the default policy's values.
int64_t Ceiling(const BackoffPolicy& policy, uint32_t attempt) {
  const double value = std::ldexp(static_cast<double>(policy.base_ms), static_cast<int>(attempt));
  return value >= static_cast<double>(policy.cap_ms) ? policy.cap_ms : static_cast<int64_t>(value);
}

TEST_CASE("backoff: delays stay within [0, min(cap, base * 2^attempt)] for attempts 0..40") {
  const BackoffPolicy policy;  // 500 ms base, 30 s cap
  std::mt19937_64 random(7);
  for (uint32_t attempt = 0; attempt <= 40; ++attempt) {
    CAPTURE(attempt);
    const int64_t ceiling = Ceiling(policy, attempt);
    CHECK(BackoffDelayMs(policy, attempt, 0) == 0);
    // Both ends of the range are reachable.
    CHECK(BackoffDelayMs(policy, attempt, static_cast<uint64_t>(ceiling)) == ceiling);
    for (int i = 0; i < 200; ++i) {
      const int64_t delay = BackoffDelayMs(policy, attempt, random());
      CHECK(delay >= 0);
      CHECK(delay <= ceiling);
    }
    CHECK(BackoffDelayMs(policy, attempt, kMaxRandom) <= ceiling);
  }
  CHECK(Ceiling(policy, 0) == 500);
  CHECK(Ceiling(policy, 5) == 16'000);
  CHECK(Ceiling(policy, 6) == 30'000);
}

TEST_CASE("backoff: huge attempt numbers and extreme policies do not overflow") {
  const BackoffPolicy policy;
  for (uint32_t attempt : {63u, 64u, 1000u, std::numeric_limits<uint32_t>::max()}) {
    CAPTURE(attempt);
    CHECK(BackoffDelayMs(policy, attempt, 30'000) == 30'000);
    CHECK(BackoffDelayMs(policy, attempt, kMaxRandom) <= 30'000);
  }
  const BackoffPolicy wide{.base_ms = std::numeric_limits<int64_t>::max() / 2,
                           .cap_ms = std::numeric_limits<int64_t>::max()};
  CHECK(BackoffDelayMs(wide, 100, kMaxRandom) >= 0);
  // A zero base means "retry immediately", however many attempts were made.
  const BackoffPolicy zero{.base_ms = 0, .cap_ms = 1000};
  CHECK(BackoffDelayMs(zero, std::numeric_limits<uint32_t>::max(), kMaxRandom) == 0);
  // A base above the cap is held to the cap from the first attempt.
  const BackoffPolicy inverted{.base_ms = 5000, .cap_ms = 1000};
  CHECK(BackoffDelayMs(inverted, 0, 1000) == 1000);
  CHECK(BackoffDelayMs(inverted, 0, 1001) == 0);
}

TEST_CASE("backoff: delays are spread uniformly over the range") {
  const BackoffPolicy policy;
  constexpr uint32_t kAttempt = 3;  // range [0, 4000]
  constexpr int kBuckets = 10;
  constexpr int kSamples = 100'000;
  std::array<int, kBuckets> counts{};
  std::mt19937_64 random(2024);
  for (int i = 0; i < kSamples; ++i) {
    const int64_t delay = BackoffDelayMs(policy, kAttempt, random());
    REQUIRE(delay >= 0);
    REQUIRE(delay <= 4000);
    ++counts[static_cast<size_t>(std::min<int64_t>(delay * kBuckets / 4001, kBuckets - 1))];
  }
  // 10,000 expected per bucket; the standard deviation is about 95, so 10% is very loose while
  // still catching a skew towards either end.
  for (int count : counts) {
    CHECK(count > 9000);
    CHECK(count < 11000);
  }
}

TEST_CASE("backoff: a server-given retry_after_ms is a floor") {
  const BackoffPolicy policy;
  CHECK(BackoffDelayMs(policy, 0, 0, 2500) == 2500);
  CHECK(BackoffDelayMs(policy, 0, 400, 2500) == 2500);
  // Above the cap too: the server knows better than the client's policy.
  CHECK(BackoffDelayMs(policy, 10, kMaxRandom, 120'000) == 120'000);
  // A jittered delay already above the floor is kept.
  CHECK(BackoffDelayMs(policy, 6, 20'000, 1000) == 20'000);
  CHECK(BackoffDelayMs(policy, 6, 20'000, 0) == 20'000);
}

}  // namespace
}  // namespace chat
