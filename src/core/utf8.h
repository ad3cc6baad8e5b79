// UTF-8 checks shared by the codec (protobuf strings must be UTF-8) and the JWT reader.
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

}  // namespace chat

#endif  // CHAT_SRC_CORE_UTF8_H_
