// chatd: the chat server built from the SDK.
//
//   chatd serve --db chat.db --secret-file secret [--port 8080 ...]   (serve is the default)
//   chatd token --user alice --ttl 24h --secret-file secret
//
// Every ServerOptions field has a flag; `--config FILE` reads the same flags from an INI/TOML
// file (one `name = value` per line, e.g. `port = 9000`). SIGINT or SIGTERM shuts down
// gracefully: queued messages are committed and acked, clients are closed with 1001, and the
// process exits 0. When the server is ready it prints exactly one line to stdout:
// "chatd listening on ws://<address>:<port>" (wss:// with TLS), an address a client can connect
// to: 127.0.0.1 for --listen 0.0.0.0, [::1] for ::, an interface's own address for its name.
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/resource.h>
#ifdef CHAT_WITH_JEMALLOC
#include <jemalloc/jemalloc.h>
#endif

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "chat/auth.h"
#include "chat/log.h"
#include "chat/server.h"
#include "chat/status.h"
#include "chat/store.h"
#include "examples/cli_args.h"

#ifdef CHAT_WITH_JEMALLOC
// Read by jemalloc when it starts. Its background thread hands pages freed after a burst (the
// handshakes of many connections, a catch-up storm) back to the system on jemalloc's decay
// schedule (10 s) even while the server is idle; without it jemalloc only purges on later
// allocations, so an idle server would keep them resident indefinitely. (Defined after
// <jemalloc/jemalloc.h>, whose extern "C" declaration gives it C linkage and default visibility.)
const char* malloc_conf = "background_thread:true";
#endif

namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;
// Descriptors beyond one per connection: refused connections on their way out, the store's
// database, WAL and shared-memory files per SQLite connection, the listening socket, the
// event loop's own.
constexpr uint64_t kFdReserve = 1024;
// Below max_connections plus this, the descriptor limit is reported as too low.
constexpr uint64_t kFdMinimumReserve = 64;

// Sets the soft descriptor limit to what max_connections needs, within the hard limit, before
// libwebsockets sizes its descriptor table by it. Raising it: many systems start processes at
// 1024. Lowering it: Debian's libwebsockets 4.1 walks that whole table on every close, so a limit
// of a million would cost milliseconds per disconnect (docs/server.md).
void FitDescriptorLimit(uint32_t max_connections) {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) {
    chat::Log(chat::LogLevel::kWarn, "chatd: cannot read the descriptor limit; left as it is");
    return;
  }
  const uint64_t wanted = uint64_t{max_connections} + kFdReserve;
  const auto soft = static_cast<rlim_t>(std::min<uint64_t>(wanted, limit.rlim_max));
  if (soft != limit.rlim_cur) {
    const rlim_t before = limit.rlim_cur;
    limit.rlim_cur = soft;
    if (setrlimit(RLIMIT_NOFILE, &limit) != 0) {
      chat::Log(chat::LogLevel::kWarn, "chatd: cannot set the descriptor limit to " +
                                           std::to_string(soft) + "; left at " +
                                           std::to_string(before));
      return;
    }
    chat::Log(chat::LogLevel::kInfo, "chatd: descriptor limit " + std::to_string(before) + " -> " +
                                         std::to_string(soft) + " (max_connections " +
                                         std::to_string(max_connections) + ")");
  }
  if (uint64_t{soft} < uint64_t{max_connections} + kFdMinimumReserve) {
    chat::Log(chat::LogLevel::kWarn,
              "chatd: the hard descriptor limit " + std::to_string(limit.rlim_max) +
                  " is too low for max_connections " + std::to_string(max_connections) +
                  "; raise it (ulimit -Hn, LimitNOFILE=) or lower --max-connections");
  }
}

