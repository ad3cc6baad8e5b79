// Reconnect backoff: exponential with full jitter, as a pure function of the attempt number
// and a random value, so it is testable without time or randomness of its own.
#ifndef CHAT_SRC_CORE_BACKOFF_H_
#define CHAT_SRC_CORE_BACKOFF_H_

#include <cstdint>

namespace chat {

struct BackoffPolicy {
  int64_t base_ms = 500;            // ceiling of the first delay
  int64_t cap_ms = 30'000;          // ceiling of every delay
  int64_t reset_after_ms = 60'000;  // a connection that lasted this long resets the attempt count
};

// Delay before reconnect attempt `attempt` (0 = first retry): uniform in
// [0, min(cap, base * 2^attempt)], chosen by `random` (any 64-bit value, uniformly distributed).
// A server-given retry_after_ms is a floor: the result is at least it.
int64_t BackoffDelayMs(const BackoffPolicy& policy, uint32_t attempt, uint64_t random,
                       int64_t retry_after_ms = 0);

}  // namespace chat

#endif  // CHAT_SRC_CORE_BACKOFF_H_
