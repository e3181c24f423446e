// ONNX Runtime custom-op library over libqmoe: the canonical graph's `qwen3_compile::ExpertDispatch` node (float
// experts, no graph rewrite) and the `qwen3_compile::WeightOnlyExpertDispatch` node that `lower --for ort
// --moe-lowering custom-op` writes for INT8/INT4 weight-only experts, run on ORT's CUDA execution provider with
// our kernels. Loaded with `SessionOptions.register_custom_ops_library(path)` (entry point `RegisterCustomOps`);
// once registered, ORT takes these kernels instead of inlining the model-local functions of the same names.
//
// Nodes (qwen3_compile/graphs/*.onnxtxt hold the reference semantics):
//   attributes top_k (int, required), normalize (int, default 1), activation (string, default "silu": the only one)
//   ExpertDispatch
//     inputs  hidden [N, H] f16/bf16, router_logits [N, E] f32/f16/bf16, gate_up_weight [E, 2I, H] and
//             down_weight [E, H, I] in the hidden dtype (the transformers-5 layouts qmoe reads as they are)
//   WeightOnlyExpertDispatch (+ optional attributes gate_up_block_size, down_block_size: input channels a scale)
//     inputs  hidden, router_logits as above; gate_up_quantized [E, 2I, H] and down_quantized [E, H, I], int8
//             (QMOE_I8) or int4 (QMOE_I4: ORT's INT4 tensors hold the ONNX packing, two values a byte, low nibble
//             first along the input axis, which is what qmoe reads); gate_up_scale [E, 2I, H/B] and down_scale
//             [E, H, I/B], f32 or f16 (both the same): int8 B = the row length (scales [E, 2I, 1], [E, H, 1]),
//             int4 B = G, the group size, taken from the shapes (block-size attributes, if given, must agree)
//   output  [N, H], the hidden dtype
// Weights and scales are the model's initializers: their device buffers go to qmoe_forward on every call as they
// are (nothing is packed, copied or dequantized, per call or at session creation).
// Limits are qmoe's (qmoe_check_problem): E <= 256, top_k <= min(E, 32), H % 128 == 0, I % 64 == 0, INT4 groups of
// 32, 64 or 128. Where the weights' shapes are static (initializers) a refused shape fails at session creation,
// else at the first run.
//
// Input types: ORT's "any type" for a custom-op input (ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED) is its IR-9 type
// list, which has no int4 (microsoft/onnxruntime#23205), and ORT unions the declared types of every OrtCustomOp of
// one name per input; so the weights are declared with their exact types, one OrtCustomOp per (hidden dtype,
// weight dtype). Router logits and scales are left untyped and checked here.
//
// Only ORT's C API is used, through the function table ORT hands over: the library links no libonnxruntime,
// and asks for API version kOrtApiVersion, so it loads in every ORT release from that version on, whichever
// (newer) header it was compiled against. Work is enqueued on ORT's compute stream; the workspace comes from
// ORT's allocator for the kernel's device (the arena: no cudaMalloc per call); nothing synchronizes.
#include <onnxruntime_c_api.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "qmoe.h"

#define QMOE_ORT_API extern "C" __attribute__((visibility("default")))

namespace {

// The oldest OrtApi with every function called here: KernelContext_GetScratchBuffer and KernelInfoGetAllocator
// (1.18, also the first release with INT4 tensors); the rest is older (GetGPUComputeStream 1.14,
// KernelInfo_GetInputTypeInfo 1.14, KernelInfo_GetNodeName 1.15, ShapeInferContext_* 1.17).
constexpr uint32_t kOrtApiVersion = 18;
constexpr char const* kDomain = "qwen3_compile";
constexpr char const* kFloatOpName = "ExpertDispatch";
constexpr char const* kQuantizedOpName = "WeightOnlyExpertDispatch";
constexpr char const* kProvider = "CUDAExecutionProvider";
constexpr size_t kWorkspaceAlign = 256;  // qmoe_forward wants a 256-byte aligned workspace

const OrtApi* gApi = nullptr;

// ---------------------------------------------------------------------------------------------
// Status helpers: every failure becomes an OrtStatus naming the op, the node and what to do.

struct Failure {
  OrtErrorCode code;
  std::string message;
};

OrtStatus* toStatus(Failure const& f, char const* op, std::string const& node) {
  std::string text = std::string(kDomain) + "::" + op + " (libqmoe_ort";
  if (!node.empty()) text += ", node '" + node + "'";
  text += "): " + f.message;
  return gApi->CreateStatus(f.code, text.c_str());
}

// Throws the message of an ORT call that failed (releasing its status).
void check(OrtStatus* status) {
  if (!status) return;
  Failure f{gApi->GetErrorCode(status), gApi->GetErrorMessage(status)};
  gApi->ReleaseStatus(status);
  throw f;
}

[[noreturn]] void refuse(std::string message, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  throw Failure{code, std::move(message)};
}

int32_t qmoeDtype(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return QMOE_F32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return QMOE_F16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
      return QMOE_BF16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8:
      return QMOE_I8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT4:
      return QMOE_I4;
    default:
      return -1;
  }
}

