// PresenceRegistry: which devices of which users are live, across the nodes of a deployment.
//
// A device is live while its connection is open and the client is heard from: each node
// reports its own connections as entries keyed (user, device, node) with a time to live, and
// refreshes them while the client keeps sending frames (heartbeats included). An entry that is
// not refreshed expires by itself, so a node that dies leaves no ghosts: its devices simply
// time out everywhere. The registry only counts devices; what users see (the grace period
// before "offline", coalescing of updates, who may watch whom, last seen) is decided by the
// server core on top of it.
//
// Shipped implementation: NewInProcessPresenceRegistry (one node; the default when
// ServerOptions::presence is null). PresenceRegistryWrapper forwards every call and is the base
// for fault injection and metrics.
//
// How a Redis implementation maps onto this trait (planned; not shipped yet):
//   - Refresh: `SET presence:{user}:{device}:{node} 1 PX ttl_ms` (a key per device, so Redis
//     expires a dead node's devices on its own), plus a publish on `presence:{user}` when the
//     key is new.
//   - Remove: `DEL` of the key and a publish on `presence:{user}`.
//   - Watch / Unwatch: subscribe to / unsubscribe from `presence:{user}` (and keyspace expiry
//     notifications for that user's keys), so a node hears only about users its clients watch.
//   - DeviceCount: answered from a local view (user -> live keys) kept up to date by the
//     replies and notifications above, never by a blocking round trip.
//   - TakeChanges: the users named by notifications received since the last call.
//   Every call is made on the server's event loop and must not block: writes are queued to a
//   Redis connection served by its own thread or event loop, and reads come from the local view.
//
// Thread-safety: the server calls a registry from one thread (its event loop), never
// concurrently. NewInProcessPresenceRegistry is not safe for concurrent use: give each server its
// own.
#ifndef CHAT_PRESENCE_H_
#define CHAT_PRESENCE_H_

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "chat/export.h"
#include "chat/types.h"

namespace chat {

// One connected device, as one node reports it.
struct PresenceDevice {
  UserId user;
  DeviceId device;
  uint32_t node = 0;  // ServerOptions::node_id of the node holding the connection
};

class CHAT_EXPORT PresenceRegistry {
 public:
  PresenceRegistry() = default;
  PresenceRegistry(const PresenceRegistry&) = delete;
  PresenceRegistry& operator=(const PresenceRegistry&) = delete;
  virtual ~PresenceRegistry() = default;

  // `device` is live until now_ms + ttl_ms (creates the entry or extends it). Times are on the
  // caller's monotonic clock (milliseconds); ttl_ms > 0.
  virtual void Refresh(const PresenceDevice& device, int64_t now_ms, int64_t ttl_ms) = 0;

  // `device` is gone (its connection closed). Removing an unknown or expired entry does nothing.
  virtual void Remove(const PresenceDevice& device, int64_t now_ms) = 0;

  // Live devices of `user` over all nodes at now_ms: entries not yet expired, counting one
  // (user, device, node) once.
  virtual uint32_t DeviceCount(const UserId& user, int64_t now_ms) = 0;

  // Appends to `users`, each once, the users whose DeviceCount may have changed since the
  // previous call: entries created, removed or expired (by now_ms), on any node. A user may be
  // reported although its count ended where it started; callers compare.
  virtual void TakeChanges(int64_t now_ms, std::vector<UserId>* users) = 0;

  // The caller wants changes of `user` reported by TakeChanges even when it holds none of the
  // user's devices (a local client watches the user). Calls nest: each Watch is matched by one
  // Unwatch. A single-node registry sees every change anyway and may ignore these.
  virtual void Watch(const UserId& user) = 0;
  virtual void Unwatch(const UserId& user) = 0;
};

// Forwards every call to `target`; override what a test or a metric needs.
class CHAT_EXPORT PresenceRegistryWrapper : public PresenceRegistry {
 public:
  explicit PresenceRegistryWrapper(std::shared_ptr<PresenceRegistry> target)
      : target_(std::move(target)) {}
  void Refresh(const PresenceDevice& device, int64_t now_ms, int64_t ttl_ms) override {
    target_->Refresh(device, now_ms, ttl_ms);
  }
  void Remove(const PresenceDevice& device, int64_t now_ms) override {
    target_->Remove(device, now_ms);
  }
  uint32_t DeviceCount(const UserId& user, int64_t now_ms) override {
    return target_->DeviceCount(user, now_ms);
  }
  void TakeChanges(int64_t now_ms, std::vector<UserId>* users) override {
    target_->TakeChanges(now_ms, users);
  }
  void Watch(const UserId& user) override { target_->Watch(user); }
  void Unwatch(const UserId& user) override { target_->Unwatch(user); }

 protected:
  PresenceRegistry& target() { return *target_; }

 private:
  std::shared_ptr<PresenceRegistry> target_;
};

// A registry for one node, in memory: entries expire by the times the caller passes.
CHAT_EXPORT std::shared_ptr<PresenceRegistry> NewInProcessPresenceRegistry();

}  // namespace chat

#endif  // CHAT_PRESENCE_H_
