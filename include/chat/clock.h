// Clock: the only source of time in the SDK.
//
// The sans-IO cores (server Hub, client Session) never read a clock of their own; they are given
// one, so tests drive time with a fake. Wall time stamps messages and ids; monotonic time drives
// timeouts, heartbeats and backoff.
//
// Thread-safety: implementations must be safe to call from any thread.
#ifndef CHAT_CLOCK_H_
#define CHAT_CLOCK_H_

#include <cstdint>
#include <memory>

#include "chat/export.h"

namespace chat {

class CHAT_EXPORT Clock {
 public:
  virtual ~Clock() = default;
  // Milliseconds since the Unix epoch. May step backwards (NTP); callers must cope.
  virtual int64_t WallMs() const = 0;
  // Milliseconds since an arbitrary start; never decreases.
  virtual int64_t MonotonicMs() const = 0;
};

// The process's real clocks (CLOCK_REALTIME, CLOCK_MONOTONIC).
CHAT_EXPORT std::shared_ptr<Clock> SystemClock();

}  // namespace chat

#endif  // CHAT_CLOCK_H_
