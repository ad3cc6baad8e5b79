// chat-cli: a command-line chat client built on chat::Client.
//
//   chat-cli --url ws://127.0.0.1:8080 --token T [--device D] [--cache PATH]   interactive
//   chat-cli ... send (--to USER | --conversation ID) TEXT...                  send and wait
//   chat-cli ... flush                                   send what the cache's outbox holds
//   chat-cli ... tail                                    print messages as they arrive
//   chat-cli ... history --conversation ID [--before SEQ] [--limit N]
//   chat-cli ... conversations
//   chat-cli ... group-create --title T [--channel] USER...   create a group (or channel)
//   chat-cli ... mark-read --conversation ID [--seq N]        mark read up to N (0: all)
//   chat-cli ... presence [--count N] [--duration-ms MS] USER...   print presence updates
//   chat-cli ... retention CONVERSATION MS   set a conversation's retention (0: server default,
//                                            -1: keep forever)
//   chat-cli ... register-push PLATFORM [TOKEN]    register this device's push token (none:
//                                                  unregister)
//
// Every subcommand takes --json to print one JSON object per line instead of text.
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "chat/client.h"
#include "chat/log.h"
#include "examples/cli_args.h"

namespace {

std::atomic<bool> g_interrupted{false};

std::atomic<int> g_signal{0};  // the signal that set g_interrupted

void OnSignal(int signal) {
  g_signal = signal;
  g_interrupted = true;
}

std::string JsonString(std::string_view s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

const char* StatusName(chat::MessageStatus status) {
  switch (status) {
    case chat::MessageStatus::kPending:
      return "pending";
    case chat::MessageStatus::kSent:
      return "sent";
    case chat::MessageStatus::kFailed:
      return "failed";
    case chat::MessageStatus::kDelivered:
      return "delivered";
    case chat::MessageStatus::kRead:
      return "read";
  }
  return "unknown";
}

std::string Join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ", ") + item;
  return out;
}

// A system message as a sentence, e.g. "alice added bob, carol".
std::string SystemText(const chat::SystemEvent& e) {
  using Type = chat::SystemEvent::Type;
  const std::string who = e.actor.empty() ? "someone" : e.actor;
  switch (e.type) {
    case Type::kCreated:
      return who + " created \"" + e.title + "\"";
    case Type::kMembersAdded:
      return who + " added " + Join(e.users);
    case Type::kMembersRemoved:
      return who + " removed " + Join(e.users);
    case Type::kMemberLeft:
      return (e.users.empty() ? who : Join(e.users)) + " left";
    case Type::kRenamed:
      return who + " renamed the conversation to \"" + e.title + "\"";
    case Type::kRoleChanged:
      return who + " made " + Join(e.users) +
             (e.role == chat::Role::kAdmin ? " an admin" : " a member");
    case Type::kMessagesExpired:
      return "messages up to #" + std::to_string(e.seq) + " expired";
    case Type::kRetentionChanged:
      if (e.retention_ms == -1) return who + " set messages to be kept forever";
      if (e.retention_ms == 0) return who + " set messages to follow the server's retention";
      return who + " set messages to expire after " + std::to_string(e.retention_ms) + " ms";
    case Type::kUnspecified:
      break;
  }
  return "(system event)";
}

// The ticks a sender sees on its own messages.
const char* Ticks(chat::MessageStatus status) {
  switch (status) {
    case chat::MessageStatus::kSent:
      return "\u2713";  // ✓
    case chat::MessageStatus::kDelivered:
      return "\u2713\u2713";  // ✓✓
    case chat::MessageStatus::kRead:
      return "\u2713\u2713 read";
    default:
      return "";
  }
}

std::string MessageLine(const chat::MessageEvent& e, bool json) {
  const chat::Message& m = e.message;
  const bool system = m.kind == chat::MessageKind::kSystem;
  if (json) {
    std::string out =
        "{\"type\":\"message\",\"status\":\"" + std::string(StatusName(e.status)) +
        "\",\"conversation_id\":" + std::to_string(m.conversation_id) +
        ",\"seq\":" + std::to_string(m.seq) + ",\"message_id\":" + std::to_string(m.message_id) +
        ",\"sender\":" + JsonString(m.sender) +
        ",\"client_msg_id\":" + JsonString(m.client_msg_id) +
        ",\"server_time_ms\":" + std::to_string(m.server_time_ms) +
        ",\"content_type\":" + JsonString(m.content_type) + ",\"body\":" + JsonString(m.body) +
        ",\"outgoing\":" + (e.outgoing ? "true" : "false") +
        ",\"kind\":" + (system ? "\"system\"" : "\"user\"");
    if (system) out += ",\"system\":" + JsonString(SystemText(m.system));
    if (!e.peer.empty()) out += ",\"peer\":" + JsonString(e.peer);
    if (e.status == chat::MessageStatus::kFailed)
      out += ",\"reason\":" + JsonString(e.reason.ToString());
    return out + "}";
  }
  std::string where = "[" + std::to_string(m.conversation_id) + "#" + std::to_string(m.seq) + "] ";
  if (system) return where + "* " + SystemText(m.system);
  std::string who = m.sender.empty() ? "me" : m.sender;
  std::string out = where + who + ": " + m.body;
  if (e.outgoing && e.status != chat::MessageStatus::kPending &&
      e.status != chat::MessageStatus::kFailed) {
    out += "  " + std::string(Ticks(e.status));
  } else if (e.status != chat::MessageStatus::kSent) {
    out += "  (" + std::string(StatusName(e.status)) + ")";
  }
  if (e.status == chat::MessageStatus::kFailed) out += " " + e.reason.ToString();
  return out;
}

