// Single-token decode in ONE persistent kernel (QMOE_TOKEN1=2; a variant measured against the two-kernel
// default of experts_token1.cu, not yet AUTO's choice).
//
// Why: at T=1 the two-kernel path pays a kernel boundary between gate_up and down (launch, the routing
// prelude again, first-load latency, the first kernel's tail): about 4-5 us of a ~30 us call (NOTES.md, run 8),
// and the down weights cannot stream while gate_up drains, because gate_up's blocks fill the register file.
// Here a grid of co-resident blocks (cooperative launch) does gate_up, then every warp issues the loads of its
// first down task, then the grid synchronises on h, then the down tasks and the combine run. The down
// weights do not depend on h, so their first round is in flight across the grid barrier.
//
// Bits: each gate_up warp task and each down warp task is the two-kernel path's (same warp_dot, same
// epilogue roundings, the same combine in slot order in shared memory), so the output is bitwise that of
// the general GEMV path, as the two-kernel path's is (tests/kernels/test_moe_gpu.py). INT4 goes through the
// CUDA-core GEMV core here, not the tensor-core decode kernels of experts_i4mma.cu.
#include <cooperative_groups.h>

#include "gemv_core.cuh"
#include "route_core.cuh"

namespace qmoe {
namespace {

using gemv::kRows;
constexpr int kWarps = 8;      // warps per block
constexpr int kMaxGroups = 4;  // down: row groups (of kRows rows) per block task, at most

struct PersistentArgs {
  Token1Args a;  // weight/scale: gate_up's
  const void* down;
  const void* down_scale;
};

template <typename W> struct DownTask {
  const typename gemv::WTraits<W>::Store* rows[kRows];
  gemv::GroupScales gs;
  int slot, group, e, row0;
};

template <typename W>
__device__ __forceinline__ DownTask<W> down_task(const PersistentArgs& pa, int block_task, int task, int my_id) {
  const Token1Args& a = pa.a;
  using Store = typename gemv::WTraits<W>::Store;
  constexpr int PS = gemv::WTraits<W>::kPerStore;
  DownTask<W> d;
  d.slot = task % a.k;
  d.group = task / a.k;
  d.e = __shfl_sync(0xffffffffu, my_id, d.slot);
  d.row0 = (block_task * a.groups + d.group) * kRows;
  d.gs = gemv::GroupScales{{}, a.scale_dtype, a.group_shift};
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    d.rows[r] = static_cast<const Store*>(pa.down) + (size_t(d.e) * a.H + d.row0 + r) * (a.I / PS);
    if (gemv::WTraits<W>::kGrouped)
      d.gs.rows[r] = group_scale_row(pa.down_scale, a.scale_dtype, size_t(d.e) * a.H + d.row0 + r, a.I, a.group_shift);
  }
  return d;
}

// kMinBlocks resident blocks an SM: 2 (at most 128 registers: 114-121, no spills) or 3 (80: 220-376 bytes
// spilled, but 3168 resident warps take the 30B-A3B layer's 3072 gate_up tasks in one round instead of 1.45).
template <typename T, typename W, int kMinBlocks>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) token1_persistent_kernel(PersistentArgs pa) {
  __shared__ float part[kMaxTopK][kMaxGroups * kRows];  // expert outputs rounded to T, as float
  const Token1Args& a = pa.a;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = a.H, I = a.I, k = a.k;
  using Store = typename gemv::WTraits<W>::Store;
  constexpr int PS = gemv::WTraits<W>::kPerStore;
  constexpr bool kGrouped = gemv::WTraits<W>::kGrouped;

  int my_id;
  float my_p;
  route_token_lanes(a.logits, a.E, k, a.normalize != 0, my_id, my_p);
  if (blockIdx.x == 0 && warp == 0) write_routing(a.ws, a.E, k, my_id, my_p);

  // gate_up: warp task = (slot, column pair j, j + 1), grid-strided over all warps.
  const int n_up = k * (I / 2), n_warps = gridDim.x * kWarps;
  for (int task = blockIdx.x * kWarps + warp; task < n_up; task += n_warps) {
    const int slot = task / (I / 2), j = (task % (I / 2)) * 2;
    const int e = __shfl_sync(0xffffffffu, my_id, slot);
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
      for (int r = 0; r < kRows; ++r)
        s[r] = a.scale && !kGrouped ? load_scale(a.scale, size_t(e) * 2 * I + ridx[r], a.scale_dtype) : 1.0f;
      const float h0 = silu(acc[0][0] * s[0]) * (acc[2][0] * s[2]);
      const float h1 = silu(acc[1][0] * s[1]) * (acc[3][0] * s[3]);
      reinterpret_cast<uint32_t*>(static_cast<T*>(a.h) + size_t(slot) * I + j)[0] = pack2<T>(h0, h1);
    }
  }

  // down: block task = a.groups row groups of kRows output rows for all k slots (warp task = slot + k * group),
  // combined in shared memory in slot order, as experts_token1.cu's down kernel does.
  const int n_down_blocks = a.H / (a.groups * kRows), n_tasks = k * a.groups;
  const bool has_down = blockIdx.x < n_down_blocks && warp < n_tasks;
  gemv::Round<W> wv;
  DownTask<W> d{};
  if (has_down) {  // the first round of this warp's first down task: in flight across the grid barrier
    d = down_task<W>(pa, blockIdx.x, warp, my_id);
    gemv::load_round<W>(d.rows, d.gs, 0, I, wv);
  }
  cooperative_groups::this_grid().sync();  // every h column written (and visible)

  for (int bt = blockIdx.x; bt < n_down_blocks; bt += gridDim.x) {
    for (int task = warp; task < n_tasks; task += kWarps) {
      const bool prefetched = bt == blockIdx.x && task == warp;
      if (!prefetched) {
        d = down_task<W>(pa, bt, task, my_id);
        gemv::load_round<W>(d.rows, d.gs, 0, I, wv);
      }
      const T* hs = static_cast<const T*>(a.h) + size_t(d.slot) * I;
      float acc[kRows][1] = {{0.0f}, {0.0f}, {0.0f}, {0.0f}};
      gemv::consume_round<T, W, 1>(wv, 0, hs, 1, I, acc);
      for (int kb = gemv::round_step<W>(); kb < I; kb += gemv::round_step<W>()) {
        gemv::load_round<W>(d.rows, d.gs, kb, I, wv);
        gemv::consume_round<T, W, 1>(wv, kb, hs, 1, I, acc);
      }
      gemv::warp_reduce<1>(acc);
      if (lane < kRows) {
        float v = acc[0][0];
#pragma unroll
        for (int r = 1; r < kRows; ++r) v = lane == r ? acc[r][0] : v;
        const float s = a.scale && !kGrouped ? load_scale(pa.down_scale, size_t(d.e) * a.H + d.row0 + lane, a.scale_dtype)
                                             : 1.0f;
        part[d.slot][d.group * kRows + lane] = to_float(from_float<T>(v * s));
      }
    }
    __syncthreads();
    if (warp == 0) {
      float acc = 0.0f;  // weighted combine in slot order, fp32 (the combine kernel's order): lane = row
      for (int j = 0; j < k; ++j) {
        const float w = __shfl_sync(0xffffffffu, my_p, j);
        if (lane < a.groups * kRows) acc = fmaf(w, part[j][lane], acc);
      }
      if (lane < a.groups * kRows) static_cast<T*>(a.out)[bt * a.groups * kRows + lane] = from_float<T>(acc);
    }
    __syncthreads();  // part is reused by the next block task
  }
}

