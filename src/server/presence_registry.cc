// NewInProcessPresenceRegistry: the PresenceRegistry of a single node, in memory.
//
// Entries are kept per user; expiry is found through a min-heap of (expires, entry) that may
// hold stale items (an entry refreshed or removed since it was pushed), which are skipped when
// they surface. Each refresh pushes one item, and an item leaves the heap when its time comes,
// so the heap holds at most (ttl / refresh interval + 1) items per live device.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <queue>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "chat/presence.h"

namespace chat {
namespace {

using EntryKey = std::pair<DeviceId, uint32_t>;  // (device, node) within one user

struct HeapItem {
  int64_t expires_ms = 0;
  UserId user;
  DeviceId device;
  uint32_t node = 0;
  bool operator>(const HeapItem& other) const { return expires_ms > other.expires_ms; }
};

class InProcessPresenceRegistry final : public PresenceRegistry {
 public:
  void Refresh(const PresenceDevice& device, int64_t now_ms, int64_t ttl_ms) override {
    if (ttl_ms <= 0) return;
    Expire(now_ms);
    const int64_t expires = now_ms + ttl_ms;
    std::map<EntryKey, int64_t>& entries = users_[device.user];
    auto [it, created] = entries.try_emplace(EntryKey{device.device, device.node}, expires);
    if (!created) {
      // A refresh never shortens an entry: a late refresh computed from an older frame must
      // not undo a newer one.
      if (expires <= it->second) return;
      it->second = expires;
    } else {
      MarkChanged(device.user);
    }
    heap_.push(HeapItem{expires, device.user, device.device, device.node});
  }

  void Remove(const PresenceDevice& device, int64_t now_ms) override {
    Expire(now_ms);
    auto user = users_.find(device.user);
    if (user == users_.end()) return;
    if (user->second.erase(EntryKey{device.device, device.node}) == 0) return;
    if (user->second.empty()) users_.erase(user);
    MarkChanged(device.user);
  }

  uint32_t DeviceCount(const UserId& user, int64_t now_ms) override {
    Expire(now_ms);
    auto it = users_.find(user);
    return it == users_.end() ? 0 : static_cast<uint32_t>(it->second.size());
  }

  void TakeChanges(int64_t now_ms, std::vector<UserId>* users) override {
    Expire(now_ms);
    for (UserId& user : changed_order_) users->push_back(std::move(user));
    changed_order_.clear();
    changed_.clear();
  }

  // One node sees every change of its own entries, so interest changes nothing.
  void Watch(const UserId&) override {}
  void Unwatch(const UserId&) override {}

 private:
  void Expire(int64_t now_ms) {
    while (!heap_.empty() && heap_.top().expires_ms <= now_ms) {
      const HeapItem item = heap_.top();
      heap_.pop();
      auto user = users_.find(item.user);
      if (user == users_.end()) continue;
      auto entry = user->second.find(EntryKey{item.device, item.node});
      // Stale: removed, or refreshed to a later time since this item was pushed.
      if (entry == user->second.end() || entry->second != item.expires_ms) continue;
      user->second.erase(entry);
      if (user->second.empty()) users_.erase(user);
      MarkChanged(item.user);
    }
  }

  void MarkChanged(const UserId& user) {
    if (changed_.insert(user).second) changed_order_.push_back(user);
  }

  std::unordered_map<UserId, std::map<EntryKey, int64_t>> users_;  // live entries -> expiry
  std::priority_queue<HeapItem, std::vector<HeapItem>, std::greater<>> heap_;
  std::unordered_set<UserId> changed_;
  std::vector<UserId> changed_order_;  // changed_, in the order of the first change
};

}  // namespace

std::shared_ptr<PresenceRegistry> NewInProcessPresenceRegistry() {
  return std::make_shared<InProcessPresenceRegistry>();
}

}  // namespace chat
