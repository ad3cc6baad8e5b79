// Push notifications in the Hub (collapse, online users, preview, device tokens) and the webhook
// notifier against a loopback HTTP and HTTPS receiver.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "chat/log.h"
#include "chat/push.h"
#include "chat/server.h"
#include "chat/store.h"
#include "tests/testing/chatd_process.h"
#include "tests/testing/envelopes.h"
#include "tests/testing/http_receiver.h"
#include "tests/testing/hub_harness.h"
#include "tests/testing/temp_dir.h"

namespace chat::testing {
namespace {

using server::SessionId;

class RecordingNotifier final : public PushNotifier {
 public:
  void Notify(PushNotification notification) override {
    notifications.push_back(std::move(notification));
  }
  std::vector<PushNotification> notifications;
};

struct PushHub {
  explicit PushHub(bool preview = true, std::shared_ptr<MessageStore> store = nullptr)
      : h(Options(notifier, preview, std::move(store))) {}
  static ServerOptions Options(const std::shared_ptr<RecordingNotifier>& notifier, bool preview,
                               std::shared_ptr<MessageStore> store) {
    ServerOptions options;
    options.store = std::move(store);
    options.push = notifier;
    options.push_collapse_ms = 1000;
    options.push_preview = preview;
    return options;
  }
  // Advances the clock and runs the store reads that due notifications wait for (their tokens
  // and badge).
  void Elapse(int64_t ms) {
    h.Advance(ms);
    h.Pump();
  }
  std::shared_ptr<RecordingNotifier> notifier = std::make_shared<RecordingNotifier>();
  HubHarness h;
};

void SendAndCommit(HubHarness& h, SessionId from, uint64_t n, std::string_view peer,
                   std::string_view body) {
  h.SendEnvelope(from, SendToPeer(n, peer, ClientMsgId(n), body));
  h.Pump();
  std::vector<v1::Envelope> got = h.Take(from);
  REQUIRE(got.size() == 1);
  REQUIRE(got[0].has_send_ack());
}

TEST_CASE("push: an offline user gets exactly one collapsed notification per window") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SendAndCommit(p.h, alice, 1, "bob", "one");
  SendAndCommit(p.h, alice, 2, "bob", "two");
  SendAndCommit(p.h, alice, 3, "bob", "three");
  p.Elapse(999);
  CHECK(p.notifier->notifications.empty());
  p.Elapse(1);
  REQUIRE(p.notifier->notifications.size() == 1);
  const PushNotification n = p.notifier->notifications[0];
  CHECK(n.user == "bob");
  CHECK(n.sender == "alice");
  CHECK(n.seq == 3);
  CHECK(n.collapsed == 3);
  CHECK(n.preview == "three");
  CHECK(n.unread_total == 3);  // the badge: everything bob has not read
  CHECK(n.tokens.empty());
  CHECK(n.conversation_id != 0);

  // The window is over: the next message opens a new one.
  p.Elapse(5000);
  CHECK(p.notifier->notifications.size() == 1);
  SendAndCommit(p.h, alice, 4, "bob", "four");
  p.Elapse(1000);
  REQUIRE(p.notifier->notifications.size() == 2);
  CHECK(p.notifier->notifications[1].collapsed == 1);
  CHECK(p.notifier->notifications[1].seq == 4);
  CHECK(p.notifier->notifications[1].conversation_id == n.conversation_id);
}

TEST_CASE("push: each conversation of an offline user has its own window") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SessionId carol = p.h.Connect("carol", "c1");
  SendAndCommit(p.h, alice, 1, "bob", "from alice");
  SendAndCommit(p.h, carol, 2, "bob", "from carol");
  p.Elapse(1000);
  REQUIRE(p.notifier->notifications.size() == 2);
  CHECK(p.notifier->notifications[0].sender != p.notifier->notifications[1].sender);
  CHECK(p.notifier->notifications[0].conversation_id !=
        p.notifier->notifications[1].conversation_id);
}

TEST_CASE("push: an online user and the sender get no notification") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SessionId bob = p.h.Connect("bob", "b1");
  SendAndCommit(p.h, alice, 1, "bob", "hi");
  std::vector<v1::Envelope> got = p.h.Take(bob);
  REQUIRE(got.size() == 1);
  CHECK(got[0].has_deliver());
  p.Elapse(5000);
  CHECK(p.notifier->notifications.empty());
}

TEST_CASE("push: a user who comes online within the window gets no notification") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SendAndCommit(p.h, alice, 1, "bob", "hi");
  p.h.Connect("bob", "b1");
  p.Elapse(1000);
  CHECK(p.notifier->notifications.empty());
}

