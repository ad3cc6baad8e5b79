// chat::Server (src/server/server.cc) in-process: option validation, binding, HTTP, the
// connection refusals, message reassembly and its size cap, slow consumers, and a graceful
// shutdown that acks what was being committed before closing with 1001.
#include <arpa/inet.h>
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "chat/auth.h"
#include "chat/server.h"
#include "chat/store.h"
#include "chat/v1/chat.pb.h"
#include "tests/testing/chatd_process.h"
#include "tests/testing/temp_dir.h"
#include "tests/testing/ws_client.h"

namespace chat::testing {
namespace {

const std::string kSecret(48, 'k');

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string TokenFor(const std::string& user) {
  Result<std::string> token = SignJwt(kSecret, "", user, NowMs(), 3'600'000);
  REQUIRE(token.ok());
  return *token;
}

ServerOptions BaseOptions(std::shared_ptr<MessageStore> store = NewMemoryStore()) {
  ServerOptions options;
  options.port = 0;
  options.store = std::move(store);
  Result<std::shared_ptr<Authenticator>> auth = NewJwtAuthenticator({.secrets = {{"", kSecret}}});
  REQUIRE(auth.ok());
  options.authenticator = *auth;
  return options;
}

std::unique_ptr<Server> MustStart(ServerOptions options) {
  Result<std::unique_ptr<Server>> server = Server::Open(std::move(options));
  REQUIRE_MESSAGE(server.ok(), server.status().ToString());
  REQUIRE((*server)->Start().ok());
  REQUIRE((*server)->port() != 0);
  return std::move(*server);
}

std::string Url(const Server& server) {
  return "ws://127.0.0.1:" + std::to_string(server.port()) + "/";
}

std::unique_ptr<WsClient> MustLogin(const Server& server, const std::string& user) {
  auto client = std::make_unique<WsClient>();
  REQUIRE(client->Connect(Url(server)).ok());
  std::optional<v1::Envelope> reply = client->Hello(TokenFor(user), user + "-phone");
  REQUIRE(reply.has_value());
  REQUIRE_MESSAGE(reply->has_welcome(), reply->DebugString());
  return client;
}

v1::Envelope HelloEnvelope(const std::string& user) {
  v1::Envelope envelope;
  envelope.set_rid(1);
  envelope.mutable_hello()->set_token(TokenFor(user));
  envelope.mutable_hello()->set_device_id(user + "-laptop");
  return envelope;
}

// A store whose Append waits at a gate the test opens, so a commit can be held in progress.
class GatedStore : public MessageStoreWrapper {
 public:
  GatedStore() : MessageStoreWrapper(NewMemoryStore()) {}

  Status Append(std::span<const AppendRequest> batch, std::vector<AppendResult>* results) override {
    std::unique_lock<std::mutex> lock(mu_);
    ++entered_;
    batch_sizes_.push_back(batch.size());
    cv_.notify_all();
    cv_.wait(lock, [this] { return open_; });
    lock.unlock();
    return MessageStoreWrapper::Append(batch, results);
  }

  // The size of every Append's batch so far.
  std::vector<size_t> batch_sizes() {
    std::lock_guard<std::mutex> lock(mu_);
    return batch_sizes_;
  }

  // Waits (bounded) until an Append is held at the gate.
  bool WaitEntered(int timeout_ms = 5000) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms),
                        [this] { return entered_ > 0; });
  }

  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int entered_ = 0;
  std::vector<size_t> batch_sizes_;
  bool open_ = false;
};

// A minimal WebSocket client on a raw socket that reads only when asked to, for the slow
// consumer case (WsClient always reads), and writes and reads what and when the test says, for
// the closing handshake.
class RawWs {
 public:
  ~RawWs() {
    if (ssl_ != nullptr) SSL_free(ssl_);
    if (context_ != nullptr) SSL_CTX_free(context_);
    if (fd_ >= 0) close(fd_);
  }

  // As Connect, over TLS (the server's certificate is not verified).
  bool ConnectTls(uint16_t port, int receive_buffer) {
    return Connect(port, receive_buffer, /*tls=*/true);
  }

