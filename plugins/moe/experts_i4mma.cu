// INT4 weight-only decode on the tensor cores (groups of 128 input channels; the GEMV path's kernels for them
// unless QMOE_I4_MMA=0).
//
// Why: at T = 1 the CUDA-core GEMV (gemv_core.cuh) spends about four instructions a weight (nibble ->
// float, fp32 FMA) and INT4 reads a quarter of bf16's bytes, so it runs out of issue slots before it runs out
// of bandwidth. Here a nibble pair becomes two exact 16-bit values with one shift and one lop3 (q + 8 in
// the mantissa of 128 for bf16, of 1024 for fp16) and one packed subtract, and mma.sync m16n8k16 does the
// multiply-adds with fp32 accumulation: under two instructions a weight.
//
// Tile: a warp computes 16 weight rows x 8 tokens (lane = 4 g + c holds rows g and g + 8 and, in B,
// token g). A dot product does not care in which order its k are summed, so each thread's fragment slots
// are mapped to the 32 consecutive inputs its one 16-byte load of a row holds, and the activations are
// read in the same order: the packed initializers are used as exported, with no repacking. One chunk of
// 128 inputs is one scale group: its fp32 partial sums take the group's scale, as the CUDA-core path does.
// KS warps split a tile's chunks (warp w: chunks w, w + KS, ...) and their partials are summed in shared
// memory in warp order, the same way on the single-token and the general path, so both give the same bits.
#include "mma_sync.cuh"
#include "route_core.cuh"

namespace qmoe {
namespace {

constexpr int kGroup = 128, kGroupShift = 7;  // inputs a chunk (one scale group)
constexpr int kRound = 4;     // chunks a warp loads before it consumes them (loads in flight per thread: 8)
constexpr int kTileTokens = 8;
constexpr int kKsUp = 4;      // warps a gate_up tile (K = hidden: 16 chunks at 2048)
constexpr int kKsDown = 2;    // warps a down tile (K = inter: 6 chunks at 768)
constexpr int kT1DownWarps = 16;  // single-token down: 8 tiles (slots) of 2 warps a block

// A nibble pair (bits 0-3 and 16-19 of v, each q + 8) -> two exact 16-bit values q.
template <typename T> __device__ __forceinline__ uint32_t nibble_pair(uint32_t v);
template <> __device__ __forceinline__ uint32_t nibble_pair<__nv_bfloat16>(uint32_t v) {
  uint32_t r = (v & 0x000F000Fu) | 0x43004300u;  // bf16 128 + (q + 8), exact below 256
  // r * 1 - 136: exact (the result is an integer in [-8, 7])
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(r), "r"(0x3F803F80u), "r"(0xC308C308u));
  return r;
}
template <> __device__ __forceinline__ uint32_t nibble_pair<__half>(uint32_t v) {
  uint32_t r = (v & 0x000F000Fu) | 0x64006400u;  // fp16 1024 + (q + 8), exact below 2048
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(r), "r"(0x3C003C00u), "r"(0xE408E408u));  // - 1032
  return r;
}

// Eight weights of one row (one 32-bit word, low nibble first) -> the four pairs (n_i, n_i+4), i = 0..3.
template <typename T> __device__ __forceinline__ void widen_word(uint32_t word, uint32_t (&p)[4]) {
  const uint32_t u = word ^ 0x88888888u;  // q -> q + 8, in [1, 15] for the recipe's [-7, 7]
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = nibble_pair<T>(u >> (4 * i));
}

// This thread's rows of the tile (g and g + 8: packed weights, K / 2 bytes, and their K / 128 scales)
// and its token's activation row (token g of the pass; null: a zero column).
template <typename T> struct TileRows {
  const uint8_t* w[2];
  const unsigned char* s[2];
  const T* x;
};

