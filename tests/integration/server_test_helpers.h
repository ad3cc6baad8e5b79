// Helpers shared by the server integration tests: start chatd, log in, send, and read a whole
// conversation back, each failing the current doctest case with the reason when it cannot.
#ifndef CHAT_TESTS_INTEGRATION_SERVER_TEST_HELPERS_H_
#define CHAT_TESTS_INTEGRATION_SERVER_TEST_HELPERS_H_

#include <doctest/doctest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "chat/v1/chat.pb.h"
#include "tests/testing/chatd_process.h"
#include "tests/testing/ws_client.h"

namespace chat::testing {

inline void MustStart(ChatdProcess& chatd) {
  Status started = chatd.Start();
  REQUIRE_MESSAGE(started.ok(), started.ToString());
}

inline std::unique_ptr<WsClient> MustLogin(const ChatdProcess& chatd, const std::string& user,
                                           const std::string& device, Wire wire = Wire::kBinary) {
  Result<std::unique_ptr<WsClient>> client = chatd.Login(user, device, wire);
  REQUIRE_MESSAGE(client.ok(), client.status().ToString());
  return std::move(*client);
}

inline std::unique_ptr<WsClient> MustConnect(const ChatdProcess& chatd) {
  auto client = std::make_unique<WsClient>();
  Status connected = client->Connect(chatd.url());
  REQUIRE_MESSAGE(connected.ok(), connected.ToString());
  return client;
}

// Sends `envelope` (a Send) and returns its SendAck; fails the test on anything else.
inline v1::SendAck MustAck(WsClient& client, v1::Envelope envelope, Wire wire = Wire::kBinary) {
  std::optional<v1::Envelope> reply = client.Request(std::move(envelope), wire);
  REQUIRE_MESSAGE(reply.has_value(), "no reply to Send");
  REQUIRE_MESSAGE(reply->has_send_ack(), reply->DebugString());
  return reply->send_ack();
}

// Sends `envelope` and returns the Error it must be answered with; checks the rid is echoed.
inline v1::Error MustFail(WsClient& client, v1::Envelope envelope, Wire wire = Wire::kBinary) {
  if (envelope.rid() == 0) envelope.set_rid(client.NextRid());
  const uint64_t rid = envelope.rid();
  std::optional<v1::Envelope> reply = client.Request(std::move(envelope), wire);
  REQUIRE_MESSAGE(reply.has_value(), "no reply");
  REQUIRE_MESSAGE(reply->has_error(), reply->DebugString());
  CHECK(reply->rid() == rid);
  return reply->error();
}

// Everything received before a Ping's Pong; fails the test if the Pong does not come.
inline std::vector<v1::Envelope> MustBarrier(WsClient& client) {
  std::optional<std::vector<v1::Envelope>> before = client.Barrier();
  REQUIRE_MESSAGE(before.has_value(), "no Pong");
  return std::move(*before);
}

inline int CountDelivers(const std::vector<v1::Envelope>& envelopes) {
  int n = 0;
  for (const v1::Envelope& e : envelopes) n += e.has_deliver() ? 1 : 0;
  return n;
}

inline bool IsDeliverOf(const v1::Envelope& e, uint64_t conversation_id, uint64_t seq) {
  return e.has_deliver() && e.deliver().message().conversation_id() == conversation_id &&
         e.deliver().message().seq() == seq;
}

// The result of syncing until has_more is false.
struct SyncAllResult {
  std::vector<v1::SyncBatch> batches;
  std::vector<v1::Message> messages;  // all batches' messages, in the order received
  std::vector<v1::Gap> gaps;
};

// Syncs from `cursors`, advancing the cursor of each conversation to the highest seq received,
// until a batch says has_more = false (at most 1000 rounds).
inline SyncAllResult MustSyncAll(WsClient& client,
                                 std::vector<std::pair<uint64_t, uint64_t>> cursors,
                                 uint32_t limit = 0) {
  SyncAllResult out;
  for (int round = 0; round < 1000; ++round) {
    std::optional<v1::Envelope> reply = client.Request(MakeSync(cursors, limit));
    REQUIRE_MESSAGE(reply.has_value(), "no reply to Sync");
    REQUIRE_MESSAGE(reply->has_sync_batch(), reply->DebugString());
    const v1::SyncBatch& batch = reply->sync_batch();
    out.batches.push_back(batch);
    for (const v1::Gap& gap : batch.gaps()) out.gaps.push_back(gap);
    for (const v1::Message& m : batch.messages()) {
      out.messages.push_back(m);
      bool found = false;
      for (auto& [conversation_id, seq] : cursors) {
        if (conversation_id == m.conversation_id()) {
          seq = std::max(seq, m.seq());
          found = true;
        }
      }
      if (!found) cursors.emplace_back(m.conversation_id(), m.seq());
    }
    if (!batch.has_more()) return out;
  }
  FAIL("Sync still has_more after 1000 rounds");
  return out;
}

// The whole conversation via History pages, ascending by seq.
inline std::vector<v1::Message> MustHistoryAll(WsClient& client, uint64_t conversation_id,
                                               uint32_t page = 200) {
  std::vector<v1::Message> newest_first;
  uint64_t before = 0;
  for (int round = 0; round < 100'000; ++round) {
    std::optional<v1::Envelope> reply = client.Request(MakeHistory(conversation_id, before, page));
    REQUIRE_MESSAGE(reply.has_value(), "no reply to History");
    REQUIRE_MESSAGE(reply->has_history_page(), reply->DebugString());
    const v1::HistoryPage& p = reply->history_page();
    for (const v1::Message& m : p.messages()) newest_first.push_back(m);
    if (!p.has_more() || p.messages_size() == 0) break;
    before = p.messages(p.messages_size() - 1).seq();
  }
  return {newest_first.rbegin(), newest_first.rend()};
}

}  // namespace chat::testing

#endif  // CHAT_TESTS_INTEGRATION_SERVER_TEST_HELPERS_H_
