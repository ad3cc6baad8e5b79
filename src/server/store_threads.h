// StoreThreads: the threads that call the MessageStore, so the event loop never waits on disk.
//
// One writer thread commits appends in groups: it takes up to `commit_batch_max` queued jobs,
// calls MessageStore::Append once for the whole group, and posts one completion per job, in
// submission order. Under load (at least `commit_delay_min_batch` jobs queued up while the
// previous group was committed) it first waits up to `commit_delay_ms` for more, so each commit
// carries more of them; below that load it commits what is queued at once. `reader_threads` threads
// serve Sync, History and Receipts queries and post their completions in any order; a reader that
// takes a Sync also takes the other Syncs waiting near the front of the queue and answers them
// with one MessageStore::SyncMany (concurrent catch-up reads of the same messages are merged).
// Every completion is posted to a mutex-guarded queue and announced with `wake`, after which the
// loop collects them with TakeCompletions.
//
// With retention on, the writer also runs MessageStore::DeleteExpired in bounded passes between
// commit groups, so a sweep never holds the write lock for longer than one small transaction.
// What each pass deleted (SweepResult::expired) is posted as a completion too, after the
// appends committed before it, for the loop to tell the members. A conversation's range that the
// loop has not taken yet is replaced by a later pass's (the higher up_to_seq and its first_seq),
// so passes that run back to back while a backlog drains make one notice, not one each.
//
// Both job queues are bounded. A job submitted past its bound is not queued: it completes at
// once with Unavailable ("server overloaded"), so the sender gets an error instead of the server
// growing without limit. Such an early failure may overtake appends still queued before it.
//
// A connection's user messages (AppendJob::session) are stored in the order it sent them. Once
// one of them is not stored (refused past the bound, or its commit group failed), the
// connection's later messages are refused with Unavailable, whether queued or submitted later,
// until that message comes again (same client_msg_id): a client resends its outbox in order, so
// nothing it sent after the failed message is stored before it. ForgetSession ends this when the
// connection closes (a new connection starts afresh), and it ends by itself
// held_send_timeout_ms after the refusal.
//
// Thread-safety: Submit*, TakeCompletions and the counters may be called from any thread; the
// runtime calls them from its loop thread. Start and Stop are called once each, from one thread.
#ifndef CHAT_SRC_SERVER_STORE_THREADS_H_
#define CHAT_SRC_SERVER_STORE_THREADS_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "chat/status.h"
#include "chat/store.h"
#include "src/server/hub.h"

namespace chat::server {

struct AppendDone {
  uint64_t token = 0;
  SessionId session = 0;  // the job's (AppendJob::session)
  Status commit_status;   // non-OK: the transaction failed and nothing of the job was stored
  AppendResult result;
};

struct ReadDone {
  uint64_t token = 0;
  ReadResult result;
};

struct StoreThreadsOptions {
  uint32_t commit_batch_max = 512;  // jobs per Append call, at most
  // Under load, the writer waits this long for more jobs before taking a group (less if
  // commit_batch_max are queued); 0 = never wait. Load: at least commit_delay_min_batch jobs
  // queued up while the previous group was committed (0 = always wait).
  uint32_t commit_delay_ms = 0;
  uint32_t commit_delay_min_batch = 0;
  uint32_t reader_threads = 2;
  size_t append_queue_max = 40'000;  // queued appends; past it a job fails with Unavailable
  // The submitter stops submitting at this many (the server pauses reading at its
  // writer_queue_max), so a wait for a fuller group ends there too.
  size_t append_queue_soft_max = std::numeric_limits<size_t>::max();
  size_t read_queue_max = 10'000;           // queued reads; past it a job fails with Unavailable
  uint32_t overload_retry_after_ms = 1000;  // told to senders refused past a bound
  // Retention: the writer deletes expired messages every retention_sweep_interval_ms, at most
  // retention_batch_max per transaction, between commit groups (queued appends go first).
  // retention_sweep false: no sweeps at all.
  bool retention_sweep = false;
  int64_t retention_ms = 0;  // server-wide default; 0 = keep forever
  uint32_t retention_sweep_interval_ms = 60'000;
  uint32_t retention_batch_max = 1000;
  int64_t retention_resend_window_ms = 7LL * 24 * 60 * 60 * 1000;  // see SweepRequest
  // A connection held back behind a refused message is let go after this long (hub.h).
  uint32_t held_send_timeout_ms = kHeldSendTimeoutMs;
  std::function<int64_t()> wall_ms =
      nullptr;  // the clock that stamps messages; required when sweeping
};

class StoreThreads {
 public:
  // `wake` is called from any thread after completions were posted; it must be thread-safe
  // and must not call back into StoreThreads.
  StoreThreads(std::shared_ptr<MessageStore> store, StoreThreadsOptions options,
               std::function<void()> wake);
  // Stops the threads if they are still running.
  ~StoreThreads();
  StoreThreads(const StoreThreads&) = delete;
  StoreThreads& operator=(const StoreThreads&) = delete;

