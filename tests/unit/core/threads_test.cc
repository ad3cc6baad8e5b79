// Threads the libraries start: named, blocking the signals sent to the process but not those a
// thread raises itself, the caller's mask untouched.

#include "src/core/threads.h"

#include <pthread.h>
#include <signal.h>

#include <string>

#include "doctest/doctest.h"

namespace chat {
namespace {

std::string ThisThreadName() {
  char name[16] = {};
  pthread_getname_np(pthread_self(), name, sizeof name);
  return name;
}

bool Blocked(const sigset_t& mask, int signal) { return sigismember(&mask, signal) == 1; }

TEST_CASE("threads: a library thread is named and blocks the process's signals, not faults") {
  sigset_t before;
  REQUIRE(pthread_sigmask(SIG_SETMASK, nullptr, &before) == 0);
  std::string name;
  sigset_t mask;
  sigemptyset(&mask);
  std::thread thread = StartThreadWithSignalsBlocked("chat-checkpoint", [&] {
    name = ThisThreadName();
    pthread_sigmask(SIG_SETMASK, nullptr, &mask);
  });
  thread.join();
  CHECK(name == "chat-checkpoint");  // 15 characters, the most a name has
  for (int signal : {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGPIPE, SIGCHLD}) {
    CAPTURE(signal);
    CHECK(Blocked(mask, signal));
  }
  // Crash handlers, sanitizers and sampling profilers still see the thread.
  for (int signal : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGABRT, SIGPROF}) {
    CAPTURE(signal);
    CHECK_FALSE(Blocked(mask, signal));
  }
  sigset_t after;
  REQUIRE(pthread_sigmask(SIG_SETMASK, nullptr, &after) == 0);
  for (int signal : {SIGTERM, SIGINT, SIGHUP, SIGSEGV}) {
    CAPTURE(signal);
    CHECK(Blocked(after, signal) == Blocked(before, signal));
  }
}

}  // namespace
}  // namespace chat
