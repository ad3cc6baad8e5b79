#include "src/client/transport.h"

#include <libwebsockets.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "chat/log.h"
#include "src/core/lws_log.h"

namespace chat::client {

namespace {

int ProtocolCallback(lws* wsi, lws_callback_reasons reason, void* user, void* in, size_t len) {
  (void)user;
  // Without a wsi there is no connection to report on; the Session's connect timeout covers
  // a connection that never reports back.
  if (wsi == nullptr) return 0;
  lws_context* context = lws_get_context(wsi);
  auto* transport = context ? static_cast<Transport*>(lws_context_user(context)) : nullptr;
  if (transport == nullptr) return 0;
  return transport->Callback(wsi, static_cast<int>(reason), in, len);
}

const lws_protocols kProtocols[] = {
    {"chat.v1", ProtocolCallback, 0, 0, 0, nullptr, 0},
    {nullptr, nullptr, 0, 0, 0, nullptr, 0},
};

}  // namespace

// The wake-up timer that bounds a blocking Service() (lws 4.1 ignores lws_service's timeout).
struct Transport::Timer {
  lws_sorted_usec_list_t sul{};
};

Result<std::unique_ptr<Transport>> Transport::Create(TransportOptions options) {
  std::unique_ptr<Transport> transport(new Transport(std::move(options)));
  if (Status st = transport->Init(); !st.ok()) return st;
  return transport;
}

Transport::Transport(TransportOptions options)
    : options_(std::move(options)), timer_(std::make_unique<Timer>()) {}

Status Transport::Init() {
  std::string copy = options_.url;
  const char* scheme = nullptr;
  const char* host = nullptr;
  const char* path = nullptr;
  int port = 0;
  if (lws_parse_uri(copy.data(), &scheme, &host, &port, &path) != 0 || host == nullptr ||
      *host == '\0') {
    return InvalidArgument("url: cannot parse \"" + options_.url + "\"");
  }
  scheme_ = scheme;
  host_ = host;
  // lws_parse_uri drops the leading '/'.
  path_ = std::string("/") + (path ? path : "");
  if (scheme_ == "wss") {
    tls_ = true;
  } else if (scheme_ != "ws") {
    return InvalidArgument("url: scheme must be ws or wss");
  }
  port_ = port;
  if (port_ == 0 || (tls_ && port_ == 80)) port_ = tls_ ? 443 : 80;

  RouteLwsLogs();
  lws_context_creation_info info;
  std::memset(&info, 0, sizeof(info));
  info.port = CONTEXT_PORT_NO_LISTEN;
  info.protocols = kProtocols;
  info.gid = -1;
  info.uid = -1;
  info.user = this;
  // One connection at a time: a small fd table instead of one sized by the fd rlimit.
  info.fd_limit_per_thread = 16;
  if (tls_) info.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
  if (!options_.tls_ca_path.empty()) info.client_ssl_ca_filepath = options_.tls_ca_path.c_str();
  context_ = lws_create_context(&info);
  if (context_ == nullptr) return Internal("transport: lws_create_context failed");
  return Status::Ok();
}

Transport::~Transport() {
  if (context_ != nullptr) {
    lws_sul_cancel(&timer_->sul);
    lws_context* context = context_;
    context_ = nullptr;
    wsi_ = nullptr;
    lws_context_destroy(context);
  }
}

bool Transport::Current(lws* wsi) const {
  return wsi_ != nullptr &&
         reinterpret_cast<uintptr_t>(lws_get_opaque_user_data(wsi)) == generation_;
}

void Transport::Connect() {
  Drop();
  ++generation_;
  established_ = false;
  peer_close_code_ = 0;
  rx_.clear();
  // Frames queued for a connection that closed by itself (Drop clears only a live one) belong
  // to it: a new connection starts with Hello.
  queue_.clear();
  queue_bytes_ = 0;
  lws_client_connect_info ci;
  std::memset(&ci, 0, sizeof(ci));
  ci.context = context_;
  ci.address = host_.c_str();
  ci.port = port_;
  ci.path = path_.c_str();
  ci.host = host_.c_str();
  ci.origin = host_.c_str();
  ci.protocol = "chat.v1";
  ci.ssl_connection = tls_ ? LCCSCF_USE_SSL : 0;
  ci.opaque_user_data = reinterpret_cast<void*>(generation_);
  lws* created = nullptr;
  ci.pwsi = &created;
  // lws may report a failure from inside the call; it is recognized by `connecting_`.
  connecting_ = true;
  failed_while_connecting_ = false;
  lws* result = lws_client_connect_via_info(&ci);
  connecting_ = false;
  if (failed_while_connecting_) return;  // the event is queued
  if (result == nullptr) {
    events_.push_back({TransportEvent::Type::kClosed, "connect failed", true, 0});
    return;
  }
  wsi_ = result;
}

void Transport::Drop() {
  if (wsi_ == nullptr) return;
  lws* old = wsi_;
  wsi_ = nullptr;
  ++generation_;
  queue_.clear();
  queue_bytes_ = 0;
  established_ = false;
  lws_set_timeout(old, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
}

void Transport::CloseGracefully(int wait_ms) {
  if (wsi_ == nullptr || !established_) return;
  closing_ = true;
  lws_callback_on_writable(wsi_);
  for (int waited = 0; wsi_ != nullptr && waited < wait_ms; waited += 10) Service(10);
  closing_ = false;
  Drop();
  events_.clear();
}

bool Transport::Send(const std::string& bytes) {
  if (wsi_ == nullptr || !established_) return false;
  if (queue_bytes_ + bytes.size() > options_.max_queue_bytes) return false;
  std::string frame(LWS_PRE, '\0');
  frame.append(bytes);
  queue_bytes_ += bytes.size();
  queue_.push_back(std::move(frame));
  lws_callback_on_writable(wsi_);
  return true;
}

void Transport::Service(int timeout_ms) {
  if (timeout_ms <= 0) {
    lws_service(context_, -1);
    return;
  }
  // Never below 10 ms: lws 4.1 busy-spins on sub-millisecond timers (LWS-NOTES 6.1).
  const int64_t us = std::max<int64_t>(10, timeout_ms) * 1000;
  lws_sul_schedule(
      context_, 0, &timer_->sul, [](lws_sorted_usec_list_t*) {}, us);
  lws_service(context_, 0);
}

std::vector<TransportEvent> Transport::TakeEvents() { return std::exchange(events_, {}); }

void Transport::Wake() {
  if (context_ != nullptr) lws_cancel_service(context_);
}

int Transport::Callback(lws* wsi, int reason_int, void* in, size_t len) {
  const auto reason = static_cast<lws_callback_reasons>(reason_int);
  switch (reason) {
    case LWS_CALLBACK_CLIENT_CONNECTION_ERROR: {
      const bool ours = reinterpret_cast<uintptr_t>(lws_get_opaque_user_data(wsi)) == generation_;
      if (!ours || (wsi_ == nullptr && !connecting_)) return 0;
      if (connecting_) failed_while_connecting_ = true;
      wsi_ = nullptr;
      std::string why = in ? std::string(static_cast<const char*>(in),
                                         strnlen(static_cast<const char*>(in), len ? len : 256))
                           : "connection error";
      events_.push_back({TransportEvent::Type::kClosed, why, true, 0});
      return 0;
    }
    case LWS_CALLBACK_CLIENT_ESTABLISHED:
      if (!Current(wsi)) return -1;
      wsi_ = wsi;
      established_ = true;
      events_.push_back({TransportEvent::Type::kOpen, "", true, 0});
      return 0;
    case LWS_CALLBACK_CLIENT_RECEIVE: {
      // Never -1 from here: lws 4.1 goes on parsing the rest of what it read after the close
      // that -1 starts, into buffers that close freed (heap corruption, seen under ASan with
      // a server sending messages past max_message_bytes). The connection is closed from the
      // event loop instead, and what it still receives is dropped.
      if (!Current(wsi)) {
        lws_set_timeout(wsi, PENDING_TIMEOUT_CLOSE_SEND, LWS_TO_KILL_ASYNC);
        return 0;
      }
      if (lws_is_first_fragment(wsi)) rx_.clear();
      if (rx_.size() + len > options_.max_message_bytes) {
        std::string().swap(rx_);
        lws_close_reason(wsi, LWS_CLOSE_STATUS_MESSAGE_TOO_LARGE, nullptr, 0);
        lws_set_timeout(wsi, PENDING_TIMEOUT_CLOSE_SEND, LWS_TO_KILL_ASYNC);
        wsi_ = nullptr;
        events_.push_back({TransportEvent::Type::kClosed, "message too large", true, 1009});
        return 0;
      }
      rx_.append(static_cast<const char*>(in), len);
      received_bytes_ += len;
      if (lws_is_final_fragment(wsi) && lws_remaining_packet_payload(wsi) == 0) {
        events_.push_back({TransportEvent::Type::kMessage, std::exchange(rx_, {}),
                           lws_frame_is_binary(wsi) != 0, 0});
      } else if (events_.empty() || events_.back().type != TransportEvent::Type::kReceiving) {
        // A large message on a slow link takes long to arrive: the Session learns that it is
        // arriving, not only when it is complete.
        events_.push_back({TransportEvent::Type::kReceiving, "", true, 0});
      }
      return 0;
    }
    case LWS_CALLBACK_CLIENT_WRITEABLE: {
      if (!Current(wsi)) return -1;
      if (closing_) {
        lws_close_reason(wsi, LWS_CLOSE_STATUS_NORMAL, nullptr, 0);
        return -1;
      }
      if (queue_.empty()) return 0;  // spurious WRITEABLE after lws's own partial sends
      std::string frame = std::move(queue_.front());
      queue_.pop_front();
      const size_t payload = frame.size() - LWS_PRE;
      queue_bytes_ -= payload;
      // The client masks the buffer in place; this buffer is used once and then freed.
      int n = lws_write(wsi, reinterpret_cast<unsigned char*>(frame.data()) + LWS_PRE, payload,
                        LWS_WRITE_BINARY);
      if (n < static_cast<int>(payload)) {
        wsi_ = nullptr;
        events_.push_back({TransportEvent::Type::kClosed, "write failed", true, 0});
        return -1;
      }
      if (!queue_.empty()) lws_callback_on_writable(wsi);
      return 0;
    }
    case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
      if (Current(wsi) && len >= 2) {
        const auto* p = static_cast<const unsigned char*>(in);
        peer_close_code_ = (p[0] << 8) | p[1];
      }
      return 0;
    case LWS_CALLBACK_CLIENT_CLOSED:
      if (Current(wsi)) {
        wsi_ = nullptr;
        established_ = false;
        events_.push_back({TransportEvent::Type::kClosed, "closed", true, peer_close_code_});
      }
      return 0;
    default:
      return 0;
  }
}

}  // namespace chat::client