  bool Connect(uint16_t port, int receive_buffer, bool tls = false) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    if (fd_ < 0) return false;
    // A small receive window makes the server's socket fill up quickly.
    setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof(receive_buffer));
    timeval timeout{10, 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    sockaddr_in addr = {};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return false;
    if (tls) {
      context_ = SSL_CTX_new(TLS_client_method());
      if (context_ == nullptr) return false;
      ssl_ = SSL_new(context_);
      if (ssl_ == nullptr || SSL_set_fd(ssl_, fd_) != 1 || SSL_connect(ssl_) != 1) return false;
    }
    const std::string request =
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: chat.v1\r\n\r\n";
    if (!WriteAll(request)) return false;
    std::string response;
    char c = 0;
    while (response.find("\r\n\r\n") == std::string::npos) {
      if (ReadSome(&c, 1) != 1) return false;
      response += c;
    }
    return response.rfind("HTTP/1.1 101", 0) == 0;
  }

  // One masked binary frame (FIN set).
  bool SendBinary(const std::string& payload) { return SendFrame(0x2, payload); }

  // One final, masked frame of `opcode` (0x2 binary, 0x9 ping, ...).
  bool SendFrame(int opcode, const std::string& payload) {
    std::string frame;
    frame += static_cast<char>(0x80 | opcode);
    if (payload.size() < 126) {
      frame += static_cast<char>(0x80 | payload.size());
    } else {
      frame += static_cast<char>(0x80 | 126);
      frame += static_cast<char>((payload.size() >> 8) & 0xff);
      frame += static_cast<char>(payload.size() & 0xff);
    }
    const char mask[4] = {0x11, 0x22, 0x33, 0x44};
    frame.append(mask, 4);
    for (size_t i = 0; i < payload.size(); ++i)
      frame += static_cast<char>(payload[i] ^ mask[i % 4]);
    return WriteAll(frame);
  }

  // The header of one masked frame announcing `length` bytes of payload (FIN set when `final`).
  // Its mask key is all zeros, so the payload follows as it is, in pieces, with SendPayload.
  bool SendHeader(int opcode, uint64_t length, bool final = true) {
    std::string header;
    header += static_cast<char>((final ? 0x80 : 0) | opcode);
    header += static_cast<char>(0x80 | 127);
    for (int shift = 56; shift >= 0; shift -= 8) {
      header += static_cast<char>((length >> shift) & 0xff);
    }
    header.append(4, '\0');
    return WriteAll(header);
  }

  bool SendPayload(const std::string& bytes) { return WriteAll(bytes); }

  // A close frame with `code`, the answer to the server's.
  bool SendClose(int code) {
    return SendFrame(0x8,
                     std::string{static_cast<char>(code >> 8), static_cast<char>(code & 0xff)});
  }

  struct Frame {
    int opcode = 0;
    std::string payload;
  };

  // The next frame from the server (servers do not mask); nullopt if the stream ended.
  std::optional<Frame> ReadFrame() {
    unsigned char head[2];
    if (!ReadExact(head, 2)) return std::nullopt;
    uint64_t length = head[1] & 0x7f;
    if (length == 126) {
      unsigned char ext[2];
      if (!ReadExact(ext, 2)) return std::nullopt;
      length = (ext[0] << 8) | ext[1];
    } else if (length == 127) {
      unsigned char ext[8];
      if (!ReadExact(ext, 8)) return std::nullopt;
      length = 0;
      for (unsigned char b : ext) length = (length << 8) | b;
    }
    Frame frame;
    frame.opcode = head[0] & 0x0f;
    frame.payload.resize(length);
    if (length > 0 && !ReadExact(frame.payload.data(), length)) return std::nullopt;
    return frame;
  }

  // Reads frames until a close frame and returns its code; nullopt if the stream ended first.
  // The close frame's reason goes to `reason` if given.
  std::optional<int> ReadUntilClose(std::string* reason = nullptr) {
    for (;;) {
      std::optional<Frame> frame = ReadFrame();
      if (!frame.has_value()) return std::nullopt;
      if (frame->opcode != 0x8) continue;
      if (frame->payload.size() < 2) return 1005;
      if (reason != nullptr) *reason = frame->payload.substr(2);
      return (static_cast<unsigned char>(frame->payload[0]) << 8) |
             static_cast<unsigned char>(frame->payload[1]);
    }
  }

  enum class End { kFin, kReset, kOpen };

  // How the stream from the server ends after what was read so far (anything more is dropped):
  // with a FIN, with a reset, or not within the 10 s receive timeout.
  End ReadToEnd() {
    char buffer[4096];
    for (;;) {
      const ssize_t n = ReadSome(buffer, sizeof(buffer));
      if (n > 0) continue;
      if (n == 0) return End::kFin;
      return errno == EAGAIN || errno == EWOULDBLOCK ? End::kOpen : End::kReset;
    }
  }

  // After the server's FIN was read: whether the server has closed its socket. A read after a
  // FIN returns 0 whatever comes next, so this sends the header of a message (a server still
  // draining reads and drops it) and looks for the reset a closed socket answers it with.
  bool ServerClosedSocket() {
    if (!SendHeader(0x2, 1 << 20)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    int error = 0;
    socklen_t size = sizeof(error);
    if (getsockopt(fd_, SOL_SOCKET, SO_ERROR, &error, &size) != 0) return false;
    return error != 0;
  }

  // Over TLS: sends this side's close_notify, TLS's end of the stream (the socket stays open).
  bool SendCloseNotify() { return ssl_ != nullptr && SSL_shutdown(ssl_) >= 0; }

  // Over TLS, once the TLS stream ended: how the TCP stream under it ends within `timeout_ms` (a
  // FIN when the server closed its socket having read all the client sent), or kOpen.
  End WaitTcpEnd(int timeout_ms) {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) != 1) return End::kOpen;
    char byte = 0;
    const ssize_t n = recv(fd_, &byte, 1, MSG_DONTWAIT);
    if (n == 0) return End::kFin;
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) ? End::kOpen : End::kReset;
  }

  // Whether something arrived to read within `timeout_ms` (nothing is read).
  bool WaitReadable(int timeout_ms) {
    if (ssl_ != nullptr && SSL_pending(ssl_) > 0) return true;
    pollfd p{fd_, POLLIN, 0};
    return poll(&p, 1, timeout_ms) == 1 && (p.revents & POLLIN) != 0;
  }

 private:
  bool WriteAll(const std::string& bytes) {
    size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = WriteSome(bytes.data() + done, bytes.size() - done);
      if (n <= 0) return false;
      done += static_cast<size_t>(n);
    }
    return true;
  }

  bool ReadExact(void* out, size_t n) {
    auto* p = static_cast<char*>(out);
    size_t done = 0;
    while (done < n) {
      const ssize_t r = ReadSome(p + done, n - done);
      if (r <= 0) return false;
      done += static_cast<size_t>(r);
    }
    return true;
  }

  // As send(2); over TLS one record's worth at most.
  ssize_t WriteSome(const char* data, size_t size) {
    if (ssl_ == nullptr) {
      // MSG_NOSIGNAL: a write after the server reset the connection fails, it does not kill.
      return send(fd_, data, size, MSG_NOSIGNAL);
    }
    // OpenSSL writes with write(2): a write after a reset raises SIGPIPE, ignored here.
    signal(SIGPIPE, SIG_IGN);
    const int n = SSL_write(ssl_, data, static_cast<int>(std::min<size_t>(size, 16 * 1024)));
    return n > 0 ? n : -1;
  }

  // As read(2): 0 at the end of the stream (over TLS, the server's close_notify), -1 with errno
  // EAGAIN when the receive timeout passed, -1 otherwise for a failed stream (a reset).
  ssize_t ReadSome(void* out, size_t size) {
    if (ssl_ == nullptr) return read(fd_, out, size);
    if (close_notified_) return 0;  // as a read after a FIN
    ERR_clear_error();
    const int n = SSL_read(ssl_, out, static_cast<int>(size));
    if (n > 0) return n;
    const int error = SSL_get_error(ssl_, n);
    if (error == SSL_ERROR_ZERO_RETURN) {
      close_notified_ = true;
      return 0;
    }
    if (error == SSL_ERROR_WANT_READ || (error == SSL_ERROR_SYSCALL && errno == EAGAIN)) {
      errno = EAGAIN;
    } else {
      errno = ECONNRESET;
    }
    return -1;
  }

  int fd_ = -1;
  SSL_CTX* context_ = nullptr;
  SSL* ssl_ = nullptr;
  bool close_notified_ = false;  // the server's close_notify was read
};

