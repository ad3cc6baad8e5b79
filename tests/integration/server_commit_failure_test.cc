// "Ack means committed": with an in-process chat::Server over a store whose commits fail, the
// sender gets an Error (UNAVAILABLE) instead of a SendAck and nobody gets a Deliver. Once the
// store heals, the same client_msg_id is committed as a new message.
#include <doctest/doctest.h>

#include <chrono>
#include <memory>
#include <string>

#include "chat/auth.h"
#include "chat/server.h"
#include "chat/store.h"
#include "tests/integration/server_test_helpers.h"
#include "tests/testing/fault_store.h"

namespace chat::testing {
namespace {

const std::string kSecret(48, 's');

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::unique_ptr<WsClient> Login(uint16_t port, const std::string& user) {
  auto client = std::make_unique<WsClient>();
  REQUIRE(client->Connect("ws://127.0.0.1:" + std::to_string(port) + "/").ok());
  Result<std::string> token = SignJwt(kSecret, "", user, NowMs(), 3'600'000);
  REQUIRE(token.ok());
  std::optional<v1::Envelope> reply = client->Hello(*token, user + "-1");
  REQUIRE(reply.has_value());
  REQUIRE_MESSAGE(reply->has_welcome(), reply->DebugString());
  return client;
}

TEST_CASE("server: a failed commit is an UNAVAILABLE error to the sender, never an ack") {
  auto store = std::make_shared<FaultStore>();
  ServerOptions options;
  options.port = 0;
  options.store = store;
  Result<std::shared_ptr<Authenticator>> auth = NewJwtAuthenticator({.secrets = {{"", kSecret}}});
  REQUIRE(auth.ok());
  options.authenticator = *auth;
  Result<std::unique_ptr<Server>> server = Server::Open(std::move(options));
  REQUIRE_MESSAGE(server.ok(), server.status().ToString());
  REQUIRE((*server)->Start().ok());
  const uint16_t port = (*server)->port();
  REQUIRE(port != 0);

  {
    auto alice = Login(port, "alice");
    auto bob = Login(port, "bob");
    const v1::SendAck first = MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "ok"));
    REQUIRE(bob->WaitFor([&](const v1::Envelope& e) {
                 return IsDeliverOf(e, first.conversation_id(), 1);
               })
                .has_value());

    store->FailAllAppends(Unavailable("disk unavailable"));
    const std::string id = NewClientMsgId();
    const v1::Error error = MustFail(*alice, MakeSendToPeer("bob", id, "lost?"));
    CHECK(error.code() == v1::Error::UNAVAILABLE);
    CHECK(error.client_msg_id() == id);
    CHECK(store->failed_appends() >= 1);
    for (const v1::Envelope& e : MustBarrier(*alice)) CHECK_FALSE(e.has_send_ack());
    CHECK(CountDelivers(MustBarrier(*bob)) == 0);
    // The same failure by conversation id.
    CHECK(MustFail(*alice, MakeSendToConversation(first.conversation_id(), NewClientMsgId(), "x"))
              .code() == v1::Error::UNAVAILABLE);
    CHECK(CountDelivers(MustBarrier(*bob)) == 0);

    // Nothing of the failed sends was stored: the retry is a new message with the next seq.
    store->Heal();
    const v1::SendAck retry = MustAck(*alice, MakeSendToPeer("bob", id, "lost?"));
    CHECK_FALSE(retry.duplicate());
    CHECK(retry.seq() == 2);
    std::optional<v1::Envelope> deliver = bob->WaitFor(
        [&](const v1::Envelope& e) { return IsDeliverOf(e, first.conversation_id(), 2); });
    REQUIRE(deliver.has_value());
    CHECK(deliver->deliver().message().client_msg_id() == id);
    CHECK(MustHistoryAll(*bob, first.conversation_id()).size() == 2);
  }
  (*server)->Shutdown();
}

TEST_CASE("server: one failed commit among many fails only its own batch") {
  auto store = std::make_shared<FaultStore>();
  ServerOptions options;
  options.port = 0;
  options.store = store;
  options.authenticator = NewJwtAuthenticator({.secrets = {{"", kSecret}}}).value();
  Result<std::unique_ptr<Server>> server = Server::Open(std::move(options));
  REQUIRE_MESSAGE(server.ok(), server.status().ToString());
  REQUIRE((*server)->Start().ok());
  {
    auto alice = Login((*server)->port(), "alice");
    auto bob = Login((*server)->port(), "bob");
    store->FailNthAppend(1, Unavailable("transient"));
    const std::string id = NewClientMsgId();
    CHECK(MustFail(*alice, MakeSendToPeer("bob", id, "first try")).code() ==
          v1::Error::UNAVAILABLE);
    const v1::SendAck ack = MustAck(*alice, MakeSendToPeer("bob", id, "first try"));
    CHECK_FALSE(ack.duplicate());
    CHECK(ack.seq() == 1);
    const std::vector<v1::Envelope> got = MustBarrier(*bob);
    CHECK(CountDelivers(got) == 1);
  }
  (*server)->Shutdown();
}

}  // namespace
}  // namespace chat::testing
