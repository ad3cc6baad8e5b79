#include "src/core/backoff.h"

#include <algorithm>

namespace chat {

int64_t BackoffDelayMs(const BackoffPolicy& policy, uint32_t attempt, uint64_t random,
                       int64_t retry_after_ms) {
  const int64_t base = std::max<int64_t>(policy.base_ms, 0);
  const int64_t cap = std::max<int64_t>(policy.cap_ms, 0);
  // base * 2^attempt, computed by doubling until it reaches the cap so that neither the shift
  // nor the multiplication can overflow, however large the attempt number.
  int64_t ceiling = std::min(base, cap);
  for (uint32_t i = 0; i < attempt && ceiling > 0 && ceiling < cap; ++i) {
    ceiling = ceiling > cap / 2 ? cap : ceiling * 2;
  }
  // Full jitter: uniform over [0, ceiling], both ends included. The modulo bias is at most
  // ceiling / 2^64, far below anything observable for delays in milliseconds.
  const int64_t delay = static_cast<int64_t>(random % (static_cast<uint64_t>(ceiling) + 1));
  return std::max(delay, retry_after_ms);
}

}  // namespace chat
