// Matrix products over packed weights for CPU inference: integer (int8 / int4 codes, GGUF and load-time
// quantization) and bf16. One source, compiled once per instruction set (see models/kernels/__init__.py):
//   LAMINA_ISA_AVX512  AVX512-VNNI (vpdpbusd on 512-bit vectors) + AVX512-BF16 for the bf16 product;
//   LAMINA_ISA_AVX2    256-bit vectors: AVX-VNNI's vpdpbusd where the CPU has it, else AVX2 (vpmaddubsw +
//                      vpmaddwd, exact for the code ranges used); no bf16 product.
//
// Weight layout (made by models/kernels/quant.py): output rows in blocks of 16. For a block, k runs
// sequentially and each 64-byte line holds 4 bytes for each of the 16 rows:
//   8-bit codes: lane r holds q[r][4j .. 4j+3]                        (line j)
//   4-bit codes: lane r byte i holds q[r][8j+i] | q[r][8j+4+i] << 4   (line j, i = 0..3)
// so y[16 rows] += vpdpbusd(line, broadcast(4 activation bytes)) needs no horizontal sums and reads the
// weights once, in order. Codes are unsigned (0..255 or 0..15); a weight is d * q + m (affine: Q4_1, Q4_K,
// int4) or d * (q - zero) (symmetric: Q8_0 with zero 128, Q4_0 with 8, Q6_K with 32, int8 with 128), with
// one scale d (and min m) per group of G consecutive k for each row, stored as (N/16, K/G, 16) fp16 or fp32.
//
// Activations are quantized on the fly to int8 per group of 16 (scale max|x|/127, round to nearest), as
// llama.cpp does per 32: an integer dot product per activation group, then, per weight group,
// y += d_w * sum_h(d_x,h * isum_h) (+ m_w * sum_h(d_x,h * sum q_x,h)).
// Accumulation is fp32 in a fixed order (group by group), and threads split the output rows only, so a row's
// result does not depend on how many rows share the call: batch-invariant by construction.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifndef LAMINA_NS
#error "LAMINA_NS must name the op namespace"
#endif

namespace {

// activation rows per tile: each weight line is loaded once per tile, and the tile's rows are independent
// dependency chains (vpdpbusd's latency hides behind them); 256-bit vectors have half the registers
#if defined(LAMINA_ISA_AVX512)
constexpr int MT = 8;
#else
constexpr int MT = 3;
#endif

// weight bytes read ahead of use: with the hardware prefetcher alone the weights streamed at 10-14 GB/s here;
// reading 2 KB ahead made a default-model decode step 13% faster (1 KB: 7%; 4 and 8 KB: as 2 KB)
#ifndef LAMINA_PREFETCH
#define LAMINA_PREFETCH 2048
#endif
constexpr int PREFETCH = LAMINA_PREFETCH;

// f(std::integral_constant<int, mt>) for a tile of 1 <= mt <= MT rows: with the tile's size known at compile
// time its loops unroll and the accumulators stay in registers (a run-time size spills them to the stack and
// puts a store-to-load round trip into every vpdpbusd chain: ~2x slower at batch 1)
template <int I = 1, typename F>
inline void with_tile(int mt, F&& f) {
  if constexpr (I < MT) {
    if (mt != I) return with_tile<I + 1>(mt, f);
  }
  f(std::integral_constant<int, I>{});
}

// ------------------------------------------------------------------------------------------ 16 lanes
#if defined(LAMINA_ISA_AVX512)
struct I16 { __m512i v; };
struct F16 { __m512 v; };
inline I16 izero() { return {_mm512_setzero_si512()}; }
inline F16 fzero() { return {_mm512_setzero_ps()}; }
inline I16 load_line(const uint8_t* p) { return {_mm512_loadu_si512(p)}; }
inline I16 lo_nibbles(I16 a) { return {_mm512_and_si512(a.v, _mm512_set1_epi8(0x0F))}; }
inline I16 hi_nibbles(I16 a) { return {_mm512_and_si512(_mm512_srli_epi16(a.v, 4), _mm512_set1_epi8(0x0F))}; }
template <bool BIG>
inline void dp(I16& acc, I16 u, int32_t s) { acc.v = _mm512_dpbusd_epi32(acc.v, u.v, _mm512_set1_epi32(s)); }
inline I16 isub(I16 a, int32_t b) { return {_mm512_sub_epi32(a.v, _mm512_set1_epi32(b))}; }
inline F16 to_float(I16 a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline F16 load_scales(const float* p) { return {_mm512_loadu_ps(p)}; }
inline F16 load_scales(const at::Half* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline F16 fmadd1(F16 a, float c, F16 acc) { return {_mm512_fmadd_ps(a.v, _mm512_set1_ps(c), acc.v)}; }
inline F16 fmaddv(F16 a, F16 b, F16 acc) { return {_mm512_fmadd_ps(a.v, b.v, acc.v)}; }
inline F16 loadf(const float* p) { return {_mm512_loadu_ps(p)}; }
inline F16 loadf(const at::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
inline F16 fset1(float c) { return {_mm512_set1_ps(c)}; }
inline float hsum(F16 a) { return _mm512_reduce_add_ps(a.v); }
inline void store(float* y, F16 a) { _mm512_storeu_ps(y, a.v); }
inline F16 fadd(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F16 fmul(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F16 fdiv(F16 a, F16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline F16 fmaxv(F16 a, F16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline F16 fminv(F16 a, F16 b) { return {_mm512_min_ps(a.v, b.v)}; }
inline F16 fround(F16 a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline F16 pow2i(F16 n) {  // 2^n for integral n in [-126, 127]
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23))};
}
inline float hmax(F16 a) { return _mm512_reduce_max_ps(a.v); }
inline F16 fabsv(F16 a) { return {_mm512_abs_ps(a.v)}; }
inline void store_i32(int32_t* y, F16 a) { _mm512_storeu_si512(y, _mm512_cvtps_epi32(a.v)); }
#elif defined(LAMINA_ISA_AVX2)
struct I16 { __m256i lo, hi; };
struct F16 { __m256 lo, hi; };
inline I16 izero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline F16 fzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline I16 load_line(const uint8_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
}
inline __m256i lo4(__m256i a) { return _mm256_and_si256(a, _mm256_set1_epi8(0x0F)); }
inline __m256i hi4(__m256i a) { return _mm256_and_si256(_mm256_srli_epi16(a, 4), _mm256_set1_epi8(0x0F)); }
inline I16 lo_nibbles(I16 a) { return {lo4(a.lo), lo4(a.hi)}; }
inline I16 hi_nibbles(I16 a) { return {hi4(a.lo), hi4(a.hi)}; }
// u8 x s8, sums of 4 into int32. BIG: codes may exceed 127, where vpmaddubsw could saturate, so the codes
// are split into nibbles (each product then fits int16 exactly).
template <bool BIG>
inline __m256i dp8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BIG) {
    __m256i p_lo = _mm256_maddubs_epi16(lo4(u), s), p_hi = _mm256_maddubs_epi16(hi4(u), s);
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p_lo, ones));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p_hi, _mm256_set1_epi16(16)));
  } else {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones));
  }
