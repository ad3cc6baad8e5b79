#include "src/server/store_threads.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <utility>
#include <variant>

#include "chat/log.h"
#include "src/core/threads.h"

namespace chat::server {

namespace {

Status Overloaded(std::string_view what, uint32_t retry_after_ms) {
  Status status = Unavailable(std::string("server overloaded: ") + std::string(what));
  status.set_retry_after_ms(retry_after_ms);
  return status;
}

// Whether `job` is a user message that must be stored in its connection's order.
bool Ordered(SessionId session, const AppendRequest& request) {
  return session != 0 && request.op == ConversationOp::kNone && !request.client_msg_id.empty();
}

// Syncs that wait for a reader together are answered together (MessageStore::SyncMany), so a
// message range many of them want is read once: at most kMaxMergedSyncs, found among the first
// kMergeScan queued reads.
constexpr size_t kMaxMergedSyncs = 32;
constexpr size_t kMergeScan = 256;

}  // namespace

StoreThreads::StoreThreads(std::shared_ptr<MessageStore> store, StoreThreadsOptions options,
                           std::function<void()> wake)
    : store_(std::move(store)), options_(options), wake_(std::move(wake)) {}

StoreThreads::~StoreThreads() { Stop(); }

void StoreThreads::Start() {
  if (started_) return;
  started_ = true;
  writer_ = StartThreadWithSignalsBlocked("chat-writer", [this] { WriterLoop(); });
  const uint32_t readers = std::max<uint32_t>(options_.reader_threads, 1);
  readers_.reserve(readers);
  for (uint32_t i = 0; i < readers; ++i) {
    readers_.push_back(StartThreadWithSignalsBlocked("chat-reader", [this] { ReaderLoop(); }));
  }
}

void StoreThreads::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  append_cv_.notify_all();
  read_cv_.notify_all();
  if (writer_.joinable()) writer_.join();
  for (std::thread& reader : readers_) {
    if (reader.joinable()) reader.join();
  }
  readers_.clear();
}

void StoreThreads::SubmitAppend(AppendJob job) {
  std::vector<AppendJob> jobs;
  jobs.push_back(std::move(job));
  SubmitAppends(&jobs);
}

void StoreThreads::SubmitAppends(std::vector<AppendJob>* jobs) {
  std::vector<AppendDone> refused;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const bool was_empty = append_queue_.empty();
    for (AppendJob& job : *jobs) {
      if (HeldBack(job)) {
        Refuse(job, HeldSendStatus(), &refused);
        continue;
      }
      if (stopping_ || append_queue_.size() >= options_.append_queue_max) {
        Hold(job.session, job.token, job.request);
        Refuse(job,
               Overloaded("too many messages waiting for commit", options_.overload_retry_after_ms),
               &refused);
        continue;
      }
      append_queue_.push_back(std::move(job));
      appends_pending_.fetch_add(1, std::memory_order_relaxed);
    }
    if (!append_queue_.empty() &&
        (was_empty || options_.commit_delay_ms == 0 || append_queue_.size() >= GroupFill())) {
      append_cv_.notify_one();
    }
  }
  jobs->clear();
  if (refused.empty()) return;
  {
    std::lock_guard<std::mutex> lock(done_mu_);
    for (AppendDone& done : refused) appends_done_.push_back(std::move(done));
  }
  wake_();
}

void StoreThreads::ForgetSession(SessionId session) {
  std::lock_guard<std::mutex> lock(mu_);
  held_.erase(session);
}

bool StoreThreads::HeldBack(const AppendJob& job) {
  if (!Ordered(job.session, job.request)) return false;
  auto it = held_.find(job.session);
  if (it == held_.end()) return false;
  if (it->second.client_msg_id != job.request.client_msg_id &&
      std::chrono::steady_clock::now() - it->second.since <
          std::chrono::milliseconds(options_.held_send_timeout_ms)) {
    return true;
  }
  // The message not stored comes again (what follows it may follow it), or the hold ran out.
  held_.erase(it);
  return false;
}

