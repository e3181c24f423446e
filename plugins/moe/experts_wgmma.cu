// Prefill path on Hopper (sm_90a): grouped GEMM with wgmma, operands swapped. A block's weight rows are
// wgmma's M (256 where the shape divides: each of the two warpgroups issues two m64 tiles; else 128: one) and
// the expert's tokens are N (16..256, fixed per tile), so a block reads its slab of an expert's weights once
// for all of that expert's tokens (an expert with more than a tile's width of tokens becomes further tiles)
// and pads at most 15 token columns, where the mma.sync tiles re-read each slab per 64 tokens and pad up to
// 63 token rows. The taller block halves how many blocks read each token tile through L2 (NOTES.md, run 16).
// K advances 64 at a time through a cp.async pipeline into shared memory laid out in the 128-byte swizzle that
// wgmma reads through descriptors (the tokens are gathered rows, which the tensor-copy engine cannot fetch on
// sm_90). Gate and up rows of the same columns sit in the two warpgroups; the epilogue meets them in shared
// memory and writes h, or y, through a transposing shared-memory tile with 16-byte stores. 16-bit weights
// only (INT8 stays on mma.sync).
#include "qmoe_internal.cuh"
#include "wgmma_ops.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "build SM 9.0 as sm_90a (-gencode=arch=compute_90a,code=sm_90a): the prefill kernel needs wgmma"
#endif

