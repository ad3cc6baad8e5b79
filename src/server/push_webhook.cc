// NewWebhookNotifier: POSTs push notifications as JSON over plain HTTP/1.1 from one thread.
//
// The client is deliberately tiny: one connection per notification ("Connection: close"), only
// the status line of the response is read, and every socket step has the attempt's deadline.
// Notifications still queued when the notifier is destroyed are dropped, so shutdown never waits
// on a slow receiver for more than the attempt in flight.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include "chat/log.h"
#include "chat/push.h"
#include "chat/status.h"
#include "src/core/threads.h"

namespace chat {
namespace {

using SteadyClock = std::chrono::steady_clock;

struct ParsedUrl {
  std::string host;
  std::string port = "80";
  std::string path = "/";
};

// True if `s` has a byte that may not appear unescaped in a URL's host or request target
// (controls, space, DEL, and beyond ASCII).
bool HasUnsafeUrlBytes(std::string_view s) {
  return std::any_of(s.begin(), s.end(), [](char c) {
    const auto b = static_cast<unsigned char>(c);
    return b <= 0x20 || b >= 0x7f;
  });
}

Result<ParsedUrl> ParseHttpUrl(std::string_view url) {
  constexpr std::string_view kScheme = "http://";
  if (!url.starts_with(kScheme)) return InvalidArgument("webhook url must start with http://");
  url.remove_prefix(kScheme.size());
  // A fragment is never sent.
  url = url.substr(0, url.find('#'));
  ParsedUrl parsed;
  const size_t end = url.find_first_of("/?");
  std::string_view authority = url.substr(0, end);
  if (end != std::string_view::npos) {
    // "http://host?q" asks for "/?q".
    parsed.path.assign(url[end] == '?' ? "/" : "");
    parsed.path.append(url.substr(end));
  }
  const size_t colon = authority.rfind(':');
  if (colon != std::string_view::npos) {
    std::string_view port = authority.substr(colon + 1);
    if (port.empty() || port.size() > 5 ||
        port.find_first_not_of("0123456789") != std::string_view::npos ||
        std::stoi(std::string(port)) < 1 || std::stoi(std::string(port)) > 65535) {
      return InvalidArgument("webhook url has an invalid port (1..65535)");
    }
    parsed.port = std::string(port);
    authority = authority.substr(0, colon);
  }
  if (authority.empty()) return InvalidArgument("webhook url has no host");
  if (authority.find_first_of("@[]") != std::string_view::npos || HasUnsafeUrlBytes(authority) ||
      HasUnsafeUrlBytes(parsed.path)) {
    return InvalidArgument("webhook url has invalid characters");
  }
  parsed.host = std::string(authority);
  return parsed;
}

// Appends `bytes` as a JSON string. Invalid UTF-8 becomes U+FFFD, since message bodies are
// opaque bytes and JSON must be valid UTF-8.
void AppendJsonString(std::string& out, std::string_view bytes) {
  out.push_back('"');
  size_t i = 0;
  while (i < bytes.size()) {
    const auto c = static_cast<unsigned char>(bytes[i]);
    if (c < 0x80) {
      if (c == '"' || c == '\\') {
        out.push_back('\\');
        out.push_back(static_cast<char>(c));
      } else if (c < 0x20 || c == 0x7f) {
        char escaped[8];
        std::snprintf(escaped, sizeof(escaped), "\\u%04x", c);
        out += escaped;
      } else {
        out.push_back(static_cast<char>(c));
      }
      ++i;
      continue;
    }
    size_t length = 0;
    uint32_t min = 0;
    if ((c & 0xE0) == 0xC0) {
      length = 2;
      min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      length = 3;
      min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      length = 4;
      min = 0x10000;
    }
    bool valid = length != 0 && i + length <= bytes.size();
    uint32_t code = valid ? c & (0xFF >> (length + 1)) : 0;
    for (size_t k = 1; valid && k < length; ++k) {
      const auto next = static_cast<unsigned char>(bytes[i + k]);
      valid = (next & 0xC0) == 0x80;
      code = (code << 6) | (next & 0x3F);
    }
    valid = valid && code >= min && code <= 0x10FFFF && (code < 0xD800 || code > 0xDFFF);
    if (valid) {
      out.append(bytes.substr(i, length));
      i += length;
    } else {
      out += "\\ufffd";
      ++i;
    }
  }
  out.push_back('"');
}

// 64-bit integers are strings, as in the protocol's JSON mapping, so JavaScript keeps them exact.
void AppendField(std::string& out, std::string_view name, std::string_view value) {
  if (out.size() > 1) out.push_back(',');
  AppendJsonString(out, name);
  out.push_back(':');
  AppendJsonString(out, value);
}

std::string ToJson(const PushNotification& n) {
  std::string out = "{";
  AppendField(out, "user", n.user);
  AppendField(out, "conversation_id", std::to_string(n.conversation_id));
  AppendField(out, "sender", n.sender);
  AppendField(out, "seq", std::to_string(n.seq));
  AppendField(out, "server_time_ms", std::to_string(n.server_time_ms));
  AppendField(out, "preview", n.preview);
  out += ",\"collapsed\":" + std::to_string(n.collapsed);
  AppendField(out, "unread_total", std::to_string(n.unread_total));
  out += ",\"tokens\":[";
  for (size_t i = 0; i < n.tokens.size(); ++i) {
    if (i != 0) out.push_back(',');
    std::string token = "{";
    AppendField(token, "device", n.tokens[i].device);
    AppendField(token, "platform", n.tokens[i].platform);
    AppendField(token, "token", n.tokens[i].token);
    out += token + "}";
  }
  out += "]}";
  return out;
}

class Socket {
 public:
  explicit Socket(int fd) : fd_(fd) {}
  ~Socket() {
    if (fd_ >= 0) close(fd_);
  }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  int fd() const { return fd_; }

