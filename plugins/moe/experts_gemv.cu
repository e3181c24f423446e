// Decode path: few tokens per expert, so the cost is reading the selected experts' weights once.
// Each warp streams kRows weight rows (gemv_core.cuh) and dots them with up to kMaxTok token vectors
// staged in shared memory. Single-token calls take experts_token1.cu instead.
#include "gemv_core.cuh"

namespace qmoe {
namespace {

constexpr int kWarps = 4;     // warps per block
constexpr int kRowIters = 2;  // row groups a warp handles one after another
using gemv::kRows;
constexpr int kMaxTok = 4;    // tokens per pass over the rows
// (Measured slower, NOTES.md: an L2 prefetch of the warp's rows at kernel start; issuing the first
// weight loads before staging the tokens, which doubled the registers.)

// kGateUp: rows j, j+1 of gate and of up -> h[:, j:j+2] = silu(gate) * up.  Else: 4 rows of down -> y.
template <typename T, typename W, bool kGateUp>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(GemmArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  pdl_wait();
  const int slot = blockIdx.y;
  if (slot >= a.meta[0]) return;
  const int e = a.active[slot];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = a.K;
  const int rows_total = kGateUp ? 2 * a.I : a.H;
  using Store = typename gemv::WTraits<W>::Store;
  constexpr bool kGrouped = gemv::WTraits<W>::kGrouped;
  const Store* wbase =
      static_cast<const Store*>(a.weight) + size_t(e) * rows_total * (K / gemv::WTraits<W>::kPerStore);
  const T* act = static_cast<const T*>(a.act);
  auto row_index = [&](int it, int r) {
    const int group = (blockIdx.x * kWarps + warp) * kRowIters + it;  // row group index
    if (kGateUp) return (r < 2 ? 0 : a.I) + 2 * group + (r & 1);       // gate j, j+1, up j, j+1
    return group * kRows + r;
  };
  const int r0 = a.offsets[e], ne = a.offsets[e + 1] - r0;

  for (int c = 0; c < ne; c += kMaxTok) {
    const int nt = min(kMaxTok, ne - c);
    __syncthreads();  // the previous pass is done with xs
    const int vec_per_row = K / 8;
    for (int i = threadIdx.x; i < nt * vec_per_row; i += blockDim.x) {
      const int t = i / vec_per_row, v = i % vec_per_row;
      const int src_row = kGateUp ? a.perm_pair[r0 + c + t] / a.top_k : r0 + c + t;
      reinterpret_cast<uint4*>(xs + size_t(t) * K)[v] =
          reinterpret_cast<const uint4*>(act + size_t(src_row) * K)[v];
    }
    __syncthreads();
#pragma unroll 1
    for (int it = 0; it < kRowIters; ++it) {
      const Store* rows[kRows];
      int ridx[kRows];
      gemv::GroupScales gs{{}, a.scale_dtype, a.group_shift};
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        ridx[r] = row_index(it, r);
        rows[r] = wbase + size_t(ridx[r]) * (K / gemv::WTraits<W>::kPerStore);
        if (kGrouped) gs.rows[r] = group_scale_row(a.scale, a.scale_dtype, size_t(e) * rows_total + ridx[r], K, a.group_shift);
      }
      float acc[kRows][kMaxTok];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int t = 0; t < kMaxTok; ++t) acc[r][t] = 0.0f;
      gemv::warp_dot<T, W, kMaxTok>(rows, gs, xs, nt, K, acc);
      float s[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        s[r] = a.scale && !kGrouped ? load_scale(a.scale, size_t(e) * rows_total + ridx[r], a.scale_dtype) : 1.0f;
      }
#pragma unroll
      for (int t = 0; t < kMaxTok; ++t) {
        if (lane == t && t < nt) {
          const size_t row = size_t(r0 + c + t);
          if (kGateUp) {
            const float h0 = silu(acc[0][t] * s[0]) * (acc[2][t] * s[2]);
            const float h1 = silu(acc[1][t] * s[1]) * (acc[3][t] * s[3]);
            reinterpret_cast<uint32_t*>(static_cast<T*>(a.out) + row * a.I + ridx[0])[0] = pack2<T>(h0, h1);
          } else {
            uint2 o;
            o.x = pack2<T>(acc[0][t] * s[0], acc[1][t] * s[1]);
            o.y = pack2<T>(acc[2][t] * s[2], acc[3][t] * s[3]);
            reinterpret_cast<uint2*>(static_cast<T*>(a.out) + row * a.H + ridx[0])[0] = o;
          }
        }
      }
    }
  }
  pdl_launch_dependents();
}

template <typename T, typename W, bool kGateUp>
cudaError_t launch_one(const GemmArgs& a, int grid_x, int grid_y, cudaStream_t s) {
  const size_t smem = size_t(kMaxTok) * a.K * sizeof(T);
  if (smem > 48 * 1024) {  // only for hidden > 6144
    cudaError_t err =
        cudaFuncSetAttribute(gemv_kernel<T, W, kGateUp>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  return launch(gemv_kernel<T, W, kGateUp>, dim3(grid_x, grid_y), dim3(kWarps * 32), smem, s, a);
}

template <typename T, typename W>
cudaError_t launch_typed(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                         bool with_down) {
  const int P = p.num_tokens * p.top_k;
  const int max_active = p.num_experts < P ? p.num_experts : P;
  GemmArgs a = gemm_args(p, t, ws, true);
  constexpr int kJPerBlock = kWarps * kRowIters * 2;
  cudaError_t err = launch_one<T, W, true>(a, p.inter / kJPerBlock, max_active, s);
  if (err != cudaSuccess || !with_down) return err;

  a = gemm_args(p, t, ws, false);
  constexpr int kRowsPerBlock = kWarps * kRowIters * kRows;
  return launch_one<T, W, false>(a, p.hidden / kRowsPerBlock, max_active, s);
}

}  // namespace

cudaError_t launch_experts_gemv(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws,
                               cudaStream_t s, bool with_down) {
  return with_dtypes(p, [&](auto act, auto weight) {
    return launch_typed<decltype(act), decltype(weight)>(p, t, ws, s, with_down);
  });
}

}  // namespace qmoe
