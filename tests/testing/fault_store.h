// FaultStore: a MessageStoreWrapper that makes Append fail on demand, for tests of what the
// server does when a commit fails (nothing acked, nothing delivered, an error to the sender).
//
// A failed Append stores nothing and returns the chosen Status, exactly as a store whose
// transaction failed. Reads are forwarded unchanged.
//
// Thread-safety: all methods may be called from any thread, concurrently with Append (the
// server's writer thread calls Append while the test thread arms faults).
#ifndef CHAT_TESTS_TESTING_FAULT_STORE_H_
#define CHAT_TESTS_TESTING_FAULT_STORE_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "chat/status.h"
#include "chat/store.h"

namespace chat::testing {

class FaultStore : public MessageStoreWrapper {
 public:
  // A FaultStore over a fresh NewMemoryStore().
  FaultStore();
  explicit FaultStore(std::shared_ptr<MessageStore> target);

  // The n-th Append call from now (1 = the next one) fails with `status`. REQUIRES: n >= 1,
  // !status.ok(). Replaces an earlier FailNthAppend that has not fired yet.
  void FailNthAppend(uint64_t n, Status status);
  // Every Append fails with `status` until Heal(). REQUIRES: !status.ok().
  void FailAllAppends(Status status);
  // Cancels every armed fault.
  void Heal();

  // Append calls seen, failed or not.
  uint64_t append_calls() const;
  // Append calls that were failed on purpose.
  uint64_t failed_appends() const;

  Status Append(std::span<const AppendRequest> batch, std::vector<AppendResult>* results) override;

 private:
  mutable std::mutex mu_;
  uint64_t calls_ = 0;         // guarded by mu_
  uint64_t failed_ = 0;        // guarded by mu_
  uint64_t fail_at_call_ = 0;  // 0 = none; guarded by mu_
  Status nth_status_;          // guarded by mu_
  Status all_status_;          // OK = not armed; guarded by mu_
};

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_FAULT_STORE_H_
