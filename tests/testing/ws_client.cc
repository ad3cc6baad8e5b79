#include "tests/testing/ws_client.h"

#include <arpa/inet.h>
#include <libwebsockets.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include "google/protobuf/util/json_util.h"

namespace chat::testing {
namespace {

// A test client never needs more; anything larger is a server bug worth noticing.
constexpr size_t kMaxRxMessageBytes = 64 * 1024 * 1024;

struct ParsedUrl {
  bool tls = false;
  std::string host;
  int port = 0;
  std::string path;
};

bool ParseUrl(const std::string& url, ParsedUrl* out) {
  std::string rest;
  if (url.rfind("ws://", 0) == 0) {
    rest = url.substr(5);
  } else if (url.rfind("wss://", 0) == 0) {
    out->tls = true;
    rest = url.substr(6);
  } else {
    return false;
  }
  const size_t slash = rest.find('/');
  const std::string hostport = rest.substr(0, slash);
  out->path = slash == std::string::npos ? "/" : rest.substr(slash);
  const size_t colon = hostport.rfind(':');
  if (colon == std::string::npos) {
    out->host = hostport;
    out->port = out->tls ? 443 : 80;
  } else {
    out->host = hostport.substr(0, colon);
    out->port = std::atoi(hostport.c_str() + colon + 1);
  }
  return !out->host.empty() && out->port > 0 && out->port < 65536;
}

std::chrono::steady_clock::time_point Deadline(int timeout_ms) {
  return std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
}

}  // namespace

// Bridges lws's C callback (whose reason type is an lws enum) to the member function.
struct WsClientTrampoline {
  static int Callback(lws* wsi, lws_callback_reasons reason, void* /*user*/, void* in, size_t len) {
    lws_context* context = lws_get_context(wsi);
    auto* client = context == nullptr ? nullptr : static_cast<WsClient*>(lws_context_user(context));
    if (client == nullptr) return 0;
    return client->OnEvent(wsi, static_cast<int>(reason), in, len);
  }
};

namespace {

const lws_protocols kProtocols[] = {
    {"chat.v1", WsClientTrampoline::Callback, 0, 0, 0, nullptr, 0},
    {nullptr, nullptr, 0, 0, 0, nullptr, 0},
};

}  // namespace

WsClient::WsClient() = default;

WsClient::~WsClient() {
  if (context_ == nullptr) return;
  stop_.store(true);
  lws_cancel_service(context_);
  if (thread_.joinable()) thread_.join();
  // After the join no other thread touches the context; destroying it here closes the
  // connection (CLIENT_CLOSED runs on this thread).
  lws_context_destroy(context_);
  context_ = nullptr;
}

Status WsClient::Connect(const std::string& url, int timeout_ms) {
  if (context_ != nullptr) return FailedPrecondition("Connect called twice");
  ParsedUrl parsed;
  if (!ParseUrl(url, &parsed)) return InvalidArgument("bad url: " + url);

  static std::once_flag log_once;
  std::call_once(log_once, [] { lws_set_log_level(LLL_ERR, nullptr); });

  lws_context_creation_info info;
  std::memset(&info, 0, sizeof(info));
  info.port = CONTEXT_PORT_NO_LISTEN;
  info.protocols = kProtocols;
  info.user = this;
  info.gid = -1;
  info.uid = -1;
  info.fd_limit_per_thread = 64;
  // OpenSSL is set up only for wss: a plain context then allocates nothing of it.
  if (parsed.tls) info.options = LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
  context_ = lws_create_context(&info);
  if (context_ == nullptr) return Internal("lws_create_context failed");

  lws_client_connect_info ci;
  std::memset(&ci, 0, sizeof(ci));
  ci.context = context_;
  ci.address = parsed.host.c_str();
  ci.port = parsed.port;
  ci.path = parsed.path.c_str();
  ci.host = parsed.host.c_str();
  ci.origin = parsed.host.c_str();
  ci.protocol = "chat.v1";
  ci.local_protocol_name = "chat.v1";
  ci.ietf_version_or_minus_one = -1;
  ci.pwsi = &wsi_;
  ci.opaque_user_data = this;
  if (parsed.tls) {
    ci.ssl_connection = LCCSCF_USE_SSL | LCCSCF_ALLOW_SELFSIGNED |
                        LCCSCF_SKIP_SERVER_CERT_HOSTNAME_CHECK | LCCSCF_ALLOW_INSECURE;
  }
  // The service thread is not running yet, so this thread may call into lws. A connection
  // error may be reported re-entrantly from inside this call; OnEvent records it.
  lws_client_connect_via_info(&ci);
  thread_ = std::thread([this] {
    while (!stop_.load()) lws_service(context_, 0);
  });

  std::unique_lock<std::mutex> lock(mu_);
  const bool done = cv_.wait_until(lock, Deadline(timeout_ms),
                                   [this] { return connected_ || connect_failed_ || closed_; });
  if (!done) return DeadlineExceeded("WebSocket handshake timed out: " + url);
  if (!connected_) return Unavailable("cannot connect to " + url + ": " + connect_error_);
  return Status::Ok();
}

int WsClient::OnEvent(lws* wsi, int reason_int, void* in, size_t len) {
  const auto reason = static_cast<lws_callback_reasons>(reason_int);
  switch (reason) {
    case LWS_CALLBACK_CLIENT_ESTABLISHED: {
      wsi_ = wsi;
      std::lock_guard<std::mutex> lock(mu_);
      connected_ = true;
      if (!outbox_.empty()) lws_callback_on_writable(wsi);
      cv_.notify_all();
      return 0;
    }
    case LWS_CALLBACK_CLIENT_CONNECTION_ERROR: {
      wsi_ = nullptr;
      std::lock_guard<std::mutex> lock(mu_);
      connect_failed_ = true;
      connect_error_ = in != nullptr ? std::string(static_cast<const char*>(in), len) : "";
      if (connect_error_.find('\0') != std::string::npos) {
        connect_error_.resize(connect_error_.find('\0'));
      }
      closed_ = true;
      close_code_ = kClosedWithoutCode;
      cv_.notify_all();
      return 0;
    }
    case LWS_CALLBACK_EVENT_WAIT_CANCELLED: {
      std::lock_guard<std::mutex> lock(mu_);
      if (wsi_ != nullptr && connected_ && !outbox_.empty()) lws_callback_on_writable(wsi_);
      return 0;
    }
    case LWS_CALLBACK_CLIENT_WRITEABLE: {
      Outgoing item;
      bool more = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (outbox_.empty()) return 0;  // Spurious WRITEABLE after a buffered partial send.
        item = std::move(outbox_.front());
        outbox_.pop_front();
        more = !outbox_.empty();
      }
      if (item.close) {
        lws_close_reason(wsi, static_cast<lws_close_status>(item.close_code), nullptr, 0);
        return -1;
      }
      // lws masks the payload in place, so each write gets its own buffer.
      std::vector<unsigned char> buf(LWS_PRE + item.bytes.size());
      std::memcpy(buf.data() + LWS_PRE, item.bytes.data(), item.bytes.size());
      const int n = lws_write(wsi, buf.data() + LWS_PRE, item.bytes.size(),
                              static_cast<lws_write_protocol>(item.protocol));
      if (n < 0) return -1;
      if (more) lws_callback_on_writable(wsi);
      return 0;
    }
    case LWS_CALLBACK_CLIENT_RECEIVE: {
      if (rx_.empty()) rx_binary_ = lws_frame_is_binary(wsi) != 0;
      if (rx_.size() + len > kMaxRxMessageBytes) {
        std::lock_guard<std::mutex> lock(mu_);
        ++undecodable_frames_;
        return -1;
      }
      rx_.append(static_cast<const char*>(in), len);
      if (lws_is_final_fragment(wsi) && lws_remaining_packet_payload(wsi) == 0) {
        std::string message;
        message.swap(rx_);
        OnMessage(message, rx_binary_);
      }
      return 0;
    }
    case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE: {
      const auto* p = static_cast<const unsigned char*>(in);
      std::lock_guard<std::mutex> lock(mu_);
      if (p != nullptr && len >= 2) {
        close_code_ = (p[0] << 8) | p[1];
        close_reason_.assign(reinterpret_cast<const char*>(p) + 2, len - 2);
      }
      return 0;
    }
    case LWS_CALLBACK_CLIENT_CLOSED: {
      wsi_ = nullptr;
      MarkClosed(0);
      return 0;
    }
    default:
      return 0;
  }
}

