// What the integration tests of chat::Client and chat-cli share: a started client against a
// ChatdProcess, a waitable StatusCallback, polling with a bound, and chat-cli runs.
//
// Thread-safety: StatusAnswer's callback may run on any thread; the rest is for the test thread.
#ifndef CHAT_TESTS_TESTING_CLIENT_FIXTURES_H_
#define CHAT_TESTS_TESTING_CLIENT_FIXTURES_H_

#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "chat/client.h"
#include "chat/status.h"
#include "tests/testing/chatd_process.h"
#include "tests/testing/temp_dir.h"

namespace chat::testing {

// Polls `done` every 10 ms until it holds or `timeout_ms` passed; returns whether it held.
bool Eventually(const std::function<bool()>& done, int timeout_ms = 30'000);

// A StatusCallback whose answer the test thread can wait for.
class StatusAnswer {
 public:
  StatusCallback Callback();
  // The answer, or DeadlineExceeded when none came within 30 s.
  Status Wait();

 private:
  struct State {
    std::mutex mu;
    std::optional<Status> status;
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

// A client of `chatd` for `user` on `device`, started (its own thread), reconnecting fast
// (50..500 ms backoff), with its cache at `cache` ("" = in memory). REQUIREs success.
std::unique_ptr<Client> OpenStartedClient(const ChatdProcess& chatd, const std::string& user,
                                          const std::string& device, const std::string& cache,
                                          std::shared_ptr<ClientListener> listener);

// One chat-cli run as `user` (device "<user>-cli") with `args` after the connection flags.
struct CliRun {
  int code = -1;
  std::string out;  // stdout and stderr
};
CliRun RunChatCli(const ChatdProcess& chatd, const TempDir& dir, const std::string& user,
                  std::vector<std::string> args);

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_CLIENT_FIXTURES_H_
