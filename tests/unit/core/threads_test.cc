// Threads the libraries start: named, with every signal blocked, the caller's mask untouched.

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

TEST_CASE("threads: a library thread is named and blocks every signal; the caller's mask stays") {
  sigset_t before;
  REQUIRE(pthread_sigmask(SIG_SETMASK, nullptr, &before) == 0);
  std::string name;
  sigset_t mask;
  sigemptyset(&mask);
  std::thread thread = StartThreadWithSignalsBlocked("chat-test", [&] {
    name = ThisThreadName();
    pthread_sigmask(SIG_SETMASK, nullptr, &mask);
  });
  thread.join();
  CHECK(name == "chat-test");
  CHECK(Blocked(mask, SIGTERM));
  CHECK(Blocked(mask, SIGINT));
  CHECK(Blocked(mask, SIGHUP));
  sigset_t after;
  REQUIRE(pthread_sigmask(SIG_SETMASK, nullptr, &after) == 0);
  CHECK(Blocked(after, SIGTERM) == Blocked(before, SIGTERM));
  CHECK(Blocked(after, SIGINT) == Blocked(before, SIGINT));
}

TEST_CASE("threads: a name longer than 15 characters leaves the thread its parent's name") {
  const std::string parent = ThisThreadName();
  std::string name;
  std::thread thread =
      StartThreadWithSignalsBlocked("chat-a-name-too-long", [&] { name = ThisThreadName(); });
  thread.join();
  CHECK(name == parent);
}

}  // namespace
}  // namespace chat
