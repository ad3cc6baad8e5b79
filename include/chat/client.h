// Client: the chat client core, embeddable in any application.
//
//   chat::ClientOptions options;
//   options.url = "ws://127.0.0.1:8080";
//   options.token_provider = [] { return LoadToken(); };
//   options.device_id = "laptop-1";
//   options.cache_path = "/home/me/.local/share/app/chat-cache.db";
//   options.listener = std::make_shared<MyListener>();
//   auto client = chat::Client::Open(std::move(options));
//   if (!client.ok()) return 1;
//   (void)(*client)->Start();  // or call (*client)->Poll(50) from the app's own loop
//   auto id = (*client)->SendTo("bob", "text/plain", "hi");  // pending until the server acks
//
// The client keeps one WebSocket connection to the server, reconnects with exponential backoff
// and full jitter, catches up with Sync after every (re)connect, and keeps a local SQLite cache
// of conversations and messages. Send() commits the message to a persistent outbox before any
// network I/O; the outbox drains in order whenever the client is connected and survives
// Close(), reconnects and a crash of the application. Every conversation's messages reach
// ClientListener::OnMessage exactly once, in seq order.
//
// Thread-safety: every public method may be called from any thread, also from inside a
// listener callback (it posts work to the client's loop). Callbacks run only on the client's
// loop thread (the internal thread after Start(), or the thread calling Poll()); none runs after
// Close() returns, and none runs re-entrantly inside the public call that caused it. The rules
// are numbered in docs/client.md. Do not destroy the Client from inside one of its callbacks.
#ifndef CHAT_CLIENT_H_
#define CHAT_CLIENT_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "chat/clock.h"
#include "chat/export.h"
#include "chat/status.h"
#include "chat/types.h"

