// MessageStore conformance: every case runs against the memory store and the SQLite store,
// which must be indistinguishable to the server. SQLite-only cases (durability, epoch, schema
// versions, concurrency, failed transactions) follow.

#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "chat/store.h"
#include "doctest/doctest.h"
#include "tests/testing/sync_replies.h"
#include "tests/testing/temp_dir.h"

namespace chat {
namespace {

using testing::TempDir;

// kSqliteMerging: a SQLite store whose message log switches every two messages and moves one
// row per step, so the cases run while messages are part-way between the logs and the
// conversation-ordered table.
enum class Kind { kMemory, kSqlite, kSqliteMerging };

// A store of the given kind; the SQLite one lives in a private temp dir removed afterwards.
struct Env {
  explicit Env(Kind kind, SqliteStoreOptions options = {}) {
    if (kind == Kind::kMemory) {
      store = NewMemoryStore();
      return;
    }
    options.path = dir.File("chat.db");
    if (kind == Kind::kSqliteMerging) {
      options.recent_log_rows = 2;
      options.recent_log_slice_rows = 1;
    }
    Result<std::shared_ptr<MessageStore>> opened = NewSqliteStore(options);
    REQUIRE_MESSAGE(opened.ok(), opened.status().ToString());
    store = *opened;
  }