// acc (the C fragment) += this warp's chunks (ks, ks + KS, ...) of the tile. `loaded` runs once, after the
// first round of weight loads is issued and before any activation is read (the single-token down kernel
// waits there for the kernel that writes its activations: the weights do not depend on it).
template <typename T, int KS, typename F>
__device__ __forceinline__ void tile_part(const TileRows<T>& t, int scale_dtype, int K, int ks, float (&acc)[4],
                                          F&& loaded) {
  const int c = threadIdx.x & 3;
  const int chunks = K / kGroup;
  bool first = true;
  for (int q0 = ks; q0 < chunks; q0 += KS * kRound) {
    uint4 wv[kRound][2];
    float sc[kRound][2];
#pragma unroll
    for (int r = 0; r < kRound; ++r) {
      const int q = q0 + r * KS;
      const bool ok = q < chunks;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wv[r][h] = ok ? __ldg(reinterpret_cast<const uint4*>(t.w[h] + size_t(q) * (kGroup / 2)) + c)
                      : make_uint4(0, 0, 0, 0);
        sc[r][h] = ok ? group_scale(t.s[h], q, scale_dtype) : 0.0f;
      }
    }
    if (first) {
      loaded();
      first = false;
    }
#pragma unroll
    for (int r = 0; r < kRound; ++r) {
      const int q = q0 + r * KS;
      if (q >= chunks) break;
      float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const uint32_t lo[4] = {wv[r][0].x, wv[r][0].y, wv[r][0].z, wv[r][0].w};
      const uint32_t hi[4] = {wv[r][1].x, wv[r][1].y, wv[r][1].z, wv[r][1].w};
#pragma unroll
      for (int wi = 0; wi < 4; ++wi) {  // word wi: inputs q * 128 + c * 32 + wi * 8 + 0..7
        uint4 xv = make_uint4(0, 0, 0, 0);
        if (t.x) xv = *reinterpret_cast<const uint4*>(t.x + size_t(q) * kGroup + c * 32 + wi * 8);
        uint32_t pl[4], ph[4];
        widen_word<T>(lo[wi], pl);
        widen_word<T>(hi[wi], ph);
        // Slots (2c, 2c+1) hold pair (n_i, n_i+4), slots (2c+8, 2c+9) pair (n_i+1, n_i+5); B the same inputs.
        const uint32_t a0[4] = {pl[0], ph[0], pl[1], ph[1]};
        mma16816<T>(part, a0, __byte_perm(xv.x, xv.z, 0x5410), __byte_perm(xv.x, xv.z, 0x7632));
        const uint32_t a1[4] = {pl[2], ph[2], pl[3], ph[3]};
        mma16816<T>(part, a1, __byte_perm(xv.y, xv.w, 0x5410), __byte_perm(xv.y, xv.w, 0x7632));
      }
      acc[0] = fmaf(part[0], sc[r][0], acc[0]);  // row g, tokens 2c and 2c + 1
      acc[1] = fmaf(part[1], sc[r][0], acc[1]);
      acc[2] = fmaf(part[2], sc[r][1], acc[2]);  // row g + 8
      acc[3] = fmaf(part[3], sc[r][1], acc[3]);
    }
  }
  if (first) loaded();
}

// Shared memory of a block's tiles: each warp's C fragment.
template <int Warps> struct Partials {
  alignas(16) float v[Warps][32][4];  // float4 stores
  __device__ __forceinline__ void put(const float (&acc)[4]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    *reinterpret_cast<float4*>(v[warp][lane]) = make_float4(acc[0], acc[1], acc[2], acc[3]);
  }
  // put() between barriers: the previous pass's reads are done before, every warp's partials are in after.
  __device__ __forceinline__ void publish(const float (&acc)[4]) {
    __syncthreads();
    put(acc);
    __syncthreads();
  }
  // Row i (0..15), token n (0..7) of the tile whose KS warps start at `warp0`, summed in warp order.
  template <int KS> __device__ __forceinline__ float sum(int warp0, int i, int n) const {
    const int lane = 4 * (i & 7) + (n >> 1), idx = (i >> 3) * 2 + (n & 1);
    float s = v[warp0][lane][idx];
#pragma unroll
    for (int w = 1; w < KS; ++w) s += v[warp0 + w][lane][idx];
    return s;
  }
};

template <typename T>
__device__ __forceinline__ TileRows<T> tile_rows(const void* weight, const void* scale, int dtype, size_t row_lo,
                                                 size_t row_hi, int K, const T* x) {
  TileRows<T> t;
  t.w[0] = static_cast<const uint8_t*>(weight) + row_lo * size_t(K / 2);
  t.w[1] = static_cast<const uint8_t*>(weight) + row_hi * size_t(K / 2);
  t.s[0] = group_scale_row(scale, dtype, row_lo, K, kGroupShift);
  t.s[1] = group_scale_row(scale, dtype, row_hi, K, kGroupShift);
  t.x = x;
  return t;
}

struct NoWait {
  __device__ void operator()() const {}
};

// ---------------------------------------------------------------------------------------------
// Single token (T == 1): as experts_token1.cu, routing in every warp and the combine fused into down.

