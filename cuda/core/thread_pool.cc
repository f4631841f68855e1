#include "thread_pool.h"

#include <algorithm>
#include <string>

#include "errors.h"

namespace tfew {

ThreadPool::ThreadPool(int threads) {
  const int extra = std::max(0, threads - 1);  // the calling thread works too
  workers_.reserve(extra);
  try {
    for (int i = 0; i < extra; ++i) workers_.emplace_back([this] { worker_loop(); });
  } catch (const std::exception& e) {
    // Joinable std::threads must not be destroyed: stop the ones already running before reporting.
    const size_t started = workers_.size();
    stop_workers();
    fail(ErrorCode::Internal, "cannot start CPU worker thread " + std::to_string(started + 1) + " of " +
                                  std::to_string(extra) + ": " + e.what());
  }
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t max_chunks = std::min<int64_t>(size() * 4, (n + grain - 1) / grain);
  std::unique_lock<std::mutex> lock(mu_);
  // The job slot holds one job: a nested or concurrent call runs inline rather than overwrite it.
  if (max_chunks <= 1 || workers_.empty() || job_ != nullptr) {
    lock.unlock();
    fn(0, n);
    return;
  }
  const int64_t chunk = (n + max_chunks - 1) / max_chunks;
  job_ = &fn;
  job_n_ = n;
  job_chunk_ = chunk;
  next_chunk_ = 0;
  chunks_total_ = (n + chunk - 1) / chunk;
  chunks_done_ = 0;
  job_error_ = nullptr;
  ++generation_;
  cv_work_.notify_all();
  run_chunks(lock);  // the caller takes chunks as well
  // Every chunk must be finished before returning: `fn` (and what it references) dies with this frame.
  cv_done_.wait(lock, [this] { return chunks_done_ == chunks_total_; });
  job_ = nullptr;
  std::exception_ptr error = job_error_;
  job_error_ = nullptr;
  lock.unlock();
  if (error) std::rethrow_exception(error);
}

// Takes chunks of the current job until none is left. Called and returns with the lock held.
void ThreadPool::run_chunks(std::unique_lock<std::mutex>& lock) {
  while (job_ != nullptr && next_chunk_ < chunks_total_) {
    const int64_t c = next_chunk_++;
    const auto* fn = job_;
    const int64_t n = job_n_, chunk = job_chunk_;
    const bool skip = job_error_ != nullptr;  // after a failure the rest is only counted, not run
    lock.unlock();
    std::exception_ptr error;
    if (!skip) {
      try {
        (*fn)(c * chunk, std::min(n, (c + 1) * chunk));
      } catch (...) {
        error = std::current_exception();
      }
    }
    lock.lock();
    if (error && !job_error_) job_error_ = error;
    if (++chunks_done_ == chunks_total_) cv_done_.notify_all();
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_work_.wait(lock, [&] { return stop_ || (job_ != nullptr && generation_ != seen && next_chunk_ < chunks_total_); });
    if (stop_) return;
    seen = generation_;
    run_chunks(lock);
  }
}

}  // namespace tfew
