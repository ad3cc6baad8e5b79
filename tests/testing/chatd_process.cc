#include "tests/testing/chatd_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>

#include "chat/auth.h"

namespace chat::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::steady_clock;

int64_t NowMs() {
  return std::chrono::duration_cast<milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string RandomHex(size_t bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::random_device rd;
  std::string out;
  for (size_t i = 0; i < bytes; ++i) {
    unsigned v = rd() & 0xffu;
    out += kHex[v >> 4];
    out += kHex[v & 0xfu];
  }
  return out;
}

// Converts a waitpid status to an exit code, with 128+signal for a signal (shell convention).
int ExitCodeOf(int wstatus) {
  if (WIFEXITED(wstatus)) return WEXITSTATUS(wstatus);
  if (WIFSIGNALED(wstatus)) return 128 + WTERMSIG(wstatus);
  return -1;
}

// fork + exec with everything prepared before the fork, so the child (of a multi-threaded test
// process) only makes async-signal-safe calls. The child dies with the test process.
pid_t Spawn(const std::vector<std::string>& argv, const std::string& cwd,
            const std::string& log_path) {
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid != 0) return pid;  // Parent (or -1 on failure).
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(126);
  if (chdir(cwd.c_str()) != 0) _exit(126);
  const int log_fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
  const int null_fd = open("/dev/null", O_RDONLY);
  if (log_fd < 0 || null_fd < 0) _exit(126);
  dup2(null_fd, 0);
  dup2(log_fd, 1);
  dup2(log_fd, 2);
  // Sockets and event fds of the test's own WebSocket clients must not leak into chatd.
  syscall(SYS_close_range, 3u, ~0u, 0u);
  execv(args[0], args.data());
  _exit(127);
}

// Waits for `pid` to exit for up to `timeout_ms`; returns the waitpid status or -1 on timeout.
int WaitPid(pid_t pid, int timeout_ms, bool* exited) {
  const auto deadline = steady_clock::now() + milliseconds(timeout_ms);
  *exited = false;
  for (;;) {
    int wstatus = 0;
    const pid_t r = waitpid(pid, &wstatus, WNOHANG);
    if (r == pid) {
      *exited = true;
      return wstatus;
    }
    if (r < 0) {
      // Not our child any more (already reaped): treat as gone.
      *exited = true;
      return 0;
    }
    if (steady_clock::now() >= deadline) return -1;
    std::this_thread::sleep_for(milliseconds(10));
  }
}

}  // namespace

Result<int> RunProcess(const std::vector<std::string>& argv, const std::string& cwd,
                       const std::string& log_path, int timeout_ms) {
  const pid_t pid = Spawn(argv, cwd, log_path);
  if (pid < 0) return Internal("fork failed");
  bool exited = false;
  const int wstatus = WaitPid(pid, timeout_ms, &exited);
  if (!exited) {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    return DeadlineExceeded(argv[0] + " did not finish");
  }
  return ExitCodeOf(wstatus);
}

