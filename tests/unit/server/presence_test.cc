// Presence: what watchers see (online, devices, grace, TTL, coalescing), who may watch whom, the
// in-process PresenceRegistry, and last seen in both stores.
#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "chat/presence.h"
#include "chat/server.h"
#include "chat/store.h"
#include "src/server/presence_tracker.h"
#include "tests/testing/envelopes.h"
#include "tests/testing/fake_clock.h"
#include "tests/testing/hub_harness.h"
#include "tests/testing/temp_dir.h"

namespace chat::testing {
namespace {

using server::SessionId;

// Advances the clock by `ms` in 100 ms steps, ticking after each, the way the runtime does.
void Run(HubHarness& h, int64_t ms) {
  for (int64_t done = 0; done < ms; done += 100) h.Advance(std::min<int64_t>(100, ms - done));
}

// MakePing with an explicit rid (the harness does not pick one).
v1::Envelope PingEnvelope(uint64_t rid) { return MakePing(0, rid); }

std::vector<v1::PresenceUpdate> Updates(const std::vector<v1::Envelope>& envelopes) {
  std::vector<v1::PresenceUpdate> out;
  for (const v1::Envelope& e : envelopes) {
    if (e.has_presence_update()) {
      CHECK(e.rid() == 0);
      out.push_back(e.presence_update());
    }
  }
  return out;
}

v1::Envelope SubscribeEnvelope(uint64_t rid, const std::vector<std::string>& users) {
  v1::Envelope e;
  e.set_rid(rid);
  e.mutable_presence_subscribe();
  for (const std::string& user : users) e.mutable_presence_subscribe()->add_users(user);
  return e;
}

v1::Envelope UnsubscribeEnvelope(uint64_t rid, const std::vector<std::string>& users) {
  v1::Envelope e;
  e.set_rid(rid);
  for (const std::string& user : users) e.mutable_presence_unsubscribe()->add_users(user);
  return e;
}

// Subscribes and expects the success answer: one PresenceUpdate per user, then Ok. Returns
// the updates.
std::vector<v1::PresenceUpdate> MustSubscribe(HubHarness& h, SessionId session, uint64_t rid,
                                              const std::vector<std::string>& users) {
  h.SendEnvelope(session, SubscribeEnvelope(rid, users));
  h.Pump();
  std::vector<v1::Envelope> got = h.Take(session);
  REQUIRE_MESSAGE(got.size() == users.size() + 1, got.size());
  CHECK(got.back().has_ok());
  CHECK(got.back().rid() == rid);
  got.pop_back();
  std::vector<v1::PresenceUpdate> updates = Updates(got);
  REQUIRE(updates.size() == users.size());
  for (size_t i = 0; i < users.size(); ++i) CHECK(updates[i].user_id() == users[i]);
  return updates;
}

// Subscribes and expects one Error with `code`; returns its message.
std::string MustRefuse(HubHarness& h, SessionId session, uint64_t rid,
                       const std::vector<std::string>& users, v1::Error::Code code) {
  h.SendEnvelope(session, SubscribeEnvelope(rid, users));
  h.Pump();
  std::vector<v1::Envelope> got = h.Take(session);
  REQUIRE_MESSAGE(got.size() == 1, got.size());
  REQUIRE_MESSAGE(got[0].has_error(), got[0].DebugString());
  CHECK(got[0].error().code() == code);
  CHECK(got[0].rid() == rid);
  return got[0].error().message();
}

// `from` sends `peer` a message, so the two share a direct conversation.
void Befriend(HubHarness& h, SessionId from, std::string_view peer, uint64_t rid) {
  h.SendEnvelope(from, SendToPeer(rid, peer, ClientMsgId(rid), "hi"));
  h.Pump();
  REQUIRE(h.Take(from).at(0).has_send_ack());
}

ConversationId CreateGroup(HubHarness& h, SessionId creator, v1::ConversationKind kind,
                           const std::vector<std::string>& members, uint64_t rid) {
  v1::Envelope create;
  create.set_rid(rid);
  create.mutable_create_group()->set_kind(kind);
  create.mutable_create_group()->set_title("g");
  for (const std::string& m : members) create.mutable_create_group()->add_members(m);
  h.SendEnvelope(creator, create);
  h.Pump();
  const ConversationId id =
      h.Take(creator).at(0).conversation_update().conversation().conversation_id();
  REQUIRE(id != 0);
  return id;
}

void RemoveMember(HubHarness& h, SessionId admin, ConversationId id, const std::string& user,
                  uint64_t rid) {
  v1::Envelope remove;
  remove.set_rid(rid);
  remove.mutable_remove_members()->set_conversation_id(id);
  remove.mutable_remove_members()->add_users(user);
  h.SendEnvelope(admin, remove);
  h.Pump();
  REQUIRE(h.Take(admin).at(0).has_conversation_update());
}

Result<PresenceReply> PresenceOf(MessageStore& store, const UserId& user,
                                 std::vector<UserId> targets) {
  return store.Presence(PresenceQuery{.user = user, .targets = std::move(targets)});
}

int64_t StoredLastSeen(MessageStore& store, const UserId& user) {
  Result<PresenceReply> reply = PresenceOf(store, user, {user});
  REQUIRE_MESSAGE(reply.ok(), reply.status().ToString());
  return reply->targets.at(0).last_seen_ms;
}

ServerOptions Options() {
  ServerOptions o;
  o.idle_timeout_ms = 1'000'000;
  o.hello_timeout_ms = 1'000'000;
  return o;
}

// bob watches alice, who is connected on a1; returns bob's session.
struct Pair {
  explicit Pair(ServerOptions options = Options()) : h(options) {
    alice1 = h.Connect("alice", "a1");
    bob = h.Connect("bob", "b1");
    Befriend(h, alice1, "bob", 1);
    h.Take(bob);
    std::vector<v1::PresenceUpdate> first = MustSubscribe(h, bob, 2, {"alice"});
    CHECK(first[0].online());
    CHECK(first[0].devices() == 1);
    CHECK(first[0].last_seen_ms() == h.clock().WallMs());
  }
  HubHarness h;
  SessionId alice1 = 0;
  SessionId bob = 0;
};

TEST_CASE("presence: two devices of one user are online until both go, with the device count") {
  Pair p;
  HubHarness& h = p.h;
  SessionId alice2 = h.Connect("alice", "a2");
  std::vector<v1::PresenceUpdate> got = Updates(h.Take(p.bob));
  REQUIRE(got.size() == 1);
  CHECK(got[0].user_id() == "alice");
  CHECK(got[0].online());
  CHECK(got[0].devices() == 2);

  Run(h, 2000);
  h.Disconnect(p.alice1);
  Run(h, 1000);
  got = Updates(h.Take(p.bob));
  REQUIRE(got.size() == 1);
  CHECK(got[0].online());
  CHECK(got[0].devices() == 1);

  const int64_t gone_ms = h.clock().WallMs();
  h.Disconnect(alice2);
  Run(h, 10'000);
  got = Updates(h.Take(p.bob));
  REQUIRE(got.size() == 1);
  CHECK_FALSE(got[0].online());
  CHECK(got[0].devices() == 0);
  CHECK(got[0].last_seen_ms() == gone_ms);
  // Only watchers hear of it: alice's device was the only other one, and it is gone.
  CHECK(h.violations().empty());
}

TEST_CASE("presence: the last device gone -> offline only after the grace period") {
  ServerOptions o = Options();
  o.presence_grace_ms = 3000;
  Pair p(o);
  HubHarness& h = p.h;
  const int64_t gone_ms = h.clock().WallMs();
  h.Disconnect(p.alice1);
  Run(h, 2900);
  CHECK(Updates(h.Take(p.bob)).empty());
  Run(h, 200);
  std::vector<v1::PresenceUpdate> got = Updates(h.Take(p.bob));
  REQUIRE(got.size() == 1);
  CHECK_FALSE(got[0].online());
  CHECK(got[0].last_seen_ms() == gone_ms);
  // Persisted when the user went offline.
  h.Pump();
  CHECK(StoredLastSeen(h.store(), "alice") == gone_ms);
}

TEST_CASE("presence: a quick reconnect within the grace period produces no update") {
  Pair p;
  HubHarness& h = p.h;
  h.Disconnect(p.alice1);
  Run(h, 3000);
  SessionId again = h.Connect("alice", "a1");
  Run(h, 10'000);
  CHECK(Updates(h.Take(p.bob)).empty());
  h.Disconnect(again);
  Run(h, 10'000);
  std::vector<v1::PresenceUpdate> got = Updates(h.Take(p.bob));
  REQUIRE(got.size() == 1);
  CHECK_FALSE(got[0].online());
}

TEST_CASE("presence: 100 flaps in one second give at most one update per coalescing interval") {
  Pair p;
  HubHarness& h = p.h;
  std::vector<int64_t> update_times;
  std::vector<v1::PresenceUpdate> all;
  auto collect = [&] {
    for (const v1::PresenceUpdate& u : Updates(h.Take(p.bob))) {
      update_times.push_back(h.clock().MonotonicMs());
      all.push_back(u);
    }
  };
  // A second device connects and goes 100 times within one second.
  for (int i = 0; i < 100; ++i) {
    SessionId flap = h.Connect("alice", "a2");
    collect();
    h.clock().Advance(5);
    h.hub().Tick();
    collect();
    h.Disconnect(flap);
    collect();
    h.clock().Advance(5);
    h.hub().Tick();
    collect();
  }
  Run(h, 3000);
  collect();
  REQUIRE_FALSE(all.empty());
  CHECK(all.size() <= 3);
  for (size_t i = 1; i < update_times.size(); ++i) {
    CHECK(update_times[i] - update_times[i - 1] >= 1000);
  }
  // The last update carries the final state: one device.
  CHECK(all.back().online());
  CHECK(all.back().devices() == 1);
}

TEST_CASE("presence: a non-contact and a channel-only contact get PERMISSION_DENIED") {
  HubHarness h(Options());
  SessionId alice = h.Connect("alice", "a1");
  SessionId bob = h.Connect("bob", "b1");
  SessionId carol = h.Connect("carol", "c1");
  SessionId mallory = h.Connect("mallory", "m1");
  CreateGroup(h, alice, v1::CONVERSATION_KIND_CHANNEL, {"mallory"}, 1);
  Befriend(h, alice, "bob", 2);
  CreateGroup(h, carol, v1::CONVERSATION_KIND_GROUP, {"bob"}, 3);
  h.Take(bob);
  h.Take(mallory);

  // A stranger, and a fellow channel member.
  CHECK(MustRefuse(h, carol, 10, {"alice"}, v1::Error::PERMISSION_DENIED).find("alice") !=
        std::string::npos);
  CHECK(MustRefuse(h, mallory, 11, {"alice"}, v1::Error::PERMISSION_DENIED).find("alice") !=
        std::string::npos);
  CHECK(MustRefuse(h, alice, 12, {"mallory"}, v1::Error::PERMISSION_DENIED).find("mallory") !=
        std::string::npos);
  // One forbidden user refuses the whole request: bob (a contact) is not subscribed either.
  CHECK(MustRefuse(h, alice, 13, {"bob", "carol"}, v1::Error::PERMISSION_DENIED).find("carol") !=
        std::string::npos);
  h.Disconnect(bob);
  Run(h, 10'000);
  CHECK(Updates(h.Take(alice)).empty());
  CHECK(Updates(h.Take(mallory)).empty());

  // Direct and group contacts, and oneself, may be watched.
  SessionId bob2 = h.Connect("bob", "b2");
  MustSubscribe(h, carol, 14, {"bob", "carol"});
  std::vector<v1::PresenceUpdate> mine = MustSubscribe(h, alice, 15, {"bob", "alice"});
  CHECK(mine[0].online());
  CHECK(mine[1].online());
  h.Disconnect(bob2);
  Run(h, 10'000);
  CHECK(Updates(h.Take(alice)).size() == 1);
  CHECK(Updates(h.Take(carol)).size() == 1);
}

TEST_CASE("presence: bad subscribe requests get INVALID_ARGUMENT") {
  HubHarness h(Options());
  SessionId alice = h.Connect("alice", "a1");
  MustRefuse(h, alice, 1, {""}, v1::Error::INVALID_ARGUMENT);
  MustRefuse(h, alice, 2, {std::string(129, 'x')}, v1::Error::INVALID_ARGUMENT);
  MustRefuse(h, alice, 3, {}, v1::Error::INVALID_ARGUMENT);
  h.SendEnvelope(alice, UnsubscribeEnvelope(4, {""}));
  std::vector<v1::Envelope> got = h.Take(alice);
  REQUIRE(got.size() == 1);
  CHECK(got[0].error().code() == v1::Error::INVALID_ARGUMENT);
  CHECK(h.queued_reads() == 0);
}

TEST_CASE("presence: unsubscribing stops updates") {
  Pair p;
  HubHarness& h = p.h;
  h.SendEnvelope(p.bob, UnsubscribeEnvelope(5, {"alice", "nobody"}));
  std::vector<v1::Envelope> got = h.Take(p.bob);
  REQUIRE(got.size() == 1);
  CHECK(got[0].has_ok());
  CHECK(got[0].rid() == 5);
  h.Connect("alice", "a2");
  h.Disconnect(p.alice1);
  Run(h, 10'000);
  CHECK(Updates(h.Take(p.bob)).empty());
}

TEST_CASE("presence: an unsubscribe that overtakes a subscribe's check is not undone by it") {
  HubHarness h(Options());
  const SessionId alice = h.Connect("alice", "a1");
  const SessionId carol = h.Connect("carol", "c1");
  const SessionId bob = h.Connect("bob", "b1");
  Befriend(h, alice, "bob", 1);
  Befriend(h, carol, "bob", 2);
  h.Take(bob);
  // bob asks for alice and carol, and drops alice before the store has checked the request.
  h.SendEnvelope(bob, SubscribeEnvelope(3, {"alice", "carol"}));
  h.SendEnvelope(bob, UnsubscribeEnvelope(4, {"alice"}));
  std::vector<v1::Envelope> got = h.Take(bob);
  REQUIRE(got.size() == 1);
  CHECK(got[0].rid() == 4);
  h.Pump();
  got = h.Take(bob);
  REQUIRE(got.size() == 2);
  REQUIRE(got[0].has_presence_update());
  CHECK(got[0].presence_update().user_id() == "carol");
  CHECK(got[1].has_ok());
  CHECK(got[1].rid() == 3);
  // alice comes and goes: bob hears nothing of her.
  h.Connect("alice", "a2");
  h.Disconnect(alice);
  Run(h, 10'000);
  CHECK(Updates(h.Take(bob)).empty());
}

// A subscribe whose check a removal overtook is checked again only if the removal concerns
// the watcher or a target: a busy server's unrelated removals must not keep sending it back.
TEST_CASE("presence: a removal that overtakes a subscribe's check re-checks it only if related") {
  HubHarness h(Options());
  const SessionId alice = h.Connect("alice", "a1");
  const SessionId bob = h.Connect("bob", "b1");
  h.Connect("carol", "c1");
  h.Connect("dave", "d1");
  // alice and bob share only group g; carol and dave have a group of their own with bob as
  // admin (no tie to alice).
  const ConversationId g = CreateGroup(h, bob, v1::CONVERSATION_KIND_GROUP, {"alice"}, 1);
  const ConversationId other =
      CreateGroup(h, bob, v1::CONVERSATION_KIND_GROUP, {"carol", "dave"}, 2);
  h.Take(alice);
  h.Take(bob);

  // Unrelated: dave leaves the other group while bob's subscribe to alice is being read.
  h.SendEnvelope(bob, SubscribeEnvelope(3, {"alice"}));
  v1::Envelope remove;
  remove.set_rid(4);
  remove.mutable_remove_members()->set_conversation_id(other);
  remove.mutable_remove_members()->add_users("dave");
  h.SendEnvelope(bob, remove);
  h.ReadThenCommit();
  CHECK(h.queued_reads() == 0);  // answered from the first read
  std::vector<v1::Envelope> got = h.Take(bob);
  bool ok = false;
  for (const v1::Envelope& e : got) ok = ok || (e.has_ok() && e.rid() == 3);
  CHECK(ok);
  h.SendEnvelope(bob, UnsubscribeEnvelope(5, {"alice"}));
  h.Take(bob);

  // Related: alice leaves g, the only conversation she shares with bob, meanwhile.
  h.SendEnvelope(bob, SubscribeEnvelope(6, {"alice"}));
  remove.set_rid(7);
  remove.mutable_remove_members()->set_conversation_id(g);
  remove.mutable_remove_members()->clear_users();
  remove.mutable_remove_members()->add_users("alice");
  h.SendEnvelope(bob, remove);
  h.ReadThenCommit();
  CHECK(h.queued_reads() == 1);  // asked again
  h.Pump();
  got = h.Take(bob);
  bool denied = false;
  for (const v1::Envelope& e : got) {
    denied = denied ||
             (e.has_error() && e.rid() == 6 && e.error().code() == v1::Error::PERMISSION_DENIED);
  }
  CHECK(denied);
}

TEST_CASE("presence: removal from the shared group stops updates both ways") {
  HubHarness h(Options());
  SessionId alice = h.Connect("alice", "a1");
  SessionId bob = h.Connect("bob", "b1");
  SessionId carol = h.Connect("carol", "c1");
  SessionId dave = h.Connect("dave", "d1");
  const ConversationId group =
      CreateGroup(h, alice, v1::CONVERSATION_KIND_GROUP, {"bob", "carol", "dave"}, 1);
  h.Take(bob);
  h.Take(carol);
  h.Take(dave);
  Befriend(h, dave, "bob", 2);  // dave also shares a direct conversation with bob
  h.Take(bob);
  MustSubscribe(h, carol, 3, {"bob"});
  MustSubscribe(h, bob, 4, {"carol", "dave"});
  MustSubscribe(h, dave, 5, {"bob"});

  RemoveMember(h, alice, group, "carol", 6);
  RemoveMember(h, alice, group, "dave", 7);
  h.Take(bob);
  h.Take(carol);
  h.Take(dave);

  // carol and bob no longer share anything; dave and bob still share their direct conversation.
  h.Connect("carol", "c2");
  h.Connect("bob", "b2");
  Run(h, 2000);
  CHECK(Updates(h.Take(carol)).empty());
  CHECK(Updates(h.Take(bob)).empty());
  std::vector<v1::PresenceUpdate> for_dave = Updates(h.Take(dave));
  REQUIRE(for_dave.size() == 1);
  CHECK(for_dave[0].user_id() == "bob");
  CHECK(for_dave[0].devices() == 2);
  CHECK(MustRefuse(h, dave, 8, {"carol"}, v1::Error::PERMISSION_DENIED).find("carol") !=
        std::string::npos);
  CHECK(h.violations().empty());
}

TEST_CASE("presence: past max_presence_subscriptions -> RESOURCE_EXHAUSTED, nothing subscribed") {
  ServerOptions o = Options();
  o.max_presence_subscriptions = 2;
  HubHarness h(o);
  SessionId alice = h.Open().value();
  h.SendEnvelope(alice, HelloEnvelope(1, h.Token("alice"), "a1"));
  std::vector<v1::Envelope> welcome = h.Take(alice);
  REQUIRE(welcome.size() == 1);
  CHECK(welcome[0].welcome().limits().max_presence_subscriptions() == 2);
  uint64_t rid = 10;
  for (const char* peer : {"bob", "carol", "dave"}) Befriend(h, alice, peer, ++rid);
  MustRefuse(h, alice, 20, {"bob", "carol", "dave"}, v1::Error::RESOURCE_EXHAUSTED);
  MustSubscribe(h, alice, 21, {"bob", "carol"});
  // Already watched, and repeated: counted once, answered once.
  h.SendEnvelope(alice, SubscribeEnvelope(22, {"bob", "bob"}));
  h.Pump();
  std::vector<v1::Envelope> again = h.Take(alice);
  REQUIRE(again.size() == 2);
  CHECK(again[0].presence_update().user_id() == "bob");
  CHECK(again[1].has_ok());
  MustRefuse(h, alice, 23, {"dave"}, v1::Error::RESOURCE_EXHAUSTED);
  h.SendEnvelope(alice, UnsubscribeEnvelope(24, {"carol"}));
  CHECK(h.Take(alice).at(0).has_ok());
  MustSubscribe(h, alice, 25, {"dave"});
  // A list longer than the cap counts each new user once, and an unsubscribe of any length
  // (users not watched included) is answered ok.
  h.SendEnvelope(alice, SubscribeEnvelope(26, {"bob", "dave", "bob", "dave", "bob"}));
  h.Pump();
  std::vector<v1::Envelope> repeated = h.Take(alice);
  REQUIRE(repeated.size() == 3);
  CHECK(repeated[2].has_ok());
  h.SendEnvelope(alice, UnsubscribeEnvelope(27, {"bob", "dave", "carol", "x", "y"}));
  CHECK(h.Take(alice).at(0).has_ok());
  MustSubscribe(h, alice, 28, {"carol"});
}

TEST_CASE("presence: a device silent past the TTL goes offline and comes back when heard") {
  ServerOptions o = Options();
  o.presence_ttl_ms = 3000;
  o.heartbeat_interval_ms = 1000;
  o.presence_grace_ms = 500;
  Pair p(o);
  HubHarness& h = p.h;
  const int64_t heard_wall = h.clock().WallMs();
  // bob keeps heartbeating and stays online; alice says nothing.
  for (int i = 0; i < 3; ++i) {
    Run(h, 1000);
    h.SendEnvelope(p.bob, PingEnvelope(100 + i));
  }
  Run(h, 600);
  std::vector<v1::PresenceUpdate> got = Updates(h.Take(p.bob));
  REQUIRE(got.size() == 1);
  CHECK_FALSE(got[0].online());
  CHECK(got[0].last_seen_ms() == heard_wall + 3000);

  h.SendEnvelope(p.alice1, PingEnvelope(7));
  CHECK(h.Take(p.alice1).at(0).has_pong());
  Run(h, 1000);  // within the coalescing interval of the offline update
  got = Updates(h.Take(p.bob));
  REQUIRE(got.size() == 1);
  CHECK(got[0].online());
  CHECK(got[0].devices() == 1);

  // Heartbeating every interval keeps a device online indefinitely.
  for (int i = 0; i < 20; ++i) {
    Run(h, 1000);
    h.SendEnvelope(p.alice1, PingEnvelope(200 + i));
  }
  CHECK(Updates(h.Take(p.bob)).empty());
}

// TTL 3 s, heartbeat 0.1 s: the Hub refreshes live devices every 1.45 s (at 1.45, 2.9, 4.35 s).
ServerOptions FastPresence() {
  ServerOptions o = Options();
  o.presence_ttl_ms = 3000;
  o.heartbeat_interval_ms = 100;
  o.presence_grace_ms = 500;
  o.presence_coalesce_ms = 50;
  return o;
}

TEST_CASE("presence: a frame heard after the last refresh keeps the device online") {
  Pair p(FastPresence());
  HubHarness& h = p.h;
  // alice's last frame was at 0; the pass at 2.9 s renewed her until 3 s. A ping at 2.95 s
  // must carry her past 3 s without waiting for the pass at 4.35 s.
  Run(h, 2950);
  h.SendEnvelope(p.alice1, PingEnvelope(7));
  CHECK(h.Take(p.alice1).at(0).has_pong());
  Run(h, 1500);
  CHECK(Updates(h.Take(p.bob)).empty());
}

TEST_CASE("presence: a device reconnecting while its old connection lingers is online at once") {
  Pair p(FastPresence());
  HubHarness& h = p.h;
  Run(h, 3700);  // alice silent since 0: expired at 3 s, offline after the grace period
  std::vector<v1::PresenceUpdate> got = Updates(h.Take(p.bob));
  REQUIRE(got.size() == 1);
  CHECK_FALSE(got[0].online());
  // Her phone reconnects with the same device id; the old connection is still open.
  const SessionId again = h.Connect("alice", "a1");
  CHECK_FALSE(h.closed(p.alice1).has_value());
  Run(h, 100);  // before the next refresh pass (4.35 s)
  got = Updates(h.Take(p.bob));
  REQUIRE(got.size() == 1);
  CHECK(got[0].online());
  CHECK(got[0].devices() == 1);
  h.Take(again);
}

TEST_CASE("presence: last seen is persisted periodically for online users and at shutdown") {
  ServerOptions o = Options();
  o.heartbeat_interval_ms = 1000;
  o.presence_ttl_ms = 5000;
  HubHarness h(o);
  SessionId alice = h.Connect("alice", "a1");
  CHECK(StoredLastSeen(h.store(), "alice") == 0);
  for (int i = 0; i < 3; ++i) {
    Run(h, 1000);
    h.SendEnvelope(alice, PingEnvelope(10 + i));
  }
  h.Pump();
  const int64_t periodic = StoredLastSeen(h.store(), "alice");
  CHECK(periodic > h.clock().WallMs() - 1100);
  CHECK(periodic <= h.clock().WallMs());

  Run(h, 500);
  h.hub().CloseAll();
  h.Pump();
  CHECK(StoredLastSeen(h.store(), "alice") == h.clock().WallMs());
}

TEST_CASE("presence: a direct conversation carries the peer's persisted last seen") {
  ServerOptions o = Options();
  o.presence_grace_ms = 0;
  HubHarness h(o);
  SessionId alice = h.Connect("alice", "a1");
  SessionId bob = h.Connect("bob", "b1");
  Befriend(h, alice, "bob", 1);
  const int64_t gone_ms = h.clock().WallMs();
  h.Disconnect(bob);
  Run(h, 500);
  h.Pump();
  v1::Envelope sync;
  sync.set_rid(2);
  sync.mutable_sync();
  h.SendEnvelope(alice, sync);
  h.Pump();
  std::vector<v1::Envelope> got = h.Take(alice);
  REQUIRE(got.size() == 1);
  REQUIRE(got[0].has_sync_batch());
  REQUIRE(got[0].sync_batch().conversations_size() == 1);
  CHECK(got[0].sync_batch().conversations(0).peer() == "bob");
  CHECK(got[0].sync_batch().conversations(0).peer_last_seen_ms() == gone_ms);
}

// --- The tracker on its own: suspended subscriptions ---

struct RecordingSink final : server::PresenceTracker::Sink {
  void SendPresence(server::PresenceTracker::SessionId session, const UserId& user,
                    const server::PresenceState& state) override {
    sent.push_back({session, user, state});
  }
  void PersistLastSeen(std::vector<UserId> users, int64_t wall_ms) override {
    online_call_sizes.push_back(users.size());
    for (UserId& user : users) persisted.emplace_back(std::move(user), wall_ms);
  }
  void PersistLastSeenEach(std::vector<UserId> users, std::vector<int64_t> wall_ms) override {
    REQUIRE(users.size() == wall_ms.size());
    for (size_t i = 0; i < users.size(); ++i)
      persisted.emplace_back(std::move(users[i]), wall_ms[i]);
    ++each_calls;
  }
  int each_calls = 0;
  std::vector<size_t> online_call_sizes;  // users per PersistLastSeen call
  struct Sent {
    server::PresenceTracker::SessionId session;
    UserId user;
    server::PresenceState state;
  };
  std::vector<Sent> sent;
  std::vector<std::pair<UserId, int64_t>> persisted;
};

// Like a registry shared by several nodes: TakeChanges reports only the users this node
// watches (presence.h allows it), over the in-process registry.
class WatchedOnlyRegistry final : public PresenceRegistry {
 public:
  void Refresh(const PresenceDevice& device, int64_t now_ms, int64_t ttl_ms) override {
    inner_->Refresh(device, now_ms, ttl_ms);
  }
  void Remove(const PresenceDevice& device, int64_t now_ms) override {
    inner_->Remove(device, now_ms);
  }
  uint32_t DeviceCount(const UserId& user, int64_t now_ms) override {
    return inner_->DeviceCount(user, now_ms);
  }
  void TakeChanges(int64_t now_ms, std::vector<UserId>* users) override {
    std::vector<UserId> all;
    inner_->TakeChanges(now_ms, &all);
    for (UserId& user : all) {
      if (watched_[user] > 0) users->push_back(std::move(user));
    }
  }
  void Watch(const UserId& user) override { ++watched_[user]; }
  void Unwatch(const UserId& user) override { --watched_[user]; }

 private:
  std::shared_ptr<PresenceRegistry> inner_ = NewInProcessPresenceRegistry();
  std::map<UserId, int> watched_;
};

TEST_CASE(
    "presence tracker: a user online only on another node is read afresh when watched again") {
  auto clock = std::make_shared<FakeClock>();
  RecordingSink sink;
  ServerOptions options;
  auto registry = std::make_shared<WatchedOnlyRegistry>();
  server::PresenceTracker tracker(options, registry, clock.get(), &sink);
  const PresenceDevice phone{"alice", "a1", /*node=*/9};  // connected to another node
  registry->Refresh(phone, clock->MonotonicMs(), 60'000);
  CHECK(tracker.Watch(7, "bob", "alice", 0).online);
  tracker.Unwatch(7, "alice");
  // alice goes offline over there while nobody here watches her: no change is reported.
  registry->Remove(phone, clock->MonotonicMs());
  clock->Advance(10'000);
  tracker.Tick();
  const server::PresenceState again = tracker.Watch(8, "bob", "alice", 0);
  CHECK_FALSE(again.online);
  CHECK(again.devices == 0);
  tracker.Unwatch(8, "alice");

  // The same after her device here closed while the one over there keeps her online.
  registry->Refresh(phone, clock->MonotonicMs(), 60'000);
  tracker.DeviceUp("alice", "laptop");
  CHECK(tracker.Watch(9, "bob", "alice", 0).devices == 2);
  tracker.DeviceDown("alice", "laptop");
  tracker.Unwatch(9, "alice");
  registry->Remove(phone, clock->MonotonicMs());
  clock->Advance(10'000);
  tracker.Tick();
  CHECK_FALSE(tracker.Watch(10, "bob", "alice", 0).online);
}

TEST_CASE("presence tracker: nothing is delivered while a re-check is pending") {
  auto clock = std::make_shared<FakeClock>();
  RecordingSink sink;
  ServerOptions options;
  server::PresenceTracker tracker(options, NewInProcessPresenceRegistry(), clock.get(), &sink);
  tracker.DeviceUp("bob", "b1");
  CHECK(tracker.Watch(7, "carol", "bob", 0).online);
  CHECK(tracker.Watch(8, "dave", "bob", 0).online);
  CHECK(tracker.watch_count(7) == 1);

  // carol lost the shared group: her subscription is suspended until the store answers.
  std::map<server::PresenceTracker::SessionId, std::vector<UserId>> recheck =
      tracker.Suspend({"carol"});
  REQUIRE(recheck.size() == 1);
  CHECK(recheck.at(7) == std::vector<UserId>{"bob"});
  tracker.DeviceUp("bob", "b2");
  REQUIRE(sink.sent.size() == 1);  // dave only
  CHECK(sink.sent[0].session == 8);
  CHECK(sink.sent[0].state.devices == 2);

  // Still allowed (another shared conversation): resumed, with the state held back meanwhile.
  tracker.Resolve(7, "bob", /*allowed=*/true);
  REQUIRE(sink.sent.size() == 2);
  CHECK(sink.sent[1].session == 7);
  CHECK(sink.sent[1].state.devices == 2);
  tracker.Resolve(7, "bob", /*allowed=*/true);  // not suspended any more: nothing
  CHECK(sink.sent.size() == 2);

  // Not allowed: dropped, and nothing more reaches carol.
  tracker.Suspend({"carol"});
  tracker.Resolve(7, "bob", /*allowed=*/false);
  CHECK_FALSE(tracker.watches(7, "bob"));
  clock->Advance(2000);
  tracker.DeviceDown("bob", "b2");
  tracker.Tick();
  REQUIRE(sink.sent.size() == 3);
  CHECK(sink.sent[2].session == 8);
  CHECK(sink.sent[2].state.devices == 1);

  // A failed re-check drops what it suspended.
  tracker.Suspend({"dave"});
  tracker.DropSuspended(8);
  CHECK(tracker.watch_count(8) == 0);
}

TEST_CASE(
    "presence tracker: a user watched again right after being forgotten keeps its last seen") {
  auto clock = std::make_shared<FakeClock>();
  RecordingSink sink;
  ServerOptions options;
  options.presence_grace_ms = 1000;
  server::PresenceTracker tracker(options, NewInProcessPresenceRegistry(), clock.get(), &sink);
  tracker.DeviceUp("bob", "b1");
  CHECK(tracker.Watch(7, "alice", "bob", 0).online);
  const int64_t went = clock->WallMs();
  tracker.DeviceDown("bob", "b1");
  clock->Advance(1500);
  tracker.Tick();
  CHECK(tracker.Current("bob").last_seen_ms == went);
  // alice's connection goes: nobody watches bob, so the tracker forgets him. His last seen was
  // handed to the store, which may not have committed it when alice watches again.
  tracker.ForgetSession(7);
  CHECK(tracker.Watch(9, "alice", "bob", /*stored_last_seen_ms=*/0).last_seen_ms == went);
  // A later stored value wins.
  tracker.ForgetSession(9);
  CHECK(tracker.Watch(10, "alice", "bob", went + 5).last_seen_ms == went + 5);
  // Bounded: bob's stays through 1,023 other users forgotten after him, not through 1,024.
  tracker.ForgetSession(10);
  auto forget = [&](int first, int count) {
    for (int i = first; i < first + count; ++i) {
      const std::string user = "u" + std::to_string(i);
      tracker.DeviceUp(user, "d");
      tracker.DeviceDown(user, "d");
    }
    clock->Advance(1500);
    tracker.Tick();
  };
  forget(0, 1023);
  CHECK(tracker.Watch(11, "alice", "bob", 0).last_seen_ms == went);
  tracker.ForgetSession(11);
  forget(1023, 1);
  CHECK(tracker.Watch(12, "alice", "bob", 0).last_seen_ms == 0);
  // Only what this node handed to the store is remembered: carol, online on another node and
  // seen going from here, is not.
  std::shared_ptr<PresenceRegistry> shared = NewInProcessPresenceRegistry();
  server::PresenceTracker here(options, shared, clock.get(), &sink);
  shared->Refresh({"carol", "c1", /*node=*/5}, clock->MonotonicMs(), 60'000);
  CHECK(here.Watch(20, "alice", "carol", 0).online);
  shared->Remove({"carol", "c1", 5}, clock->MonotonicMs());
  here.Tick();
  clock->Advance(1500);
  here.Tick();
  CHECK_FALSE(here.Current("carol").online);
  CHECK(here.Current("carol").last_seen_ms > 0);  // as seen from here
  here.ForgetSession(20);
  CHECK(here.Watch(21, "alice", "carol", 0).last_seen_ms == 0);  // the store's (its node's) value
}

TEST_CASE("presence tracker: users whose grace periods end together are persisted in one write") {
  auto clock = std::make_shared<FakeClock>();
  RecordingSink sink;
  ServerOptions options;
  options.presence_grace_ms = 5000;
  server::PresenceTracker tracker(options, NewInProcessPresenceRegistry(), clock.get(), &sink);
  for (int i = 0; i < 2500; ++i) tracker.DeviceUp("u" + std::to_string(i), "d");
  const int64_t went0 = clock->WallMs();
  for (int i = 0; i < 2500; ++i) {
    tracker.DeviceDown("u" + std::to_string(i), "d");
    if (i == 1249) clock->Advance(7);  // the second half went 7 ms later
  }
  CHECK(sink.persisted.empty());  // still within the grace period
  clock->Advance(5000);
  tracker.Tick();
  // 2,500 users in chunks of 1,000: three writes, each user at the moment it went.
  CHECK(sink.each_calls == 3);
  REQUIRE(sink.persisted.size() == 2500);
  CHECK(sink.persisted[0] == std::pair<UserId, int64_t>{"u0", went0});
  CHECK(sink.persisted[2499] == std::pair<UserId, int64_t>{"u2499", went0 + 7});
}

TEST_CASE("presence tracker: online users' last seen is written in chunks of 1,000") {
  auto clock = std::make_shared<FakeClock>();
  RecordingSink sink;
  ServerOptions options;
  options.heartbeat_interval_ms = 1000;
  options.presence_grace_ms = 5000;
  server::PresenceTracker tracker(options, NewInProcessPresenceRegistry(), clock.get(), &sink);
  for (int i = 0; i < 2500; ++i) tracker.DeviceUp("u" + std::to_string(i), "d");
  clock->Advance(1000);
  tracker.Tick();  // the periodic write
  CHECK(sink.online_call_sizes == std::vector<size_t>{1000, 1000, 500});
  REQUIRE(sink.persisted.size() == 2500);
  CHECK(sink.persisted[2499].second == clock->WallMs());

  // At shutdown: the users still online in chunks again; one whose last device just went (in
  // its grace period) with the moment it went.
  sink.online_call_sizes.clear();
  sink.persisted.clear();
  tracker.DeviceDown("u0", "d");
  const int64_t went = clock->WallMs();
  clock->Advance(10);
  tracker.PersistAll();
  CHECK(sink.online_call_sizes == std::vector<size_t>{1000, 1000, 499});
  CHECK(sink.each_calls == 1);
  REQUIRE(sink.persisted.size() == 2500);
  const auto u0 = std::find_if(sink.persisted.begin(), sink.persisted.end(),
                               [](const auto& p) { return p.first == "u0"; });
  REQUIRE(u0 != sink.persisted.end());
  CHECK(u0->second == went);
}

// Bob online with one device and carol watching him, already told of his second device: his
// next change falls inside carol's coalescing interval (1 s).
struct CoalescingFixture {
  CoalescingFixture() {
    tracker.DeviceUp("bob", "b1");
    CHECK(tracker.Watch(7, "carol", "bob", 0).devices == 1);
    tracker.DeviceUp("bob", "b2");  // the first change is sent at once
    REQUIRE(sink.sent.size() == 1);
    CHECK(sink.sent[0].state.devices == 2);
  }
  // `count` updates were sent in all, the last to `session`, saying `devices`.
  void ExpectLast(size_t count, server::PresenceTracker::SessionId session, uint32_t devices) {
    REQUIRE(sink.sent.size() == count);
    CHECK(sink.sent.back().session == session);
    CHECK(sink.sent.back().state.devices == devices);
  }
  static ServerOptions Options() {
    ServerOptions options;
    options.presence_coalesce_ms = 1000;
    return options;
  }
  std::shared_ptr<FakeClock> clock = std::make_shared<FakeClock>();
  RecordingSink sink;
  server::PresenceTracker tracker{Options(), NewInProcessPresenceRegistry(), clock.get(), &sink};
};

TEST_CASE_FIXTURE(
    CoalescingFixture,
    "presence tracker: an update held back for coalescing goes with the last watcher") {
  tracker.DeviceDown("bob", "b2");  // within the coalescing interval: held back
  CHECK(sink.sent.size() == 1);
  tracker.Unwatch(7, "bob");  // nobody left to tell
  clock->Advance(1000);
  tracker.Tick();
  CHECK(sink.sent.size() == 1);
  // A new watcher learns the state from its reply, and the next change reaches it at once.
  CHECK(tracker.Watch(8, "dave", "bob", 0).devices == 1);
  tracker.DeviceUp("bob", "b3");
  ExpectLast(2, 8, 2);
}

TEST_CASE_FIXTURE(
    CoalescingFixture,
    "presence tracker: an update held back before the watchers changed keeps its interval") {
  clock->Advance(100);
  tracker.DeviceDown("bob", "b2");  // held back until 1000
  clock->Advance(100);
  tracker.Unwatch(7, "bob");
  clock->Advance(100);
  CHECK(tracker.Watch(8, "dave", "bob", 0).devices == 1);
  clock->Advance(100);
  tracker.DeviceUp("bob", "b3");  // t=400: sent at once; dave's next update not before 1400
  ExpectLast(2, 8, 2);
  clock->Advance(100);
  tracker.DeviceDown("bob", "b3");  // held back until 1400
  clock->Advance(500);
  tracker.Tick();  // t=1000: carol's old slot is no reason to tell dave early
  CHECK(sink.sent.size() == 2);
  clock->Advance(400);
  tracker.Tick();  // t=1400
  ExpectLast(3, 8, 1);
}

TEST_CASE_FIXTURE(
    CoalescingFixture,
    "presence tracker: a watcher that joins while an update is held back gets its result") {
  clock->Advance(100);
  tracker.DeviceDown("bob", "b2");  // 1 device, held back
  clock->Advance(100);
  CHECK(tracker.Watch(8, "dave", "bob", 0).devices == 1);  // dave's reply says 1
  clock->Advance(100);
  tracker.DeviceUp("bob", "b2");  // back to 2: no news for carol, but dave was told 1
  clock->Advance(700);
  tracker.Tick();
  ExpectLast(2, 8, 2);
}

TEST_CASE_FIXTURE(CoalescingFixture,
                  "presence tracker: a subscription re-checked while an update is held back "
                  "still gets it") {
  SUBCASE("subscribed while it was held back") {
    clock->Advance(100);
    tracker.DeviceDown("bob", "b2");  // 1 device, held back until 1000
    clock->Advance(100);
    CHECK(tracker.Watch(8, "dave", "bob", 0).devices == 1);  // dave's reply says 1
    clock->Advance(100);
    tracker.Suspend({"dave"});  // dave lost a shared group, but shares another
    tracker.Resolve(8, "bob", /*allowed=*/true);
    clock->Advance(100);
    tracker.DeviceUp("bob", "b2");  // 2 again: no news for carol, but dave was told 1
    clock->Advance(600);
    tracker.Tick();
    ExpectLast(2, 8, 2);
  }
  SUBCASE("resumed with what it missed while another update was held back") {
    clock->Advance(100);
    tracker.Suspend({"carol"});
    tracker.DeviceDown("bob", "b2");  // held back until 1000
    clock->Advance(900);
    tracker.Tick();  // 1 device: carol is suspended and misses it; next not before 2000
    CHECK(sink.sent.size() == 1);
    clock->Advance(100);
    tracker.DeviceUp("bob", "b2");  // 2 devices, held back until 2000
    clock->Advance(100);
    tracker.Resolve(7, "bob", /*allowed=*/true);  // carol is told the current state: 2
    ExpectLast(2, 7, 2);
    clock->Advance(100);
    tracker.DeviceDown("bob", "b2");  // 1 again: what was last sent to all, not to carol
    clock->Advance(700);
    tracker.Tick();
    ExpectLast(3, 7, 1);
  }
}

// --- The in-process registry ---

TEST_CASE("presence registry: devices count until removed or expired, changes reported once") {
  std::shared_ptr<PresenceRegistry> r = NewInProcessPresenceRegistry();
  r->Refresh({"alice", "a1", 0}, 1000, 500);
  r->Refresh({"alice", "a2", 0}, 1000, 500);
  r->Refresh({"alice", "a1", 0}, 1100, 500);  // a refresh does not add a device
  r->Refresh({"bob", "b1", 0}, 1000, 10'000);
  CHECK(r->DeviceCount("alice", 1100) == 2);
  CHECK(r->DeviceCount("nobody", 1100) == 0);
  std::vector<UserId> changed;
  r->TakeChanges(1100, &changed);
  CHECK(changed == std::vector<UserId>{"alice", "bob"});
  changed.clear();
  r->TakeChanges(1200, &changed);
  CHECK(changed.empty());

  // a2 expires at 1500, a1 (refreshed) at 1600.
  CHECK(r->DeviceCount("alice", 1500) == 1);
  r->TakeChanges(1500, &changed);
  CHECK(changed == std::vector<UserId>{"alice"});
  changed.clear();
  CHECK(r->DeviceCount("alice", 1600) == 0);
  r->Remove({"bob", "b1", 0}, 1600);
  r->Remove({"bob", "b1", 0}, 1600);  // unknown now: nothing
  CHECK(r->DeviceCount("bob", 1600) == 0);
  r->TakeChanges(1600, &changed);
  CHECK(changed == std::vector<UserId>{"alice", "bob"});
}

TEST_CASE("presence registry: a dead node's devices expire, a refresh never shortens an entry") {
  std::shared_ptr<PresenceRegistry> r = NewInProcessPresenceRegistry();
  r->Refresh({"alice", "phone", 1}, 0, 1000);
  r->Refresh({"alice", "phone", 2}, 0, 1000);  // same device id on another node: another entry
  CHECK(r->DeviceCount("alice", 0) == 2);
  // Node 1 keeps refreshing; node 2 died.
  for (int64_t t = 500; t <= 3000; t += 500) r->Refresh({"alice", "phone", 1}, t, 1000);
  CHECK(r->DeviceCount("alice", 3000) == 1);
  r->Refresh({"alice", "phone", 1}, 3000, 10);  // shorter than what stands: ignored
  CHECK(r->DeviceCount("alice", 3900) == 1);
  CHECK(r->DeviceCount("alice", 4000) == 0);
  r->Watch("alice");
  r->Unwatch("alice");
}

TEST_CASE("presence registry: an entry shorter than the user's others expires on its own time") {
  std::shared_ptr<PresenceRegistry> r = NewInProcessPresenceRegistry();
  r->Refresh({"alice", "desk", 1}, 0, 10'000);
  r->Refresh({"alice", "phone", 2}, 100, 500);  // another node, a shorter ttl
  CHECK(r->DeviceCount("alice", 599) == 2);
  CHECK(r->DeviceCount("alice", 600) == 1);
  std::vector<UserId> changed;
  r->TakeChanges(600, &changed);
  CHECK(changed == std::vector<UserId>{"alice"});
  // The phone comes back and goes again; the desk, refreshed, outlives both.
  r->Refresh({"alice", "phone", 2}, 700, 500);
  r->Remove({"alice", "phone", 2}, 800);
  r->Refresh({"alice", "desk", 1}, 9'000, 10'000);
  CHECK(r->DeviceCount("alice", 10'000) == 1);
  CHECK(r->DeviceCount("alice", 18'999) == 1);
  CHECK(r->DeviceCount("alice", 19'000) == 0);
  // A user who left and came back counts from the new entry only.
  r->Refresh({"alice", "desk", 1}, 20'000, 1'000);
  CHECK(r->DeviceCount("alice", 20'999) == 1);
  CHECK(r->DeviceCount("alice", 21'000) == 0);
}

TEST_CASE("presence registry: a user whose devices go while expiry items are pending") {
  std::shared_ptr<PresenceRegistry> r = NewInProcessPresenceRegistry();
  r->Refresh({"alice", "desk", 1}, 0, 10'000);  // expiry item at 10,000
  r->Refresh({"alice", "phone", 2}, 0, 500);    // an earlier one at 500
  r->Remove({"alice", "desk", 1}, 100);
  r->Remove({"alice", "phone", 2}, 100);
  CHECK(r->DeviceCount("alice", 100) == 0);
  CHECK(r->DeviceCount("alice", 600) == 0);  // the item at 500 finds no entries
  // Back before the item at 10,000 surfaces: it changes nothing when it does.
  r->Refresh({"alice", "desk", 1}, 700, 20'000);
  CHECK(r->DeviceCount("alice", 10'000) == 1);
  CHECK(r->DeviceCount("alice", 20'699) == 1);
  CHECK(r->DeviceCount("alice", 20'700) == 0);
  std::vector<UserId> changed;
  r->TakeChanges(20'700, &changed);
  CHECK(changed == std::vector<UserId>{"alice"});
  // Another user's entries are untouched by all of it.
  r->Refresh({"bob", "b", 1}, 20'700, 100);
  CHECK(r->DeviceCount("bob", 20'799) == 1);
  CHECK(r->DeviceCount("bob", 20'800) == 0);
}

// --- Stores ---

enum class Kind { kMemory, kSqlite };

struct StoreEnv {
  explicit StoreEnv(Kind k) : kind(k) { Open(); }
  void Open() {
    store.reset();
    if (kind == Kind::kMemory) {
      store = NewMemoryStore();
      return;
    }
    Result<std::shared_ptr<MessageStore>> opened = NewSqliteStore({.path = dir.File("chat.db")});
    REQUIRE_MESSAGE(opened.ok(), opened.status().ToString());
    store = *opened;
  }
  AppendResult Commit(AppendRequest request) {
    std::vector<AppendResult> results;
    Status s = store->Append({&request, 1}, &results);
    REQUIRE_MESSAGE(s.ok(), s.ToString());
    REQUIRE(results.size() == 1);
    return results[0];
  }
  AppendResult PutLastSeen(std::vector<UserId> users, int64_t ms) {
    AppendRequest r;
    r.op = ConversationOp::kLastSeen;
    r.users = std::move(users);
    r.server_time_ms = ms;
    return Commit(std::move(r));
  }
  ConversationId Direct(const UserId& a, const UserId& b) {
    AppendRequest r;
    r.sender = a;
    r.peer = b;
    r.client_msg_id = "direct-" + a + "-" + b;
    r.message_id = ++next_id;
    r.server_time_ms = 1'700'000'000'000;
    r.body = "hi";
    AppendResult result = Commit(std::move(r));
    REQUIRE(result.status.ok());
    return result.message.conversation_id;
  }
  ConversationId Group(ConversationKind group_kind, const UserId& creator,
                       std::vector<UserId> users) {
    AppendRequest r;
    r.op = ConversationOp::kCreateGroup;
    r.kind = MessageKind::kSystem;
    r.group_kind = group_kind;
    r.sender = creator;
    r.users = std::move(users);
    r.message_id = ++next_id;
    r.server_time_ms = 1'700'000'000'000;
    AppendResult result = Commit(std::move(r));
    REQUIRE_MESSAGE(result.status.ok(), result.status.ToString());
    return result.message.conversation_id;
  }
  void Remove(ConversationId id, const UserId& admin, const UserId& user) {
    AppendRequest r;
    r.op = ConversationOp::kRemoveMembers;
    r.kind = MessageKind::kSystem;
    r.conversation_id = id;
    r.sender = admin;
    r.users = {user};
    r.message_id = ++next_id;
    r.spare_message_id = ++next_id;
    r.server_time_ms = 1'700'000'000'000;
    REQUIRE(Commit(std::move(r)).status.ok());
  }

  Kind kind;
  TempDir dir;
  std::shared_ptr<MessageStore> store;
  MessageId next_id = 1;
};

Result<SyncReply> SyncOf(MessageStore& store, const UserId& user) {
  SyncQuery query;
  query.user = user;
  query.device = user + "-1";
  return store.Sync(query);
}

void LastSeenKeepsTheLatest(Kind kind) {
  StoreEnv env(kind);
  CHECK(StoredLastSeen(*env.store, "alice") == 0);
  CHECK(env.PutLastSeen({"alice", "bob"}, 5000).status.ok());
  CHECK(env.PutLastSeen({"alice"}, 4000).status.ok());  // older: ignored
  CHECK(env.PutLastSeen({"bob"}, 7000).status.ok());
  CHECK(StoredLastSeen(*env.store, "alice") == 5000);
  CHECK(StoredLastSeen(*env.store, "bob") == 7000);
  CHECK(env.PutLastSeen({""}, 8000).status.code() == Code::kInvalidArgument);
  CHECK(StoredLastSeen(*env.store, "bob") == 7000);

  // Each user at a time of their own, in one write.
  AppendRequest each;
  each.op = ConversationOp::kLastSeen;
  each.users = {"alice", "bob", "carol"};
  each.user_times_ms = {6000, 6500, 3000};
  each.server_time_ms = 9999;  // not used when each user has a time
  CHECK(env.Commit(each).status.ok());
  CHECK(StoredLastSeen(*env.store, "alice") == 6000);
  CHECK(StoredLastSeen(*env.store, "bob") == 7000);  // 6500 is older: ignored
  CHECK(StoredLastSeen(*env.store, "carol") == 3000);
  each.user_times_ms = {9000};  // one time for three users
  CHECK(env.Commit(each).status.code() == Code::kInvalidArgument);
  CHECK(StoredLastSeen(*env.store, "alice") == 6000);
}

void SharedConversations(Kind kind) {
  StoreEnv env(kind);
  env.Direct("alice", "bob");
  const ConversationId group = env.Group(ConversationKind::kGroup, "carol", {"dave", "erin"});
  env.Group(ConversationKind::kChannel, "alice", {"mallory"});
  env.Remove(group, "carol", "erin");
  env.PutLastSeen({"bob"}, 1234);
  Result<PresenceReply> reply =
      PresenceOf(*env.store, "alice", {"bob", "mallory", "carol", "nobody"});
  REQUIRE_MESSAGE(reply.ok(), reply.status().ToString());
  REQUIRE(reply->targets.size() == 4);
  CHECK(reply->targets[0].user == "bob");
  CHECK(reply->targets[0].shares_conversation);
  CHECK(reply->targets[0].last_seen_ms == 1234);
  CHECK(reply->targets[1].user == "mallory");
  CHECK_FALSE(reply->targets[1].shares_conversation);  // a channel does not count
  CHECK_FALSE(reply->targets[2].shares_conversation);
  CHECK_FALSE(reply->targets[3].shares_conversation);
  CHECK(reply->targets[3].last_seen_ms == 0);

  reply = PresenceOf(*env.store, "dave", {"carol", "erin"});
  REQUIRE(reply.ok());
  CHECK(reply->targets[0].shares_conversation);
  CHECK_FALSE(reply->targets[1].shares_conversation);  // removed from the group
  reply = PresenceOf(*env.store, "erin", {"dave"});
  REQUIRE(reply.ok());
  CHECK_FALSE(reply->targets[0].shares_conversation);
}

void PeerLastSeenInConversationInfo(Kind kind) {
  StoreEnv env(kind);
  env.Direct("alice", "bob");
  env.PutLastSeen({"bob"}, 4242);
  Result<SyncReply> sync = SyncOf(*env.store, "alice");
  REQUIRE(sync.ok());
  REQUIRE(sync->conversations.size() == 1);
  CHECK(sync->conversations[0].peer == "bob");
  CHECK(sync->conversations[0].peer_last_seen_ms == 4242);
  sync = SyncOf(*env.store, "bob");
  REQUIRE(sync.ok());
  CHECK(sync->conversations.at(0).peer_last_seen_ms == 0);  // alice never seen
}

#define STORE_CASE(fn, title)                                        \
  TEST_CASE("presence store: memory: " title) { fn(Kind::kMemory); } \
  TEST_CASE("presence store: sqlite: " title) { fn(Kind::kSqlite); }

STORE_CASE(LastSeenKeepsTheLatest,
           "last seen keeps the latest value per user, written for all at once or each at its time")
STORE_CASE(SharedConversations, "direct conversations and groups count, channels and removals not")
STORE_CASE(PeerLastSeenInConversationInfo, "a direct conversation carries the peer's last seen")

TEST_CASE("presence store: sqlite: last seen survives close and reopen") {
  StoreEnv env(Kind::kSqlite);
  env.Direct("alice", "bob");
  env.PutLastSeen({"alice"}, 99'000);
  env.Open();
  CHECK(StoredLastSeen(*env.store, "alice") == 99'000);
  Result<SyncReply> sync = SyncOf(*env.store, "bob");
  REQUIRE(sync.ok());
  CHECK(sync->conversations.at(0).peer_last_seen_ms == 99'000);
}

TEST_CASE("presence store: a store without presence support says FAILED_PRECONDITION") {
  class Bare final : public MessageStoreWrapper {
   public:
    Bare() : MessageStoreWrapper(NewMemoryStore()) {}
    Result<PresenceReply> Presence(const PresenceQuery& query) override {
      return MessageStore::Presence(query);
    }
  };
  Bare bare;
  CHECK(PresenceOf(bare, "alice", {"bob"}).status().code() == Code::kFailedPrecondition);
}

}  // namespace
}  // namespace chat::testing
