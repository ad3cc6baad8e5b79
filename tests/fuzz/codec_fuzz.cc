// libFuzzer target for codec::Decode; see fuzz_targets.h.
#include "tests/fuzz/fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  chat::fuzz::FuzzCodec(data, size);
  return 0;
}
