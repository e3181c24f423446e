// Router (softmax + top-k), dispatch (counts, prefix sum, stable permutation) and weighted combine.
#include <climits>

#include "qmoe_internal.cuh"

namespace qmoe {
namespace {

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

// One warp routes one token: fp32 softmax over E logits, k rounds of warp arg-max on the logits
// (softmax is monotonic, and the logits order has no rounding ties that the probabilities lack).
// Ties go to the lower expert index. Lane j < k writes slot j.
template <typename L>
__device__ void route_token(const L* __restrict__ row, int E, int k, bool normalize, int32_t* __restrict__ ids,
                            float* __restrict__ weights) {
  constexpr int kPerLane = kMaxExperts / 32;
  const int lane = threadIdx.x & 31;
  float v[kPerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    v[i] = e < E ? to_float(row[e]) : -INFINITY;
    mx = fmaxf(mx, v[i]);
  }
  mx = warp_max(mx);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    if (lane + 32 * i < E) s += expf(v[i] - mx);
  }
  s = warp_sum(s);

  uint32_t taken = 0;
  int my_id = 0;
  float my_p = 0.0f;
  for (int j = 0; j < k; ++j) {
    float bv = -INFINITY;
    int bi = INT_MAX;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      if (e < E && !((taken >> i) & 1u) && (bi == INT_MAX || v[i] > bv)) {
        bv = v[i];
        bi = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi != INT_MAX && (bi == INT_MAX || ov > bv || (ov == bv && oi < bi))) {
        bv = ov;
        bi = oi;
      }
    }
    if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
    if (lane == j) {
      my_id = bi;
      my_p = expf(bv - mx) / s;
    }
  }
  if (normalize) {
    const float tot = warp_sum(lane < k ? my_p : 0.0f);
    my_p = my_p / tot;
  }
  if (lane < k) {
    ids[lane] = my_id;
    weights[lane] = my_p;
  }
}

template <typename L>
__global__ void __launch_bounds__(256) router_kernel(const L* __restrict__ logits, int T, int E, int k,
                                                     int normalize, int32_t* __restrict__ ids,
                                                     float* __restrict__ weights) {
  pdl_wait();
  pdl_launch_dependents();
  const int t = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (t >= T) return;
  route_token(logits + size_t(t) * E, E, k, normalize != 0, ids + size_t(t) * k, weights + size_t(t) * k);
}

// One block. Counts per expert, the exclusive prefix sum, the active-expert list, the tile map of the
// tensor-core path, and a stable permutation: within an expert, pairs keep their (token, slot) order.
template <typename L>
__global__ void __launch_bounds__(1024) dispatch_kernel(const L* __restrict__ logits, int T, int E, int k,
                                                        int normalize, int fuse_router, Workspace ws) {
  __shared__ int cnt[kMaxExperts];
  __shared__ int base[kMaxExperts];
  __shared__ int tile_start[kMaxExperts + 1];
  __shared__ int wcnt[32][kMaxExperts];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int P = T * k;
  pdl_wait();
  pdl_launch_dependents();

  if (fuse_router) {
    for (int t = warp; t < T; t += 32) {
      route_token(logits + size_t(t) * E, E, k, normalize != 0, ws.topk_ids + size_t(t) * k,
                  ws.topk_w + size_t(t) * k);
    }
  }
  for (int e = tid; e < E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();  // also publishes the fused router's global writes to the block
  for (int p = tid; p < P; p += blockDim.x) atomicAdd(&cnt[ws.topk_ids[p]], 1);  // integer: exact
  __syncthreads();
  if (tid == 0) {
    int off = 0, na = 0, tiles = 0;
    for (int e = 0; e < E; ++e) {
      const int c = cnt[e];
      ws.offsets[e] = off;
      base[e] = off;
      tile_start[e] = tiles;
      if (c > 0) {
        ws.active[na++] = e;
        tiles += (c + kMmaBlockM - 1) / kMmaBlockM;
      }
      off += c;
    }
    ws.offsets[E] = off;
    tile_start[E] = tiles;
    ws.meta[0] = na;
    ws.meta[1] = tiles;
  }
  __syncthreads();
  for (int e = tid; e < E; e += blockDim.x) {
    const int first = tile_start[e], n = tile_start[e + 1] - first;
    for (int m = 0; m < n; ++m) {
      int4 entry = make_int4(e, base[e] + m * kMmaBlockM, first, n);
      reinterpret_cast<int4*>(ws.tile_map)[first + m] = entry;
    }
  }
  for (int c0 = 0; c0 < P; c0 += blockDim.x) {
    for (int i = tid; i < 32 * E; i += blockDim.x) wcnt[i / E][i % E] = 0;
    __syncthreads();
    const int p = c0 + tid;
    const int e = p < P ? ws.topk_ids[p] : -1;
    const uint32_t same = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(same & ((1u << lane) - 1u));
    if (p < P && rank == 0) wcnt[warp][e] = __popc(same);
    __syncthreads();
    for (int x = tid; x < E; x += blockDim.x) {
      int run = base[x];
      for (int w = 0; w < 32; ++w) {
        const int c = wcnt[w][x];
        wcnt[w][x] = run;
        run += c;
      }
      base[x] = run;
    }
    __syncthreads();
    if (p < P) {
      const int pos = wcnt[warp][e] + rank;
      ws.perm_pair[pos] = p;
      ws.pair_pos[p] = pos;
    }
    __syncthreads();
  }
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

cudaError_t launch_router(const qmoe_problem& p, const void* logits, int32_t* ids, float* w, cudaStream_t s) {
  const dim3 grid((p.num_tokens + 7) / 8);
  switch (p.logits_dtype) {
    case QMOE_F32:
      return launch(router_kernel<float>, grid, dim3(256), 0, s, static_cast<const float*>(logits), p.num_tokens, p.num_experts,
                                                p.top_k, p.normalize, ids, w);
    case QMOE_F16:
      return launch(router_kernel<__half>, grid, dim3(256), 0, s, static_cast<const __half*>(logits), p.num_tokens,
                                                 p.num_experts, p.top_k, p.normalize, ids, w);
    default:
      return launch(router_kernel<__nv_bfloat16>, grid, dim3(256), 0, s, static_cast<const __nv_bfloat16*>(logits), p.num_tokens,
                                                        p.num_experts, p.top_k, p.normalize, ids, w);
  }
  return cudaGetLastError();
}

cudaError_t launch_dispatch(const qmoe_problem& p, const void* logits, const Workspace& ws, bool fuse_router,
                            cudaStream_t s) {
  const int f = fuse_router ? 1 : 0;
  switch (p.logits_dtype) {
    case QMOE_F32:
      return launch(dispatch_kernel<float>, dim3(1), dim3(1024), 0, s, static_cast<const float*>(logits), p.num_tokens, p.num_experts,
                                                p.top_k, p.normalize, f, ws);
    case QMOE_F16:
      return launch(dispatch_kernel<__half>, dim3(1), dim3(1024), 0, s, static_cast<const __half*>(logits), p.num_tokens,
                                                 p.num_experts, p.top_k, p.normalize, f, ws);
    default:
      return launch(dispatch_kernel<__nv_bfloat16>, dim3(1), dim3(1024), 0, s, static_cast<const __nv_bfloat16*>(logits), p.num_tokens,
                                                        p.num_experts, p.top_k, p.normalize, f, ws);
  }
  return cudaGetLastError();
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
