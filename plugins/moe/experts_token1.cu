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
#include "token1_tasks.cuh"

namespace qmoe {
namespace {

using gemv::kRows;
constexpr int kUpWarps = 4;    // kernel 1: warps per block; a warp owns h columns j, j+1
constexpr int kDownWarps = 8;  // kernel 2: warps per block

// The register cap (80, 16 bytes spilled) fits all blocks of the 30B-A3B layer (96 x 8) at once on 132
// SMs; uncapped (96 registers, 5 blocks an SM) measured 4 us slower (NOTES.md, run 8).
template <typename T, typename W>
__global__ void __launch_bounds__(kUpWarps * 32, 6) token1_gate_up_kernel(Token1Args a) {
  pdl_wait();
  // Kernel 2 reads nothing of ours before its own wait: let it start as early as it can.
  pdl_launch_dependents();
  const int warp = threadIdx.x >> 5, slot = blockIdx.y;
  const int e = token1_slot_expert(a, slot);
  token1::gate_up_task<T, W>(a, slot, (blockIdx.x * kUpWarps + warp) * 2, e);  // grid.x * kUpWarps * 2 == I
}

// Block: a.groups row groups of kRows output rows, for all k slots (task = slot + k * group).
template <typename T, typename W>
__global__ void __launch_bounds__(kDownWarps * 32, 2) token1_down_kernel(Token1Args a) {
  __shared__ token1::DownParts part;
  const int warp = threadIdx.x >> 5;
  int my_id;
  float my_p;
  // The logits were complete before kernel 1 passed its wait, which came before this launch.
  route_token_lanes(a.logits, a.E, a.k, a.normalize != 0, my_id, my_p);

  bool waited = false;
  for (int task = warp; task < a.k * a.groups; task += kDownWarps) {
    const token1::DownTask<W> d = token1::down_task<W>(a, a.weight, a.scale, blockIdx.x, task, my_id);
    gemv::Round<W> wv;
    gemv::load_round<W>(d.rows, d.gs, 0, a.I, wv);  // before the wait: weights do not depend on kernel 1
    if (!waited) {
      pdl_wait();
      waited = true;
    }
    token1::down_finish<T, W>(a, d, wv, part);
  }
  if (!waited) pdl_wait();
  __syncthreads();
  if (warp == 0) token1::combine<T>(a, part, my_p, blockIdx.x);
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