// A refused connection gets one Error{UNAVAILABLE, retry_after_ms} frame, then close 1013.
// (Read on a raw socket: the lws 4.1 client reports close codes 1012..2999 as 1002.)
void CheckRefused(uint16_t port) {
  RawWs refused;
  REQUIRE(refused.Connect(port, 64 * 1024));
  std::optional<RawWs::Frame> frame = refused.ReadFrame();
  REQUIRE(frame.has_value());
  CHECK(frame->opcode == 0x2);
  v1::Envelope error;
  REQUIRE(error.ParseFromString(frame->payload));
  REQUIRE_MESSAGE(error.has_error(), error.DebugString());
  CHECK(error.error().code() == v1::Error::UNAVAILABLE);
  CHECK(error.error().retry_after_ms() >= 1000);
  CHECK(error.error().retry_after_ms() <= 3000);
  CHECK(refused.ReadUntilClose() == std::optional<int>(1013));
}

TEST_CASE("server runtime: Open refuses invalid options with INVALID_ARGUMENT naming the field") {
  struct Case {
    std::function<void(ServerOptions&)> mutate;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](ServerOptions& o) { o.store = nullptr; }, "store is required"},
      {[](ServerOptions& o) { o.authenticator = nullptr; }, "authenticator is required"},
      {[](ServerOptions& o) { o.node_id = 1024; }, "node_id must be <= 1023"},
      {[](ServerOptions& o) { o.tls_cert_path = "/tmp/cert.pem"; },
       "tls_cert_path and tls_key_path must be set together"},
      {[](ServerOptions& o) { o.tls_key_path = "/tmp/key.pem"; },
       "tls_cert_path and tls_key_path must be set together"},
      {[](ServerOptions& o) {
         o.tls_cert_path = "/nonexistent/cert.pem";
         o.tls_key_path = "/nonexistent/key.pem";
       },
       "tls_cert_path: cannot read /nonexistent/cert.pem"},
      {[](ServerOptions& o) { o.listen_address = "192.0.2.1"; },
       "listen_address: 192.0.2.1 is not an address of this host"},
      {[](ServerOptions& o) { o.listen_address = "no-such-if0"; },
       "listen_address: not an IP address or interface name: no-such-if0"},
      {[](ServerOptions& o) { o.receive_buffer_bytes = 127; },
       "receive_buffer_bytes must be in 128..65536"},
      {[](ServerOptions& o) { o.receive_buffer_bytes = 65537; },
       "receive_buffer_bytes must be in 128..65536"},
      {[](ServerOptions& o) { o.max_message_bytes = 0; }, "max_message_bytes must be > 0"},
      {[](ServerOptions& o) { o.max_outbound_bytes = 0; }, "max_outbound_bytes must be > 0"},
      {[](ServerOptions& o) { o.hello_timeout_ms = 0; }, "hello_timeout_ms must be > 0"},
      {[](ServerOptions& o) { o.max_connections = 0; }, "max_connections must be > 0"},
      {[](ServerOptions& o) { o.sync_page_max = 0; }, "sync_page_max must be > 0"},
      {[](ServerOptions& o) { o.commit_batch_max = 0; }, "commit_batch_max must be > 0"},
      {[](ServerOptions& o) { o.commit_delay_ms = 1001; }, "commit_delay_ms must be <= 1000"},
      {[](ServerOptions& o) { o.writer_queue_max = 0; }, "writer_queue_max must be > 0"},
      {[](ServerOptions& o) { o.reader_threads = 0; }, "reader_threads must be > 0"},
      {[](ServerOptions& o) { o.heartbeat_interval_ms = o.idle_timeout_ms; },
       "heartbeat_interval_ms must be < idle_timeout_ms"},
      {[](ServerOptions& o) { o.presence_ttl_ms = o.heartbeat_interval_ms; },
       "presence_ttl_ms must be > heartbeat_interval_ms"},
      {[](ServerOptions& o) { o.presence_coalesce_ms = 0; }, "presence_coalesce_ms must be > 0"},
      {[](ServerOptions& o) { o.max_presence_subscriptions = 0; },
       "max_presence_subscriptions must be > 0"},
  };
  for (const Case& c : cases) {
    ServerOptions options = BaseOptions();
    c.mutate(options);
    Result<std::unique_ptr<Server>> server = Server::Open(std::move(options));
    REQUIRE_FALSE(server.ok());
    CHECK(server.status().code() == Code::kInvalidArgument);
    CHECK(server.status().message() == c.message);
  }
}

TEST_CASE("server runtime: Open on a port already in use is UNAVAILABLE") {
  std::unique_ptr<Server> first = MustStart(BaseOptions());
  ServerOptions options = BaseOptions();
  options.port = first->port();
  Result<std::unique_ptr<Server>> second = Server::Open(std::move(options));
  REQUIRE_FALSE(second.ok());
  CHECK(second.status().code() == Code::kUnavailable);
  first->Shutdown();
}

TEST_CASE("server runtime: GET /healthz is 200 ok, other paths 404, and 404 when disabled") {
  std::unique_ptr<Server> server = MustStart(BaseOptions());
  Result<HttpResponse> health = HttpGet("127.0.0.1", server->port(), "/healthz");
  REQUIRE_MESSAGE(health.ok(), health.status().ToString());
  CHECK(health->status == 200);
  CHECK(health->body == "ok\n");
  Result<HttpResponse> other = HttpGet("127.0.0.1", server->port(), "/index.html");
  REQUIRE(other.ok());
  CHECK(other->status == 404);
  server->Shutdown();

  ServerOptions options = BaseOptions();
  options.serve_healthz = false;
  std::unique_ptr<Server> quiet = MustStart(std::move(options));
  Result<HttpResponse> disabled = HttpGet("127.0.0.1", quiet->port(), "/healthz");
  REQUIRE(disabled.ok());
  CHECK(disabled->status == 404);
}

