#include "src/core/jwt.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include "chat/auth.h"
#include "src/core/utf8.h"

namespace chat {

namespace jwt {

namespace {

constexpr std::string_view kAlphabet =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

constexpr std::array<int8_t, 256> MakeDecodeTable() {
  std::array<int8_t, 256> table{};
  for (auto& entry : table) entry = -1;
  for (size_t i = 0; i < kAlphabet.size(); ++i) {
    table[static_cast<uint8_t>(kAlphabet[i])] = static_cast<int8_t>(i);
  }
  return table;
}

constexpr std::array<int8_t, 256> kDecodeTable = MakeDecodeTable();

// A JWT's header and payload are small, flat objects; claims that nest (aud lists, custom
// objects) are skipped, and this bound keeps hostile input from recursing deeply.
constexpr int kMaxJsonDepth = 8;

class JsonReader {
 public:
  explicit JsonReader(std::string_view text) : text_(text) {}

  bool ReadObject(std::map<std::string, JsonValue>* members) {
    SkipSpace();
    if (!Consume('{')) return false;
    SkipSpace();
    if (Consume('}')) return AtEnd();
    while (true) {
      SkipSpace();
      std::string key;
      if (!ReadString(&key)) return false;
      SkipSpace();
      if (!Consume(':')) return false;
      SkipSpace();
      JsonValue value;
      if (!ReadValue(1, &value)) return false;
      // Duplicate keys make a token mean different things to different parsers; refuse them.
      if (!members->emplace(std::move(key), std::move(value)).second) return false;
      SkipSpace();
      if (Consume(',')) continue;
      if (Consume('}')) return AtEnd();
      return false;
    }
  }

 private:
  bool AtEnd() {
    SkipSpace();
    return pos_ == text_.size();
  }

