#include "threads.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QK_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define QK_PAUSE() asm volatile("yield")
#else
#define QK_PAUSE() ((void)0)
#endif

namespace qk {
namespace {

// The job word packs generation (16 bits), task count (24) and next task index (24), so a worker that
// wakes late can never claim a task of a newer job with an older job's count.
constexpr uint64_t kIdxBits = 24, kMask = (uint64_t(1) << kIdxBits) - 1;
inline uint64_t gen_of(uint64_t w) { return w >> (2 * kIdxBits); }
inline uint64_t n_of(uint64_t w) { return (w >> kIdxBits) & kMask; }
inline uint64_t idx_of(uint64_t w) { return w & kMask; }

class Pool {
 public:
  explicit Pool(int threads) {
    if (const char* e = std::getenv("QMLX_SPIN")) spin_ = std::atoi(e);
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  ~Pool() {
    stop_.store(true);
    {
      std::lock_guard<std::mutex> l(m_);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return int(workers_.size()) + 1; }

  void run(int64_t n, const std::function<void(int64_t)>& fn) {
    if (n <= 0) return;
    if (workers_.empty() || n == 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    std::lock_guard<std::mutex> one_job(job_);  // one job at a time (several MLX streams may call in)
    fn_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    uint64_t g = (gen_of(word_.load()) + 1) & 0xffff;
    word_.store(g << (2 * kIdxBits) | uint64_t(n) << kIdxBits);
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> l(m_); }
      cv_.notify_all();
    }
    drain(g);
    while (done_.load(std::memory_order_acquire) < n) QK_PAUSE();
  }

 private:
  // Claim and run tasks of generation g until none is left.
  void drain(uint64_t g) {
    uint64_t w = word_.load();
    while (gen_of(w) == g && idx_of(w) < n_of(w)) {
      if (word_.compare_exchange_weak(w, w + 1)) {
        (*fn_)(int64_t(idx_of(w)));
        done_.fetch_add(1, std::memory_order_release);
        w = word_.load();
      }
    }
  }

  void work() {
    uint64_t seen = gen_of(word_.load());
    while (true) {
      uint64_t w = word_.load();
      for (int spin = 0; gen_of(w) == seen && spin < spin_ && !stop_.load(std::memory_order_relaxed); ++spin) {
        QK_PAUSE();
        w = word_.load(std::memory_order_relaxed);
      }
      if (gen_of(w) == seen) {
        std::unique_lock<std::mutex> l(m_);
        sleepers_.fetch_add(1);
        cv_.wait(l, [&] { return stop_.load() || gen_of(word_.load()) != seen; });
        sleepers_.fetch_sub(1);
      }
      if (stop_.load()) return;
      seen = gen_of(word_.load());
      drain(seen);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex m_, job_;
  std::condition_variable cv_;
  std::atomic<uint64_t> word_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int64_t)>* fn_ = nullptr;
  // Pause instructions a worker spins before it sleeps: long enough to bridge the gap between the
  // matmuls of one layer, short enough not to take a core from MLX's own threads between layers.
  int spin_ = 2000;
};

int threads_wanted() {
  if (const char* e = std::getenv("QMLX_THREADS")) {
    int n = std::atoi(e);
    if (n > 0) return n;
  }
  unsigned n = std::thread::hardware_concurrency();
  return n ? int(n) : 1;
}

Pool& pool() {
  static Pool* p = new Pool(threads_wanted());  // never destroyed: workers may outlive static teardown
  return *p;
}

}  // namespace

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) { pool().run(n, fn); }
// Without starting the pool: it must start on MLX's stream thread (the first op that uses it), whose
// signal mask qmlx sets with SIGINT blocked, so a Ctrl-C never lands on a worker.
int num_threads() { return threads_wanted(); }

}  // namespace qk
