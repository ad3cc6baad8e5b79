// chat::Client against the real chatd over loopback: offline sends, restarts and kill -9 of the
// server and of a client process, paginated catch-up and a replaced server store. Each test
// checks what the application sees: every message exactly once, in order, statuses ending as
// sent.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "chat/client.h"
#include "chat/log.h"
#include "tests/testing/chatd_process.h"
#include "tests/testing/temp_dir.h"

extern char** environ;

namespace chat::testing {
namespace {

// Records everything a listener sees; safe to read from the test thread.
class Recorder : public ClientListener {
 public:
  void OnConnectionState(ConnectionState state) override {
    std::lock_guard lock(mu_);
    state_ = state;
    if (state == ConnectionState::kConnected) ++connects_;
  }
  int connects() {
    std::lock_guard lock(mu_);
    return connects_;
  }
  void OnMessage(const MessageEvent& event) override {
    std::lock_guard lock(mu_);
    events_.push_back(event);
  }
  void OnError(const Status& status) override {
    std::lock_guard lock(mu_);
    errors_.push_back(status);
  }

  // Bodies of committed messages of other users, in the order the application got them.
  std::vector<std::string> ReceivedBodies() {
    std::lock_guard lock(mu_);
    std::vector<std::string> out;
    for (const auto& e : events_) {
      if (e.status == MessageStatus::kSent && !e.outgoing) out.push_back(e.message.body);
    }
    return out;
  }
  std::vector<Seq> ReceivedSeqs() {
    std::lock_guard lock(mu_);
    std::vector<Seq> out;
    for (const auto& e : events_) {
      if (e.status == MessageStatus::kSent && !e.outgoing) out.push_back(e.message.seq);
    }
    return out;
  }
  // client_msg_id -> how often it was reported with `status`.
  std::map<std::string, int> OwnWithStatus(MessageStatus status) {
    std::lock_guard lock(mu_);
    std::map<std::string, int> out;
    for (const auto& e : events_) {
      if (e.outgoing && e.status == status) ++out[e.message.client_msg_id];
    }
    return out;
  }
  // client_msg_id -> the reason of its kFailed event.
  std::map<std::string, Status> FailReasons() {
    std::lock_guard lock(mu_);
    std::map<std::string, Status> out;
    for (const auto& e : events_) {
      if (e.outgoing && e.status == MessageStatus::kFailed) out[e.message.client_msg_id] = e.reason;
    }
    return out;
  }
  std::vector<Status> errors() {
    std::lock_guard lock(mu_);
    return errors_;
  }
  ConnectionState state() {
    std::lock_guard lock(mu_);
    return state_;
  }