void StoreThreads::Hold(SessionId session, uint64_t token, const AppendRequest& request) {
  if (!Ordered(session, request)) return;
  const auto now = std::chrono::steady_clock::now();
  auto [it, added] = held_.try_emplace(session, Held{token, request.client_msg_id, now});
  // A message refused past the bound may have been sent after one whose group fails later.
  if (!added && token < it->second.token) it->second = Held{token, request.client_msg_id, now};
}

void StoreThreads::Refuse(const AppendJob& job, Status status,
                          std::vector<AppendDone>* refused) const {
  AppendDone& done = refused->emplace_back();
  done.token = job.token;
  done.session = job.session;
  done.commit_status = std::move(status);
}

void StoreThreads::SubmitRead(ReadJob job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_ && read_queue_.size() < options_.read_queue_max) {
      read_queue_.push_back(std::move(job));
      read_cv_.notify_one();
      return;
    }
  }
  const Status status =
      Overloaded("too many queries waiting for the store", options_.overload_retry_after_ms);
  PostRead(ReadDone{job.token, FailedRead(job, status)});
}

void StoreThreads::TakeCompletions(std::vector<AppendDone>* appends, std::vector<ReadDone>* reads,
                                   std::vector<ExpiredRange>* expired) {
  std::lock_guard<std::mutex> lock(done_mu_);
  appends->swap(appends_done_);
  reads->swap(reads_done_);
  expired->swap(expired_done_);
  appends_done_.clear();
  reads_done_.clear();
  expired_done_.clear();
  expired_index_.clear();
}

void StoreThreads::WriterLoop() {
  const size_t batch_max = BatchMax();
  const bool sweeping = options_.retention_sweep && options_.wall_ms;
  const auto interval =
      std::chrono::milliseconds(std::max<uint32_t>(options_.retention_sweep_interval_ms, 1));
  auto next_sweep = std::chrono::steady_clock::now() + interval;
  const auto delay = std::chrono::milliseconds(options_.commit_delay_ms);
  const size_t min_batch = options_.commit_delay_min_batch;
  const size_t fill = GroupFill();
  // The load: the jobs that queued up while the previous group was committed (none when the
  // writer caught up, or woke for a retention pass). Not the size of the previous group, which
  // the wait itself makes larger.
  size_t backlog = 0;
  std::vector<AppendJob> jobs;
  jobs.reserve(batch_max);
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      auto ready = [this] { return stopping_ || !append_queue_.empty(); };
      if (sweeping) {
        append_cv_.wait_until(lock, next_sweep, ready);
      } else {
        append_cv_.wait(lock, ready);
      }
      if (append_queue_.empty() && stopping_) return;  // everything accepted was committed
      // Under load, waiting makes each group carry more jobs: fewer transactions and fsyncs,
      // and a conversation's B-tree page written once for several of its messages. Below the
      // load what is queued is committed at once.
      if (!append_queue_.empty() && delay.count() > 0 && backlog >= min_batch && !stopping_ &&
          append_queue_.size() < fill) {
        writer_waiting_ = true;
        append_cv_.wait_until(lock, std::chrono::steady_clock::now() + delay,
                              [this, fill] { return stopping_ || append_queue_.size() >= fill; });
        writer_waiting_ = false;
      }
      const size_t n = std::min(batch_max, append_queue_.size());
      for (size_t i = 0; i < n; ++i) {
        jobs.push_back(std::move(append_queue_.front()));
        append_queue_.pop_front();
      }
    }
    backlog = 0;
    if (!jobs.empty()) {
      Commit(&jobs);
      jobs.clear();
      std::lock_guard<std::mutex> lock(mu_);
      backlog = append_queue_.size();  // before a retention pass, which is not load
    }
    if (sweeping && std::chrono::steady_clock::now() >= next_sweep) {
      // A pass cut by its bound continues right after the next commit group.
      const bool more = SweepOnce();
      next_sweep =
          more ? std::chrono::steady_clock::now() : std::chrono::steady_clock::now() + interval;
    }
  }
}

size_t StoreThreads::BatchMax() const { return std::max<uint32_t>(options_.commit_batch_max, 1); }

