// y = x @ w.T for a few rows of x (service.engine._kernels.linear).
//
// A decode or verify step multiplies every weight matrix by a handful of token rows. MKL's
// sgemm packs the weights for every call, which at 2 to 64 rows costs more than the multiply:
// on this project's 2-core CPU, SmolLM2's weights times 9 rows took about 140 ms, 2.5x the
// 1-row gemv. Here the weights stream from memory once per call, each weight row meeting all
// of x's rows while it is in registers, so a few rows cost little more than one.
//
// Each y[m, n] is one 8-lane FMA chain over k in order, then the same horizontal sum, whatever
// M is and wherever row m sits: a row's result does not depend on its batch companions.
//
// The kernel needs AVX2 and FMA; only it is compiled for them (target attributes), so the
// module loads on any x86-64 CPU and available() tells Python whether to call it. Elsewhere
// available() is false and the runner uses torch.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DAS_X86 1
#else
#define DAS_X86 0
#endif

namespace nb = nanobind;

namespace {

struct Problem {
  const float* x;  // [M, K]
  const float* w;  // [N, K]
  float* y;        // [M, N]
  int64_t M, K, N;
};

#if DAS_X86
#define DAS_AVX2 __attribute__((target("avx2,fma")))

DAS_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows [0, MB) of x against weight rows [n0, n1), two weight rows at a time: 2 * MB
// accumulators stay in registers and each weight vector is loaded once for all MB rows.
// K is a multiple of 8 (checked by the caller).
template <int MB>
DAS_AVX2 void tile(const Problem& p, const float* x, float* y, int64_t n0, int64_t n1) {
  const int64_t K = p.K;
  int64_t n = n0;
  for (; n + 1 < n1; n += 2) {
    const float* w0 = p.w + n * K;
    const float* w1 = w0 + K;
    __m256 a[MB], b[MB];
    for (int m = 0; m < MB; ++m) a[m] = b[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 u = _mm256_loadu_ps(w0 + k), v = _mm256_loadu_ps(w1 + k);
      for (int m = 0; m < MB; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k);
        a[m] = _mm256_fmadd_ps(xv, u, a[m]);
        b[m] = _mm256_fmadd_ps(xv, v, b[m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      y[m * p.N + n] = hsum(a[m]);
      y[m * p.N + n + 1] = hsum(b[m]);
    }
  }
  if (n < n1) {  // an odd last weight row: the same chain per output
    const float* w0 = p.w + n * K;
    __m256 a[MB];
    for (int m = 0; m < MB; ++m) a[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 u = _mm256_loadu_ps(w0 + k);
      for (int m = 0; m < MB; ++m) a[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), u, a[m]);
    }
    for (int m = 0; m < MB; ++m) y[m * p.N + n] = hsum(a[m]);
  }
}

// Weight rows [n0, n1) for all of x's rows: blocks of 32 weight rows (at most 32 * K floats,
// which stay in L2 while every group of 4 rows of x passes over them).
DAS_AVX2 void run_range(const Problem& p, int64_t n0, int64_t n1) {
  constexpr int64_t kBlock = 32;
  for (int64_t nb = n0; nb < n1; nb += kBlock) {
    const int64_t ne = std::min(nb + kBlock, n1);
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) tile<4>(p, p.x + m * p.K, p.y + m * p.N, nb, ne);
    const float* x = p.x + m * p.K;
    float* y = p.y + m * p.N;
    switch (p.M - m) {
      case 3: tile<3>(p, x, y, nb, ne); break;
      case 2: tile<2>(p, x, y, nb, ne); break;
      case 1: tile<1>(p, x, y, nb, ne); break;
      default: break;
    }
  }
}

bool cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
void run_range(const Problem&, int64_t, int64_t) { throw std::runtime_error("needs x86-64"); }
bool cpu_supported() { return false; }
#endif

// Helper threads that each take a slice of the weight rows. A helper spins briefly after a
// job (the next matmul of a forward follows within microseconds), then sleeps on its counter.
class Pool {
 public:
  ~Pool() {
    std::lock_guard<std::mutex> lock(mutex_);
    forget_if_forked();
    resize(0);
  }