void WsClient::MarkClosed(int code) {
  std::lock_guard<std::mutex> lock(mu_);
  if (close_code_ == 0) close_code_ = code != 0 ? code : kClosedWithoutCode;
  closed_ = true;
  cv_.notify_all();
}

void WsClient::OnMessage(const std::string& bytes, bool binary) {
  v1::Envelope envelope;
  bool ok = false;
  if (binary) {
    ok = envelope.ParseFromString(bytes);
  } else {
    ok = google::protobuf::util::JsonStringToMessage(bytes, &envelope).ok();
  }
  std::lock_guard<std::mutex> lock(mu_);
  ++(binary ? binary_frames_ : text_frames_);
  if (!ok) {
    ++undecodable_frames_;
    return;
  }
  if (envelope.has_batch()) {
    for (const v1::Envelope& inner : envelope.batch().envelopes()) inbox_.push_back(inner);
  } else {
    inbox_.push_back(std::move(envelope));
  }
  cv_.notify_all();
}

Status WsClient::Enqueue(std::vector<Outgoing> items) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!connected_) return FailedPrecondition("not connected");
    if (closed_) return FailedPrecondition("connection closed");
    for (Outgoing& item : items) outbox_.push_back(std::move(item));
  }
  lws_cancel_service(context_);
  return Status::Ok();
}

