// Single-token decode (T == 1 on the GEMV path): two kernels, no dispatch launch, no combine launch.
//
// Kernel 1 routes the token in every warp (softmax + top-k over E logits: a few hundred cycles, where
// the dispatch kernel costs a launch and a global round trip), then streams the gate and up rows of
// expert ids[slot] (blockIdx.y = slot) and writes h [k, I] in slot order.
// Kernel 2 routes again, issues its first round of down-weight loads before waiting on kernel 1 (the
// weights and the logits do not depend on it; with programmatic dependent launch a block that finds room
// while kernel 1 drains starts its stream early; kernel 1 fills the register file, so few do), dots them
// with h, and combines the k expert outputs of its rows in shared memory in slot order: the same roundings
// and summation order as the combine kernel, so the result is bitwise that of the general GEMV path.
// (Measured and dropped, NOTES.md runs 9-11: a split-K single kernel, and a persistent gate_up kernel
// streaming through cp.async or TMA bulk copies; neither read the weights faster.)
#include "gemv_core.cuh"
#include "route_core.cuh"

namespace qmoe {
namespace {

using gemv::kRows;
constexpr int kUpWarps = 4;    // kernel 1: warps per block; a warp owns h columns j, j+1
constexpr int kDownWarps = 8;  // kernel 2: warps per block
constexpr int kMaxGroups = 4;  // kernel 2: row groups (of kRows rows) per block, at most

// The register cap (80, 16 bytes spilled) fits all blocks of the 30B-A3B layer (96 x 8) at once on 132
// SMs; uncapped (96 registers, 5 blocks an SM) measured 4 us slower (NOTES.md, run 8).
template <typename T, typename W>
__global__ void __launch_bounds__(kUpWarps * 32, 6) token1_gate_up_kernel(Token1Args a) {
  pdl_wait();
  // Kernel 2 reads nothing of ours before its own wait: let it start as early as it can.
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slot = blockIdx.y;
  const int e = token1_slot_expert(a, slot);

  const int K = a.H, I = a.I;
  const int j = (blockIdx.x * kUpWarps + warp) * 2;  // grid.x * kUpWarps * 2 == I
  using Store = typename gemv::WTraits<W>::Store;
  constexpr int PS = gemv::WTraits<W>::kPerStore;
  constexpr bool kGrouped = gemv::WTraits<W>::kGrouped;
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
  if (lane == 0) {
    float s[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) s[r] = a.scale && !kGrouped ? load_scale(a.scale, size_t(e) * 2 * I + ridx[r], a.scale_dtype) : 1.0f;
    const float h0 = silu(acc[0][0] * s[0]) * (acc[2][0] * s[2]);
    const float h1 = silu(acc[1][0] * s[1]) * (acc[3][0] * s[3]);
    reinterpret_cast<uint32_t*>(static_cast<T*>(a.h) + size_t(slot) * I + j)[0] = pack2<T>(h0, h1);
  }
}

// Block: a.groups row groups of kRows output rows, for all k slots (task = slot + k * group).
template <typename T, typename W>
__global__ void __launch_bounds__(kDownWarps * 32, 2) token1_down_kernel(Token1Args a) {
  __shared__ float part[kMaxTopK][kMaxGroups * kRows];  // expert output rounded to T, as float
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = a.I, k = a.k;
  using Store = typename gemv::WTraits<W>::Store;
  constexpr int PS = gemv::WTraits<W>::kPerStore;
  constexpr bool kGrouped = gemv::WTraits<W>::kGrouped;
  int my_id;
  float my_p;
  // The logits were complete before kernel 1 passed its wait, which came before this launch.
  route_token_lanes(a.logits, a.E, k, a.normalize != 0, my_id, my_p);

  const int n_tasks = k * a.groups;
  bool waited = false;
  for (int task = warp; task < n_tasks; task += kDownWarps) {
    const int slot = task % k, group = task / k;
    const int e = __shfl_sync(0xffffffffu, my_id, slot);
    const int row0 = (blockIdx.x * a.groups + group) * kRows;
    const Store* rows[kRows];
    gemv::GroupScales gs{{}, a.scale_dtype, a.group_shift};
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      rows[r] = static_cast<const Store*>(a.weight) + (size_t(e) * a.H + row0 + r) * (K / PS);
      if (kGrouped) gs.rows[r] = group_scale_row(a.scale, a.scale_dtype, size_t(e) * a.H + row0 + r, K, a.group_shift);
    }
    gemv::Round<W> wv;
    gemv::load_round<W>(rows, gs, 0, K, wv);  // before the wait: weights do not depend on kernel 1
    if (!waited) {
      pdl_wait();
      waited = true;
    }
    const T* hs = static_cast<const T*>(a.h) + size_t(slot) * K;
    float acc[kRows][1] = {{0.0f}, {0.0f}, {0.0f}, {0.0f}};
    gemv::consume_round<T, W, 1>(wv, 0, hs, 1, K, acc);
    for (int kb = gemv::round_step<W>(); kb < K; kb += gemv::round_step<W>()) {
      gemv::load_round<W>(rows, gs, kb, K, wv);
      gemv::consume_round<T, W, 1>(wv, kb, hs, 1, K, acc);
    }
    gemv::warp_reduce<1>(acc);
    if (lane < kRows) {
      float v = acc[0][0];
#pragma unroll
      for (int r = 1; r < kRows; ++r) v = lane == r ? acc[r][0] : v;
      const float s = a.scale && !kGrouped ? load_scale(a.scale, size_t(e) * a.H + row0 + lane, a.scale_dtype) : 1.0f;
      part[slot][group * kRows + lane] = to_float(from_float<T>(v * s));
    }
  }
  if (!waited) pdl_wait();
  __syncthreads();
  if (warp == 0) {
    // Weighted combine in slot order, fp32 (the combine kernel's order): lane = row of the block.
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
      const float w = __shfl_sync(0xffffffffu, my_p, j);
      if (lane < a.groups * kRows) acc = fmaf(w, part[j][lane], acc);
    }
    if (lane < a.groups * kRows) static_cast<T*>(a.out)[blockIdx.x * a.groups * kRows + lane] = from_float<T>(acc);
  }
  pdl_launch_dependents();
}

