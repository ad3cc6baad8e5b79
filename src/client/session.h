// Session: the client's protocol logic as a sans-IO state machine.
//
// The Session owns the connection lifecycle (connect -> Hello -> Welcome -> paged Sync -> live),
// heartbeats and dead-link detection, request timeouts, reconnect backoff, token refresh, the
// outbox pump, gap repair, epoch changes and History requests. It has no sockets, threads or clock
// of its own: the runtime (client.cc) or a unit test feeds it transport events, decoded envelopes,
// timer ticks and API calls, and carries out what it asks through SessionIo. It writes to the Cache
// and calls the ClientListener directly.
//
// Exactly-once delivery to the application: a message is given to OnMessage only when it is
// the next seq after the conversation's cursor (Cache's ConversationRow::cursor), and the cursor
// is committed before the callback. A message that arrives ahead of the cursor is kept in the
// cache and a Sync fetches what is missing; seqs the server reports as a Gap are skipped (the
// application may page them in with History).
//
// Thread-safety: none. Every method, and every SessionIo and listener call it makes, happens on
// one thread (the client's loop). SessionIo methods must not call back into the Session.
#ifndef CHAT_SRC_CLIENT_SESSION_H_
#define CHAT_SRC_CLIENT_SESSION_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chat/client.h"
#include "chat/clock.h"
#include "chat/v1/chat.pb.h"
#include "src/client/cache.h"
#include "src/core/backoff.h"

namespace chat::client {

// What the Session asks of its runtime.
class SessionIo {
 public:
  virtual ~SessionIo() = default;
  // Starts a new connection. OnOpen or OnClosed follows later, never inside this call.
  virtual void Open() = 0;
  // Drops the current connection. No event of that connection reaches the Session afterwards.
  virtual void Drop() = 0;
  // Queues one envelope on the current connection. False when the transport's queue is full.
  virtual bool Write(const v1::Envelope& envelope) = 0;
};

// The parts of ClientOptions the Session uses.
struct SessionOptions {
  std::string device_id;
  std::function<std::string()> token_provider;
  BackoffPolicy backoff;
  uint32_t heartbeat_interval_ms = 0;  // 0: the server's
  uint32_t connect_timeout_ms = 10'000;
  uint32_t request_timeout_ms = 30'000;
  uint32_t max_in_flight = 16;
  uint32_t sync_page_limit = 0;
  uint64_t max_message_bytes = 0;  // told to the server in Hello; 0: not told
};

// The heartbeat used when neither the options nor the server give one.
inline constexpr uint32_t kDefaultHeartbeatMs = 30'000;
// A Send refused with a retryable code is tried again after at least this long.
inline constexpr int64_t kOutboxRetryMinMs = 1'000;
// The longest retry_after_ms from the server that is followed (5 minutes).
inline constexpr uint32_t kMaxRetryAfterMs = 300'000;
// Errors held back during one cache transaction (the rest are logged only).
inline constexpr size_t kMaxHeldErrors = 16;
// More than any outbox holds (ClientOptions::outbox_max is far below it).
inline constexpr size_t kOutboxScanMax = 1'000'000;
// Typing indicators: shown at most this long unless refreshed (also when the server says more),
// and at most this many at once (further ones are ignored until some expire).
inline constexpr int64_t kTypingMaxShowMs = 6'000;
inline constexpr size_t kMaxTypingShown = 1'000;
// Receipt/Typing requests whose errors are recognised (older ones are forgotten).
inline constexpr size_t kMaxQuietRids = 1'024;
// Conversations whose retention floor is kept without a cache row (see rowless_floors_); past
// it the one kept longest is forgotten.
inline constexpr size_t kMaxRowlessFloors = 1'024;
// Requests given up whose late answers are recognised (the oldest are forgotten past it): as
// many as may wait for answers at once, so that all of them given up together are, on a server
// that answers nothing for a while: the application's, the channel re-subscriptions, the
// presence requests (the watched set's, one per user after a PermissionDenied, and the
// application's made offline), the push token's and the Sync asked again.
inline constexpr size_t kMaxExpiredRids =
    kMaxPendingRequests + kMaxChannelSubscriptions + 2 * kMaxPresenceSubscriptions + 3;
// A Receipt refused with a retryable code is sent again after at least this long.
inline constexpr int64_t kReceiptRetryMinMs = 1'000;
// An Unsubscribe refused for now (rate limit, overload) is sent again after the server's delay,
// at least this long, on the same connection and while the channel stays unsubscribed, at most
// kMaxUnsubscribeResends times; then the server's pushes of the channel are taken until the
// connection ends (a new one is not subscribed to it).
inline constexpr int64_t kUnsubscribeRetryMinMs = 1'000;
inline constexpr uint32_t kMaxUnsubscribeResends = 5;
// A Sync given up makes the next one (on this connection or the next) wait longer: twice as
// long per Sync given up in a row, up to this many doublings (8 x request_timeout_ms).
inline constexpr uint32_t kMaxSyncTimeoutDoublings = 3;
// After a Sync page the cache could not store in full (a full disk, an I/O error), the client
// goes live with what it holds and asks again after kSyncRetryMinMs, twice as long after each
// such page in a row, at most kSyncRetryMaxMs; a page stored starts over. Without it, what later
// pages held (a group the user was added to while offline) would wait for the next connection.
inline constexpr int64_t kSyncRetryMinMs = 1'000;
inline constexpr int64_t kSyncRetryMaxMs = 60'000;
// However long frames take to arrive, a request is given up at most kMaxWaitFactor x
// request_timeout_ms after it was sent, and one frame may take at most that long to arrive (or,
// when longer, request_timeout_ms plus max_message_bytes at kMinReceiveBytesPerSecond): a server
// that trickles a frame that never ends, or a slow link kept full by Delivers, would otherwise
// hold every request, and the link, for good.
inline constexpr int64_t kMaxWaitFactor = int64_t{1} << kMaxSyncTimeoutDoublings;
inline constexpr uint64_t kMinReceiveBytesPerSecond = 4 * 1024;
// Receipts are sent at most this often (all due conversations at once), so a burst of incoming
// messages costs a few Receipts, not one per loop turn, against the server's rate limit.
inline constexpr int64_t kReceiptIntervalMs = 100;
// In a group of more than kLargeGroupMembers members, a Receipt that moves only the delivered
// watermark goes kLargeGroupDeliveredDelayMs after the conversation's Receipt became due, not
// with the next flush; one whose read watermark moved keeps the kReceiptIntervalMs pace. The
// server does not tell the other members of such a group each member's receipts, only rises of
// the lowest watermarks over all members, and those wait for the slowest member anyway (32
// mirrors the default of ServerOptions::receipt_updates_max_members, which the client is not
// told). At the usual pace every member of a busy group would send about one Receipt per message
// received, each a write and an answered frame on the server.
inline constexpr uint32_t kLargeGroupMembers = 32;
inline constexpr int64_t kLargeGroupDeliveredDelayMs = 1'000;

class Session {
 public:
  // `cache`, `io`, `listener` and `clock` must outlive the Session. `random` returns uniformly
  // distributed 64-bit values (backoff jitter).
  Session(SessionOptions options, Cache* cache, SessionIo* io, ClientListener* listener,
          std::shared_ptr<Clock> clock, std::function<uint64_t()> random);

