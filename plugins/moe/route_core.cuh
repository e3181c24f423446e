// Internal to the qmoe library: the router's per-token warp routine, shared by the router, the dispatch
// kernel and the single-token decode kernels (each of which routes the token itself).
#pragma once

#include "qmoe_internal.cuh"

namespace qmoe {

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Butterfly sum: every lane ends with the same bits (a + b == b + a), run after run.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Lane `lane`'s logits e = lane + 32 i of a row (-inf past E), every load issued before the first is used:
// converting each one as it arrives made one dependent round trip an element (a cold read each, measured
// in the single-token kernels' profile).
template <int N, typename L>
__device__ __forceinline__ void load_lane_logits(const L* row, int E, float (&v)[N]) {
  const int lane = threadIdx.x & 31;
  L raw[N];
#pragma unroll
  for (int i = 0; i < N; ++i) raw[i] = lane + 32 * i < E ? row[lane + 32 * i] : L();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = lane + 32 * i < E ? to_float(raw[i]) : -INFINITY;
}

// A row of logits whose dtype is known at run time (one kernel instead of three per logits dtype).
struct LogitRow {
  const void* p;
  int dtype;
};

template <int N>
__device__ __forceinline__ void load_lane_logits(LogitRow row, int E, float (&v)[N]) {
  if (row.dtype == QMOE_F32) load_lane_logits(static_cast<const float*>(row.p), E, v);
  else if (row.dtype == QMOE_F16) load_lane_logits(static_cast<const __half*>(row.p), E, v);
  else load_lane_logits(static_cast<const __nv_bfloat16*>(row.p), E, v);
}

// One warp routes one token: fp32 softmax over E logits, k rounds of warp arg-max on the logits
// (softmax is monotonic, and the logits order has no rounding ties that the probabilities lack).
// Ties go to the lower expert index. route_token_lanes leaves slot j in lane j (my_id, my_p; lanes >= k
// hold nothing); route_token writes the k slots.
// `row`: a pointer to the logits, or a LogitRow. `k`: the slots selected, normally the top-k; a caller that
// needs only the first slots' experts, not their weights, passes fewer (normalize then sums only those).
template <typename Row>
__device__ __forceinline__ void route_token_lanes(Row row, int E, int k, bool normalize, int& my_id, float& my_p) {
  constexpr int kPerLane = kMaxExperts / 32;
  const int lane = threadIdx.x & 31;
  float v[kPerLane];
  load_lane_logits(row, E, v);
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) mx = fmaxf(mx, v[i]);
  mx = warp_max(mx);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    if (lane + 32 * i < E) s += expf(v[i] - mx);
  }
  s = warp_sum(s);

  // Selection on order-preserving integer keys (-0 folded into +0): two warp reductions a round,
  // max of the key, then min of the expert index among the lanes holding that key.
  uint32_t key[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const uint32_t u = __float_as_uint(v[i] + 0.0f);
    key[i] = lane + 32 * i < E ? ((u & 0x80000000u) ? ~u : (u | 0x80000000u)) : 0u;  // 0: unavailable
  }
  my_id = 0;
  my_p = 0.0f;
  uint32_t my_key = 0;  // this lane's slot's key; its probability after the loop (off the selection chain)
  for (int j = 0; j < k; ++j) {
    uint32_t best = 0;
    int bi = 0;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (key[i] > best) {  // strict: the lowest index wins within the lane
        best = key[i];
        bi = i;
      }
    }
    const uint32_t kmax = __reduce_max_sync(0xffffffffu, best);
    const uint32_t e_sel = __reduce_min_sync(0xffffffffu, best == kmax ? uint32_t(lane + 32 * bi) : 0xffffffffu);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (uint32_t(lane + 32 * i) == e_sel) key[i] = 0u;
    }
    if (lane == j) {
      my_id = int(e_sel);
      my_key = kmax;
    }
  }
  if (lane < k) {
    const uint32_t u = (my_key & 0x80000000u) ? (my_key & 0x7fffffffu) : ~my_key;
    my_p = expf(__uint_as_float(u) - mx) / s;
  }
  if (normalize) {
    const float tot = warp_sum(lane < k ? my_p : 0.0f);
    my_p = my_p / tot;
  }
}