// Names the allocator in the log, so a deployment can tell which one its chatd runs on.
void LogAllocator() {
#ifdef CHAT_WITH_JEMALLOC
  const char* version = nullptr;
  size_t size = sizeof(version);
  if (mallctl("version", &version, &size, nullptr, 0) == 0 && version != nullptr) {
    chat::Log(chat::LogLevel::kInfo, std::string("chatd: allocator jemalloc ") + version);
    return;
  }
  chat::Log(chat::LogLevel::kWarn, "chatd: built with jemalloc, but it does not answer");
#else
  chat::Log(chat::LogLevel::kInfo, "chatd: allocator: malloc (built without jemalloc)");
#endif
}

struct SecretFlags {
  std::string file;
  std::string env;
};

void AddSecretFlags(CLI::App* app, SecretFlags* flags) {
  CLI::Option* file =
      app->add_option("--secret-file", flags->file,
                      "File holding the HS256 signing secret (at least 32 bytes; surrounding "
                      "whitespace is ignored)");
  CLI::Option* env = app->add_option("--secret-env", flags->env,
                                     "Environment variable holding the HS256 signing secret");
  file->excludes(env);
}

// The secret's bytes, without the trailing newline an editor or `openssl rand -hex` adds.
chat::Result<std::string> LoadSecret(const SecretFlags& flags) {
  std::string secret;
  if (!flags.file.empty()) {
    std::ifstream in(flags.file, std::ios::binary);
    if (!in) return chat::InvalidArgument("--secret-file: cannot read " + flags.file);
    std::ostringstream content;
    content << in.rdbuf();
    secret = content.str();
  } else if (!flags.env.empty()) {
    const char* value = std::getenv(flags.env.c_str());
    if (value == nullptr) {
      return chat::InvalidArgument("--secret-env: " + flags.env + " is not set");
    }
    secret = value;
  } else {
    return chat::InvalidArgument("a signing secret is required: --secret-file or --secret-env");
  }
  while (!secret.empty() && std::isspace(static_cast<unsigned char>(secret.back()))) {
    secret.pop_back();
  }
  size_t start = 0;
  while (start < secret.size() && std::isspace(static_cast<unsigned char>(secret[start]))) {
    ++start;
  }
  secret.erase(0, start);
  if (secret.size() < 32) {
    return chat::InvalidArgument("the signing secret must be at least 32 bytes");
  }
  return secret;
}

// The longest --ttl: ten years.
constexpr int64_t kMaxDurationMs = int64_t{3650} * 86'400'000;

// "90s", "15m", "24h", "7d", "500ms"; a bare number is seconds.
chat::Result<int64_t> ParseDurationMs(const std::string& text) {
  size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) {
    ++digits;
  }
  if (digits == 0 || digits > 12) return chat::InvalidArgument("bad duration: " + text);
  const int64_t value = std::stoll(text.substr(0, digits));
  const std::string unit = text.substr(digits);
  int64_t scale = 0;
  if (unit == "ms") {
    scale = 1;
  } else if (unit.empty() || unit == "s") {
    scale = 1000;
  } else if (unit == "m") {
    scale = 60'000;
  } else if (unit == "h") {
    scale = 3'600'000;
  } else if (unit == "d") {
    scale = 86'400'000;
  } else {
    return chat::InvalidArgument("bad duration unit in " + text + " (use ms, s, m, h or d)");
  }
  if (value == 0) return chat::InvalidArgument("duration must be > 0: " + text);
  if (value > kMaxDurationMs / scale) {
    return chat::InvalidArgument("duration too long: " + text + " (at most 3650d)");
  }
  return value * scale;
}

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// An IPv6 address as the host of a URL: in brackets (RFC 3986), with its zone for a link-local
// address ("%25" is an escaped "%", RFC 6874).
std::string UrlHostOfIpv6(const std::string& address, const std::string& zone) {
  return "[" + address + (zone.empty() ? "" : "%25" + zone) + "]";
}