  void SkipSpace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                   text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  bool Consume(char c) {
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  bool ConsumeWord(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  bool ReadValue(int depth, JsonValue* out) {
    if (pos_ >= text_.size()) return false;
    const char c = text_[pos_];
    if (c == '"') {
      out->type = JsonValue::Type::kString;
      return ReadString(&out->string);
    }
    if (c == '{' || c == '[') {
      out->type = JsonValue::Type::kOther;
      return SkipContainer(depth);
    }
    if (ConsumeWord("true")) {
      out->type = JsonValue::Type::kBool;
      out->boolean = true;
      return true;
    }
    if (ConsumeWord("false")) {
      out->type = JsonValue::Type::kBool;
      out->boolean = false;
      return true;
    }
    if (ConsumeWord("null")) {
      out->type = JsonValue::Type::kNull;
      return true;
    }
    out->type = JsonValue::Type::kNumber;
    return ReadNumber(&out->number);
  }

  bool SkipContainer(int depth) {
    if (depth >= kMaxJsonDepth) return false;
    const bool object = text_[pos_] == '{';
    const char close = object ? '}' : ']';
    ++pos_;
    SkipSpace();
    if (Consume(close)) return true;
    while (true) {
      SkipSpace();
      if (object) {
        std::string ignored_key;
        if (!ReadString(&ignored_key)) return false;
        SkipSpace();
        if (!Consume(':')) return false;
        SkipSpace();
      }
      JsonValue ignored;
      if (!ReadValue(depth + 1, &ignored)) return false;
      SkipSpace();
      if (Consume(',')) continue;
      return Consume(close);
    }
  }

  // JSON number grammar, checked by hand so that from_chars only ever sees a valid literal.
  bool ReadNumber(double* out) {
    const size_t start = pos_;
    Consume('-');
    if (Consume('0')) {
      // A leading zero stands alone.
    } else if (!ReadDigits()) {
      return false;
    }
    if (Consume('.') && !ReadDigits()) return false;
    if (Consume('e') || Consume('E')) {
      if (!Consume('+')) Consume('-');
      if (!ReadDigits()) return false;
    }
    // from_chars, unlike strtod, does not follow the process's LC_NUMERIC (which an embedding
    // application may have set to a decimal comma).
    const std::string_view literal = text_.substr(start, pos_ - start);
    double value = 0;
    const auto [end, error] =
        std::from_chars(literal.data(), literal.data() + literal.size(), value);
    if (error != std::errc() || end != literal.data() + literal.size() || !std::isfinite(value)) {
      return false;
    }
    *out = value;
    return true;
  }

  bool ReadDigits() {
    const size_t start = pos_;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
    return pos_ > start;
  }

  bool ReadHex4(uint32_t* out) {
    if (text_.size() - pos_ < 4) return false;
    uint32_t value = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = text_[pos_++];
      value <<= 4;
      if (c >= '0' && c <= '9') {
        value |= static_cast<uint32_t>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        value |= static_cast<uint32_t>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        value |= static_cast<uint32_t>(c - 'A' + 10);
      } else {
        return false;
      }
    }
    *out = value;
    return true;
  }

  static void AppendUtf8(uint32_t cp, std::string* out) {
    if (cp < 0x80) {
      out->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out->push_back(static_cast<char>(0xc0 | (cp >> 6)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
      out->push_back(static_cast<char>(0xe0 | (cp >> 12)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    } else {
      out->push_back(static_cast<char>(0xf0 | (cp >> 18)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    }
  }

  bool ReadEscape(std::string* out) {
    if (pos_ >= text_.size()) return false;
    const char c = text_[pos_++];
    switch (c) {
      case '"':
      case '\\':
      case '/':
        out->push_back(c);
        return true;
      case 'b':
        out->push_back('\b');
        return true;
      case 'f':
        out->push_back('\f');
        return true;
      case 'n':
        out->push_back('\n');
        return true;
      case 'r':
        out->push_back('\r');
        return true;
      case 't':
        out->push_back('\t');
        return true;
      case 'u': {
        uint32_t cp = 0;
        if (!ReadHex4(&cp)) return false;
        if (cp >= 0xdc00 && cp <= 0xdfff) return false;  // a low surrogate cannot come first
        if (cp >= 0xd800 && cp <= 0xdbff) {
          uint32_t low = 0;
          if (!ConsumeWord("\\u") || !ReadHex4(&low) || low < 0xdc00 || low > 0xdfff) {
            return false;
          }
          cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
        }
        AppendUtf8(cp, out);
        return true;
      }
      default:
        return false;
    }
  }

  bool ReadString(std::string* out) {
    if (!Consume('"')) return false;
    while (pos_ < text_.size()) {
      const char c = text_[pos_];
      if (c == '"') {
        ++pos_;
        return IsValidUtf8(*out);
      }
      if (static_cast<uint8_t>(c) < 0x20) return false;  // control characters must be escaped
      if (c == '\\') {
        ++pos_;
        if (!ReadEscape(out)) return false;
        continue;
      }
      out->push_back(c);
      ++pos_;
    }
    return false;
  }

  std::string_view text_;
  size_t pos_ = 0;
};

}  // namespace

std::string Base64UrlEncode(std::string_view bytes) {
  std::string out;
  out.reserve((bytes.size() * 4 + 2) / 3);
  size_t i = 0;
  const auto at = [&](size_t k) { return static_cast<uint32_t>(static_cast<uint8_t>(bytes[k])); };
  for (; i + 3 <= bytes.size(); i += 3) {
    const uint32_t v = (at(i) << 16) | (at(i + 1) << 8) | at(i + 2);
    out.push_back(kAlphabet[(v >> 18) & 63]);
    out.push_back(kAlphabet[(v >> 12) & 63]);
    out.push_back(kAlphabet[(v >> 6) & 63]);
    out.push_back(kAlphabet[v & 63]);
  }
  const size_t rest = bytes.size() - i;
  if (rest == 1) {
    const uint32_t v = at(i) << 16;
    out.push_back(kAlphabet[(v >> 18) & 63]);
    out.push_back(kAlphabet[(v >> 12) & 63]);
  } else if (rest == 2) {
    const uint32_t v = (at(i) << 16) | (at(i + 1) << 8);
    out.push_back(kAlphabet[(v >> 18) & 63]);
    out.push_back(kAlphabet[(v >> 12) & 63]);
    out.push_back(kAlphabet[(v >> 6) & 63]);
  }
  return out;
}

Result<std::string> Base64UrlDecode(std::string_view text) {
  // A lone trailing character carries only 6 bits, less than one byte: no encoder produces it.
  if (text.size() % 4 == 1) return InvalidArgument("bad base64");
  std::string out;
  out.reserve(text.size() * 3 / 4);
  uint32_t buffer = 0;
  int bits = 0;
  for (const char c : text) {
    const int8_t value = kDecodeTable[static_cast<uint8_t>(c)];
    if (value < 0) return InvalidArgument("bad base64");
    buffer = (buffer << 6) | static_cast<uint32_t>(value);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((buffer >> bits) & 0xff));
    }
  }
  // The bits left over must be zero, or two different texts would decode to the same bytes.
  if ((buffer & ((1u << bits) - 1)) != 0) return InvalidArgument("bad base64");
  return out;
}

std::string HmacSha256(std::string_view key, std::string_view data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  // HMAC() only fails on allocation failure or an unusable digest; an empty result then never
  // matches a real 32-byte signature, so verification fails closed.
  if (HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
           reinterpret_cast<const unsigned char*>(data.data()), data.size(), digest,
           &length) == nullptr) {
    return std::string();
  }
  return std::string(reinterpret_cast<const char*>(digest), length);
}

Result<std::map<std::string, JsonValue>> ParseJsonObject(std::string_view text) {
  std::map<std::string, JsonValue> members;
  JsonReader reader(text);
  if (!reader.ReadObject(&members)) return InvalidArgument("bad JSON");
  return members;
}

std::string QuoteJson(std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(text.size() + 2);
  out.push_back('"');
  for (const char c : text) {
    const auto byte = static_cast<uint8_t>(c);
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(c);
    } else if (byte < 0x20) {
      out += "\\u00";
      out.push_back(kHex[byte >> 4]);
      out.push_back(kHex[byte & 15]);
    } else {
      out.push_back(c);
    }
  }
  out.push_back('"');
  return out;
}

std::string SignRaw(std::string_view secret, std::string_view header_json,
                    std::string_view payload_json) {
  std::string token = Base64UrlEncode(header_json);
  token += '.';
  token += Base64UrlEncode(payload_json);
  const std::string signature = HmacSha256(secret, token);
  token += '.';
  token += Base64UrlEncode(signature);
  return token;
}

}  // namespace jwt

namespace {

constexpr size_t kMinSecretBytes = 32;
constexpr size_t kSignatureBytes = 32;
// NumericDate values beyond year 9999 are not plausible and would overflow milliseconds.
constexpr double kMaxNumericDate = 253402300799.0;

using JsonObject = std::map<std::string, jwt::JsonValue>;

// a + b, held at the int64 limits: leeway is operator-supplied and may be huge.
int64_t SaturatingAdd(int64_t a, int64_t b) {
  int64_t sum = 0;
  if (__builtin_add_overflow(a, b, &sum)) return b > 0 ? INT64_MAX : INT64_MIN;
  return sum;
}

const jwt::JsonValue* Find(const JsonObject& object, const std::string& key) {
  auto it = object.find(key);
  return it == object.end() ? nullptr : &it->second;
}

// A NumericDate claim (seconds) as Unix milliseconds. Fractional seconds are allowed by RFC 7519.
bool NumericDateMs(const jwt::JsonValue& value, int64_t* out) {
  if (value.type != jwt::JsonValue::Type::kNumber) return false;
  if (value.number < 0 || value.number > kMaxNumericDate) return false;
  *out = static_cast<int64_t>(std::floor(value.number * 1000.0));
  return true;
}

class JwtAuthenticator final : public Authenticator {
 public:
  explicit JwtAuthenticator(JwtOptions options) : options_(std::move(options)) {}

