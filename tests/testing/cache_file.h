// Reading a client cache file directly, as a test checking what is on the disk does.
#ifndef CHAT_TESTS_TESTING_CACHE_FILE_H_
#define CHAT_TESTS_TESTING_CACHE_FILE_H_

#include <string>
#include <vector>

#include "chat/types.h"

namespace chat::testing {

// The seqs of `conversation` stored in the client cache file at `path`, in order, read with
// SQLite itself (open the file only once the client that used it has let go of it).
std::vector<Seq> FileSeqs(const std::string& path, ConversationId conversation);

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_CACHE_FILE_H_
