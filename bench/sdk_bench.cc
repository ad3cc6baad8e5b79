// The chat-bench workloads that use the SDK in-process instead of speaking the protocol:
//
//   history-gen    builds the history store (messages in many direct conversations) with the
//                  public MessageStore API, in large batches, and lists its conversations;
//   history-store  times MessageStore::History (newest page) directly on that store;
//   receipt-store  times a Receipt's commit (MessageStore::Append) by one member of a channel of
//                  --channel-members members with --unread posts it has not read, and of
//                  --other-conversations direct conversations, in a fresh SQLite store at --store;
//   push-store     times MessageStore::PushTargets for --users users at once (the hub asks for
//                  up to 256 when push windows end), each in --other-conversations direct
//                  conversations, --unread-conversations of them (default all) with unread
//                  messages, in a fresh SQLite store at --store;
//   client         times Client::Send() into the durable outbox, drains the outbox into a chatd,
//                  and times Client::History() pages answered from the local cache. With
//                  --sends 0 and --user it only syncs that user's conversations into a fresh
//                  cache and times cached pages (the history workload's client side).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "chat/auth.h"
#include "chat/client.h"
#include "chat/store.h"

namespace chat::bench {
namespace {

constexpr char kContentType[] = "application/x-chat-bench";

std::string Body(int bytes, uint64_t n) {
  std::string body(static_cast<size_t>(std::max(bytes, 8)), 'x');
  std::snprintf(body.data(), body.size(), "%016llx", static_cast<unsigned long long>(n));
  body[std::min<size_t>(16, body.size() - 1)] = 'x';
  return body;
}

uint64_t Next(uint64_t* state) {
  *state ^= *state << 13;
  *state ^= *state >> 7;
  *state ^= *state << 17;
  return *state;
}

// Lost / duplicated / reordered inside one newest-first page that should hold `expected`
// messages: a gap between neighbours counts as lost, a repeated seq as duplicated, an
// ascending step as reordered.
struct PageCheck {
  int64_t expected = 0;
  int64_t lost = 0;
  int64_t duplicated = 0;
  int64_t reordered = 0;

