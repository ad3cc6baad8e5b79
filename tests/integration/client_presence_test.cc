// Presence through chat::Client and chat-cli against the real chatd: what a user watching a
// contact sees, last seen in the client's cache, re-subscription after a reconnect, and the
// refusal for a non-contact.
#include <doctest/doctest.h>

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "chat/client.h"
#include "tests/testing/chatd_process.h"
#include "tests/testing/client_fixtures.h"
#include "tests/testing/temp_dir.h"

namespace chat::testing {
namespace {

class Watcher : public ClientListener {
 public:
  void OnConnectionState(ConnectionState state) override {
    std::lock_guard lock(mu_);
    if (state == ConnectionState::kConnected) ++connects_;
  }
  void OnPresence(const PresenceInfo& info) override {
    std::lock_guard lock(mu_);
    presence_.push_back(info);
  }
  void OnConversationUpdated(const ConversationInfo& info) override {
    std::lock_guard lock(mu_);
    conversations_.push_back(info);
  }
  void OnError(const Status& status) override {
    std::lock_guard lock(mu_);
    errors_.push_back(status);
  }
  int connects() {
    std::lock_guard lock(mu_);
    return connects_;
  }
  std::vector<PresenceInfo> presence() {
    std::lock_guard lock(mu_);
    return presence_;
  }
  std::vector<ConversationInfo> conversations() {
    std::lock_guard lock(mu_);
    return conversations_;
  }
  std::vector<Status> errors() {
    std::lock_guard lock(mu_);
    return errors_;
  }