// Unix ms as "2026-11-23 14:05:10 UTC".
std::string UtcTime(int64_t unix_ms) {
  const std::time_t seconds = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  gmtime_r(&seconds, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buf;
}

// "online (2 devices)", "offline, last seen 2026-11-23 14:05:10 UTC" or "offline".
std::string PresenceText(bool online, uint32_t devices, int64_t last_seen_ms) {
  if (online) {
    return "online (" + std::to_string(devices) + (devices == 1 ? " device)" : " devices)");
  }
  return last_seen_ms > 0 ? "offline, last seen " + UtcTime(last_seen_ms) : "offline";
}

std::string PresenceLine(const chat::PresenceInfo& p, bool json) {
  if (json) {
    return "{\"type\":\"presence\",\"user\":" + JsonString(p.user) +
           ",\"online\":" + (p.online ? "true" : "false") +
           ",\"devices\":" + std::to_string(p.devices) +
           ",\"last_seen_ms\":" + std::to_string(p.last_seen_ms) + "}";
  }
  return p.user + " " + PresenceText(p.online, p.devices, p.last_seen_ms);
}

// A conversation; `peer` is the live presence of a direct conversation's peer when known.
std::string ConversationLine(const chat::ConversationInfo& c, bool json,
                             const chat::PresenceInfo* peer = nullptr) {
  if (json) {
    return "{\"type\":\"conversation\",\"conversation_id\":" + std::to_string(c.conversation_id) +
           ",\"kind\":" + std::to_string(static_cast<int>(c.kind)) +
           ",\"title\":" + JsonString(c.title) + ",\"peer\":" + JsonString(c.peer) +
           ",\"last_seq\":" + std::to_string(c.last_seq) +
           ",\"unread\":" + std::to_string(c.unread) +
           ",\"read_seq\":" + std::to_string(c.read_seq) +
           ",\"member_count\":" + std::to_string(c.member_count) +
           ",\"role\":" + std::to_string(static_cast<int>(c.role)) +
           ",\"retention_ms\":" + std::to_string(c.retention_ms) +
           (peer != nullptr ? std::string(",\"peer_online\":") + (peer->online ? "true" : "false")
                            : std::string()) +
           (c.kind == chat::ConversationKind::kDirect
                ? ",\"peer_last_seen_ms\":" +
                      std::to_string(peer != nullptr && !peer->online
                                         ? std::max(peer->last_seen_ms, c.peer_last_seen_ms)
                                         : c.peer_last_seen_ms)
                : std::string()) +
           "}";
  }
  std::string name = !c.title.empty() ? c.title : !c.peer.empty() ? c.peer : "(unknown)";
  const char* kind = c.kind == chat::ConversationKind::kGroup     ? "  [group]"
                     : c.kind == chat::ConversationKind::kChannel ? "  [channel]"
                                                                  : "";
  std::string line = std::to_string(c.conversation_id) + "  " + name + kind +
                     "  last=" + std::to_string(c.last_seq);
  if (c.unread > 0) line += "  (" + std::to_string(c.unread) + " unread)";
  if (c.removed_at_seq != 0) line += "  (left)";
  if (c.retention_ms == -1) line += "  (kept forever)";
  if (c.retention_ms > 0) line += "  (expires after " + std::to_string(c.retention_ms) + " ms)";
  if (peer != nullptr) {
    line += "  (" +
            PresenceText(peer->online, peer->devices,
                         std::max(peer->last_seen_ms, c.peer_last_seen_ms)) +
            ")";
  } else if (c.kind == chat::ConversationKind::kDirect && c.peer_last_seen_ms > 0) {
    line += "  (last seen " + UtcTime(c.peer_last_seen_ms) + ")";
  }
  return line;
}

// Prints events, remembers what the waiting command needs, and lets main() wait for it.
class Listener : public chat::ClientListener {
 public:
  Listener(bool json, bool print_messages) : json_(json), print_messages_(print_messages) {}

  void OnConnectionState(chat::ConnectionState state) override {
    std::lock_guard lock(mu_);
    state_ = state;
    if (state == chat::ConnectionState::kConnected) auth_refusals_ = 0;
    if (verbose_) {
      if (json_) {
        Print("{\"type\":\"state\",\"state\":\"" + std::string(chat::ConnectionStateName(state)) +
              "\"}");
      } else {
        Print("* " + std::string(chat::ConnectionStateName(state)));
      }
    }
    cv_.notify_all();
  }
  void OnMessage(const chat::MessageEvent& event) override {
    std::lock_guard lock(mu_);
    if (print_messages_) Print(MessageLine(event, json_));
    if (event.outgoing && !event.message.client_msg_id.empty()) {
      if (event.status == chat::MessageStatus::kSent) {
        sent_[event.message.client_msg_id] = event;
      } else if (event.status == chat::MessageStatus::kFailed) {
        failed_[event.message.client_msg_id] = event;
      }
    }
    cv_.notify_all();
  }
  void OnTyping(chat::ConversationId conversation, const chat::UserId& user, bool active) override {
    std::lock_guard lock(mu_);
    if (!print_messages_) return;
    if (json_) {
      Print("{\"type\":\"typing\",\"conversation_id\":" + std::to_string(conversation) +
            ",\"user\":" + JsonString(user) + ",\"active\":" + (active ? "true" : "false") + "}");
    } else {
      Print("[" + std::to_string(conversation) + "] * " + user +
            (active ? " is typing..." : " stopped typing"));
    }
  }
  void OnMessageStatus(chat::ConversationId conversation, chat::Seq up_to_seq,
                       chat::MessageStatus status) override {
    std::lock_guard lock(mu_);
    if (!print_messages_) return;
    if (json_) {
      Print("{\"type\":\"status\",\"conversation_id\":" + std::to_string(conversation) +
            ",\"up_to_seq\":" + std::to_string(up_to_seq) + ",\"status\":\"" + StatusName(status) +
            "\"}");
    } else {
      Print("[" + std::to_string(conversation) + "] * your messages up to #" +
            std::to_string(up_to_seq) + " " + Ticks(status) +
            (status == chat::MessageStatus::kDelivered ? " delivered" : ""));
    }
  }
  void OnMessagesExpired(chat::ConversationId conversation, chat::Seq up_to_seq) override {
    std::lock_guard lock(mu_);
    if (!print_messages_) return;
    if (json_) {
      Print("{\"type\":\"expired\",\"conversation_id\":" + std::to_string(conversation) +
            ",\"up_to_seq\":" + std::to_string(up_to_seq) + "}");
    } else {
      Print("[" + std::to_string(conversation) + "] * messages up to #" +
            std::to_string(up_to_seq) + " expired");
    }
  }
  void OnUnreadTotal(uint64_t total) override {
    std::lock_guard lock(mu_);
    if (!verbose_) return;
    if (json_) {
      Print("{\"type\":\"unread_total\",\"unread\":" + std::to_string(total) + "}");
    } else {
      Print("* unread: " + std::to_string(total));
    }
  }
  void OnPresence(const chat::PresenceInfo& info) override {
    std::lock_guard lock(mu_);
    if (print_messages_ || print_presence_) Print(PresenceLine(info, json_));
    presence_[info.user] = info;
    ++presence_updates_;
    cv_.notify_all();
  }
  void OnError(const chat::Status& status) override {
    std::lock_guard lock(mu_);
    const bool auth = status.code() == chat::Code::kUnauthenticated;
    if (json_) {
      Print("{\"type\":\"error\",\"error\":" + JsonString(status.ToString()) + "}");
    } else if (!auth) {
      // A refused token is told once, by the command it ends (PrintAuthFailed); one the client
      // reads again from --token-file may still be replaced.
      std::fprintf(stderr, "error: %s\n", status.ToString().c_str());
    }
    if (auth) {
      ++auth_refusals_;
      auth_error_ = status;
    }
    cv_.notify_all();
  }

  // Waits until `done()` holds (called under the lock), an interrupt, or the timeout.
  template <typename F>
  bool WaitFor(F done, int timeout_ms) {
    std::unique_lock lock(mu_);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!done()) {
      if (g_interrupted) return false;
      if (timeout_ms >= 0 && std::chrono::steady_clock::now() >= deadline) return false;
      cv_.wait_for(lock, std::chrono::milliseconds(100));
    }
    return true;
  }

  void set_verbose(bool v) { verbose_ = v; }
  void set_token_from_file(bool v) { token_from_file_ = v; }
  void set_print_presence(bool v) { print_presence_ = v; }
  std::mutex& mu() { return mu_; }
  std::condition_variable& cv() { return cv_; }
  chat::ConnectionState state() const { return state_; }
  // Whether the server refused the token for good (under mu()): any refusal of a --token, or
  // the second in a row of a token from --token-file. After "token expired" the client reads
  // the file again at once, and a refresher may have replaced the token meanwhile.
  bool auth_failed() const {
    if (auth_refusals_ == 0) return false;
    return !token_from_file_ || auth_refusals_ >= 2 ||
           auth_error_.message().find("expired") == std::string::npos;
  }
  // The server's latest refusal of the token.
  const chat::Status& auth_error() const { return auth_error_; }
  std::map<std::string, chat::MessageEvent>& sent() { return sent_; }
  std::map<std::string, chat::MessageEvent>& failed() { return failed_; }
  // How many of the messages `ids` are neither sent nor failed yet (under mu()).
  size_t Unanswered(const std::vector<std::string>& ids) const {
    return static_cast<size_t>(std::count_if(ids.begin(), ids.end(), [&](const std::string& id) {
      return !sent_.contains(id) && !failed_.contains(id);
    }));
  }
  // The latest presence of every user reported, and how many reports came (under mu()).
  std::map<std::string, chat::PresenceInfo>& presence() { return presence_; }
  uint64_t presence_updates() const { return presence_updates_; }

 private:
  void Print(const std::string& line) {
    std::fputs((line + "\n").c_str(), stdout);
    std::fflush(stdout);
  }

  const bool json_;
  const bool print_messages_;
  bool verbose_ = false;
  bool print_presence_ = false;
  bool token_from_file_ = false;
  std::mutex mu_;
  std::condition_variable cv_;
  chat::ConnectionState state_ = chat::ConnectionState::kDisconnected;
  int auth_refusals_ = 0;  // since the last kConnected
  chat::Status auth_error_;
  std::map<std::string, chat::MessageEvent> sent_;
  std::map<std::string, chat::MessageEvent> failed_;
  std::map<std::string, chat::PresenceInfo> presence_;
  uint64_t presence_updates_ = 0;
};

