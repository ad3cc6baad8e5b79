// libFuzzer target for the JWT authenticator; see fuzz_targets.h.
#include "tests/fuzz/fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  chat::fuzz::FuzzJwt(data, size);
  return 0;
}
