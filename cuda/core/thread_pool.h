// A small fixed thread pool with a blocking parallel_for. The CPU backend splits GEMM rows, attention
// heads and per-row losses over it; one pool per model, work from one call at a time (the N-API layer
// serialises calls on a model).
//
// Safety rules: an exception thrown by `fn` on any thread (std::bad_alloc included) is caught, the chunks not
// yet started are skipped, and the first exception is rethrown by parallel_for on the calling thread once every
// running chunk has finished, so no thread terminates the process and the pool stays usable. A parallel_for
// issued while another one is running (from inside `fn`, or from a second thread) runs inline on its caller.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tfew {

class ThreadPool {
 public:
  // Throws (after stopping the threads already started) when a thread cannot be created.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  // Calls fn(begin, end) on disjoint chunks covering [0, n); blocks until all chunks are done.
  // grain: the smallest chunk worth a thread.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void worker_loop();
  void run_chunks(std::unique_lock<std::mutex>& lock);
  void stop_workers();
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_n_ = 0, job_chunk_ = 0, next_chunk_ = 0, chunks_total_ = 0, chunks_done_ = 0;
  std::exception_ptr job_error_;  // the first exception of the current job
  uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace tfew
