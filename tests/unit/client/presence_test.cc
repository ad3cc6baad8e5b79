// Session: presence subscriptions, last seen of direct peers and push token registration, driven
// with a FakeClock and a fake transport.
#include <doctest/doctest.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "src/client/cache.h"
#include "src/client/session.h"
#include "tests/testing/temp_dir.h"
#include "tests/unit/client/session_harness.h"

namespace chat::client {
namespace {

// Records every answer a StatusCallback gets.
struct Answers {
  StatusCallback Callback() {
    return [this](Status st) { got.push_back(std::move(st)); };
  }
  std::vector<Status> got;
};

std::vector<std::string> Users(const v1::Envelope& e) {
  const auto& users = e.has_presence_subscribe() ? e.presence_subscribe().users()
                                                 : e.presence_unsubscribe().users();
  return {users.begin(), users.end()};
}

v1::Envelope Update(const std::string& user, bool online, uint32_t devices, int64_t last_seen) {
  v1::Envelope e;
  e.mutable_presence_update()->set_user_id(user);
  e.mutable_presence_update()->set_online(online);
  e.mutable_presence_update()->set_devices(devices);
  e.mutable_presence_update()->set_last_seen_ms(last_seen);
  return e;
}

// The one presence_subscribe among the written envelopes.
v1::Envelope OnlySubscribe(Harness& h) {
  auto subs = OfCase(h.io.Take(), v1::Envelope::kPresenceSubscribe);
  REQUIRE(subs.size() == 1);
  return subs[0];
}

v1::ConversationState DirectState(ConversationId id, const std::string& peer, int64_t last_seen) {
  v1::ConversationState state;
  state.set_conversation_id(id);
  state.set_kind(v1::CONVERSATION_KIND_DIRECT);
  state.set_peer(peer);
  state.set_member_count(2);
  state.set_peer_last_seen_ms(last_seen);
  return state;
}

// Live, with the direct conversation 3 with bob (last seen `last_seen` per the server).
void ConnectWithBob(Harness& h, int64_t last_seen = 0) {
  v1::Envelope sync = h.Welcome();
  v1::SyncBatch batch;
  *batch.add_conversations() = DirectState(3, "bob", last_seen);
  h.Reply(sync, batch);
  REQUIRE(h.state() == ConnectionState::kConnected);
  h.io.Take();
}

TEST_CASE("presence: subscribe sends the users, each update reaches OnPresence, Ok calls back") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  Answers answers;
  h.session->SubscribePresence({"bob", "carol", "bob"}, answers.Callback());
  v1::Envelope sub = OnlySubscribe(h);
  CHECK(Users(sub) == std::vector<std::string>{"bob", "carol"});