// The address of interface `name` that a client can connect to: its first IPv4 address, the one
// libwebsockets listens on, else its first IPv6 address. nullopt if it has neither.
std::optional<std::string> InterfaceUrlHost(const std::string& name) {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return std::nullopt;
  std::optional<std::string> v4;
  std::optional<std::string> v6;
  for (const ifaddrs* it = list; it != nullptr; it = it->ifa_next) {
    if (it->ifa_addr == nullptr || name != it->ifa_name) continue;
    char text[INET6_ADDRSTRLEN] = {};
    if (it->ifa_addr->sa_family == AF_INET && !v4) {
      const auto* in = reinterpret_cast<const sockaddr_in*>(it->ifa_addr);
      if (inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text)) != nullptr) v4 = text;
    } else if (it->ifa_addr->sa_family == AF_INET6 && !v6) {
      const auto* in6 = reinterpret_cast<const sockaddr_in6*>(it->ifa_addr);
      if (inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof(text)) != nullptr) {
        v6 = UrlHostOfIpv6(text, IN6_IS_ADDR_LINKLOCAL(&in6->sin6_addr) ? name : "");
      }
    }
  }
  freeifaddrs(list);
  return v4 ? v4 : v6;
}

// The host the ready line names: one a client can connect to. Listening on every interface,
// that is the loopback address of the wildcard's family; on an interface, its address (lo:
// 127.0.0.1); an IPv6 literal goes in brackets.
std::string UrlHost(const std::string& address) {
  if (address.empty() || address == "*") return "127.0.0.1";
  in_addr v4{};
  if (inet_pton(AF_INET, address.c_str(), &v4) == 1) {
    return v4.s_addr == htonl(INADDR_ANY) ? "127.0.0.1" : address;
  }
  in6_addr v6{};
  if (inet_pton(AF_INET6, address.c_str(), &v6) == 1) {
    return IN6_IS_ADDR_UNSPECIFIED(&v6) ? "[::1]" : UrlHostOfIpv6(address, "");
  }
  return InterfaceUrlHost(address).value_or(address);
}

// Waits for SIGINT/SIGTERM on a thread of its own (the signals are blocked everywhere else),
// so shutting down is ordinary code, not work inside a signal handler. A second signal exits
// at once; what was acked is durable either way.
class SignalWatcher {
 public:
  explicit SignalWatcher(sigset_t set) : set_(set) {}
  ~SignalWatcher() { Stop(); }

  void Start(chat::Server* server) {
    thread_ = std::thread([this, server] {
      pthread_setname_np(pthread_self(), "chatd-signals");
      int signals = 0;
      while (!done_.load()) {
        timespec timeout{0, 200'000'000};
        const int sig = sigtimedwait(&set_, nullptr, &timeout);
        if (sig <= 0) continue;
        if (++signals > 1) {
          chat::Log(chat::LogLevel::kWarn, "chatd: second signal, exiting now");
          std::_Exit(kExitFailure);
        }
        chat::Log(
            chat::LogLevel::kInfo,
            std::string("chatd: ") + (sig == SIGINT ? "SIGINT" : "SIGTERM") + ", shutting down");
        server->Shutdown();
      }
    });
  }

  void Stop() {
    done_.store(true);
    if (thread_.joinable()) thread_.join();
  }

 private:
  sigset_t set_;
  std::atomic<bool> done_{false};
  std::thread thread_;
};

struct ServeFlags {
  chat::ServerOptions options;
  std::string db = "chat.db";
  std::string synchronous = "full";
  uint32_t cache_kib = chat::SqliteStoreOptions().cache_size_kib;
  uint32_t writer_cache_kib = chat::SqliteStoreOptions().writer_cache_size_kib;
  uint64_t mmap_bytes = chat::SqliteStoreOptions().mmap_size_bytes;
  uint32_t recent_log_rows = chat::SqliteStoreOptions().recent_log_rows;
  uint32_t recent_log_slice_rows = chat::SqliteStoreOptions().recent_log_slice_rows;
  std::string log_level = "info";
  SecretFlags secret;
  bool no_healthz = false;
  std::string push_webhook;
  std::string push_webhook_ca_file;
  bool no_push_preview = false;
};

