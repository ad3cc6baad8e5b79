// TempDir: a private directory for one test, removed with everything in it on destruction.
//
// Each integration test runs its own chatd against its own database, secret and TLS files, so
// tests never see each other's state and can run in parallel.
//
// Thread-safety: none; one test owns one TempDir.
#ifndef CHAT_TESTS_TESTING_TEMP_DIR_H_
#define CHAT_TESTS_TESTING_TEMP_DIR_H_

#include <string>
#include <string_view>

namespace chat::testing {

class TempDir {
 public:
  // Creates a fresh directory under $TMPDIR (or /tmp). Aborts the test binary if that fails,
  // since no test can run without it.
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // path() + "/" + name.
  std::string File(std::string_view name) const;

 private:
  std::string path_;
};

// Writes `contents` to `path`, replacing the file. Returns false on any I/O error.
bool WriteFile(const std::string& path, std::string_view contents);

// The whole file, or "" if it cannot be read.
std::string ReadFile(const std::string& path);

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_TEMP_DIR_H_