  TempDir dir;
  std::shared_ptr<MessageStore> store;
};

int next_message_id = 1000;

AppendRequest ToPeer(const UserId& sender, const UserId& peer, const std::string& key,
                     const std::string& body) {
  AppendRequest r;
  r.peer = peer;
  r.sender = sender;
  r.sender_device = sender + "-phone";
  r.client_msg_id = key;
  r.message_id = static_cast<MessageId>(++next_message_id);
  r.server_time_ms = 1'700'000'000'000 + next_message_id;
  r.content_type = "text/plain";
  r.body = body;
  return r;
}

AppendRequest ToConversation(ConversationId id, const UserId& sender, const std::string& key,
                             const std::string& body) {
  AppendRequest r = ToPeer(sender, "", key, body);
  r.conversation_id = id;
  return r;
}

// Commits a batch that must succeed as a transaction.
std::vector<AppendResult> Commit(MessageStore& store, const std::vector<AppendRequest>& batch) {
  std::vector<AppendResult> results;
  Status s = store.Append(batch, &results);
  REQUIRE_MESSAGE(s.ok(), s.ToString());
  REQUIRE(results.size() == batch.size());
  return results;
}

AppendResult CommitOne(MessageStore& store, const AppendRequest& request) {
  return Commit(store, {request})[0];
}

// Sends `n` messages from `sender` in conversation `id`, returning the last result.
AppendResult SendMany(MessageStore& store, ConversationId id, const UserId& sender, int n,
                      const std::string& tag) {
  AppendResult last;
  for (int i = 0; i < n; ++i) {
    last = CommitOne(store, ToConversation(id, sender, tag + "-" + std::to_string(i), tag));
    REQUIRE(last.status.ok());
  }
  return last;
}

// Opens the direct conversation between `a` and `b` with one message from `a`; returns its id.
ConversationId OpenDirect(MessageStore& store, const UserId& a, const UserId& b) {
  AppendResult r = CommitOne(store, ToPeer(a, b, "open-" + a + "-" + b, "hi"));
  REQUIRE(r.status.ok());
  return r.message.conversation_id;
}

std::vector<Seq> Seqs(const std::vector<Message>& messages) {
  std::vector<Seq> out;
  for (const Message& m : messages) out.push_back(m.seq);
  return out;
}

Result<HistoryReply> HistoryOf(MessageStore& store, const UserId& user, ConversationId id,
                               Seq before_seq, uint32_t limit) {
  HistoryQuery q;
  q.user = user;
  q.conversation_id = id;
  q.before_seq = before_seq;
  q.limit = limit;
  return store.History(q);
}

Result<SyncReply> SyncOf(MessageStore& store, const UserId& user, std::vector<Cursor> cursors,
                         uint32_t limit = 500, uint32_t catchup_max = 1000) {
  SyncQuery q;
  q.user = user;
  q.device = user + "-phone";
  q.cursors = std::move(cursors);
  q.limit = limit;
  q.catchup_max = catchup_max;
  return store.Sync(q);
}

#define STORE_CASE(fn, title)                               \
  TEST_CASE("store: memory: " title) { fn(Kind::kMemory); } \
  TEST_CASE("store: sqlite: " title) { fn(Kind::kSqlite); } \
  TEST_CASE("store: sqlite, merging: " title) { fn(Kind::kSqliteMerging); }

void SeqIsGaplessAndFieldsRoundTrip(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;

  AppendRequest first = ToPeer("alice", "bob", "k-first", std::string("bin\0ary", 7));
  first.content_type = "application/octet-stream";
  Attachment photo;
  photo.url = "https://cdn.example/p.jpg";
  photo.mime_type = "image/jpeg";
  photo.size = 123456;
  photo.sha256 = std::string(32, '\x7f');
  photo.name = "p.jpg";
  photo.width = 640;
  photo.height = 480;
  photo.duration_ms = 0;
  Attachment clip = photo;
  clip.url = "https://cdn.example/c.mp4";
  clip.duration_ms = 9000;
  first.attachments = {photo, clip};
  AppendResult r1 = CommitOne(store, first);
  REQUIRE(r1.status.ok());
  const ConversationId ab = r1.message.conversation_id;
  CHECK(ab != 0);
  CHECK(r1.message.seq == 1);

  const ConversationId cd = OpenDirect(store, "carol", "dave");
  CHECK(cd != ab);
  // Interleave sends in the two conversations: each keeps its own sequence.
  for (int i = 0; i < 4; ++i) {
    AppendResult a = CommitOne(
        store, ToConversation(ab, i % 2 ? "alice" : "bob", "ab-" + std::to_string(i), "x"));
    AppendResult c = CommitOne(store, ToConversation(cd, "dave", "cd-" + std::to_string(i), "y"));
    CHECK(a.message.seq == static_cast<Seq>(i + 2));
    CHECK(c.message.seq == static_cast<Seq>(i + 2));
  }

  Result<HistoryReply> h = HistoryOf(store, "bob", ab, 0, 100);
  REQUIRE(h.ok());
  CHECK(Seqs(h->messages) == std::vector<Seq>{5, 4, 3, 2, 1});
  const Message& m = h->messages.back();
  CHECK(m.conversation_id == ab);
  CHECK(m.message_id == first.message_id);
  CHECK(m.sender == "alice");
  CHECK(m.sender_device == "alice-phone");
  CHECK(m.client_msg_id == "k-first");
  CHECK(m.server_time_ms == first.server_time_ms);
  CHECK(m.kind == MessageKind::kUser);
  CHECK(m.content_type == "application/octet-stream");
  CHECK(m.body == std::string("bin\0ary", 7));
  REQUIRE(m.attachments.size() == 2);
  CHECK(m.attachments[0].url == photo.url);
  CHECK(m.attachments[0].mime_type == "image/jpeg");
  CHECK(m.attachments[0].size == 123456);
  CHECK(m.attachments[0].sha256 == photo.sha256);
  CHECK(m.attachments[0].name == "p.jpg");
  CHECK(m.attachments[0].width == 640);
  CHECK(m.attachments[0].height == 480);
  CHECK(m.attachments[1].url == clip.url);
  CHECK(m.attachments[1].duration_ms == 9000);
  CHECK(h->messages[0].attachments.empty());
  CHECK(h->messages[0].body == "x");
}
STORE_CASE(SeqIsGaplessAndFieldsRoundTrip, "seq is gapless per conversation and fields round-trip")

void DirectCreatedOnFirstSendFoundFromEitherSide(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;

  AppendResult first = CommitOne(store, ToPeer("bob", "alice", "k1", "hello"));
  REQUIRE(first.status.ok());
  CHECK(first.created);
  CHECK_FALSE(first.duplicate);
  CHECK(first.recipients == std::vector<UserId>{"alice", "bob"});

  AppendResult reply = CommitOne(store, ToPeer("alice", "bob", "k2", "hey"));
  REQUIRE(reply.status.ok());
  CHECK_FALSE(reply.created);
  CHECK(reply.message.conversation_id == first.message.conversation_id);
  CHECK(reply.message.seq == 2);

  AppendResult by_id =
      CommitOne(store, ToConversation(first.message.conversation_id, "bob", "k3", "again"));
  REQUIRE(by_id.status.ok());
  CHECK_FALSE(by_id.created);
  CHECK(by_id.message.seq == 3);

  Result<std::vector<UserId>> members = store.Members(first.message.conversation_id);
  REQUIRE(members.ok());
  CHECK(*members == std::vector<UserId>{"alice", "bob"});

  // Another pair gets another conversation.
  AppendResult other = CommitOne(store, ToPeer("alice", "carol", "k4", "hi carol"));
  REQUIRE(other.status.ok());
  CHECK(other.created);
  CHECK(other.message.conversation_id != first.message.conversation_id);
  CHECK(other.message.seq == 1);
}
STORE_CASE(DirectCreatedOnFirstSendFoundFromEitherSide,
           "direct conversation is created on first send and found from either side")

void BadAddressesAreRefusedPerItem(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;

  std::vector<AppendRequest> batch = {
      ToPeer("alice", "alice", "self", "me"),
      ToPeer("alice", "", "nobody", "?"),
      ToPeer("", "bob", "anon", "?"),
      ToPeer("alice", "bob", "fine", "ok"),
      ToPeer("alice", std::string(129, 'p'), "long", "?"),
  };
  std::vector<AppendResult> results = Commit(store, batch);
  CHECK(results[4].status.code() == Code::kInvalidArgument);
  CHECK(results[4].status.message() == "user ids must be 1..128 bytes");
  CHECK(results[0].status.code() == Code::kInvalidArgument);
  CHECK(results[0].status.message() == "peer must not be the sender");
  CHECK(results[1].status.code() == Code::kInvalidArgument);
  CHECK(results[1].status.message() == "peer is required when conversation_id is 0");
  CHECK(results[2].status.code() == Code::kInvalidArgument);
  CHECK(results[2].status.message() == "sender is required");
  REQUIRE(results[3].status.ok());
  CHECK(results[3].message.seq == 1);

  // The refused self-conversation was not created: alice is in exactly one conversation.
  Result<SyncReply> sync = SyncOf(store, "alice", {});
  REQUIRE(sync.ok());
  REQUIRE(sync->conversations.size() == 1);
  CHECK(sync->conversations[0].peer == "bob");
  CHECK(Seqs(sync->messages) == std::vector<Seq>{1});
}
STORE_CASE(BadAddressesAreRefusedPerItem,
           "self peer, missing peer and missing sender are refused per item")

void DedupeAcrossBatches(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;

  AppendResult original = CommitOne(store, ToPeer("alice", "bob", "key-1", "first"));
  REQUIRE(original.status.ok());
  CommitOne(store, ToPeer("bob", "alice", "key-b", "between"));

  AppendRequest resend = ToPeer("alice", "bob", "key-1", "changed body");
  AppendResult dup = CommitOne(store, resend);
  REQUIRE(dup.status.ok());
  CHECK(dup.duplicate);
  CHECK_FALSE(dup.created);
  CHECK(dup.message.message_id == original.message.message_id);
  CHECK(dup.message.seq == 1);
  CHECK(dup.message.conversation_id == original.message.conversation_id);
  CHECK(dup.message.body == "first");
  CHECK(dup.recipients == std::vector<UserId>{"alice", "bob"});

  // Addressed by conversation id this time: still the same message.
  AppendResult dup2 =
      CommitOne(store, ToConversation(original.message.conversation_id, "alice", "key-1", "x"));
  CHECK(dup2.duplicate);
  CHECK(dup2.message.seq == 1);

  // The key is per sender: bob may use the same text as alice.
  AppendResult bobs = CommitOne(store, ToPeer("bob", "alice", "key-1", "bob's own"));
  REQUIRE(bobs.status.ok());
  CHECK_FALSE(bobs.duplicate);
  CHECK(bobs.message.seq == 3);

  Result<HistoryReply> h = HistoryOf(store, "alice", original.message.conversation_id, 0, 50);
  REQUIRE(h.ok());
  CHECK(Seqs(h->messages) == std::vector<Seq>{3, 2, 1});
}
STORE_CASE(DedupeAcrossBatches, "dedupe across batches returns the original message")

void DedupeWithinBatch(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;

  std::vector<AppendResult> results = Commit(store, {
                                                        ToPeer("alice", "bob", "same", "one"),
                                                        ToPeer("alice", "bob", "other", "two"),
                                                        ToPeer("alice", "bob", "same", "three"),
                                                    });
  REQUIRE(results[0].status.ok());
  CHECK(results[0].created);
  CHECK_FALSE(results[0].duplicate);
  CHECK(results[1].message.seq == 2);
  CHECK_FALSE(results[1].created);
  CHECK(results[2].duplicate);
  CHECK(results[2].message.seq == 1);
  CHECK(results[2].message.message_id == results[0].message.message_id);
  CHECK(results[2].message.body == "one");

  Result<HistoryReply> h = HistoryOf(store, "bob", results[0].message.conversation_id, 0, 50);
  REQUIRE(h.ok());
  CHECK(Seqs(h->messages) == std::vector<Seq>{2, 1});
}
STORE_CASE(DedupeWithinBatch, "dedupe within one batch: the second item is a duplicate")

void EmptyKeyIsNotDeduplicated(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId id = OpenDirect(store, "alice", "bob");
  AppendResult a = CommitOne(store, ToConversation(id, "alice", "", "one"));
  AppendResult b = CommitOne(store, ToConversation(id, "alice", "", "two"));
  CHECK_FALSE(b.duplicate);
  CHECK(a.message.seq == 2);
  CHECK(b.message.seq == 3);
}
STORE_CASE(EmptyKeyIsNotDeduplicated, "an empty client_msg_id opts out of deduplication")

void NonMemberIsDenied(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId ab = OpenDirect(store, "alice", "bob");
  const ConversationId missing = ab + 1000;

  std::vector<AppendResult> results =
      Commit(store, {
                        ToConversation(ab, "mallory", "m1", "hi"),
                        ToConversation(ab, "bob", "b1", "ok"),
                        ToConversation(missing, "mallory", "m2", "?"),
                    });
  CHECK(results[0].status.code() == Code::kPermissionDenied);
  CHECK(results[0].status.message() == "not a member of conversation " + std::to_string(ab));
  CHECK(results[0].recipients.empty());
  REQUIRE(results[1].status.ok());
  CHECK(results[1].message.seq == 2);
  // A conversation that does not exist is refused in the same words: existence does not leak.
  CHECK(results[2].status.code() == Code::kPermissionDenied);
  CHECK(results[2].status.message() == "not a member of conversation " + std::to_string(missing));

  Result<HistoryReply> h = HistoryOf(store, "alice", ab, 0, 50);
  REQUIRE(h.ok());
  CHECK(Seqs(h->messages) == std::vector<Seq>{2, 1});
  // The refused key was not consumed: once mallory has a conversation, it commits.
  AppendResult later = CommitOne(store, ToPeer("mallory", "alice", "m1", "now"));
  REQUIRE(later.status.ok());
  CHECK_FALSE(later.duplicate);

  Result<SyncReply> sync = SyncOf(store, "mallory", {});
  REQUIRE(sync.ok());
  REQUIRE(sync->conversations.size() == 1);
  CHECK(sync->conversations[0].conversation_id != ab);
}
STORE_CASE(NonMemberIsDenied, "non-member gets PermissionDenied and nothing is stored")

void MembersOfMissingConversation(Kind kind) {
  Env env(kind);
  const ConversationId ab = OpenDirect(*env.store, "alice", "bob");
  Result<std::vector<UserId>> members = env.store->Members(ab + 1);
  CHECK(members.status().code() == Code::kNotFound);
  CHECK(members.status().message() == "conversation " + std::to_string(ab + 1) + " does not exist");
}
STORE_CASE(MembersOfMissingConversation, "members of a missing conversation is NotFound")

void SyncReportsMissedMessages(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId ab = OpenDirect(store, "alice", "bob");      // seq 1 from alice
  CommitOne(store, ToConversation(ab, "bob", "b1", "bob speaks"));  // seq 2
  SendMany(store, ab, "alice", 3, "a");                             // seq 3..5
  const ConversationId bc = OpenDirect(store, "carol", "bob");      // seq 1 from carol
  const ConversationId cd = OpenDirect(store, "carol", "dave");     // bob is not in it

  // A device that has never synced gets every conversation, including ones it never saw.
  Result<SyncReply> all = SyncOf(store, "bob", {});
  REQUIRE(all.ok());
  CHECK_FALSE(all->has_more);
  CHECK(all->gaps.empty());
  REQUIRE(all->conversations.size() == 2);
  const ConversationInfo& info = all->conversations[0];
  CHECK(info.conversation_id == ab);
  CHECK(info.kind == ConversationKind::kDirect);
  CHECK(info.peer == "alice");
  CHECK(info.last_seq == 5);
  CHECK(info.first_seq == 1);
  CHECK(info.read_seq == 0);
  CHECK(info.delivered_seq == 0);
  CHECK(info.unread == 3);  // alice's after bob's reply: whoever replies has seen what came before
  CHECK(info.role == Role::kMember);
  CHECK(info.member_count == 2);
  CHECK(info.last_activity_ms > 0);
  CHECK(all->conversations[1].conversation_id == bc);
  CHECK(all->conversations[1].peer == "carol");
  REQUIRE(all->messages.size() == 6);
  for (size_t i = 0; i < 5; ++i) {
    CHECK(all->messages[i].conversation_id == ab);
    CHECK(all->messages[i].seq == i + 1);
  }
  CHECK(all->messages[5].conversation_id == bc);
  for (const Message& m : all->messages) CHECK(m.conversation_id != cd);

  // With cursors: only what is above them; a conversation that is up to date is not listed.
  Result<SyncReply> some = SyncOf(store, "bob", {{ab, 3}, {bc, 1}});
  REQUIRE(some.ok());
  REQUIRE(some->conversations.size() == 1);
  CHECK(some->conversations[0].conversation_id == ab);
  CHECK(Seqs(some->messages) == std::vector<Seq>{4, 5});

  Result<SyncReply> none = SyncOf(store, "bob", {{ab, 5}, {bc, 1}});
  REQUIRE(none.ok());
  CHECK(none->conversations.empty());
  CHECK(none->messages.empty());
  CHECK_FALSE(none->has_more);

  // A user in no conversation, and a cursor for a foreign conversation, yield nothing.
  Result<SyncReply> stranger = SyncOf(store, "erin", {{ab, 0}, {cd, 0}});
  REQUIRE(stranger.ok());
  CHECK(stranger->conversations.empty());
  CHECK(stranger->messages.empty());
}
STORE_CASE(SyncReportsMissedMessages,
           "sync returns messages above the cursors and conversations never seen")

void SyncPaginatesExactlyOnce(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId c1 = OpenDirect(store, "alice", "bob");
  SendMany(store, c1, "alice", 6, "one");  // seq 1..7
  const ConversationId c2 = OpenDirect(store, "carol", "bob");
  SendMany(store, c2, "bob", 4, "two");  // seq 1..5
  const ConversationId c3 = OpenDirect(store, "dave", "bob");
  SendMany(store, c3, "dave", 8, "three");  // seq 1..9
  const std::map<ConversationId, Seq> last = {{c1, 7}, {c2, 5}, {c3, 9}};

  std::map<ConversationId, Seq> cursors;
  std::vector<std::pair<ConversationId, Seq>> seen;
  bool more = true;
  int rounds = 0;
  while (more && rounds < 20) {
    ++rounds;
    std::vector<Cursor> query;
    for (const auto& [id, seq] : cursors) query.push_back({id, seq});
    Result<SyncReply> page = SyncOf(store, "bob", query, /*limit=*/4);
    REQUIRE(page.ok());
    CHECK(page->messages.size() <= 4);
    CHECK(page->gaps.empty());
    for (const Message& m : page->messages) {
      seen.emplace_back(m.conversation_id, m.seq);
      cursors[m.conversation_id] = m.seq;
    }
    for (const ConversationInfo& info : page->conversations) {
      CHECK(info.last_seq == last.at(info.conversation_id));
    }
    more = page->has_more;
  }
  CHECK(rounds == 6);  // 21 messages, 4 per page
  std::vector<std::pair<ConversationId, Seq>> expected;
  for (const auto& [id, top] : last) {
    for (Seq s = 1; s <= top; ++s) expected.emplace_back(id, s);
  }
  CHECK(seen == expected);
}
STORE_CASE(SyncPaginatesExactlyOnce,
           "sync pagination with has_more gives every message exactly once in order")

void SyncCutAtConversationBoundary(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId c1 = OpenDirect(store, "alice", "bob");
  SendMany(store, c1, "alice", 2, "a");  // seq 1..3
  const ConversationId c2 = OpenDirect(store, "carol", "bob");

  // The limit is reached exactly at the end of c1: c2 is neither listed nor lost.
  Result<SyncReply> first = SyncOf(store, "bob", {}, /*limit=*/3);
  REQUIRE(first.ok());
  CHECK(first->has_more);
  REQUIRE(first->conversations.size() == 1);
  CHECK(first->conversations[0].conversation_id == c1);
  CHECK(Seqs(first->messages) == std::vector<Seq>{1, 2, 3});

  Result<SyncReply> second = SyncOf(store, "bob", {{c1, 3}}, /*limit=*/3);
  REQUIRE(second.ok());
  CHECK_FALSE(second->has_more);
  REQUIRE(second->conversations.size() == 1);
  CHECK(second->conversations[0].conversation_id == c2);
  CHECK(Seqs(second->messages) == std::vector<Seq>{1});
}
STORE_CASE(SyncCutAtConversationBoundary,
           "sync cut exactly at a conversation's end leaves the next one for the re-sync")

void SyncGapPastCatchupMax(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId id = OpenDirect(store, "alice", "bob");
  SendMany(store, id, "alice", 29, "m");  // seq 1..30

  Result<SyncReply> fresh = SyncOf(store, "bob", {}, /*limit=*/100, /*catchup_max=*/10);
  REQUIRE(fresh.ok());
  REQUIRE(fresh->gaps.size() == 1);
  CHECK(fresh->gaps[0].conversation_id == id);
  CHECK(fresh->gaps[0].from_seq == 1);
  CHECK(fresh->gaps[0].to_seq == 20);
  CHECK(Seqs(fresh->messages) == std::vector<Seq>{21, 22, 23, 24, 25, 26, 27, 28, 29, 30});
  CHECK_FALSE(fresh->has_more);
  REQUIRE(fresh->conversations.size() == 1);
  CHECK(fresh->conversations[0].last_seq == 30);

  Result<SyncReply> behind = SyncOf(store, "bob", {{id, 5}}, 100, 10);
  REQUIRE(behind.ok());
  REQUIRE(behind->gaps.size() == 1);
  CHECK(behind->gaps[0].from_seq == 6);
  CHECK(behind->gaps[0].to_seq == 20);
  CHECK(behind->messages.front().seq == 21);

  // Exactly catchup_max missing: no gap.
  Result<SyncReply> edge = SyncOf(store, "bob", {{id, 20}}, 100, 10);
  REQUIRE(edge.ok());
  CHECK(edge->gaps.empty());
  CHECK(edge->messages.size() == 10);

  // A gap with a page limit below catchup_max: newest window starts, the rest follows.
  Result<SyncReply> small = SyncOf(store, "bob", {}, /*limit=*/4, /*catchup_max=*/10);
  REQUIRE(small.ok());
  REQUIRE(small->gaps.size() == 1);
  CHECK(small->gaps[0].to_seq == 20);
  CHECK(Seqs(small->messages) == std::vector<Seq>{21, 22, 23, 24});
  CHECK(small->has_more);
  Result<SyncReply> rest = SyncOf(store, "bob", {{id, 24}}, 100, 10);
  REQUIRE(rest.ok());
  CHECK(rest->gaps.empty());
  CHECK(Seqs(rest->messages) == std::vector<Seq>{25, 26, 27, 28, 29, 30});
}
STORE_CASE(SyncGapPastCatchupMax, "sync past catchup_max returns the newest messages and a gap")

void SyncRefusesZeroLimits(Kind kind) {
  Env env(kind);
  Result<SyncReply> a = SyncOf(*env.store, "bob", {}, /*limit=*/0);
  CHECK(a.status().code() == Code::kInvalidArgument);
  CHECK(a.status().message() == "limit must be at least 1");
  Result<SyncReply> b = SyncOf(*env.store, "bob", {}, 10, /*catchup_max=*/0);
  CHECK(b.status().code() == Code::kInvalidArgument);
  CHECK(b.status().message() == "catchup_max must be at least 1");
}
STORE_CASE(SyncRefusesZeroLimits, "sync with a zero limit or catchup_max is InvalidArgument")

void HistoryPagesNewestFirst(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId id = OpenDirect(store, "alice", "bob");
  SendMany(store, id, "bob", 11, "h");  // seq 1..12

  Result<HistoryReply> p1 = HistoryOf(store, "alice", id, 0, 5);
  REQUIRE(p1.ok());
  CHECK(Seqs(p1->messages) == std::vector<Seq>{12, 11, 10, 9, 8});
  CHECK(p1->has_more);
  CHECK(p1->first_seq == 1);
  Result<HistoryReply> p2 = HistoryOf(store, "alice", id, 8, 5);
  REQUIRE(p2.ok());
  CHECK(Seqs(p2->messages) == std::vector<Seq>{7, 6, 5, 4, 3});
  CHECK(p2->has_more);
  Result<HistoryReply> p3 = HistoryOf(store, "alice", id, 3, 5);
  REQUIRE(p3.ok());
  CHECK(Seqs(p3->messages) == std::vector<Seq>{2, 1});
  CHECK_FALSE(p3->has_more);
  Result<HistoryReply> p4 = HistoryOf(store, "alice", id, 1, 5);
  REQUIRE(p4.ok());
  CHECK(p4->messages.empty());
  CHECK_FALSE(p4->has_more);

  // A page that ends exactly at seq 1 has nothing older.
  Result<HistoryReply> exact = HistoryOf(store, "alice", id, 6, 5);
  REQUIRE(exact.ok());
  CHECK(Seqs(exact->messages) == std::vector<Seq>{5, 4, 3, 2, 1});
  CHECK_FALSE(exact->has_more);
  // before_seq past the end reads from the newest.
  Result<HistoryReply> past = HistoryOf(store, "alice", id, 1000, 2);
  REQUIRE(past.ok());
  CHECK(Seqs(past->messages) == std::vector<Seq>{12, 11});
}
STORE_CASE(HistoryPagesNewestFirst, "history pages newest first with has_more")

void HistoryDeniesOutsiders(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId id = OpenDirect(store, "alice", "bob");

  Result<HistoryReply> outsider = HistoryOf(store, "mallory", id, 0, 10);
  CHECK(outsider.status().code() == Code::kPermissionDenied);
  CHECK(outsider.status().message() == "not a member of conversation " + std::to_string(id));
  Result<HistoryReply> missing = HistoryOf(store, "alice", id + 7, 0, 10);
  CHECK(missing.status().code() == Code::kPermissionDenied);
  CHECK(missing.status().message() == "not a member of conversation " + std::to_string(id + 7));
  Result<HistoryReply> zero = HistoryOf(store, "alice", id, 0, 0);
  CHECK(zero.status().code() == Code::kInvalidArgument);
  CHECK(zero.status().message() == "limit must be at least 1");
}
STORE_CASE(HistoryDeniesOutsiders,
           "history is PermissionDenied for non-members and unknown conversations")

// ---------------------------------------------------------------------------------------------
// SQLite only
// ---------------------------------------------------------------------------------------------

// Runs `sql` on the file through a connection of the test's own.
void RawExec(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  char* error = nullptr;
  const int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error);
  std::string message = error != nullptr ? error : "";
  sqlite3_free(error);
  sqlite3_close(db);
  REQUIRE_MESSAGE(rc == SQLITE_OK, message);
}

// The first row `sql` returns on the file (through a connection of the test's own), its columns
// as text.
std::vector<std::string> RawRow(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK);
  std::vector<std::string> columns;
  if (sqlite3_step(stmt) == SQLITE_ROW) {
    for (int i = 0; i < sqlite3_column_count(stmt); ++i) {
      const unsigned char* text = sqlite3_column_text(stmt, i);
      columns.emplace_back(text != nullptr ? reinterpret_cast<const char*>(text) : "");
    }
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  REQUIRE_FALSE(columns.empty());
  return columns;
}

// Turns a file of this build into what version 4 left behind: every message in `messages`, the
// idempotency index on it, no logs and no keys table.
// Undoes migration 8 (the user message counts).
// Undoes migration 9 (the two latest senders in the conversation's row).
#define CHAT_BACK_TO_VERSION_9                                             \
  "ALTER TABLE conversations DROP COLUMN told_delivered_seq; ALTER TABLE " \
  "conversations DROP COLUMN told_read_seq; "
#define CHAT_BACK_TO_VERSION_8                                                                \
  CHAT_BACK_TO_VERSION_9                                                                      \
  "ALTER TABLE conversations DROP COLUMN last_sender; ALTER TABLE conversations DROP COLUMN " \
  "last_sent_seq; ALTER TABLE conversations DROP COLUMN prev_sender; ALTER TABLE "            \
  "conversations DROP COLUMN prev_sent_seq; "
#define CHAT_BACK_TO_VERSION_7                                                                 \
  CHAT_BACK_TO_VERSION_8                                                                       \
  "ALTER TABLE messages DROP COLUMN user_ordinal; ALTER TABLE log0 DROP COLUMN user_ordinal; " \
  "ALTER TABLE log1 DROP COLUMN user_ordinal; ALTER TABLE conversations DROP COLUMN "          \
  "user_messages; ALTER TABLE conversations DROP COLUMN gone_user_messages; ALTER TABLE "      \
  "members DROP COLUMN sent_seq; "
constexpr const char* kBackToVersion7 = CHAT_BACK_TO_VERSION_7 "PRAGMA user_version = 7;";

constexpr const char* kBackToVersion4 = CHAT_BACK_TO_VERSION_7
    "ALTER TABLE conversations DROP COLUMN member_count; "
    "INSERT INTO messages SELECT * FROM log0; INSERT INTO messages SELECT * FROM log1; "
    "DROP TABLE log0; DROP TABLE log1; DROP TABLE log_state; DROP TABLE message_keys; "
    "CREATE UNIQUE INDEX messages_by_key ON messages(client_msg_id, sender) "
    "WHERE client_msg_id <> ''; PRAGMA user_version = 4;";

Result<std::shared_ptr<MessageStore>> OpenAt(const std::string& path) {
  SqliteStoreOptions options;
  options.path = path;
  return NewSqliteStore(options);
}

// A store file at `path` holding alice's "first" to bob (key-1), closed again; returns the
// conversation.
ConversationId FileWithOneMessage(const std::string& path) {
  Result<std::shared_ptr<MessageStore>> store = OpenAt(path);
  REQUIRE(store.ok());
  const ConversationId id =
      CommitOne(**store, ToPeer("alice", "bob", "key-1", "first")).message.conversation_id;
  REQUIRE(id != 0);
  return id;
}

// --- Groups, channels, receipts (conformance) ---

AppendRequest Change(ConversationOp op, ConversationId id, const UserId& actor,
                     std::vector<UserId> users = {}) {
  AppendRequest r;
  r.op = op;
  r.conversation_id = id;
  r.sender = actor;
  r.sender_device = actor + "-phone";
  r.message_id = static_cast<MessageId>(++next_message_id);
  r.spare_message_id = static_cast<MessageId>(++next_message_id);
  r.server_time_ms = 1'700'000'000'000 + next_message_id;
  r.kind = MessageKind::kSystem;
  r.users = std::move(users);
  r.max_group_members = 5;
  r.max_channel_members = 1'000'000;
  return r;
}

AppendRequest Create(ConversationKind kind, const UserId& actor, std::vector<UserId> users,
                     const std::string& title = "team") {
  AppendRequest r = Change(ConversationOp::kCreateGroup, 0, actor, std::move(users));
  r.group_kind = kind;
  r.title = title;
  return r;
}

void ResendAnsweredWhereTheSendWouldBeRefused(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  AppendResult original = CommitOne(store, ToPeer("alice", "bob", "key-1", "first"));
  REQUIRE(original.status.ok());

  // The key addressed to a new peer: the original, and no conversation with carol.
  AppendResult elsewhere = CommitOne(store, ToPeer("alice", "carol", "key-1", "to carol"));
  REQUIRE(elsewhere.status.ok());
  CHECK(elsewhere.duplicate);
  CHECK_FALSE(elsewhere.created);
  CHECK(elsewhere.message.conversation_id == original.message.conversation_id);
  CHECK(elsewhere.message.body == "first");
  Result<SyncReply> carol = SyncOf(store, "carol", {});
  REQUIRE(carol.ok());
  CHECK(carol->conversations.empty());

  // A group message resent after its sender was removed: the original, not a refusal.
  AppendResult group = CommitOne(store, Create(ConversationKind::kGroup, "bob", {"alice"}));
  REQUIRE(group.status.ok());
  const ConversationId id = group.message.conversation_id;
  AppendResult posted = CommitOne(store, ToConversation(id, "alice", "key-2", "hello team"));
  REQUIRE(posted.status.ok());
  REQUIRE(
      CommitOne(store, Change(ConversationOp::kRemoveMembers, id, "bob", {"alice"})).status.ok());
  AppendResult resent = CommitOne(store, ToConversation(id, "alice", "key-2", "hello again"));
  REQUIRE(resent.status.ok());
  CHECK(resent.duplicate);
  CHECK(resent.message.seq == posted.message.seq);
  CHECK(resent.message.body == "hello team");
  // A new key from the removed member is refused.
  CHECK(CommitOne(store, ToConversation(id, "alice", "key-3", "x")).status.code() ==
        Code::kPermissionDenied);

  // The refused duplicate insert used no seq: the next message follows the original.
  AppendResult next = CommitOne(store, ToPeer("bob", "alice", "key-b", "next"));
  REQUIRE(next.status.ok());
  CHECK(next.message.seq == original.message.seq + 1);
}
STORE_CASE(ResendAnsweredWhereTheSendWouldBeRefused,
           "a resend is answered with its original where a new send would be refused or "
           "would create a conversation")

AppendRequest ReceiptOf(ConversationId id, const UserId& user, const DeviceId& device,
                        Seq delivered, Seq read) {
  AppendRequest r = Change(ConversationOp::kReceipt, id, user);
  r.sender_device = device;
  r.delivered_seq = delivered;
  r.read_seq = read;
  return r;
}

ConversationId CreateGroupOk(MessageStore& store, const UserId& actor, std::vector<UserId> users,
                             ConversationKind kind = ConversationKind::kGroup) {
  AppendResult r = CommitOne(store, Create(kind, actor, std::move(users)));
  REQUIRE_MESSAGE(r.status.ok(), r.status.ToString());
  return r.message.conversation_id;
}

std::optional<ConversationInfo> InfoOf(MessageStore& store, const UserId& user, ConversationId id,
                                       const DeviceId& device = "") {
  SyncQuery q;
  q.user = user;
  q.device = device.empty() ? user + "-phone" : device;
  Result<SyncReply> reply = store.Sync(q);
  REQUIRE(reply.ok());
  for (const ConversationInfo& info : reply->conversations) {
    if (info.conversation_id == id) return info;
  }
  return std::nullopt;
}

void GroupCreationIsASystemMessage(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  AppendResult r =
      CommitOne(store, Create(ConversationKind::kGroup, "alice", {"bob", "carol", "bob", "alice"}));
  REQUIRE(r.status.ok());
  CHECK(r.created);
  CHECK(r.kind == ConversationKind::kGroup);
  CHECK(r.message.seq == 1);
  CHECK(r.message.kind == MessageKind::kSystem);
  CHECK(r.message.sender.empty());
  CHECK(r.message.system.type == SystemEvent::Type::kCreated);
  CHECK(r.message.system.actor == "alice");
  CHECK(r.message.system.users == std::vector<UserId>{"bob", "carol"});
  CHECK(r.message.system.title == "team");
  CHECK(r.recipients == std::vector<UserId>{"alice", "bob", "carol"});
  CHECK(r.conversation.role == Role::kAdmin);
  CHECK(r.conversation.member_count == 3);
  CHECK(r.conversation.last_seq == 1);
  const ConversationId id = r.message.conversation_id;

  std::optional<ConversationInfo> bob = InfoOf(store, "bob", id);
  REQUIRE(bob.has_value());
  CHECK(bob->kind == ConversationKind::kGroup);
  CHECK(bob->title == "team");
  CHECK(bob->role == Role::kMember);
  CHECK(bob->member_count == 3);
  // System messages are not unread: they are not somebody's message.
  CHECK(bob->unread == 0);
  Result<HistoryReply> h = HistoryOf(store, "carol", id, 0, 10);
  REQUIRE(h.ok());
  REQUIRE(h->messages.size() == 1);
  CHECK(h->messages[0].system.type == SystemEvent::Type::kCreated);
  CHECK(h->messages[0].system.users == std::vector<UserId>{"bob", "carol"});

  // The cap counts the creator: 5 allows four others.
  AppendResult big =
      CommitOne(store, Create(ConversationKind::kGroup, "alice", {"b", "c", "d", "e", "f"}));
  CHECK(big.status.code() == Code::kResourceExhausted);
  CHECK(big.status.message() == "a conversation of this kind has at most 5 members");
  AppendResult fits =
      CommitOne(store, Create(ConversationKind::kGroup, "alice", {"b", "c", "d", "e"}));
  CHECK(fits.status.ok());
  // Channels have their own cap.
  AppendResult channel =
      CommitOne(store, Create(ConversationKind::kChannel, "alice", {"b", "c", "d", "e", "f"}));
  CHECK(channel.status.ok());
  CHECK(channel.recipients == std::vector<UserId>{"alice", "b", "c", "d", "e", "f"});

  AppendResult direct = CommitOne(store, Create(ConversationKind::kDirect, "alice", {"bob"}));
  CHECK(direct.status.code() == Code::kInvalidArgument);
  AppendResult long_title =
      CommitOne(store, Create(ConversationKind::kGroup, "alice", {}, std::string(257, 't')));
  CHECK(long_title.status.code() == Code::kInvalidArgument);
  AppendResult bad_user = CommitOne(store, Create(ConversationKind::kGroup, "alice", {""}));
  CHECK(bad_user.status.code() == Code::kInvalidArgument);
}
STORE_CASE(GroupCreationIsASystemMessage, "creating a group commits a CREATED system message")

void OnlyAdminsChangeAGroup(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId id = CreateGroupOk(store, "alice", {"bob"});
  const ConversationId ab = OpenDirect(store, "alice", "bob");

  AppendRequest rename = Change(ConversationOp::kRename, id, "bob");
  rename.title = "mine";
  CHECK(CommitOne(store, rename).status.code() == Code::kPermissionDenied);
  AppendRequest set_role = Change(ConversationOp::kSetRole, id, "bob", {"bob"});
  set_role.role = Role::kAdmin;
  CHECK(CommitOne(store, set_role).status.code() == Code::kPermissionDenied);
  CHECK(CommitOne(store, Change(ConversationOp::kAddMembers, id, "bob", {"erin"})).status.code() ==
        Code::kPermissionDenied);
  CHECK(CommitOne(store, Change(ConversationOp::kRemoveMembers, id, "bob", {"alice"}))
            .status.code() == Code::kPermissionDenied);
  // A stranger and a missing conversation look the same.
  rename.sender = "mallory";
  AppendResult stranger = CommitOne(store, rename);
  rename.conversation_id = id + 1000;
  AppendResult missing = CommitOne(store, rename);
  CHECK(stranger.status.code() == Code::kPermissionDenied);
  CHECK(missing.status.code() == Code::kPermissionDenied);
  CHECK(missing.status.message() == "not a member of conversation " + std::to_string(id + 1000));
  // Direct conversations have no admins and fixed members.
  AppendRequest rename_direct = Change(ConversationOp::kRename, ab, "alice");
  rename_direct.title = "x";
  CHECK(CommitOne(store, rename_direct).status.code() == Code::kPermissionDenied);
  CHECK(CommitOne(store, Change(ConversationOp::kLeave, ab, "alice")).status.code() ==
        Code::kFailedPrecondition);
  // An admin naming a user id no member can have: INVALID_ARGUMENT, as for add and remove.
  for (const std::string& bad : {std::string(), std::string(129, 'u')}) {
    AppendRequest bad_role = Change(ConversationOp::kSetRole, id, "alice", {bad});
    bad_role.role = Role::kAdmin;
    AppendResult refused = CommitOne(store, bad_role);
    CHECK(refused.status.code() == Code::kInvalidArgument);
    CHECK(refused.status.message() == "user ids must be 1..128 bytes");
  }
  CHECK(HistoryOf(store, "bob", id, 0, 10)->messages.size() == 1);

  rename.sender = "alice";
  rename.conversation_id = id;
  rename.title = "";
  CHECK(CommitOne(store, rename).status.code() == Code::kInvalidArgument);
  rename.title = "renamed";
  AppendResult renamed = CommitOne(store, rename);
  REQUIRE(renamed.status.ok());
  CHECK(renamed.message.seq == 2);
  CHECK(renamed.message.system.type == SystemEvent::Type::kRenamed);
  CHECK(renamed.message.system.title == "renamed");
  CHECK(renamed.conversation.title == "renamed");
  CHECK(InfoOf(store, "bob", id)->title == "renamed");

  AppendResult promoted = CommitOne(store, Change(ConversationOp::kSetRole, id, "alice", {"bob"}));
  CHECK(promoted.status.code() == Code::kInvalidArgument);  // no role given
  set_role.sender = "alice";
  AppendResult ok = CommitOne(store, set_role);
  REQUIRE(ok.status.ok());
  CHECK(ok.message.system.type == SystemEvent::Type::kRoleChanged);
  CHECK(ok.message.system.users == std::vector<UserId>{"bob"});
  CHECK(ok.message.system.role == Role::kAdmin);
  CHECK(InfoOf(store, "bob", id)->role == Role::kAdmin);
  // The role a member already has: refused, and nothing is committed.
  AppendResult again = CommitOne(store, set_role);
  CHECK(again.status.code() == Code::kAlreadyExists);
  CHECK(again.status.message() == "bob is already an admin");
  CHECK(InfoOf(store, "bob", id)->last_seq == ok.message.seq);
  AppendRequest unknown = set_role;
  unknown.users = {"zed"};
  CHECK(CommitOne(store, unknown).status.code() == Code::kNotFound);

  // An admin may step down only while another admin remains.
  AppendRequest step_down = Change(ConversationOp::kSetRole, id, "bob", {"bob"});
  step_down.role = Role::kMember;
  CHECK(CommitOne(store, step_down).status.ok());
  AppendRequest last = Change(ConversationOp::kSetRole, id, "alice", {"alice"});
  last.role = Role::kMember;
  AppendResult refused = CommitOne(store, last);
  CHECK(refused.status.code() == Code::kFailedPrecondition);
  CHECK(InfoOf(store, "alice", id)->role == Role::kAdmin);
}
STORE_CASE(OnlyAdminsChangeAGroup, "only admins rename, change members and roles")

void MembersSeeTheLogFromJoinToRemoval(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId id = CreateGroupOk(store, "alice", {"bob"});
  SendMany(store, id, "alice", 3, "early");  // seqs 2..4

  AppendResult added =
      CommitOne(store, Change(ConversationOp::kAddMembers, id, "alice", {"carol", "bob"}));
  REQUIRE(added.status.ok());
  CHECK(added.message.seq == 5);
  CHECK(added.message.system.type == SystemEvent::Type::kMembersAdded);
  CHECK(added.message.system.users == std::vector<UserId>{"carol"});  // bob already is one
  CHECK(added.recipients == std::vector<UserId>{"alice", "bob", "carol"});
  CHECK(CommitOne(store, Change(ConversationOp::kAddMembers, id, "alice", {"bob"})).status.code() ==
        Code::kAlreadyExists);
  // Over the cap of 5 (alice, bob, carol + 3).
  CHECK(CommitOne(store, Change(ConversationOp::kAddMembers, id, "alice", {"x", "y", "z"}))
            .status.code() == Code::kResourceExhausted);

  SendMany(store, id, "bob", 2, "later");  // seqs 6, 7
  // carol sees the log from her join: no earlier message, and a gap below it, so a client
  // that starts from seq 0 can apply what follows.
  Result<HistoryReply> carol = HistoryOf(store, "carol", id, 0, 50);
  REQUIRE(carol.ok());
  CHECK(Seqs(carol->messages) == std::vector<Seq>{7, 6, 5});
  CHECK_FALSE(carol->has_more);
  CHECK(carol->first_seq == 5);
  Result<SyncReply> carol_sync = SyncOf(store, "carol", {});
  REQUIRE(carol_sync.ok());
  CHECK(Seqs(carol_sync->messages) == std::vector<Seq>{5, 6, 7});
  REQUIRE(carol_sync->gaps.size() == 1);
  CHECK(carol_sync->gaps[0].conversation_id == id);
  CHECK(carol_sync->gaps[0].from_seq == 1);
  CHECK(carol_sync->gaps[0].to_seq == 4);
  Result<SyncReply> carol_caught_up = SyncOf(store, "carol", {{id, 4}});
  REQUIRE(carol_caught_up.ok());
  CHECK(Seqs(carol_caught_up->messages) == std::vector<Seq>{5, 6, 7});
  CHECK(carol_caught_up->gaps.empty());
  CHECK(carol_sync->unread_total == 2);
  CHECK(InfoOf(store, "carol", id)->unread == 2);

  AppendResult removed =
      CommitOne(store, Change(ConversationOp::kRemoveMembers, id, "alice", {"carol", "nobody"}));
  REQUIRE(removed.status.ok());
  CHECK(removed.message.seq == 8);
  CHECK(removed.message.system.type == SystemEvent::Type::kMembersRemoved);
  CHECK(removed.message.system.users == std::vector<UserId>{"carol"});
  CHECK(removed.removed == std::vector<UserId>{"carol"});
  // The removed user is told of the removal.
  CHECK(removed.recipients == std::vector<UserId>{"alice", "bob", "carol"});
  CHECK(CommitOne(store, Change(ConversationOp::kRemoveMembers, id, "alice", {"nobody"}))
            .status.code() == Code::kNotFound);

  AppendResult after = CommitOne(store, ToConversation(id, "bob", "after-removal", "secret"));
  REQUIRE(after.status.ok());
  CHECK(after.recipients == std::vector<UserId>{"alice", "bob"});
  CHECK(CommitOne(store, ToConversation(id, "carol", "carol-after", "x")).status.code() ==
        Code::kPermissionDenied);
  Result<std::vector<UserId>> members = store.Members(id);
  REQUIRE(members.ok());
  CHECK(*members == std::vector<UserId>{"alice", "bob"});

  // carol reads up to her removal and no further, by History and by Sync.
  Result<HistoryReply> capped = HistoryOf(store, "carol", id, 0, 50);
  REQUIRE(capped.ok());
  CHECK(Seqs(capped->messages) == std::vector<Seq>{8, 7, 6, 5});
  Result<SyncReply> capped_sync = SyncOf(store, "carol", {{id, 6}});
  REQUIRE(capped_sync.ok());
  CHECK(Seqs(capped_sync->messages) == std::vector<Seq>{7, 8});
  REQUIRE(capped_sync->conversations.size() == 1);
  CHECK(capped_sync->conversations[0].last_seq == 8);
  CHECK(capped_sync->conversations[0].removed_at_seq == 8);
  CHECK(SyncOf(store, "carol", {{id, 8}})->messages.empty());
  ReceiptsQuery q{.user = "carol", .conversation_id = id};
  CHECK(store.Receipts(q).status().code() == Code::kPermissionDenied);
  // She may still mark read what she could read, so her unread count can reach 0; nobody else
  // is told, and nothing past her removal is marked.
  CHECK(SyncOf(store, "carol", {})->unread_total > 0);
  AppendResult read = CommitOne(store, ReceiptOf(id, "carol", "carol-phone", 100, 100));
  REQUIRE(read.status.ok());
  CHECK(read.receipt_changed);
  CHECK(read.conversation.read_seq == 8);
  CHECK(read.conversation.unread == 0);
  CHECK(read.unread_total == 0);
  CHECK(read.sender_receipt.user == "carol");
  CHECK(read.sender_receipt.read_seq == 8);
  CHECK(read.recipients == std::vector<UserId>{"carol"});
  CHECK(SyncOf(store, "carol", {})->unread_total == 0);
  Result<ReceiptsReply> members_marks = store.Receipts({.user = "bob", .conversation_id = id});
  REQUIRE(members_marks.ok());
  for (const MemberReceipt& mark : members_marks->members) CHECK(mark.user != "carol");
  CHECK(InfoOf(store, "alice", id)->member_count == 2);

  // Re-added, she sees the log from the new join on.
  REQUIRE(
      CommitOne(store, Change(ConversationOp::kAddMembers, id, "alice", {"carol"})).status.ok());
  Result<HistoryReply> again = HistoryOf(store, "carol", id, 0, 50);
  REQUIRE(again.ok());
  CHECK(Seqs(again->messages) == std::vector<Seq>{10});
  CHECK(InfoOf(store, "alice", id)->member_count == 3);
  REQUIRE(CommitOne(store, Change(ConversationOp::kLeave, id, "bob")).status.ok());
  CHECK(InfoOf(store, "alice", id)->member_count == 2);
}
STORE_CASE(MembersSeeTheLogFromJoinToRemoval,
           "members see the log from their join to their removal")

void RepliesStopAtTheirByteBound(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId ab = OpenDirect(store, "alice", "bob");  // seq 1
  const ConversationId ac = OpenDirect(store, "alice", "carol");
  for (int i = 0; i < 9; ++i) {
    CommitOne(store, ToConversation(ab, "alice", "k-" + std::to_string(i), std::string(1000, 'x')));
  }
  CommitOne(store, ToConversation(ac, "alice", "c-1", "for carol"));

  // A message costs at least its 1,000-byte body, so 4,000 bytes carry one to three of them;
  // paging from the advanced cursors brings every message once, in order.
  std::vector<Seq> got;
  Seq cursor = 0;
  int pages = 0;
  for (; pages < 20; ++pages) {
    SyncQuery q;
    q.user = "bob";
    q.device = "bob-phone";
    q.cursors = {{ab, cursor}};
    q.max_bytes = 4000;
    Result<SyncReply> page = store.Sync(q);
    REQUIRE(page.ok());
    CHECK(page->gaps.empty());
    REQUIRE_FALSE(page->messages.empty());
    CHECK(page->messages.size() <= 3);
    CHECK(page->conversations.size() == 1);
    for (const Message& m : page->messages) got.push_back(m.seq);
    cursor = page->messages.back().seq;
    if (!page->has_more) break;
  }
  CHECK(pages >= 3);
  CHECK(got == std::vector<Seq>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10});