// Block: h[slot, j0 .. j0 + 7] (gate rows j0 + g, up rows I + j0 + g) for slot blockIdx.y; 4 warps split K.
// At most 80 registers: 6 blocks an SM, so the 30B-A3B layer's 768 blocks are one wave on 132 SMs (the
// batched logit loads of the routing took it to 96 registers and 5 blocks an SM).
template <typename T>
__global__ void __launch_bounds__(kKsUp * 32, 6) t1_gate_up_kernel(Token1Args a) {
  __shared__ Partials<kKsUp> red;
  pdl_wait();
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
  const int slot = blockIdx.y;
  const int e = token1_slot_expert(a, slot);
  const int j0 = blockIdx.x * 8, I = a.I;
  const size_t base = size_t(e) * 2 * I;
  const TileRows<T> t = tile_rows<T>(a.weight, a.scale, a.scale_dtype, base + j0 + g, base + I + j0 + g,
                                     a.H, g == 0 ? static_cast<const T*>(a.x) : nullptr);
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  tile_part<T, kKsUp>(t, a.scale_dtype, a.H, warp, acc, NoWait{});
  red.put(acc);
  __syncthreads();
  if (warp == 0 && lane < 8) {
    const float gate = red.template sum<kKsUp>(0, lane, 0), up = red.template sum<kKsUp>(0, lane + 8, 0);
    static_cast<T*>(a.h)[size_t(slot) * I + j0 + lane] = from_float<T>(silu(gate) * up);
  }
}

// Block: output rows row0 .. row0 + 15 for every slot (tile = slot, 2 warps split K), then the weighted
// combine in slot order (the combine kernel's order and roundings).
template <typename T>
__global__ void __launch_bounds__(kT1DownWarps * 32, 1) t1_down_kernel(Token1Args a) {
  constexpr int kTiles = kT1DownWarps / kKsDown;
  __shared__ Partials<kT1DownWarps> red;
  __shared__ float part[kMaxTopK][16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
  const int tile = warp / kKsDown, ks = warp % kKsDown, k = a.k, K = a.I;
  const int row0 = blockIdx.x * 16;
  int my_id;
  float my_p;
  route_token_lanes(a.logits, a.E, k, a.normalize != 0, my_id, my_p);
  bool waited = false;
  auto wait_once = [&] {
    if (!waited) pdl_wait();
    waited = true;
  };
  for (int slot0 = 0; slot0 < k; slot0 += kTiles) {
    const int slot = slot0 + tile;
    const int e = __shfl_sync(0xffffffffu, my_id, slot & 31);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (slot < k) {
      const size_t base = size_t(e) * a.H + row0;
      const T* hs = g == 0 ? static_cast<const T*>(a.h) + size_t(slot) * K : nullptr;
      const TileRows<T> t = tile_rows<T>(a.weight, a.scale, a.scale_dtype, base + g, base + g + 8, K, hs);
      tile_part<T, kKsDown>(t, a.scale_dtype, K, ks, acc, wait_once);
    }
    wait_once();
    red.put(acc);
    __syncthreads();
    if (ks == 0 && slot < k && lane < 16) {
      part[slot][lane] = to_float(from_float<T>(red.template sum<kKsDown>(warp, lane, 0)));
    }
    __syncthreads();
  }
  if (warp == 0) {
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
      const float w = __shfl_sync(0xffffffffu, my_p, j);
      if (lane < 16) acc = fmaf(w, part[j][lane], acc);
    }
    if (lane < 16) static_cast<T*>(a.out)[row0 + lane] = from_float<T>(acc);
  }
  pdl_launch_dependents();
}

// ---------------------------------------------------------------------------------------------
// General path (after the dispatch): one block per (row tile, active expert), the expert's tokens in passes of 8.

// gate_up: h[pair, j0 .. j0 + 7] for the expert's pairs; 4 warps split K (as the single-token kernel).
template <typename T>
__global__ void __launch_bounds__(kKsUp * 32) gate_up_kernel(GemmArgs a) {
  __shared__ Partials<kKsUp> red;
  pdl_wait();
  const int slot = blockIdx.y;
  if (slot >= a.meta[0]) return;
  const int e = a.active[slot];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
  const int j0 = blockIdx.x * 8, I = a.I, K = a.K;
  const int r0 = a.offsets[e], ne = a.offsets[e + 1] - r0;
  const size_t base = size_t(e) * 2 * I;
  for (int c0 = 0; c0 < ne; c0 += kTileTokens) {
    const int nt = min(kTileTokens, ne - c0);
    const T* x = g < nt ? static_cast<const T*>(a.act) + size_t(a.perm_pair[r0 + c0 + g] / a.top_k) * K : nullptr;
    const TileRows<T> t = tile_rows<T>(a.weight, a.scale, a.scale_dtype, base + j0 + g, base + I + j0 + g, K, x);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    tile_part<T, kKsUp>(t, a.scale_dtype, K, warp, acc, NoWait{});
    red.publish(acc);
    for (int i = threadIdx.x; i < 8 * nt; i += blockDim.x) {
      const int j = i & 7, n = i >> 3;
      const float gate = red.template sum<kKsUp>(0, j, n), up = red.template sum<kKsUp>(0, j + 8, n);
      static_cast<T*>(a.out)[size_t(r0 + c0 + n) * I + j0 + j] = from_float<T>(silu(gate) * up);
    }
  }
  pdl_launch_dependents();
}

