// Offline delivery through the real chatd: Sync pages, gap markers and History.
#include <doctest/doctest.h>

#include <set>
#include <string>

#include "tests/integration/server_test_helpers.h"

namespace chat::testing {
namespace {

TEST_CASE("server: an offline recipient gets everything on Sync, in order, exactly once, paged") {
  ChatdProcess chatd({.extra_flags = {"--sync-page-max", "4", "--sync-catchup-max", "1000"}});
  MustStart(chatd);
  uint64_t from_alice = 0;
  uint64_t from_dave = 0;
  {
    auto alice = MustLogin(chatd, "alice", "a1");
    auto dave = MustLogin(chatd, "dave", "d1");
    for (int i = 1; i <= 10; ++i) {
      const v1::SendAck ack =
          MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "a" + std::to_string(i)));
      CHECK(ack.seq() == static_cast<uint64_t>(i));
      from_alice = ack.conversation_id();
    }
    for (int i = 1; i <= 3; ++i) {
      from_dave = MustAck(*dave, MakeSendToPeer("bob", NewClientMsgId(), "d" + std::to_string(i)))
                      .conversation_id();
    }
  }
  REQUIRE(from_alice != from_dave);

  auto bob = MustLogin(chatd, "bob", "b1");
  const SyncAllResult sync = MustSyncAll(*bob, {});

  // 13 messages in pages of at most 4: four batches, has_more on all but the last.
  REQUIRE(sync.batches.size() == 4);
  for (size_t i = 0; i < sync.batches.size(); ++i) {
    CHECK(sync.batches[i].messages_size() <= 4);
    CHECK(sync.batches[i].has_more() == (i + 1 < sync.batches.size()));
  }
  CHECK(sync.gaps.empty());
  REQUIRE(sync.messages.size() == 13);
  // Ascending (conversation_id, seq), each message once, bodies as sent.
  std::set<std::pair<uint64_t, uint64_t>> seen;
  for (size_t i = 0; i < sync.messages.size(); ++i) {
    const v1::Message& m = sync.messages[i];
    CHECK(seen.insert({m.conversation_id(), m.seq()}).second);
    if (i > 0) {
      const v1::Message& prev = sync.messages[i - 1];
      CHECK(std::make_pair(prev.conversation_id(), prev.seq()) <
            std::make_pair(m.conversation_id(), m.seq()));
    }
  }
  for (const v1::Message& m : sync.messages) {
    if (m.conversation_id() == from_alice) {
      CHECK(m.sender() == "alice");
      CHECK(m.body() == "a" + std::to_string(m.seq()));
    } else {
      CHECK(m.conversation_id() == from_dave);
      CHECK(m.sender() == "dave");
      CHECK(m.body() == "d" + std::to_string(m.seq()));
    }
  }
  // Both conversations are described, with what the client is about to hold.
  std::set<uint64_t> described;
  for (const v1::SyncBatch& batch : sync.batches) {
    for (const v1::ConversationState& c : batch.conversations()) {
      described.insert(c.conversation_id());
      CHECK(c.kind() == v1::CONVERSATION_KIND_DIRECT);
      if (c.conversation_id() == from_alice) {
        CHECK(c.peer() == "alice");
        CHECK(c.last_seq() == 10);
      } else {
        CHECK(c.peer() == "dave");
        CHECK(c.last_seq() == 3);
      }
    }
  }
  CHECK(described == std::set<uint64_t>{from_alice, from_dave});

  // Bob was offline: nothing arrives live, and a sync at the final cursors is empty.
  CHECK(CountDelivers(MustBarrier(*bob)) == 0);
  const SyncAllResult again = MustSyncAll(*bob, {{from_alice, 10}, {from_dave, 3}});
  CHECK(again.messages.empty());
  CHECK(again.gaps.empty());
  REQUIRE(again.batches.size() == 1);
  CHECK_FALSE(again.batches[0].has_more());
}

