// TensorRT plugin over libqmoe: Qwen3 MoE block as one IPluginV3 (V3One core/build/runtime capabilities),
// created by an IPluginCreatorV3One; a plugin library loadable with IPluginRegistry::loadLibrary
// (`getCreators`, `setLoggerFinder` entry points) or trtexec --dynamicPlugins.
//
// ONNX node (qwen3_compile/kernels/trt_contract.py; the Python plugin implements the same contract):
//   op_type "Qwen3MoE", attributes plugin_version "1", plugin_namespace "qwen3_compile", top_k (int),
//   normalize (int), activation ("silu");
//   inputs  hidden [N, H] (f16/bf16), router_logits [N, E] (f32/f16/bf16), gate_up_weight [E, 2I, H],
//           down_weight [E, H, I] (the hidden dtype; or int8 with gate_up_scale [E, 2I] and down_scale [E, H]
//           in f32/f16 as inputs 4 and 5; or int4 with gate_up_scale [E, 2I, H/G] and down_scale [E, H, I/G],
//           one scale per group of G input channels, G = 32, 64 or 128 taken from the shapes);
//   output  [N, H], the hidden dtype.
// INT4 weights arrive as DataType::kINT4 tensors: TensorRT's ONNX parser copies an INT4 initializer's bytes
// (ONNX's packing: two values a byte, low nibble first) into kINT4 weights unchanged, and that packing is what
// qmoe's QMOE_I4 path reads ([E, 2I, H/2] and [E, H, I/2] bytes), so the plugin passes the buffers through.
// Serialised fields (version 1): top_k INT32, normalize INT32, activation CHAR.
#include <NvInferRuntime.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "qmoe.h"

// The library is built with hidden visibility; TensorRT's TENSORRTAPI exports nothing outside its own build.
#define QMOE_PLUGIN_API extern "C" __attribute__((visibility("default")))

namespace qwen3_compile {
namespace {

using namespace nvinfer1;

constexpr char const* kName = "Qwen3MoE";
constexpr char const* kVersion = "1";
constexpr char const* kNamespace = "qwen3_compile";
constexpr int32_t kWorkspaceAlign = 256;

// ---------------------------------------------------------------------------------------------
// Logging through TensorRT's logger (set by setLoggerFinder when TensorRT loads the library).
std::mutex gLogMutex;
ILoggerFinder* gLoggerFinder = nullptr;

void logError(std::string const& msg) noexcept {
  try {
    std::lock_guard<std::mutex> lock(gLogMutex);
    ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
    std::string const text = std::string(kNamespace) + "::" + kName + ": " + msg;
    if (logger) logger->log(ILogger::Severity::kERROR, text.c_str());
  } catch (...) {
  }
}

int32_t qmoeDtype(DataType t) {
  switch (t) {
    case DataType::kFLOAT:
      return QMOE_F32;
    case DataType::kHALF:
      return QMOE_F16;
    case DataType::kBF16:
      return QMOE_BF16;
    case DataType::kINT8:
      return QMOE_I8;
    case DataType::kINT4:
      return QMOE_I4;
    default:
      return -1;
  }
}

struct Attrs {
  int32_t topK = 0;
  int32_t normalize = 1;
  std::string activation = "silu";
};

bool isQuantized(DataType weight) { return weight == DataType::kINT8 || weight == DataType::kINT4; }

// INT4: input channels a scale, from gate_up [E, 2I, H] and its scales [E, 2I, H/G]; 0 otherwise (or unknown).
int32_t groupSize(DataType weight, Dims const& gateUp, Dims const& gateUpScale) {
  if (weight != DataType::kINT4 || gateUpScale.nbDims != 3 || gateUpScale.d[2] <= 0) return 0;
  return gateUp.d[2] % gateUpScale.d[2] == 0 ? static_cast<int32_t>(gateUp.d[2] / gateUpScale.d[2]) : 0;
}

// The kernel problem for these tensor shapes and types (nbInputs 4 or 6).
qmoe_problem makeProblem(Attrs const& a, Dims const& hidden, Dims const& gateUp, DataType act, DataType logits,
                         DataType weight, DataType scale, int32_t group) {
  qmoe_problem p{};
  p.num_tokens = static_cast<int32_t>(hidden.d[0]);
  p.hidden = static_cast<int32_t>(hidden.d[1]);
  p.num_experts = static_cast<int32_t>(gateUp.d[0]);
  p.inter = static_cast<int32_t>(gateUp.d[1] / 2);
  p.top_k = a.topK;
  p.act_dtype = qmoeDtype(act);
  p.logits_dtype = qmoeDtype(logits);
  p.weight_dtype = qmoeDtype(weight);
  p.scale_dtype = isQuantized(weight) ? qmoeDtype(scale) : QMOE_F32;
  p.normalize = a.normalize;
  p.path = QMOE_PATH_AUTO;
  p.group_size = weight == DataType::kINT4 ? group : 0;
  return p;
}

class Qwen3MoePlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  explicit Qwen3MoePlugin(Attrs attrs) : mAttrs(std::move(attrs)) {}
  Qwen3MoePlugin(Qwen3MoePlugin const& other) : mAttrs(other.mAttrs) {}

