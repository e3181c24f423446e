// Internal to the qmoe library: device helpers, workspace layout and the launchers each .cu file exports.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <utility>

#include "qmoe.h"

namespace qmoe {

// Smallest rows per tile of the tensor-core path: sizes the tile map (a call may use 64 or 128).
constexpr int kMmaBlockM = 64;
constexpr int kMaxExperts = 256;
constexpr int kMaxTopK = 32;
// At or below this many tokens the router runs inside the (single-block) dispatch kernel.
constexpr int kFusedRouterMaxTokens = 64;

// ---------------------------------------------------------------------------------------------
// Scalar conversions.
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two floats -> one 32-bit word of two 16-bit values (low half = a).
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// One 32-bit word of two 16-bit values -> two floats.
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t w);
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t w) {
  return __half22float2(*reinterpret_cast<__half2*>(&w));
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
  // bf16 is the top half of an fp32: shifting is exact and costs no conversion unit.
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

// Four signed bytes -> four exact floats without the (slow) integer-to-float unit: place the
// sign-flipped byte in the mantissa of 2^23 and subtract 2^23 + 128.
__device__ __forceinline__ void i8x4_to_float(uint32_t w, float* f) {
  const uint32_t u = w ^ 0x80808080u;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[i] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540 + i)) - 8388736.0f;
  }
}

// Eight signed 4-bit values (two a byte, low nibble first) -> eight exact floats, the same trick: the
// sign-flipped nibble (q + 8) in the mantissa of 2^23, minus 2^23 + 8.
__device__ __forceinline__ void i4x8_to_float(uint32_t w, float* f) {
  const uint32_t u = w ^ 0x88888888u;
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = __uint_as_float(((u >> (4 * i)) & 0xFu) | 0x4B000000u) - 8388616.0f;
}

// Eight signed 4-bit values of one group times the group's scale, each rounded once to T: 16 bytes of a
// widened weight row (the dequantize-then-GEMM rounding of the tensor-core prefill kernels).
template <typename T>
__device__ __forceinline__ uint4 i4x8_scaled(uint32_t w, float s) {
  float f[8];
  i4x8_to_float(w, f);
  return make_uint4(pack2<T>(f[0] * s, f[1] * s), pack2<T>(f[2] * s, f[3] * s), pack2<T>(f[4] * s, f[5] * s),
                    pack2<T>(f[6] * s, f[7] * s));
}

__device__ __forceinline__ float load_scale(const void* p, size_t i, int scale_dtype) {
  return scale_dtype == QMOE_F16 ? __half2float(static_cast<const __half*>(p)[i])
                                 : static_cast<const float*>(p)[i];
}

