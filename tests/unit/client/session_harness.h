// A Session driven by a fake transport, a FakeClock and an in-memory (or given) cache, with a
// listener that records everything: shared by the session's unit tests.
#ifndef CHAT_TESTS_UNIT_CLIENT_SESSION_HARNESS_H_
#define CHAT_TESTS_UNIT_CLIENT_SESSION_HARNESS_H_

#include <doctest/doctest.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "src/client/cache.h"
#include "src/client/session.h"
#include "tests/testing/fake_clock.h"

namespace chat::client {

class FakeIo : public SessionIo {
 public:
  void Open() override { ++opens; }
  void Drop() override { ++drops; }
  bool Write(const v1::Envelope& envelope) override {
    if (full) return false;
    written.push_back(envelope);
    return true;
  }
  // Removes and returns the written envelopes.
  std::vector<v1::Envelope> Take() { return std::exchange(written, {}); }

  int opens = 0;
  int drops = 0;
  bool full = false;
  std::vector<v1::Envelope> written;
};

class Recorder : public ClientListener {
 public:
  void OnConnectionState(ConnectionState state) override { states.push_back(state); }
  void OnMessage(const MessageEvent& event) override {
    messages.push_back(event);
    if (on_message) on_message(event);
  }
  void OnConversationUpdated(const ConversationInfo& info) override {
    conversations.push_back(info);
    if (on_conversation) on_conversation(info);
  }
  void OnMessagesExpired(ConversationId conversation, Seq up_to_seq) override {
    expired.emplace_back(conversation, up_to_seq);
  }
  void OnError(const Status& status) override {
    errors.push_back(status);
    if (on_error) on_error(status);
  }
  void OnTyping(ConversationId conversation, const UserId& user, bool active) override {
    typing.push_back(std::to_string(conversation) + ":" + user + ":" + (active ? "on" : "off"));
  }
  void OnReceipt(const ReceiptEvent& event) override {
    receipts.push_back(event);
    if (on_receipt) on_receipt(event);
  }
  void OnMessageStatus(ConversationId conversation, Seq up_to_seq, MessageStatus status) override {
    statuses.push_back(std::to_string(conversation) + ":" + std::to_string(up_to_seq) + ":" +
                       (status == MessageStatus::kRead ? "read" : "delivered"));
  }
  void OnUnreadTotal(uint64_t total) override { unread_totals.push_back(total); }
  void OnPresence(const PresenceInfo& info) override { presence.push_back(info); }

  std::vector<Seq> SentSeqs(ConversationId conversation) const {
    std::vector<Seq> out;
    for (const MessageEvent& e : messages) {
      if (e.status == MessageStatus::kSent && e.message.conversation_id == conversation) {
        out.push_back(e.message.seq);
      }
    }
    return out;
  }

  std::vector<ConnectionState> states;
  std::vector<MessageEvent> messages;
  std::vector<ConversationInfo> conversations;
  std::function<void(const ConversationInfo&)> on_conversation;  // called after recording
  std::vector<std::pair<ConversationId, Seq>> expired;           // OnMessagesExpired
  std::vector<Status> errors;
  std::function<void(const Status&)> on_error;          // called after recording
  std::function<void(const MessageEvent&)> on_message;  // called after recording
  std::vector<std::string> typing;
  std::vector<ReceiptEvent> receipts;
  std::function<void(const ReceiptEvent&)> on_receipt;  // called after recording
  std::vector<std::string> statuses;
  std::vector<uint64_t> unread_totals;
  std::vector<PresenceInfo> presence;
};

inline constexpr uint64_t kRandom = 999'999'999'999;

inline v1::Message Msg(ConversationId conversation, Seq seq, const std::string& sender = "bob") {
  v1::Message m;
  m.set_conversation_id(conversation);
  m.set_seq(seq);
  m.set_message_id(1000 + seq);
  m.set_sender(sender);
  m.set_sender_device("phone");
  m.set_client_msg_id("cmid-" + sender + "-" + std::to_string(conversation) + "-" +
                      std::to_string(seq) + "-padding");
  m.set_server_time_ms(1'735'689'600'000 + static_cast<int64_t>(seq));
  m.set_kind(v1::MESSAGE_KIND_USER);
  m.set_content_type("text/plain");
  m.set_body("m" + std::to_string(seq));
  return m;
}

struct Harness {
  explicit Harness(SessionOptions o = {}, std::shared_ptr<Cache> shared_cache = nullptr) {
    if (o.device_id.empty()) o.device_id = "laptop";
    if (!o.token_provider) {
      o.token_provider = [this] {
        ++token_calls;
        return token;
      };
    }
    cache = shared_cache ? shared_cache : std::shared_ptr<Cache>(Cache::Open("").value());
    session =
        std::make_unique<Session>(o, cache.get(), &io, &listener, clock, [this] { return random; });
  }

  int64_t Now() const { return clock->MonotonicMs(); }

  // Start (or reconnect) up to the Hello, and return the Hello envelope.
  v1::Envelope OpenToHello() {
    if (state() == ConnectionState::kDisconnected && io.opens == 0) session->Start();
    clock->SetMonotonicMs(session->reconnect_at_ms());
    session->Tick();
    REQUIRE(state() == ConnectionState::kConnecting);
    session->OnOpen();
    auto written = io.Take();
    REQUIRE(written.size() == 1);
    REQUIRE(written[0].has_hello());
    return written[0];
  }

