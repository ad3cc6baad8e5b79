// RunSyncMany (src/server/store_common.h): several Syncs in one snapshot read each message range
// once, and every reply is what RunSync alone returns. A fake source of conversations, members
// and stored messages counts the range reads it serves.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "src/server/store_common.h"
#include "tests/testing/sync_replies.h"

namespace chat::server {
namespace {

struct FakeConversation {
  Seq last_seq = 0;
  std::set<Seq> stored;  // holes allowed (retention, a test's choice)
  size_t body_bytes = 10;
};

struct FakeMember {
  Seq joined_seq = 0;
  Seq removed_at_seq = 0;
};

class FakeSource final : public ReadSource {
 public:
  // Conversation `id` with messages 1..last_seq stored.
  void AddConversation(ConversationId id, Seq last_seq, size_t body_bytes = 10) {
    FakeConversation& c = conversations[id];
    c.last_seq = last_seq;
    c.body_bytes = body_bytes;
    for (Seq seq = 1; seq <= last_seq; ++seq) c.stored.insert(seq);
  }

  Status UserConversations(const UserId& user, std::vector<ConversationHead>* out) override {
    auto it = members.find(user);
    if (it == members.end()) return Status::Ok();
    for (const auto& [id, m] : it->second) {
      const FakeConversation& c = conversations.at(id);
      out->push_back({.conversation_id = id,
                      .last_seq = c.last_seq,
                      .first_seq = c.stored.empty() ? 0 : *c.stored.begin(),
                      .joined_seq = m.joined_seq,
                      .removed_at_seq = m.removed_at_seq});
    }
    return Status::Ok();
  }
  Result<ConversationInfo> Describe(ConversationId id, const UserId& user,
                                    const DeviceId& /*device*/, bool /*count_unread*/) override {
    if (user == failing_user) {
      storage_failed = true;
      return Unavailable("disk I/O error");
    }
    const FakeMember& m = members.at(user).at(id);
    ConversationInfo info;
    info.conversation_id = id;
    info.kind = ConversationKind::kGroup;
    info.last_seq = conversations.at(id).last_seq;
    if (m.removed_at_seq != 0) info.last_seq = std::min(info.last_seq, m.removed_at_seq);
    info.removed_at_seq = m.removed_at_seq;
    info.unread = info.last_seq % 7;
    return info;
  }
  Status ReadAscending(ConversationId id, Seq from_seq, Seq to_seq, size_t max,
                       std::vector<Message>* out) override {
    ++reads;
    const FakeConversation& c = conversations.at(id);
    for (auto it = c.stored.lower_bound(from_seq); it != c.stored.end() && *it <= to_seq && max > 0;
         ++it, --max) {
      ++messages_read;
      Message m;
      m.conversation_id = id;
      m.seq = *it;
      m.body = std::string(c.body_bytes, 'b') + std::to_string(*it);
      out->push_back(std::move(m));
    }
    return Status::Ok();
  }

  // RunSync reads nothing else.
  Result<Membership> GetMembership(ConversationId, const UserId&) override { return Unused(); }
  Result<ConversationHead> Head(ConversationId) override { return Unused(); }
  Status ReadDescending(ConversationId, Seq, size_t, std::vector<Message>*) override {
    return Unused();
  }
  Status Watermarks(ConversationId, const UserId&, std::vector<MemberReceipt>*) override {
    return Unused();
  }
  Result<bool> SharesConversation(const UserId&, const UserId&) override { return Unused(); }
  Result<int64_t> LastSeen(const UserId&) override { return Unused(); }
  Status PushTokens(const UserId&, std::vector<PushToken>*) override { return Unused(); }

  std::map<ConversationId, FakeConversation> conversations;
  std::map<UserId, std::map<ConversationId, FakeMember>> members;
  UserId failing_user;  // Describe fails for this user, as a storage error would
  bool storage_failed = false;
  int reads = 0;
  size_t messages_read = 0;