 private:
  std::mutex mu_;
  ConnectionState state_ = ConnectionState::kDisconnected;
  int connects_ = 0;
  std::vector<MessageEvent> events_;
  std::vector<Status> errors_;
};

enum class Mode { kStart, kPoll };

struct TestClient {
  std::shared_ptr<Recorder> recorder = std::make_shared<Recorder>();
  std::unique_ptr<Client> client;
  Mode mode = Mode::kStart;
};

TestClient MakeClient(const ChatdProcess& chatd, const std::string& user, const std::string& device,
                      const std::string& cache_path, Mode mode = Mode::kStart,
                      size_t outbox_max = 1000, const std::string& tls_ca_path = "",
                      size_t max_message_bytes = 0) {
  TestClient t;
  t.mode = mode;
  ClientOptions options;
  options.url = chatd.url();
  options.token_provider = [&chatd, user] { return chatd.Token(user); };
  options.device_id = device;
  options.cache_path = cache_path;
  options.listener = t.recorder;
  // Short delays keep the tests quick; the policy itself is unit-tested.
  options.reconnect.base_ms = 50;
  options.reconnect.cap_ms = 500;
  options.outbox_max = outbox_max;
  options.tls_ca_path = tls_ca_path;
  if (max_message_bytes != 0) options.max_message_bytes = max_message_bytes;
  auto client = Client::Open(std::move(options));
  REQUIRE(client.ok());
  t.client = std::move(client.value());
  if (mode == Mode::kStart) REQUIRE(t.client->Start().ok());
  return t;
}

// Waits for `done`, driving the Poll()-mode clients meanwhile. False on timeout.
bool Drive(const std::vector<TestClient*>& clients, const std::function<bool()>& done,
           int timeout_ms = 60'000) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    bool polled = false;
    for (TestClient* c : clients) {
      if (c->mode == Mode::kPoll) {
        REQUIRE(c->client->Poll(10).ok());
        polled = true;
      }
    }
    if (!polled) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

std::vector<std::string> Bodies(int n, int from = 0) {
  std::vector<std::string> out;
  for (int i = from; i < n; ++i) out.push_back("m" + std::to_string(i));
  return out;
}

size_t Pending(Client& client) {
  auto outbox = client.Outbox();
  REQUIRE(outbox.ok());
  size_t n = 0;
  for (const auto& e : *outbox) n += e.status == MessageStatus::kPending ? 1 : 0;
  return n;
}

std::vector<Seq> Range(Seq from, Seq to) {
  std::vector<Seq> out;
  for (Seq s = from; s <= to; ++s) out.push_back(s);
  return out;
}

void SendWhileServerDownThenStart(Mode mode) {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  REQUIRE(chatd.Kill9().ok());
  TempDir dir;
  TestClient alice = MakeClient(chatd, "alice", "alice-laptop", dir.File("alice.db"), mode);
  constexpr int kCount = 50;
  for (const std::string& body : Bodies(kCount)) {
    REQUIRE(alice.client->SendTo("bob", "text/plain", body).ok());
  }
  // Offline: everything is pending, nothing is lost.
  CHECK(Drive({&alice}, [&] {
    return alice.recorder->OwnWithStatus(MessageStatus::kPending).size() == kCount;
  }));
  CHECK(Pending(*alice.client) == kCount);
  CHECK(alice.recorder->state() != ConnectionState::kConnected);

  REQUIRE(chatd.Restart().ok());
  TestClient bob = MakeClient(chatd, "bob", "bob-phone", dir.File("bob.db"), mode);
  REQUIRE(Drive({&alice, &bob}, [&] {
    return bob.recorder->ReceivedBodies().size() >= kCount &&
           alice.recorder->OwnWithStatus(MessageStatus::kSent).size() == kCount;
  }));
  CHECK(bob.recorder->ReceivedBodies() == Bodies(kCount));
  CHECK(bob.recorder->ReceivedSeqs() == Range(1, kCount));
  for (const auto& [id, n] : alice.recorder->OwnWithStatus(MessageStatus::kSent)) {
    CHECK_MESSAGE(n == 1, id);
  }
  CHECK(alice.recorder->OwnWithStatus(MessageStatus::kFailed).empty());
  CHECK(Pending(*alice.client) == 0);
  alice.client->Close();
  bob.client->Close();
}

TEST_CASE(
    "client e2e: messages sent while chatd is down are delivered once, in order (Start mode)") {
  SendWhileServerDownThenStart(Mode::kStart);
}

TEST_CASE(
    "client e2e: messages sent while chatd is down are delivered once, in order (Poll mode)") {
  SendWhileServerDownThenStart(Mode::kPoll);
}

TEST_CASE("client e2e: kill -9 of chatd during a stream loses, duplicates and reorders nothing") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  TestClient alice = MakeClient(chatd, "alice", "alice-laptop", dir.File("alice.db"));
  TestClient bob = MakeClient(chatd, "bob", "bob-phone", dir.File("bob.db"));
  constexpr int kCount = 300;
  const std::vector<std::string> bodies = Bodies(kCount);
  for (int i = 0; i < kCount; ++i) {
    REQUIRE(alice.client->SendTo("bob", "text/plain", bodies[static_cast<size_t>(i)]).ok());
    if (i % 100 == 60) {
      // Let the stream get going, then kill the server under it.
      REQUIRE(Drive({}, [&] { return bob.recorder->ReceivedBodies().size() > 10; }));
      REQUIRE(chatd.Kill9().ok());
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      REQUIRE(chatd.Restart().ok());
    }
    if (i % 10 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  REQUIRE(Drive({}, [&] {
    return bob.recorder->ReceivedBodies().size() >= kCount &&
           alice.recorder->OwnWithStatus(MessageStatus::kSent).size() == kCount;
  }));
  CHECK(bob.recorder->ReceivedBodies() == bodies);
  CHECK(bob.recorder->ReceivedSeqs() == Range(1, kCount));
  for (const auto& [id, n] : alice.recorder->OwnWithStatus(MessageStatus::kSent)) {
    CHECK_MESSAGE(n == 1, id);
  }
  CHECK(alice.recorder->OwnWithStatus(MessageStatus::kFailed).empty());
  CHECK(Pending(*alice.client) == 0);
  alice.client->Close();
  bob.client->Close();
}

// Starts chat-cli with stdout and stderr in `log`; returns its pid.
pid_t SpawnCli(const std::vector<std::string>& args, const std::string& log) {
  std::vector<std::string> argv = {std::string(CHAT_BINARY_DIR) + "/examples/chat-cli"};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, cargv[0], &actions, nullptr, cargv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  return rc == 0 ? pid : -1;
}

void KillClientWithOutbox(bool server_up) {
  ChatdProcess chatd(
      {.extra_flags = {"--messages-per-second", "100000", "--messages-burst", "100000"}});
  REQUIRE(chatd.Start().ok());
  if (!server_up) REQUIRE(chatd.Kill9().ok());
  TempDir dir;
  const std::string cache = dir.File("cli.db");
  const std::string log = dir.File("cli.log");
  const std::string token = chatd.Token("alice");
  constexpr int kCount = 400;
  std::vector<std::string> args = {"--url",   chatd.url(), "--token", token,  "--device", "cli",
                                   "--cache", cache,       "send",    "--to", "bob"};
  for (const std::string& body : Bodies(kCount)) args.push_back(body);
  pid_t pid = SpawnCli(args, log);
  REQUIRE(pid > 0);
  // "queued" means every message is committed to the outbox.
  REQUIRE(Drive(
      {}, [&] { return ReadFile(log).find("queued") != std::string::npos; }, 20'000));
  REQUIRE(kill(pid, SIGKILL) == 0);
  int wstatus = 0;
  REQUIRE(waitpid(pid, &wstatus, 0) == pid);
  CHECK(WIFSIGNALED(wstatus));

  if (!server_up) {
    // The outbox survived the kill: every message is still pending in the cache file.
    ClientOptions options;
    options.url = chatd.url();
    options.token_provider = [] { return std::string(); };
    options.device_id = "cli";
    options.cache_path = cache;
    auto reopened = Client::Open(std::move(options));
    REQUIRE(reopened.ok());
    CHECK(Pending(**reopened) == kCount);
    (*reopened)->Close();
    REQUIRE(chatd.Restart().ok());
  }
  Result<int> flushed = RunProcess(
      {std::string(CHAT_BINARY_DIR) + "/examples/chat-cli", "--url", chatd.url(), "--token", token,
       "--device", "cli", "--cache", cache, "--timeout-ms", "60000", "flush"},
      dir.path(), log, 90'000);
  REQUIRE(flushed.ok());
  CHECK_MESSAGE(*flushed == 0, ReadFile(log));

  TestClient bob = MakeClient(chatd, "bob", "bob-phone", "");
  REQUIRE(Drive({}, [&] { return bob.recorder->ReceivedBodies().size() >= kCount; }));
  // Settle: a duplicate would arrive right behind.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(bob.recorder->ReceivedBodies() == Bodies(kCount));
  CHECK(bob.recorder->ReceivedSeqs() == Range(1, kCount));
  bob.client->Close();
}

TEST_CASE("client e2e: kill -9 of a client with a full outbox, server down: all sent once") {
  KillClientWithOutbox(/*server_up=*/false);
}

TEST_CASE("client e2e: kill -9 of a client while its outbox drains: all sent once") {
  KillClientWithOutbox(/*server_up=*/true);
}

void SendMany(ChatdProcess& chatd, TempDir& dir, int count) {
  TestClient alice =
      MakeClient(chatd, "alice", "alice-laptop", dir.File("alice.db"), Mode::kStart, count);
  for (const std::string& body : Bodies(count)) {
    REQUIRE(alice.client->SendTo("bob", "text/plain", body).ok());
  }
  // A bound, not a speed check: thousands of commits take long on a loaded machine.
  REQUIRE(Drive(
      {},
      [&] {
        return alice.recorder->OwnWithStatus(MessageStatus::kSent).size() ==
               static_cast<size_t>(count);
      },
      180'000));
  alice.client->Close();
}

TEST_CASE("client e2e: an offline device catches up thousands of messages through paged Sync") {
  ChatdProcess chatd({.extra_flags = {"--messages-per-second", "100000", "--messages-burst",
                                      "100000", "--synchronous", "normal", "--sync-page-max", "200",
                                      "--sync-catchup-max", "10000"}});
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  constexpr int kCount = 2500;
  SendMany(chatd, dir, kCount);

  TestClient bob = MakeClient(chatd, "bob", "bob-phone", dir.File("bob.db"));
  REQUIRE(Drive({}, [&] { return bob.recorder->ReceivedBodies().size() >= kCount; }));
  REQUIRE(Drive({}, [&] { return bob.recorder->state() == ConnectionState::kConnected; }));
  CHECK(bob.recorder->ReceivedBodies() == Bodies(kCount));
  CHECK(bob.recorder->ReceivedSeqs() == Range(1, kCount));
  auto conversations = bob.client->Conversations();
  REQUIRE(conversations.ok());
  REQUIRE(conversations->size() == 1);
  CHECK((*conversations)[0].last_seq == kCount);
  CHECK((*conversations)[0].peer == "alice");
  CHECK((*conversations)[0].unread == kCount);
  bob.client->Close();
}

// 90,000 bytes: a frame bound under which the largest message this chatd sends fits a device
// that accepts 100 KiB (with the default 256 KiB the device would be refused at Hello).
constexpr char kSmallFrameBytes[] = "90000";

TEST_CASE("client e2e: an offline device catches up messages larger in all than its frame bound") {
  ChatdProcess chatd(
      {.extra_flags = {"--messages-per-second", "100000", "--messages-burst", "100000",
                       "--synchronous", "normal", "--max-message-bytes", kSmallFrameBytes}});
  REQUIRE(chatd.Start().ok());
  // 72 bodies of 60,000 bytes: 4.3 MB, more than the client's 4 MiB receive bound, all within
  // one Sync page by count (500).
  constexpr int kCount = 72;
  TestClient alice = MakeClient(chatd, "alice", "alice-laptop", "");
  std::vector<std::string> sent;
  for (int i = 0; i < kCount; ++i) {
    std::string body =
        std::to_string(i) + ":" + std::string(60'000, static_cast<char>('a' + i % 26));
    REQUIRE(alice.client->SendTo("bob", "text/plain", body).ok());
    sent.push_back(std::move(body));
  }
  REQUIRE(Drive({&alice}, [&] {
    return alice.recorder->OwnWithStatus(MessageStatus::kSent).size() == kCount;
  }));
  alice.client->Close();

  // Two devices: one with the default bound (4 MiB), one that accepts at most 100 KiB, which
  // it tells the server in Hello: its pages carry one 60,000-byte message each.
  TestClient phone = MakeClient(chatd, "bob", "bob-phone", "");
  TestClient watch = MakeClient(chatd, "bob", "bob-watch", "", Mode::kStart, 1000, "", 100 << 10);
  for (TestClient* bob : {&phone, &watch}) {
    REQUIRE(Drive({bob}, [&] { return bob->recorder->ReceivedBodies().size() >= kCount; }));
    CHECK(bob->recorder->ReceivedBodies() == sent);
    CHECK(bob->recorder->ReceivedSeqs() == Range(1, kCount));
    REQUIRE(Drive({bob}, [&] { return bob->recorder->state() == ConnectionState::kConnected; }));
    CHECK(bob->recorder->connects() == 1);
    bob->client->Close();
  }
}

TEST_CASE("client e2e: live messages to a device with a small bound are not packed past it") {
  ChatdProcess chatd({.extra_flags = {"--messages-per-second", "100000", "--messages-burst",
                                      "100000", "--max-message-bytes", kSmallFrameBytes}});
  REQUIRE(chatd.Start().ok());
  // 60,000-byte bodies to a device that accepts 100 KiB: chatd packs what one commit delivers
  // to a connection into one frame (up to 256 KiB), but for this device at most 50 KiB, so each
  // of these goes alone and the device is never closed with 1009.
  TestClient bob = MakeClient(chatd, "bob", "bob-watch", "", Mode::kStart, 1000, "", 100 << 10);
  TestClient alice = MakeClient(chatd, "alice", "alice-laptop", "");
  REQUIRE(Drive({&alice, &bob}, [&] {
    return alice.recorder->state() == ConnectionState::kConnected &&
           bob.recorder->state() == ConnectionState::kConnected;
  }));
  constexpr int kCount = 12;
  std::vector<std::string> sent;
  for (int i = 0; i < kCount; ++i) {
    sent.push_back(std::to_string(i) + ":" + std::string(60'000, static_cast<char>('a' + i)));
    REQUIRE(alice.client->SendTo("bob", "text/plain", sent.back()).ok());
  }
  REQUIRE(Drive({&alice, &bob}, [&] { return bob.recorder->ReceivedBodies().size() >= kCount; }));
  CHECK(bob.recorder->ReceivedBodies() == sent);
  CHECK(bob.recorder->connects() == 1);
  alice.client->Close();
  bob.client->Close();
}

TEST_CASE("client e2e: a device whose bound is below the server's largest message is refused") {
  ChatdProcess chatd(
      {.extra_flags = {"--max-body-bytes", "300000", "--max-message-bytes", "400000"}});
  REQUIRE(chatd.Start().ok());
  // The server takes 300,000-byte bodies; this device accepts 100 KiB: it is told at once, and
  // each attempt (after the reconnect delay) is refused the same way.
  TestClient bob = MakeClient(chatd, "bob", "bob-watch", "", Mode::kStart, 1000, "", 100 << 10);
  REQUIRE(Drive({&bob}, [&] { return bob.recorder->errors().size() >= 2; }));
  for (const Status& error : bob.recorder->errors()) {
    CHECK(error.code() == Code::kFailedPrecondition);
    CHECK(error.message().find("max_message_bytes 102400 is below the largest message this "
                               "server may send") != std::string_view::npos);
  }
  CHECK(bob.recorder->connects() == 0);
  bob.client->Close();
}

TEST_CASE(
    "client e2e: a stored message past the device's own bound closes (1009) again and again, "
    "safely") {
  ChatdProcess chatd(
      {.extra_flags = {"--max-body-bytes", "300000", "--max-message-bytes", "400000"}});
  REQUIRE(chatd.Start().ok());
  TestClient alice = MakeClient(chatd, "alice", "alice-laptop", "");
  REQUIRE(alice.client->SendTo("bob", "text/plain", std::string(250'000, 'r')).ok());
  REQUIRE(Drive({&alice},
                [&] { return alice.recorder->OwnWithStatus(MessageStatus::kSent).size() == 1; }));
  alice.client->Close();
  // The server's bounds were lowered after the message was stored: a device that accepts
  // 100 KiB passes Hello, but cannot get that message (live or through Sync, which carries at
  // least one message): each try ends with a 1009 close and a reconnect. What is checked is
  // that the client survives them all (closing from the receive callback corrupted the heap
  // after a few such rounds).
  REQUIRE(chatd.Terminate().ok());
  chatd.set_extra_flags({"--max-message-bytes", kSmallFrameBytes});
  REQUIRE(chatd.Restart().ok());
  TestClient bob = MakeClient(chatd, "bob", "bob-phone", "", Mode::kStart, 1000, "", 100 << 10);
  std::this_thread::sleep_for(std::chrono::seconds(4));
  CHECK(bob.recorder->ReceivedBodies().empty());
  CHECK(bob.recorder->state() != ConnectionState::kConnected);
  CHECK(bob.recorder->errors().empty());
  bob.client->Close();
}

TEST_CASE(
    "client e2e: past the catch-up limit the newest messages arrive and History fills the gap") {
  ChatdProcess chatd(
      {.extra_flags = {"--messages-per-second", "100000", "--messages-burst", "100000",
                       "--synchronous", "normal", "--sync-catchup-max", "1000"}});
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  constexpr int kCount = 1500;
  SendMany(chatd, dir, kCount);

  TestClient bob = MakeClient(chatd, "bob", "bob-phone", dir.File("bob.db"));
  REQUIRE(Drive({}, [&] { return bob.recorder->state() == ConnectionState::kConnected; }));
  CHECK(bob.recorder->ReceivedSeqs() == Range(501, kCount));
  CHECK(bob.recorder->ReceivedBodies() == Bodies(kCount, 500));
  auto conversations = bob.client->Conversations();
  REQUIRE(conversations.ok());
  REQUIRE(conversations->size() == 1);
  const ConversationId conversation = (*conversations)[0].conversation_id;

  std::mutex mu;
  std::vector<Result<HistoryResult>> pages;
  auto callback = [&](Result<HistoryResult> r) {
    std::lock_guard lock(mu);
    pages.push_back(std::move(r));
  };
  auto page_count = [&] {
    std::lock_guard lock(mu);
    return pages.size();
  };
  // Cached range: answered locally.
  REQUIRE(bob.client->History(conversation, 0, 10, callback).ok());
  REQUIRE(Drive({}, [&] { return page_count() == 1; }));
  // Inside the gap: the server answers.
  REQUIRE(bob.client->History(conversation, 501, 100, callback).ok());
  REQUIRE(Drive({}, [&] { return page_count() == 2; }));
  {
    // Released before Close(), which waits for a running callback that may need `mu`.
    std::lock_guard lock(mu);
    REQUIRE(pages[0].ok());
    CHECK(pages[0]->from_cache);
    REQUIRE(pages[0]->messages.size() == 10);
    CHECK(pages[0]->messages.front().seq == kCount);
    REQUIRE(pages[1].ok());
    CHECK_FALSE(pages[1]->from_cache);
    REQUIRE(pages[1]->messages.size() == 100);
    CHECK(pages[1]->messages.front().seq == 500);
    CHECK(pages[1]->messages.back().seq == 401);
    CHECK(pages[1]->messages.front().body == "m499");
    CHECK(pages[1]->has_more);
    // History does not re-deliver: the application saw each seq once.
    CHECK(bob.recorder->ReceivedSeqs() == Range(501, kCount));
  }
  bob.client->Close();
}

TEST_CASE("client e2e: a new server store (epoch change) rebuilds the cache") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  TestClient alice = MakeClient(chatd, "alice", "alice-laptop", dir.File("alice.db"));
  TestClient bob = MakeClient(chatd, "bob", "bob-phone", dir.File("bob.db"));
  for (const std::string& body : Bodies(3)) {
    REQUIRE(alice.client->SendTo("bob", "text/plain", body).ok());
  }
  REQUIRE(Drive({}, [&] { return bob.recorder->ReceivedBodies().size() == 3; }));
  auto before = bob.client->Conversations();
  REQUIRE(before.ok());
  REQUIRE(before->size() == 1);
  CHECK((*before)[0].last_seq == 3);

  // Replace the store: same server, new database, new epoch.
  REQUIRE(chatd.Terminate().ok());
  for (const char* suffix : {"", "-wal", "-shm"}) std::remove((chatd.db_path() + suffix).c_str());
  REQUIRE(chatd.Restart().ok());

  REQUIRE(Drive({}, [&] {
    for (const Status& st : bob.recorder->errors()) {
      if (st.code() == Code::kDataLoss) return true;
    }
    return false;
  }));
  REQUIRE(Drive({}, [&] { return bob.recorder->state() == ConnectionState::kConnected; }));
  auto after = bob.client->Conversations();
  REQUIRE(after.ok());
  CHECK(after->empty());

  // The new store starts over at seq 1, and the application sees it.
  REQUIRE(alice.client->SendTo("bob", "text/plain", "after").ok());
  REQUIRE(Drive({}, [&] { return bob.recorder->ReceivedBodies().size() == 4; }));
  CHECK(bob.recorder->ReceivedBodies().back() == "after");
  CHECK(bob.recorder->ReceivedSeqs() == std::vector<Seq>{1, 2, 3, 1});
  alice.client->Close();
  bob.client->Close();
}

TEST_CASE("client e2e: an expired token is replaced by calling the token provider again") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  auto recorder = std::make_shared<Recorder>();
  std::atomic<int> calls{0};
  ClientOptions options;
  options.url = chatd.url();
  // The first token has already expired; later ones are fresh.
  options.token_provider = [&] {
    return chatd.Token("alice", calls.fetch_add(1) == 0 ? -60'000 : 3'600'000);
  };
  options.device_id = "alice-laptop";
  options.listener = recorder;
  auto client = Client::Open(std::move(options));
  REQUIRE(client.ok());
  REQUIRE((*client)->Start().ok());
  REQUIRE(Drive(
      {}, [&] { return recorder->state() == ConnectionState::kConnected; }, 10'000));
  CHECK(calls.load() == 2);
  auto errors = recorder->errors();
  REQUIRE(errors.size() == 1);
  CHECK(errors[0].code() == Code::kUnauthenticated);
  CHECK(errors[0].message().find("expired") != std::string_view::npos);
  (*client)->Close();
}

TEST_CASE("client e2e: Reconnect() drops the connection and comes back, nothing lost") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TestClient alice = MakeClient(chatd, "alice", "alice-laptop", "");
  TestClient bob = MakeClient(chatd, "bob", "bob-phone", "", Mode::kPoll);
  REQUIRE(Drive({&bob}, [&] { return bob.recorder->state() == ConnectionState::kConnected; }));
  REQUIRE(alice.client->SendTo("bob", "text/plain", "m0").ok());
  REQUIRE(Drive({&bob}, [&] { return bob.recorder->ReceivedBodies().size() == 1; }));
  REQUIRE(bob.client->Reconnect().ok());
  REQUIRE(alice.client->SendTo("bob", "text/plain", "m1").ok());
  REQUIRE(Drive({&bob}, [&] {
    return bob.recorder->ReceivedBodies().size() == 2 && bob.recorder->connects() == 2;
  }));
  CHECK(bob.recorder->ReceivedBodies() == Bodies(2));
  CHECK(bob.recorder->state() == ConnectionState::kConnected);
  alice.client->Close();
  bob.client->Close();
}

TEST_CASE("client e2e: over wss, verified against the server's certificate, nothing lost") {
  ChatdProcess chatd({.extra_flags = {}, .tls = true});
  REQUIRE(chatd.Start().ok());
  REQUIRE(chatd.url().rfind("wss://", 0) == 0);
  TempDir dir;
  TestClient alice = MakeClient(chatd, "alice", "alice-laptop", dir.File("alice.db"), Mode::kStart,
                                1000, chatd.cert_path());
  TestClient bob = MakeClient(chatd, "bob", "bob-phone", dir.File("bob.db"), Mode::kPoll, 1000,
                              chatd.cert_path());
  constexpr int kCount = 20;
  for (const std::string& body : Bodies(kCount)) {
    REQUIRE(alice.client->SendTo("bob", "text/plain", body).ok());
  }
  REQUIRE(Drive({&alice, &bob}, [&] {
    return bob.recorder->ReceivedBodies().size() >= kCount &&
           alice.recorder->OwnWithStatus(MessageStatus::kSent).size() == kCount;
  }));
  CHECK(bob.recorder->ReceivedBodies() == Bodies(kCount));
  CHECK(bob.recorder->ReceivedSeqs() == Range(1, kCount));
  REQUIRE(bob.client->SendTo("alice", "text/plain", "back over tls").ok());
  REQUIRE(Drive({&alice, &bob}, [&] { return alice.recorder->ReceivedBodies().size() == 1; }));
  CHECK(alice.recorder->ReceivedBodies() == std::vector<std::string>{"back over tls"});
  CHECK(alice.recorder->errors().empty());
  CHECK(bob.recorder->errors().empty());
  alice.client->Close();
  bob.client->Close();
}

TEST_CASE("client e2e: over wss, a server certificate the client cannot verify is refused") {
  ChatdProcess chatd({.extra_flags = {}, .tls = true});
  REQUIRE(chatd.Start().ok());
  std::mutex mu;
  std::vector<std::pair<LogLevel, std::string>> lines;
  SetLogSink([&](LogLevel level, std::string_view line) {
    std::lock_guard lock(mu);
    lines.emplace_back(level, line);
  });
  struct RestoreSink {
    ~RestoreSink() { SetLogSink(nullptr); }
  } restore;
  const auto count = [&](LogLevel level, std::string_view a, std::string_view b) {
    std::lock_guard lock(mu);
    size_t n = 0;
    for (const auto& [l, line] : lines) {
      if (l == level && line.find(a) != std::string::npos && line.find(b) != std::string::npos) ++n;
    }
    return n;
  };
  TempDir dir;
  // No tls_ca_path: the system's CAs, which do not include the test's self-signed certificate.
  TestClient alice = MakeClient(chatd, "alice", "alice-laptop", dir.File("alice.db"));
  REQUIRE(alice.client->SendTo("bob", "text/plain", "m0").ok());
  // Several attempts (backoff 50..500 ms), each refused at the handshake. libwebsockets' reason
  // reaches the application's log sink, not stderr.
  CHECK(Drive(
      {&alice}, [&] { return count(LogLevel::kInfo, "connection closed", "SSL") >= 3; }, 30'000));
  CHECK(count(LogLevel::kError, "lws: ", "self-signed certificate") >= 1);
  CHECK(alice.recorder->connects() == 0);
  CHECK(alice.recorder->state() != ConnectionState::kConnected);
  CHECK(Pending(*alice.client) == 1);
  alice.client->Close();
}

TEST_CASE("client e2e: a refused message stays in the outbox as failed until Discard") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TestClient alice = MakeClient(chatd, "alice", "alice-laptop", "", Mode::kPoll, 2);
  // Conversation 999 does not exist: the server refuses the message.
  Result<std::string> refused = alice.client->Send(999, "text/plain", "nowhere");
  REQUIRE(refused.ok());
  REQUIRE(Drive({&alice}, [&] {
    return alice.recorder->OwnWithStatus(MessageStatus::kFailed).count(*refused) == 1;
  }));
  Result<std::vector<MessageEvent>> outbox = alice.client->Outbox();
  REQUIRE(outbox.ok());
  REQUIRE(outbox->size() == 1);
  CHECK((*outbox)[0].status == MessageStatus::kFailed);
  CHECK((*outbox)[0].message.client_msg_id == *refused);

  // The failed message counts under outbox_max (2): one more fits, then the outbox is full.
  Result<std::string> sent = alice.client->SendTo("bob", "text/plain", "hello");
  REQUIRE(sent.ok());
  REQUIRE(Drive({&alice}, [&] {
    return alice.recorder->OwnWithStatus(MessageStatus::kSent).count(*sent) == 1;
  }));
  REQUIRE(alice.client->SendTo("bob", "text/plain", "b").ok());
  Result<std::string> full = alice.client->SendTo("bob", "text/plain", "c");
  CHECK(full.status().code() == Code::kResourceExhausted);
  REQUIRE(Drive({&alice}, [&] { return alice.client->Outbox()->size() == 1; }));

  // Discard removes it once; what is not in the outbox is NotFound.
  CHECK(alice.client->Discard("").code() == Code::kInvalidArgument);
  REQUIRE(alice.client->Discard(*refused).ok());
  CHECK(alice.client->Discard(*refused).code() == Code::kNotFound);
  CHECK(alice.client->Discard(*sent).code() == Code::kNotFound);
  CHECK(alice.client->Outbox()->empty());
  REQUIRE(alice.client->SendTo("bob", "text/plain", "d").ok());
  REQUIRE(alice.client->SendTo("bob", "text/plain", "e").ok());
  alice.client->Close();
  CHECK(alice.client->Discard(*refused).code() == Code::kFailedPrecondition);
}

TEST_CASE("client e2e: a message past the server's bounds fails at once and the outbox goes on") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TestClient alice = MakeClient(chatd, "alice", "alice-laptop", "");
  TestClient bob = MakeClient(chatd, "bob", "bob-phone", "");
  // Past the server's frame bound (256 KiB), on which it would close the connection, and past
  // its body bound (64 KiB) within a frame; then a message that fits.
  Result<std::string> huge = alice.client->SendTo("bob", "text/plain", std::string(300 << 10, 'h'));
  Result<std::string> big = alice.client->SendTo("bob", "text/plain", std::string(100 << 10, 'b'));
  Result<std::string> fits = alice.client->SendTo("bob", "text/plain", "after");
  REQUIRE(huge.ok());
  REQUIRE(big.ok());
  REQUIRE(fits.ok());
  REQUIRE(Drive({&alice, &bob}, [&] {
    return bob.recorder->ReceivedBodies() == std::vector<std::string>{"after"} &&
           alice.recorder->OwnWithStatus(MessageStatus::kSent).count(*fits) == 1;
  }));
  std::map<std::string, Status> failed = alice.recorder->FailReasons();
  REQUIRE(failed.size() == 2);
  CHECK(failed[*huge].code() == Code::kInvalidArgument);
  CHECK(failed[*huge].message().find("too large") != std::string_view::npos);
  CHECK(failed[*big].code() == Code::kInvalidArgument);
  CHECK(failed[*big].message().find("too large") != std::string_view::npos);
  // Both stay in the outbox as failed; the connection was never dropped.
  Result<std::vector<MessageEvent>> outbox = alice.client->Outbox();
  REQUIRE(outbox.ok());
  CHECK(outbox->size() == 2);
  CHECK(alice.recorder->connects() == 1);
  alice.client->Close();
  bob.client->Close();
}

// The pid of the process with `arg` among its arguments, or -1.
pid_t FindProcessWithArg(const std::string& arg) {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string cmdline = ReadFile(entry.path().string() + "/cmdline");
    size_t start = 0;
    while (start < cmdline.size()) {
      size_t end = cmdline.find('\0', start);
      if (end == std::string::npos) end = cmdline.size();
      if (cmdline.compare(start, end - start, arg) == 0) return std::stoi(name);
      start = end + 1;
    }
  }
  return -1;
}

TEST_CASE("client e2e: a frozen server is detected by the heartbeat and the client recovers") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  const pid_t server = FindProcessWithArg(chatd.db_path());
  REQUIRE(server > 0);
  auto recorder = std::make_shared<Recorder>();
  ClientOptions options;
  options.url = chatd.url();
  options.token_provider = [&chatd] { return chatd.Token("bob"); };
  options.device_id = "bob-phone";
  options.listener = recorder;
  options.heartbeat_interval_ms = 300;
  options.connect_timeout_ms = 1'000;
  options.reconnect.base_ms = 50;
  options.reconnect.cap_ms = 200;
  auto bob = Client::Open(std::move(options));
  REQUIRE(bob.ok());
  REQUIRE((*bob)->Start().ok());
  REQUIRE(Drive({}, [&] { return recorder->state() == ConnectionState::kConnected; }));

  // Frozen, the server neither answers Pings nor closes the socket: only the heartbeat notices.
  REQUIRE(kill(server, SIGSTOP) == 0);
  const bool noticed = Drive(
      {}, [&] { return recorder->state() != ConnectionState::kConnected; }, 10'000);
  REQUIRE(kill(server, SIGCONT) == 0);
  CHECK(noticed);
  REQUIRE(Drive({}, [&] {
    return recorder->state() == ConnectionState::kConnected && recorder->connects() >= 2;
  }));
  TestClient alice = MakeClient(chatd, "alice", "alice-laptop", "");
  REQUIRE(alice.client->SendTo("bob", "text/plain", "m0").ok());
  REQUIRE(Drive({}, [&] { return recorder->ReceivedBodies().size() == 1; }));
  CHECK(recorder->ReceivedBodies() == Bodies(1));
  alice.client->Close();
  (*bob)->Close();
}

}  // namespace
}  // namespace chat::testing
