// Retention in both stores: MessageStore::DeleteExpired and SetRetention, and what Sync and
// History answer for the deleted range.
#include <sqlite3.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "chat/store.h"
#include "chat/v1/chat.pb.h"
#include "doctest/doctest.h"
#include "src/server/store_threads.h"
#include "tests/testing/hub_harness.h"
#include "tests/testing/temp_dir.h"

namespace chat {
namespace {

// kSqliteMerging: the message log switches every two messages (see store_test.cc).
enum class Kind { kMemory, kSqlite, kSqliteMerging };

struct Env {
  explicit Env(Kind kind) {
    if (kind == Kind::kMemory) {
      store = NewMemoryStore();
      return;
    }
    SqliteStoreOptions options;
    options.path = dir.File("chat.db");
    if (kind == Kind::kSqliteMerging) {
      options.recent_log_rows = 2;
      options.recent_log_slice_rows = 1;
    }
    Result<std::shared_ptr<MessageStore>> opened = NewSqliteStore(options);
    REQUIRE_MESSAGE(opened.ok(), opened.status().ToString());
    store = *opened;
  }

  testing::TempDir dir;
  std::shared_ptr<MessageStore> store;
};

MessageId next_message_id = 5000;

// Commits `r` alone; it must succeed.
AppendResult CommitOk(MessageStore& store, const AppendRequest& r) {
  std::vector<AppendRequest> batch = {r};
  std::vector<AppendResult> results;
  Status s = store.Append(batch, &results);
  REQUIRE_MESSAGE(s.ok(), s.ToString());
  REQUIRE(results.size() == 1);
  REQUIRE_MESSAGE(results[0].status.ok(), results[0].status.ToString());
  return results[0];
}

// A message from `sender` stamped with server time `ts_ms`: to `peer` (direct, created on first
// send) when `id` is 0, else into conversation `id`.
AppendResult SendAt(MessageStore& store, ConversationId id, const UserId& sender,
                    const UserId& peer, const std::string& key, int64_t ts_ms) {
  AppendRequest r;
  r.conversation_id = id;
  r.peer = peer;
  r.sender = sender;
  r.sender_device = sender + "-phone";
  r.client_msg_id = key;
  r.message_id = ++next_message_id;
  r.server_time_ms = ts_ms;
  r.content_type = "text/plain";
  r.body = key;
  return CommitOk(store, r);
}

// The direct conversation alice-bob with `n` messages from alice at ts 1000, 1001, ...
ConversationId DirectWith(MessageStore& store, int n, const std::string& tag = "m") {
  ConversationId id = 0;
  for (int i = 0; i < n; ++i) {
    AppendResult r = SendAt(store, id, "alice", "bob", tag + std::to_string(i), 1000 + i);
    id = r.message.conversation_id;
  }
  return id;
}

// One pass at `now_ms`; deleted messages' keys kept for `window_ms` (SweepRequest's default).
SweepResult Sweep(MessageStore& store, int64_t now_ms, int64_t default_ms, uint32_t max,
                  int64_t window_ms = SweepRequest{}.resend_window_ms) {
  Result<SweepResult> r = store.DeleteExpired({now_ms, default_ms, max, window_ms});
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return *r;
}

HistoryReply HistoryOf(MessageStore& store, ConversationId id, Seq before_seq) {
  Result<HistoryReply> r = store.History({"bob", id, before_seq, 50});
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return *r;
}

SyncReply SyncFrom(MessageStore& store, ConversationId id, Seq cursor) {
  SyncQuery q;
  q.user = "bob";
  q.device = "bob-phone";
  q.cursors = {{id, cursor}};
  Result<SyncReply> r = store.Sync(q);
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return *r;
}

std::vector<Seq> Seqs(const std::vector<Message>& messages) {
  std::vector<Seq> out;
  for (const Message& m : messages) out.push_back(m.seq);
  return out;
}

#define RETENTION_CASE(fn, title)                               \
  TEST_CASE("retention: memory: " title) { fn(Kind::kMemory); } \
  TEST_CASE("retention: sqlite: " title) { fn(Kind::kSqlite); } \
  TEST_CASE("retention: sqlite, merging: " title) { fn(Kind::kSqliteMerging); }

void ExpiredDeletedOthersKept(Kind kind) {
  Env env(kind);
  const ConversationId id = DirectWith(*env.store, 5);  // seq 1..5 at ts 1000..1004
  // Retention 1000 ms at 2003: ts < 1003 is expired, so seq 1..3 go.
  SweepResult swept = Sweep(*env.store, 2003, 1000, 100);
  CHECK(swept.deleted == 3);
  CHECK_FALSE(swept.has_more);

  HistoryReply history = HistoryOf(*env.store, id, 0);
  CHECK(Seqs(history.messages) == std::vector<Seq>{5, 4});
  CHECK(history.first_seq == 4);
  CHECK_FALSE(history.has_more);

  // Nothing else is expired yet: a second pass deletes nothing.
  CHECK(Sweep(*env.store, 2003, 1000, 100).deleted == 0);
  // Retention 0 keeps everything, however old.
  CHECK(Sweep(*env.store, 1'000'000, 0, 100).deleted == 0);
  CHECK(Seqs(HistoryOf(*env.store, id, 0).messages) == std::vector<Seq>{5, 4});
}
RETENTION_CASE(ExpiredDeletedOthersKept, "expired messages are deleted, newer ones kept")

// A user whose conversations were all emptied by retention gets one gap and one state per
// conversation and no message: those count against the reply's byte bound too, so a user in
// many such conversations syncs them over several pages instead of one unbounded reply.
void GapOnlyConversationsCountAgainstTheByteBound(Kind kind) {
  Env env(kind);
  constexpr int kPeers = 30;
  std::map<ConversationId, Seq> last;
  for (int i = 0; i < kPeers; ++i) {
    AppendResult r =
        SendAt(*env.store, 0, "alice", "peer-" + std::to_string(i), "k" + std::to_string(i), 1000);
    last[r.message.conversation_id] = r.message.seq;
  }
  REQUIRE(Sweep(*env.store, 5000, 1000, 1000).deleted == kPeers);
  // A later conversation whose one message alone is over the bound: it comes on a page of its
  // own, not after states that already fill one.
  AppendRequest big;
  big.peer = "late-peer";
  big.sender = "alice";
  big.sender_device = "alice-phone";
  big.client_msg_id = "big-0123456789abcdef";
  big.message_id = ++next_message_id;
  big.server_time_ms = 5000;
  big.content_type = "text/plain";
  big.body = std::string(5000, 'b');
  std::vector<AppendRequest> batch = {big};
  std::vector<AppendResult> results;
  REQUIRE(env.store->Append(batch, &results).ok());
  REQUIRE(results.at(0).status.ok());
  const ConversationId late = results[0].message.conversation_id;
  int big_pages = 0;

  std::map<ConversationId, Seq> cursors;
  std::map<ConversationId, int> listed;
  int pages = 0;
  for (bool more = true; more && pages < 100; ++pages) {
    SyncQuery q;
    q.user = "alice";
    q.device = "alice-phone";
    for (const auto& [id, seq] : cursors) q.cursors.push_back({id, seq});
    q.max_bytes = 2000;
    Result<SyncReply> page = env.store->Sync(q);
    REQUIRE(page.ok());
    REQUIRE_FALSE(page->conversations.empty());
    if (!page->messages.empty()) {
      ++big_pages;
      REQUIRE(page->messages.size() == 1);
      CHECK(page->messages[0].conversation_id == late);
      CHECK(page->conversations.size() == 1);
      cursors[late] = page->messages[0].seq;
      more = page->has_more;
      continue;
    }
    CHECK(page->conversations.size() < kPeers / 2);
    CHECK(page->gaps.size() == page->conversations.size());
    for (const Gap& gap : page->gaps) {
      ++listed[gap.conversation_id];
      CHECK(gap.to_seq == last[gap.conversation_id]);
      cursors[gap.conversation_id] = gap.to_seq;
    }
    more = page->has_more;
  }
  CHECK(pages > 2);
  CHECK(big_pages == 1);
  CHECK(listed.size() == kPeers);
  for (const auto& [id, times] : listed) CHECK(times == 1);
}
RETENTION_CASE(GapOnlyConversationsCountAgainstTheByteBound,
               "conversations emptied by retention count against a Sync's byte bound")

void SyncAcrossDeletedRangeIsAGap(Kind kind) {
  Env env(kind);
  const ConversationId id = DirectWith(*env.store, 5);
  REQUIRE(Sweep(*env.store, 2003, 1000, 100).deleted == 3);

  SyncReply reply = SyncFrom(*env.store, id, 0);
  REQUIRE(reply.gaps.size() == 1);
  CHECK(reply.gaps[0].conversation_id == id);
  CHECK(reply.gaps[0].from_seq == 1);
  CHECK(reply.gaps[0].to_seq == 3);
  CHECK(Seqs(reply.messages) == std::vector<Seq>{4, 5});
  REQUIRE(reply.conversations.size() == 1);
  CHECK(reply.conversations[0].first_seq == 4);
  CHECK(reply.conversations[0].last_seq == 5);

  // A cursor inside the deleted range gets the rest of the range as its gap.
  SyncReply partial = SyncFrom(*env.store, id, 2);
  REQUIRE(partial.gaps.size() == 1);
  CHECK(partial.gaps[0].from_seq == 3);
  CHECK(partial.gaps[0].to_seq == 3);
  CHECK(Seqs(partial.messages) == std::vector<Seq>{4, 5});

  // A cursor past the deleted range sees no gap.
  SyncReply after = SyncFrom(*env.store, id, 4);
  CHECK(after.gaps.empty());
  CHECK(Seqs(after.messages) == std::vector<Seq>{5});
}
RETENTION_CASE(SyncAcrossDeletedRangeIsAGap, "sync across the deleted range returns a gap")

// Bob's Sync from cursor `cursor`, telling the lowest seq his device holds.
SyncReply SyncHolding(MessageStore& store, ConversationId id, Seq cursor, Seq lowest_seq) {
  SyncQuery q;
  q.user = "bob";
  q.device = "bob-phone";
  q.cursors = {{id, cursor, lowest_seq}};
  Result<SyncReply> r = store.Sync(q);
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return *r;
}

// A device that was offline while retention deleted messages it holds learns it from its next
// Sync even when nothing is new above its cursor: the conversation's state comes alone.
void SyncListsStateOfExpiredHeldMessages(Kind kind) {
  Env env(kind);
  const ConversationId id = DirectWith(*env.store, 5);
  // Before any deletion a caught-up device holding everything hears nothing.
  CHECK(SyncHolding(*env.store, id, 5, 1).conversations.empty());
  REQUIRE(Sweep(*env.store, 2003, 1000, 100).deleted == 3);

  SyncReply told = SyncHolding(*env.store, id, 5, 1);
  REQUIRE(told.conversations.size() == 1);
  CHECK(told.conversations[0].conversation_id == id);
  CHECK(told.conversations[0].first_seq == 4);
  CHECK(told.conversations[0].last_seq == 5);
  CHECK(told.messages.empty());
  CHECK(told.gaps.empty());
  CHECK_FALSE(told.has_more);
  // Holding only what is still stored, or not saying (an older client): nothing to tell.
  CHECK(SyncHolding(*env.store, id, 5, 4).conversations.empty());
  CHECK(SyncHolding(*env.store, id, 5, 0).conversations.empty());
  // With messages above the cursor the state comes as before, with them.
  SyncReply behind = SyncHolding(*env.store, id, 4, 1);
  REQUIRE(behind.conversations.size() == 1);
  CHECK(behind.conversations[0].first_seq == 4);
  CHECK(Seqs(behind.messages) == std::vector<Seq>{5});

  // Emptied: first_seq 0, and a device holding the last message is told too.
  REQUIRE(Sweep(*env.store, 100'000, 1000, 100).deleted == 2);
  SyncReply emptied = SyncHolding(*env.store, id, 5, 5);
  REQUIRE(emptied.conversations.size() == 1);
  CHECK(emptied.conversations[0].first_seq == 0);
  CHECK(emptied.conversations[0].last_seq == 5);
  CHECK(emptied.messages.empty());
  CHECK(emptied.gaps.empty());
}
RETENTION_CASE(SyncListsStateOfExpiredHeldMessages,
               "sync lists the state of a conversation whose held messages expired")

void HistoryBelowFirstSeqIsEmpty(Kind kind) {
  Env env(kind);
  const ConversationId id = DirectWith(*env.store, 5);
  REQUIRE(Sweep(*env.store, 2003, 1000, 100).deleted == 3);

  HistoryReply below = HistoryOf(*env.store, id, 3);
  CHECK(below.messages.empty());
  CHECK(below.first_seq == 4);
  CHECK_FALSE(below.has_more);

  HistoryReply from_five = HistoryOf(*env.store, id, 5);
  CHECK(Seqs(from_five.messages) == std::vector<Seq>{4});
  CHECK_FALSE(from_five.has_more);
}
RETENTION_CASE(HistoryBelowFirstSeqIsEmpty, "history below first_seq is empty, not an error")

// A group change by `actor` at server time `ts_ms` (kCreateGroup when `id` is 0).
AppendResult ChangeAt(MessageStore& store, ConversationOp op, ConversationId id,
                      const UserId& actor, std::vector<UserId> users, int64_t ts_ms) {
  AppendRequest r;
  r.op = op;
  r.conversation_id = id;
  r.sender = actor;
  r.sender_device = actor + "-phone";
  r.message_id = ++next_message_id;
  r.spare_message_id = ++next_message_id;
  r.server_time_ms = ts_ms;
  r.kind = MessageKind::kSystem;
  r.group_kind = ConversationKind::kGroup;
  r.title = "team";
  r.users = std::move(users);
  r.max_group_members = 10;
  return CommitOk(store, r);
}

// Retention deleting past a removed member's removal shows it nothing of what came after: its
// gap ends at the removal and first_seq says nothing it may read is stored.
void RemovedMemberSeesNothingAfterItsRemoval(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId id =
      ChangeAt(store, ConversationOp::kCreateGroup, 0, "alice", {"bob", "carol"}, 1000)
          .message.conversation_id;
  for (int i = 0; i < 4; ++i) SendAt(store, id, "alice", "", "early" + std::to_string(i), 1001);
  // seq 6: bob removed; seqs 7..15 after it.
  REQUIRE(ChangeAt(store, ConversationOp::kRemoveMembers, id, "alice", {"bob"}, 1002).message.seq ==
          6);
  for (int i = 0; i < 9; ++i) SendAt(store, id, "alice", "", "late" + std::to_string(i), 1003);
  // Everything up to seq 12 expires (ts < 1004 at 2004, retention 1000 ms): bob's part and more.
  for (int i = 0; i < 3; ++i) SendAt(store, id, "alice", "", "kept" + std::to_string(i), 5000);
  REQUIRE(Sweep(store, 2004, 1000, 100).deleted == 15);

  SyncReply sync = SyncFrom(store, id, 3);
  REQUIRE(sync.gaps.size() == 1);
  CHECK(sync.gaps[0].from_seq == 4);
  CHECK(sync.gaps[0].to_seq == 6);
  CHECK(sync.messages.empty());
  REQUIRE(sync.conversations.size() == 1);
  CHECK(sync.conversations[0].last_seq == 6);
  CHECK(sync.conversations[0].first_seq == 0);
  HistoryReply history = HistoryOf(store, id, 0);
  CHECK(history.messages.empty());
  CHECK(history.first_seq == 0);
  CHECK_FALSE(history.has_more);
  // Carol, still a member, sees where the stored part starts.
  Result<HistoryReply> carol = store.History({"carol", id, 0, 50});
  REQUIRE(carol.ok());
  CHECK(carol->first_seq == 16);
}
RETENTION_CASE(RemovedMemberSeesNothingAfterItsRemoval,
               "a removed member sees nothing of what retention deleted after its removal")

void BatchBoundRespected(Kind kind) {
  Env env(kind);
  const ConversationId id = DirectWith(*env.store, 10);  // all expired below
  SweepResult first = Sweep(*env.store, 100'000, 1000, 4);
  CHECK(first.deleted == 4);
  CHECK(first.has_more);
  CHECK(HistoryOf(*env.store, id, 0).first_seq == 5);

  SweepResult second = Sweep(*env.store, 100'000, 1000, 4);
  CHECK(second.deleted == 4);
  CHECK(second.has_more);

  SweepResult last = Sweep(*env.store, 100'000, 1000, 4);
  CHECK(last.deleted == 2);
  CHECK_FALSE(last.has_more);
  CHECK(Sweep(*env.store, 100'000, 1000, 4).deleted == 0);

  // Everything is gone: History is empty with first_seq 0, Sync is one gap, seq goes on.
  HistoryReply empty = HistoryOf(*env.store, id, 0);
  CHECK(empty.messages.empty());
  CHECK(empty.first_seq == 0);
  SyncReply sync = SyncFrom(*env.store, id, 0);
  REQUIRE(sync.gaps.size() == 1);
  CHECK(sync.gaps[0].from_seq == 1);
  CHECK(sync.gaps[0].to_seq == 10);
  CHECK(sync.messages.empty());

  AppendResult next = SendAt(*env.store, id, "alice", "", "after", 200'000);
  CHECK(next.message.seq == 11);
  HistoryReply after = HistoryOf(*env.store, id, 0);
  CHECK(Seqs(after.messages) == std::vector<Seq>{11});
  CHECK(after.first_seq == 11);
}
RETENTION_CASE(BatchBoundRespected, "each call deletes at most max_messages")

void BatchBoundSpansConversations(Kind kind) {
  Env env(kind);
  const ConversationId ab = DirectWith(*env.store, 3);
  const ConversationId cb =
      SendAt(*env.store, 0, "carol", "bob", "c0", 1000).message.conversation_id;
  SendAt(*env.store, cb, "carol", "", "c1", 1001);
  SweepResult first = Sweep(*env.store, 100'000, 1000, 4);
  CHECK(first.deleted == 4);
  CHECK(first.has_more);
  SweepResult second = Sweep(*env.store, 100'000, 1000, 4);
  CHECK(second.deleted == 1);
  CHECK_FALSE(second.has_more);
  CHECK(HistoryOf(*env.store, ab, 0).messages.empty());
  CHECK(HistoryOf(*env.store, cb, 0).messages.empty());
}
RETENTION_CASE(BatchBoundSpansConversations, "the bound counts across conversations")

// What the sweep says it changed, for the notice the server sends the members.
void SweepNamesEachConversationItChanged(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  // A direct conversation that keeps its newest messages: seq 1..5 at ts 1000..1004.
  const ConversationId direct = DirectWith(store, 5);
  // A group that is emptied, with a member removed before (seq 1 created, 2 message, 3 removal).
  const ConversationId group =
      ChangeAt(store, ConversationOp::kCreateGroup, 0, "alice", {"bob", "carol"}, 1000)
          .message.conversation_id;
  SendAt(store, group, "alice", "", "g0", 1000);
  ChangeAt(store, ConversationOp::kRemoveMembers, group, "alice", {"bob"}, 1001);
  // A channel: its members are not listed.
  AppendRequest create;
  create.op = ConversationOp::kCreateGroup;
  create.sender = "dave";
  create.sender_device = "dave-phone";
  create.message_id = ++next_message_id;
  create.server_time_ms = 1000;
  create.kind = MessageKind::kSystem;
  create.group_kind = ConversationKind::kChannel;
  create.title = "news";
  create.users = {"erin"};
  const ConversationId channel = CommitOk(store, create).message.conversation_id;
  SendAt(store, channel, "dave", "", "c0", 1002);
  SendAt(store, channel, "dave", "", "c1", 5000);
  // A conversation with nothing expired is not named.
  SendAt(store, 0, "frank", "gina", "f0", 5000);

  // Retention 1000 ms at 2003: ts < 1003 goes.
  SweepResult swept = Sweep(store, 2003, 1000, 100);
  CHECK(swept.deleted == 3 + 3 + 2);
  REQUIRE(swept.expired.size() == 3);
  const ExpiredRange& d = swept.expired[0];
  CHECK(d.conversation_id == direct);
  CHECK(d.kind == ConversationKind::kDirect);
  CHECK(d.first_seq == 4);
  CHECK(d.up_to_seq == 3);
  CHECK(d.recipients == std::vector<UserId>{"alice", "bob"});
  const ExpiredRange& g = swept.expired[1];
  CHECK(g.conversation_id == group);
  CHECK(g.kind == ConversationKind::kGroup);
  CHECK(g.first_seq == 0);                                       // nothing stored any more
  CHECK(g.up_to_seq == 3);                                       // the conversation's last seq
  CHECK(g.recipients == std::vector<UserId>{"alice", "carol"});  // not bob, removed
  const ExpiredRange& c = swept.expired[2];
  CHECK(c.conversation_id == channel);
  CHECK(c.kind == ConversationKind::kChannel);
  CHECK(c.first_seq == 3);
  CHECK(c.up_to_seq == 2);
  CHECK(c.recipients.empty());

  // A pass cut by its bound names only what it deleted, with the first_seq it left.
  SendAt(store, direct, "alice", "", "late0", 3000);  // seq 6
  SendAt(store, direct, "alice", "", "late1", 3001);  // seq 7
  SendAt(store, direct, "alice", "", "late2", 9000);  // seq 8
  SweepResult cut = Sweep(store, 5000, 1000, 2);
  CHECK(cut.has_more);
  REQUIRE(cut.expired.size() == 1);
  CHECK(cut.expired[0].conversation_id == direct);
  CHECK(cut.expired[0].first_seq == 6);
  CHECK(cut.expired[0].up_to_seq == 5);
  SweepResult rest = Sweep(store, 5000, 1000, 2);
  REQUIRE(rest.expired.size() == 1);
  CHECK(rest.expired[0].first_seq == 8);
  CHECK(rest.expired[0].up_to_seq == 7);
  // Nothing expired: nothing named.
  CHECK(Sweep(store, 5000, 1000, 100).expired.empty());
}
RETENTION_CASE(SweepNamesEachConversationItChanged,
               "the sweep names each conversation it changed, its new first_seq and members")

void PerConversationRetention(Kind kind) {
  Env env(kind);
  const ConversationId short_lived = DirectWith(*env.store, 3);
  const ConversationId kept =
      SendAt(*env.store, 0, "carol", "bob", "c0", 1000).message.conversation_id;
  REQUIRE(env.store->SetRetention(short_lived, 500).ok());

  // No server-wide default: only the conversation with its own retention is swept.
  CHECK(Sweep(*env.store, 10'000, 0, 100).deleted == 3);
  CHECK(HistoryOf(*env.store, short_lived, 0).messages.empty());
  CHECK(Seqs(HistoryOf(*env.store, kept, 0).messages) == std::vector<Seq>{1});

  // Its own retention wins over a longer default.
  SendAt(*env.store, short_lived, "alice", "", "late", 9'000);
  CHECK(Sweep(*env.store, 10'000, 1'000'000, 100).deleted == 1);
  CHECK(Seqs(HistoryOf(*env.store, kept, 0).messages) == std::vector<Seq>{1});

  // Back to the default.
  REQUIRE(env.store->SetRetention(short_lived, 0).ok());
  SendAt(*env.store, short_lived, "alice", "", "later", 9'900);
  CHECK(Sweep(*env.store, 10'000, 1'000'000, 100).deleted == 0);
}
RETENTION_CASE(PerConversationRetention, "a conversation's own retention overrides the default")

void BadRequests(Kind kind) {
  Env env(kind);
  const ConversationId id = DirectWith(*env.store, 1);
  CHECK(env.store->SetRetention(id + 100, 1000).code() == Code::kNotFound);
  CHECK(env.store->SetRetention(id, -2).code() == Code::kInvalidArgument);

  Result<SweepResult> zero = env.store->DeleteExpired({10'000, 1000, 0});
  CHECK(zero.status().code() == Code::kInvalidArgument);
  Result<SweepResult> negative = env.store->DeleteExpired({10'000, -5, 10});
  CHECK(negative.status().code() == Code::kInvalidArgument);
  Result<SweepResult> negative_window = env.store->DeleteExpired({10'000, 1000, 10, -1});
  CHECK(negative_window.status().code() == Code::kInvalidArgument);
  CHECK(negative_window.status().message() == "resend_window_ms must not be negative");
  // Nothing was deleted by the refused calls.
  CHECK(HistoryOf(*env.store, id, 0).messages.size() == 1);
}
RETENTION_CASE(BadRequests, "bad arguments are refused with InvalidArgument or NotFound")

// A device whose ack was lost and that stayed offline past the retention resends: within the
// resend window it gets the original's ack (seq, message_id, server time) as a duplicate, and
// nothing is stored; once the window is over the key is dropped and a resend is new.
void ResendAfterExpiryWithinTheWindow(Kind kind) {
  Env env(kind);
  const AppendResult first = SendAt(*env.store, 0, "alice", "bob", "m0", 1000);
  const ConversationId id = first.message.conversation_id;
  SendAt(*env.store, id, "alice", "", "m1", 1001);
  constexpr int64_t kWindow = 50'000;
  REQUIRE(Sweep(*env.store, 100'000, 1000, 100, kWindow).deleted == 2);

  AppendResult resend = SendAt(*env.store, id, "alice", "", "m0", 100'000);
  CHECK(resend.duplicate);
  CHECK(resend.message.conversation_id == id);
  CHECK(resend.message.seq == 1);
  CHECK(resend.message.message_id == first.message.message_id);
  CHECK(resend.message.server_time_ms == 1000);
  CHECK(resend.message.sender == "alice");
  CHECK(resend.message.client_msg_id == "m0");
  CHECK(resend.message.body.empty());
  // A resend addressed by peer (conversation_id 0) is recognized the same way.
  AppendResult by_peer = SendAt(*env.store, 0, "alice", "bob", "m1", 100'000);
  CHECK(by_peer.duplicate);
  CHECK(by_peer.message.seq == 2);
  // Nothing was stored: the next message is seq 3, and the store holds only it.
  CHECK(SendAt(*env.store, id, "alice", "", "m2", 100'000).message.seq == 3);
  CHECK(Seqs(HistoryOf(*env.store, id, 0).messages) == std::vector<Seq>{3});

  // The last millisecond of the window keeps the keys.
  SweepResult kept = Sweep(*env.store, 100'000 + kWindow - 1, 1'000'000, 100, kWindow);
  CHECK(kept.keys_dropped == 0);
  CHECK(SendAt(*env.store, id, "alice", "", "m0", 100'000).duplicate);
  // Then they go; a resend is stored as a new message.
  SweepResult dropped = Sweep(*env.store, 100'000 + kWindow, 1'000'000, 100, kWindow);
  CHECK(dropped.keys_dropped == 2);
  CHECK(dropped.deleted == 0);
  CHECK_FALSE(dropped.has_more);
  AppendResult late = SendAt(*env.store, id, "alice", "", "m0", 100'000);
  CHECK_FALSE(late.duplicate);
  CHECK(late.message.seq == 4);
}
RETENTION_CASE(ResendAfterExpiryWithinTheWindow,
               "a resend after expiry is a duplicate until the resend window is over")

void NoWindowKeysGoWithMessages(Kind kind) {
  Env env(kind);
  const ConversationId id = DirectWith(*env.store, 2);
  SweepResult swept = Sweep(*env.store, 100'000, 1000, 100, /*window_ms=*/0);
  REQUIRE(swept.deleted == 2);
  CHECK(swept.keys_dropped == 0);
  // The idempotency key went with the message: a late resend is stored as a new message.
  AppendResult resend = SendAt(*env.store, id, "alice", "", "m0", 100'000);
  CHECK_FALSE(resend.duplicate);
  CHECK(resend.message.seq == 3);

  // Keys kept under an earlier window are dropped once the window is set to 0.
  REQUIRE(Sweep(*env.store, 200'000, 1000, 100).deleted == 1);
  REQUIRE(SendAt(*env.store, id, "alice", "", "m0", 200'000).duplicate);
  SweepResult later = Sweep(*env.store, 200'000, 1000, 100, /*window_ms=*/0);
  CHECK(later.keys_dropped == 1);
  CHECK_FALSE(SendAt(*env.store, id, "alice", "", "m0", 200'000).duplicate);
}
RETENTION_CASE(NoWindowKeysGoWithMessages, "with no resend window a resend after expiry is new")

// Keys past their window count toward max_messages with the messages a pass deletes.
void DroppedKeysShareTheBound(Kind kind) {
  Env env(kind);
  const ConversationId old_id = DirectWith(*env.store, 3, "old");  // ts 1000..1002
  REQUIRE(Sweep(*env.store, 2000, 100, 100, 10).deleted == 3);
  // Two newer messages in another conversation, expired too by time 20'000.
  const ConversationId new_id =
      SendAt(*env.store, 0, "carol", "dave", "new0", 10'000).message.conversation_id;
  SendAt(*env.store, new_id, "carol", "", "new1", 10'001);

  SweepResult first = Sweep(*env.store, 20'000, 100, 2, 10);
  CHECK(first.keys_dropped == 2);
  CHECK(first.deleted == 0);
  CHECK(first.has_more);
  SweepResult second = Sweep(*env.store, 20'000, 100, 2, 10);
  CHECK(second.keys_dropped == 1);
  CHECK(second.deleted == 1);
  CHECK(second.has_more);
  SweepResult third = Sweep(*env.store, 20'000, 100, 2, 10);
  CHECK(third.keys_dropped == 0);
  CHECK(third.deleted == 1);
  CHECK_FALSE(third.has_more);
  // The old conversation's keys are gone, the new one's kept for their window.
  CHECK_FALSE(SendAt(*env.store, old_id, "alice", "", "old0", 20'000).duplicate);
  CHECK(SendAt(*env.store, new_id, "carol", "", "new1", 20'000).duplicate);
}
RETENTION_CASE(DroppedKeysShareTheBound, "dropped keys count toward the pass's bound")

// One conversation change by `sender`, committed alone.
AppendResult Change(MessageStore& store, AppendRequest r) {
  r.sender_device = r.sender + "-phone";
  r.message_id = ++next_message_id;
  r.spare_message_id = ++next_message_id;
  r.server_time_ms = 50'000;
  r.kind = MessageKind::kSystem;
  std::vector<AppendRequest> batch = {r};
  std::vector<AppendResult> results;
  Status s = store.Append(batch, &results);
  REQUIRE_MESSAGE(s.ok(), s.ToString());
  REQUIRE(results.size() == 1);
  return results[0];
}

AppendResult SetRetentionBy(MessageStore& store, const UserId& sender, ConversationId id,
                            int64_t retention_ms) {
  AppendRequest r;
  r.conversation_id = id;
  r.sender = sender;
  r.op = ConversationOp::kSetRetention;
  r.retention_ms = retention_ms;
  return Change(store, std::move(r));
}

void KeepForeverOptsOut(Kind kind) {
  Env env(kind);
  const ConversationId kept = DirectWith(*env.store, 3, "k");
  AppendResult other = SendAt(*env.store, 0, "carol", "bob", "c0", 1000);
  REQUIRE(env.store->SetRetention(kept, -1).ok());
  // The server default expires everything else, but not the conversation that opted out.
  CHECK(Sweep(*env.store, 100'000, 1000, 100).deleted == 1);
  CHECK(HistoryOf(*env.store, other.message.conversation_id, 0).messages.empty());
  CHECK(Seqs(HistoryOf(*env.store, kept, 0).messages) == std::vector<Seq>{3, 2, 1});
  SyncReply sync = SyncFrom(*env.store, kept, 0);
  REQUIRE(sync.conversations.size() == 2);  // bob's two conversations
  CHECK(sync.conversations[0].conversation_id == kept);
  CHECK(sync.conversations[0].retention_ms == -1);
  CHECK(sync.conversations[1].retention_ms == 0);
  // Back to the default: now it expires too.
  REQUIRE(env.store->SetRetention(kept, 0).ok());
  CHECK(Sweep(*env.store, 100'000, 1000, 100).deleted == 3);
}
RETENTION_CASE(KeepForeverOptsOut, "-1 keeps a conversation's messages despite the default")

void SetRetentionThroughAppend(Kind kind) {
  Env env(kind);
  AppendRequest create;
  create.sender = "alice";
  create.op = ConversationOp::kCreateGroup;
  create.group_kind = ConversationKind::kGroup;
  create.title = "team";
  create.users = {"bob"};
  AppendResult created = Change(*env.store, std::move(create));
  REQUIRE_MESSAGE(created.status.ok(), created.status.ToString());
  const ConversationId group = created.message.conversation_id;

  // An admin sets it: a system message every member receives, and the new value in the info.
  AppendResult set = SetRetentionBy(*env.store, "alice", group, 60'000);
  REQUIRE_MESSAGE(set.status.ok(), set.status.ToString());
  CHECK(set.message.kind == MessageKind::kSystem);
  CHECK(set.message.system.type == SystemEvent::Type::kRetentionChanged);
  CHECK(set.message.system.actor == "alice");
  CHECK(set.message.system.retention_ms == 60'000);
  CHECK(set.conversation.retention_ms == 60'000);
  CHECK(set.recipients == std::vector<UserId>{"alice", "bob"});
  // Members learn it through Sync as well, message and conversation state.
  SyncReply sync = SyncFrom(*env.store, group, 0);
  REQUIRE(sync.conversations.size() == 1);
  CHECK(sync.conversations[0].retention_ms == 60'000);
  REQUIRE_FALSE(sync.messages.empty());
  CHECK(sync.messages.back().system.type == SystemEvent::Type::kRetentionChanged);
  CHECK(sync.messages.back().system.retention_ms == 60'000);

  // A member who is not an admin, a stranger, a missing conversation, a bad value.
  CHECK(SetRetentionBy(*env.store, "bob", group, 0).status.code() == Code::kPermissionDenied);
  CHECK(SetRetentionBy(*env.store, "mallory", group, 0).status.code() == Code::kPermissionDenied);
  CHECK(SetRetentionBy(*env.store, "alice", group + 100, 0).status.code() ==
        Code::kPermissionDenied);
  CHECK(SetRetentionBy(*env.store, "alice", group, -2).status.code() == Code::kInvalidArgument);
  // Refused requests changed nothing.
  CHECK(SyncFrom(*env.store, group, 0).conversations.at(0).retention_ms == 60'000);

  // In a direct conversation either member may set it; others may not.
  const ConversationId direct = DirectWith(*env.store, 1);
  AppendResult by_bob = SetRetentionBy(*env.store, "bob", direct, -1);
  REQUIRE_MESSAGE(by_bob.status.ok(), by_bob.status.ToString());
  CHECK(by_bob.conversation.retention_ms == -1);
  CHECK(SetRetentionBy(*env.store, "carol", direct, 0).status.code() == Code::kPermissionDenied);
}
RETENTION_CASE(SetRetentionThroughAppend,
               "SetRetention through Append: admins of groups, either member of a direct one")

v1::Envelope SetRetentionRequest(uint64_t rid, ConversationId id, int64_t retention_ms) {
  v1::Envelope e;
  e.set_rid(rid);
  e.mutable_set_retention()->set_conversation_id(id);
  e.mutable_set_retention()->set_retention_ms(retention_ms);
  return e;
}

TEST_CASE("retention: protocol: SetRetention by an admin reaches members, others are refused") {
  testing::HubHarness h;
  server::SessionId alice = h.Connect("alice", "a1");
  server::SessionId bob = h.Connect("bob", "b1");
  v1::Envelope create;
  create.set_rid(1);
  create.mutable_create_group()->set_kind(v1::CONVERSATION_KIND_GROUP);
  create.mutable_create_group()->set_title("team");
  create.mutable_create_group()->add_members("bob");
  h.SendEnvelope(alice, create);
  h.Pump();
  const ConversationId id =
      h.Take(alice).at(0).conversation_update().conversation().conversation_id();
  REQUIRE(id != 0);
  h.Take(bob);

  h.SendEnvelope(alice, SetRetentionRequest(2, id, 86'400'000));
  h.Pump();
  std::vector<v1::Envelope> reply = h.Take(alice);
  REQUIRE(reply.size() == 2);  // the reply, then the change like every member gets it
  REQUIRE_MESSAGE(reply[0].has_conversation_update(), reply[0].DebugString());
  CHECK(reply[0].rid() == 2);
  CHECK(reply[0].conversation_update().conversation().retention_ms() == 86'400'000);
  CHECK(reply[1].has_deliver());
  std::vector<v1::Envelope> told = h.Take(bob);
  REQUIRE(told.size() == 1);
  REQUIRE(told[0].has_deliver());
  const v1::SystemEvent& event = told[0].deliver().message().system();
  CHECK(event.type() == v1::SystemEvent::TYPE_RETENTION_CHANGED);
  CHECK(event.actor() == "alice");
  CHECK(event.retention_ms() == 86'400'000);

  // A plain member, a bad value, a conversation that does not exist.
  h.SendEnvelope(bob, SetRetentionRequest(3, id, 0));
  h.SendEnvelope(alice, SetRetentionRequest(4, id, -2));
  h.SendEnvelope(alice, SetRetentionRequest(5, id + 1000, 0));
  h.SendEnvelope(alice, SetRetentionRequest(6, 0, 0));
  h.Pump();
  std::vector<v1::Envelope> refused = h.Take(bob);
  REQUIRE(refused.size() == 1);
  REQUIRE(refused[0].has_error());
  CHECK(refused[0].error().code() == v1::Error::PERMISSION_DENIED);
  refused = h.Take(alice);
  REQUIRE(refused.size() == 3);
  for (const v1::Envelope& e : refused) REQUIRE_MESSAGE(e.has_error(), e.DebugString());
  // A missing conversation id is refused at once; the others after the store looked.
  CHECK(refused[0].rid() == 6);
  CHECK(refused[0].error().code() == v1::Error::INVALID_ARGUMENT);
  CHECK(refused[1].rid() == 4);
  CHECK(refused[1].error().code() == v1::Error::INVALID_ARGUMENT);
  CHECK(refused[2].rid() == 5);
  CHECK(refused[2].error().code() == v1::Error::PERMISSION_DENIED);
  CHECK(h.violations().empty());
}

TEST_CASE("retention: protocol: History below first_seq is an empty page with first_seq set") {
  std::shared_ptr<MessageStore> store = NewMemoryStore();
  const ConversationId id = DirectWith(*store, 5);
  REQUIRE(Sweep(*store, 1003 + 1000, 1000, 100).deleted == 3);  // seqs 1..3 expired
  ServerOptions options;
  options.store = store;
  testing::HubHarness h(options);
  server::SessionId bob = h.Connect("bob", "b1");
  for (uint64_t before : {uint64_t{3}, uint64_t{4}, uint64_t{0}}) {
    CAPTURE(before);
    v1::Envelope history;
    history.set_rid(7);
    history.mutable_history()->set_conversation_id(id);
    history.mutable_history()->set_before_seq(before);
    h.SendEnvelope(bob, history);
    h.Pump();
    std::vector<v1::Envelope> got = h.Take(bob);
    REQUIRE(got.size() == 1);
    REQUIRE_MESSAGE(got[0].has_history_page(), got[0].DebugString());
    const v1::HistoryPage& page = got[0].history_page();
    CHECK(page.first_seq() == 4);
    CHECK_FALSE(page.has_more());
    // The stored range is contiguous, so a page never reports holes.
    CHECK(page.gaps().empty());
    CHECK(page.messages_size() == (before == 0 ? 2 : 0));
  }
}

ServerOptions RoomyOptions() {
  ServerOptions options;
  options.idle_timeout_ms = 1'000'000'000;
  options.hello_timeout_ms = 1'000'000'000;
  options.messages_burst = 100'000;
  return options;
}

// Creates a group or channel from `session` with `members` and returns its id.
ConversationId CreateOverHub(testing::HubHarness& h, server::SessionId session,
                             v1::ConversationKind kind, const std::vector<std::string>& members) {
  v1::Envelope create;
  create.set_rid(900);
  create.mutable_create_group()->set_kind(kind);
  create.mutable_create_group()->set_title("team");
  for (const std::string& m : members) create.mutable_create_group()->add_members(m);
  h.SendEnvelope(session, create);
  h.Pump();
  for (const v1::Envelope& e : h.Take(session)) {
    if (e.rid() == 900 && e.has_conversation_update()) {
      return e.conversation_update().conversation().conversation_id();
    }
  }
  FAIL("no ConversationUpdate for the CreateGroup");
  return 0;
}

// The MessagesExpired notices among `envelopes`, in order; each must be an event (rid 0).
std::vector<v1::MessagesExpired> Notices(const std::vector<v1::Envelope>& envelopes) {
  std::vector<v1::MessagesExpired> out;
  for (const v1::Envelope& e : envelopes) {
    if (!e.has_messages_expired()) continue;
    CHECK(e.rid() == 0);
    out.push_back(e.messages_expired());
  }
  return out;
}

TEST_CASE("retention: protocol: a sweep tells every online device of the current members") {
  testing::HubHarness h(RoomyOptions());
  const server::SessionId alice1 = h.Connect("alice", "a1");
  const server::SessionId alice2 = h.Connect("alice", "a2", codec::Format::kJson);
  const server::SessionId bob = h.Connect("bob", "b1");
  const server::SessionId carol = h.Connect("carol", "c1");
  // seq 1: created (dave is a member, offline); seqs 2, 3: messages; seq 4: carol removed.
  const ConversationId id =
      CreateOverHub(h, alice1, v1::CONVERSATION_KIND_GROUP, {"bob", "carol", "dave"});
  h.SendEnvelope(alice1, testing::SendToConversation(1, id, testing::ClientMsgId(1), "one"));
  h.SendEnvelope(alice1, testing::SendToConversation(2, id, testing::ClientMsgId(2), "two"));
  h.Pump();
  v1::Envelope remove;
  remove.set_rid(3);
  remove.mutable_remove_members()->set_conversation_id(id);
  remove.mutable_remove_members()->add_users("carol");
  h.SendEnvelope(alice1, remove);
  h.Pump();
  h.clock().Advance(10'000);
  // seq 5, newer than the retention: kept.
  h.SendEnvelope(bob, testing::SendToConversation(4, id, testing::ClientMsgId(3), "kept"));
  h.Pump();
  for (server::SessionId s : {alice1, alice2, bob, carol}) h.Take(s);

  SweepResult swept = h.Sweep({h.clock().WallMs(), 5000, 100});
  REQUIRE(swept.deleted == 4);

  // Both of alice's devices (one speaks JSON) and bob's get the notice, once, and nothing else.
  for (server::SessionId s : {alice1, alice2, bob}) {
    CAPTURE(s);
    std::vector<v1::Envelope> got = h.Take(s);
    REQUIRE(got.size() == 1);
    std::vector<v1::MessagesExpired> notices = Notices(got);
    REQUIRE(notices.size() == 1);
    CHECK(notices[0].conversation_id() == id);
    CHECK(notices[0].first_seq() == 5);
    CHECK(notices[0].up_to_seq() == 4);
  }
  // Carol was removed: she is not told.
  CHECK(h.Take(carol).empty());
  // Dave was offline: nothing waits for him; he learns it from the conversation's state.
  const server::SessionId dave = h.Connect("dave", "d1");
  CHECK(h.Take(dave).empty());

  // A pass that empties the conversation says so: first_seq 0, up to its last seq.
  h.clock().Advance(10'000);
  swept = h.Sweep({h.clock().WallMs(), 5000, 100});
  REQUIRE(swept.deleted == 1);
  for (server::SessionId s : {alice1, alice2, bob, dave}) {
    CAPTURE(s);
    std::vector<v1::MessagesExpired> notices = Notices(h.Take(s));
    REQUIRE(notices.size() == 1);
    CHECK(notices[0].first_seq() == 0);
    CHECK(notices[0].up_to_seq() == 5);
  }
  CHECK(h.Take(carol).empty());
  // A pass that deletes nothing tells nobody.
  h.Sweep({h.clock().WallMs(), 5000, 100});
  for (server::SessionId s : {alice1, alice2, bob, carol, dave}) CHECK(h.Take(s).empty());
  CHECK(h.violations().empty());
}

TEST_CASE("retention: protocol: a channel's notice goes to the connections subscribed to it") {
  testing::HubHarness h(RoomyOptions());
  const server::SessionId alice = h.Connect("alice", "a1");
  const server::SessionId bob = h.Connect("bob", "b1");
  const server::SessionId erin = h.Connect("erin", "e1");
  const ConversationId id = CreateOverHub(h, alice, v1::CONVERSATION_KIND_CHANNEL, {"bob", "erin"});
  v1::Envelope subscribe;
  subscribe.set_rid(5);
  subscribe.mutable_subscribe()->set_conversation_id(id);
  h.SendEnvelope(bob, subscribe);
  h.Pump();
  h.SendEnvelope(alice, testing::SendToConversation(6, id, testing::ClientMsgId(6), "post"));
  h.Pump();
  for (server::SessionId s : {alice, bob, erin}) h.Take(s);

  h.clock().Advance(10'000);
  REQUIRE(h.Sweep({h.clock().WallMs(), 5000, 100}).deleted == 2);
  std::vector<v1::MessagesExpired> notices = Notices(h.Take(bob));
  REQUIRE(notices.size() == 1);
  CHECK(notices[0].conversation_id() == id);
  CHECK(notices[0].first_seq() == 0);
  CHECK(notices[0].up_to_seq() == 2);
  // Members not subscribed, the admin included, are not told: channels fan out on read.
  CHECK(h.Take(alice).empty());
  CHECK(h.Take(erin).empty());
  CHECK(h.violations().empty());
}

// A client built before the notice does not set Hello.accepts_messages_expired: it has no
// MessagesExpired in its schema, would fail to decode the frame and drop the connection, so it is
// never sent one.
TEST_CASE("retention: protocol: only sessions whose Hello accepts it get the notice") {
  testing::HubHarness h(RoomyOptions());
  const server::SessionId alice = h.Connect("alice", "a1");
  const server::SessionId bob_new = h.Connect("bob", "b-new", codec::Format::kBinary, true);
  const server::SessionId bob_old = h.Connect("bob", "b-old", codec::Format::kBinary, false);
  const server::SessionId bob_unset = h.Connect("bob", "b-unset", codec::Format::kJson, false);
  const ConversationId group = CreateOverHub(h, alice, v1::CONVERSATION_KIND_GROUP, {"bob"});
  const ConversationId channel = CreateOverHub(h, alice, v1::CONVERSATION_KIND_CHANNEL, {"bob"});
  for (server::SessionId s : {bob_new, bob_old, bob_unset}) {
    v1::Envelope subscribe;
    subscribe.set_rid(5);
    subscribe.mutable_subscribe()->set_conversation_id(channel);
    h.SendEnvelope(s, subscribe);
  }
  h.Pump();
  h.SendEnvelope(alice, testing::SendToConversation(6, group, testing::ClientMsgId(6), "g"));
  h.SendEnvelope(alice, testing::SendToConversation(7, channel, testing::ClientMsgId(7), "c"));
  h.Pump();
  for (server::SessionId s : {alice, bob_new, bob_old, bob_unset}) h.Take(s);

  h.clock().Advance(10'000);
  REQUIRE(h.Sweep({h.clock().WallMs(), 5000, 100}).deleted == 4);
  // The device that accepts it hears of both conversations.
  std::vector<v1::MessagesExpired> notices = Notices(h.Take(bob_new));
  REQUIRE(notices.size() == 2);
  CHECK(notices[0].conversation_id() == group);
  CHECK(notices[0].up_to_seq() == 2);
  CHECK(notices[1].conversation_id() == channel);
  CHECK(notices[1].up_to_seq() == 2);
  // The same user's older devices get nothing, and stay connected.
  for (server::SessionId s : {bob_old, bob_unset}) {
    CAPTURE(s);
    CHECK(h.Take(s).empty());
    CHECK_FALSE(h.closed(s).has_value());
  }
  CHECK(h.violations().empty());
}

TEST_CASE("retention: sqlite: survives reopening") {
  testing::TempDir dir;
  SqliteStoreOptions options;
  options.path = dir.File("chat.db");
  ConversationId id = 0;
  {
    Result<std::shared_ptr<MessageStore>> opened = NewSqliteStore(options);
    REQUIRE(opened.ok());
    id = DirectWith(**opened, 3);
    REQUIRE((*opened)->SetRetention(id, 100).ok());
    REQUIRE(Sweep(**opened, 1001 + 100, 0, 100).deleted == 1);
  }
  Result<std::shared_ptr<MessageStore>> reopened = NewSqliteStore(options);
  REQUIRE(reopened.ok());
  CHECK(HistoryOf(**reopened, id, 0).first_seq == 2);
  // The deleted message's key was stored too: a resend is still the original.
  AppendResult resend = SendAt(**reopened, id, "alice", "", "m0", 5000);
  CHECK(resend.duplicate);
  CHECK(resend.message.seq == 1);
  // The conversation's own retention was stored too.
  CHECK(Sweep(**reopened, 10'000, 0, 100).deleted == 2);
}

// The members a pass names are read, not kept in the writer's cache: that cache is the send
// path's, bounded, and starts over when full, so a pass through many cold conversations would push
// the busy ones out. Seen from outside: after a pass over a conversation nobody sent to since the
// store opened, the next send reads the members as they are in the file, not a copy the pass kept.
TEST_CASE("retention: sqlite: a pass leaves the writer's member cache as it found it") {
  testing::TempDir dir;
  SqliteStoreOptions options;
  options.path = dir.File("chat.db");
  ConversationId id = 0;
  {
    Result<std::shared_ptr<MessageStore>> opened = NewSqliteStore(options);
    REQUIRE(opened.ok());
    id = DirectWith(**opened, 3);
  }
  // Reopened: the writer's cache is empty.
  Result<std::shared_ptr<MessageStore>> reopened = NewSqliteStore(options);
  REQUIRE(reopened.ok());
  MessageStore& store = **reopened;
  SweepResult swept = Sweep(store, 2002, 1000, 100);
  REQUIRE(swept.expired.size() == 1);
  CHECK(swept.expired[0].recipients == std::vector<UserId>{"alice", "bob"});

  // Another connection renames bob to carol in the file, which only a fresh read sees.
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(options.path.c_str(), &db) == SQLITE_OK);
  const std::string rename =
      "UPDATE members SET user_id = 'carol' WHERE conversation_id = " + std::to_string(id) +
      " AND user_id = 'bob'";
  const int rc = sqlite3_exec(db, rename.c_str(), nullptr, nullptr, nullptr);
  sqlite3_close(db);
  REQUIRE(rc == SQLITE_OK);
  AppendResult sent = SendAt(store, id, "alice", "", "after", 5000);
  CHECK(sent.recipients == std::vector<UserId>{"alice", "carol"});
}

void WriterThreadSweeps(Kind kind) {
  Env env(kind);
  const ConversationId id = DirectWith(*env.store, 5);
  const ConversationId other =
      SendAt(*env.store, 0, "carol", "dave", "c0", 1005).message.conversation_id;
  server::StoreThreadsOptions options;
  options.retention_sweep = true;
  options.retention_ms = 1000;
  options.retention_sweep_interval_ms = 1;
  options.retention_batch_max = 2;
  options.wall_ms = [] { return int64_t{100'000}; };
  std::atomic<int> wakes{0};
  server::StoreThreads threads(env.store, options, [&wakes] { ++wakes; });
  threads.Start();
  // Bounded wait for the writer thread: three passes of at most two messages each.
  auto gone = [&] {
    Result<HistoryReply> carol = env.store->History({"carol", other, 0, 50});
    REQUIRE(carol.ok());
    return HistoryOf(*env.store, id, 0).messages.empty() && carol->messages.empty();
  };
  bool all_gone = false;
  for (int attempt = 0; attempt < 1000 && !all_gone; ++attempt) {
    all_gone = gone();
    if (!all_gone) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  threads.Stop();
  CHECK(all_gone);
  SyncReply sync = SyncFrom(*env.store, id, 0);
  REQUIRE(sync.gaps.size() == 1);
  CHECK(sync.gaps[0].to_seq == 5);
  // Each pass posted what it deleted and woke the loop for it. The loop took nothing meanwhile,
  // so the three passes over `id` left one range, the last one: one notice, not three.
  std::vector<server::AppendDone> appends;
  std::vector<server::ReadDone> reads;
  std::vector<ExpiredRange> expired;
  threads.TakeCompletions(&appends, &reads, &expired);
  REQUIRE(expired.size() == 2);
  CHECK(wakes.load() >= 3);
  CHECK(expired[0].conversation_id == id);
  CHECK(expired[0].recipients == std::vector<UserId>{"alice", "bob"});
  CHECK(expired[0].up_to_seq == 5);
  CHECK(expired[0].first_seq == 0);
  // Another conversation's range is its own.
  CHECK(expired[1].conversation_id == other);
  CHECK(expired[1].recipients == std::vector<UserId>{"carol", "dave"});
  CHECK(expired[1].up_to_seq == 1);
  CHECK(expired[1].first_seq == 0);
}
RETENTION_CASE(WriterThreadSweeps, "the store writer thread sweeps expired messages")

TEST_CASE("retention: no sweep when retention_sweep is off") {
  Env env(Kind::kMemory);
  const ConversationId id = DirectWith(*env.store, 3);
  server::StoreThreadsOptions options;
  options.retention_ms = 1000;
  options.retention_sweep_interval_ms = 1;
  options.wall_ms = [] { return int64_t{100'000}; };
  server::StoreThreads threads(env.store, options, [] {});
  threads.Start();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  threads.Stop();
  CHECK(HistoryOf(*env.store, id, 0).messages.size() == 3);
}

}  // namespace
}  // namespace chat