  // Begins connecting at the next Tick().
  void Start();
  // Drops the connection for good; nothing more is written or called back.
  void Stop();

  // --- Transport events ---
  void OnOpen();
  void OnClosed(int close_code, std::string_view reason);
  // A whole frame from the server, decoded.
  void OnEnvelope(const v1::Envelope& envelope);
  // Bytes of a frame that is not complete yet arrived (a large frame, or a slow link). The link
  // is alive and the server is sending: while a frame arrives no request is given up before its
  // ceiling (it may be the answer), and the time it takes does not count against any request's
  // deadline. A frame that takes longer than the ceiling drops the connection (kMaxWaitFactor).
  void OnReceiving();
  // The runtime stopped reading with bytes still coming (its bound on reads per turn): they may
  // hold answers, so until it says otherwise no request is given up before its ceiling, as while
  // a frame arrives.
  void SetInputPending(bool pending) { input_pending_ = pending; }

  // --- Time ---
  // Fires due timers (connect, heartbeat, dead link, request timeouts, reconnect, outbox retry).
  void Tick();
  // Monotonic ms of the next timer; the runtime calls Tick() by then.
  int64_t NextDeadlineMs() const;

  // --- API calls, already on the loop thread ---
  // A message was committed to the outbox: report it pending and send it when possible.
  void OnOutboxAdded(const OutboxEntry& entry);
  void History(ConversationId conversation, Seq before_seq, uint32_t limit,
               HistoryCallback callback);
  void Reconnect();