char const* dtypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
      return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8:
      return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT4:
      return "int4";
    default:
      return "an unsupported type";
  }
}

std::string shapeText(std::vector<int64_t> const& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// ---------------------------------------------------------------------------------------------
// The ops: one OrtCustomOp per (name, hidden dtype, weight dtype); ORT picks the one whose type constraints match
// the node. router_logits and the scales are left untyped (their types are checked when the kernel is created and
// at each run).

struct ExpertDispatchOp {
  OrtCustomOp base;  // first member: ORT hands back &base, which is this object
  ONNXTensorElementDataType act;
  ONNXTensorElementDataType weight;  // act (ExpertDispatch), or int8 / int4 (WeightOnlyExpertDispatch)

  bool quantized() const {
    return weight == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 || weight == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT4;
  }
  size_t inputs() const { return quantized() ? 6 : 4; }
  char const* name() const { return quantized() ? kQuantizedOpName : kFloatOpName; }
};

constexpr size_t kMaxInputs = 6;
enum Input : size_t { kHidden = 0, kLogits = 1, kGateUp = 2, kDown = 3, kGateUpScale = 4, kDownScale = 5 };
char const* const kFloatNames[4] = {"hidden", "router_logits", "gate_up_weight", "down_weight"};
char const* const kQuantizedNames[kMaxInputs] = {"hidden",         "router_logits", "gate_up_quantized",
                                                 "down_quantized", "gate_up_scale", "down_scale"};

ExpertDispatchOp const& asOp(OrtCustomOp const* op) { return *reinterpret_cast<ExpertDispatchOp const*>(op); }

char const* inputName(bool quantized, size_t i) { return quantized ? kQuantizedNames[i] : kFloatNames[i]; }

struct TensorDesc {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;  // -1 where not known when the session is created
};

TensorDesc describe(OrtTensorTypeAndShapeInfo const* info) {
  TensorDesc d;
  check(gApi->GetTensorElementType(info, &d.type));
  size_t rank = 0;
  check(gApi->GetDimensionsCount(info, &rank));
  d.dims.resize(rank);
  if (rank) check(gApi->GetDimensions(info, d.dims.data(), rank));
  return d;
}

// The node's attributes (block sizes -1 when absent).
struct Attrs {
  int32_t topK = 0;
  int32_t normalize = 1;
  int64_t gateUpBlock = -1;
  int64_t downBlock = -1;
};

bool known(int64_t d) { return d >= 0; }

// where a dimension is known on both sides it must agree (symbolic dims are -1 here)
bool agree(int64_t a, int64_t b) { return !known(a) || !known(b) || a == b; }

// The weight-only part of the problem: weight and scale dtypes, INT4 group size; refuses what does not fit.
void quantizedProblem(TensorDesc const (&in)[kMaxInputs], Attrs const& a, qmoe_problem& p) {
  for (size_t i : {kGateUp, kDown}) {
    if (in[i].type != in[kGateUp].type || (qmoeDtype(in[i].type) != QMOE_I8 && qmoeDtype(in[i].type) != QMOE_I4))
      refuse(std::string("input '") + kQuantizedNames[i] + "' is " + dtypeName(in[i].type) +
             "; gate_up_quantized and down_quantized must both be int8 or both int4.");
  }
  for (size_t i : {kGateUpScale, kDownScale}) {
    int32_t const t = qmoeDtype(in[i].type);
    if (in[i].type != in[kGateUpScale].type || (t != QMOE_F32 && t != QMOE_F16))
      refuse(std::string("input '") + kQuantizedNames[i] + "' is " + dtypeName(in[i].type) +
             "; gate_up_scale and down_scale must both be float32 or both float16.");
  }
  p.weight_dtype = qmoeDtype(in[kGateUp].type);
  p.scale_dtype = qmoeDtype(in[kGateUpScale].type);

  auto const& gateUp = in[kGateUp].dims;
  auto const& down = in[kDown].dims;
  auto const& gs = in[kGateUpScale].dims;
  auto const& ds = in[kDownScale].dims;
  int64_t const e = gateUp[0], i2 = gateUp[1], h = gateUp[2], inter = down[2];
  bool ok = agree(gs[0], e) && agree(gs[1], i2) && agree(ds[0], e) && agree(ds[1], h);
  int64_t gateUpBlock = -1, downBlock = -1;  // input channels a scale, from the shapes
  if (known(h) && known(gs[2])) gateUpBlock = gs[2] > 0 && h % gs[2] == 0 ? h / gs[2] : 0;
  if (known(inter) && known(ds[2])) downBlock = ds[2] > 0 && inter % ds[2] == 0 ? inter / ds[2] : 0;
  if (p.weight_dtype == QMOE_I8) {
    ok = ok && agree(gs[2], 1) && agree(ds[2], 1);
  } else {
    ok = ok && gateUpBlock != 0 && downBlock != 0 && agree(gateUpBlock, downBlock);
  }
  if (!ok)
    refuse("inconsistent scale shapes: gate_up_quantized " + shapeText(gateUp) + ", down_quantized " +
           shapeText(down) + ", gate_up_scale " + shapeText(gs) + ", down_scale " + shapeText(ds) +
           "; expected scales [E, 2I, 1] and [E, H, 1] for int8 weights (one per output row), [E, 2I, H/G] and "
           "[E, H, I/G] for int4 weights (one per group of G input channels, the same G for both).");
  // the block-size attributes are what the node's function body dequantizes with: they must describe these scales
  auto const attrAgrees = [](int64_t attr, int64_t fromShapes) { return attr < 0 || agree(attr, fromShapes); };
  if (!attrAgrees(a.gateUpBlock, gateUpBlock) || !attrAgrees(a.downBlock, downBlock))
    refuse("attributes gate_up_block_size=" + std::to_string(a.gateUpBlock) + ", down_block_size=" +
           std::to_string(a.downBlock) + " disagree with the scales' shapes (blocks of " +
           std::to_string(gateUpBlock) + " and " + std::to_string(downBlock) + " input channels).");
  if (p.weight_dtype == QMOE_I4) p.group_size = static_cast<int32_t>(known(gateUpBlock) ? gateUpBlock : downBlock);
}

// Shapes and types of the inputs (4 or 6), as a qmoe problem; refuses what qmoe cannot run. num_tokens is N, or 1
// when checking at session creation (where N is symbolic).
qmoe_problem makeProblem(TensorDesc const (&in)[kMaxInputs], size_t count, Attrs const& a) {
  bool const quantized = count == kMaxInputs;
  static constexpr size_t kRanks[kMaxInputs] = {2, 2, 3, 3, 3, 3};
  for (size_t i = 0; i < count; ++i) {
    if (in[i].dims.size() != kRanks[i])
      refuse(std::string("input '") + inputName(quantized, i) + "' has rank " + std::to_string(in[i].dims.size()) +
             " (shape " + shapeText(in[i].dims) + "); expected rank " + std::to_string(kRanks[i]) +
             ": hidden [N, H], router_logits [N, E], gate_up [E, 2I, H], down [E, H, I]" +
             (quantized ? ", gate_up_scale [E, 2I, H/B], down_scale [E, H, I/B]." : "."));
  }
  auto const& hidden = in[kHidden].dims;
  auto const& logits = in[kLogits].dims;
  auto const& gateUp = in[kGateUp].dims;
  auto const& down = in[kDown].dims;
  int64_t const n = hidden[0], h = hidden[1], e = gateUp[0], i2 = gateUp[1];
  int64_t const inter = i2 / 2;
  bool const ok = agree(logits[0], n) && agree(logits[1], e) && agree(gateUp[2], h) && agree(down[0], e) &&
                  agree(down[1], h) && (i2 < 0 || (i2 % 2 == 0 && agree(down[2], inter)));
  if (!ok)
    refuse("inconsistent input shapes: hidden " + shapeText(hidden) + ", router_logits " + shapeText(logits) +
           ", gate_up " + shapeText(gateUp) + ", down " + shapeText(down) +
           "; expected hidden [N, H], router_logits [N, E], gate_up [E, 2I, H], down [E, H, I].");

  int32_t const act = qmoeDtype(in[kHidden].type);
  if (act != QMOE_F16 && act != QMOE_BF16)
    refuse(std::string("hidden is ") + dtypeName(in[kHidden].type) + "; it must be float16 or bfloat16.");
  if (!quantized) {
    for (size_t i : {kGateUp, kDown}) {
      if (in[i].type != in[kHidden].type)
        refuse(std::string("input '") + kFloatNames[i] + "' is " + dtypeName(in[i].type) +
               "; hidden, gate_up_weight and down_weight must all be float16 or all bfloat16.");
    }
  }
  int32_t const logitsDtype = qmoeDtype(in[kLogits].type);
  if (logitsDtype != QMOE_F32 && logitsDtype != QMOE_F16 && logitsDtype != QMOE_BF16)
    refuse(std::string("router_logits is ") + dtypeName(in[kLogits].type) +
           "; it must be float32, float16 or bfloat16.");

  qmoe_problem p{};
  p.num_tokens = static_cast<int32_t>(n > 0 ? n : 1);
  p.num_experts = static_cast<int32_t>(e);
  p.top_k = a.topK;
  p.hidden = static_cast<int32_t>(h);
  p.inter = static_cast<int32_t>(inter);
  p.act_dtype = act;
  p.weight_dtype = act;
  p.scale_dtype = QMOE_F32;
  p.logits_dtype = logitsDtype;
  p.normalize = a.normalize;
  p.path = QMOE_PATH_AUTO;
  if (quantized) quantizedProblem(in, a, p);
  bool const dynamic = e < 0 || h < 0 || i2 < 0 || (p.weight_dtype == QMOE_I4 && p.group_size < 0);
  if (dynamic) return p;  // dynamic weights: checked at the first run
  if (n > INT32_MAX || e > INT32_MAX || h > INT32_MAX || inter > INT32_MAX)
    refuse("a dimension exceeds the int32 range of the kernels.", ORT_NOT_IMPLEMENTED);
  int const st = qmoe_check_problem(&p);
  if (st != QMOE_OK)
    refuse("the qmoe kernels do not support this problem (" + std::string(qmoe_error_string(st)) +
               "): E=" + std::to_string(e) + " experts, top_k=" + std::to_string(a.topK) + ", H=" +
               std::to_string(h) + ", I=" + std::to_string(inter) +
               (p.weight_dtype == QMOE_I4 ? ", int4 group size G=" + std::to_string(p.group_size) : std::string()) +
               ". Supported: 1 <= E <= 256, 1 <= top_k <= min(E, 32), H % 128 == 0, I % 64 == 0 (int4: G in 32, 64, "
               "128 dividing H and I). Run this model without the custom-op library (ORT then runs the node's ONNX "
               "function body).",
           ORT_NOT_IMPLEMENTED);
  return p;
}

// ---------------------------------------------------------------------------------------------
// The kernel: attributes, and the device allocator the workspace is returned to.

struct Kernel {
  std::string node;
  char const* op = kFloatOpName;
  size_t inputs = 4;
  Attrs attrs;
  OrtAllocator* allocator = nullptr;  // the CUDA EP's default allocator (owned: released in the destructor)
  OrtMemoryInfo const* memInfo = nullptr;

  ~Kernel() {
    if (allocator) gApi->ReleaseAllocator(allocator);
  }
};

std::string nodeName(OrtKernelInfo const* info) {
  size_t size = 0;
  if (OrtStatus* s = gApi->KernelInfo_GetNodeName(info, nullptr, &size)) {
    gApi->ReleaseStatus(s);
    return {};
  }
  std::string name(size, '\0');
  if (OrtStatus* s = gApi->KernelInfo_GetNodeName(info, name.data(), &size)) {
    gApi->ReleaseStatus(s);
    return {};
  }
  name.resize(size ? size - 1 : 0);  // size counts the terminating null
  return name;
}

int64_t intAttribute(OrtKernelInfo const* info, char const* name, int64_t fallback, bool required) {
  int64_t value = 0;
  if (OrtStatus* s = gApi->KernelInfoGetAttribute_int64(info, name, &value)) {
    gApi->ReleaseStatus(s);
    if (required) refuse(std::string("attribute '") + name + "' (int) is missing.");
    return fallback;
  }
  return value;
}

std::string stringAttribute(OrtKernelInfo const* info, char const* name, std::string fallback) {
  size_t size = 0;
  if (OrtStatus* s = gApi->KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
    gApi->ReleaseStatus(s);
    return fallback;
  }
  std::string value(size, '\0');
  check(gApi->KernelInfoGetAttribute_string(info, name, value.data(), &size));
  value.resize(size ? size - 1 : 0);
  return value;
}

TensorDesc inputDesc(OrtKernelInfo const* info, size_t index, bool quantized) {
  OrtTypeInfo* typeInfo = nullptr;
  check(gApi->KernelInfo_GetInputTypeInfo(info, index, &typeInfo));
  TensorDesc d;
  try {
    OrtTensorTypeAndShapeInfo const* tensorInfo = nullptr;
    check(gApi->CastTypeInfoToTensorInfo(typeInfo, &tensorInfo));
    if (!tensorInfo) refuse(std::string("input '") + inputName(quantized, index) + "' is not a tensor.");
    d = describe(tensorInfo);
  } catch (...) {
    gApi->ReleaseTypeInfo(typeInfo);
    throw;
  }
  gApi->ReleaseTypeInfo(typeInfo);
  return d;
}

OrtStatus* ORT_API_CALL createKernel(OrtCustomOp const* op, OrtApi const* /*api*/, OrtKernelInfo const* info,
                                     void** out) noexcept {
  ExpertDispatchOp const& variant = asOp(op);
  std::string node;
  try {
    node = nodeName(info);
    auto kernel = new Kernel();
    try {
      kernel->node = node;
      kernel->op = variant.name();
      kernel->inputs = variant.inputs();
      int64_t const topK = intAttribute(info, "top_k", 0, /*required=*/true);
      int64_t const normalize = intAttribute(info, "normalize", 1, /*required=*/false);
      std::string const activation = stringAttribute(info, "activation", "silu");
      if (activation != "silu")
        refuse("activation '" + activation + "' is not supported; the kernels compute SwiGLU experts "
               "(activation 'silu') only.", ORT_NOT_IMPLEMENTED);
      if (topK < 1 || topK > 32) refuse("top_k=" + std::to_string(topK) + " is outside 1..32.");
      if (normalize != 0 && normalize != 1) refuse("normalize=" + std::to_string(normalize) + " must be 0 or 1.");
      kernel->attrs.topK = static_cast<int32_t>(topK);
      kernel->attrs.normalize = static_cast<int32_t>(normalize);
      if (variant.quantized()) {
        kernel->attrs.gateUpBlock = intAttribute(info, "gate_up_block_size", -1, /*required=*/false);
        kernel->attrs.downBlock = intAttribute(info, "down_block_size", -1, /*required=*/false);
      }

      size_t count = 0;
      check(gApi->KernelInfo_GetInputCount(info, &count));
      if (count != kernel->inputs)
        refuse("the node has " + std::to_string(count) + " inputs; expected " + std::to_string(kernel->inputs) +
               (variant.quantized() ? " (hidden, router_logits, gate_up_quantized, down_quantized, gate_up_scale, "
                                      "down_scale)."
                                    : " (hidden, router_logits, gate_up_weight, down_weight)."));
      TensorDesc in[kMaxInputs];
      for (size_t i = 0; i < count; ++i) in[i] = inputDesc(info, i, variant.quantized());
      if (in[kHidden].type != variant.act) refuse("internal: kernel variant does not match the hidden dtype.");
      makeProblem(in, count, kernel->attrs);  // refuses unsupported shapes now, where they are known

      check(gApi->KernelInfoGetAllocator(info, OrtMemTypeDefault, &kernel->allocator));
      check(gApi->AllocatorGetInfo(kernel->allocator, &kernel->memInfo));
    } catch (...) {
      delete kernel;
      throw;
    }
    *out = kernel;
    return nullptr;
  } catch (Failure const& f) {
    return toStatus(f, variant.name(), node);
  } catch (std::exception const& e) {
    return toStatus({ORT_FAIL, e.what()}, variant.name(), node);
  } catch (...) {
    return toStatus({ORT_FAIL, "unknown error while creating the kernel."}, variant.name(), node);
  }
}

TensorDesc valueDesc(OrtValue const* value) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(gApi->GetTensorTypeAndShape(value, &info));
  TensorDesc d;
  try {
    d = describe(info);
  } catch (...) {
    gApi->ReleaseTensorTypeAndShapeInfo(info);
    throw;
  }
  gApi->ReleaseTensorTypeAndShapeInfo(info);
  return d;
}

