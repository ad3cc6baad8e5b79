// Push token registration through chat::Client and chat-cli against the real chatd, observed
// where it matters: in the webhook calls an HTTP receiver run by the test gets.
#include <doctest/doctest.h>

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "chat/client.h"
#include "tests/testing/chatd_process.h"
#include "tests/testing/client_fixtures.h"
#include "tests/testing/http_receiver.h"
#include "tests/testing/temp_dir.h"

namespace chat::testing {
namespace {

class Connections : public ClientListener {
 public:
  void OnConnectionState(ConnectionState state) override {
    std::lock_guard lock(mu_);
    if (state == ConnectionState::kConnected) ++connects_;
  }
  void OnError(const Status& status) override {
    std::lock_guard lock(mu_);
    errors_.push_back(status);
  }
  int connects() {
    std::lock_guard lock(mu_);
    return connects_;
  }
  std::vector<Status> errors() {
    std::lock_guard lock(mu_);
    return errors_;
  }

 private:
  std::mutex mu_;
  int connects_ = 0;
  std::vector<Status> errors_;
};

std::unique_ptr<Client> Open(const ChatdProcess& chatd, const std::string& user,
                             const std::string& cache, std::shared_ptr<ClientListener> listener) {
  return OpenStartedClient(chatd, user, user + "-phone", cache, std::move(listener));
}

TEST_CASE("client push: the token is registered again after a server restart and reaches push") {
  HttpReceiver receiver({200});
  ChatdProcess chatd(
      {.extra_flags = {"--push-webhook", receiver.url(), "--push-collapse-ms", "10"}});
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  auto listener = std::make_shared<Connections>();
  auto bob = Open(chatd, "bob", dir.File("bob.db"), listener);
  REQUIRE(Eventually([&] { return listener->connects() == 1; }));
  StatusAnswer registered;
  REQUIRE(bob->RegisterPushToken("fcm", "bob-token-1", registered.Callback()).ok());
  Status answer = registered.Wait();
  CHECK_MESSAGE(answer.ok(), answer.ToString());

  // The server may keep tokens in memory only: after a restart only the client's repeat
  // brings it back.
  REQUIRE(chatd.Kill9().ok());
  REQUIRE(chatd.Restart().ok());
  REQUIRE(Eventually([&] { return listener->connects() == 2; }));
  // A request answered by the server after the repeat: the token is registered by then.
  StatusAnswer barrier;
  REQUIRE(bob->UnsubscribePresence({"nobody"}, barrier.Callback()).ok());
  REQUIRE(barrier.Wait().code() != Code::kDeadlineExceeded);
  bob->Close();

  CliRun sent = RunChatCli(chatd, dir, "alice", {"send", "--to", "bob", "are you there?"});
  REQUIRE_MESSAGE(sent.code == 0, sent.out);
  std::vector<std::string> bodies = receiver.WaitForBodies(1);
  REQUIRE(bodies.size() == 1);
  CHECK(bodies[0].find("\"user\":\"bob\"") != std::string::npos);
  CHECK(bodies[0].find("\"platform\":\"fcm\"") != std::string::npos);
  CHECK(bodies[0].find("\"token\":\"bob-token-1\"") != std::string::npos);
  CHECK(listener->errors().empty());
}

TEST_CASE("chat-cli: register-push registers and unregisters a device's token") {
  HttpReceiver receiver({200});
  ChatdProcess chatd(
      {.extra_flags = {"--push-webhook", receiver.url(), "--push-collapse-ms", "10"}});
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  CliRun reg = RunChatCli(chatd, dir, "bob", {"register-push", "apns", "bob-apns"});
  CHECK_MESSAGE(reg.code == 0, reg.out);
  CHECK(reg.out.find("push token registered") != std::string::npos);
  CliRun bad = RunChatCli(chatd, dir, "bob", {"register-push", ""});
  CHECK(bad.code == 1);
  CHECK(bad.out.find("INVALID_ARGUMENT") != std::string::npos);

  CliRun sent = RunChatCli(chatd, dir, "alice", {"send", "--to", "bob", "hello"});
  REQUIRE_MESSAGE(sent.code == 0, sent.out);
  std::vector<std::string> bodies = receiver.WaitForBodies(1);
  CHECK(bodies[0].find("\"token\":\"bob-apns\"") != std::string::npos);

  CliRun unreg = RunChatCli(chatd, dir, "bob", {"--json", "register-push", "apns"});
  CHECK_MESSAGE(unreg.code == 0, unreg.out);
  CHECK(unreg.out.find("{\"type\":\"push_token\",\"registered\":false}") != std::string::npos);
  sent = RunChatCli(chatd, dir, "alice", {"send", "--to", "bob", "hello again"});
  REQUIRE_MESSAGE(sent.code == 0, sent.out);
  bodies = receiver.WaitForBodies(2);
  CHECK(bodies[1].find("\"token\":\"bob-apns\"") == std::string::npos);
}

}  // namespace
}  // namespace chat::testing
