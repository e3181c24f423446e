// Router (softmax + top-k), dispatch (counts, prefix sum, stable permutation) and weighted combine.
#include <type_traits>

#include "qmoe_internal.cuh"
#include "route_core.cuh"

namespace qmoe {
namespace {

constexpr int kTokPerBlock = 8;  // router blocks: 256 threads, one warp a token

template <typename L>
__global__ void __launch_bounds__(256) router_kernel(const L* __restrict__ logits, int T, int E, int k,
                                                     int normalize, int32_t* __restrict__ ids,
                                                     float* __restrict__ weights) {
  pdl_wait();
  pdl_launch_dependents();
  const int t = blockIdx.x * kTokPerBlock + (threadIdx.x >> 5);
  if (t >= T) return;
  route_token(logits + size_t(t) * E, E, k, normalize != 0, ids + size_t(t) * k, weights + size_t(t) * k);
}

// Across experts, by one warp (8 consecutive experts a lane): offs[e] holds expert e's count on entry and its
// first permuted row on return (offs[E]: the total); tile_start[e] the expert's first tile of ws.tile_m rows.
// Publishes offsets, the active-expert list and meta (active experts, tiles).
__device__ __forceinline__ void scan_experts(const Workspace& ws, int E, int* offs, int* tile_start) {
  const int lane = threadIdx.x & 31;
  constexpr int kPer = kMaxExperts / 32;
  int c[kPer], sum_c = 0, sum_t = 0, sum_a = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = lane * kPer + i;
    c[i] = e < E ? offs[e] : 0;
    sum_c += c[i];
    sum_t += (c[i] + ws.tile_m - 1) / ws.tile_m;
    sum_a += c[i] > 0;
  }
  int ic = sum_c, it = sum_t, ia = sum_a;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int vc = __shfl_up_sync(0xffffffffu, ic, o), vt = __shfl_up_sync(0xffffffffu, it, o);
    const int va = __shfl_up_sync(0xffffffffu, ia, o);
    if (lane >= o) {
      ic += vc;
      it += vt;
      ia += va;
    }
  }
  int run_c = ic - sum_c, run_t = it - sum_t, run_a = ia - sum_a;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = lane * kPer + i;
    if (e < E) {
      offs[e] = run_c;
      tile_start[e] = run_t;
      ws.offsets[e] = run_c;
      if (c[i] > 0) ws.active[run_a++] = e;
    }
    run_c += c[i];
    run_t += (c[i] + ws.tile_m - 1) / ws.tile_m;
  }
  if (lane == 31) {
    offs[E] = run_c;
    tile_start[E] = run_t;
    ws.offsets[E] = run_c;
    ws.meta[0] = ia;
    ws.meta[1] = run_t;
  }
}

// The tensor-core paths' tile map from the expert offsets and tile starts, by the whole block.
__device__ __forceinline__ void write_tile_map(const Workspace& ws, int E, const int* offs, const int* tile_start) {
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int first = tile_start[e], n = tile_start[e + 1] - first;
    for (int m = 0; m < n; ++m) {
      reinterpret_cast<int4*>(ws.tile_map)[first + m] = make_int4(e, offs[e] + m * ws.tile_m, first, n);
    }
  }
}

