#include "src/core/utf8.h"

#include <cstddef>
#include <cstdint>

namespace chat {

namespace {

// Length of the well-formed sequence starting at text[i], or 0 if it is ill-formed. Follows the
// table of well-formed byte sequences in the Unicode standard (section 3.9, table 3-7).
size_t SequenceLength(std::string_view text, size_t i) {
  const auto byte = [&](size_t k) { return static_cast<uint8_t>(text[i + k]); };
  const size_t left = text.size() - i;
  const uint8_t b0 = byte(0);
  if (b0 < 0x80) return 1;
  const auto trail = [&](size_t k, uint8_t lo, uint8_t hi) {
    return k < left && byte(k) >= lo && byte(k) <= hi;
  };
  if (b0 >= 0xc2 && b0 <= 0xdf) return trail(1, 0x80, 0xbf) ? 2 : 0;
  if (b0 >= 0xe0 && b0 <= 0xef) {
    // E0 excludes overlong forms, ED excludes the UTF-16 surrogates D800..DFFF.
    const uint8_t lo = b0 == 0xe0 ? 0xa0 : 0x80;
    const uint8_t hi = b0 == 0xed ? 0x9f : 0xbf;
    return trail(1, lo, hi) && trail(2, 0x80, 0xbf) ? 3 : 0;
  }
  if (b0 >= 0xf0 && b0 <= 0xf4) {
    // F0 excludes overlong forms, F4 excludes code points above U+10FFFF.
    const uint8_t lo = b0 == 0xf0 ? 0x90 : 0x80;
    const uint8_t hi = b0 == 0xf4 ? 0x8f : 0xbf;
    return trail(1, lo, hi) && trail(2, 0x80, 0xbf) && trail(3, 0x80, 0xbf) ? 4 : 0;
  }
  return 0;
}

}  // namespace

bool IsValidUtf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    // ASCII runs are the common case and need no table lookup.
    if (static_cast<uint8_t>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    const size_t length = SequenceLength(text, i);
    if (length == 0) return false;
    i += length;
  }
  return true;
}

std::string SanitizeUtf8(std::string_view text) {
  static constexpr std::string_view kReplacement = "\xef\xbf\xbd";
  std::string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    const size_t length = SequenceLength(text, i);
    if (length == 0) {
      out += kReplacement;
      ++i;
      continue;
    }
    out.append(text.substr(i, length));
    i += length;
  }
  return out;
}

std::string_view Utf8Prefix(std::string_view text, size_t max_bytes) {
  if (text.size() <= max_bytes) return text;
  size_t n = max_bytes;
  while (n > 0 && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80) --n;
  return text.substr(0, n);
}

}  // namespace chat