  // `threads` slices of the weight rows, the caller's thread taking the first.
  void run(const Problem& p, int threads) {
    std::lock_guard<std::mutex> lock(mutex_);
    forget_if_forked();
    if (int(helpers_.size()) < threads - 1) resize(threads - 1);  // only ever grows
    const int parts = threads;
    // Slices of whole weight-row pairs, so the split does not change any output's arithmetic.
    const int64_t pairs = (p.N + 1) / 2;
    auto bound = [&](int i) { return std::min(p.N, 2 * (pairs * i / parts)); };
    problem_ = p;
    for (int i = 0; i < threads - 1; ++i) {
      Helper& h = *helpers_[i];
      h.n0 = bound(i + 1);
      h.n1 = bound(i + 2);
      h.job.fetch_add(1, std::memory_order_release);
      h.job.notify_one();
    }
    run_range(p, 0, bound(1));
    for (int i = 0; i < threads - 1; ++i) {
      Helper& h = *helpers_[i];
      const uint64_t job = h.job.load(std::memory_order_relaxed);
      while (h.done.load(std::memory_order_acquire) != job) {
#if DAS_X86
        _mm_pause();
#endif
      }
    }
  }

 private:
  struct Helper {
    std::atomic<uint64_t> job{0}, done{0};
    std::atomic<bool> stop{false};
    int64_t n0 = 0, n1 = 0;
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
      h->thread = std::thread([this, h] { serve(*h); });
      helpers_.push_back(std::move(helper));
    }
  }

  void serve(Helper& h) {
    uint64_t seen = 0;
    while (true) {
      uint64_t job = h.job.load(std::memory_order_acquire);
      for (int spin = 0; job == seen && spin < 4000; ++spin) {  // tens of microseconds
#if DAS_X86
        _mm_pause();
#endif
        job = h.job.load(std::memory_order_acquire);
      }
      if (job == seen) {
        h.job.wait(seen, std::memory_order_acquire);
        continue;
      }
      seen = job;
      if (h.stop.load()) return;
      run_range(problem_, h.n0, h.n1);
      h.done.store(job, std::memory_order_release);
    }
  }

  std::mutex mutex_;  // one matmul at a time (callers run without the GIL)
  pid_t pid_ = getpid();
  Problem problem_{};
  std::vector<std::unique_ptr<Helper>> helpers_;
};

Pool& pool() {
  static Pool instance;
  return instance;
}

using In = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Out = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

void linear(In x, In w, Out y, int threads) {
  if (!cpu_supported()) throw std::runtime_error("linear needs a CPU with AVX2 and FMA");
  const int64_t M = int64_t(x.shape(0)), K = int64_t(x.shape(1)), N = int64_t(w.shape(0));
  if (int64_t(w.shape(1)) != K) throw std::invalid_argument("x and w disagree on K");
  if (int64_t(y.shape(0)) != M || int64_t(y.shape(1)) != N)
    throw std::invalid_argument("y must be [x rows, w rows]");
  if (K % 8 != 0) throw std::invalid_argument("K must be a multiple of 8");
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  if (M == 0 || N == 0) return;
  const Problem p{x.data(), w.data(), y.data(), M, K, N};
  nb::gil_scoped_release release;
  // A slice of fewer than 64 weight rows is not worth a helper.
  pool().run(p, int(std::clamp<int64_t>(N / 64, 1, std::min(threads, 64))));
}

}  // namespace

NB_MODULE(_kernels, m) {
  m.doc() = "Small-batch matmul for the engine's CPU decode steps (see small_gemm.cc).";
  m.def("available", &cpu_supported, "True where this CPU can run linear (AVX2 and FMA).");
  // noconvert: a hidden copy would cost a weight copy per call, or lose the output.
  m.def("linear", &linear, nb::arg("x").noconvert(), nb::arg("w").noconvert(),
        nb::arg("y").noconvert(), nb::arg("threads"),
        "y = x @ w.T for float32 C-contiguous x [M, K], w [N, K], y [M, N]; K % 8 == 0.");
}
