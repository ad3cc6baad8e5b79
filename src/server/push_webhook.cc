// NewWebhookNotifier: POSTs push notifications as JSON over HTTP or HTTPS from one thread, with
// libcurl.
//
// One connection per notification, and only the response's status is read: the transfer stops
// at the end of the final header block. Every attempt is bounded as a whole by timeout_ms, the
// name lookup included (libcurl's threaded resolver, which the attempt does not wait for once
// its time is up). Notifications still queued when the notifier is destroyed are dropped, and
// the attempt in flight is abandoned, so shutdown never waits on a slow receiver or resolver.
#include <curl/curl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>

#include "chat/log.h"
#include "chat/push.h"
#include "chat/status.h"
#include "src/core/threads.h"

// CURLOPT_QUICK_EXIT (7.87.0) keeps a timed-out name lookup from being waited for.
#if LIBCURL_VERSION_NUM < 0x075700
#error "the push webhook needs libcurl 7.87.0 or newer"
#endif

namespace chat {
namespace {

// True if `s` has a byte that may not appear unescaped in a URL's host or request target
// (controls, space, DEL, and beyond ASCII).
bool HasUnsafeUrlBytes(std::string_view s) {
  return std::any_of(s.begin(), s.end(), [](char c) {
    const auto b = static_cast<unsigned char>(c);
    return b <= 0x20 || b >= 0x7f;
  });
}

// Checks `url` and returns what libcurl is given: the URL without its fragment (never sent),
// with "/" before a query that has no path.
Result<std::string> ParseWebhookUrl(std::string_view url) {
  std::string_view scheme;
  for (std::string_view candidate : {"http://", "https://"}) {
    if (url.starts_with(candidate)) scheme = candidate;
  }
  if (scheme.empty()) return InvalidArgument("webhook url must start with http:// or https://");
  url.remove_prefix(scheme.size());
  url = url.substr(0, url.find('#'));
  const size_t end = url.find_first_of("/?");
  std::string_view authority = url.substr(0, end);
  std::string path = "/";
  if (end != std::string_view::npos) {
    path.assign(url[end] == '?' ? "/" : "");
    path.append(url.substr(end));
  }
  const size_t colon = authority.rfind(':');
  std::string_view host = authority;
  if (colon != std::string_view::npos) {
    std::string_view port = authority.substr(colon + 1);
    if (port.empty() || port.size() > 5 ||
        port.find_first_not_of("0123456789") != std::string_view::npos ||
        std::stoi(std::string(port)) < 1 || std::stoi(std::string(port)) > 65535) {
      return InvalidArgument("webhook url has an invalid port (1..65535)");
    }
    host = authority.substr(0, colon);
  }
  if (host.empty()) return InvalidArgument("webhook url has no host");
  // No user info and no IPv6 literal. Controls and spaces are refused here, not left to
  // libcurl, since they could inject header lines.
  if (host.find_first_of("@[]") != std::string_view::npos || HasUnsafeUrlBytes(authority) ||
      HasUnsafeUrlBytes(path)) {
    return InvalidArgument("webhook url has invalid characters");
  }
  std::string out(scheme);
  out.append(authority);
  out.append(path);
  // What libcurl itself would refuse at every attempt (a second port, host name characters it
  // does not take) is refused here, once.
  std::unique_ptr<CURLU, decltype(&curl_url_cleanup)> parsed(curl_url(), &curl_url_cleanup);
  if (parsed == nullptr) return Internal("webhook: cannot set up libcurl");
  if (CURLUcode code = curl_url_set(parsed.get(), CURLUPART_URL, out.c_str(), 0);
      code != CURLUE_OK) {
    return InvalidArgument(std::string("webhook url is not valid: ") + curl_url_strerror(code));
  }
  return out;
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

// libcurl's global state is set up once per process and never torn down: the application may
// still use libcurl (or OpenSSL through it) after the last notifier is gone.
Status InitCurl() {
  static const CURLcode code = curl_global_init(CURL_GLOBAL_DEFAULT);
  if (code != CURLE_OK) {
    return Internal(std::string("webhook: curl_global_init failed: ") + curl_easy_strerror(code));
  }
  return Status::Ok();
}

struct EasyDeleter {
  void operator()(CURL* easy) const { curl_easy_cleanup(easy); }
};
struct MultiDeleter {
  void operator()(CURLM* multi) const { curl_multi_cleanup(multi); }
};
struct SlistDeleter {
  void operator()(curl_slist* list) const { curl_slist_free_all(list); }
};
using EasyHandle = std::unique_ptr<CURL, EasyDeleter>;
using MultiHandle = std::unique_ptr<CURLM, MultiDeleter>;
using HeaderList = std::unique_ptr<curl_slist, SlistDeleter>;

// How long one wait inside an attempt may last before the stop flag is looked at again (libcurl
// ends it earlier when its own timers are due). A stop wakes the wait at once
// (curl_multi_wakeup); this only bounds a wake-up that was missed.
constexpr int kPollMs = 60'000;

class WebhookNotifier final : public PushNotifier {
 public:
  // Sets up the transfer that every attempt reuses. Internal if libcurl cannot.
  static Result<std::shared_ptr<PushNotifier>> Make(WebhookOptions options, std::string url) {
    Status init = InitCurl();
    if (!init.ok()) return init;
    auto notifier = std::shared_ptr<WebhookNotifier>(new WebhookNotifier(std::move(options)));
    Status configured = notifier->Configure(url);
    if (!configured.ok()) return configured;
    notifier->Start();
    return std::shared_ptr<PushNotifier>(std::move(notifier));
  }

  ~WebhookNotifier() override {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    // Ends the wait of an attempt in flight; the attempt is then abandoned.
    if (multi_ != nullptr) curl_multi_wakeup(multi_.get());
    if (thread_.joinable()) thread_.join();
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
  explicit WebhookNotifier(WebhookOptions options) : options_(std::move(options)) {}

  Status Configure(const std::string& url) {
    multi_.reset(curl_multi_init());
    easy_.reset(curl_easy_init());
    HeaderList headers(curl_slist_append(nullptr, "Content-Type: application/json"));
    // libcurl would otherwise make a body over 1 MiB wait for "100 Continue", up to a second.
    curl_slist* more = headers ? curl_slist_append(headers.get(), "Expect:") : nullptr;
    if (multi_ == nullptr || easy_ == nullptr || more == nullptr) {
      return Internal("webhook: cannot set up libcurl");
    }
    headers_ = std::move(headers);
    CURL* e = easy_.get();
    const auto timeout = static_cast<long>(options_.timeout_ms);
    bool ok = true;
    const auto set = [&](CURLcode code) { ok = ok && code == CURLE_OK; };
    set(curl_easy_setopt(e, CURLOPT_URL, url.c_str()));
    set(curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https"));
    set(curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L));
    // The receiver is reached directly, whatever http_proxy and the like say.
    set(curl_easy_setopt(e, CURLOPT_PROXY, ""));
    set(curl_easy_setopt(e, CURLOPT_HTTPHEADER, headers_.get()));
    // Each attempt as a whole, and its connecting part (lookup, TCP, TLS) too.
    set(curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout));
    set(curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, timeout));
    // Timeouts without SIGALRM: the process's signals belong to the application.
    set(curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L));
    // An attempt that timed out or was abandoned during the name lookup leaves the resolver
    // thread behind (it ends when the system resolver answers) instead of waiting for it.
    set(curl_easy_setopt(e, CURLOPT_QUICK_EXIT, 1L));
    // One connection per notification, as a receiver that answers and closes expects.
    set(curl_easy_setopt(e, CURLOPT_FORBID_REUSE, 1L));
    set(curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L));
    set(curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L));
    if (!options_.ca_file.empty()) {
      // These CAs instead of the system's, not in addition to them.
      set(curl_easy_setopt(e, CURLOPT_CAINFO, options_.ca_file.c_str()));
      set(curl_easy_setopt(e, CURLOPT_CAPATH, static_cast<char*>(nullptr)));
      // Read at every attempt: libcurl would otherwise keep the file's CAs for a day, and a
      // receiver's renewed certificate would fail until then.
      set(curl_easy_setopt(e, CURLOPT_CA_CACHE_TIMEOUT, 0L));
    }
    set(curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, &WebhookNotifier::OnHeader));
    set(curl_easy_setopt(e, CURLOPT_HEADERDATA, this));
    set(curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, &WebhookNotifier::OnBody));
    set(curl_easy_setopt(e, CURLOPT_ERRORBUFFER, error_buffer_));
    if (!ok) return Internal("webhook: libcurl refused an option");
    return Status::Ok();
  }

  void Start() {
    // The notifier may be made before the application blocks its signals. libcurl's resolver
    // threads, started from this one, inherit its mask.
    thread_ = StartThreadWithSignalsBlocked("chat-push", [this] { Run(); });
  }

  // Called with each header line of the response, the blank line that ends a block included.
  static size_t OnHeader(char* data, size_t size, size_t count, void* user) {
    auto* self = static_cast<WebhookNotifier*>(user);
    const size_t n = size * count;
    const std::string_view line(data, n);
    if (line != "\r\n" && line != "\n") return n;
    long code = 0;
    curl_easy_getinfo(self->easy_.get(), CURLINFO_RESPONSE_CODE, &code);
    // An interim 1xx answer: the final one follows.
    if (code < 200) return n;
    self->status_ = code;
    // The status is all that is needed: stop before the body (libcurl reports a write error).
    return 0;
  }

  // Not reached, since OnHeader stops first; without it libcurl would copy a body to stdout.
  static size_t OnBody(char*, size_t, size_t, void*) { return 0; }

  // One POST. Returns the HTTP status, or 0 on a network error, a timeout or a stop, with the
  // reason in `error`.
  long PostOnce(const std::string& body, std::string& error) {
    CURL* e = easy_.get();
    CURLM* m = multi_.get();
    status_ = 0;
    error_buffer_[0] = '\0';
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, body.c_str());
    CURLMcode multi_code = curl_multi_add_handle(m, e);
    if (multi_code != CURLM_OK) {
      error = curl_multi_strerror(multi_code);
      return 0;
    }
    bool done = false;
    CURLcode result = CURLE_OK;
    for (;;) {
      int running = 0;
      multi_code = curl_multi_perform(m, &running);
      int left = 0;
      while (CURLMsg* message = curl_multi_info_read(m, &left)) {
        if (message->msg == CURLMSG_DONE) {
          done = true;
          result = message->data.result;
        }
      }
      if (done || multi_code != CURLM_OK || running == 0) break;
      if (stopping_) break;
      multi_code = curl_multi_poll(m, nullptr, 0, kPollMs, nullptr);
      if (multi_code != CURLM_OK) break;
    }
    curl_multi_remove_handle(m, e);
    if (status_ != 0) return status_;
    if (done && result == CURLE_OK) {
      long code = 0;
      curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &code);
      if (code != 0) return code;
    }
    if (done) {
      error = error_buffer_[0] != '\0' ? error_buffer_ : curl_easy_strerror(result);
    } else if (multi_code != CURLM_OK) {
      error = curl_multi_strerror(multi_code);
    } else {
      error = "stopped";
    }
    return 0;
  }

  void Run() {
    std::unique_lock lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      PushNotification notification = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      const std::string body = ToJson(notification);
      uint32_t backoff_ms = options_.backoff_ms;
      for (uint32_t attempt = 0;; ++attempt) {
        std::string error;
        const long status = PostOnce(body, error);
        if (stopping_) return;
        if (status >= 200 && status < 500) {
          if (status >= 300) {
            Log(LogLevel::kWarn,
                "chat: push webhook refused a notification with HTTP " + std::to_string(status));
          }
          break;
        }
        const std::string reason = status != 0 ? "HTTP " + std::to_string(status) : error;
        if (attempt >= options_.max_retries) {
          Log(LogLevel::kWarn, "chat: push webhook failed (" + reason + "); gave up after " +
                                   std::to_string(attempt + 1) +
                                   (attempt == 0 ? " attempt" : " attempts"));
          break;
        }
        Log(LogLevel::kDebug, "chat: push webhook failed (" + reason + "); retrying in " +
                                  std::to_string(backoff_ms) + " ms");
        lock.lock();
        // The wait ends early on shutdown.
        wake_.wait_for(lock, std::chrono::milliseconds(backoff_ms),
                       [this] { return stopping_.load(); });
        if (stopping_) return;
        lock.unlock();
        backoff_ms = backoff_ms > UINT32_MAX / 2 ? UINT32_MAX : backoff_ms * 2;
      }
      lock.lock();
    }
  }

  const WebhookOptions options_;
  // Used by the notifier's thread only, except curl_multi_wakeup (any thread).
  MultiHandle multi_;
  EasyHandle easy_;
  HeaderList headers_;  // referenced by easy_
  char error_buffer_[CURL_ERROR_SIZE] = {};
  long status_ = 0;  // of the attempt in flight, once its final header block ended

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<PushNotification> queue_;  // at most options_.max_queue
  uint64_t dropped_ = 0;
  // Written under mutex_ (for wake_); read without it during an attempt.
  std::atomic<bool> stopping_ = false;
  // Declared last: started once everything it uses exists.
  std::thread thread_;
};

bool Readable(const std::string& path) {
  std::error_code error;
  return std::filesystem::is_regular_file(path, error) && std::ifstream(path).good();
}

}  // namespace

Result<std::shared_ptr<PushNotifier>> NewWebhookNotifier(WebhookOptions options) {
  Result<std::string> url = ParseWebhookUrl(options.url);
  if (!url.ok()) return url.status();
  if (options.timeout_ms == 0) return InvalidArgument("webhook timeout_ms must be positive");
  if (options.max_queue == 0) return InvalidArgument("webhook max_queue must be positive");
  if (!options.ca_file.empty() && !Readable(options.ca_file)) {
    return InvalidArgument("webhook ca_file cannot be read: " + options.ca_file);
  }
  return WebhookNotifier::Make(std::move(options), std::move(*url));
}

}  // namespace chat