struct Flags {
  std::string url = "ws://127.0.0.1:8080";
  std::string token;
  std::string token_file;
  std::string device = "chat-cli";
  std::string cache;
  bool json = false;
  int timeout_ms = 15'000;
  // How long the SDK waits for the answer to one request before it gives up on it.
  uint32_t request_timeout_ms = chat::ClientOptions{}.request_timeout_ms;
  std::string log_level = "error";
};

// The token in `path` (trailing whitespace, CR included, removed); nullopt if the file cannot be
// read or holds more than 64 KiB.
std::optional<std::string> ReadTokenFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::string token(64 * 1024 + 1, '\0');
  in.read(token.data(), static_cast<std::streamsize>(token.size()));
  if (in.bad() || in.gcount() > 64 * 1024) return std::nullopt;
  token.resize(static_cast<size_t>(in.gcount()));
  while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back()))) {
    token.pop_back();
  }
  return token;
}

std::unique_ptr<chat::Client> OpenClient(const Flags& flags, std::shared_ptr<Listener> listener) {
  chat::ClientOptions options;
  options.url = flags.url;
  // Read again on every connect, so a refreshed token in the file is picked up; if it cannot
  // be read then, or is empty (a pipe read once, a file being rewritten), the last token read
  // (at start, into flags.token) is used.
  auto last = std::make_shared<std::string>(flags.token);
  options.token_provider = [flags, last] {
    if (flags.token_file.empty()) return flags.token;
    if (std::optional<std::string> token = ReadTokenFile(flags.token_file);
        token && !token->empty()) {
      *last = *token;
    }
    return *last;
  };
  options.device_id = flags.device;
  options.cache_path = flags.cache;
  options.request_timeout_ms = flags.request_timeout_ms;
  listener->set_token_from_file(!flags.token_file.empty());
  options.listener = std::move(listener);
  auto client = chat::Client::Open(std::move(options));
  if (!client.ok()) {
    std::fprintf(stderr, "chat-cli: %s\n", client.status().ToString().c_str());
    return nullptr;
  }
  if (chat::Status st = (*client)->Start(); !st.ok()) {
    std::fprintf(stderr, "chat-cli: %s\n", st.ToString().c_str());
    return nullptr;
  }
  return std::move(client.value());
}

// Prints why the server refused the token; returns the exit code 1.
// REQUIRES: listener.mu() is held and listener.auth_failed().
int PrintAuthFailed(const Listener& listener) {
  std::fprintf(stderr, "chat-cli: the server refused the token: %s\n",
               listener.auth_error().ToString().c_str());
  return 1;
}

// Waits until the client is connected. Returns 0 then, 1 if the server refused the token, 3 if
// there was no connection in time.
int WaitConnected(Listener& listener, int timeout_ms) {
  (void)listener.WaitFor(
      [&] {
        return listener.state() == chat::ConnectionState::kConnected || listener.auth_failed();
      },
      timeout_ms);
  std::lock_guard lock(listener.mu());
  if (listener.state() == chat::ConnectionState::kConnected) return 0;
  if (listener.auth_failed()) return PrintAuthFailed(listener);
  std::fprintf(stderr, "chat-cli: could not connect to the server\n");
  return 3;
}