#endif
}
template <bool BIG>
inline void dp(I16& acc, I16 u, int32_t s) {
  const __m256i b = _mm256_set1_epi32(s);
  acc.lo = dp8<BIG>(acc.lo, u.lo, b);
  acc.hi = dp8<BIG>(acc.hi, u.hi, b);
}
inline I16 isub(I16 a, int32_t b) {
  const __m256i v = _mm256_set1_epi32(b);
  return {_mm256_sub_epi32(a.lo, v), _mm256_sub_epi32(a.hi, v)};
}
inline F16 to_float(I16 a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline F16 load_scales(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline F16 load_scales(const at::Half* p) {
  const __m128i* q = reinterpret_cast<const __m128i*>(p);
  return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
}
inline F16 fmadd1(F16 a, float c, F16 acc) {
  const __m256 cv = _mm256_set1_ps(c);
  return {_mm256_fmadd_ps(a.lo, cv, acc.lo), _mm256_fmadd_ps(a.hi, cv, acc.hi)};
}
inline F16 fmaddv(F16 a, F16 b, F16 acc) { return {_mm256_fmadd_ps(a.lo, b.lo, acc.lo), _mm256_fmadd_ps(a.hi, b.hi, acc.hi)}; }
inline F16 loadf(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline __m256 bf16x8(const at::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline F16 loadf(const at::BFloat16* p) { return {bf16x8(p), bf16x8(p + 8)}; }
inline F16 fset1(float c) { return {_mm256_set1_ps(c), _mm256_set1_ps(c)}; }
inline float hsum(F16 a) {
  const __m256 s = _mm256_add_ps(a.lo, a.hi);
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  const __m128 h = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}
inline void store(float* y, F16 a) { _mm256_storeu_ps(y, a.lo); _mm256_storeu_ps(y + 8, a.hi); }
inline F16 fadd(F16 a, F16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F16 fmul(F16 a, F16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F16 fdiv(F16 a, F16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline F16 fmaxv(F16 a, F16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline F16 fminv(F16 a, F16 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline F16 fround(F16 a) {
  constexpr int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, r), _mm256_round_ps(a.hi, r)};
}
inline __m256 pow2i8(__m256 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline F16 pow2i(F16 n) { return {pow2i8(n.lo), pow2i8(n.hi)}; }
inline float hmax(F16 a) {
  const __m256 m = _mm256_max_ps(a.lo, a.hi);
  const __m128 q = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  const __m128 h = _mm_max_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}
inline F16 fabsv(F16 a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
inline void store_i32(int32_t* y, F16 a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), _mm256_cvtps_epi32(a.lo));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + 8), _mm256_cvtps_epi32(a.hi));
}
#else
#error "define LAMINA_ISA_AVX512 or LAMINA_ISA_AVX2"
#endif

// e^x for 16 floats (Cephes' expf: x = n·ln2 + r, |r| ≤ ln2/2, a degree-6 polynomial; relative error ~2e-7,
// about 1 ulp, as std::exp). Inputs below -87.3 give ~1e-38 instead of a denormal; above 88.3, ~2e38.
inline F16 fexp(F16 x) {
  x = fminv(fmaxv(x, fset1(-87.33f)), fset1(88.37f));
  const F16 n = fround(fmul(x, fset1(1.44269504088896341f)));
  F16 r = fmaddv(n, fset1(-0.693359375f), x);
  r = fmaddv(n, fset1(2.12194440e-4f), r);
  F16 p = fset1(1.9875691500e-4f);
  p = fmaddv(p, r, fset1(1.3981999507e-3f));
  p = fmaddv(p, r, fset1(8.3334519073e-3f));
  p = fmaddv(p, r, fset1(4.1665795894e-2f));
  p = fmaddv(p, r, fset1(1.6666665459e-1f));
  p = fmaddv(p, r, fset1(5.0000001201e-1f));
  p = fmaddv(fmul(p, r), r, fadd(r, fset1(1.f)));
  return fmul(p, pow2i(n));
}

// Activations quantized per group of AG = 16: codes (M, K) int8, scales d (M, K/16), code sums (M, K/16).
// 16 rather than the weights' 32: on SmolLM2 (Q4_1) teacher-forced top-1 agreement with the fp32 path is
// 96.0% with groups of 32 and 98.1% with 16, at the same weight traffic.
constexpr int64_t AG = 16;
struct QuantX {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;
};

template <typename T>
QuantX quantize_x(const T* x, int64_t M, int64_t K) {
  const int64_t ng = K / AG;
  QuantX out{std::vector<int8_t>(M * K), std::vector<float>(M * ng), std::vector<int32_t>(M * ng)};
  // rows in parallel only when there are many: a decode row is ~1 µs of work, less than waking a thread
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0 * ng; i < m1 * ng; ++i) {
      const T* xt = x + i * AG;
      int8_t* qs = out.q.data() + i * AG;
      int32_t s = 0;
      float d;
      if constexpr (std::is_same_v<T, float>) {  // the fused forward's activations: 16 at a time
        const F16 v = loadf(xt);
        d = hmax(fabsv(v)) / 127.f;
        const float id = d > 0.f ? 1.f / d : 0.f;
        int32_t q[AG];
        store_i32(q, fround(fmul(v, fset1(id))));
        for (int64_t k = 0; k < AG; ++k) {
          qs[k] = static_cast<int8_t>(q[k]);
          s += q[k];
        }
      } else {
        float xs[AG];
        for (int64_t k = 0; k < AG; ++k) xs[k] = static_cast<float>(xt[k]);
        float amax = 0.f;
        for (int64_t k = 0; k < AG; ++k) amax = std::max(amax, std::fabs(xs[k]));
        d = amax / 127.f;
        const float id = d > 0.f ? 1.f / d : 0.f;
        for (int64_t k = 0; k < AG; ++k) {
          const int32_t v = static_cast<int32_t>(std::nearbyint(xs[k] * id));
          qs[k] = static_cast<int8_t>(v);
          s += v;
        }
      }
      out.d[i] = d;
      out.sum[i] = s;
    }
  });
  return out;
}

// One block of 16 output rows for rows m0..m0+mt of the activations.
template <typename T>
inline void store_out(T* y, F16 a) {
  if constexpr (std::is_same_v<T, float>) {
    store(y, a);
  } else {
    float tmp[16];
    store(tmp, a);
    for (int i = 0; i < 16; ++i) y[i] = static_cast<T>(tmp[i]);
  }
}

template <int BITS, bool AFFINE, bool BIG, int TM, typename S, typename T>
void block_rows(const uint8_t* W, const S* scales, const S* mins, int32_t zero, const QuantX& xq, int64_t m0,
                int64_t K, int64_t G, T* y, int64_t N, int64_t rb) {
  constexpr int mt = TM;
  // weight group g (G values: one scale per row) = G/16 activation groups h (16 values: one scale each)
  const int64_t ng = K / G, nh = G / AG, lines_per_h = AG * BITS / 32, na = K / AG;
  F16 acc[TM];
  for (int t = 0; t < mt; ++t) acc[t] = fzero();
  const int32_t* xq32[TM];
  for (int t = 0; t < mt; ++t) xq32[t] = reinterpret_cast<const int32_t*>(xq.q.data() + (m0 + t) * K);
  const uint8_t* line = W + rb * 16 * K * BITS / 8;
  for (int64_t g = 0; g < ng; ++g) {
    F16 part[TM];
    for (int t = 0; t < mt; ++t) part[t] = fzero();
    for (int64_t h = g * nh; h < (g + 1) * nh; ++h, line += lines_per_h * 64) {
      I16 isum[TM];
      for (int t = 0; t < mt; ++t) isum[t] = izero();
      const int64_t x0 = h * AG / 4;  // first 4-byte activation word of the activation group
      for (int64_t j = 0; j < lines_per_h; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(line + j * 64) + PREFETCH, _MM_HINT_T0);
        I16 w = load_line(line + j * 64);
        if constexpr (BITS == 8) {
          for (int t = 0; t < mt; ++t) dp<BIG>(isum[t], w, xq32[t][x0 + j]);
        } else {
          I16 lo = lo_nibbles(w), hi = hi_nibbles(w);
          for (int t = 0; t < mt; ++t) {
            dp<false>(isum[t], lo, xq32[t][x0 + 2 * j]);
            dp<false>(isum[t], hi, xq32[t][x0 + 2 * j + 1]);
          }
        }
      }
      for (int t = 0; t < mt; ++t) {
        const int64_t i = (m0 + t) * na + h;
        part[t] = fmadd1(to_float(AFFINE ? isum[t] : isub(isum[t], zero * xq.sum[i])), xq.d[i], part[t]);
      }
    }
    const F16 dw = load_scales(scales + (rb * ng + g) * 16);
    for (int t = 0; t < mt; ++t) acc[t] = fmaddv(part[t], dw, acc[t]);
    if constexpr (AFFINE) {
      const F16 mw = load_scales(mins + (rb * ng + g) * 16);
      for (int t = 0; t < mt; ++t) {
        float sx = 0.f;  // d_x · Σ q_x over the weight group
        for (int64_t h = g * nh; h < (g + 1) * nh; ++h) sx += xq.d[(m0 + t) * na + h] * static_cast<float>(xq.sum[(m0 + t) * na + h]);
        acc[t] = fmadd1(mw, sx, acc[t]);
      }
    }
  }
  for (int t = 0; t < mt; ++t) store_out(y + (m0 + t) * N + rb * 16, acc[t]);
}

template <int BITS, bool AFFINE, bool BIG, typename S, typename T>
void qmm_impl(const uint8_t* W, const S* scales, const S* mins, int32_t zero, const QuantX& xq, int64_t M, int64_t K,
              int64_t G, T* y, int64_t N) {
  const int64_t nb = N / 16;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t rb = b0; rb < b1; ++rb)
      for (int64_t m0 = 0; m0 < M; m0 += MT)
        with_tile(static_cast<int>(std::min<int64_t>(MT, M - m0)), [&](auto tm) {
          block_rows<BITS, AFFINE, BIG, decltype(tm)::value, S, T>(W, scales, mins, zero, xq, m0, K, G, y, N, rb);
        });
  });
}

