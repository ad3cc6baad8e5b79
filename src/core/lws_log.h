// libwebsockets' own log lines (its errors) go through chat::Log, like every line the SDK
// writes, so an application that replaced the sink sees them there and not on stderr.
//
// Header-only: the server and the client transport include it, and chat::core itself does not
// link libwebsockets. lws keeps one log setting per process; setting it again is harmless.
#ifndef CHAT_SRC_CORE_LWS_LOG_H_
#define CHAT_SRC_CORE_LWS_LOG_H_

#include <libwebsockets.h>

#include <mutex>
#include <string>
#include <string_view>

#include "chat/log.h"

namespace chat {

inline void LwsLogLine(int level, const char* line) {
  std::string_view text(line != nullptr ? line : "");
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.remove_suffix(1);
  Log(level == LLL_ERR ? LogLevel::kError : LogLevel::kWarn, "lws: " + std::string(text));
}

// Only lws's errors, which are rare and worth seeing. Thread-safe.
inline void RouteLwsLogs() {
  static std::once_flag once;
  std::call_once(once, [] { lws_set_log_level(LLL_ERR, LwsLogLine); });
}

}  // namespace chat

#endif  // CHAT_SRC_CORE_LWS_LOG_H_