template <typename L>
__device__ __forceinline__ void route_token(const L* __restrict__ row, int E, int k, bool normalize,
                                            int32_t* __restrict__ ids, float* __restrict__ weights) {
  int my_id;
  float my_p;
  route_token_lanes(row, E, k, normalize, my_id, my_p);
  const int lane = threadIdx.x & 31;
  if (lane < k) {
    ids[lane] = my_id;
    weights[lane] = my_p;
  }
}

// Routing outputs of the general path (for qmoe_tensors' optional outputs), from warp-held slots: the
// single-token kernels (which route for themselves) write them from one warp.
__device__ inline void write_routing(const Workspace& ws, int E, int k, int my_id, float my_p) {
  const int lane = threadIdx.x & 31;
  int pos = 0;  // this slot's row in expert order (the k experts are distinct)
  for (int q = 0; q < k; ++q) pos += __shfl_sync(0xffffffffu, my_id, q) < my_id;
  if (lane < k) {
    ws.topk_ids[lane] = my_id;
    ws.topk_w[lane] = my_p;
    ws.perm_pair[pos] = lane;
    ws.pair_pos[lane] = pos;
    ws.active[pos] = my_id;
  }
  for (int base = 0; base <= E; base += 32) {
    const int e = base + lane;
    int below = 0;
    for (int q = 0; q < k; ++q) below += __shfl_sync(0xffffffffu, my_id, q) < e;
    if (e <= E) ws.offsets[e] = below;
  }
  if (lane == 0) {
    ws.meta[0] = k;
    ws.meta[1] = 0;
  }
}

// Arguments of the single-token kernels (experts_token1.cu, experts_i4mma.cu): weight and scale start as
// gate_up's; the down launch points them at down's.
struct Token1Args {
  const void* x;       // [1, H]
  LogitRow logits;     // [1, E]
  const void* weight;  // kernel 1: gate_up [E, 2I, H]; kernel 2: down [E, H, I]
  const void* scale;   // [E, rows] (INT8), [E, rows, K / group] (INT4) or NULL
  int scale_dtype, group_shift;
  void* h;             // [k, I]
  void* out;           // [1, H]
  Workspace ws;
  int E, k, normalize, I, H, groups;
};

// Every warp of a single-token kernel routes the token itself (a few hundred cycles, where a dispatch kernel
// costs a launch and a round trip); the expert of slot `slot`, selected in slot + 1 rounds. The first warp of
// the grid selects all k and writes the general path's routing outputs.
__device__ __forceinline__ int token1_slot_expert(const Token1Args& a, int slot) {
  const bool writer = blockIdx.x == 0 && blockIdx.y == 0 && (threadIdx.x >> 5) == 0;
  int my_id;
  float my_p;
  route_token_lanes(a.logits, a.E, writer ? a.k : slot + 1, a.normalize != 0, my_id, my_p);
  const int e = __shfl_sync(0xffffffffu, my_id, slot);
  if (writer) write_routing(a.ws, a.E, a.k, my_id, my_p);
  return e;
}

inline Token1Args token1_args(const qmoe_problem& p, const qmoe_tensors& t, const Workspace& ws) {
  Token1Args a{};
  a.x = t.x;
  a.logits = LogitRow{t.logits, p.logits_dtype};
  a.scale_dtype = p.scale_dtype;
  a.group_shift = p.group_size > 0 ? __builtin_ctz(unsigned(p.group_size)) : 0;
  a.h = ws.h;
  a.out = t.out;
  a.ws = ws;
  a.E = p.num_experts;
  a.k = p.top_k;
  a.normalize = p.normalize;
  a.I = p.inter;
  a.H = p.hidden;
  a.weight = t.gate_up;
  a.scale = t.gate_up_scale;
  return a;
}

}  // namespace qmoe