namespace chat {

enum class ConnectionState : int {
  kDisconnected = 0,  // waiting to reconnect (backoff), or not started yet
  kConnecting = 1,    // WebSocket handshake and Hello in progress
  kSyncing = 2,       // authenticated; catching up with Sync
  kConnected = 3,     // caught up; live messages flow and the outbox drains
  kClosed = 4,        // Close() was called
};

CHAT_EXPORT std::string_view ConnectionStateName(ConnectionState state);

enum class MessageStatus : int {
  kPending = 0,  // in the outbox, not acknowledged by the server yet
  kSent = 1,     // committed by the server (it has a seq)
  kFailed = 2,   // refused by the server for good; `reason` says why
  // Own messages only, reported through ClientListener::OnMessageStatus and MessageStatusOf():
  kDelivered = 3,  // every other member has it on at least one device
  kRead = 4,       // every other member has read it
};

// A member's receipt watermarks moved (ReceiptUpdate from the server).
struct ReceiptEvent {
  ConversationId conversation_id = 0;
  UserId user_id;      // whose watermarks moved: another member, or this user (another device)
  DeviceId device_id;  // the device that sent the receipt
  Seq delivered_seq = 0;
  Seq read_seq = 0;
  Seq delivered_all_seq = 0;  // every member has messages up to here delivered
  Seq read_all_seq = 0;       // every member has read up to here
};

// One member's watermarks, from GetReceipts().
struct MemberWatermarks {
  UserId user_id;
  Seq delivered_seq = 0;
  Seq read_seq = 0;
  Role role = Role::kUnspecified;
};

// A watched user's presence (ClientListener::OnPresence). Live state: never cached on disk.
struct PresenceInfo {
  UserId user;
  bool online = false;   // at least one device connected and heartbeating
  uint32_t devices = 0;  // devices online
  // Unix ms. Offline: when the user was last online (0 = never or unknown). Online: the
  // server's time of the update.
  int64_t last_seen_ms = 0;
};

// One message as the application sees it.
struct MessageEvent {
  // kPending: conversation_id is 0 when the message was addressed to a peer, seq is 0 and
  // message_id is 0; client_msg_id, content_type and body are set.
  Message message;
  UserId peer;  // set when the message was sent with SendTo()
  MessageStatus status = MessageStatus::kSent;
  bool outgoing = false;  // sent by this user, from this or another device
  Status reason;          // kFailed: the server's error
};

// Receives the client's events. The default implementations do nothing.
// Thread-safety: called only on the client's loop thread, one call at a time.
class CHAT_EXPORT ClientListener {
 public:
  virtual ~ClientListener() = default;
  virtual void OnConnectionState(ConnectionState state);
  // Called for every committed message of every conversation exactly once and in seq order
  // (status kSent), and for this client's own sends when they enter the outbox (kPending) or
  // fail (kFailed). A message sent by this client is reported kPending first, then kSent when
  // it takes its place in the conversation's order.
  virtual void OnMessage(const MessageEvent& event);
  virtual void OnConversationUpdated(const ConversationInfo& info);
  // Retention deleted the messages of `conversation` with seq <= up_to_seq on the server, and
  // the client has just deleted the copies it held: remove them from the screen. Called when the
  // client learns it (the server's notice while connected, or a conversation state or History
  // page with a higher first_seq, e.g. the first Sync after being offline) and held some of
  // them; OnConversationUpdated with the new first_seq follows when the conversation is cached.
  // Messages in the outbox are never touched.
  virtual void OnMessagesExpired(ConversationId conversation, Seq up_to_seq);
  // Problems that no call returned: authentication failures, a server epoch change (DataLoss:
  // the cache was rebuilt), cache write failures.
  virtual void OnError(const Status& status);
  // `user` started (active) or stopped typing in `conversation`. An active indicator that is
  // not refreshed is reported inactive after the server's expiry (at most 6 s), and every
  // indicator is reported inactive when the connection is lost.
  virtual void OnTyping(ConversationId conversation, const UserId& user, bool active);
  // A member's receipt watermarks moved; this user's own other devices included.
  virtual void OnReceipt(const ReceiptEvent& event);
  // This user's messages in `conversation` with seq <= `up_to_seq` reached `status`
  // (kDelivered or kRead). Reported when the watermark moves forward, never backward; it may
  // come before the OnMessage of messages it covers (a Sync's later page), so keep it per
  // conversation and apply it to messages that arrive after it too.
  virtual void OnMessageStatus(ConversationId conversation, Seq up_to_seq, MessageStatus status);
  // Unread messages across all conversations changed (exact once synced with the server).
  // The per-conversation count is ConversationInfo::unread in OnConversationUpdated.
  virtual void OnUnreadTotal(uint64_t total);
  // A watched user's presence: once per user when a subscription is (re-)established, then at
  // every change the server reports (coalesced by the server). See SubscribePresence().
  virtual void OnPresence(const PresenceInfo& info);
};

struct ReconnectPolicy {
  int64_t base_ms = 500;            // ms; ceiling of the first reconnect delay. Default 500.
  int64_t cap_ms = 30'000;          // ms; ceiling of every reconnect delay. Default 30 s.
  int64_t reset_after_ms = 60'000;  // ms live (first Sync done) to reset the delays. Default 60 s.
};

struct ClientOptions {
  // Server address: "ws://host:port[/path]" or "wss://host:port[/path]". Required.
  std::string url;
  // Returns the token for Hello. Required. Called on the client's loop thread before every
  // connection attempt, so a refreshed token is picked up after the server says it expired.
  std::function<std::string()> token_provider;
  // Stable per installation, 1..128 bytes. Required.
  std::string device_id;
  // SQLite file holding the cache and the outbox; created if missing. Default "": in memory
  // only (nothing survives Close()).
  std::string cache_path;
  // Receives events; may be null.
  std::shared_ptr<ClientListener> listener;
  ReconnectPolicy reconnect;
  // ms between Pings; a link silent for two intervals is considered dead and reconnected.
  // At most the server's value from Welcome (a longer one is cut to it: the server counts a
  // connection silent past its presence TTL as offline). Default 0: the server's value (30 s
  // for chatd).
  uint32_t heartbeat_interval_ms = 0;
  // ms from starting a connection to Welcome before the attempt is given up. Default 10 s.
  uint32_t connect_timeout_ms = 10'000;
  // ms the server has to answer a request (group operations, SetRetention, GetReceipts,
  // History from the server, Subscribe, presence, RegisterPushToken, Sync) before it is given
  // up: its callback gets DeadlineExceeded (a Subscribe's goes to OnError) and a late answer
  // is ignored. The time a frame from the server takes to arrive does not count, and nothing is
  // given up while one arrives. A request given up while the server served nothing since it
  // was sent also drops the connection and reconnects; a Sync given up on a connection that is
  // served is sent again. A Sync given up doubles the next Sync's time (up to 8 times). Sends
  // are not timed out (the outbox keeps them until acknowledged). At least 100. Default 30 s.
  uint32_t request_timeout_ms = 30'000;
  // Messages the outbox holds, pending and failed together; Send() returns ResourceExhausted
  // past it. A failed message stays until Discard() removes it. Default 1000.
  size_t outbox_max = 1000;
  // Outbox messages sent before their acks arrive; larger is faster. The order holds either
  // way: a server that refuses one for now refuses the later ones until it comes again.
  // Default 16.
  uint32_t max_in_flight = 16;
  // Messages per Sync page; 0 = the server's default. Default 0.
  uint32_t sync_page_limit = 0;
  // bytes; largest WebSocket message accepted from the server, told to it in Hello so that its
  // Sync replies and History pages stay below half of it, and chatd packs the live messages it
  // writes together into frames of at most half of it. It must hold the largest message the
  // server may send (for chatd its max_message_bytes, 256 KiB by default, or max_body_bytes if
  // larger, plus a few KiB): else chatd refuses the connection and OnError reports
  // FailedPrecondition with the figure needed, at every attempt. Default 4 MiB.
  size_t max_message_bytes = size_t{4} * 1024 * 1024;
  // Pending API calls posted to the loop; calls past it return ResourceExhausted. Default 10000.
  size_t max_pending_calls = 10'000;
  // PEM bundle to verify a wss server with; "" = the system's default. Default "".
  std::string tls_ca_path;
  // Default: SystemClock().
  std::shared_ptr<Clock> clock;
};

// A page of history, newest first.
struct HistoryResult {
  ConversationId conversation_id = 0;
  std::vector<Message> messages;  // newest first
  bool has_more = false;          // older messages exist
  bool from_cache = false;        // answered from the local cache without asking the server
};

using HistoryCallback = std::function<void(Result<HistoryResult> result)>;
// The conversation's state after a group operation, or the server's error.
using ConversationCallback = std::function<void(Result<ConversationInfo> result)>;
using ReceiptsCallback = std::function<void(Result<std::vector<MemberWatermarks>> result)>;
// The server's answer to a request that returns nothing but success or an error.
using StatusCallback = std::function<void(Status status)>;

// Subscribe() calls a client remembers at most (re-sent after every reconnect).
inline constexpr size_t kMaxChannelSubscriptions = 1000;
// Users a client watches at most (SubscribePresence). Once connected, the server's
// Limits.max_presence_subscriptions from Welcome applies when it is lower.
inline constexpr size_t kMaxPresenceSubscriptions = 1000;
// bytes; longest push platform name and token RegisterPushToken() accepts.
inline constexpr size_t kMaxPushPlatformBytes = 64;
inline constexpr size_t kMaxPushTokenBytes = 4096;
// ms; SetTyping(active) repeats are sent at most this often (the server expires them later).
inline constexpr int64_t kTypingRefreshMs = 3'000;
// Requests of the application waiting for the server's answer at once (group operations,
// SetRetention, GetReceipts, History from the server, Subscribe, presence, RegisterPushToken).
// Past it a call is answered ResourceExhausted by its callback (a Subscribe by OnError) without
// a request. The requests the client makes by itself (re-subscriptions and the push token after
// a reconnect) neither count nor are refused: there are at most as many as subscriptions and
// watched users allow.
inline constexpr size_t kMaxPendingRequests = 1000;

class CHAT_EXPORT Client {
 public:
  // Validates `options` (InvalidArgument naming the field) and opens the cache (Unavailable if
  // the file cannot be opened, DataLoss if it is not a cache). Does not connect yet.
  static Result<std::unique_ptr<Client>> Open(ClientOptions options);

  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  // Close(). REQUIRES: not called from one of this client's own callbacks (Close() may be;
  // destroy the Client elsewhere afterwards): its loop would be destroyed while it runs.
  ~Client();

