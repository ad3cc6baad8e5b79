// Retention through the real chatd: expired messages disappear and Sync reports their range as
// a gap, never an error.
#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <thread>

#include "tests/integration/server_test_helpers.h"

namespace chat::testing {
namespace {

TEST_CASE("server: --retention-ms deletes old messages and Sync returns a gap for them") {
  ChatdProcess chatd({.extra_flags = {"--retention-ms", "3000", "--retention-sweep-interval-ms",
                                      "100", "--retention-batch-max", "2"}});
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  uint64_t conversation = 0;
  for (int i = 1; i <= 5; ++i) {
    conversation =
        MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "old" + std::to_string(i)))
            .conversation_id();
  }
  auto bob = MustLogin(chatd, "bob", "b1");

  // Wait (bounded) until the sweep has removed all five, in batches of two.
  bool gone = false;
  for (int attempt = 0; attempt < 300 && !gone; ++attempt) {
    std::optional<v1::Envelope> page = bob->Request(MakeHistory(conversation, 0, 10));
    REQUIRE(page.has_value());
    REQUIRE_MESSAGE(page->has_history_page(), page->DebugString());
    gone = page->history_page().messages_size() == 0;
    if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  REQUIRE(gone);

  // The conversation goes on at seq 6; a client syncing from 0 gets 1..5 as a gap.
  const v1::SendAck fresh = MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "new"));
  CHECK(fresh.seq() == 6);
  const SyncAllResult sync = MustSyncAll(*bob, {});
  REQUIRE(sync.gaps.size() == 1);
  CHECK(sync.gaps[0].conversation_id() == conversation);
  CHECK(sync.gaps[0].from_seq() == 1);
  CHECK(sync.gaps[0].to_seq() == 5);
  REQUIRE(sync.messages.size() == 1);
  CHECK(sync.messages[0].seq() == 6);
  CHECK(sync.messages[0].body() == "new");

  // History below the first stored seq is an empty page, not an error.
  std::optional<v1::Envelope> below = bob->Request(MakeHistory(conversation, 6, 10));
  REQUIRE(below.has_value());
  REQUIRE_MESSAGE(below->has_history_page(), below->DebugString());
  CHECK(below->history_page().messages_size() == 0);
  CHECK(below->history_page().first_seq() == 6);
  CHECK_FALSE(below->history_page().has_more());
}

TEST_CASE("server: chatd refuses --retention-batch-max 0 with a message naming the field") {
  ChatdProcess chatd({.extra_flags = {"--retention-batch-max", "0"}});
  const Status started = chatd.Start();
  CHECK_FALSE(started.ok());
  CHECK(chatd.log().find("retention_batch_max must be > 0") != std::string::npos);
}

}  // namespace
}  // namespace chat::testing