 private:
  int fd_;
};

int RemainingMs(SteadyClock::time_point deadline) {
  const auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - SteadyClock::now());
  return left.count() > 0 ? static_cast<int>(left.count()) : 0;
}

// Waits until `fd` is ready for `events` or the deadline passes.
bool WaitFor(int fd, short events, SteadyClock::time_point deadline) {
  for (;;) {
    const int timeout = RemainingMs(deadline);
    if (timeout == 0) return false;
    pollfd p{fd, events, 0};
    const int n = poll(&p, 1, timeout);
    if (n > 0) return true;
    if (n == 0 || errno != EINTR) return false;
  }
}

// One POST. Returns the HTTP status, or 0 on a network error or timeout.
int PostOnce(const ParsedUrl& url, const std::string& request, uint32_t timeout_ms) {
  const auto deadline = SteadyClock::now() + std::chrono::milliseconds(timeout_ms);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* addresses = nullptr;
  if (getaddrinfo(url.host.c_str(), url.port.c_str(), &hints, &addresses) != 0) return 0;
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> guard(addresses, &freeaddrinfo);

  for (addrinfo* a = addresses; a != nullptr; a = a->ai_next) {
    Socket socket(
        ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol));
    if (socket.fd() < 0) continue;
    if (connect(socket.fd(), a->ai_addr, a->ai_addrlen) != 0) {
      if (errno != EINPROGRESS || !WaitFor(socket.fd(), POLLOUT, deadline)) continue;
      int error = 0;
      socklen_t length = sizeof(error);
      if (getsockopt(socket.fd(), SOL_SOCKET, SO_ERROR, &error, &length) != 0 || error != 0) {
        continue;
      }
    }
    size_t sent = 0;
    while (sent < request.size()) {
      if (!WaitFor(socket.fd(), POLLOUT, deadline)) return 0;
      const ssize_t n =
          send(socket.fd(), request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (n <= 0) return 0;
      sent += static_cast<size_t>(n);
    }
    // Only the status line matters: "HTTP/1.x NNN ...".
    std::string response;
    while (response.find("\r\n") == std::string::npos && response.size() < 1024) {
      if (!WaitFor(socket.fd(), POLLIN, deadline)) return 0;
      char buffer[512];
      const ssize_t n = recv(socket.fd(), buffer, sizeof(buffer), 0);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (n <= 0) break;
      response.append(buffer, static_cast<size_t>(n));
    }
    if (!response.starts_with("HTTP/1.") || response.size() < 12 || response[8] != ' ') return 0;
    int status = 0;
    for (size_t i = 9; i < 12; ++i) {
      if (response[i] < '0' || response[i] > '9') return 0;
      status = status * 10 + (response[i] - '0');
    }
    return status;
  }
  return 0;
}

class WebhookNotifier final : public PushNotifier {
 public:
  WebhookNotifier(WebhookOptions options, ParsedUrl url)
      : options_(std::move(options)), url_(std::move(url)) {
    // The notifier may be made before the application blocks its signals.
    thread_ = StartThreadWithSignalsBlocked("chat-push", [this] { Run(); });
  }

