// Prefill path: grouped GEMM on the tensor cores (mma.sync m16n8k16, fp32 accumulation), one
// 64-token x 128-column tile per block, a 3-stage cp.async pipeline, XOR-swizzled shared memory read
// with ldmatrix. The tile map built by the dispatch kernel lists (expert, 64-row tile); blocks walk an
// expert's tiles m-fastest so the tiles that share a weight slab run side by side and the slab is read
// from HBM about once. INT8 weights are staged as bytes and widened to 16 bits in shared memory (exact
// for |w| <= 127); the per-channel scale is applied to the fp32 accumulator in the epilogue. INT4 weights
// are staged as nibbles and widened with their group's scale folded in (q * s rounded once to 16 bits, as
// a dequantize-then-GEMM does; the GEMV path keeps q exact and scales the fp32 partial instead): a 16-byte
// chunk is 32 inputs of one group, since groups are 32, 64 or 128 inputs and chunks start at multiples of 32.
#include "mma_sync.cuh"

namespace qmoe {
namespace {

// Tile configurations. BM must equal the tile map's rows per tile (ws.tile_m) of the call.
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct Cfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, kStages = STAGES_;
  static constexpr int kWarpsM = WARPS_M_, kWarpsN = WARPS_N_, kThreads = 32 * WARPS_M_ * WARPS_N_;
  static constexpr int WTM = BM / kWarpsM, WTN = BN / kWarpsN;  // warp tile
  static constexpr int MI = WTM / 16, NI = WTN / 8;              // mma tiles per warp
  static constexpr int CPR = BK / 8;                             // 16-byte chunks per 16-bit smem row
  static_assert(CPR == 4 || CPR == 8, "BK must be 32 or 64");
  static_assert(NI % 2 == 0 && MI >= 1, "warp tile");
};
// 64 x 128 tile, 2 x 2 warps of 32 x 64, BK 64, 3 stages: any inter % 64, hidden % 128; few tokens per expert.
using CfgSmall = Cfg<64, 128, 64, 2, 2, 3>;
// (Measured and dropped, NOTES.md: 64x256 with 1x4 warps of 64x64, 128x256 with 2x4 warps, 128x128 with
// 2x4 warps of 64x32; all slower on the H200 than this tile at T=512 and T=2048.)

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                            uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// Byte offset of 16-byte chunk `c` of row `r` in a tile of CPR-chunk rows, XOR-swizzled so that the 8 row
// addresses of one ldmatrix phase land in 8 different 16-byte bank groups.
template <int CPR>
__device__ __forceinline__ uint32_t swz(int r, int c) {
  if (CPR == 8) return uint32_t(r * 128 + ((c ^ (r & 7)) << 4));
  return uint32_t(r * 64 + ((c ^ ((r >> 1) & 3)) << 4));
}

// Staged weight bytes per 16-bit weight, and weights per 16-byte chunk, by weight type.
template <typename W> struct Staged {
  static constexpr bool kNarrow = false;
  __host__ __device__ static constexpr int kRowBytes(int bk) { return 2 * bk; }
  static constexpr int kElems = 8;
};
template <> struct Staged<int8_t> {
  static constexpr bool kNarrow = true;
  __host__ __device__ static constexpr int kRowBytes(int bk) { return bk; }
  static constexpr int kElems = 16;
};
template <> struct Staged<Int4> {
  static constexpr bool kNarrow = true;
  __host__ __device__ static constexpr int kRowBytes(int bk) { return bk / 2; }
  static constexpr int kElems = 32;
};

template <typename C, typename W>
struct Smem {
  static constexpr int kA = C::BM * C::BK * 2;                    // bytes per stage
  static constexpr int kB = C::BN * Staged<W>::kRowBytes(C::BK);  // bytes per stage
  static constexpr int kConvOne = C::BN * C::BK * 2;               // one 16-bit copy of the B tile
  static constexpr int kBytes = C::kStages * (kA + kB) + (Staged<W>::kNarrow ? 2 * kConvOne : 0);
};

template <typename T, typename W, bool kGateUp, typename C>
__global__ void __launch_bounds__(C::kThreads) mma_kernel(GemmArgs a) {
  constexpr bool kInt4 = std::is_same<W, Int4>::value, kNarrow = Staged<W>::kNarrow;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, CPR = C::CPR, kStages = C::kStages;
  constexpr int kThreads = C::kThreads, WTM = C::WTM, WTN = C::WTN, MI = C::MI, NI = C::NI;
  using SM = Smem<C, W>;
  extern __shared__ __align__(128) unsigned char smem[];
  pdl_wait();
  const int tile = blockIdx.x / a.n_col_tiles;
  if (tile >= a.meta[1]) return;
  const int4 tm = reinterpret_cast<const int4*>(a.tile_map)[tile];
  const int e = tm.x, first = tm.z, mt = tm.w;
  const int local = blockIdx.x - first * a.n_col_tiles;
  const int n_tile = local / mt, m_idx = local % mt;
  const int row0 = a.offsets[e] + m_idx * BM;
  const int rows_valid = min(BM, a.offsets[e + 1] - row0);
  const int K = a.K;
  const int rows_total = kGateUp ? 2 * a.I : a.H;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
  const bool warp_has_rows = wm * WTM < rows_valid;
  const T* act = static_cast<const T*>(a.act);
  constexpr int kBRowBytes = Staged<W>::kRowBytes(BK);  // staged bytes of a weight row's BK inputs
  const unsigned char* wbase =
      static_cast<const unsigned char*>(a.weight) + size_t(e) * rows_total * Staged<W>::kRowBytes(K);

  // This thread's cp.async sources and destinations (fixed rows, advancing k).
  constexpr int kAChunks = BM * CPR / kThreads;
  constexpr int kBElems = Staged<W>::kElems;  // weight elements per 16 bytes
  constexpr int kBChunksPerRow = BK / kBElems;
  constexpr int kBChunks = BN * kBChunksPerRow / kThreads;
  static_assert(kAChunks >= 1 && kBChunks >= 1, "tile too small for the block");
  const T* a_src[kAChunks];
  bool a_ok[kAChunks];
  uint32_t a_dst[kAChunks];
#pragma unroll
  for (int i = 0; i < kAChunks; ++i) {
    const int c = tid + i * kThreads, r = c / CPR, kc = c % CPR;
    a_ok[i] = r < rows_valid;
    int src_row = 0;
    if (a_ok[i]) src_row = kGateUp ? a.perm_pair[row0 + r] / a.top_k : row0 + r;
    a_src[i] = act + size_t(src_row) * K + kc * 8;
    a_dst[i] = swz<CPR>(r, kc);
  }
  const unsigned char* b_src[kBChunks];
  uint32_t b_dst[kBChunks];
  const unsigned char* s_row[kBChunks];  // INT4: the chunk's row of group scales
#pragma unroll
  for (int i = 0; i < kBChunks; ++i) {
    const int c = tid + i * kThreads, r = c / kBChunksPerRow, kc = c % kBChunksPerRow;
    int wrow;
    if (kGateUp) {
      // Warp column wn holds WTN/2 gate rows then the WTN/2 up rows of the same columns j.
      const int within = r % WTN, jj = (r / WTN) * (WTN / 2) + within % (WTN / 2);
      wrow = (within / (WTN / 2)) * a.I + n_tile * (BN / 2) + jj;
    } else {
      wrow = n_tile * BN + r;
    }
    b_src[i] = wbase + size_t(wrow) * Staged<W>::kRowBytes(K) + kc * 16;
    b_dst[i] = kNarrow ? uint32_t(r * kBRowBytes + kc * 16) : swz<CPR>(r, kc);
    s_row[i] = kInt4 ? group_scale_row(a.scale, a.scale_dtype, size_t(e) * rows_total + wrow, K, a.group_shift)
                     : nullptr;
  }

  const uint32_t sbase = smem_u32(smem);
  auto a_stage = [&](int s) { return sbase + s * (SM::kA + SM::kB); };
  auto b_stage = [&](int s) { return sbase + s * (SM::kA + SM::kB) + SM::kA; };
  auto load_tile = [&](int s, int kt) {
    const int k0 = kt * BK;
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) cp_async16(a_stage(s) + a_dst[i], a_src[i] + k0, a_ok[i]);
#pragma unroll
    for (int i = 0; i < kBChunks; ++i) cp_async16(b_stage(s) + b_dst[i], b_src[i] + Staged<W>::kRowBytes(k0), true);
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.0f;

  const int KT = K / BK;
  // INT4: each chunk's group scale, one tile ahead of its use (a global load off the widening's path).
  float s_cur[kBChunks], s_next[kBChunks];
  auto load_scales = [&](int kt, float (&dst)[kBChunks]) {
#pragma unroll
    for (int i = 0; i < kBChunks; ++i) {
      const int kc = (tid + i * kThreads) % kBChunksPerRow;
      const int g = (kt * BK + kc * kBElems) >> a.group_shift;
      dst[i] = kt < KT ? group_scale(s_row[i], g, a.scale_dtype) : 0.0f;
    }
  };
  if (kInt4) load_scales(0, s_cur);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_tile(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    const int s = kt % kStages;
    cp_async_wait<kStages - 2>();
    uint32_t b_tile = b_stage(s);
    if (kNarrow) {
      // Widen this thread's own staged bytes (its own cp.async has landed) into copy kt&1; the
      // barrier below publishes it. The other copy may still be read by iteration kt-1.
      unsigned char* conv = smem + kStages * (SM::kA + SM::kB) + (kt & 1) * SM::kConvOne;
      const unsigned char* stage_ptr = smem + s * (SM::kA + SM::kB) + SM::kA;
      if (kInt4) load_scales(kt + 1, s_next);
#pragma unroll
      for (int i = 0; i < kBChunks; ++i) {
        const int c = tid + i * kThreads, r = c / kBChunksPerRow, kc = c % kBChunksPerRow;
        const uint4 v = *reinterpret_cast<const uint4*>(stage_ptr + r * kBRowBytes + kc * 16);
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
        if constexpr (kInt4) {  // 32 nibbles, each times its group's scale, rounded once to T
#pragma unroll
          for (int q = 0; q < 4; ++q)
            *reinterpret_cast<uint4*>(conv + swz<CPR>(r, 4 * kc + q)) = i4x8_scaled<T>(w[q], s_cur[i]);
          s_cur[i] = s_next[i];
        } else {  // 16 bytes, exact; the per-channel scale waits for the epilogue
          float f[16];
#pragma unroll
          for (int q = 0; q < 4; ++q) i8x4_to_float(w[q], f + 4 * q);
          uint4 lo, hi;
          lo.x = pack2<T>(f[0], f[1]);
          lo.y = pack2<T>(f[2], f[3]);
          lo.z = pack2<T>(f[4], f[5]);
          lo.w = pack2<T>(f[6], f[7]);
          hi.x = pack2<T>(f[8], f[9]);
          hi.y = pack2<T>(f[10], f[11]);
          hi.z = pack2<T>(f[12], f[13]);
          hi.w = pack2<T>(f[14], f[15]);
          *reinterpret_cast<uint4*>(conv + swz<CPR>(r, 2 * kc)) = lo;
          *reinterpret_cast<uint4*>(conv + swz<CPR>(r, 2 * kc + 1)) = hi;
        }
      }
      b_tile = smem_u32(conv);
    }
    __syncthreads();
    {
      const int nk = kt + kStages - 1;
      if (nk < KT) load_tile(nk % kStages, nk);
      cp_async_commit();
    }
    const uint32_t a_tile = a_stage(s);
    if (!warp_has_rows) continue;  // this warp's rows are all padding: loads and barriers only
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t af[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int r = wm * WTM + mi * 16 + (lane & 15);
        ldmatrix_x4(a_tile + swz<CPR>(r, ks * 2 + (lane >> 4)), af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
      }
      uint32_t bf[NI][2];
#pragma unroll
      for (int nb = 0; nb < NI / 2; ++nb) {
        const int r = wn * WTN + nb * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(b_tile + swz<CPR>(r, ks * 2 + ((lane >> 3) & 1)), bf[2 * nb][0], bf[2 * nb][1],
                    bf[2 * nb + 1][0], bf[2 * nb + 1][1]);
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue. Element q of (mi, ni): row wm*WTM+mi*16+lane/4+8*(q/2), col wn*WTN+ni*8+2*(lane%4)+q%2.
  const float* sc32 = static_cast<const float*>(a.scale);
  const __half* sc16 = static_cast<const __half*>(a.scale);
  auto scale_of = [&](int wrow) -> float {
    if (!a.scale || kInt4) return 1.0f;  // INT4: folded into the widened weights
    const size_t i = size_t(e) * rows_total + wrow;
    return a.scale_dtype == QMOE_F16 ? __half2float(sc16[i]) : sc32[i];
  };
  T* out = static_cast<T*>(a.out);
  if (kGateUp) {
#pragma unroll
    for (int ni = 0; ni < NI / 2; ++ni) {
      const int j = n_tile * (BN / 2) + wn * (WTN / 2) + ni * 8 + 2 * (lane & 3);
      const float sg0 = scale_of(j), sg1 = scale_of(j + 1);
      const float su0 = scale_of(a.I + j), su1 = scale_of(a.I + j + 1);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int hq = 0; hq < 2; ++hq) {
          const int r = wm * WTM + mi * 16 + (lane >> 2) + 8 * hq;
          if (r < rows_valid) {
            const float h0 = silu(acc[mi][ni][2 * hq] * sg0) * (acc[mi][ni + NI / 2][2 * hq] * su0);
            const float h1 = silu(acc[mi][ni][2 * hq + 1] * sg1) * (acc[mi][ni + NI / 2][2 * hq + 1] * su1);
            *reinterpret_cast<uint32_t*>(out + size_t(row0 + r) * a.I + j) = pack2<T>(h0, h1);
          }
        }
    }
  } else {
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int n = n_tile * BN + wn * WTN + ni * 8 + 2 * (lane & 3);
      const float s0 = scale_of(n), s1 = scale_of(n + 1);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int hq = 0; hq < 2; ++hq) {
          const int r = wm * WTM + mi * 16 + (lane >> 2) + 8 * hq;
          if (r < rows_valid) {
            *reinterpret_cast<uint32_t*>(out + size_t(row0 + r) * a.H + n) =
                pack2<T>(acc[mi][ni][2 * hq] * s0, acc[mi][ni][2 * hq + 1] * s1);
          }
        }
    }
  }
  pdl_launch_dependents();
}

template <typename T, typename W, bool kGateUp, typename C>
cudaError_t launch_one(GemmArgs a, int grid_tiles, cudaStream_t s) {
  constexpr int smem = Smem<C, W>::kBytes;
  // Raise the dynamic shared-memory limit once per process (not inside every call, which may be
  // captured into a CUDA graph). The attribute belongs to the function on the current device.
  static const cudaError_t attr_err =
      cudaFuncSetAttribute(mma_kernel<T, W, kGateUp, C>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr_err != cudaSuccess) return attr_err;
  a.n_col_tiles = kGateUp ? a.I / (C::BN / 2) : a.H / C::BN;
  return launch(mma_kernel<T, W, kGateUp, C>, dim3(grid_tiles * a.n_col_tiles), dim3(C::kThreads), smem, s, a);
}

template <typename T, typename W>
cudaError_t launch_typed(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                         bool with_down) {
  cudaError_t err = launch_one<T, W, true, CfgSmall>(gemm_args(p, t, ws, true), ws.max_tiles, s);
  if (err != cudaSuccess || !with_down) return err;
  return launch_one<T, W, false, CfgSmall>(gemm_args(p, t, ws, false), ws.max_tiles, s);
}

}  // namespace

cudaError_t launch_experts_mma(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws,
                               cudaStream_t s, bool with_down) {
  return with_dtypes(p, [&](auto act, auto weight) {
    return launch_typed<decltype(act), decltype(weight)>(p, t, ws, s, with_down);
  });
}

}  // namespace qmoe
