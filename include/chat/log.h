// Logging: the SDK writes through one sink the application may replace.
//
// The default sink writes one line per event to stderr. Log lines never carry message bodies
// or tokens.
//
// Thread-safety: SetLogSink and Log may be called from any thread; the sink is called from the
// thread that logs and must be thread-safe itself.
#ifndef CHAT_LOG_H_
#define CHAT_LOG_H_

#include <functional>
#include <string_view>

#include "chat/export.h"

namespace chat {

enum class LogLevel : int { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3, kOff = 4 };

using LogSink = std::function<void(LogLevel level, std::string_view line)>;

// Replaces the sink; nullptr restores the default (stderr).
CHAT_EXPORT void SetLogSink(LogSink sink);
// Lines below `level` are dropped before formatting. Default kInfo.
CHAT_EXPORT void SetLogLevel(LogLevel level);
CHAT_EXPORT LogLevel GetLogLevel();
CHAT_EXPORT void Log(LogLevel level, std::string_view line);

}  // namespace chat

#endif  // CHAT_LOG_H_