TEST_CASE("push: a user who comes online and goes again within the window gets no notification") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SendAndCommit(p.h, alice, 1, "bob", "hi");
  // bob's phone connects, syncs what the window holds, and drops before the window ends.
  SessionId bob = p.h.Connect("bob", "b1");
  p.h.Disconnect(bob);
  p.Elapse(5000);
  CHECK(p.notifier->notifications.empty());
  // A message after he left opens a new window, which is pushed.
  SendAndCommit(p.h, alice, 2, "bob", "are you there?");
  p.Elapse(5000);
  REQUIRE(p.notifier->notifications.size() == 1);
  CHECK(p.notifier->notifications[0].preview == "are you there?");
  CHECK(p.notifier->notifications[0].collapsed == 1);
}

// A connection that has said nothing for presence_ttl_ms (60 s) may be gone without a close
// (the idle timeout ends it later): its user counts as offline for push, as for presence.
TEST_CASE("push: a user whose only connection fell silent past the presence TTL is pushed") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SessionId bob = p.h.Connect("bob", "b1");
  // alice keeps talking; bob's phone went into a tunnel 61 s ago.
  for (int i = 0; i < 61; ++i) {
    p.h.Advance(1000);
    p.h.SendEnvelope(alice, MakePing(0, 100 + static_cast<uint64_t>(i)));
  }
  p.h.Take(alice);
  CHECK_FALSE(p.h.closed(bob).has_value());
  SendAndCommit(p.h, alice, 1, "bob", "hi");
  CHECK(p.h.Take(bob).at(0).has_deliver());  // written to the connection all the same
  p.Elapse(1000);
  REQUIRE(p.notifier->notifications.size() == 1);
  CHECK(p.notifier->notifications[0].user == "bob");
  CHECK(p.notifier->notifications[0].preview == "hi");
}

TEST_CASE("push: a window opened after a Hello dropped the last one keeps its full length") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SendAndCommit(p.h, alice, 1, "bob", "first");  // opens a window ending at 1,000 ms
  p.Elapse(100);
  SessionId bob = p.h.Connect("bob", "b1");  // drops it
  p.h.Disconnect(bob);
  p.Elapse(100);
  SendAndCommit(p.h, alice, 2, "bob", "second");  // a new window, ending at 1,200 ms
  p.Elapse(800);                                  // 1,000 ms: the dropped window's end
  CHECK(p.notifier->notifications.empty());
  p.Elapse(200);
  REQUIRE(p.notifier->notifications.size() == 1);
  CHECK(p.notifier->notifications[0].preview == "second");
}

TEST_CASE("push: with preview off the notification carries no body") {
  PushHub p(/*preview=*/false);
  SessionId alice = p.h.Connect("alice", "a1");
  SendAndCommit(p.h, alice, 1, "bob", "secret");
  p.Elapse(1000);
  REQUIRE(p.notifier->notifications.size() == 1);
  CHECK(p.notifier->notifications[0].preview.empty());
  CHECK(p.notifier->notifications[0].collapsed == 1);
}

TEST_CASE("push: a long body's preview is its first 1,024 bytes, cut at a character") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SessionId carol = p.h.Connect("carol", "c1");
  // 1,023 ASCII bytes, then a 3-byte character that would end past the bound.
  SendAndCommit(p.h, alice, 1, "bob", std::string(1023, 'a') + "\xE2\x82\xAC" + "tail");
  SendAndCommit(p.h, carol, 2, "bob", std::string(2000, 'c'));
  p.Elapse(1000);
  REQUIRE(p.notifier->notifications.size() == 2);
  for (const PushNotification& n : p.notifier->notifications) {
    if (n.sender == "alice") CHECK(n.preview == std::string(1023, 'a'));
    if (n.sender == "carol") CHECK(n.preview == std::string(1024, 'c'));
  }
}

v1::Envelope RegisterToken(uint64_t rid, std::string_view platform, std::string_view token) {
  v1::Envelope envelope;
  envelope.set_rid(rid);
  envelope.mutable_register_push_token()->set_platform(std::string(platform));
  envelope.mutable_register_push_token()->set_token(std::string(token));
  return envelope;
}