  // The current states come first (rid 0), then the Ok.
  h.session->OnEnvelope(Update("bob", true, 2, 1'000));
  h.session->OnEnvelope(Update("carol", false, 0, 500));
  CHECK(answers.got.empty());
  h.session->OnEnvelope(OkFor(sub));
  REQUIRE(answers.got.size() == 1);
  CHECK(answers.got[0].ok());

  h.session->OnEnvelope(Update("bob", false, 0, 2'000));
  REQUIRE(h.listener.presence.size() == 3);
  CHECK(h.listener.presence[0].user == "bob");
  CHECK(h.listener.presence[0].online);
  CHECK(h.listener.presence[0].devices == 2);
  CHECK(h.listener.presence[1].user == "carol");
  CHECK_FALSE(h.listener.presence[1].online);
  CHECK(h.listener.presence[1].last_seen_ms == 500);
  CHECK_FALSE(h.listener.presence[2].online);
  CHECK(h.listener.presence[2].last_seen_ms == 2'000);
  CHECK(h.listener.errors.empty());
}

TEST_CASE("presence: a subscription made offline waits and is answered once live") {
  Harness h;
  h.session->Start();
  Answers answers;
  h.session->SubscribePresence({"bob"}, answers.Callback());
  CHECK(h.io.Take().empty());
  CHECK(answers.got.empty());
  h.ConnectLive();
  v1::Envelope sub = OnlySubscribe(h);
  CHECK(Users(sub) == std::vector<std::string>{"bob"});
  h.session->OnEnvelope(OkFor(sub));
  REQUIRE(answers.got.size() == 1);
  CHECK(answers.got[0].ok());
}

TEST_CASE("presence: the watched set is subscribed again after every reconnect") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  Answers answers;
  h.session->SubscribePresence({"bob", "carol"}, answers.Callback());
  h.session->OnEnvelope(OkFor(OnlySubscribe(h)));
  h.session->SubscribePresence({"dave"}, answers.Callback());
  h.session->OnEnvelope(OkFor(OnlySubscribe(h)));

  for (int round = 0; round < 2; ++round) {
    h.session->OnClosed(1006, "abnormal");
    h.ConnectLive();
    v1::Envelope again = OnlySubscribe(h);
    CHECK(Users(again) == std::vector<std::string>{"bob", "carol", "dave"});
    h.session->OnEnvelope(Update("dave", true, 1, 0));
    h.session->OnEnvelope(OkFor(again));
  }
  CHECK(answers.got.size() == 2);  // the automatic re-subscriptions call nobody back
  CHECK(h.listener.presence.size() == 2);
  CHECK(h.listener.errors.empty());
}

TEST_CASE("presence: a subscribe whose reply is lost with the link is sent again, then answered") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  Answers answers;
  h.session->SubscribePresence({"bob"}, answers.Callback());
  OnlySubscribe(h);
  h.session->OnClosed(1006, "abnormal");
  CHECK(answers.got.empty());  // it waits for the next connection
  h.ConnectLive();
  v1::Envelope sub = OnlySubscribe(h);
  CHECK(Users(sub) == std::vector<std::string>{"bob"});
  h.session->OnEnvelope(OkFor(sub));
  REQUIRE(answers.got.size() == 1);
  CHECK(answers.got[0].ok());
}

TEST_CASE("presence: PERMISSION_DENIED calls back and leaves the new users unwatched") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  Answers answers;
  h.session->SubscribePresence({"bob"}, answers.Callback());
  h.session->OnEnvelope(OkFor(OnlySubscribe(h)));
  h.session->SubscribePresence({"bob", "mallory"}, answers.Callback());
  h.session->OnEnvelope(
      ErrorFor(OnlySubscribe(h), v1::Error::PERMISSION_DENIED, "mallory shares no conversation"));
  REQUIRE(answers.got.size() == 2);
  CHECK(answers.got[1].code() == Code::kPermissionDenied);
  CHECK(answers.got[1].message() == "mallory shares no conversation");
  // bob was watched before the refused request and stays watched.
  CHECK(h.session->watched() == std::set<UserId>{"bob"});
  h.session->OnEnvelope(Update("mallory", true, 1, 0));
  CHECK(h.listener.presence.empty());
  CHECK(h.listener.errors.empty());
}

TEST_CASE("presence: PERMISSION_DENIED on re-subscribe drops only that user and reports it") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  Answers answers;
  h.session->SubscribePresence({"bob", "carol"}, answers.Callback());
  h.session->OnEnvelope(OkFor(OnlySubscribe(h)));

  h.session->OnClosed(1006, "abnormal");
  h.ConnectLive();
  // carol left the only shared group meanwhile: the batch is refused as a whole ...
  h.session->OnEnvelope(
      ErrorFor(OnlySubscribe(h), v1::Error::PERMISSION_DENIED, "no shared conversation"));
  CHECK(h.listener.errors.empty());
  // ... so each user is asked for alone to find out who.
  auto singles = OfCase(h.io.Take(), v1::Envelope::kPresenceSubscribe);
  REQUIRE(singles.size() == 2);
  CHECK(Users(singles[0]) == std::vector<std::string>{"bob"});
  CHECK(Users(singles[1]) == std::vector<std::string>{"carol"});
  h.session->OnEnvelope(OkFor(singles[0]));
  h.session->OnEnvelope(
      ErrorFor(singles[1], v1::Error::PERMISSION_DENIED, "no shared conversation"));
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0].code() == Code::kPermissionDenied);
  CHECK(h.listener.errors[0].message().find("carol") != std::string_view::npos);
  CHECK(h.session->watched() == std::set<UserId>{"bob"});