  // --- Groups, channels, receipts, typing ---
  // Sends `request` (a group operation; its rid is set here) and calls `callback` once with the
  // ConversationUpdate reply, the server's error, Unavailable when not connected or the
  // connection is lost first, DeadlineExceeded when no answer comes within request_timeout_ms,
  // or ResourceExhausted (nothing sent) when kMaxPendingRequests requests wait for answers.
  void ConversationRequest(v1::Envelope request, ConversationCallback callback);
  void GetReceipts(ConversationId conversation, ReceiptsCallback callback);
  // Remembered and (re-)sent whenever the session goes live. The server's Ok is followed by a
  // Sync (or, while one is in flight, by the one after it), which fetches what the channel got
  // while this connection was not subscribed. It waits for no other Subscribe's answer, nor for
  // its own past request_timeout_ms: then OnError gets DeadlineExceeded and the Sync goes anyway
  // (a late Ok brings one more). Not sent again on this connection.
  void Subscribe(ConversationId conversation);
  // Forgotten at once; sent when live. Its refusal is logged only; refused for now, it goes
  // again (see kMaxUnsubscribeResends).
  void Unsubscribe(ConversationId conversation);
  // Moves the read watermark forward (0: up to the cursor) and schedules a Receipt, which is
  // recorded in the cache with it (ConversationRow::receipt_due): sent on the first connection
  // even if this Session ends before the server answered.
  void MarkRead(ConversationId conversation, Seq seq);
  void SetTyping(ConversationId conversation, bool active);

  // --- Presence and push ---
  // Adds `users` to the watched set (re-subscribed whenever the session goes live) and sends a
  // PresenceSubscribe when live; otherwise the request waits for the connection. `callback` is
  // called once with the server's answer, or ResourceExhausted past the limit.
  void SubscribePresence(std::vector<UserId> users, StatusCallback callback);
  void UnsubscribePresence(std::vector<UserId> users, StatusCallback callback);
  // Remembers the token (sent again whenever the session goes live) and sends it when live.
  void RegisterPushToken(std::string platform, std::string token, StatusCallback callback);
  // The watched users (tests).
  const std::set<UserId>& watched() const { return presence_; }
  // Requests given up whose late answer has not come (tests).
  size_t given_up() const { return expired_.size(); }

  ConnectionState state() const;
  // The attempt number the next reconnect delay is computed from (tests).
  uint32_t attempt() const { return attempt_; }
  // Monotonic ms of the next connection attempt while disconnected (tests).
  int64_t reconnect_at_ms() const { return reconnect_at_; }

 private:
  enum class Phase { kStopped, kBackoff, kOpening, kHello, kSyncing, kLive, kClosed };

  // A cache transaction during which errors are held back: ReportError's OnError calls come
  // once it has ended and the cache's mutex is free. Called while the mutex was held, an
  // OnError that takes an application lock would deadlock with a thread that holds that lock
  // and calls Send() (which waits for the mutex).
  class CacheTxn {
   public:
    explicit CacheTxn(Session* session);
    ~CacheTxn();
    CacheTxn(const CacheTxn&) = delete;
    CacheTxn& operator=(const CacheTxn&) = delete;
    Status Commit();
    // False if BEGIN failed: writes made now would commit one by one. Reported then.
    bool Started();

   private:
    Session* const session_;
    std::optional<Cache::Transaction> txn_;
    bool committed_ = false;
  };