// Waits until every id in `ids` is sent or failed, or the server refuses the token. Returns the
// exit code.
int WaitSent(Listener& listener, const std::vector<std::string>& ids, int timeout_ms) {
  bool done = listener.WaitFor(
      [&] { return listener.Unanswered(ids) == 0 || listener.auth_failed(); }, timeout_ms);
  std::lock_guard lock(listener.mu());
  if (done && listener.Unanswered(ids) > 0) return PrintAuthFailed(listener);
  if (!done) {
    std::fprintf(stderr, "chat-cli: not all messages were acknowledged in time%s\n",
                 "; with --cache they stay in the outbox (chat-cli flush sends them), without it "
                 "they are not kept");
    return 3;
  }
  return listener.failed().empty() ? 0 : 4;
}

int RunSend(const Flags& flags, const std::string& to, uint64_t conversation,
            const std::vector<std::string>& texts) {
  if (to.empty() == (conversation == 0)) {
    std::fprintf(stderr, "chat-cli send: give exactly one of --to and --conversation\n");
    return 2;
  }
  auto listener = std::make_shared<Listener>(flags.json, false);
  auto client = OpenClient(flags, listener);
  if (!client) return 1;
  std::vector<std::string> ids;
  for (const std::string& text : texts) {
    auto id = to.empty() ? client->Send(conversation, "text/plain", text)
                         : client->SendTo(to, "text/plain", text);
    if (!id.ok()) {
      std::fprintf(stderr, "chat-cli send: %s\n", id.status().ToString().c_str());
      client->Close();
      return 1;
    }
    ids.push_back(*id);
  }
  if (flags.json) {
    std::printf("{\"type\":\"queued\",\"count\":%zu}\n", ids.size());
  } else {
    std::printf("queued %zu message(s)\n", ids.size());
  }
  std::fflush(stdout);
  int rc = WaitSent(*listener, ids, flags.timeout_ms);
  {
    std::lock_guard lock(listener->mu());
    for (const auto& id : ids) {
      if (auto it = listener->sent().find(id); it != listener->sent().end()) {
        std::puts(MessageLine(it->second, flags.json).c_str());
      } else if (auto failed = listener->failed().find(id); failed != listener->failed().end()) {
        std::puts(MessageLine(failed->second, flags.json).c_str());
      }
    }
  }
  client->Close();
  return rc;
}