  // A bound smaller than any message still carries one; it stops before the next
  // conversation too.
  SyncQuery tiny;
  tiny.user = "alice";
  tiny.device = "alice-phone";
  tiny.cursors = {{ab, 9}};
  tiny.max_bytes = 1;
  Result<SyncReply> one = store.Sync(tiny);
  REQUIRE(one.ok());
  CHECK(Seqs(one->messages) == std::vector<Seq>{10});
  REQUIRE(one->conversations.size() == 1);
  CHECK(one->conversations[0].conversation_id == ab);
  CHECK(one->has_more);
  tiny.cursors = {{ab, 10}};
  Result<SyncReply> next = store.Sync(tiny);
  REQUIRE(next.ok());
  REQUIRE(next->messages.size() == 1);
  CHECK(next->messages[0].conversation_id == ac);

  // History pages stop the same way, newest first, and say older ones exist.
  HistoryQuery h;
  h.user = "bob";
  h.conversation_id = ab;
  h.limit = 50;
  h.max_bytes = 1;
  Result<HistoryReply> newest = store.History(h);
  REQUIRE(newest.ok());
  CHECK(Seqs(newest->messages) == std::vector<Seq>{10});
  CHECK(newest->has_more);
  h.max_bytes = 0;
  Result<HistoryReply> all = store.History(h);
  REQUIRE(all.ok());
  CHECK(all->messages.size() == 10);
  CHECK_FALSE(all->has_more);
}
STORE_CASE(RepliesStopAtTheirByteBound, "sync replies and history pages stop at their byte bound")

// The SQLite store keeps members, memberships and last seqs between transactions: every
// change, within one batch or across batches, must show in the very next message.
void MembershipChangesShowInTheNextMessage(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId id = CreateGroupOk(store, "alice", {"bob"});
  AppendResult first = CommitOne(store, ToConversation(id, "bob", "m-1", "hi"));
  REQUIRE(first.status.ok());
  CHECK(first.recipients == std::vector<UserId>{"alice", "bob"});

  // Added and sending in the same batch.
  std::vector<AppendResult> added =
      Commit(store, {Change(ConversationOp::kAddMembers, id, "alice", {"carol"}),
                     ToConversation(id, "carol", "m-2", "I am in"),
                     ToConversation(id, "bob", "m-3", "welcome")});
  REQUIRE(added.size() == 3);
  CHECK(added[0].status.ok());
  CHECK(added[1].status.ok());
  CHECK(added[2].recipients == std::vector<UserId>{"alice", "bob", "carol"});
  CHECK(added[2].message.seq == first.message.seq + 3);

  // Removed in one batch, refused in the next; the others no longer deliver to bob.
  REQUIRE(
      CommitOne(store, Change(ConversationOp::kRemoveMembers, id, "alice", {"bob"})).status.ok());
  CHECK(CommitOne(store, ToConversation(id, "bob", "m-4", "still here?")).status.code() ==
        Code::kPermissionDenied);
  AppendResult without = CommitOne(store, ToConversation(id, "carol", "m-5", "bye bob"));
  REQUIRE(without.status.ok());
  CHECK(without.recipients == std::vector<UserId>{"alice", "carol"});

  // A promotion lets carol do what only admins may, at once.
  AppendRequest promote = Change(ConversationOp::kSetRole, id, "alice", {"carol"});
  promote.role = Role::kAdmin;
  REQUIRE(CommitOne(store, promote).status.ok());
  AppendResult readded =
      CommitOne(store, Change(ConversationOp::kAddMembers, id, "carol", {"bob"}));
  REQUIRE(readded.status.ok());
  AppendResult back = CommitOne(store, ToConversation(id, "bob", "m-6", "back"));
  REQUIRE(back.status.ok());
  CHECK(back.recipients == std::vector<UserId>{"alice", "bob", "carol"});
  CHECK(back.message.seq == readded.message.seq + 1);

  // Seqs stayed gapless through it all.
  Result<HistoryReply> h = HistoryOf(store, "alice", id, 0, 50);
  REQUIRE(h.ok());
  for (size_t i = 1; i < h->messages.size(); ++i) {
    CHECK(h->messages[i].seq + 1 == h->messages[i - 1].seq);
  }
  CHECK(h->messages.front().seq == back.message.seq);
}
STORE_CASE(MembershipChangesShowInTheNextMessage,
           "membership changes show in the very next message, in a batch and across batches")

void LastAdminLeavingPromotesTheLongestStanding(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId id = CreateGroupOk(store, "alice", {"bob"});
  REQUIRE(
      CommitOne(store, Change(ConversationOp::kAddMembers, id, "alice", {"aaron"})).status.ok());
  AppendResult left = CommitOne(store, Change(ConversationOp::kLeave, id, "alice"));
  REQUIRE(left.status.ok());
  CHECK(left.message.system.type == SystemEvent::Type::kMemberLeft);
  CHECK(left.message.system.users == std::vector<UserId>{"alice"});
  CHECK(left.removed == std::vector<UserId>{"alice"});
  // bob joined at creation, aaron later: bob becomes admin, recorded right after.
  REQUIRE(left.also.size() == 1);
  CHECK(left.also[0].seq == left.message.seq + 1);
  CHECK(left.also[0].system.type == SystemEvent::Type::kRoleChanged);
  CHECK(left.also[0].system.users == std::vector<UserId>{"bob"});
  CHECK(left.also[0].system.role == Role::kAdmin);
  CHECK(left.conversation.removed_at_seq == left.message.seq);
  Result<ReceiptsReply> receipts = store.Receipts({.user = "aaron", .conversation_id = id});
  REQUIRE(receipts.ok());
  REQUIRE(receipts->members.size() == 2);
  CHECK(receipts->members[0].user == "aaron");
  CHECK(receipts->members[0].role == Role::kMember);
  CHECK(receipts->members[1].user == "bob");
  CHECK(receipts->members[1].role == Role::kAdmin);
  // A member leaving changes no roles.
  AppendResult aaron = CommitOne(store, Change(ConversationOp::kLeave, id, "aaron"));
  REQUIRE(aaron.status.ok());
  CHECK(aaron.also.empty());
  CHECK(CommitOne(store, Change(ConversationOp::kLeave, id, "aaron")).status.code() ==
        Code::kPermissionDenied);
}
STORE_CASE(LastAdminLeavingPromotesTheLongestStanding,
           "the last admin leaving promotes the longest-standing member")

void ReceiptsAreMonotonicPerUserAndExact(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId id = CreateGroupOk(store, "alice", {"bob", "carol"});
  SendMany(store, id, "bob", 1, "b");                           // seq 2
  SendMany(store, id, "alice", 4, "a");                         // seqs 3..6
  const ConversationId ab = OpenDirect(store, "alice", "bob");  // one message from alice

  CHECK(InfoOf(store, "bob", id, "bob-phone")->unread == 4);
  CHECK(SyncOf(store, "bob", {})->unread_total == 5);

  AppendResult r = CommitOne(store, ReceiptOf(id, "bob", "bob-phone", 3, 3));
  REQUIRE(r.status.ok());
  CHECK(r.receipt_changed);
  CHECK(r.conversation.read_seq == 3);
  CHECK(r.conversation.delivered_seq == 3);
  CHECK(r.conversation.unread == 3);
  CHECK(r.unread_total == 4);
  CHECK(r.sender_receipt.user == "bob");
  CHECK(r.sender_receipt.read_seq == 3);
  CHECK(r.read_all_seq == 0);  // alice and carol have read nothing
  CHECK(r.recipients == std::vector<UserId>{"alice", "bob", "carol"});

  // Read on another device is read for the user; delivered stays per device; nothing moves
  // backwards, nothing passes last_seq.
  AppendResult tablet = CommitOne(store, ReceiptOf(id, "bob", "bob-tablet", 100, 1));
  REQUIRE(tablet.status.ok());
  CHECK(tablet.conversation.read_seq == 3);
  CHECK(tablet.conversation.delivered_seq == 6);
  CHECK(tablet.conversation.unread == 3);
  std::optional<ConversationInfo> phone = InfoOf(store, "bob", id, "bob-phone");
  CHECK(phone->read_seq == 3);
  CHECK(phone->delivered_seq == 3);
  CHECK(phone->unread == 3);
  AppendResult back = CommitOne(store, ReceiptOf(id, "bob", "bob-phone", 1, 1));
  CHECK(back.status.ok());
  CHECK_FALSE(back.receipt_changed);
  CHECK(back.conversation.read_seq == 3);
  // Delivered moves from the device's own mark (3), not from the tablet's (6).
  AppendResult phone_more = CommitOne(store, ReceiptOf(id, "bob", "bob-phone", 4, 3));
  CHECK_FALSE(phone_more.receipt_changed);
  CHECK(phone_more.conversation.delivered_seq == 4);
  CHECK(InfoOf(store, "bob", id, "bob-phone")->delivered_seq == 4);

  AppendResult all = CommitOne(store, ReceiptOf(id, "bob", "bob-tablet", 6, 6));
  CHECK(all.conversation.unread == 0);
  CHECK(all.unread_total == 1);
  CHECK(InfoOf(store, "bob", id, "bob-phone")->unread == 0);
  CHECK(CommitOne(store, ReceiptOf(ab, "bob", "bob-phone", 1, 1)).unread_total == 0);
  CHECK(SyncOf(store, "bob", {})->unread_total == 0);

  REQUIRE(CommitOne(store, ReceiptOf(id, "alice", "alice-phone", 6, 4)).status.ok());
  AppendResult carol = CommitOne(store, ReceiptOf(id, "carol", "carol-phone", 5, 2));
  CHECK(carol.delivered_all_seq == 5);
  CHECK(carol.read_all_seq == 2);
  Result<ReceiptsReply> page = store.Receipts({.user = "carol", .conversation_id = id});
  REQUIRE(page.ok());
  REQUIRE(page->members.size() == 3);
  CHECK(page->members[0].user == "alice");
  CHECK(page->members[0].delivered_seq == 6);
  CHECK(page->members[0].read_seq == 4);
  CHECK(page->members[1].read_seq == 6);
  CHECK(page->members[2].read_seq == 2);
  CHECK(page->role == Role::kMember);
  CHECK(page->kind == ConversationKind::kGroup);
  CHECK(store.Receipts({.user = "mallory", .conversation_id = id}).status().code() ==
        Code::kPermissionDenied);
  CHECK(CommitOne(store, ReceiptOf(id, "mallory", "m", 1, 1)).status.code() ==
        Code::kPermissionDenied);
}
STORE_CASE(ReceiptsAreMonotonicPerUserAndExact,
           "receipts are monotonic, per user for read, and unread counts are exact")

// The lowest watermarks over the current members, from the members' page (GetReceipts), each
// member's marks counted from the seq before it joined (`joined`, the seq that added it).
std::pair<Seq, Seq> LowestOf(MessageStore& store, const UserId& asking, ConversationId id,
                             const std::map<UserId, Seq>& joined) {
  Result<ReceiptsReply> page = store.Receipts({.user = asking, .conversation_id = id});
  REQUIRE(page.ok());
  Seq delivered = std::numeric_limits<Seq>::max();
  Seq read = std::numeric_limits<Seq>::max();
  for (const MemberReceipt& member : page->members) {
    const Seq before_join = joined.at(member.user) - 1;
    delivered = std::min(delivered, std::max(member.delivered_seq, before_join));
    read = std::min(read, std::max(member.read_seq, before_join));
  }
  return {delivered, read};
}

void LowestWatermarksFollowEveryReceipt(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  constexpr int kUsers = 9;
  auto name = [](int i) { return "u" + std::to_string(i); };
  std::vector<UserId> invited;
  for (int i = 1; i < kUsers; ++i) invited.push_back(name(i));
  AppendRequest create = Create(ConversationKind::kGroup, name(0), invited);
  create.max_group_members = kUsers;
  AppendResult created = CommitOne(store, create);
  REQUIRE(created.status.ok());
  const ConversationId id = created.message.conversation_id;
  SendMany(store, id, name(0), 12, "m");
  std::vector<bool> member(kUsers, true);
  std::map<UserId, Seq> joined;  // the seq that added each member: the creation, at first
  for (int i = 0; i < kUsers; ++i) joined[name(i)] = 1;
  std::mt19937 random(20261207);
  int moves = 0;
  std::pair<Seq, Seq> told{0, 0};  // what the members heard of the lowest marks (0: nothing)
  for (int step = 0; step < 600; ++step) {
    const int roll = static_cast<int>(random() % 100);
    const int user = static_cast<int>(random() % kUsers);
    if (roll < 4 && user != 0) {
      // Members come and go (u0, the admin, stays). A member added counts from the seq before
      // its join, so the lowest marks never fall: nothing told is taken back.
      AppendRequest change =
          Change(member[user] ? ConversationOp::kRemoveMembers : ConversationOp::kAddMembers, id,
                 name(0), {name(user)});
      change.max_group_members = kUsers;
      AppendResult changed = CommitOne(store, change);
      REQUIRE(changed.status.ok());
      if (!member[user]) joined[name(user)] = changed.message.seq;
      member[user] = !member[user];
      continue;
    }
    if (roll < 8) {
      SendMany(store, id, name(0), 1, "more-" + std::to_string(step));
      continue;
    }
    if (!member[user]) continue;
    const Seq last = InfoOf(store, name(0), id)->last_seq;
    const Seq delivered = random() % (last + 2);
    const Seq read = random() % (delivered + 1);
    const std::string device = name(user) + (random() % 2 == 0 ? "-phone" : "-tablet");
    AppendRequest receipt = ReceiptOf(id, name(user), device, delivered, read);
    receipt.receipt_update_max_members = 4;  // told every move only while at most 4 are left
    AppendResult r = CommitOne(store, receipt);
    REQUIRE(r.status.ok());
    const std::pair<Seq, Seq> after = LowestOf(store, name(0), id, joined);
    CAPTURE(step);
    REQUIRE(r.delivered_all_seq == after.first);
    REQUIRE(r.read_all_seq == after.second);
    CHECK(after.first >= told.first);
    CHECK(after.second >= told.second);
    // News: above what the members heard last (each mark the highest they heard).
    const bool news = after.first > told.first || after.second > told.second;
    CHECK(r.all_seq_moved == news);
    if (news) {
      told = {std::max(after.first, told.first), std::max(after.second, told.second)};
    }
    moves += r.all_seq_moved ? 1 : 0;
    const auto members = static_cast<size_t>(std::count(member.begin(), member.end(), true));
    if (r.all_seq_moved || (r.receipt_changed && members <= 4)) {
      CHECK(r.recipients.size() == members);
    } else {
      CHECK(r.recipients.empty());
    }
  }
  CHECK(moves > 10);
  // The lowest marks reached the end of the conversation once every member read it all.
  const Seq last = InfoOf(store, name(0), id)->last_seq;
  AppendResult r;
  for (int user = 0; user < kUsers; ++user) {
    if (!member[user]) continue;
    AppendRequest receipt = ReceiptOf(id, name(user), name(user) + "-phone", last, last);
    receipt.receipt_update_max_members = 4;
    r = CommitOne(store, receipt);
    REQUIRE(r.status.ok());
  }
  CHECK(r.delivered_all_seq == last);
  CHECK(r.read_all_seq == last);
  CHECK(LowestOf(store, name(0), id, joined) == std::pair<Seq, Seq>{last, last});
}
STORE_CASE(LowestWatermarksFollowEveryReceipt,
           "the lowest watermarks over all members follow every receipt and membership change")

