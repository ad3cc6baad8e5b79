// Reading and changing a client cache file directly, as a test checking what is on the disk, or
// making one write fail, does.
#ifndef CHAT_TESTS_TESTING_CACHE_FILE_H_
#define CHAT_TESTS_TESTING_CACHE_FILE_H_

#include <string>
#include <vector>

#include "chat/types.h"

namespace chat::testing {

// The seqs of `conversation` stored in the client cache file at `path`, in order, read with
// SQLite itself (open the file only once the client that used it has let go of it).
std::vector<Seq> FileSeqs(const std::string& path, ConversationId conversation);

// From now on every write of `conversation`'s row to the client cache file at `path` fails
// (`fail`), or passes again, as one statement fails on a full disk or without memory while the
// transaction around it goes on: an SQLite trigger aborts the statement. Open the file only
// while no client holds it.
void FailConversationWrites(const std::string& path, ConversationId conversation, bool fail);

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_CACHE_FILE_H_
