// chat::Client groups, receipts, unread counts and typing against the real chatd over loopback.
// Each test checks what the applications of the members see.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "chat/client.h"
#include "chat/v1/chat.pb.h"
#include "tests/testing/chatd_process.h"
#include "tests/testing/temp_dir.h"
#include "tests/testing/ws_client.h"

namespace chat::testing {
namespace {

class GroupRecorder : public ClientListener {
 public:
  void OnConnectionState(ConnectionState state) override {
    std::lock_guard lock(mu_);
    state_ = state;
  }
  void OnMessage(const MessageEvent& event) override {
    std::lock_guard lock(mu_);
    if (event.status == MessageStatus::kSent) messages_.push_back(event.message);
  }
  void OnTyping(ConversationId, const UserId& user, bool active) override {
    std::lock_guard lock(mu_);
    typing_.push_back(user + (active ? ":on" : ":off"));
  }
  void OnMessageStatus(ConversationId, Seq up_to_seq, MessageStatus status) override {
    std::lock_guard lock(mu_);
    if (status == MessageStatus::kDelivered) delivered_ = std::max(delivered_, up_to_seq);
    if (status == MessageStatus::kRead) read_ = std::max(read_, up_to_seq);
  }
  ConnectionState state() {
    std::lock_guard lock(mu_);
    return state_;
  }
  std::vector<Message> messages() {
    std::lock_guard lock(mu_);
    return messages_;
  }
  std::vector<std::string> typing() {
    std::lock_guard lock(mu_);
    return typing_;
  }
  Seq delivered() {
    std::lock_guard lock(mu_);
    return delivered_;
  }
  Seq read() {
    std::lock_guard lock(mu_);
    return read_;
  }