template <typename S, typename T>
void dispatch(int64_t bits, bool affine, bool big, const uint8_t* W, const S* sc, const S* mn, int32_t zero,
              const QuantX& xq, int64_t M, int64_t K, int64_t G, T* y, int64_t N) {
  if (bits == 4 && affine) return qmm_impl<4, true, false, S, T>(W, sc, mn, zero, xq, M, K, G, y, N);
  if (bits == 4) return qmm_impl<4, false, false, S, T>(W, sc, mn, zero, xq, M, K, G, y, N);
  if (affine && big) return qmm_impl<8, true, true, S, T>(W, sc, mn, zero, xq, M, K, G, y, N);
  if (affine) return qmm_impl<8, true, false, S, T>(W, sc, mn, zero, xq, M, K, G, y, N);
  if (big) return qmm_impl<8, false, true, S, T>(W, sc, mn, zero, xq, M, K, G, y, N);
  return qmm_impl<8, false, false, S, T>(W, sc, mn, zero, xq, M, K, G, y, N);
}

#if defined(LAMINA_ISA_AVX512) && defined(__AVX512BF16__)
#define LAMINA_HAS_BF16 1
// bf16 weights (N/16, K/2, 16, 2): one 64-byte line holds one pair of input columns for 16 rows;
// y[16 rows] += vdpbf16ps(line, broadcast(x[2p], x[2p+1])). Two accumulators over p mod 2, fp32; y: bf16
// (uint16_t, rounded once) or fp32.
template <int TM, typename Y>
void bf16_block_rows(const uint16_t* W, const uint16_t* x, Y* y, int64_t rb, int64_t m0, int64_t K, int64_t N) {
  constexpr int mt = TM;
  const int64_t P = K / 2;
  const char* base = reinterpret_cast<const char*>(W + rb * 16 * K);
  __m512 acc[TM][2];
  const int32_t* x32[TM];
  for (int t = 0; t < mt; ++t) {
    acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    x32[t] = reinterpret_cast<const int32_t*>(x + (m0 + t) * K);
  }
  int64_t p = 0;
  for (; p + 2 <= P; p += 2) {
    _mm_prefetch(base + p * 64 + PREFETCH, _MM_HINT_T0);
    _mm_prefetch(base + p * 64 + 64 + PREFETCH, _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(base + p * 64), w1 = (__m512bh)_mm512_loadu_si512(base + p * 64 + 64);
    for (int t = 0; t < mt; ++t) {
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], (__m512bh)_mm512_set1_epi32(x32[t][p]), w0);
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], (__m512bh)_mm512_set1_epi32(x32[t][p + 1]), w1);
    }
  }
  for (; p < P; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(base + p * 64);
    for (int t = 0; t < mt; ++t) acc[t][0] = _mm512_dpbf16_ps(acc[t][0], (__m512bh)_mm512_set1_epi32(x32[t][p]), w0);
  }
  for (int t = 0; t < mt; ++t) {
    const __m512 sum = _mm512_add_ps(acc[t][0], acc[t][1]);
    if constexpr (std::is_same_v<Y, float>) {
      _mm512_storeu_ps(y + (m0 + t) * N + rb * 16, sum);
    } else {
      const __m256bh r = _mm512_cvtneps_pbh(sum);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (m0 + t) * N + rb * 16), (__m256i)r);
    }
  }
}

// y (M, N) = x (M, K) bf16 @ W.T, threads over the 16-row blocks of W, tiles of MT activation rows.
template <typename Y>
void bf16_product(const uint16_t* W, const uint16_t* x, Y* y, int64_t M, int64_t K, int64_t N) {
  at::parallel_for(0, N / 16, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t rb = b0; rb < b1; ++rb)
      for (int64_t m0 = 0; m0 < M; m0 += MT)
        with_tile(static_cast<int>(std::min<int64_t>(MT, M - m0)),
                  [&](auto tm) { bf16_block_rows<decltype(tm)::value, Y>(W, x, y, rb, m0, K, N); });
  });
}
#endif

// A packed weight as the fused forward reads it: bits 4/8, integer codes (see the layout above); bits 16, bf16
// weights in the bf16 product's layout (N/16, K/2, 16, 2), no scales.
struct QW {
  const uint8_t* qs;
  const void* scales;
  const void* mins;  // nullptr: symmetric
  bool half_scales;
  int64_t bits, group, zero, n;
  bool big;
};

QW qw_from(const std::vector<at::Tensor>& t, size_t i, const std::vector<int64_t>& meta, size_t j) {
  // t[i] codes, t[i+1] scales, t[i+2] mins (empty: symmetric); meta[j..j+3] bits, group, zero, big
  const bool bf16 = meta[j] == 16;
  TORCH_CHECK(t[i].scalar_type() == (bf16 ? at::kBFloat16 : at::kByte) && t[i].is_contiguous(),
              "fused forward: weight ", i, " is not a packed ", bf16 ? "bf16" : "integer", " weight");
  QW w{static_cast<const uint8_t*>(t[i].data_ptr()), bf16 ? nullptr : t[i + 1].data_ptr(),
       t[i + 2].numel() ? t[i + 2].data_ptr() : nullptr, !bf16 && t[i + 1].scalar_type() == at::kHalf, meta[j],
       meta[j + 1], meta[j + 2], t[i].size(0) * 16, meta[j + 3] != 0};
  return w;
}

// y (M, w.n) fp32 = x (M, K) fp32 @ W.T for a bf16 weight: x rounded to bf16 (to nearest even, as torch's
// .to(bfloat16)), then the bf16 product with fp32 accumulation, threads over the 16-row blocks.
void bf16_into(const QW& w, const float* x, int64_t M, int64_t K, float* y) {
#ifdef LAMINA_HAS_BF16
  std::vector<uint16_t> xb(M * K);
  int64_t i = 0;
  for (; i + 16 <= M * K; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb.data() + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
  for (; i < M * K; ++i) xb[i] = c10::BFloat16(x[i]).x;
  bf16_product(reinterpret_cast<const uint16_t*>(w.qs), xb.data(), y, M, K, w.n);
#else
  (void)w, (void)x, (void)M, (void)K, (void)y;
  TORCH_CHECK(false, "fused forward: this kernel variant has no bf16 product");
#endif
}

// y (M, w.n) = x (M, K) @ W.T: activations quantized per group, then the blocked integer product.
template <typename T>
void qmm_into(const QW& w, const T* x, int64_t M, int64_t K, T* y) {
  if (w.bits == 16) {
    if constexpr (std::is_same_v<T, float>) return bf16_into(w, x, M, K, y);
    TORCH_CHECK(false, "qmm: a bf16 weight takes fp32 activations here");
  }
  QuantX xq = quantize_x(x, M, K);
  const bool affine = w.mins != nullptr;
  if (w.half_scales)
    dispatch<at::Half, T>(w.bits, affine, w.big, w.qs, static_cast<const at::Half*>(w.scales),
                          static_cast<const at::Half*>(w.mins), static_cast<int32_t>(w.zero), xq, M, K, w.group, y, w.n);
  else
    dispatch<float, T>(w.bits, affine, w.big, w.qs, static_cast<const float*>(w.scales),
                       static_cast<const float*>(w.mins), static_cast<int32_t>(w.zero), xq, M, K, w.group, y, w.n);
}

}  // namespace

