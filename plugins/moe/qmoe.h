/*
 * qmoe: Qwen3 Mixture-of-Experts block as plain CUDA kernels behind a C ABI.
 *
 *   out[t] = sum_{j<k} w[t,j] * down_e( silu(gate_e(x[t])) * up_e(x[t]) ),   e = ids[t,j]
 *   (ids, w) = topk(softmax(logits[t]) in fp32), renormalised over the k picks when `normalize`.
 *
 * Layouts (row-major, transformers-5 fused Qwen3 experts):
 *   x        [T, H]        act dtype (F16 or BF16)
 *   logits   [T, E]        F32, F16 or BF16 (the router Linear's output; softmax is done in fp32)
 *   gate_up  [E, 2*I, H]   rows 0..I-1 gate_proj, rows I..2I-1 up_proj; act dtype, I8 or I4
 *   down     [E, H, I]     act dtype, I8 or I4
 *   I8: gate_up_scale [E, 2*I], down_scale [E, H]   per output channel, F32 or F16
 *   I4: two signed 4-bit values a byte, low nibble first, along the input axis (ONNX INT4 packing):
 *       gate_up [E, 2*I, H/2] bytes, down [E, H, I/2] bytes; per group of G = group_size input channels
 *       gate_up_scale [E, 2*I, H/G], down_scale [E, H, I/G], F32 or F16 (w = q * scale, zero point 0)
 *   out      [T, H]        act dtype; every element is written
 *
 * Tie-breaking: among equal logits the lower expert index is picked first (the choice torch.topk makes
 * on CUDA for the selected set). Results are bitwise deterministic: no floating-point atomics.
 * Every entry point is asynchronous on `stream` (a cudaStream_t, NULL = legacy default stream) and
 * returns QMOE_OK or an error code; qmoe_error_string() names it.
 */
#ifndef QMOE_H_
#define QMOE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QMOE_ABI_VERSION 2 /* 2: QMOE_I4 weights and qmoe_problem.group_size */

/* The library is built with hidden visibility; only these entry points are exported. */
#if defined(_WIN32)
#define QMOE_API __declspec(dllexport)
#else
#define QMOE_API __attribute__((visibility("default")))
#endif

enum qmoe_dtype { QMOE_F32 = 0, QMOE_F16 = 1, QMOE_BF16 = 2, QMOE_I8 = 3, QMOE_I4 = 4 };

/* Expert-compute path: AUTO picks GEMV (memory-bound, few tokens per expert) or MMA (tensor cores).
   MMA is WGMMA on SM 9.0 for 16-bit and INT4 weights where it measured faster, MMA_SYNC otherwise; MMA_SYNC
   and WGMMA force one kernel (WGMMA: QMOE_ERR_UNSUPPORTED off SM 9.0 or with INT8 weights).
   qmoe_resolve_path names the one that runs. */
enum qmoe_path {
  QMOE_PATH_AUTO = 0,
  QMOE_PATH_GEMV = 1,
  QMOE_PATH_MMA = 2,
  QMOE_PATH_MMA_SYNC = 3, /* mma.sync grouped GEMM, every architecture */
  QMOE_PATH_WGMMA = 4     /* Hopper wgmma grouped GEMM (built as sm_90a) */
};

enum qmoe_status {
  QMOE_OK = 0,
  QMOE_ERR_INVALID_ARG = 1,      /* NULL pointer, bad dtype, non-positive size */
  QMOE_ERR_UNSUPPORTED = 2,      /* shape outside the supported set (see qmoe_check_problem) */
  QMOE_ERR_WORKSPACE = 3,        /* workspace NULL or smaller than qmoe_workspace_size() */
  QMOE_ERR_CUDA = 100            /* QMOE_ERR_CUDA + cudaError_t of the failing call */
};

typedef struct qmoe_problem {
  int32_t num_tokens;    /* T >= 1 */
  int32_t num_experts;   /* E, 1..256 */
  int32_t top_k;         /* k, 1..min(E, 32) */
  int32_t hidden;        /* H, multiple of 128 */
  int32_t inter;         /* I (moe_intermediate_size), multiple of 64 */
  int32_t act_dtype;     /* QMOE_F16 or QMOE_BF16 */
  int32_t weight_dtype;  /* act_dtype, QMOE_I8 (per-output-channel scales) or QMOE_I4 (per-group scales) */
  int32_t scale_dtype;   /* QMOE_F32 or QMOE_F16; ignored for 16-bit weights */
  int32_t logits_dtype;  /* QMOE_F32, QMOE_F16 or QMOE_BF16 */
  int32_t normalize;     /* Qwen3 norm_topk_prob: divide the k weights by their sum */
  int32_t path;          /* enum qmoe_path */
  int32_t group_size;    /* QMOE_I4: input channels a scale (32, 64 or 128, dividing H and I); else 0 */
} qmoe_problem;

typedef struct qmoe_tensors {
  const void* x;
  const void* logits;
  const void* gate_up;
  const void* down;
  const void* gate_up_scale; /* NULL unless I8 or I4 */
  const void* down_scale;    /* NULL unless I8 or I4 */
  void* out;
  void* workspace;           /* device memory, 256-byte aligned, qmoe_workspace_size() bytes */
  size_t workspace_bytes;
  /* Optional device outputs for inspection (NULL to skip):                                     */
  int32_t* topk_ids;         /* [T, k] selected experts, descending probability               */
  float* topk_weights;       /* [T, k] routing weights (renormalised when normalize)          */
  int32_t* expert_offsets;   /* [E+1] exclusive prefix sum of per-expert counts               */
  int32_t* permuted_pairs;   /* [T*k] pair index t*k+j of each expert-contiguous row          */
} qmoe_tensors;

QMOE_API int qmoe_abi_version(void);
QMOE_API const char* qmoe_error_string(int status);

/* QMOE_OK when the kernels support this problem, else QMOE_ERR_INVALID_ARG / _UNSUPPORTED. */
QMOE_API int qmoe_check_problem(const qmoe_problem* p);

/* Device workspace bytes qmoe_forward needs for this problem. */
QMOE_API int qmoe_workspace_size(const qmoe_problem* p, size_t* bytes);

/* Router only: topk_ids [T,k] int32 and topk_weights [T,k] fp32 from logits [T,E]. */
QMOE_API int qmoe_route(const qmoe_problem* p, const void* logits, int32_t* topk_ids, float* topk_weights,
               void* stream);

/* The expert-compute kernel qmoe_forward would run for this problem on the current device:
   QMOE_PATH_GEMV, QMOE_PATH_MMA_SYNC or QMOE_PATH_WGMMA (negative: -status when the problem is refused). */
QMOE_API int qmoe_resolve_path(const qmoe_problem* p);

/* The whole MoE block: router, dispatch, grouped SwiGLU experts, weighted combine. */
QMOE_API int qmoe_forward(const qmoe_problem* p, const qmoe_tensors* t, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* QMOE_H_ */
