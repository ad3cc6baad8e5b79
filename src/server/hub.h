// Hub: the server's protocol logic as a sans-IO state machine.
//
// The Hub owns sessions (handshake, limits, timeouts), routing, fan-out and the rules of the
// protocol. It has no sockets, threads, clocks or disk of its own: the runtime feeds it frames
// and store completions and carries out what it asks through HubIo. The same Hub runs under the
// libwebsockets runtime (server.cc) and under unit tests that drive it with a fake clock and
// the in-memory store.
//
// Thread-safety: none. Every method, and every HubIo call it makes, happens on one thread (the
// event loop). HubIo methods must not call back into the Hub re-entrantly.
#ifndef CHAT_SRC_SERVER_HUB_H_
#define CHAT_SRC_SERVER_HUB_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "chat/auth.h"
#include "chat/clock.h"
#include "chat/server.h"
#include "chat/status.h"
#include "chat/store.h"
#include "src/core/codec.h"

namespace chat::server {

using SessionId = uint64_t;

// WebSocket close codes the Hub uses (RFC 6455 and the application range).
inline constexpr int kCloseNormal = 1000;
inline constexpr int kCloseGoingAway = 1001;          // server shutdown
inline constexpr int kCloseProtocolError = 1002;      // frame the protocol does not allow
inline constexpr int kCloseInvalidPayload = 1007;     // undecodable frame (bad protobuf/JSON/UTF-8)
inline constexpr int kClosePolicy = 1008;             // e.g. a second Hello
inline constexpr int kCloseTooLarge = 1009;           // message over max_message_bytes
inline constexpr int kCloseTryAgainLater = 1013;      // overload
inline constexpr int kCloseUnauthenticated = 4001;    // no/invalid Hello, bad token, hello timeout
inline constexpr int kCloseIdleTimeout = 4002;        // no frame within idle_timeout_ms
inline constexpr int kCloseSlowConsumer = 4003;       // outbound queue stayed over its cap
inline constexpr int kCloseTooManyDevices = 4004;     // max_devices_per_user reached
inline constexpr int kCloseClientLimitTooLow = 4005;  // Hello.max_message_bytes too low

// The most envelopes a client may pack into one Batch: each is served (and may be answered)
// before the next frame is read, so a frame of tiny envelopes must not become a flood.
inline constexpr int kMaxClientBatchEnvelopes = 256;

// The most bytes one stored message can take in a frame this server writes (a Deliver, or a
// SyncBatch or HistoryPage carrying it alone with its conversation's state), in `format`. A
// client whose Hello.max_message_bytes is lower is refused: such a message would close its
// connection (1009) every time it came, and the client could never get past it.
size_t LargestMessageFrameBytes(const ServerOptions& options, codec::Format format);

// The refusal of a connection's message after an earlier one of its messages was not stored
// (UNAVAILABLE, retry after 1 s): its messages are stored in the order it sent them, so it must
// send that one again first (a client resending its outbox in order does). The Hub (rate limit)
// and the writer (overload, failed commit) both answer with it.
inline Status HeldSendStatus() {
  Status status =
      Unavailable("an earlier message from this connection was not stored; send it again first");
  status.set_retry_after_ms(1000);
  return status;
}

// Such a hold ends this long after the refusal even if the refused message never came again: a
// client that gave it up (it saw it stored after all, or the user discarded it) must not have
// every later message refused for as long as its connection lasts.
inline constexpr uint32_t kHeldSendTimeoutMs = 30'000;

// A unit of work for the store's writer thread. `token` comes back in OnAppendDone.
struct AppendJob {
  uint64_t token = 0;
  AppendRequest request;
  // The connection a user message came from (0: none). A connection's messages are stored in
  // the order it sent them: once one of them is not stored, the writer refuses its later ones
  // until that one is sent again (StoreThreads).
  SessionId session = 0;
};

// The push tokens and badges of users about to be notified (MessageStore::PushTargets).
struct PushTargetsQuery {
  std::vector<UserId> users;
};

// A unit of work for a store reader thread. `token` comes back in OnReadDone.
struct ReadJob {
  uint64_t token = 0;
  std::variant<SyncQuery, HistoryQuery, ReceiptsQuery, PresenceQuery, PushTargetsQuery> query;
};
// One alternative per query type, in the same order.
using ReadResult = std::variant<Result<SyncReply>, Result<HistoryReply>, Result<ReceiptsReply>,
                                Result<PresenceReply>, Result<std::vector<PushTarget>>>;

// Runs `job` on `store` (on a reader thread).
inline ReadResult RunReadJob(MessageStore& store, const ReadJob& job) {
  switch (job.query.index()) {
    case 0:
      return store.Sync(std::get<0>(job.query));
    case 1:
      return store.History(std::get<1>(job.query));
    case 2:
      return store.Receipts(std::get<2>(job.query));
    case 3:
      return store.Presence(std::get<3>(job.query));
    default:
      return store.PushTargets(std::get<4>(job.query).users);
  }
}

// The completion of `job` when it was refused with `status` before it ran.
inline ReadResult FailedRead(const ReadJob& job, const Status& status) {
  switch (job.query.index()) {
    case 0:
      return Result<SyncReply>(status);
    case 1:
      return Result<HistoryReply>(status);
    case 2:
      return Result<ReceiptsReply>(status);
    case 3:
      return Result<PresenceReply>(status);
    default:
      return Result<std::vector<PushTarget>>(status);
  }
}

// What the Hub asks of its runtime.
class HubIo {
 public:
  virtual ~HubIo() = default;
  // Queue an encoded envelope (in the session's format) for the session. The runtime packs
  // queued frames into Batch frames and closes the session as a slow consumer if its queue
  // stays over max_outbound_bytes.
  virtual void Send(SessionId session, codec::Frame frame) = 0;
  // Send a close frame with `code` and `reason` after the queued frames, then drop the
  // connection. The Hub forgets the session at once; OnClose will not be called for it.
  virtual void Close(SessionId session, int code, std::string_view reason) = 0;
  // Hand a message to the writer. Completions arrive in OnAppendDone in submission order, except
  // that jobs refused at once (past the writer's bound, or held back behind a refused message of
  // their connection) complete early.
  virtual void SubmitAppend(AppendJob job) = 0;
  // Hand a query to a reader. Completions arrive in OnReadDone in any order.
  virtual void SubmitRead(ReadJob job) = 0;
  // The session's Hello succeeded: it may now send messages up to max_message_bytes (before,
  // up to max_hello_bytes). `client_max_bytes` is the largest WebSocket message its client
  // accepts (0: not told): queued frames are packed into Batch frames that stay within it. A
  // runtime that does not pack or bound messages ignores it.
  virtual void Welcomed(SessionId /*session*/, size_t /*client_max_bytes*/) {}
};

class Hub {
 public:
  // `options` must already be validated; `io`, `clock` and `authenticator` outlive the Hub.
  // `epoch` is the store's Epoch(), told to clients in Welcome.
  Hub(const ServerOptions& options, uint64_t epoch, HubIo* io);
  ~Hub();
  Hub(const Hub&) = delete;
  Hub& operator=(const Hub&) = delete;

