// WsClient: a blocking WebSocket test client for the chat.v1 protocol.
//
// Tests drive chatd the way a real client does, over loopback with the libwebsockets client API:
// each WsClient owns one lws context and one service thread. Public methods may be called from
// the test thread; they post work to the service thread through a mutex-guarded queue and wake
// it with lws_cancel_service (the only thread-safe lws call). Received messages are decoded
// (binary protobuf or JSON text), Batch envelopes are unpacked in order, and the result is
// queued for Next()/WaitFor(). Undecodable server frames are counted, not dropped silently.
//
// Thread-safety: every public method is safe from any thread; a WsClient is meant to be used by
// one test thread.
#ifndef CHAT_TESTS_TESTING_WS_CLIENT_H_
#define CHAT_TESTS_TESTING_WS_CLIENT_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "chat/status.h"
#include "chat/v1/chat.pb.h"
#include "tests/testing/envelopes.h"

struct lws;
struct lws_context;

namespace chat::testing {

enum class Wire { kBinary, kJson };

// What WaitClosed() reports when the connection ended without a close frame from the server.
inline constexpr int kClosedWithoutCode = 1006;

class WsClient {
 public:
  WsClient();
  // Closes the connection if open and stops the service thread.
  ~WsClient();
  WsClient(const WsClient&) = delete;
  WsClient& operator=(const WsClient&) = delete;

  // Connects to "ws://host:port/path" or "wss://..." with subprotocol chat.v1 and waits for the
  // handshake. wss accepts self-signed certificates. Unavailable if the connection failed,
  // DeadlineExceeded on timeout, InvalidArgument for a bad URL. Call once per WsClient.
  Status Connect(const std::string& url, int timeout_ms = 5000);

  // Encodes `envelope` as a binary protobuf frame or a JSON text frame and sends it.
  // FailedPrecondition if not connected.
  Status SendEnvelope(const v1::Envelope& envelope, Wire wire = Wire::kBinary);
  // Sends `bytes` as one binary (or text) WebSocket message.
  Status SendRaw(std::string bytes, bool binary = true);
  // Sends each of `messages` as one WebSocket message, in order. They are queued together, so a
  // later one is written even if the server closes the connection on an earlier one.
  Status SendRaw(std::vector<std::string> messages, bool binary = true);
  // Sends `bytes` as one WebSocket message split into `fragments` frames (first frame plus
  // continuation frames, FIN only on the last).
  Status SendFragments(const std::string& bytes, int fragments, bool binary = true);
  // Sends a close frame with `code` and drops the connection.
  Status Close(int code = 1000);

  // The next received envelope, in order, or nullopt after `timeout_ms`.
  std::optional<v1::Envelope> Next(int timeout_ms = 5000);
  // Removes and returns the first received envelope matching `pred` (earlier non-matching ones
  // stay queued for Next), waiting up to `timeout_ms`.
  std::optional<v1::Envelope> WaitFor(const std::function<bool(const v1::Envelope&)>& pred,
                                      int timeout_ms = 5000);
  // Waits for the reply with this rid (any body, Error included).
  std::optional<v1::Envelope> WaitForRid(uint64_t rid, int timeout_ms = 5000);
  // Removes and returns everything received so far.
  std::vector<v1::Envelope> Drain();
  // Sends a Ping and returns everything received before its Pong (the Pong is consumed). The
  // server answers in order on one connection, so anything it queued for this connection before
  // handling the Ping is in the result. nullopt if no Pong came within `timeout_ms`.
  std::optional<std::vector<v1::Envelope>> Barrier(int timeout_ms = 5000);

  // Waits for the connection to end and returns the close code the server sent
  // (kClosedWithoutCode if none), or nullopt if still open after `timeout_ms`.
  std::optional<int> WaitClosed(int timeout_ms = 5000);
  bool closed() const;
  // The close reason text the server sent with its close frame.
  std::string close_reason() const;

  // Convenience: sends Hello and returns the reply (Welcome or Error), nullopt on timeout.
  std::optional<v1::Envelope> Hello(const std::string& token, const std::string& device,
                                    Wire wire = Wire::kBinary, int timeout_ms = 5000);

  // Sends `envelope` (with a fresh rid if it has none) and waits for the reply with its rid.
  std::optional<v1::Envelope> Request(v1::Envelope envelope, Wire wire = Wire::kBinary,
                                      int timeout_ms = 5000);

  // A fresh request id (1, 2, 3, ...).
  uint64_t NextRid() { return next_rid_.fetch_add(1); }

  // Frames received by type, and frames that did not decode as an Envelope.
  int text_frames() const;
  int binary_frames() const;
  int undecodable_frames() const;

 private:
  struct Outgoing {
    std::string bytes;
    int protocol = 0;  // lws_write_protocol flags
    bool close = false;
    int close_code = 0;
  };

  friend struct WsClientTrampoline;
  int OnEvent(lws* wsi, int reason, void* in, size_t len);
  Status Enqueue(std::vector<Outgoing> items);
  void OnMessage(const std::string& bytes, bool binary);
  void MarkClosed(int code);

  lws_context* context_ = nullptr;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> next_rid_{1};
  // Accessed only on the service thread (or before it starts).
  lws* wsi_ = nullptr;
  std::string rx_;
  bool rx_binary_ = true;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Outgoing> outbox_;
  std::deque<v1::Envelope> inbox_;
  bool connected_ = false;
  bool connect_failed_ = false;
  std::string connect_error_;
  bool closed_ = false;
  int close_code_ = 0;
  std::string close_reason_;
  int text_frames_ = 0;
  int binary_frames_ = 0;
  int undecodable_frames_ = 0;
};

// Result of a plain HTTP/1.1 GET over loopback.
struct HttpResponse {
  int status = 0;
  std::string body;
};

// GET http://<host>:<port><path> with Connection: close. Unavailable/DeadlineExceeded on
// transport failure.
Result<HttpResponse> HttpGet(const std::string& host, uint16_t port, const std::string& path,
                             int timeout_ms = 5000);

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_WS_CLIENT_H_
