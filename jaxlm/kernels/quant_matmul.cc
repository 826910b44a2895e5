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
// Each kernel takes one or more weights of its kind that share x, and writes one y each: attention's q, k and v
// (a gated MLP's gate and up) are one call, as each call of a decode step has a fixed cost of several us.
// The strips of all of a call's weights are split over XLA's intra-op thread pool.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

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

// body(i, t, m0, rows) for every strip t of every weight i (of strips[i] strips) and block of rows
// [m0, m0 + rows) of x, spread over the pool. At a few rows (decoding) a task is a whole strip; a prefill's rows
// are split too, so that a weight of 3 strips still keeps both threads busy, and a block of x (96 x K) stays in
// cache while a strip streams past it.
template <typename F>
void for_each_tile(ffi::ThreadPool& pool, int64_t M, const std::vector<int64_t>& strips, F body) {
  const int64_t blocks = std::max<int64_t>(1, (M + kRowBlock - 1) / kRowBlock);
  std::vector<int64_t> first(strips.size() + 1, 0);  // first[i]: weight i's first strip among the call's
  for (size_t i = 0; i < strips.size(); ++i) first[i + 1] = first[i] + strips[i];
  parallel_for(pool, first.back() * blocks, [&](int64_t j) {
    const int64_t s = j / blocks, m0 = (j % blocks) * kRowBlock;
    const size_t i = std::upper_bound(first.begin(), first.end(), s) - first.begin() - 1;
    body(i, s - first[i], m0, std::min(kRowBlock, M - m0));
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

// The outputs of a call, one a weight: y_i (M, O_i), O_i a multiple of 64.
struct Out {
  float* y;
  int64_t O;
};

ffi::Error outputs(const ffi::Buffer<ffi::F32>& x, const ffi::RemainingRets& rets, std::vector<Out>& out,
                   const char* name) {
  if (x.dimensions().size() != 2 || rets.size() == 0)
    return ffi::Error::InvalidArgument(std::string(name) + ": x must be (M, K), with at least one weight");
  for (size_t i = 0; i < rets.size(); ++i) {
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (y.has_error()) return y.error();
    const auto dims = (*y)->dimensions();
    if (dims.size() != 2 || dims[0] != x.dimensions()[0] || dims[1] % kStrip)
      return ffi::Error::InvalidArgument(std::string(name) + ": every y must be (M, O), O a multiple of 64");
    out.push_back({(*y)->typed_data(), dims[1]});
  }
  return ffi::Error::Success();
}

// Operand `i` of the call's weights, a buffer of element type D (stored as T): its data and element count.
template <ffi::DataType D, typename T>
ffi::Error operand(const ffi::RemainingArgs& args, size_t i, const T*& data, int64_t& count) {
  auto a = args.get<ffi::Buffer<D>>(i);
  if (a.has_error()) return a.error();
  data = reinterpret_cast<const T*>(a->untyped_data());
  count = a->element_count();
  return ffi::Error::Success();
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                      ffi::RemainingRets rets) {
  std::vector<Out> out;
  if (auto e = outputs(x, rets, out, "int8 matmul"); e.failure()) return e;
  if (args.size() != 2 * out.size()) return ffi::Error::InvalidArgument("int8 matmul: (q, scale) a weight");
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  std::vector<const int8_t*> q(out.size());
  std::vector<const float*> scale(out.size());
  std::vector<int64_t> strips(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    int64_t nq, ns;
    if (auto e = operand<ffi::S8>(args, 2 * i, q[i], nq); e.failure()) return e;
    if (auto e = operand<ffi::F32>(args, 2 * i + 1, scale[i], ns); e.failure()) return e;
    if (nq != K * out[i].O || ns != out[i].O)
      return ffi::Error::InvalidArgument("int8 matmul: q must be (O/64, K, 64) and scale (O,)");
    strips[i] = out[i].O / kStrip;
  }
  const float* xp = x.typed_data();
  for_each_tile(pool, M, strips, [&](size_t i, int64_t t, int64_t m0, int64_t rows) {
    const int8_t* strip = q[i] + t * K * kStrip;
    const int64_t O = out[i].O;
    float* y = out[i].y + m0 * O + t * kStrip;
    const float* s = scale[i] + t * kStrip;
#if defined(__AVX512F__)
    strip_avx512(xp + m0 * K, rows, K, y, O, s, [&](int64_t k, __m512* w) {
      // Each quarter sign-extended straight from memory: loading the row whole and extracting its quarters
      // took 2.9 ns a row against 2.3 (the extracts compete with the extends for the shuffle unit).
      for (int c = 0; c < 4; ++c)
        w[c] = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(strip + k * kStrip + 16 * c))));
    });
#else
    strip_generic(xp + m0 * K, rows, K, y, O, s, [&](int64_t k, float* w) {
      for (int64_t j = 0; j < kStrip; ++j) w[j] = static_cast<float>(strip[k * kStrip + j]);
    });
#endif
  });
  return ffi::Error::Success();
}

