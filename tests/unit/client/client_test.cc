// chat::Client's public contract without a server: option validation, argument errors, the
// bounded persistent outbox, and the Start/Poll/Close rules.
#include "chat/client.h"

#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <memory>
#include <string>
#include <thread>

#include "tests/testing/temp_dir.h"

namespace chat {
namespace {

class CountingListener : public ClientListener {
 public:
  void OnConnectionState(ConnectionState) override { ++calls; }
  void OnMessage(const MessageEvent&) override { ++calls; }
  void OnError(const Status&) override { ++calls; }
  std::atomic<int> calls{0};
};

// Nothing listens on port 1: the client stays offline.
ClientOptions Offline(const std::string& cache = "") {
  ClientOptions o;
  o.url = "ws://127.0.0.1:1/";
  o.token_provider = [] { return std::string("token"); };
  o.device_id = "dev-1";
  o.cache_path = cache;
  return o;
}

Status OpenStatus(ClientOptions o) {
  auto r = Client::Open(std::move(o));
  return r.ok() ? Status::Ok() : r.status();
}

TEST_CASE("client: Open names the invalid option") {
  ClientOptions o = Offline();
  o.url = "http://example.com";
  Status st = OpenStatus(o);
  CHECK(st.code() == Code::kInvalidArgument);
  CHECK(st.message().find("url") != std::string_view::npos);

  o = Offline();
  o.url = "ws://";
  CHECK(OpenStatus(o).code() == Code::kInvalidArgument);

  o = Offline();
  o.token_provider = nullptr;
  st = OpenStatus(o);
  CHECK(st.code() == Code::kInvalidArgument);
  CHECK(st.message().find("token_provider") != std::string_view::npos);

  o = Offline();
  o.device_id = "";
  CHECK(OpenStatus(o).message().find("device_id") != std::string_view::npos);
  o.device_id = std::string(129, 'd');
  CHECK(OpenStatus(o).code() == Code::kInvalidArgument);

  o = Offline();
  o.outbox_max = 0;
  CHECK(OpenStatus(o).message().find("outbox_max") != std::string_view::npos);

  o = Offline();
  o.max_in_flight = 0;
  CHECK(OpenStatus(o).message().find("max_in_flight") != std::string_view::npos);

  o = Offline();
  o.reconnect.cap_ms = 10;
  CHECK(OpenStatus(o).message().find("reconnect") != std::string_view::npos);
  // Seconds written where milliseconds are meant: a client that would drop every link.
  o = Offline();
  o.heartbeat_interval_ms = 5;
  CHECK(OpenStatus(o).message().find("heartbeat_interval_ms") != std::string_view::npos);
  o = Offline();
  o.connect_timeout_ms = 10;
  CHECK(OpenStatus(o).message().find("connect_timeout_ms") != std::string_view::npos);

  CHECK(OpenStatus(Offline()).ok());
}

TEST_CASE("client: Open refuses a request_timeout_ms below 100 ms, naming it") {
  ClientOptions o = Offline();
  o.request_timeout_ms = 0;
  Status st = OpenStatus(o);
  CHECK(st.code() == Code::kInvalidArgument);
  CHECK(st.message().find("request_timeout_ms") != std::string_view::npos);
  o = Offline();
  o.request_timeout_ms = 99;
  CHECK(OpenStatus(o).code() == Code::kInvalidArgument);
  o = Offline();
  o.request_timeout_ms = 100;
  CHECK(OpenStatus(o).ok());
  CHECK(ClientOptions{}.request_timeout_ms == 30'000);
}

TEST_CASE("client: a cache file that is not a database is refused with DataLoss") {
  testing::TempDir dir;
  REQUIRE(testing::WriteFile(dir.File("junk.db"), std::string(8192, 'x')));
  CHECK(OpenStatus(Offline(dir.File("junk.db"))).code() == Code::kDataLoss);
  CHECK(OpenStatus(Offline(dir.File("missing-dir/x/cache.db"))).code() == Code::kUnavailable);
}

TEST_CASE("client: Send validates its arguments") {
  auto client = Client::Open(Offline()).value();
  CHECK(client->Send(0, "text/plain", "x").status().code() == Code::kInvalidArgument);
  CHECK(client->Send(5, "", "x").status().code() == Code::kInvalidArgument);
  CHECK(client->SendTo("", "text/plain", "x").status().code() == Code::kInvalidArgument);
  const auto before_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count();
  auto id = client->Send(5, "text/plain", "x");
  REQUIRE(id.ok());
  // The wall clock in ms (12 hex digits), then 128 random bits (32 hex digits).
  REQUIRE(id->size() == 44);
  CHECK(id->find_first_not_of("0123456789abcdef") == std::string::npos);
  const auto stamped_ms = static_cast<int64_t>(std::stoull(id->substr(0, 12), nullptr, 16));
  CHECK(stamped_ms >= before_ms);
  CHECK(stamped_ms < before_ms + 60'000);
  // A body larger than any message this client accepts could never come back to it.
  const std::string huge(size_t{4} * 1024 * 1024 + 1, 'h');
  Status too_big = client->Send(5, "text/plain", huge).status();
  CHECK(too_big.code() == Code::kInvalidArgument);
  CHECK(too_big.message().find("max_message_bytes") != std::string_view::npos);
  auto other = client->Send(5, "text/plain", "x");
  REQUIRE(other.ok());
  CHECK(*other != *id);
  CHECK(other->substr(12) != id->substr(12));  // the random parts differ
  CHECK(other->substr(0, 12) >= id->substr(0, 12));
}

TEST_CASE("client: the outbox is bounded by outbox_max") {
  ClientOptions o = Offline();
  o.outbox_max = 2;
  auto client = Client::Open(std::move(o)).value();
  REQUIRE(client->SendTo("bob", "text/plain", "1").ok());
  REQUIRE(client->SendTo("bob", "text/plain", "2").ok());
  auto third = client->SendTo("bob", "text/plain", "3");
  CHECK(third.status().code() == Code::kResourceExhausted);
  auto outbox = client->Outbox();
  REQUIRE(outbox.ok());
  REQUIRE(outbox->size() == 2);
  CHECK((*outbox)[0].message.body == "1");
  CHECK((*outbox)[0].peer == "bob");
  CHECK((*outbox)[0].status == MessageStatus::kPending);
  CHECK((*outbox)[1].message.body == "2");
}

TEST_CASE("client: the outbox survives Close and is there for the next Client") {
  testing::TempDir dir;
  std::string first_id;
  {
    auto client = Client::Open(Offline(dir.File("cache.db"))).value();
    first_id = client->Send(7, "text/plain", "kept").value();
    REQUIRE(client->SendTo("carol", "text/plain", "kept too").ok());
    client->Close();
  }
  auto client = Client::Open(Offline(dir.File("cache.db"))).value();
  auto outbox = client->Outbox();
  REQUIRE(outbox.ok());
  REQUIRE(outbox->size() == 2);
  CHECK((*outbox)[0].message.client_msg_id == first_id);
  CHECK((*outbox)[0].message.conversation_id == 7);
  CHECK((*outbox)[1].peer == "carol");
}

TEST_CASE(
    "client: a process killed right after Send() returns leaves every message in the outbox") {
  testing::TempDir dir;
  const std::string cache = dir.File("cache.db");
  constexpr int kCount = 50;
  int pipe_fds[2];
  REQUIRE(pipe(pipe_fds) == 0);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // The child sends, tells the parent its ids and dies with no Close() and no destructor.
    close(pipe_fds[0]);
    auto client = Client::Open(Offline(cache));
    std::string ids;
    for (int i = 0; client.ok() && i < kCount; ++i) {
      auto id = (*client)->SendTo("bob", "text/plain", "m" + std::to_string(i));
      if (!id.ok()) break;
      ids += *id + "\n";
    }
    (void)!write(pipe_fds[1], ids.data(), ids.size());
    raise(SIGKILL);
  }
  close(pipe_fds[1]);
  std::string ids;
  char buffer[4096];
  for (ssize_t n; (n = read(pipe_fds[0], buffer, sizeof buffer)) > 0;) {
    ids.append(buffer, static_cast<size_t>(n));
  }
  close(pipe_fds[0]);
  int wstatus = 0;
  REQUIRE(waitpid(pid, &wstatus, 0) == pid);
  REQUIRE(WIFSIGNALED(wstatus));

  auto client = Client::Open(Offline(cache));
  REQUIRE(client.ok());
  auto outbox = (*client)->Outbox();
  REQUIRE(outbox.ok());
  REQUIRE(outbox->size() == kCount);
  std::string listed;
  for (int i = 0; i < kCount; ++i) {
    const MessageEvent& event = (*outbox)[static_cast<size_t>(i)];
    CHECK(event.message.body == "m" + std::to_string(i));
    CHECK(event.status == MessageStatus::kPending);
    listed += event.message.client_msg_id + "\n";
  }
  CHECK(listed == ids);
  // The outbox keeps its order for messages sent after the restart.
  auto next = (*client)->SendTo("bob", "text/plain", "after");
  REQUIRE(next.ok());
  outbox = (*client)->Outbox();
  REQUIRE(outbox.ok());
  REQUIRE(outbox->size() == kCount + 1);
  CHECK(outbox->back().message.client_msg_id == *next);
}

TEST_CASE("client: a cache file in use by another client is refused until that one is closed") {
  testing::TempDir dir;
  auto first = Client::Open(Offline(dir.File("cache.db")));
  REQUIRE(first.ok());
  REQUIRE((*first)->SendTo("bob", "text/plain", "kept").ok());
  // Waits for the lock (a few seconds) before giving up.
  CHECK(OpenStatus(Offline(dir.File("cache.db"))).code() == Code::kUnavailable);
  (*first)->Close();
  auto second = Client::Open(Offline(dir.File("cache.db")));
  REQUIRE(second.ok());
  auto outbox = (*second)->Outbox();
  REQUIRE(outbox.ok());
  REQUIRE(outbox->size() == 1);
  CHECK((*outbox)[0].message.body == "kept");
}

TEST_CASE("client: calls after Close fail with FailedPrecondition and no callback runs") {
  auto listener = std::make_shared<CountingListener>();
  ClientOptions o = Offline();
  o.listener = listener;
  auto client = Client::Open(std::move(o)).value();
  REQUIRE(client->Poll(0).ok());
  client->Close();
  client->Close();  // idempotent
  const int calls = listener->calls.load();
  CHECK(client->Send(5, "text/plain", "x").status().code() == Code::kFailedPrecondition);
  CHECK(client->History(5, 0, 10, [](Result<HistoryResult>) {}).code() ==
        Code::kFailedPrecondition);
  CHECK(client->Reconnect().code() == Code::kFailedPrecondition);
  CHECK(client->Poll(0).code() == Code::kFailedPrecondition);
  CHECK(client->Start().code() == Code::kFailedPrecondition);
  CHECK(client->Conversations().status().code() == Code::kFailedPrecondition);
  CHECK(client->state() == ConnectionState::kClosed);
  CHECK(listener->calls.load() == calls);
}

TEST_CASE("client: Start and Poll cannot be mixed") {
  {
    auto client = Client::Open(Offline()).value();
    REQUIRE(client->Start().ok());
    CHECK(client->Start().code() == Code::kFailedPrecondition);
    CHECK(client->Poll(0).code() == Code::kFailedPrecondition);
    client->Close();
  }
  auto client = Client::Open(Offline()).value();
  REQUIRE(client->Poll(0).ok());
  CHECK(client->Start().code() == Code::kFailedPrecondition);
}

TEST_CASE("client: History validates its arguments and never calls back on error") {
  auto client = Client::Open(Offline()).value();
  int called = 0;
  auto cb = [&](Result<HistoryResult>) { ++called; };
  CHECK(client->History(0, 0, 10, cb).code() == Code::kInvalidArgument);
  CHECK(client->History(5, 0, 0, cb).code() == Code::kInvalidArgument);
  CHECK(client->History(5, 0, 10, nullptr).code() == Code::kInvalidArgument);
  for (int i = 0; i < 5; ++i) REQUIRE(client->Poll(0).ok());
  CHECK(called == 0);
}

TEST_CASE("client: offline, History is answered Unavailable on the loop, not inside the call") {
  auto client = Client::Open(Offline()).value();
  int called = 0;
  Status got;
  REQUIRE(client
              ->History(5, 0, 10,
                        [&](Result<HistoryResult> r) {
                          ++called;
                          got = r.status();
                        })
              .ok());
  CHECK(called == 0);
  REQUIRE(client->Poll(0).ok());
  CHECK(called == 1);
  CHECK(got.code() == Code::kUnavailable);
}

TEST_CASE("client: pending sends are reported on the loop thread, not inside Send") {
  auto listener = std::make_shared<CountingListener>();
  ClientOptions o = Offline();
  o.listener = listener;
  auto client = Client::Open(std::move(o)).value();
  REQUIRE(client->SendTo("bob", "text/plain", "x").ok());
  CHECK(listener->calls.load() == 0);
  REQUIRE(client->Poll(0).ok());
  CHECK(listener->calls.load() >= 1);
}

// Counts callbacks that run after Close() returned; can close the client from a callback.
class CloseWatcher : public ClientListener {
 public:
  void OnConnectionState(ConnectionState) override { Called(); }
  void OnMessage(const MessageEvent&) override { Called(); }
  void OnError(const Status&) override { Called(); }

  void Called() {
    ++calls;
    if (close_returned) ++after_close;
    if (close_from_callback && client != nullptr) {
      client->Close();  // must not deadlock
      close_returned = true;
    }
    // Keep the loop inside a callback for a while, so Close() meets one in progress.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }

  std::atomic<int> calls{0};
  std::atomic<int> after_close{0};
  std::atomic<bool> close_returned{false};
  bool close_from_callback = false;
  Client* client = nullptr;
};

ClientOptions Churning(std::shared_ptr<ClientListener> listener) {
  ClientOptions o = Offline();
  o.listener = std::move(listener);
  // Connection refused at once and retried quickly: a steady stream of state callbacks.
  o.reconnect.base_ms = 1;
  o.reconnect.cap_ms = 5;
  return o;
}

TEST_CASE("client: Close() from another thread waits for a running callback and none runs after") {
  auto watcher = std::make_shared<CloseWatcher>();
  auto client = Client::Open(Churning(watcher)).value();
  REQUIRE(client->Start().ok());
  for (int i = 0; i < 500 && watcher->calls.load() < 3; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  REQUIRE(watcher->calls.load() >= 3);
  // Posted work keeps the loop busy while it closes.
  for (int i = 0; i < 20; ++i) REQUIRE(client->SendTo("bob", "text/plain", "x").ok());
  client->Close();
  watcher->close_returned = true;
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(watcher->after_close.load() == 0);
  CHECK(client->state() == ConnectionState::kClosed);
}

TEST_CASE("client: Close() from inside a callback returns and stops the callbacks") {
  auto watcher = std::make_shared<CloseWatcher>();
  watcher->close_from_callback = true;
  auto client = Client::Open(Churning(watcher)).value();
  watcher->client = client.get();
  REQUIRE(client->Start().ok());
  for (int i = 0; i < 500 && !watcher->close_returned.load(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  REQUIRE(watcher->close_returned.load());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(watcher->calls.load() == 1);
  CHECK(watcher->after_close.load() == 0);
  CHECK(client->Send(5, "text/plain", "x").status().code() == Code::kFailedPrecondition);
  watcher->client = nullptr;
  client.reset();  // joins the loop thread
}

// Poll() from a callback of the same client would lock what its caller holds.
class PollingListener : public ClientListener {
 public:
  void OnConnectionState(ConnectionState) override {
    if (client != nullptr && !polled.exchange(true)) status = client->Poll(0);
  }
  Client* client = nullptr;
  std::atomic<bool> polled{false};
  Status status;
};

TEST_CASE("client: Poll() from inside a callback is refused, not a deadlock") {
  auto listener = std::make_shared<PollingListener>();
  ClientOptions o = Offline();
  o.listener = listener;
  auto client = Client::Open(std::move(o)).value();
  listener->client = client.get();
  for (int i = 0; i < 100 && !listener->polled.load(); ++i) REQUIRE(client->Poll(10).ok());
  REQUIRE(listener->polled.load());
  CHECK(listener->status.code() == Code::kFailedPrecondition);
  listener->client = nullptr;
}

TEST_CASE("client: Close() from two threads at once joins the loop once") {
  for (int round = 0; round < 100; ++round) {
    auto client = Client::Open(Offline()).value();
    REQUIRE(client->Start().ok());
    std::thread other([&] { client->Close(); });
    client->Close();
    other.join();
    CHECK(client->state() == ConnectionState::kClosed);
  }
}

TEST_CASE("client: group operations validate their arguments and never call back on error") {
  auto client = Client::Open(Offline()).value();
  int calls = 0;
  auto cb = [&](Result<ConversationInfo>) { ++calls; };
  Status st = client->CreateGroup("", {"bob"}, ConversationKind::kGroup, cb);
  CHECK(st.code() == Code::kInvalidArgument);
  CHECK(st.message().find("title") != std::string_view::npos);
  st = client->CreateGroup("team", {"bob"}, ConversationKind::kDirect, cb);
  CHECK(st.code() == Code::kInvalidArgument);
  CHECK(st.message().find("kind") != std::string_view::npos);
  st = client->CreateGroup("team", {""}, ConversationKind::kGroup, cb);
  CHECK(st.message().find("members") != std::string_view::npos);
  CHECK(client->CreateGroup("team", {"bob"}, ConversationKind::kGroup, nullptr).code() ==
        Code::kInvalidArgument);
  CHECK(client->RenameGroup(0, "x", cb).code() == Code::kInvalidArgument);
  CHECK(client->RenameGroup(5, "", cb).code() == Code::kInvalidArgument);
  st = client->AddMembers(5, {}, cb);
  CHECK(st.code() == Code::kInvalidArgument);
  CHECK(st.message().find("users") != std::string_view::npos);
  CHECK(client->RemoveMembers(0, {"bob"}, cb).code() == Code::kInvalidArgument);
  CHECK(client->Leave(0, cb).code() == Code::kInvalidArgument);
  CHECK(client->SetRole(5, "", Role::kAdmin, cb).code() == Code::kInvalidArgument);
  CHECK(client->SetRole(5, "bob", Role::kUnspecified, cb).code() == Code::kInvalidArgument);
  CHECK(client->GetReceipts(0, [](Result<std::vector<MemberWatermarks>>) {}).code() ==
        Code::kInvalidArgument);
  CHECK(client->GetReceipts(5, nullptr).code() == Code::kInvalidArgument);
  CHECK(client->SetRetention(0, -1, cb).code() == Code::kInvalidArgument);
  st = client->SetRetention(5, -2, cb);
  CHECK(st.code() == Code::kInvalidArgument);
  CHECK(st.message().find("retention_ms") != std::string_view::npos);
  CHECK(client->SetRetention(5, 1000, nullptr).code() == Code::kInvalidArgument);
  CHECK(client->Subscribe(0).code() == Code::kInvalidArgument);
  CHECK(client->MarkRead(0).code() == Code::kInvalidArgument);
  CHECK(client->SetTyping(0, true).code() == Code::kInvalidArgument);
  CHECK(client->MessageStatusOf(5, 1).status().code() == Code::kNotFound);
  CHECK(client->MessageStatusOf(5, 0).status().code() == Code::kInvalidArgument);
  CHECK(client->UnreadTotal().value() == 0);
  REQUIRE(client->Poll(0).ok());
  CHECK(calls == 0);

  client->Close();
  CHECK(client->Leave(5, cb).code() == Code::kFailedPrecondition);
  CHECK(client->SetRetention(5, -1, cb).code() == Code::kFailedPrecondition);
  CHECK(client->MarkRead(5).code() == Code::kFailedPrecondition);
  CHECK(client->SetTyping(5, true).code() == Code::kFailedPrecondition);
  CHECK(client->Subscribe(5).code() == Code::kFailedPrecondition);
  CHECK(client->UnreadTotal().status().code() == Code::kFailedPrecondition);
}

TEST_CASE("client: offline, a group operation is answered Unavailable on the loop") {
  auto client = Client::Open(Offline()).value();
  int calls = 0;
  Status got;
  REQUIRE(client
              ->CreateGroup("team", {"bob", "carol"}, ConversationKind::kChannel,
                            [&](Result<ConversationInfo> r) {
                              ++calls;
                              got = r.status();
                            })
              .ok());
  CHECK(calls == 0);
  REQUIRE(client->Poll(0).ok());
  CHECK(calls == 1);
  CHECK(got.code() == Code::kUnavailable);
}

TEST_CASE("client: channel subscriptions are bounded") {
  auto client = Client::Open(Offline()).value();
  for (ConversationId id = 1; id <= kMaxChannelSubscriptions; ++id) {
    REQUIRE(client->Subscribe(id).ok());
  }
  CHECK(client->Subscribe(kMaxChannelSubscriptions + 1).code() == Code::kResourceExhausted);
  CHECK(client->Subscribe(1).ok());  // already subscribed
  CHECK(client->Unsubscribe(1).ok());
  CHECK(client->Subscribe(kMaxChannelSubscriptions + 1).ok());
}

TEST_CASE("client: presence and push calls validate their arguments and never call back on error") {
  auto client = Client::Open(Offline()).value();
  int calls = 0;
  auto cb = [&](Status) { ++calls; };
  Status st = client->SubscribePresence({}, cb);
  CHECK(st.code() == Code::kInvalidArgument);
  CHECK(st.message().find("users") != std::string_view::npos);
  CHECK(client->SubscribePresence({"bob", ""}, cb).code() == Code::kInvalidArgument);
  CHECK(client->SubscribePresence({"bob"}, nullptr).code() == Code::kInvalidArgument);
  CHECK(client->UnsubscribePresence({}, cb).code() == Code::kInvalidArgument);
  std::vector<UserId> too_many;
  for (size_t i = 0; i <= kMaxPresenceSubscriptions; ++i)
    too_many.push_back("u" + std::to_string(i));
  CHECK(client->SubscribePresence(too_many, cb).code() == Code::kResourceExhausted);
  st = client->RegisterPushToken("", "t", cb);
  CHECK(st.code() == Code::kInvalidArgument);
  CHECK(st.message().find("platform") != std::string_view::npos);
  CHECK(client->RegisterPushToken(std::string(kMaxPushPlatformBytes + 1, 'p'), "t", cb).code() ==
        Code::kInvalidArgument);
  st = client->RegisterPushToken("fcm", std::string(kMaxPushTokenBytes + 1, 't'), cb);
  CHECK(st.code() == Code::kInvalidArgument);
  CHECK(st.message().find("token") != std::string_view::npos);
  CHECK(client->RegisterPushToken("fcm", "t", nullptr).code() == Code::kInvalidArgument);
  REQUIRE(client->Poll(0).ok());
  CHECK(calls == 0);

  client->Close();
  CHECK(client->SubscribePresence({"bob"}, cb).code() == Code::kFailedPrecondition);
  CHECK(client->UnsubscribePresence({"bob"}, cb).code() == Code::kFailedPrecondition);
  CHECK(client->RegisterPushToken("fcm", "t", cb).code() == Code::kFailedPrecondition);
  CHECK(calls == 0);
}

TEST_CASE("client: offline, presence and push requests wait for the connection") {
  auto client = Client::Open(Offline()).value();
  int calls = 0;
  REQUIRE(client->SubscribePresence({"bob"}, [&](Status) { ++calls; }).ok());
  REQUIRE(client->RegisterPushToken("fcm", "t", [&](Status) { ++calls; }).ok());
  Status unsubscribed = Internal("not called");
  REQUIRE(client->UnsubscribePresence({"carol"}, [&](Status st) { unsubscribed = st; }).ok());
  REQUIRE(client->Poll(0).ok());
  CHECK(calls == 0);
  CHECK(unsubscribed.ok());  // offline there is nothing to tell the server
  client->Close();
  CHECK(calls == 0);  // no callback after Close
}

}  // namespace
}  // namespace chat
