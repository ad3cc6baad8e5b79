// A loopback HTTP/1.1 receiver for webhook tests: accepts on 127.0.0.1 on a free port, answers
// each request with the next status of `statuses` (the last one repeats) or, with `hang`, never
// answers, and records every request.
#ifndef CHAT_TESTS_TESTING_HTTP_RECEIVER_H_
#define CHAT_TESTS_TESTING_HTTP_RECEIVER_H_

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace chat::testing {

class HttpReceiver {
 public:
  explicit HttpReceiver(std::vector<int> statuses, bool hang = false);
  ~HttpReceiver();
  HttpReceiver(const HttpReceiver&) = delete;
  HttpReceiver& operator=(const HttpReceiver&) = delete;

  // http://127.0.0.1:<port>/hook
  std::string url() const;
  // The whole requests (head and body) received so far, once there are at least `n`. No time
  // limit of its own: the test fails by its CTest timeout.
  std::vector<std::string> WaitFor(size_t n);
  // The same, bodies only.
  std::vector<std::string> WaitForBodies(size_t n);

 private:
  void Run();

  const std::vector<int> statuses_;
  const bool hang_;
  int fd_ = -1;
  uint16_t port_ = 0;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<std::string> requests_;
  std::vector<int> held_;  // connections left unanswered (hang), closed at the end
  std::thread thread_;
};

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_HTTP_RECEIVER_H_