  Result<Identity> Verify(std::string_view token, int64_t now_ms) const override {
    // Bounded before anything else is done with it: decoding cost stays proportional to a limit
    // the operator chose, not to what a peer sends.
    if (token.size() > options_.max_token_bytes) return Unauthenticated("token too large");

    const size_t first = token.find('.');
    const size_t second = first == std::string_view::npos ? first : token.find('.', first + 1);
    if (first == std::string_view::npos || second == std::string_view::npos ||
        token.find('.', second + 1) != std::string_view::npos) {
      return Unauthenticated("malformed token");
    }
    const std::string_view header_b64 = token.substr(0, first);
    const std::string_view payload_b64 = token.substr(first + 1, second - first - 1);
    const std::string_view signature_b64 = token.substr(second + 1);

    Result<std::string> header_json = jwt::Base64UrlDecode(header_b64);
    Result<std::string> payload_json = jwt::Base64UrlDecode(payload_b64);
    Result<std::string> signature = jwt::Base64UrlDecode(signature_b64);
    if (!header_json.ok() || !payload_json.ok() || !signature.ok()) {
      return Unauthenticated("malformed token: bad base64");
    }

    Result<JsonObject> header = jwt::ParseJsonObject(*header_json);
    if (!header.ok()) return Unauthenticated("malformed token: bad header");
    const jwt::JsonValue* alg = Find(*header, "alg");
    // Only HS256: "none" would skip the signature and an asymmetric alg would make the shared
    // secret act as a public key (the classic algorithm-confusion attacks).
    if (alg == nullptr || alg->type != jwt::JsonValue::Type::kString || alg->string != "HS256") {
      return Unauthenticated("unsupported algorithm (only HS256)");
    }
    // RFC 7515 4.1.11: a recipient that does not understand a critical extension must refuse.
    if (Find(*header, "crit") != nullptr) {
      return Unauthenticated("unsupported critical header");
    }
    std::string kid;
    if (const jwt::JsonValue* value = Find(*header, "kid"); value != nullptr) {
      if (value->type != jwt::JsonValue::Type::kString) {
        return Unauthenticated("malformed token: kid is not a string");
      }
      kid = value->string;
    }
    auto secret = options_.secrets.find(kid);
    if (secret == options_.secrets.end()) return Unauthenticated("unknown key id");

    // The signature covers the encoded header and payload exactly as sent.
    const std::string expected = jwt::HmacSha256(secret->second, token.substr(0, second));
    if (signature->size() != kSignatureBytes || expected.size() != kSignatureBytes ||
        CRYPTO_memcmp(expected.data(), signature->data(), kSignatureBytes) != 0) {
      return Unauthenticated("bad signature");
    }

    // Only now is the payload trusted enough to read.
    Result<JsonObject> payload = jwt::ParseJsonObject(*payload_json);
    if (!payload.ok()) return Unauthenticated("malformed token: bad payload");
    const jwt::JsonValue* sub = Find(*payload, "sub");
    if (sub == nullptr) return Unauthenticated("missing sub");
    if (sub->type != jwt::JsonValue::Type::kString || sub->string.empty()) {
      return Unauthenticated("invalid sub");
    }
    const jwt::JsonValue* exp = Find(*payload, "exp");
    if (exp == nullptr) return Unauthenticated("missing exp");
    int64_t exp_ms = 0;
    if (!NumericDateMs(*exp, &exp_ms)) return Unauthenticated("invalid exp");
    if (now_ms >= SaturatingAdd(exp_ms, options_.leeway_ms))
      return Unauthenticated("token expired");
    if (const jwt::JsonValue* nbf = Find(*payload, "nbf"); nbf != nullptr) {
      int64_t nbf_ms = 0;
      if (!NumericDateMs(*nbf, &nbf_ms)) return Unauthenticated("invalid nbf");
      if (SaturatingAdd(now_ms, options_.leeway_ms) < nbf_ms)
        return Unauthenticated("token not yet valid");
    }
    // The session may last exactly as long as this token would still be accepted.
    return Identity{sub->string, SaturatingAdd(exp_ms, options_.leeway_ms)};
  }