  void Add(const std::vector<Message>& messages, int64_t want) {
    expected += want;
    if (static_cast<int64_t>(messages.size()) < want) {
      lost += want - static_cast<int64_t>(messages.size());
    }
    for (size_t i = 1; i < messages.size(); ++i) {
      Seq newer = messages[i - 1].seq;
      Seq older = messages[i].seq;
      if (older == newer) {
        ++duplicated;
      } else if (older > newer) {
        ++reordered;
      } else if (older + 1 < newer) {
        lost += static_cast<int64_t>(newer - older - 1);
      }
    }
  }
  bool ok() const { return lost == 0 && duplicated == 0 && reordered == 0; }
  void AddTo(JsonObject& json) const {
    json.Add("expected", expected);
    json.Add("lost", lost);
    json.Add("duplicated", duplicated);
    json.Add("reordered", reordered);
  }
};

int Print(JsonObject& json, bool ok, double cpu0) {
  json.Add("completed", ok);
  json.Add("generator_cpu_s", CpuSecondsSelf() - cpu0);
  std::printf("%s\n", json.str().c_str());
  return ok ? 0 : 1;
}

// Conversations per user in the history store: each user holds this many direct
// conversations, so a History request can pick among them.
constexpr int kConversationsPerUser = 100;

}  // namespace

int RunHistoryGen(const SdkOptions& o) {
  double cpu0 = CpuSecondsSelf();
  JsonObject json;
  json.Add("workload", "history-gen");
  json.Add("conversations", o.conversations);
  json.Add("messages_per_conversation", o.messages_per_conversation);
  json.Add("batch", o.batch);
  json.Add("burst", o.burst);
  json.Add("cache_kib", static_cast<int64_t>(o.cache_size_kib));
  std::error_code ignored;
  std::filesystem::remove(o.store_path, ignored);
  std::filesystem::remove(o.store_path + "-wal", ignored);
  std::filesystem::remove(o.store_path + "-shm", ignored);
  std::filesystem::remove(o.conversations_file, ignored);
  // NORMAL: a crash during generation only means generating again.
  Result<std::shared_ptr<MessageStore>> opened =
      NewSqliteStore({.path = o.store_path,
                      .synchronous_full = false,
                      .cache_size_kib = o.cache_size_kib,
                      .writer_cache_size_kib = o.cache_size_kib});
  if (!opened.ok()) {
    std::fprintf(stderr, "chat-bench: %s\n", opened.status().ToString().c_str());
    return Print(json, false, cpu0);
  }
  std::shared_ptr<MessageStore> store = *opened;
  std::vector<ConversationId> ids(static_cast<size_t>(o.conversations), 0);
  auto user_of = [&](int c) { return o.label + "-u" + std::to_string(c / kConversationsPerUser); };
  auto peer_of = [&](int c) { return o.label + "-p" + std::to_string(c); };
  int64_t t0 = NowNs();
  int64_t now_ms = WallMs();
  MessageId message_id = 1;
  int64_t committed = 0;
  bool ok = true;
  // Where the generator is: in round `round`, conversation `c` gets its messages from index
  // `round * burst` on, `burst` of them (fewer in the last round); then the next conversation.
  struct Position {
    int conversation;
    int index;  // 0-based index of the message in its conversation: seq = index + 1
  };
  const int burst = std::max(1, std::min(o.burst, o.messages_per_conversation));
  const int rounds = (o.messages_per_conversation + burst - 1) / burst;
  int round = 0;
  int c = 0;
  int in_burst = 0;
  std::vector<AppendRequest> batch;
  std::vector<AppendResult> results;
  std::vector<Position> positions;
  const auto batch_max = static_cast<size_t>(std::max(o.batch, 1));
  while (ok && round < rounds) {
    batch.clear();
    positions.clear();
    while (batch.size() < batch_max && round < rounds) {
      const int index = round * burst + in_burst;
      AppendRequest& r = batch.emplace_back();
      positions.push_back({c, index});
      // The two sides take turns, the user first.
      const bool from_peer = index % 2 == 1;
      r.sender = from_peer ? peer_of(c) : user_of(c);
      if (ids[static_cast<size_t>(c)] != 0) {
        r.conversation_id = ids[static_cast<size_t>(c)];
      } else {
        r.peer = from_peer ? user_of(c) : peer_of(c);
      }
      r.sender_device = "gen";
      char id[64];
      // Time-ordered like the client SDK's ids (message ids grow with time).
      std::snprintf(id, sizeof id, "%012llx-gen-%09d-%06d",
                    static_cast<unsigned long long>(message_id), c, index);
      r.client_msg_id = id;
      r.message_id = message_id++;
      r.server_time_ms = now_ms;
      r.content_type = kContentType;
      r.body = Body(o.body_bytes, static_cast<uint64_t>(r.message_id));
      if (++in_burst == burst || index + 1 == o.messages_per_conversation) {
        in_burst = 0;
        if (++c == o.conversations) {
          c = 0;
          ++round;
        }
      }
    }
    results.clear();
    Status status = store->Append(batch, &results);
    if (!status.ok()) {
      std::fprintf(stderr, "chat-bench: Append: %s\n", status.ToString().c_str());
      ok = false;
      break;
    }
    for (size_t k = 0; k < batch.size() && ok; ++k) {
      const Position& at = positions[k];
      const AppendResult& result = results[k];
      if (!result.status.ok() || result.message.seq != static_cast<Seq>(at.index + 1)) {
        std::fprintf(stderr, "chat-bench: conversation %d message %d: %s (seq %llu)\n",
                     at.conversation, at.index, result.status.ToString().c_str(),
                     static_cast<unsigned long long>(result.message.seq));
        ok = false;
        break;
      }
      ids[static_cast<size_t>(at.conversation)] = result.message.conversation_id;
      ++committed;
    }
  }
  store.reset();
  double seconds = static_cast<double>(NowNs() - t0) / 1e9;
  if (ok) {
    // Written last: its presence tells bench/run.sh that the store is complete.
    std::ofstream out(o.conversations_file + ".tmp");
    for (int k = 0; k < o.conversations; ++k) {
      out << user_of(k) << " " << ids[static_cast<size_t>(k)] << "\n";
    }
    out.close();
    std::filesystem::rename(o.conversations_file + ".tmp", o.conversations_file, ignored);
    ok = !ignored;
  }
  json.Add("messages", committed);
  json.Add("seconds", seconds);
  json.Add("messages_per_s", seconds > 0 ? static_cast<double>(committed) / seconds : 0.0);
  std::error_code size_error;
  auto bytes = std::filesystem::file_size(o.store_path, size_error);
  json.Add("store_bytes", size_error ? int64_t{-1} : static_cast<int64_t>(bytes));
  json.Add("lost", int64_t{0});
  json.Add("duplicated", int64_t{0});
  json.Add("reordered", int64_t{0});
  return Print(json, ok, cpu0);
}

namespace {

std::vector<std::pair<std::string, ConversationId>> ReadConversations(const std::string& path) {
  std::vector<std::pair<std::string, ConversationId>> out;
  std::ifstream in(path);
  std::string user;
  ConversationId id = 0;
  while (in >> user >> id) out.emplace_back(user, id);
  return out;
}

}  // namespace

namespace {

// Drops the store file's pages from the kernel's page cache, so the next reads come from the
// disk as on a server that has just started. Dirty pages cannot be dropped, so it syncs first.
bool EvictFromPageCache(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = fdatasync(fd) == 0 && posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0;
  close(fd);
  return ok;
}

// Reads the whole file once, sequentially, so its pages are in the kernel's page cache as on a
// long-running server whose hot file is cached. Returns false if it cannot be read.
bool WarmPageCache(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  std::vector<char> buffer(size_t{1} << 20);
  ssize_t n = 0;
  while ((n = read(fd, buffer.data(), buffer.size())) > 0) {
  }
  close(fd);
  return n == 0;
}

int64_t ThreadCpuNs() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// One pass of `reads` newest pages of random conversations (the same sequence every pass):
// wall time and this thread's CPU time per call.
struct ReadPass {
  Histogram wall;
  Histogram cpu;
  double seconds = 0;
};

bool RunReads(MessageStore& store,
              const std::vector<std::pair<std::string, ConversationId>>& conversations,
              const SdkOptions& o, PageCheck* check, ReadPass* pass) {
  uint64_t random = 0x2545F4914F6CDD1DULL;
  int64_t t0 = NowNs();
  for (int i = 0; i < o.reads; ++i) {
    const auto& [user, id] = conversations[Next(&random) % conversations.size()];
    HistoryQuery query{.user = user, .conversation_id = id, .limit = static_cast<uint32_t>(o.page)};
    int64_t cpu_start = ThreadCpuNs();
    int64_t start = NowNs();
    Result<HistoryReply> reply = store.History(query);
    pass->wall.Record(NowNs() - start);
    pass->cpu.Record(ThreadCpuNs() - cpu_start);
    if (!reply.ok()) {
      std::fprintf(stderr, "chat-bench: History: %s\n", reply.status().ToString().c_str());
      return false;
    }
    check->Add(reply->messages,
               std::min<int64_t>(o.page, static_cast<int64_t>(o.messages_per_conversation)));
  }
  pass->seconds = static_cast<double>(NowNs() - t0) / 1e9;
  return true;
}

}  // namespace

// Two passes over the same random conversations: "cold" right after dropping the file from the
// kernel's page cache (every page comes from the disk the first time it is read), then "warm"
// after reading the whole file once (a long-running server's page cache holds its hot file).
// The warm pass is history_call, the figure the target is compared with; both are reported.
int RunHistoryStore(const SdkOptions& o) {
  double cpu0 = CpuSecondsSelf();
  JsonObject json;
  json.Add("workload", "history-store");
  json.Add("page", o.page);
  json.Add("reads", o.reads);
  json.Add("cache_kib", static_cast<int64_t>(o.cache_size_kib));
  json.Add("mmap_bytes", static_cast<int64_t>(o.mmap_size_bytes));
  std::vector<std::pair<std::string, ConversationId>> conversations =
      ReadConversations(o.conversations_file);
  if (conversations.empty() || !EvictFromPageCache(o.store_path)) {
    std::fprintf(stderr, "chat-bench: no store or no conversations list\n");
    return Print(json, false, cpu0);
  }
  Result<std::shared_ptr<MessageStore>> opened =
      NewSqliteStore({.path = o.store_path,
                      .cache_size_kib = o.cache_size_kib,
                      .writer_cache_size_kib = o.cache_size_kib,
                      .mmap_size_bytes = o.mmap_size_bytes});
  if (!opened.ok()) {
    std::fprintf(stderr, "chat-bench: %s\n", opened.status().ToString().c_str());
    return Print(json, false, cpu0);
  }
  MessageStore& store = **opened;
  json.Add("conversations", static_cast<int64_t>(conversations.size()));
  json.Add("messages_per_conversation", o.messages_per_conversation);
  PageCheck check;
  ReadPass cold;
  bool ok = RunReads(store, conversations, o, &check, &cold);
  int64_t warm_start = NowNs();
  ok = ok && WarmPageCache(o.store_path);
  json.Add("warmup_s", static_cast<double>(NowNs() - warm_start) / 1e9);
  ReadPass warm;
  ok = ok && RunReads(store, conversations, o, &check, &warm);
  json.Raw("history_call", warm.wall.Json());
  json.Raw("history_call_cpu", warm.cpu.Json());
  json.Add("pages_per_s", warm.seconds > 0 ? static_cast<double>(o.reads) / warm.seconds : 0.0);
  json.Raw("history_call_cold", cold.wall.Json());
  json.Raw("history_call_cold_cpu", cold.cpu.Json());
  check.AddTo(json);
  return Print(json, ok && check.ok(), cpu0);
}

namespace {

// One change by `actor` for the receipt-store workload.
AppendRequest ChannelOp(ConversationOp op, ConversationId id, const UserId& actor, uint64_t n) {
  AppendRequest r;
  r.op = op;
  r.conversation_id = id;
  r.sender = actor;
  r.sender_device = actor + "-phone";
  r.message_id = 2 * n + 1;
  r.spare_message_id = 2 * n + 2;
  r.server_time_ms = 1'700'000'000'000 + static_cast<int64_t>(n);
  r.kind = MessageKind::kSystem;
  r.max_channel_members = 1'000'000;
  return r;
}

bool CommitOk(MessageStore& store, AppendRequest request, AppendResult* result) {
  std::vector<AppendRequest> batch = {std::move(request)};
  std::vector<AppendResult> results;
  Status s = store.Append(batch, &results);
  if (!s.ok() || results.size() != 1 || !results[0].status.ok()) {
    std::fprintf(stderr, "chat-bench: %s\n",
                 (s.ok() ? results.at(0).status : s).ToString().c_str());
    return false;
  }
  *result = std::move(results[0]);
  return true;
}

// Appends `count` user messages in batches of 1,000; `make(i)` addresses the i-th (its id
// number is *n, counted up first), which gets a client_msg_id, content type and body here.
template <typename Make>
bool AppendMessages(MessageStore& store, const SdkOptions& o, int count, uint64_t* n, Make make) {
  for (int i = 0; i < count;) {
    std::vector<AppendRequest> batch;
    for (; batch.size() < 1000 && i < count; ++i) {
      ++*n;
      AppendRequest message = make(i);
      message.kind = MessageKind::kUser;
      message.client_msg_id = "m-" + std::to_string(*n) + "-0123456789abcdef";
      message.content_type = kContentType;
      message.body = Body(o.body_bytes, *n);
      batch.push_back(std::move(message));
    }
    std::vector<AppendResult> results;
    Status s = store.Append(batch, &results);
    if (!s.ok() || !std::all_of(results.begin(), results.end(),
                                [](const AppendResult& r) { return r.status.ok(); })) {
      return false;
    }
  }
  return true;
}

}  // namespace

// A channel of o.members members (added 5,000 per change), then o.reads Receipts by one of
// them, alternately moving its delivered watermark and moving nothing, each its own commit.
int RunReceiptStore(const SdkOptions& o) {
  double cpu0 = CpuSecondsSelf();
  JsonObject json;
  json.Add("workload", "receipt-store");
  json.Add("members", o.members);
  json.Add("reads", o.reads);
  std::filesystem::remove(o.store_path);
  Result<std::shared_ptr<MessageStore>> opened = NewSqliteStore({.path = o.store_path});
  if (!opened.ok()) {
    std::fprintf(stderr, "chat-bench: %s\n", opened.status().ToString().c_str());
    return Print(json, false, cpu0);
  }
  MessageStore& store = **opened;
  uint64_t n = 0;
  AppendRequest create = ChannelOp(ConversationOp::kCreateGroup, 0, "owner", ++n);
  create.group_kind = ConversationKind::kChannel;
  create.title = "receipts";
  create.users = {"viewer"};
  AppendResult created;
  bool ok = CommitOk(store, create, &created);
  const ConversationId id = created.message.conversation_id;
  for (int added = 2; ok && added < o.members;) {
    AppendRequest add = ChannelOp(ConversationOp::kAddMembers, id, "owner", ++n);
    for (int k = 0; k < 5000 && added < o.members; ++k, ++added) {
      add.users.push_back("member" + std::to_string(added));
    }
    AppendResult done;
    ok = CommitOk(store, std::move(add), &done);
  }
  // The owner's posts, all unread by the viewer: what its unread count has to count.
  ok = ok && AppendMessages(store, o, o.unread, &n,
                            [&](int) { return ChannelOp(ConversationOp::kNone, id, "owner", n); });
  json.Add("unread", o.unread);
  // The viewer's other conversations, each with a message it has not read: the reply to every
  // receipt carries the viewer's unread total over all of them.
  ok = ok && AppendMessages(store, o, o.other_conversations, &n, [&](int k) {
         AppendRequest hello = ChannelOp(ConversationOp::kNone, 0, "peer" + std::to_string(k), n);
         hello.peer = "viewer";
         return hello;
       });
  json.Add("other_conversations", o.other_conversations);
  Histogram wall;
  for (int i = 0; ok && i < o.reads; ++i) {
    AppendRequest receipt = ChannelOp(ConversationOp::kReceipt, id, "viewer", ++n);
    receipt.kind = MessageKind::kUser;
    receipt.delivered_seq = 1 + static_cast<Seq>(i % 2);
    receipt.read_seq = 1;
    AppendResult done;
    const int64_t start = NowNs();
    ok = CommitOk(store, std::move(receipt), &done);
    wall.Record(NowNs() - start);
  }
  json.Raw("receipt_commit", wall.Json());
  return Print(json, ok, cpu0);
}

// o.users users, each in o.other_conversations direct conversations (with the same peers), each
// conversation one message of the user's and then two of its peer's: two unread, counted above
// the user's own message (or, past the first o.unread_conversations when that is not -1, the
// user's answer after them: nothing unread). Then o.reads MessageStore::PushTargets calls, each for
// every user at once, as the hub asks for the tokens and badges of the users whose push windows
// ended.
int RunPushStore(const SdkOptions& o) {
  double cpu0 = CpuSecondsSelf();
  JsonObject json;
  json.Add("workload", "push-store");
  json.Add("users", o.users);
  json.Add("other_conversations", o.other_conversations);
  json.Add("unread_conversations", o.unread_conversations);
  json.Add("cache_kib", static_cast<int64_t>(o.cache_size_kib));
  json.Add("mmap_bytes", static_cast<int64_t>(o.mmap_size_bytes));
  json.Add("reads", o.reads);
  if (o.users < 1 || o.other_conversations < 1) {
    std::fprintf(stderr, "chat-bench: push-store needs --users and --other-conversations >= 1\n");
    return Print(json, false, cpu0);
  }
  std::filesystem::remove(o.store_path);
  // The reader page cache and memory map as --cache-kib and --mmap-bytes say (a badge reads a
  // row or two of each conversation: a large store's pages mostly come from the kernel).
  Result<std::shared_ptr<MessageStore>> opened =
      NewSqliteStore({.path = o.store_path,
                      .cache_size_kib = o.cache_size_kib,
                      .mmap_size_bytes = o.mmap_size_bytes});
  if (!opened.ok()) {
    std::fprintf(stderr, "chat-bench: %s\n", opened.status().ToString().c_str());
    return Print(json, false, cpu0);
  }
  MessageStore& store = **opened;
  std::vector<UserId> users;
  for (int i = 0; i < o.users; ++i) users.push_back("user" + std::to_string(i));
  const int conversations = o.users * o.other_conversations;
  // Conversation i is between user i % users and peer i / users, so a user's conversations are
  // spread over the table as those of a server's users are, not next to each other.
  auto user_of = [&](int i) { return users[static_cast<size_t>(i % o.users)]; };
  auto peer_of = [&](int i) { return "peer" + std::to_string(i / o.users); };
  uint64_t n = 0;
  const int64_t build_start = NowNs();
  bool ok = AppendMessages(store, o, conversations, &n, [&](int i) {
    AppendRequest hello = ChannelOp(ConversationOp::kNone, 0, user_of(i), n);
    hello.peer = peer_of(i);
    return hello;
  });
  for (int round = 0; round < 2; ++round) {
    ok = ok && AppendMessages(store, o, conversations, &n, [&](int i) {
           AppendRequest reply = ChannelOp(ConversationOp::kNone, 0, peer_of(i), n);
           reply.peer = user_of(i);
           return reply;
         });
  }
  // The user answers in the conversations past the first `unread` of each (none by default),
  // which leaves nothing unread there.
  const int unread = o.unread_conversations < 0
                         ? o.other_conversations
                         : std::min(o.unread_conversations, o.other_conversations);
  const int first_read = unread * o.users;
  ok = ok && AppendMessages(store, o, conversations - first_read, &n, [&](int i) {
         AppendRequest answer = ChannelOp(ConversationOp::kNone, 0, user_of(first_read + i), n);
         answer.peer = peer_of(first_read + i);
         return answer;
       });
  json.Add("build_s", static_cast<double>(NowNs() - build_start) / 1e9);
  Histogram wall;
  Histogram cpu;
  int64_t wall_total = 0;
  int64_t wrong = 0;  // badges other than the two unread of each conversation
  for (int i = 0; ok && i < o.reads; ++i) {
    const int64_t cpu_start = ThreadCpuNs();
    const int64_t start = NowNs();
    Result<std::vector<PushTarget>> targets = store.PushTargets(users);
    const int64_t took = NowNs() - start;
    wall.Record(took);
    cpu.Record(ThreadCpuNs() - cpu_start);
    wall_total += took;
    if (!targets.ok() || targets->size() != users.size()) {
      std::fprintf(stderr, "chat-bench: PushTargets: %s\n",
                   targets.ok() ? "a user is missing" : targets.status().ToString().c_str());
      ok = false;
      break;
    }
    for (const PushTarget& target : *targets) {
      if (target.unread_total != 2 * static_cast<uint64_t>(unread)) ++wrong;
    }
  }
  json.Raw("push_targets_call", wall.Json());
  json.Raw("push_targets_call_cpu", cpu.Json());
  const double calls_users = static_cast<double>(std::max(o.reads, 1)) * o.users;
  json.Add("us_per_user", static_cast<double>(wall_total) / 1000.0 / calls_users);
  json.Add("wrong_badges", wrong);
  return Print(json, ok && wrong == 0, cpu0);
}

namespace {

// Counts the client's events; everything runs on the thread calling Poll().
class CountingListener : public ClientListener {
 public:
  void OnConnectionState(ConnectionState now) override { state = now; }
  void OnMessage(const MessageEvent& event) override {
    if (event.status == MessageStatus::kSent && mine.count(event.message.client_msg_id) > 0) {
      ++sent;
      conversation = event.message.conversation_id;
    } else if (event.status == MessageStatus::kFailed) {
      ++failed;
    } else if (event.status == MessageStatus::kSent) {
      ++received;
    }
  }
  void OnError(const Status& status) override {
    ++errors;
    std::fprintf(stderr, "chat-bench: client error: %s\n", status.ToString().c_str());
  }

