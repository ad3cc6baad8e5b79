// Push notifications in the Hub (collapse, online users, preview, device tokens) and the webhook
// notifier against a loopback HTTP receiver.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "chat/push.h"
#include "chat/server.h"
#include "tests/testing/http_receiver.h"
#include "tests/testing/hub_harness.h"

namespace chat::testing {
namespace {

using server::SessionId;

class RecordingNotifier final : public PushNotifier {
 public:
  void Notify(PushNotification notification) override {
    notifications.push_back(std::move(notification));
  }
  std::vector<PushNotification> notifications;
};

struct PushHub {
  explicit PushHub(bool preview = true) : h(Options(notifier, preview)) {}
  static ServerOptions Options(const std::shared_ptr<RecordingNotifier>& notifier, bool preview) {
    ServerOptions options;
    options.push = notifier;
    options.push_collapse_ms = 1000;
    options.push_preview = preview;
    return options;
  }
  std::shared_ptr<RecordingNotifier> notifier = std::make_shared<RecordingNotifier>();
  HubHarness h;
};

void SendAndCommit(HubHarness& h, SessionId from, uint64_t n, std::string_view peer,
                   std::string_view body) {
  h.SendEnvelope(from, SendToPeer(n, peer, ClientMsgId(n), body));
  h.Pump();
  std::vector<v1::Envelope> got = h.Take(from);
  REQUIRE(got.size() == 1);
  REQUIRE(got[0].has_send_ack());
}

TEST_CASE("push: an offline user gets exactly one collapsed notification per window") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SendAndCommit(p.h, alice, 1, "bob", "one");
  SendAndCommit(p.h, alice, 2, "bob", "two");
  SendAndCommit(p.h, alice, 3, "bob", "three");
  p.h.Advance(999);
  CHECK(p.notifier->notifications.empty());
  p.h.Advance(1);
  REQUIRE(p.notifier->notifications.size() == 1);
  const PushNotification n = p.notifier->notifications[0];
  CHECK(n.user == "bob");
  CHECK(n.sender == "alice");
  CHECK(n.seq == 3);
  CHECK(n.collapsed == 3);
  CHECK(n.preview == "three");
  CHECK(n.unread_total == 0);
  CHECK(n.tokens.empty());
  CHECK(n.conversation_id != 0);

  // The window is over: the next message opens a new one.
  p.h.Advance(5000);
  CHECK(p.notifier->notifications.size() == 1);
  SendAndCommit(p.h, alice, 4, "bob", "four");
  p.h.Advance(1000);
  REQUIRE(p.notifier->notifications.size() == 2);
  CHECK(p.notifier->notifications[1].collapsed == 1);
  CHECK(p.notifier->notifications[1].seq == 4);
  CHECK(p.notifier->notifications[1].conversation_id == n.conversation_id);
}

TEST_CASE("push: each conversation of an offline user has its own window") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SessionId carol = p.h.Connect("carol", "c1");
  SendAndCommit(p.h, alice, 1, "bob", "from alice");
  SendAndCommit(p.h, carol, 2, "bob", "from carol");
  p.h.Advance(1000);
  REQUIRE(p.notifier->notifications.size() == 2);
  CHECK(p.notifier->notifications[0].sender != p.notifier->notifications[1].sender);
  CHECK(p.notifier->notifications[0].conversation_id !=
        p.notifier->notifications[1].conversation_id);
}

TEST_CASE("push: an online user and the sender get no notification") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SessionId bob = p.h.Connect("bob", "b1");
  SendAndCommit(p.h, alice, 1, "bob", "hi");
  std::vector<v1::Envelope> got = p.h.Take(bob);
  REQUIRE(got.size() == 1);
  CHECK(got[0].has_deliver());
  p.h.Advance(5000);
  CHECK(p.notifier->notifications.empty());
}

TEST_CASE("push: a user who comes online within the window gets no notification") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SendAndCommit(p.h, alice, 1, "bob", "hi");
  p.h.Connect("bob", "b1");
  p.h.Advance(1000);
  CHECK(p.notifier->notifications.empty());
}

TEST_CASE("push: with preview off the notification carries no body") {
  PushHub p(/*preview=*/false);
  SessionId alice = p.h.Connect("alice", "a1");
  SendAndCommit(p.h, alice, 1, "bob", "secret");
  p.h.Advance(1000);
  REQUIRE(p.notifier->notifications.size() == 1);
  CHECK(p.notifier->notifications[0].preview.empty());
  CHECK(p.notifier->notifications[0].collapsed == 1);
}

v1::Envelope RegisterToken(uint64_t rid, std::string_view platform, std::string_view token) {
  v1::Envelope envelope;
  envelope.set_rid(rid);
  envelope.mutable_register_push_token()->set_platform(std::string(platform));
  envelope.mutable_register_push_token()->set_token(std::string(token));
  return envelope;
}

TEST_CASE("push: registered device tokens are passed with the notification") {
  PushHub p;
  SessionId bob1 = p.h.Connect("bob", "b1");
  SessionId bob2 = p.h.Connect("bob", "b2");
  p.h.SendEnvelope(bob1, RegisterToken(5, "fcm", "token-1"));
  p.h.SendEnvelope(bob2, RegisterToken(6, "apns", "token-2"));
  for (SessionId s : {bob1, bob2}) {
    std::vector<v1::Envelope> got = p.h.Take(s);
    REQUIRE(got.size() == 1);
    CHECK(got[0].has_ok());
  }
  // Re-registering replaces the device's token; an empty token unregisters the device.
  p.h.SendEnvelope(bob1, RegisterToken(7, "fcm", "token-1b"));
  p.h.SendEnvelope(bob2, RegisterToken(8, "", ""));
  CHECK(p.h.Take(bob1).at(0).has_ok());
  CHECK(p.h.Take(bob2).at(0).has_ok());
  p.h.Disconnect(bob1);
  p.h.Disconnect(bob2);

  SessionId alice = p.h.Connect("alice", "a1");
  SendAndCommit(p.h, alice, 1, "bob", "hi");
  p.h.Advance(1000);
  REQUIRE(p.notifier->notifications.size() == 1);
  const std::vector<PushToken>& tokens = p.notifier->notifications[0].tokens;
  REQUIRE(tokens.size() == 1);
  CHECK(tokens[0].device == "b1");
  CHECK(tokens[0].platform == "fcm");
  CHECK(tokens[0].token == "token-1b");
}

