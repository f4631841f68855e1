#include "thread_pool.h"

#include <algorithm>

namespace tfew {

ThreadPool::ThreadPool(int threads) {
  int extra = std::max(0, threads - 1);  // the calling thread works too
  for (int i = 0; i < extra; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  int64_t max_chunks = std::min<int64_t>(size() * 4, (n + grain - 1) / grain);
  if (max_chunks <= 1 || workers_.empty()) {
    fn(0, n);
    return;
  }
  int64_t chunk = (n + max_chunks - 1) / max_chunks;
  std::unique_lock<std::mutex> lock(mu_);
  job_ = &fn;
  job_n_ = n;
  job_chunk_ = chunk;
  next_chunk_ = 0;
  chunks_total_ = (n + chunk - 1) / chunk;
  chunks_done_ = 0;
  ++generation_;
  cv_work_.notify_all();
  // The caller takes chunks as well.
  while (next_chunk_ < chunks_total_) {
    int64_t c = next_chunk_++;
    lock.unlock();
    fn(c * chunk, std::min(n, (c + 1) * chunk));
    lock.lock();
    ++chunks_done_;
  }
  cv_done_.wait(lock, [this] { return chunks_done_ == chunks_total_; });
  job_ = nullptr;
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_work_.wait(lock, [&] { return stop_ || (job_ != nullptr && generation_ != seen && next_chunk_ < chunks_total_); });
    if (stop_) return;
    seen = generation_;
    while (job_ != nullptr && next_chunk_ < chunks_total_) {
      int64_t c = next_chunk_++;
      const auto* fn = job_;
      int64_t n = job_n_, chunk = job_chunk_;
      lock.unlock();
      (*fn)(c * chunk, std::min(n, (c + 1) * chunk));
      lock.lock();
      if (++chunks_done_ == chunks_total_) cv_done_.notify_all();
    }
  }
}

}  // namespace tfew
