// chatd sets its soft descriptor limit to what --max-connections needs, within the hard limit:
// raised from a low start (many systems start at 1024), lowered from a high one (Debian's
// libwebsockets walks a table of that size on every close), and a warning when the hard limit
// cannot hold max_connections.
#include <doctest/doctest.h>
#include <sys/resource.h>

#include <algorithm>
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

// Sets this process's limits (chatd inherits them). A lowered hard limit cannot always be
// raised again; CTest runs each case in a process of its own, and a run of every case in one
// process gets its soft limit back at the hard one (RestoreSoft) after each case.
void SetLimits(rlim_t soft, rlim_t hard) {
  const rlimit limit{soft, hard};
  REQUIRE(setrlimit(RLIMIT_NOFILE, &limit) == 0);
}

struct RestoreSoft {
  ~RestoreSoft() {
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return;
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
  }
};

rlim_t HardLimit() {
  rlimit limit{};
  REQUIRE(getrlimit(RLIMIT_NOFILE, &limit) == 0);
  return limit.rlim_max;
}

// A hard limit for the test: this machine's, but no larger than a common default, so that
// max_connections at the hard limit stays a reasonable descriptor table.
rlim_t TestHardLimit() { return std::min<rlim_t>(HardLimit(), 20'000); }

TEST_CASE("chatd: a low soft descriptor limit is raised to what max_connections needs") {
  const rlim_t hard = TestHardLimit();
  RestoreSoft restore;
  SetLimits(std::min<rlim_t>(256, hard), hard);
  ChatdProcess chatd({.extra_flags = {"--max-connections", "100"}});
  REQUIRE(chatd.Start().ok());
  const uint64_t expected = std::min<uint64_t>(100 + kReserve, hard);
  const auto [soft, hard_seen] = OpenFilesLimit(chatd.pid());
  CHECK(soft == expected);
  CHECK(hard_seen == hard);
  if (expected != std::min<rlim_t>(256, hard)) {
    CHECK(chatd.log().find("descriptor limit " + std::to_string(std::min<rlim_t>(256, hard)) +
                           " -> " + std::to_string(expected)) != std::string::npos);
  }
  CHECK(chatd.log().find("too low") == std::string::npos);
}

TEST_CASE("chatd: a high soft descriptor limit is lowered to what max_connections needs") {
  const rlim_t hard = TestHardLimit();
  SetLimits(hard, hard);
  ChatdProcess chatd({.extra_flags = {"--max-connections", "100"}});
  REQUIRE(chatd.Start().ok());
  CHECK(OpenFilesLimit(chatd.pid()).first == std::min<uint64_t>(100 + kReserve, hard));
  // It serves as before.
  Result<std::unique_ptr<WsClient>> alice = chatd.Login("alice", "phone");
  REQUIRE_MESSAGE(alice.ok(), alice.status().ToString());
}

TEST_CASE("chatd: warns when the hard descriptor limit cannot hold max_connections") {
  const rlim_t hard = TestHardLimit();
  SetLimits(hard, hard);
  const std::string max_connections = std::to_string(hard);
  ChatdProcess chatd({.extra_flags = {"--max-connections", max_connections}});
  REQUIRE(chatd.Start().ok());
  CHECK(OpenFilesLimit(chatd.pid()).first == hard);
  CHECK(chatd.log().find("is too low for max_connections " + max_connections) != std::string::npos);
}

}  // namespace
}  // namespace chat::testing
