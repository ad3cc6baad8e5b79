// chat::Client against a real chatd with a short retention: what retention deletes on the server
// leaves the clients' caches too, whether a client is online when the sweep runs (the server's
// notice) or offline (its next Sync).
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "chat/client.h"
#include "tests/integration/server_test_helpers.h"
#include "tests/testing/cache_file.h"
#include "tests/testing/chatd_process.h"
#include "tests/testing/client_fixtures.h"
#include "tests/testing/temp_dir.h"

namespace chat::testing {
namespace {

// Records the messages and expiries one client reports; read from the test thread.
class ExpiryRecorder : public ClientListener {
 public:
  void OnConnectionState(ConnectionState state) override {
    std::lock_guard lock(mu_);
    state_ = state;
  }
  void OnMessage(const MessageEvent& event) override {
    std::lock_guard lock(mu_);
    if (event.status == MessageStatus::kSent) seqs_.push_back(event.message.seq);
  }
  void OnMessagesExpired(ConversationId conversation, Seq up_to_seq) override {
    std::lock_guard lock(mu_);
    expired_.emplace_back(conversation, up_to_seq);
  }
  void OnConversationUpdated(const ConversationInfo& info) override {
    std::lock_guard lock(mu_);
    infos_.push_back(info);
  }

  size_t received() {
    std::lock_guard lock(mu_);
    return seqs_.size();
  }
  ConnectionState state() {
    std::lock_guard lock(mu_);
    return state_;
  }
  // The highest seq told expired in `conversation` (0: none).
  Seq expired_up_to(ConversationId conversation) {
    std::lock_guard lock(mu_);
    Seq up_to = 0;
    for (const auto& [id, seq] : expired_) {
      if (id == conversation) up_to = std::max(up_to, seq);
    }
    return up_to;
  }

 private:
  std::mutex mu_;
  ConnectionState state_ = ConnectionState::kDisconnected;
  std::vector<Seq> seqs_;
  std::vector<std::pair<ConversationId, Seq>> expired_;
  std::vector<ConversationInfo> infos_;
};

TEST_CASE("client: expired messages leave the cache of online and of offline devices") {
  // No retention until the laptop is offline holding the messages: then bob sets the
  // conversation's to 1 s, so the sweep (every 100 ms) deletes them about a second after their
  // commit. Nothing depends on how fast the clients get there.
  ChatdProcess chatd({.extra_flags = {"--retention-sweep-interval-ms", "100"}});
  MustStart(chatd);
  TempDir dir;
  const std::string online_cache = dir.File("bob-phone.db");
  const std::string offline_cache = dir.File("bob-laptop.db");
  auto alice_events = std::make_shared<ExpiryRecorder>();
  auto phone_events = std::make_shared<ExpiryRecorder>();
  auto laptop_events = std::make_shared<ExpiryRecorder>();
  std::unique_ptr<Client> alice = OpenStartedClient(chatd, "alice", "a1", "", alice_events);
  std::unique_ptr<Client> phone =
      OpenStartedClient(chatd, "bob", "phone", online_cache, phone_events);
  std::unique_ptr<Client> laptop =
      OpenStartedClient(chatd, "bob", "laptop", offline_cache, laptop_events);
  REQUIRE(Eventually([&] {
    return phone_events->state() == ConnectionState::kConnected &&
           laptop_events->state() == ConnectionState::kConnected;
  }));

  for (int i = 0; i < 3; ++i)
    REQUIRE(alice->SendTo("bob", "text/plain", "m" + std::to_string(i)).ok());
  REQUIRE(
      Eventually([&] { return phone_events->received() == 3 && laptop_events->received() == 3; }));
  Result<std::vector<ConversationInfo>> listed = phone->Conversations();
  REQUIRE(listed.ok());
  REQUIRE(listed->size() == 1);
  const ConversationId conversation = (*listed)[0].conversation_id;
  // The laptop goes offline holding all three.
  laptop->Close();
  laptop.reset();
  REQUIRE(laptop_events->expired_up_to(conversation) == 0);
  REQUIRE(FileSeqs(offline_cache, conversation) == std::vector<Seq>{1, 2, 3});

  // Retention starts now; its system message (seq 4) expires a second later too.
  std::mutex mu;
  std::optional<Status> set;
  REQUIRE(phone
              ->SetRetention(conversation, 1000,
                             [&](Result<ConversationInfo> r) {
                               std::lock_guard lock(mu);
                               set = r.status();
                             })
              .ok());
  REQUIRE(Eventually([&] {
    std::lock_guard lock(mu);
    return set.has_value();
  }));
  REQUIRE(set->ok());

  // The phone is told once the sweep deleted them, and drops them.
  REQUIRE(Eventually([&] { return phone_events->expired_up_to(conversation) == 4; }));
  CHECK(Eventually([&] { return alice_events->expired_up_to(conversation) == 4; }));
  listed = phone->Conversations();
  REQUIRE(listed.ok());
  REQUIRE(listed->size() == 1);
  CHECK((*listed)[0].first_seq == 0);
  CHECK((*listed)[0].last_seq == 4);
  phone->Close();
  CHECK(FileSeqs(online_cache, conversation).empty());

  // The laptop comes back with nothing new in the conversation, and drops them on its Sync.
  laptop = OpenStartedClient(chatd, "bob", "laptop", offline_cache, laptop_events);
  REQUIRE(Eventually([&] { return laptop_events->expired_up_to(conversation) == 4; }));
  laptop->Close();
  CHECK(FileSeqs(offline_cache, conversation).empty());
  alice->Close();
}

}  // namespace
}  // namespace chat::testing