TEST_CASE("push: registered device tokens are passed with the notification") {
  PushHub p;
  SessionId bob1 = p.h.Connect("bob", "b1");
  SessionId bob2 = p.h.Connect("bob", "b2");
  p.h.SendEnvelope(bob1, RegisterToken(5, "fcm", "token-1"));
  p.h.SendEnvelope(bob2, RegisterToken(6, "apns", "token-2"));
  p.h.Pump();
  for (SessionId s : {bob1, bob2}) {
    std::vector<v1::Envelope> got = p.h.Take(s);
    REQUIRE(got.size() == 1);
    CHECK(got[0].has_ok());
  }
  // Re-registering replaces the device's token; an empty token unregisters the device.
  p.h.SendEnvelope(bob1, RegisterToken(7, "fcm", "token-1b"));
  p.h.SendEnvelope(bob2, RegisterToken(8, "", ""));
  p.h.Pump();
  CHECK(p.h.Take(bob1).at(0).has_ok());
  CHECK(p.h.Take(bob2).at(0).has_ok());
  p.h.Disconnect(bob1);
  p.h.Disconnect(bob2);

  SessionId alice = p.h.Connect("alice", "a1");
  SendAndCommit(p.h, alice, 1, "bob", "hi");
  p.Elapse(1000);
  REQUIRE(p.notifier->notifications.size() == 1);
  const std::vector<PushToken>& tokens = p.notifier->notifications[0].tokens;
  REQUIRE(tokens.size() == 1);
  CHECK(tokens[0].device == "b1");
  CHECK(tokens[0].platform == "fcm");
  CHECK(tokens[0].token == "token-1b");
}

TEST_CASE("push: a token without a platform or too long is INVALID_ARGUMENT") {
  PushHub p;
  SessionId bob = p.h.Connect("bob", "b1");
  p.h.SendEnvelope(bob, RegisterToken(5, "", "token"));
  p.h.SendEnvelope(bob, RegisterToken(6, "fcm", std::string(4097, 'x')));
  p.h.SendEnvelope(bob, RegisterToken(7, std::string(65, 'p'), "token"));
  p.h.Pump();
  std::vector<v1::Envelope> got = p.h.Take(bob);
  REQUIRE(got.size() == 3);
  for (const v1::Envelope& e : got) {
    REQUIRE(e.has_error());
    CHECK(e.error().code() == v1::Error::INVALID_ARGUMENT);
  }
  CHECK(got[0].rid() == 5);
  CHECK(got[1].rid() == 6);
  CHECK(got[2].rid() == 7);
  CHECK_FALSE(p.h.closed(bob).has_value());
}

TEST_CASE("push: the badge is the user's unread total across conversations") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SessionId carol = p.h.Connect("carol", "c1");
  SendAndCommit(p.h, alice, 1, "bob", "one");
  SendAndCommit(p.h, alice, 2, "bob", "two");
  SendAndCommit(p.h, carol, 3, "bob", "three");
  p.Elapse(1000);
  REQUIRE(p.notifier->notifications.size() == 2);
  for (const PushNotification& n : p.notifier->notifications) CHECK(n.unread_total == 3);

  // Bob reads alice's conversation on a device, goes away; the next badge counts only the rest.
  const ConversationId with_alice = p.notifier->notifications[0].sender == "alice"
                                        ? p.notifier->notifications[0].conversation_id
                                        : p.notifier->notifications[1].conversation_id;
  SessionId bob = p.h.Connect("bob", "b1");
  v1::Envelope receipt;
  receipt.set_rid(9);
  receipt.mutable_receipt()->set_conversation_id(with_alice);
  receipt.mutable_receipt()->set_read_seq(2);
  p.h.SendEnvelope(bob, receipt);
  p.h.Pump();
  p.h.Disconnect(bob);
  SendAndCommit(p.h, carol, 4, "bob", "four");
  p.Elapse(1000);
  REQUIRE(p.notifier->notifications.size() == 3);
  CHECK(p.notifier->notifications[2].sender == "carol");
  CHECK(p.notifier->notifications[2].unread_total == 2);
}

TEST_CASE("push: a user who connects while the tokens are read gets no notification") {
  PushHub p;
  SessionId alice = p.h.Connect("alice", "a1");
  SendAndCommit(p.h, alice, 1, "bob", "hi");
  p.h.Advance(1000);  // the window ends; its tokens and badge are being read
  CHECK(p.h.queued_reads() == 1);
  p.h.Connect("bob", "b1");
  p.h.Pump();
  CHECK(p.notifier->notifications.empty());
}

// A store that cannot say anything about push targets.
class NoPushTargetsStore final : public MessageStoreWrapper {
 public:
  NoPushTargetsStore() : MessageStoreWrapper(NewMemoryStore()) {}
  Result<std::vector<PushTarget>> PushTargets(std::span<const UserId> /*users*/) override {
    return Unavailable("store overloaded");
  }
};

TEST_CASE("push: when the store cannot read tokens the notification still goes out") {
  PushHub p(/*preview=*/true, std::make_shared<NoPushTargetsStore>());
  SessionId alice = p.h.Connect("alice", "a1");
  SendAndCommit(p.h, alice, 1, "bob", "hi");
  p.Elapse(1000);
  REQUIRE(p.notifier->notifications.size() == 1);
  CHECK(p.notifier->notifications[0].user == "bob");
  CHECK(p.notifier->notifications[0].tokens.empty());
  CHECK(p.notifier->notifications[0].unread_total == 0);
}

