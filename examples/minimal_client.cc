// The smallest useful chat client: sends one text to a user, prints what arrives, and exits once
// the server has acknowledged the message (or after 10 s).
//
//   minimal_client ws://127.0.0.1:8080 "$(chatd token --user alice --secret-file s)" bob "hi"
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include "chat/client.h"

namespace {

class Printer : public chat::ClientListener {
 public:
  void OnMessage(const chat::MessageEvent& event) override {
    const char* status = event.status == chat::MessageStatus::kPending ? "pending"
                         : event.status == chat::MessageStatus::kSent  ? "sent"
                                                                       : "failed";
    std::printf("[%s] %s #%llu: %s\n", status, event.message.sender.c_str(),
                static_cast<unsigned long long>(event.message.seq), event.message.body.c_str());
    if (event.message.client_msg_id == waiting_for &&
        event.status != chat::MessageStatus::kPending) {
      done = true;
    }
  }
  void OnError(const chat::Status& status) override {
    std::fprintf(stderr, "error: %s\n", status.ToString().c_str());
  }
  std::string waiting_for;  // the client_msg_id of our message
  bool done = false;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s URL TOKEN PEER TEXT\n", argv[0]);
    return 2;
  }
  auto printer = std::make_shared<Printer>();
  chat::ClientOptions options;
  options.url = argv[1];
  options.token_provider = [token = std::string(argv[2])] { return token; };
  options.device_id = "minimal-client";
  options.listener = printer;
  auto client = chat::Client::Open(std::move(options));
  if (!client.ok()) {
    std::fprintf(stderr, "open: %s\n", client.status().ToString().c_str());
    return 1;
  }
  auto id = (*client)->SendTo(argv[3], "text/plain", argv[4]);
  if (!id.ok()) {
    std::fprintf(stderr, "send: %s\n", id.status().ToString().c_str());
    return 1;
  }
  // Safe without a lock: callbacks run only inside Poll(), on this thread.
  printer->waiting_for = *id;
  // Drive the client from this thread; callbacks run inside Poll().
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!printer->done && std::chrono::steady_clock::now() < deadline) {
    if (!(*client)->Poll(100).ok()) break;
  }
  (*client)->Close();
  return printer->done ? 0 : 1;
}