namespace qmoe {

// wgmma is sm_90a only (Blackwell has tcgen05 instead).
bool wgmma_supported() { return device_sm() == 90; }

namespace {

// K a stage: one 128-byte swizzle row of 16-bit values (used only in the sm_90a device code).
[[maybe_unused]] constexpr int kBK = 64;
constexpr int kThreads = 256;  // two warpgroups; every thread loads, each warpgroup issues its own wgmma

// ROWS weight rows a block (128: each warpgroup one m64 tile; 256: two), BN tokens a tile, STAGES K stages in
// shared memory.
template <int BN_, int STAGES_, int ROWS_ = 128>
struct WgCfg {
  static constexpr int BN = BN_, kStages = STAGES_, kRows = ROWS_;
  static constexpr int kHalves = kRows / 128;                              // m64 tiles a warpgroup
  static constexpr int kA = kRows * 128, kB = BN * 128, kStage = kA + kB;  // bytes
  static constexpr int kBytes = kStages * kStage + 1024;                   // + slack to align to 1024
  static_assert(BN % 16 == 0 && BN <= 256 && (kRows == 128 || kRows == 256), "tile");
  static_assert(kStages >= 3, "the pipeline loads kStages - 2 stages ahead");
  // Epilogue scratch, inside the (then idle) pipeline buffers.
  static_assert(kHalves * (BN / 2) * 128 * 4 + BN * (kRows / 2 + 8) * 2 <= kStages * kStage, "gate_up epilogue");
  static_assert(BN * (kRows + 8) * 2 <= kStages * kStage, "down epilogue");
  static_assert(kBytes <= 227 * 1024, "shared memory");
};
// Token tiles sized to the call (more shared memory left for stages in flight when tiles are narrow):
// stages = (227 KB - 1 KB) / (ROWS * 128 B + BN * 128 B).
using Wg64 = WgCfg<64, 9>;
using Wg128 = WgCfg<128, 7>;
using Wg192 = WgCfg<192, 5>;
using Wg256 = WgCfg<256, 4>;
// 256 weight rows a block: each token tile is read by half as many blocks (NOTES.md, run 15).
using Wg64Tall = WgCfg<64, 5, 256>;
using Wg128Tall = WgCfg<128, 4, 256>;
using Wg192Tall = WgCfg<192, 4, 256>;

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy writes (cp.async) become visible to the async proxy (wgmma) after this and a barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator accesses across a wgmma wait.
template <int N> __device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
#endif

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Where accumulator element i of m64 tile h sits: weight row (within the warpgroup's rows) and token column.
// Element 4*j + q: row h*64 + 16*warp + lane/4 + 8*(q/2), column 8*j + 2*(lane%4) + q%2.
struct AccCoord {
  int row, col;
};
__device__ __forceinline__ AccCoord acc_coord(int h, int i, int tid) {
  const int j = i >> 2, q = i & 3, warp = (tid >> 5) & 3, lane = tid & 31;
  return {h * 64 + warp * 16 + (lane >> 2) + 8 * (q >> 1), j * 8 + 2 * (lane & 3) + (q & 1)};
}

// Epilogue of a tile, by the block's threads; the pipeline buffers at gbase are free. Warpgroup wg holds weight
// rows wg * ROWS/2 .. as kHalves m64 tiles; for gate_up, warpgroup 0 holds the gate rows and warpgroup 1 the up
// rows of the same ROWS/2 columns.
template <typename T, bool kGateUp, typename C>
__device__ __forceinline__ void store_tile(const GemmArgs& a, float (&acc)[C::kHalves][C::BN / 2], unsigned char* gbase,
                                           int tid, int row0, int rb, int n, int n16) {
  constexpr int BN = C::BN, kHalves = C::kHalves, kHalf = C::kRows / 2;
  const int wg = tid >> 7, t = tid & 127;
  T* out = static_cast<T*>(a.out);
  if (kGateUp) {
    float* up = reinterpret_cast<float*>(gbase);                             // [kHalves * BN/2][128]: warpgroup 1's
    T* hs = reinterpret_cast<T*>(gbase + kHalves * (BN / 2) * 128 * 4);      // [BN tokens][ROWS/2 + 8 pad]
    if (wg == 1) {
#pragma unroll
      for (int h = 0; h < kHalves; ++h)
#pragma unroll
        for (int i = 0; i < BN / 2; ++i)
          if (i < n16 * 8) up[(h * (BN / 2) + i) * 128 + t] = acc[h][i];
    }
    __syncthreads();
    if (wg == 0) {
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) {
          if (i < n16 * 8) {
            const AccCoord at = acc_coord(h, i, tid);
            hs[at.col * (kHalf + 8) + at.row] = from_float<T>(silu(acc[h][i]) * up[(h * (BN / 2) + i) * 128 + t]);
          }
        }
      }
    }
    __syncthreads();
    constexpr int kChunks = kHalf / 8;  // 16-byte chunks of a token's h columns
    for (int c = tid; c < n * kChunks; c += kThreads) {
      const int tok = c / kChunks, ch = c % kChunks;
      *reinterpret_cast<uint4*>(out + size_t(row0 + tok) * a.I + rb * kHalf + ch * 8) =
          *reinterpret_cast<const uint4*>(hs + tok * (kHalf + 8) + ch * 8);
    }
  } else {
    T* ys = reinterpret_cast<T*>(gbase);  // [BN tokens][ROWS + 8 pad]
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) {
        if (i < n16 * 8) {
          const AccCoord at = acc_coord(h, i, tid);
          ys[at.col * (C::kRows + 8) + wg * kHalf + at.row] = from_float<T>(acc[h][i]);
        }
      }
    }
    __syncthreads();
    constexpr int kChunks = C::kRows / 8;
    for (int c = tid; c < n * kChunks; c += kThreads) {
      const int tok = c / kChunks, ch = c % kChunks;
      *reinterpret_cast<uint4*>(out + size_t(row0 + tok) * a.H + rb * C::kRows + ch * 8) =
          *reinterpret_cast<const uint4*>(ys + tok * (C::kRows + 8) + ch * 8);
    }
  }
}

// Where a block's work lies: tile `tile` of the tile map, column block `rb` (ROWS/2 columns of h for gate_up,
// ROWS of y for down).
struct TileCoords {
  int e, row0, rb, n, n16;  // expert, first permuted row, column block, tokens, wgmma N / 16
};

// The 16-byte cp.async chunks one thread copies for every K stage: its share of the ROWS weight rows and of the
// BN token rows (fixed rows, advancing k), written in the 128-byte swizzle. A thread's weight rows are
// r0 + 32 i (i < kA), so one base pointer and a stride address them; the token rows are gathered.
template <typename T, bool kGateUp, typename C>
struct StageLoader {
  static constexpr int kA = C::kRows * 8 / kThreads, kB = C::BN * 8 / kThreads;  // chunks a thread a stage
  static constexpr int kRowStep = kThreads / 8;                                // rows between a thread's chunks
  static_assert(kA >= 1 && kB >= 1, "every thread copies weights and tokens");
  const T* a_src;           // chunk 0 of the weights at k = 0
  size_t a_step, a_up;      // elements from chunk i to i + 1; extra offset of the up rows (gate_up, i >= kA/2)
  uint32_t dst;             // chunk 0's offset in the weight and the token tile (chunk i: + i * kRowStep rows)
  const T* b_src[kB];
  uint32_t b_load = 0, b_valid = 0;  // bit i: chunk i is inside the N rows / holds a real token

