// PresenceTracker: what the Hub tells watchers about users' presence, as a sans-IO helper.
//
// The PresenceRegistry counts live devices (over all nodes); the tracker turns those counts
// into what subscribers see. A user is online while the registry counts at least one device.
// When the count drops to zero the user stays online for the grace period, so a reconnect in
// between shows nothing at all; only when the grace period ends with no device back does the
// user go offline, with last seen = the moment the last device went. Updates go to the
// connections watching the user, coalesced: at most one per coalesce interval per user,
// carrying the latest state, and none when the state equals the last one sent. Subscriptions
// that a membership change may have made illegal are suspended (nothing is delivered for
// them) until the Hub's re-check through the store resolves them.
//
// Last seen is persisted through the Sink: when a user goes offline (after the grace
// period), every heartbeat interval for the users online on this node, and for all of them at
// shutdown (PersistAll).
//
// Thread-safety: none; the Hub's thread only. Sink calls never re-enter the tracker.
#ifndef CHAT_SRC_SERVER_PRESENCE_TRACKER_H_
#define CHAT_SRC_SERVER_PRESENCE_TRACKER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <queue>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "chat/clock.h"
#include "chat/presence.h"
#include "chat/server.h"
#include "chat/types.h"

namespace chat::server {

// What a watcher is told about one user (chat.v1.PresenceUpdate).
struct PresenceState {
  bool online = false;
  uint32_t devices = 0;      // live devices; 0 when offline
  int64_t last_seen_ms = 0;  // wall ms: online: now; offline: when last online (0 = never)
};

class PresenceTracker {
 public:
  using SessionId = uint64_t;

  class Sink {
   public:
    virtual ~Sink() = default;
    // A PresenceUpdate (rid 0) about `user` for `session`.
    virtual void SendPresence(SessionId session, const UserId& user,
                              const PresenceState& state) = 0;
    // Store `users`' last seen as `wall_ms` (through the writer; fire and forget).
    virtual void PersistLastSeen(std::vector<UserId> users, int64_t wall_ms) = 0;
    // Store each of `users`' last seen as its entry of `wall_ms` (same order).
    virtual void PersistLastSeenEach(std::vector<UserId> users, std::vector<int64_t> wall_ms) = 0;
  };

  // `options` must be validated; `registry` (non-null), `clock` and `sink` outlive the tracker.
  PresenceTracker(const ServerOptions& options, std::shared_ptr<PresenceRegistry> registry,
                  Clock* clock, Sink* sink);
  PresenceTracker(const PresenceTracker&) = delete;
  PresenceTracker& operator=(const PresenceTracker&) = delete;

  // --- This node's devices ---
  // The first connection of (user, device) on this node authenticated.
  void DeviceUp(const UserId& user, const DeviceId& device);
  // The last connection of (user, device) on this node is gone.
  void DeviceDown(const UserId& user, const DeviceId& device);
  // A connection of (user, device) was heard from at `heard_ms` (monotonic): the device is live
  // until heard_ms + presence_ttl_ms.
  void DeviceHeard(const UserId& user, const DeviceId& device, int64_t heard_ms);
  // How often the Hub should call DeviceHeard for every live connection so that a client
  // heartbeating on time never expires: half the margin between the TTL and the heartbeat.
  int64_t refresh_interval_ms() const;

  // --- Subscriptions ---
  // Users `session` watches.
  size_t watch_count(SessionId session) const;
  // How many of `users` (distinct) `session` does not watch yet.
  size_t CountNew(SessionId session, const std::vector<UserId>& users) const;
  // `session` (of user `watcher`) watches `target` from now on (again: no change, but a
  // suspended subscription is resumed). `stored_last_seen_ms` is the store's value. Returns the
  // current state, for the reply.
  PresenceState Watch(SessionId session, const UserId& watcher, const UserId& target,
                      int64_t stored_last_seen_ms);
  void Unwatch(SessionId session, const UserId& target);
  bool watches(SessionId session, const UserId& target) const;
  // The connection is gone: all its subscriptions end.
  void ForgetSession(SessionId session);
  // `removed` lost a conversation: suspends every subscription of or on them and returns, per
  // session, the targets to re-check with the store.
  std::map<SessionId, std::vector<UserId>> Suspend(const std::vector<UserId>& removed);
  // The re-check's verdict: resume the subscription (and send the current state if an update
  // was held back meanwhile), or drop it. Ignored unless the subscription is suspended.
  void Resolve(SessionId session, const UserId& target, bool allowed);
  // Drops every suspended subscription of `session` (its re-check failed).
  void DropSuspended(SessionId session);

