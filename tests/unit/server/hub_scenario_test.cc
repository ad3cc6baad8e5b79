// Randomized scenarios over the Hub: users connect and disconnect devices (binary or JSON),
// send (and resend) direct messages, and commits succeed or fail, in a seeded random order. After
// every commit the test checks what each client saw against the delivery rules:
//   - every send is answered exactly once (ack or error) if its connection is still open;
//   - a committed message reaches every connected device of both members, except the
//     connection that sent it, exactly once and in seq order; a failed commit reaches nobody;
//   - a resend of a committed client_msg_id is acked with the original id and seq and is not
//     delivered again; seqs are gapless per conversation.
#include <doctest/doctest.h>

#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "src/server/hub.h"
#include "tests/testing/hub_harness.h"

namespace chat::testing {
namespace {

using server::SessionId;

struct Connection {
  std::string user;
  std::string device;
  codec::Format format = codec::Format::kBinary;
};

struct SentRequest {
  SessionId session = 0;
  std::string user;
  std::string peer;
  std::string client_msg_id;
};

struct Committed {
  ConversationId conversation_id = 0;
  Seq seq = 0;
  MessageId message_id = 0;
};

void RunScenario(uint32_t seed, int steps) {
  CAPTURE(seed);
  ServerOptions options;
  options.idle_timeout_ms = 1'000'000'000;
  options.hello_timeout_ms = 1'000'000'000;
  options.max_devices_per_user = 3;
  HubHarness h(options);
  std::mt19937 rng(seed);
  auto pick = [&rng](size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng); };

  const std::vector<std::string> users = {"ann", "ben", "cat", "dan"};
  std::map<SessionId, Connection> open;
  uint64_t next_device = 0;
  uint64_t next_rid = 0;
  uint64_t next_cmid = 0;
  std::map<uint64_t, SentRequest> in_flight;   // rid -> request, until answered
  std::map<std::string, Committed> committed;  // client_msg_id -> first commit
  std::set<std::string> unanswered;  // sent from a connection that closed before its answer
  std::map<std::pair<ConversationId, Seq>, std::string> seq_owner;  // -> client_msg_id
  std::map<std::string, std::vector<std::string>> sent_ids;         // user -> client_msg_ids used
  std::map<std::pair<SessionId, ConversationId>, Seq> delivered_seq;

