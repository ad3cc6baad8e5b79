// MessageStore conformance: every case runs against the memory store and the SQLite store,
// which must be indistinguishable to the server. SQLite-only cases (durability, epoch, schema
// versions, concurrency, failed transactions) follow.

#include <sqlite3.h>

#include <atomic>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "chat/store.h"
#include "doctest/doctest.h"
#include "tests/testing/temp_dir.h"

namespace chat {
namespace {

using testing::TempDir;

enum class Kind { kMemory, kSqlite };

// A store of the given kind; the SQLite one lives in a private temp dir removed afterwards.
struct Env {
  explicit Env(Kind kind, SqliteStoreOptions options = {}) {
    if (kind == Kind::kMemory) {
      store = NewMemoryStore();
      return;
    }
    options.path = dir.File("chat.db");
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
  TEST_CASE("store: sqlite: " title) { fn(Kind::kSqlite); }

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
  };
  std::vector<AppendResult> results = Commit(store, batch);
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
  CHECK(info.unread == 4);  // alice's four; bob's own message does not count
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

Result<std::shared_ptr<MessageStore>> OpenAt(const std::string& path) {
  SqliteStoreOptions options;
  options.path = path;
  return NewSqliteStore(options);
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
  CHECK(newer.status().message() == "schema version 99 is newer than this build supports (1)");
  RawExec(path, "PRAGMA user_version = 1");
  Result<std::shared_ptr<MessageStore>> again = OpenAt(path);
  REQUIRE(again.ok());
  CHECK((*again)->Members(1).ok());
}

TEST_CASE("store: sqlite: bad options and unusable files are refused") {
  TempDir dir;
  Result<std::shared_ptr<MessageStore>> empty = NewSqliteStore({});
  CHECK(empty.status().code() == Code::kInvalidArgument);
  CHECK(empty.status().message() == "path is required");

  SqliteStoreOptions no_readers;
  no_readers.path = dir.File("chat.db");
  no_readers.reader_connections = 0;
  Result<std::shared_ptr<MessageStore>> zero = NewSqliteStore(no_readers);
  CHECK(zero.status().code() == Code::kInvalidArgument);
  CHECK(zero.status().message() == "reader_connections must be at least 1");

  Result<std::shared_ptr<MessageStore>> no_dir = OpenAt(dir.File("missing/chat.db"));
  CHECK(no_dir.status().code() == Code::kUnavailable);

  const std::string junk = dir.File("junk.db");
  REQUIRE(testing::WriteFile(junk, std::string(4096, 'j')));
  Result<std::shared_ptr<MessageStore>> not_db = OpenAt(junk);
  CHECK(not_db.status().code() == Code::kDataLoss);
}

TEST_CASE("store: sqlite: readers see consistent snapshots while the writer appends") {
  SqliteStoreOptions options;
  options.reader_connections = 2;
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
  for (int b = 0; b < kBatches; ++b) {
    std::vector<AppendRequest> batch;
    for (int i = 0; i < kPerBatch; ++i) {
      batch.push_back(ToConversation(id, b % 2 ? "alice" : "bob",
                                     "c-" + std::to_string(b) + "-" + std::to_string(i), "x"));
    }
    std::vector<AppendResult> results;
    CHECK(store.Append(batch, &results).ok());
  }
  done = true;
  r1.join();
  r2.join();
  CHECK(failures.load() == 0);
  CHECK(reads.load() > 0);
  Result<HistoryReply> h = HistoryOf(store, "alice", id, 0, 1);
  REQUIRE(h.ok());
  CHECK(h->messages[0].seq == 1 + kBatches * kPerBatch);
}

TEST_CASE("store: sqlite: a failed transaction stores nothing of the batch") {
  Env env(Kind::kSqlite);
  MessageStore& store = *env.store;
  const std::string path = env.dir.File("chat.db");
  const ConversationId ab = OpenDirect(store, "alice", "bob");

  // The third item fails inside SQLite after the first two were written in the transaction.
  RawExec(path,
          "CREATE TRIGGER fail_boom BEFORE INSERT ON messages WHEN NEW.body = CAST('boom' AS BLOB)"
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
