#include "src/server/presence_tracker.h"

#include <algorithm>
#include <iterator>
#include <string>
#include <utility>

namespace chat::server {

namespace {

// Users per last-seen write: keeps one periodic write from becoming one huge store item.
constexpr size_t kPersistChunk = 1000;

bool SameState(const PresenceState& a, const PresenceState& b) {
  // An online user's last_seen_ms is "now" and always moves; it alone is no news.
  return a.online == b.online && a.devices == b.devices &&
         (a.online || a.last_seen_ms == b.last_seen_ms);
}

}  // namespace

PresenceTracker::PresenceTracker(const ServerOptions& options,
                                 std::shared_ptr<PresenceRegistry> registry, Clock* clock,
                                 Sink* sink)
    : node_(options.node_id),
      ttl_ms_(std::max<int64_t>(options.presence_ttl_ms, 1)),
      grace_ms_(options.presence_grace_ms),
      coalesce_ms_(options.presence_coalesce_ms),
      persist_interval_ms_(std::max<int64_t>(options.heartbeat_interval_ms, 1)),
      heartbeat_ms_(options.heartbeat_interval_ms),
      registry_(std::move(registry)),
      clock_(clock),
      sink_(sink),
      next_persist_ms_(clock->MonotonicMs() + persist_interval_ms_) {}

int64_t PresenceTracker::refresh_interval_ms() const {
  const int64_t margin = ttl_ms_ > heartbeat_ms_ ? ttl_ms_ - heartbeat_ms_ : ttl_ms_;
  return std::max<int64_t>(margin / 2, 1);
}

PresenceDevice PresenceTracker::Device(const UserId& user, const DeviceId& device) const {
  return PresenceDevice{user, device, node_};
}

void PresenceTracker::DeviceUp(const UserId& user, const DeviceId& device) {
  const int64_t now = clock_->MonotonicMs();
  Entry& e = EntryFor(user);
  ++e.local_devices;
  e.had_local = true;
  registry_->Refresh(Device(user, device), now, ttl_ms_);
  Recompute(user, e, now);
}

void PresenceTracker::DeviceDown(const UserId& user, const DeviceId& device) {
  const int64_t now = clock_->MonotonicMs();
  registry_->Remove(Device(user, device), now);
  auto it = users_.find(user);
  if (it == users_.end()) return;
  Entry& e = it->second;
  if (e.local_devices > 0) --e.local_devices;
  Recompute(user, e, now);
  MaybeErase(user);
  FlushWent();
}

void PresenceTracker::DeviceHeard(const UserId& user, const DeviceId& device, int64_t heard_ms) {
  const int64_t now = clock_->MonotonicMs();
  const int64_t left = heard_ms + ttl_ms_ - now;
  // A device that came back from silence is counted again; Tick picks the change up.
  if (left > 0) registry_->Refresh(Device(user, device), now, left);
}

size_t PresenceTracker::watch_count(SessionId session) const {
  auto it = sessions_.find(session);
  return it == sessions_.end() ? 0 : it->second.targets.size();
}

size_t PresenceTracker::CountNew(SessionId session, const std::vector<UserId>& users) const {
  std::unordered_set<UserId> fresh;
  auto it = sessions_.find(session);
  for (const UserId& user : users) {
    if (it != sessions_.end() && it->second.targets.contains(user)) continue;
    fresh.insert(user);
  }
  return fresh.size();
}

bool PresenceTracker::watches(SessionId session, const UserId& target) const {
  auto it = sessions_.find(session);
  return it != sessions_.end() && it->second.targets.contains(target);
}

PresenceState PresenceTracker::Watch(SessionId session, const UserId& watcher, const UserId& target,
                                     int64_t stored_last_seen_ms) {
  const bool known = users_.contains(target);
  Entry& e = EntryFor(target);
  if (!known) {
    // A user this node knew nothing about: take the registry's count as it is, silently (the
    // new watcher is told by the reply, and nobody else watches yet).
    const uint32_t n = registry_->DeviceCount(target, clock_->MonotonicMs());
    e.online = n > 0;
    e.shown_devices = n;
  }
  e.last_seen_ms = std::max(e.last_seen_ms, stored_last_seen_ms);
  if (!known) {
    auto recent = recent_last_seen_.find(target);
    if (recent != recent_last_seen_.end())
      e.last_seen_ms = std::max(e.last_seen_ms, recent->second);
  }
  Watched& watched = watchers_[target];
  auto [sub, created] = watched.subs.try_emplace(session);
  if (created) {
    Watcher& w = sessions_[session];
    w.user = watcher;
    w.targets.insert(target);
    if (e.watchers++ == 0) registry_->Watch(target);
  } else {
    // The caller checked the subscription against the store after any removal: it stands.
    sub->second = Subscription{};
  }
  if (watched.dirty) sub->second.told_ahead = true;
  const PresenceState state = StateOf(e);
  if (!watched.ever_sent) {
    watched.ever_sent = true;
    watched.sent = state;
  }
  return state;
}

void PresenceTracker::Unwatch(SessionId session, const UserId& target) {
  auto subs = watchers_.find(target);
  if (subs == watchers_.end() || subs->second.subs.erase(session) == 0) return;
  if (subs->second.subs.empty()) watchers_.erase(subs);
  auto w = sessions_.find(session);
  if (w != sessions_.end()) {
    w->second.targets.erase(target);
    if (w->second.targets.empty()) sessions_.erase(w);
  }
  auto it = users_.find(target);
  if (it == users_.end()) return;
  if (it->second.watchers > 0 && --it->second.watchers == 0) registry_->Unwatch(target);
  MaybeErase(target);
}

void PresenceTracker::ForgetSession(SessionId session) {
  auto w = sessions_.find(session);
  if (w == sessions_.end()) return;
  const std::vector<UserId> targets(w->second.targets.begin(), w->second.targets.end());
  for (const UserId& target : targets) Unwatch(session, target);
}

std::map<PresenceTracker::SessionId, std::vector<UserId>> PresenceTracker::Suspend(
    const std::vector<UserId>& removed) {
  std::map<SessionId, std::vector<UserId>> out;
  const std::unordered_set<UserId> gone(removed.begin(), removed.end());
  // Subscriptions on a removed user.
  for (const UserId& user : removed) {
    auto subs = watchers_.find(user);
    if (subs == watchers_.end()) continue;
    for (auto& [session, sub] : subs->second.subs) {
      sub.suspended = true;
      out[session].push_back(user);
    }
  }
  // Subscriptions of a removed user's connections.
  for (const auto& [session, w] : sessions_) {
    if (!gone.contains(w.user)) continue;
    for (const UserId& target : w.targets) {
      watchers_[target].subs[session].suspended = true;
      out[session].push_back(target);
    }
  }
  for (auto& [session, targets] : out) {
    std::sort(targets.begin(), targets.end());
    targets.erase(std::unique(targets.begin(), targets.end()), targets.end());
  }
  return out;
}

void PresenceTracker::Resolve(SessionId session, const UserId& target, bool allowed) {
  auto subs = watchers_.find(target);
  if (subs == watchers_.end()) return;
  auto sub = subs->second.subs.find(session);
  if (sub == subs->second.subs.end() || !sub->second.suspended) return;
  if (!allowed) {
    Unwatch(session, target);
    return;
  }
  // told_ahead stays: the reply it stands for still differs from what the others were told.
  const bool missed = sub->second.missed;
  sub->second.suspended = false;
  sub->second.missed = false;
  if (!missed) return;
  sink_->SendPresence(session, target, Current(target));
  // Told ahead of an update still held back, which must then reach it even if it is no news.
  if (subs->second.dirty) sub->second.told_ahead = true;
}

void PresenceTracker::DropSuspended(SessionId session) {
  auto w = sessions_.find(session);
  if (w == sessions_.end()) return;
  std::vector<UserId> suspended;
  for (const UserId& target : w->second.targets) {
    if (watchers_[target].subs[session].suspended) suspended.push_back(target);
  }
  for (const UserId& target : suspended) Unwatch(session, target);
}

void PresenceTracker::Tick() {
  const int64_t now = clock_->MonotonicMs();
  changed_.clear();
  registry_->TakeChanges(now, &changed_);
  for (const UserId& user : changed_) {
    auto it = users_.find(user);
    if (it != users_.end()) Recompute(user, it->second, now);
  }
  // A burst of connections leaves no large scratch behind.
  if (changed_.capacity() > kKeepScratchUsers) std::vector<UserId>().swap(changed_);
  while (!grace_due_.empty() && grace_due_.front().first <= now) {
    const auto [due, user] = std::move(grace_due_.front());
    grace_due_.pop_front();
    auto it = users_.find(user);
    if (it == users_.end() || it->second.grace_until != due) continue;  // a device came back
    GoOffline(user, it->second);
    Changed(user, it->second, now);
    MaybeErase(user);
  }
  while (!send_due_.empty() && send_due_.top().first <= now) {
    const UserId user = send_due_.top().second;
    send_due_.pop();
    auto w = watchers_.find(user);
    // Skipped: nobody watches any more, nothing is held back, or the item is older than the
    // record (its watchers all left and others came; the record's own item is due later).
    if (w == watchers_.end() || !w->second.dirty || w->second.next_send_ms > now) continue;
    w->second.dirty = false;
    auto it = users_.find(user);
    if (it != users_.end()) Broadcast(user, it->second, w->second, now);
  }
  if (now >= next_persist_ms_) {
    next_persist_ms_ = now + persist_interval_ms_;
    std::vector<UserId> online;
    for (const auto& [user, e] : users_) {
      if (e.local_devices == 0 || !e.online || e.grace_until != 0) continue;
      QueueOnline(user, &online);
    }
    FlushOnline(&online);
  }
  FlushWent();
}

void PresenceTracker::PersistAll() {
  std::vector<UserId> online;
  for (const auto& [user, e] : users_) {
    if (!e.had_local || !e.online) continue;
    if (e.grace_until != 0) {
      // The last device went before shutdown.
      went_users_.push_back(user);
      went_ms_.push_back(e.went_ms);
    } else {
      QueueOnline(user, &online);
    }
  }
  FlushOnline(&online);
  FlushWent();
}

void PresenceTracker::QueueOnline(const UserId& user, std::vector<UserId>* online) {
  online->push_back(user);
  if (online->size() == kPersistChunk) FlushOnline(online);
}

void PresenceTracker::FlushOnline(std::vector<UserId>* online) {
  if (online->empty()) return;
  sink_->PersistLastSeen(std::move(*online), clock_->WallMs());
  online->clear();
}

void PresenceTracker::FlushWent() {
  for (size_t first = 0; first < went_users_.size(); first += kPersistChunk) {
    const size_t last = std::min(went_users_.size(), first + kPersistChunk);
    sink_->PersistLastSeenEach(
        std::vector<UserId>(std::make_move_iterator(went_users_.begin() + first),
                            std::make_move_iterator(went_users_.begin() + last)),
        std::vector<int64_t>(went_ms_.begin() + first, went_ms_.begin() + last));
  }
  went_users_.clear();
  went_ms_.clear();
  if (went_users_.capacity() > kKeepScratchUsers) {
    std::vector<UserId>().swap(went_users_);
    std::vector<int64_t>().swap(went_ms_);
  }
}

PresenceState PresenceTracker::Current(const UserId& user) {
  auto it = users_.find(user);
  return it == users_.end() ? PresenceState{} : StateOf(it->second);
}

PresenceTracker::Entry& PresenceTracker::EntryFor(const UserId& user) { return users_[user]; }

// An entry is kept while it matters to someone: local devices, watchers (a pending update has
// watchers) or a grace period. Last seen of a forgotten user is in the store, and for a while
// in recent_last_seen_ (the store's copy may not be committed yet).
void PresenceTracker::MaybeErase(const UserId& user) {
  auto it = users_.find(user);
  if (it == users_.end()) return;
  const Entry& e = it->second;
  // No device here, no watcher here, no grace period running: nothing here depends on the
  // entry. One still online is so through other nodes' devices, and a registry that reports only
  // watched users' changes would leave it stale, so it goes too; a later Watch reads the
  // registry afresh, and the node that has the devices writes the user's last seen.
  if (e.local_devices == 0 && e.watchers == 0 && e.grace_until == 0) {
    if (e.wrote_last_seen) RememberLastSeen(user, e.last_seen_ms);
    users_.erase(it);
  }
}

void PresenceTracker::RememberLastSeen(const UserId& user, int64_t last_seen_ms) {
  auto [it, added] = recent_last_seen_.try_emplace(user, last_seen_ms);
  if (!added) {
    // Remembered again: it moves to the back, as new (a scan of at most kRecentLastSeen names).
    it->second = std::max(it->second, last_seen_ms);
    recent_order_.erase(std::find(recent_order_.begin(), recent_order_.end(), user));
  }
  recent_order_.push_back(user);
  if (recent_order_.size() > kRecentLastSeen) {
    recent_last_seen_.erase(recent_order_.front());
    recent_order_.pop_front();
  }
}

void PresenceTracker::Recompute(const UserId& user, Entry& e, int64_t now) {
  const uint32_t n = registry_->DeviceCount(user, now);
  if (n > 0) {
    e.grace_until = 0;
    e.online = true;
    e.shown_devices = n;
    Changed(user, e, now);
  } else if (e.online && e.grace_until == 0) {
    // Watchers keep seeing the user online (with the last count) until the grace period ends.
    e.went_ms = clock_->WallMs();
    if (grace_ms_ == 0) {
      GoOffline(user, e);
      Changed(user, e, now);
    } else {
      e.grace_until = now + grace_ms_;
      grace_due_.emplace_back(e.grace_until, user);
    }
  }
}

void PresenceTracker::GoOffline(const UserId& user, Entry& e) {
  e.online = false;
  e.shown_devices = 0;
  e.grace_until = 0;
  e.last_seen_ms = std::max(e.last_seen_ms, e.went_ms);
  // The node that held the devices records when they went (FlushWent, with the others).
  e.wrote_last_seen = e.had_local;
  if (e.had_local) {
    went_users_.push_back(user);
    went_ms_.push_back(e.went_ms);
  }
  e.had_local = e.local_devices > 0;
}

void PresenceTracker::Changed(const UserId& user, Entry& e, int64_t now) {
  if (e.watchers == 0) return;  // nobody to tell
  auto found = watchers_.find(user);
  if (found == watchers_.end()) return;
  Watched& w = found->second;
  if (w.dirty) return;  // the pending update will tell
  if (w.ever_sent && SameState(StateOf(e), w.sent)) return;
  if (now >= w.next_send_ms) {
    Broadcast(user, e, w, now);
    return;
  }
  w.dirty = true;
  send_due_.emplace(w.next_send_ms, user);
}

void PresenceTracker::Broadcast(const UserId& user, const Entry& e, Watched& w, int64_t now) {
  w.dirty = false;
  const PresenceState state = StateOf(e);
  const bool news = !w.ever_sent || !SameState(state, w.sent);
  if (news) {
    w.sent = state;
    w.ever_sent = true;
    w.next_send_ms = now + coalesce_ms_;
  }
  for (auto& [session, sub] : w.subs) {
    const bool tell = news || sub.told_ahead;
    sub.told_ahead = false;
    if (!tell) continue;
    if (sub.suspended) {
      sub.missed = true;
      continue;
    }
    sink_->SendPresence(session, user, state);
  }
}

PresenceState PresenceTracker::StateOf(const Entry& e) const {
  if (e.online) return PresenceState{true, e.shown_devices, clock_->WallMs()};
  return PresenceState{false, 0, e.last_seen_ms};
}

}  // namespace chat::server
