// Session and retention: what the client does when the server says messages expired (the
// MessagesExpired notice, or a first_seq above what it holds in a conversation state or History
// page): the cached copies go, in the transaction that stores the new state, and the application
// is told. Driven with a FakeClock, a fake transport and a cache file.
#include <doctest/doctest.h>
#include <sqlite3.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "src/client/cache.h"
#include "src/client/session.h"
#include "tests/testing/cache_file.h"
#include "tests/testing/temp_dir.h"
#include "tests/unit/client/session_harness.h"

namespace chat::client {
namespace {

using Expired = std::vector<std::pair<ConversationId, Seq>>;

// The seqs of `conversation` stored in the cache file at `path`, read with SQLite itself after
// the cache let go of the file, and the outbox's client_msg_ids.
struct FileRows {
  std::vector<Seq> seqs;
  std::vector<std::string> outbox;
};

FileRows ReadFileRows(const std::string& path, ConversationId conversation) {
  FileRows rows;
  rows.seqs = testing::FileSeqs(path, conversation);
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, "SELECT client_msg_id FROM outbox ORDER BY id", -1, &stmt,
                             nullptr) == SQLITE_OK);
  while (sqlite3_step(stmt) == SQLITE_ROW) {
    rows.outbox.emplace_back(reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0)));
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return rows;
}

// The seqs of `conversation` the open cache holds among 1..to.
std::vector<Seq> CachedSeqs(Cache& cache, ConversationId conversation, Seq to) {
  std::vector<Seq> out;
  for (Seq seq = 1; seq <= to; ++seq) {
    if (cache.GetMessage(conversation, seq)) out.push_back(seq);
  }
  return out;
}

// Group 5's state as a server that stores seqs first_seq..last_seq sends it.
v1::ConversationState Stored(Seq first_seq, Seq last_seq, uint64_t unread) {
  v1::ConversationState state = GroupState(5, last_seq, unread);
  state.set_first_seq(first_seq);
  return state;
}

v1::Envelope Notice(ConversationId conversation, Seq first_seq, Seq up_to_seq) {
  v1::Envelope e;
  e.mutable_messages_expired()->set_conversation_id(conversation);
  e.mutable_messages_expired()->set_first_seq(first_seq);
  e.mutable_messages_expired()->set_up_to_seq(up_to_seq);
  return e;
}

// Connects live with group 5 holding seqs 1..6 (bob's, two unread) and direct conversation 9
// holding seqs 1..2.
void LiveWithSixMessages(Harness& h) {
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  *batch.add_conversations() = Stored(1, 6, 2);
  for (Seq s = 1; s <= 6; ++s) *batch.add_messages() = Msg(5, s);
  v1::ConversationState* direct = batch.add_conversations();
  direct->set_conversation_id(9);
  direct->set_kind(v1::CONVERSATION_KIND_DIRECT);
  direct->set_peer("bob");
  direct->set_last_seq(2);
  direct->set_first_seq(1);
  for (Seq s = 1; s <= 2; ++s) *batch.add_messages() = Msg(9, s);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  REQUIRE(CachedSeqs(*h.cache, 5, 6) == std::vector<Seq>{1, 2, 3, 4, 5, 6});
  h.io.Take();
}

