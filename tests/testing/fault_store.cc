#include "tests/testing/fault_store.h"

#include <utility>

namespace chat::testing {

FaultStore::FaultStore() : FaultStore(NewMemoryStore()) {}

FaultStore::FaultStore(std::shared_ptr<MessageStore> target)
    : MessageStoreWrapper(std::move(target)) {}

void FaultStore::FailNthAppend(uint64_t n, Status status) {
  std::lock_guard lock(mu_);
  fail_at_call_ = calls_ + (n == 0 ? 1 : n);
  nth_status_ = status.ok() ? Internal("injected fault") : std::move(status);
}

void FaultStore::FailAllAppends(Status status) {
  std::lock_guard lock(mu_);
  all_status_ = status.ok() ? Internal("injected fault") : std::move(status);
}

void FaultStore::Heal() {
  std::lock_guard lock(mu_);
  fail_at_call_ = 0;
  nth_status_ = Status::Ok();
  all_status_ = Status::Ok();
}

uint64_t FaultStore::append_calls() const {
  std::lock_guard lock(mu_);
  return calls_;
}

uint64_t FaultStore::failed_appends() const {
  std::lock_guard lock(mu_);
  return failed_;
}

Status FaultStore::Append(std::span<const AppendRequest> batch,
                          std::vector<AppendResult>* results) {
  {
    std::lock_guard lock(mu_);
    ++calls_;
    Status fail;
    if (!all_status_.ok()) {
      fail = all_status_;
    } else if (calls_ == fail_at_call_) {
      fail = nth_status_;
      fail_at_call_ = 0;
    }
    if (!fail.ok()) {
      ++failed_;
      results->clear();
      return fail;
    }
  }
  return MessageStoreWrapper::Append(batch, results);
}

}  // namespace chat::testing