TEST_CASE("push: tokens registered before a restart are used after it") {
  testing::TempDir dir;
  SqliteStoreOptions options{.path = dir.File("chat.db")};
  {
    Result<std::shared_ptr<MessageStore>> store = NewSqliteStore(options);
    REQUIRE(store.ok());
    PushHub p(/*preview=*/true, *store);
    SessionId bob = p.h.Connect("bob", "b1");
    p.h.SendEnvelope(bob, RegisterToken(5, "apns", "bob-token"));
    p.h.Pump();
    REQUIRE(p.h.Take(bob).at(0).has_ok());
  }
  Result<std::shared_ptr<MessageStore>> store = NewSqliteStore(options);
  REQUIRE(store.ok());
  PushHub p(/*preview=*/true, *store);
  SessionId alice = p.h.Connect("alice", "a1");
  SendAndCommit(p.h, alice, 1, "bob", "hi");
  p.Elapse(1000);
  REQUIRE(p.notifier->notifications.size() == 1);
  REQUIRE(p.notifier->notifications[0].tokens.size() == 1);
  CHECK(p.notifier->notifications[0].tokens[0].device == "b1");
  CHECK(p.notifier->notifications[0].tokens[0].platform == "apns");
  CHECK(p.notifier->notifications[0].tokens[0].token == "bob-token");
  CHECK(p.notifier->notifications[0].unread_total == 1);
}

// --- Push tokens in the stores ---

enum class Kind { kMemory, kSqlite };

struct StoreEnv {
  explicit StoreEnv(Kind kind) {
    if (kind == Kind::kMemory) {
      store = NewMemoryStore();
      return;
    }
    Result<std::shared_ptr<MessageStore>> opened = NewSqliteStore({.path = dir.File("chat.db")});
    REQUIRE_MESSAGE(opened.ok(), opened.status().ToString());
    store = *opened;
  }
  testing::TempDir dir;
  std::shared_ptr<MessageStore> store;
};

// Registers (user, device)'s token at wall time `now_ms` with a cap of `max` devices.
Status PutToken(MessageStore& store, const UserId& user, const DeviceId& device,
                const std::string& platform, const std::string& token, int64_t now_ms = 1000,
                uint32_t max = 0) {
  AppendRequest r;
  r.op = ConversationOp::kPushToken;
  r.sender = user;
  r.sender_device = device;
  r.server_time_ms = now_ms;
  r.push_platform = platform;
  r.push_token = token;
  r.max_push_tokens = max;
  std::vector<AppendRequest> batch = {r};
  std::vector<AppendResult> results;
  if (Status s = store.Append(batch, &results); !s.ok()) return s;
  REQUIRE(results.size() == 1);
  return results[0].status;
}

std::vector<PushTarget> Targets(MessageStore& store, std::vector<UserId> users) {
  Result<std::vector<PushTarget>> r = store.PushTargets(users);
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return *r;
}

std::vector<std::string> Devices(const PushTarget& target) {
  std::vector<std::string> out;
  for (const PushToken& t : target.tokens)
    out.push_back(t.device + "=" + t.platform + ":" + t.token);
  return out;
}

#define PUSH_STORE_CASE(fn, title)                                \
  TEST_CASE("push tokens: memory: " title) { fn(Kind::kMemory); } \
  TEST_CASE("push tokens: sqlite: " title) { fn(Kind::kSqlite); }

void RegisterReplaceRemove(Kind kind) {
  StoreEnv env(kind);
  MessageStore& store = *env.store;
  REQUIRE(PutToken(store, "bob", "phone", "apns", "t1").ok());
  REQUIRE(PutToken(store, "bob", "tablet", "fcm", "t2").ok());
  REQUIRE(PutToken(store, "carol", "phone", "fcm", "t3").ok());
  std::vector<PushTarget> targets = Targets(store, {"carol", "bob", "carol", "nobody"});
  // One entry per distinct user, ascending, even without tokens.
  REQUIRE(targets.size() == 3);
  CHECK(targets[0].user == "bob");
  CHECK(Devices(targets[0]) == std::vector<std::string>{"phone=apns:t1", "tablet=fcm:t2"});
  CHECK(targets[1].user == "carol");
  CHECK(Devices(targets[1]) == std::vector<std::string>{"phone=fcm:t3"});
  CHECK(targets[2].user == "nobody");
  CHECK(targets[2].tokens.empty());
  CHECK(targets[2].unread_total == 0);

  // A new token replaces the device's; an empty one removes it (twice is harmless).
  REQUIRE(PutToken(store, "bob", "phone", "apns", "t1b").ok());
  REQUIRE(PutToken(store, "bob", "tablet", "", "").ok());
  REQUIRE(PutToken(store, "bob", "tablet", "", "").ok());
  CHECK(Devices(Targets(store, {"bob"}).at(0)) == std::vector<std::string>{"phone=apns:t1b"});
}
PUSH_STORE_CASE(RegisterReplaceRemove, "register, replace and remove per (user, device)")