TEST_CASE("session expiry: the notice drops the cached messages below first_seq, not the outbox") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  std::shared_ptr<Cache> cache(Cache::Open(path).value());
  Harness h({}, cache);
  LiveWithSixMessages(h);
  // A message of this user waiting in the outbox for conversation 5.
  h.AddOutbox("pending-0123456789abcdef", 5);
  h.listener.conversations.clear();

  h.session->OnEnvelope(Notice(5, 4, 3));
  CHECK(h.listener.expired == Expired{{5, 3}});
  REQUIRE(h.listener.conversations.size() == 1);
  CHECK(h.listener.conversations[0].conversation_id == 5);
  CHECK(h.listener.conversations[0].first_seq == 4);
  CHECK(h.listener.conversations[0].unread == 2);  // until the server's next state says
  CHECK(CachedSeqs(*h.cache, 5, 6) == std::vector<Seq>{4, 5, 6});
  CHECK(CachedSeqs(*h.cache, 9, 2) == std::vector<Seq>{1, 2});
  CHECK(h.cache->GetConversation(5)->info.first_seq == 4);
  CHECK(h.cache->PendingCount() == 1);
  CHECK(h.listener.errors.empty());

  // Told again (a stale notice), nothing changes and nobody is told.
  h.session->OnEnvelope(Notice(5, 2, 1));
  CHECK(h.listener.expired.size() == 1);
  CHECK(h.listener.conversations.size() == 1);
  CHECK(h.cache->GetConversation(5)->info.first_seq == 4);

  // Emptied: nothing is stored, so nothing is unread either.
  h.session->OnEnvelope(Notice(5, 0, 6));
  CHECK(h.listener.expired == Expired{{5, 3}, {5, 6}});
  REQUIRE(h.listener.conversations.size() == 2);
  CHECK(h.listener.conversations[1].first_seq == 0);
  CHECK(h.listener.conversations[1].unread == 0);
  CHECK(h.listener.unread_totals.back() == 0);
  CHECK(CachedSeqs(*h.cache, 5, 6).empty());
  // History has nothing older to show from the cache: the server is asked.
  std::vector<Result<HistoryResult>> pages;
  h.session->History(5, 0, 10, [&](Result<HistoryResult> r) { pages.push_back(std::move(r)); });
  CHECK(OfCase(h.io.Take(), v1::Envelope::kHistory).size() == 1);

  // What the file holds: the other conversation and the outbox, untouched.
  h.session->Stop();
  cache->Close();
  const FileRows rows = ReadFileRows(path, 5);
  CHECK(rows.seqs.empty());
  CHECK(ReadFileRows(path, 9).seqs == std::vector<Seq>{1, 2});
  CHECK(rows.outbox == std::vector<std::string>{"pending-0123456789abcdef"});
}

TEST_CASE("session expiry: an ack for a message retention already deleted stores nothing") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  std::shared_ptr<Cache> cache(Cache::Open(path).value());
  Harness h({}, cache);
  LiveWithSixMessages(h);
  // This user's message was committed as seq 7, its ack lost; meanwhile retention deleted
  // everything up to 8, and the device was told. The resend is answered with the old seq.
  h.session->OnEnvelope(Notice(5, 9, 8));
  REQUIRE(h.listener.expired == Expired{{5, 8}});
  h.AddOutbox("resent-0123456789abcdef", 5);
  std::vector<v1::Envelope> sends = h.io.Take();
  REQUIRE(SendIds(sends) == std::vector<std::string>{"resent-0123456789abcdef"});
  h.listener.messages.clear();
  h.session->OnEnvelope(AckFor(sends[0], 7, /*duplicate=*/true));
  // Reported sent once, then expired: an application showing it pending takes it away.
  REQUIRE(h.listener.messages.size() == 1);
  CHECK(h.listener.messages[0].message.seq == 7);
  CHECK(h.listener.messages[0].status == MessageStatus::kSent);
  CHECK(h.listener.expired == Expired{{5, 8}, {5, 8}});
  CHECK(h.cache->PendingCount() == 0);
  CHECK(CachedSeqs(*h.cache, 5, 8).empty());
  h.session->Stop();
  cache->Close();
  CHECK(ReadFileRows(path, 5).seqs.empty());
}

TEST_CASE("session expiry: a notice after newer messages arrived keeps them") {
  Harness h;
  LiveWithSixMessages(h);
  // Seq 7 was committed after the sweep that emptied seqs 1..6, and delivered before its notice.
  h.Deliver(Msg(5, 7));
  h.session->OnEnvelope(Notice(5, 0, 6));
  CHECK(h.listener.expired == Expired{{5, 6}});
  CHECK(CachedSeqs(*h.cache, 5, 7) == std::vector<Seq>{7});
  const ConversationInfo info = h.cache->GetConversation(5)->info;
  CHECK(info.first_seq == 7);
  CHECK(info.last_seq == 7);
  CHECK(info.unread == 3);  // not known to be exact: the server's next state says
}

