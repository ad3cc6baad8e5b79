// Threads that libraries start on their own.
#ifndef CHAT_SRC_CORE_THREADS_H_
#define CHAT_SRC_CORE_THREADS_H_

#include <functional>
#include <thread>

namespace chat {

// Starts `fn` on a new thread named `name` (at most 15 characters: what `top -H`, `ps -L`,
// /proc/<pid>/task/*/comm and profilers show) that has every signal blocked. The application
// decides which thread takes SIGTERM and the like (chatd waits for them on a thread of its own);
// a library's thread may be started before the application blocks them, and a signal delivered
// to it would run the default action and kill the process. The caller's own mask is left as it
// was.
std::thread StartThreadWithSignalsBlocked(const char* name, std::function<void()> fn);

}  // namespace chat

#endif  // CHAT_SRC_CORE_THREADS_H_
