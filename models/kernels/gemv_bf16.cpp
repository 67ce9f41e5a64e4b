// bf16 matrix-vector product for batch-1 decode on x86 CPUs with AVX512-BF16 (vdpbf16ps).
//
// Weight layout ("packed", made once by `pack` in models/kernels/__init__.py): W (N, K) row-major becomes
// (N/16, K/2, 16, 2) — for each block of 16 output rows, one 64-byte cache line holds one pair of input
// columns for all 16 rows. y[16 rows] += dpbf16(line, broadcast(x[2p], x[2p+1])): the weights stream
// sequentially, there are no horizontal sums, and fp32 accumulators are rounded to bf16 once at the end.
// Blocks are split across torch's intra-op threads (at::parallel_for), so no extra threads are started.
// On this project's 2-core CPU a decode step's 121 GEMVs of SmolLM2-135M take 6.7-8.9 ms, against 15-17 ms
// for oneDNN on prepacked weights (benchmarks/engine_bench.py --direct, with LAMINA_KERNELS=0 for oneDNN).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

namespace {

void gemv_blocks(const uint16_t* W, const uint16_t* x, uint16_t* y, int64_t b0, int64_t b1, int64_t K) {
  const int64_t P = K / 2;
  const int32_t* x32 = reinterpret_cast<const int32_t*>(x);
  for (int64_t b = b0; b < b1; ++b) {
    const char* base = reinterpret_cast<const char*>(W + b * 16 * K);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p + 4 <= P; p += 4) {
      const char* q = base + p * 64;
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32(x32[p + 0]), (__m512bh)_mm512_loadu_si512(q));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_set1_epi32(x32[p + 1]), (__m512bh)_mm512_loadu_si512(q + 64));
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_set1_epi32(x32[p + 2]), (__m512bh)_mm512_loadu_si512(q + 128));
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_set1_epi32(x32[p + 3]), (__m512bh)_mm512_loadu_si512(q + 192));
    }
    for (; p < P; ++p)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32(x32[p]), (__m512bh)_mm512_loadu_si512(base + p * 64));
    __m512 s = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    __m256bh r = _mm512_cvtneps_pbh(s);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + b * 16), (__m256i)r);
  }
}

}  // namespace

// x: bf16 with K elements (any shape ending in K, one row); packed: (N/16, K/2, 16, 2) bf16 → y: x.shape[:-1] + (N,)
at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 only");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 2 && packed.is_contiguous(),
              "gemv_bf16: weight not in the packed layout");
  const int64_t K = packed.size(1) * 2, nb = packed.size(0);
  TORCH_CHECK(x.size(-1) == K && x.numel() == K, "gemv_bf16: x must be one row of ", K, " values");
  at::Tensor xc = x.contiguous();
  auto shape = x.sizes().vec();
  shape.back() = nb * 16;
  at::Tensor y = at::empty(shape, x.options());
  const auto* W = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, nb, 8, [&](int64_t b0, int64_t b1) { gemv_blocks(W, xp, yp, b0, b1, K); });
  return y;
}

TORCH_LIBRARY(lamina, m) {
  m.def("gemv_bf16(Tensor x, Tensor packed) -> Tensor");
}

TORCH_LIBRARY_IMPL(lamina, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
}
