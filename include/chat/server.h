// Server: the chat server core, embeddable in any process.
//
//   chat::ServerOptions options;
//   options.port = 8080;
//   options.store = chat::NewSqliteStore({.path = "chat.db"}).value();
//   options.authenticator = chat::NewJwtAuthenticator({.secrets = {{"", secret}}}).value();
//   auto server = chat::Server::Open(std::move(options));
//   if (!server.ok()) return 1;
//   (*server)->Run();  // until Shutdown() from a signal handler thread or another thread
//
// Runtime: one event-loop thread owns every connection (libwebsockets) and the protocol logic;
// one writer thread commits messages in groups; reader threads serve sync and history, so the
// loop never waits on disk. Nothing is acked or delivered before it is committed.
//
// Thread-safety: Open, Run and Start are called once, from one thread. Shutdown and port may be
// called from any thread, any number of times.
#ifndef CHAT_SERVER_H_
#define CHAT_SERVER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "chat/auth.h"
#include "chat/clock.h"
#include "chat/export.h"
#include "chat/presence.h"
#include "chat/push.h"
#include "chat/status.h"
#include "chat/store.h"

namespace chat {

struct ServerOptions {
  // --- Network ---
  std::string listen_address = "127.0.0.1";  // IPv4/IPv6 literal or interface name
  uint16_t port = 8080;                      // 0: pick a free port; see Server::port()
  std::string tls_cert_path;                 // PEM; with tls_key_path set, serve wss only
  std::string tls_key_path;                  // PEM

  // --- Parts (traits) ---
  std::shared_ptr<MessageStore> store;           // required
  std::shared_ptr<Authenticator> authenticator;  // required
  std::shared_ptr<Clock> clock;                  // default: SystemClock()
  uint32_t node_id = 0;                          // Snowflake node id, 0..1023

  // --- Limits ---
  size_t max_message_bytes = 256 * 1024;  // one assembled WebSocket message; close 1009 past it
  // The same before the connection's Hello succeeded (so unauthenticated connections hold
  // little); at least 1024. A Hello is its token and a few short fields.
  size_t max_hello_bytes = 16 * 1024;
  // What libwebsockets allocates per connection to receive into (128..65536). A message larger
  // than this arrives in pieces that the server reassembles (a little CPU per such message);
  // each byte here is a byte of every idle connection. 256 holds a typical chat envelope whole.
  size_t receive_buffer_bytes = 256;
  size_t max_body_bytes = 64 * 1024;          // Send.body
  uint32_t max_attachments = 16;              // per message
  uint32_t hello_timeout_ms = 10'000;         // from connect to a valid Hello; close 4001 after
  uint32_t idle_timeout_ms = 90'000;          // without any frame from the client; close 4002
  uint32_t heartbeat_interval_ms = 30'000;    // told to clients in Welcome
  size_t max_outbound_bytes = 1024 * 1024;    // per connection, +16 B/envelope; then slow consumer
  uint32_t messages_per_second = 200;         // per connection, sustained (token bucket)
  uint32_t messages_burst = 400;              // per connection, bucket size
  size_t bytes_per_second = 4 * 1024 * 1024;  // per connection, inbound
  uint32_t max_devices_per_user = 16;         // concurrent connections of one user
  uint32_t max_pending_connections = 1024;    // connections that have not sent Hello yet
  uint32_t max_connections = 19'000;          // all connections; refused with UNAVAILABLE past it
  uint32_t history_page_max = 200;            // messages per HistoryPage
  uint32_t sync_page_max = 500;               // messages per SyncBatch
  uint32_t sync_catchup_max = 1000;           // per conversation; past it Sync returns a Gap
  uint32_t max_group_members = 500;           // per group, creator included; 0 = no cap
  uint32_t max_channel_members = 1'000'000;   // per channel, creator included; 0 = no cap
  uint32_t max_channel_subscriptions = 64;    // channels one connection receives live at once
  // Groups of at most this many members (0 = every group) tell every member's receipt to the
  // other members; larger ones only news of the lowest watermarks over all members
  // (docs/conversations.md). Direct conversations always tell every receipt.
  uint32_t receipt_updates_max_members = 32;
  uint32_t typing_expires_ms = 6000;   // told in TypingUpdate: show no longer unless refreshed
  uint32_t typing_interval_ms = 1000;  // typing repeats per device and conversation within
                                       // this are dropped; a change of state always passes

