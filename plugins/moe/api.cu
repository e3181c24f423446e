// The C ABI of qmoe.h: argument checks, workspace layout, and the launch sequence.
#include "qmoe_internal.cuh"

using qmoe::Workspace;

#include <cstdlib>

namespace qmoe {

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::atoi(v) : fallback;
}

int device_sm() {
  static const int sm = [] {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return 0;
    return 10 * major + minor;
  }();
  return sm;
}

bool pdl_enabled() { return env_int("QMOE_PDL", 1) != 0 && device_sm() >= 90; }

}  // namespace qmoe

namespace {

int cuda_status(cudaError_t e) { return e == cudaSuccess ? QMOE_OK : QMOE_ERR_CUDA + int(e); }

bool is_act(int d) { return d == QMOE_F16 || d == QMOE_BF16; }

// The concrete expert kernel: GEMV at or below 4 pairs an expert (weights streamed once beat the tensor
// cores there), else wgmma on SM 9.0 where it measured faster (about 96 or more tokens an expert), else
// mma.sync. INT4 weights follow the same rule (measured on the H200 at T = 1, 4, 16, 512 and 2048: the GEMV
// path's tensor-core decode kernels for groups of 128, mma.sync at T=512, wgmma at T=2048). INT8 never runs on
// wgmma. QMOE_WGMMA=0/1 (benchmarking) overrides the measured rule.
int resolve_path(const qmoe_problem& p) {
  const bool wgmma_ok = p.weight_dtype != QMOE_I8 && qmoe::wgmma_supported();
  switch (p.path) {
    case QMOE_PATH_GEMV:
    case QMOE_PATH_MMA_SYNC:
      return p.path;
    case QMOE_PATH_WGMMA:
      return wgmma_ok ? QMOE_PATH_WGMMA : -QMOE_ERR_UNSUPPORTED;
    default:
      break;
  }
  const long long pairs = (long long)p.num_tokens * p.top_k;
  if (p.path == QMOE_PATH_AUTO && pairs <= 4LL * p.num_experts) return QMOE_PATH_GEMV;
  const int knob = qmoe::env_int("QMOE_WGMMA", -1);  // benchmarking: 0 never, 1 always, unset: measured rule
  const bool want = knob < 0 ? qmoe::wgmma_preferred(p) : knob != 0;
  return wgmma_ok && want ? QMOE_PATH_WGMMA : QMOE_PATH_MMA_SYNC;
}

}  // namespace