void const* inputData(OrtValue const* value) {
  void* data = nullptr;
  // GetTensorMutableData is the one accessor every API version has; the data is only read. For an int4 tensor it
  // is the packed bytes.
  check(gApi->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  return data;
}

OrtStatus* ORT_API_CALL compute(void* opKernel, OrtKernelContext* context) noexcept {
  auto const& kernel = *static_cast<Kernel*>(opKernel);
  bool const quantized = kernel.inputs == kMaxInputs;
  void* scratch = nullptr;
  try {
    OrtValue const* values[kMaxInputs] = {};
    TensorDesc in[kMaxInputs];
    for (size_t i = 0; i < kernel.inputs; ++i) {
      check(gApi->KernelContext_GetInput(context, i, &values[i]));
      if (!values[i]) refuse(std::string("input '") + inputName(quantized, i) + "' is missing.");
      in[i] = valueDesc(values[i]);
    }
    qmoe_problem p = makeProblem(in, kernel.inputs, kernel.attrs);
    int64_t const outDims[2] = {in[kHidden].dims[0], in[kHidden].dims[1]};
    OrtValue* output = nullptr;
    check(gApi->KernelContext_GetOutput(context, 0, outDims, 2, &output));
    if (outDims[0] == 0) return nullptr;  // no tokens: an empty output, nothing to launch
    void* outData = nullptr;
    check(gApi->GetTensorMutableData(output, &outData));

    void* stream = nullptr;
    check(gApi->KernelContext_GetGPUComputeStream(context, &stream));
    if (!stream)
      refuse("ORT gave the kernel no CUDA stream: the node is not running on the CUDA execution provider.",
             ORT_FAIL);

    size_t need = 0;
    int st = qmoe_workspace_size(&p, &need);
    if (st != QMOE_OK) refuse(std::string("qmoe_workspace_size: ") + qmoe_error_string(st), ORT_FAIL);
    // From the EP's arena on ORT's compute stream (stream-aware reuse); returned right after the launch, as ORT's
    // own CUDA kernels return their scratch buffers: later users of the block are ordered after us on the stream.
    check(gApi->KernelContext_GetScratchBuffer(context, kernel.memInfo, need + kWorkspaceAlign, &scratch));
    if (!scratch) refuse("ORT returned no workspace memory.", ORT_FAIL);
    auto const base = reinterpret_cast<uintptr_t>(scratch);
    uintptr_t const aligned = (base + kWorkspaceAlign - 1) & ~uintptr_t(kWorkspaceAlign - 1);

    qmoe_tensors t{};
    t.x = inputData(values[kHidden]);
    t.logits = inputData(values[kLogits]);
    t.gate_up = inputData(values[kGateUp]);
    t.down = inputData(values[kDown]);
    if (quantized) {
      t.gate_up_scale = inputData(values[kGateUpScale]);
      t.down_scale = inputData(values[kDownScale]);
    }
    t.out = outData;
    t.workspace = reinterpret_cast<void*>(aligned);
    t.workspace_bytes = need;
    st = qmoe_forward(&p, &t, stream);
    kernel.allocator->Free(kernel.allocator, scratch);
    scratch = nullptr;
    if (st != QMOE_OK) refuse(std::string("qmoe_forward failed: ") + qmoe_error_string(st), ORT_FAIL);
    return nullptr;
  } catch (Failure const& f) {
    if (scratch) kernel.allocator->Free(kernel.allocator, scratch);
    return toStatus(f, kernel.op, kernel.node);
  } catch (std::exception const& e) {
    if (scratch) kernel.allocator->Free(kernel.allocator, scratch);
    return toStatus({ORT_FAIL, e.what()}, kernel.op, kernel.node);
  } catch (...) {
    if (scratch) kernel.allocator->Free(kernel.allocator, scratch);
    return toStatus({ORT_FAIL, "unknown error."}, kernel.op, kernel.node);
  }
}

void ORT_API_CALL destroyKernel(void* opKernel) noexcept { delete static_cast<Kernel*>(opKernel); }

// The output has the hidden input's type and shape (so ORT's shape inference continues past the node).
OrtStatus* ORT_API_CALL inferOutputShape(OrtCustomOp const* /*op*/, OrtShapeInferContext* ctx) noexcept {
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
  if (OrtStatus* s = gApi->ShapeInferContext_GetInputTypeShape(ctx, kHidden, &info)) return s;
  return gApi->ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
}

char const* ORT_API_CALL opName(OrtCustomOp const* op) noexcept { return asOp(op).name(); }
char const* ORT_API_CALL opProvider(OrtCustomOp const*) noexcept { return kProvider; }
size_t ORT_API_CALL inputCount(OrtCustomOp const* op) noexcept { return asOp(op).inputs(); }
size_t ORT_API_CALL outputCount(OrtCustomOp const*) noexcept { return 1; }
ONNXTensorElementDataType ORT_API_CALL inputType(OrtCustomOp const* op, size_t index) noexcept {
  ExpertDispatchOp const& o = asOp(op);
  switch (index) {
    case kHidden:
      return o.act;
    case kGateUp:
    case kDown:
      return o.weight;
    default:  // router_logits, the scales
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
}
ONNXTensorElementDataType ORT_API_CALL outputType(OrtCustomOp const* op, size_t) noexcept { return asOp(op).act; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(OrtCustomOp const*, size_t) noexcept {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL onDevice(OrtCustomOp const*, size_t) noexcept { return OrtMemTypeDefault; }

ExpertDispatchOp makeOp(ONNXTensorElementDataType act, ONNXTensorElementDataType weight) {
  ExpertDispatchOp o;
  std::memset(&o.base, 0, sizeof(o.base));
  // ORT reads only the fields that exist at this version, and hands CreateKernelV2 the OrtApi of this version.
  o.base.version = kOrtApiVersion;
  o.base.GetName = opName;
  o.base.GetExecutionProviderType = opProvider;
  o.base.GetInputType = inputType;
  o.base.GetInputTypeCount = inputCount;
  o.base.GetOutputType = outputType;
  o.base.GetOutputTypeCount = outputCount;
  o.base.KernelDestroy = destroyKernel;
  o.base.GetInputCharacteristic = required;
  o.base.GetOutputCharacteristic = required;
  o.base.GetInputMemoryType = onDevice;
  o.base.CreateKernelV2 = createKernel;
  o.base.KernelComputeV2 = compute;
  o.base.InferOutputShapeFn = inferOutputShape;
  o.act = act;
  o.weight = weight;
  return o;
}

constexpr auto kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr auto kBF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
constexpr auto kI8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
constexpr auto kI4 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT4;

// Static storage: ORT keeps pointers to the ops for the lifetime of every session that registered them.
ExpertDispatchOp gOps[] = {
    makeOp(kF16, kF16), makeOp(kBF16, kBF16),                      // ExpertDispatch
    makeOp(kF16, kI8),  makeOp(kBF16, kI8),  makeOp(kF16, kI4), makeOp(kBF16, kI4),  // WeightOnlyExpertDispatch
};

}  // namespace

// The entry point SessionOptions.register_custom_ops_library / RegisterCustomOpsLibrary_V2 calls.
QMOE_ORT_API OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, OrtApiBase const* apiBase) {
  if (!apiBase) return nullptr;  // cannot report without an API; ORT never passes NULL
  OrtApi const* api = apiBase->GetApi(kOrtApiVersion);
  if (!api) {
    // No OrtApi of that version to create a status with: the newest one this runtime has is not reachable
    // without knowing its number either, so report through the oldest API every release has.
    OrtApi const* oldest = apiBase->GetApi(1);
    if (!oldest) return nullptr;
    std::string const text = std::string("libqmoe_ort needs ONNX Runtime 1.") + std::to_string(kOrtApiVersion) +
                             " or newer (C API version " + std::to_string(kOrtApiVersion) + "); this is ONNX Runtime " +
                             apiBase->GetVersionString() + ".";
    return oldest->CreateStatus(ORT_FAIL, text.c_str());
  }
  gApi = api;
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* s = api->CreateCustomOpDomain(kDomain, &domain)) return s;
  for (auto& op : gOps) {
    if (OrtStatus* s = api->CustomOpDomain_Add(domain, &op.base)) {
      api->ReleaseCustomOpDomain(domain);
      return s;
    }
  }
  // The session options keep the domain for the sessions they create: it is not released here (ORT's own
  // custom-op libraries do the same; one small object a registration).
  return api->AddCustomOpDomain(options, domain);
}