  // A connection was accepted. Returns false (and the runtime closes it with 1013) when the
  // server is over max_connections or max_pending_connections.
  // REQUIRES: `session` is not 0 and was never used before (late store completions are matched
  // by id); 0 is refused.
  bool OnOpen(SessionId session);
  // One complete WebSocket message. `text` selects the JSON mapping, else binary protobuf.
  // The runtime has already enforced max_message_bytes.
  void OnFrame(SessionId session, std::string_view bytes, bool text);
  // The connection is gone (peer closed, network error), or the runtime began closing it on its
  // own (slow consumer, message too large): nothing more is read from it into the Hub. Not
  // called after a Close the Hub asked for.
  void OnClose(SessionId session);

  void OnAppendDone(uint64_t token, const Status& commit_status, AppendResult result);
  void OnReadDone(uint64_t token, ReadResult result);
  // Retention passes deleted messages (SweepResult::expired, in pass order): each conversation's
  // recipients' online devices get a MessagesExpired notice (a channel's: the connections
  // subscribed to it), those whose Hello set accepts_messages_expired. The runtime hands
  // them over after the appends committed before them.
  void OnMessagesExpired(std::span<const ExpiredRange> expired);

  // Called by the runtime at least every 100 ms: hello and idle timeouts, rate-limit refill,
  // presence (expiry, grace periods, coalesced updates, last-seen persistence).
  void Tick();

  // Shutdown: persist the last seen of the users online here, then close every session with
  // 1001. Appends already submitted still complete.
  void CloseAll();

  // For the runtime's overload decisions and for tests.
  size_t session_count() const;
  size_t pending_appends() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace chat::server

#endif  // CHAT_SRC_SERVER_HUB_H_