  h.session->OnClosed(1006, "abnormal");
  h.ConnectLive();
  CHECK(Users(OnlySubscribe(h)) == std::vector<std::string>{"bob"});
}

// After a reconnect the automatic re-subscription leaves out the users a waiting request names;
// if that request is refused, the server watches none of them.
TEST_CASE("presence: users watched before a request refused after a reconnect are watched again") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  Answers answers;
  h.session->SubscribePresence({"bob"}, answers.Callback());
  h.session->OnEnvelope(OkFor(OnlySubscribe(h)));

  h.session->OnClosed(1006, "abnormal");
  h.session->SubscribePresence({"bob", "eve"}, answers.Callback());  // waits
  h.ConnectLive();
  v1::Envelope sub = OnlySubscribe(h);
  CHECK(Users(sub) == std::vector<std::string>{"bob", "eve"});
  h.session->OnEnvelope(ErrorFor(sub, v1::Error::PERMISSION_DENIED, "may not watch eve"));
  REQUIRE(answers.got.size() == 2);
  CHECK(answers.got[1].code() == Code::kPermissionDenied);
  CHECK(h.session->watched() == std::set<UserId>{"bob"});

  v1::Envelope again = OnlySubscribe(h);
  CHECK(Users(again) == std::vector<std::string>{"bob"});
  h.session->OnEnvelope(Update("bob", true, 1, 0));
  h.session->OnEnvelope(OkFor(again));
  REQUIRE(h.listener.presence.size() == 1);
  CHECK(h.listener.presence[0].user == "bob");
  CHECK(answers.got.size() == 2);
  CHECK(h.listener.errors.empty());
}

// Sent while live, a refused request changes nothing on the server for the users watched before.
TEST_CASE("presence: a request refused while live subscribes nobody again") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  Answers answers;
  h.session->SubscribePresence({"bob"}, answers.Callback());
  h.session->OnEnvelope(OkFor(OnlySubscribe(h)));
  h.session->SubscribePresence({"bob", "eve"}, answers.Callback());
  h.session->OnEnvelope(ErrorFor(OnlySubscribe(h), v1::Error::PERMISSION_DENIED, "eve"));
  CHECK(OfCase(h.io.Take(), v1::Envelope::kPresenceSubscribe).empty());
  CHECK(h.session->watched() == std::set<UserId>{"bob"});
}

TEST_CASE("presence: unsubscribe is sent, answered, and later updates are ignored") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  Answers answers;
  h.session->SubscribePresence({"bob", "carol"}, answers.Callback());
  h.session->OnEnvelope(OkFor(OnlySubscribe(h)));
  h.session->UnsubscribePresence({"bob"}, answers.Callback());
  auto unsubs = OfCase(h.io.Take(), v1::Envelope::kPresenceUnsubscribe);
  REQUIRE(unsubs.size() == 1);
  CHECK(Users(unsubs[0]) == std::vector<std::string>{"bob"});
  h.session->OnEnvelope(Update("bob", false, 0, 9));  // in flight before the unsubscribe
  h.session->OnEnvelope(OkFor(unsubs[0]));
  REQUIRE(answers.got.size() == 2);
  CHECK(answers.got[1].ok());
  CHECK(h.listener.presence.empty());
  CHECK(h.session->watched() == std::set<UserId>{"carol"});

  // Offline, an unsubscribe needs no request: the server forgot everything.
  h.session->OnClosed(1006, "abnormal");
  h.session->UnsubscribePresence({"carol"}, answers.Callback());
  REQUIRE(answers.got.size() == 3);
  CHECK(answers.got[2].ok());
  h.ConnectLive();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kPresenceSubscribe).empty());
}

TEST_CASE("presence: an unsubscribe cancels a subscribe still waiting for the connection") {
  Harness h;
  h.session->Start();
  Answers answers;
  h.session->SubscribePresence({"bob"}, answers.Callback());
  h.session->UnsubscribePresence({"bob"}, answers.Callback());
  REQUIRE(answers.got.size() == 2);
  CHECK(answers.got[0].code() == Code::kCancelled);
  CHECK(answers.got[1].ok());
  h.ConnectLive();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kPresenceSubscribe).empty());
}

