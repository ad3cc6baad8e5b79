// Push notifications for users with no online device.
//
// After a message is committed, every recipient (sender excluded) with no connected device gets
// a pending notification. Notifications are collapsed per (user, conversation): the first
// message opens a window of ServerOptions::push_collapse_ms, and when it ends the notifier is
// called once with the latest message and how many messages the window held.
//
//   chat::ServerOptions options;
//   options.push = chat::NewWebhookNotifier({.url = "http://127.0.0.1:9000/push"}).value();
//
// Device tokens registered with RegisterPushToken are stored by the MessageStore, per (user,
// device) and at most ServerOptions::max_devices_per_user per user, so they survive a restart.
// When a window ends the server reads the user's tokens and unread total in one store read (never
// on the event loop) and then calls the notifier, unless the user came online meanwhile.
//
// Thread-safety: the server calls Notify from its event-loop thread only. Notify must return
// quickly and must not block on the network; NewWebhookNotifier's notifier queues and returns.
#ifndef CHAT_PUSH_H_
#define CHAT_PUSH_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "chat/export.h"
#include "chat/status.h"
#include "chat/types.h"

namespace chat {

// A device token as the client registered it.
struct PushToken {
  DeviceId device;
  std::string platform;  // "apns", "fcm", "webhook", ...
  std::string token;
};

struct PushNotification {
  UserId user;  // the recipient, who has no online device
  ConversationId conversation_id = 0;
  UserId sender;               // of the latest message in the window
  Seq seq = 0;                 // of the latest message in the window
  int64_t server_time_ms = 0;  // of the latest message in the window
  std::string preview;         // the latest body's first 1,024 bytes at most (cut at a character);
                               // empty when ServerOptions::push_preview is false
  uint32_t collapsed = 1;      // messages in this window for (user, conversation)
  // The user's unread total across conversations (the badge), as Sync reports it when the
  // window ended. 0 if the store could not be read (the notification is sent anyway).
  uint64_t unread_total = 0;
  std::vector<PushToken> tokens;  // the user's registered devices by device id (may be empty)
};

class CHAT_EXPORT PushNotifier {
 public:
  virtual ~PushNotifier() = default;
  // Called once per collapsed notification. Must not block.
  virtual void Notify(PushNotification notification) = 0;
};

// Forwards to another notifier; derive from it to intercept a few calls.
class CHAT_EXPORT PushNotifierWrapper : public PushNotifier {
 public:
  explicit PushNotifierWrapper(std::shared_ptr<PushNotifier> target) : target_(std::move(target)) {}
  void Notify(PushNotification notification) override { target_->Notify(std::move(notification)); }

 protected:
  PushNotifier& target() { return *target_; }

 private:
  std::shared_ptr<PushNotifier> target_;
};

struct WebhookOptions {
  // http[s]://host[:port][/path][?query]; no user info, no IPv6 literal, no spaces or control
  // bytes. An https receiver's certificate and host name are verified.
  std::string url;
  // One attempt as a whole, ms: name lookup, connect, TLS handshake, request and response
  // status. Default 5000.
  uint32_t timeout_ms = 5000;
  size_t max_queue = 10'000;  // notifications waiting; past it new ones are dropped
  uint32_t max_retries = 3;   // after the first attempt, on network errors and 5xx
  uint32_t backoff_ms = 200;  // before the first retry; doubles for each further retry
  // PEM file of the CAs that an https receiver's certificate must chain to, used instead of the
  // system's CA store; "" = the system's store. Default "".
  std::string ca_file = "";
};

// POSTs each notification as JSON (see docs/push.md) from a thread of its own. Notify only
// queues; destroying the notifier drops what is queued and abandons the attempt in flight.
// InvalidArgument if the URL is not http[s]://host[:port][/path][?query], a limit is zero or
// ca_file cannot be read.
CHAT_EXPORT Result<std::shared_ptr<PushNotifier>> NewWebhookNotifier(WebhookOptions options);

}  // namespace chat

#endif  // CHAT_PUSH_H_