 private:
  std::mutex mu_;
  int connects_ = 0;
  std::vector<PresenceInfo> presence_;
  std::vector<ConversationInfo> conversations_;
  std::vector<Status> errors_;
};

std::unique_ptr<Client> Open(const ChatdProcess& chatd, const std::string& user,
                             const std::string& cache, std::shared_ptr<ClientListener> listener) {
  return OpenStartedClient(chatd, user, user + "-laptop", cache, std::move(listener));
}

ChatdOptions FastPresence() {
  return {.extra_flags = {"--presence-grace-ms", "200", "--presence-coalesce-ms", "50"}};
}

// The latest state reported for `user`, if any.
std::optional<PresenceInfo> Latest(Watcher& w, const std::string& user) {
  std::optional<PresenceInfo> out;
  for (const PresenceInfo& p : w.presence()) {
    if (p.user == user) out = p;
  }
  return out;
}

TEST_CASE("client presence: a contact is seen online, then offline, and last seen is cached") {
  ChatdProcess chatd(FastPresence());
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  CliRun sent = RunChatCli(chatd, dir, "alice", {"send", "--to", "bob", "hi bob"});
  REQUIRE_MESSAGE(sent.code == 0, sent.out);

  auto watcher = std::make_shared<Watcher>();
  auto alice = Open(chatd, "alice", dir.File("alice.db"), watcher);
  REQUIRE(Eventually([&] { return watcher->connects() == 1; }));
  StatusAnswer subscribed;
  REQUIRE(alice->SubscribePresence({"bob"}, subscribed.Callback()).ok());
  Status answer = subscribed.Wait();
  CHECK_MESSAGE(answer.ok(), answer.ToString());
  // The current state came before the answer: bob never connected.
  std::optional<PresenceInfo> bob_state = Latest(*watcher, "bob");
  REQUIRE(bob_state.has_value());
  CHECK_FALSE(bob_state->online);
  CHECK(bob_state->last_seen_ms == 0);

  auto bob_listener = std::make_shared<Watcher>();
  auto bob = Open(chatd, "bob", dir.File("bob.db"), bob_listener);
  REQUIRE(Eventually([&] {
    auto p = Latest(*watcher, "bob");
    return p && p->online;
  }));
  CHECK(Latest(*watcher, "bob")->devices == 1);

  bob->Close();
  REQUIRE(Eventually([&] {
    auto p = Latest(*watcher, "bob");
    return p && !p->online;
  }));
  const int64_t last_seen = Latest(*watcher, "bob")->last_seen_ms;
  CHECK(last_seen > 0);
  // The direct conversation's last seen followed, in the cache and through the listener.
  REQUIRE(Eventually([&] {
    for (const ConversationInfo& c : watcher->conversations()) {
      if (c.peer == "bob" && c.peer_last_seen_ms == last_seen) return true;
    }
    return false;
  }));
  auto conversations = alice->Conversations();
  REQUIRE(conversations.ok());
  REQUIRE(conversations->size() == 1);
  CHECK((*conversations)[0].peer_last_seen_ms == last_seen);

  // After a reconnect the client subscribes again by itself and gets the state anew.
  const size_t reports = watcher->presence().size();
  REQUIRE(alice->Reconnect().ok());
  REQUIRE(Eventually([&] { return watcher->connects() == 2; }));
  REQUIRE(Eventually([&] { return watcher->presence().size() > reports; }));
  CHECK_FALSE(Latest(*watcher, "bob")->online);
  CHECK(Latest(*watcher, "bob")->last_seen_ms == last_seen);
  CHECK(watcher->errors().empty());
  alice->Close();

  // The last seen survives a restart of the client, from its cache file.
  auto again = Open(chatd, "alice", dir.File("alice.db"), std::make_shared<Watcher>());
  conversations = again->Conversations();
  REQUIRE(conversations.ok());
  REQUIRE(conversations->size() == 1);
  CHECK((*conversations)[0].peer_last_seen_ms == last_seen);
}

TEST_CASE("client presence: a non-contact cannot be watched") {
  ChatdProcess chatd(FastPresence());
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  auto watcher = std::make_shared<Watcher>();
  auto alice = Open(chatd, "alice", "", watcher);
  StatusAnswer subscribed;
  REQUIRE(alice->SubscribePresence({"mallory"}, subscribed.Callback()).ok());
  Status answer = subscribed.Wait();
  CHECK(answer.code() == Code::kPermissionDenied);
  CHECK(answer.message().find("mallory") != std::string_view::npos);
  CHECK(watcher->presence().empty());

  CliRun run = RunChatCli(chatd, dir, "alice", {"presence", "mallory"});
  CHECK(run.code == 1);
  CHECK(run.out.find("PERMISSION_DENIED") != std::string::npos);
}

TEST_CASE("chat-cli: presence and conversations show a contact online, then last seen") {
  ChatdProcess chatd(FastPresence());
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  CliRun sent = RunChatCli(chatd, dir, "alice", {"send", "--to", "bob", "hi bob"});
  REQUIRE_MESSAGE(sent.code == 0, sent.out);
  auto bob_listener = std::make_shared<Watcher>();
  auto bob = Open(chatd, "bob", dir.File("bob.db"), bob_listener);
  REQUIRE(Eventually([&] { return bob_listener->connects() == 1; }));

  CliRun online = RunChatCli(chatd, dir, "alice", {"presence", "--count", "1", "bob"});
  CHECK_MESSAGE(online.code == 0, online.out);
  CHECK(online.out.find("bob online (1 device)") != std::string::npos);
  CliRun listed = RunChatCli(chatd, dir, "alice", {"conversations"});
  CHECK_MESSAGE(listed.code == 0, listed.out);
  CHECK(listed.out.find("bob  last=1  (online (1 device))") != std::string::npos);

  bob->Close();
  // Offline once the grace period is over; --duration-ms ends a run that sees nothing more.
  REQUIRE(Eventually([&] {
    CliRun run = RunChatCli(chatd, dir, "alice", {"presence", "--count", "1", "bob"});
    return run.out.find("bob offline, last seen ") != std::string::npos;
  }));
  CliRun json = RunChatCli(chatd, dir, "alice",
                           {"--json", "presence", "--count", "5", "--duration-ms", "300", "bob"});
  CHECK_MESSAGE(json.code == 0, json.out);
  CHECK(json.out.find("{\"type\":\"presence\",\"user\":\"bob\",\"online\":false,\"devices\":0,"
                      "\"last_seen_ms\":") != std::string::npos);
  listed = RunChatCli(chatd, dir, "alice", {"conversations"});
  CHECK(listed.out.find("bob  last=1  (offline, last seen ") != std::string::npos);
  CHECK(listed.out.find(" UTC)") != std::string::npos);
}

}  // namespace
}  // namespace chat::testing