// One block of NW warps. Counts per expert, the exclusive prefix sum, the active-expert list, the tile
// map of the tensor-core path (ws.tile_m rows a tile), and a stable permutation: within an expert, pairs
// keep their (token, slot) order. Warp w owns a contiguous segment of the pairs: pass 1 counts its
// segment per expert (match_any groups, no atomics), a scan over (expert, warp) gives every warp its
// starting row in every expert, pass 2 places the segment's pairs.
template <typename L, int NW>
__global__ void __launch_bounds__(NW * 32) dispatch_kernel(const L* __restrict__ logits, int T, int E, int k,
                                                           int normalize, int fuse_router, Workspace ws) {
  static_assert(NW >= 1 && NW <= 32, "one scan lane per warp");
  __shared__ int wcnt[NW][kMaxExperts + 1];  // pass 1: counts; then starting rows (+1: no bank conflicts)
  __shared__ int offs[kMaxExperts + 1];
  __shared__ int tile_start[kMaxExperts + 1];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int P = T * k;
  pdl_wait();
  pdl_launch_dependents();

  if (fuse_router) {
    for (int t = warp; t < T; t += NW) {
      route_token(logits + size_t(t) * E, E, k, normalize != 0, ws.topk_ids + size_t(t) * k,
                  ws.topk_w + size_t(t) * k);
    }
    __syncthreads();  // publishes the router's global writes to the block
  }
  const int seg = (P + NW - 1) / NW, p_begin = min(P, warp * seg), p_end = min(P, p_begin + seg);

  // Pass 1: this warp's per-expert counts (its own row of wcnt: no other warp writes it).
  for (int e = lane; e < E; e += 32) wcnt[warp][e] = 0;
  __syncwarp();
  constexpr int kBatch = 4;  // independent id loads in flight per lane
  for (int b = p_begin; b < p_end; b += 32 * kBatch) {
    int ev[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int p = b + 32 * u + lane;
      ev[u] = p < p_end ? ws.topk_ids[p] : -1;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = ev[u];
      const uint32_t same = __match_any_sync(0xffffffffu, e);
      if (e >= 0 && lane == __ffs(same) - 1) wcnt[warp][e] += __popc(same);
      __syncwarp();
    }
  }
  __syncthreads();

  // Per expert: exclusive scan over the NW warps (lane = warp index); the total is the expert's count.
  for (int e = warp; e < E; e += NW) {
    const int c = lane < NW ? wcnt[lane][e] : 0;
    int incl = c;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    if (lane < NW) wcnt[lane][e] = incl - c;
    if (lane == 31) offs[e] = incl;  // count for now; turned into an offset below
  }
  __syncthreads();

  if (warp == 0) scan_experts(ws, E, offs, tile_start);
  __syncthreads();
  write_tile_map(ws, E, offs, tile_start);
  __syncthreads();

  // Pass 2: place this warp's pairs; wcnt[warp][e] runs from the warp's first row in expert e.
  for (int b = p_begin; b < p_end; b += 32 * kBatch) {
    int ev[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int p = b + 32 * u + lane;
      ev[u] = p < p_end ? ws.topk_ids[p] : -1;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int p = b + 32 * u + lane, e = ev[u];
      const uint32_t same = __match_any_sync(0xffffffffu, e);
      if (e >= 0) {
        const int pos = offs[e] + wcnt[warp][e] + __popc(same & ((1u << lane) - 1u));
        ws.perm_pair[pos] = p;
        ws.pair_pos[p] = pos;
      }
      __syncwarp();
      if (e >= 0 && lane == __ffs(same) - 1) wcnt[warp][e] += __popc(same);
      __syncwarp();
    }
  }
}

// Dispatch for many tokens in three grid-wide steps instead of one block (the single block measured ~38 us at
// T=2048: NOTES.md, run 15). Router blocks own kTokPerBlock tokens each, so a block's pairs are a contiguous
// range, and the permutation stays stable (pair order within an expert) by construction:
//   1. route_count: route the block's tokens, count its pairs per expert -> counts[e * NB + b];
//   2. scan (one block): per expert, the exclusive scan over blocks (in place), then the expert offsets and
//      the tile map;
//   3. place: a pair's row = its expert's offset + its block's start in the expert + its rank in the block.

template <typename L>
__global__ void __launch_bounds__(256) route_count_kernel(const L* __restrict__ logits, int T, int E, int k,
                                                          int normalize, Workspace ws) {
  __shared__ int cnt[kMaxExperts];
  pdl_wait();
  pdl_launch_dependents();
  const int NB = gridDim.x, b = blockIdx.x, t = b * kTokPerBlock + (threadIdx.x >> 5);
  for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
  if (t < T) {
    route_token(logits + size_t(t) * E, E, k, normalize != 0, ws.topk_ids + size_t(t) * k,
                ws.topk_w + size_t(t) * k);
  }
  __syncthreads();  // the block's ids are written (global writes are visible within the block after this)
  const int p0 = b * kTokPerBlock * k, p1 = min(T * k, p0 + kTokPerBlock * k);
  for (int p = p0 + threadIdx.x; p < p1; p += blockDim.x) atomicAdd(&cnt[ws.topk_ids[p]], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) ws.block_counts[size_t(e) * NB + b] = cnt[e];
}