  // Runs the client on an internal thread (named "chat-client"; it blocks the signals sent to
  // the process, and what the callbacks start inherits that). FailedPrecondition if already
  // started, if Poll() was used, or after Close().
  Status Start();
  // Runs the client on the calling thread for at most about `timeout_ms` (0 = do what is
  // ready, do not wait): connects, reads, writes, fires timers and callbacks.
  // FailedPrecondition after Start() or Close(), or when called from one of its callbacks.
  Status Poll(int timeout_ms);
  // Disconnects and stops. Idempotent. No callback runs after it returns. The outbox stays in
  // the cache and is sent by the next Client opened on the same cache_path.
  void Close();

  // Commits a message to the outbox and returns its client_msg_id at once; it is sent when
  // connected. InvalidArgument if `conversation` is 0 or `content_type` is empty,
  // ResourceExhausted if the outbox holds outbox_max messages (pending and failed: Discard()
  // failed ones), FailedPrecondition after
  // Close(), Unavailable if the cache cannot be written.
  Result<std::string> Send(ConversationId conversation, std::string_view content_type,
                           std::string_view body);
  // The same, to the direct conversation with `peer` (created by the server on first send).
  Result<std::string> SendTo(std::string_view peer, std::string_view content_type,
                             std::string_view body);

  // Up to `limit` messages of `conversation` with seq < before_seq (0 = the newest), newest
  // first: from the cache when it holds the whole range, otherwise from the server.
  // `callback` is called exactly once on the loop thread (with Unavailable if the server is
  // needed and not connected, DeadlineExceeded if it does not answer within request_timeout_ms,
  // ResourceExhausted past kMaxPendingRequests), unless this returns an error: InvalidArgument
  // if conversation or limit is 0 or callback is empty, FailedPrecondition after Close().
  Status History(ConversationId conversation, Seq before_seq, uint32_t limit,
                 HistoryCallback callback);