Status WsClient::SendEnvelope(const v1::Envelope& envelope, Wire wire) {
  if (wire == Wire::kBinary) return SendRaw(envelope.SerializeAsString(), true);
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(envelope, &json).ok()) {
    return Internal("cannot encode JSON");
  }
  return SendRaw(std::move(json), false);
}

Status WsClient::SendRaw(std::string bytes, bool binary) {
  std::vector<Outgoing> items(1);
  items[0].bytes = std::move(bytes);
  items[0].protocol = binary ? LWS_WRITE_BINARY : LWS_WRITE_TEXT;
  return Enqueue(std::move(items));
}

Status WsClient::SendRaw(std::vector<std::string> messages, bool binary) {
  std::vector<Outgoing> items(messages.size());
  for (size_t i = 0; i < messages.size(); ++i) {
    items[i].bytes = std::move(messages[i]);
    items[i].protocol = binary ? LWS_WRITE_BINARY : LWS_WRITE_TEXT;
  }
  return Enqueue(std::move(items));
}

Status WsClient::SendFragments(const std::string& bytes, int fragments, bool binary) {
  if (fragments < 1) return InvalidArgument("fragments must be >= 1");
  const size_t n = static_cast<size_t>(fragments);
  const size_t chunk = (bytes.size() + n - 1) / n;
  std::vector<Outgoing> items;
  for (size_t i = 0; i < n; ++i) {
    const size_t begin = std::min(bytes.size(), i * chunk);
    const size_t end = std::min(bytes.size(), begin + chunk);
    Outgoing item;
    item.bytes = bytes.substr(begin, end - begin);
    int protocol = i == 0 ? (binary ? LWS_WRITE_BINARY : LWS_WRITE_TEXT) : LWS_WRITE_CONTINUATION;
    if (i + 1 < n) protocol |= LWS_WRITE_NO_FIN;
    item.protocol = protocol;
    items.push_back(std::move(item));
  }
  return Enqueue(std::move(items));
}

Status WsClient::Close(int code) {
  std::vector<Outgoing> items(1);
  items[0].close = true;
  items[0].close_code = code;
  return Enqueue(std::move(items));
}

std::optional<v1::Envelope> WsClient::Next(int timeout_ms) {
  return WaitFor([](const v1::Envelope&) { return true; }, timeout_ms);
}

std::optional<v1::Envelope> WsClient::WaitFor(const std::function<bool(const v1::Envelope&)>& pred,
                                              int timeout_ms) {
  const auto deadline = Deadline(timeout_ms);
  std::unique_lock<std::mutex> lock(mu_);
  size_t scanned = 0;
  for (;;) {
    for (; scanned < inbox_.size(); ++scanned) {
      if (pred(inbox_[scanned])) {
        v1::Envelope out = std::move(inbox_[scanned]);
        inbox_.erase(inbox_.begin() + static_cast<std::ptrdiff_t>(scanned));
        return out;
      }
    }
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && scanned == inbox_.size()) {
      return std::nullopt;
    }
  }
}

std::optional<v1::Envelope> WsClient::WaitForRid(uint64_t rid, int timeout_ms) {
  return WaitFor([rid](const v1::Envelope& e) { return e.rid() == rid; }, timeout_ms);
}

std::vector<v1::Envelope> WsClient::Drain() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<v1::Envelope> out(std::make_move_iterator(inbox_.begin()),
                                std::make_move_iterator(inbox_.end()));
  inbox_.clear();
  return out;
}