TEST_CASE("server: Sync past --sync-catchup-max returns the newest messages and a gap") {
  ChatdProcess chatd({.extra_flags = {"--sync-page-max", "4", "--sync-catchup-max", "6"}});
  MustStart(chatd);
  uint64_t conversation = 0;
  {
    auto alice = MustLogin(chatd, "alice", "a1");
    for (int i = 1; i <= 10; ++i) {
      conversation =
          MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "m" + std::to_string(i)))
              .conversation_id();
    }
  }
  auto bob = MustConnect(chatd);
  std::optional<v1::Envelope> welcome = bob->Hello(chatd.Token("bob"), "b1");
  REQUIRE(welcome.has_value());
  REQUIRE_MESSAGE(welcome->has_welcome(), welcome->DebugString());
  // The limits from the command line are the ones the server tells its clients.
  CHECK(welcome->welcome().limits().sync_page_max() == 4);
  CHECK(welcome->welcome().limits().sync_catchup_max() == 6);

  // Cursor 0: 10 missing > 6, so seqs 1..4 become a gap and 5..10 come in two pages.
  const SyncAllResult sync = MustSyncAll(*bob, {});
  std::string replies;
  for (const v1::SyncBatch& batch : sync.batches) replies += batch.ShortDebugString() + "\n";
  INFO(replies);
  REQUIRE(sync.gaps.size() == 1);
  CHECK(sync.gaps[0].conversation_id() == conversation);
  CHECK(sync.gaps[0].from_seq() == 1);
  CHECK(sync.gaps[0].to_seq() == 4);
  REQUIRE(sync.batches.size() == 2);
  CHECK(sync.batches[0].gaps_size() == 1);
  CHECK(sync.batches[0].has_more());
  CHECK(sync.batches[1].gaps_size() == 0);
  REQUIRE(sync.messages.size() == 6);
  for (size_t i = 0; i < sync.messages.size(); ++i) {
    CHECK(sync.messages[i].seq() == 5 + i);
    CHECK(sync.messages[i].body() == "m" + std::to_string(5 + i));
  }

  // A cursor at 2 misses 8 > 6: the gap is 3..4.
  const SyncAllResult partial = MustSyncAll(*bob, {{conversation, 2}});
  REQUIRE(partial.gaps.size() == 1);
  CHECK(partial.gaps[0].from_seq() == 3);
  CHECK(partial.gaps[0].to_seq() == 4);
  CHECK(partial.messages.size() == 6);

  // History fills the gap, newest first, strictly below before_seq.
  std::optional<v1::Envelope> page = bob->Request(MakeHistory(conversation, 5, 10));
  REQUIRE(page.has_value());
  REQUIRE_MESSAGE(page->has_history_page(), page->DebugString());
  REQUIRE(page->history_page().messages_size() == 4);
  for (int i = 0; i < 4; ++i) {
    CHECK(page->history_page().messages(i).seq() == static_cast<uint64_t>(4 - i));
    CHECK(page->history_page().messages(i).body() == "m" + std::to_string(4 - i));
  }
  CHECK_FALSE(page->history_page().has_more());

  // Paged History over the whole conversation returns 1..10 once each.
  const std::vector<v1::Message> all = MustHistoryAll(*bob, conversation, 3);
  REQUIRE(all.size() == 10);
  for (size_t i = 0; i < all.size(); ++i) CHECK(all[i].seq() == i + 1);
}

TEST_CASE("server: History of a conversation the user is not in is PERMISSION_DENIED") {
  ChatdProcess chatd;
  MustStart(chatd);
  auto alice = MustLogin(chatd, "alice", "a1");
  const v1::SendAck ack = MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "private"));
  auto carol = MustLogin(chatd, "carol", "c1");
  CHECK(MustFail(*carol, MakeHistory(ack.conversation_id(), 0, 10)).code() ==
        v1::Error::PERMISSION_DENIED);
  CHECK(MustFail(*carol, MakeHistory(ack.conversation_id() + 1000, 0, 10)).code() ==
        v1::Error::PERMISSION_DENIED);
  // Carol's sync shows nothing of alice and bob.
  const SyncAllResult sync = MustSyncAll(*carol, {});
  CHECK(sync.messages.empty());
  CHECK(sync.batches.back().conversations_size() == 0);
}

}  // namespace
}  // namespace chat::testing
