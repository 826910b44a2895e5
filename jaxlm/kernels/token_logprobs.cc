// Log-probabilities of chosen tokens and the k most likely tokens, from logits, in one kernel (jax.ffi, XLA:CPU).
//
//   jaxlm_token_logprobs(logits (M, V) f32, tokens (M,) s32) -> chosen (M,) f32, top_lp (M, k) f32,
//                                                               top_ids (M, k) s32
//
// chosen[m] = logits[m, tokens[m]] - lse[m] (a token outside [0, V) is clipped into it), lse the row's
// logsumexp; top_ids the k largest logits, largest first, an earlier index first among equals (XLA's TopK);
// top_lp their logits minus lse. A scoring prefill asks this of every position (768 x 49,152 logits for
// SmolLM2 at 48 rows of 16 tokens). XLA computes it as a single-threaded exp-and-sum, a sort-based TopK and a
// copy of the logits between them (180 ms of a 1.3 s step); here each row is read twice from cache (top-k,
// whose first entry is the max, then the sum of exponentials), rows split over XLA's intra-op pool.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

using jaxlm::parallel_for;

// vals/ids: the best n (< k, or k) so far, descending. x enters after every value >= x (earlier index first).
inline void insert(float* vals, int32_t* ids, int64_t& n, int64_t k, float x, int32_t id) {
  int64_t at = n < k ? n : k - 1;
  while (at > 0 && vals[at - 1] < x) {
    if (at < k) vals[at] = vals[at - 1], ids[at] = ids[at - 1];
    --at;
  }
  n += n < k;  // not full: the shift used the free slot; full: the k-th entry fell out
  vals[at] = x;
  ids[at] = id;
}

// Top-k of one row: the first k values in order, then every value greater than the current k-th.
void top_k(const float* row, int64_t V, int64_t k, float* vals, int32_t* ids) {
  int64_t n = 0, i = 0;
  for (; i < std::min(V, k); ++i) insert(vals, ids, n, k, row[i], static_cast<int32_t>(i));
#if defined(__AVX512F__)
  for (; i + 16 <= V; i += 16) {
    __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), _mm512_set1_ps(vals[k - 1]), _CMP_GT_OQ);
    while (hit) {
      const int j = __builtin_ctz(hit);
      hit &= hit - 1;
      if (row[i + j] > vals[k - 1]) insert(vals, ids, n, k, row[i + j], static_cast<int32_t>(i + j));
    }
  }
#endif
  for (; i < V; ++i)
    if (row[i] > vals[k - 1]) insert(vals, ids, n, k, row[i], static_cast<int32_t>(i));
}

#if defined(__AVX512F__)
// exp(x) for x <= 0 (Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, a degree-7 polynomial in r, then 2^n by
// scalef): within 2 ulp of expf; below -88 (and -inf) it gives 0.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-88.f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(~under, _mm512_scalef_ps(p, n));
}
#endif

// sum of exp(row - shift).
float sum_exp(const float* row, int64_t V, float shift) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  const __m512 s = _mm512_set1_ps(shift);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; i + 32 <= V; i += 32) {
    acc0 = _mm512_add_ps(acc0, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + i), s)));
    acc1 = _mm512_add_ps(acc1, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + i + 16), s)));
  }
  total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
  for (; i < V; ++i) total += std::exp(row[i] - shift);
  return total;
}

ffi::Error TokenLogprobs(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> tokens,
                         ffi::ResultBuffer<ffi::F32> chosen, ffi::ResultBuffer<ffi::F32> top_lp,
                         ffi::ResultBuffer<ffi::S32> top_ids) {
  const auto ld = logits.dimensions(), kd = top_lp->dimensions();
  if (ld.size() != 2 || kd.size() != 2 || tokens.element_count() != ld[0] || kd[0] != ld[0] ||
      top_ids->element_count() != kd[0] * kd[1] || chosen->element_count() != ld[0] || kd[1] < 1 || kd[1] > ld[1])
    return ffi::Error::InvalidArgument("token_logprobs: logits (M, V), tokens (M,), top (M, k) with 1 <= k <= V");
  const int64_t M = ld[0], V = ld[1], k = kd[1];
  const float* lp = logits.typed_data();
  const int32_t* tp = tokens.typed_data();
  float* cp = chosen->typed_data();
  float* vp = top_lp->typed_data();
  int32_t* ip = top_ids->typed_data();
  parallel_for(pool, M, [&](int64_t m) {
    const float* row = lp + m * V;
    float* vals = vp + m * k;
    top_k(row, V, k, vals, ip + m * k);
    const float peak = vals[0];
    const float shift = std::isfinite(peak) ? peak : 0.f;  // as jax.nn.logsumexp: no inf - inf
    const float lse = shift + std::log(sum_exp(row, V, shift));
    const int64_t t = std::clamp<int64_t>(tp[m], 0, V - 1);
    cp[m] = row[t] - lse;
    for (int64_t j = 0; j < k; ++j) vals[j] -= lse;
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxlm_token_logprobs, TokenLogprobs,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
