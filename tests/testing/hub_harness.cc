#include "tests/testing/hub_harness.h"

#include <cstdio>
#include <limits>
#include <span>
#include <utility>

#include <doctest/doctest.h>

#include "chat/auth.h"

namespace chat::testing {

namespace {

// Test frames are never limited by size: the Hub's own limits are what is under test.
constexpr size_t kUnlimited = std::numeric_limits<size_t>::max();

// A JSON envelope is an object; a protobuf Envelope never starts with '{' (that byte would be
// field 15 with the deprecated group wire type), so the first byte tells the formats apart.
codec::Format DetectFormat(const std::string& bytes) {
  return !bytes.empty() && bytes.front() == '{' ? codec::Format::kJson : codec::Format::kBinary;
}

}  // namespace

HubHarness::HubHarness(ServerOptions options) : options_(std::move(options)) {
  clock_ = std::make_shared<FakeClock>();
  options_.clock = clock_;
  if (!options_.authenticator) {
    JwtOptions jwt;
    jwt.secrets[""] = std::string(kHubTestSecret);
    Result<std::shared_ptr<Authenticator>> auth = NewJwtAuthenticator(std::move(jwt));
    REQUIRE(auth.ok());
    options_.authenticator = std::move(auth).value();
  }
  if (!options_.store) options_.store = NewMemoryStore();
  hub_ = std::make_unique<server::Hub>(options_, options_.store->Epoch(), this);
}

HubHarness::~HubHarness() { hub_.reset(); }

std::string HubHarness::Token(std::string_view user, int64_t ttl_ms) const {
  Result<std::string> token = SignJwt(kHubTestSecret, "", user, clock_->WallMs(), ttl_ms);
  REQUIRE(token.ok());
  return std::move(token).value();
}

std::optional<server::SessionId> HubHarness::Open() {
  const server::SessionId session = next_session_++;
  if (!hub_->OnOpen(session)) return std::nullopt;
  peers_[session] = Peer{};
  return session;
}

void HubHarness::SendEnvelope(server::SessionId session, const v1::Envelope& envelope,
                              codec::Format format) {
  SendRaw(session, codec::Encode(envelope, format), format == codec::Format::kJson);
}

void HubHarness::SendRaw(server::SessionId session, std::string_view bytes, bool text) {
  hub_->OnFrame(session, bytes, text);
}

void HubHarness::Disconnect(server::SessionId session) {
  auto it = peers_.find(session);
  if (it != peers_.end()) it->second.open = false;
  hub_->OnClose(session);
}

server::SessionId HubHarness::Connect(std::string_view user, std::string_view device,
                                      codec::Format format, bool accepts_messages_expired) {
  std::optional<server::SessionId> session = Open();
  REQUIRE(session.has_value());
  SendEnvelope(*session, HelloEnvelope(1, Token(user), device, accepts_messages_expired), format);
  std::vector<v1::Envelope> got = Take(*session);
  REQUIRE(got.size() == 1);
  REQUIRE_MESSAGE(got[0].has_welcome(), got[0].DebugString());
  return *session;
}

std::vector<v1::Envelope> HubHarness::Take(server::SessionId session) {
  std::vector<v1::Envelope> out;
  for (ReceivedFrame& frame : TakeFrames(session)) {
    for (v1::Envelope& envelope : frame.envelopes) out.push_back(std::move(envelope));
  }
  return out;
}

std::vector<ReceivedFrame> HubHarness::TakeFrames(server::SessionId session) {
  auto it = peers_.find(session);
  if (it == peers_.end()) return {};
  return std::exchange(it->second.frames, {});
}

std::optional<CloseRecord> HubHarness::closed(server::SessionId session) const {
  auto it = peers_.find(session);
  if (it == peers_.end()) return std::nullopt;
  return it->second.close;
}

void HubHarness::Advance(int64_t ms) {
  clock_->Advance(ms);
  hub_->Tick();
}

size_t HubHarness::CommitAppends() {
  std::deque<server::AppendJob> jobs = std::exchange(appends_, {});
  std::vector<AppendRequest> batch;
  batch.reserve(jobs.size());
  for (const server::AppendJob& job : jobs) batch.push_back(job.request);
  std::vector<AppendResult> results;
  Status commit = commit_failure_;
  if (commit.ok()) commit = options_.store->Append(std::span(batch), &results);
  if (commit.ok()) REQUIRE(results.size() == jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    hub_->OnAppendDone(jobs[i].token, commit, commit.ok() ? std::move(results[i]) : AppendResult{});
  }
  return jobs.size();
}

void HubHarness::ReadThenCommit() {
  std::deque<server::ReadJob> reads = std::exchange(reads_, {});
  std::vector<std::pair<uint64_t, server::ReadResult>> done;
  for (server::ReadJob& job : reads) {
    done.emplace_back(job.token, server::RunReadJob(*options_.store, job));
  }
  CommitAppends();
  for (auto& [token, result] : done) hub_->OnReadDone(token, std::move(result));
}

void HubHarness::PumpReadsInReverse() {
  std::deque<server::ReadJob> reads = std::exchange(reads_, {});
  for (auto it = reads.rbegin(); it != reads.rend(); ++it) {
    hub_->OnReadDone(it->token, server::RunReadJob(*options_.store, *it));
  }
  Pump();
}

SweepResult HubHarness::Sweep(const SweepRequest& request) {
  Result<SweepResult> swept = options_.store->DeleteExpired(request);
  REQUIRE_MESSAGE(swept.ok(), swept.status().ToString());
  if (!swept->expired.empty()) hub_->OnMessagesExpired(swept->expired);
  return *swept;
}

size_t HubHarness::Pump() {
  size_t ran = 0;
  while (!appends_.empty() || !reads_.empty()) {
    if (!appends_.empty()) ran += CommitAppends();
    std::deque<server::ReadJob> reads = std::exchange(reads_, {});
    for (server::ReadJob& job : reads) {
      hub_->OnReadDone(job.token, server::RunReadJob(*options_.store, job));
      ++ran;
    }
  }
  return ran;
}

void HubHarness::Send(server::SessionId session, codec::Frame frame) {
  auto it = peers_.find(session);
  if (it == peers_.end() || !it->second.open) {
    violations_.push_back("frame for session " + std::to_string(session) + " that is not open");
    return;
  }
  if (!frame) {
    violations_.push_back("null frame");
    return;
  }
  ReceivedFrame received;
  received.format = DetectFormat(*frame);
  received.bytes = frame->size();
  v1::Envelope envelope;
  Status decoded = codec::Decode(*frame, received.format, kUnlimited, &envelope);
  if (!decoded.ok()) {
    violations_.push_back("undecodable frame: " + decoded.ToString());
    return;
  }
  if (envelope.has_batch()) {
    for (const v1::Envelope& element : envelope.batch().envelopes()) {
      received.envelopes.push_back(element);
    }
  } else {
    received.envelopes.push_back(std::move(envelope));
  }
  it->second.frames.push_back(std::move(received));
}

void HubHarness::Close(server::SessionId session, int code, std::string_view reason) {
  auto it = peers_.find(session);
  if (it == peers_.end() || !it->second.open) {
    violations_.push_back("close for session " + std::to_string(session) + " that is not open");
    return;
  }
  it->second.open = false;
  it->second.close = CloseRecord{code, std::string(reason)};
}

void HubHarness::SubmitAppend(server::AppendJob job) { appends_.push_back(std::move(job)); }

void HubHarness::SubmitRead(server::ReadJob job) { reads_.push_back(std::move(job)); }

v1::Envelope HelloEnvelope(uint64_t rid, std::string_view token, std::string_view device,
                           bool accepts_messages_expired) {
  v1::Envelope envelope;
  envelope.set_rid(rid);
  v1::Hello* hello = envelope.mutable_hello();
  hello->set_token(std::string(token));
  hello->set_device_id(std::string(device));
  hello->set_client_version("test");
  hello->set_protocol_version(1);
  hello->set_accepts_messages_expired(accepts_messages_expired);
  return envelope;
}

v1::Envelope SendToPeer(uint64_t rid, std::string_view peer, std::string_view client_msg_id,
                        std::string_view body) {
  v1::Envelope envelope;
  envelope.set_rid(rid);
  v1::Send* send = envelope.mutable_send();
  send->set_peer(std::string(peer));
  send->set_client_msg_id(std::string(client_msg_id));
  send->set_content_type("text/plain");
  send->set_body(std::string(body));
  return envelope;
}

v1::Envelope SendToConversation(uint64_t rid, ConversationId conversation_id,
                                std::string_view client_msg_id, std::string_view body) {
  v1::Envelope envelope;
  envelope.set_rid(rid);
  v1::Send* send = envelope.mutable_send();
  send->set_conversation_id(conversation_id);
  send->set_client_msg_id(std::string(client_msg_id));
  send->set_content_type("text/plain");
  send->set_body(std::string(body));
  return envelope;
}

std::string ClientMsgId(uint64_t n) {
  char buffer[40];
  std::snprintf(buffer, sizeof(buffer), "cmid-%027llu", static_cast<unsigned long long>(n));
  return buffer;
}

}  // namespace chat::testing
