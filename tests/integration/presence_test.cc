// Presence against the real chatd: devices coming and going, the grace period, and last seen
// across a restart (SIGTERM and start again on the same database).
#include <doctest/doctest.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "chat/v1/chat.pb.h"
#include "tests/integration/server_test_helpers.h"
#include "tests/testing/chatd_process.h"
#include "tests/testing/envelopes.h"
#include "tests/testing/ws_client.h"

namespace chat::testing {
namespace {

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Subscribes to `user` and returns the PresenceUpdate that precedes the Ok.
v1::PresenceUpdate MustSubscribe(WsClient& client, const std::string& user) {
  v1::Envelope subscribe;
  subscribe.mutable_presence_subscribe()->add_users(user);
  std::optional<v1::Envelope> ok = client.Request(subscribe);
  REQUIRE_MESSAGE(ok.has_value(), "no reply to PresenceSubscribe");
  REQUIRE_MESSAGE(ok->has_ok(), ok->DebugString());
  std::optional<v1::Envelope> state =
      client.WaitFor([&](const v1::Envelope& e) { return e.has_presence_update(); }, 0);
  REQUIRE_MESSAGE(state.has_value(), "no PresenceUpdate before the Ok");
  CHECK(state->presence_update().user_id() == user);
  return state->presence_update();
}

// The next PresenceUpdate matching `pred`, within 10 s.
v1::PresenceUpdate MustSee(WsClient& client,
                           const std::function<bool(const v1::PresenceUpdate&)>& pred) {
  std::optional<v1::Envelope> update = client.WaitFor(
      [&](const v1::Envelope& e) { return e.has_presence_update() && pred(e.presence_update()); },
      10'000);
  REQUIRE_MESSAGE(update.has_value(), "no such PresenceUpdate");
  return update->presence_update();
}

int CountUpdates(const std::vector<v1::Envelope>& envelopes) {
  int n = 0;
  for (const v1::Envelope& e : envelopes) n += e.has_presence_update() ? 1 : 0;
  return n;
}

TEST_CASE("presence e2e: two devices online until both go, offline after the grace period") {
  ChatdProcess chatd({.extra_flags = {"--presence-grace-ms", "1500", "--presence-coalesce-ms",
                                      "100", "--max-presence-subscriptions", "8"}});
  MustStart(chatd);
  auto alice1 = MustLogin(chatd, "alice", "a1");
  auto bob = MustLogin(chatd, "bob", "b1");
  MustAck(*alice1, MakeSendToPeer("bob", NewClientMsgId(), "hi"));

  v1::PresenceUpdate first = MustSubscribe(*bob, "alice");
  CHECK(first.online());
  CHECK(first.devices() == 1);

  auto alice2 = MustLogin(chatd, "alice", "a2");
  MustSee(*bob, [](const v1::PresenceUpdate& u) { return u.online() && u.devices() == 2; });
  REQUIRE(alice1->Close().ok());
  MustSee(*bob, [](const v1::PresenceUpdate& u) { return u.online() && u.devices() == 1; });

  // A quick reconnect of the last device: no offline update, and the count is back where it was.
  const int64_t before_gone = NowMs();
  REQUIRE(alice2->Close().ok());
  auto again = MustLogin(chatd, "alice", "a2");
  std::this_thread::sleep_for(std::chrono::milliseconds(2000));
  CHECK(CountUpdates(MustBarrier(*bob)) == 0);

  REQUIRE(again->Close().ok());
  v1::PresenceUpdate gone = MustSee(*bob, [](const v1::PresenceUpdate& u) { return !u.online(); });
  CHECK(gone.devices() == 0);
  CHECK(gone.last_seen_ms() >= before_gone);
  CHECK(gone.last_seen_ms() <= NowMs());
}

TEST_CASE("presence e2e: last seen survives a chatd restart") {
  ChatdProcess chatd({.extra_flags = {"--presence-grace-ms", "0"}});
  MustStart(chatd);
  int64_t alice_last_seen = 0;
  const int64_t before_shutdown = NowMs();
  {
    auto alice = MustLogin(chatd, "alice", "a1");
    auto bob = MustLogin(chatd, "bob", "b1");
    auto carol = MustLogin(chatd, "carol", "c1");
    MustAck(*alice, MakeSendToPeer("bob", NewClientMsgId(), "hi"));
    MustAck(*carol, MakeSendToPeer("bob", NewClientMsgId(), "hi"));
    MustSubscribe(*bob, "alice");
    REQUIRE(alice->Close().ok());
    alice_last_seen =
        MustSee(*bob, [](const v1::PresenceUpdate& u) { return !u.online(); }).last_seen_ms();
    CHECK(alice_last_seen >= before_shutdown);
    // carol is still online when chatd stops: a clean shutdown records her too.
    Result<int> exit = chatd.Terminate();
    REQUIRE_MESSAGE(exit.ok(), exit.status().ToString());
    CHECK(*exit == 0);
  }
  const int64_t after_shutdown = NowMs();
  REQUIRE(chatd.Restart().ok());

  auto bob = MustLogin(chatd, "bob", "b2");
  v1::PresenceUpdate alice = MustSubscribe(*bob, "alice");
  CHECK_FALSE(alice.online());
  CHECK(alice.last_seen_ms() == alice_last_seen);
  v1::PresenceUpdate carol = MustSubscribe(*bob, "carol");
  CHECK_FALSE(carol.online());
  CHECK(carol.last_seen_ms() >= before_shutdown);
  CHECK(carol.last_seen_ms() <= after_shutdown);

  // The direct conversations carry the peers' last seen too.
  SyncAllResult sync = MustSyncAll(*bob, {});
  int checked = 0;
  for (const v1::SyncBatch& batch : sync.batches) {
    for (const v1::ConversationState& c : batch.conversations()) {
      if (c.peer() == "alice") {
        CHECK(c.peer_last_seen_ms() == alice_last_seen);
        ++checked;
      } else if (c.peer() == "carol") {
        CHECK(c.peer_last_seen_ms() == carol.last_seen_ms());
        ++checked;
      }
    }
  }
  CHECK(checked == 2);
}

}  // namespace
}  // namespace chat::testing