std::optional<std::vector<v1::Envelope>> WsClient::Barrier(int timeout_ms) {
  const uint64_t rid = NextRid();
  v1::Envelope ping;
  ping.set_rid(rid);
  ping.mutable_ping()->set_client_time_ms(1);
  if (!SendEnvelope(ping).ok()) return std::nullopt;
  const auto deadline = Deadline(timeout_ms);
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    for (size_t i = 0; i < inbox_.size(); ++i) {
      if (inbox_[i].rid() == rid) {
        std::vector<v1::Envelope> before(
            std::make_move_iterator(inbox_.begin()),
            std::make_move_iterator(inbox_.begin() + static_cast<std::ptrdiff_t>(i)));
        inbox_.erase(inbox_.begin(), inbox_.begin() + static_cast<std::ptrdiff_t>(i) + 1);
        return before;
      }
    }
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) return std::nullopt;
  }
}

std::optional<int> WsClient::WaitClosed(int timeout_ms) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_until(lock, Deadline(timeout_ms), [this] { return closed_; })) {
    return std::nullopt;
  }
  return close_code_;
}

bool WsClient::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

std::string WsClient::close_reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return close_reason_;
}

std::optional<v1::Envelope> WsClient::Hello(const std::string& token, const std::string& device,
                                            Wire wire, int timeout_ms) {
  v1::Envelope hello;
  hello.set_rid(NextRid());
  hello.mutable_hello()->set_token(token);
  hello.mutable_hello()->set_device_id(device);
  hello.mutable_hello()->set_client_version("itest");
  hello.mutable_hello()->set_protocol_version(1);
  if (!SendEnvelope(hello, wire).ok()) return std::nullopt;
  return WaitForRid(hello.rid(), timeout_ms);
}

std::optional<v1::Envelope> WsClient::Request(v1::Envelope envelope, Wire wire, int timeout_ms) {
  if (envelope.rid() == 0) envelope.set_rid(NextRid());
  if (!SendEnvelope(envelope, wire).ok()) return std::nullopt;
  return WaitForRid(envelope.rid(), timeout_ms);
}

int WsClient::text_frames() const {
  std::lock_guard<std::mutex> lock(mu_);
  return text_frames_;
}

int WsClient::binary_frames() const {
  std::lock_guard<std::mutex> lock(mu_);
  return binary_frames_;
}

int WsClient::undecodable_frames() const {
  std::lock_guard<std::mutex> lock(mu_);
  return undecodable_frames_;
}

Result<HttpResponse> HttpGet(const std::string& host, uint16_t port, const std::string& path,
                             int timeout_ms) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Unavailable("socket failed");
  timeval tv;
  tv.tv_sec = timeout_ms / 1000;
  tv.tv_usec = (timeout_ms % 1000) * 1000;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr;
  std::memset(&addr, 0, sizeof(addr));
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    close(fd);
    return InvalidArgument("not an IPv4 literal: " + host);
  }
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return Unavailable("connect failed");
  }
  const std::string request = "GET " + path + " HTTP/1.1\r\nHost: " + host + ":" +
                              std::to_string(port) + "\r\nConnection: close\r\n\r\n";
  if (send(fd, request.data(), request.size(), MSG_NOSIGNAL) !=
      static_cast<ssize_t>(request.size())) {
    close(fd);
    return Unavailable("send failed");
  }
  std::string response;
  char buf[4096];
  for (;;) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n > 0) {
      response.append(buf, static_cast<size_t>(n));
      if (response.size() > (1u << 20)) break;
      continue;
    }
    if (n == 0) break;
    // A server that keeps the connection open despite "Connection: close" still answered.
    if (!response.empty()) break;
    close(fd);
    return DeadlineExceeded("no HTTP response");
  }
  close(fd);
  HttpResponse out;
  if (response.rfind("HTTP/1.", 0) != 0 || response.size() < 12) {
    return Unavailable("not an HTTP response: " + response.substr(0, 64));
  }
  out.status = std::atoi(response.c_str() + 9);
  const size_t body = response.find("\r\n\r\n");
  if (body != std::string::npos) out.body = response.substr(body + 4);
  return out;
}

}  // namespace chat::testing

// LeakSanitizer suppressions for every test binary that uses WsClient. A wss client context of
// libwebsockets 4.1.6 leaves what OpenSSL allocated for it (the loaded CA store, a few hundred
// KiB per context) unreleased after lws_context_destroy. Only allocations made inside OpenSSL
// are suppressed; the SDK's own leaks are still reported.
extern "C" __attribute__((visibility("default"), used)) const char* __lsan_default_suppressions() {
  return "leak:libcrypto.so\nleak:libssl.so\n";
}
