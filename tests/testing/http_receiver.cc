#include "tests/testing/http_receiver.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <stdexcept>

namespace chat::testing {

struct HttpReceiver::Tls {
  SSL_CTX* context = nullptr;
};

HttpReceiver::HttpReceiver(HttpReceiverOptions options) : options_(std::move(options)) {
  if (options_.statuses.empty()) throw std::invalid_argument("HttpReceiver: no statuses");
  if (!options_.tls_cert_path.empty()) {
    tls_ = new Tls;
    tls_->context = SSL_CTX_new(TLS_server_method());
    if (tls_->context == nullptr ||
        SSL_CTX_use_certificate_chain_file(tls_->context, options_.tls_cert_path.c_str()) != 1 ||
        SSL_CTX_use_PrivateKey_file(tls_->context, options_.tls_key_path.c_str(),
                                    SSL_FILETYPE_PEM) != 1) {
      SSL_CTX_free(tls_->context);
      delete tls_;
      throw std::runtime_error("HttpReceiver: cannot load the TLS certificate or key");
    }
  }
  fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(options_.port);
  const int reuse = 1;
  if (fd_ >= 0) setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &reuse, sizeof(reuse));
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
  for (void* ssl : held_tls_) SSL_free(static_cast<SSL*>(ssl));
  for (int client : held_) close(client);
  if (tls_ != nullptr) {
    SSL_CTX_free(tls_->context);
    delete tls_;
  }
}

std::string HttpReceiver::url() const {
  return std::string(tls_ != nullptr ? "https" : "http") + "://127.0.0.1:" + std::to_string(port_) +
         "/hook";
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

std::vector<std::chrono::steady_clock::time_point> HttpReceiver::WaitForConnections(
    size_t n, std::chrono::milliseconds limit) {
  std::unique_lock lock(mutex_);
  changed_.wait_for(lock, limit, [&] { return connections_.size() >= n; });
  return connections_;
}

void HttpReceiver::Run() {
  // A client that hangs up before the answer is written must not kill the test with SIGPIPE
  // (SSL_write has no MSG_NOSIGNAL).
  sigset_t pipe;
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
  for (;;) {
    const int client = accept(fd_, nullptr, nullptr);
    if (client < 0) return;
    {
      std::lock_guard lock(mutex_);
      connections_.push_back(std::chrono::steady_clock::now());
    }
    changed_.notify_all();
    if (options_.silent) {
      held_.push_back(client);
      continue;
    }
    SSL* ssl = nullptr;
    if (tls_ != nullptr) {
      ssl = SSL_new(tls_->context);
      SSL_set_fd(ssl, client);
      // Fails when the client refuses the certificate: the connection is counted, no request.
      if (SSL_accept(ssl) != 1) {
        ERR_clear_error();
        SSL_free(ssl);
        close(client);
        continue;
      }
    }
    const auto receive = [&](char* buffer, size_t size) -> ssize_t {
      if (ssl == nullptr) return recv(client, buffer, size, 0);
      const int n = SSL_read(ssl, buffer, static_cast<int>(size));
      return n > 0 ? n : -1;
    };
    std::string request;
    char buffer[4096];
    size_t header_end = std::string::npos;
    size_t content_length = 0;
    for (;;) {
      const ssize_t n = receive(buffer, sizeof(buffer));
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
    if (request.empty()) {
      // The client went away without a request (a TLS client that refused the certificate's
      // host name after the handshake, say).
      if (ssl != nullptr) SSL_free(ssl);
      close(client);
      continue;
    }
    int status = 200;
    {
      std::lock_guard lock(mutex_);
      status = options_.statuses[std::min(requests_.size(), options_.statuses.size() - 1)];
      requests_.push_back(request);
    }
    changed_.notify_all();
    if (options_.hang) {
      held_.push_back(client);
      if (ssl != nullptr) held_tls_.push_back(ssl);
      continue;
    }
    const std::string response =
        "HTTP/1.1 " + std::to_string(status) + " X\r\nContent-Length: 0\r\n\r\n";
    if (ssl == nullptr) {
      send(client, response.data(), response.size(), MSG_NOSIGNAL);
    } else {
      SSL_write(ssl, response.data(), static_cast<int>(response.size()));
      SSL_shutdown(ssl);
      ERR_clear_error();
      SSL_free(ssl);
    }
    close(client);
  }
}

}  // namespace chat::testing
