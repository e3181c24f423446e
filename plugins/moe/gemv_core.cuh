// Internal to the qmoe library: the warp GEMV core shared by the decode kernels (experts_gemv.cu,
// experts_token1.cu). A warp streams kRows weight rows with 16-byte loads, several in flight per lane,
// and dots them with up to NT activation vectors; a butterfly reduces the lane partial sums.
#pragma once

#include "qmoe_internal.cuh"

namespace qmoe {
namespace gemv {

constexpr int kRows = 4;  // weight rows a warp streams together (gate j, j+1, up j, j+1 / 4 down rows)

template <typename W> struct WTraits {
  static constexpr int kVec = 8;     // 16-bit weights: 8 per 16 bytes
  static constexpr int kUnroll = 4;  // 16-byte loads per row in flight (per lane)
  static __device__ __forceinline__ void to_float(const uint4& v, float* f) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 p = unpack2<W>(w[i]);
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
};
template <> struct WTraits<int8_t> {
  static constexpr int kVec = 16;
  static constexpr int kUnroll = 2;
  static __device__ __forceinline__ void to_float(const uint4& v, float* f) {
    i8x4_to_float(v.x, f);
    i8x4_to_float(v.y, f + 4);
    i8x4_to_float(v.z, f + 8);
    i8x4_to_float(v.w, f + 12);
  }
};

template <typename W> using Round = uint4[WTraits<W>::kUnroll][kRows];
template <typename W> __host__ __device__ constexpr int round_step() { return 32 * WTraits<W>::kVec * WTraits<W>::kUnroll; }

// This lane's 16-byte weight vectors of one round (columns kb .. kb + round_step) of the K loop.
template <typename W>
__device__ __forceinline__ void load_round(const W* const (&rows)[kRows], int kb, int K, Round<W>& wv) {
  constexpr int V = WTraits<W>::kVec;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int u = 0; u < WTraits<W>::kUnroll; ++u) {
    const int k0 = kb + (u * 32 + lane) * V;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      wv[u][r] = k0 < K ? __ldg(reinterpret_cast<const uint4*>(rows[r] + k0)) : make_uint4(0, 0, 0, 0);
    }
  }
}

// acc[r][t] += this lane's part of dot(round of rows[r], xs[t]) for t < nt; xs rows are K apart
// (shared or global memory).
template <typename T, typename W, int NT>
__device__ __forceinline__ void consume_round(const Round<W>& wv, int kb, const T* xs, int nt, int K,
                                              float (&acc)[kRows][NT]) {
  constexpr int V = WTraits<W>::kVec;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int u = 0; u < WTraits<W>::kUnroll; ++u) {
    const int k0 = kb + (u * 32 + lane) * V;
    if (k0 >= K) break;
    float wf[kRows][V];
#pragma unroll
    for (int r = 0; r < kRows; ++r) WTraits<W>::to_float(wv[u][r], wf[r]);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (t < nt) {
        float xf[V];
#pragma unroll
        for (int q = 0; q < V / 8; ++q) {
          const uint4 xv = *reinterpret_cast<const uint4*>(xs + size_t(t) * K + k0 + 8 * q);
          WTraits<T>::to_float(xv, xf + 8 * q);
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
          for (int i = 0; i < V; ++i) acc[r][t] = fmaf(wf[r][i], xf[i], acc[r][t]);
        }
      }
    }
  }
}

template <int NT> __device__ __forceinline__ void warp_reduce(float (&acc)[kRows][NT]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], o);
    }
  }
}

// acc[r][t] = dot(rows[r][0:K], xs[t][0:K]) in every lane (acc zeroed by the caller).
template <typename T, typename W, int NT>
__device__ __forceinline__ void warp_dot(const W* const (&rows)[kRows], const T* xs, int nt, int K,
                                         float (&acc)[kRows][NT]) {
  for (int kb = 0; kb < K; kb += round_step<W>()) {
    Round<W> wv;
    load_round<W>(rows, kb, K, wv);
    consume_round<T, W, NT>(wv, kb, xs, nt, K, acc);
  }
  warp_reduce<NT>(acc);
}

}  // namespace gemv
}  // namespace qmoe
