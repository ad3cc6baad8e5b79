#include "chat/status.h"

#include <doctest/doctest.h>

#include <memory>
#include <string>
#include <utility>

namespace chat {
namespace {

TEST_CASE("status: every code has its protocol name") {
  const std::pair<Code, std::string_view> names[] = {
      {Code::kOk, "OK"},
      {Code::kInvalidArgument, "INVALID_ARGUMENT"},
      {Code::kNotFound, "NOT_FOUND"},
      {Code::kAlreadyExists, "ALREADY_EXISTS"},
      {Code::kPermissionDenied, "PERMISSION_DENIED"},
      {Code::kUnauthenticated, "UNAUTHENTICATED"},
      {Code::kResourceExhausted, "RESOURCE_EXHAUSTED"},
      {Code::kFailedPrecondition, "FAILED_PRECONDITION"},
      {Code::kUnavailable, "UNAVAILABLE"},
      {Code::kDeadlineExceeded, "DEADLINE_EXCEEDED"},
      {Code::kCancelled, "CANCELLED"},
      {Code::kDataLoss, "DATA_LOSS"},
      {Code::kInternal, "INTERNAL"},
  };
  for (const auto& [code, name] : names) CHECK(CodeName(code) == name);
  CHECK(CodeName(static_cast<Code>(13)) == "UNKNOWN");
  CHECK(CodeName(static_cast<Code>(-1)) == "UNKNOWN");
}

TEST_CASE("status: retryability is a function of the code") {
  CHECK(IsRetryable(Code::kUnavailable));
  CHECK(IsRetryable(Code::kResourceExhausted));
  CHECK(IsRetryable(Code::kDeadlineExceeded));
  CHECK(IsRetryable(Code::kInternal));
  for (Code code : {Code::kOk, Code::kInvalidArgument, Code::kNotFound, Code::kAlreadyExists,
                    Code::kPermissionDenied, Code::kUnauthenticated, Code::kFailedPrecondition,
                    Code::kCancelled, Code::kDataLoss}) {
    CAPTURE(CodeName(code));
    CHECK_FALSE(IsRetryable(code));
  }
}

TEST_CASE("status: OK is cheap and carries no message") {
  const Status ok;
  CHECK(ok.ok());
  CHECK(ok.code() == Code::kOk);
  CHECK(ok.message().empty());
  CHECK(ok.ToString() == "OK");
  CHECK(ok.retry_after_ms() == 0);
  const Status explicit_ok(Code::kOk, "ignored");
  CHECK(explicit_ok.ok());
  CHECK(explicit_ok.message().empty());
  CHECK(explicit_ok == Status::Ok());
}

TEST_CASE("status: helpers build the matching code and message") {
  const Status denied = PermissionDenied("not a member of conversation 7");
  CHECK_FALSE(denied.ok());
  CHECK(denied.code() == Code::kPermissionDenied);
  CHECK(denied.message() == "not a member of conversation 7");
  CHECK(denied.ToString() == "PERMISSION_DENIED: not a member of conversation 7");
  CHECK(InvalidArgument("x").code() == Code::kInvalidArgument);
  CHECK(NotFound("x").code() == Code::kNotFound);
  CHECK(AlreadyExists("x").code() == Code::kAlreadyExists);
  CHECK(Unauthenticated("x").code() == Code::kUnauthenticated);
  CHECK(ResourceExhausted("x").code() == Code::kResourceExhausted);
  CHECK(FailedPrecondition("x").code() == Code::kFailedPrecondition);
  CHECK(Unavailable("x").code() == Code::kUnavailable);
  CHECK(DeadlineExceeded("x").code() == Code::kDeadlineExceeded);
  CHECK(Cancelled("x").code() == Code::kCancelled);
  CHECK(DataLoss("x").code() == Code::kDataLoss);
  CHECK(Internal("x").code() == Code::kInternal);
}

TEST_CASE("status: copies are equal and independent, moves transfer") {
  Status original = Unavailable("store is failing");
  original.set_retry_after_ms(250);
  Status copy = original;
  CHECK(copy == original);
  CHECK(copy.retry_after_ms() == 250);
  copy.set_retry_after_ms(999);
  CHECK(original.retry_after_ms() == 250);

  Status assigned;
  assigned = original;
  CHECK(assigned == original);
  assigned = Status::Ok();
  CHECK(assigned.ok());
  CHECK_FALSE(original.ok());

  Status& self = original;
  original = self;  // self-assignment keeps the value
  CHECK(original.message() == "store is failing");

  Status moved = std::move(original);
  CHECK(moved.code() == Code::kUnavailable);
  CHECK(moved.message() == "store is failing");
  CHECK(moved.retry_after_ms() == 250);

  CHECK_FALSE(Unavailable("a") == Unavailable("b"));
  CHECK_FALSE(Unavailable("a") == Internal("a"));
}

TEST_CASE("status: retry_after_ms is not attached to OK") {
  Status ok;
  ok.set_retry_after_ms(100);
  CHECK(ok.retry_after_ms() == 0);
  CHECK(ok.ok());
}

TEST_CASE("status: Result holds a value or an error") {
  Result<std::string> value(std::string("alice"));
  REQUIRE(value.ok());
  CHECK(value.status().ok());
  CHECK(*value == "alice");
  CHECK(value->size() == 5);
  CHECK(std::move(value).value() == "alice");

  Result<std::string> error(NotFound("no such user"));
  CHECK_FALSE(error.ok());
  CHECK(error.status().code() == Code::kNotFound);
  CHECK(error.status().message() == "no such user");

  Result<std::unique_ptr<int>> move_only(std::make_unique<int>(5));
  REQUIRE(move_only.ok());
  CHECK(**move_only == 5);
}

}  // namespace
}  // namespace chat