TEST_CASE("server runtime: Run or Start a second time is FAILED_PRECONDITION") {
  std::unique_ptr<Server> server = MustStart(BaseOptions());
  CHECK(server->Start().code() == Code::kFailedPrecondition);
  CHECK(server->Run().code() == Code::kFailedPrecondition);
  server->Shutdown();
  server->Shutdown();  // idempotent
}

TEST_CASE("server runtime: Run serves until Shutdown from another thread, then returns OK") {
  Result<std::unique_ptr<Server>> server = Server::Open(BaseOptions());
  REQUIRE(server.ok());
  Server& s = **server;
  Status run_status = Internal("Run did not return");
  std::thread loop([&] { run_status = s.Run(); });
  {
    auto alice = MustLogin(s, "alice");
    s.Shutdown();
    std::optional<int> code = alice->WaitClosed();
    REQUIRE(code.has_value());
    CHECK(*code == 1001);
  }
  loop.join();
  CHECK(run_status.ok());
  // The port is closed now.
  CHECK_FALSE(HttpGet("127.0.0.1", s.port(), "/healthz", 1000).ok());
}

TEST_CASE("server runtime: Shutdown before Run makes Run return OK at once") {
  Result<std::unique_ptr<Server>> server = Server::Open(BaseOptions());
  REQUIRE(server.ok());
  (*server)->Shutdown();
  CHECK((*server)->Run().ok());
}

TEST_CASE(
    "server runtime: past max_connections a client gets UNAVAILABLE with retry_after_ms "
    "and close 1013") {
  ServerOptions options = BaseOptions();
  options.max_connections = 1;
  std::unique_ptr<Server> server = MustStart(std::move(options));
  auto alice = MustLogin(*server, "alice");

  CheckRefused(server->port());

  // The accepted session is unaffected.
  CHECK(alice->Barrier().has_value());
}

TEST_CASE(
    "server runtime: a refused connection whose client never answers the close frame is closed "
    "well before the 2 s drain bound") {
  ServerOptions options = BaseOptions();
  options.max_connections = 1;
  std::unique_ptr<Server> server = MustStart(std::move(options));
  auto alice = MustLogin(*server, "alice");
  RawWs refused;
  REQUIRE(refused.Connect(server->port(), 64 * 1024));
  REQUIRE(refused.ReadUntilClose() == std::optional<int>(1013));
  REQUIRE(refused.ReadToEnd() == RawWs::End::kFin);
  const auto fin = std::chrono::steady_clock::now();
  // The client neither answers nor ends its side. Before its Hello succeeded a connection is
  // drained for 250 ms, not 2 s: under a connection storm its descriptor is not held.
  std::this_thread::sleep_until(fin + std::chrono::milliseconds(700));
  CHECK(refused.ServerClosedSocket());
  CHECK(alice->Barrier().has_value());
}

TEST_CASE(
    "server runtime: a session whose client never answers the close frame is drained for 2 s, "
    "then closed") {
  std::unique_ptr<Server> server = MustStart(BaseOptions());
  RawWs client;
  REQUIRE(client.Connect(server->port(), 1 << 20));
  std::string hello;
  REQUIRE(HelloEnvelope("alice").SerializeToString(&hello));
  REQUIRE(client.SendBinary(hello));
  REQUIRE(client.ReadFrame().has_value());
  // A second Hello: close 1008.
  REQUIRE(client.SendBinary(hello));
  REQUIRE(client.ReadUntilClose() == std::optional<int>(1008));
  REQUIRE(client.ReadToEnd() == RawWs::End::kFin);
  const auto fin = std::chrono::steady_clock::now();
  // Still draining well after 250 ms, and closed right after 2 s (lws does not keep the
  // socket until the peer ends its side).
  std::this_thread::sleep_until(fin + std::chrono::milliseconds(700));
  CHECK_FALSE(client.ServerClosedSocket());
  std::this_thread::sleep_until(fin + std::chrono::milliseconds(2600));
  CHECK(client.ServerClosedSocket());
}

TEST_CASE("server runtime: a message split into fragments is reassembled") {
  std::unique_ptr<Server> server = MustStart(BaseOptions());
  WsClient client;
  REQUIRE(client.Connect(Url(*server)).ok());
  std::string hello;
  REQUIRE(HelloEnvelope("alice").SerializeToString(&hello));
  REQUIRE(client.SendFragments(hello, 3).ok());
  std::optional<v1::Envelope> reply = client.Next();
  REQUIRE(reply.has_value());
  CHECK_MESSAGE(reply->has_welcome(), reply->DebugString());
}

TEST_CASE(
    "server runtime: messages larger than the receive buffer arrive whole, one after another") {
  ServerOptions options = BaseOptions();
  options.receive_buffer_bytes = 128;  // the Hello's token alone is larger
  std::unique_ptr<Server> server = MustStart(std::move(options));
  auto alice = MustLogin(*server, "alice");
  auto bob = MustLogin(*server, "bob");
  const std::string bodies[] = {std::string(5000, 'a'), "short", std::string(200, 'c')};
  uint64_t rid = 10;
  for (const std::string& body : bodies) {
    REQUIRE(alice->SendEnvelope(MakeSendToPeer("bob", NewClientMsgId(), body, ++rid)).ok());
    std::optional<v1::Envelope> ack = alice->WaitForRid(rid);
    REQUIRE(ack.has_value());
    REQUIRE_MESSAGE(ack->has_send_ack(), ack->DebugString());
    std::optional<v1::Envelope> delivered =
        bob->WaitFor([](const v1::Envelope& e) { return e.has_deliver(); });
    REQUIRE(delivered.has_value());
    CHECK(delivered->deliver().message().body() == body);
  }
}

TEST_CASE("server runtime: at the smallest receive buffer a 125-byte ping gets its whole pong") {
  ServerOptions options = BaseOptions();
  options.receive_buffer_bytes = 128;
  std::unique_ptr<Server> server = MustStart(std::move(options));
  RawWs client;
  REQUIRE(client.Connect(server->port(), 1 << 16));
  std::string payload(125, 'p');
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>('a' + i % 26);
  REQUIRE(client.SendFrame(0x9, payload));
  std::optional<RawWs::Frame> pong = client.ReadFrame();
  REQUIRE(pong.has_value());
  CHECK(pong->opcode == 0xA);
  CHECK(pong->payload == payload);
}