// A receipt by `user`'s phone whose other members are told every move only in groups of at
// most `max_members`.
AppendResult CommitReceipt(MessageStore& store, ConversationId id, const UserId& user,
                           Seq delivered, Seq read, uint32_t max_members) {
  AppendRequest receipt = ReceiptOf(id, user, user + "-phone", delivered, read);
  receipt.receipt_update_max_members = max_members;
  AppendResult result = CommitOne(store, receipt);
  REQUIRE_MESSAGE(result.status.ok(), result.status.ToString());
  return result;
}

void SmallGroupsListEveryMemberForEveryMove(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId id = CreateGroupOk(store, "alice", {"bob", "carol"});
  SendMany(store, id, "alice", 3, "a");
  // The first receipt leaves the lowest marks at 0, where every member starts: no news, and
  // over the limit (2) nobody else is told.
  AppendResult first = CommitReceipt(store, id, "alice", 4, 4, 2);
  CHECK(first.receipt_changed);
  CHECK_FALSE(first.all_seq_moved);
  CHECK(first.recipients.empty());
  // bob moves while carol stays at 0: the lowest marks stay, and a group of three is still told.
  AppendResult told = CommitReceipt(store, id, "bob", 2, 1, 3);
  CHECK_FALSE(told.all_seq_moved);
  CHECK(told.recipients == std::vector<UserId>{"alice", "bob", "carol"});
  // The same move in a group over the limit is told to nobody else.
  AppendResult quiet = CommitReceipt(store, id, "bob", 3, 2, 2);
  CHECK(quiet.receipt_changed);
  CHECK_FALSE(quiet.all_seq_moved);
  CHECK(quiet.recipients.empty());
  CHECK(quiet.sender_receipt.read_seq == 2);
  // carol leaves: the lowest marks are bob's now, above what the members heard. The next
  // receipt tells them, even one that moves nothing of its sender's.
  REQUIRE(CommitOne(store, Change(ConversationOp::kLeave, id, "carol")).status.ok());
  AppendResult after_leave = CommitReceipt(store, id, "bob", 3, 2, 1);
  CHECK_FALSE(after_leave.receipt_changed);
  CHECK(after_leave.all_seq_moved);
  CHECK(after_leave.delivered_all_seq == 3);
  CHECK(after_leave.read_all_seq == 2);
  CHECK(after_leave.recipients == std::vector<UserId>{"alice", "bob"});
  // Told once: the same receipt again is no news.
  AppendResult repeat = CommitReceipt(store, id, "bob", 3, 2, 1);
  CHECK_FALSE(repeat.all_seq_moved);
  CHECK(repeat.recipients.empty());

  // A direct conversation tells every move whatever the limit: alice's second move leaves the
  // lowest marks at bob's (0), no news, and bob is told all the same.
  const ConversationId ab = OpenDirect(store, "alice", "bob");
  SendMany(store, ab, "bob", 4, "b");                                     // seqs 2..5
  CHECK_FALSE(CommitReceipt(store, ab, "alice", 3, 3, 1).all_seq_moved);  // bob's 0 stays
  AppendResult peer = CommitReceipt(store, ab, "alice", 5, 5, 1);
  CHECK(peer.receipt_changed);
  CHECK_FALSE(peer.all_seq_moved);
  CHECK(peer.recipients == std::vector<UserId>{"alice", "bob"});
}
STORE_CASE(SmallGroupsListEveryMemberForEveryMove,
           "direct conversations and groups up to the limit list every member for every move, "
           "larger ones only news of the lowest marks")

// A cursor at `seq` that names the lowest marks the client knows (std::nullopt: names none).
Cursor Knowing(ConversationId id, Seq seq, std::optional<Seq> delivered_all,
               std::optional<Seq> read_all) {
  Cursor cursor;
  cursor.conversation_id = id;
  cursor.seq = seq;
  cursor.delivered_all_seq = delivered_all;
  cursor.read_all_seq = read_all;
  return cursor;
}

// The ids of the conversations a Sync reply lists.
std::vector<ConversationId> Listed(const Result<SyncReply>& reply) {
  REQUIRE_MESSAGE(reply.ok(), reply.status().ToString());
  std::vector<ConversationId> out;
  for (const ConversationInfo& info : reply->conversations) out.push_back(info.conversation_id);
  return out;
}

// The lowest marks `user` is told of conversation `id`, as a Sync describes it.
std::pair<Seq, Seq> ToldOf(MessageStore& store, const UserId& user, ConversationId id) {
  std::optional<ConversationInfo> info = InfoOf(store, user, id);
  REQUIRE(info.has_value());
  return {info->delivered_all_seq, info->read_all_seq};
}

void DescribeAndSyncCarryTheLowestMarks(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  using Marks = std::pair<Seq, Seq>;

  // A direct conversation: alice's message (seq 1), which bob has got but not read.
  const ConversationId ab = OpenDirect(store, "alice", "bob");
  CHECK(ToldOf(store, "alice", ab) == Marks{0, 0});
  REQUIRE(CommitReceipt(store, ab, "alice", 1, 1, 8).status.ok());
  REQUIRE(CommitReceipt(store, ab, "bob", 1, 0, 8).all_seq_moved);
  CHECK(ToldOf(store, "alice", ab) == Marks{1, 0});
  CHECK(ToldOf(store, "bob", ab) == Marks{1, 0});
  // With nothing new, a cursor that names lower marks gets the state alone; one that names the
  // current marks, or none (a client that predates them), gets nothing.
  Result<SyncReply> behind = SyncOf(store, "alice", {Knowing(ab, 1, 0, 0)});
  CHECK(Listed(behind) == std::vector<ConversationId>{ab});
  CHECK(behind->messages.empty());
  CHECK(behind->gaps.empty());
  CHECK_FALSE(behind->has_more);
  CHECK(behind->conversations.at(0).delivered_all_seq == 1);
  CHECK(behind->conversations.at(0).read_all_seq == 0);
  CHECK(Listed(SyncOf(store, "alice", {Knowing(ab, 1, 1, 0)})).empty());
  CHECK(Listed(SyncOf(store, "alice", {Knowing(ab, 1, std::nullopt, std::nullopt)})).empty());
  CHECK(Listed(SyncOf(store, "alice", {Knowing(ab, 1, 5, 5)})).empty());  // knows more
  // bob reads it: a device of alice's that knew it delivered learns it is read.
  REQUIRE(CommitReceipt(store, ab, "bob", 1, 1, 8).all_seq_moved);
  Result<SyncReply> read = SyncOf(store, "alice", {Knowing(ab, 1, 1, 0)});
  CHECK(Listed(read) == std::vector<ConversationId>{ab});
  CHECK(read->conversations.at(0).read_all_seq == 1);
  // Only the mark the cursor names counts; a repeated cursor's highest claims win.
  CHECK(Listed(SyncOf(store, "alice", {Knowing(ab, 1, std::nullopt, 0)})) ==
        std::vector<ConversationId>{ab});
  CHECK(Listed(SyncOf(store, "alice", {Knowing(ab, 1, 1, std::nullopt)})).empty());
  CHECK(Listed(SyncOf(store, "alice", {Knowing(ab, 1, 1, 0), Knowing(ab, 1, 0, 1)})).empty());

  // A small group: the lowest marks are carol's until she reads everything.
  const ConversationId group = CreateGroupOk(store, "alice", {"bob", "carol"});
  SendMany(store, group, "alice", 2, "g");  // seqs 2, 3
  REQUIRE(CommitReceipt(store, group, "alice", 3, 3, 8).status.ok());
  REQUIRE(CommitReceipt(store, group, "bob", 3, 3, 8).status.ok());
  REQUIRE(CommitReceipt(store, group, "carol", 2, 1, 8).status.ok());
  for (const UserId user : {"alice", "bob", "carol"}) {
    CAPTURE(user);
    CHECK(ToldOf(store, user, group) == Marks{2, 1});
  }
  CHECK(Listed(SyncOf(store, "alice", {Knowing(ab, 1, 1, 1), Knowing(group, 3, 2, 0)})) ==
        std::vector<ConversationId>{group});
  CHECK(Listed(SyncOf(store, "alice", {Knowing(ab, 1, 1, 1), Knowing(group, 3, 2, 1)})).empty());
  REQUIRE(CommitReceipt(store, group, "carol", 3, 3, 8).all_seq_moved);
  CHECK(ToldOf(store, "bob", group) == Marks{3, 3});
  // A removed member is told nothing of the members any more.
  REQUIRE(CommitOne(store, Change(ConversationOp::kRemoveMembers, group, "alice", {"carol"}))
              .status.ok());
  CHECK(ToldOf(store, "carol", group) == Marks{0, 0});
  CHECK(Listed(SyncOf(store, "carol", {Knowing(group, 4, 0, 0)})).empty());  // removed at 4
  CHECK(ToldOf(store, "alice", group) == Marks{3, 3});

  // A channel keeps none.
  const ConversationId channel = CreateGroupOk(store, "owner", {"m1"}, ConversationKind::kChannel);
  SendMany(store, channel, "owner", 1, "c");  // seq 2
  REQUIRE(CommitReceipt(store, channel, "owner", 2, 2, 8).status.ok());
  REQUIRE(CommitReceipt(store, channel, "m1", 2, 2, 8).status.ok());
  CHECK(ToldOf(store, "m1", channel) == Marks{0, 0});
  CHECK(Listed(SyncOf(store, "m1", {Knowing(channel, 2, 0, 0)})).empty());
}
STORE_CASE(DescribeAndSyncCarryTheLowestMarks,
           "Describe and Sync carry the lowest marks as told, and Sync lists a state whose "
           "marks the cursor lacks")

// What a client holds of a conversation while it follows Sync pages: its cursor (the highest
// seq it holds) and the lowest marks it was told, both named in its next Sync.
struct Held {
  Seq seq = 0;
  Seq delivered_all = 0;
  Seq read_all = 0;
};

// A Sync cut by its byte bound (or its limit) while conversations are due for their lowest
// marks alone and others for their messages: following the pages with the cursors a client then
// holds lists each state once, brings every message once, and ends.
void StateOnlyListingsAcrossCuts(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const std::string big(600, 'x');
  std::map<ConversationId, Held> start;
  std::map<ConversationId, std::vector<Seq>> missing;  // the messages "me" has not got
  std::vector<ConversationId> alone;                   // due for their marks alone
  int peers = 0;
  // A direct conversation whose one message, me's, the peer has read: told 1 and 1.
  auto read_by_peer = [&] {
    const UserId peer = "p" + std::to_string(peers++);
    const ConversationId id = OpenDirect(store, "me", peer);
    CommitReceipt(store, id, "me", 1, 1, 8);
    REQUIRE(CommitReceipt(store, id, peer, 1, 1, 8).all_seq_moved);
    return std::pair{id, peer};
  };
  // Large messages from `peer` that "me" has not got.
  auto post = [&](ConversationId id, const UserId& peer, int n) {
    for (int i = 0; i < n; ++i) {
      AppendResult r =
          CommitOne(store, ToConversation(id, peer, "big-" + std::to_string(++peers), big));
      REQUIRE(r.status.ok());
      missing[id].push_back(r.message.seq);
    }
  };
  auto due_alone = [&](Seq delivered_all, Seq read_all) {
    const ConversationId id = read_by_peer().first;
    start[id] = {1, delivered_all, read_all};
    alone.push_back(id);
  };
  auto with_messages = [&] {
    const UserId peer = "q" + std::to_string(peers++);
    const ConversationId id = OpenDirect(store, peer, "me");
    missing[id].push_back(1);
    post(id, peer, 4);
    start[id] = {0, 0, 0};
  };
  // Ids in this order: states alone before, between and after the conversations with messages.
  due_alone(0, 0);
  with_messages();
  due_alone(1, 0);  // knows it delivered, not read
  due_alone(0, 0);
  with_messages();
  // Due for both: its marks rose and it has messages.
  const auto [both, both_peer] = read_by_peer();
  post(both, both_peer, 4);
  start[both] = {1, 0, 0};
  // Nothing due: the client knows the marks and holds every message.
  const ConversationId quiet = read_by_peer().first;
  start[quiet] = {1, 1, 1};
  for (int i = 0; i < 3; ++i) due_alone(0, 0);
  with_messages();

  for (const uint64_t max_bytes : {uint64_t{1}, uint64_t{1500}, uint64_t{4000}, uint64_t{0}}) {
    for (const uint32_t limit : {2u, 500u}) {
      CAPTURE(max_bytes);
      CAPTURE(limit);
      std::map<ConversationId, Held> held = start;
      std::map<ConversationId, int> listings;
      std::map<ConversationId, std::vector<Seq>> got;
      auto query = [&] {
        SyncQuery q;
        q.user = "me";
        q.device = "me-phone";
        for (const auto& [id, h] : held) {
          q.cursors.push_back(Knowing(id, h.seq, h.delivered_all, h.read_all));
        }
        q.limit = limit;
        q.catchup_max = 1000;
        q.max_bytes = max_bytes;
        return q;
      };
      bool more = true;
      int pages = 0;
      while (more) {
        REQUIRE(++pages <= 60);
        Result<SyncReply> page = store.Sync(query());
        REQUIRE_MESSAGE(page.ok(), page.status().ToString());
        CHECK(page->gaps.empty());
        for (const Message& m : page->messages) {
          got[m.conversation_id].push_back(m.seq);
          held[m.conversation_id].seq = m.seq;
        }
        for (const ConversationInfo& info : page->conversations) {
          ++listings[info.conversation_id];
          Held& h = held[info.conversation_id];
          h.delivered_all = std::max(h.delivered_all, info.delivered_all_seq);
          h.read_all = std::max(h.read_all, info.read_all_seq);
        }
        more = page->has_more;
      }
      for (const ConversationId id : alone) {
        CAPTURE(id);
        CHECK(listings[id] == 1);
        CHECK_FALSE(got.contains(id));
        CHECK(held[id].delivered_all == 1);
        CHECK(held[id].read_all == 1);
      }
      CHECK(listings[quiet] == 0);
      CHECK(got == missing);
      CHECK(held[both].read_all == 1);
      // The client is up to date: the next Sync has nothing for it.
      Result<SyncReply> after = store.Sync(query());
      REQUIRE(after.ok());
      CHECK(after->conversations.empty());
      CHECK(after->messages.empty());
      CHECK_FALSE(after->has_more);
    }
  }
}
STORE_CASE(StateOnlyListingsAcrossCuts,
           "a Sync cut by its byte bound or limit lists each state due for its lowest marks "
           "once across the pages, and ends")

// A member added to a group counts in the lowest marks from the seq before its join: what
// came before was never its to get or read. Its arrival takes back nothing the members were
// told of earlier messages, a later message is not read by all until it has read it, and a
// receipt that completes the earlier messages after its join tells the members so.
void AddedMemberCountsFromItsJoin(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  using Marks = std::pair<Seq, Seq>;
  const ConversationId id = CreateGroupOk(store, "alice", {"bob", "carol"});  // seq 1
  SendMany(store, id, "alice", 3, "a");                                       // seqs 2..4
  for (const UserId user : {"alice", "bob", "carol"}) CommitReceipt(store, id, user, 4, 4, 8);
  REQUIRE(ToldOf(store, "alice", id) == Marks{4, 4});

  // dave joins at seq 5, with no receipt yet.
  AppendResult added = CommitOne(store, Change(ConversationOp::kAddMembers, id, "alice", {"dave"}));
  REQUIRE(added.status.ok());
  REQUIRE(added.message.seq == 5);
  CHECK(added.conversation.delivered_all_seq == 4);
  CHECK(added.conversation.read_all_seq == 4);
  CHECK(ToldOf(store, "alice", id) == Marks{4, 4});
  CHECK(ToldOf(store, "dave", id) == Marks{4, 4});
  // alice's device, which knows 4 and 4, gets seq 5 with the marks where they were.
  Result<SyncReply> joined = SyncOf(store, "alice", {Knowing(id, 4, 4, 4)});
  CHECK(Listed(joined) == std::vector<ConversationId>{id});
  CHECK(Seqs(joined->messages) == std::vector<Seq>{5});
  CHECK(joined->conversations.at(0).delivered_all_seq == 4);
  CHECK(joined->conversations.at(0).read_all_seq == 4);

  // alice posts seq 6 and everybody but dave reads it: what alice hears of each receipt (a
  // small group is told every move) keeps seqs up to 4 read and seq 6 neither delivered to
  // nor read by all.
  SendMany(store, id, "alice", 1, "b");
  for (const UserId user : {"alice", "bob", "carol"}) {
    CAPTURE(user);
    AppendResult r = CommitReceipt(store, id, user, 6, 6, 8);
    CHECK(r.delivered_all_seq == 4);
    CHECK(r.read_all_seq == 4);
    CHECK_FALSE(r.all_seq_moved);
    CHECK(r.conversation.delivered_all_seq == 4);
    CHECK(r.conversation.read_all_seq == 4);
  }
  CHECK(ToldOf(store, "alice", id) == Marks{4, 4});
  CHECK(Listed(SyncOf(store, "alice", {Knowing(id, 6, 4, 4)})).empty());

  // dave's device gets seqs 5 and 6: seq 6 is delivered to all, not read by all.
  AppendResult got = CommitReceipt(store, id, "dave", 6, 0, 8);
  CHECK(got.all_seq_moved);
  CHECK(got.delivered_all_seq == 6);
  CHECK(got.read_all_seq == 4);
  CHECK(ToldOf(store, "alice", id) == Marks{6, 4});
  // He reads his addition (seq 5), then seq 6: only then is alice's message read by all.
  AppendResult addition = CommitReceipt(store, id, "dave", 6, 5, 8);
  CHECK(addition.all_seq_moved);
  CHECK(addition.read_all_seq == 5);
  CHECK(ToldOf(store, "alice", id) == Marks{6, 5});
  Result<SyncReply> behind = SyncOf(store, "alice", {Knowing(id, 6, 6, 4)});
  CHECK(Listed(behind) == std::vector<ConversationId>{id});
  CHECK(behind->conversations.at(0).read_all_seq == 5);
  CHECK(CommitReceipt(store, id, "dave", 6, 6, 8).all_seq_moved);
  CHECK(ToldOf(store, "alice", id) == Marks{6, 6});

  // bob reads alice's last message just after erin joined: every member that could ever read
  // it has, and alice's device that knew it unread learns it.
  const ConversationId late = CreateGroupOk(store, "alice", {"bob", "carol"});  // seq 1
  SendMany(store, late, "alice", 2, "c");                                       // seqs 2, 3
  CommitReceipt(store, late, "alice", 3, 3, 1);
  CommitReceipt(store, late, "carol", 3, 3, 1);
  CommitReceipt(store, late, "bob", 3, 2, 1);
  REQUIRE(ToldOf(store, "alice", late) == Marks{3, 2});
  REQUIRE(
      CommitOne(store, Change(ConversationOp::kAddMembers, late, "alice", {"erin"})).status.ok());
  AppendResult completed = CommitReceipt(store, late, "bob", 3, 3, 1);
  CHECK(completed.all_seq_moved);
  CHECK(completed.read_all_seq == 3);
  CHECK(completed.recipients == std::vector<UserId>{"alice", "bob", "carol", "erin"});
  CHECK(ToldOf(store, "alice", late) == Marks{3, 3});
  Result<SyncReply> learned =
      SyncOf(store, "alice", {Knowing(id, 6, 6, 6), Knowing(late, 4, 3, 2)});
  CHECK(Listed(learned) == std::vector<ConversationId>{late});
  CHECK(learned->messages.empty());
  CHECK(learned->conversations.at(0).read_all_seq == 3);

  // The same when the member that held the lowest marks leaves and another joins: the next
  // receipt tells the members the marks of those who stayed.
  const ConversationId swap = CreateGroupOk(store, "alice", {"bob", "carol"});  // seq 1
  SendMany(store, swap, "alice", 2, "d");                                       // seqs 2, 3
  CommitReceipt(store, swap, "alice", 3, 3, 1);
  CommitReceipt(store, swap, "bob", 3, 3, 1);
  CommitReceipt(store, swap, "carol", 3, 1, 1);
  REQUIRE(ToldOf(store, "alice", swap) == Marks{3, 1});
  REQUIRE(CommitOne(store, Change(ConversationOp::kLeave, swap, "carol")).status.ok());  // seq 4
  REQUIRE(
      CommitOne(store, Change(ConversationOp::kAddMembers, swap, "alice", {"erin"})).status.ok());
  AppendResult next = CommitReceipt(store, swap, "bob", 5, 5, 1);
  CHECK(next.all_seq_moved);
  CHECK(next.read_all_seq == 3);
  CHECK(ToldOf(store, "alice", swap) == Marks{3, 3});
}
STORE_CASE(AddedMemberCountsFromItsJoin,
           "a member added to a group counts in the lowest marks from the seq before its join")