  // When a request waiting for its answer is given up, and what the server had served when it
  // was sent (see ExpireRequests). The time spent receiving frames after it was sent moves it
  // later (DueAt).
  struct Deadline {
    int64_t at_ms = 0;    // monotonic, as if no frame took time to arrive
    int64_t sent_ms = 0;  // monotonic; CeilingMs() after it, it passes whatever arrives
    uint64_t served = 0;  // served_ when sent
    int64_t excused = 0;  // ExcusedMs() when sent
  };
  struct PendingHistory {
    ConversationId conversation = 0;
    Seq before_seq = 0;  // 0: the newest
    HistoryCallback callback;
    Deadline deadline;
  };
  struct PendingOp {
    ConversationCallback conversation;
    ReceiptsCallback receipts;
    StatusCallback status;  // requests answered with Ok
    // PresenceSubscribe: the users asked for (empty for other requests).
    std::vector<UserId> presence;
    std::vector<UserId> added;  // the application's PresenceSubscribe: users it added to the set
    bool resumed = false;       // PresenceSubscribe: PresenceRequest::resumed
    bool push = false;          // RegisterPushToken
    uint64_t generation = 0;    // RegisterPushToken: push_generation_ when sent
    // Sent by the session itself (re-subscriptions, the push token after a reconnect): refusals
    // go to OnError, and it does not count against kMaxPendingRequests.
    bool automatic = false;
    bool catch_up = false;       // a Subscribe: its Ok starts a Sync (see SendSubscribe)
    ConversationId channel = 0;  // a Subscribe: its channel
    Deadline deadline;
  };
  struct PresenceRequest {
    std::vector<UserId> users;
    std::vector<UserId> added;  // not watched before this request; dropped if it is refused
    StatusCallback callback;
    // Sent as the session went live: the automatic re-subscription left its users watched
    // before to it, so if it is refused they are subscribed again on their own.
    bool resumed = false;
  };

  int64_t Now() const { return clock_->MonotonicMs(); }
  uint64_t NextRid() { return next_rid_++; }
  bool Authenticated() const { return phase_ == Phase::kSyncing || phase_ == Phase::kLive; }
  void SetPhase(Phase phase);
  bool Write(const v1::Envelope& envelope);
  // Drops the connection (if any) and schedules the next attempt.
  void Disconnect(std::string_view why);
  void ConnectionDown();