void CapDropsLeastRecent(Kind kind) {
  StoreEnv env(kind);
  MessageStore& store = *env.store;
  REQUIRE(PutToken(store, "bob", "d1", "fcm", "a", 1000, 2).ok());
  REQUIRE(PutToken(store, "bob", "d2", "fcm", "b", 2000, 2).ok());
  REQUIRE(PutToken(store, "bob", "d1", "fcm", "a2", 3000, 2).ok());  // d1 is now the newest
  REQUIRE(PutToken(store, "bob", "d3", "fcm", "c", 4000, 2).ok());
  CHECK(Devices(Targets(store, {"bob"}).at(0)) ==
        std::vector<std::string>{"d1=fcm:a2", "d3=fcm:c"});
}
PUSH_STORE_CASE(CapDropsLeastRecent, "past the cap the least recently registered device goes")

void BadTokens(Kind kind) {
  StoreEnv env(kind);
  MessageStore& store = *env.store;
  CHECK(PutToken(store, "bob", "", "fcm", "t").code() == Code::kInvalidArgument);
  CHECK(PutToken(store, "bob", "d1", "", "t").code() == Code::kInvalidArgument);
  CHECK(PutToken(store, "bob", "d1", std::string(65, 'p'), "t").code() == Code::kInvalidArgument);
  CHECK(PutToken(store, "bob", "d1", "fcm", std::string(4097, 't')).code() ==
        Code::kInvalidArgument);
  CHECK(PutToken(store, "bob", "d1", std::string(64, 'p'), std::string(4096, 't')).ok());
  CHECK(Targets(store, {"bob"}).at(0).tokens.size() == 1);
}
PUSH_STORE_CASE(BadTokens, "a token without device or platform, or too long, is InvalidArgument")

void BadgeIsUnreadTotal(Kind kind) {
  StoreEnv env(kind);
  MessageStore& store = *env.store;
  for (int i = 0; i < 3; ++i) {
    AppendRequest r;
    r.sender = i < 2 ? "alice" : "carol";
    r.peer = "bob";
    r.sender_device = "x";
    r.client_msg_id = "key-" + std::to_string(i);
    r.message_id = 100 + i;
    r.server_time_ms = 1000;
    r.body = "hi";
    std::vector<AppendRequest> batch = {r};
    std::vector<AppendResult> results;
    REQUIRE(store.Append(batch, &results).ok());
    REQUIRE(results.at(0).status.ok());
  }
  std::vector<PushTarget> targets = Targets(store, {"bob", "alice"});
  REQUIRE(targets.size() == 2);
  CHECK(targets[0].user == "alice");
  CHECK(targets[0].unread_total == 0);  // her own messages do not count
  CHECK(targets[1].unread_total == 3);
}
PUSH_STORE_CASE(BadgeIsUnreadTotal, "the badge is the unread total Sync reports")

TEST_CASE("push tokens: sqlite: survive reopening the file") {
  testing::TempDir dir;
  SqliteStoreOptions options{.path = dir.File("chat.db")};
  {
    Result<std::shared_ptr<MessageStore>> store = NewSqliteStore(options);
    REQUIRE(store.ok());
    REQUIRE(PutToken(**store, "bob", "phone", "apns", "t1").ok());
    REQUIRE(PutToken(**store, "bob", "tablet", "fcm", "t2").ok());
    REQUIRE(PutToken(**store, "bob", "tablet", "", "").ok());
  }
  Result<std::shared_ptr<MessageStore>> store = NewSqliteStore(options);
  REQUIRE(store.ok());
  CHECK(Devices(Targets(**store, {"bob"}).at(0)) == std::vector<std::string>{"phone=apns:t1"});
}

TEST_CASE("push tokens: a store without support answers FailedPrecondition") {
  class Bare final : public MessageStoreWrapper {
   public:
    Bare() : MessageStoreWrapper(NewMemoryStore()) {}
    Result<std::vector<PushTarget>> PushTargets(std::span<const UserId> users) override {
      return MessageStore::PushTargets(users);
    }
  };
  Bare bare;
  std::vector<UserId> users = {"bob"};
  CHECK(bare.PushTargets(users).status().code() == Code::kFailedPrecondition);
}

// --- Webhook ---

