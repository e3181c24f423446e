// Internal to the qmoe library: the single-token warp tasks and combine of experts_token1.cu's kernels, with
// the general GEMV path's roundings and summation order (its bits, tested). A down task is split into its first
// round's loads and the rest, so a caller can put the loads in flight early.
#pragma once

#include "gemv_core.cuh"
#include "route_core.cuh"

namespace qmoe {
namespace token1 {

using gemv::kRows;
constexpr int kMaxGroups = 4;  // down: row groups (of kRows output rows) per block task, at most

// Expert outputs of one down block task, rounded to T, as float: [slot][group * kRows + row].
using DownParts = float[kMaxTopK][kMaxGroups * kRows];

// gate_up warp task: h[slot, j] and h[slot, j + 1] of expert e (a.weight, a.scale: gate_up's).
template <typename T, typename W>
__device__ __forceinline__ void gate_up_task(const Token1Args& a, int slot, int j, int e) {
  using Store = typename gemv::WTraits<W>::Store;
  constexpr int PS = gemv::WTraits<W>::kPerStore;
  constexpr bool kGrouped = gemv::WTraits<W>::kGrouped;
  const int K = a.H, I = a.I;
  const Store* wb = static_cast<const Store*>(a.weight) + size_t(e) * 2 * I * (K / PS);
  const int ridx[kRows] = {j, j + 1, I + j, I + j + 1};
  const Store* rows[kRows];
  gemv::GroupScales gs{{}, a.scale_dtype, a.group_shift};
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    rows[r] = wb + size_t(ridx[r]) * (K / PS);
    if (kGrouped) gs.rows[r] = group_scale_row(a.scale, a.scale_dtype, size_t(e) * 2 * I + ridx[r], K, a.group_shift);
  }
  float acc[kRows][1] = {{0.0f}, {0.0f}, {0.0f}, {0.0f}};
  gemv::warp_dot<T, W, 1>(rows, gs, static_cast<const T*>(a.x), 1, K, acc);
  if ((threadIdx.x & 31) == 0) {
    float s[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      s[r] = a.scale && !kGrouped ? load_scale(a.scale, size_t(e) * 2 * I + ridx[r], a.scale_dtype) : 1.0f;
    const float h0 = silu(acc[0][0] * s[0]) * (acc[2][0] * s[2]);
    const float h1 = silu(acc[1][0] * s[1]) * (acc[3][0] * s[3]);
    reinterpret_cast<uint32_t*>(static_cast<T*>(a.h) + size_t(slot) * I + j)[0] = pack2<T>(h0, h1);
  }
}

// down warp task `task` (slot = task % k, group = task / k) of block task `block_task`: kRows output rows
// of expert my_id[slot]; `weight`, `scale`: down's.
template <typename W> struct DownTask {
  const typename gemv::WTraits<W>::Store* rows[kRows];
  gemv::GroupScales gs;
  const void* scale;
  int slot, group, e, row0;
};

template <typename W>
__device__ __forceinline__ DownTask<W> down_task(const Token1Args& a, const void* weight, const void* scale,
                                                 int block_task, int task, int my_id) {
  using Store = typename gemv::WTraits<W>::Store;
  constexpr int PS = gemv::WTraits<W>::kPerStore;
  DownTask<W> d;
  d.slot = task % a.k;
  d.group = task / a.k;
  d.e = __shfl_sync(0xffffffffu, my_id, d.slot);
  d.row0 = (block_task * a.groups + d.group) * kRows;
  d.scale = scale;
  d.gs = gemv::GroupScales{{}, a.scale_dtype, a.group_shift};
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    d.rows[r] = static_cast<const Store*>(weight) + (size_t(d.e) * a.H + d.row0 + r) * (a.I / PS);
    if (gemv::WTraits<W>::kGrouped)
      d.gs.rows[r] = group_scale_row(scale, a.scale_dtype, size_t(d.e) * a.H + d.row0 + r, a.I, a.group_shift);
  }
  return d;
}

// The rest of a down task whose first round `wv` is loaded: dots with h[slot], rounds to T into `part`.
template <typename T, typename W>
__device__ __forceinline__ void down_finish(const Token1Args& a, const DownTask<W>& d, gemv::Round<W>& wv,
                                            DownParts& part) {
  const int K = a.I, lane = threadIdx.x & 31;
  const T* hs = static_cast<const T*>(a.h) + size_t(d.slot) * K;
  float acc[kRows][1] = {{0.0f}, {0.0f}, {0.0f}, {0.0f}};
  gemv::consume_round<T, W, 1>(wv, 0, hs, 1, K, acc);
  for (int kb = gemv::round_step<W>(); kb < K; kb += gemv::round_step<W>()) {
    gemv::load_round<W>(d.rows, d.gs, kb, K, wv);
    gemv::consume_round<T, W, 1>(wv, kb, hs, 1, K, acc);
  }
  gemv::warp_reduce<1>(acc);
  if (lane < kRows) {
    float v = acc[0][0];
#pragma unroll
    for (int r = 1; r < kRows; ++r) v = lane == r ? acc[r][0] : v;
    const float s = d.scale && !gemv::WTraits<W>::kGrouped
                        ? load_scale(d.scale, size_t(d.e) * a.H + d.row0 + lane, a.scale_dtype)
                        : 1.0f;
    part[d.slot][d.group * kRows + lane] = to_float(from_float<T>(v * s));
  }
}

// Weighted combine of a block task's rows in slot order, fp32 (the combine kernel's order); one warp,
// lane = row of the block task.
template <typename T>
__device__ __forceinline__ void combine(const Token1Args& a, const DownParts& part, float my_p, int block_task) {
  const int lane = threadIdx.x & 31;
  float acc = 0.0f;
  for (int j = 0; j < a.k; ++j) {
    const float w = __shfl_sync(0xffffffffu, my_p, j);
    if (lane < a.groups * kRows) acc = fmaf(w, part[j][lane], acc);
  }
  if (lane < a.groups * kRows) static_cast<T*>(a.out)[block_task * a.groups * kRows + lane] = from_float<T>(acc);
}

}  // namespace token1
}  // namespace qmoe
