// Shared pieces of chat-bench: clocks, CPU and memory readings of a process, the latency
// histogram and the JSON writer every workload reports with.
#ifndef CHAT_BENCH_BENCH_UTIL_H_
#define CHAT_BENCH_BENCH_UTIL_H_

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

namespace chat::bench {

inline int64_t NowNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

inline int64_t WallMs() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1'000'000;
}

inline double CpuSecondsSelf() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

// User + system CPU seconds from a /proc stat file (a process's, all its threads, or one
// thread's); -1 when it cannot be read. The resolution is one clock tick (10 ms here), so the
// callers measure over seconds.
inline double StatCpuSeconds(const std::filesystem::path& stat_path) {
  std::ifstream in(stat_path);
  std::string line;
  if (!std::getline(in, line)) return -1;
  // The command, in parentheses, may hold spaces; the fields after it start at field 3 (state).
  const size_t paren = line.rfind(')');
  if (paren == std::string::npos || paren + 2 > line.size()) return -1;
  std::istringstream fields(line.substr(paren + 2));
  std::string field;
  uint64_t ticks = 0;  // utime and stime are fields 14 and 15
  for (int index = 3; index <= 15 && fields >> field; ++index) {
    if (index == 14 || index == 15) ticks += std::stoull(field);
  }
  return static_cast<double>(ticks) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// CPU seconds (user + system, all threads) of another process; -1 when it cannot be read.
inline double CpuSecondsOf(int pid) {
  if (pid <= 0) return -1;
  return StatCpuSeconds("/proc/" + std::to_string(pid) + "/stat");
}

// User + system CPU seconds of each of `pid`'s threads, summed by thread name (chatd names its
// threads: "chatd" is the event loop, "chat-writer", "chat-reader", "chat-checkpoint"...).
// Empty when the process cannot be read; a thread that exits meanwhile is left out.
inline std::map<std::string, double> ThreadCpuSecondsOf(int pid) {
  std::map<std::string, double> by_name;
  if (pid <= 0) return by_name;
  std::error_code error;
  const std::filesystem::path tasks = "/proc/" + std::to_string(pid) + "/task";
  for (const auto& task : std::filesystem::directory_iterator(tasks, error)) {
    std::string name;
    std::ifstream comm(task.path() / "comm");
    if (!std::getline(comm, name)) continue;
    const double seconds = StatCpuSeconds(task.path() / "stat");
    if (seconds >= 0) by_name[name] += seconds;
  }
  return by_name;
}

// A "Key:   123 kB" line of a /proc file, in KiB; -1 when absent.
inline int64_t ProcKb(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      return std::strtoll(line.c_str() + key.size() + 1, nullptr, 10);
    }
  }
  return -1;
}

inline int64_t RssKbOf(int pid) {
  return pid > 0 ? ProcKb("/proc/" + std::to_string(pid) + "/status", "VmRSS") : -1;
}
inline int64_t PeakRssKbOf(int pid) {
  return pid > 0 ? ProcKb("/proc/" + std::to_string(pid) + "/status", "VmHWM") : -1;
}
inline int64_t SlabKb() { return ProcKb("/proc/meminfo", "Slab"); }

// A log-bucketed latency histogram in the manner of HdrHistogram: values below 64 ns are exact,
// above that each power of two is split into 32 buckets, so a reported percentile is at most ~3%
// above the true value (it is the upper edge of its bucket, capped by the exact maximum).
class Histogram {
 public:
  void Record(int64_t value_ns) {
    if (value_ns < 0) value_ns = 0;
    ++counts_[Index(value_ns)];
    ++count_;
    max_ = std::max(max_, value_ns);
  }
  int64_t count() const { return count_; }
  int64_t max() const { return max_; }
  int64_t Percentile(double fraction) const {
    if (count_ == 0) return 0;
    auto rank = static_cast<int64_t>(fraction * static_cast<double>(count_) + 0.999999);
    rank = std::clamp<int64_t>(rank, 1, count_);
    int64_t seen = 0;
    for (size_t i = 0; i < counts_.size(); ++i) {
      seen += counts_[i];
      if (seen >= rank) return std::min(UpperEdge(i), max_);
    }
    return max_;
  }
  void Merge(const Histogram& other) {
    for (size_t i = 0; i < counts_.size(); ++i) counts_[i] += other.counts_[i];
    count_ += other.count_;
    max_ = std::max(max_, other.max_);
  }
  // {"n":..,"p50_us":..,"p99_us":..,"p999_us":..,"max_us":..}
  std::string Json() const {
    char buffer[256];
    std::snprintf(buffer, sizeof buffer,
                  "{\"n\":%" PRId64
                  ",\"p50_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,"
                  "\"max_us\":%.1f}",
                  count_, Us(Percentile(0.5)), Us(Percentile(0.99)), Us(Percentile(0.999)),
                  Us(max_));
    return buffer;
  }