// x (..., K) fp32/bf16/fp16; qs: uint8 (N/16, K*bits/32, 64) in the layout above; scales/mins (N/16, K/G, 16)
// fp16 or fp32 (mins: affine formats only); zero: the code of 0 for symmetric formats; big: codes may exceed 127.
// Returns (..., N) in x's dtype.
at::Tensor qmm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
               int64_t bits, int64_t group, int64_t zero, bool big) {
  TORCH_CHECK(bits == 4 || bits == 8, "qmm: bits must be 4 or 8");
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.dim() == 3 && qs.size(2) == 64, "qmm: bad codes");
  const int64_t nb = qs.size(0), N = nb * 16, K = qs.size(1) * 64 / 16 * 8 / bits, G = group;
  TORCH_CHECK(x.size(-1) == K, "qmm: x has ", x.size(-1), " columns, the weight ", K);
  TORCH_CHECK(G % AG == 0 && K % G == 0, "qmm: group size ", G, " does not fit K ", K);
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == nb * (K / G) * 16, "qmm: bad scales");
  const bool affine = mins.has_value();
  if (affine) TORCH_CHECK(mins->scalar_type() == scales.scalar_type() && mins->is_contiguous() && mins->numel() == scales.numel(), "qmm: bad mins");
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat, "qmm: scales must be fp16 or fp32");
  at::Tensor xc = x.reshape({-1, K}).contiguous();
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const QW w{qs.data_ptr<uint8_t>(), scales.data_ptr(), affine ? mins->data_ptr() : nullptr,
             scales.scalar_type() == at::kHalf, bits, G, zero, N, big};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "qmm", [&] {
    qmm_into(w, xc.data_ptr<scalar_t>(), M, K, y.data_ptr<scalar_t>());
  });
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

// ------------------------------------------------------------------------------------- fused forward
// The whole stack of a Llama model (plain or LLaMA-Adapter V2) for N = B·T tokens in one call, over quantized
// or bf16 weights and fp32 activations: per layer RMSNorm → [q;k;v] → RoPE (interleaved pairs) → K/V into the
// cache → causal attention over the cache → wo → residual → RMSNorm → [w1;w3] → SiLU·up → w2 → residual. What
// it replaces is ~35 torch ops per layer (≈ 8 ms per decoded token of SmolLM2's 30 layers on 2 cores, more than
// its weight streaming). Every output row depends on its own token and cache row only, with fixed reduction orders: a
// token's hidden state is the same bits whether it is prefilled in a chunk of 512, decoded alone or in a batch
// of 16 — prefill, decode, prefix-cache hits and batching all agree (the deterministic mode by construction).
namespace {

// Phase timers of forward_plain (off unless `profile_plain(true)`): wall seconds per phase, summed over calls.
enum Phase { P_NORM, P_QKV, P_ROPE, P_ATTEND, P_WO, P_W13, P_SILU, P_W2, P_RESIDUAL, P_SETUP, P_HEAD, N_PHASES };
bool g_profile = false;
double g_phase[N_PHASES] = {};
struct Clock {
  std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
  void lap(Phase p) {
    if (!g_profile) return;
    const auto now = std::chrono::steady_clock::now();
    g_phase[p] += std::chrono::duration<double>(now - t).count();
    t = now;
  }
};

// aid: per row the bank row of w (A, dim) to use (an adapter's own norm); nullptr: w is one (dim) weight.
void rmsnorm(const float* h, const float* w, float* out, int64_t N, int64_t dim, float eps,
             const int64_t* aid = nullptr) {
  for (int64_t n = 0; n < N; ++n) {
    const float* x = h + n * dim;
    const float* wn = aid == nullptr ? w : w + aid[n] * dim;
    float ss = 0.f;
    // in order, a scalar chain: a 16-wide sum was 0.04 ms faster per batch-1 step, but its other rounding moved
    // some int8 activation roundings, and the tiny adapter model's fused and eager logits then differed by 0.6%
    // of their range instead of 1e-7 (tests/models/test_quantized.py)
    for (int64_t i = 0; i < dim; ++i) ss += x[i] * x[i];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) out[n * dim + i] = x[i] * r * wn[i];
  }
}

// ---- LLaMA-Adapter V2 pieces (per row: its adapter's bank row) ----

// y[n, off .. off+out) += l2[a] @ (l1[a] @ x[n]) for LoRA l1 (A, r, K), l2 (A, out, r) of element type E
// (fp32, or bf16 as a bf16 model holds them), in fp32.
template <typename E>
void lora_rows(float* y, int64_t ystride, int64_t off, const float* x, int64_t K, int64_t N, const int64_t* aid,
               const E* a1, const E* a2, int64_t r, int64_t out) {
  float low[256];
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = x + n * K;
    const E* w1 = a1 + aid[n] * r * K;
    for (int64_t i = 0; i < r; ++i) {
      F16 acc = fzero();
      for (int64_t k = 0; k < K; k += 16) acc = fmaddv(loadf(xn + k), loadf(w1 + i * K + k), acc);
      low[i] = hsum(acc);
    }
    const E* w2 = a2 + aid[n] * out * r;
    float* yn = y + n * ystride + off;
    for (int64_t o = 0; o < out; ++o) {
      float acc = 0.f;
      for (int64_t i = 0; i < r; ++i) acc += static_cast<float>(w2[o * r + i]) * low[i];
      yn[o] += acc;
    }
  }
}

// y[n, off .. off+out) += bias[aid[n]] (bias: (A, out) fp32) and, with LoRA, += l2[a] @ (l1[a] @ x[n])
// (l1: (A, r, K), l2: (A, out, r), both fp32 or both bf16). y rows are `ystride` wide; x rows K wide.
void adapt_rows(float* y, int64_t ystride, int64_t off, const float* x, int64_t K, int64_t N, const int64_t* aid,
                const at::Tensor& bias, const at::Tensor& l1, const at::Tensor& l2) {
  if (bias.numel()) {
    const int64_t out = bias.size(1);
    const float* b = bias.data_ptr<float>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < out; ++o) y[n * ystride + off + o] += b[aid[n] * out + o];
  }
  if (!l1.numel()) return;
  const int64_t r = l1.size(1), out = l2.size(1);
  TORCH_CHECK(l1.size(2) == K && l2.size(2) == r && K % 16 == 0 && r <= 256, "fused forward: bad LoRA shapes");
  if (l1.scalar_type() == at::kBFloat16)
    lora_rows(y, ystride, off, x, K, N, aid, l1.data_ptr<at::BFloat16>(), l2.data_ptr<at::BFloat16>(), r, out);
  else
    lora_rows(y, ystride, off, x, K, N, aid, l1.data_ptr<float>(), l2.data_ptr<float>(), r, out);
}

// The adaption-prompt attention of an adapted layer, added to `att` (N, H·D): per row n and query head h,
// gate[aid[n], h] · softmax(q·pk / √D) · pv over the row's `plen[n]` prompt keys pk/pv, read from
// (S, KV, P, D) fp32 or bf16 at prompt row prow[n] (no causal mask, no RoPE on the prompts; the queries are
// roped).
template <typename C>
void prompt_attend(const float* qkv, int64_t N, int64_t H, int64_t KV, int64_t D, const int64_t* aid,
                   const int64_t* prow, const int64_t* plen, const C* pk, const C* pv, int64_t P,
                   const float* gate, float* att) {
  const int64_t G = H / KV, width = (H + 2 * KV) * D;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, N * H, 4, [&](int64_t a, int64_t e) {
    std::vector<float> sc(P);
    for (int64_t i = a; i < e; ++i) {
      const int64_t n = i / H, h = i % H, kh = h / G, len = plen[n];
      if (len <= 0) continue;
      const float* q = qkv + n * width + h * D;
      const C* kb = pk + ((prow[n] * KV + kh) * P) * D;
      const C* vb = pv + ((prow[n] * KV + kh) * P) * D;
      float mx = -INFINITY;
      for (int64_t p = 0; p < len; ++p) {
        F16 acc = fzero();
        for (int64_t d = 0; d < D; d += 16) acc = fmaddv(loadf(q + d), loadf(kb + p * D + d), acc);
        sc[p] = hsum(acc) * scale;
        mx = std::max(mx, sc[p]);
      }
      float sum = 0.f;
      for (int64_t p = 0; p < len; ++p) { sc[p] = std::exp(sc[p] - mx); sum += sc[p]; }
      const float g = gate[aid[n] * H + h] / sum;
      float* y = att + n * H * D + h * D;
      for (int64_t d = 0; d < D; d += 16) {
        F16 acc = fzero();
        for (int64_t p = 0; p < len; ++p) acc = fmadd1(loadf(vb + p * D + d), sc[p], acc);
        store(y + d, fmadd1(acc, g, loadf(y + d)));
      }
    }
  });
}