__global__ void __launch_bounds__(1024) dispatch_scan_kernel(int E, int NB, Workspace ws) {
  __shared__ int offs[kMaxExperts + 1];
  __shared__ int tile_start[kMaxExperts + 1];
  pdl_wait();
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  // Per expert, the exclusive scan over the router blocks, in place, 8 chunks of 32 blocks a pass: the 8
  // coalesced loads and the 8 warp scans are independent of each other (one memory latency a pass).
  constexpr int kChunks = 8;
  for (int e = warp; e < E; e += nw) {
    int* row = ws.block_counts + size_t(e) * NB;
    int run = 0;
    for (int c0 = 0; c0 < NB; c0 += 32 * kChunks) {
      int v[kChunks], incl[kChunks];
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        const int b = c0 + 32 * u + lane;
        v[u] = b < NB ? row[b] : 0;
        incl[u] = v[u];
      }
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
#pragma unroll
        for (int u = 0; u < kChunks; ++u) {
          const int t = __shfl_up_sync(0xffffffffu, incl[u], o);
          if (lane >= o) incl[u] += t;
        }
      }
#pragma unroll
      for (int u = 0; u < kChunks; ++u) {
        const int b = c0 + 32 * u + lane;
        if (b < NB) row[b] = run + incl[u] - v[u];
        run += __shfl_sync(0xffffffffu, incl[u], 31);
      }
    }
    if (lane == 0) offs[e] = run;
  }
  __syncthreads();
  if (warp == 0) scan_experts(ws, E, offs, tile_start);
  __syncthreads();
  write_tile_map(ws, E, offs, tile_start);
}

__global__ void __launch_bounds__(256) place_kernel(int T, int k, Workspace ws) {
  __shared__ int ids[kTokPerBlock * kMaxTopK];
  pdl_wait();
  pdl_launch_dependents();
  const int NB = gridDim.x, b = blockIdx.x, i = threadIdx.x;
  const int p0 = b * kTokPerBlock * k, n = min(T * k, p0 + kTokPerBlock * k) - p0;
  if (i < n) ids[i] = ws.topk_ids[p0 + i];
  __syncthreads();
  if (i >= n) return;
  const int e = ids[i];
  int rank = 0;  // earlier pairs of this block in the same expert
  for (int j = 0; j < i; ++j) rank += ids[j] == e;
  const int pos = ws.offsets[e] + ws.block_counts[size_t(e) * NB + b] + rank;
  ws.perm_pair[pos] = p0 + i;
  ws.pair_pos[p0 + i] = pos;
}

// out[t] = sum_j w[t,j] * y[pos(t,j)], j in slot order, fp32 accumulation. 8 elements a thread.
template <typename T>
__global__ void __launch_bounds__(256) combine_kernel(const T* __restrict__ y, const int32_t* __restrict__ pair_pos,
                                                      const float* __restrict__ topk_w, int H, int k,
                                                      T* __restrict__ out) {
  pdl_wait();
  const int t = blockIdx.x;
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
  if (c >= H) return;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int j = 0; j < k; ++j) {
    const size_t pr = size_t(t) * k + j;
    const float w = topk_w[pr];
    const uint4 v = *reinterpret_cast<const uint4*>(y + size_t(pair_pos[pr]) * H + c);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = unpack2<T>(words[i]);
      acc[2 * i] = fmaf(w, f.x, acc[2 * i]);
      acc[2 * i + 1] = fmaf(w, f.y, acc[2 * i + 1]);
    }
  }
  uint4 o;
  o.x = pack2<T>(acc[0], acc[1]);
  o.y = pack2<T>(acc[2], acc[3]);
  o.z = pack2<T>(acc[4], acc[5]);
  o.w = pack2<T>(acc[6], acc[7]);
  *reinterpret_cast<uint4*>(out + size_t(t) * H + c) = o;
}

}  // namespace

