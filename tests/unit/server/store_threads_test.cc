// StoreThreads (src/server/store_threads.h): group commit, completion order, failures, bounds.
#include "src/server/store_threads.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "chat/store.h"

namespace chat::server {
namespace {

// What a test store was called with, and a gate its calls can wait at until Open().
template <typename T>
class GatedLog {
 public:
  // Records `item`; with `wait`, returns only once Open() was called.
  void Record(T item, bool wait) {
    std::unique_lock<std::mutex> lock(mu_);
    items_.push_back(std::move(item));
    cv_.notify_all();
    if (wait) cv_.wait(lock, [this] { return open_; });
  }
  bool WaitFor(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(10), [&] { return items_.size() >= n; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  std::vector<T> items() {
    std::lock_guard<std::mutex> lock(mu_);
    return items_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<T> items_;
  bool open_ = false;
};

// Records the size of every Append batch; every Append waits at the gate until Open().
// Fails every Append with `fail` when set, or returns one result too few with `short_results`.
class RecordingStore : public MessageStoreWrapper {
 public:
  RecordingStore() : MessageStoreWrapper(NewMemoryStore()) {}

  Status Append(std::span<const AppendRequest> batch, std::vector<AppendResult>* results) override {
    log_.Record(batch.size(), /*wait=*/true);
    if (!fail_.ok()) return fail_;
    if (fail_next_.exchange(false)) return Unavailable("disk full");
    Status status = MessageStoreWrapper::Append(batch, results);
    if (short_results_ && !results->empty()) results->pop_back();
    return status;
  }

  bool WaitBatches(size_t n) { return log_.WaitFor(n); }
  void Open() { log_.Open(); }
  std::vector<size_t> batches() { return log_.items(); }

  Status fail_;
  std::atomic<bool> fail_next_ = false;  // fails the next Append once
  bool short_results_ = false;

 private:
  GatedLog<size_t> log_;
};

// Opens a RecordingStore's gate when the test ends, also when a REQUIRE failed while an Append
// was held at it, so that stopping the writer cannot hang. Declare it after the StoreThreads.
struct OpenAtEnd {
  RecordingStore* store;
  ~OpenAtEnd() { store->Open(); }
};

// Collects completions as the loop would, waiting on the wake callback.
class Collector {
 public:
  std::function<void()> WakeFn() {
    return [this] {
      std::lock_guard<std::mutex> lock(mu_);
      ++wakes_;
      cv_.notify_all();
    };
  }

  // Takes completions until `appends` append completions were seen (bounded wait).
  bool CollectAppends(StoreThreads& threads, size_t appends) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (appends_.size() < appends) {
      std::vector<AppendDone> a;
      std::vector<ReadDone> r;
      std::vector<ExpiredRange> e;
      threads.TakeCompletions(&a, &r, &e);
      for (AppendDone& d : a) appends_.push_back(std::move(d));
      for (ReadDone& d : r) reads_.push_back(std::move(d));
      if (appends_.size() >= appends) break;
      std::unique_lock<std::mutex> lock(mu_);
      if (!cv_.wait_until(lock, deadline, [&] { return wakes_ > seen_; })) return false;
      seen_ = wakes_;
    }
    return true;
  }

  bool CollectReads(StoreThreads& threads, size_t reads) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (reads_.size() < reads) {
      std::vector<AppendDone> a;
      std::vector<ReadDone> r;
      std::vector<ExpiredRange> e;
      threads.TakeCompletions(&a, &r, &e);
      for (AppendDone& d : a) appends_.push_back(std::move(d));
      for (ReadDone& d : r) reads_.push_back(std::move(d));
      if (reads_.size() >= reads) break;
      std::unique_lock<std::mutex> lock(mu_);
      if (!cv_.wait_until(lock, deadline, [&] { return wakes_ > seen_; })) return false;
      seen_ = wakes_;
    }
    return true;
  }

  std::vector<AppendDone> appends_;
  std::vector<ReadDone> reads_;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int wakes_ = 0;
  int seen_ = 0;
};

AppendJob Job(uint64_t token) {
  AppendJob job;
  job.token = token;
  job.request.peer = "bob";
  job.request.sender = "alice";
  job.request.sender_device = "alice-1";
  job.request.client_msg_id = "client-msg-id-" + std::to_string(1000 + token);
  job.request.message_id = token;
  job.request.server_time_ms = 1'700'000'000'000;
  job.request.body = "m" + std::to_string(token);
  return job;
}

// The names of this process's threads, one entry per thread.
std::vector<std::string> ThreadNames() {
  std::vector<std::string> names;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string name;
    if (std::getline(comm, name)) names.push_back(name);
  }
  return names;
}

TEST_CASE("store threads: the writer and the readers are named threads") {
  auto store = std::make_shared<RecordingStore>();
  Collector collector;
  StoreThreads threads(store, {.reader_threads = 3}, collector.WakeFn());
  threads.Start();
  // Each thread names itself as it starts.
  auto count = [](const std::string& name) {
    const std::vector<std::string> names = ThreadNames();
    return std::count(names.begin(), names.end(), name);
  };
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while ((count("chat-writer") != 1 || count("chat-reader") != 3) &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  CHECK(count("chat-writer") == 1);
  CHECK(count("chat-reader") == 3);
  threads.Stop();
  CHECK(count("chat-writer") == 0);
  CHECK(count("chat-reader") == 0);
}

TEST_CASE("store threads: appends queued during a commit go in the next group, in order") {
  auto store = std::make_shared<RecordingStore>();
  Collector collector;
  StoreThreads threads(store, {.commit_batch_max = 4, .reader_threads = 1}, collector.WakeFn());
  OpenAtEnd open_at_end{store.get()};
  threads.Start();
  threads.SubmitAppend(Job(1));
  REQUIRE(store->WaitBatches(1));  // the first group (1 message) is held at the gate
  for (uint64_t t = 2; t <= 10; ++t) threads.SubmitAppend(Job(t));
  CHECK(threads.appends_pending() == 10);
  store->Open();
  REQUIRE(collector.CollectAppends(threads, 10));
  CHECK(store->batches() == std::vector<size_t>{1, 4, 4, 1});
  for (size_t i = 0; i < collector.appends_.size(); ++i) {
    const AppendDone& done = collector.appends_[i];
    CHECK(done.token == i + 1);
    CHECK(done.commit_status.ok());
    CHECK(done.result.status.ok());
    CHECK(done.result.message.seq == i + 1);
  }
  CHECK(threads.appends_pending() == 0);
  threads.Stop();
}

TEST_CASE("store threads: a failed transaction fails every message of its group") {
  auto store = std::make_shared<RecordingStore>();
  store->fail_ = Unavailable("disk full");
  store->Open();
  Collector collector;
  StoreThreads threads(store, {.commit_batch_max = 8, .reader_threads = 1}, collector.WakeFn());
  threads.Start();
  threads.SubmitAppend(Job(1));
  threads.SubmitAppend(Job(2));
  REQUIRE(collector.CollectAppends(threads, 2));
  for (const AppendDone& done : collector.appends_) {
    CHECK(done.commit_status.code() == Code::kUnavailable);
    CHECK(done.commit_status.message() == "disk full");
  }
  threads.Stop();
}

TEST_CASE("store threads: a store returning too few results is INTERNAL, never an ack") {
  auto store = std::make_shared<RecordingStore>();
  store->short_results_ = true;
  store->Open();
  Collector collector;
  StoreThreads threads(store, {.reader_threads = 1}, collector.WakeFn());
  threads.Start();
  threads.SubmitAppend(Job(1));
  REQUIRE(collector.CollectAppends(threads, 1));
  CHECK(collector.appends_[0].commit_status.code() == Code::kInternal);
  threads.Stop();
}

TEST_CASE("store threads: past append_queue_max a message fails at once with UNAVAILABLE") {
  auto store = std::make_shared<RecordingStore>();
  Collector collector;
  StoreThreads threads(store,
                       {.commit_batch_max = 1,
                        .reader_threads = 1,
                        .append_queue_max = 2,
                        .overload_retry_after_ms = 1234},
                       collector.WakeFn());
  OpenAtEnd open_at_end{store.get()};
  threads.Start();
  threads.SubmitAppend(Job(1));
  REQUIRE(store->WaitBatches(1));  // job 1 is committing; the queue is empty
  threads.SubmitAppend(Job(2));
  threads.SubmitAppend(Job(3));
  threads.SubmitAppend(Job(4));  // the queue holds 2: refused
  REQUIRE(collector.CollectAppends(threads, 1));
  CHECK(collector.appends_[0].token == 4);
  CHECK(collector.appends_[0].commit_status.code() == Code::kUnavailable);
  CHECK(collector.appends_[0].commit_status.retry_after_ms() == 1234);
  CHECK(threads.appends_pending() == 3);
  store->Open();
  REQUIRE(collector.CollectAppends(threads, 4));
  for (size_t i = 1; i < 4; ++i) {
    CHECK(collector.appends_[i].token == i);
    CHECK(collector.appends_[i].commit_status.ok());
  }
  threads.Stop();
}

// A job of connection `session` (Job's client_msg_id follows the token unless `key` is given).
AppendJob SessionJob(uint64_t token, SessionId session, uint64_t key = 0) {
  AppendJob job = Job(token);
  job.session = session;
  if (key != 0) job.request.client_msg_id = "client-msg-id-" + std::to_string(1000 + key);
  return job;
}

const AppendDone& DoneFor(const Collector& collector, uint64_t token) {
  for (const AppendDone& done : collector.appends_) {
    if (done.token == token) return done;
  }
  FAIL("no completion for token " << token);
  return collector.appends_.front();
}

// Sends the messages of `session` with keys `first_key` and `second_key` again (tokens `token`
// and `token + 1`), one at a time, and checks that both are stored, in that order.
void ResendInOrder(StoreThreads& threads, Collector& collector, SessionId session, uint64_t token,
                   uint64_t first_key, uint64_t second_key) {
  threads.SubmitAppend(SessionJob(token, session, first_key));
  REQUIRE(collector.CollectAppends(threads, collector.appends_.size() + 1));
  threads.SubmitAppend(SessionJob(token + 1, session, second_key));
  REQUIRE(collector.CollectAppends(threads, collector.appends_.size() + 1));
  const AppendDone& first = DoneFor(collector, token);
  const AppendDone& second = DoneFor(collector, token + 1);
  REQUIRE(first.commit_status.ok());
  REQUIRE(second.commit_status.ok());
  CHECK(first.result.message.seq < second.result.message.seq);
}

// A connection's messages are stored in the order it sent them: after one was refused past the
// bound, its later ones are refused too until that one is sent again.
TEST_CASE("store threads: after a refusal a connection's later messages wait for the refused one") {
  auto store = std::make_shared<RecordingStore>();
  Collector collector;
  StoreThreads threads(store, {.commit_batch_max = 1, .reader_threads = 1, .append_queue_max = 1},
                       collector.WakeFn());
  OpenAtEnd open_at_end{store.get()};
  threads.Start();
  threads.SubmitAppend(SessionJob(1, 9));
  REQUIRE(store->WaitBatches(1));          // job 1 is committing; the queue is empty
  threads.SubmitAppend(SessionJob(2, 9));  // queued
  threads.SubmitAppend(SessionJob(3, 7));  // the queue is full: refused, connection 7 held
  store->Open();
  REQUIRE(collector.CollectAppends(threads, 3));
  CHECK(DoneFor(collector, 3).commit_status.code() == Code::kUnavailable);
  // Room again, but 7's next message must not go before its refused one.
  threads.SubmitAppend(SessionJob(4, 7));
  REQUIRE(collector.CollectAppends(threads, 4));
  const Status& held = DoneFor(collector, 4).commit_status;
  CHECK(held.code() == Code::kUnavailable);
  CHECK(held.message() ==
        "an earlier message from this connection was not stored; send it again first");
  // Other connections are not held. Then the refused message again (its client_msg_id), then
  // the next: stored in that order. (One at a time: the queue holds one.)
  threads.SubmitAppend(SessionJob(5, 8));
  REQUIRE(collector.CollectAppends(threads, 5));
  CHECK(DoneFor(collector, 5).commit_status.ok());
  ResendInOrder(threads, collector, 7, 6, /*first_key=*/3, /*second_key=*/4);
  threads.Stop();
}

// The same after a failed commit group: the connection's messages queued behind it are refused.
TEST_CASE("store threads: after a failed commit a connection's queued messages are refused") {
  auto store = std::make_shared<RecordingStore>();
  store->fail_next_ = true;
  Collector collector;
  StoreThreads threads(store, {.commit_batch_max = 4, .reader_threads = 1}, collector.WakeFn());
  OpenAtEnd open_at_end{store.get()};
  threads.Start();
  threads.SubmitAppend(SessionJob(1, 7));
  REQUIRE(store->WaitBatches(1));  // job 1's group is held at the gate, then fails
  threads.SubmitAppend(SessionJob(2, 7));
  threads.SubmitAppend(SessionJob(3, 8));
  store->Open();
  REQUIRE(collector.CollectAppends(threads, 3));
  CHECK(DoneFor(collector, 1).commit_status.message() == "disk full");
  CHECK(DoneFor(collector, 2).commit_status.code() == Code::kUnavailable);
  CHECK(DoneFor(collector, 3).commit_status.ok());
  CHECK(store->batches() == std::vector<size_t>{1, 1});  // job 2 never reached the store
  ResendInOrder(threads, collector, 7, 4, /*first_key=*/1, /*second_key=*/2);
  threads.Stop();
}

// Held on the earliest: a message refused past the bound while an earlier one of the same
// connection was committing, in a group that then fails, leaves the connection waiting for the
// earlier one (the client resends oldest first).
TEST_CASE("store threads: a connection is held on the earliest of its messages not stored") {
  auto store = std::make_shared<RecordingStore>();
  store->fail_next_ = true;
  Collector collector;
  StoreThreads threads(store, {.commit_batch_max = 1, .reader_threads = 1, .append_queue_max = 1},
                       collector.WakeFn());
  OpenAtEnd open_at_end{store.get()};
  threads.Start();
  threads.SubmitAppend(SessionJob(1, 7));  // A: committing, its group fails
  REQUIRE(store->WaitBatches(1));
  threads.SubmitAppend(SessionJob(2, 9));  // fills the queue
  threads.SubmitAppend(SessionJob(3, 7));  // B: refused past the bound
  store->Open();
  REQUIRE(collector.CollectAppends(threads, 3));
  CHECK(DoneFor(collector, 1).commit_status.message() == "disk full");
  CHECK(DoneFor(collector, 3).commit_status.code() == Code::kUnavailable);
  ResendInOrder(threads, collector, 7, 4, /*first_key=*/1, /*second_key=*/3);  // A, then B
  threads.Stop();
}

// A failure no client retries (DATA_LOSS) holds nothing back: the message is not sent again.
TEST_CASE("store threads: a failure that is not retried holds no connection back") {
  auto store = std::make_shared<RecordingStore>();
  store->fail_ = DataLoss("damaged");
  store->Open();
  Collector collector;
  StoreThreads threads(store, {.reader_threads = 1}, collector.WakeFn());
  threads.Start();
  threads.SubmitAppend(SessionJob(1, 7));
  REQUIRE(collector.CollectAppends(threads, 1));
  threads.SubmitAppend(SessionJob(2, 7));
  REQUIRE(collector.CollectAppends(threads, 2));
  CHECK(DoneFor(collector, 2).commit_status.message() == "damaged");  // it reached the store
  CHECK(store->batches().size() == 2);
  threads.Stop();
}

// Connection 7's first message (job 1) fails in a store whose next commit fails, then its second
// (job 2) is submitted; both are collected.
void FailFirstThenSendAnother(StoreThreads& threads, Collector& collector) {
  threads.SubmitAppend(SessionJob(1, 7));
  REQUIRE(collector.CollectAppends(threads, 1));
  REQUIRE(DoneFor(collector, 1).commit_status.code() == Code::kUnavailable);
  threads.SubmitAppend(SessionJob(2, 7));
  REQUIRE(collector.CollectAppends(threads, 2));
}

// A client that never sends the refused message again (it gave it up) is held only for
// held_send_timeout_ms.
TEST_CASE("store threads: a hold runs out after held_send_timeout_ms") {
  auto store = std::make_shared<RecordingStore>();
  store->fail_next_ = true;
  store->Open();
  Collector collector;
  StoreThreads threads(store, {.reader_threads = 1, .held_send_timeout_ms = 1000},
                       collector.WakeFn());
  threads.Start();
  const auto refused_at = std::chrono::steady_clock::now();
  FailFirstThenSendAnother(threads, collector);
  if (std::chrono::steady_clock::now() - refused_at < std::chrono::milliseconds(1000)) {
    CHECK(DoneFor(collector, 2).commit_status.code() == Code::kUnavailable);
  }
  std::this_thread::sleep_until(refused_at + std::chrono::milliseconds(1100));
  threads.SubmitAppend(SessionJob(3, 7));
  REQUIRE(collector.CollectAppends(threads, 3));
  CHECK(DoneFor(collector, 3).commit_status.ok());
  threads.Stop();
}

// A new connection starts afresh: ForgetSession (the connection closed) drops the hold.
TEST_CASE("store threads: a closed connection's hold is forgotten") {
  auto store = std::make_shared<RecordingStore>();
  store->fail_next_ = true;
  store->Open();
  Collector collector;
  StoreThreads threads(store, {.reader_threads = 1}, collector.WakeFn());
  threads.Start();
  FailFirstThenSendAnother(threads, collector);
  CHECK(DoneFor(collector, 2).commit_status.code() == Code::kUnavailable);
  threads.ForgetSession(7);
  threads.SubmitAppend(SessionJob(3, 7));
  REQUIRE(collector.CollectAppends(threads, 3));
  CHECK(DoneFor(collector, 3).commit_status.ok());
  threads.Stop();
}

TEST_CASE("store threads: SubmitAppends hands a loop pass to the writer as one group") {
  auto store = std::make_shared<RecordingStore>();
  store->Open();
  Collector collector;
  StoreThreads threads(store, {.commit_batch_max = 16, .reader_threads = 1, .append_queue_max = 5},
                       collector.WakeFn());
  std::vector<AppendJob> jobs;
  for (uint64_t t = 1; t <= 7; ++t) jobs.push_back(Job(t));
  // Submitted before the writer runs, so nothing is taken while the vector is being queued.
  threads.SubmitAppends(&jobs);
  CHECK(jobs.empty());
  CHECK(threads.appends_pending() == 5);
  threads.Start();
  REQUIRE(collector.CollectAppends(threads, 7));
  CHECK(store->batches() == std::vector<size_t>{5});
  // The two past the bound fail at once (they come first); the five accepted commit in order.
  REQUIRE(collector.appends_.size() == 7);
  for (size_t i = 0; i < 2; ++i) {
    CHECK(collector.appends_[i].token == 6 + i);
    CHECK(collector.appends_[i].commit_status.code() == Code::kUnavailable);
  }
  for (size_t i = 2; i < 7; ++i) {
    CHECK(collector.appends_[i].token == i - 1);
    CHECK(collector.appends_[i].commit_status.ok());
    CHECK(collector.appends_[i].result.message.seq == i - 1);
  }
  threads.Stop();
}

TEST_CASE("store threads: Stop commits what was accepted before the writer exits") {
  auto store = std::make_shared<RecordingStore>();
  Collector collector;
  auto threads = std::make_unique<StoreThreads>(
      store, StoreThreadsOptions{.commit_batch_max = 16, .reader_threads = 1}, collector.WakeFn());
  OpenAtEnd open_at_end{store.get()};
  threads->Start();
  threads->SubmitAppend(Job(1));
  REQUIRE(store->WaitBatches(1));
  threads->SubmitAppend(Job(2));
  threads->SubmitAppend(Job(3));
  store->Open();
  threads->Stop();
  CHECK(store->batches() == std::vector<size_t>{1, 2});
  REQUIRE(collector.CollectAppends(*threads, 3));
  const ConversationId conversation = collector.appends_[0].result.message.conversation_id;
  Result<HistoryReply> history = store->History({.user = "alice", .conversation_id = conversation});
  REQUIRE(history.ok());
  CHECK(history->messages.size() == 3);
}

// commit_delay_ms of a minute: a wait that should not happen fails the bounded collections.
const StoreThreadsOptions kPaced{.commit_batch_max = 4,
                                 .commit_delay_ms = 60'000,
                                 .commit_delay_min_batch = 2,
                                 .reader_threads = 1};

TEST_CASE("store threads: below the load set by commit_delay_min_batch, nothing waits") {
  auto store = std::make_shared<RecordingStore>();
  store->Open();
  Collector collector;
  StoreThreads threads(store, kPaced, collector.WakeFn());
  threads.Start();
  for (uint64_t t = 1; t <= 3; ++t) {
    threads.SubmitAppend(Job(t));
    REQUIRE(collector.CollectAppends(threads, t));  // committed alone, not a minute later
  }
  CHECK(store->batches() == std::vector<size_t>{1, 1, 1});
  threads.Stop();
}

// Polls `done` every millisecond for up to 10 s.
bool Eventually(const std::function<bool()>& done) {
  for (int i = 0; i < 10'000 && !done(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return done();
}

// A writer under `options` (kPaced by default) whose job 1 was held in its commit while jobs 2
// and 3 queued up (the load), then let go: 2 and 3 now wait up to a minute for a fuller group.
struct PacedUnderLoad {
  explicit PacedUnderLoad(StoreThreadsOptions options = kPaced)
      : threads(store, std::move(options), collector.WakeFn()) {
    threads.Start();
    threads.SubmitAppend(Job(1));
    REQUIRE(store->WaitBatches(1));
    threads.SubmitAppend(Job(2));
    threads.SubmitAppend(Job(3));
    store->Open();
    REQUIRE(Eventually([this] { return threads.writer_waiting(); }));
    REQUIRE(store->batches() == std::vector<size_t>{1});
  }

  std::shared_ptr<RecordingStore> store = std::make_shared<RecordingStore>();
  Collector collector;
  StoreThreads threads;
  OpenAtEnd open_at_end{store.get()};
};

TEST_CASE("store threads: under load the writer waits for a fuller group, and not after it") {
  PacedUnderLoad f;
  // The fourth and fifth fill the group and it commits at once.
  f.threads.SubmitAppend(Job(4));
  f.threads.SubmitAppend(Job(5));
  REQUIRE(f.collector.CollectAppends(f.threads, 5));
  CHECK(f.store->batches() == std::vector<size_t>{1, 4});
  // Nothing queued up during that commit: the load is gone, the next message does not wait.
  f.threads.SubmitAppend(Job(6));
  REQUIRE(f.collector.CollectAppends(f.threads, 6));
  CHECK(f.store->batches() == std::vector<size_t>{1, 4, 1});
  for (size_t i = 0; i < f.collector.appends_.size(); ++i) {
    CHECK(f.collector.appends_[i].token == i + 1);
    CHECK(f.collector.appends_[i].commit_status.ok());
  }
  f.threads.Stop();
}

TEST_CASE("store threads: the wait for a fuller group ends at the queue's bounds") {
  for (const auto& [name, bounded] :
       std::vector<std::pair<std::string, StoreThreadsOptions>>{{"append_queue_max",
                                                                 {.commit_batch_max = 4,
                                                                 .commit_delay_ms = 60'000,
                                                                 .commit_delay_min_batch = 2,
                                                                 .reader_threads = 1,
                                                                 .append_queue_max = 3}},
                                                                {"append_queue_soft_max",
                                                                 {.commit_batch_max = 4,
                                                                 .commit_delay_ms = 60'000,
                                                                 .commit_delay_min_batch = 2,
                                                                 .reader_threads = 1,
                                                                 .append_queue_soft_max = 3}}}) {
    CAPTURE(name);
    PacedUnderLoad f(bounded);
    f.threads.SubmitAppend(Job(4));  // three queued: as many as the queue takes, so no wait
    REQUIRE(f.collector.CollectAppends(f.threads, 4));
    CHECK(f.store->batches() == std::vector<size_t>{1, 3});
  }
}

TEST_CASE("store threads: Stop commits a group waiting for company without the rest of the wait") {
  PacedUnderLoad f;
  std::thread stopper([&] { f.threads.Stop(); });
  const bool committed = f.collector.CollectAppends(f.threads, 3);
  stopper.join();
  CHECK(committed);
  CHECK(f.store->batches() == std::vector<size_t>{1, 2});
}

TEST_CASE("store threads: Sync and History run on the readers and errors come back as values") {
  auto store = std::make_shared<RecordingStore>();
  store->Open();
  Collector collector;
  StoreThreads threads(store, {.reader_threads = 2}, collector.WakeFn());
  threads.Start();
  threads.SubmitAppend(Job(1));
  REQUIRE(collector.CollectAppends(threads, 1));
  const ConversationId conversation = collector.appends_[0].result.message.conversation_id;
  threads.SubmitRead(
      {.token = 7, .query = SyncQuery{.user = "bob", .device = "bob-1", .cursors = {}}});
  threads.SubmitRead(
      {.token = 8,
       .query = HistoryQuery{.user = "carol", .conversation_id = conversation, .limit = 10}});
  REQUIRE(collector.CollectReads(threads, 2));
  for (ReadDone& done : collector.reads_) {
    if (done.token == 7) {
      auto& sync = std::get<Result<SyncReply>>(done.result);
      REQUIRE(sync.ok());
      CHECK(sync->messages.size() == 1);
    } else {
      CHECK(done.token == 8);
      auto& history = std::get<Result<HistoryReply>>(done.result);
      CHECK(history.status().code() == Code::kPermissionDenied);
    }
  }
  threads.Stop();
}

// Records every Sync and SyncMany call; a Sync waits at the gate until Open().
class SyncGateStore : public MessageStoreWrapper {
 public:
  SyncGateStore() : MessageStoreWrapper(NewMemoryStore()) {}

  Result<SyncReply> Sync(const SyncQuery& query) override {
    log_.Record("Sync " + query.user, /*wait=*/true);
    return MessageStoreWrapper::Sync(query);
  }
  void SyncMany(std::span<const SyncQuery> queries, const SyncDone& done) override {
    std::string call = "SyncMany";
    for (const SyncQuery& q : queries) call += " " + q.user;
    log_.Record(std::move(call), /*wait=*/false);
    if (!broken_) {
      target().SyncMany(queries, done);
      return;
    }
    // A store breaking the contract: the first query answered twice, one index out of range,
    // the others never.
    target().SyncMany(queries.first(1), [&](size_t i, Result<SyncReply> reply) {
      done(i, reply);
      done(i, reply);
      done(queries.size() + 3, std::move(reply));
    });
  }

  bool WaitCalls(size_t n) { return log_.WaitFor(n); }
  void Open() { log_.Open(); }
  std::vector<std::string> calls() { return log_.items(); }

  bool broken_ = false;

 private:
  GatedLog<std::string> log_;
};

// A Sync of user "u<token>".
ReadJob SyncJob(uint64_t token) {
  const std::string user = "u" + std::to_string(token);
  return ReadJob{.token = token,
                 .query = SyncQuery{.user = user, .device = user + "-1", .cursors = {}}};
}

TEST_CASE("store threads: Syncs waiting together are answered by one SyncMany, other reads kept") {
  auto store = std::make_shared<SyncGateStore>();
  Collector collector;
  StoreThreads threads(store, {.reader_threads = 1}, collector.WakeFn());
  threads.Start();
  threads.SubmitRead(SyncJob(1));
  // The only reader is held inside u1's Sync while the others queue up.
  REQUIRE(store->WaitCalls(1));
  threads.SubmitRead(SyncJob(2));
  threads.SubmitRead(
      {.token = 3, .query = HistoryQuery{.user = "u3", .conversation_id = 1, .limit = 10}});
  threads.SubmitRead(SyncJob(4));
  threads.SubmitRead(SyncJob(5));
  store->Open();
  REQUIRE(collector.CollectReads(threads, 5));
  CHECK(store->calls() == std::vector<std::string>{"Sync u1", "SyncMany u2 u4 u5"});
  std::vector<uint64_t> tokens;
  for (ReadDone& done : collector.reads_) {
    tokens.push_back(done.token);
    if (done.token == 3) {
      CHECK(std::get<Result<HistoryReply>>(done.result).status().code() == Code::kPermissionDenied);
    } else {
      CHECK(std::get<Result<SyncReply>>(done.result).ok());
    }
  }
  // u1, then the merged Syncs in their order, then the History that waited behind them.
  CHECK(tokens == std::vector<uint64_t>{1, 2, 4, 5, 3});
  threads.Stop();
}

TEST_CASE("store threads: a reader with no idle peer takes all the waiting Syncs") {
  auto store = std::make_shared<SyncGateStore>();
  Collector collector;
  StoreThreads threads(store, {.reader_threads = 2}, collector.WakeFn());
  threads.Start();
  // Both readers are held inside a Sync (one at a time, or the first would take both) while
  // four more queue up.
  threads.SubmitRead(SyncJob(1));
  REQUIRE(store->WaitCalls(1));
  threads.SubmitRead(SyncJob(2));
  REQUIRE(store->WaitCalls(2));
  for (uint64_t token = 3; token <= 6; ++token) threads.SubmitRead(SyncJob(token));
  store->Open();
  REQUIRE(collector.CollectReads(threads, 6));
  // The first reader back finds no idle peer and takes all four.
  std::vector<std::string> calls = store->calls();
  std::sort(calls.begin(), calls.end());
  CHECK(calls == std::vector<std::string>{"Sync u1", "Sync u2", "SyncMany u3 u4 u5 u6"});
  threads.Stop();
}

TEST_CASE("store threads: two idle readers split two Syncs that arrive together") {
  auto store = std::make_shared<SyncGateStore>();
  store->Open();
  Collector collector;
  StoreThreads threads(store, {.reader_threads = 2}, collector.WakeFn());
  threads.Start();
  // Both readers waiting for work (bounded wait).
  for (int i = 0; i < 10'000 && threads.idle_readers() < 2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  REQUIRE(threads.idle_readers() == 2);
  for (uint64_t token = 1; token <= 2; ++token) threads.SubmitRead(SyncJob(token));
  REQUIRE(collector.CollectReads(threads, 2));
  std::vector<std::string> calls = store->calls();
  std::sort(calls.begin(), calls.end());
  CHECK(calls == std::vector<std::string>{"Sync u1", "Sync u2"});
  threads.Stop();
}

TEST_CASE("store threads: a store that leaves a merged Sync unanswered makes it INTERNAL") {
  auto store = std::make_shared<SyncGateStore>();
  store->broken_ = true;
  Collector collector;
  StoreThreads threads(store, {.reader_threads = 1}, collector.WakeFn());
  threads.Start();
  for (uint64_t token = 1; token <= 4; ++token) {
    threads.SubmitRead(SyncJob(token));
    if (token == 1) REQUIRE(store->WaitCalls(1));
  }
  store->Open();
  REQUIRE(collector.CollectReads(threads, 4));
  CHECK(store->calls() == std::vector<std::string>{"Sync u1", "SyncMany u2 u3 u4"});
  std::map<uint64_t, Code> codes;
  for (ReadDone& done : collector.reads_) {
    CHECK(codes.count(done.token) == 0);
    codes[done.token] = std::get<Result<SyncReply>>(done.result).status().code();
  }
  CHECK(codes == std::map<uint64_t, Code>{
                     {1, Code::kOk}, {2, Code::kOk}, {3, Code::kInternal}, {4, Code::kInternal}});
  threads.Stop();
}

}  // namespace
}  // namespace chat::server