TEST_CASE("server runtime: max_message_bytes is enforced on the assembled message (close 1009)") {
  ServerOptions options = BaseOptions();
  options.max_message_bytes = 1024;
  std::unique_ptr<Server> server = MustStart(std::move(options));

  SUBCASE("exactly at the limit reaches the decoder (1007 for garbage)") {
    WsClient client;
    REQUIRE(client.Connect(Url(*server)).ok());
    REQUIRE(client.SendRaw(std::string(1024, '\xff')).ok());
    std::optional<int> code = client.WaitClosed();
    REQUIRE(code.has_value());
    CHECK(*code == 1007);
  }
  SUBCASE("one byte over in one frame") {
    WsClient client;
    REQUIRE(client.Connect(Url(*server)).ok());
    REQUIRE(client.SendRaw(std::string(1025, 'x')).ok());
    std::optional<int> code = client.WaitClosed();
    REQUIRE(code.has_value());
    CHECK(*code == 1009);
    CHECK(client.close_reason() == "message too large");
  }
  SUBCASE("over the limit across many small fragments") {
    WsClient client;
    REQUIRE(client.Connect(Url(*server)).ok());
    REQUIRE(client.SendFragments(std::string(4000, 'x'), 40).ok());
    std::optional<int> code = client.WaitClosed();
    REQUIRE(code.has_value());
    CHECK(*code == 1009);
  }
}

// The closing handshake while the client is still sending: the server writes its close frame and
// a FIN, reads and drops what the client still sends, and never answers it with a reset (after
// which the client's writes fail, and a client that sees the reset before the close frame
// reports 1006, not the code).

// Sends `bytes` bytes of payload in 64 KiB writes; false as soon as one fails.
bool SendPayloadBytes(RawWs& client, size_t bytes) {
  const std::string chunk(64 * 1024, 'y');
  for (size_t sent = 0; sent < bytes; sent += chunk.size()) {
    if (!client.SendPayload(chunk.substr(0, std::min(chunk.size(), bytes - sent)))) return false;
  }
  return true;
}

TEST_CASE(
    "server runtime: a client still sending an oversized message after a pause reads close "
    "1009, then the end of the stream, never a reset") {
  ServerOptions options = BaseOptions();
  options.max_message_bytes = 64 * 1024;
  std::unique_ptr<Server> server = MustStart(std::move(options));
  auto alice = MustLogin(*server, "alice");
  RawWs client;
  REQUIRE(client.Connect(server->port(), 1 << 20));
  // The client stalls within the drain bound, which is 2 s in a session and 250 ms before Hello
  // succeeded (a client uploading more than max_hello_bytes before its Hello is not one that
  // deserves to hold its descriptor for long), and the message is sized so that its rest goes
  // through well within the bound too.
  std::chrono::milliseconds pause{0};
  size_t size = 0;
  SUBCASE("in a session: past max_message_bytes, drained for 2 s") {
    pause = std::chrono::milliseconds(300);
    size = 4 << 20;
    std::string hello;
    REQUIRE(HelloEnvelope("bob").SerializeToString(&hello));
    REQUIRE(client.SendBinary(hello));
    REQUIRE(client.ReadFrame().has_value());
  }
  SUBCASE("before Hello: past max_hello_bytes, drained for 250 ms") {
    pause = std::chrono::milliseconds(100);
    size = 256 * 1024;
  }
  // Refused at its start. The client sends the first 64 KiB, stalls (a slow uplink) while the
  // server's close frame arrives unread, then sends the rest; only then does it read. Every
  // write goes through: the server is draining, not resetting.
  REQUIRE(client.SendHeader(0x2, size));
  REQUIRE(SendPayloadBytes(client, 64 * 1024));
  std::this_thread::sleep_for(pause);
  CHECK(SendPayloadBytes(client, size - 64 * 1024));
  std::string reason;
  CHECK(client.ReadUntilClose(&reason) == std::optional<int>(1009));
  CHECK(reason == "message too large");
  // The server shut its side down after the close frame; the client answers, and the stream
  // ends with a FIN.
  CHECK(client.SendClose(1009));
  CHECK(client.ReadToEnd() == RawWs::End::kFin);
  // Meanwhile the others are served as usual.
  CHECK(alice->Barrier().has_value());
}

TEST_CASE(
    "server runtime: a client that never stops sending after its 1009 is dropped at the drain "
    "bound") {
  ServerOptions options = BaseOptions();
  options.max_message_bytes = 64 * 1024;
  std::unique_ptr<Server> server = MustStart(std::move(options));
  auto alice = MustLogin(*server, "alice");
  // Written in 64 KiB pieces as fast as the server drains them, the 16 MiB bound ends the drain;
  // in 1 KiB pieces 20 times a second, the 2 s bound does.
  size_t piece = 0;
  std::chrono::milliseconds pause{0};
  SUBCASE("fast: the byte bound") { piece = 64 * 1024; }
  SUBCASE("trickling: the time bound") {
    piece = 1024;
    pause = std::chrono::milliseconds(50);
  }
  RawWs client;
  REQUIRE(client.Connect(server->port(), 1 << 20));
  // A frame announcing 1 TiB, written until a write fails (bounded: 60 s).
  REQUIRE(client.SendHeader(0x2, uint64_t{1} << 40));
  std::atomic<bool> dropped{false};
  std::thread writer([&] {
    const std::string chunk(piece, 'z');
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < deadline) {
      if (!client.SendPayload(chunk)) {
        dropped = true;
        return;
      }
      std::this_thread::sleep_for(pause);
    }
  });
  // The close frame comes at once, not once the client stops (it never does), and a FIN after
  // it.
  CHECK(client.ReadUntilClose() == std::optional<int>(1009));
  CHECK(client.ReadToEnd() == RawWs::End::kFin);
  // Past the drain bound the server closes the socket, and the client's writes fail: the
  // connection is not kept for as long as the client goes on.
  writer.join();
  CHECK(dropped.load());
  CHECK(alice->Barrier().has_value());
}

