// Decode-time attention read straight from the paged KV pool (jax.ffi, XLA:CPU), for a few queries a row.
//
// XLA has to gather a row's blocks into a (B, nb * Z, K, H) copy before its attention einsums, and on CPU the
// gather and the small batched dots of a decode step cost far more than the bytes they touch (16 rows of
// SmolLM2-135M at ~100 cached tokens: tens of ms a step). This kernel walks each row's block table and reads
// every cached key and value once, in place.
//
//   jaxlm_paged_attention(q (B, T, N, H), k_pool (L, NB, Z, K, H), v_pool (L, NB, Z, K, Hv), table (B, nb) s32,
//                         mask (B, T, nb * Z) pred, layer () s32; attrs scale, softcap) -> (B, T, N, Hv)
//
// Query head n = k * G + g reads kv head k (G = N / K). Slot s of row b is slot s % Z of block table[b, s / Z];
// a table entry outside [0, NB) is no block (its slots are masked). scores = q.k * scale, then
// softcap * tanh(scores / softcap) when softcap > 0, masked, softmax over the row's slots in float32, times v.
// A query that sees no slot gets zeros (only padding queries do). Work is split by row.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jaxlm::parallel_for;

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pool,
                          ffi::Buffer<ffi::F32> v_pool, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::PRED> mask,
                          ffi::Buffer<ffi::S32> layer, float scale, float softcap, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k_pool.dimensions(), vd = v_pool.dimensions(), td = table.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5 || td.size() != 2)
    return ffi::Error::InvalidArgument("paged_attention: q (B,T,N,H), pools (L,NB,Z,K,H), table (B,nb)");
  const int64_t B = qd[0], T = qd[1], N = qd[2], H = qd[3];
  const int64_t L = kd[0], NB = kd[1], Z = kd[2], K = kd[3], Hv = vd[4], nb = td[1], S = nb * Z;
  if (kd[4] != H || N % K || vd[3] != K || vd[2] != Z || vd[1] != NB || td[0] != B)
    return ffi::Error::InvalidArgument("paged_attention: shapes disagree");
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("paged_attention: layer out of range");
  const int64_t G = N / K, M = T * G;  // the queries of one kv head
  const float* qp = q.typed_data();
  const float* kp = k_pool.typed_data() + l * NB * Z * K * H;
  const float* vp = v_pool.typed_data() + l * NB * Z * K * Hv;
  const int32_t* tp = table.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  const float lowest = -std::numeric_limits<float>::infinity();

  parallel_for(pool, B, [&](int64_t b) {  // a row's slots hold all K heads contiguously: one pass per row
    const int64_t R = K * M;  // every query of the row, r = k * M + t * G + g
    std::vector<float> sc(R * S, lowest), acc(R * Hv, 0.f), peak(R, lowest), total(R, 0.f);
    auto each_slot = [&](auto body) {  // body(s, slot): the row's slots that are in a block, in order
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t blk = tp[b * nb + j];
        if (blk < 0 || blk >= NB) continue;
        for (int64_t z = 0; z < Z; ++z) body(j * Z + z, blk * Z + z);
      }
    };
    each_slot([&](int64_t s, int64_t slot) {  // scores: each cached key read once
      for (int64_t t = 0; t < T; ++t) {
        if (!mp[(b * T + t) * S + s]) continue;
        for (int64_t k = 0; k < K; ++k) {
          const float* key = kp + (slot * K + k) * H;
          for (int64_t g = 0; g < G; ++g) {
            float x = dot(qp + ((b * T + t) * N + k * G + g) * H, key, H) * scale;
            if (softcap > 0.f) x = softcap * std::tanh(x / softcap);
            const int64_t r = k * M + t * G + g;
            sc[r * S + s] = x;
            peak[r] = std::max(peak[r], x);
          }
        }
      }
    });
    for (int64_t r = 0; r < R; ++r) {
      float* row = sc.data() + r * S;
      if (peak[r] == lowest) {  // sees nothing: no weights
        std::fill(row, row + S, 0.f);
        continue;
      }
      for (int64_t s = 0; s < S; ++s) {
        row[s] = row[s] == lowest ? 0.f : std::exp(row[s] - peak[r]);
        total[r] += row[s];
      }
    }
    each_slot([&](int64_t s, int64_t slot) {  // values: each cached value read once
      for (int64_t k = 0; k < K; ++k) {
        const float* val = vp + (slot * K + k) * Hv;
        for (int64_t m = 0; m < M; ++m) {
          const float w = sc[(k * M + m) * S + s];
          if (w == 0.f) continue;
          float* a = acc.data() + (k * M + m) * Hv;
#pragma omp simd
          for (int64_t h = 0; h < Hv; ++h) a[h] += w * val[h];
        }
      }
    });
    for (int64_t k = 0; k < K; ++k)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = k * M + t * G + g;
          const float inv = total[r] > 0.f ? 1.f / total[r] : 0.f;
          float* o = op + ((b * T + t) * N + k * G + g) * Hv;
          for (int64_t h = 0; h < Hv; ++h) o[h] = acc[r * Hv + h] * inv;
        }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxlm_paged_attention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>());