namespace {
// Calls f(logits) with the router logits typed by the problem's logits dtype: one place that turns the dtype
// code into the kernels' template argument.
template <typename F>
cudaError_t with_logits(const qmoe_problem& p, const void* logits, F&& f) {
  switch (p.logits_dtype) {
    case QMOE_F32:
      return f(static_cast<const float*>(logits));
    case QMOE_F16:
      return f(static_cast<const __half*>(logits));
    default:
      return f(static_cast<const __nv_bfloat16*>(logits));
  }
}
}  // namespace

cudaError_t launch_router(const qmoe_problem& p, const void* logits, int32_t* ids, float* w, cudaStream_t s) {
  return with_logits(p, logits, [&](auto typed) {
    using L = std::remove_cv_t<std::remove_pointer_t<decltype(typed)>>;
    return launch(router_kernel<L>, dim3(routing_blocks(p)), dim3(256), 0, s, typed, p.num_tokens, p.num_experts,
                  p.top_k, p.normalize, ids, w);
  });
}

cudaError_t launch_dispatch(const qmoe_problem& p, const void* logits, const Workspace& ws, bool fuse_router,
                            cudaStream_t s) {
  // 32 warps: measured faster than 8 at every T on the H200 (NOTES.md, run 5).
  constexpr int kWarps = 32;
  return with_logits(p, logits, [&](auto typed) {
    using L = std::remove_cv_t<std::remove_pointer_t<decltype(typed)>>;
    return launch(dispatch_kernel<L, kWarps>, dim3(1), dim3(kWarps * 32), 0, s, typed, p.num_tokens, p.num_experts,
                  p.top_k, p.normalize, fuse_router ? 1 : 0, ws);
  });
}

int routing_blocks(const qmoe_problem& p) { return (p.num_tokens + kTokPerBlock - 1) / kTokPerBlock; }

cudaError_t launch_routing(const qmoe_problem& p, const void* logits, const Workspace& ws, cudaStream_t s) {
  // Few tokens: one block routes and dispatches (one launch). Many: the three grid-wide steps, unless
  // QMOE_DISPATCH=1 (benchmarking) asks for the router kernel + the single-block dispatch.
  if (p.num_tokens <= env_int("QMOE_FUSED_ROUTER_MAX", kFusedRouterMaxTokens)) return launch_dispatch(p, logits, ws, true, s);
  if (env_int("QMOE_DISPATCH", 3) == 1) {
    const cudaError_t err = launch_router(p, logits, ws.topk_ids, ws.topk_w, s);
    return err != cudaSuccess ? err : launch_dispatch(p, logits, ws, false, s);
  }
  const int NB = routing_blocks(p);
  cudaError_t err = with_logits(p, logits, [&](auto typed) {
    using L = std::remove_cv_t<std::remove_pointer_t<decltype(typed)>>;
    return launch(route_count_kernel<L>, dim3(NB), dim3(256), 0, s, typed, p.num_tokens, p.num_experts, p.top_k,
                  p.normalize, ws);
  });
  if (err == cudaSuccess) err = launch(dispatch_scan_kernel, dim3(1), dim3(1024), 0, s, p.num_experts, NB, ws);
  if (err == cudaSuccess) err = launch(place_kernel, dim3(NB), dim3(256), 0, s, p.num_tokens, p.top_k, ws);
  return err;
}

cudaError_t launch_combine(const qmoe_problem& p, const Workspace& ws, void* out, cudaStream_t s) {
  const dim3 grid(p.num_tokens, (p.hidden / 8 + 255) / 256);
  if (p.act_dtype == QMOE_F16) {
    return launch(combine_kernel<__half>, grid, dim3(256), 0, s, static_cast<const __half*>(ws.y), ws.pair_pos, ws.topk_w,
                                                p.hidden, p.top_k, static_cast<__half*>(out));
  } else {
    return launch(combine_kernel<__nv_bfloat16>, grid, dim3(256), 0, s, static_cast<const __nv_bfloat16*>(ws.y), ws.pair_pos,
                                                       ws.topk_w, p.hidden, p.top_k,
                                                       static_cast<__nv_bfloat16*>(out));
  }
  return cudaGetLastError();
}

}  // namespace qmoe