TEST_CASE("push webhook: a url that is not http[s]://host[:port][/path] is INVALID_ARGUMENT") {
  for (const char* url : {"",
                          "http://",
                          "https://",
                          "http://host:abc/",
                          "http://host:/",
                          "ftp://host/",
                          "HTTP://host/",
                          "http://host:0/",
                          "http://host:65536/",
                          "https://host:99999/",
                          "http://?x",
                          "http://#x",
                          "http://ho\r\nst/",
                          "http://host/a b",
                          "https://host/a\r\nX: y",
                          "http://host/\x7f",
                          "http://[::1]/",
                          "https://user:pw@host/",
                          "http://127.0.0.1:80:80/x",
                          "http://ho%2ast/x",
                          "http://a,b/x"}) {
    CAPTURE(url);
    auto notifier = NewWebhookNotifier({.url = url});
    REQUIRE_FALSE(notifier.ok());
    CHECK(notifier.status().code() == Code::kInvalidArgument);
  }
  CHECK(NewWebhookNotifier({.url = "http://127.0.0.1:1/x", .timeout_ms = 0}).status().code() ==
        Code::kInvalidArgument);
  CHECK(NewWebhookNotifier({.url = "http://127.0.0.1:1/x", .max_queue = 0}).status().code() ==
        Code::kInvalidArgument);
  CHECK(NewWebhookNotifier({.url = "http://localhost/push"}).ok());
  CHECK(NewWebhookNotifier({.url = "https://localhost:8443/push?key=1"}).ok());
}

TEST_CASE("push webhook: a ca_file that cannot be read is INVALID_ARGUMENT") {
  TempDir dir;
  for (const std::string& path : {dir.File("missing.pem"), dir.path()}) {
    CAPTURE(path);
    auto notifier = NewWebhookNotifier({.url = "https://localhost/push", .ca_file = path});
    REQUIRE_FALSE(notifier.ok());
    CHECK(notifier.status().code() == Code::kInvalidArgument);
    CHECK(notifier.status().message().find("ca_file") != std::string::npos);
  }
}

PushNotification Sample() {
  PushNotification n;
  n.user = "bob";
  n.conversation_id = 18446744073709551615ULL;
  n.sender = "alice";
  n.seq = 7;
  n.server_time_ms = 1700000000000;
  n.preview = "say \"hi\"\n\xff";
  n.collapsed = 2;
  n.tokens.push_back({"b1", "fcm", "tok"});
  return n;
}

constexpr std::string_view kSampleJson =
    "{\"user\":\"bob\",\"conversation_id\":\"18446744073709551615\",\"sender\":\"alice\","
    "\"seq\":\"7\",\"server_time_ms\":\"1700000000000\","
    "\"preview\":\"say \\\"hi\\\"\\u000a\\ufffd\",\"collapsed\":2,\"unread_total\":\"0\","
    "\"tokens\":[{\"device\":\"b1\",\"platform\":\"fcm\",\"token\":\"tok\"}]}";

TEST_CASE("push webhook: posts the notification as JSON") {
  HttpReceiver receiver({200});
  auto notifier = NewWebhookNotifier({.url = receiver.url()});
  REQUIRE(notifier.ok());
  (*notifier)->Notify(Sample());
  const std::vector<std::string> requests = receiver.WaitFor(1);
  REQUIRE(requests.size() == 1);
  const std::string& r = requests[0];
  CHECK(r.starts_with("POST /hook HTTP/1.1\r\n"));
  // The port is part of Host when it is not 80 (HTTP/1.1 requires it).
  const std::string authority = receiver.url().substr(7, receiver.url().size() - 7 - 5);
  CHECK(r.find("\r\nHost: " + authority + "\r\n") != std::string::npos);
  CHECK(r.find("Content-Type: application/json\r\n") != std::string::npos);
  const std::string body = r.substr(r.find("\r\n\r\n") + 4);
  CHECK(body == kSampleJson);
}

TEST_CASE("push webhook: a url with a query and no path posts to /?query, without the fragment") {
  HttpReceiver receiver({200});
  const std::string base = receiver.url().substr(0, receiver.url().size() - 5);  // no "/hook"
  auto notifier = NewWebhookNotifier({.url = base + "?key=v1#top"});
  REQUIRE(notifier.ok());
  (*notifier)->Notify(Sample());
  const std::vector<std::string> requests = receiver.WaitFor(1);
  REQUIRE(requests.size() == 1);
  CHECK(requests[0].starts_with("POST /?key=v1 HTTP/1.1\r\n"));
}

TEST_CASE("push webhook: a 500 is retried until the receiver accepts it") {
  HttpReceiver receiver({500, 503, 200});
  auto notifier = NewWebhookNotifier({.url = receiver.url(), .max_retries = 3, .backoff_ms = 1});
  REQUIRE(notifier.ok());
  (*notifier)->Notify(Sample());
  const std::vector<std::string> requests = receiver.WaitFor(3);
  CHECK(requests.size() == 3);
  CHECK(requests[0] == requests[2]);
}

