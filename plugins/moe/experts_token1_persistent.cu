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

#include "token1_tasks.cuh"

namespace qmoe {
namespace {

using gemv::kRows;
constexpr int kWarps = 8;  // warps per block

struct PersistentArgs {
  Token1Args a;  // weight/scale: gate_up's
  const void* down;
  const void* down_scale;
};

// kMinBlocks resident blocks an SM: 2 (at most 128 registers: 115-123, no spills) or 3 (80: 220-400 bytes
// spilled, but 3168 resident warps take the 30B-A3B layer's 3072 gate_up tasks in one round instead of 1.45).
template <typename T, typename W, int kMinBlocks>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) token1_persistent_kernel(PersistentArgs pa) {
  __shared__ token1::DownParts part;
  const Token1Args& a = pa.a;
  const int warp = threadIdx.x >> 5, I = a.I, k = a.k;

  int my_id;
  float my_p;
  route_token_lanes(a.logits, a.E, k, a.normalize != 0, my_id, my_p);
  if (blockIdx.x == 0 && warp == 0) write_routing(a.ws, a.E, k, my_id, my_p);

  // gate_up: warp task = (slot, column pair j, j + 1), grid-strided over all warps.
  const int n_up = k * (I / 2), n_warps = gridDim.x * kWarps;
  for (int task = blockIdx.x * kWarps + warp; task < n_up; task += n_warps) {
    const int slot = task / (I / 2);
    token1::gate_up_task<T, W>(a, slot, (task % (I / 2)) * 2, __shfl_sync(0xffffffffu, my_id, slot));
  }

  // down: block task = a.groups row groups of kRows output rows for all k slots (warp task = slot + k * group),
  // combined in shared memory in slot order, as experts_token1.cu's down kernel does.
  const int n_down_blocks = a.H / (a.groups * kRows), n_tasks = k * a.groups;
  gemv::Round<W> wv;
  token1::DownTask<W> d{};
  if (blockIdx.x < n_down_blocks && warp < n_tasks) {  // first round of the first task: across the barrier
    d = token1::down_task<W>(a, pa.down, pa.down_scale, blockIdx.x, warp, my_id);
    gemv::load_round<W>(d.rows, d.gs, 0, I, wv);
  }
  cooperative_groups::this_grid().sync();  // every h column written (and visible)

  for (int bt = blockIdx.x; bt < n_down_blocks; bt += gridDim.x) {
    for (int task = warp; task < n_tasks; task += kWarps) {
      if (bt != blockIdx.x || task != warp) {  // not the prefetched task
        d = token1::down_task<W>(a, pa.down, pa.down_scale, bt, task, my_id);
        gemv::load_round<W>(d.rows, d.gs, 0, I, wv);
      }
      token1::down_finish<T, W>(a, d, wv, part);
    }
    __syncthreads();
    if (warp == 0) token1::combine<T>(a, part, my_p, bt);
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
