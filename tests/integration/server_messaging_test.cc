// Live 1:1 messaging through the real chatd over loopback: acks, fan-out to every device,
// the JSON mapping, TLS, health check and graceful shutdown.
#include <arpa/inet.h>
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "chat/auth.h"
#include "tests/integration/server_test_helpers.h"

namespace chat::testing {
namespace {

TEST_CASE(
    "server: two users chat both ways - the sender gets SendAck and its other device Deliver") {
  ChatdProcess chatd;
  MustStart(chatd);
  auto alice1 = MustLogin(chatd, "alice", "alice-phone");
  auto alice2 = MustLogin(chatd, "alice", "alice-laptop");
  auto bob = MustLogin(chatd, "bob", "bob-phone");

  const std::string first_id = NewClientMsgId();
  const v1::SendAck ack1 = MustAck(*alice1, MakeSendToPeer("bob", first_id, "hi bob"));
  CHECK(ack1.seq() == 1);
  CHECK(ack1.conversation_id() != 0);
  CHECK(ack1.message_id() != 0);
  CHECK(ack1.client_msg_id() == first_id);
  CHECK_FALSE(ack1.duplicate());
  CHECK(ack1.server_time_ms() > 0);
  const uint64_t conversation = ack1.conversation_id();

  for (WsClient* receiver : {bob.get(), alice2.get()}) {
    std::optional<v1::Envelope> deliver =
        receiver->WaitFor([&](const v1::Envelope& e) { return IsDeliverOf(e, conversation, 1); });
    REQUIRE(deliver.has_value());
    const v1::Message& m = deliver->deliver().message();
    CHECK(deliver->rid() == 0);
    CHECK(m.sender() == "alice");
    CHECK(m.sender_device() == "alice-phone");
    CHECK(m.body() == "hi bob");
    CHECK(m.content_type() == "text/plain");
    CHECK(m.message_id() == ack1.message_id());
    CHECK(m.client_msg_id() == first_id);
    CHECK(m.kind() == v1::MESSAGE_KIND_USER);
  }
  // The sending connection learns of its message from the ack only.
  CHECK(CountDelivers(MustBarrier(*alice1)) == 0);

  const v1::SendAck ack2 =
      MustAck(*bob, MakeSendToConversation(conversation, NewClientMsgId(), "hi alice"));
  CHECK(ack2.conversation_id() == conversation);
  CHECK(ack2.seq() == 2);
  CHECK(ack2.message_id() > ack1.message_id());
  for (WsClient* receiver : {alice1.get(), alice2.get()}) {
    std::optional<v1::Envelope> deliver =
        receiver->WaitFor([&](const v1::Envelope& e) { return IsDeliverOf(e, conversation, 2); });
    REQUIRE(deliver.has_value());
    CHECK(deliver->deliver().message().sender() == "bob");
    CHECK(deliver->deliver().message().body() == "hi alice");
  }
  // Bob's own message comes back to him as the ack only.
  CHECK(CountDelivers(MustBarrier(*bob)) == 0);

  // Sending to the peer by name again lands in the same conversation.
  const v1::SendAck ack3 = MustAck(*alice2, MakeSendToPeer("bob", NewClientMsgId(), "again"));
  CHECK(ack3.conversation_id() == conversation);
  CHECK(ack3.seq() == 3);
  for (WsClient* c : {alice1.get(), alice2.get(), bob.get()}) CHECK(c->undecodable_frames() == 0);
}

TEST_CASE("server: a JSON client gets JSON replies and chats with a binary client") {
  ChatdProcess chatd;
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1", Wire::kBinary);
  auto bob = MustLogin(chatd, "bob", "b1", Wire::kJson);
  CHECK(bob->text_frames() >= 1);  // the Welcome

  const v1::SendAck ack =
      MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), std::string("bin\0ary", 7)));
  std::optional<v1::Envelope> deliver =
      bob->WaitFor([&](const v1::Envelope& e) { return IsDeliverOf(e, ack.conversation_id(), 1); });
  REQUIRE(deliver.has_value());
  CHECK(deliver->deliver().message().body() == std::string("bin\0ary", 7));

  const v1::SendAck reply =
      MustAck(*bob, MakeSendToConversation(ack.conversation_id(), NewClientMsgId(), "json here"),
              Wire::kJson);
  CHECK(reply.seq() == 2);
  std::optional<v1::Envelope> back = alice->WaitFor(
      [&](const v1::Envelope& e) { return IsDeliverOf(e, ack.conversation_id(), 2); });
  REQUIRE(back.has_value());
  CHECK(back->deliver().message().body() == "json here");
  CHECK(back->deliver().message().sender() == "bob");

  // Each connection is answered in the encoding of its Hello, whatever the other side speaks.
  CHECK(bob->binary_frames() == 0);
  CHECK(bob->text_frames() >= 3);
  CHECK(alice->text_frames() == 0);
  CHECK(bob->undecodable_frames() == 0);
  CHECK(alice->undecodable_frames() == 0);
}

