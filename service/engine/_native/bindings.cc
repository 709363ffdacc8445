// Python bindings of the engine's CPU kernels (service.engine._kernels): the small-batch
// matmul (small_gemm.cc), ragged attention (ragged_attention.cc) and the sampler's block
// log-sum-exp (block_logsumexp.cc). Shapes are checked here;
// the kernels run without the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "block_logsumexp.h"
#include "ragged_attention.h"
#include "small_gemm.h"

namespace nb = nanobind;

namespace {

using Matrix = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using OutMatrix = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

void linear(Matrix x, Matrix w, OutMatrix y, int threads, bool avx512) {
  if (!das::cpu_supported()) throw std::runtime_error("linear needs a CPU with AVX2 and FMA");
  if (avx512 && !das::cpu_has_avx512())
    throw std::runtime_error("avx512=True needs a CPU with AVX-512F");
  const int64_t M = int64_t(x.shape(0)), K = int64_t(x.shape(1)), N = int64_t(w.shape(0));
  if (int64_t(w.shape(1)) != K) throw std::invalid_argument("x and w disagree on K");
  if (int64_t(y.shape(0)) != M || int64_t(y.shape(1)) != N)
    throw std::invalid_argument("y must be [x rows, w rows]");
  if (K % 8 != 0) throw std::invalid_argument("K must be a multiple of 8");
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  nb::gil_scoped_release release;
  das::small_gemm(x.data(), w.data(), y.data(), M, K, N, threads, avx512);
}

using Tokens = nb::ndarray<const float, nb::ndim<3>, nb::c_contig, nb::device::cpu>;
using OutTokens = nb::ndarray<float, nb::ndim<3>, nb::c_contig, nb::device::cpu>;
using Cache = nb::ndarray<const float, nb::ndim<4>, nb::c_contig, nb::device::cpu>;
using Chunks = nb::ndarray<const int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

void attention(Tokens q, Cache k, Cache v, OutTokens out, Chunks chunks, float scale,
               int threads) {
  if (!das::cpu_supported()) throw std::runtime_error("attention needs a CPU with AVX2 and FMA");
  const int64_t tokens = int64_t(q.shape(0)), heads = int64_t(q.shape(1));
  const int64_t dim = int64_t(q.shape(2)), slots = int64_t(k.shape(0));
  const int64_t kv_heads = int64_t(k.shape(1)), max_len = int64_t(k.shape(2));
  if (!das::attention_supports_dim(dim)) throw std::invalid_argument("unsupported head dim");
  for (size_t d = 0; d < 4; ++d)
    if (k.shape(d) != v.shape(d)) throw std::invalid_argument("k and v differ in shape");
  if (int64_t(k.shape(3)) != dim) throw std::invalid_argument("q and the cache differ in dim");
  if (kv_heads < 1 || heads % kv_heads != 0)
    throw std::invalid_argument("heads must be a multiple of kv_heads");
  for (size_t d = 0; d < 3; ++d)
    if (out.shape(d) != q.shape(d)) throw std::invalid_argument("out must have q's shape");
  if (chunks.shape(1) != 4) throw std::invalid_argument("chunks must be [n, 4]");
  const int64_t n = int64_t(chunks.shape(0));
  const int64_t* c = chunks.data();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t offset = c[4 * i], slot = c[4 * i + 1], start = c[4 * i + 2];
    const int64_t size = c[4 * i + 3];
    if (size < 1 || offset < 0 || offset + size > tokens || slot < 0 || slot >= slots ||
        start < 0 || start + size > max_len)
      throw std::invalid_argument("a chunk is out of bounds");
  }
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  const das::RaggedAttention a{q.data(), k.data(), v.data(), out.data(), heads, kv_heads, dim,
                               slots,    max_len,  c,        n,          scale};
  nb::gil_scoped_release release;
  das::ragged_attention(a, threads);
}

using Index = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

void block_logsumexp(Matrix x, Index index, float scale, OutMatrix out, int64_t block,
                     int threads) {
  if (!das::cpu_supported())
    throw std::runtime_error("block_logsumexp needs a CPU with AVX2 and FMA");
  const int64_t rows = int64_t(index.shape(0)), cols = int64_t(x.shape(1));
  if (block < 1) throw std::invalid_argument("block must be >= 1");
  if (!(scale > 0.0f) || !std::isfinite(scale)) throw std::invalid_argument("scale must be > 0");
  if (int64_t(out.shape(0)) != rows || int64_t(out.shape(1)) != (cols + block - 1) / block)
    throw std::invalid_argument("out must be [index rows, ceil(x cols / block)]");
  const int64_t* rows_of = index.data();
  for (int64_t i = 0; i < rows; ++i)
    if (rows_of[i] < 0 || rows_of[i] >= int64_t(x.shape(0)))
      throw std::invalid_argument("an index is out of x's rows");
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  const das::BlockLogsumexp a{x.data(), rows_of, out.data(), rows, cols, block, scale};
  nb::gil_scoped_release release;
  das::block_logsumexp(a, threads);
}

}  // namespace

NB_MODULE(_kernels, m) {
  m.doc() = "The engine's CPU kernels: small-batch matmul, ragged attention, block log-sum-exp.";
  m.def("available", &das::cpu_supported,
        "True where this CPU can run the kernels (AVX2 and FMA).");
  m.def("has_avx512", &das::cpu_has_avx512,
        "True where linear can run its AVX-512 kernel (AVX-512F besides AVX2 and FMA).");
  m.def("attention_supports_dim", &das::attention_supports_dim, nb::arg("dim"),
        "True where attention is compiled for this head dim.");
  // noconvert: a hidden copy would cost a weight or cache copy per call, or lose the output.
  m.def("linear", &linear, nb::arg("x").noconvert(), nb::arg("w").noconvert(),
        nb::arg("y").noconvert(), nb::arg("threads"), nb::arg("avx512"),
        "y = x @ w.T for float32 C-contiguous x [M, K], w [N, K], y [M, N]; K % 8 == 0. "
        "avx512: the AVX-512 kernel (needs has_avx512()), else the AVX2 one.");
  m.def("attention", &attention, nb::arg("q").noconvert(), nb::arg("k").noconvert(),
        nb::arg("v").noconvert(), nb::arg("out").noconvert(), nb::arg("chunks").noconvert(),
        nb::arg("scale"), nb::arg("threads"),
        "out [T, heads, dim] = each chunk's causal attention over its slot's cache k, v "
        "[slots, kv_heads, max_len, dim]; chunks [n, 4] int64 rows (offset, slot, start, "
        "size): tokens offset.. of q, cached at start.. of slot (float32, C-contiguous).");
  m.def("block_logsumexp", &block_logsumexp, nb::arg("x").noconvert(),
        nb::arg("index").noconvert(), nb::arg("scale"), nb::arg("out").noconvert(),
        nb::arg("block"), nb::arg("threads"),
        "out [n, ceil(cols / block)] = the log-sum-exp of each block of `block` columns of "
        "scale * x[index[i]] (x [rows, cols] float32, index [n] int64, both C-contiguous; "
        "the last block partial; -inf where all are -inf).");
}