  __device__ __forceinline__ StageLoader(const GemmArgs& a, const TileCoords& c, int tid) {
    const int K = a.K, rows_total = kGateUp ? 2 * a.I : a.H, r0 = tid >> 3, kc = tid & 7;
    constexpr int kHalf = C::kRows / 2;
    // gate_up: rows 0..ROWS/2-1 are gate rows j, the rest the up rows of the same j; down: ROWS output rows.
    const int wrow0 = kGateUp ? c.rb * kHalf + r0 : c.rb * C::kRows + r0;
    a_src = static_cast<const T*>(a.weight) + (size_t(c.e) * rows_total + wrow0) * K + kc * 8;
    a_step = size_t(kRowStep) * K;
    a_up = kGateUp ? size_t(a.I - kHalf) * K : 0;
    dst = uint32_t(r0 * 128 + ((kc ^ (r0 & 7)) << 4));  // r & 7 == r0 & 7 for every chunk
    const T* act = static_cast<const T*>(a.act);
#pragma unroll
    for (int i = 0; i < kB; ++i) {
      const int r = r0 + i * kRowStep;
      int src_row = 0;
      if (r < c.n) src_row = kGateUp ? a.perm_pair[c.row0 + r] / a.top_k : c.row0 + r;
      b_src[i] = act + size_t(src_row) * K + kc * 8;
      b_load |= uint32_t(r < c.n16 * 16) << i;
      b_valid |= uint32_t(r < c.n) << i;
    }
  }
  // Stage kb into the stage buffer at sa (weights) / sa + ROWS * 128 (tokens).
  __device__ __forceinline__ void load(uint32_t sa, int kb) const {
    const uint32_t sb = sa + C::kA;
    const int k0 = kb * kBK;
#pragma unroll
    for (int i = 0; i < kA; ++i) {
      const T* src = a_src + k0 + i * a_step + (i >= kA / 2 ? a_up : 0);
      cp_async16(sa + dst + i * kRowStep * 128, src, true);
    }
#pragma unroll
    for (int i = 0; i < kB; ++i) {
      // Pad rows (n <= r < 16*n16) are zero-filled: their columns are computed and never stored.
      if ((b_load >> i) & 1) cp_async16(sb + dst + i * kRowStep * 128, b_src[i] + k0, (b_valid >> i) & 1);
    }
  }
};

// Reads the block's tile; false when the block has no tile (the grid is sized for the worst case).
template <int BN>
__device__ __forceinline__ bool tile_coords(const GemmArgs& a, TileCoords& c) {
  const int tile = blockIdx.x / a.n_col_tiles;
  if (tile >= a.meta[1]) return false;
  const int4 tm = reinterpret_cast<const int4*>(a.tile_map)[tile];
  c.e = tm.x;
  c.row0 = tm.y;
  c.rb = blockIdx.x % a.n_col_tiles;
  c.n = min(BN, a.offsets[c.e + 1] - c.row0);
  c.n16 = (c.n + 15) >> 4;
  return true;
}
#endif

template <typename T, bool kGateUp, typename C>
__global__ void __launch_bounds__(kThreads, 1) wgmma_kernel(GemmArgs a) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BN = C::BN, kStages = C::kStages;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  pdl_wait();
  TileCoords c;
  if (!tile_coords<BN>(a, c)) return;
  const int KB = a.K / kBK;
  const int tid = threadIdx.x, wg = tid >> 7;
  const uint32_t raw = smem_u32(smem_raw), base = (raw + 1023u) & ~1023u;
  unsigned char* gbase = smem_raw + (base - raw);
  const StageLoader<T, kGateUp, C> loader(a, c, tid);

  float acc[C::kHalves][BN / 2];