TEST_CASE("server: a token minted by `chatd token` is accepted") {
  ChatdProcess chatd;
  MustStart(chatd);
  Result<std::string> token = chatd.CliToken("carol", "1h");
  REQUIRE_MESSAGE(token.ok(), token.status().ToString());
  WsClient client;
  REQUIRE(client.Connect(chatd.url()).ok());
  std::optional<v1::Envelope> reply = client.Hello(*token, "carol-1");
  REQUIRE(reply.has_value());
  REQUIRE_MESSAGE(reply->has_welcome(), reply->DebugString());
  CHECK(reply->welcome().user_id() == "carol");
  CHECK(reply->welcome().device_id() == "carol-1");
  CHECK(reply->welcome().session_id() != 0);
  CHECK(reply->welcome().limits().max_message_bytes() > 0);
}

TEST_CASE("server: GET /healthz answers 200") {
  ChatdProcess chatd;
  MustStart(chatd);
  Result<HttpResponse> response = HttpGet("127.0.0.1", chatd.port(), "/healthz");
  REQUIRE_MESSAGE(response.ok(), response.status().ToString());
  CHECK(response->status == 200);
}

TEST_CASE("server: SIGTERM closes connected clients with 1001 and chatd exits 0") {
  ChatdProcess chatd;
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  auto bob = MustLogin(chatd, "bob", "b1", Wire::kJson);
  const v1::SendAck ack = MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "before stop"));

  Result<int> exit_code = chatd.Terminate();
  REQUIRE_MESSAGE(exit_code.ok(), exit_code.status().ToString());
  CHECK_MESSAGE(*exit_code == 0, chatd.log());
  CHECK(alice->WaitClosed().value_or(-1) == 1001);
  CHECK(bob->WaitClosed().value_or(-1) == 1001);

  // What was acked before the shutdown is there after it.
  MustStart(chatd);
  auto bob2 = MustLogin(chatd, "bob", "b1");
  const SyncAllResult sync = MustSyncAll(*bob2, {});
  REQUIRE(sync.messages.size() == 1);
  CHECK(sync.messages[0].message_id() == ack.message_id());
  CHECK(sync.messages[0].body() == "before stop");
}

// The application protocol the server picks over TLS when a client offers "h2,http/1.1"
// (empty if none, or the handshake failed).
std::string NegotiatedAlpn(uint16_t port) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  REQUIRE(ctx != nullptr);
  static const unsigned char kOffer[] = "\x02h2\x08http/1.1";
  REQUIRE(SSL_CTX_set_alpn_protos(ctx, kOffer, sizeof(kOffer) - 1) == 0);
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string selected;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    SSL* ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) == 1) {
      const unsigned char* name = nullptr;
      unsigned int length = 0;
      SSL_get0_alpn_selected(ssl, &name, &length);
      if (name != nullptr) selected.assign(reinterpret_cast<const char*>(name), length);
      SSL_shutdown(ssl);
    }
    SSL_free(ssl);
  }
  close(fd);
  SSL_CTX_free(ctx);
  return selected;
}

TEST_CASE("server: wss with a self-signed certificate") {
  ChatdProcess chatd({.extra_flags = {}, .tls = true});
  MustStart(chatd);
  CHECK(chatd.url().rfind("wss://", 0) == 0);
  auto alice = MustLogin(chatd, "alice", "a1");
  auto bob = MustLogin(chatd, "bob", "b1");
  const v1::SendAck ack = MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "over tls"));
  CHECK(ack.seq() == 1);
  std::optional<v1::Envelope> deliver =
      bob->WaitFor([&](const v1::Envelope& e) { return IsDeliverOf(e, ack.conversation_id(), 1); });
  REQUIRE(deliver.has_value());
  CHECK(deliver->deliver().message().body() == "over tls");

  // A client offering HTTP/2 first is answered with HTTP/1.1: WebSocket runs over HTTP/1.1 only.
  CHECK(NegotiatedAlpn(chatd.port()) == "http/1.1");

  // The TLS port does not speak plain WebSocket.
  WsClient plain;
  const std::string plain_url = "ws://127.0.0.1:" + std::to_string(chatd.port()) + "/";
  Status plain_connect = plain.Connect(plain_url, 3000);
  CHECK_FALSE(plain_connect.ok());
}

}  // namespace
}  // namespace chat::testing