TEST_CASE(
    "server runtime: a client still sending when the server closes it for a bad frame reads "
    "the close frame, then the end of the stream, never a reset") {
  std::unique_ptr<Server> server = MustStart(BaseOptions());
  RawWs client;
  REQUIRE(client.Connect(server->port(), 1 << 20));
  int expected = 0;
  SUBCASE("garbage: 1007") {
    expected = 1007;
    REQUIRE(client.SendBinary("\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"));
  }
  SUBCASE("a second Hello: 1008") {
    expected = 1008;
    std::string hello;
    REQUIRE(HelloEnvelope("alice").SerializeToString(&hello));
    REQUIRE(client.SendBinary(hello));
    std::optional<RawWs::Frame> welcome = client.ReadFrame();
    REQUIRE(welcome.has_value());
    REQUIRE(client.SendBinary(hello));
  }
  // The client goes on with a 1 MiB message after a moment, as a pipelining client would; the
  // server has closed the session meanwhile and drops it unread.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(client.SendHeader(0x2, 1 << 20));
  CHECK(SendPayloadBytes(client, 1 << 20));
  CHECK(client.ReadUntilClose() == std::optional<int>(expected));
  CHECK(client.SendClose(expected));
  CHECK(client.ReadToEnd() == RawWs::End::kFin);
}

// The first fragment of a message is over the bound (max_message_bytes 64 KiB): the server
// writes its close frame and ends its side of the stream. The client, uploading, sends a
// keepalive ping between two fragments (as a WebSocket client may), after the close frame has
// arrived (unread) and before it sends the rest (`rest` bytes, after `pause`). Every write goes
// through: the server is draining, not resetting. Only then does the client read: the close
// frame, with its code 1009 (the caller checks that nothing follows it: no pong).
void PingThroughClose(RawWs& client, std::chrono::milliseconds pause, size_t rest) {
  REQUIRE(client.SendHeader(0x2, 128 * 1024, /*final=*/false));
  REQUIRE(SendPayloadBytes(client, 128 * 1024));
  REQUIRE(client.WaitReadable(5000));  // the close frame is there (a pong may only follow it)
  REQUIRE(client.SendFrame(0x9, "keepalive"));
  std::this_thread::sleep_for(pause);
  CHECK(client.SendHeader(0x0, rest));
  CHECK(SendPayloadBytes(client, rest));
  std::optional<RawWs::Frame> close = client.ReadFrame();
  REQUIRE(close.has_value());
  CHECK(close->opcode == 0x8);
  REQUIRE(close->payload.size() >= 2);
  CHECK(((static_cast<unsigned char>(close->payload[0]) << 8) |
         static_cast<unsigned char>(close->payload[1])) == 1009);
}

TEST_CASE(
    "server runtime: a client that pings while its close is drained reads the close frame, "
    "then the end of the stream, never a pong after it nor a reset") {
  ServerOptions options = BaseOptions();
  options.max_message_bytes = 64 * 1024;
  std::unique_ptr<Server> server = MustStart(std::move(options));
  RawWs client;
  REQUIRE(client.Connect(server->port(), 1 << 20));
  // As above, the pause and the rest of the message fit well within the drain bound.
  std::chrono::milliseconds pause{0};
  size_t rest = 0;
  SUBCASE("in a session: drained for 2 s") {
    pause = std::chrono::milliseconds(200);
    rest = 4 << 20;
    std::string hello;
    REQUIRE(HelloEnvelope("bob").SerializeToString(&hello));
    REQUIRE(client.SendBinary(hello));
    REQUIRE(client.ReadFrame().has_value());
  }
  SUBCASE("before Hello: drained for 250 ms") {
    pause = std::chrono::milliseconds(60);
    rest = 256 * 1024;
  }
  PingThroughClose(client, pause, rest);
  CHECK(client.SendClose(1009));
  CHECK_FALSE(client.ReadFrame().has_value());
  CHECK(client.ReadToEnd() == RawWs::End::kFin);
}

TEST_CASE(
    "server runtime: over TLS, a client that pings while its close is drained reads the close "
    "frame and then the end of the stream, never a pong after it") {
  TempDir dir;
  REQUIRE(MakeSelfSignedCertificate(dir, "IP:127.0.0.1").ok());
  ServerOptions options = BaseOptions();
  options.max_message_bytes = 64 * 1024;
  options.tls_cert_path = dir.File("cert.pem");
  options.tls_key_path = dir.File("key.pem");
  std::unique_ptr<Server> server = MustStart(std::move(options));
  RawWs client;
  REQUIRE(client.ConnectTls(server->port(), 1 << 20));
  std::string hello;
  REQUIRE(HelloEnvelope("bob").SerializeToString(&hello));
  REQUIRE(client.SendBinary(hello));
  REQUIRE(client.ReadFrame().has_value());
  PingThroughClose(client, std::chrono::milliseconds(200), 256 * 1024);
  // Nothing after the close frame: no pong, only the end of the stream (TLS's close_notify, which
  // the server sent right after its close frame).
  std::optional<RawWs::Frame> after = client.ReadFrame();
  CHECK_MESSAGE(!after.has_value(), "a frame of opcode " << (after.has_value() ? after->opcode : -1)
                                                         << " after the close");
  CHECK(client.ReadToEnd() == RawWs::End::kFin);
  // The client answers with its close frame and its own close_notify at once, as a peer with
  // nothing more to send: the server reads both and closes its socket then (a FIN: all the
  // client sent was read), not at the drain's 2 s bound (which lws counts in whole seconds).
  const auto answered = std::chrono::steady_clock::now();
  CHECK(client.SendClose(1009));
  CHECK(client.SendCloseNotify());
  CHECK(client.WaitTcpEnd(5000) == RawWs::End::kFin);
  CHECK(std::chrono::steady_clock::now() - answered < std::chrono::milliseconds(1500));
}

