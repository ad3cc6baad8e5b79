// chatd's command line as an operator meets it: a bad value for any flag, in a config file too,
// and a token it would refuse are usage errors (exit 2) that name the problem; nothing starts.
// The ready line names an address a client can connect to, whatever --listen was given.
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "tests/testing/chatd_process.h"
#include "tests/testing/temp_dir.h"

namespace chat::testing {
namespace {

struct Run {
  int code = -1;
  std::string out;  // stdout and stderr
};

// Runs chatd with `args` in a fresh directory holding a valid secret (secret.txt).
Run Chatd(std::vector<std::string> args, const std::string& config = "") {
  TempDir dir;
  REQUIRE(WriteFile(dir.File("secret.txt"), std::string(48, 's') + "\n"));
  if (!config.empty()) REQUIRE(WriteFile(dir.File("chatd.ini"), config));
  std::vector<std::string> argv = {ChatdProcess::BinaryPath()};
  argv.insert(argv.end(), args.begin(), args.end());
  Result<int> code = RunProcess(argv, dir.path(), dir.File("out.log"), 30'000);
  REQUIRE_MESSAGE(code.ok(), code.status().ToString());
  return {*code, ReadFile(dir.File("out.log"))};
}

std::vector<std::string> Serve(std::vector<std::string> flags) {
  std::vector<std::string> args = {"serve",   "--port",        "0",         "--db",
                                   "chat.db", "--secret-file", "secret.txt"};
  args.insert(args.end(), flags.begin(), flags.end());
  return args;
}

TEST_CASE("chatd: a bad flag value is a usage error that names the flag") {
  struct Case {
    std::vector<std::string> flags;
    std::string says;
  };
  const std::vector<Case> cases = {
      // -1 into an unsigned flag would wrap to its largest value: no message cap at all.
      {{"--max-message-bytes", "-1"}, "--max-message-bytes"},
      {{"--max-outbound-bytes", "-5"}, "--max-outbound-bytes"},
      // Hexadecimal and octal are not read as such.
      {{"--max-connections", "0x50"}, "--max-connections"},
      {{"--port", "70000"}, "--port"},
      {{"--no-such-flag"}, "--no-such-flag"},
      // Refused by the library's own checks.
      {{"--reader-threads", "0"}, "reader_threads"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.flags.at(0));
    Run run = Chatd(Serve(c.flags));
    CHECK(run.code == 2);
    CHECK(run.out.find(c.says) != std::string::npos);
    CHECK(run.out.find("listening") == std::string::npos);
  }
}

TEST_CASE("chatd: a config file key it does not know is refused, not ignored") {
  Run run = Chatd(Serve({"--config", "chatd.ini"}), "prot = 9000\n");
  CHECK(run.code == 2);
  CHECK(run.out.find("prot") != std::string::npos);
  CHECK(run.out.find("listening") == std::string::npos);
}

TEST_CASE("chatd token: a TTL past ten years or a user id chatd refuses is a usage error") {
  Run ttl =
      Chatd({"token", "--user", "alice", "--ttl", "213503982335d", "--secret-file", "secret.txt"});
  CHECK(ttl.code == 2);
  CHECK(ttl.out.find("duration too long") != std::string::npos);
  Run user = Chatd({"token", "--user", std::string(129, 'u'), "--secret-file", "secret.txt"});
  CHECK(user.code == 2);
  CHECK(user.out.find("--user must be 1 to 128 bytes of UTF-8") != std::string::npos);
  // Not UTF-8: a lone continuation byte, an overlong '/', a surrogate.
  for (const char* bad : {"alice\x80", "\xc0\xaf", "\xed\xa0\x80"}) {
    Run run = Chatd({"token", "--user", bad, "--secret-file", "secret.txt"});
    CHECK(run.code == 2);
    CHECK(run.out.find("--user must be 1 to 128 bytes of UTF-8") != std::string::npos);
    CHECK(run.out.find("eyJ") == std::string::npos);  // no token printed
  }
  Run accented = Chatd({"token", "--user", "zo\xc3\xab", "--secret-file", "secret.txt"});
  CHECK_MESSAGE(accented.code == 0, accented.out);
  Run ok = Chatd({"token", "--user", "alice", "--ttl", "3650d", "--secret-file", "secret.txt"});
  CHECK(ok.code == 0);
}

// Whether this host can use the IPv6 loopback address (some containers and kernels have none).
bool HasIpv6Loopback() {
  const int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in6 loopback = {};
  loopback.sin6_family = AF_INET6;
  loopback.sin6_addr = in6addr_loopback;
  const bool bound = bind(fd, reinterpret_cast<sockaddr*>(&loopback), sizeof(loopback)) == 0;
  close(fd);
  return bound;
}

TEST_CASE("chatd: the ready line names an address a client can connect to") {
  struct Case {
    std::string listen;
    std::string host;  // in the URL the ready line prints
    bool ipv6;
  };
  const std::vector<Case> cases = {
      {"0.0.0.0", "127.0.0.1", false},  // every interface: reached on the loopback
      {"lo", "127.0.0.1", false},       // an interface by name: its address
      {"127.0.0.1", "127.0.0.1", false},
      {"::", "[::1]", true},  // every interface, IPv6: the IPv6 loopback, bracketed
      {"::1", "[::1]", true},
  };
  const bool ipv6 = HasIpv6Loopback();
  for (const Case& c : cases) {
    CAPTURE(c.listen);
    if (c.ipv6 && !ipv6) {
      MESSAGE("skipped --listen " << c.listen << ": this host has no IPv6 loopback (::1)");
      continue;
    }
    ChatdOptions options;
    options.listen = c.listen;
    ChatdProcess chatd(options);
    REQUIRE(chatd.Start().ok());
    CHECK(chatd.ready_url() == "ws://" + c.host + ":" + std::to_string(chatd.port()));
    // chat-cli connects to exactly that URL.
    TempDir dir;
    Result<int> code =
        RunProcess({std::string(CHAT_BINARY_DIR) + "/examples/chat-cli", "--url", chatd.ready_url(),
                    "--token", chatd.Token("alice"), "--device", "a", "conversations"},
                   dir.path(), dir.File("cli.log"), 60'000);
    REQUIRE(code.ok());
    CHECK_MESSAGE(*code == 0, ReadFile(dir.File("cli.log")));
  }
}

}  // namespace
}  // namespace chat::testing
