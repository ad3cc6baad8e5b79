// chatd sets its soft descriptor limit to what --max-connections needs, within the hard limit:
// raised from a low start (many systems start at 1024), lowered from a high one (Debian's
// libwebsockets walks a table of that size on every close), and a warning when the hard limit
// cannot hold max_connections.
#include <doctest/doctest.h>
#include <sys/resource.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>

#include "tests/testing/chatd_process.h"

namespace chat::testing {
namespace {

// chatd's descriptors beyond one per connection (examples/chatd/main.cc).
constexpr uint64_t kReserve = 1024;

// The soft and hard "Max open files" of a running process, from /proc.
std::pair<uint64_t, uint64_t> OpenFilesLimit(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/limits");
  std::string line;
  constexpr char kName[] = "Max open files";
  while (std::getline(in, line)) {
    if (line.rfind(kName, 0) != 0) continue;
    std::istringstream fields(line.substr(std::strlen(kName)));
    uint64_t soft = 0;
    uint64_t hard = 0;
    fields >> soft >> hard;
    return {soft, hard};
  }
  return {0, 0};
}

// This process's soft descriptor limit set to `soft` (chatd inherits it) while in scope.
class SoftLimit {
 public:
  explicit SoftLimit(rlim_t soft) {
    REQUIRE(getrlimit(RLIMIT_NOFILE, &saved_) == 0);
    rlimit changed = saved_;
    changed.rlim_cur = soft;
    REQUIRE(setrlimit(RLIMIT_NOFILE, &changed) == 0);
  }
  ~SoftLimit() { setrlimit(RLIMIT_NOFILE, &saved_); }
  SoftLimit(const SoftLimit&) = delete;
  SoftLimit& operator=(const SoftLimit&) = delete;
  rlim_t hard() const { return saved_.rlim_max; }

 private:
  rlimit saved_{};
};

rlim_t HardLimit() {
  rlimit limit{};
  REQUIRE(getrlimit(RLIMIT_NOFILE, &limit) == 0);
  return limit.rlim_max;
}

TEST_CASE("chatd: a low soft descriptor limit is raised to what max_connections needs") {
  REQUIRE(HardLimit() >= 100 + kReserve);
  SoftLimit low(256);
  ChatdProcess chatd({.extra_flags = {"--max-connections", "100"}});
  REQUIRE(chatd.Start().ok());
  const auto [soft, hard] = OpenFilesLimit(chatd.pid());
  CHECK(soft == 100 + kReserve);
  CHECK(hard == low.hard());
  CHECK(chatd.log().find("descriptor limit 256 -> 1124") != std::string::npos);
  CHECK(chatd.log().find("too low") == std::string::npos);
}

TEST_CASE("chatd: a high soft descriptor limit is lowered to what max_connections needs") {
  const rlim_t hard_limit = HardLimit();
  REQUIRE(hard_limit >= 2 * (100 + kReserve));
  SoftLimit high(hard_limit);
  ChatdProcess chatd({.extra_flags = {"--max-connections", "100"}});
  REQUIRE(chatd.Start().ok());
  CHECK(OpenFilesLimit(chatd.pid()).first == 100 + kReserve);
  // It serves as before.
  Result<std::unique_ptr<WsClient>> alice = chatd.Login("alice", "phone");
  REQUIRE_MESSAGE(alice.ok(), alice.status().ToString());
}

TEST_CASE("chatd: warns when the hard descriptor limit cannot hold max_connections") {
  const rlim_t hard_limit = HardLimit();
  REQUIRE(hard_limit < 100'000'000);
  const std::string max_connections = std::to_string(hard_limit);
  ChatdProcess chatd({.extra_flags = {"--max-connections", max_connections}});
  REQUIRE(chatd.Start().ok());
  CHECK(OpenFilesLimit(chatd.pid()).first == hard_limit);
  CHECK(chatd.log().find("is too low for max_connections " + max_connections) != std::string::npos);
}

}  // namespace
}  // namespace chat::testing