TEST_CASE("session expiry: a notice for a conversation the client holds nothing of is quiet") {
  Harness h;
  LiveWithSixMessages(h);
  h.listener.conversations.clear();
  h.session->OnEnvelope(Notice(77, 3, 2));
  CHECK(h.listener.expired.empty());
  CHECK(h.listener.conversations.empty());
  CHECK_FALSE(h.cache->GetConversation(77).has_value());
  // One that names no conversation, or a seq the cache cannot hold, is refused.
  h.session->OnEnvelope(Notice(0, 3, 2));
  h.session->OnEnvelope(Notice(5, 0, uint64_t{1} << 63));
  REQUIRE(h.listener.errors.size() == 2);
  CHECK(h.listener.errors[0].code() == Code::kInternal);
  CHECK(CachedSeqs(*h.cache, 5, 6).size() == 6);
}

TEST_CASE("session expiry: a Sync state with a higher first_seq drops what the device holds") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  std::shared_ptr<Cache> cache(Cache::Open(path).value());
  Harness h({}, cache);
  LiveWithSixMessages(h);
  h.AddOutbox("pending-0123456789abcdef", 5);
  h.io.Take();
  // Offline while the server's retention deleted seqs 1..4.
  h.session->OnClosed(1006, "gone");
  h.listener.conversations.clear();

  v1::Envelope sync = h.Welcome();
  // The Sync says which seqs the device still holds, so that the server lists the conversation
  // although nothing is new in it.
  std::map<ConversationId, Seq> lowest;
  for (const v1::Cursor& cursor : sync.sync().cursors()) {
    lowest[cursor.conversation_id()] = cursor.lowest_seq();
  }
  CHECK(lowest[5] == 1);
  CHECK(lowest[9] == 1);
  v1::SyncBatch batch;
  *batch.add_conversations() = Stored(5, 6, 1);
  h.Reply(sync, batch);
  CHECK(h.listener.expired == Expired{{5, 4}});
  REQUIRE(h.listener.conversations.size() == 1);
  CHECK(h.listener.conversations[0].first_seq == 5);
  CHECK(h.listener.conversations[0].unread == 1);
  CHECK(CachedSeqs(*h.cache, 5, 6) == std::vector<Seq>{5, 6});

  // A state that says nothing is stored drops everything up to its last seq.
  h.io.Take();
  h.session->OnClosed(1006, "gone");
  sync = h.Welcome();
  for (const v1::Cursor& cursor : sync.sync().cursors()) {
    if (cursor.conversation_id() == 5) CHECK(cursor.lowest_seq() == 5);
  }
  batch.Clear();
  *batch.add_conversations() = Stored(0, 6, 0);
  h.Reply(sync, batch);
  CHECK(h.listener.expired == Expired{{5, 4}, {5, 6}});
  CHECK(CachedSeqs(*h.cache, 5, 6).empty());
  CHECK(h.cache->GetConversation(5)->info.first_seq == 0);
  // Holding nothing, the device says so.
  h.io.Take();
  h.session->OnClosed(1006, "gone");
  sync = h.Welcome();
  for (const v1::Cursor& cursor : sync.sync().cursors()) {
    if (cursor.conversation_id() == 5) CHECK(cursor.lowest_seq() == 0);
  }
  h.Reply(sync, {});

  h.session->Stop();
  cache->Close();
  const FileRows rows = ReadFileRows(path, 5);
  CHECK(rows.seqs.empty());
  CHECK(ReadFileRows(path, 9).seqs == std::vector<Seq>{1, 2});
  CHECK(rows.outbox == std::vector<std::string>{"pending-0123456789abcdef"});
}

