// Internal to the qmoe library: the warp GEMV core shared by the decode kernels (experts_gemv.cu,
// experts_token1.cu). A warp streams kRows weight rows with 16-byte loads, several in flight per lane,
// and dots them with up to NT activation vectors; a butterfly reduces the lane partial sums. 16-bit and INT8
// weights take their per-channel scale in the caller's epilogue; INT4 weights take their per-group scales here.
#pragma once

#include "qmoe_internal.cuh"

namespace qmoe {
namespace gemv {

constexpr int kRows = 4;  // weight rows a warp streams together (gate j, j+1, up j, j+1 / 4 down rows)

// Store: the element type of a row in memory; kPerStore weights a Store element; kVec weights a 16-byte
// vector; kUnroll vectors a row in flight per lane; kGrouped: per-group scales applied inside the dot.
template <typename W> struct WTraits {
  using Store = W;
  static constexpr int kPerStore = 1;
  static constexpr int kVec = 8;     // 16-bit weights: 8 per 16 bytes
  static constexpr int kUnroll = 4;  // 16-byte loads per row in flight (per lane)
  static constexpr bool kGrouped = false;
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
  using Store = int8_t;
  static constexpr int kPerStore = 1;
  static constexpr int kVec = 16;
  static constexpr int kUnroll = 2;
  static constexpr bool kGrouped = false;
  static __device__ __forceinline__ void to_float(const uint4& v, float* f) {
    i8x4_to_float(v.x, f);
    i8x4_to_float(v.y, f + 4);
    i8x4_to_float(v.z, f + 8);
    i8x4_to_float(v.w, f + 12);
  }
};
// INT4: a 16-byte vector is 32 weights of one group (groups are 32, 64 or 128 weights and vectors start at
// multiples of 32), so each vector's partial dot takes one scale. Two vectors a row in flight: a 2048-wide
// row is one round of the warp.
template <> struct WTraits<Int4> {
  using Store = uint8_t;
  static constexpr int kPerStore = 2;
  static constexpr int kVec = 32;
  static constexpr int kUnroll = 2;
  static constexpr bool kGrouped = true;
};

// Per-group scales of a warp's kRows rows (INT4 only; ignored for other weights): row r's scales start at
// rows[r], one per 2^shift weights, F32 or F16.
struct GroupScales {
  const unsigned char* rows[kRows];
  int dtype, shift;
};

template <typename W> struct Round {
  uint4 w[WTraits<W>::kUnroll][kRows];
  float s[WTraits<W>::kGrouped ? WTraits<W>::kUnroll : 1][kRows];  // INT4: each vector's group scale
};
template <typename W> __host__ __device__ constexpr int round_step() { return 32 * WTraits<W>::kVec * WTraits<W>::kUnroll; }

// This lane's 16-byte weight vectors of one round (columns kb .. kb + round_step) of the K loop.
template <typename W>
__device__ __forceinline__ void load_round(const typename WTraits<W>::Store* const (&rows)[kRows],
                                           const GroupScales& gs, int kb, int K, Round<W>& wv) {
  constexpr int V = WTraits<W>::kVec, PS = WTraits<W>::kPerStore;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int u = 0; u < WTraits<W>::kUnroll; ++u) {
    const int k0 = kb + (u * 32 + lane) * V;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const bool ok = k0 < K;
      wv.w[u][r] = ok ? __ldg(reinterpret_cast<const uint4*>(rows[r] + k0 / PS)) : make_uint4(0, 0, 0, 0);
      if constexpr (WTraits<W>::kGrouped) {
        const int g = k0 >> gs.shift;
        wv.s[u][r] = ok ? group_scale(gs.rows[r], g, gs.dtype) : 0.0f;
      }
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
    if constexpr (WTraits<W>::kGrouped) {
      // 32 weights of one group: an exact fp32 dot of the integers with x, then one scale.
      float part[kRows][NT];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int t = 0; t < NT; ++t) part[r][t] = 0.0f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // 8 weights (one 32-bit word) at a time: few registers
        float wf[kRows][8];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const uint32_t word = q == 0 ? wv.w[u][r].x : q == 1 ? wv.w[u][r].y : q == 2 ? wv.w[u][r].z : wv.w[u][r].w;
          i4x8_to_float(word, wf[r]);
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          if (t < nt) {
            float xf[8];
            WTraits<T>::to_float(*reinterpret_cast<const uint4*>(xs + size_t(t) * K + k0 + 8 * q), xf);
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
#pragma unroll
              for (int i = 0; i < 8; ++i) part[r][t] = fmaf(wf[r][i], xf[i], part[r][t]);
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int t = 0; t < NT; ++t) acc[r][t] = fmaf(part[r][t], wv.s[u][r], acc[r][t]);
    } else {
      float wf[kRows][V];
#pragma unroll
      for (int r = 0; r < kRows; ++r) WTraits<W>::to_float(wv.w[u][r], wf[r]);
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

// acc[r][t] = dot(rows[r][0:K], xs[t][0:K]) in every lane (acc zeroed by the caller); INT4: each group scaled.
template <typename T, typename W, int NT>
__device__ __forceinline__ void warp_dot(const typename WTraits<W>::Store* const (&rows)[kRows],
                                         const GroupScales& gs, const T* xs, int nt, int K,
                                         float (&acc)[kRows][NT]) {
  for (int kb = 0; kb < K; kb += round_step<W>()) {
    Round<W> wv;
    load_round<W>(rows, gs, kb, K, wv);
    consume_round<T, W, NT>(wv, kb, xs, nt, K, acc);
  }
  warp_reduce<NT>(acc);
}

}  // namespace gemv
}  // namespace qmoe
