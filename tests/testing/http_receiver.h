// A loopback HTTP/1.1 receiver for webhook tests: accepts on 127.0.0.1 on a free port, over
// plain TCP or TLS, answers each request with the next status of `statuses` (the last one
// repeats) or, with `hang`, never answers, and records every connection and every request
// (a connection closed before sending one has none).
#ifndef CHAT_TESTS_TESTING_HTTP_RECEIVER_H_
#define CHAT_TESTS_TESTING_HTTP_RECEIVER_H_

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace chat::testing {

struct HttpReceiverOptions {
  std::vector<int> statuses = {200};  // answered in turn; the last one repeats
  bool hang = false;                  // read each request and never answer it
  bool silent = false;                // accept connections, read nothing (not even a handshake)
  // https with this PEM certificate and key (MakeSelfSignedCertificate); "" = plain http.
  std::string tls_cert_path = "";
  std::string tls_key_path = "";
  uint16_t port = 0;  // 0 = any free one; else this one (a receiver started again in its place)
};

class HttpReceiver {
 public:
  explicit HttpReceiver(HttpReceiverOptions options);
  explicit HttpReceiver(std::vector<int> statuses, bool hang = false)
      : HttpReceiver(HttpReceiverOptions{.statuses = std::move(statuses), .hang = hang}) {}
  ~HttpReceiver();
  HttpReceiver(const HttpReceiver&) = delete;
  HttpReceiver& operator=(const HttpReceiver&) = delete;

  // http://127.0.0.1:<port>/hook, or https://... with a certificate.
  std::string url() const;
  // The whole requests (head and body) received so far, once there are at least `n`. No time
  // limit of its own: the test fails by its CTest timeout.
  std::vector<std::string> WaitFor(size_t n);
  // The same, bodies only.
  std::vector<std::string> WaitForBodies(size_t n);
  // When each connection was accepted (TLS handshakes that failed included), once there are at
  // least `n`, or all there are after `limit`.
  std::vector<std::chrono::steady_clock::time_point> WaitForConnections(
      size_t n, std::chrono::milliseconds limit);

 private:
  struct Tls;
  void Run();

  const HttpReceiverOptions options_;
  int fd_ = -1;
  uint16_t port_ = 0;
  Tls* tls_ = nullptr;  // owned; null for plain http
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<std::string> requests_;
  std::vector<std::chrono::steady_clock::time_point> connections_;
  std::vector<int> held_;        // connections left unanswered (hang, silent), closed at the end
  std::vector<void*> held_tls_;  // their TLS sessions (SSL*), freed at the end
  std::thread thread_;
};

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_HTTP_RECEIVER_H_