  // OnEnvelope's work, also for each envelope of a Batch.
  void HandleEnvelope(const v1::Envelope& envelope);
  // The frame that was arriving is complete, or the connection is gone.
  void EndReceiving();
  void HandleWelcome(const v1::Envelope& envelope);
  // Empties the cache for another store or user, failing the outbox messages that must not go
  // to it, in one transaction. False (reported, and the connection dropped) if it could not.
  bool RebuildForEpoch(const v1::Welcome& welcome, const std::string& cached_user);
  void HandleError(const v1::Envelope& envelope);
  void HandleSendAck(const v1::Envelope& envelope);
  void HandleSyncBatch(const v1::SyncBatch& batch);
  // Ok, or the protocol error that makes `batch` impossible to apply (a gap or state for
  // conversation 0, a gap past the conversation's last seq or above its cursor, a last seq past
  // the largest seq the cache holds).
  Status CheckSyncBatch(const v1::SyncBatch& batch);
  void HandleHistoryPage(uint64_t rid, const v1::HistoryPage& page);
  // Applies a conversation's state from the server; returns what the application is told (when
  // the cache could not store it, reported, with the lowest marks as stored: see StoreStates).
  ConversationInfo HandleConversationUpdate(const v1::ConversationState& state);
  void HandleReceiptUpdate(uint64_t rid, const v1::ReceiptUpdate& update);
  void HandleTypingUpdate(const v1::TypingUpdate& update);
  void HandlePresenceUpdate(const v1::PresenceUpdate& update);
  void HandleOk(uint64_t rid);
  // Registers a request waiting for its answer, with its deadline.
  void Track(uint64_t rid, PendingOp op);
  Deadline NewDeadline(int64_t timeout_ms) const;
  // ms spent receiving frames in pieces so far (only grows, at most as fast as the clock).
  int64_t ExcusedMs() const;
  // When `deadline` passes while no frame is arriving (at the latest at its ceiling).
  int64_t DueAt(const Deadline& deadline) const;
  // When `deadline` passes now: while a frame arrives, only at its ceiling.
  int64_t DueNow(const Deadline& deadline) const;
  // The longest a request waits, or a frame takes to arrive (see kMaxWaitFactor).
  int64_t CeilingMs() const;
  // The time a Sync gets: longer after Syncs given up in a row (kMaxSyncTimeoutDoublings).
  int64_t SyncTimeoutMs() const;
  // True when kMaxPendingRequests of the application's requests wait for answers: its next one
  // is refused with TooManyRequests(). The session's own are neither counted nor refused.
  bool RequestsFull() const;
  Status TooManyRequests() const;
  // Gives up the requests past their deadline (their callbacks get DeadlineExceeded); while a
  // frame is arriving, only those past their ceiling. Drops the connection if the server served
  // nothing since one of them was sent: it reads the connection (the link is alive) but serves no
  // request. A Sync given up on a connection that is served goes again, with more time. False if
  // the connection was dropped.
  bool ExpireRequests(int64_t now);
  // Remembers `rid` as given up (`channel`: a Subscribe's), so its late answer is recognised;
  // past kMaxExpiredRids the oldest is forgotten.
  void GiveUp(uint64_t rid, ConversationId channel);
  // Sends an Unsubscribe of `channel`, refused for now `resends` times before (0: the
  // application's). False if the connection was dropped.
  bool SendUnsubscribe(ConversationId channel, uint32_t resends);
  // The server refused an Unsubscribe: logged only. Refused for now, it is sent again after the
  // server's delay (see kMaxUnsubscribeResends).
  void UnsubscribeRefused(ConversationId channel, uint32_t resends, const Status& status);
  // Sends a Subscribe whose Ok is followed by a Sync, which fetches what the channel got before
  // the server pushed it to this connection; `automatic` when the session re-subscribes. False
  // if the connection was dropped.
  bool SendSubscribe(ConversationId channel, bool automatic);
  // Sends one PresenceSubscribe when live, else keeps `request` waiting for the connection.
  // An empty callback marks an automatic re-subscription, whose refusals go to OnError.
  void SendPresenceRequest(PresenceRequest request);
  void SendPushToken(StatusCallback callback);
  // Re-subscribes the watched set and sends the waiting requests (the session went live).
  void ResumePresenceAndPush();
  // The server refused a PresenceSubscribe or a RegisterPushToken.
  void PresenceRefused(PendingOp op, const Status& status);
  void PushRefused(PendingOp op, const Status& status);
  // A watched direct peer went offline: its conversation's peer_last_seen_ms moves forward.
  void UpdatePeerLastSeen(const UserId& user, int64_t last_seen_ms);
  // Which of a conversation's lowest watermarks (ConversationInfo::delivered_all_seq,
  // read_all_seq) rose.
  struct LowestRise {
    bool delivered = false;
    bool read = false;
  };
  // Raises `info`'s lowest watermarks to the given ones where those are higher: they never go
  // back (a state or update read before a later one may carry lower ones).
  static LowestRise RaiseLowest(ConversationInfo* info, Seq delivered_all_seq, Seq read_all_seq);
  // Tells the application of a conversation row: the status of the user's messages that the
  // rise of its lowest watermarks covers, then the conversation. A rise is told once the row
  // holding it is stored, never before: one the cache did not keep is listed again by the next
  // Sync, whose cursor names the marks stored, and told when that one is stored (told before as
  // well, it would be told twice). A row not stored is told with no rise and its lowest marks
  // as stored.
  void ReportStored(const ConversationInfo& info, LowestRise rise);
  // Takes the server's state of a conversation, keeping local watermarks that are ahead of it
  // (a Receipt not yet answered), a last seq no lower than the messages the cache holds, and the
  // highest lowest watermarks heard; returns which of those the state raised.
  LowestRise MergeState(ConversationRow* row, const v1::ConversationState& state);
  // Retention deleted messages up to a seq (conversation, up_to_seq), told to the application
  // once the cache transaction that dropped them is committed.
  using Expiry = std::pair<ConversationId, Seq>;
  // Inside a cache transaction: deletes the cached messages of `row`'s conversation with seq <=
  // `through` (never outbox entries), raises row->expired_through to it (the caller stores the
  // row) and, when the cache held some, notes them in `expired`. False if the cache failed
  // (reported).
  bool DropExpired(ConversationRow* row, Seq through, std::vector<Expiry>* expired);
  // Conversation states from the server as StoreStates stored them: the rows, with the rises of
  // their lowest watermarks, and what retention deleted from the cache.
  struct StoredState {
    ConversationRow row;
    LowestRise rise;
  };
  struct StoredStates {
    std::vector<StoredState> rows;
    std::vector<Expiry> expired;
    // When the cache failed: the conversations as told, which it holds as before
    // (KeepUnstored).
    std::vector<ConversationInfo> unstored;
  };
  // Stores the server's `states` in one cache transaction: merges each into its conversation's
  // row (MergeState), deletes the cached messages retention deleted (DropExpired) and writes the
  // row. False if the cache failed (reported): nothing of them is stored, and a conversation
  // known only from a Deliver is still synced from the start. `stored` then holds what may be
  // told of them: the rows merged, but with the lowest marks as the cache holds them and no rise
  // (the next Sync lists the states again, and a rise is told once stored), nothing expired, and
  // each row's info in `unstored` as well.
  bool StoreStates(const std::vector<const v1::ConversationState*>& states, StoredStates* stored);
  // StoreStates' transaction; false if the cache failed (reported), with nothing committed.
  bool WriteStates(const std::vector<const v1::ConversationState*>& states, StoredStates* out);
  // Tells the application what StoreStates stored, once it is committed, or what it could not
  // (kept first: KeepUnstored).
  void ReportStates(const StoredStates& stored);
  // The server's MessagesExpired notice.
  void HandleMessagesExpired(const v1::MessagesExpired& notice);
  // Updates the cached title, membership and role from a system message.
  void ApplySystemEvent(ConversationInfo* info, const v1::Message& message) const;
  // Makes a Receipt for `conversation` due from `at` (monotonic ms) on, unless it is due from
  // earlier already.
  void MakeReceiptDue(ConversationId conversation, int64_t at);
  // When a Receipt that moves only the delivered watermark of `info`'s conversation may go: now,
  // or kLargeGroupDeliveredDelayMs from now in a group of more than kLargeGroupMembers members.
  int64_t DeliveredReceiptAt(const ConversationInfo& info) const;
  // Sends one Receipt per conversation whose watermarks moved since the last flush and whose
  // Receipt is due.
  void FlushReceipts();
  // The server refused a Receipt for `conversation` for good: unless a later one is waiting or
  // unanswered, the cache owes none any more (else it would be sent again on every start).
  void ReceiptRefused(ConversationId conversation);
  void ExpireTyping();
  // The conversations in `unstored` are about to be told with counts the cache could not store:
  // from now on those it holds a row of count and are listed as told (Cache::KeepUnread).
  void KeepUnstored(const std::vector<ConversationInfo>& unstored);
  // Tells OnUnreadTotal the cache's total when it changed.
  void ReportUnreadTotal();
  // Sends a request whose reply nobody waits for; its error is only logged, as `what` refused.
  // False when the connection was dropped.
  bool WriteQuiet(v1::Envelope* envelope, const char* what);