 private:
  std::mutex mu_;
  ConnectionState state_ = ConnectionState::kDisconnected;
  std::vector<Message> messages_;
  std::vector<std::string> typing_;
  Seq delivered_ = 0;
  Seq read_ = 0;
};

struct Member {
  std::shared_ptr<GroupRecorder> recorder = std::make_shared<GroupRecorder>();
  std::unique_ptr<Client> client;
};

Member Connect(const ChatdProcess& chatd, const std::string& user, const std::string& device,
               const std::string& cache) {
  Member m;
  ClientOptions options;
  options.url = chatd.url();
  options.token_provider = [&chatd, user] { return chatd.Token(user); };
  options.device_id = device;
  options.cache_path = cache;
  options.listener = m.recorder;
  options.reconnect.base_ms = 50;
  options.reconnect.cap_ms = 500;
  auto client = Client::Open(std::move(options));
  REQUIRE(client.ok());
  m.client = std::move(client.value());
  REQUIRE(m.client->Start().ok());
  return m;
}

bool WaitFor(const std::function<bool()>& done, int timeout_ms = 20'000) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

// Waits until every member's client is connected (synced and live).
bool AllConnected(std::initializer_list<const Member*> members) {
  return WaitFor([&] {
    return std::all_of(members.begin(), members.end(), [](const Member* m) {
      return m->recorder->state() == ConnectionState::kConnected;
    });
  });
}

std::optional<ConversationInfo> Cached(Client& client, ConversationId id) {
  auto conversations = client.Conversations();
  if (!conversations.ok()) return std::nullopt;
  for (const auto& c : *conversations) {
    if (c.conversation_id == id) return c;
  }
  return std::nullopt;
}

TEST_CASE("client groups e2e: create, system message, unread on two devices, delivered and read") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  Member alice = Connect(chatd, "alice", "alice-laptop", dir.File("alice.db"));
  Member bob = Connect(chatd, "bob", "bob-phone", dir.File("bob-phone.db"));
  Member bob2 = Connect(chatd, "bob", "bob-tablet", dir.File("bob-tablet.db"));
  REQUIRE(AllConnected({&alice, &bob, &bob2}));

  std::mutex mu;
  std::optional<Result<ConversationInfo>> created;
  REQUIRE(alice.client
              ->CreateGroup("team", {"bob"}, ConversationKind::kGroup,
                            [&](Result<ConversationInfo> r) {
                              std::lock_guard lock(mu);
                              created.emplace(std::move(r));
                            })
              .ok());
  REQUIRE(WaitFor([&] {
    std::lock_guard lock(mu);
    return created.has_value();
  }));
  REQUIRE(created->ok());
  const ConversationId id = (*created)->conversation_id;
  CHECK((*created)->kind == ConversationKind::kGroup);
  CHECK((*created)->title == "team");
  CHECK((*created)->role == Role::kAdmin);

  REQUIRE(alice.client->Send(id, "text/plain", "one").ok());
  REQUIRE(alice.client->Send(id, "text/plain", "two").ok());
  // Bob's devices get the creation as a system message, then the two messages, and two unread.
  for (Member* m : {&bob, &bob2}) {
    REQUIRE(WaitFor([&] { return m->recorder->messages().size() >= 3; }));
    std::vector<Message> got = m->recorder->messages();
    CHECK(got[0].kind == MessageKind::kSystem);
    CHECK(got[0].system.type == SystemEvent::Type::kCreated);
    CHECK(got[1].body == "one");
    CHECK(got[2].body == "two");
    REQUIRE(WaitFor([&] {
      auto c = Cached(*m->client, id);
      return c && c->unread == 2 && c->title == "team";
    }));
  }
  // Both of bob's devices report delivery by themselves.
  CHECK(WaitFor([&] { return alice.recorder->delivered() >= 3; }));
  CHECK(alice.recorder->read() < 3);

  // Read on the phone is read on the tablet, and the sender sees it.
  REQUIRE(bob.client->MarkRead(id).ok());
  CHECK(WaitFor([&] {
    auto c = Cached(*bob2.client, id);
    return c && c->unread == 0 && c->read_seq == 3;
  }));
  CHECK(bob2.client->UnreadTotal().value() == 0);
  CHECK(WaitFor([&] { return alice.recorder->read() >= 3; }));
  CHECK(alice.client->MessageStatusOf(id, 3).value() == MessageStatus::kRead);

  // Typing reaches the other member and ends by itself or when stopped.
  REQUIRE(alice.client->SetTyping(id, true).ok());
  CHECK(WaitFor([&] {
    auto t = bob.recorder->typing();
    return !t.empty() && t.front() == "alice:on";
  }));
  REQUIRE(alice.client->SetTyping(id, false).ok());
  CHECK(WaitFor([&] {
    auto t = bob.recorder->typing();
    return t.size() >= 2 && t[1] == "alice:off";
  }));

  // Only an admin renames: bob is refused, alice is not, and bob's cache follows.
  std::optional<Result<ConversationInfo>> refused;
  REQUIRE(bob.client
              ->RenameGroup(id, "bob's",
                            [&](Result<ConversationInfo> r) {
                              std::lock_guard lock(mu);
                              refused.emplace(std::move(r));
                            })
              .ok());
  REQUIRE(WaitFor([&] {
    std::lock_guard lock(mu);
    return refused.has_value();
  }));
  CHECK(refused->status().code() == Code::kPermissionDenied);
  std::optional<Result<ConversationInfo>> renamed;
  REQUIRE(alice.client
              ->RenameGroup(id, "renamed",
                            [&](Result<ConversationInfo> r) {
                              std::lock_guard lock(mu);
                              renamed.emplace(std::move(r));
                            })
              .ok());
  REQUIRE(WaitFor([&] {
    std::lock_guard lock(mu);
    return renamed.has_value();
  }));
  REQUIRE(renamed->ok());
  CHECK((*renamed)->title == "renamed");
  CHECK(WaitFor([&] {
    auto c = Cached(*bob.client, id);
    return c && c->title == "renamed";
  }));

  alice.client->Close();
  bob.client->Close();
  bob2.client->Close();
}

// Waits for a group call's answer.
Result<ConversationInfo> Await(const std::function<Status(ConversationCallback)>& call) {
  std::mutex mu;
  std::optional<Result<ConversationInfo>> got;
  Status s = call([&](Result<ConversationInfo> r) {
    std::lock_guard lock(mu);
    got.emplace(std::move(r));
  });
  if (!s.ok()) return s;
  if (!WaitFor([&] {
        std::lock_guard lock(mu);
        return got.has_value();
      })) {
    return DeadlineExceeded("no answer");
  }
  std::lock_guard lock(mu);
  return std::move(*got);
}

std::vector<std::string> Bodies(const std::vector<Message>& messages, ConversationId id) {
  std::vector<std::string> out;
  for (const Message& m : messages) {
    if (m.conversation_id != id) continue;
    out.push_back(m.kind == MessageKind::kSystem
                      ? "<" + std::to_string(static_cast<int>(m.system.type)) + ">"
                      : m.body);
  }
  return out;
}

// The server's read watermark of `user` in `conversation`, asked with `client`'s GetReceipts;
// 0 if it did not answer.
Seq ServerReadSeq(Client& client, ConversationId conversation, const UserId& user) {
  std::mutex mu;
  std::optional<Result<std::vector<MemberWatermarks>>> got;
  if (!client
           .GetReceipts(conversation,
                        [&](Result<std::vector<MemberWatermarks>> r) {
                          std::lock_guard lock(mu);
                          got.emplace(std::move(r));
                        })
           .ok() ||
      !WaitFor([&] {
        std::lock_guard lock(mu);
        return got.has_value();
      })) {
    return 0;
  }
  std::lock_guard lock(mu);
  if (!got->ok()) return 0;
  for (const MemberWatermarks& w : **got) {
    if (w.user_id == user) return w.read_seq;
  }
  return 0;
}

TEST_CASE("client groups e2e: messages read while the sender was offline show read once back") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  std::optional<Member> alice = Connect(chatd, "alice", "alice-laptop", dir.File("alice.db"));
  Member bob = Connect(chatd, "bob", "bob-phone", dir.File("bob.db"));
  REQUIRE(AllConnected({&*alice, &bob}));
  Result<ConversationInfo> created = Await([&](ConversationCallback done) {
    return alice->client->CreateGroup("pair", {"bob"}, ConversationKind::kGroup, std::move(done));
  });
  REQUIRE(created.ok());
  const ConversationId id = created->conversation_id;
  REQUIRE(alice->client->Send(id, "text/plain", "hello").ok());
  REQUIRE(WaitFor([&] { return Bodies(bob.recorder->messages(), id).size() >= 2; }));
  REQUIRE(WaitFor([&] { return alice->recorder->delivered() >= 2; }));
  CHECK(alice->recorder->read() < 2);
  alice->client->Close();
  alice.reset();