size_t StoreThreads::GroupFill() const {
  // A full group, or as many as the queue may hold if that is fewer (the wait would otherwise
  // run out its time for jobs that the bound refuses or the submitter holds back).
  return std::max<size_t>(
      std::min({BatchMax(), options_.append_queue_max, options_.append_queue_soft_max}), 1);
}

bool StoreThreads::SweepOnce() {
  if (sweep_unsupported_) return false;
  SweepRequest request;
  request.now_ms = options_.wall_ms();
  request.default_retention_ms = options_.retention_ms;
  request.max_messages = std::max<uint32_t>(options_.retention_batch_max, 1);
  request.resend_window_ms = options_.retention_resend_window_ms;
  Result<SweepResult> swept = store_->DeleteExpired(request);
  if (swept.status().code() == Code::kFailedPrecondition) {
    // A store without retention support says so once, not every interval.
    sweep_unsupported_ = true;
    Log(LogLevel::kWarn, "chat: retention is off: " + swept.status().ToString());
    return false;
  }
  if (!swept.ok()) {
    Log(LogLevel::kError, "chat: retention sweep failed: " + swept.status().ToString());
    return false;
  }
  if (swept->deleted > 0) {
    Log(LogLevel::kInfo,
        "chat: retention deleted " + std::to_string(swept->deleted) + " expired messages");
  }
  if (swept->keys_dropped > 0) {
    Log(LogLevel::kInfo, "chat: retention dropped " + std::to_string(swept->keys_dropped) +
                             " keys of deleted messages, their resend window over");
  }
  if (!swept->expired.empty()) {
    {
      std::lock_guard<std::mutex> lock(done_mu_);
      for (ExpiredRange& range : swept->expired) {
        // While a backlog of expired messages drains, passes run back to back and each names
        // the same conversations: a range the loop has not taken yet gives way to the later
        // one (every seq up to its up_to_seq is gone, and its first_seq is the current one), so
        // an online device gets one notice rather than one per pass.
        auto [queued, added] =
            expired_index_.try_emplace(range.conversation_id, expired_done_.size());
        if (added) {
          expired_done_.push_back(std::move(range));
        } else if (range.up_to_seq >= expired_done_[queued->second].up_to_seq) {
          expired_done_[queued->second] = std::move(range);
        }
      }
    }
    wake_();
  }
  return swept->has_more;
}

void StoreThreads::Commit(std::vector<AppendJob>* jobs) {
  std::vector<AppendRequest> batch;
  batch.reserve(jobs->size());
  for (AppendJob& job : *jobs) batch.push_back(std::move(job.request));

  std::vector<AppendResult> results;
  results.reserve(batch.size());
  Status status = store_->Append(batch, &results);
  if (status.ok() && results.size() != batch.size()) {
    // A store that breaks its contract must not make the server ack what it did not report.
    status = Internal("store returned " + std::to_string(results.size()) + " results for " +
                      std::to_string(batch.size()) + " messages");
  }
  if (!status.ok()) {
    Log(LogLevel::kError, "chat: commit of " + std::to_string(batch.size()) +
                              " messages failed: " + status.ToString());
  }

  if (!status.ok() && IsRetryable(status.code())) {
    // Nothing of the group is stored: each connection's later messages wait for the first of
    // its messages here to come again. (After a failure that is not retried, DATA_LOSS say,
    // no client sends it again.) Those already queued were sent after it: refused now,
    // so none is left in the queue to be stored after that one comes again.
    std::vector<AppendDone> refused;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < jobs->size(); ++i) {
        Hold((*jobs)[i].session, (*jobs)[i].token, batch[i]);
      }
      for (auto it = append_queue_.begin(); it != append_queue_.end();) {
        if (HeldBack(*it)) {
          Refuse(*it, HeldSendStatus(), &refused);
          it = append_queue_.erase(it);
        } else {
          ++it;
        }
      }
    }
    if (!refused.empty()) PostAppends(&refused);
  }
  std::vector<AppendDone> done(jobs->size());
  for (size_t i = 0; i < jobs->size(); ++i) {
    done[i].token = (*jobs)[i].token;
    done[i].session = (*jobs)[i].session;
    done[i].commit_status = status;
    if (status.ok()) done[i].result = std::move(results[i]);
  }
  PostAppends(&done);
}

