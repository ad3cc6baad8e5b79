// NewInProcessPresenceRegistry: the PresenceRegistry of a single node, in memory.
//
// Entries are kept per user, in a short vector (a user has a few devices). Expiry is found
// through a min-heap of (time, user) holding one live item per user with entries: the earliest
// expiry among them, pushed again for the next one when it fires. An item is stale when the
// user's record no longer names its time (the user left, or a shorter entry came in and pushed
// an earlier item); stale items are skipped when they surface. Refreshing an entry pushes
// nothing, so a steadily refreshed device costs one heap item, not one per refresh.

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <queue>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "chat/presence.h"

namespace chat {
namespace {

struct Entry {
  DeviceId device;
  uint32_t node = 0;
  int64_t expires_ms = 0;
};

// UserEntries::queued_ms when the user has no live heap item.
constexpr int64_t kNotQueued = INT64_MIN;

struct UserEntries {
  int64_t queued_ms = kNotQueued;  // the time of this user's live heap item
  std::vector<Entry> entries;
};

using HeapItem = std::pair<int64_t, UserId>;  // (expires, user)

// Changes past which the change list's memory is released once taken.
constexpr size_t kKeepChanged = 1024;

class InProcessPresenceRegistry final : public PresenceRegistry {
 public:
  void Refresh(const PresenceDevice& device, int64_t now_ms, int64_t ttl_ms) override {
    if (ttl_ms <= 0) return;
    Expire(now_ms);
    const int64_t expires = now_ms + ttl_ms;
    UserEntries& user = users_[device.user];
    auto it = Find(user, device);
    if (it != user.entries.end()) {
      // A refresh never shortens an entry: a late refresh computed from an older frame must
      // not undo a newer one.
      if (expires <= it->expires_ms) return;
      it->expires_ms = expires;
    } else {
      user.entries.push_back(Entry{device.device, device.node, expires});
      MarkChanged(device.user);
    }
    // The live item fires no later than every other entry; only a shorter new one (another
    // node's ttl) needs an earlier item.
    if (user.queued_ms == kNotQueued || expires < user.queued_ms) {
      Queue(device.user, user, expires);
    }
  }

  void Remove(const PresenceDevice& device, int64_t now_ms) override {
    Expire(now_ms);
    auto user = users_.find(device.user);
    if (user == users_.end()) return;
    auto it = Find(user->second, device);
    if (it == user->second.entries.end()) return;
    user->second.entries.erase(it);
    if (user->second.entries.empty()) users_.erase(user);
    MarkChanged(device.user);
  }

  uint32_t DeviceCount(const UserId& user, int64_t now_ms) override {
    Expire(now_ms);
    auto it = users_.find(user);
    return it == users_.end() ? 0 : static_cast<uint32_t>(it->second.entries.size());
  }

  void TakeChanges(int64_t now_ms, std::vector<UserId>* users) override {
    Expire(now_ms);
    for (UserId& user : changed_order_) users->push_back(std::move(user));
    // A burst of connections leaves no large table behind.
    if (changed_order_.size() > kKeepChanged) {
      std::vector<UserId>().swap(changed_order_);
      std::unordered_set<UserId>().swap(changed_);
    } else {
      changed_order_.clear();
      changed_.clear();
    }
  }

  // One node sees every change of its own entries, so interest changes nothing.
  void Watch(const UserId&) override {}
  void Unwatch(const UserId&) override {}

 private:
  static std::vector<Entry>::iterator Find(UserEntries& user, const PresenceDevice& device) {
    return std::find_if(user.entries.begin(), user.entries.end(), [&](const Entry& e) {
      return e.node == device.node && e.device == device.device;
    });
  }

  void Queue(const UserId& id, UserEntries& user, int64_t at_ms) {
    user.queued_ms = at_ms;
    heap_.emplace(at_ms, id);
  }

  void Expire(int64_t now_ms) {
    while (!heap_.empty() && heap_.top().first <= now_ms) {
      const HeapItem item = heap_.top();
      heap_.pop();
      auto user = users_.find(item.second);
      if (user == users_.end() || user->second.queued_ms != item.first) continue;  // stale
      std::vector<Entry>& entries = user->second.entries;
      const size_t expired =
          std::erase_if(entries, [now_ms](const Entry& e) { return e.expires_ms <= now_ms; });
      if (entries.empty()) {
        users_.erase(user);
      } else {
        int64_t next = entries.front().expires_ms;
        for (const Entry& e : entries) next = std::min(next, e.expires_ms);
        Queue(item.second, user->second, next);
      }
      if (expired > 0) MarkChanged(item.second);
    }
  }

  void MarkChanged(const UserId& user) {
    if (changed_.insert(user).second) changed_order_.push_back(user);
  }

  std::unordered_map<UserId, UserEntries> users_;
  std::priority_queue<HeapItem, std::vector<HeapItem>, std::greater<>> heap_;
  std::unordered_set<UserId> changed_;
  std::vector<UserId> changed_order_;  // changed_, in the order of the first change
};

}  // namespace

std::shared_ptr<PresenceRegistry> NewInProcessPresenceRegistry() {
  return std::make_shared<InProcessPresenceRegistry>();
}

}  // namespace chat
