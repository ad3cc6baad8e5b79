#include "tests/testing/http_receiver.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <stdexcept>

namespace chat::testing {

HttpReceiver::HttpReceiver(std::vector<int> statuses, bool hang)
    : statuses_(statuses.empty() ? std::vector<int>{200} : std::move(statuses)), hang_(hang) {
  fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      listen(fd_, 64) != 0) {
    throw std::runtime_error("HttpReceiver: cannot listen on loopback");
  }
  socklen_t length = sizeof(address);
  getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length);
  port_ = ntohs(address.sin_port);
  thread_ = std::thread([this] { Run(); });
}

HttpReceiver::~HttpReceiver() {
  shutdown(fd_, SHUT_RDWR);
  close(fd_);
  thread_.join();
  for (int client : held_) close(client);
}

std::string HttpReceiver::url() const {
  return "http://127.0.0.1:" + std::to_string(port_) + "/hook";
}

std::vector<std::string> HttpReceiver::WaitFor(size_t n) {
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return requests_.size() >= n; });
  return requests_;
}

std::vector<std::string> HttpReceiver::WaitForBodies(size_t n) {
  std::vector<std::string> bodies = WaitFor(n);
  for (std::string& request : bodies) {
    const size_t end = request.find("\r\n\r\n");
    request = end == std::string::npos ? std::string() : request.substr(end + 4);
  }
  return bodies;
}

void HttpReceiver::Run() {
  for (;;) {
    const int client = accept(fd_, nullptr, nullptr);
    if (client < 0) return;
    std::string request;
    char buffer[4096];
    size_t header_end = std::string::npos;
    size_t content_length = 0;
    for (;;) {
      const ssize_t n = recv(client, buffer, sizeof(buffer), 0);
      if (n <= 0) break;
      request.append(buffer, static_cast<size_t>(n));
      if (header_end == std::string::npos) {
        header_end = request.find("\r\n\r\n");
        if (header_end != std::string::npos) {
          const size_t at = request.find("Content-Length: ");
          if (at != std::string::npos) content_length = std::stoul(request.substr(at + 16));
        }
      }
      if (header_end != std::string::npos && request.size() >= header_end + 4 + content_length) {
        break;
      }
    }
    int status = 200;
    {
      std::lock_guard lock(mutex_);
      status = statuses_[std::min(requests_.size(), statuses_.size() - 1)];
      requests_.push_back(request);
    }
    changed_.notify_all();
    if (hang_) {
      held_.push_back(client);
      continue;
    }
    const std::string response =
        "HTTP/1.1 " + std::to_string(status) + " X\r\nContent-Length: 0\r\n\r\n";
    send(client, response.data(), response.size(), MSG_NOSIGNAL);
    close(client);
  }
}

}  // namespace chat::testing