TEST_CASE("session expiry: a ConversationUpdate drops, a History page above the cache asks Sync") {
  Harness h;
  LiveWithSixMessages(h);
  // Seq 8 arrives over a hole at 7.
  h.Deliver(Msg(5, 8));
  v1::Envelope update;
  *update.mutable_conversation_update()->mutable_conversation() = Stored(3, 8, 2);
  h.session->OnEnvelope(update);
  CHECK(h.listener.expired == Expired{{5, 2}});
  CHECK(CachedSeqs(*h.cache, 5, 8) == std::vector<Seq>{3, 4, 5, 6, 8});

  // The Syncs the hole asked for find nothing more.
  for (int i = 0; i < 4; ++i) {
    std::vector<v1::Envelope> pending = OfCase(h.io.Take(), v1::Envelope::kSync);
    if (pending.empty()) break;
    h.Reply(pending.back(), {});
  }

  // A History page for what the cache lacks says the lowest seq this user may read is 5. That
  // may be where it joined, so a Sync asks whether what the cache holds below it expired.
  h.session->History(5, 0, 10, [](Result<HistoryResult>) {});
  std::vector<v1::Envelope> asked = OfCase(h.io.Take(), v1::Envelope::kHistory);
  REQUIRE(asked.size() == 1);
  v1::Envelope page;
  page.set_rid(asked[0].rid());
  page.mutable_history_page()->set_conversation_id(5);
  for (Seq s = 8; s >= 5; --s) *page.mutable_history_page()->add_messages() = Msg(5, s);
  page.mutable_history_page()->set_first_seq(5);
  h.session->OnEnvelope(page);
  CHECK(h.listener.expired == Expired{{5, 2}});  // nothing dropped on the page's word alone
  CHECK(CachedSeqs(*h.cache, 5, 8) == std::vector<Seq>{3, 4, 5, 6, 7, 8});
  std::vector<v1::Envelope> syncs = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(syncs.size() == 1);
  for (const v1::Cursor& cursor : syncs[0].sync().cursors()) {
    if (cursor.conversation_id() == 5) CHECK(cursor.lowest_seq() == 3);
  }
  v1::SyncBatch batch;
  *batch.add_conversations() = Stored(5, 8, 2);
  h.listener.conversations.clear();
  h.Reply(syncs[0], batch);
  CHECK(h.listener.expired == Expired{{5, 2}, {5, 4}});
  REQUIRE(h.listener.conversations.size() == 1);
  CHECK(h.listener.conversations[0].first_seq == 5);
  CHECK(CachedSeqs(*h.cache, 5, 8) == std::vector<Seq>{5, 6, 7, 8});
  // History now answers from the cache: nothing is stored below seq 5.
  std::vector<Result<HistoryResult>> pages;
  h.session->History(5, 5, 10, [&](Result<HistoryResult> r) { pages.push_back(std::move(r)); });
  REQUIRE(pages.size() == 1);
  REQUIRE(pages[0].ok());
  CHECK(pages[0]->from_cache);
  CHECK(pages[0]->messages.empty());
}

// Seqs of group 5 the application was given, in order.
std::vector<Seq> Given(const Harness& h) { return h.listener.SentSeqs(5); }

// A page of group 5's history from the server, answering `request`.
v1::Envelope Page(const v1::Envelope& request, Seq from, Seq to, Seq first_seq, bool has_more) {
  v1::Envelope page;
  page.set_rid(request.rid());
  page.mutable_history_page()->set_conversation_id(5);
  for (Seq s = to; s >= from && s > 0; --s)
    *page.mutable_history_page()->add_messages() = Msg(5, s);
  page.mutable_history_page()->set_first_seq(first_seq);
  page.mutable_history_page()->set_has_more(has_more);
  return page;
}