  // IPluginV3
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE:
        return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD:
        return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME:
        return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  IPluginV3* clone() noexcept override {
    try {
      return new Qwen3MoePlugin(*this);
    } catch (...) {
      return nullptr;
    }
  }

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return kName; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return kNamespace; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return 1; }

  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    if (nbOutputs != 1 || (nbInputs != 4 && nbInputs != 6)) return -1;
    outputTypes[0] = inputTypes[0];
    return 0;
  }

  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                          int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
                          IExprBuilder& /*exprBuilder*/) noexcept override {
    if (nbOutputs != 1 || (nbInputs != 4 && nbInputs != 6) || inputs[0].nbDims != 2) {
      logError("takes 4 inputs (float weights) or 6 (int8/int4 weights + scales) and a 2-D hidden [N, H]");
      return -1;
    }
    outputs[0] = inputs[0];
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t /*nbOutputs*/) noexcept override {
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    DataType const t = d.type, hiddenT = inOut[0].desc.type;
    bool const quantized = nbInputs == 6;
    switch (pos) {
      case 0:
        return t == DataType::kHALF || t == DataType::kBF16;
      case 1:
        return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
      case 2:
        return quantized ? isQuantized(t) : t == hiddenT;
      case 3:
        return t == inOut[2].desc.type;
      default:
        break;
    }
    if (quantized && pos == 4) return t == DataType::kFLOAT || t == DataType::kHALF;
    if (quantized && pos == 5) return t == inOut[4].desc.type;
    return t == hiddenT;  // the output
  }

  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/,
                          int32_t /*nbOutputs*/) noexcept override {
    Dims const& x = in[0].desc.dims;
    Dims const& lg = in[1].desc.dims;
    Dims const& gu = in[2].desc.dims;
    Dims const& dn = in[3].desc.dims;
    bool ok = x.nbDims == 2 && lg.nbDims == 2 && gu.nbDims == 3 && dn.nbDims == 3;
    ok = ok && gu.d[2] == x.d[1] && lg.d[1] == gu.d[0] && dn.d[0] == gu.d[0] && dn.d[1] == x.d[1] &&
         2 * dn.d[2] == gu.d[1];
    DataType const weight = in[2].desc.type;
    int32_t group = 0;
    if (ok && nbInputs == 6) {
      Dims const& gs = in[4].desc.dims;
      Dims const& ds = in[5].desc.dims;
      ok = gs.d[0] == gu.d[0] && gs.d[1] == gu.d[1] && ds.d[0] == gu.d[0] && ds.d[1] == x.d[1];
      if (weight == DataType::kINT4) {  // per group of G input channels, the same G for gate_up and down
        group = groupSize(weight, gu, gs);
        ok = ok && gs.nbDims == 3 && ds.nbDims == 3 && group > 0 && int64_t{ds.d[2]} * group == dn.d[2];
      } else {
        ok = ok && gs.nbDims == 2 && ds.nbDims == 2;
      }
    }
    if (!ok) {
      logError("inconsistent shapes: need hidden [N,H], logits [N,E], gate_up [E,2I,H], down [E,H,I] "
               "(+ scales [E,2I], [E,H] for int8 or [E,2I,H/G], [E,H,I/G] for int4)");
      return -1;
    }
    Dims one = x;
    one.d[0] = 1;  // N is dynamic here; the static shapes decide support
    qmoe_problem p = makeProblem(mAttrs, one, gu, in[0].desc.type, in[1].desc.type, weight,
                                 nbInputs == 6 ? in[4].desc.type : DataType::kFLOAT, group);
    int const st = qmoe_check_problem(&p);
    if (st != QMOE_OK) {
      logError(qmoe_error_string(st));
      return -1;
    }
    return 0;
  }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override {
    Dims most = inputs[0].max;  // the profile's largest token count
    if (most.d[0] < 1) most.d[0] = 1;
    DataType const weight = inputs[2].desc.type;
    bool const quantized = nbInputs == 6;
    qmoe_problem p = makeProblem(mAttrs, most, inputs[2].desc.dims, inputs[0].desc.type, inputs[1].desc.type, weight,
                                 quantized ? inputs[4].desc.type : DataType::kFLOAT,
                                 quantized ? groupSize(weight, inputs[2].desc.dims, inputs[4].desc.dims) : 0);
    size_t bytes = 0;
    if (qmoe_workspace_size(&p, &bytes) != QMOE_OK) return 0;
    return bytes + kWorkspaceAlign;
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(PluginTensorDesc const* /*in*/, int32_t /*nbInputs*/, PluginTensorDesc const* /*out*/,
                        int32_t /*nbOutputs*/) noexcept override {
    return 0;
  }

  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override {
    DataType const weight = inputDesc[2].type;
    bool const quantized = isQuantized(weight);
    qmoe_problem p = makeProblem(mAttrs, inputDesc[0].dims, inputDesc[2].dims, inputDesc[0].type, inputDesc[1].type,
                                 weight, quantized ? inputDesc[4].type : DataType::kFLOAT,
                                 quantized ? groupSize(weight, inputDesc[2].dims, inputDesc[4].dims) : 0);
    size_t need = 0;
    int st = qmoe_workspace_size(&p, &need);
    if (st == QMOE_OK) {
      auto const base = reinterpret_cast<uintptr_t>(workspace);
      uintptr_t const aligned = (base + kWorkspaceAlign - 1) & ~uintptr_t(kWorkspaceAlign - 1);
      qmoe_tensors t{};
      t.x = inputs[0];
      t.logits = inputs[1];
      t.gate_up = inputs[2];
      t.down = inputs[3];
      t.gate_up_scale = quantized ? inputs[4] : nullptr;
      t.down_scale = quantized ? inputs[5] : nullptr;
      t.out = outputs[0];
      t.workspace = reinterpret_cast<void*>(aligned);
      t.workspace_bytes = need;
      st = qmoe_forward(&p, &t, stream);
    }
    if (st != QMOE_OK) {
      logError(std::string("enqueue: ") + qmoe_error_string(st));
      return -1;
    }
    return 0;
  }

  IPluginV3* attachToContext(IPluginResourceContext* /*context*/) noexcept override { return clone(); }

  PluginFieldCollection const* getFieldsToSerialize() noexcept override {
    mFields.clear();
    mFields.emplace_back("top_k", &mAttrs.topK, PluginFieldType::kINT32, 1);
    mFields.emplace_back("normalize", &mAttrs.normalize, PluginFieldType::kINT32, 1);
    mFields.emplace_back("activation", mAttrs.activation.c_str(), PluginFieldType::kCHAR,
                         static_cast<int32_t>(mAttrs.activation.size() + 1));
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
    return &mCollection;
  }

 private:
  Attrs mAttrs;
  std::vector<PluginField> mFields;
  PluginFieldCollection mCollection{};
};

