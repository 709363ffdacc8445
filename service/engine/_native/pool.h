// Helper threads for the engine's CPU kernels (small_gemm.cc, ragged_attention.cc): a job is
// split into parts, the caller's thread taking part 0 and one helper each of the others. A
// helper spins briefly after a job (the next kernel call of a forward follows within
// microseconds), then sleeps on its counter.
#pragma once

#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "simd.h"

namespace das {

inline void cpu_relax() {
#if DAS_X86
  _mm_pause();
#endif
}

class Pool {
 public:
  ~Pool() {
    std::lock_guard<std::mutex> lock(mutex_);
    forget_if_forked();
    resize(0);
  }

  // work(part) for every part in [0, parts); returns when all are done. One job at a time
  // (callers run without the GIL).
  void run(int parts, const std::function<void(int)>& work) {
    std::lock_guard<std::mutex> lock(mutex_);
    forget_if_forked();
    if (int(helpers_.size()) < parts - 1) resize(parts - 1);  // only ever grows
    work_ = &work;
    for (int i = 0; i < parts - 1; ++i) {
      Helper& h = *helpers_[i];
      h.job.fetch_add(1, std::memory_order_release);
      h.job.notify_one();
    }
    work(0);
    for (int i = 0; i < parts - 1; ++i) {
      Helper& h = *helpers_[i];
      const uint64_t job = h.job.load(std::memory_order_relaxed);
      while (h.done.load(std::memory_order_acquire) != job) cpu_relax();
    }
    work_ = nullptr;
  }

 private:
  struct Helper {
    std::atomic<uint64_t> job{0}, done{0};
    std::atomic<bool> stop{false};
    int part = 0;
    std::thread thread;
  };

  // A forked child has none of the parent's helper threads: forget them (their objects are
  // leaked, not destroyed, since there is no thread to join).
  void forget_if_forked() {
    if (pid_ == getpid()) return;
    for (auto& helper : helpers_) helper.release();
    helpers_.clear();
    pid_ = getpid();
  }

  void resize(int count) {
    while (int(helpers_.size()) > count) {
      Helper& h = *helpers_.back();
      h.stop.store(true);
      h.job.fetch_add(1, std::memory_order_release);
      h.job.notify_one();
      h.thread.join();
      helpers_.pop_back();
    }
    while (int(helpers_.size()) < count) {
      auto helper = std::make_unique<Helper>();
      Helper* h = helper.get();
      h->part = int(helpers_.size()) + 1;
      h->thread = std::thread([this, h] { serve(*h); });
      helpers_.push_back(std::move(helper));
    }
  }

  void serve(Helper& h) {
    uint64_t seen = 0;
    while (true) {
      uint64_t job = h.job.load(std::memory_order_acquire);
      for (int spin = 0; job == seen && spin < 4000; ++spin) {  // tens of microseconds
        cpu_relax();
        job = h.job.load(std::memory_order_acquire);
      }
      if (job == seen) {
        h.job.wait(seen, std::memory_order_acquire);
        continue;
      }
      seen = job;
      if (h.stop.load()) return;
      (*work_)(h.part);
      h.done.store(job, std::memory_order_release);
    }
  }

  std::mutex mutex_;
  pid_t pid_ = getpid();
  const std::function<void(int)>* work_ = nullptr;
  std::vector<std::unique_ptr<Helper>> helpers_;
};

// The one pool of the module's kernels.
inline Pool& pool() {
  static Pool instance;
  return instance;
}

}  // namespace das