template <typename T, typename W>
cudaError_t launch_down(const qmoe_problem& p, const qmoe_tensors& t, Token1Args a, cudaStream_t s) {
  // Row groups per block (H % 128 == 0: any choice divides): 4 at k <= 2, else 2, which makes the 30B-A3B
  // layer (H 2048, k 8) one wave of 256 blocks; 1 group (512 blocks, two waves) measured 4 us slower
  // (NOTES.md, run 11). QMOE_T1_DOWN_GROUPS=1|2|4 overrides.
  a.groups = p.top_k <= 2 ? 4 : 2;
  const int g = env_int("QMOE_T1_DOWN_GROUPS", 0);
  if (g == 1 || g == 2 || g == 4) a.groups = g;
  a.weight = t.down;
  a.scale = t.down_scale;
  return launch(token1_down_kernel<T, W>, dim3(p.hidden / (a.groups * kRows)), dim3(kDownWarps * 32), 0, s, a);
}

template <typename T, typename W>
cudaError_t launch_typed(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                         bool with_down) {
  Token1Args a = token1_args(p, t, ws);
  const dim3 up_grid(p.inter / (2 * kUpWarps), p.top_k), up_block(kUpWarps * 32);
  cudaError_t err = launch(token1_gate_up_kernel<T, W>, up_grid, up_block, 0, s, a);
  if (err != cudaSuccess || !with_down) return err;
  return launch_down<T, W>(p, t, a, s);
}


}  // namespace

cudaError_t launch_token1(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                          bool with_down) {
  return with_dtypes(p, [&](auto act, auto weight) {
    return launch_typed<decltype(act), decltype(weight)>(p, t, ws, s, with_down);
  });
}

}  // namespace qmoe