int RunFlush(const Flags& flags) {
  auto listener = std::make_shared<Listener>(flags.json, false);
  auto client = OpenClient(flags, listener);
  if (!client) return 1;
  auto start = std::chrono::steady_clock::now();
  int rc = 3;
  while (!g_interrupted &&
         std::chrono::steady_clock::now() - start < std::chrono::milliseconds(flags.timeout_ms)) {
    auto outbox = client->Outbox();
    if (!outbox.ok()) break;
    size_t pending = 0;
    for (const auto& e : *outbox) pending += e.status == chat::MessageStatus::kPending ? 1 : 0;
    if (pending == 0) {
      rc = 0;
      break;
    }
    {
      std::lock_guard lock(listener->mu());
      if (listener->auth_failed()) {
        rc = PrintAuthFailed(*listener);
        break;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (rc == 3) std::fprintf(stderr, "chat-cli flush: the outbox is not empty yet\n");
  {
    // Refused by the server during this flush: printed, and exit 4 as for send.
    std::lock_guard lock(listener->mu());
    for (const auto& [id, event] : listener->failed()) {
      std::puts(MessageLine(event, flags.json).c_str());
    }
    if (rc == 0 && !listener->failed().empty()) rc = 4;
  }
  client->Close();
  return rc;
}

// Lists what the outbox in --cache holds: pending messages and those the server refused.
int RunOutbox(const Flags& flags) {
  auto listener = std::make_shared<Listener>(flags.json, false);
  auto client = OpenClient(flags, listener);
  if (!client) return 1;
  auto outbox = client->Outbox();
  if (!outbox.ok()) {
    std::fprintf(stderr, "chat-cli outbox: %s\n", outbox.status().ToString().c_str());
    client->Close();
    return 1;
  }
  for (const chat::MessageEvent& e : *outbox) std::puts(MessageLine(e, flags.json).c_str());
  client->Close();
  return 0;
}

// Removes failed messages from the outbox in --cache, by client_msg_id.
int RunDiscard(const Flags& flags, const std::vector<std::string>& ids) {
  auto listener = std::make_shared<Listener>(flags.json, false);
  auto client = OpenClient(flags, listener);
  if (!client) return 1;
  int rc = 0;
  for (const std::string& id : ids) {
    if (chat::Status st = client->Discard(id); !st.ok()) {
      std::fprintf(stderr, "chat-cli discard: %s: %s\n", id.c_str(), st.ToString().c_str());
      rc = 1;
    }
  }
  client->Close();
  return rc;
}

int RunTail(const Flags& flags) {
  auto listener = std::make_shared<Listener>(flags.json, true);
  auto client = OpenClient(flags, listener);
  if (!client) return 1;
  // Until SIGINT/SIGTERM, or a token refused for good: then nothing more can arrive.
  (void)listener->WaitFor([&] { return listener->auth_failed(); }, -1);
  int rc = 0;
  {
    std::lock_guard lock(listener->mu());
    if (listener->auth_failed()) rc = PrintAuthFailed(*listener);
  }
  client->Close();
  return rc;
}

// Opens a client, waits until it is connected, runs `body(client, listener)` and closes the
// client. Returns body's exit code, 1 if the client cannot be opened or the server refuses the
// token, 3 if it does not connect.
template <typename Body>
int WithConnection(const Flags& flags, Body body) {
  auto listener = std::make_shared<Listener>(flags.json, false);
  auto client = OpenClient(flags, listener);
  if (!client) return 1;
  int rc = WaitConnected(*listener, flags.timeout_ms);
  if (rc == 0) rc = body(*client, *listener);
  client->Close();
  return rc;
}

// Calls `start` with a callback and waits for the value the callback gets. Returns nullopt
// and sets `rc` (1: the call or the token was refused, 3: no answer in time) after printing why.
template <typename T, typename Start>
std::optional<T> Await(Listener& listener, int timeout_ms, const char* what, Start start, int* rc) {
  // Shared with the callback, which may still come after a timeout (until Close()).
  auto answer = std::make_shared<std::optional<T>>();
  chat::Status st = start([answer, &listener](T value) {
    std::lock_guard lock(listener.mu());
    answer->emplace(std::move(value));
    listener.cv().notify_all();
  });
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, st.ToString().c_str());
    *rc = 1;
    return std::nullopt;
  }
  listener.WaitFor([&] { return answer->has_value() || listener.auth_failed(); }, timeout_ms);
  std::lock_guard lock(listener.mu());
  if (!answer->has_value() && listener.auth_failed()) {
    *rc = PrintAuthFailed(listener);
    return std::nullopt;
  }
  if (!answer->has_value()) {
    std::fprintf(stderr, "%s: no answer in time\n", what);
    *rc = 3;
    return std::nullopt;
  }
  return std::move(**answer);
}

// Prints the server's refusal of `what`; returns the exit code: 1, or 3 when the client gave
// up waiting for the server's answer (its request_timeout_ms) as for no answer in time.
int PrintError(const char* what, const chat::Status& status, bool json) {
  if (json) {
    std::printf("{\"type\":\"error\",\"error\":%s}\n", JsonString(status.ToString()).c_str());
    std::fflush(stdout);
  } else {
    std::fprintf(stderr, "%s: %s\n", what, status.ToString().c_str());
  }
  return status.code() == chat::Code::kDeadlineExceeded ? 3 : 1;
}

int RunConversations(const Flags& flags) {
  return WithConnection(flags, [&](chat::Client& client, Listener& listener) {
    auto conversations = client.Conversations();
    if (!conversations.ok()) return PrintError("conversations", conversations.status(), flags.json);
    std::vector<chat::UserId> peers;
    for (const auto& c : *conversations) {
      if (c.kind == chat::ConversationKind::kDirect && !c.peer.empty()) peers.push_back(c.peer);
    }
    std::sort(peers.begin(), peers.end());
    peers.erase(std::unique(peers.begin(), peers.end()), peers.end());
    bool live = false;
    if (!peers.empty() && peers.size() <= chat::kMaxPresenceSubscriptions) {
      // The current states arrive before the answer. Without them (a server without presence)
      // the list still shows the cached last seen.
      int rc = 0;
      std::optional<chat::Status> answer = Await<chat::Status>(
          listener, flags.timeout_ms, "presence",
          [&](auto cb) { return client.SubscribePresence(peers, cb); }, &rc);
      live = answer && answer->ok();
    }
    // Presence updates may have moved a peer's last seen in the cache meanwhile.
    conversations = client.Conversations();
    if (!conversations.ok()) return PrintError("conversations", conversations.status(), flags.json);
    std::lock_guard lock(listener.mu());
    for (const auto& c : *conversations) {
      const chat::PresenceInfo* peer = nullptr;
      if (live && c.kind == chat::ConversationKind::kDirect) {
        auto it = listener.presence().find(c.peer);
        if (it != listener.presence().end()) peer = &it->second;
      }
      std::puts(ConversationLine(c, flags.json, peer).c_str());
    }
    return 0;
  });
}

int PrintHistory(chat::Client& client, Listener& listener, uint64_t conversation, uint64_t before,
                 uint32_t limit, bool json, int timeout_ms) {
  int rc = 0;
  std::optional<chat::Result<chat::HistoryResult>> result =
      Await<chat::Result<chat::HistoryResult>>(
          listener, timeout_ms, "history",
          [&](auto cb) { return client.History(conversation, before, limit, cb); }, &rc);
  if (!result) return rc;
  if (!result->ok()) return PrintError("history", result->status(), json);
  // Oldest first reads naturally on a terminal.
  const auto& messages = (*result)->messages;
  for (auto it = messages.rbegin(); it != messages.rend(); ++it) {
    chat::MessageEvent e;
    e.message = *it;
    e.status = chat::MessageStatus::kSent;
    std::puts(MessageLine(e, json).c_str());
  }
  return 0;
}

// Runs a group operation (`start` calls the client with the callback it is given), waits for
// its answer and prints the conversation or the error. Returns the exit code.
template <typename Start>
int RunGroupOp(Listener& listener, bool json, int timeout_ms, const char* what, Start start) {
  int rc = 0;
  std::optional<chat::Result<chat::ConversationInfo>> result =
      Await<chat::Result<chat::ConversationInfo>>(listener, timeout_ms, what, start, &rc);
  if (!result) return rc;
  if (!result->ok()) return PrintError(what, result->status(), json);
  std::puts(ConversationLine(**result, json).c_str());
  std::fflush(stdout);
  return 0;
}

int RunGroupCreate(const Flags& flags, const std::string& title, bool channel,
                   const std::vector<std::string>& members) {
  return WithConnection(flags, [&](chat::Client& client, Listener& listener) {
    return RunGroupOp(listener, flags.json, flags.timeout_ms, "group-create", [&](auto cb) {
      return client.CreateGroup(
          title, members,
          channel ? chat::ConversationKind::kChannel : chat::ConversationKind::kGroup, cb);
    });
  });
}

int RunMarkRead(const Flags& flags, uint64_t conversation, uint64_t seq) {
  return WithConnection(flags, [&](chat::Client& client, Listener&) {
    if (chat::Status st = client.MarkRead(conversation, seq); !st.ok()) {
      std::fprintf(stderr, "mark-read: %s\n", st.ToString().c_str());
      return 1;
    }
    // The loop applies the mark and queues its Receipt in the same turn; wait for the first.
    std::optional<chat::ConversationInfo> found;
    auto start = std::chrono::steady_clock::now();
    while (!g_interrupted &&
           std::chrono::steady_clock::now() - start < std::chrono::milliseconds(flags.timeout_ms)) {
      found.reset();
      if (auto conversations = client.Conversations(); conversations.ok()) {
        for (const auto& c : *conversations) {
          if (c.conversation_id == conversation) found = c;
        }
      }
      if (!found) break;
      if (found->read_seq >= (seq == 0 ? found->last_seq : std::min(seq, found->last_seq))) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    if (!found) {
      std::fprintf(stderr, "mark-read: conversation %llu is not known\n",
                   static_cast<unsigned long long>(conversation));
      return 1;
    }
    std::puts(ConversationLine(*found, flags.json).c_str());
    return 0;
  });
}

// Prints the users' presence as it changes, starting with the current state of each, until
// `count` updates were printed (0: no limit), `duration_ms` passed (0: no limit) or SIGINT.
int RunPresence(const Flags& flags, const std::vector<std::string>& users, uint64_t count,
                int duration_ms) {
  return WithConnection(flags, [&](chat::Client& client, Listener& listener) {
    {
      std::lock_guard lock(listener.mu());
      listener.set_print_presence(true);
    }
    int rc = 0;
    std::optional<chat::Status> answer = Await<chat::Status>(
        listener, flags.timeout_ms, "presence",
        [&](auto cb) { return client.SubscribePresence(users, cb); }, &rc);
    if (!answer) return rc;
    if (!answer->ok()) return PrintError("presence", *answer, flags.json);
    auto enough = [&] { return count > 0 && listener.presence_updates() >= count; };
    (void)listener.WaitFor([&] { return enough() || listener.auth_failed(); },
                           duration_ms > 0 ? duration_ms : -1);
    std::lock_guard lock(listener.mu());
    // Ended by the token refused after a reconnect: no more updates can come.
    if (!enough() && listener.auth_failed()) return PrintAuthFailed(listener);
    return 0;
  });
}

int RunRetention(const Flags& flags, uint64_t conversation, int64_t retention_ms) {
  return WithConnection(flags, [&](chat::Client& client, Listener& listener) {
    return RunGroupOp(listener, flags.json, flags.timeout_ms, "retention",
                      [&](auto cb) { return client.SetRetention(conversation, retention_ms, cb); });
  });
}

int RunRegisterPush(const Flags& flags, const std::string& platform, const std::string& token) {
  return WithConnection(flags, [&](chat::Client& client, Listener& listener) {
    int rc = 0;
    std::optional<chat::Status> answer = Await<chat::Status>(
        listener, flags.timeout_ms, "register-push",
        [&](auto cb) { return client.RegisterPushToken(platform, token, cb); }, &rc);
    if (!answer) return rc;
    if (!answer->ok()) return PrintError("register-push", *answer, flags.json);
    if (flags.json) {
      std::printf("{\"type\":\"push_token\",\"registered\":%s}\n",
                  token.empty() ? "false" : "true");
    } else {
      std::puts(token.empty() ? "push token unregistered" : "push token registered");
    }
    return 0;
  });
}

// Splits "a b  c" into words.
std::vector<std::string> Words(std::string_view text) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && text[i] == ' ') ++i;
    size_t j = i;
    while (j < text.size() && text[j] != ' ') ++j;
    if (j > i) out.emplace_back(text.substr(i, j - i));
    i = j;
  }
  return out;
}