  ConnectionState state = ConnectionState::kDisconnected;
  int64_t sent = 0;
  int64_t failed = 0;
  int64_t received = 0;
  int64_t errors = 0;
  ConversationId conversation = 0;
  std::set<std::string> mine;  // client_msg_ids of this run's Send() calls
};

// Polls until `done` or the timeout; false on timeout.
template <typename Done>
bool PollUntil(Client& client, double timeout_s, Done done) {
  int64_t deadline = NowNs() + static_cast<int64_t>(timeout_s * 1e9);
  while (!done()) {
    if (NowNs() > deadline) return false;
    if (!client.Poll(10).ok()) return false;
  }
  return true;
}

}  // namespace

int RunClient(const SdkOptions& o) {
  double cpu0 = CpuSecondsSelf();
  JsonObject json;
  json.Add("workload", "client");
  json.Add("sends", o.sends);
  json.Add("reads", o.reads);
  json.Add("page", o.page);
  json.Add("server", o.url.empty() ? "absent" : "present (" + o.url + ")");
  std::ifstream secret_in(o.secret_file);
  std::stringstream secret_text;
  secret_text << secret_in.rdbuf();
  std::string secret = secret_text.str();
  while (!secret.empty() && std::isspace(static_cast<unsigned char>(secret.back()))) {
    secret.pop_back();
  }
  char dir_template[] = "/tmp/chat-bench-client-XXXXXX";
  const char* dir = mkdtemp(dir_template);
  if (dir == nullptr) return Print(json, false, cpu0);
  std::string user = o.user.empty() ? o.label + "-me" : o.user;
  auto listener = std::make_shared<CountingListener>();
  ClientOptions options;
  options.url = o.url.empty() ? "ws://127.0.0.1:9" : o.url;
  options.token_provider = [secret, user] {
    Result<std::string> token = SignJwt(secret, "", user, WallMs(), 24LL * 3600 * 1000);
    return token.ok() ? *token : std::string();
  };
  options.device_id = "bench";
  options.cache_path = std::string(dir) + "/cache.db";
  options.listener = listener;
  options.outbox_max = static_cast<size_t>(std::max(o.sends, 1)) + 16;
  Result<std::unique_ptr<Client>> opened = Client::Open(std::move(options));
  if (!opened.ok()) {
    std::fprintf(stderr, "chat-bench: Client::Open: %s\n", opened.status().ToString().c_str());
    std::filesystem::remove_all(dir);
    return Print(json, false, cpu0);
  }
  Client& client = **opened;
  bool ok = true;
  PageCheck check;

  // 1. Send() into the outbox while the client's loop does not run: no network I/O, only the
  // cache write each call commits.
  if (o.sends > 0) {
    Histogram send_call;
    std::string peer = o.label + "-peer";
    int64_t t0 = NowNs();
    for (int i = 0; i < o.sends && ok; ++i) {
      std::string body = Body(o.body_bytes, static_cast<uint64_t>(i));
      int64_t start = NowNs();
      Result<std::string> id = client.SendTo(peer, kContentType, body);
      send_call.Record(NowNs() - start);
      if (id.ok()) {
        listener->mine.insert(*id);
      } else {
        std::fprintf(stderr, "chat-bench: Send: %s\n", id.status().ToString().c_str());
        ok = false;
      }
    }
    double seconds = static_cast<double>(NowNs() - t0) / 1e9;
    json.Raw("send_call", send_call.Json());
    json.Add("sends_per_s", seconds > 0 ? static_cast<double>(send_call.count()) / seconds : 0.0);
  }
  // 2. Connect (when there is a server): the outbox drains, or the user's conversations sync.
  if (ok && !o.url.empty()) {
    int64_t t0 = NowNs();
    ok = PollUntil(client, o.timeout_s, [&] {
      return listener->state == ConnectionState::kConnected &&
             listener->sent + listener->failed >= o.sends;
    });
    json.Add("connect_and_drain_s", static_cast<double>(NowNs() - t0) / 1e9);
    json.Add("outbox_acked", listener->sent);
    json.Add("outbox_failed", listener->failed);
    json.Add("synced_messages", listener->received);
    if (listener->failed > 0) ok = false;
    check.expected += o.sends;
    check.lost += o.sends - listener->sent - listener->failed;
  }
  // 3. Newest-page reads from the cache, over every cached conversation in turn.
  if (ok && !o.url.empty() && o.reads > 0) {
    Result<std::vector<ConversationInfo>> cached = client.Conversations();
    std::vector<ConversationInfo> conversations;
    if (cached.ok()) {
      for (const ConversationInfo& info : *cached) {
        if (info.last_seq > 0) conversations.push_back(info);
      }
    }
    json.Add("cached_conversations", static_cast<int64_t>(conversations.size()));
    if (conversations.empty()) ok = false;
    Histogram read_call;
    int64_t from_cache = 0;
    uint64_t random = 0x9E3779B97F4A7C15ULL;
    for (int i = 0; i < o.reads && ok; ++i) {
      const ConversationInfo& info = conversations[Next(&random) % conversations.size()];
      bool answered = false;
      int64_t start = NowNs();
      Status status =
          client.History(info.conversation_id, 0, static_cast<uint32_t>(o.page),
                         [&](Result<HistoryResult> result) {
                           read_call.Record(NowNs() - start);
                           answered = true;
                           if (!result.ok()) {
                             ok = false;
                             return;
                           }
                           if (result->from_cache) ++from_cache;
                           check.Add(result->messages, std::min<int64_t>(o.page, info.last_seq));
                         });
      if (!status.ok()) ok = false;
      while (ok && !answered) {
        if (!client.Poll(0).ok()) ok = false;
      }
    }
    json.Raw("cached_history_call", read_call.Json());
    json.Add("pages_from_cache", from_cache);
    if (from_cache != read_call.count()) ok = false;
  }
  json.Add("client_errors", listener->errors);
  check.AddTo(json);
  client.Close();
  opened->reset();
  std::filesystem::remove_all(dir);
  return Print(json, ok && check.ok(), cpu0);
}

}  // namespace chat::bench