  // Welcome and answer the first Sync with `batch`; returns the Sync request.
  v1::Envelope Welcome(uint64_t epoch = 7, uint32_t heartbeat_ms = 30'000,
                       uint32_t messages_per_second = 0, const std::string& user = "alice") {
    v1::Envelope hello = OpenToHello();
    v1::Envelope welcome;
    welcome.set_rid(hello.rid());
    welcome.mutable_welcome()->set_user_id(user);
    welcome.mutable_welcome()->set_device_id("laptop");
    welcome.mutable_welcome()->set_epoch(epoch);
    welcome.mutable_welcome()->mutable_limits()->set_heartbeat_interval_ms(heartbeat_ms);
    welcome.mutable_welcome()->mutable_limits()->set_messages_per_second(messages_per_second);
    welcome.mutable_welcome()->mutable_limits()->set_max_presence_subscriptions(presence_limit);
    welcome.mutable_welcome()->mutable_limits()->set_max_body_bytes(max_body_bytes);
    session->OnEnvelope(welcome);
    auto written = io.Take();
    REQUIRE(written.size() == 1);
    REQUIRE(written[0].has_sync());
    return written[0];
  }

  void Reply(const v1::Envelope& request, v1::SyncBatch batch) {
    v1::Envelope reply;
    reply.set_rid(request.rid());
    *reply.mutable_sync_batch() = std::move(batch);
    session->OnEnvelope(reply);
  }

  void ConnectLive(uint64_t epoch = 7) {
    v1::Envelope sync = Welcome(epoch);
    Reply(sync, {});
    REQUIRE(state() == ConnectionState::kConnected);
  }

  void Deliver(const v1::Message& m) {
    v1::Envelope e;
    e.mutable_deliver()->mutable_message()->CopyFrom(m);
    session->OnEnvelope(e);
  }

  OutboxEntry AddOutbox(const std::string& id, ConversationId conversation = 5,
                        const std::string& peer = "") {
    OutboxEntry entry;
    entry.client_msg_id = id;
    entry.conversation_id = conversation;
    entry.peer = peer;
    entry.content_type = "text/plain";
    entry.body = "body of " + id;
    REQUIRE(cache->AddOutbox(&entry, 100).ok());
    session->OnOutboxAdded(entry);
    return entry;
  }

  ConnectionState state() const { return session->state(); }

  std::shared_ptr<testing::FakeClock> clock = std::make_shared<testing::FakeClock>();
  FakeIo io;
  Recorder listener;
  std::shared_ptr<Cache> cache;
  std::string token = "token-1";
  int token_calls = 0;
  uint64_t random = kRandom;
  uint32_t presence_limit = 0;  // Welcome's Limits.max_presence_subscriptions
  uint32_t max_body_bytes = 0;  // Welcome's Limits.max_body_bytes
  std::unique_ptr<Session> session;
};

inline std::vector<std::string> SendIds(const std::vector<v1::Envelope>& envelopes) {
  std::vector<std::string> out;
  for (const auto& e : envelopes) {
    if (e.has_send()) out.push_back(e.send().client_msg_id());
  }
  return out;
}

inline v1::Envelope AckFor(const v1::Envelope& send, Seq seq, bool duplicate = false) {
  v1::Envelope ack;
  ack.set_rid(send.rid());
  ack.mutable_send_ack()->set_conversation_id(send.send().conversation_id());
  ack.mutable_send_ack()->set_seq(seq);
  ack.mutable_send_ack()->set_message_id(5000 + seq);
  ack.mutable_send_ack()->set_client_msg_id(send.send().client_msg_id());
  ack.mutable_send_ack()->set_duplicate(duplicate);
  return ack;
}
// The server's Ok, or its error, to `request`.
inline v1::Envelope OkFor(const v1::Envelope& request) {
  v1::Envelope ok;
  ok.set_rid(request.rid());
  ok.mutable_ok();
  return ok;
}
inline v1::Envelope ErrorFor(const v1::Envelope& request, v1::Error::Code code,
                             const std::string& why) {
  v1::Envelope e;
  e.set_rid(request.rid());
  e.mutable_error()->set_code(code);
  e.mutable_error()->set_message(why);
  return e;
}

// The state of group `id` as the server sends it (this user an admin, three members, every
// message stored).
inline v1::ConversationState GroupState(ConversationId id, Seq last_seq, uint64_t unread,
                                        const std::string& title = "team") {
  v1::ConversationState state;
  state.set_conversation_id(id);
  state.set_kind(v1::CONVERSATION_KIND_GROUP);
  state.set_title(title);
  state.set_last_seq(last_seq);
  state.set_first_seq(last_seq > 0 ? 1 : 0);  // every message stored
  state.set_unread(unread);
  state.set_role(v1::ROLE_ADMIN);
  state.set_member_count(3);
  return state;
}

inline std::vector<v1::Envelope> OfCase(const std::vector<v1::Envelope>& all,
                                        v1::Envelope::BodyCase body) {
  std::vector<v1::Envelope> out;
  for (const auto& e : all) {
    if (e.body_case() == body) out.push_back(e);
  }
  return out;
}

// What Client::Conversations() lists for `conversation` (read from the cache), if anything.
inline std::optional<ConversationInfo> Listed(Cache& cache, ConversationId conversation) {
  for (ConversationInfo& info : cache.ListConversationInfos()) {
    if (info.conversation_id == conversation) return std::move(info);
  }
  return std::nullopt;
}

// Ticks the session and returns the Receipts it wrote then (everything else written is dropped).
inline std::vector<v1::Envelope> TickReceipts(Harness& h) {
  h.session->Tick();
  return OfCase(h.io.Take(), v1::Envelope::kReceipt);
}

}  // namespace chat::client

#endif  // CHAT_TESTS_UNIT_CLIENT_SESSION_HARNESS_H_