// Unscaled weights of element type T (bfloat16 as uint16_t, or float), buffers of type D: strips (O/64, K, 64).
template <typename T, ffi::DataType D>
ffi::Error PlainMatmul(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x, const ffi::RemainingArgs& args,
                       const ffi::RemainingRets& rets, const char* name) {
  std::vector<Out> out;
  if (auto e = outputs(x, rets, out, name); e.failure()) return e;
  if (args.size() != out.size()) return ffi::Error::InvalidArgument(std::string(name) + ": one w a weight");
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  std::vector<const T*> w(out.size());
  std::vector<int64_t> strips(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    int64_t count;
    if (auto e = operand<D>(args, i, w[i], count); e.failure()) return e;
    if (count != K * out[i].O) return ffi::Error::InvalidArgument(std::string(name) + ": w must be (O/64, K, 64)");
    strips[i] = out[i].O / kStrip;
  }
  const float* xp = x.typed_data();
  for_each_tile(pool, M, strips, [&](size_t i, int64_t t, int64_t m0, int64_t rows) {
    const T* strip = w[i] + t * K * kStrip;
    const int64_t O = out[i].O;
    float* y = out[i].y + m0 * O + t * kStrip;
#if defined(__AVX512F__)
    strip_avx512(xp + m0 * K, rows, K, y, O, nullptr, [&](int64_t k, __m512* r) {
      for (int c = 0; c < 4; ++c) r[c] = load16(strip + k * kStrip + 16 * c);
    });
#else
    strip_generic(xp + m0 * K, rows, K, y, O, nullptr, [&](int64_t k, float* r) {
      for (int64_t j = 0; j < kStrip; ++j) r[j] = to_float(strip[k * kStrip + j]);
    });
#endif
  });
  return ffi::Error::Success();
}

ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                      ffi::RemainingRets rets) {
  return PlainMatmul<uint16_t, ffi::BF16>(pool, x, args, rets, "bf16 matmul");
}

ffi::Error F32Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                     ffi::RemainingRets rets) {
  return PlainMatmul<float, ffi::F32>(pool, x, args, rets, "f32 matmul");
}

// One NF4 weight's codes and double-quantized absmax (jaxlm/ops/nf4.py).
struct Nf4 {
  const uint8_t* codes;
  const uint8_t* absmax_codes;
  const float* absmax_scale;
  float offset;
};

ffi::Error Nf4Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> levels,
                     ffi::Buffer<ffi::F32> dynamic, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  std::vector<Out> out;
  if (auto e = outputs(x, rets, out, "nf4 matmul"); e.failure()) return e;
  if (args.size() != 4 * out.size() || levels.element_count() != 16 || dynamic.element_count() != 256)
    return ffi::Error::InvalidArgument(
        "nf4 matmul: levels (16,), dynamic (256,), then (codes, absmax_codes, absmax_scale, absmax_offset) a weight");
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  std::vector<Nf4> q(out.size());
  std::vector<int64_t> strips(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    Nf4& w = q[i];
    const float* offset;
    int64_t n_codes, n_absmax, n_scale, n_offset;
    if (auto e = operand<ffi::U8>(args, 4 * i, w.codes, n_codes); e.failure()) return e;
    if (auto e = operand<ffi::U8>(args, 4 * i + 1, w.absmax_codes, n_absmax); e.failure()) return e;
    if (auto e = operand<ffi::F32>(args, 4 * i + 2, w.absmax_scale, n_scale); e.failure()) return e;
    if (auto e = operand<ffi::F32>(args, 4 * i + 3, offset, n_offset); e.failure()) return e;
    const int64_t blocks = K * out[i].O / kStrip;
    if (n_codes * 2 < K * out[i].O || n_absmax < blocks || n_scale * 256 < blocks || n_offset != 1)
      return ffi::Error::InvalidArgument("nf4 matmul: the codes and constants do not fit (O/64, K, 64)");
    w.offset = offset[0];
    strips[i] = out[i].O / kStrip;
  }
  const float* xp = x.typed_data();
  const float* lp = levels.typed_data();
  const float* dp = dynamic.typed_data();
  for_each_tile(pool, M, strips, [&](size_t i, int64_t t, int64_t m0, int64_t rows) {
    const Nf4& w = q[i];
    const int64_t O = out[i].O;
    float* y = out[i].y + m0 * O + t * kStrip;
    auto absmax = [&](int64_t b) { return dp[w.absmax_codes[b]] * w.absmax_scale[b / 256] + w.offset; };
#if defined(__AVX512F__)
    const __m512 lut = _mm512_loadu_ps(lp);
    strip_avx512(
        xp + m0 * K, rows, K, y, O, nullptr,
        [&](int64_t k, __m512* r) {  // the levels; the block's absmax multiplies x instead
          const int64_t b = t * K + k;
          for (int half = 0; half < 2; ++half) {  // bytes 16 * half ... + 15
            const __m512i c = _mm512_cvtepu8_epi32(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.codes + b * 32 + 16 * half)));
            r[half] = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), lut);  // columns 16 * half + i
            r[2 + half] = _mm512_permutexvar_ps(c, lut);  // vpermps reads an index's low 4 bits only
          }
        },
        [&](int64_t k) { return absmax(t * K + k); });
#else
    strip_generic(xp + m0 * K, rows, K, y, O, nullptr, [&](int64_t k, float* r) {
      const int64_t b = t * K + k;
      const float a = absmax(b);
      for (int64_t j = 0; j < kStrip / 2; ++j) {
        const uint8_t byte = w.codes[b * 32 + j];
        r[j] = lp[byte >> 4] * a;
        r[kStrip / 2 + j] = lp[byte & 15] * a;
      }
    });
#endif
  });
  return ffi::Error::Success();
}

}  // namespace

// Every kernel: XLA's intra-op pool, x (M, K) float32, (nf4: its shared tables,) then the packed operands of
// one or more weights; one y (M, O_i) float32 a weight. Weights that take the same x (attention's q, k and v,
// a gated MLP's gate and up) go in one call: a decode step's calls each have a fixed cost of several us.
auto Bind() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>(); }
using F32 = ffi::Buffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxlm_int8_matmul, Int8Matmul, Bind().RemainingArgs().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxlm_nf4_matmul, Nf4Matmul,
                              Bind().Arg<F32>().Arg<F32>().RemainingArgs().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxlm_bf16_matmul, Bf16Matmul, Bind().RemainingArgs().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxlm_f32_matmul, F32Matmul, Bind().RemainingArgs().RemainingRets());
