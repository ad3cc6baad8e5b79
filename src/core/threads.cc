#include "src/core/threads.h"

#include <pthread.h>
#include <signal.h>

#include <utility>

namespace chat {

std::thread StartThreadWithSignalsBlocked(std::function<void()> fn) {
  sigset_t all;
  sigset_t previous;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  std::thread thread(std::move(fn));
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  return thread;
}

}  // namespace chat