// The unread count of each member, as Sync reports it.
uint64_t UnreadOf(MessageStore& store, const UserId& user, ConversationId id) {
  std::optional<ConversationInfo> info = InfoOf(store, user, id);
  REQUIRE(info.has_value());
  return info->unread;
}

// Deletes the conversation's `n` oldest messages (retention of 1 ms, seen from far ahead).
void DeleteOldest(MessageStore& store, uint32_t n) {
  Result<SweepResult> swept = store.DeleteExpired({.now_ms = int64_t{1} << 50,
                                                   .default_retention_ms = 1,
                                                   .max_messages = n,
                                                   .resend_window_ms = 0});
  REQUIRE(swept.ok());
  REQUIRE(swept->deleted == n);
}

// Every conversation of `user` as a Sync from nothing describes it: one message of each at most
// (the rest a gap), so every one is listed. `total`, if given, gets the reply's unread total.
std::map<ConversationId, ConversationInfo> DescribedOf(MessageStore& store, const UserId& user,
                                                       uint64_t* total = nullptr) {
  Result<SyncReply> reply = SyncOf(store, user, {}, /*limit=*/100'000, /*catchup_max=*/1);
  REQUIRE(reply.ok());
  REQUIRE_FALSE(reply->has_more);
  std::map<ConversationId, ConversationInfo> out;
  for (ConversationInfo& info : reply->conversations) out[info.conversation_id] = std::move(info);
  if (total != nullptr) *total = reply->unread_total;
  return out;
}

// The badge PushTargets gives each of `users` is its unread count in each of its conversations,
// as Sync describes them, summed (SQLite counts it without describing them).
void CheckBadges(MessageStore& store, const std::vector<UserId>& users) {
  Result<std::vector<PushTarget>> targets = store.PushTargets(users);
  REQUIRE(targets.ok());
  REQUIRE(targets->size() == users.size());
  for (const PushTarget& target : *targets) {
    uint64_t sync_total = 0;
    uint64_t described = 0;
    for (const auto& [id, info] : DescribedOf(store, target.user, &sync_total)) {
      described += info.unread;
    }
    CHECK(sync_total == described);
    CHECK_MESSAGE(target.unread_total == described, target.user);
  }
}

// A receipt's reply carries the user's unread total over all of its conversations; the SQLite
// writer keeps per-conversation counts between receipts and counts again only where the
// conversation's stamp changed. The total must stay what a Sync computes from scratch, through
// messages, the user's own messages, receipts in other conversations and from other devices and
// members, batches of a receipt and a message, membership changes, new conversations and
// retention. After every step each user's push badge must be its conversations' counts summed:
// in direct conversations, groups and channels, with messages before a join and after a
// removal (a member counts from its join up to its removal), the user's own messages and
// retention.
void ReceiptUnreadTotalsStayExact(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  std::vector<ConversationId> conversations;
  for (int i = 0; i < 4; ++i)
    conversations.push_back(OpenDirect(store, "peer" + std::to_string(i), "me"));
  for (int i = 0; i < 3; ++i) {
    conversations.push_back(CreateGroupOk(store, "owner", {"me", "peer" + std::to_string(i)}));
  }
  for (int i = 0; i < 2; ++i) {
    conversations.push_back(CreateGroupOk(store, "owner", {"me", "peer" + std::to_string(i)},
                                          ConversationKind::kChannel));
  }
  // "nobody" has no conversation: a badge of 0.
  const std::vector<UserId> badged = {"me", "owner", "peer0", "peer1", "peer2", "nobody"};
  // Who else writes in a conversation of "me"'s: the peer of a direct one, else the owner (also
  // while "me" is not a member).
  auto writer_of = [](const ConversationInfo& info) -> UserId {
    return info.kind == ConversationKind::kDirect ? info.peer : "owner";
  };
  std::mt19937 random(7122026);
  int checked = 0;
  for (int step = 0; step < 400; ++step) {
    CAPTURE(step);
    CheckBadges(store, badged);
    const std::map<ConversationId, ConversationInfo> mine = DescribedOf(store, "me");
    const ConversationId id = conversations[random() % conversations.size()];
    const ConversationInfo& info = mine.at(id);
    const int roll = static_cast<int>(random() % 100);
    if (roll < 35) {
      SendMany(store, id, writer_of(info), 1 + static_cast<int>(random() % 3),
               "w" + std::to_string(step));
      continue;
    }
    if (roll < 42) {
      if (info.removed_at_seq == 0) SendMany(store, id, "me", 1, "me" + std::to_string(step));
      continue;
    }
    if (roll < 46) {
      // "me" leaves or comes back to a group or channel.
      if (info.kind == ConversationKind::kDirect) continue;
      const ConversationOp op =
          info.removed_at_seq == 0 ? ConversationOp::kRemoveMembers : ConversationOp::kAddMembers;
      REQUIRE(CommitOne(store, Change(op, id, "owner", {"me"})).status.ok());
      continue;
    }
    if (roll < 49) {
      // Retention deletes from the lowest conversation on, through what users have not read.
      DeleteOldest(store, 1 + static_cast<uint32_t>(random() % 8));
      continue;
    }
    if (roll < 52) {
      // A conversation "me" was never in: a new peer's first message, a new group, or a group or
      // channel with messages before "me" is added.
      const std::string n = std::to_string(conversations.size());
      // Peers named to sort before and after "me" (direct rows keep the pair in order).
      if (step % 4 == 0) {
        conversations.push_back(OpenDirect(store, "a-new" + n, "me"));
      } else if (step % 4 == 1) {
        conversations.push_back(OpenDirect(store, "new" + n, "me"));
      } else if (step % 4 == 2) {
        conversations.push_back(CreateGroupOk(store, "owner", {"me"}));
        SendMany(store, conversations.back(), "owner", 2, "new" + n);
      } else {
        const ConversationKind made =
            step % 8 == 3 ? ConversationKind::kGroup : ConversationKind::kChannel;
        const ConversationId late = CreateGroupOk(store, "owner", {"peer0"}, made);
        SendMany(store, late, "owner", 2, "before" + n);
        REQUIRE(CommitOne(store, Change(ConversationOp::kAddMembers, late, "owner", {"me"}))
                    .status.ok());
        SendMany(store, late, "peer0", 1, "after" + n);
        conversations.push_back(late);
      }
      continue;
    }
    if (roll < 56) {
      // Another member reads: its counts are kept beside "me"'s, restamped by the same events.
      const std::map<ConversationId, ConversationInfo> owners = DescribedOf(store, "owner");
      auto it = owners.find(id);
      if (it != owners.end() && it->second.removed_at_seq == 0) {
        const Seq last = it->second.last_seq;
        REQUIRE(CommitOne(store, ReceiptOf(id, "owner", "o1", last, last)).status.ok());
      }
      continue;
    }
    const Seq read = random() % (info.last_seq + 1);
    const DeviceId device = random() % 2 == 0 ? "me-phone" : "me-tablet";
    // Half of the receipts share their batch with a message in another conversation, before or
    // after them.
    std::vector<AppendRequest> batch{ReceiptOf(id, "me", device, read, read)};
    const ConversationId other = conversations[random() % conversations.size()];
    const ConversationInfo& other_info = mine.at(other);
    const bool with_message = other != id && other_info.removed_at_seq == 0 && random() % 2 == 0;
    const bool message_first = random() % 2 == 0;
    if (with_message) {
      AppendRequest message =
          ToConversation(other, writer_of(other_info), "b" + std::to_string(step), "batched");
      batch.insert(message_first ? batch.begin() : batch.end(), std::move(message));
    }
    std::vector<AppendResult> results;
    REQUIRE(store.Append(batch, &results).ok());
    const AppendResult& r = results[with_message && message_first ? 1 : 0];
    REQUIRE(r.status.ok());
    Result<SyncReply> fresh = SyncOf(store, "me", {});
    REQUIRE(fresh.ok());
    if (!with_message || message_first) {
      REQUIRE(r.unread_total == fresh->unread_total);
    } else {  // the message after the receipt is not in its total
      REQUIRE(r.unread_total + 1 == fresh->unread_total);
    }
    ++checked;
  }
  CheckBadges(store, badged);
  CHECK(checked > 100);
}
STORE_CASE(ReceiptUnreadTotalsStayExact,
           "a receipt's unread total and every push badge stay exact across messages, receipts, "
           "membership, new conversations and retention")

void UnreadCountsStartAboveTheUsersOwnMessage(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId id = CreateGroupOk(store, "alice", {"bob", "carol"});  // seq 1
  SendMany(store, id, "alice", 2, "a");                                       // seqs 2..3
  SendMany(store, id, "bob", 1, "b");                                         // seq 4
  SendMany(store, id, "alice", 2, "c");                                       // seqs 5..6
  // Whoever replies has seen what came before: bob's count starts above his message, alice's
  // above hers. carol has sent nothing and counts everyone's.
  CHECK(UnreadOf(store, "bob", id) == 2);
  CHECK(UnreadOf(store, "alice", id) == 0);
  CHECK(UnreadOf(store, "carol", id) == 5);
  // A read mark below the user's own message changes nothing; one above it counts from there.
  REQUIRE(CommitOne(store, ReceiptOf(id, "bob", "bob-phone", 2, 2)).status.ok());
  CHECK(UnreadOf(store, "bob", id) == 2);
  AppendResult read = CommitOne(store, ReceiptOf(id, "bob", "bob-phone", 5, 5));
  CHECK(read.conversation.unread == 1);
  CHECK(read.unread_total == 1);

  // A removed member counts up to its removal; a joining one from its join.
  REQUIRE(CommitOne(store, Change(ConversationOp::kRemoveMembers, id, "alice", {"carol"}))
              .status.ok());  // seq 7
  REQUIRE(CommitOne(store, Change(ConversationOp::kAddMembers, id, "alice", {"dave"}))
              .status.ok());             // seq 8
  SendMany(store, id, "bob", 1, "d");    // seq 9
  SendMany(store, id, "alice", 1, "e");  // seq 10
  CHECK(UnreadOf(store, "carol", id) == 5);
  CHECK(UnreadOf(store, "dave", id) == 2);
  CHECK(UnreadOf(store, "bob", id) == 1);
  REQUIRE(CommitOne(store, ReceiptOf(id, "carol", "carol-phone", 3, 3)).status.ok());
  CHECK(UnreadOf(store, "carol", id) == 3);
  // Push badges (SQLite counts them from the member rows, not through Describe) agree.
  const std::vector<UserId> everyone = {"alice", "bob", "carol", "dave"};
  CheckBadges(store, everyone);

  // Messages retention deleted are counted by nobody, wherever the count starts.
  DeleteOldest(store, 4);  // seqs 1..4
  CHECK(UnreadOf(store, "carol", id) == 2);
  CHECK(UnreadOf(store, "bob", id) == 1);
  CheckBadges(store, everyone);
  DeleteOldest(store, 5);  // seqs 5..9: carol may read nothing stored
  CHECK(UnreadOf(store, "carol", id) == 0);
  CHECK(UnreadOf(store, "dave", id) == 1);
  CHECK(UnreadOf(store, "bob", id) == 1);
  CheckBadges(store, everyone);
  DeleteOldest(store, 1);  // seq 10: nothing is stored
  CHECK(UnreadOf(store, "dave", id) == 0);
  CHECK(UnreadOf(store, "bob", id) == 0);
  CheckBadges(store, everyone);
  // The count goes on from there.
  SendMany(store, id, "alice", 2, "f");  // seqs 11..12
  CHECK(UnreadOf(store, "dave", id) == 2);
  CHECK(UnreadOf(store, "bob", id) == 2);
  CHECK(UnreadOf(store, "alice", id) == 0);
  // A large message (stored past SQLite's arrival log) counts like any other.
  REQUIRE(CommitOne(store, ToConversation(id, "bob", "big", std::string(5000, 'x'))).status.ok());
  CHECK(UnreadOf(store, "dave", id) == 3);
  CHECK(UnreadOf(store, "bob", id) == 0);
  CHECK(UnreadOf(store, "alice", id) == 1);
}
STORE_CASE(UnreadCountsStartAboveTheUsersOwnMessage,
           "unread counts start above the user's own last message and skip deleted ones")

// Group `id`'s user messages as sent (seq, sender), and what each member's unread count must
// be from them alone: others' messages above the member's own last one.
struct SentLog {
  std::vector<std::pair<Seq, UserId>> sent;

  // Sends one message from each sender named by a letter of `order` ('a' = users[0]...).
  void Send(MessageStore& store, ConversationId id, const std::vector<UserId>& users,
            const std::string& order) {
    for (char c : order) {
      const UserId& sender = users.at(static_cast<size_t>(c - 'a'));
      AppendResult r =
          CommitOne(store, ToConversation(id, sender, "k" + std::to_string(sent.size()), "m"));
      REQUIRE(r.status.ok());
      sent.emplace_back(r.message.seq, sender);
      Check(store, id, users);
    }
  }

  void Check(MessageStore& store, ConversationId id, const std::vector<UserId>& users) const {
    for (const UserId& user : users) {
      Seq own = 0;
      for (const auto& [seq, sender] : sent) {
        if (sender == user) own = seq;
      }
      uint64_t expected = 0;
      for (const auto& [seq, sender] : sent) {
        if (sender != user && seq > own) ++expected;
      }
      CHECK_MESSAGE(UnreadOf(store, user, id) == expected,
                    user << " after " << sent.size() << " messages");
    }
  }
};

// Two members taking turns, a third joining in, one coming back after others have spoken, and
// one speaking again and again: every way a sender enters, keeps or leaves the places SQLite
// keeps for the two latest senders (schema 9).
constexpr const char* kSenderTurns = "abababcacbdbbdadcccbadda";

void UnreadCountsFollowEverySendersLastMessage(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const std::vector<UserId> users = {"alice", "bob", "carol", "dave"};
  const ConversationId id = CreateGroupOk(store, "alice", {"bob", "carol", "dave"});
  SentLog log;
  log.Send(store, id, users, kSenderTurns);
}
STORE_CASE(UnreadCountsFollowEverySendersLastMessage,
           "unread counts follow every sender's own last message, however they take turns")

void ChannelsNeverListTheirMembers(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  std::vector<UserId> members;
  for (int i = 0; i < 50; ++i) members.push_back("m" + std::to_string(i));
  const ConversationId id = CreateGroupOk(store, "owner", members, ConversationKind::kChannel);
  AppendResult post = CommitOne(store, ToConversation(id, "owner", "post-1", "news"));
  REQUIRE(post.status.ok());
  CHECK(post.kind == ConversationKind::kChannel);
  CHECK(post.recipients.empty());
  CHECK(CommitOne(store, ToConversation(id, "m1", "m1-post", "hi")).status.ok());
  CHECK(CommitOne(store, ToConversation(id, "stranger", "s-post", "hi")).status.code() ==
        Code::kPermissionDenied);
  AppendResult removed =
      CommitOne(store, Change(ConversationOp::kRemoveMembers, id, "owner", {"m7"}));
  REQUIRE(removed.status.ok());
  CHECK(removed.recipients == std::vector<UserId>{"m7", "owner"});

  AppendResult receipt = CommitOne(store, ReceiptOf(id, "m3", "m3-phone", 2, 2));
  REQUIRE(receipt.status.ok());
  CHECK(receipt.recipients == std::vector<UserId>{"m3"});
  CHECK(receipt.conversation.unread == 1);
  Result<ReceiptsReply> page = store.Receipts({.user = "m3", .conversation_id = id});
  REQUIRE(page.ok());
  REQUIRE(page->members.size() == 1);
  CHECK(page->members[0].user == "m3");
  CHECK(page->members[0].read_seq == 2);
  CHECK(InfoOf(store, "m4", id)->unread == 2);
  CHECK(InfoOf(store, "m4", id)->member_count == 50);
}
STORE_CASE(ChannelsNeverListTheirMembers, "channels never list their members on the send path")

void SyncManyAnswersEachQueryAsSyncWould(Kind kind) {
  Env env(kind);
  MessageStore& store = *env.store;
  const ConversationId group = CreateGroupOk(store, "alice", {"bob", "carol", "dave"});
  SendMany(store, group, "alice", 30, "g");
  const ConversationId direct = OpenDirect(store, "bob", "erin");
  SendMany(store, direct, "erin", 5, "d");
  std::vector<SyncQuery> queries;
  auto add = [&](const UserId& user, std::vector<Cursor> cursors, uint32_t limit,
                 uint32_t catchup_max = 1000) {
    queries.push_back({.user = user,
                       .device = user + "-phone",
                       .cursors = std::move(cursors),
                       .limit = limit,
                       .catchup_max = catchup_max});
  };
  add("bob", {}, 500);                          // both conversations, everything
  add("carol", {}, 500);                        // the same group range
  add("dave", {{group, 10}}, 500);              // a later part of it
  add("bob", {}, 7);                            // cut by the limit: has_more
  add("carol", {{group, 20}}, 3);               // a later part, cut
  add("dave", {}, 500, 5);                      // more missing than catchup_max: a gap
  add("bob", {{group, 31}, {direct, 6}}, 500);  // up to date
  add("mallory", {}, 500);                      // in nothing
  add("erin", {}, 0);                           // refused: limit 0
  std::vector<std::optional<Result<SyncReply>>> many(queries.size());
  size_t next = 0;
  store.SyncMany(queries, [&](size_t i, Result<SyncReply> reply) {
    CHECK(i == next++);
    many[i] = std::move(reply);
  });
  CHECK(next == queries.size());
  for (size_t i = 0; i < queries.size(); ++i) {
    CAPTURE(i);
    REQUIRE(many[i].has_value());
    testing::CheckSameSyncReply(*many[i], store.Sync(queries[i]));
  }
  // Spot checks of what the comparison covers.
  REQUIRE(many[0]->ok());
  CHECK((*many[0])->messages.size() == 31 + 6);
  CHECK((*many[3])->has_more);
  CHECK((*many[5])->gaps.size() == 1);
  CHECK((*many[8]).status().code() == Code::kInvalidArgument);
}
STORE_CASE(SyncManyAnswersEachQueryAsSyncWould, "SyncMany answers each query as Sync would")

TEST_CASE("store: a wrapper that overrides only Sync sees every query SyncMany is given") {
  class Refusing : public MessageStoreWrapper {
   public:
    Refusing() : MessageStoreWrapper(NewMemoryStore()) {}
    Result<SyncReply> Sync(const SyncQuery& query) override {
      return Unavailable("refused for " + query.user);
    }
  } store;
  std::vector<SyncQuery> queries;
  for (const char* user : {"a", "b", "c"}) {
    queries.push_back({.user = user, .device = "d", .cursors = {}});
  }
  std::vector<std::string> answers;
  store.SyncMany(queries, [&](size_t i, Result<SyncReply> reply) {
    CHECK(i == answers.size());
    answers.emplace_back(reply.status().message());
  });
  CHECK(answers == std::vector<std::string>{"refused for a", "refused for b", "refused for c"});
}

TEST_CASE("store: sqlite: data survives close and reopen with the same epoch") {
  TempDir dir;
  const std::string path = dir.File("chat.db");
  uint64_t epoch = 0;
  ConversationId id = 0;
  {
    Result<std::shared_ptr<MessageStore>> store = OpenAt(path);
    REQUIRE(store.ok());
    epoch = (*store)->Epoch();
    CHECK(epoch != 0);
    id = OpenDirect(**store, "alice", "bob");
    SendMany(**store, id, "bob", 3, "p");
  }
  Result<std::shared_ptr<MessageStore>> reopened = OpenAt(path);
  REQUIRE(reopened.ok());
  MessageStore& store = **reopened;
  CHECK(store.Epoch() == epoch);
  Result<HistoryReply> h = HistoryOf(store, "alice", id, 0, 10);
  REQUIRE(h.ok());
  CHECK(Seqs(h->messages) == std::vector<Seq>{4, 3, 2, 1});
  // Sequencing and dedupe continue where they were.
  AppendResult dup = CommitOne(store, ToConversation(id, "bob", "p-0", "again"));
  CHECK(dup.duplicate);
  CHECK(dup.message.seq == 2);
  AppendResult next = CommitOne(store, ToPeer("bob", "alice", "p-new", "new"));
  CHECK_FALSE(next.created);
  CHECK(next.message.seq == 5);
}

TEST_CASE("store: sqlite: a new file gets a different epoch") {
  TempDir dir;
  Result<std::shared_ptr<MessageStore>> a = OpenAt(dir.File("a.db"));
  Result<std::shared_ptr<MessageStore>> b = OpenAt(dir.File("b.db"));
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK((*a)->Epoch() != (*b)->Epoch());
}

TEST_CASE("store: sqlite: a schema newer than this build is DataLoss and left untouched") {
  TempDir dir;
  const std::string path = dir.File("chat.db");
  {
    Result<std::shared_ptr<MessageStore>> store = OpenAt(path);
    REQUIRE(store.ok());
    OpenDirect(**store, "alice", "bob");
  }
  RawExec(path, "PRAGMA user_version = 99");
  Result<std::shared_ptr<MessageStore>> newer = OpenAt(path);
  CHECK(newer.status().code() == Code::kDataLoss);
  CHECK(newer.status().message() == "schema version 99 is newer than this build supports (10)");
  RawExec(path, "PRAGMA user_version = 10");
  Result<std::shared_ptr<MessageStore>> again = OpenAt(path);
  REQUIRE(again.ok());
  CHECK((*again)->Members(1).ok());
}

TEST_CASE("store: sqlite: a version 1 file is migrated and keeps its data") {
  TempDir dir;
  const std::string path = dir.File("chat.db");
  ConversationId ab = 0;
  {
    Result<std::shared_ptr<MessageStore>> store = OpenAt(path);
    REQUIRE(store.ok());
    ab = OpenDirect(**store, "alice", "bob");
  }
  // What migration 1 alone left behind.
  RawExec(path, std::string(kBackToVersion4) +
                    "DROP INDEX messages_by_key; CREATE UNIQUE INDEX messages_by_key ON "
                    "messages(sender, client_msg_id) WHERE client_msg_id <> ''; "
                    "ALTER TABLE members DROP COLUMN removed_at_seq; DROP TABLE push_tokens; "
                    "PRAGMA user_version = 1");
  Result<std::shared_ptr<MessageStore>> migrated = OpenAt(path);
  REQUIRE(migrated.ok());
  Result<HistoryReply> h = HistoryOf(**migrated, "bob", ab, 0, 10);
  REQUIRE(h.ok());
  CHECK(h->messages.size() == 1);
  const ConversationId group = CreateGroupOk(**migrated, "alice", {"bob"});
  REQUIRE(CommitOne(**migrated, Change(ConversationOp::kLeave, group, "bob")).status.ok());
  CHECK(*(*migrated)->Members(group) == std::vector<UserId>{"alice"});
}

TEST_CASE("store: sqlite: a version 3 file gets the keys table led by client_msg_id") {
  TempDir dir;
  const std::string path = dir.File("chat.db");
  const ConversationId ab = FileWithOneMessage(path);
  // Version 3's index, led by the sender.
  RawExec(path, std::string(kBackToVersion4) +
                    "DROP INDEX messages_by_key; CREATE UNIQUE INDEX messages_by_key ON "
                    "messages(sender, client_msg_id) WHERE client_msg_id <> ''; "
                    "PRAGMA user_version = 3");
  Result<std::shared_ptr<MessageStore>> migrated = OpenAt(path);
  REQUIRE(migrated.ok());
  // The stored message is still found by its key: a resend is the original.
  AppendResult dup = CommitOne(**migrated, ToPeer("alice", "bob", "key-1", "changed"));
  REQUIRE(dup.status.ok());
  CHECK(dup.duplicate);
  CHECK(dup.message.seq == 1);
  CHECK(dup.message.body == "first");
  CHECK_FALSE(CommitOne(**migrated, ToPeer("bob", "alice", "key-1", "own")).duplicate);
  migrated->reset();
  // The file now carries version 5's keys table, client_msg_id first, holding both keys; the
  // index on messages is gone.
  const std::string sql =
      RawRow(path,
             "SELECT group_concat(name || ': ' || sql, '; ') FROM sqlite_master "
             "WHERE name IN ('messages_by_key', 'message_keys')")
          .at(0);
  const std::string keys =
      RawRow(path, "SELECT group_concat(client_msg_id || '/' || sender, ' ') FROM message_keys")
          .at(0);
  CHECK(sql.starts_with("message_keys: "));
  CHECK(sql.find("PRIMARY KEY(client_msg_id, sender)") != std::string::npos);
  CHECK(sql.find("messages_by_key") == std::string::npos);
  CHECK(keys == "key-1/alice key-1/bob");
  Result<std::shared_ptr<MessageStore>> again = OpenAt(path);
  REQUIRE(again.ok());
  Result<HistoryReply> h = HistoryOf(**again, "bob", ab, 0, 10);
  REQUIRE(h.ok());
  CHECK(Seqs(h->messages) == std::vector<Seq>{2, 1});
}

TEST_CASE("store: sqlite: a version 5 file's keys answer resends, also after retention") {
  TempDir dir;
  const std::string path = dir.File("chat.db");
  FileWithOneMessage(path);
  RawExec(path, CHAT_BACK_TO_VERSION_7
          "ALTER TABLE conversations DROP COLUMN member_count; "
          "DROP INDEX message_keys_gone; ALTER TABLE message_keys DROP COLUMN gone_ms; "
          "ALTER TABLE message_keys DROP COLUMN ts; ALTER TABLE message_keys DROP COLUMN "
          "message_id; PRAGMA user_version = 5");
  Result<std::shared_ptr<MessageStore>> migrated = OpenAt(path);
  REQUIRE(migrated.ok());
  AppendResult dup = CommitOne(**migrated, ToPeer("alice", "bob", "key-1", "changed"));
  CHECK(dup.duplicate);
  CHECK(dup.message.body == "first");
  const MessageId original = dup.message.message_id;
  Result<SweepResult> swept = (*migrated)->DeleteExpired({dup.message.server_time_ms + 2, 1, 10});
  REQUIRE(swept.ok());
  REQUIRE(swept->deleted == 1);
  AppendResult late = CommitOne(**migrated, ToPeer("alice", "bob", "key-1", "changed"));
  CHECK(late.duplicate);
  CHECK(late.message.seq == 1);
  CHECK(late.message.message_id == original);
  CHECK(late.message.server_time_ms == dup.message.server_time_ms);
}

// ":memory:" would give the writer and each reader a database of its own: acks, then every read
// failing. SQLite keeps its memory journal there without an error, so the store checks the mode.
TEST_CASE("store: sqlite: a path that cannot use WAL is refused at open") {
  Result<std::shared_ptr<MessageStore>> memory = OpenAt(":memory:");
  REQUIRE_FALSE(memory.ok());
  CHECK(memory.status().code() == Code::kInvalidArgument);
  CHECK(memory.status().message() ==
        "the SQLite store needs WAL mode, which \":memory:\" cannot use (journal mode "
        "\"memory\"): give the path of a file on a local file system");
}

TEST_CASE("store: sqlite: a version 6 file counts each conversation's current members") {
  TempDir dir;
  const std::string path = dir.File("chat.db");
  ConversationId group = 0;
  ConversationId ab = 0;
  {
    Result<std::shared_ptr<MessageStore>> store = OpenAt(path);
    REQUIRE(store.ok());
    ab = OpenDirect(**store, "alice", "bob");
    group = CreateGroupOk(**store, "alice", {"bob", "carol", "dave"});
    REQUIRE(CommitOne(**store, Change(ConversationOp::kLeave, group, "dave")).status.ok());
  }
  RawExec(path, CHAT_BACK_TO_VERSION_7
          "ALTER TABLE conversations DROP COLUMN member_count; PRAGMA user_version = 6");
  Result<std::shared_ptr<MessageStore>> migrated = OpenAt(path);
  REQUIRE(migrated.ok());
  CHECK(InfoOf(**migrated, "alice", group)->member_count == 3);
  CHECK(InfoOf(**migrated, "alice", ab)->member_count == 2);
  REQUIRE(CommitOne(**migrated, Change(ConversationOp::kAddMembers, group, "alice", {"dave"}))
              .status.ok());
  CHECK(InfoOf(**migrated, "alice", group)->member_count == 4);
  CHECK(RawRow(path, "PRAGMA user_version").at(0) == "10");
}

TEST_CASE("store: sqlite: a version 7 file counts its user messages and who sent last") {
  TempDir dir;
  const std::string path = dir.File("chat.db");
  ConversationId group = 0;
  ConversationId ab = 0;
  {
    SqliteStoreOptions options;
    options.path = path;
    options.recent_log_rows = 2;  // messages in the logs and in the table they merge into
    options.recent_log_slice_rows = 1;
    Result<std::shared_ptr<MessageStore>> store = NewSqliteStore(options);
    REQUIRE(store.ok());
    group = CreateGroupOk(**store, "alice", {"bob", "carol"});  // seq 1
    SendMany(**store, group, "alice", 3, "a");                  // seqs 2..4
    SendMany(**store, group, "bob", 1, "b");                    // seq 5
    DeleteOldest(**store, 2);                                   // seqs 1..2
  }
  {
    Result<std::shared_ptr<MessageStore>> store = OpenAt(path);  // a log of 16,384 rows
    REQUIRE(store.ok());
    SendMany(**store, group, "alice", 2, "c");  // seqs 6..7
    ab = OpenDirect(**store, "alice", "bob");
  }
  // Rows merged into messages, and rows only in a log.
  CHECK(RawRow(path, "SELECT COUNT(*) FROM messages").at(0) != "0");
  CHECK(RawRow(path,
               "SELECT COUNT(*) FROM (SELECT conversation_id, seq FROM log0 UNION SELECT "
               "conversation_id, seq FROM log1) l WHERE NOT EXISTS (SELECT 1 FROM messages m "
               "WHERE m.conversation_id = l.conversation_id AND m.seq = l.seq)")
            .at(0) != "0");
  RawExec(path, kBackToVersion7);
  Result<std::shared_ptr<MessageStore>> migrated = OpenAt(path);
  REQUIRE(migrated.ok());
  // The rewritten rows are in the database file, not left in the WAL for the first commits.
  CHECK(std::filesystem::file_size(path + "-wal") == 0);
  CHECK(RawRow(path, "PRAGMA user_version").at(0) == "10");
  CHECK(UnreadOf(**migrated, "bob", group) == 2);
  CHECK(UnreadOf(**migrated, "carol", group) == 5);
  CHECK(UnreadOf(**migrated, "alice", group) == 0);
  CHECK(UnreadOf(**migrated, "bob", ab) == 1);
  SendMany(**migrated, group, "alice", 1, "d");  // seq 8
  CHECK(UnreadOf(**migrated, "bob", group) == 3);
  CHECK(UnreadOf(**migrated, "carol", group) == 6);
  REQUIRE(CommitOne(**migrated, ReceiptOf(group, "carol", "carol-phone", 6, 6)).status.ok());
  CHECK(UnreadOf(**migrated, "carol", group) == 2);
}

// The two latest senders are kept in the conversation's row, not only in the writer's memory:
// a store opened again goes on from what the file says.
TEST_CASE("store: sqlite: unread counts follow every sender's last message across a reopen") {
  TempDir dir;
  const std::string path = dir.File("chat.db");
  const std::vector<UserId> users = {"alice", "bob", "carol", "dave"};
  ConversationId id = 0;
  SentLog log;
  const std::string turns = kSenderTurns;
  for (size_t from = 0; from < turns.size(); from += 5) {
    Result<std::shared_ptr<MessageStore>> store = OpenAt(path);
    REQUIRE(store.ok());
    if (id == 0) id = CreateGroupOk(**store, "alice", {"bob", "carol", "dave"});
    log.Check(**store, id, users);
    log.Send(**store, id, users, turns.substr(from, 5));
  }
}

TEST_CASE("store: sqlite: a version 8 file keeps its senders' unread counts") {
  TempDir dir;
  const std::string path = dir.File("chat.db");
  const std::vector<UserId> users = {"alice", "bob", "carol", "dave"};
  ConversationId id = 0;
  SentLog log;
  {
    Result<std::shared_ptr<MessageStore>> store = OpenAt(path);
    REQUIRE(store.ok());
    id = CreateGroupOk(**store, "alice", {"bob", "carol", "dave"});
    log.Send(**store, id, users, "abcab");
  }
  // What schema 8 kept: every sender's sent_seq in its member row.
  RawExec(path, CHAT_BACK_TO_VERSION_8
          "UPDATE members SET sent_seq = (SELECT MAX(seq) FROM "
          "(SELECT conversation_id, seq, sender, kind FROM messages UNION ALL SELECT "
          "conversation_id, seq, sender, kind FROM log0 UNION ALL SELECT conversation_id, "
          "seq, sender, kind FROM log1) m WHERE m.conversation_id = members.conversation_id "
          "AND m.sender = members.user_id AND m.kind = 1) WHERE user_id IN ('alice', "
          "'bob', 'carol'); PRAGMA user_version = 8;");
  Result<std::shared_ptr<MessageStore>> migrated = OpenAt(path);
  REQUIRE(migrated.ok());
  CHECK(RawRow(path, "PRAGMA user_version").at(0) == "10");
  log.Check(**migrated, id, users);
  log.Send(**migrated, id, users, "dcbaddcab");
}

TEST_CASE("store: sqlite: what the members were told of the lowest marks survives a reopen") {
  TempDir dir;
  const std::string path = dir.File("chat.db");
  ConversationId id = 0;
  {
    Result<std::shared_ptr<MessageStore>> store = OpenAt(path);
    REQUIRE(store.ok());
    id = CreateGroupOk(**store, "alice", {"bob", "carol"});
    SendMany(**store, id, "alice", 2, "a");  // seqs 2, 3
    REQUIRE(CommitReceipt(**store, id, "alice", 3, 3, 1).status.ok());
    REQUIRE(CommitReceipt(**store, id, "bob", 3, 2, 1).status.ok());
    REQUIRE(CommitReceipt(**store, id, "carol", 2, 2, 1).all_seq_moved);
  }
  Result<std::shared_ptr<MessageStore>> reopened = OpenAt(path);
  REQUIRE(reopened.ok());
  MessageStore& store = **reopened;
  CHECK(ToldOf(store, "alice", id) == std::pair<Seq, Seq>{2, 2});
  Result<SyncReply> sync = SyncOf(store, "alice", {Knowing(id, 3, 2, 0)});
  CHECK(Listed(sync) == std::vector<ConversationId>{id});
  CHECK(sync->conversations.at(0).read_all_seq == 2);
  // bob's move leaves the lowest marks where the members were told before the restart: no
  // news, and in a group over the limit nobody else hears of it.
  AppendResult quiet = CommitReceipt(store, id, "bob", 3, 3, 1);
  CHECK(quiet.receipt_changed);
  CHECK_FALSE(quiet.all_seq_moved);
  CHECK(quiet.recipients.empty());
  CHECK(quiet.read_all_seq == 2);
  // carol's is news again.
  AppendResult news = CommitReceipt(store, id, "carol", 3, 3, 1);
  CHECK(news.all_seq_moved);
  CHECK(news.conversation.read_all_seq == 3);
  CHECK(news.recipients == std::vector<UserId>{"alice", "bob", "carol"});
  CHECK(ToldOf(store, "bob", id) == std::pair<Seq, Seq>{3, 3});
}

TEST_CASE("store: sqlite: a version 9 file starts with nothing told and keeps its data") {
  TempDir dir;
  const std::string path = dir.File("chat.db");
  ConversationId id = 0;
  {
    Result<std::shared_ptr<MessageStore>> store = OpenAt(path);
    REQUIRE(store.ok());
    id = CreateGroupOk(**store, "alice", {"bob"});
    SendMany(**store, id, "alice", 2, "a");  // seqs 2, 3
    REQUIRE(CommitReceipt(**store, id, "alice", 3, 3, 8).status.ok());
    REQUIRE(CommitReceipt(**store, id, "bob", 3, 1, 8).status.ok());
  }
  RawExec(path, CHAT_BACK_TO_VERSION_9 "PRAGMA user_version = 9;");
  Result<std::shared_ptr<MessageStore>> migrated = OpenAt(path);
  REQUIRE(migrated.ok());
  MessageStore& store = **migrated;
  CHECK(RawRow(path, "PRAGMA user_version").at(0) == "10");
  CHECK(RawRow(path,
               "SELECT told_delivered_seq, told_read_seq FROM conversations "
               "WHERE conversation_id = " +
                   std::to_string(id)) == std::vector<std::string>{"0", "0"});
  std::optional<ConversationInfo> info = InfoOf(store, "bob", id);
  REQUIRE(info.has_value());
  CHECK(info->last_seq == 3);
  CHECK(info->read_seq == 1);
  CHECK(info->unread == 2);
  CHECK(info->delivered_all_seq == 0);
  CHECK(info->read_all_seq == 0);
  REQUIRE(HistoryOf(store, "bob", id, 0, 10).ok());
  CHECK(Seqs(HistoryOf(store, "bob", id, 0, 10)->messages) == std::vector<Seq>{3, 2, 1});
  // The first receipt that raises the lowest marks above 0 is news, and is kept.
  AppendResult first = CommitReceipt(store, id, "bob", 3, 2, 8);
  CHECK(first.all_seq_moved);
  CHECK(ToldOf(store, "alice", id) == std::pair<Seq, Seq>{3, 2});
}

// A key lookup that finds the file damaged is answered to its own request (as DATA_LOSS) like a
// key whose message is missing, but the batch does not commit: SQLite refuses to commit a
// transaction in which it met the damage, so the message written before it is not stored.
TEST_CASE("store: sqlite: corruption found by a key lookup fails the whole batch") {
  TempDir dir;
  const std::string path = dir.File("chat.db");
  const ConversationId ab = FileWithOneMessage(path);
  RawExec(path, "PRAGMA wal_checkpoint(TRUNCATE)");
  // message_keys holds one key: its root page is its only page. A page type byte SQLite does
  // not know makes every lookup in it SQLITE_CORRUPT.
  const std::vector<std::string> row =
      RawRow(path,
             "SELECT (SELECT rootpage FROM sqlite_master WHERE name = 'message_keys'), "
             "(SELECT page_size FROM pragma_page_size)");
  const int64_t root = std::stoll(row.at(0));
  const int64_t page_size = std::stoll(row.at(1));
  REQUIRE(root > 1);
  {
    std::FILE* f = std::fopen(path.c_str(), "r+b");
    REQUIRE(f != nullptr);
    REQUIRE(std::fseek(f, static_cast<long>((root - 1) * page_size), SEEK_SET) == 0);
    REQUIRE(std::fputc(0x7f, f) == 0x7f);
    std::fclose(f);
  }
  Result<std::shared_ptr<MessageStore>> store = OpenAt(path);
  REQUIRE(store.ok());
  // Bob's message has no key and touches no key page; the send to carol then looks key-2 up.
  std::vector<AppendRequest> batch = {ToConversation(ab, "bob", "", "no key"),
                                      ToPeer("alice", "carol", "key-2", "to carol")};
  std::vector<AppendResult> results;
  Status s = (*store)->Append(batch, &results);
  CHECK(s.code() == Code::kDataLoss);
  CHECK(results.empty());
  Result<HistoryReply> h = HistoryOf(**store, "bob", ab, 0, 10);
  REQUIRE(h.ok());
  CHECK(Seqs(h->messages) == std::vector<Seq>{1});
}

TEST_CASE("store: sqlite: bad options and unusable files are refused") {
  TempDir dir;
  Result<std::shared_ptr<MessageStore>> empty = NewSqliteStore({});
  CHECK(empty.status().code() == Code::kInvalidArgument);
  CHECK(empty.status().message() == "path is required");

  struct Case {
    void (*mutate)(SqliteStoreOptions&);
    const char* message;
  };
  const Case cases[] = {
      {[](SqliteStoreOptions& o) { o.reader_connections = 0; },
       "reader_connections must be at least 1"},
      {[](SqliteStoreOptions& o) { o.cache_size_kib = 0; }, "cache_size_kib must be at least 1"},
      {[](SqliteStoreOptions& o) { o.writer_cache_size_kib = 0; },
       "writer_cache_size_kib must be at least 1"},
      {[](SqliteStoreOptions& o) { o.mmap_size_bytes = UINT64_MAX; },
       "mmap_size_bytes must be at most 2^63 - 1"},
      {[](SqliteStoreOptions& o) { o.recent_log_rows = 1'000'001; },
       "recent_log_rows must be at most 1,000,000"},
      {[](SqliteStoreOptions& o) { o.recent_log_slice_rows = 0; },
       "recent_log_slice_rows must be 1 to 1,000,000"},
  };
  for (const Case& c : cases) {
    SqliteStoreOptions options;
    options.path = dir.File("chat.db");
    c.mutate(options);
    Result<std::shared_ptr<MessageStore>> refused = NewSqliteStore(options);
    CHECK(refused.status().code() == Code::kInvalidArgument);
    CHECK(refused.status().message() == c.message);
  }

  Result<std::shared_ptr<MessageStore>> no_dir = OpenAt(dir.File("missing/chat.db"));
  CHECK(no_dir.status().code() == Code::kUnavailable);

  const std::string junk = dir.File("junk.db");
  REQUIRE(testing::WriteFile(junk, std::string(4096, 'j')));
  Result<std::shared_ptr<MessageStore>> not_db = OpenAt(junk);
  CHECK(not_db.status().code() == Code::kDataLoss);
}

// Where the rows are, read from the file: the three tables' row counts, log_state, the rows a
// reader sees (messages and the visible log rows: the active log's, and the other log's past
// the merged key), and how many conversations have a row in messages newer than a visible log
// row (0 when messages only ever receives a conversation's oldest rows, in order).
struct LogPlacement {
  int64_t messages = 0;
  int64_t log0 = 0;
  int64_t log1 = 0;
  int64_t active = 0;
  bool merging = false;  // the other log holds rows not yet all copied
  int64_t merged_conversation = 0;
  int64_t visible = 0;
  int64_t out_of_order = 0;
};

LogPlacement PlacementOf(const std::string& path) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  const char* sql = R"sql(
WITH st AS (SELECT active, merged_conversation AS mc, merged_seq AS ms FROM log_state),
seen AS (
  SELECT conversation_id, seq, 0 AS in_log FROM messages
  UNION ALL SELECT conversation_id, seq, 1 FROM log0, st
    WHERE active = 0 OR (conversation_id, seq) > (mc, ms)
  UNION ALL SELECT conversation_id, seq, 1 FROM log1, st
    WHERE active = 1 OR (conversation_id, seq) > (mc, ms))
SELECT (SELECT COUNT(*) FROM messages), (SELECT COUNT(*) FROM log0), (SELECT COUNT(*) FROM log1),
  (SELECT active FROM st), (SELECT mc IS NOT NULL FROM st), (SELECT IFNULL(mc, 0) FROM st),
  (SELECT COUNT(*) FROM seen),
  (SELECT COUNT(*) FROM (SELECT conversation_id FROM seen GROUP BY conversation_id
     HAVING MAX(CASE WHEN in_log = 0 THEN seq END) > MIN(CASE WHEN in_log = 1 THEN seq END))))sql";
  sqlite3_stmt* stmt = nullptr;
  REQUIRE_MESSAGE(sqlite3_prepare_v2(db, sql, -1, &stmt, nullptr) == SQLITE_OK, sqlite3_errmsg(db));
  REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
  LogPlacement out;
  out.messages = sqlite3_column_int64(stmt, 0);
  out.log0 = sqlite3_column_int64(stmt, 1);
  out.log1 = sqlite3_column_int64(stmt, 2);
  out.active = sqlite3_column_int64(stmt, 3);
  out.merging = sqlite3_column_int64(stmt, 4) != 0;
  out.merged_conversation = sqlite3_column_int64(stmt, 5);
  out.visible = sqlite3_column_int64(stmt, 6);
  out.out_of_order = sqlite3_column_int64(stmt, 7);
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return out;
}

