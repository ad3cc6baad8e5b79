// Comparing Sync replies field by field (the reply structs have no ==), for tests that check
// one way of answering a Sync against another.
#ifndef CHAT_TESTS_TESTING_SYNC_REPLIES_H_
#define CHAT_TESTS_TESTING_SYNC_REPLIES_H_

#include "chat/status.h"
#include "chat/store.h"

namespace chat::testing {

// doctest CHECKs that `got` equals `want`: status, messages (seq, conversation, body,
// client_msg_id), listed conversations, gaps, has_more and the unread total.
void CheckSameSyncReply(const Result<SyncReply>& got, const Result<SyncReply>& want);

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_SYNC_REPLIES_H_