 private:
  const JwtOptions options_;
};

}  // namespace

Result<std::shared_ptr<Authenticator>> NewJwtAuthenticator(JwtOptions options) {
  if (options.secrets.empty()) return InvalidArgument("secrets: at least one secret is required");
  for (const auto& [kid, secret] : options.secrets) {
    if (secret.size() < kMinSecretBytes) {
      return InvalidArgument("secrets[\"" + SanitizeUtf8(kid) + "\"]: shorter than " +
                             std::to_string(kMinSecretBytes) + " bytes");
    }
  }
  if (options.leeway_ms < 0) return InvalidArgument("leeway_ms: must not be negative");
  if (options.max_token_bytes == 0) return InvalidArgument("max_token_bytes: must be positive");
  return std::shared_ptr<Authenticator>(std::make_shared<JwtAuthenticator>(std::move(options)));
}

Result<std::string> SignJwt(std::string_view secret, std::string_view kid, std::string_view user_id,
                            int64_t now_ms, int64_t ttl_ms) {
  if (secret.size() < kMinSecretBytes) {
    return InvalidArgument("secret: shorter than " + std::to_string(kMinSecretBytes) + " bytes");
  }
  // The ids the server accepts at Hello: a token for any other would be refused there.
  if (user_id.empty()) return InvalidArgument("user_id: must not be empty");
  if (user_id.size() > kMaxUserIdBytes) {
    return InvalidArgument("user_id: longer than " + std::to_string(kMaxUserIdBytes) + " bytes");
  }
  if (!IsValidUtf8(user_id)) return InvalidArgument("user_id: invalid UTF-8");
  if (!IsValidUtf8(kid)) return InvalidArgument("kid: invalid UTF-8");
  const int64_t max_ms = static_cast<int64_t>(kMaxNumericDate) * 1000;
  if (now_ms < 0 || now_ms > max_ms || ttl_ms < -now_ms || ttl_ms > max_ms - now_ms) {
    return InvalidArgument("now_ms, ttl_ms: expiry out of range");
  }

  std::string header = R"({"alg":"HS256","typ":"JWT")";
  if (!kid.empty()) header += ",\"kid\":" + jwt::QuoteJson(kid);
  header += '}';
  // Whole seconds, rounded down: the token never outlives the requested ttl.
  const std::string payload = "{\"sub\":" + jwt::QuoteJson(user_id) +
                              ",\"iat\":" + std::to_string(now_ms / 1000) +
                              ",\"exp\":" + std::to_string((now_ms + ttl_ms) / 1000) + "}";
  return jwt::SignRaw(secret, header, payload);
}

}  // namespace chat