// Attention of the G query heads of one kv head over one chunk of keys (cache positions j0 .. j0+L-1): per
// head the chunk's max score m, sum of exp(score - m) l, and o = Σ exp(score - m)·v (not yet divided by l).
// The chunks are fixed blocks of positions (see `attend`), so a token's arithmetic never depends on what else
// is in the forward.
template <typename C>
void attend_chunk(const float* qkv_n, int64_t kh, int64_t G, int64_t D, int64_t L, const C* kb, const C* vb,
                  float scale, float* m_out, float* l_out, float* o_out, std::vector<float>& sc) {
  constexpr int64_t MAXG = 16, MAXV = 16;  // query heads per kv head; head_dim / 16 (D ≤ 256)
  const int64_t nv = D / 16, Lp = (L + 15) / 16 * 16;
  sc.resize(G * Lp);
  F16 q[MAXG][MAXV];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < nv; ++c) q[g][c] = loadf(qkv_n + (kh * G + g) * D + c * 16);
  constexpr int64_t AHEAD = 16;  // cache rows read ahead of use (they come from memory: the weights evict them)
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(C));
  for (int64_t j = 0; j < L; ++j) {
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(kb + (j + AHEAD) * D) + b, _MM_HINT_T0);
    F16 kr[MAXV];
    for (int64_t c = 0; c < nv; ++c) kr[c] = loadf(kb + j * D + c * 16);
    for (int64_t g = 0; g < G; ++g) {
      F16 acc = fmul(q[g][0], kr[0]);
      for (int64_t c = 1; c < nv; ++c) acc = fmaddv(q[g][c], kr[c], acc);
      sc[g * Lp + j] = hsum(acc) * scale;
    }
  }
  F16 o[MAXG][MAXV];
  for (int64_t g = 0; g < G; ++g) {  // exp(score - max), 16 at a time (the padding counts as 0)
    float* s_ = sc.data() + g * Lp;
    for (int64_t j = L; j < Lp; ++j) s_[j] = -INFINITY;
    F16 mx = fset1(-INFINITY);
    for (int64_t j = 0; j < Lp; j += 16) mx = fmaxv(mx, loadf(s_ + j));
    m_out[g] = hmax(mx);
    const F16 neg_m = fset1(-m_out[g]);
    for (int64_t j = 0; j < Lp; j += 16) store(s_ + j, fexp(fadd(loadf(s_ + j), neg_m)));
    for (int64_t j = L; j < Lp; ++j) s_[j] = 0.f;
    F16 sum = fzero();
    for (int64_t j = 0; j < Lp; j += 16) sum = fadd(sum, loadf(s_ + j));
    l_out[g] = hsum(sum);
    for (int64_t c = 0; c < nv; ++c) o[g][c] = fzero();
  }
  for (int64_t j = 0; j < L; ++j) {
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(vb + (j + AHEAD) * D) + b, _MM_HINT_T0);
    F16 vr[MAXV];
    for (int64_t c = 0; c < nv; ++c) vr[c] = loadf(vb + j * D + c * 16);
    for (int64_t g = 0; g < G; ++g) {
      const F16 p = fset1(sc[g * Lp + j]);
      for (int64_t c = 0; c < nv; ++c) o[g][c] = fmaddv(p, vr[c], o[g][c]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < nv; ++c) store(o_out + g * D + c * 16, o[g][c]);
}

template <typename C>
void attend(const float* qkv, int64_t N, int64_t T, int64_t H, int64_t KV, int64_t D, const int64_t* pos,
            const int64_t* rows, C* kc, C* vc, int64_t Lmax, float* out) {
  const int64_t G = H / KV, width = (H + 2 * KV) * D;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  TORCH_CHECK(G <= 16 && D % 16 == 0 && D / 16 <= 16, "fused attention: unsupported head layout");
  // every query of this forward reads keys written by this forward: write them all first
  for (int64_t n = 0; n < N; ++n) {
    const int64_t b = n / T, p = pos[n];
    for (int64_t kh = 0; kh < KV; ++kh) {
      const float* k = qkv + n * width + (H + kh) * D;
      const float* v = qkv + n * width + (H + KV + kh) * D;
      C* kd = kc + ((rows[b] * KV + kh) * Lmax + p) * D;
      C* vd = vc + ((rows[b] * KV + kh) * Lmax + p) * D;
      for (int64_t d = 0; d < D; ++d) { kd[d] = static_cast<C>(k[d]); vd[d] = static_cast<C>(v[d]); }
    }
  }
  // A task per (token, kv head, chunk of CHUNK key positions): its query heads read each key and value row
  // once, and a batch-1 decode step still has work for every thread. The chunks are fixed blocks of positions
  // (0..63, 64..127, ...), merged in order (the log-sum-exp rule), so a token's result is the same bits
  // whatever shares its forward.
  constexpr int64_t CHUNK = 64;
  std::vector<int64_t> first(N + 1, 0);  // first task of token n
  for (int64_t n = 0; n < N; ++n) first[n + 1] = first[n] + KV * ((pos[n] + CHUNK) / CHUNK);
  const int64_t tasks = first[N], stride = G * (D + 2);
  // per task and head: m, l, o[D]; kept between calls (a prefill chunk of 256 tokens at 2048 positions needs
  // ~19 MB: allocated afresh for every layer, its page faults would cost more than the attention)
  static thread_local std::vector<float> part;
  if (part.size() < static_cast<size_t>(tasks * stride)) part.resize(tasks * stride);
  float* const partials = part.data();  // (the lambdas run on other threads: their `part` is another one)
  at::parallel_for(0, tasks, 1, [&](int64_t a, int64_t e) {
    std::vector<float> sc;
    float m[16], l[16];
    int64_t n = std::upper_bound(first.begin(), first.end(), a) - first.begin() - 1;
    for (int64_t i = a; i < e; ++i) {
      while (i >= first[n + 1]) ++n;
      const int64_t nc = (pos[n] + CHUNK) / CHUNK, kh = (i - first[n]) / nc, c = (i - first[n]) % nc, b = n / T;
      const int64_t j0 = c * CHUNK, len = std::min(CHUNK, pos[n] + 1 - j0);
      const int64_t base = (rows[b] * KV + kh) * Lmax * D + j0 * D;
      float* pt = partials + i * stride;
      attend_chunk(qkv + n * width, kh, G, D, len, kc + base, vc + base, scale, m, l, pt + 2 * G, sc);
      for (int64_t g = 0; g < G; ++g) { pt[g] = m[g]; pt[G + g] = l[g]; }
    }
  });
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {  // merge each head's chunks, in order
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t nc = (first[n + 1] - first[n]) / KV;
      for (int64_t kh = 0; kh < KV; ++kh)
        for (int64_t g = 0; g < G; ++g) {
          const float* p0 = partials + (first[n] + kh * nc) * stride;
          float M = -INFINITY, lsum = 0.f;
          for (int64_t c = 0; c < nc; ++c) M = std::max(M, p0[c * stride + g]);
          float* y = out + n * H * D + (kh * G + g) * D;
          for (int64_t d = 0; d < D; ++d) y[d] = 0.f;
          for (int64_t c = 0; c < nc; ++c) {
            const float* pc = p0 + c * stride;
            const float w = std::exp(pc[g] - M);
            lsum += w * pc[G + g];
            for (int64_t d = 0; d < D; ++d) y[d] += w * pc[2 * G + g * D + d];
          }
          const float inv = 1.f / lsum;
          for (int64_t d = 0; d < D; ++d) y[d] *= inv;
        }
    }
  });
}