extern "C" {

int qmoe_abi_version(void) { return QMOE_ABI_VERSION; }

const char* qmoe_error_string(int status) {
  switch (status) {
    case QMOE_OK:
      return "ok";
    case QMOE_ERR_INVALID_ARG:
      return "invalid argument (NULL pointer, unknown dtype or non-positive size)";
    case QMOE_ERR_UNSUPPORTED:
      return "unsupported shape or path: need 1 <= E <= 256, 1 <= top_k <= min(E, 32), hidden % 128 == 0, "
             "inter % 64 == 0; INT4 weights: group_size 32, 64 or 128 dividing hidden and inter; wgmma: SM 9.0 "
             "and 16-bit or INT4 weights";
    case QMOE_ERR_WORKSPACE:
      return "workspace is NULL or smaller than qmoe_workspace_size()";
    default:
      if (status >= QMOE_ERR_CUDA) return cudaGetErrorString(cudaError_t(status - QMOE_ERR_CUDA));
      return "unknown qmoe status";
  }
}

int qmoe_check_problem(const qmoe_problem* p) {
  if (!p) return QMOE_ERR_INVALID_ARG;
  if (p->num_tokens < 1 || p->num_experts < 1 || p->top_k < 1 || p->hidden < 1 || p->inter < 1)
    return QMOE_ERR_INVALID_ARG;
  if (!is_act(p->act_dtype)) return QMOE_ERR_INVALID_ARG;
  const bool quantized = p->weight_dtype == QMOE_I8 || p->weight_dtype == QMOE_I4;
  if (p->weight_dtype != p->act_dtype && !quantized) return QMOE_ERR_INVALID_ARG;
  if (quantized && p->scale_dtype != QMOE_F32 && p->scale_dtype != QMOE_F16) return QMOE_ERR_INVALID_ARG;
  if (p->group_size < 0) return QMOE_ERR_INVALID_ARG;
  if (p->logits_dtype != QMOE_F32 && !is_act(p->logits_dtype)) return QMOE_ERR_INVALID_ARG;
  if (p->path < QMOE_PATH_AUTO || p->path > QMOE_PATH_WGMMA) return QMOE_ERR_INVALID_ARG;
  if (p->num_experts > qmoe::kMaxExperts || p->top_k > p->num_experts || p->top_k > qmoe::kMaxTopK)
    return QMOE_ERR_UNSUPPORTED;
  if (p->hidden % 128 != 0 || p->inter % 64 != 0) return QMOE_ERR_UNSUPPORTED;
  // Per-group scales: INT4 only (groups of 32, 64 or 128 input channels, whole groups in every row).
  const int g = p->group_size;
  if ((p->weight_dtype == QMOE_I4) != (g != 0)) return QMOE_ERR_UNSUPPORTED;
  if (g != 0 && ((g != 32 && g != 64 && g != 128) || p->hidden % g != 0 || p->inter % g != 0))
    return QMOE_ERR_UNSUPPORTED;
  if ((long long)p->num_tokens * p->top_k > (1LL << 30)) return QMOE_ERR_UNSUPPORTED;
  return QMOE_OK;
}

int qmoe_workspace_size(const qmoe_problem* p, size_t* bytes) {
  const int st = qmoe_check_problem(p);
  if (st != QMOE_OK) return st;
  if (!bytes) return QMOE_ERR_INVALID_ARG;
  *bytes = qmoe::layout_workspace(*p, nullptr).bytes;
  return QMOE_OK;
}

int qmoe_route(const qmoe_problem* p, const void* logits, int32_t* topk_ids, float* topk_weights, void* stream) {
  const int st = qmoe_check_problem(p);
  if (st != QMOE_OK) return st;
  if (!logits || !topk_ids || !topk_weights) return QMOE_ERR_INVALID_ARG;
  return cuda_status(qmoe::launch_router(*p, logits, topk_ids, topk_weights, static_cast<cudaStream_t>(stream)));
}

int qmoe_resolve_path(const qmoe_problem* p) {
  const int st = qmoe_check_problem(p);
  return st != QMOE_OK ? -st : resolve_path(*p);
}

int qmoe_forward(const qmoe_problem* p, const qmoe_tensors* t, void* stream) {
  int st = qmoe_check_problem(p);
  if (st != QMOE_OK) return st;
  const int path = resolve_path(*p);
  if (path < 0) return -path;
  if (!t || !t->x || !t->logits || !t->gate_up || !t->down || !t->out) return QMOE_ERR_INVALID_ARG;
  const bool quantized = p->weight_dtype == QMOE_I8 || p->weight_dtype == QMOE_I4;
  if (quantized && (!t->gate_up_scale || !t->down_scale)) return QMOE_ERR_INVALID_ARG;
  size_t need = 0;
  qmoe_workspace_size(p, &need);
  if (!t->workspace || t->workspace_bytes < need || (reinterpret_cast<uintptr_t>(t->workspace) & 255))
    return QMOE_ERR_WORKSPACE;

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  Workspace ws = qmoe::layout_workspace(*p, t->workspace);
  const bool gemv = path == QMOE_PATH_GEMV;
  ws.tile_m = path == QMOE_PATH_WGMMA ? qmoe::wgmma_tile_tokens(*p) : qmoe::kMmaBlockM;
  // QMOE_STAGES=n runs only the first n stages (1 routing, 2 + gate_up, 3 + down, 4 + combine): for
  // timing stages by difference. The output is incomplete below 4.
  const int stages = qmoe::env_int("QMOE_STAGES", 4);
  qmoe_tensors tt = *t;
  if (!quantized) {
    tt.gate_up_scale = nullptr;
    tt.down_scale = nullptr;
  }
  cudaError_t err = cudaSuccess;
  // One token (batch-1 decode): two kernels that route for themselves (QMOE_TOKEN1=0: the general path).
  const bool token1 = gemv && p->num_tokens == 1 && qmoe::env_int("QMOE_TOKEN1", 1) != 0;
  const bool i4mma = gemv && qmoe::i4mma_selected(*p);
  if (token1) {
    if (stages >= 2) {
      const bool down = stages >= 3;
      err = i4mma ? qmoe::launch_i4mma_token1(*p, tt, ws, s, down) : qmoe::launch_token1(*p, tt, ws, s, down);
    }
  } else {
    err = qmoe::launch_routing(*p, t->logits, ws, s);
    if (err == cudaSuccess && stages >= 2) {
      if (i4mma) err = qmoe::launch_i4mma_gemv(*p, tt, ws, s, stages >= 3);
      else if (gemv) err = qmoe::launch_experts_gemv(*p, tt, ws, s, stages >= 3);
      else if (path == QMOE_PATH_WGMMA) err = qmoe::launch_experts_wgmma(*p, tt, ws, s, stages >= 3);
      else err = qmoe::launch_experts_mma(*p, tt, ws, s, stages >= 3);
    }
    if (err == cudaSuccess && stages >= 4) err = qmoe::launch_combine(*p, ws, t->out, s);
  }

  const size_t P = size_t(p->num_tokens) * p->top_k;
  auto copy_out = [&](void* dst, const void* src, size_t n) {
    if (err == cudaSuccess && dst) err = cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, s);
  };
  copy_out(t->topk_ids, ws.topk_ids, P * 4);
  copy_out(t->topk_weights, ws.topk_w, P * 4);
  copy_out(t->expert_offsets, ws.offsets, size_t(p->num_experts + 1) * 4);
  copy_out(t->permuted_pairs, ws.perm_pair, P * 4);
  return cuda_status(err);
}

}  // extern "C"