TEST_CASE("store: sqlite: messages move from the log into the conversation table in slices") {
  TempDir dir;
  SqliteStoreOptions options;
  options.path = dir.File("chat.db");
  options.recent_log_rows = 1500;
  options.recent_log_slice_rows = 100;
  constexpr int kPairs = 60;
  constexpr int kRounds = 50;  // each pair sends one message per round: 3,000 in all
  std::vector<ConversationId> conversations(kPairs, 0);
  std::vector<Seq> expected(kPairs, 0);
  std::optional<std::shared_ptr<MessageStore>> store;
  auto open = [&] {
    Result<std::shared_ptr<MessageStore>> opened = NewSqliteStore(options);
    REQUIRE_MESSAGE(opened.ok(), opened.status().ToString());
    store = *opened;
  };
  open();
  // Every conversation reads back whole, in order, each message once, wherever its rows are.
  auto check_all = [&] {
    for (int p = 0; p < kPairs; ++p) {
      if (conversations[p] == 0) continue;
      CAPTURE(p);
      Result<HistoryReply> h =
          HistoryOf(**store, "u" + std::to_string(p), conversations[p], 0, 1000);
      REQUIRE(h.ok());
      std::vector<Seq> want;
      for (Seq s = expected[p]; s >= 1; --s) want.push_back(s);
      REQUIRE(Seqs(h->messages) == want);
      for (const Message& m : h->messages) {
        CHECK(m.body == "p" + std::to_string(p) + "-" + std::to_string(m.seq));
      }
    }
  };
  std::vector<LogPlacement> seen;
  bool reopened = false;
  int64_t total = 0;
  for (int round = 0; round < kRounds; ++round) {
    CAPTURE(round);
    // 60 messages, then a resend of an early one alone: a batch of one takes one step of 100
    // rows, so the merge is left part-way through between the calls.
    std::vector<AppendRequest> batch;
    for (int p = 0; p < kPairs; ++p) {
      const std::string body = "p" + std::to_string(p) + "-" + std::to_string(expected[p] + 1);
      AppendRequest r =
          conversations[p] == 0
              ? ToPeer("u" + std::to_string(p), "v" + std::to_string(p), "k-" + body, body)
              : ToConversation(conversations[p], "u" + std::to_string(p), "k-" + body, body);
      batch.push_back(r);
    }
    std::vector<AppendResult> results = Commit(**store, batch);
    for (int p = 0; p < kPairs; ++p) {
      REQUIRE(results[p].status.ok());
      conversations[p] = results[p].message.conversation_id;
      REQUIRE(results[p].message.seq == ++expected[p]);
    }
    total += kPairs;
    seen.push_back(PlacementOf(options.path));
    CHECK(seen.back().visible == total);
    CHECK(seen.back().out_of_order == 0);
    // A resend of an early message is still the original, wherever that one is now.
    AppendResult dup = CommitOne(**store, ToPeer("u0", "v0", "k-p0-1", "changed"));
    REQUIRE(dup.status.ok());
    CHECK(dup.duplicate);
    CHECK(dup.message.seq == 1);
    CHECK(dup.message.body == "p0-1");
    seen.push_back(PlacementOf(options.path));
    const LogPlacement& now = seen.back();
    CHECK(now.visible == total);
    CHECK(now.out_of_order == 0);
    check_all();
    // Closed and opened again half-way through a merge: it carries on from log_state.
    if (!reopened && now.merging && now.merged_conversation > 0) {
      store.reset();
      open();
      reopened = true;
      check_all();
    }
  }
  CHECK(reopened);
  // The first switch came once the log held 1,500 rows, the merge took more than one step, and
  // the other log was emptied when it was done.
  bool switched = false;
  bool mid_merge = false;
  bool finished = false;
  for (const LogPlacement& p : seen) {
    switched = switched || p.active == 1;
    mid_merge = mid_merge || (p.merging && p.merged_conversation > 0);
    finished = finished || (p.active == 1 && !p.merging && p.log0 == 0 && p.messages >= 1500);
  }
  CHECK(switched);
  CHECK(mid_merge);
  CHECK(finished);
}