// INT4 per-group scales [E, rows, K >> shift] (fp32 or fp16): where row `row` starts, and its group g
// (read-only cache).
__device__ __forceinline__ const unsigned char* group_scale_row(const void* scale, int dtype, size_t row, int K,
                                                                int shift) {
  const size_t elem = dtype == QMOE_F16 ? 2 : 4;
  return static_cast<const unsigned char*>(scale) + row * size_t(K >> shift) * elem;
}
__device__ __forceinline__ float group_scale(const unsigned char* row, int g, int dtype) {
  return dtype == QMOE_F16 ? __half2float(__ldg(reinterpret_cast<const __half*>(row) + g))
                           : __ldg(reinterpret_cast<const float*>(row) + g);
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

// ---------------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90+): a kernel launched with the PDL attribute may start while
// the previous one drains; it must wait before reading what that kernel wrote. No-ops before sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// cp.async (sm_80+): 16-byte global -> shared copies that hold no registers while in flight.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Launch with the PDL attribute when the device supports it (and QMOE_PDL != 0).
bool pdl_enabled();
template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                   Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// Small integer knobs from the environment (benchmarking variants), read at each call: the benchmark switches
// them within one process.
int env_int(const char* name, int fallback);
// The current device's SM version as 10 * major + minor (0 without a device), queried once per process.
int device_sm();

// Weight type tag of QMOE_I4: two signed 4-bit values a byte, low nibble first, per-group scales.
struct Int4 {};

// Calls f(Act{}, Weight{}) with the problem's activation type (__half or __nv_bfloat16) and weight type (the
// activation type, int8_t or Int4): one place that turns the dtype codes into template arguments.
template <typename F>
cudaError_t with_dtypes(const qmoe_problem& p, F&& f) {
  const bool i8 = p.weight_dtype == QMOE_I8, i4 = p.weight_dtype == QMOE_I4;
  if (p.act_dtype == QMOE_F16) return i4 ? f(__half{}, Int4{}) : i8 ? f(__half{}, int8_t{}) : f(__half{}, __half{});
  return i4 ? f(__nv_bfloat16{}, Int4{}) : i8 ? f(__nv_bfloat16{}, int8_t{}) : f(__nv_bfloat16{}, __nv_bfloat16{});
}

// ---------------------------------------------------------------------------------------------
// Workspace: device pointers carved out of one buffer. Offsets are 256-byte aligned.
struct Workspace {
  int32_t* topk_ids;      // [P]   P = T*k
  float* topk_w;          // [P]
  int32_t* offsets;       // [E+1]
  int32_t* meta;          // [4]   num_active, num_tiles
  int32_t* active;        // [E]   active experts, ascending
  int32_t* perm_pair;     // [P]   pair index of each permuted row
  int32_t* pair_pos;      // [P]   permuted row of each pair
  int32_t* tile_map;      // [max_tiles * 4]: expert, m_start (row), first tile of expert, tiles of expert
  int32_t* block_counts;  // [E, routing_blocks]: pairs of each router block in each expert, then its start
  void* h;                // [P, I]  act dtype
  void* y;                // [P, H]  act dtype (unweighted expert outputs, permuted order)
  int32_t max_tiles;
  int32_t tile_m;         // rows (tokens) of a tensor-core tile, chosen per call: 64 (mma.sync), 64..256 (wgmma)
  size_t bytes;
};

inline size_t align256(size_t v) { return (v + 255) & ~size_t(255); }

// Upper bound on the tiles of tile_m rows: every full tile, plus one partial tile per expert with tokens.
inline int max_tiles(const qmoe_problem& p, int tile_m) {
  const int P = p.num_tokens * p.top_k;
  return P / tile_m + (p.num_experts < P ? p.num_experts : P);
}

// Router blocks of the many-token dispatch (route.cu).
int routing_blocks(const qmoe_problem& p);

inline Workspace layout_workspace(const qmoe_problem& p, void* base) {
  Workspace w{};
  const size_t P = size_t(p.num_tokens) * p.top_k, E = p.num_experts;
  w.max_tiles = max_tiles(p, kMmaBlockM);  // the smallest tile: bounds every call's tile map
  w.tile_m = kMmaBlockM;
  char* b = static_cast<char*>(base);
  size_t off = 0;
  auto take = [&](size_t n) {
    char* r = b ? b + off : nullptr;
    off += align256(n);
    return r;
  };
  w.topk_ids = reinterpret_cast<int32_t*>(take(P * 4));
  w.topk_w = reinterpret_cast<float*>(take(P * 4));
  w.offsets = reinterpret_cast<int32_t*>(take((E + 1) * 4));
  w.meta = reinterpret_cast<int32_t*>(take(4 * 4));
  w.active = reinterpret_cast<int32_t*>(take(E * 4));
  w.perm_pair = reinterpret_cast<int32_t*>(take(P * 4));
  w.pair_pos = reinterpret_cast<int32_t*>(take(P * 4));
  w.tile_map = reinterpret_cast<int32_t*>(take(size_t(w.max_tiles) * 4 * 4));
  w.block_counts = reinterpret_cast<int32_t*>(take(E * routing_blocks(p) * 4));
  w.h = take(P * p.inter * 2);
  w.y = take(P * p.hidden * 2);
  w.bytes = off;
  return w;
}

// One grouped launch of an expert kernel (GEMV, mma.sync or wgmma): gate_up reads x gathered through perm_pair
// and writes h [P, I]; down reads h and writes y [P, H] (permuted order). The GEMV path walks `active`, the
// tensor-core paths `tile_map`; n_col_tiles: blocks across the output columns of one token tile, set by the
// tensor-core launchers from their tile width.
struct GemmArgs {
  const void* act;
  const void* weight;  // [E, rows_total, K]
  const void* scale;   // [E, rows_total] (INT8), [E, rows_total, K / group] (INT4) or NULL
  int scale_dtype;
  int group_shift;     // INT4: log2(group size)
  void* out;
  const int32_t* perm_pair;
  const int32_t* offsets;
  const int32_t* tile_map;
  const int32_t* active;
  const int32_t* meta;
  int top_k, K, I, H, n_col_tiles;
};

inline GemmArgs gemm_args(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, bool gate_up) {
  GemmArgs a{};
  a.perm_pair = ws.perm_pair;
  a.offsets = ws.offsets;
  a.tile_map = ws.tile_map;
  a.active = ws.active;
  a.meta = ws.meta;
  a.top_k = p.top_k;
  a.I = p.inter;
  a.H = p.hidden;
  a.scale_dtype = p.scale_dtype;
  a.group_shift = p.group_size > 0 ? __builtin_ctz(unsigned(p.group_size)) : 0;
  a.act = gate_up ? t.x : ws.h;
  a.weight = gate_up ? t.gate_up : t.down;
  a.scale = gate_up ? t.gate_up_scale : t.down_scale;
  a.out = gate_up ? ws.h : ws.y;
  a.K = gate_up ? p.hidden : p.inter;
  return a;
}

// ---------------------------------------------------------------------------------------------
// Launchers (each returns a cudaError_t of the launch).
cudaError_t launch_router(const qmoe_problem& p, const void* logits, int32_t* ids, float* w, cudaStream_t s);
cudaError_t launch_dispatch(const qmoe_problem& p, const void* logits, const Workspace& ws, bool fuse_router,
                            cudaStream_t s);
// Routing and dispatch of a forward call: fills topk ids/weights, offsets, meta, the tile map and the permutation.
cudaError_t launch_routing(const qmoe_problem& p, const void* logits, const Workspace& ws, cudaStream_t s);
// with_down = false stops after the gate_up GEMM (stage timing only).
cudaError_t launch_experts_gemv(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws,
                                cudaStream_t s, bool with_down = true);
cudaError_t launch_experts_mma(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws,
                               cudaStream_t s, bool with_down = true);
// Hopper (SM 9.0, built as sm_90a) tensor-core path for 16-bit weights; needs ws.tile_m ==
// wgmma_tile_tokens(p) (64, 128, 192 or 256 tokens a tile).
bool wgmma_supported();
// Whether QMOE_PATH_AUTO / _MMA take wgmma for this problem (where it measured faster than mma.sync).
bool wgmma_preferred(const qmoe_problem& p);
int wgmma_tile_tokens(const qmoe_problem& p);
cudaError_t launch_experts_wgmma(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws,
                                 cudaStream_t s, bool with_down = true);
cudaError_t launch_combine(const qmoe_problem& p, const Workspace& ws, void* out, cudaStream_t s);
// T == 1 on the GEMV path: routing inside both kernels, combine fused into the down kernel
// (experts_token1.cu). with_down = false stops after gate_up.
cudaError_t launch_token1(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                          bool with_down = true);
// INT4 weights in groups of 128 on the tensor cores (experts_i4mma.cu; QMOE_I4_MMA=0 opts out, for
// benchmarking): the single-token kernels and the general decode kernels, in place of the GEMV path's.
bool i4mma_selected(const qmoe_problem& p);
cudaError_t launch_i4mma_token1(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                                bool with_down = true);
cudaError_t launch_i4mma_gemv(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws, cudaStream_t s,
                              bool with_down = true);

}  // namespace qmoe