int RunHistory(const Flags& flags, uint64_t conversation, uint64_t before, uint32_t limit) {
  return WithConnection(flags, [&](chat::Client& client, Listener& listener) {
    return PrintHistory(client, listener, conversation, before, limit, flags.json,
                        flags.timeout_ms);
  });
}

constexpr const char* kInteractiveHelp =
    "commands: /list  /open <conversation id|user>  /history [n]  /read  /typing\n"
    "          /group create TITLE USER...  /channel create TITLE USER...\n"
    "          /add USER...  /remove USER...  /leave  /rename TITLE  /presence USER...\n"
    "          /help  /quit\n"
    "other lines are sent to the open conversation (// sends a line beginning with /)";

// Lines read from a descriptor (the terminal, a pipe) without blocking past a check: Next()
// waits for a whole line or the end of input, and gives up as soon as `stop()` holds (checked
// every 100 ms and after a signal), so interactive mode ends when nothing can be sent any more
// even while no line comes.
class LineReader {
 public:
  explicit LineReader(int fd) : fd_(fd) {}

  // Longer lines are refused (too_long()) rather than buffered without bound.
  static constexpr size_t kMaxLineBytes = size_t{4} << 20;

  // Stores the next line, without its '\n', in `line`. Returns false at the end of input, on a
  // read error, on a line over kMaxLineBytes, or once `stop()` holds while no whole line is
  // buffered. A last line without '\n' is a line.
  template <typename Stop>
  bool Next(std::string* line, Stop stop) {
    for (;;) {
      if (const size_t eol = buffer_.find('\n'); eol != std::string::npos) {
        line->assign(buffer_, 0, eol);
        buffer_.erase(0, eol + 1);
        return true;
      }
      if (buffer_.size() > kMaxLineBytes) {
        too_long_ = true;
        return false;
      }
      if (eof_) {
        if (buffer_.empty()) return false;
        line->swap(buffer_);
        buffer_.clear();
        return true;
      }
      if (stop()) return false;
      pollfd readable{.fd = fd_, .events = POLLIN, .revents = 0};
      const int ready = poll(&readable, 1, 100);
      if (ready < 0 && errno != EINTR) return false;
      if (ready <= 0) continue;
      char chunk[4096];
      const ssize_t n = read(fd_, chunk, sizeof(chunk));
      if (n < 0 && errno != EINTR && errno != EAGAIN) return false;
      if (n == 0) eof_ = true;
      if (n > 0) buffer_.append(chunk, static_cast<size_t>(n));
    }
  }

  bool too_long() const { return too_long_; }

 private:
  const int fd_;
  std::string buffer_;
  bool eof_ = false;
  bool too_long_ = false;
};

