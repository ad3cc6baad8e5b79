// Transport: the client's libwebsockets connection, one at a time, moving bytes only.
//
// It opens a WebSocket (subprotocol "chat.v1") to the configured URL, sends binary frames from a
// bounded queue (one lws_write per WRITEABLE callback, a fresh buffer per frame because the
// client masks it in place), reassembles incoming messages up to a size limit, and reports what
// happened as a list of events the owner takes after each Service() call. Reporting events
// later, instead of calling out from inside lws callbacks, keeps the Session free of
// re-entrancy (lws may fail a connect inside lws_client_connect_via_info).
//
// Thread-safety: everything runs on the loop thread (the thread calling Service()), except
// Wake(), which may be called from any thread.
#ifndef CHAT_SRC_CLIENT_TRANSPORT_H_
#define CHAT_SRC_CLIENT_TRANSPORT_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "chat/status.h"

struct lws;
struct lws_context;

namespace chat::client {

struct TransportOptions {
  std::string url;                                     // ws://host:port/path or wss://...
  std::string tls_ca_path;                             // "" = system default
  size_t max_message_bytes = size_t{4} * 1024 * 1024;  // largest assembled inbound message
  size_t max_queue_bytes = size_t{8} * 1024 * 1024;    // queued outbound bytes
};

struct TransportEvent {
  // kReceiving: bytes of a message that is not complete yet arrived (one event for the bytes of
  // one Service() call).
  enum class Type { kOpen, kReceiving, kMessage, kClosed };
  Type type = Type::kOpen;
  std::string data;    // kMessage: the payload; kClosed: a reason
  bool binary = true;  // kMessage
  int close_code = 0;  // kClosed: the peer's close code, or 0 if none was received
};

class Transport {
 public:
  // Parses the URL (InvalidArgument) and creates the lws context (Internal).
  static Result<std::unique_ptr<Transport>> Create(TransportOptions options);
  ~Transport();
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  // Starts connecting; a kOpen or kClosed event follows. Drops any current connection first.
  void Connect();
  // Closes the current connection; none of its events is reported afterwards.
  void Drop();
  // Sends a normal close (1000) on the current connection and services the loop for up to
  // `wait_ms` so it leaves; the server then sees a clean close instead of a dropped socket.
  void CloseGracefully(int wait_ms);
  // Queues one binary message. False if not connected or the queue is full.
  bool Send(const std::string& bytes);
  // Waits up to timeout_ms (0: not at all) for network events or Wake(), and handles them.
  void Service(int timeout_ms);
  std::vector<TransportEvent> TakeEvents();
  // Bytes received so far, over every connection, also of messages not complete yet.
  uint64_t received_bytes() const { return received_bytes_; }
  // Makes a blocked Service() return soon. Thread-safe.
  void Wake();

  // The lws protocol callback; public only so the C callback table can name it.
  int Callback(lws* wsi, int reason, void* in, size_t len);

 private:
  explicit Transport(TransportOptions options);
  Status Init();
  bool Current(lws* wsi) const;

  TransportOptions options_;
  std::string scheme_, host_, path_;
  int port_ = 0;
  bool tls_ = false;

  lws_context* context_ = nullptr;
  lws* wsi_ = nullptr;        // the current connection, or null
  uintptr_t generation_ = 0;  // tags each connection; events of older ones are ignored
  bool established_ = false;
  bool closing_ = false;
  bool connecting_ = false;               // inside lws_client_connect_via_info()
  bool failed_while_connecting_ = false;  // it reported CONNECTION_ERROR from inside  //
                                          // CloseGracefully() asked the current connection to close
  int peer_close_code_ = 0;
  std::deque<std::string> queue_;  // each with LWS_PRE bytes of headroom
  size_t queue_bytes_ = 0;
  std::string rx_;
  uint64_t received_bytes_ = 0;
  std::vector<TransportEvent> events_;
  struct Timer;
  std::unique_ptr<Timer> timer_;
};

}  // namespace chat::client

#endif  // CHAT_SRC_CLIENT_TRANSPORT_H_
