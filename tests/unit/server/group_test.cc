// Groups, channels, receipts, unread counts and typing through the Hub, as clients see them:
// which envelopes each connection receives after each commit.
#include <doctest/doctest.h>

#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "src/server/hub.h"
#include "tests/testing/hub_harness.h"

namespace chat::testing {
namespace {

using server::SessionId;

ServerOptions RoomyOptions() {
  ServerOptions options;
  options.idle_timeout_ms = 1'000'000'000;
  options.hello_timeout_ms = 1'000'000'000;
  options.messages_burst = 100'000;
  return options;
}

v1::Envelope CreateGroupEnvelope(uint64_t rid, v1::ConversationKind kind,
                                 const std::vector<std::string>& members) {
  v1::Envelope e;
  e.set_rid(rid);
  e.mutable_create_group()->set_kind(kind);
  e.mutable_create_group()->set_title("team");
  for (const std::string& m : members) e.mutable_create_group()->add_members(m);
  return e;
}

v1::Envelope MembersEnvelope(uint64_t rid, ConversationId id, const std::vector<std::string>& users,
                             bool add) {
  v1::Envelope e;
  e.set_rid(rid);
  if (add) {
    e.mutable_add_members()->set_conversation_id(id);
    for (const std::string& u : users) e.mutable_add_members()->add_users(u);
  } else {
    e.mutable_remove_members()->set_conversation_id(id);
    for (const std::string& u : users) e.mutable_remove_members()->add_users(u);
  }
  return e;
}

v1::Envelope HistoryEnvelope(uint64_t rid, ConversationId id, Seq before_seq, uint32_t limit) {
  v1::Envelope e;
  e.set_rid(rid);
  e.mutable_history()->set_conversation_id(id);
  e.mutable_history()->set_before_seq(before_seq);
  e.mutable_history()->set_limit(limit);
  return e;
}

v1::Envelope SyncEnvelopeFor(const std::vector<Cursor>& cursors) {
  v1::Envelope e;
  e.set_rid(50);
  for (const Cursor& cursor : cursors) {
    v1::Cursor* out = e.mutable_sync()->add_cursors();
    out->set_conversation_id(cursor.conversation_id);
    out->set_seq(cursor.seq);
  }
  e.mutable_sync();
  return e;
}

v1::Envelope ReceiptEnvelope(uint64_t rid, ConversationId id, Seq delivered, Seq read) {
  v1::Envelope e;
  e.set_rid(rid);
  e.mutable_receipt()->set_conversation_id(id);
  e.mutable_receipt()->set_delivered_seq(delivered);
  e.mutable_receipt()->set_read_seq(read);
  return e;
}

v1::Envelope TypingEnvelope(uint64_t rid, ConversationId id, bool active) {
  v1::Envelope e;
  e.set_rid(rid);
  e.mutable_typing()->set_conversation_id(id);
  e.mutable_typing()->set_active(active);
  return e;
}

v1::Envelope SimpleEnvelope(uint64_t rid, ConversationId id, bool subscribe) {
  v1::Envelope e;
  e.set_rid(rid);
  if (subscribe) {
    e.mutable_subscribe()->set_conversation_id(id);
  } else {
    e.mutable_unsubscribe()->set_conversation_id(id);
  }
  return e;
}

std::vector<v1::Message> Delivered(const std::vector<v1::Envelope>& envelopes) {
  std::vector<v1::Message> out;
  for (const v1::Envelope& e : envelopes) {
    if (e.has_deliver()) out.push_back(e.deliver().message());
  }
  return out;
}

// The envelope answering `rid`, copied out (callers often pass a temporary).
std::optional<v1::Envelope> Find(const std::vector<v1::Envelope>& envelopes, uint64_t rid) {
  for (const v1::Envelope& e : envelopes) {
    if (e.rid() == rid) return e;
  }
  return std::nullopt;
}

// Creates a group (or channel) from `session` and returns its id from the ConversationUpdate.
ConversationId MustCreate(HubHarness& h, SessionId session, const std::vector<std::string>& members,
                          v1::ConversationKind kind = v1::CONVERSATION_KIND_GROUP) {
  h.SendEnvelope(session, CreateGroupEnvelope(7001, kind, members));
  h.Pump();
  std::vector<v1::Envelope> got = h.Take(session);
  std::optional<v1::Envelope> reply = Find(got, 7001);
  REQUIRE(reply.has_value());
  REQUIRE_MESSAGE(reply->has_conversation_update(), reply->DebugString());
  CHECK(reply->conversation_update().conversation().role() == v1::ROLE_ADMIN);
  return reply->conversation_update().conversation().conversation_id();
}

// Counts what the store's writer returned, to prove that channel posts do no per-member work.
class CountingStore final : public MessageStoreWrapper {
 public:
  using MessageStoreWrapper::MessageStoreWrapper;
  Status Append(std::span<const AppendRequest> batch, std::vector<AppendResult>* results) override {
    Status s = MessageStoreWrapper::Append(batch, results);
    for (const AppendResult& r : *results) recipients += r.recipients.size();
    appends += batch.size();
    return s;
  }
  Result<std::vector<UserId>> Members(ConversationId conversation_id) override {
    ++member_reads;
    return MessageStoreWrapper::Members(conversation_id);
  }
  size_t recipients = 0;
  size_t appends = 0;
  size_t member_reads = 0;
};

TEST_CASE("groups: create replies with ConversationUpdate and delivers CREATED to members") {
  HubHarness h(RoomyOptions());
  SessionId alice = h.Connect("alice", "a1");
  SessionId bob = h.Connect("bob", "b1");
  SessionId eve = h.Connect("eve", "e1");
  h.SendEnvelope(alice, CreateGroupEnvelope(5, v1::CONVERSATION_KIND_GROUP, {"bob", "carol"}));
  CHECK(h.Take(alice).empty());  // nothing before the commit
  h.Pump();
  std::vector<v1::Envelope> mine = h.Take(alice);
  std::optional<v1::Envelope> reply = Find(mine, 5);
  REQUIRE(reply.has_value());
  const v1::ConversationState& state = reply->conversation_update().conversation();
  CHECK(state.kind() == v1::CONVERSATION_KIND_GROUP);
  CHECK(state.title() == "team");
  CHECK(state.member_count() == 3);
  CHECK(state.last_seq() == 1);
  std::vector<v1::Message> to_bob = Delivered(h.Take(bob));
  REQUIRE(to_bob.size() == 1);
  CHECK(to_bob[0].kind() == v1::MESSAGE_KIND_SYSTEM);
  CHECK(to_bob[0].system().type() == v1::SystemEvent::TYPE_CREATED);
  CHECK(to_bob[0].system().actor() == "alice");
  CHECK(to_bob[0].seq() == 1);
  CHECK(Delivered(mine).size() == 1);  // the creator's log gets it too
  CHECK(h.Take(eve).empty());

  // Over the cap, and a bad kind, are refused with their codes and nothing is created.
  ServerOptions small = RoomyOptions();
  small.max_group_members = 2;
  HubHarness h2(small);
  SessionId a = h2.Connect("alice", "a1");
  h2.SendEnvelope(a, CreateGroupEnvelope(6, v1::CONVERSATION_KIND_GROUP, {"bob", "carol"}));
  h2.Pump();
  std::vector<v1::Envelope> refused = h2.Take(a);
  REQUIRE(refused.size() == 1);
  CHECK(refused[0].error().code() == v1::Error::RESOURCE_EXHAUSTED);
  CHECK(refused[0].error().message() == "a conversation of this kind has at most 2 members");
  h2.SendEnvelope(a, CreateGroupEnvelope(7, v1::CONVERSATION_KIND_DIRECT, {"bob"}));
  std::vector<v1::Envelope> bad = h2.Take(a);
  REQUIRE(bad.size() == 1);
  CHECK(bad[0].error().code() == v1::Error::INVALID_ARGUMENT);
  CHECK(h2.queued_appends() == 0);
}

TEST_CASE(
    "groups: 500 members online get every message exactly once per device, and joins and "
    "removals take effect at their seq") {
  HubHarness h(RoomyOptions());
  std::vector<std::string> others;
  for (int i = 0; i < 498; ++i) others.push_back("m" + std::to_string(i));
  SessionId alice = h.Connect("alice", "a1");
  SessionId alice2 = h.Connect("alice", "a2");
  std::map<std::string, SessionId> sessions;
  for (const std::string& user : others) sessions[user] = h.Connect(user, user + "-d");
  SessionId late = h.Connect("late", "l1");

  const ConversationId id = MustCreate(h, alice, others);
  // Adding "late" fills the group to exactly 500.
  h.SendEnvelope(alice, MembersEnvelope(8, id, {"late"}, true));
  h.Pump();
  REQUIRE(Find(h.Take(alice), 8).value().has_conversation_update());
  h.SendEnvelope(alice, MembersEnvelope(9, id, {"one-too-many"}, true));
  h.Pump();
  CHECK(Find(h.Take(alice), 9).value().error().code() == v1::Error::RESOURCE_EXHAUSTED);

  for (uint64_t n = 1; n <= 3; ++n) {
    h.SendEnvelope(alice, SendToConversation(100 + n, id, ClientMsgId(n), "hello"));
  }
  h.Pump();
  std::vector<v1::Envelope> sender = h.Take(alice);
  CHECK(Delivered(sender).empty());  // the sending connection gets acks
  int acks = 0;
  for (const v1::Envelope& e : sender) acks += e.has_send_ack() ? 1 : 0;
  CHECK(acks == 3);
  auto expect_seqs = [](const std::vector<v1::Message>& got, std::vector<Seq> want) {
    std::vector<Seq> seqs;
    for (const v1::Message& m : got) seqs.push_back(m.seq());
    CHECK(seqs == want);
  };
  expect_seqs(Delivered(h.Take(alice2)), {1, 2, 3, 4, 5});
  for (const auto& [user, session] : sessions) {
    CAPTURE(user);
    expect_seqs(Delivered(h.Take(session)), {1, 2, 3, 4, 5});
  }
  // The late member got its own MEMBERS_ADDED and what followed, not the CREATED before it.
  expect_seqs(Delivered(h.Take(late)), {2, 3, 4, 5});
  h.SendEnvelope(late, HistoryEnvelope(11, id, 0, 50));
  h.Pump();
  const v1::Envelope page = h.Take(late).at(0);
  REQUIRE(page.has_history_page());
  CHECK(page.history_page().messages_size() == 4);

  // A removed member gets its removal, then nothing.
  h.SendEnvelope(alice, MembersEnvelope(12, id, {"m7"}, false));
  h.Pump();
  h.Take(alice);
  std::vector<v1::Message> removal = Delivered(h.Take(sessions["m7"]));
  REQUIRE(removal.size() == 1);
  CHECK(removal[0].system().type() == v1::SystemEvent::TYPE_MEMBERS_REMOVED);
  h.SendEnvelope(alice, SendToConversation(13, id, ClientMsgId(99), "after"));
  h.Pump();
  CHECK(h.Take(sessions["m7"]).empty());
  expect_seqs(Delivered(h.Take(sessions["m8"])), {6, 7});
  h.SendEnvelope(sessions["m7"], SendToConversation(14, id, ClientMsgId(100), "let me in"));
  h.Pump();
  std::vector<v1::Envelope> denied = h.Take(sessions["m7"]);
  REQUIRE(denied.size() == 1);
  CHECK(denied[0].error().code() == v1::Error::PERMISSION_DENIED);
  CHECK(h.violations().empty());
}

TEST_CASE("channels: a post to 100,000 members does no per-member work for offline members") {
  ServerOptions options = RoomyOptions();
  auto counting = std::make_shared<CountingStore>(NewMemoryStore());
  options.store = counting;
  HubHarness h(options);
  // The channel is set up directly in the store: the test is about posting to it.
  AppendRequest create;
  create.op = ConversationOp::kCreateGroup;
  create.group_kind = ConversationKind::kChannel;
  create.sender = "owner";
  create.message_id = 1;
  for (int i = 0; i < 99'999; ++i) create.users.push_back("u" + std::to_string(i));
  std::vector<AppendResult> results;
  REQUIRE(counting->Append(std::span(&create, 1), &results).ok());
  REQUIRE(results.at(0).status.ok());
  const ConversationId id = results[0].message.conversation_id;
  CHECK(results[0].conversation.member_count == 100'000);
  counting->recipients = 0;
  counting->appends = 0;

  SessionId owner = h.Connect("owner", "o1");
  SessionId watching = h.Connect("u1", "u1-d");
  SessionId idle = h.Connect("u2", "u2-d");  // online, channel not open
  SessionId stranger = h.Connect("zed", "z1");
  h.SendEnvelope(watching, SimpleEnvelope(1, id, true));
  h.SendEnvelope(stranger, SimpleEnvelope(2, id, true));
  h.Pump();
  CHECK(h.Take(watching).at(0).has_ok());
  CHECK(h.Take(stranger).at(0).error().code() == v1::Error::PERMISSION_DENIED);

  for (uint64_t n = 1; n <= 10; ++n) {
    h.SendEnvelope(owner, SendToConversation(10 + n, id, ClientMsgId(n), "news"));
  }
  h.Pump();
  CHECK(counting->appends == 10);
  CHECK(counting->recipients == 0);  // no member list on the send path
  CHECK(counting->member_reads == 0);
  CHECK(Delivered(h.Take(watching)).size() == 10);
  CHECK(h.Take(idle).empty());
  CHECK(h.Take(stranger).empty());
  CHECK(h.Take(owner).size() == 10);  // acks only

  // After Unsubscribe nothing more arrives live; the unread count tells the rest.
  h.SendEnvelope(watching, SimpleEnvelope(3, id, false));
  h.Pump();
  CHECK(h.Take(watching).at(0).has_ok());
  h.SendEnvelope(owner, SendToConversation(30, id, ClientMsgId(30), "more"));
  h.Pump();
  CHECK(h.Take(watching).empty());
  h.SendEnvelope(idle, SyncEnvelopeFor({{id, 1}}));
  h.Pump();
  std::vector<v1::Envelope> sync = h.Take(idle);
  REQUIRE(sync.at(0).has_sync_batch());
  CHECK(sync[0].sync_batch().unread_total() == 11);
  CHECK(sync[0].sync_batch().messages_size() == 11);

  // Typing is not shown in channels.
  h.SendEnvelope(watching, TypingEnvelope(40, id, true));
  h.Pump();
  CHECK(h.Take(watching).at(0).error().code() == v1::Error::FAILED_PRECONDITION);
}

TEST_CASE(
    "receipts: read on one device is read on all, and unread counts are exact and survive "
    "reconnect") {
  HubHarness h(RoomyOptions());
  SessionId alice = h.Connect("alice", "a1");
  SessionId phone = h.Connect("bob", "phone");
  SessionId tablet = h.Connect("bob", "tablet");
  for (uint64_t n = 1; n <= 3; ++n) {
    h.SendEnvelope(alice, SendToPeer(n, "bob", ClientMsgId(n), "hi"));
  }
  h.Pump();
  const ConversationId id = h.Take(alice).at(0).send_ack().conversation_id();
  h.Take(phone);
  h.Take(tablet);

  h.SendEnvelope(phone, ReceiptEnvelope(20, id, 3, 2));
  h.Pump();
  std::vector<v1::Envelope> own = h.Take(phone);
  REQUIRE(own.size() == 1);
  REQUIRE(own[0].has_receipt_update());
  CHECK(own[0].rid() == 20);
  CHECK(own[0].receipt_update().read_seq() == 2);
  CHECK(own[0].receipt_update().unread() == 1);
  CHECK(own[0].receipt_update().unread_total() == 1);
  std::vector<v1::Envelope> other_device = h.Take(tablet);
  REQUIRE(other_device.size() == 1);
  CHECK(other_device[0].receipt_update().unread() == 1);
  CHECK(other_device[0].receipt_update().unread_total() == 1);
  CHECK(other_device[0].receipt_update().read_seq() == 2);
  std::vector<v1::Envelope> to_sender = h.Take(alice);
  REQUIRE(to_sender.size() == 1);
  const v1::ReceiptUpdate& seen = to_sender[0].receipt_update();
  CHECK(seen.user_id() == "bob");
  CHECK(seen.read_seq() == 2);
  CHECK(seen.delivered_seq() == 3);
  CHECK(seen.unread() == 0);        // not alice's business
  CHECK(seen.read_all_seq() == 0);  // alice herself has read nothing

  // A receipt that moves nothing of the user's watermarks tells nobody else (the tablet's own
  // delivered watermark catches up with what the user has read).
  h.SendEnvelope(tablet, ReceiptEnvelope(21, id, 1, 1));
  h.Pump();
  CHECK(h.Take(tablet).at(0).receipt_update().read_seq() == 2);
  CHECK(h.Take(phone).empty());
  CHECK(h.Take(alice).empty());

  // The tablet reconnects and syncs: the same counts.
  h.Disconnect(tablet);
  SessionId again = h.Connect("bob", "tablet");
  h.SendEnvelope(again, SyncEnvelopeFor({}));
  h.Pump();
  std::vector<v1::Envelope> sync = h.Take(again);
  REQUIRE(sync.at(0).has_sync_batch());
  CHECK(sync[0].sync_batch().unread_total() == 1);
  REQUIRE(sync[0].sync_batch().conversations_size() == 1);
  CHECK(sync[0].sync_batch().conversations(0).unread() == 1);
  CHECK(sync[0].sync_batch().conversations(0).read_seq() == 2);
  CHECK(sync[0].sync_batch().conversations(0).delivered_seq() == 2);

  // GetReceipts lists both members' watermarks.
  v1::Envelope get;
  get.set_rid(30);
  get.mutable_get_receipts()->set_conversation_id(id);
  h.SendEnvelope(alice, get);
  h.Pump();
  std::vector<v1::Envelope> page = h.Take(alice);
  REQUIRE(page.at(0).has_receipts_page());
  REQUIRE(page[0].receipts_page().members_size() == 2);
  CHECK(page[0].receipts_page().members(1).user_id() == "bob");
  CHECK(page[0].receipts_page().members(1).read_seq() == 2);
}

TEST_CASE("typing: forwarded to the other members, rate-limited per device, never stored") {
  HubHarness h(RoomyOptions());
  SessionId alice = h.Connect("alice", "a1");
  SessionId alice2 = h.Connect("alice", "a2");
  SessionId bob = h.Connect("bob", "b1");
  SessionId eve = h.Connect("eve", "e1");
  const ConversationId id = MustCreate(h, alice, {"bob"});
  h.Take(alice2);
  h.Take(bob);

  h.SendEnvelope(alice, TypingEnvelope(1, id, true));
  h.Pump();
  CHECK(h.Take(alice).at(0).has_ok());
  std::vector<v1::Envelope> got = h.Take(bob);
  REQUIRE(got.size() == 1);
  CHECK(got[0].typing_update().user_id() == "alice");
  CHECK(got[0].typing_update().active());
  CHECK(got[0].typing_update().expires_ms() == 6000);
  CHECK(h.Take(alice2).empty());  // not to the typist's own devices
  CHECK(h.Take(eve).empty());

  // A repeat within the interval is dropped; a change of state passes; after the interval a
  // refresh passes again.
  h.Advance(500);
  h.SendEnvelope(alice, TypingEnvelope(2, id, true));
  h.Pump();
  CHECK(h.Take(alice).at(0).has_ok());
  CHECK(h.Take(bob).empty());
  h.SendEnvelope(alice, TypingEnvelope(3, id, false));
  h.Pump();
  CHECK_FALSE(h.Take(bob).at(0).typing_update().active());
  h.Advance(1000);
  h.SendEnvelope(alice, TypingEnvelope(4, id, false));
  h.Pump();
  CHECK(h.Take(bob).size() == 1);
  h.Take(alice);

  // Nothing was stored: the log still holds only CREATED.
  h.SendEnvelope(bob, HistoryEnvelope(5, id, 0, 50));
  h.Pump();
  std::vector<v1::Envelope> history = h.Take(bob);
  REQUIRE(history.at(0).has_history_page());
  CHECK(history[0].history_page().messages_size() == 1);
}

TEST_CASE("groups: the last admin leaving promotes the longest-standing member") {
  HubHarness h(RoomyOptions());
  SessionId alice = h.Connect("alice", "a1");
  SessionId alice_phone = h.Connect("alice", "a2");
  SessionId bob = h.Connect("bob", "b1");
  const ConversationId id = MustCreate(h, alice, {"bob"});
  h.Take(bob);
  h.Take(alice_phone);
  v1::Envelope leave;
  leave.set_rid(3);
  leave.mutable_leave()->set_conversation_id(id);
  h.SendEnvelope(alice, leave);
  h.Pump();
  std::optional<v1::Envelope> reply = Find(h.Take(alice), 3);
  REQUIRE(reply.has_value());
  CHECK(reply->conversation_update().conversation().removed_at_seq() == 2);
  std::vector<v1::Message> to_bob = Delivered(h.Take(bob));
  REQUIRE(to_bob.size() == 2);
  CHECK(to_bob[0].system().type() == v1::SystemEvent::TYPE_MEMBER_LEFT);
  CHECK(to_bob[1].system().type() == v1::SystemEvent::TYPE_ROLE_CHANGED);
  CHECK(to_bob[1].system().users(0) == "bob");
  CHECK(to_bob[1].system().role() == v1::ROLE_ADMIN);
  // alice's other device learns that she left, and nothing after it (the promotion is seq 3,
  // past her removal at seq 2).
  std::vector<v1::Message> to_alice = Delivered(h.Take(alice_phone));
  REQUIRE(to_alice.size() == 1);
  CHECK(to_alice[0].system().type() == v1::SystemEvent::TYPE_MEMBER_LEFT);
  CHECK(to_alice[0].seq() == 2);
  // bob may now rename; alice may not.
  v1::Envelope rename;
  rename.set_rid(4);
  rename.mutable_rename_group()->set_conversation_id(id);
  rename.mutable_rename_group()->set_title("bob's");
  h.SendEnvelope(alice, rename);
  h.SendEnvelope(bob, rename);
  h.Pump();
  CHECK(h.Take(alice).at(0).error().code() == v1::Error::PERMISSION_DENIED);
  CHECK(Find(h.Take(bob), 4).value().conversation_update().conversation().title() == "bob's");
}

// A typing notice whose member read a removal overtook is not sent to the removed member: the
// members are read again.
TEST_CASE("groups: a member removed while a typing notice reads the members gets no notice") {
  HubHarness h(RoomyOptions());
  SessionId alice = h.Connect("alice", "a1");
  SessionId bob = h.Connect("bob", "b1");
  SessionId carol = h.Connect("carol", "c1");
  const ConversationId id = MustCreate(h, alice, {"bob", "carol"});
  h.Take(bob);
  h.Take(carol);
  h.SendEnvelope(bob, TypingEnvelope(1, id, true));
  h.SendEnvelope(alice, MembersEnvelope(2, id, {"carol"}, /*add=*/false));
  // bob's read sees carol; the removal commits and is fanned out before the read's answer.
  h.ReadThenCommit();
  h.Pump();
  std::vector<v1::Envelope> to_carol = h.Take(carol);
  CHECK(Delivered(to_carol).size() == 1);  // her removal
  for (const v1::Envelope& e : to_carol) CHECK_FALSE(e.has_typing_update());
  std::vector<v1::Envelope> to_alice = h.Take(alice);
  CHECK(std::count_if(to_alice.begin(), to_alice.end(),
                      [](const v1::Envelope& e) { return e.has_typing_update(); }) == 1);
  CHECK(Find(h.Take(bob), 1).value().has_ok());
}

// Subscribe and Unsubscribe are checked against the store by reads that may finish in any
// order: an Unsubscribe whose read is answered first still wins over the Subscribe before it.
TEST_CASE("channels: an Unsubscribe whose check finishes first still ends the subscription") {
  HubHarness h(RoomyOptions());
  SessionId owner = h.Connect("owner", "o1");
  SessionId viewer = h.Connect("viewer", "v1");
  const ConversationId id = MustCreate(h, owner, {"viewer"}, v1::CONVERSATION_KIND_CHANNEL);
  h.Take(viewer);
  h.SendEnvelope(viewer, SimpleEnvelope(1, id, true));
  h.SendEnvelope(viewer, SimpleEnvelope(2, id, false));
  h.PumpReadsInReverse();
  std::vector<v1::Envelope> answers = h.Take(viewer);
  CHECK(Find(answers, 1).value().has_ok());
  CHECK(Find(answers, 2).value().has_ok());
  h.SendEnvelope(owner, SendToConversation(3, id, ClientMsgId(3), "news"));
  h.Pump();
  CHECK(Delivered(h.Take(viewer)).empty());
  // Subscribing again works.
  h.SendEnvelope(viewer, SimpleEnvelope(4, id, true));
  h.Pump();
  CHECK(Find(h.Take(viewer), 4).value().has_ok());
  h.SendEnvelope(owner, SendToConversation(5, id, ClientMsgId(5), "more"));
  h.Pump();
  CHECK(Delivered(h.Take(viewer)).size() == 1);
}

// In a group over receipt_updates_max_members a member's receipt is told to the others only
// when it moves the lowest watermarks over all members: a message read by everyone costs about
// one update per member, not one per pair of members. The sender's own devices hear every move.
TEST_CASE("receipts: a large group is told a receipt only when the lowest watermarks move") {
  ServerOptions options = RoomyOptions();
  options.receipt_updates_max_members = 2;
  HubHarness h(options);
  SessionId alice = h.Connect("alice", "a1");
  SessionId bob = h.Connect("bob", "b1");
  SessionId bob_tablet = h.Connect("bob", "b2");
  SessionId carol = h.Connect("carol", "c1");
  const ConversationId id = MustCreate(h, alice, {"bob", "carol"});
  h.SendEnvelope(alice, SendToConversation(1, id, ClientMsgId(1), "hi"));
  h.Pump();
  for (SessionId s : {alice, bob, bob_tablet, carol}) h.Take(s);
  auto updates = [&](SessionId s) {
    std::vector<v1::Envelope> got = h.Take(s);
    std::vector<v1::ReceiptUpdate> out;
    for (const v1::Envelope& e : got) {
      if (e.has_receipt_update()) out.push_back(e.receipt_update());
    }
    return out;
  };

  // The first receipt leaves the lowest marks at 0 (bob and carol have nothing yet), where
  // every member starts: nobody else is told.
  h.SendEnvelope(alice, ReceiptEnvelope(10, id, 2, 2));
  h.Pump();
  CHECK(updates(alice).size() == 1);  // the reply
  for (SessionId s : {bob, bob_tablet, carol}) CHECK(updates(s).empty());

  // bob's receipt moves only bob's marks: carol's are the lowest.
  h.SendEnvelope(bob, ReceiptEnvelope(11, id, 2, 2));
  h.Pump();
  CHECK(updates(bob).size() == 1);  // the reply
  std::vector<v1::ReceiptUpdate> tablet = updates(bob_tablet);
  REQUIRE(tablet.size() == 1);  // the user's other device hears every move
  CHECK(tablet[0].read_seq() == 2);
  CHECK(updates(alice).empty());
  CHECK(updates(carol).empty());

  // carol is the last: everybody has read everything, and everybody is told.
  h.SendEnvelope(carol, ReceiptEnvelope(12, id, 2, 2));
  h.Pump();
  std::vector<v1::ReceiptUpdate> reply = updates(carol);
  REQUIRE(reply.size() == 1);
  CHECK(reply[0].read_all_seq() == 2);
  for (SessionId s : {alice, bob, bob_tablet}) {
    std::vector<v1::ReceiptUpdate> got = updates(s);
    REQUIRE(got.size() == 1);
    CHECK(got[0].user_id() == "carol");
    CHECK(got[0].delivered_all_seq() == 2);
    CHECK(got[0].read_all_seq() == 2);
  }

  // A removal can raise the lowest marks: the next receipt tells the members, even one that
  // moves nothing of its sender's (whose other devices then hear nothing).
  h.SendEnvelope(alice, SendToConversation(2, id, ClientMsgId(2), "more"));  // seq 3
  h.Pump();
  h.SendEnvelope(alice, ReceiptEnvelope(13, id, 3, 3));
  h.SendEnvelope(bob, ReceiptEnvelope(14, id, 3, 3));
  h.SendEnvelope(alice, MembersEnvelope(15, id, {"carol"}, /*add=*/false));  // seq 4
  h.Pump();
  for (SessionId s : {alice, bob, bob_tablet, carol}) h.Take(s);
  h.SendEnvelope(bob, ReceiptEnvelope(16, id, 3, 3));
  h.Pump();
  CHECK(updates(bob).size() == 1);  // the reply
  CHECK(updates(bob_tablet).empty());
  std::vector<v1::ReceiptUpdate> news = updates(alice);
  REQUIRE(news.size() == 1);
  CHECK(news[0].read_all_seq() == 3);
  CHECK(updates(carol).empty());
}

// The Hub remembers the last kRecentRemovals removals (1,024 commits). A read that many
// removals overtook cannot tell whether one of them concerns it, so it is read again: the
// bound forgets, it does not let a removed member be told. Fewer unrelated removals do not
// send it back.
TEST_CASE("groups: a read older than every remembered removal is read again") {
  ServerOptions options = RoomyOptions();
  options.max_group_members = 2000;
  HubHarness h(options);
  SessionId alice = h.Connect("alice", "a1");
  SessionId bob = h.Connect("bob", "b1");
  const ConversationId id = MustCreate(h, alice, {"bob"});
  std::vector<std::string> crowd;
  for (int i = 0; i < 1100; ++i) crowd.push_back("member" + std::to_string(i));
  const ConversationId other = MustCreate(h, alice, crowd);
  h.Take(alice);
  h.Take(bob);
  uint64_t rid = 100;
  auto typing_then_removals = [&](int removals) {
    h.SendEnvelope(bob, TypingEnvelope(++rid, id, true));
    for (int i = 0; i < removals; ++i) {
      h.SendEnvelope(alice, MembersEnvelope(++rid, other, {crowd.back()}, /*add=*/false));
      crowd.pop_back();
    }
    // The typing read sees the members before the removals commit and is answered after.
    h.ReadThenCommit();
  };

  typing_then_removals(3);
  CHECK(h.queued_reads() == 0);  // answered: the removals were elsewhere
  h.Pump();
  std::vector<v1::Envelope> to_alice = h.Take(alice);
  CHECK(std::count_if(to_alice.begin(), to_alice.end(),
                      [](const v1::Envelope& e) { return e.has_typing_update(); }) == 1);

  h.Advance(2000);  // past the typing interval
  typing_then_removals(1025);
  CHECK(h.queued_reads() == 1);  // read again
  h.Pump();
  to_alice = h.Take(alice);
  CHECK(std::count_if(to_alice.begin(), to_alice.end(),
                      [](const v1::Envelope& e) { return e.has_typing_update(); }) == 1);
  CHECK(Find(h.Take(bob), rid - 1025).value().has_ok());
}

// Typing on, then off, whose member reads finish in reverse order: the members are left with
// "off", not with "on" until it expires.
TEST_CASE("typing: on then off, read in reverse order, leaves the members with off") {
  HubHarness h(RoomyOptions());
  SessionId alice = h.Connect("alice", "a1");
  SessionId bob = h.Connect("bob", "b1");
  const ConversationId id = MustCreate(h, alice, {"bob"});
  h.Take(alice);
  h.Take(bob);
  h.SendEnvelope(alice, TypingEnvelope(1, id, true));
  h.SendEnvelope(alice, TypingEnvelope(2, id, false));
  h.PumpReadsInReverse();
  std::vector<v1::Envelope> answers = h.Take(alice);
  CHECK(Find(answers, 1).value().has_ok());
  CHECK(Find(answers, 2).value().has_ok());
  std::vector<v1::Envelope> got = h.Take(bob);
  REQUIRE_FALSE(got.empty());
  REQUIRE(got.back().has_typing_update());
  CHECK_FALSE(got.back().typing_update().active());
  for (const v1::Envelope& e : got) CHECK_FALSE(e.typing_update().active());
}

// A refused Typing is refused again when repeated within the typing interval (repeats of a
// forwarded state are dropped with Ok; refused ones must not be).
TEST_CASE("groups: Typing by a non-member or in a channel is refused every time") {
  HubHarness h(RoomyOptions());
  SessionId alice = h.Connect("alice", "a1");
  SessionId mallory = h.Connect("mallory", "m1");
  const ConversationId group = MustCreate(h, alice, {"bob"});
  const ConversationId channel = MustCreate(h, alice, {"bob"}, v1::CONVERSATION_KIND_CHANNEL);
  for (uint64_t rid : {1, 2}) {
    h.SendEnvelope(mallory, TypingEnvelope(rid, group, true));
    h.Pump();
    CHECK(Find(h.Take(mallory), rid).value().error().code() == v1::Error::PERMISSION_DENIED);
  }
  for (uint64_t rid : {3, 4}) {
    h.SendEnvelope(alice, TypingEnvelope(rid, channel, true));
    h.Pump();
    CHECK(Find(h.Take(alice), rid).value().error().code() == v1::Error::FAILED_PRECONDITION);
  }
}

// In a channel the leaver's other device had the channel open (subscribed): the promotion
// after the leave still does not reach it.
TEST_CASE("channels: the last admin leaving gets no message past its removal") {
  HubHarness h(RoomyOptions());
  SessionId alice = h.Connect("alice", "a1");
  SessionId alice_phone = h.Connect("alice", "a2");
  SessionId bob = h.Connect("bob", "b1");
  const ConversationId id = MustCreate(h, alice, {"bob"}, v1::CONVERSATION_KIND_CHANNEL);
  h.SendEnvelope(alice_phone, SimpleEnvelope(1, id, true));
  h.SendEnvelope(bob, SimpleEnvelope(2, id, true));
  h.Pump();
  REQUIRE(Find(h.Take(alice_phone), 1).value().has_ok());
  REQUIRE(Find(h.Take(bob), 2).value().has_ok());
  v1::Envelope leave;
  leave.set_rid(3);
  leave.mutable_leave()->set_conversation_id(id);
  h.SendEnvelope(alice, leave);
  h.Pump();
  std::vector<v1::Message> to_bob = Delivered(h.Take(bob));
  REQUIRE(to_bob.size() == 2);
  CHECK(to_bob[1].system().type() == v1::SystemEvent::TYPE_ROLE_CHANGED);
  std::vector<v1::Message> to_alice = Delivered(h.Take(alice_phone));
  REQUIRE(to_alice.size() == 1);
  CHECK(to_alice[0].system().type() == v1::SystemEvent::TYPE_MEMBER_LEFT);
}

}  // namespace
}  // namespace chat::testing