  for (int step = 0; step < steps; ++step) {
    CAPTURE(step);
    const size_t op = pick(10);
    if (op < 2 || open.empty()) {
      const std::string& user = users[pick(users.size())];
      size_t devices = 0;
      for (const auto& [id, c] : open) devices += c.user == user ? 1 : 0;
      if (devices >= options.max_devices_per_user) continue;
      const std::string device = user + "-d" + std::to_string(next_device++);
      const codec::Format format = pick(2) == 0 ? codec::Format::kJson : codec::Format::kBinary;
      open[h.Connect(user, device, format)] = Connection{user, device, format};
    } else if (op < 3) {
      auto it = std::next(open.begin(), static_cast<std::ptrdiff_t>(pick(open.size())));
      h.Disconnect(it->first);
      open.erase(it);
    } else if (op < 7) {
      auto it = std::next(open.begin(), static_cast<std::ptrdiff_t>(pick(open.size())));
      const Connection& from = it->second;
      std::vector<std::string> others;
      for (const std::string& user : users) {
        if (user != from.user) others.push_back(user);
      }
      const std::string peer = others[pick(others.size())];
      std::vector<std::string>& used = sent_ids[from.user + ">" + peer];
      std::string cmid;
      if (!used.empty() && pick(4) == 0) {
        cmid = used[pick(used.size())];  // a resend
      } else {
        cmid = ClientMsgId(++next_cmid);
        used.push_back(cmid);
      }
      const uint64_t rid = ++next_rid;
      h.SendEnvelope(it->first, SendToPeer(rid, peer, cmid, "m" + cmid), from.format);
      in_flight[rid] = SentRequest{it->first, from.user, peer, cmid};
    } else {
      const bool fail = pick(5) == 0;
      h.FailCommits(fail ? Unavailable("injected") : Status::Ok());
      // Who is connected at commit time, and what each will have seen by the end of it.
      const std::map<SessionId, Connection> online = open;
      h.Pump();
      std::map<SessionId, std::vector<v1::Envelope>> got;
      for (const auto& [id, c] : online) {
        for (ReceivedFrame& frame : h.TakeFrames(id)) {
          CHECK(frame.format == c.format);
          for (v1::Envelope& e : frame.envelopes) got[id].push_back(std::move(e));
        }
      }

      const std::map<std::string, Committed> committed_before = committed;
      // Answers to sends, in submission (rid) order, as the writer committed them.
      std::map<uint64_t, std::pair<SessionId, v1::Envelope>> answers;
      for (auto& [id, envelopes] : got) {
        for (const v1::Envelope& e : envelopes) {
          if (e.rid() == 0) continue;
          CHECK(answers.emplace(e.rid(), std::make_pair(id, e)).second);
        }
      }
      for (const auto& [rid, answer] : answers) {
        const auto& [id, e] = answer;
        auto req = in_flight.find(rid);
        REQUIRE_MESSAGE(req != in_flight.end(), e.DebugString());
        CHECK(req->second.session == id);
        const std::string& cmid = req->second.client_msg_id;
        if (fail) {
          REQUIRE(e.has_error());
          CHECK(e.error().code() == v1::Error::UNAVAILABLE);
          CHECK(e.error().client_msg_id() == cmid);
        } else {
          REQUIRE_MESSAGE(e.has_send_ack(), e.DebugString());
          const v1::SendAck& ack = e.send_ack();
          CHECK(ack.client_msg_id() == cmid);
          auto first = committed.find(cmid);
          if (first != committed.end()) {
            CHECK(ack.duplicate());
            CHECK(ack.message_id() == first->second.message_id);
            CHECK(ack.seq() == first->second.seq);
            CHECK(ack.conversation_id() == first->second.conversation_id);
          } else {
            // Only a message whose first answer was lost can be a duplicate we never saw.
            if (ack.duplicate()) CHECK(unanswered.count(cmid) == 1);
            committed[cmid] = Committed{ack.conversation_id(), ack.seq(), ack.message_id()};
          }
        }
        in_flight.erase(req);
      }
      // Every open connection's sends were answered by this commit.
      for (const auto& [rid, req] : in_flight) {
        CHECK(open.count(req.session) == 0);
        if (!fail) unanswered.insert(req.client_msg_id);
      }
      in_flight.clear();

      // Deliveries: in order per conversation, never to the sending connection, never for a
      // failed commit, and a message seen anywhere must reach every connected member device.
      std::map<std::pair<ConversationId, Seq>, v1::Message> seen;
      std::map<std::pair<ConversationId, Seq>, std::set<SessionId>> receivers;
      for (auto& [id, envelopes] : got) {
        for (const v1::Envelope& e : envelopes) {
          if (e.rid() != 0) continue;
          REQUIRE_MESSAGE(e.has_deliver(), e.DebugString());
          CHECK_FALSE(fail);
          const v1::Message& m = e.deliver().message();
          CHECK(m.sender_device() != online.at(id).device);
          Seq& last = delivered_seq[{id, m.conversation_id()}];
          CHECK(m.seq() > last);
          last = m.seq();
          CHECK(receivers[{m.conversation_id(), m.seq()}].insert(id).second);
          seen[{m.conversation_id(), m.seq()}] = m;
        }
      }
      for (const auto& [cmid, c] : committed) {
        auto [owner, inserted] = seq_owner.emplace(std::make_pair(c.conversation_id, c.seq), cmid);
        if (!inserted) CHECK(owner->second == cmid);
      }
      for (const auto& [key, m] : seen) {
        // Committed by this very commit, and the only message with its seq.
        CHECK(committed_before.count(m.client_msg_id()) == 0);
        auto known = committed.find(m.client_msg_id());
        if (known != committed.end()) {
          CHECK(known->second.message_id == m.message_id());
          CHECK(known->second.seq == m.seq());
        } else {
          committed[m.client_msg_id()] = Committed{m.conversation_id(), m.seq(), m.message_id()};
        }
        std::set<std::string> members = {m.sender()};
        for (const auto& [pair, ids] : sent_ids) {
          for (const std::string& id : ids) {
            if (id == m.client_msg_id()) members.insert(pair.substr(pair.find('>') + 1));
          }
        }
        CHECK(members.size() == 2);
        for (const auto& [id, c] : online) {
          const bool expected = members.count(c.user) != 0 && c.device != m.sender_device();
          CHECK(receivers[key].count(id) == (expected ? 1u : 0u));
        }
      }
    }
  }
  CHECK(h.violations().empty());
}

TEST_CASE("hub scenarios: random connects, sends, resends and failed commits keep the rules") {
  for (uint32_t seed = 1; seed <= 8; ++seed) RunScenario(seed, 600);
}

}  // namespace
}  // namespace chat::testing
