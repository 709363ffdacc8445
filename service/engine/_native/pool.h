// Helper threads for the engine's CPU kernels (small_gemm.cc, ragged_attention.cc): a job is
// split into parts, the caller's thread taking part 0 and one helper each of the others. A
// helper spins for kSpin after a job (the next kernel call of a forward follows after torch's
// other work between two matmuls, tens to a few hundred microseconds), then sleeps on its
// counter.
#pragma once

#include <unistd.h>

#include <atomic>
#include <chrono>
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
  // How long a helper spins after a job before it sleeps: longer than the gaps between the
  // kernel calls of one forward, so that it is awake for the next. Before, it spun 4,000
  // pauses (tens of microseconds) and then slept, and the wake-ups cost SmolLM2's forward of
  // 4-12 token rows 7-9 ms (44.3 -> 37.1 ms at 4 rows, 63.1 -> 54.0 at 12, bench.steps).
  static constexpr std::chrono::microseconds kSpin{200};

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
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int spin = 1; job == seen; ++spin) {
        cpu_relax();
        job = h.job.load(std::memory_order_acquire);
        if (spin % 64 == 0 && std::chrono::steady_clock::now() > until) break;
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