  // --- Groups and channels ---
  // Each call below sends one request; `callback` is called exactly once with the new state
  // of the conversation (also stored in the cache and reported by OnConversationUpdated), or
  // with the server's error (e.g. PermissionDenied when not an admin), or with Unavailable
  // when not connected or the connection is lost before the reply, or with DeadlineExceeded
  // when the server does not answer within ClientOptions::request_timeout_ms (the request may
  // have been carried out: a late answer's state still reaches OnConversationUpdated), or with
  // ResourceExhausted, without a request, while kMaxPendingRequests requests wait for answers.
  // The client does not retry them. They return an error (and never call back): InvalidArgument
  // naming a bad argument or an empty callback, FailedPrecondition after Close(),
  // ResourceExhausted when too many calls wait for the loop.
  // Every change also arrives as a system message (MessageKind::kSystem) through OnMessage.

  // Creates a group or channel (`kind` kGroup or kChannel) with this user as admin.
  Status CreateGroup(std::string_view title, std::vector<UserId> members, ConversationKind kind,
                     ConversationCallback callback);
  Status RenameGroup(ConversationId conversation, std::string_view title,
                     ConversationCallback callback);
  Status AddMembers(ConversationId conversation, std::vector<UserId> users,
                    ConversationCallback callback);
  Status RemoveMembers(ConversationId conversation, std::vector<UserId> users,
                       ConversationCallback callback);
  // Leaves the conversation; what was received up to then stays readable.
  Status Leave(ConversationId conversation, ConversationCallback callback);
  // `role` kMember or kAdmin.
  Status SetRole(ConversationId conversation, std::string_view user, Role role,
                 ConversationCallback callback);
  // Sets the conversation's own retention: `retention_ms` 0 = the server's default, -1 = keep
  // forever, > 0 = messages older than this many ms are deleted. Admins of groups and channels
  // and either member of a direct conversation may set it (others get PermissionDenied). The
  // members see a system message (SystemEvent::Type::kRetentionChanged).
  // InvalidArgument if `retention_ms` < -1.
  Status SetRetention(ConversationId conversation, int64_t retention_ms,
                      ConversationCallback callback);
  // Channels push live messages only to subscribed members: subscribe while the channel is on
  // screen. Remembered and re-sent after every reconnect until Unsubscribe(). InvalidArgument
  // if conversation is 0, ResourceExhausted past kMaxChannelSubscriptions, FailedPrecondition
  // after Close(). A refusal by the server goes to OnError, and so does DeadlineExceeded when
  // the server does not answer within request_timeout_ms (the channel is synced all the same,
  // and subscribed again by the next connection or another Subscribe() call) or
  // ResourceExhausted past kMaxPendingRequests (subscribed by the next connection).
  Status Subscribe(ConversationId conversation);
  // Forgets the subscription (no later connection makes it) and, when connected, tells the
  // server. Its refusal is logged, not reported: refused for now (rate limit, overload), it is
  // sent again after the server's delay (at most 5 times, on the same connection), and until
  // then the channel's messages keep coming. InvalidArgument if conversation is 0,
  // FailedPrecondition after Close().
  Status Unsubscribe(ConversationId conversation);