#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) {
    if (s < KB) loader.load(base + s * C::kStage, s);
    cp_async_commit();
  }
  for (int kb = 0; kb < KB; ++kb) {
    cp_async_wait<kStages - 3>();  // this thread's chunks of stage kb have landed
    fence_proxy_async();
    // After this barrier every thread's chunks of stage kb are visible to wgmma, and both warpgroups have
    // retired the wgmma of stage kb-2 (wait<1> below), so its buffer can be refilled.
    __syncthreads();
    {
      const int nk = kb + kStages - 2;
      if (nk < KB) loader.load(base + (nk % kStages) * C::kStage, nk);
      cp_async_commit();
    }
    const uint32_t sa = base + (kb % kStages) * C::kStage;
    wgmma_fence();
#pragma unroll
    for (int h = 0; h < C::kHalves; ++h) {
      const uint32_t rows = (wg * C::kHalves + h) * 64;  // this m64 tile's first weight row in the stage
      wgmma_k64_n<BN, T>(c.n16, acc[h], sw128_desc(sa + rows * 128), sw128_desc(sa + C::kA), kb != 0);
    }
    wgmma_commit();
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
#pragma unroll
  for (int h = 0; h < C::kHalves; ++h) fence_regs(acc[h]);
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers are free for the epilogue

  store_tile<T, kGateUp, C>(a, acc, gbase, tid, c.row0, c.rb, c.n, c.n16);
  pdl_launch_dependents();
#endif
}

template <typename T, bool kGateUp, typename C>
cudaError_t launch_one(GemmArgs a, int grid_tiles, cudaStream_t s) {
  constexpr int smem = C::kBytes;
  static const cudaError_t attr_err =
      cudaFuncSetAttribute(wgmma_kernel<T, kGateUp, C>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr_err != cudaSuccess) return attr_err;
  a.n_col_tiles = kGateUp ? a.I / (C::kRows / 2) : a.H / C::kRows;
  return launch(wgmma_kernel<T, kGateUp, C>, dim3(grid_tiles * a.n_col_tiles), dim3(kThreads), smem, s, a);
}

template <typename T, typename C>
cudaError_t launch_cfg(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                       bool with_down) {
  const int grid_tiles = max_tiles(p, C::BN);
  cudaError_t err = launch_one<T, true, C>(gemm_args(p, t, ws, true), grid_tiles, s);
  if (err != cudaSuccess || !with_down) return err;
  return launch_one<T, false, C>(gemm_args(p, t, ws, false), grid_tiles, s);
}

template <typename T>
cudaError_t launch_typed(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                         bool with_down) {
  // 256 weight rows a block where the shape divides and the accumulators fit (tiles up to 192 tokens);
  // QMOE_WG_ROWS=128 (benchmarking) keeps 128.
  const bool tall = p.inter % 128 == 0 && p.hidden % 256 == 0 && env_int("QMOE_WG_ROWS", 256) == 256;
  switch (ws.tile_m) {
    case 64:
      return tall ? launch_cfg<T, Wg64Tall>(p, t, ws, s, with_down) : launch_cfg<T, Wg64>(p, t, ws, s, with_down);
    case 128:
      return tall ? launch_cfg<T, Wg128Tall>(p, t, ws, s, with_down) : launch_cfg<T, Wg128>(p, t, ws, s, with_down);
    case 192:
      return tall ? launch_cfg<T, Wg192Tall>(p, t, ws, s, with_down) : launch_cfg<T, Wg192>(p, t, ws, s, with_down);
    case 256:
      return launch_cfg<T, Wg256>(p, t, ws, s, with_down);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

bool wgmma_preferred(const qmoe_problem& p) {
  // Measured on the H200 (NOTES.md, run 13): at 32 tokens an expert (30B-A3B, T=512) mma.sync's smaller
  // tiles stream the weights faster (346 vs 365 us); at 128 (T=2048) wgmma wins (605-618 vs 654-692 us).
  return (long long)p.num_tokens * p.top_k >= 96LL * p.num_experts;
}

int wgmma_tile_tokens(const qmoe_problem& p) {
  const int forced = env_int("QMOE_WG_TILE", 0);  // benchmarking: 64, 128, 192 or 256
  if (forced == 64 || forced == 128 || forced == 192 || forced == 256) return forced;
  // The narrowest tile that holds a typical expert's tokens (mean + 25 %) in one piece: a wider one
  // would cost pipeline depth, a narrower one a second pass over the expert's weights.
  const long long mean = (long long)p.num_tokens * p.top_k / p.num_experts;
  const long long want = mean + mean / 4;
  return want <= 64 ? 64 : want <= 128 ? 128 : want <= 192 ? 192 : 256;
}

cudaError_t launch_experts_wgmma(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws,
                                 cudaStream_t s, bool with_down) {
  if (p.weight_dtype == QMOE_I8 || p.weight_dtype == QMOE_I4) return cudaErrorNotSupported;  // never sent here
  return with_dtypes(p, [&](auto act, auto) { return launch_typed<decltype(act)>(p, t, ws, s, with_down); });
}

}  // namespace qmoe
