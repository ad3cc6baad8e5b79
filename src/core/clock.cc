#include "chat/clock.h"

#include <time.h>

namespace chat {

namespace {

int64_t ReadMs(clockid_t id) {
  timespec ts{};
  clock_gettime(id, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1'000'000;
}

class RealClock final : public Clock {
 public:
  int64_t WallMs() const override { return ReadMs(CLOCK_REALTIME); }
  int64_t MonotonicMs() const override { return ReadMs(CLOCK_MONOTONIC); }
};

}  // namespace

std::shared_ptr<Clock> SystemClock() {
  static const std::shared_ptr<Clock> clock = std::make_shared<RealClock>();
  return clock;
}

}  // namespace chat
