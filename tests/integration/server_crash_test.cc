// Acked means durable: chatd is killed with SIGKILL three times while two clients send as fast
// as the server acks them. After every restart each acked message is stored with the seq it was
// acked with, the conversation's seqs are exactly 1..N, and resending what was in flight at the
// kill yields either the original (duplicate) or a new message, never a second copy.
#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <set>
#include <string>

#include "tests/integration/server_test_helpers.h"

namespace chat::testing {
namespace {

constexpr size_t kWindow = 16;      // Sends in flight per client.
constexpr int kAcksPerRound = 200;  // New acks between two kills.
constexpr int kRounds = 3;

struct Sender {
  std::string user;
  std::string peer;
  std::unique_ptr<WsClient> client;
  std::map<uint64_t, std::string> in_flight;  // rid -> client_msg_id
  int next = 0;
};

struct Ledger {
  std::map<std::string, v1::SendAck> acked;  // client_msg_id -> ack
  std::map<v1::Error::Code, int> errors;
  // Resends answered as duplicates on first sight: committed before a kill, ack never received.
  int committed_unacked = 0;
};

std::string MessageId(const std::string& user, int n) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%s-load-%08d", user.c_str(), n);
  return buf;
}

void Handle(Sender& s, const v1::Envelope& e, Ledger& ledger, int* gained) {
  auto it = s.in_flight.find(e.rid());
  if (e.rid() == 0 || it == s.in_flight.end()) return;  // Deliver of the peer's messages.
  const std::string id = it->second;
  s.in_flight.erase(it);
  if (e.has_send_ack()) {
    CHECK(e.send_ack().client_msg_id() == id);
    auto [pos, inserted] = ledger.acked.emplace(id, e.send_ack());
    if (inserted) {
      ++*gained;
      if (e.send_ack().duplicate()) ++ledger.committed_unacked;
    } else {
      // A resend of something already acked must be answered with the same message.
      CHECK(e.send_ack().duplicate());
      CHECK(pos->second.seq() == e.send_ack().seq());
      CHECK(pos->second.message_id() == e.send_ack().message_id());
    }
  } else if (e.has_error()) {
    // Throttling or overload: the message was not committed; it is simply not in the ledger.
    CHECK_MESSAGE((e.error().code() == v1::Error::RESOURCE_EXHAUSTED ||
                   e.error().code() == v1::Error::UNAVAILABLE),
                  e.DebugString());
    ++ledger.errors[e.error().code()];
  }
}

void SendOne(Sender& s, const std::string& id) {
  const uint64_t rid = s.client->NextRid();
  if (s.client->SendEnvelope(MakeSendToPeer(s.peer, id, id, rid)).ok()) s.in_flight[rid] = id;
}

// Keeps every sender's window full until `target` new acks arrived (or 60 s passed, which
// only bounds a broken run; nothing is asserted about speed).
int Pump(std::vector<Sender>& senders, Ledger& ledger, int target) {
  int gained = 0;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (gained < target && std::chrono::steady_clock::now() < give_up) {
    for (Sender& s : senders) {
      while (s.in_flight.size() < kWindow) SendOne(s, MessageId(s.user, ++s.next));
    }
    for (Sender& s : senders) {
      if (std::optional<v1::Envelope> e = s.client->Next(5)) Handle(s, *e, ledger, &gained);
      for (const v1::Envelope& e : s.client->Drain()) Handle(s, e, ledger, &gained);
    }
  }
  return gained;
}

TEST_CASE("server: kill -9 under load loses no acked message and leaves seqs gapless") {
  ChatdProcess chatd;
  MustStart(chatd);
  std::vector<Sender> senders(2);
  senders[0].user = "alice";
  senders[0].peer = "bob";
  senders[1].user = "bob";
  senders[1].peer = "alice";
  Ledger ledger;

  const auto started = std::chrono::steady_clock::now();
  for (int round = 0; round <= kRounds; ++round) {
    CAPTURE(round);
    // Resend what was in flight at the last kill: committed-but-unacked messages come back as
    // duplicates, the others are committed now.
    std::vector<std::vector<std::string>> unresolved(senders.size());
    for (size_t i = 0; i < senders.size(); ++i) {
      for (const auto& [rid, id] : senders[i].in_flight) unresolved[i].push_back(id);
      senders[i].in_flight.clear();
      senders[i].client = MustLogin(chatd, senders[i].user, senders[i].user + "-dev");
    }
    for (size_t i = 0; i < senders.size(); ++i) {
      for (const std::string& id : unresolved[i]) SendOne(senders[i], id);
    }
    if (round == kRounds) break;

    const int gained = Pump(senders, ledger, kAcksPerRound);
    REQUIRE_MESSAGE(gained >= kAcksPerRound, chatd.log());
    REQUIRE(chatd.Kill9().ok());
    for (Sender& s : senders) CHECK(s.client->WaitClosed().has_value());
    // Replies that made it out before the kill still count as acks.
    for (Sender& s : senders) {
      int ignored = 0;
      for (const v1::Envelope& e : s.client->Drain()) Handle(s, e, ledger, &ignored);
    }
    MustStart(chatd);
  }

  // Collect the replies to the final resends.
  for (Sender& s : senders) {
    int ignored = 0;
    for (int i = 0; i < 1000 && !s.in_flight.empty(); ++i) {
      if (std::optional<v1::Envelope> e = s.client->Next(5000)) Handle(s, *e, ledger, &ignored);
    }
    CHECK(s.in_flight.empty());
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  MESSAGE("acked " << ledger.acked.size() << " in " << seconds << " s, throttled "
                   << ledger.errors[v1::Error::RESOURCE_EXHAUSTED] << ", committed but unacked "
                   << ledger.committed_unacked);
  REQUIRE(ledger.acked.size() >= static_cast<size_t>(kRounds * kAcksPerRound));

  const uint64_t conversation = ledger.acked.begin()->second.conversation_id();
  const std::vector<v1::Message> stored = MustHistoryAll(*senders[1].client, conversation);
  // Gapless 1..N, each seq once.
  for (size_t i = 0; i < stored.size(); ++i) {
    if (stored[i].seq() != i + 1) {
      FAIL("seq " << stored[i].seq() << " at position " << i);
    }
  }
  // Every acked message is there with its acked seq and id; acks never share a seq.
  std::map<uint64_t, std::string> by_seq;
  for (const v1::Message& m : stored) by_seq[m.seq()] = m.client_msg_id();
  std::set<uint64_t> acked_seqs;
  int missing = 0;
  for (const auto& [id, ack] : ledger.acked) {
    CHECK(ack.conversation_id() == conversation);
    CHECK(acked_seqs.insert(ack.seq()).second);
    if (ack.seq() == 0 || ack.seq() > stored.size()) {
      ++missing;
      continue;
    }
    const v1::Message& m = stored[ack.seq() - 1];
    if (m.client_msg_id() != id || m.message_id() != ack.message_id() || m.body() != id) {
      ++missing;
    }
  }
  CHECK(missing == 0);
  // Every stored message was acked at some point (all in-flight ones were resent to the end).
  CHECK(stored.size() == ledger.acked.size());
}

}  // namespace
}  // namespace chat::testing
