// NewInProcessPresenceRegistry: the PresenceRegistry of a single node, in memory.
//
// Entries are kept per user, the first inline (a user nearly always has one device), more in a
// vector. Expiry is found through a min-heap of (time, user record) holding one live item per
// user with entries: the earliest expiry among them, pushed again for the next one when it
// fires. An item is stale when its user's record no longer names its time (a shorter entry came
// in and pushed an earlier item); stale items are skipped when they surface. A record counts
// the heap items that point at it and outlives its last entry until none does, so an item
// never points at a freed record. Refreshing an entry pushes nothing, so a steadily refreshed
// device costs one heap item, not one per refresh.

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

// One user's live entries and expiry bookkeeping.
class UserEntries {
 public:
  int64_t queued_ms = kNotQueued;  // the time of this user's live heap item
  uint32_t heap_items = 0;         // heap items pointing at this record, live or stale

 private:
  bool has_one_ = false;  // next to heap_items: the record packs into 72 bytes

 public:
  Entry* begin() { return more_ ? more_->data() : &one_; }
  Entry* end() { return begin() + size(); }
  size_t size() const { return more_ ? more_->size() : (has_one_ ? 1 : 0); }
  bool empty() const { return size() == 0; }
  // No entries and no heap item pointing here: the record can go.
  bool unused() const { return empty() && heap_items == 0; }

  void push_back(Entry entry) {
    if (!more_ && !has_one_) {
      one_ = std::move(entry);
      has_one_ = true;
      return;
    }
    if (!more_) {
      more_ = std::make_unique<std::vector<Entry>>();
      more_->push_back(std::move(one_));
      has_one_ = false;
    }
    more_->push_back(std::move(entry));
  }

  // Removes the entries `pred` is true for; returns how many.
  template <typename Pred>
  size_t erase_if(Pred pred) {
    if (!more_) {
      if (!has_one_ || !pred(one_)) return 0;
      one_ = Entry{};
      has_one_ = false;
      return 1;
    }
    const size_t erased = std::erase_if(*more_, pred);
    if (more_->size() <= 1) {
      has_one_ = !more_->empty();
      if (has_one_) one_ = std::move(more_->front());
      more_.reset();
    }
    return erased;
  }

 private:
  Entry one_;  // the only entry while more_ is null and has_one_ is set
  std::unique_ptr<std::vector<Entry>> more_;  // every entry, when two or more
};
static_assert(sizeof(UserEntries) <= 72, "UserEntries grew: one per online user");

using UserMap = std::unordered_map<UserId, UserEntries>;
using UserRecord = UserMap::value_type;            // stable: the map's nodes never move
using HeapItem = std::pair<int64_t, UserRecord*>;  // (expires, user)

// The heap's order: earliest first, ties by user id (not by address), so users expiring
// together are reported in the same order every run.
struct Later {
  bool operator()(const HeapItem& a, const HeapItem& b) const {
    if (a.first != b.first) return a.first > b.first;
    return a.second->first > b.second->first;
  }
};

// Changes past which the change list's memory is released once taken.
constexpr size_t kKeepChanged = 1024;

class InProcessPresenceRegistry final : public PresenceRegistry {
 public:
  void Refresh(const PresenceDevice& device, int64_t now_ms, int64_t ttl_ms) override {
    if (ttl_ms <= 0) return;
    Expire(now_ms);
    const int64_t expires = now_ms + ttl_ms;
    UserRecord& record = *users_.try_emplace(device.user).first;
    UserEntries& user = record.second;
    Entry* entry = Find(user, device);
    if (entry != nullptr) {
      // A refresh never shortens an entry: a late refresh computed from an older frame must
      // not undo a newer one.
      if (expires <= entry->expires_ms) return;
      entry->expires_ms = expires;
    } else {
      user.push_back(Entry{device.device, device.node, expires});
      MarkChanged(device.user);
    }
    // The live item fires no later than every other entry; only a shorter new one (another
    // node's ttl) needs an earlier item.
    if (user.queued_ms == kNotQueued || expires < user.queued_ms) Queue(record, expires);
  }

  void Remove(const PresenceDevice& device, int64_t now_ms) override {
    Expire(now_ms);
    auto it = users_.find(device.user);
    if (it == users_.end()) return;
    const size_t removed = it->second.erase_if([&](const Entry& e) { return Matches(e, device); });
    if (removed == 0) return;
    MarkChanged(device.user);
    MaybeErase(it);
  }

  uint32_t DeviceCount(const UserId& user, int64_t now_ms) override {
    Expire(now_ms);
    auto it = users_.find(user);
    return it == users_.end() ? 0 : static_cast<uint32_t>(it->second.size());
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
  static bool Matches(const Entry& e, const PresenceDevice& device) {
    return e.node == device.node && e.device == device.device;
  }

  static Entry* Find(UserEntries& user, const PresenceDevice& device) {
    for (Entry& e : user) {
      if (Matches(e, device)) return &e;
    }
    return nullptr;
  }

  void Queue(UserRecord& record, int64_t at_ms) {
    record.second.queued_ms = at_ms;
    ++record.second.heap_items;
    heap_.emplace(at_ms, &record);
  }

  // Erases a user's record once it has neither entries nor heap items pointing at it.
  void MaybeErase(UserMap::iterator it) {
    if (it->second.unused()) users_.erase(it);
  }

  void Expire(int64_t now_ms) {
    while (!heap_.empty() && heap_.top().first <= now_ms) {
      const auto [at_ms, record] = heap_.top();
      heap_.pop();
      UserEntries& user = record->second;
      --user.heap_items;
      if (user.queued_ms == at_ms) {  // the live item (otherwise stale)
        user.queued_ms = kNotQueued;
        const size_t expired =
            user.erase_if([now_ms](const Entry& e) { return e.expires_ms <= now_ms; });
        if (expired > 0) MarkChanged(record->first);
        if (!user.empty()) {
          int64_t next = INT64_MAX;
          for (const Entry& e : user) next = std::min(next, e.expires_ms);
          Queue(*record, next);
        }
      }
      if (user.unused()) users_.erase(record->first);
    }
  }

  void MarkChanged(const UserId& user) {
    if (changed_.insert(user).second) changed_order_.push_back(user);
  }

  UserMap users_;
  std::priority_queue<HeapItem, std::vector<HeapItem>, Later> heap_;
  std::unordered_set<UserId> changed_;
  std::vector<UserId> changed_order_;  // changed_, in the order of the first change
};

}  // namespace

std::shared_ptr<PresenceRegistry> NewInProcessPresenceRegistry() {
  return std::make_shared<InProcessPresenceRegistry>();
}

}  // namespace chat
