#include "tests/testing/envelopes.h"

#include <random>

namespace chat::testing {

namespace {

// A text/plain Send without a recipient; the callers set one.
v1::Envelope MakeSend(const std::string& client_msg_id, const std::string& body, uint64_t rid) {
  v1::Envelope envelope;
  envelope.set_rid(rid);
  v1::Send* send = envelope.mutable_send();
  send->set_client_msg_id(client_msg_id);
  send->set_content_type("text/plain");
  send->set_body(body);
  return envelope;
}

}  // namespace

std::string NewClientMsgId() {
  static constexpr char kHex[] = "0123456789abcdef";
  std::random_device rd;
  std::string out;
  for (int i = 0; i < 32; ++i) out += kHex[rd() & 0xfu];
  return out;
}

v1::Envelope MakeSendToPeer(const std::string& peer, const std::string& client_msg_id,
                            const std::string& body, uint64_t rid) {
  v1::Envelope envelope = MakeSend(client_msg_id, body, rid);
  envelope.mutable_send()->set_peer(peer);
  return envelope;
}

v1::Envelope MakeSendToConversation(uint64_t conversation_id, const std::string& client_msg_id,
                                    const std::string& body, uint64_t rid) {
  v1::Envelope envelope = MakeSend(client_msg_id, body, rid);
  envelope.mutable_send()->set_conversation_id(conversation_id);
  return envelope;
}

v1::Envelope MakeSync(const std::vector<std::pair<uint64_t, uint64_t>>& cursors, uint32_t limit,
                      uint64_t rid) {
  v1::Envelope envelope;
  envelope.set_rid(rid);
  v1::Sync* sync = envelope.mutable_sync();
  for (const auto& [conversation_id, seq] : cursors) {
    v1::Cursor* cursor = sync->add_cursors();
    cursor->set_conversation_id(conversation_id);
    cursor->set_seq(seq);
  }
  sync->set_limit(limit);
  return envelope;
}

v1::Envelope MakeHistory(uint64_t conversation_id, uint64_t before_seq, uint32_t limit,
                         uint64_t rid) {
  v1::Envelope envelope;
  envelope.set_rid(rid);
  v1::History* history = envelope.mutable_history();
  history->set_conversation_id(conversation_id);
  history->set_before_seq(before_seq);
  history->set_limit(limit);
  return envelope;
}

v1::Envelope MakePing(int64_t client_time_ms, uint64_t rid) {
  v1::Envelope envelope;
  envelope.set_rid(rid);
  envelope.mutable_ping()->set_client_time_ms(client_time_ms);
  return envelope;
}

}  // namespace chat::testing