TEST_CASE("session expiry: a Sync reply the server read before the sweep brings nothing back") {
  Harness h;
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  *batch.add_conversations() = Stored(1, 3, 0);
  for (Seq s = 1; s <= 3; ++s) *batch.add_messages() = Msg(5, s);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  h.io.Take();
  // Seqs 5 and 6 arrive over a hole at 4: the client asks for it.
  h.Deliver(Msg(5, 5));
  h.Deliver(Msg(5, 6));
  std::vector<v1::Envelope> asked = OfCase(h.io.Take(), v1::Envelope::kSync);
  REQUIRE(asked.size() == 1);
  // The server reads 4..6 for the reply; then its sweep deletes 1..6, and the notice comes
  // first.
  h.session->OnEnvelope(Notice(5, 0, 6));
  CHECK(h.listener.expired == Expired{{5, 6}});
  CHECK(CachedSeqs(*h.cache, 5, 6).empty());
  batch.Clear();
  *batch.add_conversations() = Stored(1, 6, 3);
  for (Seq s = 4; s <= 6; ++s) *batch.add_messages() = Msg(5, s);
  h.listener.conversations.clear();
  h.Reply(asked[0], batch);
  // Nothing of it is stored or shown, and the state does not say seq 1 is stored again.
  CHECK(CachedSeqs(*h.cache, 5, 6).empty());
  CHECK(Given(h) == std::vector<Seq>{1, 2, 3});
  CHECK(h.cache->GetConversation(5)->info.first_seq == 0);
  REQUIRE_FALSE(h.listener.conversations.empty());
  CHECK(h.listener.conversations.back().first_seq == 0);
  std::vector<Result<HistoryResult>> pages;
  h.session->History(5, 0, 10, [&](Result<HistoryResult> r) { pages.push_back(std::move(r)); });
  for (const Result<HistoryResult>& page : pages) {
    REQUIRE(page.ok());
    CHECK(page->messages.empty());
  }
  CHECK(h.listener.errors.empty());
}

TEST_CASE("session expiry: a History page the server read before the sweep brings nothing back") {
  Harness h;
  v1::Envelope sync = h.Welcome();
  // Only the newest two came with the Sync: 1..4 are left to History.
  v1::SyncBatch batch;
  *batch.add_conversations() = Stored(1, 6, 0);
  v1::Gap* gap = batch.add_gaps();
  gap->set_conversation_id(5);
  gap->set_from_seq(1);
  gap->set_to_seq(4);
  for (Seq s = 5; s <= 6; ++s) *batch.add_messages() = Msg(5, s);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  h.io.Take();
  std::vector<Result<HistoryResult>> pages;
  auto keep = [&](Result<HistoryResult> r) { pages.push_back(std::move(r)); };
  h.session->History(5, 5, 10, keep);
  std::vector<v1::Envelope> asked = OfCase(h.io.Take(), v1::Envelope::kHistory);
  REQUIRE(asked.size() == 1);
  // The server reads 1..4; its sweep then deletes 1..3, and the notice comes first.
  h.session->OnEnvelope(Notice(5, 4, 3));
  h.session->OnEnvelope(Page(asked[0], 1, 4, 1, false));
  REQUIRE(pages.size() == 1);
  REQUIRE(pages[0].ok());
  REQUIRE(pages[0]->messages.size() == 1);
  CHECK(pages[0]->messages[0].seq == 4);
  CHECK_FALSE(pages[0]->has_more);
  CHECK(CachedSeqs(*h.cache, 5, 6) == std::vector<Seq>{4, 5, 6});
  // From the cache, too, history starts at 4.
  pages.clear();
  h.session->History(5, 5, 10, keep);
  REQUIRE(pages.size() == 1);
  REQUIRE(pages[0].ok());
  CHECK(pages[0]->from_cache);
  REQUIRE(pages[0]->messages.size() == 1);
  CHECK(pages[0]->messages[0].seq == 4);
  CHECK_FALSE(pages[0]->has_more);
  CHECK(h.cache->GetConversation(5)->info.first_seq == 4);
  CHECK(h.listener.errors.empty());
}