TEST_CASE("presence: more users than the server's limit are refused with RESOURCE_EXHAUSTED") {
  Harness h;
  h.presence_limit = 2;
  h.ConnectLive();
  h.io.Take();
  Answers answers;
  h.session->SubscribePresence({"bob", "carol"}, answers.Callback());
  h.session->OnEnvelope(OkFor(OnlySubscribe(h)));
  h.session->SubscribePresence({"bob", "dave"}, answers.Callback());
  REQUIRE(answers.got.size() == 2);
  CHECK(answers.got[1].code() == Code::kResourceExhausted);
  CHECK(h.io.Take().empty());
  CHECK(h.session->watched() == std::set<UserId>{"bob", "carol"});
  // The server's own refusal is passed on the same way.
  h.session->UnsubscribePresence({"carol"}, answers.Callback());
  h.io.Take();
  h.session->SubscribePresence({"erin"}, answers.Callback());
  h.session->OnEnvelope(
      ErrorFor(OnlySubscribe(h), v1::Error::RESOURCE_EXHAUSTED, "too many subscriptions"));
  CHECK(answers.got.back().code() == Code::kResourceExhausted);
  CHECK(h.session->watched() == std::set<UserId>{"bob"});
}

TEST_CASE("presence: a direct peer going offline sets last seen and updates the conversation") {
  Harness h;
  ConnectWithBob(h, /*last_seen=*/1'000);
  CHECK(h.cache->GetConversation(3)->info.peer_last_seen_ms == 1'000);
  Answers answers;
  h.session->SubscribePresence({"bob"}, answers.Callback());
  h.session->OnEnvelope(Update("bob", true, 1, 5'000));  // online: last seen stays
  h.session->OnEnvelope(OkFor(OnlySubscribe(h)));
  CHECK(h.cache->GetConversation(3)->info.peer_last_seen_ms == 1'000);
  const size_t updates = h.listener.conversations.size();

  h.session->OnEnvelope(Update("bob", false, 0, 7'000));
  CHECK(h.cache->GetConversation(3)->info.peer_last_seen_ms == 7'000);
  REQUIRE(h.listener.conversations.size() == updates + 1);
  CHECK(h.listener.conversations.back().conversation_id == 3);
  CHECK(h.listener.conversations.back().peer_last_seen_ms == 7'000);

  // An older value (a late Sync of the server's stored state) never moves it back.
  v1::Envelope update;
  *update.mutable_conversation_update()->mutable_conversation() = DirectState(3, "bob", 6'000);
  h.session->OnEnvelope(update);
  CHECK(h.cache->GetConversation(3)->info.peer_last_seen_ms == 7'000);
}

TEST_CASE("presence: last seen stays in the cache file across a client restart") {
  testing::TempDir dir;
  const std::string path = dir.File("cache.db");
  {
    std::shared_ptr<Cache> cache(Cache::Open(path).value());
    Harness h({}, cache);
    ConnectWithBob(h, /*last_seen=*/1'000);
    Answers answers;
    h.session->SubscribePresence({"bob"}, answers.Callback());
    h.session->OnEnvelope(Update("bob", false, 0, 8'000));
    h.session->Stop();
  }
  std::shared_ptr<Cache> cache(Cache::Open(path).value());
  std::optional<ConversationRow> row = cache->GetConversation(3);
  REQUIRE(row.has_value());
  CHECK(row->info.peer == "bob");
  CHECK(row->info.peer_last_seen_ms == 8'000);
  // Nothing else about presence is cached: a new session watches nobody.
  Harness h({}, cache);
  CHECK(h.session->watched().empty());
}

TEST_CASE("push: the token is sent when live and again after every reconnect") {
  Harness h;
  h.session->Start();
  Answers answers;
  h.session->RegisterPushToken("fcm", "token-a", answers.Callback());
  CHECK(h.io.Take().empty());
  h.ConnectLive();
  auto regs = OfCase(h.io.Take(), v1::Envelope::kRegisterPushToken);
  REQUIRE(regs.size() == 1);
  CHECK(regs[0].register_push_token().platform() == "fcm");
  CHECK(regs[0].register_push_token().token() == "token-a");
  h.session->OnEnvelope(OkFor(regs[0]));
  REQUIRE(answers.got.size() == 1);
  CHECK(answers.got[0].ok());

  h.session->OnClosed(1006, "abnormal");
  h.ConnectLive();
  regs = OfCase(h.io.Take(), v1::Envelope::kRegisterPushToken);
  REQUIRE(regs.size() == 1);
  CHECK(regs[0].register_push_token().token() == "token-a");
  h.session->OnEnvelope(OkFor(regs[0]));
  CHECK(answers.got.size() == 1);  // the repeat calls nobody back

  // Unregistering (empty token) is sent once; afterwards nothing is repeated.
  h.session->RegisterPushToken("fcm", "", answers.Callback());
  regs = OfCase(h.io.Take(), v1::Envelope::kRegisterPushToken);
  REQUIRE(regs.size() == 1);
  CHECK(regs[0].register_push_token().token().empty());
  h.session->OnEnvelope(OkFor(regs[0]));
  CHECK(answers.got.size() == 2);
  h.session->OnClosed(1006, "abnormal");
  h.ConnectLive();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kRegisterPushToken).empty());
}

TEST_CASE("push: a newer token while offline cancels the older call, and only it is sent") {
  Harness h;
  h.session->Start();
  Answers first;
  Answers second;
  h.session->RegisterPushToken("apns", "old", first.Callback());
  h.session->RegisterPushToken("apns", "new", second.Callback());
  REQUIRE(first.got.size() == 1);
  CHECK(first.got[0].code() == Code::kCancelled);
  h.ConnectLive();
  auto regs = OfCase(h.io.Take(), v1::Envelope::kRegisterPushToken);
  REQUIRE(regs.size() == 1);
  CHECK(regs[0].register_push_token().token() == "new");
  h.session->OnEnvelope(OkFor(regs[0]));
  REQUIRE(second.got.size() == 1);
  CHECK(second.got[0].ok());
}

TEST_CASE("push: a refused token is answered with the error and not repeated") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  Answers answers;
  h.session->RegisterPushToken("carrier-pigeon", "t", answers.Callback());
  auto regs = OfCase(h.io.Take(), v1::Envelope::kRegisterPushToken);
  REQUIRE(regs.size() == 1);
  h.session->OnEnvelope(ErrorFor(regs[0], v1::Error::INVALID_ARGUMENT, "unknown platform"));
  REQUIRE(answers.got.size() == 1);
  CHECK(answers.got[0].code() == Code::kInvalidArgument);
  CHECK(h.listener.errors.empty());
  h.session->OnClosed(1006, "abnormal");
  h.ConnectLive();
  CHECK(OfCase(h.io.Take(), v1::Envelope::kRegisterPushToken).empty());
}

TEST_CASE("push: a refused repeat after a reconnect goes to OnError") {
  Harness h;
  h.ConnectLive();
  h.io.Take();
  Answers answers;
  h.session->RegisterPushToken("fcm", "t", answers.Callback());
  h.session->OnEnvelope(OkFor(OfCase(h.io.Take(), v1::Envelope::kRegisterPushToken).at(0)));
  h.session->OnClosed(1006, "abnormal");
  h.ConnectLive();
  auto regs = OfCase(h.io.Take(), v1::Envelope::kRegisterPushToken);
  REQUIRE(regs.size() == 1);
  h.session->OnEnvelope(ErrorFor(regs[0], v1::Error::UNAVAILABLE, "push store down"));
  REQUIRE(h.listener.errors.size() == 1);
  CHECK(h.listener.errors[0].code() == Code::kUnavailable);
  CHECK(h.listener.errors[0].message().find("push token") != std::string_view::npos);
  CHECK(answers.got.size() == 1);
}

}  // namespace
}  // namespace chat::client