// Rows `ids` of a packed weight (the token embeddings): (N, K) fp32, as QuantWeight.rows and Bf16Weight.rows give.
void embed_rows(const QW& w, int64_t K, const int64_t* ids, int64_t N, float* out) {
  if (w.bits == 16) {  // bf16 (N/16, K/2, 16, 2): row r's columns 2p, 2p+1 at ((r/16)·K/2 + p)·32 + (r%16)·2
    const auto* W = reinterpret_cast<const uint16_t*>(w.qs);
    for (int64_t n = 0; n < N; ++n) {
      const uint16_t* blk = W + (ids[n] / 16) * 16 * K + (ids[n] % 16) * 2;
      float* y = out + n * K;
      for (int64_t p = 0; p < K / 2; ++p) {
        const uint32_t a = static_cast<uint32_t>(blk[p * 32]) << 16, b = static_cast<uint32_t>(blk[p * 32 + 1]) << 16;
        std::memcpy(y + 2 * p, &a, 4);
        std::memcpy(y + 2 * p + 1, &b, 4);
      }
    }
    return;
  }
  const int64_t lines = K * w.bits / 32, ng = K / w.group;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t b = ids[n] / 16, lane = ids[n] % 16;
    const uint8_t* blk = w.qs + b * lines * 64 + lane * 4;
    float* y = out + n * K;
    for (int64_t j = 0; j < lines; ++j) {
      const uint8_t* p = blk + j * 64;
      for (int i = 0; i < 4; ++i) {
        if (w.bits == 8) {
          y[4 * j + i] = p[i];
        } else {
          y[8 * j + i] = p[i] & 15;
          y[8 * j + 4 + i] = p[i] >> 4;
        }
      }
    }
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t at = (b * ng + g) * 16 + lane;
      const float d = w.half_scales ? static_cast<float>(static_cast<const at::Half*>(w.scales)[at])
                                    : static_cast<const float*>(w.scales)[at];
      float* yg = y + g * w.group;
      if (w.mins == nullptr) {
        for (int64_t k = 0; k < w.group; ++k) yg[k] = (yg[k] - static_cast<float>(w.zero)) * d;
      } else {
        const float m = w.half_scales ? static_cast<float>(static_cast<const at::Half*>(w.mins)[at])
                                      : static_cast<const float*>(w.mins)[at];
        for (int64_t k = 0; k < w.group; ++k) yg[k] = yg[k] * d + m;
      }
    }
  }
}

}  // namespace

