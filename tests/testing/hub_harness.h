// HubHarness: drives a chat::server::Hub the way the runtime does, with a fake clock and the
// in-memory store, and records what every client would see.
//
// The harness is the Hub's HubIo. Frames the Hub sends are decoded back into envelopes (Batch
// frames unpacked) per session; closes are recorded with their codes. Store work is only queued
// until the test calls Pump(), so a test can check that nothing was acked or delivered before
// the commit. Commits can be made to fail with a chosen Status.
//
// Thread-safety: none; one test thread.
#ifndef CHAT_TESTS_TESTING_HUB_HARNESS_H_
#define CHAT_TESTS_TESTING_HUB_HARNESS_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "chat/server.h"
#include "chat/status.h"
#include "chat/store.h"
#include "chat/v1/chat.pb.h"
#include "src/core/codec.h"
#include "src/server/hub.h"
#include "tests/testing/fake_clock.h"

namespace chat::testing {

// The HS256 secret of the harness's authenticator (32 bytes).
inline constexpr std::string_view kHubTestSecret = "hub-harness-secret-0123456789abcd";

// One frame as the client received it.
struct ReceivedFrame {
  codec::Format format = codec::Format::kBinary;
  size_t bytes = 0;                     // as written
  std::vector<v1::Envelope> envelopes;  // a Batch frame unpacked, in order
};

struct CloseRecord {
  int code = 0;
  std::string reason;
};

class HubHarness final : public server::HubIo {
 public:
  // The clock is always the harness's FakeClock. Options left unset get a JWT authenticator
  // over kHubTestSecret and NewMemoryStore().
  explicit HubHarness(ServerOptions options = {});
  ~HubHarness() override;
  HubHarness(const HubHarness&) = delete;
  HubHarness& operator=(const HubHarness&) = delete;

  server::Hub& hub() { return *hub_; }
  FakeClock& clock() { return *clock_; }
  MessageStore& store() { return *options_.store; }
  const ServerOptions& options() const { return options_; }

  // A valid token for `user`, issued now by the fake clock.
  std::string Token(std::string_view user, int64_t ttl_ms = 3'600'000) const;

  // --- The client side of a connection ---
  // A new connection; nullopt if the Hub refused it.
  std::optional<server::SessionId> Open();
  // Sends one envelope encoded in `format` (text frame for JSON).
  void SendEnvelope(server::SessionId session, const v1::Envelope& envelope,
                    codec::Format format = codec::Format::kBinary);
  void SendRaw(server::SessionId session, std::string_view bytes, bool text);
  // The peer went away.
  void Disconnect(server::SessionId session);
  // Open + Hello(token for `user`, `device`; accepts_messages_expired as the SDK's client sets
  // it unless a test says otherwise), and checks that a Welcome came back. Returns the session
  // with its received envelopes cleared.
  server::SessionId Connect(std::string_view user, std::string_view device,
                            codec::Format format = codec::Format::kBinary,
                            bool accepts_messages_expired = true);

  // Envelopes the session received since the last Take (Batch frames unpacked).
  std::vector<v1::Envelope> Take(server::SessionId session);
  // Frames the session received since the last TakeFrames/Take.
  std::vector<ReceivedFrame> TakeFrames(server::SessionId session);
  // How the Hub closed the session, if it did.
  std::optional<CloseRecord> closed(server::SessionId session) const;
  // Things the Hub must never do (frames or closes for a session it already closed, frames it
  // could not decode). Empty in a correct run.
  const std::vector<std::string>& violations() const { return violations_; }

  // --- Time ---
  // Advances the fake clock and ticks the Hub.
  void Advance(int64_t ms);

  // --- The store side ---
  size_t queued_appends() const { return appends_.size(); }
  size_t queued_reads() const { return reads_.size(); }
  // Every following commit fails with `status` (pass Status::Ok() to stop failing).
  void FailCommits(Status status) { commit_failure_ = std::move(status); }
  // Commits every queued append in one transaction, then runs every queued read, handing
  // the completions to the Hub. Returns the number of jobs run.
  size_t Pump();
  // Runs the queued reads on the store as it is, then commits the queued appends and hands
  // them to the Hub, and only then the reads' results: reads that a commit overtook.
  void ReadThenCommit();
  // Answers the queued reads last first (readers finish in any order), then Pump()s the rest.
  void PumpReadsInReverse();
  // Runs one retention pass on the store, as the writer thread does between commit groups, and
  // hands what it deleted to the Hub. The pass must succeed.
  SweepResult Sweep(const SweepRequest& request);

  // HubIo.
  void Send(server::SessionId session, codec::Frame frame) override;
  void Close(server::SessionId session, int code, std::string_view reason) override;
  void SubmitAppend(server::AppendJob job) override;
  void SubmitRead(server::ReadJob job) override;

 private:
  // Commits the queued appends in one transaction and hands the results to the Hub.
  size_t CommitAppends();

  struct Peer {
    std::vector<ReceivedFrame> frames;
    std::optional<CloseRecord> close;
    bool open = true;  // false once the Hub closed it or the peer disconnected
  };

  ServerOptions options_;
  std::shared_ptr<FakeClock> clock_;
  std::map<server::SessionId, Peer> peers_;
  std::deque<server::AppendJob> appends_;
  std::deque<server::ReadJob> reads_;
  Status commit_failure_;
  std::vector<std::string> violations_;
  server::SessionId next_session_ = 1;
  // Declared last: destroyed first, while everything it may call into still exists.
  std::unique_ptr<server::Hub> hub_;
};

// --- Envelope builders for tests ---

v1::Envelope HelloEnvelope(uint64_t rid, std::string_view token, std::string_view device,
                           bool accepts_messages_expired = true);
// A Send to the direct conversation with `peer`.
v1::Envelope SendToPeer(uint64_t rid, std::string_view peer, std::string_view client_msg_id,
                        std::string_view body);
v1::Envelope SendToConversation(uint64_t rid, ConversationId conversation_id,
                                std::string_view client_msg_id, std::string_view body);
// A valid client_msg_id (32 bytes) derived from `n`, distinct for distinct n.
std::string ClientMsgId(uint64_t n);

}  // namespace chat::testing

#endif  // CHAT_TESTS_TESTING_HUB_HARNESS_H_
