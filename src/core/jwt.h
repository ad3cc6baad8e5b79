// Building blocks of the JWT HS256 authenticator (include/chat/auth.h), exposed for tests and
// tools: strict base64url, HMAC-SHA256, a bounded reader for the flat JSON objects of a JWT's
// header and payload, and signing of arbitrary header/payload texts (so tests can mint tokens
// that SignJwt would never produce: other algorithms, missing claims, odd types).
//
// Thread-safety: pure functions.
#ifndef CHAT_SRC_CORE_JWT_H_
#define CHAT_SRC_CORE_JWT_H_

#include <cstddef>
#include <map>
#include <string>
#include <string_view>

#include "chat/status.h"

namespace chat::jwt {

// base64url (RFC 4648 section 5) without padding.
std::string Base64UrlEncode(std::string_view bytes);

// Strict inverse of Base64UrlEncode: refuses '=' padding, characters outside the url alphabet
// (including '+', '/' and whitespace), impossible lengths and non-zero unused trailing bits, so
// every byte string has exactly one accepted encoding. InvalidArgument "bad base64".
Result<std::string> Base64UrlDecode(std::string_view text);

// HMAC-SHA256 of `data` under `key`: 32 raw bytes.
std::string HmacSha256(std::string_view key, std::string_view data);

// One member of a JSON object, as much as a JWT needs: strings (unescaped, UTF-8), numbers
// (as double), booleans, null, and "other" for nested arrays and objects, which are checked for
// well-formedness but not kept.
struct JsonValue {
  enum class Type { kString, kNumber, kBool, kNull, kOther };
  Type type = Type::kNull;
  std::string string;
  double number = 0;
  bool boolean = false;
};

// Parses one JSON object (RFC 8259) and returns its top-level members. Refuses anything else:
// trailing bytes, duplicate keys, invalid UTF-8, bad escapes, lone surrogates, non-finite
// numbers, nesting deeper than a few levels. InvalidArgument "bad JSON".
Result<std::map<std::string, JsonValue>> ParseJsonObject(std::string_view text);

// JSON string literal (with quotes) for UTF-8 `text`. REQUIRES: text is valid UTF-8.
std::string QuoteJson(std::string_view text);

// header.payload.signature with the HS256 signature of the given texts, taken verbatim.
std::string SignRaw(std::string_view secret, std::string_view header_json,
                    std::string_view payload_json);

}  // namespace chat::jwt

#endif  // CHAT_SRC_CORE_JWT_H_