// A Llama model from token ids to logits in one call: the embedding lookup, every layer, the final norm and the
// output head, over packed weights (integer codes, or bf16 with meta bits 16 and empty scales/mins) and fp32
// activations.
// tokens (N,) with N = B·T; h: the embedded tokens (N, dim) fp32 when the embeddings are not packed (then
// weights[0..2] are empty); weights: [embed codes, scales, mins, final norm, output codes, scales, mins] then
// per layer [attn_norm, qkv codes, scales, mins, wo codes, scales, mins, ffn_norm, w13 codes, scales, mins, w2
// codes, scales, mins]; meta: 2 × (bits, group, zero, big) for the embeddings and the output, then per layer
// 4 × the same; k_cache/v_cache: per layer (S, KV, Lmax, D) fp32 or bf16; rows (B,), positions (B·T,) row
// by row; logit_index (M,): the flat token indices whose logits are returned, (M, vocab rounded up to 16)
// fp32. The indices come as plain integer lists, not tensors: the step's Python side then makes no tensors.
// LLaMA-Adapter V2 models add (fp32, LoRA and prompts fp32 or bf16; A adapters; empty where a piece is absent):
// adapter: [final norm bank (A, dim)] then per layer [attn_norm bank, ffn_norm bank (A, dim), [q;k;v] bias
// (A, (H+2KV)·D), wo bias (A, dim), [w1;w3] bias (A, 2·hidden), w2 bias (A, dim), the prompt gate
// tanh(gate)·new_gate (A, H) (adapted layers), then LoRA l1 (A, r, in) and l2 (A, out, r) of q, k, v, o, w1,
// w3, w2]; adapter_ids (B,): each batch row's bank row (empty: a plain model); prompt_k/prompt_v (n_adapted,
// S, KV, P, D): the adaption prompts' keys/values, row prompt_rows[b] (B,) of which the first prompt_len[b]
// (B,) are valid; the adapted layers are adapted_start .. L-1.
at::Tensor forward_plain(const std::vector<int64_t>& tokens, const c10::optional<at::Tensor>& h_in,
                         const std::vector<at::Tensor>& weights, const std::vector<int64_t>& meta,
                         const std::vector<at::Tensor>& k_cache, const std::vector<at::Tensor>& v_cache,
                         const std::vector<int64_t>& rows, const std::vector<int64_t>& positions,
                         const std::vector<int64_t>& logit_index, int64_t n_heads, int64_t n_kv_heads, double eps,
                         double theta, const std::vector<at::Tensor>& adapter, const std::vector<int64_t>& adapter_ids,
                         const c10::optional<at::Tensor>& prompt_k, const c10::optional<at::Tensor>& prompt_v,
                         const std::vector<int64_t>& prompt_rows, const std::vector<int64_t>& prompt_len,
                         int64_t adapted_start) {
  Clock clock;
  const int64_t L = static_cast<int64_t>(k_cache.size());
  TORCH_CHECK(weights.size() == 7 + static_cast<size_t>(L) * 14 && meta.size() == 8 + static_cast<size_t>(L) * 16,
              "forward_plain: weights/meta do not match the layers");
  const int64_t N = static_cast<int64_t>(tokens.size()), dim = weights[3].numel(), H = n_heads, KV = n_kv_heads;
  const int64_t D = k_cache[0].size(3), B = static_cast<int64_t>(rows.size()), Lmax = k_cache[0].size(2);
  const int64_t width = (H + 2 * KV) * D, T = B > 0 ? N / B : 0;
  TORCH_CHECK(N > 0 && B * T == N && static_cast<int64_t>(positions.size()) == N,
              "forward_plain: rows/positions do not match the tokens");
  const int64_t* rw = rows.data();
  const int64_t* ps = positions.data();
  const int64_t* want = logit_index.data();
  const int64_t M = static_cast<int64_t>(logit_index.size());
  for (int64_t i = 0; i < M; ++i) TORCH_CHECK(want[i] >= 0 && want[i] < N, "forward_plain: logit_index out of range");
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(rw[b] >= 0 && rw[b] < k_cache[0].size(0), "forward_plain: cache row out of range");
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(ps[n] >= 0 && ps[n] < Lmax, "forward_plain: position out of range");
  at::Tensor h = at::empty({N, dim}, at::TensorOptions().dtype(at::kFloat));
  float* hp = h.data_ptr<float>();
  if (h_in.has_value()) {
    TORCH_CHECK(h_in->scalar_type() == at::kFloat && h_in->numel() == N * dim, "forward_plain: h must be (N, dim) fp32");
    h.copy_(h_in->reshape({N, dim}));
  } else {
    TORCH_CHECK(weights[0].numel() > 0, "forward_plain: no packed embeddings and no h");
    const QW emb = qw_from(weights, 0, meta, 0);
    const int64_t* ids = tokens.data();
    for (int64_t n = 0; n < N; ++n) TORCH_CHECK(ids[n] >= 0 && ids[n] < emb.n, "forward_plain: token id ", ids[n], " out of range");
    embed_rows(emb, dim, ids, N, hp);
  }
  const int64_t hidden = weights[7 + 8].size(0) * 16 / 2;  // from the first layer's [w1; w3] codes
  TORCH_CHECK(hidden % 16 == 0, "forward_plain: the hidden size must be a multiple of 16");
  // adapters: per token its bank row (and prompt row and count); adapter tensors checked once here
  const bool adapted = !adapter_ids.empty();
  constexpr size_t PER_LAYER = 21;
  std::vector<int64_t> aid(adapted ? N : 0), prow(adapted ? N : 0), plen(adapted ? N : 0);
  int64_t P = 0, S = 0;
  const bool prompts = adapted && prompt_k.has_value();
  if (adapted) {
    TORCH_CHECK(adapter.size() == 1 + static_cast<size_t>(L) * PER_LAYER, "forward_plain: adapter tensors do not match the layers");
    for (size_t i = 0; i < adapter.size(); ++i) {  // fp32; LoRA (a layer's pieces 7..20) may be bf16
      const at::Tensor& t = adapter[i];
      const bool lora = i > 0 && (i - 1) % PER_LAYER >= 7;
      TORCH_CHECK(!t.numel() || ((t.scalar_type() == at::kFloat || (lora && t.scalar_type() == at::kBFloat16))
                                 && t.is_contiguous()), "forward_plain: adapter tensors must be contiguous fp32 (LoRA: or bf16)");
    }
    const int64_t A = adapter[0].size(0);
    TORCH_CHECK(adapter[0].numel() == A * dim, "forward_plain: bad final norm bank");
    // per layer: the expected row width of each piece, 0: must be a bank of that width or empty
    const int64_t widths[7] = {dim, dim, width, dim, 2 * hidden, dim, H};
    const int64_t lora_in[7] = {dim, dim, dim, H * D, dim, dim, hidden};
    const int64_t lora_out[7] = {H * D, KV * D, KV * D, dim, hidden, hidden, dim};
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor* ap = adapter.data() + 1 + l * PER_LAYER;
      for (int i = 0; i < 7; ++i)
        TORCH_CHECK((i >= 2 && !ap[i].numel()) || ap[i].numel() == A * widths[i], "forward_plain: adapter piece ", i,
                    " of layer ", l, " has the wrong size");
      for (int i = 0; i < 7; ++i) {
        const at::Tensor &l1 = ap[7 + 2 * i], &l2 = ap[8 + 2 * i];
        TORCH_CHECK(l1.numel() == 0 ? l2.numel() == 0
                    : (l1.dim() == 3 && l2.dim() == 3 && l1.size(0) == A && l2.size(0) == A && l1.size(2) == lora_in[i]
                       && l2.size(1) == lora_out[i] && l2.size(2) == l1.size(1) && l1.scalar_type() == l2.scalar_type()),
                    "forward_plain: bad LoRA ", i, " of layer ", l);
      }
    }
    TORCH_CHECK(static_cast<int64_t>(adapter_ids.size()) == B, "forward_plain: adapter_ids must have one id per batch row");
    for (int64_t n = 0; n < N; ++n) {
      aid[n] = adapter_ids[n / T];
      TORCH_CHECK(aid[n] >= 0 && aid[n] < A, "forward_plain: adapter id out of range");
    }
    if (prompts) {
      TORCH_CHECK(prompt_v.has_value(), "forward_plain: incomplete prompts");
      TORCH_CHECK((prompt_k->scalar_type() == at::kFloat || prompt_k->scalar_type() == at::kBFloat16)
                  && prompt_v->scalar_type() == prompt_k->scalar_type() && prompt_k->is_contiguous() && prompt_v->is_contiguous()
                  && prompt_k->sizes() == prompt_v->sizes() && prompt_k->dim() == 5 && prompt_k->size(0) == L - adapted_start
                  && prompt_k->size(2) == KV && prompt_k->size(4) == D, "forward_plain: bad prompt keys/values");
      S = prompt_k->size(1);
      P = prompt_k->size(3);
      TORCH_CHECK(static_cast<int64_t>(prompt_rows.size()) == B && static_cast<int64_t>(prompt_len.size()) == B,
                  "forward_plain: prompt rows/lengths must have one per batch row");
      for (int64_t n = 0; n < N; ++n) {
        prow[n] = prompt_rows[n / T];
        plen[n] = prompt_len[n / T];
        TORCH_CHECK(prow[n] >= 0 && prow[n] < S && plen[n] >= 0 && plen[n] <= P, "forward_plain: prompt row/length out of range");
      }
    }
  }
  const int64_t* ad = adapted ? aid.data() : nullptr;
  const at::Tensor nothing = at::empty({0}, at::kFloat);
  std::vector<float> x(N * dim), qkv(N * width), att(N * H * D), tmp(N * dim), gu(N * 2 * hidden), act(N * hidden);
  // RoPE tables for the positions of this forward: (N, D/2) cos/sin, computed as the eager model does
  std::vector<float> cs(N * (D / 2)), sn(N * (D / 2));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < D / 2; ++i) {
      const float inv = 1.f / std::pow(static_cast<float>(theta), static_cast<float>(2 * i) / static_cast<float>(D));
      const float ang = static_cast<float>(ps[n]) * inv;
      cs[n * (D / 2) + i] = std::cos(ang);
      sn[n * (D / 2) + i] = std::sin(ang);
    }
  clock.lap(P_SETUP);
  for (int64_t l = 0; l < L; ++l) {
    const auto& w = weights;
    const size_t o = 7 + l * 14, m = 8 + l * 16;
    const at::Tensor* ap = adapted ? adapter.data() + 1 + l * PER_LAYER : nullptr;  // this layer's adapter pieces
    const at::Tensor* lora = adapted ? ap + 7 : nullptr;  // l1, l2 of q, k, v, o, w1, w3, w2
    if (adapted) rmsnorm(hp, ap[0].data_ptr<float>(), x.data(), N, dim, static_cast<float>(eps), ad);
    else rmsnorm(hp, w[o].data_ptr<float>(), x.data(), N, dim, static_cast<float>(eps));
    clock.lap(P_NORM);
    qmm_into(qw_from(w, o + 1, meta, m), x.data(), N, dim, qkv.data());
    if (adapted) {
      adapt_rows(qkv.data(), width, 0, x.data(), dim, N, ad, ap[2], lora[0], lora[1]);
      adapt_rows(qkv.data(), width, H * D, x.data(), dim, N, ad, nothing, lora[2], lora[3]);
      adapt_rows(qkv.data(), width, (H + KV) * D, x.data(), dim, N, ad, nothing, lora[4], lora[5]);
    }
    clock.lap(P_QKV);
    for (int64_t n = 0; n < N; ++n)  // RoPE on the q and k heads
      for (int64_t hh = 0; hh < H + KV; ++hh) {
        float* v = qkv.data() + n * width + hh * D;
        for (int64_t i = 0; i < D / 2; ++i) {
          const float c = cs[n * (D / 2) + i], s2 = sn[n * (D / 2) + i], a = v[2 * i], b = v[2 * i + 1];
          v[2 * i] = a * c - b * s2;
          v[2 * i + 1] = a * s2 + b * c;
        }
      }
    clock.lap(P_ROPE);
    if (k_cache[l].scalar_type() == at::kBFloat16)
      attend(qkv.data(), N, T, H, KV, D, ps, rw, k_cache[l].data_ptr<at::BFloat16>(), v_cache[l].data_ptr<at::BFloat16>(), Lmax, att.data());
    else
      attend(qkv.data(), N, T, H, KV, D, ps, rw, k_cache[l].data_ptr<float>(), v_cache[l].data_ptr<float>(), Lmax, att.data());
    if (prompts && l >= adapted_start && ap[6].numel()) {
      const int64_t off = (l - adapted_start) * S * KV * P * D;
      if (prompt_k->scalar_type() == at::kBFloat16)
        prompt_attend(qkv.data(), N, H, KV, D, ad, prow.data(), plen.data(), prompt_k->data_ptr<at::BFloat16>() + off,
                      prompt_v->data_ptr<at::BFloat16>() + off, P, ap[6].data_ptr<float>(), att.data());
      else
        prompt_attend(qkv.data(), N, H, KV, D, ad, prow.data(), plen.data(), prompt_k->data_ptr<float>() + off,
                      prompt_v->data_ptr<float>() + off, P, ap[6].data_ptr<float>(), att.data());
    }
    clock.lap(P_ATTEND);
    qmm_into(qw_from(w, o + 4, meta, m + 4), att.data(), N, H * D, tmp.data());
    if (adapted) adapt_rows(tmp.data(), dim, 0, att.data(), H * D, N, ad, ap[3], lora[6], lora[7]);
    clock.lap(P_WO);
    for (int64_t i = 0; i < N * dim; ++i) hp[i] += tmp[i];
    clock.lap(P_RESIDUAL);
    if (adapted) rmsnorm(hp, ap[1].data_ptr<float>(), x.data(), N, dim, static_cast<float>(eps), ad);
    else rmsnorm(hp, w[o + 7].data_ptr<float>(), x.data(), N, dim, static_cast<float>(eps));
    clock.lap(P_NORM);
    qmm_into(qw_from(w, o + 8, meta, m + 8), x.data(), N, dim, gu.data());
    if (adapted) {
      adapt_rows(gu.data(), 2 * hidden, 0, x.data(), dim, N, ad, ap[4], lora[8], lora[9]);
      adapt_rows(gu.data(), 2 * hidden, hidden, x.data(), dim, N, ad, nothing, lora[10], lora[11]);
    }
    clock.lap(P_W13);
    for (int64_t n = 0; n < N; ++n)  // SiLU(gate) · up, 16 at a time
      for (int64_t i = 0; i < hidden; i += 16) {
        const F16 g = loadf(gu.data() + n * 2 * hidden + i), u = loadf(gu.data() + n * 2 * hidden + hidden + i);
        store(act.data() + n * hidden + i, fmul(fdiv(g, fadd(fset1(1.f), fexp(fmul(g, fset1(-1.f))))), u));
      }
    clock.lap(P_SILU);
    qmm_into(qw_from(w, o + 11, meta, m + 12), act.data(), N, hidden, tmp.data());
    if (adapted) adapt_rows(tmp.data(), dim, 0, act.data(), hidden, N, ad, ap[5], lora[12], lora[13]);
    clock.lap(P_W2);
    for (int64_t i = 0; i < N * dim; ++i) hp[i] += tmp[i];
    clock.lap(P_RESIDUAL);
  }
  // the final norm and the output head, for the rows that sample only
  std::vector<float> sel(M * dim), normed(M * dim);
  for (int64_t i = 0; i < M; ++i) std::copy(hp + want[i] * dim, hp + (want[i] + 1) * dim, sel.data() + i * dim);
  if (adapted) {
    std::vector<int64_t> sel_aid(M);
    for (int64_t i = 0; i < M; ++i) sel_aid[i] = aid[want[i]];
    rmsnorm(sel.data(), adapter[0].data_ptr<float>(), normed.data(), M, dim, static_cast<float>(eps), sel_aid.data());
  } else {
    rmsnorm(sel.data(), weights[3].data_ptr<float>(), normed.data(), M, dim, static_cast<float>(eps));
  }
  const QW out = qw_from(weights, 4, meta, 4);
  at::Tensor logits = at::empty({M, out.n}, h.options());
  qmm_into(out, normed.data(), M, dim, logits.data_ptr<float>());
  clock.lap(P_HEAD);
  return logits;
}