TEST_CASE("push webhook: a 4xx is not retried, the next notification still goes out") {
  HttpReceiver receiver({400, 200});
  auto notifier = NewWebhookNotifier({.url = receiver.url(), .backoff_ms = 1});
  REQUIRE(notifier.ok());
  (*notifier)->Notify(Sample());
  PushNotification second = Sample();
  second.seq = 8;
  (*notifier)->Notify(second);
  const std::vector<std::string> requests = receiver.WaitFor(2);
  REQUIRE(requests.size() == 2);
  CHECK(requests[0].find("\"seq\":\"7\"") != std::string::npos);
  CHECK(requests[1].find("\"seq\":\"8\"") != std::string::npos);
}

TEST_CASE("push webhook: an unreachable receiver never blocks Notify, and the queue is bounded") {
  // Port 1 on loopback refuses connections; every notification fails after its retries.
  auto notifier = NewWebhookNotifier(
      {.url = "http://127.0.0.1:1/", .max_queue = 4, .max_retries = 1, .backoff_ms = 1});
  REQUIRE(notifier.ok());
  // The test fails by its time limit if Notify waited for the network. Destroying the notifier
  // at the end drops what is queued and joins its thread.
  for (int i = 0; i < 1000; ++i) (*notifier)->Notify(Sample());
}

// Collects the log lines of one test; the default sink is back when it is destroyed.
class LogCapture {
 public:
  LogCapture() {
    SetLogSink([this](LogLevel level, std::string_view line) {
      std::lock_guard lock(mutex_);
      lines_.emplace_back(level, line);
    });
  }
  ~LogCapture() { SetLogSink(nullptr); }
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;

