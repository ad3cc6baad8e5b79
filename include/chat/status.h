// Status and Result<T>: errors are values.
//
// Every fallible call in the SDK returns a Status (or a Result<T> carrying either a value or a
// non-OK Status); no exception crosses the API. An OK Status holds no allocation. The codes are
// the same numbers as the protocol's Error.Code, so a server error reaches the application with
// its code intact. Whether to retry is a pure function of the code: IsRetryable().
//
// Thread-safety: Status and Result are values; distinct objects may be used from any thread.
#ifndef CHAT_STATUS_H_
#define CHAT_STATUS_H_

#include <cassert>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "chat/export.h"

namespace chat {

enum class Code : int {
  kOk = 0,
  kInvalidArgument = 1,
  kNotFound = 2,
  kAlreadyExists = 3,
  kPermissionDenied = 4,
  kUnauthenticated = 5,
  kResourceExhausted = 6,
  kFailedPrecondition = 7,
  kUnavailable = 8,
  kDeadlineExceeded = 9,
  kCancelled = 10,
  kDataLoss = 11,
  kInternal = 12,
};

// "OK", "INVALID_ARGUMENT", ... (the protocol's names).
CHAT_EXPORT std::string_view CodeName(Code code);

// True for codes after which the same request may succeed later without change
// (Unavailable, ResourceExhausted, DeadlineExceeded, Internal).
CHAT_EXPORT bool IsRetryable(Code code);

class [[nodiscard]] CHAT_EXPORT Status {
 public:
  Status() noexcept = default;
  Status(Code code, std::string_view message);

  Status(const Status& other);
  Status& operator=(const Status& other);
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;
  ~Status() = default;

  static Status Ok() { return Status(); }

  bool ok() const { return rep_ == nullptr; }
  Code code() const { return rep_ ? rep_->code : Code::kOk; }
  // Empty for OK.
  std::string_view message() const { return rep_ ? std::string_view(rep_->message) : ""; }
  // Milliseconds the caller should wait before retrying; 0 when not given.
  uint32_t retry_after_ms() const { return rep_ ? rep_->retry_after_ms : 0; }
  Status& set_retry_after_ms(uint32_t ms);

  // "OK" or "PERMISSION_DENIED: not a member of conversation 7".
  std::string ToString() const;

  friend bool operator==(const Status& a, const Status& b) {
    return a.code() == b.code() && a.message() == b.message();
  }

 private:
  struct Rep {
    Code code;
    uint32_t retry_after_ms = 0;
    std::string message;
  };
  std::unique_ptr<Rep> rep_;
};

// Helpers, one per code, for readable call sites: return InvalidArgument("body is empty").
CHAT_EXPORT Status InvalidArgument(std::string_view message);
CHAT_EXPORT Status NotFound(std::string_view message);
CHAT_EXPORT Status AlreadyExists(std::string_view message);
CHAT_EXPORT Status PermissionDenied(std::string_view message);
CHAT_EXPORT Status Unauthenticated(std::string_view message);
CHAT_EXPORT Status ResourceExhausted(std::string_view message);
CHAT_EXPORT Status FailedPrecondition(std::string_view message);
CHAT_EXPORT Status Unavailable(std::string_view message);
CHAT_EXPORT Status DeadlineExceeded(std::string_view message);
CHAT_EXPORT Status Cancelled(std::string_view message);
CHAT_EXPORT Status DataLoss(std::string_view message);
CHAT_EXPORT Status Internal(std::string_view message);

// Either a T or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  // REQUIRES: !status.ok()
  Result(Status status) : status_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    assert(!status_.ok());
    if (status_.ok()) status_ = Status(Code::kInternal, "Result constructed from OK status");
  }
  Result(T value) : value_(std::move(value)) {}  // NOLINT(google-explicit-constructor)

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }

  // REQUIRES: ok()
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace chat

#endif  // CHAT_STATUS_H_
