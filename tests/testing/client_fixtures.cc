#include "tests/testing/client_fixtures.h"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <utility>

namespace chat::testing {

bool Eventually(const std::function<bool()>& done, int timeout_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

StatusCallback StatusAnswer::Callback() {
  return [state = state_](Status st) {
    std::lock_guard lock(state->mu);
    state->status = std::move(st);
  };
}

Status StatusAnswer::Wait() {
  Eventually([&] {
    std::lock_guard lock(state_->mu);
    return state_->status.has_value();
  });
  std::lock_guard lock(state_->mu);
  return state_->status.value_or(DeadlineExceeded("no answer within 30 s"));
}

std::unique_ptr<Client> OpenStartedClient(const ChatdProcess& chatd, const std::string& user,
                                          const std::string& device, const std::string& cache,
                                          std::shared_ptr<ClientListener> listener) {
  ClientOptions options;
  options.url = chatd.url();
  options.token_provider = [&chatd, user] { return chatd.Token(user); };
  options.device_id = device;
  options.cache_path = cache;
  options.listener = std::move(listener);
  options.reconnect.base_ms = 50;
  options.reconnect.cap_ms = 500;
  auto client = Client::Open(std::move(options));
  REQUIRE(client.ok());
  REQUIRE((*client)->Start().ok());
  return std::move(client.value());
}

CliRun RunChatCli(const ChatdProcess& chatd, const TempDir& dir, const std::string& user,
                  std::vector<std::string> args) {
  static std::atomic<int> runs{0};
  const std::string log = dir.File("chat-cli-" + std::to_string(++runs) + ".log");
  std::vector<std::string> argv = {std::string(CHAT_BINARY_DIR) + "/examples/chat-cli",
                                   "--url",
                                   chatd.url(),
                                   "--token",
                                   chatd.Token(user),
                                   "--device",
                                   user + "-cli"};
  argv.insert(argv.end(), args.begin(), args.end());
  Result<int> code = RunProcess(argv, dir.path(), log, 60'000);
  REQUIRE(code.ok());
  return {*code, ReadFile(log)};
}

}  // namespace chat::testing