void StoreThreads::PostAppends(std::vector<AppendDone>* done) {
  const size_t n = done->size();
  {
    std::lock_guard<std::mutex> lock(done_mu_);
    for (AppendDone& d : *done) appends_done_.push_back(std::move(d));
  }
  appends_pending_.fetch_sub(n, std::memory_order_relaxed);
  wake_();
}

void StoreThreads::ReaderLoop() {
  std::vector<ReadJob> syncs;  // a Sync and those taken with it
  std::vector<SyncQuery> queries;
  std::vector<bool> answered;
  for (;;) {
    ReadJob job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      ++idle_readers_;
      read_cv_.wait(lock, [this] { return stopping_ || !read_queue_.empty(); });
      --idle_readers_;
      if (stopping_) return;
      job = std::move(read_queue_.front());
      read_queue_.pop_front();
      if (job.query.index() == 0) {
        syncs.push_back(std::move(job));
        TakeQueuedSyncs(&syncs);
      }
    }
    if (syncs.size() <= 1) {
      const ReadJob& one = syncs.empty() ? job : syncs.front();
      PostRead(ReadDone{one.token, RunReadJob(*store_, one)});
      syncs.clear();
      continue;
    }
    for (ReadJob& sync : syncs) queries.push_back(std::move(std::get<SyncQuery>(sync.query)));
    // Every Sync gets exactly one completion even from a store that calls `done` twice for a
    // query, with an index out of range, or not at all (the contract has it called once per
    // query before SyncMany returns).
    answered.assign(syncs.size(), false);
    store_->SyncMany(queries, [&](size_t i, Result<SyncReply> reply) {
      if (i >= syncs.size() || answered[i]) return;
      answered[i] = true;
      PostRead(ReadDone{syncs[i].token, ReadResult(std::in_place_index<0>, std::move(reply))});
    });
    for (size_t i = 0; i < syncs.size(); ++i) {
      if (answered[i]) continue;
      PostRead(ReadDone{
          syncs[i].token,
          ReadResult(std::in_place_index<0>, Internal("the store did not answer this Sync"))});
    }
    syncs.clear();
    queries.clear();
  }
}

// Adds to `syncs` (which holds the Sync this reader took) Syncs among the first kMergeScan
// queued reads: this reader's share, the waiting Syncs and the one it holds divided among itself
// and the readers waiting for work (a busy reader takes its share when it comes back), at most
// kMaxMergedSyncs in all. The other reads keep their order. Called with mu_ held.
void StoreThreads::TakeQueuedSyncs(std::vector<ReadJob>* syncs) {
  const auto end =
      read_queue_.begin() + static_cast<std::ptrdiff_t>(std::min(kMergeScan, read_queue_.size()));
  const auto waiting = static_cast<size_t>(std::count_if(
      read_queue_.begin(), end, [](const ReadJob& j) { return j.query.index() == 0; }));
  // Two idle readers split 2 Syncs 1 / 1 and 4 Syncs 2 / 2; a reader with no idle peer takes
  // them all (up to the bound).
  const size_t readers = idle_readers_ + 1;
  const size_t share = std::min(kMaxMergedSyncs, (waiting + syncs->size() + readers - 1) / readers);
  auto keep = read_queue_.begin();
  for (auto it = read_queue_.begin(); it != end; ++it) {
    if (it->query.index() == 0 && syncs->size() < share) {
      syncs->push_back(std::move(*it));
    } else {
      if (keep != it) *keep = std::move(*it);
      ++keep;
    }
  }
  read_queue_.erase(keep, end);
}

bool StoreThreads::writer_waiting() {
  std::lock_guard<std::mutex> lock(mu_);
  return writer_waiting_;
}

size_t StoreThreads::idle_readers() {
  std::lock_guard<std::mutex> lock(mu_);
  return idle_readers_;
}

void StoreThreads::PostRead(ReadDone done) {
  {
    std::lock_guard<std::mutex> lock(done_mu_);
    reads_done_.push_back(std::move(done));
  }
  wake_();
}

}  // namespace chat::server
