// The bodies of the libFuzzer targets, shared with the unit test that replays their corpora so
// every input the fuzzers ever kept is checked on each ordinary test run, with any compiler.
//
// Each target traps on a broken invariant, so both libFuzzer and the replay test notice.
#ifndef CHAT_TESTS_FUZZ_FUZZ_TARGETS_H_
#define CHAT_TESTS_FUZZ_FUZZ_TARGETS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "chat/auth.h"
#include "chat/status.h"
#include "src/core/codec.h"

namespace chat::fuzz {

inline void Require(bool condition) {
  if (!condition) __builtin_trap();
}

// Input: one byte choosing the encoding (even: binary, odd: JSON), then the frame.
// Invariants: every refusal is InvalidArgument and leaves no body behind; whatever decodes
// re-encodes to a frame that decodes to the same envelope; Validate never crashes.
inline void FuzzCodec(const uint8_t* data, size_t size) {
  if (size == 0) return;
  const codec::Format format = data[0] % 2 == 0 ? codec::Format::kBinary : codec::Format::kJson;
  const std::string_view frame(reinterpret_cast<const char*>(data + 1), size - 1);
  constexpr size_t kMaxBytes = 64 * 1024;
  v1::Envelope envelope;
  const Status status = codec::Decode(frame, format, kMaxBytes, &envelope);
  if (!status.ok()) {
    Require(status.code() == Code::kInvalidArgument);
    Require(envelope.body_case() == v1::Envelope::BODY_NOT_SET);
    return;
  }
  Require(envelope.body_case() != v1::Envelope::BODY_NOT_SET);
  (void)codec::Validate(envelope);
  for (codec::Format out : {codec::Format::kBinary, codec::Format::kJson}) {
    const std::string encoded = codec::Encode(envelope, out);
    v1::Envelope again;
    // Re-encoding may grow a JSON frame (escapes), so the limit is lifted for the second pass.
    Require(codec::Decode(encoded, out, SIZE_MAX, &again).ok());
    // The JSON mapping has no place for unknown binary fields; they are dropped by design.
    v1::Envelope expected = envelope;
    if (out == codec::Format::kJson) expected.DiscardUnknownFields();
    Require(again.SerializeAsString() == expected.SerializeAsString());
  }
}

// Input: a token. Invariants: Verify never crashes and refuses with Unauthenticated; a token it
// accepts names a non-empty user.
inline void FuzzJwt(const uint8_t* data, size_t size) {
  static const std::shared_ptr<Authenticator> authenticator = [] {
    JwtOptions options;
    options.secrets = {{"", std::string(32, 'k')}, {"k2", std::string(40, 'z')}};
    Result<std::shared_ptr<Authenticator>> result = NewJwtAuthenticator(std::move(options));
    Require(result.ok());
    return *result;
  }();
  const std::string_view token(reinterpret_cast<const char*>(data), size);
  const Result<Identity> identity = authenticator->Verify(token, 1'735'689'600'000);
  if (identity.ok()) {
    Require(!identity->user_id.empty());
  } else {
    Require(identity.status().code() == Code::kUnauthenticated);
  }
}

}  // namespace chat::fuzz

#endif  // CHAT_TESTS_FUZZ_FUZZ_TARGETS_H_