// A notice may come for a conversation the cache has no row for yet (the user was just added,
// and the Sync that brings it is in flight): the floor it sets is kept all the same, so a Sync
// reply or History page the server read before its sweep shows none of what it deleted.
TEST_CASE("session expiry: a notice for a conversation not cached yet still sets its floor") {
  Harness h;
  h.ConnectLive();
  SUBCASE("a Sync reply read before the sweep") {
    h.Deliver(Msg(6, 1));  // a conversation not cached yet: the client asks for its state
    std::vector<v1::Envelope> asked = OfCase(h.io.Take(), v1::Envelope::kSync);
    REQUIRE(asked.size() == 1);
    // The server reads group 5's seqs 1..5 for the reply; its sweep then deletes 1..3, and the
    // notice comes first.
    h.session->OnEnvelope(Notice(5, 4, 3));
    CHECK(h.listener.expired.empty());
    v1::SyncBatch batch;
    *batch.add_conversations() = Stored(1, 5, 5);
    *batch.add_conversations() = GroupState(6, 1, 1);
    for (Seq s = 1; s <= 5; ++s) *batch.add_messages() = Msg(5, s);
    *batch.add_messages() = Msg(6, 1);
    h.Reply(asked[0], batch);
    CHECK(Given(h).empty());
    CHECK(CachedSeqs(*h.cache, 5, 5) == std::vector<Seq>{4, 5});
    REQUIRE(h.cache->GetConversation(5).has_value());
    CHECK(h.cache->GetConversation(5)->info.first_seq == 4);
    // Seqs 4 and 5 wait above a hole: the next Sync, read after the sweep, passes it.
    asked = OfCase(h.io.Take(), v1::Envelope::kSync);
    REQUIRE(asked.size() == 1);
    batch.Clear();
    *batch.add_conversations() = Stored(4, 5, 2);
    v1::Gap* gap = batch.add_gaps();
    gap->set_conversation_id(5);
    gap->set_from_seq(1);
    gap->set_to_seq(3);
    h.Reply(asked[0], batch);
    CHECK(Given(h) == std::vector<Seq>{4, 5});
    CHECK(h.listener.conversations.back().first_seq == 4);
  }
  SUBCASE("a History page read before the sweep") {
    std::vector<Result<HistoryResult>> pages;
    h.session->History(5, 0, 10, [&](Result<HistoryResult> r) { pages.push_back(std::move(r)); });
    std::vector<v1::Envelope> asked = OfCase(h.io.Take(), v1::Envelope::kHistory);
    REQUIRE(asked.size() == 1);
    h.session->OnEnvelope(Notice(5, 4, 3));
    h.session->OnEnvelope(Page(asked[0], 1, 5, 1, false));
    REQUIRE(pages.size() == 1);
    REQUIRE(pages[0].ok());
    std::vector<Seq> seqs;
    for (const Message& m : pages[0]->messages) seqs.push_back(m.seq);
    CHECK(seqs == std::vector<Seq>{5, 4});
    CHECK(CachedSeqs(*h.cache, 5, 5) == std::vector<Seq>{4, 5});
  }
  CHECK(h.listener.errors.empty());
}

