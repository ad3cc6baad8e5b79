// chat::Client request timeouts against the real chatd over loopback, with a FakeClock: what a
// Poll()-mode application sees when its loop stalls longer than request_timeout_ms.
#include <doctest/doctest.h>

#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "chat/client.h"
#include "tests/testing/chatd_process.h"
#include "tests/testing/client_fixtures.h"
#include "tests/testing/fake_clock.h"

namespace chat::testing {
namespace {

class StateRecorder : public ClientListener {
 public:
  void OnConnectionState(ConnectionState state) override {
    std::lock_guard lock(mu_);
    state_ = state;
    if (state == ConnectionState::kDisconnected) ++disconnects_;
  }
  ConnectionState state() {
    std::lock_guard lock(mu_);
    return state_;
  }
  int disconnects() {
    std::lock_guard lock(mu_);
    return disconnects_;
  }

 private:
  std::mutex mu_;
  ConnectionState state_ = ConnectionState::kDisconnected;
  int disconnects_ = 0;
};

// The application does not call Poll() for longer than request_timeout_ms while the server's
// answer waits in the socket: the next Poll() reads it before any deadline is checked, so the
// callback gets the answer, not DeadlineExceeded, and the connection stays.
TEST_CASE("client timeouts e2e: an answer that came while Poll() was not called is not timed out") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  auto clock = std::make_shared<FakeClock>();
  auto recorder = std::make_shared<StateRecorder>();
  ClientOptions options;
  options.url = chatd.url();
  options.token_provider = [&chatd] { return chatd.Token("alice"); };
  options.device_id = "alice-laptop";
  options.listener = recorder;
  options.clock = clock;
  auto opened = Client::Open(std::move(options));
  REQUIRE(opened.ok());
  std::unique_ptr<Client> client = std::move(opened.value());
  REQUIRE(Eventually([&] {
    REQUIRE(client->Poll(10).ok());
    return recorder->state() == ConnectionState::kConnected;
  }));

  std::mutex mu;
  std::optional<Result<ConversationInfo>> created;
  REQUIRE(client
              ->CreateGroup("team", {}, ConversationKind::kGroup,
                            [&](Result<ConversationInfo> r) {
                              std::lock_guard lock(mu);
                              created = std::move(r);
                            })
              .ok());
  REQUIRE(client->Poll(0).ok());  // sends the request
  // The application is busy elsewhere: the answer arrives in the socket meanwhile, and the
  // client's clock passes the request's deadline.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  clock->Advance(ClientOptions{}.request_timeout_ms + 1'000);
  REQUIRE(Eventually([&] {
    REQUIRE(client->Poll(10).ok());
    std::lock_guard lock(mu);
    return created.has_value();
  }));
  std::lock_guard lock(mu);
  CHECK(created->ok());
  if (created->ok()) CHECK((*created)->title == "team");
  CHECK(recorder->disconnects() == 0);
  CHECK(recorder->state() == ConnectionState::kConnected);
}

}  // namespace
}  // namespace chat::testing
