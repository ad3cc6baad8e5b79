#include "chat/log.h"

#include <atomic>
#include <cstdio>
#include <mutex>
#include <string>

namespace chat {

namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};

std::mutex& SinkMutex() {
  static std::mutex mu;
  return mu;
}

LogSink& Sink() {
  static LogSink sink;
  return sink;
}

constexpr const char* kLevelNames[] = {"debug", "info", "warn", "error", "off"};

}  // namespace

void SetLogSink(LogSink sink) {
  std::lock_guard lock(SinkMutex());
  Sink() = std::move(sink);
}

void SetLogLevel(LogLevel level) { g_level.store(static_cast<int>(level)); }

LogLevel GetLogLevel() { return static_cast<LogLevel>(g_level.load()); }

void Log(LogLevel level, std::string_view line) {
  if (static_cast<int>(level) < g_level.load(std::memory_order_relaxed)) return;
  std::lock_guard lock(SinkMutex());
  if (Sink()) {
    Sink()(level, line);
    return;
  }
  std::fprintf(stderr, "[%s] %.*s\n", kLevelNames[static_cast<int>(level)],
               static_cast<int>(line.size()), line.data());
}

}  // namespace chat
