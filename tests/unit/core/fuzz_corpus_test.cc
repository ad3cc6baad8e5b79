// Replays the libFuzzer corpora in tests/fuzz/corpus/ through the fuzz targets' bodies, so every
// interesting input found by fuzzing stays a regression test in ordinary builds.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "tests/fuzz/fuzz_targets.h"

namespace chat {
namespace {

std::vector<std::string> ReadCorpus(const std::string& name) {
  const std::filesystem::path dir =
      std::filesystem::path(CHAT_SOURCE_DIR) / "tests" / "fuzz" / "corpus" / name;
  std::vector<std::string> inputs;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (!entry.is_regular_file()) continue;
    std::ifstream file(entry.path(), std::ios::binary);
    inputs.emplace_back(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
  }
  return inputs;
}

const uint8_t* Bytes(const std::string& input) {
  return reinterpret_cast<const uint8_t*>(input.data());
}

TEST_CASE("fuzz corpus: every codec input keeps the decoder's invariants") {
  const std::vector<std::string> corpus = ReadCorpus("codec");
  // The checked-in corpus has hundreds of inputs; an empty directory means the path is wrong.
  REQUIRE(corpus.size() >= 16);
  for (const std::string& input : corpus) fuzz::FuzzCodec(Bytes(input), input.size());
}

TEST_CASE("fuzz corpus: every JWT input keeps the authenticator's invariants") {
  const std::vector<std::string> corpus = ReadCorpus("jwt");
  REQUIRE(corpus.size() >= 5);
  for (const std::string& input : corpus) fuzz::FuzzJwt(Bytes(input), input.size());
}

}  // namespace
}  // namespace chat
