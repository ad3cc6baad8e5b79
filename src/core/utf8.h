// UTF-8 checks shared by the codec (protobuf strings must be UTF-8), the JWT reader and the
// server's bounded strings (close reasons, push previews).
#ifndef CHAT_SRC_CORE_UTF8_H_
#define CHAT_SRC_CORE_UTF8_H_

#include <string>
#include <string_view>

namespace chat {

// True if `text` is well-formed UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing
// above U+10FFFF. The same rule protobuf applies to proto3 string fields.
bool IsValidUtf8(std::string_view text);

// `text` with every ill-formed sequence replaced by U+FFFD, for echoing untrusted bytes into a
// string field that must be UTF-8.
std::string SanitizeUtf8(std::string_view text);

// The longest prefix of `text` of at most `max_bytes` that does not end inside a UTF-8
// sequence (`text` itself when it fits).
std::string_view Utf8Prefix(std::string_view text, size_t max_bytes);

}  // namespace chat

#endif  // CHAT_SRC_CORE_UTF8_H_