void AddServeFlags(CLI::App* serve, ServeFlags* f) {
  chat::ServerOptions& o = f->options;
  serve->set_config("--config", "", "Read the serve flags from this INI/TOML file (name = value)");

  serve
      ->add_option("--listen", o.listen_address,
                   "Address to listen on: IP literal or interface name; 0.0.0.0 = all")
      ->capture_default_str();
  serve->add_option("--port", o.port, "TCP port; 0 picks a free one")->capture_default_str();
  serve->add_option("--tls-cert", o.tls_cert_path, "PEM certificate; with --tls-key, serve wss");
  serve->add_option("--tls-key", o.tls_key_path, "PEM private key");
  serve->add_option("--node-id", o.node_id, "Snowflake node id, 0..1023")->capture_default_str();

  serve->add_option("--db", f->db, "SQLite database file (created if missing)")
      ->capture_default_str();
  serve
      ->add_option("--synchronous", f->synchronous,
                   "full: an acked message survives power loss; normal: survives a crash of "
                   "chatd, may lose the last commits on power loss")
      ->check(CLI::IsMember({"full", "normal"}))
      ->capture_default_str();
  serve->add_option("--cache-kib", f->cache_kib, "SQLite page cache of each reader thread, KiB")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  serve
      ->add_option("--writer-cache-kib", f->writer_cache_kib,
                   "SQLite page cache of the writer (the pages new messages go to), KiB")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  serve
      ->add_option("--mmap-bytes", f->mmap_bytes,
                   "Read the database through a memory map of up to this many bytes, shared by "
                   "all connections; 0 = read(2) only")
      ->capture_default_str();
  serve
      ->add_option("--recent-log-rows", f->recent_log_rows,
                   "New messages collect in an arrival-order log of this many and move into the "
                   "conversation-ordered table in bulk; 0 = stored there directly")
      ->check(CLI::Range(0, 1'000'000))
      ->capture_default_str();
  serve
      ->add_option("--recent-log-slice-rows", f->recent_log_slice_rows,
                   "Messages copied from a log into the conversation-ordered table per step")
      ->check(CLI::Range(1, 1'000'000))
      ->capture_default_str();
  AddSecretFlags(serve, &f->secret);
  chat::examples::AddLogLevelOption(serve, &f->log_level, "debug, info, warn, error or off");
  serve->add_flag("--no-healthz", f->no_healthz, "Do not answer GET /healthz");
  CLI::Option* push_webhook =
      serve->add_option("--push-webhook", f->push_webhook,
                        "POST push notifications for offline users as JSON to this http:// or "
                        "https:// URL");
  serve
      ->add_option("--push-webhook-ca-file", f->push_webhook_ca_file,
                   "PEM file of the CAs to verify an https webhook with, instead of the "
                   "system's")
      ->needs(push_webhook);
  serve
      ->add_option("--push-collapse-ms", o.push_collapse_ms,
                   "One push per user and conversation within this window")
      ->capture_default_str();
  serve->add_flag("--no-push-preview", f->no_push_preview,
                  "Push notifications carry no message body");

  serve
      ->add_option("--max-message-bytes", o.max_message_bytes,
                   "One assembled WebSocket message; close 1009 past it")
      ->capture_default_str();
  serve
      ->add_option("--max-hello-bytes", o.max_hello_bytes,
                   "The same before a connection's Hello succeeded (at least 1024)")
      ->capture_default_str();
  serve
      ->add_option("--receive-buffer-bytes", o.receive_buffer_bytes,
                   "Per connection receive buffer; larger messages are reassembled")
      ->capture_default_str();
  serve->add_option("--max-body-bytes", o.max_body_bytes, "Send.body")->capture_default_str();
  serve->add_option("--max-attachments", o.max_attachments, "Attachments per message")
      ->capture_default_str();
  serve
      ->add_option("--hello-timeout-ms", o.hello_timeout_ms,
                   "From connect to a valid Hello; close 4001 after")
      ->capture_default_str();
  serve
      ->add_option("--idle-timeout-ms", o.idle_timeout_ms,
                   "Without any frame from the client; close 4002 after")
      ->capture_default_str();
  serve
      ->add_option("--heartbeat-interval-ms", o.heartbeat_interval_ms, "Told to clients in Welcome")
      ->capture_default_str();
  serve
      ->add_option("--max-outbound-bytes", o.max_outbound_bytes,
                   "Queued for one connection; past it close 4003 (slow consumer)")
      ->capture_default_str();
  serve->add_option("--messages-per-second", o.messages_per_second, "Per connection, sustained")
      ->capture_default_str();
  serve->add_option("--messages-burst", o.messages_burst, "Per connection, bucket size")
      ->capture_default_str();
  serve->add_option("--bytes-per-second", o.bytes_per_second, "Per connection, inbound")
      ->capture_default_str();
  serve
      ->add_option("--max-devices-per-user", o.max_devices_per_user,
                   "Concurrent connections of one user")
      ->capture_default_str();
  serve
      ->add_option("--max-pending-connections", o.max_pending_connections,
                   "Connections that have not sent Hello yet")
      ->capture_default_str();
  serve
      ->add_option("--max-connections", o.max_connections,
                   "All connections; refused with UNAVAILABLE past it")
      ->capture_default_str();
  serve->add_option("--history-page-max", o.history_page_max, "Messages per HistoryPage")
      ->capture_default_str();
  serve->add_option("--sync-page-max", o.sync_page_max, "Messages per SyncBatch")
      ->capture_default_str();
  serve
      ->add_option("--sync-catchup-max", o.sync_catchup_max,
                   "Per conversation; past it Sync returns a Gap")
      ->capture_default_str();
  serve
      ->add_option("--max-group-members", o.max_group_members,
                   "Members per group, creator included; 0 = no cap")
      ->capture_default_str();
  serve
      ->add_option("--max-channel-members", o.max_channel_members,
                   "Members per channel, creator included; 0 = no cap")
      ->capture_default_str();
  serve
      ->add_option("--max-channel-subscriptions", o.max_channel_subscriptions,
                   "Channels one connection receives live at once")
      ->capture_default_str();
  serve
      ->add_option("--receipt-updates-max-members", o.receipt_updates_max_members,
                   "Groups of at most this many members (0 = every group) tell every member's "
                   "receipt to the others; larger ones only when all members' lowest "
                   "watermarks rise")
      ->capture_default_str();
  serve
      ->add_option("--typing-expires-ms", o.typing_expires_ms,
                   "How long clients show a typing indicator unless refreshed")
      ->capture_default_str();
  serve
      ->add_option("--typing-interval-ms", o.typing_interval_ms,
                   "Typing repeats per device and conversation within this are dropped")
      ->capture_default_str();
  serve
      ->add_option("--presence-ttl-ms", o.presence_ttl_ms,
                   "A device not heard from for this long is not online; > heartbeat interval")
      ->capture_default_str();
  serve
      ->add_option("--presence-grace-ms", o.presence_grace_ms,
                   "After a user's last device went: offline only after this; 0 = at once")
      ->capture_default_str();
  serve
      ->add_option("--presence-coalesce-ms", o.presence_coalesce_ms,
                   "At most one presence update per watched user per this many ms")
      ->capture_default_str();
  serve
      ->add_option("--max-presence-subscriptions", o.max_presence_subscriptions,
                   "Users one connection watches at once")
      ->capture_default_str();
  serve->add_option("--commit-batch-max", o.commit_batch_max, "Messages per transaction")
      ->capture_default_str();
  serve
      ->add_option(
          "--commit-delay-ms", o.commit_delay_ms,
          "Under load, wait up to this long (ms) for more messages before a commit; 0 = never")
      ->capture_default_str();
  serve
      ->add_option("--commit-delay-min-batch", o.commit_delay_min_batch,
                   "Load at which commits wait: messages queued during the previous commit")
      ->capture_default_str();
  serve
      ->add_option("--writer-queue-max", o.writer_queue_max,
                   "Messages waiting for commit; past it reads pause")
      ->capture_default_str();
  serve->add_option("--reader-threads", o.reader_threads, "Threads serving Sync and History")
      ->capture_default_str();
  serve
      ->add_option("--retention-ms", o.retention_ms,
                   "Delete messages older than this (ms); 0 keeps them forever")
      ->capture_default_str();
  serve
      ->add_option("--retention-sweep-interval-ms", o.retention_sweep_interval_ms,
                   "Between retention sweeps (ms); 0 never sweeps")
      ->capture_default_str();
  serve
      ->add_option("--retention-batch-max", o.retention_batch_max,
                   "Expired messages (and keys past their resend window) deleted per "
                   "transaction, at most")
      ->capture_default_str();
  serve
      ->add_option("--retention-resend-window-ms", o.retention_resend_window_ms,
                   "How long a deleted message's client_msg_id still answers a resend as a "
                   "duplicate (ms); 0 forgets it with the message")
      ->capture_default_str();
  // A misspelt key in a config file must not be ignored.
  serve->allow_config_extras(CLI::config_extras_mode::error);
}

