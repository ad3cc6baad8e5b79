#include "src/core/threads.h"

#include <pthread.h>
#include <signal.h>

#include <utility>

namespace chat {

std::thread StartThreadWithSignalsBlocked(const char* name, std::function<void()> fn) {
  sigset_t all;
  sigset_t previous;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  std::thread thread([name, fn = std::move(fn)] {
    // Longer names are refused (ERANGE); the thread then keeps its parent's.
    pthread_setname_np(pthread_self(), name);
    fn();
  });
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  return thread;
}

}  // namespace chat