template <typename T, typename W>
cudaError_t launch_typed(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s) {
  PersistentArgs pa{token1_args(p, t, ws), t.down, t.down_scale};
  pa.a.groups = p.top_k <= 2 ? 4 : 2;  // the two-kernel down kernel's choice (k * groups <= 64 warp tasks)
  // QMOE_T1_PERSISTENT_BLOCKS=3 (benchmarking): the 80-register build, 3 blocks an SM.
  auto kernel = env_int("QMOE_T1_PERSISTENT_BLOCKS", 2) == 3 ? token1_persistent_kernel<T, W, 3>
                                                              : token1_persistent_kernel<T, W, 2>;
  int dev = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, 0);
  if (err != cudaSuccess) return err;
  // Every block must be resident at once (the grid barrier); no more blocks than either phase has work for.
  const int up_blocks = (p.top_k * (p.inter / 2) + kWarps - 1) / kWarps;
  const int down_blocks = p.hidden / (pa.a.groups * kRows);
  int grid = per_sm * sms;
  const int want = up_blocks > down_blocks ? up_blocks : down_blocks;
  if (grid > want) grid = want;
  if (grid < 1) return cudaErrorCooperativeLaunchTooLarge;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kWarps * 32);
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, pa);
}

}  // namespace

cudaError_t launch_token1_persistent(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws,
                                     cudaStream_t s) {
  return with_dtypes(p, [&](auto act, auto weight) {
    return launch_typed<decltype(act), decltype(weight)>(p, t, ws, s);
  });
}

}  // namespace qmoe
