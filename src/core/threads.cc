#include "src/core/threads.h"

#include <pthread.h>
#include <signal.h>

#include <utility>

namespace chat::internal {
namespace {

// Restores the calling thread's signal mask when it goes out of scope.
class MaskRestorer {
 public:
  explicit MaskRestorer(const sigset_t& mask) { pthread_sigmask(SIG_SETMASK, &mask, &previous_); }
  ~MaskRestorer() { pthread_sigmask(SIG_SETMASK, &previous_, nullptr); }
  MaskRestorer(const MaskRestorer&) = delete;
  MaskRestorer& operator=(const MaskRestorer&) = delete;

 private:
  sigset_t previous_;
};

}  // namespace

std::thread StartLibraryThread(const char* name, std::function<void()> fn) {
  sigset_t mask;
  sigfillset(&mask);
  for (int raised : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGABRT, SIGPROF}) {
    sigdelset(&mask, raised);
  }
  // The new thread inherits the mask in force while it is created.
  MaskRestorer restore(mask);
  return std::thread([name, fn = std::move(fn)] {
    pthread_setname_np(pthread_self(), name);
    fn();
  });
}

}  // namespace chat::internal