  // --- Time ---
  // Registry changes, grace periods that ended, coalesced updates that are due, periodic
  // persistence. Call at least every 100 ms.
  void Tick();
  // Shutdown: persists last seen for every user online on this node.
  void PersistAll();

  // The state watchers of `user` would be told now (for tests and the subscribe reply).
  PresenceState Current(const UserId& user);

 private:
  // Ordered to pack: one per online or watched user (what watchers were last told lives with
  // the watchers, in Watched, so an unwatched online user costs only this).
  struct Entry {
    uint32_t local_devices = 0;    // this node's devices of the user
    uint32_t shown_devices = 0;    // as shown while online
    uint32_t watchers = 0;         // subscriptions on this user
    bool had_local = false;        // a local device was up during this online period
    bool online = false;           // as shown to watchers (still online during grace)
    bool wrote_last_seen = false;  // last_seen_ms went to the store from here (may be pending)
    int64_t last_seen_ms = 0;      // wall: when last online, once offline
    int64_t went_ms = 0;           // wall: when the device count last dropped to zero
    int64_t grace_until = 0;       // monotonic; 0: no grace period running
  };
  static_assert(sizeof(Entry) <= 40, "Entry grew: check the per-connection memory budget");
  struct Subscription {
    bool suspended = false;
    bool missed = false;  // an update was held back while suspended
    // Subscribed while an update was held back: its reply may differ from what the others were
    // last told, so the held-back update reaches it even if it turns out to be no news.
    bool told_ahead = false;
  };
  // A watched user: the watching sessions and the coalescing of what they are told.
  struct Watched {
    std::unordered_map<SessionId, Subscription> subs;
    PresenceState sent;        // the last update sent (valid once ever_sent)
    int64_t next_send_ms = 0;  // monotonic: no update before this
    bool ever_sent = false;
    bool dirty = false;  // an update waits in send_due_
  };
  struct Watcher {
    UserId user;
    std::unordered_set<UserId> targets;
  };

  Entry& EntryFor(const UserId& user);
  void MaybeErase(const UserId& user);
  void RememberLastSeen(const UserId& user, int64_t last_seen_ms);
  void Recompute(const UserId& user, Entry& e, int64_t now);
  void GoOffline(const UserId& user, Entry& e);
  void FlushWent();
  // Adds `user` to `online`, the users whose last seen is written as now, writing them in
  // chunks of kPersistChunk.
  void QueueOnline(const UserId& user, std::vector<UserId>* online);
  // Writes what `online` holds (and leaves it empty).
  void FlushOnline(std::vector<UserId>* online);
  void Changed(const UserId& user, Entry& e, int64_t now);
  void Broadcast(const UserId& user, const Entry& e, Watched& w, int64_t now);
  PresenceState StateOf(const Entry& e) const;
  PresenceDevice Device(const UserId& user, const DeviceId& device) const;

  const uint32_t node_;
  const int64_t ttl_ms_;
  const int64_t grace_ms_;
  const int64_t coalesce_ms_;
  const int64_t persist_interval_ms_;
  const int64_t heartbeat_ms_;
  const std::shared_ptr<PresenceRegistry> registry_;
  Clock* const clock_;
  Sink* const sink_;

  std::unordered_map<UserId, Entry> users_;
  // target -> watching session -> subscription; session -> its user and targets.
  std::unordered_map<UserId, Watched> watchers_;
  std::unordered_map<SessionId, Watcher> sessions_;
  // (due, user): grace periods all have one length and start in time order, so a FIFO is in
  // due order; coalescing windows start at each user's last update, so they need a heap.
  using Due = std::pair<int64_t, UserId>;
  std::deque<Due> grace_due_;
  std::priority_queue<Due, std::vector<Due>, std::greater<>> send_due_;
  int64_t next_persist_ms_ = 0;
  // Users whose last device went (GoOffline), with when, persisted together by FlushWent: a
  // thousand users going offline in one tick are one store write, not a thousand.
  std::vector<UserId> went_users_;
  std::vector<int64_t> went_ms_;
  std::vector<UserId> changed_;  // scratch for TakeChanges
  // The last seen of the kRecentLastSeen users most recently forgotten (MaybeErase) whose last
  // seen this tracker had just handed to the store, oldest first: that write goes through the
  // writer without waiting, so a watch that comes right after may read the store before it is
  // committed. Watch takes the later of the two.
  std::unordered_map<UserId, int64_t> recent_last_seen_;
  std::deque<UserId> recent_order_;
  static constexpr size_t kRecentLastSeen = 1024;
  // Past this many users, changed_ and the went_ lists are released after use.
  static constexpr size_t kKeepScratchUsers = 1024;
};

}  // namespace chat::server

#endif  // CHAT_SRC_SERVER_PRESENCE_TRACKER_H_