// The floors kept without a row are bounded, but the one dropped past the bound is the oldest
// (not the lowest id), and one whose conversation got a row since is the row's and counts no
// more. Nor does a notice whose cache transaction did not start lose its floor.
TEST_CASE("session expiry: a floor kept without a row is kept while others come and go") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  auto notices = [&](ConversationId from, size_t count) {
    for (ConversationId id = from; id < from + count; ++id) {
      h.session->OnEnvelope(Notice(id, 4, 3));
    }
  };
  SUBCASE("past the bound, the oldest goes") {
    notices(1001, kMaxRowlessFloors - 1);
    h.session->OnEnvelope(Notice(5, 4, 3));
    h.session->OnEnvelope(Notice(3001, 4, 3));
  }
  SUBCASE("those whose conversation got a row since count no more") {
    h.session->OnEnvelope(Notice(5, 4, 3));
    notices(1001, kMaxRowlessFloors - 1);
    h.Deliver(Msg(6, 1));  // a conversation not cached yet: the client asks for its state
    std::vector<v1::Envelope> asked = OfCase(h.io.Take(), v1::Envelope::kSync);
    REQUIRE(asked.size() == 1);
    v1::SyncBatch batch;
    for (ConversationId id = 1001; id < 1001 + kMaxRowlessFloors - 1; ++id) {
      *batch.add_conversations() = GroupState(id, 0, 0);
    }
    *batch.add_conversations() = GroupState(6, 1, 1);
    *batch.add_messages() = Msg(6, 1);
    h.Reply(asked[0], batch);
    REQUIRE(h.cache->GetConversation(1001).has_value());
    CHECK(h.cache->GetConversation(1001)->expired_through == 3);
    h.session->OnEnvelope(Notice(3001, 4, 3));
  }
  SUBCASE("the notice's cache transaction did not start") {
    // BEGIN fails while the cache's connection is in a transaction already.
    Cache::Transaction outer(h.cache.get());
    REQUIRE(outer.active());
    h.session->OnEnvelope(Notice(5, 4, 3));
    REQUIRE(outer.Commit().ok());
  }
  // A History page the server read before the sweep shows none of what it deleted.
  std::vector<Result<HistoryResult>> pages;
  h.session->History(5, 0, 10, [&](Result<HistoryResult> r) { pages.push_back(std::move(r)); });
  std::vector<v1::Envelope> asked = OfCase(h.io.Take(), v1::Envelope::kHistory);
  REQUIRE(asked.size() == 1);
  h.session->OnEnvelope(Page(asked[0], 1, 5, 1, false));
  REQUIRE(pages.size() == 1);
  REQUIRE(pages[0].ok());
  std::vector<Seq> seqs;
  for (const Message& m : pages[0]->messages) seqs.push_back(m.seq);
  CHECK(seqs == std::vector<Seq>{5, 4});
}

TEST_CASE("session expiry: History pages with the same raised first_seq sync once a connection") {
  Harness h;
  // The cache holds 1..3 from before this user was removed, and 8..10 since it was added again
  // at seq 8; 4..7 it may not read.
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  *batch.add_conversations() = Stored(1, 3, 0);
  for (Seq s = 1; s <= 3; ++s) *batch.add_messages() = Msg(5, s);
  h.Reply(sync, batch);
  h.io.Take();
  h.session->OnClosed(1006, "gone");
  sync = h.Welcome();
  batch.Clear();
  *batch.add_conversations() = Stored(1, 10, 0);
  v1::Gap* gap = batch.add_gaps();
  gap->set_conversation_id(5);
  gap->set_from_seq(4);
  gap->set_to_seq(7);
  for (Seq s = 8; s <= 10; ++s) *batch.add_messages() = Msg(5, s);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  h.io.Take();

  // Each page says the lowest seq this user may read is 8.
  int syncs = 0;
  auto page_before_8 = [&] {
    bool answered = false;
    h.session->History(5, 8, 10, [&](Result<HistoryResult> r) { answered = r.ok(); });
    std::vector<v1::Envelope> asked = OfCase(h.io.Take(), v1::Envelope::kHistory);
    REQUIRE(asked.size() == 1);
    h.session->OnEnvelope(Page(asked[0], 1, 0, 8, false));
    CHECK(answered);
    for (const v1::Envelope& e : OfCase(h.io.Take(), v1::Envelope::kSync)) {
      ++syncs;
      // Retention deleted nothing: the server lists the state as it was.
      v1::SyncBatch none;
      *none.add_conversations() = Stored(1, 10, 0);
      h.Reply(e, none);
    }
  };
  page_before_8();
  CHECK(syncs == 1);
  page_before_8();
  page_before_8();
  CHECK(syncs == 1);
  CHECK(CachedSeqs(*h.cache, 5, 10) == std::vector<Seq>{1, 2, 3, 8, 9, 10});
  // A new connection may ask once more.
  h.session->OnClosed(1006, "gone");
  h.Reply(h.Welcome(), {});
  page_before_8();
  CHECK(syncs == 2);
  CHECK(h.listener.expired.empty());
}

