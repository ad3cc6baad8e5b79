// Threads that libraries start on their own.
#ifndef CHAT_SRC_CORE_THREADS_H_
#define CHAT_SRC_CORE_THREADS_H_

#include <cstddef>
#include <functional>
#include <thread>

namespace chat {

namespace internal {
std::thread StartLibraryThread(const char* name, std::function<void()> fn);
}  // namespace internal

// Starts `fn` on a new thread named `name` (what `top -H`, `ps -L`, /proc/<pid>/task/*/comm
// and profilers show; at most 15 characters, checked at compile time) that blocks every signal
// sent to the process. The application decides which thread takes SIGTERM and the like (chatd
// waits for them on a thread of its own); a library's thread may be started before the
// application blocks them, and a signal delivered to it would run the default action and kill
// the process. The signals a thread raises itself (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP,
// SIGSYS, SIGABRT) and SIGPROF stay deliverable, so crash handlers, sanitizer reports and
// sampling profilers see the thread. Threads and processes started from the new thread inherit
// its mask. The caller's own mask is left as it was, also when the thread cannot be started.
template <size_t N>
std::thread StartThreadWithSignalsBlocked(const char (&name)[N], std::function<void()> fn) {
  static_assert(N <= 16, "a thread name has at most 15 characters");
  return internal::StartLibraryThread(name, std::move(fn));
}

}  // namespace chat

#endif  // CHAT_SRC_CORE_THREADS_H_
