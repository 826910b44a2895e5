// Weight-only quantized matmuls for XLA:CPU (jax.ffi), y (M, O) = x (M, K) . W, the weight dequantized in
// registers as it streams, never written out. Decoding reads every weight once per token, so reading 8-bit
// (or 4-bit) codes instead of f32 divides the bytes a token moves by 4 (or ~7).
//
// Weights are stored in 64-column strips, (O / 64, K, 64): a strip is one contiguous run of memory, which
// the hardware prefetcher streams (walking a row-major (K, O) weight column strip by column strip does not).
//
//   jaxlm_int8_matmul (q (O/64, K, 64) int8, scale (O,) f32):  W[k, o] = q[o / 64, k, o % 64] * scale[o].
//   jaxlm_bf16_matmul (w (O/64, K, 64) bf16): the same without scales.
//   jaxlm_f32_matmul (w (O/64, K, 64) f32): unquantized weights in the same layout. XLA's CPU dot at a few rows
//       streams the weight and computes one after the other; this overlaps the two (the default decode path
//       on CPU, `jaxlm.quantize`).
// An embedding table (V, D) is stored as the strips of its transpose, so its read-out is one of these too.
//   jaxlm_nf4_matmul: the strips as NF4 (jaxlm/ops/nf4.py, bitsandbytes' format): block b = (strip, k) holds
//       64 codes in 32 bytes, byte j the codes of columns j (high nibble) and 32 + j (low nibble), and
//       absmax_b = dynamic[absmax_codes[b]] * absmax_scale[b / 256] + absmax_offset; W = levels[code] * absmax_b.
//
// Strips are split over XLA's intra-op thread pool.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

using jaxlm::parallel_for;

constexpr int64_t kStrip = 64;  // output columns per strip (one NF4 block per row of a strip)
constexpr int64_t kRowBlock = 96;  // rows of x a task takes: a multiple of the 6 rows of a pass

// body(t, m0, rows) for every strip t and block of rows [m0, m0 + rows) of x, spread over the pool. At a few
// rows (decoding) a task is a whole strip; a prefill's rows are split too, so that a weight of 3 strips still
// keeps both threads busy, and a block of x (96 x K) stays in cache while a strip streams past it.
template <typename F>
void for_each_tile(ffi::ThreadPool& pool, int64_t M, int64_t strips, F body) {
  const int64_t blocks = std::max<int64_t>(1, (M + kRowBlock - 1) / kRowBlock);
  parallel_for(pool, strips * blocks, [&](int64_t i) {
    const int64_t t = i / blocks, m0 = (i % blocks) * kRowBlock;
    body(t, m0, std::min(kRowBlock, M - m0));
  });
}

// Every row of x (M, K) times one strip (K rows of 64 columns) into y (row stride O), times scale[0:64] if
// given; `row(k, w)` writes the strip's row k (64 floats) to w.
template <typename Row>
void strip_generic(const float* x, int64_t M, int64_t K, float* y, int64_t O, const float* scale, Row row) {
  constexpr int64_t kRows = 8;
  alignas(64) float acc[kRows][kStrip];
  alignas(64) float w[kStrip];
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int64_t rows = std::min(kRows, M - m0);
    std::memset(acc, 0, sizeof(acc));
    for (int64_t k = 0; k < K; ++k) {
      row(k, w);
      for (int64_t r = 0; r < rows; ++r) {
        const float a = x[(m0 + r) * K + k];
        for (int64_t j = 0; j < kStrip; ++j) acc[r][j] += a * w[j];
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < kStrip; ++j) y[(m0 + r) * O + j] = scale ? acc[r][j] * scale[j] : acc[r][j];
  }
}

#if defined(__AVX512F__)
// R rows of x times one strip, accumulated in R x 4 registers; `load(k, w)` puts the strip's row k in w[0:4].
// The weight rows' common factor (NF4's absmax of block (strip, k)): folded into x[r, k], one scalar multiply,
// instead of into the 64 weights of the row.
struct NoRowScale {
  float operator()(int64_t) const { return 1.f; }
};

