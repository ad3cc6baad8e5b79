// ChatdProcess: the real chatd binary, started in a private temp dir for one test.
//
// Integration tests talk to the same executable users run, over loopback. The harness writes
// the signing secret, starts `chatd serve` on a free port (port 0, parsed from the "chatd
// listening on ws://127.0.0.1:<port>" line), and can stop it with SIGTERM or SIGKILL and start
// it again on the same port with the same database, so clients can reconnect to it.
//
// Thread-safety: none; one test thread owns one ChatdProcess.
#ifndef CHAT_TESTS_TESTING_CHATD_PROCESS_H_
#define CHAT_TESTS_TESTING_CHATD_PROCESS_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "chat/status.h"
#include "tests/testing/temp_dir.h"
#include "tests/testing/ws_client.h"

namespace chat::testing {

struct ChatdOptions {
  // chatd's --listen: an IP literal, a wildcard or an interface name.
  std::string listen = "127.0.0.1";
  // Appended to `chatd serve ...`, e.g. {"--sync-page-max", "5"}.
  std::vector<std::string> extra_flags;
  // Generate a self-signed certificate (openssl CLI) and serve wss with it.
  bool tls = false;
  // How long Start() waits for the "listening" line.
  int ready_timeout_ms = 10'000;
};

// Runs `argv` (argv[0] is a path) to completion with stdout and stderr appended to `log_path`
// and the working directory `cwd`. Returns the exit code, or Internal/DeadlineExceeded.
Result<int> RunProcess(const std::vector<std::string>& argv, const std::string& cwd,
                       const std::string& log_path, int timeout_ms);

// Writes a self-signed certificate (P-256, valid for two days, CN=localhost) with the given
// subjectAltName (e.g. "IP:127.0.0.1,DNS:localhost") and its key to cert.pem and key.pem in
// `dir`, with the openssl command. The certificate is its own CA: a client that trusts it as a
// CA file accepts it.
Status MakeSelfSignedCertificate(const TempDir& dir, const std::string& subject_alt_name);

class ChatdProcess {
 public:
  explicit ChatdProcess(ChatdOptions options = {});
  // Kills (SIGKILL) and reaps chatd if it is still running.
  ~ChatdProcess();
  ChatdProcess(const ChatdProcess&) = delete;
  ChatdProcess& operator=(const ChatdProcess&) = delete;

  // <build>/examples/chatd.
  static std::string BinaryPath();

  // Starts chatd and waits until it is listening. The first start uses port 0; later starts
  // reuse the port of the first one (retrying for a few seconds while the old socket lingers).
  // REQUIRES: not running().
  Status Start();
  // Same as Start(); reads better after Kill9() or Terminate(). The database is kept.
  Status Restart() { return Start(); }

  // SIGKILL and reap. OK if it was not running.
  Status Kill9();
  // SIGTERM, then waits up to `timeout_ms` for the exit. Returns the exit code, or 128+signal
  // if a signal ended it. DeadlineExceeded (and the process is killed) if it did not exit.
  Result<int> Terminate(int timeout_ms = 10'000);

  // True while the process has not exited (reaps it if it has).
  bool running();

  uint16_t port() const { return port_; }
  // The running process's id (-1 when not started).
  pid_t pid() const { return pid_; }
  // "ws://127.0.0.1:<port>/" or "wss://127.0.0.1:<port>/".
  std::string url() const;
  // The URL chatd's ready line named ("ws://[::1]:<port>" for --listen ::); "" before Start().
  const std::string& ready_url() const { return ready_url_; }

  // A token for `user` signed with this server's secret, valid for `ttl_ms` from now
  // (negative: already expired). "" if signing failed.
  std::string Token(std::string_view user, int64_t ttl_ms = 3'600'000) const;
  // A token printed by `chatd token --user <user> --ttl <ttl> --secret-file <file>`.
  Result<std::string> CliToken(std::string_view user, std::string_view ttl = "1h");

  // Connects a new WsClient to this chatd and completes Hello as `user` on `device`.
  // Returns the server's Error as a Status (with its code) if Hello was refused.
  Result<std::unique_ptr<WsClient>> Login(const std::string& user, const std::string& device,
                                          Wire wire = Wire::kBinary) const;

  // Replaces ChatdOptions::extra_flags for the next Start().
  void set_extra_flags(std::vector<std::string> flags) { options_.extra_flags = std::move(flags); }

  const std::string& secret() const { return secret_; }
  std::string db_path() const { return dir_.File("chat.db"); }
  std::string cert_path() const { return dir_.File("cert.pem"); }
  // Everything chatd wrote to stdout and stderr so far, across restarts.
  std::string log() const { return ReadFile(dir_.File("chatd.log")); }
  const TempDir& dir() const { return dir_; }

 private:
  Status StartOnce(uint16_t port, bool* exited_early);
  Status MakeTlsFiles();
  Result<int> WaitExit(int timeout_ms);

  ChatdOptions options_;
  TempDir dir_;
  std::string secret_;
  pid_t pid_ = -1;
  uint16_t port_ = 0;
  std::string ready_url_;
  bool tls_ready_ = false;
};

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_CHATD_PROCESS_H_
