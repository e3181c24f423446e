// Streaming probes for bench_stream_floor.py: one kernel pass that reads (or copies) a buffer from HBM, with
// the knobs that decide how many bytes are in flight. Not part of libqmoe: it measures what any kernel can
// do with a decode call's byte count (75 MB at the Qwen3-30B-A3B layer), the floor the MoE kernels sit on.
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace {

// 256 threads a block (the driver's THREADS). Without a minimum-blocks bound ptxas (CUDA 13.0) kept these at 32
// registers by interleaving each load with the use of an earlier one, so ~4 loads were in flight whatever
// kInFlight said; with it, all kInFlight loads issue before the first use (checked in the SASS; 78-80
// registers at 16, so at most 3 such blocks fit an SM and larger grids run in waves).
constexpr int kThreads = 256;

__device__ __forceinline__ unsigned fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// Grid-strided pass: load u of thread t reads 16-byte word t + u * (all threads), so each load instruction of
// the grid covers one contiguous span; `use(i, word)` runs once all kInFlight loads of the round are issued.
template <int kInFlight, class Use>
__device__ __forceinline__ void grid_pass(const uint4* __restrict__ src, size_t n16, Use use) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + (kInFlight - 1) * stride < n16; i += kInFlight * stride) {
    uint4 v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) v[u] = __ldg(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) use(i + u * stride, v[u]);
  }
  for (; i < n16; i += stride) use(i, __ldg(src + i));
}

// layout 0 ("grid"): grid_pass. layout 1 ("warp"): a warp task is kInFlight * 512 contiguous bytes (a GEMV
// warp's rows), tasks grid-strided over warps; the words after the last whole task grid-strided.
template <int kInFlight, int kLayout>
__global__ void __launch_bounds__(kThreads, 1)
    read_stream(const uint4* __restrict__ src, size_t n16, unsigned* __restrict__ sink) {
  unsigned acc = 0;
  const auto xor_in = [&](size_t, uint4 v) { acc ^= fold(v); };
  if (kLayout == 0) {
    grid_pass<kInFlight>(src, n16, xor_in);
  } else {
    const int lane = threadIdx.x & 31;
    const size_t warps = size_t(gridDim.x) * (blockDim.x / 32);
    const size_t task_words = size_t(kInFlight) * 32;
    const size_t tasks = n16 / task_words;
    for (size_t t = size_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; t < tasks; t += warps) {
      const uint4* base = src + t * task_words + lane;
      uint4 v[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) v[u] = __ldg(base + u * 32);
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) acc ^= fold(v[u]);
    }
    const size_t done = tasks * task_words;
    grid_pass<1>(src + done, n16 - done, xor_in);
  }
  // A data-dependent store the compiler cannot drop, so every load stays live; almost never taken.
  if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;
}

template <int kInFlight>
__global__ void __launch_bounds__(kThreads, 1)
    copy_stream(const uint4* __restrict__ src, uint4* __restrict__ dst, size_t n16) {
  grid_pass<kInFlight>(src, n16, [&](size_t i, uint4 v) { dst[i] = v; });
}

template <int kInFlight>
cudaError_t launch_read(int layout, const void* src, size_t n16, void* sink, int blocks, int threads,
                        cudaStream_t s) {
  if (threads != kThreads) return cudaErrorInvalidValue;
  const auto* in = static_cast<const uint4*>(src);
  auto* out = static_cast<unsigned*>(sink);
  if (layout == 0) read_stream<kInFlight, 0><<<blocks, threads, 0, s>>>(in, n16, out);
  else read_stream<kInFlight, 1><<<blocks, threads, 0, s>>>(in, n16, out);
  return cudaGetLastError();
}

}  // namespace

// Reads `bytes` (a multiple of 16, 16-byte aligned) once; threads must be kThreads. layout: 0 grid, 1 warp;
// in_flight: 16-byte loads a thread issues before using any (2, 4, 8 or 16); sink: `blocks` unsigned words.
// Returns a cudaError_t.
extern "C" int probe_read(const void* src, size_t bytes, void* sink, int layout, int in_flight, int blocks,
                          int threads, cudaStream_t s) {
  const size_t n16 = bytes / 16;
  switch (in_flight) {
    case 2: return launch_read<2>(layout, src, n16, sink, blocks, threads, s);
    case 4: return launch_read<4>(layout, src, n16, sink, blocks, threads, s);
    case 8: return launch_read<8>(layout, src, n16, sink, blocks, threads, s);
    case 16: return launch_read<16>(layout, src, n16, sink, blocks, threads, s);
    default: return int(cudaErrorInvalidValue);
  }
}

// Copies `bytes` from src to dst (both 16-byte aligned), in_flight loads a thread before its stores.
extern "C" int probe_copy(const void* src, void* dst, size_t bytes, int in_flight, int blocks, int threads,
                          cudaStream_t s) {
  const size_t n16 = bytes / 16;
  if (threads != kThreads) return int(cudaErrorInvalidValue);
  const auto* in = static_cast<const uint4*>(src);
  auto* out = static_cast<uint4*>(dst);
  switch (in_flight) {
    case 4: copy_stream<4><<<blocks, threads, 0, s>>>(in, out, n16); break;
    case 8: copy_stream<8><<<blocks, threads, 0, s>>>(in, out, n16); break;
    default: return int(cudaErrorInvalidValue);
  }
  return int(cudaGetLastError());
}