TEST_CASE("store: sqlite: the merge keeps pace with batches larger than the log") {
  TempDir dir;
  SqliteStoreOptions options;
  options.path = dir.File("chat.db");
  options.recent_log_rows = 100;
  options.recent_log_slice_rows = 10;
  Result<std::shared_ptr<MessageStore>> store = NewSqliteStore(options);
  REQUIRE(store.ok());
  std::vector<ConversationId> conversations(30, 0);
  int64_t total = 0;
  for (int round = 0; round < 20; ++round) {
    std::vector<AppendRequest> batch;
    for (int p = 0; p < 30; ++p) {
      for (int i = 0; i < 10; ++i) {
        const std::string key =
            std::to_string(round) + "-" + std::to_string(p) + "-" + std::to_string(i);
        batch.push_back(conversations[p] == 0 && i == 0
                            ? ToPeer("u" + std::to_string(p), "v" + std::to_string(p), key, key)
                            : ToConversation(conversations[p], "u" + std::to_string(p), key, key));
        if (conversations[p] == 0) break;  // the first message creates the conversation
      }
    }
    std::vector<AppendResult> results = Commit(**store, batch);
    for (const AppendResult& r : results) REQUIRE(r.status.ok());
    for (int p = 0; p < 30; ++p) {
      if (conversations[p] == 0) conversations[p] = results[p].message.conversation_id;
    }
    total += static_cast<int64_t>(batch.size());
    const LogPlacement now = PlacementOf(options.path);
    CAPTURE(round);
    CHECK(now.visible == total);
    // Every batch went through the log (a merge that fell behind would leave the log full and
    // send the next batches straight to messages, past rows still in the log).
    CHECK(now.out_of_order == 0);
    CHECK((now.active == 0 ? now.log0 : now.log1) <= 100 + 300);
  }
  for (int p = 0; p < 30; ++p) {
    Result<HistoryReply> h = HistoryOf(**store, "v" + std::to_string(p), conversations[p], 0, 1000);
    REQUIRE(h.ok());
    CHECK(h->messages.size() == 1 + 19 * 10);
    CHECK(h->messages.front().seq == 1 + 19 * 10);
  }
}

// A SQLite store with a small message log, and alice and bob's direct conversation in it.
struct SmallLog {
  SmallLog(uint32_t rows, uint32_t slice) {
    options.path = dir.File("chat.db");
    options.recent_log_rows = rows;
    options.recent_log_slice_rows = slice;
    Result<std::shared_ptr<MessageStore>> opened = NewSqliteStore(options);
    REQUIRE_MESSAGE(opened.ok(), opened.status().ToString());
    store = *opened;
    ab = OpenDirect(*store, "alice", "bob");
  }

  TempDir dir;
  SqliteStoreOptions options;
  std::shared_ptr<MessageStore> store;
  ConversationId ab = 0;
};

TEST_CASE("store: sqlite: rows retention removes from the log no longer count toward its size") {
  SmallLog log(/*rows=*/10, /*slice=*/5);
  MessageStore& store = *log.store;
  const std::string& path = log.options.path;
  SendMany(store, log.ab, "alice", 7, "old");
  REQUIRE(PlacementOf(path).log0 == 8);  // with the opening message
  Result<SweepResult> swept = store.DeleteExpired({1'800'000'000'000, 1000, 100});
  REQUIRE(swept.ok());
  CHECK(swept->deleted == 8);
  CHECK(PlacementOf(path).log0 == 0);
  // The log counts what is left: 5 more rows do not fill it (10), so it is not switched.
  SendMany(store, log.ab, "alice", 5, "new");
  const LogPlacement now = PlacementOf(path);
  CHECK(now.active == 0);
  CHECK(now.log0 == 5);
  CHECK_FALSE(now.merging);
  // Nor after a restart, which counts the rows again.
  log.store.reset();
  Result<std::shared_ptr<MessageStore>> reopened = NewSqliteStore(log.options);
  REQUIRE(reopened.ok());
  SendMany(**reopened, log.ab, "alice", 4, "later");
  CHECK(PlacementOf(path).active == 0);
  CHECK(PlacementOf(path).log0 == 9);
}

TEST_CASE("store: sqlite: a failing merge leaves the batch stored and recovers when it can") {
  SmallLog log(/*rows=*/20, /*slice=*/5);
  MessageStore& store = *log.store;
  const std::string& path = log.options.path;
  const ConversationId ab = log.ab;
  // Every merge step fails from now on (its change of log_state is refused).
  RawExec(path,
          "CREATE TRIGGER fail_merge BEFORE UPDATE ON log_state "
          "BEGIN SELECT RAISE(ABORT, 'injected merge failure'); END");
  int64_t total = 1;
  for (int round = 0; round < 30; ++round) {
    CAPTURE(round);
    std::vector<AppendRequest> batch;
    for (int i = 0; i < 4; ++i) {
      const std::string key = "f-" + std::to_string(round) + "-" + std::to_string(i);
      batch.push_back(ToConversation(ab, i % 2 == 0 ? "alice" : "bob", key, key));
    }
    for (const AppendResult& r : Commit(store, batch)) CHECK(r.status.ok());
    total += 4;
    const LogPlacement now = PlacementOf(path);
    CHECK(now.visible == total);
    // The log stops growing at twice its size (plus a batch): then new messages go straight
    // into the table.
    CHECK(now.log0 <= 2 * 20 + 4);
    CHECK(now.log1 == 0);
    CHECK(now.log0 + now.messages == total);
  }
  CHECK(PlacementOf(path).messages > 0);
  Result<HistoryReply> h = HistoryOf(store, "bob", ab, 0, 1000);
  REQUIRE(h.ok());
  CHECK(h->messages.size() == static_cast<size_t>(total));
  RawExec(path, "DROP TRIGGER fail_merge");
  // The next batches move everything on.
  for (int round = 0; round < 30; ++round) {
    const std::string key = "g-" + std::to_string(round);
    CHECK(CommitOne(store, ToConversation(ab, "alice", key, key)).status.ok());
    ++total;
  }
  const LogPlacement after = PlacementOf(path);
  CHECK(after.visible == total);
  CHECK(after.messages > 0);
  CHECK(after.out_of_order == 0);
  Result<HistoryReply> all = HistoryOf(store, "bob", ab, 0, 1000);
  REQUIRE(all.ok());
  CHECK(all->messages.size() == static_cast<size_t>(total));
  CHECK(all->messages.front().seq == static_cast<Seq>(total));
}

TEST_CASE("store: sqlite: a merge step that fails half-way is undone, not half kept") {
  SmallLog log(/*rows=*/20, /*slice=*/5);
  MessageStore& store = *log.store;
  const std::string& path = log.options.path;
  const ConversationId ab = log.ab;
  int64_t total = 1;
  auto send = [&](const std::string& key) {
    CHECK(CommitOne(store, ToConversation(ab, "alice", key, key)).status.ok());
    ++total;
  };
  for (int i = 0; i < 20; ++i) send("a-" + std::to_string(i));
  // The logs switched; the next slices copy rows into messages and then fail to record how far
  // they got: the copies must go with them.
  REQUIRE(PlacementOf(path).merging);
  RawExec(path,
          "CREATE TRIGGER fail_slice BEFORE UPDATE ON log_state WHEN NEW.merged_conversation > 0 "
          "BEGIN SELECT RAISE(ABORT, 'injected slice failure'); END");
  const int64_t copied = PlacementOf(path).messages;
  for (int i = 0; i < 10; ++i) {
    send("b-" + std::to_string(i));
    const LogPlacement now = PlacementOf(path);
    CHECK(now.visible == total);
    CHECK(now.messages == copied);
  }
  RawExec(path, "DROP TRIGGER fail_slice");
  for (int i = 0; i < 40; ++i) send("c-" + std::to_string(i));
  const LogPlacement after = PlacementOf(path);
  CHECK(after.visible == total);
  CHECK(after.messages > copied);
  Result<HistoryReply> h = HistoryOf(store, "bob", ab, 0, 1000);
  REQUIRE(h.ok());
  CHECK(h->messages.size() == static_cast<size_t>(total));
}

TEST_CASE("store: sqlite: a message with over 4 KiB of body and attachments goes into the table") {
  SmallLog log(/*rows=*/1000, /*slice=*/10);
  MessageStore& store = *log.store;
  const std::string& path = log.options.path;
  SendMany(store, log.ab, "alice", 5, "small");
  CHECK(PlacementOf(path).messages == 0);
  CHECK(PlacementOf(path).log0 == 6);
  const std::string large(4097, 'x');
  AppendResult big = CommitOne(store, ToConversation(log.ab, "bob", "large-1", large));
  REQUIRE(big.status.ok());
  CHECK(big.message.seq == 7);
  SendMany(store, log.ab, "alice", 2, "after");
  const LogPlacement now = PlacementOf(path);
  CHECK(now.messages == 1);
  CHECK(now.log0 == 8);
  CHECK(now.visible == 9);
  // Read back in order wherever each one is; a resend of the large one is the original.
  Result<HistoryReply> h = HistoryOf(store, "bob", log.ab, 0, 100);
  REQUIRE(h.ok());
  CHECK(Seqs(h->messages) == std::vector<Seq>{9, 8, 7, 6, 5, 4, 3, 2, 1});
  CHECK(h->messages[2].body == large);
  AppendResult dup = CommitOne(store, ToConversation(log.ab, "bob", "large-1", "changed"));
  CHECK(dup.duplicate);
  CHECK(dup.message.seq == 7);
  // A body of exactly 4 KiB still goes through the log.
  CHECK(
      CommitOne(store, ToConversation(log.ab, "bob", "edge", std::string(4096, 'y'))).status.ok());
  CHECK(PlacementOf(path).messages == 1);
  // Attachments count with the body: a short body with 5 KiB of attachment names is large too.
  AppendRequest attached = ToConversation(log.ab, "bob", "attached", "see files");
  for (int i = 0; i < 5; ++i) {
    Attachment a;
    a.url = "https://files.example/" + std::to_string(i);
    a.name = std::string(1024, static_cast<char>('a' + i));
    attached.attachments.push_back(std::move(a));
  }
  AppendResult with_files = CommitOne(store, attached);
  REQUIRE(with_files.status.ok());
  CHECK(PlacementOf(path).messages == 2);
  Result<HistoryReply> newest = HistoryOf(store, "bob", log.ab, 0, 1);
  REQUIRE(newest.ok());
  REQUIRE(newest->messages.size() == 1);
  CHECK(newest->messages[0].attachments.size() == 5);
  CHECK(newest->messages[0].attachments[4].name == std::string(1024, 'e'));
}

// The log's byte bound counts each row's ids as well as its body: rows of 128-byte ids and a
// one-byte body (about 640 bytes each by the estimate) switch the log at 32 MiB, after about
// 52,000 rows, not after about 260,000 as a count of bodies alone would have it. The SQL that
// counts the rows on open and the count kept while writing must agree.
TEST_CASE("store: sqlite: long ids count toward the log's byte bound, also after a reopen") {
  TempDir dir;
  const std::string path = dir.File("chat.db");
  SqliteStoreOptions options;
  options.path = path;
  options.recent_log_rows = 1'000'000;  // the largest: only the bytes switch the log
  const std::string alice(128, 'a');
  const std::string bob(128, 'b');
  constexpr int kBatches = 60;
  constexpr int kPerBatch = 1000;
  ConversationId id = 0;
  int sent = 0;
  // Half the rows, then the store is opened again: the bytes already in the log are counted
  // from its rows.
  for (int half = 0; half < 2; ++half) {
    Result<std::shared_ptr<MessageStore>> store = NewSqliteStore(options);
    REQUIRE(store.ok());
    for (int b = 0; b < kBatches / 2; ++b) {
      std::vector<AppendRequest> batch;
      for (int i = 0; i < kPerBatch; ++i) {
        std::string key = std::to_string(++sent);
        key.insert(0, 128 - key.size(), 'k');
        AppendRequest r =
            id == 0 ? ToPeer(alice, bob, key, "x") : ToConversation(id, alice, key, "x");
        r.sender_device = std::string(128, 'd');
        r.content_type = std::string(128, 't');
        batch.push_back(std::move(r));
        if (id == 0) break;  // the first message creates the conversation
      }
      id = Commit(**store, batch).back().message.conversation_id;
    }
    if (half == 0) CHECK(RawRow(path, "SELECT active FROM log_state").at(0) == "0");
  }
  CHECK(RawRow(path, "SELECT active FROM log_state").at(0) == "1");
  CHECK(std::stoll(RawRow(path, "SELECT COUNT(*) FROM log1").at(0)) > 0);
  Result<std::shared_ptr<MessageStore>> store = NewSqliteStore(options);
  REQUIRE(store.ok());
  Result<HistoryReply> h = HistoryOf(**store, bob, id, 0, 1);
  REQUIRE(h.ok());
  CHECK(h->messages.at(0).seq == Seq(sent));
}

TEST_CASE("store: sqlite: a store opened with recent_log_rows 0 empties the logs and skips them") {
  TempDir dir;
  SqliteStoreOptions options;
  options.path = dir.File("chat.db");
  ConversationId ab = 0;
  {
    Result<std::shared_ptr<MessageStore>> store = NewSqliteStore(options);
    REQUIRE(store.ok());
    ab = OpenDirect(**store, "alice", "bob");
    SendMany(**store, ab, "alice", 40, "logged");
  }
  CHECK(PlacementOf(options.path).log0 == 41);
  options.recent_log_rows = 0;
  options.recent_log_slice_rows = 16;
  Result<std::shared_ptr<MessageStore>> store = NewSqliteStore(options);
  REQUIRE(store.ok());
  for (int i = 0; i < 5; ++i) {
    const std::string key = "direct-" + std::to_string(i);
    CHECK(CommitOne(**store, ToConversation(ab, "bob", key, key)).status.ok());
  }
  const LogPlacement now = PlacementOf(options.path);
  CHECK(now.log0 == 0);
  CHECK(now.log1 == 0);
  CHECK(now.messages == 46);
  CHECK(now.visible == 46);
  CHECK(now.out_of_order == 0);
  // And a batch that fails stores nothing in the table either.
  RawExec(options.path,
          "CREATE TRIGGER fail_boom BEFORE INSERT ON messages WHEN NEW.body = CAST('boom' AS BLOB)"
          " BEGIN SELECT RAISE(ABORT, 'injected failure'); END");
  std::vector<AppendResult> results;
  Status s = (*store)->Append(std::vector<AppendRequest>{ToConversation(ab, "alice", "b-1", "ok"),
                                                         ToConversation(ab, "bob", "b-2", "boom")},
                              &results);
  CHECK(s.code() == Code::kInternal);
  CHECK(PlacementOf(options.path).messages == 46);
  Result<HistoryReply> h = HistoryOf(**store, "bob", ab, 0, 100);
  REQUIRE(h.ok());
  CHECK(h->messages.size() == 46);
}

TEST_CASE("store: sqlite: a memory-mapped store with a tiny page cache reads back every page") {
  TempDir dir;
  SqliteStoreOptions options;
  options.path = dir.File("chat.db");
  options.cache_size_kib = 64;  // far smaller than the file: pages are evicted and read again
  options.mmap_size_bytes = 64 << 20;
  // Two conversations written in turns, so each one's rows spread over many pages.
  constexpr int kMessages = 400;
  const std::string body(300, 'b');
  ConversationId ab = 0;
  ConversationId ac = 0;
  {
    Result<std::shared_ptr<MessageStore>> opened = NewSqliteStore(options);
    REQUIRE_MESSAGE(opened.ok(), opened.status().ToString());
    MessageStore& store = **opened;
    ab = OpenDirect(store, "alice", "bob");
    ac = OpenDirect(store, "alice", "carol");
    for (int i = 0; i < kMessages; ++i) {
      std::vector<AppendRequest> batch = {
          ToConversation(ab, "bob", "b-" + std::to_string(i), body + std::to_string(i)),
          ToConversation(ac, "carol", "c-" + std::to_string(i), body + std::to_string(i))};
      Attachment file;
      file.url = "https://files/" + std::to_string(i);
      batch[0].attachments.push_back(file);
      for (const AppendResult& r : Commit(store, batch)) REQUIRE(r.status.ok());
    }
  }
  Result<std::shared_ptr<MessageStore>> reopened = NewSqliteStore(options);
  REQUIRE_MESSAGE(reopened.ok(), reopened.status().ToString());
  MessageStore& store = **reopened;
  for (ConversationId id : {ab, ac}) {
    // Page through the whole conversation, newest first: seq kMessages + 1 down to 1.
    Seq before = 0;
    Seq expected = kMessages + 1;
    for (int page = 0; page < 100 && expected > 0; ++page) {
      Result<HistoryReply> h = HistoryOf(store, "alice", id, before, 50);
      REQUIRE_MESSAGE(h.ok(), h.status().ToString());
      REQUIRE_FALSE(h->messages.empty());
      for (const Message& m : h->messages) {
        REQUIRE(m.seq == expected);
        if (m.seq > 1) {
          CHECK(m.body == body + std::to_string(m.seq - 2));
          CHECK(m.attachments.size() == (id == ab ? 1U : 0U));
        }
        --expected;
      }
      before = h->messages.back().seq;
      CHECK(h->has_more == (expected > 0));
    }
    CHECK(expected == 0);
  }
}