 private:
  static Status Unused() { return Internal("not used by RunSync"); }
};

constexpr ConversationId kGroup = 7;

SyncQuery Query(const std::string& user, Seq cursor, uint32_t limit) {
  SyncQuery q{.user = user, .device = user + "-phone", .cursors = {}, .limit = limit};
  if (cursor > 0) q.cursors.push_back({kGroup, cursor});
  return q;
}

struct Run {
  int reads = 0;      // range reads the merged run made
  size_t merged = 0;  // range reads answered from the memo
};

// Runs `queries` together on `source` and checks every reply against RunSync alone.
Run RunAndCompare(FakeSource& source, const std::vector<SyncQuery>& queries) {
  source.reads = 0;
  std::vector<std::optional<Result<SyncReply>>> replies(queries.size());
  Run run;
  run.merged = RunSyncMany(source, queries, [&](size_t i, Result<SyncReply> reply) {
    REQUIRE(i < replies.size());
    REQUIRE_FALSE(replies[i].has_value());
    replies[i] = std::move(reply);
  });
  run.reads = source.reads;
  for (size_t i = 0; i < queries.size(); ++i) {
    CAPTURE(i);
    REQUIRE(replies[i].has_value());
    testing::CheckSameSyncReply(*replies[i], RunSync(source, queries[i]));
  }
  return run;
}

// `users` members of kGroup (messages 1..last_seq), joined at its start.
FakeSource Group(Seq last_seq, const std::vector<std::string>& users, size_t body_bytes = 10) {
  FakeSource source;
  source.AddConversation(kGroup, last_seq, body_bytes);
  for (const std::string& user : users) source.members[user][kGroup] = {};
  return source;
}

TEST_CASE("sync merge: members catching up from the same or later cursors read the range once") {
  std::vector<std::string> users;
  std::vector<SyncQuery> queries;
  for (int i = 0; i < 5; ++i) {
    users.push_back("same" + std::to_string(i));
    queries.push_back(Query(users.back(), 50, 500));
  }
  for (int i = 0; i < 5; ++i) {
    users.push_back("later" + std::to_string(i));
    queries.push_back(Query(users.back(), 60 + i, 500));
  }
  FakeSource source = Group(100, users);
  const Run run = RunAndCompare(source, queries);
  CHECK(run.reads == 1);
  CHECK(run.merged == 9);
}

TEST_CASE("sync merge: under a byte bound a page reads in chunks, about what it carries") {
  FakeSource source = Group(400, {"a"}, /*body_bytes=*/10'000);
  SyncQuery q = Query("a", 0, 500);
  q.max_bytes = 50'000;  // four or five of these messages
  Result<SyncReply> reply = RunSync(source, q);
  REQUIRE(reply.ok());
  CHECK(reply->has_more);
  CHECK(reply->messages.size() >= 4);
  CHECK(reply->messages.size() <= 5);
  CHECK(source.reads == 1);
  CHECK(source.messages_read == 16);  // the first chunk, not the 500 the page had room for

  // Small messages fill the page through growing chunks (16, 64, 256, then the rest).
  FakeSource small = Group(400, {"a"});
  q.max_bytes = 10'000'000;
  Result<SyncReply> full = RunSync(small, q);
  REQUIRE(full.ok());
  CHECK(full->messages.size() == 400);
  CHECK_FALSE(full->has_more);
  CHECK(small.reads == 4);
  CHECK(small.messages_read == 400);
}

TEST_CASE("sync merge: chunked reads of the same range are shared by the members") {
  std::vector<std::string> users;
  std::vector<SyncQuery> queries;
  for (int i = 0; i < 5; ++i) {
    users.push_back("m" + std::to_string(i));
    queries.push_back(Query(users.back(), 50, 500));
    queries.back().max_bytes = 10'000'000;
  }
  FakeSource source = Group(100, users);
  const Run run = RunAndCompare(source, queries);
  CHECK(run.reads == 2);  // 51..66, then 67..100 (fewer than the 64 asked: done)
  CHECK(run.merged == 8);
}

TEST_CASE("sync merge: a cursor before the copy, or a page the copy cannot fill, reads again") {
  FakeSource source = Group(100, {"a", "b", "c", "d", "e", "f", "g"});
  const std::vector<SyncQuery> queries = {
      Query("a", 50, 500),  // reads 51..100, complete
      Query("b", 10, 20),   // 11..30 lies before the copy: reads, replacing it
      Query("c", 12, 5),    // 13..17 from the new copy (11..30)
      Query("d", 0, 10),    // 1..10 lies before it: reads
      Query("e", 0, 20),    // needs 20, the copy (1..10) was cut by its limit: reads
      Query("f", 5, 15),    // 6..20 from the copy (1..20)
      Query("g", 15, 10),   // 16..25: the copy ends at 20, reads
  };
  const Run run = RunAndCompare(source, queries);
  CHECK(run.reads == 5);
  CHECK(run.merged == 2);
}

TEST_CASE("sync merge: a removed member's capped range is its own, and correct") {
  FakeSource source = Group(100, {"stays", "left"});
  source.members["left"][kGroup].removed_at_seq = 60;
  // Both from cursor 40: the member who left sees up to its removal only.
  const Run run = RunAndCompare(
      source, {Query("stays", 40, 500), Query("left", 40, 500), Query("stranger", 0, 500)});
  CHECK(run.reads == 2);
  CHECK(run.merged == 0);
}

TEST_CASE("sync merge: past the memo's byte bound every range is read on its own") {
  // 20 messages of 1 MiB exceed kMergedReadBytesMax, so the first read is not kept.
  static_assert(kMergedReadBytesMax < 20 * 1024 * 1024);
  FakeSource source = Group(20, {"a", "b", "c"}, 1024 * 1024);
  const Run run =
      RunAndCompare(source, {Query("a", 0, 500), Query("b", 0, 500), Query("c", 0, 500)});
  CHECK(run.reads == 3);
  CHECK(run.merged == 0);
}

// a refused, b fine, c fails in storage, d fine on its own; `lost` says whether c's failure
// ended the snapshot.
std::vector<std::optional<Result<SyncReply>>> RunWithFailure(bool lost) {
  FakeSource source = Group(30, {"a", "b", "c", "d"});
  source.failing_user = "c";
  const std::vector<SyncQuery> queries = {Query("a", 0, 0),  // limit 0: refused
                                          Query("b", 0, 500), Query("c", 0, 500),
                                          Query("d", 0, 500)};
  std::vector<std::optional<Result<SyncReply>>> replies(queries.size());
  RunSyncMany(
      source, queries,
      [&](size_t i, Result<SyncReply> reply) {
        REQUIRE_FALSE(replies[i].has_value());
        replies[i] = std::move(reply);
      },
      // As SQLite's store asks: did the failure take the read transaction with it?
      [&] { return lost && source.storage_failed; });
  for (const auto& reply : replies) REQUIRE(reply.has_value());
  CHECK(replies[0]->status().code() == Code::kInvalidArgument);
  REQUIRE(replies[1]->ok());
  CHECK((*replies[1])->messages.size() == 30);
  CHECK(replies[2]->status().code() == Code::kUnavailable);
  return replies;
}

TEST_CASE("sync merge: a failure is its query's own while the snapshot lasts") {
  auto replies = RunWithFailure(/*lost=*/false);
  REQUIRE(replies[3]->ok());
  CHECK((*replies[3])->messages.size() == 30);
}

TEST_CASE("sync merge: a failure that ended the snapshot answers the rest of the batch") {
  auto replies = RunWithFailure(/*lost=*/true);
  // d's own Sync would succeed, but not from the batch's snapshot.
  CHECK(replies[3]->status().code() == Code::kUnavailable);
  CHECK(replies[3]->status().message() == replies[2]->status().message());
}

TEST_CASE("sync merge: a single query is plain RunSync") {
  FakeSource source = Group(10, {"a"});
  const Run run = RunAndCompare(source, {Query("a", 0, 500)});
  CHECK(run.reads == 1);
  CHECK(run.merged == 0);
}

// Random conversations with holes and retention, members who joined late or were removed,
// strangers, cursors anywhere, small limits and catch-up limits, refused queries: the merged
// replies always equal the lone ones.
TEST_CASE("sync merge: randomized batches answer exactly what each Sync alone answers") {
  std::mt19937_64 rng(12345);
  auto r = [&](uint64_t n) { return n == 0 ? 0 : rng() % n; };
  size_t merged = 0;
  for (int round = 0; round < 1000; ++round) {
    CAPTURE(round);
    FakeSource source;
    const int conversations = 1 + static_cast<int>(r(4));
    for (int c = 1; c <= conversations; ++c) {
      FakeConversation& conv = source.conversations[static_cast<ConversationId>(c)];
      conv.last_seq = r(60);
      // Retention may have removed the oldest, or everything (first above last).
      const Seq first = conv.last_seq == 0 ? 0 : 1 + r(conv.last_seq + 1);
      for (Seq seq = first; seq != 0 && seq <= conv.last_seq; ++seq) {
        if (r(6) != 0) conv.stored.insert(seq);
      }
    }
    const int users = 1 + static_cast<int>(r(6));
    for (int u = 0; u < users; ++u) {
      auto& mine = source.members["u" + std::to_string(u)];
      for (int c = 1; c <= conversations; ++c) {
        if (r(4) == 0) continue;
        const Seq last = source.conversations[static_cast<ConversationId>(c)].last_seq;
        FakeMember m;
        m.joined_seq = r(3) == 0 ? r(last + 2) : 0;
        if (r(3) == 0) m.removed_at_seq = 1 + r(last + 1);
        mine[static_cast<ConversationId>(c)] = m;
      }
    }
    std::vector<SyncQuery> queries;
    const int n = 2 + static_cast<int>(r(12));
    for (int q = 0; q < n; ++q) {
      SyncQuery query;
      query.user = "u" + std::to_string(r(static_cast<uint64_t>(users) + 1));  // or a stranger
      query.device = "d";
      query.limit = static_cast<uint32_t>(r(25));
      if (query.limit == 0 && r(3) != 0) query.limit = 1;  // 0 now and then: refused
      query.catchup_max = static_cast<uint32_t>(1 + r(40));
      for (int c = 1; c <= conversations; ++c) {
        if (r(2) == 0) query.cursors.push_back({static_cast<ConversationId>(c), r(70)});
      }
      queries.push_back(std::move(query));
    }
    merged += RunAndCompare(source, queries).merged;
  }
  MESSAGE("range reads answered from the memo: " << merged);
  CHECK(merged > 0);
}

}  // namespace
}  // namespace chat::server