// A bad value the library refused (InvalidArgument) is a usage error; anything else means the
// server could not start.
int StartFailure(const chat::Status& status) {
  return status.code() == chat::Code::kInvalidArgument ? kExitUsage : kExitFailure;
}

int Serve(ServeFlags& flags) {
  // Block the shutdown signals first, before any thread starts (every thread inherits the mask
  // and only the watcher receives them), and before the store opens, which may take a while (a
  // schema migration): a signal meanwhile waits for the watcher and ends the server gracefully.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  // A client that vanishes mid-write must not kill the process.
  signal(SIGPIPE, SIG_IGN);

  chat::SetLogLevel(chat::examples::LogLevelNamed(flags.log_level));
  chat::Result<std::string> secret = LoadSecret(flags.secret);
  if (!secret.ok()) {
    std::cerr << "chatd: " << secret.status().message() << "\n";
    return kExitUsage;
  }
  chat::ServerOptions options = flags.options;
  options.serve_healthz = !flags.no_healthz;
  options.push_preview = !flags.no_push_preview;
  if (!flags.push_webhook.empty()) {
    chat::Result<std::shared_ptr<chat::PushNotifier>> push = chat::NewWebhookNotifier(
        {.url = flags.push_webhook, .ca_file = flags.push_webhook_ca_file});
    if (!push.ok()) {
      std::cerr << "chatd: --push-webhook: " << push.status().message() << "\n";
      return kExitUsage;
    }
    options.push = *push;
  }

  chat::Result<std::shared_ptr<chat::Authenticator>> auth =
      chat::NewJwtAuthenticator({.secrets = {{"", *secret}}});
  if (!auth.ok()) {
    std::cerr << "chatd: " << auth.status().ToString() << "\n";
    return kExitUsage;
  }
  options.authenticator = *auth;

  chat::Result<std::shared_ptr<chat::MessageStore>> store =
      chat::NewSqliteStore({.path = flags.db,
                            .synchronous_full = flags.synchronous == "full",
                            .reader_connections = std::max<uint32_t>(options.reader_threads, 1),
                            .cache_size_kib = flags.cache_kib,
                            .writer_cache_size_kib = flags.writer_cache_kib,
                            .mmap_size_bytes = flags.mmap_bytes,
                            .recent_log_rows = flags.recent_log_rows,
                            .recent_log_slice_rows = flags.recent_log_slice_rows});
  if (!store.ok()) {
    std::cerr << "chatd: cannot open " << flags.db << ": " << store.status().ToString() << "\n";
    return StartFailure(store.status());
  }
  options.store = *store;

  const std::string host = UrlHost(options.listen_address);
  const bool tls = !options.tls_cert_path.empty();
  FitDescriptorLimit(options.max_connections);
  LogAllocator();
  chat::Result<std::unique_ptr<chat::Server>> server = chat::Server::Open(std::move(options));
  if (!server.ok()) {
    std::cerr << "chatd: " << server.status().ToString() << "\n";
    return StartFailure(server.status());
  }
  SignalWatcher watcher(set);
  watcher.Start(server->get());

  std::cout << "chatd listening on " << (tls ? "wss" : "ws") << "://" << host << ":"
            << (*server)->port() << std::endl;
  chat::Status status = (*server)->Run();
  watcher.Stop();
  server->reset();
  if (!status.ok()) {
    std::cerr << "chatd: " << status.ToString() << "\n";
    return kExitFailure;
  }
  return kExitOk;
}