  // Stores committed messages and gives every conversation's next seqs to the application.
  // False if the cache failed (reported): nothing of them is stored or given. The conversations
  // in `stated` (a Sync page's states, which the caller stores and reports next) are not
  // reported here: reported from the rows as stored, they would take back for a moment what a
  // state the cache could not store told before (a title, a read on another device).
  bool Ingest(const std::vector<const v1::Message*>& messages, bool from_sync,
              const std::set<ConversationId>& stated = {});
  // Moves `conversation`'s cursor over the cached messages that follow it; collects the events
  // to report after the commit. With `skip_to` (the end of a gap the server reported), the
  // cursor first passes every seq up to it, reporting the cached messages among them (received
  // live while a hole lay below them; the server no longer sends them). Returns true if a
  // message above the cursor is still missing.
  bool Advance(ConversationRow* row, std::vector<MessageEvent>* events, Seq skip_to = 0);
  // Advance's step over one message: the cursor moves to it and it is reported.
  void Apply(ConversationRow* row, const v1::Message& message, std::vector<MessageEvent>* events,
             bool* others, bool* read_moved);
  // The cached row to change and write, with the read watermark and unread count told but not
  // stored in place of the stored ones (Cache::ApplyKept).
  std::optional<ConversationRow> LoadRow(ConversationId conversation);
  // LoadRow's row, or a new one (with the retention floor of a notice that came before it).
  ConversationRow LoadOrStub(ConversationId conversation);
  // A new row of `conversation`, not stored yet, from the retention floor of a notice that came
  // before it (rowless_floors_, which it takes over once the open CacheTxn commits).
  ConversationRow NewRow(ConversationId conversation);
  // How far retention deleted `conversation`, as far as this client was told: `row`'s floor,
  // or without one the floor of a notice that came before it (rowless_floors_).
  Seq KnownFloor(ConversationId conversation, const std::optional<ConversationRow>& row) const;
  // Keeps `through` as `conversation`'s floor until it has a row (rowless_floors_).
  void KeepRowlessFloor(ConversationId conversation, Seq through);

