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
// and INT4 (INT8 stays on mma.sync): INT4 stages the nibbles (a quarter of the bytes, so more stages fit) and
// every thread widens its own landed chunks, q * s rounded once to 16 bits as the mma.sync kernel does, into a
// 16-bit copy of the weight tile laid out as the 16-bit path stages it, which wgmma then reads.
#include <type_traits>

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
// shared memory. INT4: a stage holds the weights' nibbles (32 bytes a row), and two 16-bit weight tiles that
// wgmma reads (widened from them) follow the stages.
template <int BN_, int STAGES_, int ROWS_ = 128, bool INT4_ = false>
struct WgCfg {
  static constexpr int BN = BN_, kStages = STAGES_, kRows = ROWS_;
  static constexpr int kHalves = kRows / 128;  // m64 tiles a warpgroup
  static constexpr int kA = kRows * (INT4_ ? 32 : 128), kB = BN * 128;  // staged bytes a stage
  static constexpr int kStage = kA + kB, kWide = INT4_ ? kRows * 128 : 0;  // kWide: one widened tile
  static constexpr int kPipe = kStages * kStage + 2 * kWide, kBytes = kPipe + 1024;  // + slack to align
  // Offset of the widened copy that K stage kb uses (INT4).
  __host__ __device__ static constexpr int wide_at(int kb) { return kStages * kStage + (kb & 1) * kWide; }
  static_assert(BN % 16 == 0 && BN <= 256 && (kRows == 128 || kRows == 256), "tile");
  static_assert(kStages >= 3, "the pipeline loads kStages - 2 stages ahead");
  static_assert(kStage % 1024 == 0 && kA % 1024 == 0, "swizzled tiles start at multiples of 1024 bytes");
  // Epilogue scratch, inside the (then idle) pipeline buffers.
  static_assert(kHalves * (BN / 2) * 128 * 4 + BN * (kRows / 2 + 8) * 2 <= kPipe, "gate_up epilogue");
  static_assert(BN * (kRows + 8) * 2 <= kPipe, "down epilogue");
  static_assert(kBytes <= 227 * 1024, "shared memory");
};
// Token tiles sized to the call (more shared memory left for stages in flight when tiles are narrow), 256
// weight rows a block where the shape allows (each token tile is read by half as many blocks; NOTES.md, run 15).
template <typename W> struct WgSet {
  // stages = (227 KB - 1 KB) / (ROWS * 128 B + BN * 128 B)
  using N64 = WgCfg<64, 9>;
  using N128 = WgCfg<128, 7>;
  using N192 = WgCfg<192, 5>;
  using N256 = WgCfg<256, 4>;
  using N64Tall = WgCfg<64, 5, 256>;
  using N128Tall = WgCfg<128, 4, 256>;
  using N192Tall = WgCfg<192, 4, 256>;
};
template <> struct WgSet<Int4> {
  // stages = (227 KB - 1 KB - 2 * ROWS * 128 B) / (ROWS * 32 B + BN * 128 B)
  using N64 = WgCfg<64, 16, 128, true>;
  using N128 = WgCfg<128, 9, 128, true>;
  using N192 = WgCfg<192, 6, 128, true>;
  using N256 = WgCfg<256, 5, 128, true>;
  using N64Tall = WgCfg<64, 10, 256, true>;
  using N128Tall = WgCfg<128, 6, 256, true>;
  using N192Tall = WgCfg<192, 5, 256, true>;
};

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
// r0 + 32 i (i < kA), so one base pointer and a stride address them; the token rows are gathered. INT4 weights
// are not copied here (Widener stages them).
template <typename T, typename W, bool kGateUp, typename C>
struct StageLoader {
  static constexpr bool kCopyA = !std::is_same<W, Int4>::value;
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
    if constexpr (kCopyA) {
      // gate_up: rows 0..ROWS/2-1 are gate rows j, the rest the up rows of the same j; down: ROWS output rows.
      const int wrow0 = kGateUp ? c.rb * kHalf + r0 : c.rb * C::kRows + r0;
      a_src = static_cast<const T*>(a.weight) + (size_t(c.e) * rows_total + wrow0) * K + kc * 8;
      a_step = size_t(kRowStep) * K;
      a_up = kGateUp ? size_t(a.I - kHalf) * K : 0;
    }
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
  // Stage kb into the stage buffer at sa (weights) / sa + C::kA (tokens).
  __device__ __forceinline__ void load(uint32_t sa, int kb) const {
    const uint32_t sb = sa + C::kA;
    const int k0 = kb * kBK;
#pragma unroll
    for (int i = 0; i < (kCopyA ? kA : 0); ++i) {
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

// Weights that wgmma cannot read as staged: none for 16-bit weights (StageLoader copies them).
template <typename T, typename W, bool kGateUp, typename C>
struct Widener {
  __device__ __forceinline__ Widener(const GemmArgs&, const TileCoords&, int) {}
  __device__ __forceinline__ void load(uint32_t, int) const {}
};

// INT4 weights: chunk ch of a stage is 16 bytes of row ch / 2 (inputs 32 (ch % 2) .. + 31 of the stage: one
// group, since groups are 32, 64 or 128 inputs), staged at 16 ch. A thread copies chunks of its own
// warpgroup's rows only (tid % 128 + 128 i of the warpgroup's ROWS chunks), so the widened tile it writes is
// read by its own warpgroup's wgmma alone and the thread's own wgmma_wait<1> frees a widened copy for it
// (indeed a warp writes, in each m64 tile, just the 16 rows whose outputs it accumulates).
template <typename T, bool kGateUp, typename C>
struct Widener<T, Int4, kGateUp, C> {
  static constexpr int kA = C::kRows * 2 / kThreads;  // chunks a thread a stage (chunk i + 1: 64 rows down)
  const unsigned char* a_src[kA];  // chunk i at k = 0
  const unsigned char* s_row[kA];  // its row of group scales
  int ch0;                         // chunk 0's index in the stage
  int group_shift, scale_dtype;
  float s_next[kA];  // the scales of the next stage to widen

  __device__ __forceinline__ Widener(const GemmArgs& a, const TileCoords& c, int tid) {
    constexpr int kHalf = C::kRows / 2;
    const int rows_total = kGateUp ? 2 * a.I : a.H, wg = tid >> 7;
    ch0 = wg * C::kRows + (tid & 127);
    group_shift = a.group_shift;
    scale_dtype = a.scale_dtype;
#pragma unroll
    for (int i = 0; i < kA; ++i) {
      const int ch = ch0 + 128 * i, r = ch >> 1;
      // gate_up: warpgroup 0's rows are the gate rows j of the block's ROWS/2 columns, warpgroup 1's the up rows
      // of the same j; down: ROWS output rows.
      const int wrow = kGateUp ? wg * a.I + c.rb * kHalf + r - wg * kHalf : c.rb * C::kRows + r;
      const size_t row = size_t(c.e) * rows_total + wrow;
      a_src[i] = static_cast<const unsigned char*>(a.weight) + row * (a.K / 2) + (ch & 1) * 16;
      s_row[i] = group_scale_row(a.scale, a.scale_dtype, row, a.K, a.group_shift);
    }
    scales(0);
  }
  // Reads the group scales of stage kb's chunks into s_next.
  __device__ __forceinline__ void scales(int kb) {
    const int g = (kb * kBK + (ch0 & 1) * 32) >> group_shift;
#pragma unroll
    for (int i = 0; i < kA; ++i) s_next[i] = group_scale(s_row[i], g, scale_dtype);
  }
  // Stage kb's nibbles into the staged weights at sa.
  __device__ __forceinline__ void load(uint32_t sa, int kb) const {
#pragma unroll
    for (int i = 0; i < kA; ++i) cp_async16(sa + (ch0 + 128 * i) * 16, a_src[i] + kb * (kBK / 2), true);
  }
  // Widens this thread's chunks of stage kb (landed: its cp.async group is complete) from `staged` into the
  // 16-bit tile `wide`, where each lands as 4 of the 16-bit path's swizzled chunks (inputs 8 j .. 8 j + 7 of
  // row r at r * 128 + ((j ^ (r % 8)) << 4)), and reads stage kb + 1's scales (when there is one) a stage
  // ahead of their use.
  __device__ __forceinline__ void widen(const unsigned char* staged, unsigned char* wide, int kb, int KB) {
    float s[kA];
#pragma unroll
    for (int i = 0; i < kA; ++i) s[i] = s_next[i];
    if (kb + 1 < KB) scales(kb + 1);
#pragma unroll
    for (int i = 0; i < kA; ++i) {
      const int ch = ch0 + 128 * i, r = ch >> 1;
      const uint4 v = *reinterpret_cast<const uint4*>(staged + ch * 16);
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int j = 4 * (ch & 1) + q;
        *reinterpret_cast<uint4*>(wide + r * 128 + ((j ^ (r & 7)) << 4)) = i4x8_scaled<T>(w[q], s[i]);
      }
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

template <typename T, typename W, bool kGateUp, typename C>
__global__ void __launch_bounds__(kThreads, 1) wgmma_kernel(GemmArgs a) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kInt4 = std::is_same<W, Int4>::value;
  constexpr int BN = C::BN, kStages = C::kStages;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  pdl_wait();
  TileCoords c;
  if (!tile_coords<BN>(a, c)) return;
  const int KB = a.K / kBK;
  const int tid = threadIdx.x, wg = tid >> 7;
  const uint32_t raw = smem_u32(smem_raw), base = (raw + 1023u) & ~1023u;
  unsigned char* gbase = smem_raw + (base - raw);
  const StageLoader<T, W, kGateUp, C> loader(a, c, tid);
  Widener<T, W, kGateUp, C> widener(a, c, tid);
  auto load = [&](int kb) {
    const uint32_t sa = base + (kb % kStages) * C::kStage;
    loader.load(sa, kb);
    widener.load(sa, kb);
  };

  float acc[C::kHalves][BN / 2];
#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) {
    if (s < KB) load(s);
    cp_async_commit();
  }
  for (int kb = 0; kb < KB; ++kb) {
    cp_async_wait<kStages - 3>();  // this thread's chunks of stage kb have landed
    if constexpr (kInt4) {
      // Widened copy kb & 1 was last read by the wgmma of stage kb-2, which this thread's warpgroup (the only
      // one that reads the rows it writes) retired with its wait<1> of the previous iteration.
      widener.widen(gbase + (kb % kStages) * C::kStage, gbase + C::wide_at(kb), kb, KB);
    }
    fence_proxy_async();
    // After this barrier every thread's chunks (and widened weights) of stage kb are visible to wgmma, and both
    // warpgroups have retired the wgmma of stage kb-2 (wait<1> below), so its buffer can be refilled.
    __syncthreads();
    {
      const int nk = kb + kStages - 2;
      if (nk < KB) load(nk);
      cp_async_commit();
    }
    const uint32_t sa = base + (kb % kStages) * C::kStage;
    const uint32_t wa = kInt4 ? base + C::wide_at(kb) : sa;  // the weight tile wgmma reads
#ifndef QMOE_WGMMA_FENCE_PER_SHAPE  // else each wgmma_k64 block fences for itself (wgmma_ops.cuh)
    wgmma_fence();
#endif
#pragma unroll
    for (int h = 0; h < C::kHalves; ++h) {
      const uint32_t rows = (wg * C::kHalves + h) * 64;  // this m64 tile's first weight row in the tile
      wgmma_k64_n<BN, T>(c.n16, acc[h], sw128_desc(wa + rows * 128), sw128_desc(sa + C::kA), kb != 0);
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

template <typename T, typename W, bool kGateUp, typename C>
cudaError_t launch_one(GemmArgs a, int grid_tiles, cudaStream_t s) {
  constexpr int smem = C::kBytes;
  static const cudaError_t attr_err =
      cudaFuncSetAttribute(wgmma_kernel<T, W, kGateUp, C>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr_err != cudaSuccess) return attr_err;
  a.n_col_tiles = kGateUp ? a.I / (C::kRows / 2) : a.H / C::kRows;
  return launch(wgmma_kernel<T, W, kGateUp, C>, dim3(grid_tiles * a.n_col_tiles), dim3(kThreads), smem, s, a);
}

template <typename T, typename W, typename C>
cudaError_t launch_cfg(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                       bool with_down) {
  const int grid_tiles = max_tiles(p, C::BN);
  cudaError_t err = launch_one<T, W, true, C>(gemm_args(p, t, ws, true), grid_tiles, s);
  if (err != cudaSuccess || !with_down) return err;
  return launch_one<T, W, false, C>(gemm_args(p, t, ws, false), grid_tiles, s);
}

template <typename T, typename W>
cudaError_t launch_typed(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                         bool with_down) {
  using S = WgSet<W>;
  // 256 weight rows a block where the shape divides and the accumulators fit (tiles up to 192 tokens);
  // QMOE_WG_ROWS=128 (benchmarking) keeps 128.
  const bool tall = p.inter % 128 == 0 && p.hidden % 256 == 0 && env_int("QMOE_WG_ROWS", 256) == 256;
  switch (ws.tile_m) {
    case 64:
      return tall ? launch_cfg<T, W, typename S::N64Tall>(p, t, ws, s, with_down)
                  : launch_cfg<T, W, typename S::N64>(p, t, ws, s, with_down);
    case 128:
      return tall ? launch_cfg<T, W, typename S::N128Tall>(p, t, ws, s, with_down)
                  : launch_cfg<T, W, typename S::N128>(p, t, ws, s, with_down);
    case 192:
      return tall ? launch_cfg<T, W, typename S::N192Tall>(p, t, ws, s, with_down)
                  : launch_cfg<T, W, typename S::N192>(p, t, ws, s, with_down);
    case 256:
      return launch_cfg<T, W, typename S::N256>(p, t, ws, s, with_down);
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
  return with_dtypes(p, [&](auto act, auto weight) {
    using W = decltype(weight);
    if constexpr (std::is_same<W, int8_t>::value) return cudaErrorNotSupported;  // never sent here
    else return launch_typed<decltype(act), W>(p, t, ws, s, with_down);
  });
}

}  // namespace qmoe