// `batches` commits of `per_batch` messages in `id`, bob and alice taking turns by commit.
void AppendTurns(MessageStore& store, ConversationId id, int batches, int per_batch,
                 const std::string& tag) {
  for (int b = 0; b < batches; ++b) {
    std::vector<AppendRequest> batch;
    for (int i = 0; i < per_batch; ++i) {
      batch.push_back(ToConversation(id, b % 2 ? "alice" : "bob",
                                     tag + "-" + std::to_string(b) + "-" + std::to_string(i), "x"));
    }
    std::vector<AppendResult> results;
    CHECK(store.Append(batch, &results).ok());
  }
}

TEST_CASE("store: sqlite: readers see consistent snapshots while the writer appends") {
  SqliteStoreOptions options;
  options.reader_connections = 2;
  SUBCASE("new messages in the log") {}
  SUBCASE("messages moving from the logs into the table all the time") {
    options.recent_log_rows = 7;
    options.recent_log_slice_rows = 3;
  }
  Env env(Kind::kSqlite, options);
  MessageStore& store = *env.store;
  const ConversationId id = OpenDirect(store, "alice", "bob");

  constexpr int kBatches = 60;
  constexpr int kPerBatch = 5;
  std::atomic<bool> done{false};
  std::atomic<int> failures{0};
  std::atomic<int> reads{0};
  auto reader = [&](const UserId& user) {
    // Bounded: at least 3 rounds, then until the writer is done, never more than 5000.
    for (int round = 0; round < 5000 && (round < 3 || !done.load()); ++round) {
      Result<HistoryReply> h = HistoryOf(store, user, id, 0, 20);
      Result<SyncReply> s = SyncOf(store, user, {}, /*limit=*/2000);
      if (!h.ok() || !s.ok()) {
        ++failures;
        continue;
      }
      // Each reply is one snapshot: seqs are contiguous and agree with the listed last_seq.
      for (size_t i = 1; i < h->messages.size(); ++i) {
        if (h->messages[i].seq + 1 != h->messages[i - 1].seq) ++failures;
      }
      if (s->conversations.size() != 1 || s->messages.size() != s->conversations[0].last_seq) {
        ++failures;
      }
      for (size_t i = 0; i < s->messages.size(); ++i) {
        if (s->messages[i].seq != i + 1) ++failures;
      }
      ++reads;
    }
  };
  std::thread r1(reader, "alice");
  std::thread r2(reader, "bob");
  AppendTurns(store, id, kBatches, kPerBatch, "c");
  done = true;
  r1.join();
  r2.join();
  CHECK(failures.load() == 0);
  CHECK(reads.load() > 0);
  Result<HistoryReply> h = HistoryOf(store, "alice", id, 0, 1);
  REQUIRE(h.ok());
  CHECK(h->messages[0].seq == 1 + kBatches * kPerBatch);
}

TEST_CASE(
    "store: sqlite: in SyncMany a message that does not decode fails only its reader's Sync") {
  Env env(Kind::kSqlite);
  MessageStore& store = *env.store;
  const ConversationId damaged = OpenDirect(store, "alice", "bob");
  OpenDirect(store, "carol", "dave");
  // The stored attachments of alice's message no longer decode (a damaged file).
  RawExec(
      env.dir.File("chat.db"),
      "UPDATE log0 SET attachments = x'ff01' WHERE conversation_id = " + std::to_string(damaged));
  std::vector<SyncQuery> queries;
  for (const char* user : {"alice", "carol", "bob", "dave"}) {
    queries.push_back({.user = user, .device = std::string(user) + "-phone", .cursors = {}});
  }
  std::vector<std::optional<Result<SyncReply>>> replies(queries.size());
  store.SyncMany(queries,
                 [&](size_t i, Result<SyncReply> reply) { replies[i] = std::move(reply); });
  for (size_t i = 0; i < queries.size(); ++i) {
    CAPTURE(i);
    REQUIRE(replies[i].has_value());
    testing::CheckSameSyncReply(*replies[i], store.Sync(queries[i]));
  }
  CHECK(replies[0]->status().code() == Code::kDataLoss);
  CHECK(replies[1]->ok());
  CHECK(replies[2]->status().code() == Code::kDataLoss);
  CHECK(replies[3]->ok());
}

TEST_CASE(
    "store: sqlite: SyncMany answers a whole batch from one snapshot while the writer appends") {
  Env env(Kind::kSqlite);
  MessageStore& store = *env.store;
  const ConversationId id = OpenDirect(store, "alice", "bob");

  std::atomic<bool> done{false};
  std::atomic<int> failures{0};
  std::atomic<int> batches{0};
  std::thread reader([&] {
    std::vector<SyncQuery> queries;
    for (const char* user : {"alice", "bob", "alice", "bob"}) {
      queries.push_back(
          {.user = user, .device = std::string(user) + "-phone", .cursors = {}, .limit = 2000});
    }
    // Bounded: at least 3 batches, then until the writer is done, never more than 5000.
    for (int round = 0; round < 5000 && (round < 3 || !done.load()); ++round) {
      std::vector<Seq> last_seqs;
      store.SyncMany(queries, [&](size_t, Result<SyncReply> reply) {
        if (!reply.ok() || reply->conversations.size() != 1) {
          ++failures;
          return;
        }
        const Seq last = reply->conversations[0].last_seq;
        if (reply->messages.size() != last) ++failures;
        for (size_t i = 0; i < reply->messages.size(); ++i) {
          if (reply->messages[i].seq != i + 1) ++failures;
        }
        last_seqs.push_back(last);
      });
      // One snapshot: every reply of the batch saw the same last message.
      if (last_seqs.size() != queries.size() ||
          std::adjacent_find(last_seqs.begin(), last_seqs.end(), std::not_equal_to<>()) !=
              last_seqs.end()) {
        ++failures;
      }
      ++batches;
    }
  });
  AppendTurns(store, id, 60, 5, "m");
  done = true;
  reader.join();
  CHECK(failures.load() == 0);
  CHECK(batches.load() > 0);
}

TEST_CASE("store: sqlite: the WAL is copied into the database while the store stays open") {
  Env env(Kind::kSqlite);
  MessageStore& store = *env.store;
  const std::string path = env.dir.File("chat.db");
  const ConversationId ab = OpenDirect(store, "alice", "bob");
  const auto initial = std::filesystem::file_size(path);
  // Several thousand commits of messages that each take overflow pages: more WAL pages than
  // even the writer's own limit (16,000), had nothing been copied back meanwhile.
  const std::string body(9000, 'x');
  for (int i = 0; i < 3000; ++i) {
    REQUIRE(
        CommitOne(store, ToConversation(ab, "alice", "w-" + std::to_string(i), body)).status.ok());
  }
  // The checkpoint runs on the store's own thread: wait for it (bounded), never for a close.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::filesystem::file_size(path) < initial + 4'000'000 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(std::filesystem::file_size(path) >= initial + 4'000'000);
  // Bounded: the WAL (a 32-byte header, then 4,120-byte frames) never holds more than the
  // writer's own checkpoint limit (16,000 pages) and the commit that crossed it.
  CHECK(std::filesystem::file_size(path + "-wal") <= 32 + (16'000 + 16) * 4'120);
  Result<HistoryReply> h = HistoryOf(store, "bob", ab, 0, 1);
  REQUIRE(h.ok());
  CHECK(h->messages.front().seq == 3001);
}

TEST_CASE("store: sqlite: a failed transaction stores nothing of the batch") {
  Env env(Kind::kSqlite);
  MessageStore& store = *env.store;
  const std::string path = env.dir.File("chat.db");
  const ConversationId ab = OpenDirect(store, "alice", "bob");

  // The third item fails inside SQLite after the first two were written in the transaction.
  RawExec(path,
          "CREATE TRIGGER fail_boom BEFORE INSERT ON log0 WHEN NEW.body = CAST('boom' AS BLOB)"
          " BEGIN SELECT RAISE(ABORT, 'injected failure'); END");
  std::vector<AppendRequest> batch = {
      ToPeer("carol", "dave", "t-1", "creates a conversation"),
      ToConversation(ab, "alice", "t-2", "fine"),
      ToConversation(ab, "bob", "t-3", "boom"),
  };
  std::vector<AppendResult> results;
  Status s = store.Append(batch, &results);
  CHECK(s.code() == Code::kInternal);
  CHECK(s.message().find("injected failure") != std::string_view::npos);
  CHECK(results.empty());

  RawExec(path, "DROP TRIGGER fail_boom");
  Result<HistoryReply> h = HistoryOf(store, "alice", ab, 0, 10);
  REQUIRE(h.ok());
  CHECK(Seqs(h->messages) == std::vector<Seq>{1});
  Result<SyncReply> carol = SyncOf(store, "carol", {});
  REQUIRE(carol.ok());
  CHECK(carol->conversations.empty());

  // The same batch now commits in full: no key was consumed and no seq skipped.
  std::vector<AppendResult> retried = Commit(store, batch);
  CHECK(retried[0].created);
  CHECK(retried[0].message.seq == 1);
  CHECK_FALSE(retried[1].duplicate);
  CHECK(retried[1].message.seq == 2);
  CHECK(retried[2].message.seq == 3);
}

// The writer caches memberships: a member row that vanished behind it (a damaged or edited
// file) fails the receipt's batch rather than writing a cursor nobody's row stands for.
TEST_CASE("store: sqlite: a receipt whose member row is gone fails its batch and writes nothing") {
  Env env(Kind::kSqlite);
  MessageStore& store = *env.store;
  const std::string path = env.dir.File("chat.db");
  const ConversationId id = CreateGroupOk(store, "alice", {"bob"});
  SendMany(store, id, "alice", 2, "a");                                     // seqs 2, 3
  REQUIRE(CommitOne(store, ReceiptOf(id, "bob", "b1", 2, 1)).status.ok());  // cached now
  RawExec(path, "DELETE FROM members WHERE user_id = 'bob'");
  std::vector<AppendResult> results;
  const Status failed =
      store.Append(std::vector<AppendRequest>{ReceiptOf(id, "bob", "b1", 3, 3)}, &results);
  CHECK(failed.code() == Code::kInternal);
  CHECK(failed.message().find("member's row is gone") != std::string::npos);
  // As the first receipt left it.
  CHECK(RawRow(path, "SELECT delivered_seq, read_seq FROM cursors WHERE user_id = 'bob'") ==
        std::vector<std::string>{"2", "1"});
}

// The writer keeps each user's unread counts between receipts; a batch that rolls back must not
// leave behind a count one of its receipts made, nor a stamp that hides one of its messages.
TEST_CASE("store: sqlite: a failed batch leaves no unread count of its own behind") {
  Env env(Kind::kSqlite);
  MessageStore& store = *env.store;
  const std::string path = env.dir.File("chat.db");
  const ConversationId ab = OpenDirect(store, "alice", "bob");
  const ConversationId group = CreateGroupOk(store, "alice", {"bob"});
  const ConversationId ac = OpenDirect(store, "alice", "carol");
  REQUIRE(CommitOne(store, ReceiptOf(ab, "bob", "b1", 1, 1)).status.ok());  // counts kept
  RawExec(path,
          "CREATE TRIGGER fail_boom BEFORE INSERT ON log0 WHEN NEW.body = CAST('boom' AS BLOB)"
          " BEGIN SELECT RAISE(ABORT, 'injected failure'); END");
  // A message bob has not read, his receipt counting it, then the failure (in a third
  // conversation, so that nothing after the message restamps the group).
  std::vector<AppendResult> results;
  CHECK(store
            .Append(std::vector<AppendRequest>{ToConversation(group, "alice", "g-1", "unread"),
                                               ReceiptOf(ab, "bob", "b1", 1, 1),
                                               ToConversation(ac, "alice", "boom-1", "boom")},
                    &results)
            .code() == Code::kInternal);
  RawExec(path, "DROP TRIGGER fail_boom");
  AppendResult after = CommitOne(store, ReceiptOf(ab, "bob", "b1", 1, 1));
  REQUIRE(after.status.ok());
  Result<SyncReply> fresh = SyncOf(store, "bob", {});
  REQUIRE(fresh.ok());
  CHECK(after.unread_total == fresh->unread_total);
  CHECK(after.unread_total == 0);  // the group's message never happened
}

// The writer keeps the lowest watermarks between receipts; a batch that rolls back must not
// leave behind the move one of its receipts made.
TEST_CASE("store: sqlite: a failed batch leaves no move of the lowest watermarks behind") {
  Env env(Kind::kSqlite);
  MessageStore& store = *env.store;
  const std::string path = env.dir.File("chat.db");
  const ConversationId id = CreateGroupOk(store, "alice", {"bob", "carol"});
  SendMany(store, id, "alice", 2, "a");  // seqs 2, 3
  REQUIRE(CommitOne(store, ReceiptOf(id, "alice", "a1", 3, 3)).status.ok());
  REQUIRE(CommitOne(store, ReceiptOf(id, "bob", "b1", 3, 3)).status.ok());
  REQUIRE(CommitOne(store, ReceiptOf(id, "carol", "c1", 2, 2)).all_seq_moved);  // told 2, 2
  RawExec(path,
          "CREATE TRIGGER fail_boom BEFORE INSERT ON log0 WHEN NEW.body = CAST('boom' AS BLOB)"
          " BEGIN SELECT RAISE(ABORT, 'injected failure'); END");
  // carol's receipt makes everybody's lowest 3, then the batch fails.
  std::vector<AppendResult> results;
  CHECK(store
            .Append(std::vector<AppendRequest>{ReceiptOf(id, "carol", "c1", 3, 3),
                                               ToConversation(id, "bob", "boom-1", "boom")},
                    &results)
            .code() == Code::kInternal);
  RawExec(path, "DROP TRIGGER fail_boom");
  SendMany(store, id, "alice", 1, "more");  // seq 4
  AppendResult alice = CommitOne(store, ReceiptOf(id, "alice", "a1", 4, 4));
  REQUIRE(alice.status.ok());
  CHECK(alice.delivered_all_seq == 2);  // carol's receipt never happened
  CHECK(alice.read_all_seq == 2);
  CHECK_FALSE(alice.all_seq_moved);
  CHECK(ToldOf(store, "bob", id) == std::pair<Seq, Seq>{2, 2});
  // What the members heard went with the rollback: carol's move to 3 is news now.
  AppendResult carol = CommitOne(store, ReceiptOf(id, "carol", "c1", 3, 3));
  CHECK(carol.all_seq_moved);
  CHECK(carol.read_all_seq == 3);
}

TEST_CASE("store: sqlite: a resend whose message is missing fails alone, not its batch") {
  Env env(Kind::kSqlite);
  MessageStore& store = *env.store;
  const std::string path = env.dir.File("chat.db");
  const ConversationId ab = OpenDirect(store, "alice", "bob");
  CHECK(CommitOne(store, ToConversation(ab, "alice", "k-1", "first")).message.seq == 2);
  // A damaged file: the message is gone, its idempotency key is still there.
  RawExec(path,
          "DELETE FROM log0 WHERE client_msg_id = 'k-1'; DELETE FROM log1 WHERE client_msg_id = "
          "'k-1'; DELETE FROM messages WHERE client_msg_id = 'k-1'");

  std::vector<AppendRequest> batch = {
      ToConversation(ab, "bob", "k-2", "before"),
      ToConversation(ab, "alice", "k-1", "first"),  // the resend
      ToPeer("alice", "bob", "k-1", "first"),       // the same key through the peer path
      ToConversation(ab, "bob", "k-3", "after"),
  };
  std::vector<AppendResult> results;
  REQUIRE(store.Append(batch, &results).ok());
  REQUIRE(results.size() == 4);
  CHECK(results[0].status.ok());
  CHECK(results[0].message.seq == 3);
  for (size_t i : {1, 2}) {
    CHECK(results[i].status.code() == Code::kDataLoss);
    CHECK(results[i].status.message().find("k-1") != std::string_view::npos);
    CHECK(results[i].message.seq == 0);
    CHECK(results[i].recipients.empty());
  }
  CHECK(results[3].status.ok());
  CHECK(results[3].message.seq == 4);

  Result<HistoryReply> h = HistoryOf(store, "bob", ab, 0, 10);
  REQUIRE(h.ok());
  CHECK(Seqs(h->messages) == std::vector<Seq>{4, 3, 1});
  // alice's unread count starts at her own missing message: it is counted from the nearest
  // stored one below, not an error for her every Sync and receipt.
  CHECK(UnreadOf(store, "alice", ab) == 3);
  AppendResult read = CommitOne(store, ReceiptOf(ab, "alice", "alice-phone", 4, 4));
  CHECK(read.status.ok());
  CHECK(read.conversation.unread == 0);
}

TEST_CASE("store: sqlite: a batch that fails half way leaves nothing of it behind") {
  Env env(Kind::kSqlite);
  MessageStore& store = *env.store;
  const ConversationId ab = OpenDirect(store, "alice", "bob");

  // Another connection makes the insert of one body fail, wherever the store puts it.
  sqlite3* other = nullptr;
  REQUIRE(sqlite3_open(env.dir.File("chat.db").c_str(), &other) == SQLITE_OK);
  for (const char* table : {"log0", "log1", "messages"}) {
    const std::string sql = std::string("CREATE TRIGGER fail_") + table + " BEFORE INSERT ON " +
                            table +
                            " WHEN NEW.body = CAST('boom' AS BLOB) BEGIN SELECT RAISE(ABORT, "
                            "'injected'); END";
    REQUIRE(sqlite3_exec(other, sql.c_str(), nullptr, nullptr, nullptr) == SQLITE_OK);
  }
  // Its first two messages advance ab and create the conversation of alice and carol before
  // the third fails: the whole batch is rolled back.
  std::vector<AppendResult> results;
  const std::vector<AppendRequest> batch = {ToConversation(ab, "bob", "f-1", "reply"),
                                            ToPeer("alice", "carol", "f-2", "hello carol"),
                                            ToPeer("alice", "dave", "f-3", "boom")};
  Status failed = store.Append(batch, &results);
  CHECK(failed.code() == Code::kInternal);
  CHECK(failed.message().find("injected") != std::string_view::npos);
  CHECK(results.empty());
  for (const char* table : {"log0", "log1", "messages"}) {
    const std::string sql = std::string("DROP TRIGGER fail_") + table;
    REQUIRE(sqlite3_exec(other, sql.c_str(), nullptr, nullptr, nullptr) == SQLITE_OK);
  }
  sqlite3_close(other);

  // What the writer remembered of the failed batch went with it: ab goes on at seq 2, and the
  // conversation of alice and carol is created anew.
  AppendResult again = CommitOne(store, ToConversation(ab, "bob", "f-4", "reply again"));
  REQUIRE(again.status.ok());
  CHECK(again.message.seq == 2);
  AppendResult carol = CommitOne(store, ToPeer("alice", "carol", "f-5", "hello again"));
  REQUIRE(carol.status.ok());
  CHECK(carol.created);
  CHECK(carol.message.seq == 1);
  Result<HistoryReply> h = HistoryOf(store, "carol", carol.message.conversation_id, 0, 10);
  REQUIRE(h.ok());
  CHECK(Seqs(h->messages) == std::vector<Seq>{1});
  // And once known, the pair's conversation is found again without creating another.
  AppendResult reply = CommitOne(store, ToPeer("carol", "alice", "f-6", "hi alice"));
  REQUIRE(reply.status.ok());
  CHECK_FALSE(reply.created);
  CHECK(reply.message.conversation_id == carol.message.conversation_id);
  CHECK(reply.message.seq == 2);
}

TEST_CASE("store: sqlite: a locked database makes Append Unavailable and stores nothing") {
  SqliteStoreOptions options;
  options.busy_timeout_ms = 20;
  Env env(Kind::kSqlite, options);
  MessageStore& store = *env.store;
  const ConversationId ab = OpenDirect(store, "alice", "bob");

  sqlite3* other = nullptr;
  REQUIRE(sqlite3_open(env.dir.File("chat.db").c_str(), &other) == SQLITE_OK);
  REQUIRE(sqlite3_exec(other, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) == SQLITE_OK);
  std::vector<AppendResult> results;
  const std::vector<AppendRequest> blocked = {ToConversation(ab, "bob", "l-1", "blocked")};
  Status s = store.Append(blocked, &results);
  CHECK(s.code() == Code::kUnavailable);
  CHECK(results.empty());
  // Readers are not blocked by a writer (WAL).
  Result<HistoryReply> during = HistoryOf(store, "bob", ab, 0, 10);
  CHECK(during.ok());
  REQUIRE(sqlite3_exec(other, "ROLLBACK", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(other);

  AppendResult after = CommitOne(store, ToConversation(ab, "bob", "l-1", "unblocked"));
  CHECK_FALSE(after.duplicate);
  CHECK(after.message.seq == 2);
}

}  // namespace
}  // namespace chat
