// Push notifications through the real chatd: --push-webhook against an HTTP receiver the test
// runs on loopback, over http and https.
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
#include "tests/testing/http_receiver.h"
#include "tests/testing/temp_dir.h"

namespace chat::testing {
namespace {

size_t CountFor(const std::vector<std::string>& bodies, const std::string& user) {
  return static_cast<size_t>(std::count_if(bodies.begin(), bodies.end(), [&](const std::string& b) {
    return b.starts_with("{\"user\":\"" + user + "\"");
  }));
}

TEST_CASE("server push: one collapsed webhook call for an offline user, none for an online one") {
  HttpReceiver receiver({200});
  ChatdProcess chatd(
      {.extra_flags = {"--push-webhook", receiver.url(), "--push-collapse-ms", "3000"}});
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  auto bob = MustLogin(chatd, "bob", "b1");

  MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "to bob"));
  for (const char* body : {"one", "two", "three"}) {
    MustAck(*alice, MakeSendToPeer("carol", NewClientMsgId(), body));
  }
  std::vector<std::string> bodies = receiver.WaitForBodies(1);
  CHECK(CountFor(bodies, "carol") == 1);
  CHECK(bodies[0].find("\"preview\":\"three\"") != std::string::npos);
  CHECK(bodies[0].find("\"collapsed\":3") != std::string::npos);
  CHECK(bodies[0].find("\"sender\":\"alice\"") != std::string::npos);

  // Windows end in the order they opened and the webhook posts in order, so once a later
  // window's call arrived, any call for bob or a second one for carol would have come before.
  MustAck(*alice, MakeSendToPeer("dave", NewClientMsgId(), "marker"));
  bodies = receiver.WaitForBodies(2);
  CHECK(bodies.size() == 2);
  CHECK(CountFor(bodies, "dave") == 1);
  CHECK(CountFor(bodies, "carol") == 1);
  CHECK(CountFor(bodies, "bob") == 0);
}

TEST_CASE("server push: a token registered before a restart reaches the webhook with the badge") {
  HttpReceiver receiver({200});
  ChatdProcess chatd(
      {.extra_flags = {"--push-webhook", receiver.url(), "--push-collapse-ms", "2000"}});
  MustStart(chatd);
  {
    auto bob = MustLogin(chatd, "bob", "b1");
    v1::Envelope reg;
    reg.mutable_register_push_token()->set_platform("apns");
    reg.mutable_register_push_token()->set_token("bob-apns-token");
    std::optional<v1::Envelope> ok = bob->Request(reg);
    REQUIRE(ok.has_value());
    REQUIRE_MESSAGE(ok->has_ok(), ok->DebugString());
  }
  Result<int> exit_code = chatd.Terminate();
  REQUIRE(exit_code.ok());
  CHECK(*exit_code == 0);
  REQUIRE(chatd.Restart().ok());

  // bob has no device online; his two unread messages are the badge.
  auto alice = MustLogin(chatd, "alice", "a1");
  MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "one"));
  MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "two"));
  const std::vector<std::string> bodies = receiver.WaitForBodies(1);
  REQUIRE(CountFor(bodies, "bob") == 1);
  CHECK(bodies[0].find("\"collapsed\":2") != std::string::npos);
  CHECK(bodies[0].find("\"unread_total\":\"2\"") != std::string::npos);
  CHECK(
      bodies[0].find(R"("tokens":[{"device":"b1","platform":"apns","token":"bob-apns-token"}])") !=
      std::string::npos);
}

TEST_CASE("server push: --no-push-preview sends an empty preview") {
  HttpReceiver receiver({200});
  ChatdProcess chatd({.extra_flags = {"--push-webhook", receiver.url(), "--push-collapse-ms", "10",
                                      "--no-push-preview"}});
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  MustAck(*alice, MakeSendToPeer("carol", NewClientMsgId(), "secret"));
  const std::vector<std::string> bodies = receiver.WaitForBodies(1);
  CHECK(bodies[0].find("\"preview\":\"\"") != std::string::npos);
  CHECK(bodies[0].find("secret") == std::string::npos);
}

TEST_CASE("server push: a bad --push-webhook url or CA file is a usage error") {
  TempDir dir;
  const std::vector<std::vector<std::string>> bad = {
      {"--push-webhook", "ftp://example.com/"},
      {"--push-webhook", "https://example.com/", "--push-webhook-ca-file", dir.File("none.pem")},
      // The CA file only means something with a webhook.
      {"--push-webhook-ca-file", dir.File("none.pem")}};
  for (const std::vector<std::string>& flags : bad) {
    CAPTURE(flags.back());
    ChatdProcess chatd({.extra_flags = flags});
    CHECK_FALSE(chatd.Start().ok());
  }
}

TEST_CASE("server push: an https webhook trusted with --push-webhook-ca-file gets the call") {
  TempDir dir;
  REQUIRE(MakeSelfSignedCertificate(dir, "IP:127.0.0.1").ok());
  HttpReceiver receiver(
      {.tls_cert_path = dir.File("cert.pem"), .tls_key_path = dir.File("key.pem")});
  ChatdProcess chatd({.extra_flags = {"--push-webhook", receiver.url(), "--push-webhook-ca-file",
                                      dir.File("cert.pem"), "--push-collapse-ms", "10"}});
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  MustAck(*alice, MakeSendToPeer("carol", NewClientMsgId(), "over tls"));
  const std::vector<std::string> bodies = receiver.WaitForBodies(1);
  CHECK(CountFor(bodies, "carol") == 1);
  CHECK(bodies[0].find("\"preview\":\"over tls\"") != std::string::npos);
}

void DeliveryKeepsWorking(HttpReceiver& receiver) {
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
  CHECK(receiver.WaitForBodies(1).size() >= 1);
}

TEST_CASE("server push: a receiver answering 500 does not hold up delivery") {
  HttpReceiver receiver({500});
  DeliveryKeepsWorking(receiver);
}

TEST_CASE("server push: a receiver that never answers does not hold up delivery") {
  HttpReceiver receiver({200}, /*hang=*/true);
  DeliveryKeepsWorking(receiver);
}

}  // namespace
}  // namespace chat::testing