// down: y[pair, rows] for 2 tiles of 16 rows a block, 2 warps each splitting K (as the single-token kernel).
constexpr int kDownWarps = 4;
template <typename T>
__global__ void __launch_bounds__(kDownWarps * 32) down_kernel(GemmArgs a) {
  __shared__ Partials<kDownWarps> red;
  pdl_wait();
  const int slot = blockIdx.y;
  if (slot >= a.meta[0]) return;
  const int e = a.active[slot];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
  const int tile = warp / kKsDown, ks = warp % kKsDown, K = a.K, H = a.H;
  const int row0 = (blockIdx.x * (kDownWarps / kKsDown) + tile) * 16;
  const int r0 = a.offsets[e], ne = a.offsets[e + 1] - r0;
  const size_t base = size_t(e) * H + row0;
  for (int c0 = 0; c0 < ne; c0 += kTileTokens) {
    const int nt = min(kTileTokens, ne - c0);
    const T* x = g < nt ? static_cast<const T*>(a.act) + size_t(r0 + c0 + g) * K : nullptr;
    const TileRows<T> t = tile_rows<T>(a.weight, a.scale, a.scale_dtype, base + g, base + g + 8, K, x);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    tile_part<T, kKsDown>(t, a.scale_dtype, K, ks, acc, NoWait{});
    red.publish(acc);
    if (ks == 0) {
      for (int i = lane; i < 16 * nt; i += 32) {
        const int r = i & 15, n = i >> 4;
        static_cast<T*>(a.out)[size_t(r0 + c0 + n) * H + row0 + r] =
            from_float<T>(red.template sum<kKsDown>(warp, r, n));
      }
    }
  }
  pdl_launch_dependents();
}

template <typename T>
cudaError_t launch_t1(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                      bool with_down) {
  Token1Args a = token1_args(p, t, ws);
  cudaError_t err = launch(t1_gate_up_kernel<T>, dim3(p.inter / 8, p.top_k), dim3(kKsUp * 32), 0, s, a);
  if (err != cudaSuccess || !with_down) return err;
  a.weight = t.down;
  a.scale = t.down_scale;
  return launch(t1_down_kernel<T>, dim3(p.hidden / 16), dim3(kT1DownWarps * 32), 0, s, a);
}

template <typename T>
cudaError_t launch_general(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                           bool with_down) {
  const int P = p.num_tokens * p.top_k;
  const int max_active = p.num_experts < P ? p.num_experts : P;
  GemmArgs a = gemm_args(p, t, ws, true);
  cudaError_t err = launch(gate_up_kernel<T>, dim3(p.inter / 8, max_active), dim3(kKsUp * 32), 0, s, a);
  if (err != cudaSuccess || !with_down) return err;
  a = gemm_args(p, t, ws, false);
  constexpr int kRowsPerBlock = kDownWarps / kKsDown * 16;
  return launch(down_kernel<T>, dim3(p.hidden / kRowsPerBlock, max_active), dim3(kDownWarps * 32), 0, s, a);
}

}  // namespace

bool i4mma_selected(const qmoe_problem& p) {
  return p.weight_dtype == QMOE_I4 && p.group_size == kGroup && env_int("QMOE_I4_MMA", 1) != 0 &&
         device_sm() >= 80;
}

cudaError_t launch_i4mma_token1(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                                bool with_down) {
  if (p.act_dtype == QMOE_F16) return launch_t1<__half>(p, t, ws, s, with_down);
  return launch_t1<__nv_bfloat16>(p, t, ws, s, with_down);
}

cudaError_t launch_i4mma_gemv(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                              bool with_down) {
  if (p.act_dtype == QMOE_F16) return launch_general<__half>(p, t, ws, s, with_down);
  return launch_general<__nv_bfloat16>(p, t, ws, s, with_down);
}

}  // namespace qmoe
