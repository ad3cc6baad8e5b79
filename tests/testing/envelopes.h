// Builders for the requests tests send most, shared by the Hub unit tests and the WebSocket
// integration tests so both speak through one set of helpers. rid 0 lets WsClient::Request()
// pick one.
#ifndef CHAT_TESTS_TESTING_ENVELOPES_H_
#define CHAT_TESTS_TESTING_ENVELOPES_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "chat/v1/chat.pb.h"

namespace chat::testing {

// A random client_msg_id (32 hex characters, 128 bits).
std::string NewClientMsgId();

v1::Envelope MakeSendToPeer(const std::string& peer, const std::string& client_msg_id,
                            const std::string& body, uint64_t rid = 0);
v1::Envelope MakeSendToConversation(uint64_t conversation_id, const std::string& client_msg_id,
                                    const std::string& body, uint64_t rid = 0);
// `cursors` are (conversation_id, seq) pairs.
v1::Envelope MakeSync(const std::vector<std::pair<uint64_t, uint64_t>>& cursors, uint32_t limit = 0,
                      uint64_t rid = 0);
v1::Envelope MakeHistory(uint64_t conversation_id, uint64_t before_seq, uint32_t limit,
                         uint64_t rid = 0);
v1::Envelope MakePing(int64_t client_time_ms = 0, uint64_t rid = 0);

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_ENVELOPES_H_