  // Bob reads while alice is away; the server has it before she comes back.
  REQUIRE(bob.client->MarkRead(id).ok());
  REQUIRE(WaitFor([&] { return ServerReadSeq(*bob.client, id, "bob") >= 2; }));

  // Nothing else happens in the conversation: alice learns it from her reconnect's Sync, which
  // lists the conversation's state with the raised lowest watermarks.
  alice = Connect(chatd, "alice", "alice-laptop", dir.File("alice.db"));
  CHECK(WaitFor([&] { return alice->recorder->read() >= 2; }));
  CHECK(alice->client->MessageStatusOf(id, 2).value() == MessageStatus::kRead);
}

TEST_CASE(
    "client groups e2e: over the receipt limit, a message read while the sender was offline "
    "shows read after chatd restarted") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  std::optional<Member> alice = Connect(chatd, "alice", "alice-laptop", dir.File("alice.db"));
  REQUIRE(AllConnected({&*alice}));
  // 34 members, over the server's receipt_updates_max_members (32): the others are told only
  // rises of the lowest marks, and alice is offline when the last one comes.
  std::vector<UserId> others;
  for (int i = 0; i < 33; ++i) others.push_back("m" + std::to_string(i));
  Result<ConversationInfo> created = Await([&](ConversationCallback done) {
    return alice->client->CreateGroup("crowd", others, ConversationKind::kGroup, std::move(done));
  });
  REQUIRE(created.ok());
  const ConversationId id = created->conversation_id;
  REQUIRE(alice->client->Send(id, "text/plain", "hello").ok());  // seq 2
  // Her own read mark follows her message on the server before she goes.
  REQUIRE(WaitFor([&] { return ServerReadSeq(*alice->client, id, "alice") >= 2; }, 10'000));
  CHECK(alice->client->MessageStatusOf(id, 2).value() == MessageStatus::kSent);
  alice->client->Close();
  alice.reset();

  // Every other member gets and reads it, each over its own short connection.
  v1::ReceiptUpdate last;
  for (const UserId& user : others) {
    CAPTURE(user);
    Result<std::unique_ptr<WsClient>> ws = chatd.Login(user, user + "-phone");
    REQUIRE_MESSAGE(ws.ok(), ws.status().ToString());
    v1::Envelope receipt;
    receipt.mutable_receipt()->set_conversation_id(id);
    receipt.mutable_receipt()->set_delivered_seq(2);
    receipt.mutable_receipt()->set_read_seq(2);
    std::optional<v1::Envelope> reply = (*ws)->Request(receipt);
    REQUIRE(reply.has_value());
    REQUIRE_MESSAGE(reply->has_receipt_update(), reply->DebugString());
    last = reply->receipt_update();
  }
  CHECK(last.read_all_seq() == 2);

  // chatd goes down and comes back on the same database before alice reconnects.
  Result<int> stopped = chatd.Terminate();
  REQUIRE(stopped.ok());
  CHECK(*stopped == 0);
  REQUIRE(chatd.Restart().ok());

  alice = Connect(chatd, "alice", "alice-laptop", dir.File("alice.db"));
  CHECK(WaitFor([&] { return alice->recorder->read() >= 2; }, 10'000));
  CHECK(alice->client->MessageStatusOf(id, 2).value() == MessageStatus::kRead);
}

TEST_CASE("client groups e2e: a member added later gets the log from the addition, online or not") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  Member alice = Connect(chatd, "alice", "laptop", dir.File("alice.db"));
  Member bob = Connect(chatd, "bob", "phone", dir.File("bob.db"));
  Member carol = Connect(chatd, "carol", "phone", dir.File("carol.db"));
  REQUIRE(AllConnected({&alice, &bob, &carol}));
  Result<ConversationInfo> created = Await([&](ConversationCallback done) {
    return alice.client->CreateGroup("team", {"bob"}, ConversationKind::kGroup, std::move(done));
  });
  REQUIRE(created.ok());
  const ConversationId id = created->conversation_id;
  REQUIRE(alice.client->Send(id, "text/plain", "before carol").ok());
  REQUIRE(WaitFor([&] { return Bodies(bob.recorder->messages(), id).size() == 2; }));

  // Carol, online, is added after two messages (seq 3): her device gets the addition and what
  // follows, and nothing before it.
  REQUIRE(Await([&](ConversationCallback done) {
            return alice.client->AddMembers(id, {"carol"}, std::move(done));
          }).ok());
  REQUIRE(alice.client->Send(id, "text/plain", "with carol").ok());
  const std::string added =
      "<" + std::to_string(static_cast<int>(SystemEvent::Type::kMembersAdded)) + ">";
  CHECK(WaitFor([&] {
    return Bodies(carol.recorder->messages(), id) == std::vector<std::string>{added, "with carol"};
  }));
  CHECK(WaitFor([&] {
    auto c = Cached(*carol.client, id);
    return c && c->last_seq == 4 && c->unread == 1;
  }));

  // Bob is removed, misses a message, is added again: his device shows the removal, then the
  // new addition and what follows it.
  REQUIRE(Await([&](ConversationCallback done) {
            return alice.client->RemoveMembers(id, {"bob"}, std::move(done));
          }).ok());
  REQUIRE(alice.client->Send(id, "text/plain", "without bob").ok());
  REQUIRE(Await([&](ConversationCallback done) {
            return alice.client->AddMembers(id, {"bob"}, std::move(done));
          }).ok());
  REQUIRE(alice.client->Send(id, "text/plain", "bob is back").ok());
  const std::string removed =
      "<" + std::to_string(static_cast<int>(SystemEvent::Type::kMembersRemoved)) + ">";
  CHECK(WaitFor([&] {
    return Bodies(bob.recorder->messages(), id) ==
           std::vector<std::string>{
               "<" + std::to_string(static_cast<int>(SystemEvent::Type::kCreated)) + ">",
               "before carol",
               added,
               "with carol",
               removed,
               added,
               "bob is back"};
  }));

  // Dave is added while he has never connected: his first sync starts at his addition, and his
  // device goes live (the outbox drains).
  REQUIRE(Await([&](ConversationCallback done) {
            return alice.client->AddMembers(id, {"dave"}, std::move(done));
          }).ok());
  REQUIRE(alice.client->Send(id, "text/plain", "hi dave").ok());
  Member dave = Connect(chatd, "dave", "phone", dir.File("dave.db"));
  CHECK(WaitFor([&] {
    return Bodies(dave.recorder->messages(), id) == std::vector<std::string>{added, "hi dave"};
  }));
  CHECK(WaitFor([&] { return dave.recorder->state() == ConnectionState::kConnected; }));
  REQUIRE(dave.client->Send(id, "text/plain", "dave here").ok());
  CHECK(WaitFor([&] {
    std::vector<std::string> got = Bodies(carol.recorder->messages(), id);
    return !got.empty() && got.back() == "dave here";
  }));

  for (Member* m : {&alice, &bob, &carol, &dave}) m->client->Close();
}

}  // namespace
}  // namespace chat::testing