Status MakeSelfSignedCertificate(const TempDir& dir, const std::string& subject_alt_name) {
  Result<int> code =
      RunProcess({"/usr/bin/openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                  "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", dir.File("key.pem"), "-out",
                  dir.File("cert.pem"), "-days", "2", "-subj", "/CN=localhost", "-addext",
                  "subjectAltName=" + subject_alt_name},
                 dir.path(), dir.File("openssl.log"), 30'000);
  if (!code.ok()) return code.status();
  if (*code != 0) return Internal("openssl req failed: " + ReadFile(dir.File("openssl.log")));
  return Status::Ok();
}

ChatdProcess::ChatdProcess(ChatdOptions options)
    : options_(std::move(options)), secret_(RandomHex(32)) {
  // No trailing newline: the file holds exactly the secret's bytes.
  WriteFile(dir_.File("secret"), secret_);
  chmod(dir_.File("secret").c_str(), 0600);
}

ChatdProcess::~ChatdProcess() { (void)Kill9(); }

std::string ChatdProcess::BinaryPath() { return std::string(CHAT_BINARY_DIR) + "/examples/chatd"; }

std::string ChatdProcess::url() const {
  return std::string(options_.tls ? "wss" : "ws") + "://127.0.0.1:" + std::to_string(port_) + "/";
}

std::string ChatdProcess::Token(std::string_view user, int64_t ttl_ms) const {
  const int64_t now = NowMs();
  // An already expired token must also be past the verifier's leeway, so shift its issue time.
  const int64_t issued = ttl_ms < 0 ? now + 2 * ttl_ms : now;
  Result<std::string> token = SignJwt(secret_, "", user, issued, ttl_ms < 0 ? -ttl_ms : ttl_ms);
  return token.ok() ? *token : std::string();
}

Result<std::unique_ptr<WsClient>> ChatdProcess::Login(const std::string& user,
                                                      const std::string& device, Wire wire) const {
  auto client = std::make_unique<WsClient>();
  Status connected = client->Connect(url());
  if (!connected.ok()) return connected;
  std::optional<v1::Envelope> reply = client->Hello(Token(user), device, wire);
  if (!reply.has_value()) return DeadlineExceeded("no reply to Hello");
  if (reply->has_error()) {
    return Status(static_cast<Code>(reply->error().code()), reply->error().message());
  }
  if (!reply->has_welcome()) return Internal("Hello answered with " + reply->DebugString());
  return client;
}

Result<std::string> ChatdProcess::CliToken(std::string_view user, std::string_view ttl) {
  const std::string out_path = dir_.File("token.out");
  WriteFile(out_path, "");
  Result<int> code = RunProcess({BinaryPath(), "token", "--user", std::string(user), "--ttl",
                                 std::string(ttl), "--secret-file", dir_.File("secret")},
                                dir_.path(), out_path, 10'000);
  if (!code.ok()) return code.status();
  std::string out = ReadFile(out_path);
  if (*code != 0) return Internal("chatd token exited with " + std::to_string(*code) + ": " + out);
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r' || out.back() == ' ')) {
    out.pop_back();
  }
  // The token is the last line, in case chatd prints anything before it.
  const size_t nl = out.rfind('\n');
  if (nl != std::string::npos) out = out.substr(nl + 1);
  if (out.empty()) return Internal("chatd token printed nothing");
  return out;
}

Status ChatdProcess::MakeTlsFiles() {
  if (tls_ready_) return Status::Ok();
  Status made = MakeSelfSignedCertificate(dir_, "IP:127.0.0.1,DNS:localhost");
  if (!made.ok()) return made;
  tls_ready_ = true;
  return Status::Ok();
}

Status ChatdProcess::Start() {
  if (pid_ > 0 && running()) return FailedPrecondition("chatd is already running");
  if (options_.tls) {
    Status s = MakeTlsFiles();
    if (!s.ok()) return s;
  }
  if (port_ == 0) {
    bool exited = false;
    return StartOnce(0, &exited);
  }
  // A restart wants the same port; the previous process's socket may linger for a moment.
  Status last;
  for (int attempt = 0; attempt < 40; ++attempt) {
    bool exited = false;
    last = StartOnce(port_, &exited);
    if (last.ok() || !exited) return last;
    std::this_thread::sleep_for(milliseconds(250));
  }
  return last;
}

Status ChatdProcess::StartOnce(uint16_t port, bool* exited_early) {
  *exited_early = false;
  const std::string log_path = dir_.File("chatd.log");
  const size_t log_start = ReadFile(log_path).size();
  std::vector<std::string> argv = {
      BinaryPath(),         "serve", "--listen", options_.listen, "--port",
      std::to_string(port), "--db",  db_path(),  "--secret-file", dir_.File("secret")};
  if (options_.tls) {
    argv.insert(argv.end(),
                {"--tls-cert", dir_.File("cert.pem"), "--tls-key", dir_.File("key.pem")});
  }
  argv.insert(argv.end(), options_.extra_flags.begin(), options_.extra_flags.end());
  pid_ = Spawn(argv, dir_.path(), log_path);
  if (pid_ < 0) return Internal("fork failed");

  static constexpr std::string_view kReady = "chatd listening on ";
  const auto deadline = steady_clock::now() + milliseconds(options_.ready_timeout_ms);
  for (;;) {
    const std::string log = ReadFile(log_path);
    const size_t at = log.size() > log_start ? log.find(kReady, log_start) : std::string::npos;
    if (at != std::string::npos) {
      const size_t eol = log.find('\n', at);
      if (eol != std::string::npos) {
        const std::string line = log.substr(at, eol - at);
        const size_t colon = line.rfind(':');
        const unsigned long parsed =
            colon == std::string::npos ? 0 : std::strtoul(line.c_str() + colon + 1, nullptr, 10);
        if (parsed == 0 || parsed > 65535) {
          (void)Kill9();
          return Internal("cannot parse the port from: " + line);
        }
        port_ = static_cast<uint16_t>(parsed);
        ready_url_ = line.substr(kReady.size());
        return Status::Ok();
      }
    }
    if (!running()) {
      *exited_early = true;
      return Unavailable("chatd exited before listening: " + log.substr(log_start));
    }
    if (steady_clock::now() >= deadline) {
      (void)Kill9();
      return DeadlineExceeded("chatd did not print its listening line: " + log.substr(log_start));
    }
    std::this_thread::sleep_for(milliseconds(10));
  }
}

bool ChatdProcess::running() {
  if (pid_ <= 0) return false;
  int wstatus = 0;
  const pid_t r = waitpid(pid_, &wstatus, WNOHANG);
  if (r == 0) return true;
  pid_ = -1;
  return false;
}

Status ChatdProcess::Kill9() {
  if (pid_ <= 0) return Status::Ok();
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
  return Status::Ok();
}

Result<int> ChatdProcess::WaitExit(int timeout_ms) {
  if (pid_ <= 0) return FailedPrecondition("chatd is not running");
  bool exited = false;
  const int wstatus = WaitPid(pid_, timeout_ms, &exited);
  if (!exited) return DeadlineExceeded("chatd did not exit");
  pid_ = -1;
  return ExitCodeOf(wstatus);
}

Result<int> ChatdProcess::Terminate(int timeout_ms) {
  if (pid_ <= 0) return FailedPrecondition("chatd is not running");
  kill(pid_, SIGTERM);
  Result<int> code = WaitExit(timeout_ms);
  if (!code.ok()) (void)Kill9();
  return code;
}

}  // namespace chat::testing