template <int R, typename Load, typename RowScale>
inline void strip_rows_avx512(const float* x, int64_t K, float* y, int64_t O, const float* scale, Load load,
                              RowScale row_scale) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  __m512 w[4];
  for (int64_t k = 0; k < K; ++k) {
    load(k, w);
    const float f = row_scale(k);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * K + k] * f);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(a, w[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) {
      __m512 v = acc[r][c];
      if (scale) v = _mm512_mul_ps(v, _mm512_loadu_ps(scale + 16 * c));
      _mm512_storeu_ps(y + r * O + 16 * c, v);
    }
}

// Six rows a pass: 24 accumulators, 4 weight registers and a broadcast fill 29 of the 32 zmm registers, and
// each weight row loaded (or decoded) serves 24 FMAs. At M=768, four rows a pass ran at 61 GFLOP/s a thread,
// six at 113 (as fast as XLA's own dot). The last M % 6 rows take one pass.
// flatten: every pass gets its own inlined copy of `load` (six passes make the compiler stop inlining it, and
// an out-of-line call per weight row doubled NF4's time at one row).
template <typename Load, typename RowScale = NoRowScale>
__attribute__((flatten)) void strip_avx512(const float* x, int64_t M, int64_t K, float* y, int64_t O,
                                           const float* scale, Load load, RowScale row_scale = {}) {
  constexpr int kRows = 6;
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) strip_rows_avx512<kRows>(x + m * K, K, y + m * O, O, scale, load, row_scale);
  const float* xm = x + m * K;
  float* ym = y + m * O;
  switch (M - m) {
    case 5: strip_rows_avx512<5>(xm, K, ym, O, scale, load, row_scale); break;
    case 4: strip_rows_avx512<4>(xm, K, ym, O, scale, load, row_scale); break;
    case 3: strip_rows_avx512<3>(xm, K, ym, O, scale, load, row_scale); break;
    case 2: strip_rows_avx512<2>(xm, K, ym, O, scale, load, row_scale); break;
    case 1: strip_rows_avx512<1>(xm, K, ym, O, scale, load, row_scale); break;
    default: break;
  }
}
#endif

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // bfloat16: the high half of a float32
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {  // bfloat16
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

ffi::Error check_2d(const ffi::Buffer<ffi::F32>& x, ffi::ResultBuffer<ffi::F32>& y) {
  if (x.dimensions().size() != 2 || y->dimensions().size() != 2 || x.dimensions()[0] != y->dimensions()[0])
    return ffi::Error::InvalidArgument("x (M, K) and y (M, O) must be 2-D with the same rows");
  return ffi::Error::Success();
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  if (auto e = check_2d(x, y); e.failure()) return e;
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], O = y->dimensions()[1];
  if (O % kStrip || q.element_count() != K * O || scale.element_count() != O)
    return ffi::Error::InvalidArgument("int8 matmul: q must be (O/64, K, 64) and scale (O,)");
  const float* xp = x.typed_data();
  const int8_t* qp = q.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  for_each_tile(pool, M, O / kStrip, [&](int64_t t, int64_t m0, int64_t rows) {
    const int8_t* strip = qp + t * K * kStrip;
#if defined(__AVX512F__)
    strip_avx512(xp + m0 * K, rows, K, yp + m0 * O + t * kStrip, O, sp + t * kStrip, [&](int64_t k, __m512* w) {
      const __m512i b = _mm512_loadu_si512(strip + k * kStrip);
      for (int c = 0; c < 4; ++c) w[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, c)));
    });
#else
    strip_generic(xp + m0 * K, rows, K, yp + m0 * O + t * kStrip, O, sp + t * kStrip, [&](int64_t k, float* w) {
      for (int64_t j = 0; j < kStrip; ++j) w[j] = static_cast<float>(strip[k * kStrip + j]);
    });
#endif
  });
  return ffi::Error::Success();
}

