// Authentication: who is on the other end of a connection.
//
// The first frame of a connection carries a token; the server's Authenticator turns it into an
// Identity or refuses it. The default is JWT HS256 (RFC 7519): `sub` is the user id, `exp` is
// required, `nbf` is honoured, both with a leeway; `kid` selects one of several secrets so keys
// can rotate. Only HS256 is accepted ("none" and every other algorithm are refused); the
// signature is compared in constant time.
//
// Thread-safety: Verify may be called from any thread concurrently.
#ifndef CHAT_AUTH_H_
#define CHAT_AUTH_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "chat/export.h"
#include "chat/status.h"
#include "chat/types.h"

namespace chat {

struct Identity {
  UserId user_id;
  // Unix ms from which the authenticator refuses the token (JWT: exp plus the leeway); 0 =
  // never. The server ends a session then, with UNAUTHENTICATED and close 4001.
  int64_t expires_at_ms = 0;
};

class CHAT_EXPORT Authenticator {
 public:
  virtual ~Authenticator() = default;
  // Returns Unauthenticated with a reason ("token expired", "bad signature", ...) if refused.
  virtual Result<Identity> Verify(std::string_view token, int64_t now_ms) const = 0;
};

struct JwtOptions {
  // kid -> secret (raw bytes, at least 32). The entry with key "" is used for tokens without a
  // kid and for signing when no kid is given.
  std::map<std::string, std::string> secrets;
  int64_t leeway_ms = 30'000;     // tolerated clock skew for exp and nbf
  size_t max_token_bytes = 4096;  // longer tokens are refused before decoding
};

// Returns InvalidArgument if no secret is given or one is shorter than 32 bytes.
CHAT_EXPORT Result<std::shared_ptr<Authenticator>> NewJwtAuthenticator(JwtOptions options);

// Mints an HS256 token for `user_id` valid for `ttl_ms` from `now_ms` (development and tests;
// production tokens come from the application's own auth service). Returns InvalidArgument,
// naming the argument, if `secret` is shorter than 32 bytes, `user_id` is not 1 to
// kMaxUserIdBytes bytes of UTF-8 (the server would refuse the token at Hello), `kid` is not
// UTF-8, or the expiry is out of range.
CHAT_EXPORT Result<std::string> SignJwt(std::string_view secret, std::string_view kid,
                                        std::string_view user_id, int64_t now_ms, int64_t ttl_ms);

}  // namespace chat

#endif  // CHAT_AUTH_H_