// An integer field as TensorRT or the ONNX parser hands it over (INT32 from the parser; accept others).
bool readInt(PluginField const& f, int32_t& out) {
  if (f.data == nullptr || f.length < 1) return false;
  switch (f.type) {
    case PluginFieldType::kINT32:
      out = *static_cast<int32_t const*>(f.data);
      return true;
    case PluginFieldType::kINT64:
      out = static_cast<int32_t>(*static_cast<int64_t const*>(f.data));
      return true;
    case PluginFieldType::kINT16:
      out = *static_cast<int16_t const*>(f.data);
      return true;
    case PluginFieldType::kINT8:
      out = *static_cast<int8_t const*>(f.data);
      return true;
    default:
      return false;
  }
}

class Qwen3MoeCreator : public IPluginCreatorV3One {
 public:
  Qwen3MoeCreator() {
    mFieldNames.emplace_back("top_k", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("normalize", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("activation", nullptr, PluginFieldType::kCHAR, 0);
    mCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mCollection.fields = mFieldNames.data();
  }

  char const* getPluginName() const noexcept override { return kName; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return kNamespace; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }

  IPluginV3* createPlugin(char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept override {
    try {
      Attrs a;
      bool haveTopK = false;
      for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        std::string const name = f.name ? f.name : "";
        if (name == "top_k") {
          haveTopK = readInt(f, a.topK);
        } else if (name == "normalize") {
          int32_t v = 1;
          if (!readInt(f, v)) return fail("normalize must be an integer");
          a.normalize = v != 0;
        } else if (name == "activation") {
          if (f.type != PluginFieldType::kCHAR || f.data == nullptr) return fail("activation must be a string");
          char const* s = static_cast<char const*>(f.data);
          a.activation.assign(s, strnlen(s, static_cast<size_t>(f.length)));
        } else {
          return fail("unknown field '" + name + "'");
        }
      }
      if (!haveTopK || a.topK < 1) return fail("top_k (a positive integer) is required");
      if (a.activation != "silu") return fail("activation must be 'silu' (SwiGLU), got '" + a.activation + "'");
      return new Qwen3MoePlugin(std::move(a));
    } catch (...) {
      return nullptr;
    }
  }

 private:
  static IPluginV3* fail(std::string const& why) {
    logError(why);
    return nullptr;
  }
  std::vector<PluginField> mFieldNames;
  PluginFieldCollection mCollection{};
};

}  // namespace
}  // namespace qwen3_compile

QMOE_PLUGIN_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static qwen3_compile::Qwen3MoeCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}

QMOE_PLUGIN_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  std::lock_guard<std::mutex> lock(qwen3_compile::gLogMutex);
  if (qwen3_compile::gLoggerFinder == nullptr) qwen3_compile::gLoggerFinder = finder;
}