TEST_CASE("session expiry: messages after everything expired set first_seq again") {
  Harness h;
  LiveWithSixMessages(h);
  h.session->OnEnvelope(Notice(5, 0, 6));
  REQUIRE(h.cache->GetConversation(5)->info.first_seq == 0);
  h.listener.conversations.clear();
  h.Deliver(Msg(5, 7));
  h.Deliver(Msg(5, 8));
  CHECK(Given(h) == std::vector<Seq>{1, 2, 3, 4, 5, 6, 7, 8});
  CHECK(h.cache->GetConversation(5)->info.first_seq == 7);
  REQUIRE_FALSE(h.listener.conversations.empty());
  CHECK(h.listener.conversations.back().first_seq == 7);
  // History answers from the cache: it holds all that is stored.
  std::vector<Result<HistoryResult>> pages;
  h.session->History(5, 0, 10, [&](Result<HistoryResult> r) { pages.push_back(std::move(r)); });
  REQUIRE(pages.size() == 1);
  REQUIRE(pages[0].ok());
  CHECK(pages[0]->from_cache);
  REQUIRE(pages[0]->messages.size() == 2);
  CHECK(pages[0]->messages[0].seq == 8);
  CHECK(pages[0]->messages[1].seq == 7);
  CHECK_FALSE(pages[0]->has_more);
  CHECK(OfCase(h.io.Take(), v1::Envelope::kHistory).empty());

  // Over a hole, the lowest stored is still the one after what expired.
  h.session->OnEnvelope(Notice(5, 0, 8));
  h.Deliver(Msg(5, 11));
  CHECK(h.cache->GetConversation(5)->info.first_seq == 9);
}

// BEGIN fails while the cache's connection is in a transaction already (here the test's, which
// it then commits, as writes made outside a transaction would be).
TEST_CASE("session expiry: a state whose cache transaction did not start drops nothing") {
  Harness h;
  LiveWithSixMessages(h);
  v1::Envelope update;
  *update.mutable_conversation_update()->mutable_conversation() = Stored(4, 6, 0);
  {
    Cache::Transaction outer(h.cache.get());
    REQUIRE(outer.active());
    h.session->OnEnvelope(update);
    REQUIRE(outer.Commit().ok());
  }
  CHECK(h.listener.expired.empty());
  CHECK(CachedSeqs(*h.cache, 5, 6) == std::vector<Seq>{1, 2, 3, 4, 5, 6});
  REQUIRE_FALSE(h.listener.errors.empty());
  CHECK(h.listener.errors.back().code() == Code::kUnavailable);

  // The same in a Sync reply.
  h.io.Take();
  h.session->OnClosed(1006, "gone");
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  *batch.add_conversations() = Stored(4, 6, 0);
  h.listener.errors.clear();
  {
    Cache::Transaction outer(h.cache.get());
    REQUIRE(outer.active());
    h.Reply(sync, batch);
    REQUIRE(outer.Commit().ok());
  }
  CHECK(h.listener.expired.empty());
  CHECK(CachedSeqs(*h.cache, 5, 6) == std::vector<Seq>{1, 2, 3, 4, 5, 6});
  REQUIRE_FALSE(h.listener.errors.empty());
  CHECK(h.listener.errors.back().code() == Code::kUnavailable);

  // Once the cache works, the next state drops them and says so.
  h.io.Take();
  h.session->OnClosed(1006, "gone");
  h.Reply(h.Welcome(), batch);
  CHECK(h.listener.expired == Expired{{5, 3}});
  CHECK(CachedSeqs(*h.cache, 5, 6) == std::vector<Seq>{4, 5, 6});
}

}  // namespace
}  // namespace chat::client