TEST_CASE("push: a token without a platform or too long is INVALID_ARGUMENT") {
  PushHub p;
  SessionId bob = p.h.Connect("bob", "b1");
  p.h.SendEnvelope(bob, RegisterToken(5, "", "token"));
  p.h.SendEnvelope(bob, RegisterToken(6, "fcm", std::string(4097, 'x')));
  std::vector<v1::Envelope> got = p.h.Take(bob);
  REQUIRE(got.size() == 2);
  for (const v1::Envelope& e : got) {
    REQUIRE(e.has_error());
    CHECK(e.error().code() == v1::Error::INVALID_ARGUMENT);
  }
  CHECK(got[0].rid() == 5);
  CHECK(got[1].rid() == 6);
  CHECK_FALSE(p.h.closed(bob).has_value());
}

// --- Webhook ---

TEST_CASE("push webhook: a url that is not http://host[:port][/path] is INVALID_ARGUMENT") {
  for (const char* url : {"", "https://example.com/", "http://", "http://host:abc/",
                          "http://host:/", "ftp://host/"}) {
    CAPTURE(url);
    auto notifier = NewWebhookNotifier({.url = url});
    REQUIRE_FALSE(notifier.ok());
    CHECK(notifier.status().code() == Code::kInvalidArgument);
  }
  CHECK(NewWebhookNotifier({.url = "http://127.0.0.1:1/x", .timeout_ms = 0}).status().code() ==
        Code::kInvalidArgument);
  CHECK(NewWebhookNotifier({.url = "http://127.0.0.1:1/x", .max_queue = 0}).status().code() ==
        Code::kInvalidArgument);
  CHECK(NewWebhookNotifier({.url = "http://localhost/push"}).ok());
}

PushNotification Sample() {
  PushNotification n;
  n.user = "bob";
  n.conversation_id = 18446744073709551615ULL;
  n.sender = "alice";
  n.seq = 7;
  n.server_time_ms = 1700000000000;
  n.preview = "say \"hi\"\n\xff";
  n.collapsed = 2;
  n.tokens.push_back({"b1", "fcm", "tok"});
  return n;
}

TEST_CASE("push webhook: posts the notification as JSON") {
  HttpReceiver receiver({200});
  auto notifier = NewWebhookNotifier({.url = receiver.url()});
  REQUIRE(notifier.ok());
  (*notifier)->Notify(Sample());
  const std::vector<std::string> requests = receiver.WaitFor(1);
  REQUIRE(requests.size() == 1);
  const std::string& r = requests[0];
  CHECK(r.starts_with("POST /hook HTTP/1.1\r\n"));
  CHECK(r.find("Content-Type: application/json\r\n") != std::string::npos);
  const std::string body = r.substr(r.find("\r\n\r\n") + 4);
  CHECK(body ==
        "{\"user\":\"bob\",\"conversation_id\":\"18446744073709551615\",\"sender\":\"alice\","
        "\"seq\":\"7\",\"server_time_ms\":\"1700000000000\","
        "\"preview\":\"say \\\"hi\\\"\\u000a\\ufffd\",\"collapsed\":2,\"unread_total\":\"0\","
        "\"tokens\":[{\"device\":\"b1\",\"platform\":\"fcm\",\"token\":\"tok\"}]}");
}

TEST_CASE("push webhook: a 500 is retried until the receiver accepts it") {
  HttpReceiver receiver({500, 503, 200});
  auto notifier = NewWebhookNotifier({.url = receiver.url(), .max_retries = 3, .backoff_ms = 1});
  REQUIRE(notifier.ok());
  (*notifier)->Notify(Sample());
  const std::vector<std::string> requests = receiver.WaitFor(3);
  CHECK(requests.size() == 3);
  CHECK(requests[0] == requests[2]);
}

TEST_CASE("push webhook: a 4xx is not retried; the next notification still goes out") {
  HttpReceiver receiver({400, 200});
  auto notifier = NewWebhookNotifier({.url = receiver.url(), .backoff_ms = 1});
  REQUIRE(notifier.ok());
  (*notifier)->Notify(Sample());
  PushNotification second = Sample();
  second.seq = 8;
  (*notifier)->Notify(second);
  const std::vector<std::string> requests = receiver.WaitFor(2);
  REQUIRE(requests.size() == 2);
  CHECK(requests[0].find("\"seq\":\"7\"") != std::string::npos);
  CHECK(requests[1].find("\"seq\":\"8\"") != std::string::npos);
}

TEST_CASE("push webhook: an unreachable receiver never blocks Notify, and the queue is bounded") {
  // Port 1 on loopback refuses connections; every notification fails after its retries.
  auto notifier = NewWebhookNotifier(
      {.url = "http://127.0.0.1:1/", .max_queue = 4, .max_retries = 1, .backoff_ms = 1});
  REQUIRE(notifier.ok());
  // The test fails by its time limit if Notify waited for the network. Destroying the notifier
  // at the end drops what is queued and joins its thread.
  for (int i = 0; i < 1000; ++i) (*notifier)->Notify(Sample());
}

}  // namespace
}  // namespace chat::testing
