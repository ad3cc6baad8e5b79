#include "src/core/utf8.h"

#include <doctest/doctest.h>

#include <string>

namespace chat {
namespace {

TEST_CASE("utf8: well-formed text is accepted") {
  for (const std::string& text :
       {std::string(), std::string("plain ascii"), std::string("\xc3\xa9t\xc3\xa9"),
        std::string("\xe2\x82\xac"), std::string("\xf0\x9f\x98\x80"), std::string("\xef\xbf\xbf"),
        std::string("\xf4\x8f\xbf\xbf"), std::string("nul\0inside", 10)}) {
    CAPTURE(text);
    CHECK(IsValidUtf8(text));
    CHECK(SanitizeUtf8(text) == text);
  }
}

TEST_CASE("utf8: ill-formed sequences are refused and replaced") {
  for (const std::string& text : {
           std::string("\xff"),              // never valid
           std::string("\x80"),              // stray continuation byte
           std::string("\xc3"),              // cut-off sequence
           std::string("\xc0\xaf"),          // overlong '/'
           std::string("\xe0\x80\xaf"),      // overlong, three bytes
           std::string("\xed\xa0\x80"),      // UTF-16 surrogate D800
           std::string("\xf4\x90\x80\x80"),  // above U+10FFFF
           std::string("\xf0\x9f\x98"),      // four-byte sequence missing its last byte
       }) {
    CAPTURE(text.size());
    CHECK_FALSE(IsValidUtf8(text));
    const std::string sanitized = SanitizeUtf8(text);
    CHECK(IsValidUtf8(sanitized));
    CHECK(sanitized.find("\xef\xbf\xbd") != std::string::npos);
  }
  CHECK(SanitizeUtf8("a\xff"
                     "b") ==
        "a\xef\xbf\xbd"
        "b");
}

TEST_CASE("utf8: a prefix within a byte bound never ends inside a sequence") {
  CHECK(Utf8Prefix("short", 10) == "short");
  CHECK(Utf8Prefix("abcdef", 4) == "abcd");
  // "a€b": the euro sign is 3 bytes (1..3); a bound inside it cuts before it.
  const std::string text =
      "a\xE2\x82\xAC"
      "b";
  CHECK(Utf8Prefix(text, 1) == "a");
  CHECK(Utf8Prefix(text, 2) == "a");
  CHECK(Utf8Prefix(text, 3) == "a");
  CHECK(Utf8Prefix(text, 4) == "a\xE2\x82\xAC");
  CHECK(Utf8Prefix(text, 0).empty());
}

}  // namespace
}  // namespace chat