int RunInteractive(const Flags& flags) {
  auto listener = std::make_shared<Listener>(flags.json, true);
  listener->set_verbose(true);
  auto client = OpenClient(flags, listener);
  if (!client) return 1;
  std::puts(kInteractiveHelp);
  auto group_op = [&](const char* what, auto start) {
    (void)RunGroupOp(*listener, flags.json, 5'000, what, start);
  };
  uint64_t open_conversation = 0;
  std::string open_peer;
  std::vector<std::string> typed;  // client_msg_ids of the lines sent
  auto auth_failed = [&] {
    std::lock_guard lock(listener->mu());
    return listener->auth_failed();
  };
  // A token the server refused for good ends the session: nothing typed could be sent.
  LineReader input(STDIN_FILENO);
  std::string line;
  while (!g_interrupted && !auth_failed() &&
         input.Next(&line, [&] { return g_interrupted || auth_failed(); })) {
    if (g_interrupted) break;  // Ctrl-C while reading: the line is not sent
    if (line.empty()) continue;
    if (line[0] == '/') {
      // Commands are matched without trailing blanks ("/quit " quits).
      while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) {
        line.pop_back();
      }
    }
    if (line == "/quit") break;
    if (line == "/help") {
      std::puts(kInteractiveHelp);
      continue;
    }
    if (line == "/list") {
      auto conversations = client->Conversations();
      if (!conversations.ok()) continue;
      std::lock_guard lock(listener->mu());
      for (const auto& c : *conversations) {
        // Peers watched with /presence show their live state.
        auto it = listener->presence().find(c.peer);
        const bool watched =
            c.kind == chat::ConversationKind::kDirect && it != listener->presence().end();
        std::puts(ConversationLine(c, flags.json, watched ? &it->second : nullptr).c_str());
      }
      continue;
    }
    if (line.rfind("/presence ", 0) == 0) {
      chat::Status st = client->SubscribePresence(Words(line.substr(10)), [](chat::Status answer) {
        if (!answer.ok()) std::fprintf(stderr, "presence: %s\n", answer.ToString().c_str());
      });
      if (!st.ok()) std::fprintf(stderr, "presence: %s\n", st.ToString().c_str());
      continue;
    }
    if (line.rfind("/group create ", 0) == 0 || line.rfind("/channel create ", 0) == 0) {
      const bool channel = line[1] == 'c';
      std::vector<std::string> words = Words(line.substr(channel ? 16 : 14));
      if (words.empty()) {
        std::puts("* usage: /group create TITLE USER...");
        continue;
      }
      std::string title = words[0];
      words.erase(words.begin());
      group_op("create", [&](auto cb) {
        return client->CreateGroup(
            title, words,
            channel ? chat::ConversationKind::kChannel : chat::ConversationKind::kGroup, cb);
      });
      continue;
    }
    const bool group_command = line.rfind("/add ", 0) == 0 || line.rfind("/remove ", 0) == 0 ||
                               line == "/leave" || line.rfind("/rename ", 0) == 0 ||
                               line == "/read" || line == "/typing";
    if (group_command && open_conversation == 0) {
      std::puts("* /open a conversation first");
      continue;
    }
    if (line.rfind("/add ", 0) == 0) {
      group_op("add", [&](auto cb) {
        return client->AddMembers(open_conversation, Words(line.substr(5)), cb);
      });
      continue;
    }
    if (line.rfind("/remove ", 0) == 0) {
      group_op("remove", [&](auto cb) {
        return client->RemoveMembers(open_conversation, Words(line.substr(8)), cb);
      });
      continue;
    }
    if (line == "/leave") {
      group_op("leave", [&](auto cb) { return client->Leave(open_conversation, cb); });
      continue;
    }
    if (line.rfind("/rename ", 0) == 0) {
      group_op("rename",
               [&](auto cb) { return client->RenameGroup(open_conversation, line.substr(8), cb); });
      continue;
    }
    if (line == "/read") {
      if (chat::Status st = client->MarkRead(open_conversation); !st.ok()) {
        std::fprintf(stderr, "read: %s\n", st.ToString().c_str());
      }
      continue;
    }
    if (line == "/typing") {
      (void)client->SetTyping(open_conversation, true);
      continue;
    }
    if (line.rfind("/open ", 0) == 0) {
      if (open_conversation != 0) (void)client->Unsubscribe(open_conversation);
      std::string target = line.substr(6);
      open_conversation = 0;
      open_peer.clear();
      uint64_t id = 0;
      auto [end, ec] = std::from_chars(target.data(), target.data() + target.size(), id);
      if (!target.empty() && ec == std::errc() && end == target.data() + target.size()) {
        open_conversation = id;
      } else {
        open_peer = target;
        // Reuse the direct conversation with this user if it is known.
        auto conversations = client->Conversations();
        if (conversations.ok()) {
          for (const auto& c : *conversations) {
            if (c.peer == target) open_conversation = c.conversation_id;
          }
        }
      }
      std::printf("* talking to %s\n", target.c_str());
      if (open_conversation != 0) {
        // Channels push live messages only to subscribers; harmless for other conversations.
        (void)client->Subscribe(open_conversation);
        (void)PrintHistory(*client, *listener, open_conversation, 0, 20, flags.json, 5'000);
        (void)client->MarkRead(open_conversation);
      }
      continue;
    }
    if (line.rfind("/history", 0) == 0) {
      if (open_conversation == 0) {
        std::puts("* /open a conversation first");
        continue;
      }
      uint32_t n = 20;
      if (line.size() > 9) {
        auto [end, ec] = std::from_chars(line.data() + 9, line.data() + line.size(), n);
        if (ec != std::errc() || n == 0) {
          std::puts("* usage: /history [n], n >= 1");
          continue;
        }
      }
      (void)PrintHistory(*client, *listener, open_conversation, 0, n, flags.json, 5'000);
      continue;
    }
    if (line[0] == '/' && line.rfind("//", 0) != 0) {
      // Not a command, or one without its argument: never sent as a message by mistake.
      std::printf(
          "* unknown command or missing argument: %s (/help lists the commands; start a "
          "line with // to send one that begins with /)\n",
          line.c_str());
      continue;
    }
    if (line.rfind("//", 0) == 0) line.erase(0, 1);
    if (open_conversation == 0 && open_peer.empty()) {
      std::puts("* /open a conversation first");
      continue;
    }
    auto id = open_conversation != 0 ? client->Send(open_conversation, "text/plain", line)
                                     : client->SendTo(open_peer, "text/plain", line);
    if (id.ok()) {
      typed.push_back(*id);
    } else {
      std::fprintf(stderr, "send: %s\n", id.status().ToString().c_str());
    }
    if (open_conversation != 0) {
      // Replying means the conversation was read; the sent line ends any typing indicator.
      (void)client->SetTyping(open_conversation, false);
      (void)client->MarkRead(open_conversation);
    }
  }
  // On EOF or /quit what was typed is sent before the process (and, without --cache, the
  // outbox) ends; a signal quits at once, as does a refused token (exit 1 with the reason).
  int rc = 0;
  if (!g_interrupted && auth_failed()) {
    std::lock_guard lock(listener->mu());
    rc = PrintAuthFailed(*listener);
  } else if (!g_interrupted) {
    size_t unanswered = 0;
    {
      std::lock_guard lock(listener->mu());
      unanswered = listener->Unanswered(typed);
    }
    if (unanswered > 0) {
      std::fprintf(stderr,
                   "chat-cli: waiting up to %d ms for the server to acknowledge %zu message(s)\n",
                   flags.timeout_ms, unanswered);
    }
    rc = WaitSent(*listener, typed, flags.timeout_ms);
    if (input.too_long()) {
      // The lines before it were sent (and waited for); the rest of the input is not read.
      std::fprintf(stderr, "chat-cli: an input line is longer than %zu bytes\n",
                   LineReader::kMaxLineBytes);
      if (rc == 0) rc = 2;
    }
  }
  client->Close();
  return g_interrupted ? 128 + g_signal.load() : rc;
}

}  // namespace

int main(int argc, char** argv) {
  // Durations in ms: a negative one would mean "wait forever" to Listener::WaitFor.
  const CLI::Range kNonNegative(0, std::numeric_limits<int>::max());
  CLI::App app{"chat-cli: command-line chat client"};
  app.fallthrough();
  Flags flags;
  app.add_option("--url", flags.url, "Server URL, ws:// or wss://")->capture_default_str();
  app.add_option("--token", flags.token, "Token for Hello (e.g. from `chatd token`)");
  app.add_option("--token-file", flags.token_file,
                 "Read the token from this file on every connect");
  app.add_option("--device", flags.device, "Device id, stable per installation")
      ->capture_default_str();
  app.add_option("--cache", flags.cache,
                 "SQLite cache and outbox file; default: in memory (the outbox is lost on exit)");
  app.add_flag("--json", flags.json, "One JSON object per line");
  app.add_option("--timeout-ms", flags.timeout_ms, "How long commands wait for the server")
      ->capture_default_str()
      ->check(kNonNegative);
  // The SDK refuses less than 100 ms (ClientOptions::request_timeout_ms).
  app.add_option("--request-timeout-ms", flags.request_timeout_ms,
                 "How long the SDK waits for the answer to a request before it gives up (exit 3)")
      ->capture_default_str()
      ->check(CLI::Range(uint32_t{100}, std::numeric_limits<uint32_t>::max()));
  // What goes wrong is told once, by chat-cli: the SDK's warnings repeat every OnError, and its
  // info lines narrate each connection.
  chat::examples::AddLogLevelOption(
      &app, &flags.log_level,
      "The SDK's own log lines on stderr from this level up: debug, info, warn, error or off");

  auto* send = app.add_subcommand("send", "Send text messages in order and wait for the acks");
  std::string to;
  uint64_t send_conversation = 0;
  std::vector<std::string> texts;
  send->add_option("--to", to, "User to send to (direct conversation)");
  send->add_option("--conversation", send_conversation, "Conversation id");
  send->add_option("text", texts, "Message texts")->required();

  auto* flush = app.add_subcommand("flush", "Send what the outbox in --cache holds, then exit");
  auto* outbox = app.add_subcommand("outbox", "List the pending and failed messages in --cache");
  auto* discard = app.add_subcommand("discard", "Remove failed messages from the outbox");
  std::vector<std::string> discard_ids;
  discard->add_option("client_msg_id", discard_ids, "Ids of failed messages")->required();
  auto* tail = app.add_subcommand("tail", "Print messages as they arrive, until interrupted");
  auto* history = app.add_subcommand("history", "Print a conversation's messages");
  uint64_t history_conversation = 0;
  uint64_t before = 0;
  uint32_t limit = 50;
  history->add_option("--conversation", history_conversation, "Conversation id")->required();
  history->add_option("--before", before, "Only messages with a smaller seq (0: newest)");
  history->add_option("--limit", limit, "At most this many")->capture_default_str();
  auto* conversations = app.add_subcommand("conversations", "List conversations");
  auto* group_create = app.add_subcommand("group-create", "Create a group (or a channel)");
  std::string group_title;
  bool group_channel = false;
  std::vector<std::string> group_members;
  group_create->add_option("--title", group_title, "Title")->required();
  group_create->add_flag("--channel", group_channel, "Create a channel instead of a group");
  group_create->add_option("members", group_members, "Users to add besides yourself");
  auto* mark_read = app.add_subcommand("mark-read", "Mark a conversation read");
  uint64_t read_conversation = 0;
  uint64_t read_seq = 0;
  mark_read->add_option("--conversation", read_conversation, "Conversation id")->required();
  mark_read->add_option("--seq", read_seq, "Read up to this seq (0: everything)");
  auto* presence = app.add_subcommand("presence", "Print users' presence as it changes");
  std::vector<std::string> presence_users;
  uint64_t presence_count = 0;
  int presence_duration_ms = 0;
  presence->add_option("users", presence_users, "Users to watch")->required();
  presence->add_option("--count", presence_count, "Exit after this many updates (0: no limit)");
  presence->add_option("--duration-ms", presence_duration_ms, "Exit after this long (0: no limit)")
      ->check(kNonNegative);
  auto* retention = app.add_subcommand("retention", "Set a conversation's message retention");
  uint64_t retention_conversation = 0;
  int64_t retention_ms = 0;
  retention->add_option("conversation", retention_conversation, "Conversation id")->required();
  retention
      ->add_option("ms", retention_ms,
                   "Time to live of its messages in ms; 0: the server's default, -1: keep forever")
      ->required();
  auto* register_push = app.add_subcommand("register-push", "Register this device's push token");
  std::string push_platform;
  std::string push_token;
  register_push->add_option("platform", push_platform, "apns, fcm, webhook, ...")->required();
  register_push->add_option("token", push_token, "The token; omitted: unregister the device");

  if (std::optional<int> exit = chat::examples::ParseArguments(app, argc, argv)) return *exit;
  chat::SetLogLevel(chat::examples::LogLevelNamed(flags.log_level));
  if (flags.token.empty() && flags.token_file.empty()) {
    std::fprintf(stderr, "chat-cli: --token or --token-file is required\n");
    return 2;
  }
  if (!flags.token_file.empty()) {
    std::optional<std::string> token = ReadTokenFile(flags.token_file);
    if (!token || token->empty()) {
      std::fprintf(stderr,
                   "chat-cli: cannot read --token-file %s (missing, unreadable, empty or over "
                   "64 KiB)\n",
                   flags.token_file.c_str());
      return 2;
    }
    flags.token = *token;
  }
  if ((*flush || *outbox || *discard) && flags.cache.empty()) {
    std::fprintf(stderr,
                 "chat-cli: flush, outbox and discard work on a persistent outbox: give --cache\n");
    return 2;
  }
  // Without SA_RESTART, so Ctrl-C also ends a read of the terminal that is waiting.
  struct sigaction action {};
  action.sa_handler = OnSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = 0;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);

  if (*send) return RunSend(flags, to, send_conversation, texts);
  if (*flush) return RunFlush(flags);
  if (*outbox) return RunOutbox(flags);
  if (*discard) return RunDiscard(flags, discard_ids);
  if (*tail) return RunTail(flags);
  if (*group_create) return RunGroupCreate(flags, group_title, group_channel, group_members);
  if (*mark_read) return RunMarkRead(flags, read_conversation, read_seq);
  if (*history) return RunHistory(flags, history_conversation, before, limit);
  if (*presence) return RunPresence(flags, presence_users, presence_count, presence_duration_ms);
  if (*retention) return RunRetention(flags, retention_conversation, retention_ms);
  if (*register_push) return RunRegisterPush(flags, push_platform, push_token);
  if (*conversations) return RunConversations(flags);
  return RunInteractive(flags);
}