  // --- Presence (see docs/presence.md) ---
  std::shared_ptr<PresenceRegistry> presence;  // null: in-process registry (single node)
  uint32_t presence_ttl_ms = 60'000;     // a device not heard from for this long is not online;
                                         // must be > heartbeat_interval_ms
  uint32_t presence_grace_ms = 5000;     // after the last device went: offline only after this;
                                         // 0 = at once
  uint32_t presence_coalesce_ms = 1000;  // at most one PresenceUpdate per watched user per
                                         // this many ms; > 0
  uint32_t max_presence_subscriptions = 256;  // users one connection watches at once; > 0

  // --- Store threads ---
  uint32_t commit_batch_max = 512;  // messages per transaction, at most
  // Under load (at least commit_delay_min_batch messages, receipts or changes queued up while
  // the previous commit ran), the writer waits up to this long for more before the next
  // commit, so each carries more of them; below that load they are committed at once.
  // 0 = never wait; at most 1000. commit_delay_min_batch 0 = always wait.
  uint32_t commit_delay_ms = 2;
  uint32_t commit_delay_min_batch = 32;
  size_t writer_queue_max = 20'000;  // messages waiting for commit; past it reads pause
  uint32_t reader_threads = 2;       // threads serving Sync and History

  // --- Retention (see docs/retention.md) ---
  // Messages older than this are deleted by a background sweep, unless their conversation has
  // its own retention (MessageStore::SetRetention). Milliseconds; 0 = keep forever (default).
  int64_t retention_ms = 0;
  uint32_t retention_sweep_interval_ms = 60'000;  // between sweeps; 0 = never sweep
  // Messages deleted per transaction, at most (with the dropped keys of resend_window); >= 1.
  uint32_t retention_batch_max = 1000;
  // A deleted message's client_msg_id is remembered this long after the deletion, so a device
  // resending it (offline past the retention with the ack lost) gets the original's ack as a
  // duplicate instead of storing it again (SweepRequest::resend_window_ms). 0 = forgotten with
  // the message.
  int64_t retention_resend_window_ms = 7LL * 24 * 60 * 60 * 1000;

  // --- Push (see chat/push.h) ---
  std::shared_ptr<PushNotifier> push;  // null: no push notifications
  uint32_t push_collapse_ms = 2000;    // one notification per (user, conversation) per window
  bool push_preview = true;            // false: notifications carry no message body

  // --- HTTP ---
  bool serve_healthz = true;  // GET /healthz answers 200 "ok"
};

// Serves libwebsockets' per-connection structs from a pool of equal 960-byte slots rather than
// the process's malloc (docs/server.md, "Allocator"): with jemalloc, whose 1,024-byte class would
// place them 1 KiB apart, each connection takes 64 bytes less and adding or closing connections
// much less CPU (libwebsockets reads a field of every connection's struct then). Every other
// allocation of libwebsockets keeps malloc. Process-wide: it installs libwebsockets' allocator,
// for the server's and the client's connections alike, in place of any installed before, so it
// is the application's choice. Call it once, before anything in the process uses libwebsockets
// (blocks allocated before it are later freed with free(): an allocator installed earlier must
// be malloc's); later calls do nothing. The pool's slabs go back to malloc only when all their
// slots are free.
CHAT_EXPORT void PoolConnectionMemory();

class CHAT_EXPORT Server {
 public:
  // Validates `options` (InvalidArgument naming the field), binds the port (Unavailable if
  // it cannot), and returns a server that is not yet serving.
  static Result<std::unique_ptr<Server>> Open(ServerOptions options);

  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  virtual ~Server() = default;  // shuts down if still running

  // Serves on the calling thread until Shutdown(). Returns the reason serving stopped.
  virtual Status Run() = 0;
  // Serves on a thread of its own (named "chat-server"; it blocks the signals sent to the
  // process, and what the hooks start inherits that); returns at once.
  virtual Status Start() = 0;
  // Graceful: stops accepting, commits what is queued, closes sessions with 1001, and makes
  // Run() return (or joins the Start() thread). Safe from any thread and from signal-driven
  // code paths that are not async-signal contexts.
  virtual void Shutdown() = 0;
  // The bound port (useful with options.port = 0).
  virtual uint16_t port() const = 0;

 protected:
  Server() = default;
};

}  // namespace chat

#endif  // CHAT_SERVER_H_