  // The first line at `level` that has every one of `parts`, waiting up to `limit` for it; ""
  // if none came.
  std::string WaitFor(LogLevel level, std::vector<std::string_view> parts,
                      std::chrono::milliseconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      {
        std::lock_guard lock(mutex_);
        for (const auto& [l, line] : lines_) {
          if (l == level && std::all_of(parts.begin(), parts.end(), [&](std::string_view part) {
                return line.find(part) != std::string::npos;
              })) {
            return line;
          }
        }
      }
      if (std::chrono::steady_clock::now() >= deadline) return "";
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<LogLevel, std::string>> lines_;
};

// A receiver over https with a self-signed certificate for `subject_alt_name`, made in `dir`.
HttpReceiver HttpsReceiver(const TempDir& dir, const std::string& subject_alt_name,
                           HttpReceiverOptions options = {}) {
  Status made = MakeSelfSignedCertificate(dir, subject_alt_name);
  REQUIRE_MESSAGE(made.ok(), made.ToString());
  options.tls_cert_path = dir.File("cert.pem");
  options.tls_key_path = dir.File("key.pem");
  return HttpReceiver(std::move(options));
}

TEST_CASE("push webhook: a renewed certificate in ca_file is trusted at the next attempt") {
  TempDir first;
  TempDir second;
  const std::string ca_file = first.File("ca.pem");
  uint16_t port = 0;
  std::shared_ptr<PushNotifier> notifier;
  {
    HttpReceiver receiver = HttpsReceiver(first, "IP:127.0.0.1");
    std::filesystem::copy_file(first.File("cert.pem"), ca_file);
    auto made = NewWebhookNotifier({.url = receiver.url(), .ca_file = ca_file});
    REQUIRE(made.ok());
    notifier = *made;
    notifier->Notify(Sample());
    REQUIRE(receiver.WaitForBodies(1).size() == 1);
    port = static_cast<uint16_t>(std::stoi(receiver.url().substr(receiver.url().rfind(':') + 1)));
  }
  // The relay comes back in its place with a new self-signed certificate, which the operator
  // puts into the CA file.
  HttpReceiver renewed = HttpsReceiver(second, "IP:127.0.0.1", {.port = port});
  std::filesystem::copy_file(second.File("cert.pem"), ca_file,
                             std::filesystem::copy_options::overwrite_existing);
  notifier->Notify(Sample());
  CHECK(renewed.WaitForBodies(1).size() == 1);
}

TEST_CASE("push webhook: over https, a receiver trusted through ca_file gets the JSON") {
  TempDir dir;
  HttpReceiver receiver = HttpsReceiver(dir, "IP:127.0.0.1");
  REQUIRE(receiver.url().starts_with("https://127.0.0.1:"));
  auto notifier = NewWebhookNotifier({.url = receiver.url(), .ca_file = dir.File("cert.pem")});
  REQUIRE(notifier.ok());
  (*notifier)->Notify(Sample());
  const std::vector<std::string> requests = receiver.WaitFor(1);
  REQUIRE(requests.size() == 1);
  CHECK(requests[0].starts_with("POST /hook HTTP/1.1\r\n"));
  CHECK(requests[0].find("Content-Type: application/json\r\n") != std::string::npos);
  CHECK(requests[0].substr(requests[0].find("\r\n\r\n") + 4) == kSampleJson);
}

TEST_CASE("push webhook: over https, a certificate the system does not trust gets nothing") {
  TempDir dir;
  HttpReceiver receiver = HttpsReceiver(dir, "IP:127.0.0.1");
  LogCapture log;
  // No ca_file: the system's CAs, which do not include the test's self-signed certificate.
  auto notifier = NewWebhookNotifier({.url = receiver.url(), .max_retries = 1, .backoff_ms = 1});
  REQUIRE(notifier.ok());
  (*notifier)->Notify(Sample());
  // The first attempt and its retry, each refused at the handshake, then a warning with the
  // reason.
  CHECK(receiver.WaitForConnections(2, std::chrono::seconds(30)).size() == 2);
  CHECK(log.WaitFor(LogLevel::kWarn, {"push webhook failed", "certificate", "gave up after 2"},
                    std::chrono::seconds(30)) != "");
  CHECK(receiver.WaitFor(0).empty());
}

TEST_CASE("push webhook: over https, a certificate for another host name gets nothing") {
  TempDir dir;
  HttpReceiver receiver = HttpsReceiver(dir, "DNS:relay.example");
  LogCapture log;
  // The certificate chains to ca_file, but the URL names 127.0.0.1.
  auto notifier = NewWebhookNotifier(
      {.url = receiver.url(), .max_retries = 0, .ca_file = dir.File("cert.pem")});
  REQUIRE(notifier.ok());
  (*notifier)->Notify(Sample());
  const std::string line = log.WaitFor(LogLevel::kWarn, {"push webhook failed", "gave up after 1"},
                                       std::chrono::seconds(30));
  CHECK(line.find("127.0.0.1") != std::string::npos);
  CHECK(receiver.WaitForConnections(1, std::chrono::seconds(0)).size() == 1);
  CHECK(receiver.WaitFor(0).empty());
}

// The receiver accepts the connection and never answers; each attempt must end by itself after
// timeout_ms, and the notification is tried again.
void EachAttemptEndsAfterTimeout(HttpReceiver& receiver, const std::string& ca_file) {
  constexpr auto kTimeout = std::chrono::milliseconds(500);
  auto notifier = NewWebhookNotifier({.url = receiver.url(),
                                      .timeout_ms = static_cast<uint32_t>(kTimeout.count()),
                                      .max_retries = 1,
                                      .backoff_ms = 1,
                                      .ca_file = ca_file});
  REQUIRE(notifier.ok());
  (*notifier)->Notify(Sample());
  const auto connections = receiver.WaitForConnections(2, std::chrono::seconds(30));
  REQUIRE(connections.size() == 2);
  const auto gap = connections[1] - connections[0];
  // Not refused at once, and not held much past its time (generous slack for a loaded machine
  // under the sanitizers).
  CHECK(gap >= kTimeout / 2);
  CHECK(gap < kTimeout + std::chrono::seconds(10));
}

TEST_CASE("push webhook: a receiver that never answers: each attempt ends after timeout_ms") {
  HttpReceiver receiver({200}, /*hang=*/true);
  EachAttemptEndsAfterTimeout(receiver, "");
  // The first attempt sent its request and waited for the answer until its time was up.
  CHECK(receiver.WaitFor(1)[0].starts_with("POST /hook HTTP/1.1\r\n"));
}

TEST_CASE("push webhook: an https receiver that never does the handshake: attempts end too") {
  TempDir dir;
  HttpReceiver receiver = HttpsReceiver(dir, "IP:127.0.0.1", {.silent = true});
  EachAttemptEndsAfterTimeout(receiver, dir.File("cert.pem"));
}

TEST_CASE("push webhook: destroying the notifier abandons the attempt in flight") {
  HttpReceiver receiver({200}, /*hang=*/true);
  // The attempt would last far longer than the test's CTest timeout, and its wait far longer
  // than the bound below (kPollMs): only the stop's wake-up ends it in time.
  auto notifier = NewWebhookNotifier({.url = receiver.url(), .timeout_ms = 3'600'000});
  REQUIRE(notifier.ok());
  (*notifier)->Notify(Sample());
  (*notifier)->Notify(Sample());  // still queued: dropped
  REQUIRE(receiver.WaitFor(1).size() == 1);
  const auto start = std::chrono::steady_clock::now();
  notifier->reset();
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(10));
  CHECK(receiver.WaitFor(0).size() == 1);
}

}  // namespace
}  // namespace chat::testing