  // Spends one token of the client-side send budget; false (and a retry timer) when empty.
  bool TakeSendToken();
  void SendSync();
  void RequestSync();
  // Asks for what the cache could not store (a live message, a state past the cursor) with a
  // Sync kSyncRetryMinMs (or the current retry delay) from now, unless a retry is due already.
  void RetrySyncLater();
  void PumpOutbox();
  // Marks a pending outbox entry failed and tells the application (kFailed with `reason`).
  // False if the cache could not record it (the entry stays pending).
  bool FailPending(const OutboxEntry& entry, const Status& reason);
  // Logs `status` and tells OnError, after the current CacheTxn if one is open.
  void ReportError(const Status& status);
  MessageEvent EventFor(const v1::Message& message) const;

  const SessionOptions options_;
  Cache* const cache_;
  SessionIo* const io_;
  ClientListener* const listener_;
  const std::shared_ptr<Clock> clock_;
  const std::function<uint64_t()> random_;

  Phase phase_ = Phase::kStopped;
  ConnectionState reported_ = ConnectionState::kDisconnected;
  uint64_t next_rid_ = 1;
  uint64_t hello_rid_ = 0;
  std::string user_id_;
  uint32_t heartbeat_ms_ = kDefaultHeartbeatMs;

  int64_t reconnect_at_ = 0;
  int64_t connect_deadline_ = 0;
  int64_t live_at_ = 0;  // when the current connection went live (its first Sync answered)
  int64_t last_rx_ = 0;
  int64_t next_ping_ = 0;
  uint32_t attempt_ = 0;
  uint32_t retry_after_ms_ = 0;  // floor for the next reconnect delay, from the server
  bool token_expired_ = false;   // the server said the token expired: refresh at once
  bool refreshed_last_ = false;  // the current attempt is such a refresh (until its Welcome)

  uint64_t sync_rid_ = 0;  // 0: no Sync in flight
  Deadline sync_deadline_;
  uint32_t sync_timeouts_ = 0;  // Syncs given up in a row (SyncTimeoutMs)
  bool sync_again_ = false;
  // A page the cache could not store: a Sync goes at sync_retry_at_ (monotonic ms; 0: none due,
  // and a Sync sent for any reason does its work), sync_retry_ms_ after the page (0 once a page
  // is stored; see kSyncRetryMinMs). A live message or a ConversationUpdate past the cursor
  // that the cache could not store sets it too, when none is due (RetrySyncLater); a page stored
  // then brings it to at most kSyncRetryMinMs after that page.
  int64_t sync_retry_at_ = 0;
  int64_t sync_retry_ms_ = 0;
  std::set<ConversationId> stubs_;  // known only from a Deliver: ask Sync for their state
  // Retention's floor (ConversationRow::expired_through) told by MessagesExpired notices for
  // conversations the cache had no row for (the user was just added, and the Sync bringing the
  // conversation is in flight): a row made later starts from it, and a History page of such a
  // conversation is cut at it, so that a reply the server read before its sweep stores and shows
  // none of what it deleted. Forgotten once a row made from it is committed (the row holds it),
  // and with the epoch; at most kMaxRowlessFloors.
  struct RowlessFloor {
    Seq through = 0;
    uint64_t order = 0;  // when kept: past the bound the oldest goes
  };
  std::map<ConversationId, RowlessFloor> rowless_floors_;
  uint64_t rowless_order_ = 0;
  // The conversations whose rowless floor a row was made from in the open CacheTxn (at most
  // kMaxRowlessFloors): their floors go when it commits, if the row is there.
  std::set<ConversationId> floors_taken_;

  std::map<uint64_t, std::string> in_flight_;  // rid -> client_msg_id
  std::set<std::string> in_flight_ids_;
  int txn_depth_ = 0;                // open CacheTxns
  std::vector<Status> held_errors_;  // reported when the last CacheTxn ends; at most kMaxHeldErrors
  int64_t outbox_retry_at_ = 0;
  // Sends are paced below the server's messages_per_second (told in Welcome), so a burst from
  // the outbox is not refused by the rate limit, which could reorder it within the window.
  double send_rate_ = 0;  // tokens per ms; 0 = no limit
  double send_capacity_ = 0;
  double send_tokens_ = 0;
  int64_t send_tokens_at_ = 0;
  // The server's bounds from Welcome (0 = not told): a message past them is failed here, since
  // the server would close the connection on it (too large a frame) and the outbox would send
  // it again after every reconnect, with nothing behind it ever sent.
  uint64_t max_body_bytes_ = 0;
  uint64_t max_frame_bytes_ = 0;

  std::map<uint64_t, PendingHistory> histories_;

