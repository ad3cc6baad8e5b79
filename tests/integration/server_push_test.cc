// Push notifications through the real chatd: --push-webhook against an HTTP receiver the test
// runs on loopback.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tests/integration/server_test_helpers.h"

namespace chat::testing {
namespace {

// Answers every request with `status`, or never answers when `hang` is set. Records the bodies.
class Receiver {
 public:
  explicit Receiver(int status, bool hang = false) : status_(status), hang_(hang) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
    REQUIRE(listen(fd_, 64) == 0);
    socklen_t length = sizeof(address);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length);
    port_ = ntohs(address.sin_port);
    thread_ = std::thread([this] { Run(); });
  }
  ~Receiver() {
    shutdown(fd_, SHUT_RDWR);
    close(fd_);
    thread_.join();
    for (int client : held_) close(client);
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_) + "/push"; }
  // The bodies received so far, once there are at least `n` (no time limit of its own).
  std::vector<std::string> WaitFor(size_t n) {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return bodies_.size() >= n; });
    return bodies_;
  }

 private:
  void Run() {
    for (;;) {
      const int client = accept(fd_, nullptr, nullptr);
      if (client < 0) return;
      std::string request;
      char buffer[4096];
      for (;;) {
        const ssize_t n = recv(client, buffer, sizeof(buffer), 0);
        if (n <= 0) break;
        request.append(buffer, static_cast<size_t>(n));
        const size_t end = request.find("\r\n\r\n");
        if (end == std::string::npos) continue;
        const size_t at = request.find("Content-Length: ");
        const size_t length = at == std::string::npos ? 0 : std::stoul(request.substr(at + 16));
        if (request.size() >= end + 4 + length) break;
      }
      {
        std::lock_guard lock(mutex_);
        bodies_.push_back(request.substr(std::min(request.size(), request.find("\r\n\r\n") + 4)));
      }
      changed_.notify_all();
      if (hang_) {
        held_.push_back(client);
        continue;
      }
      const std::string response =
          "HTTP/1.1 " + std::to_string(status_) + " X\r\nContent-Length: 0\r\n\r\n";
      send(client, response.data(), response.size(), MSG_NOSIGNAL);
      close(client);
    }
  }

  const int status_;
  const bool hang_;
  int fd_ = -1;
  uint16_t port_ = 0;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<std::string> bodies_;
  std::vector<int> held_;  // hung connections, closed at the end
  std::thread thread_;
};

size_t CountFor(const std::vector<std::string>& bodies, const std::string& user) {
  return static_cast<size_t>(std::count_if(bodies.begin(), bodies.end(), [&](const std::string& b) {
    return b.starts_with("{\"user\":\"" + user + "\"");
  }));
}

TEST_CASE("server push: one collapsed webhook call for an offline user, none for an online one") {
  Receiver receiver(200);
  ChatdProcess chatd(
      {.extra_flags = {"--push-webhook", receiver.url(), "--push-collapse-ms", "3000"}});
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  auto bob = MustLogin(chatd, "bob", "b1");

  MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "to bob"));
  for (const char* body : {"one", "two", "three"}) {
    MustAck(*alice, MakeSendToPeer("carol", NewClientMsgId(), body));
  }
  std::vector<std::string> bodies = receiver.WaitFor(1);
  CHECK(CountFor(bodies, "carol") == 1);
  CHECK(bodies[0].find("\"preview\":\"three\"") != std::string::npos);
  CHECK(bodies[0].find("\"collapsed\":3") != std::string::npos);
  CHECK(bodies[0].find("\"sender\":\"alice\"") != std::string::npos);

  // Windows end in the order they opened and the webhook posts in order, so once a later
  // window's call arrived, any call for bob or a second one for carol would have come before.
  MustAck(*alice, MakeSendToPeer("dave", NewClientMsgId(), "marker"));
  bodies = receiver.WaitFor(2);
  CHECK(bodies.size() == 2);
  CHECK(CountFor(bodies, "dave") == 1);
  CHECK(CountFor(bodies, "carol") == 1);
  CHECK(CountFor(bodies, "bob") == 0);
}

TEST_CASE("server push: --no-push-preview sends an empty preview") {
  Receiver receiver(200);
  ChatdProcess chatd({.extra_flags = {"--push-webhook", receiver.url(), "--push-collapse-ms", "10",
                                      "--no-push-preview"}});
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  MustAck(*alice, MakeSendToPeer("carol", NewClientMsgId(), "secret"));
  const std::vector<std::string> bodies = receiver.WaitFor(1);
  CHECK(bodies[0].find("\"preview\":\"\"") != std::string::npos);
  CHECK(bodies[0].find("secret") == std::string::npos);
}

TEST_CASE("server push: a bad --push-webhook url is a usage error") {
  ChatdProcess chatd({.extra_flags = {"--push-webhook", "https://example.com/"}});
  CHECK_FALSE(chatd.Start().ok());
}

void DeliveryKeepsWorking(Receiver& receiver) {
  ChatdProcess chatd(
      {.extra_flags = {"--push-webhook", receiver.url(), "--push-collapse-ms", "1"}});
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  auto bob = MustLogin(chatd, "bob", "b1");
  // Messages to offline users keep the webhook busy; bob still gets every message.
  for (int i = 0; i < 20; ++i) {
    MustAck(*alice, MakeSendToPeer("user" + std::to_string(i), NewClientMsgId(), "offline"));
    const v1::SendAck ack = MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "online"));
    REQUIRE(bob->WaitFor([&](const v1::Envelope& e) {
                 return IsDeliverOf(e, ack.conversation_id(), ack.seq());
               })
                .has_value());
  }
  CHECK(receiver.WaitFor(1).size() >= 1);
}

TEST_CASE("server push: a receiver answering 500 does not hold up delivery") {
  Receiver receiver(500);
  DeliveryKeepsWorking(receiver);
}

TEST_CASE("server push: a receiver that never answers does not hold up delivery") {
  Receiver receiver(200, /*hang=*/true);
  DeliveryKeepsWorking(receiver);
}

}  // namespace
}  // namespace chat::testing