  ~WebhookNotifier() override {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }

  void Notify(PushNotification notification) override {
    {
      std::lock_guard lock(mutex_);
      if (queue_.size() >= options_.max_queue) {
        ++dropped_;
        // Logged once per power of two so a dead receiver cannot flood the log.
        if ((dropped_ & (dropped_ - 1)) == 0) {
          Log(LogLevel::kWarn, "chat: push webhook queue full; dropped " +
                                   std::to_string(dropped_) + " notifications");
        }
        return;
      }
      queue_.push_back(std::move(notification));
    }
    wake_.notify_one();
  }

 private:
  void Run() {
    std::unique_lock lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      PushNotification notification = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      const std::string body = ToJson(notification);
      const std::string request =
          "POST " + url_.path + " HTTP/1.1\r\nHost: " + url_.host +
          (url_.port == "80" ? "" : ":" + url_.port) +
          "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
          "\r\nConnection: close\r\n\r\n" + body;
      lock.lock();
      uint32_t backoff_ms = options_.backoff_ms;
      for (uint32_t attempt = 0;; ++attempt) {
        lock.unlock();
        const int status = PostOnce(url_, request, options_.timeout_ms);
        lock.lock();
        if (status >= 200 && status < 500) {
          if (status >= 300) {
            Log(LogLevel::kWarn,
                "chat: push webhook refused a notification with HTTP " + std::to_string(status));
          }
          break;
        }
        if (attempt >= options_.max_retries || stopping_) {
          Log(LogLevel::kWarn, "chat: push webhook failed (HTTP " + std::to_string(status) +
                                   ", 0 = network error); gave up");
          break;
        }
        // The wait ends early on shutdown.
        wake_.wait_for(lock, std::chrono::milliseconds(backoff_ms), [this] { return stopping_; });
        if (stopping_) return;
        backoff_ms = backoff_ms > UINT32_MAX / 2 ? UINT32_MAX : backoff_ms * 2;
      }
    }
  }

  const WebhookOptions options_;
  const ParsedUrl url_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<PushNotification> queue_;  // at most options_.max_queue
  uint64_t dropped_ = 0;
  bool stopping_ = false;
  // Declared last: started once everything it uses exists.
  std::thread thread_;
};

}  // namespace

Result<std::shared_ptr<PushNotifier>> NewWebhookNotifier(WebhookOptions options) {
  Result<ParsedUrl> url = ParseHttpUrl(options.url);
  if (!url.ok()) return url.status();
  if (options.timeout_ms == 0) return InvalidArgument("webhook timeout_ms must be positive");
  if (options.max_queue == 0) return InvalidArgument("webhook max_queue must be positive");
  return std::shared_ptr<PushNotifier>(
      std::make_shared<WebhookNotifier>(std::move(options), std::move(*url)));
}

}  // namespace chat