// An unscaled weight of element type T (bfloat16 as uint16_t, or float): strips (O/64, K, 64).
template <typename T>
ffi::Error PlainMatmul(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x, const T* wp, int64_t count,
                       ffi::ResultBuffer<ffi::F32>& y, const char* name) {
  if (auto e = check_2d(x, y); e.failure()) return e;
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], O = y->dimensions()[1];
  if (count != K * O || O % kStrip) return ffi::Error::InvalidArgument(std::string(name) + ": w must be (O/64, K, 64)");
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  for_each_tile(pool, M, O / kStrip, [&](int64_t t, int64_t m0, int64_t rows) {
    const T* strip = wp + t * K * kStrip;
#if defined(__AVX512F__)
    strip_avx512(xp + m0 * K, rows, K, yp + m0 * O + t * kStrip, O, nullptr, [&](int64_t k, __m512* r) {
      for (int c = 0; c < 4; ++c) r[c] = load16(strip + k * kStrip + 16 * c);
    });
#else
    strip_generic(xp + m0 * K, rows, K, yp + m0 * O + t * kStrip, O, nullptr, [&](int64_t k, float* r) {
      for (int64_t j = 0; j < kStrip; ++j) r[j] = to_float(strip[k * kStrip + j]);
    });
#endif
  });
  return ffi::Error::Success();
}

ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  return PlainMatmul(pool, x, wp, w.element_count(), y, "bf16 matmul");
}

ffi::Error F32Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  return PlainMatmul(pool, x, w.typed_data(), w.element_count(), y, "f32 matmul");
}

ffi::Error Nf4Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                     ffi::Buffer<ffi::U8> absmax_codes, ffi::Buffer<ffi::F32> absmax_scale,
                     ffi::Buffer<ffi::F32> absmax_offset, ffi::Buffer<ffi::F32> levels,
                     ffi::Buffer<ffi::F32> dynamic, ffi::ResultBuffer<ffi::F32> y) {
  if (auto e = check_2d(x, y); e.failure()) return e;
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], O = y->dimensions()[1];
  const int64_t blocks = K * O / kStrip;
  if (O % kStrip || codes.element_count() * 2 < K * O || absmax_codes.element_count() < blocks ||
      absmax_scale.element_count() * 256 < blocks || absmax_offset.element_count() != 1 ||
      levels.element_count() != 16 || dynamic.element_count() != 256)
    return ffi::Error::InvalidArgument("nf4 matmul: the codes and constants do not fit (O/64, K, 64)");
  const float* xp = x.typed_data();
  const uint8_t* cp = codes.typed_data();
  const uint8_t* acp = absmax_codes.typed_data();
  const float* asp = absmax_scale.typed_data();
  const float offset = absmax_offset.typed_data()[0];
  const float* lp = levels.typed_data();
  const float* dp = dynamic.typed_data();
  float* yp = y->typed_data();
  auto absmax = [&](int64_t b) { return dp[acp[b]] * asp[b / 256] + offset; };
  for_each_tile(pool, M, O / kStrip, [&](int64_t t, int64_t m0, int64_t rows) {
#if defined(__AVX512F__)
    const __m512 lut = _mm512_loadu_ps(lp);
    strip_avx512(
        xp + m0 * K, rows, K, yp + m0 * O + t * kStrip, O, nullptr,
        [&](int64_t k, __m512* w) {  // the levels; the block's absmax multiplies x instead
          const int64_t b = t * K + k;
          for (int half = 0; half < 2; ++half) {  // bytes 16 * half ... + 15
            const __m512i c =
                _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp + b * 32 + 16 * half)));
            w[half] = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), lut);  // columns 16 * half + i
            w[2 + half] = _mm512_permutexvar_ps(c, lut);  // vpermps reads an index's low 4 bits only
          }
        },
        [&](int64_t k) { return absmax(t * K + k); });
#else
    strip_generic(xp + m0 * K, rows, K, yp + m0 * O + t * kStrip, O, nullptr, [&](int64_t k, float* w) {
      const int64_t b = t * K + k;
      const float a = absmax(b);
      for (int64_t j = 0; j < kStrip / 2; ++j) {
        const uint8_t byte = cp[b * 32 + j];
        w[j] = lp[byte >> 4] * a;
        w[kStrip / 2 + j] = lp[byte & 15] * a;
      }
    });
#endif
  });
  return ffi::Error::Success();
}

}  // namespace

// Every kernel: XLA's intra-op pool, x (M, K) float32, then its packed operands; y (M, O) float32.
auto Bind() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>(); }
using F32 = ffi::Buffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxlm_int8_matmul, Int8Matmul,
                              Bind().Arg<ffi::Buffer<ffi::S8>>().Arg<F32>().Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxlm_nf4_matmul, Nf4Matmul,
                              Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxlm_bf16_matmul, Bf16Matmul, Bind().Arg<ffi::Buffer<ffi::BF16>>().Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxlm_f32_matmul, F32Matmul, Bind().Arg<F32>().Ret<F32>());