  // --- Presence ---
  // Watches `users` (who must share a direct conversation or a group with this user) for as
  // long as this Client lives: every update reaches ClientListener::OnPresence, starting with
  // one per user giving the current state. The watched set is re-subscribed automatically after
  // every reconnect (the server forgets it with the connection). `callback` is called once with
  // the server's answer: Ok; PermissionDenied if one of the users shares no conversation with
  // this user (none of `users` is watched then); ResourceExhausted if more than
  // kMaxPresenceSubscriptions (or the server's lower limit) users would be watched, or past
  // kMaxPendingRequests (nothing changes); DeadlineExceeded if the server does not answer within
  // request_timeout_ms (the new users are not watched, as after a refusal).
  // While not connected the request waits for the connection (the callback with it).
  // A user who can no longer be watched when re-subscribing (e.g. removed from the shared
  // group) is dropped from the set and reported to OnError as PermissionDenied.
  // Returns (and never calls back): InvalidArgument if `users` is empty, holds an empty id, or
  // `callback` is empty; ResourceExhausted if `users` holds more than
  // kMaxPresenceSubscriptions; FailedPrecondition after Close(); ResourceExhausted when too
  // many calls wait for the loop.
  Status SubscribePresence(std::vector<UserId> users, StatusCallback callback);
  // Stops watching `users` (unknown ones are ignored); no OnPresence for them arrives after
  // `callback` is called (Ok; offline at once). Same argument errors as SubscribePresence.
  Status UnsubscribePresence(std::vector<UserId> users, StatusCallback callback);

  // --- Push notifications ---
  // Registers this device's push token (`platform` e.g. "apns", "fcm", "webhook"; the server
  // passes both to its PushNotifier) so the user is notified while no device is online. An empty
  // `token` unregisters the device. Call it once: the client remembers the latest token and sends
  // it again after every reconnect (the server treats a repeat as a no-op). `callback` is called
  // once with the server's answer to this call (DeadlineExceeded if none comes within
  // request_timeout_ms: the token is kept and sent again after the next reconnect;
  // ResourceExhausted, the call ignored, past kMaxPendingRequests); while not connected it waits
  // for the connection, and a newer call before that answers this one with Cancelled. Returns (and
  // never calls back): InvalidArgument if `platform` is empty or longer than kMaxPushPlatformBytes,
  // `token` is longer than kMaxPushTokenBytes or `callback` is empty; FailedPrecondition after
  // Close().
  Status RegisterPushToken(std::string_view platform, std::string_view token,
                           StatusCallback callback);

  // --- Receipts and typing ---
  // Delivered receipts are sent automatically when messages reach OnMessage. MarkRead moves
  // this user's read watermark (on all devices) to `seq`, or to the newest message given to
  // the application when `seq` is 0; it never moves backward and is capped at that newest
  // message. InvalidArgument if conversation is 0, FailedPrecondition after Close().
  Status MarkRead(ConversationId conversation, Seq seq = 0);
  // Tells the other members that this user is (or stopped) typing. Call it on every keystroke:
  // repeated active calls are sent at most every kTypingRefreshMs. Dropped while offline.
  Status SetTyping(ConversationId conversation, bool active);
  // Every member's watermarks (groups: who has read up to where). Same rules as CreateGroup.
  Status GetReceipts(ConversationId conversation, ReceiptsCallback callback);
  // The status of this user's message `seq` in `conversation` from the cached watermarks:
  // kRead, kDelivered or kSent. NotFound if the conversation is not cached.
  Result<MessageStatus> MessageStatusOf(ConversationId conversation, Seq seq);
  // Unread messages across the cached conversations: the sum of the counts Conversations()
  // lists.
  Result<uint64_t> UnreadTotal();

  // The cached conversations, most recently active first. An unread count reported but not
  // stored yet (the cache could not write it) is listed as reported, with the read_seq reported
  // with it, as UnreadTotal() counts it; a conversation reported but never stored is neither
  // listed nor counted.
  Result<std::vector<ConversationInfo>> Conversations();
  // The messages in the outbox (pending and failed), oldest first.
  Result<std::vector<MessageEvent>> Outbox();
  // Removes a failed message (MessageStatus::kFailed) from the outbox, freeing its place
  // under outbox_max. NotFound if the outbox has no message with this id, FailedPrecondition
  // if it is still pending (it may be on the wire) or after Close(), InvalidArgument if the
  // id is empty, Unavailable if the cache cannot be written.
  Status Discard(std::string_view client_msg_id);

  // Drops the connection and reconnects at once (e.g. after the network changed).
  // FailedPrecondition after Close().
  Status Reconnect();

  ConnectionState state() const;

  class Impl;

 private:
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace chat

#endif  // CHAT_CLIENT_H_