 private:
  static constexpr int kSubBits = 5;
  static double Us(int64_t ns) { return static_cast<double>(ns) / 1000.0; }
  static size_t Index(int64_t value) {
    auto v = static_cast<uint64_t>(value);
    if (v < 64) return v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - kSubBits;
    uint64_t mantissa = v >> shift;  // 32..63
    return 64 + static_cast<size_t>(shift - 1) * 32 + static_cast<size_t>(mantissa - 32);
  }
  static int64_t UpperEdge(size_t index) {
    if (index < 64) return static_cast<int64_t>(index);
    size_t shift = (index - 64) / 32 + 1;
    uint64_t mantissa = (index - 64) % 32 + 32;
    return static_cast<int64_t>(((mantissa + 1) << shift) - 1);
  }

  std::array<int64_t, 64 + 58 * 32> counts_{};
  int64_t count_ = 0;
  int64_t max_ = 0;
};

// Minimal JSON object writer: enough for flat metrics and nested raw values.
class JsonObject {
 public:
  // `text` as a JSON string (quotes and backslashes escaped, control characters dropped).
  static std::string Quoted(const std::string& text) {
    std::string quoted = "\"";
    for (char c : text) {
      if (c == '"' || c == '\\') quoted += '\\';
      if (static_cast<unsigned char>(c) >= 0x20) quoted += c;
    }
    return quoted + "\"";
  }
  JsonObject& Add(const std::string& key, const std::string& value) {
    return Raw(key, Quoted(value));
  }
  JsonObject& Add(const std::string& key, const char* value) {
    return Add(key, std::string(value));
  }
  JsonObject& Add(const std::string& key, int64_t value) { return Raw(key, std::to_string(value)); }
  JsonObject& Add(const std::string& key, int value) { return Raw(key, std::to_string(value)); }
  JsonObject& Add(const std::string& key, bool value) { return Raw(key, value ? "true" : "false"); }
  JsonObject& Add(const std::string& key, double value) {
    char buffer[64];
    std::snprintf(buffer, sizeof buffer, "%.3f", value);
    return Raw(key, buffer);
  }
  JsonObject& Raw(const std::string& key, const std::string& json) {
    if (!text_.empty()) text_ += ",";
    text_ += Quoted(key) + ":" + json;
    return *this;
  }
  std::string str() const { return "{" + text_ + "}"; }

 private:
  std::string text_;
};

// What each thread name used between two ThreadCpuSecondsOf readings, as a JSON object.
inline std::string ThreadCpuJson(const std::map<std::string, double>& before,
                                 const std::map<std::string, double>& after) {
  JsonObject json;
  for (const auto& [name, seconds] : after) {
    auto it = before.find(name);
    json.Add(name, seconds - (it == before.end() ? 0 : it->second));
  }
  return json.str();
}

// Workloads that use the SDK in-process rather than the protocol (sdk_bench.cc). Each prints one
// JSON object on stdout and returns the process exit code.
struct SdkOptions {
  std::string workload;
  std::string store_path;          // history-gen, history-store: the SQLite file
  std::string conversations_file;  // history-gen writes "user conversation_id" lines here
  int conversations = 100000;
  int messages_per_conversation = 100;
  int batch = 10000;
  int burst = 10;  // history-gen: consecutive messages of one conversation between turns
  // history-gen, history-store, push-store: SqliteStoreOptions::cache_size_kib and
  // mmap_size_bytes.
  uint32_t cache_size_kib = 2000;
  uint64_t mmap_size_bytes = 0;
  int reads = 10000;
  int members = 100000;         // receipt-store: the channel's members (--channel-members)
  int unread = 0;               // receipt-store: posts in the channel the receipts leave unread
  int other_conversations = 0;  // receipt-store: the member's direct conversations besides;
                                // push-store: each user's direct conversations
  int users = 256;              // push-store: users, all of them asked for in each call
  // push-store: each user's conversations left unread (-1: all).
  int unread_conversations = -1;
  int page = 50;
  int sends = 20000;
  int body_bytes = 64;
  std::string url;   // client: a chatd to drain the outbox into ("" = offline only)
  std::string user;  // client: the user to connect as ("" = <label>-me)
  std::string secret_file;
  std::string label = "sdk";
  double timeout_s = 120;
};

int RunHistoryGen(const SdkOptions& options);
int RunHistoryStore(const SdkOptions& options);
int RunClient(const SdkOptions& options);
int RunReceiptStore(const SdkOptions& options);
int RunPushStore(const SdkOptions& options);

}  // namespace chat::bench

#endif  // CHAT_BENCH_BENCH_UTIL_H_