TEST_CASE(
    "server runtime: a send behind a slow-consumer close, with the writer's queue full, does not "
    "let libwebsockets read the drain (the client still reads 4003, then the end of the stream)") {
  // Within one Batch the Pongs overflow max_outbound_bytes (the close begins) and the Send
  // after them finds the writer's queue full, which would pause the connection's reads; when the
  // writer catches up the pause must not be lifted, or libwebsockets would read alongside the
  // server's drain, from the middle of a frame, and close with a reset.
  ServerOptions options = BaseOptions();
  options.max_outbound_bytes = 200;
  options.writer_queue_max = 1;
  std::unique_ptr<Server> server = MustStart(std::move(options));
  RawWs client;
  REQUIRE(client.Connect(server->port(), 1 << 20));
  std::string hello;
  REQUIRE(HelloEnvelope("bob").SerializeToString(&hello));
  REQUIRE(client.SendBinary(hello));
  REQUIRE(client.ReadFrame().has_value());
  v1::Envelope batch;
  for (int i = 0; i < 30; ++i) *batch.mutable_batch()->add_envelopes() = MakePing(0, 100 + i);
  *batch.mutable_batch()->add_envelopes() = MakeSendToPeer("alice", NewClientMsgId(), "x", 200);
  std::string frame;
  REQUIRE(batch.SerializeToString(&frame));
  REQUIRE(client.SendBinary(frame));
  REQUIRE(client.WaitReadable(5000));
  // The writer has long caught up when the client, which has not read yet, uploads more, in
  // pieces, giving the loop many chances to read each (a reader in the middle of the frame would
  // take a payload byte for a header and close the connection).
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(client.SendHeader(0x2, 1 << 20));
  bool sent = true;
  for (int i = 0; i < 16 && sent; ++i) {
    sent = SendPayloadBytes(client, 64 * 1024);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(sent);
  std::optional<RawWs::Frame> close = client.ReadFrame();
  REQUIRE(close.has_value());
  CHECK(close->opcode == 0x8);
  REQUIRE(close->payload.size() >= 2);
  CHECK(((static_cast<unsigned char>(close->payload[0]) << 8) |
         static_cast<unsigned char>(close->payload[1])) == 4003);
  CHECK(client.SendClose(4003));
  CHECK_FALSE(client.ReadFrame().has_value());
  CHECK(client.ReadToEnd() == RawWs::End::kFin);
}

// Options under which alice, who reads nothing, becomes a slow consumer quickly.
ServerOptions SlowConsumerOptions() {
  ServerOptions options = BaseOptions();
  options.max_outbound_bytes = 256 * 1024;
  options.bytes_per_second = 1024 * 1024 * 1024;
  return options;
}

// alice logs in with a small receive window and then reads nothing.
void LoginWithoutReading(RawWs& alice, const Server& server) {
  REQUIRE(alice.Connect(server.port(), 4096));
  std::string hello;
  REQUIRE(HelloEnvelope("alice").SerializeToString(&hello));
  REQUIRE(alice.SendBinary(hello));
}

// bob sends alice `count` messages of 60,000 bytes, each acked.
void SendLargeToAlice(WsClient& bob, int count) {
  const std::string body(60'000, 'b');
  for (int i = 0; i < count; ++i) {
    std::optional<v1::Envelope> ack = bob.Request(MakeSendToPeer("alice", NewClientMsgId(), body));
    REQUIRE(ack.has_value());
    REQUIRE_MESSAGE(ack->has_send_ack(), ack->DebugString());
  }
}

TEST_CASE("server runtime: a client that does not read is closed as a slow consumer (4003)") {
  std::unique_ptr<Server> server = MustStart(SlowConsumerOptions());
  RawWs alice;
  LoginWithoutReading(alice, *server);
  // More than the kernel buffers on both sides can hold (tcp_wmem max is 4 MiB here), so
  // the server's queue for alice has to grow past its cap.
  auto bob = MustLogin(*server, "bob");
  SendLargeToAlice(*bob, 120);
  std::optional<int> code = alice.ReadUntilClose();
  REQUIRE(code.has_value());
  CHECK(*code == 4003);
  // Bob, who reads, is still served.
  CHECK(bob->Barrier().has_value());
}

TEST_CASE(
    "server runtime: a flood of tiny envelopes is bounded by max_outbound_bytes with each "
    "envelope's queue slot counted (4003)") {
  // A Batch of 256 Pings is answered with 256 Pongs, queued one by one while the Hub handles
  // the Batch and written together at the end of the loop iteration: no timing involved. A
  // Pong is about a dozen bytes, so 256 of them hold about 3 KiB; with the 16 bytes of each
  // one's queue slot (on a 64-bit platform) they cost about 7 KiB. Under a 5,000-byte bound the
  // bytes alone would fit.
  v1::Envelope batch;
  for (int i = 0; i < 256; ++i) *batch.mutable_batch()->add_envelopes() = MakePing(0, 1000 + i);
  v1::Envelope pong;
  pong.set_rid(1255);
  pong.mutable_pong()->set_server_time_ms(NowMs());
  REQUIRE(256 * pong.ByteSizeLong() < 4000);
  ServerOptions options = BaseOptions();
  options.max_outbound_bytes = 5000;

  SUBCASE("the bound closes the flood with 4003") {
    std::unique_ptr<Server> server = MustStart(std::move(options));
    auto bob = MustLogin(*server, "bob");
    REQUIRE(bob->SendEnvelope(batch).ok());
    CHECK(bob->WaitClosed() == std::optional<int>(4003));
    CHECK(bob->close_reason() == "slow consumer");
  }
  SUBCASE("under a bound with room for the slots every Ping gets its Pong") {
    options.max_outbound_bytes = 256 * (pong.ByteSizeLong() + 2 * sizeof(void*)) + 4096;
    std::unique_ptr<Server> server = MustStart(std::move(options));
    auto bob = MustLogin(*server, "bob");
    REQUIRE(bob->SendEnvelope(batch).ok());
    for (int i = 0; i < 256; ++i) {
      std::optional<v1::Envelope> reply = bob->WaitForRid(1000 + i);
      REQUIRE(reply.has_value());
      CHECK_MESSAGE(reply->has_pong(), reply->DebugString());
    }
  }
}

TEST_CASE("server runtime: a slow consumer's user goes offline when its close begins") {
  ServerOptions options = SlowConsumerOptions();
  options.presence_grace_ms = 0;
  options.presence_coalesce_ms = 100;
  std::unique_ptr<Server> server = MustStart(std::move(options));
  RawWs alice;
  LoginWithoutReading(alice, *server);
  auto bob = MustLogin(*server, "bob");
  SendLargeToAlice(*bob, 1);  // a conversation with alice, so bob may watch her
  v1::Envelope subscribe;
  subscribe.mutable_presence_subscribe()->add_users("alice");
  std::optional<v1::Envelope> subscribed = bob->Request(subscribe);
  REQUIRE(subscribed.has_value());
  REQUIRE_MESSAGE(subscribed->has_ok(), subscribed->DebugString());
  std::optional<v1::Envelope> online = bob->WaitFor(
      [](const v1::Envelope& e) { return e.has_presence_update() && e.presence_update().online(); },
      0);
  REQUIRE(online.has_value());

  SendLargeToAlice(*bob, 120);
  // alice reads nothing, so her connection lasts until the server gives up flushing it (5 s
  // after the close began); she is offline well before that.
  std::optional<v1::Envelope> offline = bob->WaitFor(
      [](const v1::Envelope& e) {
        return e.has_presence_update() && !e.presence_update().online();
      },
      3000);
  REQUIRE_MESSAGE(offline.has_value(), "alice still online after her close began");
  CHECK(offline->presence_update().devices() == 0);
  std::optional<int> code = alice.ReadUntilClose();
  REQUIRE(code.has_value());
  CHECK(*code == 4003);
}

TEST_CASE("server runtime: while the writer queue is full, new connections get UNAVAILABLE") {
  auto store = std::make_shared<GatedStore>();
  ServerOptions options = BaseOptions(store);
  options.writer_queue_max = 1;
  std::unique_ptr<Server> server = MustStart(std::move(options));
  auto alice = MustLogin(*server, "alice");
  REQUIRE(alice->SendEnvelope(MakeSendToPeer("bob", NewClientMsgId(), "held", 7)).ok());
  REQUIRE(store->WaitEntered());

  CheckRefused(server->port());

  store->Open();
  std::optional<v1::Envelope> ack = alice->WaitForRid(7);
  REQUIRE(ack.has_value());
  CHECK(ack->has_send_ack());
}

TEST_CASE("server runtime: under load a commit waits commit_delay_ms for a fuller group") {
  auto store = std::make_shared<GatedStore>();
  ServerOptions options = BaseOptions(store);
  options.commit_delay_ms = 1000;  // far longer than the test takes to send the fourth message
  options.commit_delay_min_batch = 1;
  options.commit_batch_max = 3;
  std::unique_ptr<Server> server = MustStart(std::move(options));
  auto alice = MustLogin(*server, "alice");
  REQUIRE(alice->SendEnvelope(MakeSendToPeer("bob", NewClientMsgId(), "one", 1)).ok());
  REQUIRE(store->WaitEntered());
  // Two more queue up while the first is being committed: the load.
  REQUIRE(alice->SendEnvelope(MakeSendToPeer("bob", NewClientMsgId(), "two", 2)).ok());
  REQUIRE(alice->SendEnvelope(MakeSendToPeer("bob", NewClientMsgId(), "three", 3)).ok());
  REQUIRE(alice->Barrier().has_value());  // both handed to the writer (before the pong)
  store->Open();
  REQUIRE(alice->WaitForRid(1).has_value());
  // Two and three wait for company; the fourth fills the group of commit_batch_max.
  REQUIRE(alice->SendEnvelope(MakeSendToPeer("bob", NewClientMsgId(), "four", 4)).ok());
  for (uint64_t rid = 2; rid <= 4; ++rid) {
    std::optional<v1::Envelope> ack = alice->WaitForRid(rid);
    REQUIRE(ack.has_value());
    CHECK(ack->has_send_ack());
  }
  CHECK(store->batch_sizes() == std::vector<size_t>{1, 3});
}

TEST_CASE("server runtime: Shutdown acks the message being committed, then closes with 1001") {
  auto store = std::make_shared<GatedStore>();
  std::unique_ptr<Server> server = MustStart(BaseOptions(store));
  auto alice = MustLogin(*server, "alice");
  const std::string id = NewClientMsgId();
  REQUIRE(alice->SendEnvelope(MakeSendToPeer("bob", id, "in flight", 9)).ok());
  REQUIRE(store->WaitEntered());

  std::thread stopper([&] { server->Shutdown(); });
  store->Open();
  stopper.join();

  std::optional<v1::Envelope> ack = alice->WaitForRid(9);
  REQUIRE(ack.has_value());
  REQUIRE_MESSAGE(ack->has_send_ack(), ack->DebugString());
  CHECK(ack->send_ack().client_msg_id() == id);
  CHECK(ack->send_ack().seq() == 1);
  std::optional<int> code = alice->WaitClosed();
  REQUIRE(code.has_value());
  CHECK(*code == 1001);
}

TEST_CASE(
    "server runtime: with PoolConnectionMemory, more connections than one slab holds come, talk "
    "and go, twice") {
  // Process-wide from here on, so the tests after this one run on it too (in whatever order they
  // run: blocks lws allocated before it go back to malloc, as the pool's realloc frees what it
  // does not own). Calling it again changes nothing.
  PoolConnectionMemory();
  PoolConnectionMemory();
  std::unique_ptr<Server> server = MustStart(BaseOptions());
  constexpr int kClients = 80;  // a 64 KiB slab holds 68 slots of 960 bytes
  for (int round = 0; round < 2; ++round) {
    std::vector<std::unique_ptr<WsClient>> clients;
    for (int i = 0; i < kClients; ++i) {
      clients.push_back(MustLogin(*server, "user" + std::to_string(i)));
    }
    const std::string body = "round " + std::to_string(round);
    REQUIRE(
        clients.front()->SendEnvelope(MakeSendToPeer("user79", NewClientMsgId(), body, 7)).ok());
    std::optional<v1::Envelope> ack = clients.front()->WaitForRid(7);
    REQUIRE(ack.has_value());
    REQUIRE_MESSAGE(ack->has_send_ack(), ack->DebugString());
    std::optional<v1::Envelope> delivered =
        clients.back()->WaitFor([](const v1::Envelope& e) { return e.has_deliver(); });
    REQUIRE(delivered.has_value());
    CHECK(delivered->deliver().message().body() == body);
    for (auto& client : clients) REQUIRE(client->Close().ok());
  }
  server->Shutdown();
}

}  // namespace
}  // namespace chat::testing
