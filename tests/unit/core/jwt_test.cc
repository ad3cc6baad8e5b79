#include "src/core/jwt.h"

#include <doctest/doctest.h>
#include <stdlib.h>

#include <clocale>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <string>

#include "chat/auth.h"
#include "tests/testing/temp_dir.h"

namespace chat {
namespace {

const std::string kSecret = "0123456789abcdef0123456789abcdef";  // exactly 32 bytes
const std::string kOtherSecret = "fedcba9876543210fedcba9876543210-other";
constexpr int64_t kNow = 1'735'689'600'000;  // 2025-01-01T00:00:00Z
constexpr int64_t kNowSeconds = kNow / 1000;
constexpr int64_t kLeeway = 30'000;

std::shared_ptr<Authenticator> MakeAuthenticator(std::map<std::string, std::string> secrets = {
                                                     {"", kSecret}}) {
  Result<std::shared_ptr<Authenticator>> authenticator =
      NewJwtAuthenticator(JwtOptions{.secrets = std::move(secrets), .leeway_ms = kLeeway});
  REQUIRE(authenticator.ok());
  return *authenticator;
}

std::string Sign(std::string_view payload, std::string_view header = R"({"alg":"HS256"})",
                 std::string_view secret = kSecret) {
  return jwt::SignRaw(secret, header, payload);
}

std::string Payload(int64_t exp_seconds, std::string_view extra = "") {
  return R"({"sub":"alice","exp":)" + std::to_string(exp_seconds) + std::string(extra) + "}";
}

void CheckRefused(const Result<Identity>& result, std::string_view reason) {
  REQUIRE_FALSE(result.ok());
  CHECK(result.status().code() == Code::kUnauthenticated);
  CHECK(result.status().message() == reason);
}

TEST_CASE("jwt: a token from SignJwt is accepted with its user and expiry") {
  auto authenticator = MakeAuthenticator();
  Result<std::string> token = SignJwt(kSecret, "", "alice", kNow, 3'600'000);
  REQUIRE(token.ok());
  Result<Identity> identity = authenticator->Verify(*token, kNow);
  REQUIRE_MESSAGE(identity.ok(), identity.status().ToString());
  CHECK(identity->user_id == "alice");
  CHECK(identity->expires_at_ms == kNow + 3'600'000 + kLeeway);
}

TEST_CASE("jwt: user ids with quotes, backslashes and non-ASCII text survive signing") {
  auto authenticator = MakeAuthenticator();
  const std::string user = "al\"i\\ce \xc3\xa9\t\xf0\x9f\x98\x80";
  Result<std::string> token = SignJwt(kSecret, "", user, kNow, 60'000);
  REQUIRE(token.ok());
  Result<Identity> identity = authenticator->Verify(*token, kNow);
  REQUIRE(identity.ok());
  CHECK(identity->user_id == user);
}

TEST_CASE("jwt: a hand-made token with typ, iat, aud list and escapes is accepted") {
  auto authenticator = MakeAuthenticator();
  const std::string token =
      Sign(R"( { "sub" : "b\u00f6b\ud83d\ude00" , "exp" : )" + std::to_string(kNowSeconds + 60) +
               R"(.5, "iat": 1.7e9, "aud": ["x", {"y": [1, null]}], "admin": false, "n": null } )",
           R"({"typ":"JWT","alg":"HS256"})");
  Result<Identity> identity = authenticator->Verify(token, kNow);
  REQUIRE_MESSAGE(identity.ok(), identity.status().ToString());
  CHECK(identity->user_id ==
        "b\xc3\xb6"
        "b\xf0\x9f\x98\x80");
  CHECK(identity->expires_at_ms == kNow + 60'500 + kLeeway);
}

// An application may switch LC_NUMERIC (Qt does, from the environment); a fractional exp is
// still read with '.' as its decimal point. The locale is built into a temp dir (LOCPATH).
TEST_CASE("jwt: a fractional exp reads the same under a locale with a decimal comma") {
  testing::TempDir dir;
  const std::string build =
      "localedef -i de_DE -f UTF-8 " + dir.File("de_DE.UTF-8") + " >/dev/null 2>&1";
  REQUIRE(std::system(build.c_str()) == 0);
  REQUIRE(setenv("LOCPATH", dir.path().c_str(), 1) == 0);
  const bool switched = std::setlocale(LC_NUMERIC, "de_DE.UTF-8") != nullptr;
  const std::string point = std::localeconv()->decimal_point;
  auto authenticator = MakeAuthenticator();
  Result<Identity> identity = authenticator->Verify(
      Sign(R"({"sub":"alice","exp":)" + std::to_string(kNowSeconds + 60) + ".25}"), kNow);
  std::setlocale(LC_NUMERIC, "C");
  unsetenv("LOCPATH");
  REQUIRE(switched);
  REQUIRE(point == ",");
  REQUIRE_MESSAGE(identity.ok(), identity.status().ToString());
  CHECK(identity->expires_at_ms == (kNowSeconds + 60) * 1000 + 250 + kLeeway);
}

TEST_CASE("jwt: an expired token is refused beyond the leeway") {
  auto authenticator = MakeAuthenticator();
  const std::string token = Sign(Payload(kNowSeconds));
  CheckRefused(authenticator->Verify(token, kNow + kLeeway), "token expired");
  CheckRefused(authenticator->Verify(token, kNow + 3'600'000), "token expired");
}

TEST_CASE("jwt: an expired token within the leeway is still accepted") {
  auto authenticator = MakeAuthenticator();
  const std::string token = Sign(Payload(kNowSeconds));
  CHECK(authenticator->Verify(token, kNow - 1).ok());
  CHECK(authenticator->Verify(token, kNow).ok());
  CHECK(authenticator->Verify(token, kNow + kLeeway - 1).ok());
}

TEST_CASE("jwt: a token before its nbf is refused beyond the leeway") {
  auto authenticator = MakeAuthenticator();
  const std::string token =
      Sign(Payload(kNowSeconds + 3600, R"(,"nbf":)" + std::to_string(kNowSeconds + 60)));
  CheckRefused(authenticator->Verify(token, kNow), "token not yet valid");
  CheckRefused(authenticator->Verify(token, kNow + 60'000 - kLeeway - 1), "token not yet valid");
  CHECK(authenticator->Verify(token, kNow + 60'000 - kLeeway).ok());
  CHECK(authenticator->Verify(token, kNow + 60'000).ok());
}

TEST_CASE("jwt: a forged signature is refused") {
  auto authenticator = MakeAuthenticator();
  std::string token = *SignJwt(kSecret, "", "alice", kNow, 60'000);
  // Change the user in the payload but keep the signature.
  const size_t first = token.find('.');
  const size_t second = token.find('.', first + 1);
  const std::string forged_payload =
      jwt::Base64UrlEncode(R"({"sub":"mallory","exp":)" + std::to_string(kNowSeconds + 60) + "}");
  const std::string forged = token.substr(0, first + 1) + forged_payload + token.substr(second);
  CheckRefused(authenticator->Verify(forged, kNow), "bad signature");

  // Flip one bit of the signature.
  std::string flipped = token;
  flipped[flipped.size() - 2] = flipped[flipped.size() - 2] == 'A' ? 'B' : 'A';
  CheckRefused(authenticator->Verify(flipped, kNow), "bad signature");

  // A signature of the wrong length.
  CheckRefused(authenticator->Verify(token.substr(0, second + 1) + "AAAA", kNow), "bad signature");
  CheckRefused(authenticator->Verify(token.substr(0, second + 1), kNow), "bad signature");
}

TEST_CASE("jwt: a token signed with another key is refused") {
  auto authenticator = MakeAuthenticator();
  Result<std::string> token = SignJwt(kOtherSecret, "", "alice", kNow, 60'000);
  REQUIRE(token.ok());
  CheckRefused(authenticator->Verify(*token, kNow), "bad signature");
}

TEST_CASE("jwt: kid selects among rotated secrets") {
  auto authenticator = MakeAuthenticator({{"2024", kSecret}, {"2025", kOtherSecret}});
  Result<std::string> old_token = SignJwt(kSecret, "2024", "alice", kNow, 60'000);
  Result<std::string> new_token = SignJwt(kOtherSecret, "2025", "bob", kNow, 60'000);
  REQUIRE(old_token.ok());
  REQUIRE(new_token.ok());
  CHECK(authenticator->Verify(*old_token, kNow)->user_id == "alice");
  CHECK(authenticator->Verify(*new_token, kNow)->user_id == "bob");
  // The right secret under the wrong kid is a bad signature.
  Result<std::string> swapped = SignJwt(kSecret, "2025", "alice", kNow, 60'000);
  CheckRefused(authenticator->Verify(*swapped, kNow), "bad signature");
  // No "" entry: a token without kid has no key.
  Result<std::string> no_kid = SignJwt(kSecret, "", "alice", kNow, 60'000);
  CheckRefused(authenticator->Verify(*no_kid, kNow), "unknown key id");
}

TEST_CASE("jwt: an unknown kid is refused") {
  auto authenticator = MakeAuthenticator();
  Result<std::string> token = SignJwt(kSecret, "retired", "alice", kNow, 60'000);
  REQUIRE(token.ok());
  CheckRefused(authenticator->Verify(*token, kNow), "unknown key id");
  CheckRefused(
      authenticator->Verify(Sign(Payload(kNowSeconds + 60), R"({"alg":"HS256","kid":7})"), kNow),
      "malformed token: kid is not a string");
}

TEST_CASE("jwt: alg none is refused even with an empty signature") {
  auto authenticator = MakeAuthenticator();
  const std::string unsigned_token = jwt::Base64UrlEncode(R"({"alg":"none"})") + "." +
                                     jwt::Base64UrlEncode(Payload(kNowSeconds + 60)) + ".";
  CheckRefused(authenticator->Verify(unsigned_token, kNow), "unsupported algorithm (only HS256)");
  // Even when signed correctly, the header must say HS256.
  CheckRefused(authenticator->Verify(Sign(Payload(kNowSeconds + 60), R"({"alg":"none"})"), kNow),
               "unsupported algorithm (only HS256)");
}

TEST_CASE("jwt: every algorithm other than HS256 is refused") {
  auto authenticator = MakeAuthenticator();
  for (const char* header :
       {R"({"alg":"HS512"})", R"({"alg":"RS256"})", R"({"alg":"ES256"})", R"({"alg":"hs256"})",
        R"({"alg":null})", R"({"alg":256})", R"({"typ":"JWT"})"}) {
    CAPTURE(header);
    CheckRefused(authenticator->Verify(Sign(Payload(kNowSeconds + 60), header), kNow),
                 "unsupported algorithm (only HS256)");
  }
  CheckRefused(authenticator->Verify(
                   Sign(Payload(kNowSeconds + 60), R"({"alg":"HS256","crit":["exp"]})"), kNow),
               "unsupported critical header");
}

TEST_CASE("jwt: garbage is a malformed token") {
  auto authenticator = MakeAuthenticator();
  for (const char* token : {"", "garbage", "a.b", "a.b.c.d", "..", "...", "eyJ.eyJ"}) {
    CAPTURE(token);
    const Result<Identity> result = authenticator->Verify(token, kNow);
    REQUIRE_FALSE(result.ok());
    CHECK(result.status().code() == Code::kUnauthenticated);
    CHECK(result.status().message().starts_with("malformed token"));
  }
  CheckRefused(authenticator->Verify("garbage", kNow), "malformed token");
  // Valid base64 of something that is not a JSON object.
  const std::string not_json = jwt::Base64UrlEncode("hello") + "." +
                               jwt::Base64UrlEncode(Payload(kNowSeconds + 60)) + ".AAAA";
  CheckRefused(authenticator->Verify(not_json, kNow), "malformed token: bad header");
  // A correctly signed payload that is not JSON.
  CheckRefused(authenticator->Verify(Sign("[1,2]"), kNow), "malformed token: bad payload");
  CheckRefused(authenticator->Verify(Sign(R"({"sub":"a","sub":"b","exp":1})"), kNow),
               "malformed token: bad payload");
}

TEST_CASE("jwt: bad base64 and padding are refused") {
  auto authenticator = MakeAuthenticator();
  const std::string token = *SignJwt(kSecret, "", "alice", kNow, 60'000);
  const size_t first = token.find('.');
  // Standard-alphabet characters, whitespace and padding are all outside base64url.
  for (const std::string& bad : {token.substr(0, first) + "+" + token.substr(first), token + "=",
                                 token.substr(0, first) + "==" + token.substr(first), " " + token,
                                 token.substr(0, first) + "/" + token.substr(first)}) {
    CAPTURE(bad);
    CheckRefused(authenticator->Verify(bad, kNow), "malformed token: bad base64");
  }
}

TEST_CASE("jwt: oversized tokens are refused before decoding") {
  Result<std::shared_ptr<Authenticator>> authenticator =
      NewJwtAuthenticator(JwtOptions{.secrets = {{"", kSecret}}, .max_token_bytes = 200});
  REQUIRE(authenticator.ok());
  Result<std::string> token = SignJwt(kSecret, "", std::string(kMaxUserIdBytes, 'u'), kNow, 60'000);
  REQUIRE(token.ok());
  CheckRefused((*authenticator)->Verify(*token, kNow), "token too large");
  // Garbage of that size is refused for its size, not its content.
  CheckRefused((*authenticator)->Verify(std::string(201, '!'), kNow), "token too large");
  CheckRefused((*authenticator)->Verify(std::string(200, '!'), kNow), "malformed token");
}

TEST_CASE("jwt: sub and exp are required") {
  auto authenticator = MakeAuthenticator();
  const std::string exp = std::to_string(kNowSeconds + 60);
  CheckRefused(authenticator->Verify(Sign(R"({"exp":)" + exp + "}"), kNow), "missing sub");
  CheckRefused(authenticator->Verify(Sign(R"({"sub":"","exp":)" + exp + "}"), kNow), "invalid sub");
  CheckRefused(authenticator->Verify(Sign(R"({"sub":42,"exp":)" + exp + "}"), kNow), "invalid sub");
  CheckRefused(authenticator->Verify(Sign(R"({"sub":"alice"})"), kNow), "missing exp");
  CheckRefused(authenticator->Verify(Sign(R"({"sub":"alice","exp":")" + exp + "\"}"), kNow),
               "invalid exp");
  CheckRefused(authenticator->Verify(Sign(R"({"sub":"alice","exp":1e300})"), kNow), "invalid exp");
  CheckRefused(authenticator->Verify(Sign(R"({"sub":"alice","exp":-5})"), kNow), "invalid exp");
  CheckRefused(authenticator->Verify(Sign(Payload(kNowSeconds + 60, R"(,"nbf":"soon")")), kNow),
               "invalid nbf");
}

TEST_CASE("jwt: NewJwtAuthenticator refuses missing and short secrets") {
  Result<std::shared_ptr<Authenticator>> none = NewJwtAuthenticator(JwtOptions{});
  REQUIRE_FALSE(none.ok());
  CHECK(none.status().code() == Code::kInvalidArgument);
  CHECK(none.status().message() == "secrets: at least one secret is required");

  Result<std::shared_ptr<Authenticator>> short_secret =
      NewJwtAuthenticator(JwtOptions{.secrets = {{"", kSecret}, {"k1", std::string(31, 'x')}}});
  REQUIRE_FALSE(short_secret.ok());
  CHECK(short_secret.status().code() == Code::kInvalidArgument);
  CHECK(short_secret.status().message() == "secrets[\"k1\"]: shorter than 32 bytes");

  Result<std::shared_ptr<Authenticator>> negative =
      NewJwtAuthenticator(JwtOptions{.secrets = {{"", kSecret}}, .leeway_ms = -1});
  REQUIRE_FALSE(negative.ok());
  CHECK(negative.status().message() == "leeway_ms: must not be negative");

  Result<std::shared_ptr<Authenticator>> zero_size =
      NewJwtAuthenticator(JwtOptions{.secrets = {{"", kSecret}}, .max_token_bytes = 0});
  REQUIRE_FALSE(zero_size.ok());
  CHECK(zero_size.status().message() == "max_token_bytes: must be positive");
}

TEST_CASE("jwt: SignJwt refuses what it cannot sign") {
  Result<std::string> short_secret = SignJwt("short", "", "alice", kNow, 1000);
  REQUIRE_FALSE(short_secret.ok());
  CHECK(short_secret.status().code() == Code::kInvalidArgument);
  CHECK(short_secret.status().message() == "secret: shorter than 32 bytes");
  Result<std::string> no_user = SignJwt(kSecret, "", "", kNow, 1000);
  REQUIRE_FALSE(no_user.ok());
  CHECK(no_user.status().message() == "user_id: must not be empty");
  Result<std::string> bad_user = SignJwt(kSecret, "", "\xff", kNow, 1000);
  REQUIRE_FALSE(bad_user.ok());
  CHECK(bad_user.status().message() == "user_id: invalid UTF-8");
  Result<std::string> overflow =
      SignJwt(kSecret, "", "alice", kNow, std::numeric_limits<int64_t>::max());
  REQUIRE_FALSE(overflow.ok());
  CHECK(overflow.status().message() == "now_ms, ttl_ms: expiry out of range");
}

// A token only for a user id the server accepts at Hello: 1 to kMaxUserIdBytes bytes of UTF-8.
TEST_CASE("jwt: SignJwt refuses a user id the server would refuse, and signs the longest") {
  auto authenticator = MakeAuthenticator();
  const std::string longest(kMaxUserIdBytes, 'u');
  Result<std::string> token = SignJwt(kSecret, "", longest, kNow, 60'000);
  REQUIRE_MESSAGE(token.ok(), token.status().ToString());
  Result<Identity> identity = authenticator->Verify(*token, kNow);
  REQUIRE(identity.ok());
  CHECK(identity->user_id == longest);

  Result<std::string> too_long = SignJwt(kSecret, "", longest + "u", kNow, 60'000);
  REQUIRE_FALSE(too_long.ok());
  CHECK(too_long.status().code() == Code::kInvalidArgument);
  CHECK(too_long.status().message() == "user_id: longer than 128 bytes");
  // Not UTF-8: a lone continuation byte, an overlong '/', a surrogate.
  for (const char* bad : {"alice\x80", "\xc0\xaf", "\xed\xa0\x80"}) {
    CAPTURE(bad);
    Result<std::string> refused = SignJwt(kSecret, "", bad, kNow, 60'000);
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.status().code() == Code::kInvalidArgument);
    CHECK(refused.status().message() == "user_id: invalid UTF-8");
  }
  Result<std::string> empty = SignJwt(kSecret, "", "", kNow, 60'000);
  REQUIRE_FALSE(empty.ok());
  CHECK(empty.status().code() == Code::kInvalidArgument);
}

TEST_CASE("jwt: a huge leeway does not overflow") {
  Result<std::shared_ptr<Authenticator>> authenticator = NewJwtAuthenticator(
      JwtOptions{.secrets = {{"", kSecret}}, .leeway_ms = std::numeric_limits<int64_t>::max()});
  REQUIRE(authenticator.ok());
  CHECK((*authenticator)->Verify(Sign(Payload(1)), kNow).ok());
}

TEST_CASE("jwt: base64url round-trips and refuses non-canonical text") {
  for (const std::string& bytes :
       {std::string(), std::string("f"), std::string("fo"), std::string("foo"), std::string("foob"),
        std::string("\xfb\xff\xfe\x00", 4)}) {
    const std::string text = jwt::Base64UrlEncode(bytes);
    CHECK(text.find('=') == std::string::npos);
    Result<std::string> back = jwt::Base64UrlDecode(text);
    REQUIRE(back.ok());
    CHECK(*back == bytes);
  }
  CHECK(jwt::Base64UrlEncode("\xfb\xff") == "-_8");
  for (const char* bad : {"A", "Zm9v=", "Zg==", "Zh", "Zm9=", "Zm+v", "Zm/v", "Zm9v\n"}) {
    CAPTURE(bad);
    Result<std::string> decoded = jwt::Base64UrlDecode(bad);
    REQUIRE_FALSE(decoded.ok());
    CHECK(decoded.status().code() == Code::kInvalidArgument);
    CHECK(decoded.status().message() == "bad base64");
  }
}

TEST_CASE("jwt: HMAC-SHA256 matches the RFC 4231 test vector") {
  // RFC 4231 test case 2.
  const std::string mac = jwt::HmacSha256("Jefe", "what do ya want for nothing?");
  CHECK(jwt::Base64UrlEncode(mac) == "W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM");
}

TEST_CASE("jwt: the JSON reader is strict") {
  Result<std::map<std::string, jwt::JsonValue>> ok =
      jwt::ParseJsonObject(R"({"s":"a\"b\\c\/\n","n":-1.5e2,"t":true,"f":false,"z":null,"o":{}})");
  REQUIRE(ok.ok());
  CHECK(ok->at("s").string == "a\"b\\c/\n");
  CHECK(ok->at("n").number == -150.0);
  CHECK(ok->at("t").boolean);
  CHECK(ok->at("f").type == jwt::JsonValue::Type::kBool);
  CHECK(ok->at("z").type == jwt::JsonValue::Type::kNull);
  CHECK(ok->at("o").type == jwt::JsonValue::Type::kOther);
  for (const char* bad : {"",
                          "[]",
                          "{",
                          "{}x",
                          R"({"a":1,})",
                          R"({"a" 1})",
                          R"({'a':1})",
                          R"({"a":01})",
                          R"({"a":1.})",
                          R"({"a":.5})",
                          R"({"a":1e})",
                          R"({"a":tru})",
                          R"({"a":"\x"})",
                          R"({"a":"\ud800"})",
                          R"({"a":"\udc00"})",
                          "{\"a\":\"\x01\"}",
                          "{\"a\":\"\xff\"}",
                          R"({"a":1,"a":2})",
                          R"({"a":[1,]})",
                          R"({"a":[[[[[[[[[[]]]]]]]]]]})",
                          R"({"a":1e999})",
                          R"({"a":"unterminated})"}) {
    CAPTURE(bad);
    Result<std::map<std::string, jwt::JsonValue>> result = jwt::ParseJsonObject(bad);
    REQUIRE_FALSE(result.ok());
    CHECK(result.status().message() == "bad JSON");
  }
}

}  // namespace
}  // namespace chat
