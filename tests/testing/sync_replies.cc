#include "tests/testing/sync_replies.h"

#include <doctest/doctest.h>

namespace chat::testing {

void CheckSameSyncReply(const Result<SyncReply>& got, const Result<SyncReply>& want) {
  REQUIRE(got.ok() == want.ok());
  if (!want.ok()) {
    CHECK(got.status().code() == want.status().code());
    CHECK(got.status().message() == want.status().message());
    return;
  }
  REQUIRE(got->messages.size() == want->messages.size());
  for (size_t i = 0; i < got->messages.size(); ++i) {
    CHECK(got->messages[i].seq == want->messages[i].seq);
    CHECK(got->messages[i].conversation_id == want->messages[i].conversation_id);
    CHECK(got->messages[i].body == want->messages[i].body);
    CHECK(got->messages[i].client_msg_id == want->messages[i].client_msg_id);
  }
  REQUIRE(got->conversations.size() == want->conversations.size());
  for (size_t i = 0; i < got->conversations.size(); ++i) {
    const ConversationInfo& a = got->conversations[i];
    const ConversationInfo& b = want->conversations[i];
    CHECK(a.conversation_id == b.conversation_id);
    CHECK(a.last_seq == b.last_seq);
    CHECK(a.unread == b.unread);
    CHECK(a.read_seq == b.read_seq);
    CHECK(a.delivered_seq == b.delivered_seq);
    CHECK(a.member_count == b.member_count);
    CHECK(a.peer == b.peer);
  }
  REQUIRE(got->gaps.size() == want->gaps.size());
  for (size_t i = 0; i < got->gaps.size(); ++i) {
    CHECK(got->gaps[i].conversation_id == want->gaps[i].conversation_id);
    CHECK(got->gaps[i].from_seq == want->gaps[i].from_seq);
    CHECK(got->gaps[i].to_seq == want->gaps[i].to_seq);
  }
  CHECK(got->has_more == want->has_more);
  CHECK(got->unread_total == want->unread_total);
}

}  // namespace chat::testing