  void Start();
  // The writer commits every append still queued (they were accepted, so a client may resend
  // them and expects the original result), then the threads exit. Queued reads are dropped.
  // Completions posted after Stop are never collected by anyone but TakeCompletions.
  void Stop();

  void SubmitAppend(AppendJob job);
  // Submits `jobs` in order under one lock with at most one wake-up of the writer, and leaves
  // `jobs` empty. A loop that collects the appends of one pass over its ready connections and
  // submits them together lets the writer commit them as one group.
  void SubmitAppends(std::vector<AppendJob>* jobs);
  void SubmitRead(ReadJob job);
  // The connection closed: its messages are no longer held back (see the top of this file).
  void ForgetSession(SessionId session);

  // Moves every completion posted so far into `appends` (in submission order), `reads`, and
  // `expired` (the conversations retention passes changed, one range each: the latest, at the
  // place of the conversation's first since the last call). An expiry is posted after the
  // appends committed before its pass: a caller that hands the appends over first keeps that
  // order.
  void TakeCompletions(std::vector<AppendDone>* appends, std::vector<ReadDone>* reads,
                       std::vector<ExpiredRange>* expired);

  // Appends submitted and not yet completed (queued or being committed).
  size_t appends_pending() const { return appends_pending_.load(std::memory_order_relaxed); }
  // Readers blocked waiting for a read.
  size_t idle_readers();
  // Whether the writer is waiting for a fuller group under load (for tests).
  bool writer_waiting();

 private:
  void WriterLoop();
  void ReaderLoop();
  void TakeQueuedSyncs(std::vector<ReadJob>* syncs);
  void Commit(std::vector<AppendJob>* jobs);
  // Runs one bounded retention pass; returns whether expired messages remain.
  bool SweepOnce();
  size_t BatchMax() const;   // jobs per group, at most
  size_t GroupFill() const;  // jobs that end the wait for a fuller group
  void PostAppends(std::vector<AppendDone>* done);
  // Whether `job`, a message of a connection one of whose messages was not stored, must be
  // refused; it is not when it is that message again (then the connection is no longer held).
  // REQUIRES: mu_ held.
  bool HeldBack(const AppendJob& job);
  // Holds the connection of job `token` back on its message, unless it is held on one sent
  // earlier (the Hub's tokens rise in the order messages arrive).
  // REQUIRES: mu_ held.
  void Hold(SessionId session, uint64_t token, const AppendRequest& request);
  // Completes `job` with Unavailable at once, out of order (into `refused`).
  void Refuse(const AppendJob& job, Status status, std::vector<AppendDone>* refused) const;
  void PostRead(ReadDone done);

  const std::shared_ptr<MessageStore> store_;
  const StoreThreadsOptions options_;
  const std::function<void()> wake_;

  std::mutex mu_;  // guards the job queues and stopping_
  std::condition_variable append_cv_;
  std::condition_variable read_cv_;
  std::deque<AppendJob> append_queue_;
  std::deque<ReadJob> read_queue_;
  size_t idle_readers_ = 0;  // readers blocked waiting for a read
  bool writer_waiting_ = false;
  bool stopping_ = false;
  // Connections held back: the client_msg_id of the first of their messages not stored (at most
  // one entry per open connection), until held_send_timeout_ms after `since`.
  struct Held {
    uint64_t token = 0;
    std::string client_msg_id;
    std::chrono::steady_clock::time_point since;
  };
  std::unordered_map<SessionId, Held> held_;

  std::mutex done_mu_;  // guards the completion queues
  std::vector<AppendDone> appends_done_;
  std::vector<ReadDone> reads_done_;
  std::vector<ExpiredRange> expired_done_;
  // The place of each conversation's range in expired_done_.
  std::unordered_map<ConversationId, size_t> expired_index_;

  std::atomic<size_t> appends_pending_{0};
  std::thread writer_;
  std::vector<std::thread> readers_;
  bool started_ = false;
  bool sweep_unsupported_ = false;  // writer thread only
};

}  // namespace chat::server

#endif  // CHAT_SRC_SERVER_STORE_THREADS_H_