int Token(const std::string& user, const std::string& ttl, const SecretFlags& secret_flags) {
  chat::Result<std::string> secret = LoadSecret(secret_flags);
  if (!secret.ok()) {
    std::cerr << "chatd: " << secret.status().message() << "\n";
    return kExitUsage;
  }
  chat::Result<int64_t> ttl_ms = ParseDurationMs(ttl);
  if (!ttl_ms.ok()) {
    std::cerr << "chatd: --ttl: " << ttl_ms.status().message() << "\n";
    return kExitUsage;
  }
  chat::Result<std::string> token = chat::SignJwt(*secret, "", user, NowMs(), *ttl_ms);
  if (!token.ok()) {
    // SignJwt refuses a user id chatd would refuse at Hello (the secret and the TTL were
    // checked above): a usage error, as they are.
    const bool usage = token.status().code() == chat::Code::kInvalidArgument;
    if (usage && token.status().message().starts_with("user_id:")) {
      std::cerr << "chatd: --user must be 1 to " << chat::kMaxUserIdBytes << " bytes of UTF-8\n";
    } else {
      std::cerr << "chatd: " << token.status().ToString() << "\n";
    }
    return usage ? kExitUsage : kExitFailure;
  }
  std::cout << *token << std::endl;
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  // Before anything of lws runs; process-wide, so the application's choice, not the library's.
  chat::PoolConnectionMemory();
  // chatd reads no SQLite memory statistics; without them SQLite's allocator takes no global
  // mutex per allocation (the writer thread's CPU in `direct` fell 2-3 %, docs/performance.md).
  // Process-wide, so set here by the application, before SQLite is first used, not by the library.
  if (sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0) != SQLITE_OK) {
    chat::Log(chat::LogLevel::kWarn,
              "chatd: SQLite was initialized early; memory statistics stay on");
  }
  CLI::App app{"chatd: real-time chat server (WebSocket, protobuf, SQLite)", "chatd"};
  app.require_subcommand(0, 1);

  // The serve flags live on the top-level app, so `serve` is the default (`chatd --port 9000`
  // means `chatd serve --port 9000`) and a config file holds them as plain `name = value`
  // lines; `serve` passes its flags through to them.
  ServeFlags serve_flags;
  AddServeFlags(&app, &serve_flags);
  CLI::App* serve = app.add_subcommand(
      "serve", "Serve chat over WebSocket (the default; its flags are listed by chatd --help)");
  serve->fallthrough();

  CLI::App* token = app.add_subcommand("token", "Print a signed token for a user (development)");
  std::string user;
  std::string ttl = "24h";
  SecretFlags token_secret;
  token->add_option("--user", user, "User id (the token's sub)")->required();
  token->add_option("--ttl", ttl, "Validity: 90s, 15m, 24h, 7d, 500ms")->capture_default_str();
  AddSecretFlags(token, &token_secret);

  if (std::optional<int> exit = chat::examples::ParseArguments(app, argc, argv)) return *exit;

  if (*token) return Token(user, ttl, token_secret);
  return Serve(serve_flags);
}