  // What the server served so far: answers (frames with a rid, but Pongs) and Delivers, each
  // counted once complete. A Pong proves the link alive, not that the server serves requests
  // (it may answer Pings while its store is stuck).
  uint64_t served_ = 0;
  // A frame is arriving in pieces since receiving_since_ (monotonic ms). excused_ms_ sums the
  // time earlier frames took to arrive that way: a 2 MiB Sync page takes a minute on a slow
  // link, and that is not the server being late.
  bool receiving_ = false;
  bool input_pending_ = false;  // SetInputPending
  int64_t receiving_since_ = 0;
  int64_t excused_ms_ = 0;
  // Requests given up (rid -> the channel of a Subscribe, else 0; at most kMaxExpiredRids): a
  // late answer is ignored (a Subscribe's Ok still starts a catch-up Sync) and erases its entry.
  std::map<uint64_t, ConversationId> expired_;
  // ops_, like histories_, is in rid order, which is the order of the deadlines (one timeout, a
  // monotonic clock): the first entry expires first.
  std::map<uint64_t, PendingOp> ops_;  // rid -> callback; failed when the link drops
  // Typing requests and Pings not answered yet (bounded): rid -> what they were, for the log.
  std::map<uint64_t, const char*> quiet_rids_;
  // (conversation, first_seq) of History pages that made this connection sync (see
  // HandleHistoryPage): each only once.
  std::set<std::pair<ConversationId, Seq>> history_syncs_;
  // Conversations whose watermarks moved and whose Receipt was not sent yet (one entry each, as
  // the conversations in the cache) -> the monotonic ms from which it may go.
  std::map<ConversationId, int64_t> receipts_due_;
  // What receipts_due_ held, for each conversation the open CacheTxn made a Receipt due for
  // (nullopt: none was due): put back if the transaction rolls back, since the cache then holds
  // the watermarks as they were and no Receipt is owed for the moves it did not keep.
  std::map<ConversationId, std::optional<int64_t>> receipts_due_before_;
  int64_t receipts_sent_at_ = -kReceiptIntervalMs;  // monotonic ms of the last flush
  int64_t receipts_retry_at_ = 0;  // a Receipt was refused for now: no flush before then
  // Receipts the server has not answered yet (rid -> what was sent, at most kMaxQuietRids): due
  // again when the connection is lost or the server refuses one for now, since nothing else
  // would send those watermarks again. The watermarks tell whether the answer settles the
  // current ones (HandleReceiptUpdate).
  struct SentReceipt {
    ConversationId conversation = 0;
    Seq delivered_seq = 0;
    Seq read_seq = 0;
  };
  std::map<uint64_t, SentReceipt> receipts_unanswered_;
  std::set<ConversationId> subscriptions_;  // channels to Subscribe after every connect
  // Unsubscribes the server has not answered (rid -> the channel, and how many times it was
  // refused for now before; at most kMaxQuietRids), and the channels whose Unsubscribe was
  // refused for now, sent again at unsubscribes_retry_at_ (-> resends so far; at most
  // kMaxChannelSubscriptions). Both end with the connection: the server forgets its
  // subscriptions with it.
  struct SentUnsubscribe {
    ConversationId channel = 0;
    uint32_t resends = 0;
  };
  std::map<uint64_t, SentUnsubscribe> unsubscribes_;
  std::map<ConversationId, uint32_t> unsubscribes_due_;
  int64_t unsubscribes_retry_at_ = 0;
  std::map<std::pair<ConversationId, UserId>, int64_t> typing_;  // -> monotonic expiry
  struct TypingSent {
    bool active = false;
    int64_t at = 0;
  };
  std::map<ConversationId, TypingSent> typing_sent_;
  uint64_t unread_total_ = 0;  // last value reported by OnUnreadTotal

  // Presence: the watched users and the application's subscribe requests waiting for the
  // connection (both bounded by presence_limit_).
  std::set<UserId> presence_;
  std::vector<PresenceRequest> presence_waiting_;
  size_t presence_limit_ = kMaxPresenceSubscriptions;  // lowered by the server's Welcome
  // Push: the latest token, sent whenever the session goes live, and the callback of the call
  // that set it while it waits for the connection.
  struct PushToken {
    std::string platform;
    std::string token;
  };
  std::optional<PushToken> push_;
  uint64_t push_generation_ = 0;  // bumped by every RegisterPushToken call
  StatusCallback push_waiting_;
};

}  // namespace chat::client

#endif  // CHAT_SRC_CLIENT_SESSION_H_