// The fused forward's per-model and per-cache arguments, held once on the C++ side: passed to every call
// instead (~430 weight tensors and 2 × 30 cache tensors for the default model), converting them cost 0.45 ms
// of a 7.5 ms batch-1 decode step. Python classes through pybind11 rather than torch custom classes: a call
// whose caches the weights have just been streamed through cost 0.37 ms through a custom class's method and
// 0.10 ms through pybind11 (measured with the same arguments, here).
struct FusedCache {
  std::vector<at::Tensor> k, v;  // per layer (S, KV, Lmax, D)
  FusedCache(std::vector<at::Tensor> k_, std::vector<at::Tensor> v_) : k(std::move(k_)), v(std::move(v_)) {
    TORCH_CHECK(k.size() == v.size() && !k.empty(), "FusedCache: one key and one value tensor per layer");
  }
};

struct FusedModel {
  std::vector<at::Tensor> weights, adapter;
  std::vector<int64_t> meta;
  int64_t n_heads, n_kv_heads, adapted_start;
  double eps, theta;
  FusedModel(std::vector<at::Tensor> weights_, std::vector<int64_t> meta_, int64_t n_heads_, int64_t n_kv_heads_,
             double eps_, double theta_, std::vector<at::Tensor> adapter_, int64_t adapted_start_)
      : weights(std::move(weights_)), adapter(std::move(adapter_)), meta(std::move(meta_)), n_heads(n_heads_),
        n_kv_heads(n_kv_heads_), adapted_start(adapted_start_), eps(eps_), theta(theta_) {}
  // forward_plain over this model's weights and `cache`; the arguments that change per step only
  at::Tensor forward(const FusedCache& cache, const std::vector<int64_t>& tokens, const c10::optional<at::Tensor>& h,
                     const std::vector<int64_t>& rows, const std::vector<int64_t>& positions,
                     const std::vector<int64_t>& logit_index, const std::vector<int64_t>& adapter_ids,
                     const c10::optional<at::Tensor>& prompt_k, const c10::optional<at::Tensor>& prompt_v,
                     const std::vector<int64_t>& prompt_rows, const std::vector<int64_t>& prompt_len) const {
    return forward_plain(tokens, h, weights, meta, cache.k, cache.v, rows, positions, logit_index, n_heads,
                         n_kv_heads, eps, theta, adapter, adapter_ids, prompt_k, prompt_v, prompt_rows, prompt_len,
                         adapted_start);
  }
};

// The phase timers' sums since the last call (seconds: norm, qkv, rope, attend, wo, w13, silu, w2, residual,
// setup, head), reset; `enable` turns them on or off from now.
std::vector<double> profile_plain(bool enable) {
  std::vector<double> out(g_phase, g_phase + N_PHASES);
  for (double& v : g_phase) v = 0.0;
  g_profile = enable;
  return out;
}

#ifdef LAMINA_HAS_BF16

// x (..., K) bf16; packed (N/16, K/2, 16, 2) bf16 → (..., N) bf16 (fp32 accumulation, rounded once).
at::Tensor mm_bf16(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16, "mm_bf16: bf16 only");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 2 && packed.is_contiguous(), "mm_bf16: bad layout");
  const int64_t K = packed.size(1) * 2, nb = packed.size(0), N = nb * 16;
  TORCH_CHECK(x.size(-1) == K, "mm_bf16: x has ", x.size(-1), " columns, the weight ", K);
  at::Tensor xc = x.reshape({-1, K}).contiguous();
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  bf16_product(reinterpret_cast<const uint16_t*>(packed.data_ptr()), reinterpret_cast<const uint16_t*>(xc.data_ptr()),
               reinterpret_cast<uint16_t*>(y.data_ptr()), M, K, N);
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}
#endif

#if defined(LAMINA_ISA_AVX512)
namespace {
// The first maximum of x[0..V), a NaN counting as the maximum (the first NaN), as numpy's and torch's argmax:
// per lane the first index of its strictly greater values, then the lowest index among the lanes holding the
// row's maximum.
int64_t argmax_row(const float* x, int64_t V) {
  int64_t i = 0, best_i = 0;
  float best = V > 0 ? x[0] : 0.f;
  __mmask16 nan = 0;
  if (V >= 16) {
    __m512 bv = _mm512_loadu_ps(x);
    __m512i bidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i idx = bidx;
    const __m512i step = _mm512_set1_epi32(16);
    nan = _mm512_cmp_ps_mask(bv, bv, _CMP_UNORD_Q);
    for (i = 16; i + 16 <= V; i += 16) {
      idx = _mm512_add_epi32(idx, step);
      const __m512 v = _mm512_loadu_ps(x + i);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, bv, _CMP_GT_OQ);
      bv = _mm512_mask_blend_ps(gt, bv, v);
      bidx = _mm512_mask_blend_epi32(gt, bidx, idx);
    }
    best = _mm512_reduce_max_ps(bv);
    best_i = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(bv, _mm512_set1_ps(best), _CMP_EQ_OQ), bidx);
  } else {
    i = 1;
    nan = x[0] != x[0];
  }
  for (; i < V; ++i) {
    if (x[i] != x[i]) nan = 1;
    else if (x[i] > best) best = x[i], best_i = i;
  }
  if (nan)
    for (int64_t j = 0; j < V; ++j)
      if (x[j] != x[j]) return j;
  return best_i;
}
}  // namespace

// Each row's first maximum of (M, V) contiguous fp32 logits (the engine's greedy rows), rows over the threads.
std::vector<int64_t> argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) > 0
              && x.size(1) < (int64_t{1} << 31), "argmax_rows: (M, V) contiguous fp32 logits");
  const int64_t M = x.size(0), V = x.size(1);
  const float* p = x.data_ptr<float>();
  std::vector<int64_t> out(M);
  if (M == 1) out[0] = argmax_row(p, V);  // on this thread: no fork/join for one row
  else at::parallel_for(0, M, 1, [&](int64_t a, int64_t b) { for (int64_t r = a; r < b; ++r) out[r] = argmax_row(p + r * V, V); });
  return out;
}
#endif

TORCH_LIBRARY(LAMINA_NS, m) {
  m.def("qmm(Tensor x, Tensor qs, Tensor scales, Tensor? mins, int bits, int group, int zero, bool big) -> Tensor");
  m.def("profile_plain(bool enable) -> float[]", &profile_plain);
#ifdef LAMINA_HAS_BF16
  m.def("mm_bf16(Tensor x, Tensor packed) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(LAMINA_NS, CPU, m) {
  m.impl("qmm", &qmm);
#ifdef LAMINA_HAS_BF16
  m.impl("mm_bf16", &mm_bf16);
#endif
}

// The fused forward's classes; the kernel runs without the GIL (the server's event loop goes on meanwhile)
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  // module_local: each variant's library defines these same C++ types, and pybind11's registry is global
  py::class_<FusedCache>(m, "FusedCache", py::module_local())
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>>());
  py::class_<FusedModel>(m, "FusedModel", py::module_local())
      .def(py::init<std::vector<at::Tensor>, std::vector<int64_t>, int64_t, int64_t, double, double,
                    std::vector<at::Tensor>, int64_t>())
      .def("forward", &FusedModel::forward, py::call_guard<py::gil_scoped_release>());
#if defined(LAMINA_ISA_AVX512)
  m.def("argmax_rows", &argmax_rows, py::call_guard<py::gil_scoped_release>());
#endif
}
