#include "chat/status.h"

#include <array>

namespace chat {

namespace {
constexpr std::array<std::string_view, 13> kCodeNames = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "DATA_LOSS",
    "INTERNAL",
};
}  // namespace

std::string_view CodeName(Code code) {
  auto i = static_cast<size_t>(code);
  return i < kCodeNames.size() ? kCodeNames[i] : "UNKNOWN";
}

bool IsRetryable(Code code) {
  switch (code) {
    case Code::kUnavailable:
    case Code::kResourceExhausted:
    case Code::kDeadlineExceeded:
    case Code::kInternal:
      return true;
    default:
      return false;
  }
}

Status::Status(Code code, std::string_view message) {
  // An OK status never carries a message: it stays the cheap null representation.
  if (code != Code::kOk) rep_ = std::make_unique<Rep>(Rep{code, 0, std::string(message)});
}

Status::Status(const Status& other)
    : rep_(other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr) {}

Status& Status::operator=(const Status& other) {
  if (this != &other) rep_ = other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr;
  return *this;
}

Status& Status::set_retry_after_ms(uint32_t ms) {
  if (rep_) rep_->retry_after_ms = ms;
  return *this;
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s(CodeName(code()));
  s += ": ";
  s += message();
  return s;
}

Status InvalidArgument(std::string_view m) { return Status(Code::kInvalidArgument, m); }
Status NotFound(std::string_view m) { return Status(Code::kNotFound, m); }
Status AlreadyExists(std::string_view m) { return Status(Code::kAlreadyExists, m); }
Status PermissionDenied(std::string_view m) { return Status(Code::kPermissionDenied, m); }
Status Unauthenticated(std::string_view m) { return Status(Code::kUnauthenticated, m); }
Status ResourceExhausted(std::string_view m) { return Status(Code::kResourceExhausted, m); }
Status FailedPrecondition(std::string_view m) { return Status(Code::kFailedPrecondition, m); }
Status Unavailable(std::string_view m) { return Status(Code::kUnavailable, m); }
Status DeadlineExceeded(std::string_view m) { return Status(Code::kDeadlineExceeded, m); }
Status Cancelled(std::string_view m) { return Status(Code::kCancelled, m); }
Status DataLoss(std::string_view m) { return Status(Code::kDataLoss, m); }
Status Internal(std::string_view m) { return Status(Code::kInternal, m); }

}  // namespace chat
