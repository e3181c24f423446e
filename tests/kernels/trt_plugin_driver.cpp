// Host-only checks of the C++ TensorRT plugin library (no TensorRT library, no GPU): dlopen it as
// TensorRT's IPluginRegistry::loadLibrary would, and drive its creator and plugin through the V3 interfaces.
// Prints "workspace <bytes>" and "OK" on success; "FAIL <line> <condition>" otherwise (exit 1).
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

#define CHECK(c)                                              \
  do {                                                        \
    if (!(c)) {                                               \
      std::printf("FAIL %d %s\n", __LINE__, #c);              \
      return 1;                                               \
    }                                                         \
  } while (0)

static Dims dims(std::vector<int64_t> v) {
  Dims d{};
  d.nbDims = static_cast<int32_t>(v.size());
  for (size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
  return d;
}

static DynamicPluginTensorDesc desc(std::vector<int64_t> shape, DataType t, int64_t max_rows = -1) {
  DynamicPluginTensorDesc d{};
  d.desc.dims = dims(shape);
  d.desc.type = t;
  d.desc.format = TensorFormat::kLINEAR;
  d.min = d.opt = d.max = d.desc.dims;
  if (shape[0] == -1) {
    d.min.d[0] = 1;
    d.opt.d[0] = max_rows / 2;
    d.max.d[0] = max_rows;
  }
  return d;
}

static PluginFieldCollection fields(std::vector<PluginField>& storage) {
  return PluginFieldCollection{static_cast<int32_t>(storage.size()), storage.data()};
}

int main(int argc, char** argv) {
  CHECK(argc == 2);
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) std::printf("dlopen: %s\n", dlerror());
  CHECK(lib != nullptr);
  using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
  auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
  CHECK(getCreators != nullptr);
  CHECK(dlsym(lib, "setLoggerFinder") != nullptr);
  int32_t n = 0;
  IPluginCreatorInterface* const* list = getCreators(n);
  CHECK(n == 1 && list[0] != nullptr);
  CHECK(std::string(list[0]->getInterfaceInfo().kind) == "PLUGIN CREATOR_V3ONE");
  auto* creator = static_cast<IPluginCreatorV3One*>(list[0]);
  CHECK(std::string(creator->getPluginName()) == "Qwen3MoE");
  CHECK(std::string(creator->getPluginVersion()) == "1");
  CHECK(std::string(creator->getPluginNamespace()) == "qwen3_compile");
  PluginFieldCollection const* names = creator->getFieldNames();
  CHECK(names->nbFields == 3 && std::string(names->fields[0].name) == "top_k");

  // The node's attributes as the ONNX parser passes them.
  int32_t topk = 8, norm = 1;
  std::vector<PluginField> attrs = {{"top_k", &topk, PluginFieldType::kINT32, 1},
                                    {"normalize", &norm, PluginFieldType::kINT32, 1},
                                    {"activation", "silu", PluginFieldType::kCHAR, 5}};
  PluginFieldCollection fc = fields(attrs);
  IPluginV3* plugin = creator->createPlugin("moe0", &fc, TensorRTPhase::kBUILD);
  CHECK(plugin != nullptr);
  auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
  auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
  auto* rt = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  CHECK(core && build && rt);
  CHECK(std::string(core->getPluginName()) == "Qwen3MoE" && std::string(core->getPluginNamespace()) == "qwen3_compile");
  CHECK(std::string(core->getInterfaceInfo().kind) == "PLUGIN_V3ONE_CORE");
  CHECK(std::string(build->getInterfaceInfo().kind) == "PLUGIN_V3ONE_BUILD");
  CHECK(std::string(rt->getInterfaceInfo().kind) == "PLUGIN_V3ONE_RUNTIME");
  CHECK(build->getNbOutputs() == 1);

  DataType in_types[4] = {DataType::kBF16, DataType::kBF16, DataType::kBF16, DataType::kBF16};
  DataType out_type = DataType::kFLOAT;
  CHECK(build->getOutputDataTypes(&out_type, 1, in_types, 4) == 0 && out_type == DataType::kBF16);
  CHECK(build->getOutputDataTypes(&out_type, 1, in_types, 3) != 0);

  // Qwen3-30B-A3B layer: H 2048, I 768, E 128; N dynamic up to 2048.
  std::vector<DynamicPluginTensorDesc> io = {desc({-1, 2048}, DataType::kBF16, 2048),
                                             desc({-1, 128}, DataType::kBF16, 2048),
                                             desc({128, 1536, 2048}, DataType::kBF16),
                                             desc({128, 2048, 768}, DataType::kBF16),
                                             desc({-1, 2048}, DataType::kBF16, 2048)};
  for (int pos = 0; pos < 5; ++pos) CHECK(build->supportsFormatCombination(pos, io.data(), 4, 1));
  io[0].desc.type = DataType::kFLOAT;  // fp32 activations: not supported
  CHECK(!build->supportsFormatCombination(0, io.data(), 4, 1));
  io[0].desc.type = DataType::kBF16;
  io[2].desc.type = DataType::kINT8;  // int8 weights need the two scale inputs
  CHECK(!build->supportsFormatCombination(2, io.data(), 4, 1));
  io[2].desc.type = DataType::kBF16;
  io[4].desc.type = DataType::kHALF;  // output must match hidden
  CHECK(!build->supportsFormatCombination(4, io.data(), 4, 1));
  io[4].desc.type = DataType::kBF16;
  io[3].desc.format = TensorFormat::kHWC;
  CHECK(!build->supportsFormatCombination(3, io.data(), 4, 1));
  io[3].desc.format = TensorFormat::kLINEAR;

  CHECK(build->configurePlugin(io.data(), 4, io.data() + 4, 1) == 0);
  std::printf("workspace %zu\n", build->getWorkspaceSize(io.data(), 4, io.data() + 4, 1));
  io[3].desc.dims = dims({128, 2048, 700});  // down's I disagrees with gate_up's
  CHECK(build->configurePlugin(io.data(), 4, io.data() + 4, 1) != 0);
  io[2].desc.dims = dims({128, 1400, 2048});  // consistent, but I = 700 is not a multiple of 64
  CHECK(build->configurePlugin(io.data(), 4, io.data() + 4, 1) != 0);
  io[2].desc.dims = dims({128, 1536, 2048});
  io[3].desc.dims = dims({128, 2048, 768});

  // INT8 weights with fp16 scales: 6 inputs.
  std::vector<DynamicPluginTensorDesc> io8 = {io[0], io[1], desc({128, 1536, 2048}, DataType::kINT8),
                                              desc({128, 2048, 768}, DataType::kINT8), desc({128, 1536}, DataType::kHALF),
                                              desc({128, 2048}, DataType::kHALF), io[4]};
  for (int pos = 0; pos < 7; ++pos) CHECK(build->supportsFormatCombination(pos, io8.data(), 6, 1));
  CHECK(build->configurePlugin(io8.data(), 6, io8.data() + 6, 1) == 0);
  io8[5].desc.dims = dims({128, 1536});  // down_scale must be [E, H]
  CHECK(build->configurePlugin(io8.data(), 6, io8.data() + 6, 1) != 0);

  // INT4 weights (kINT4 tensors: the ONNX packing) with per-group fp16 scales, G = 128: [E, 2I, H/G], [E, H, I/G].
  std::vector<DynamicPluginTensorDesc> io4 = {io[0], io[1], desc({128, 1536, 2048}, DataType::kINT4),
                                              desc({128, 2048, 768}, DataType::kINT4),
                                              desc({128, 1536, 16}, DataType::kHALF),
                                              desc({128, 2048, 6}, DataType::kHALF), io[4]};
  for (int pos = 0; pos < 7; ++pos) CHECK(build->supportsFormatCombination(pos, io4.data(), 6, 1));
  CHECK(build->configurePlugin(io4.data(), 6, io4.data() + 6, 1) == 0);
  std::printf("int4 workspace %zu\n", build->getWorkspaceSize(io4.data(), 6, io4.data() + 6, 1));
  io4[3].desc.type = DataType::kINT8;  // gate_up and down must have one weight type
  CHECK(!build->supportsFormatCombination(3, io4.data(), 6, 1));
  io4[3].desc.type = DataType::kINT4;
  io4[4].desc.dims = dims({128, 1536});  // INT4 needs per-group scales
  io4[5].desc.dims = dims({128, 2048});
  CHECK(build->configurePlugin(io4.data(), 6, io4.data() + 6, 1) != 0);
  io4[4].desc.dims = dims({128, 1536, 16});  // G = 128 for gate_up, 64 for down
  io4[5].desc.dims = dims({128, 2048, 12});
  CHECK(build->configurePlugin(io4.data(), 6, io4.data() + 6, 1) != 0);
  io4[4].desc.dims = dims({128, 1536, 8});  // G = 256: not a group size of the kernels
  io4[5].desc.dims = dims({128, 2048, 3});
  CHECK(build->configurePlugin(io4.data(), 6, io4.data() + 6, 1) != 0);

  // Serialised fields recreate the same plugin (what deserialising an engine does).
  PluginFieldCollection const* ser = rt->getFieldsToSerialize();
  CHECK(ser->nbFields == 3);
  IPluginV3* again = creator->createPlugin("moe0", ser, TensorRTPhase::kRUNTIME);
  CHECK(again != nullptr);
  PluginFieldCollection const* ser2 =
      static_cast<IPluginV3OneRuntime*>(again->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
          ->getFieldsToSerialize();
  CHECK(ser2->nbFields == 3);
  for (int i = 0; i < 3; ++i) {
    CHECK(std::string(ser->fields[i].name) == ser2->fields[i].name);
    CHECK(ser->fields[i].type == ser2->fields[i].type && ser->fields[i].length == ser2->fields[i].length);
    size_t const bytes = ser->fields[i].type == PluginFieldType::kCHAR ? size_t(ser->fields[i].length) : 4;
    CHECK(std::memcmp(ser->fields[i].data, ser2->fields[i].data, bytes) == 0);
  }
  CHECK(*static_cast<int32_t const*>(ser->fields[0].data) == 8);
  IPluginV3* twin = plugin->clone();
  CHECK(twin != nullptr && twin != plugin);
  IPluginV3* attached = rt->attachToContext(nullptr);
  CHECK(attached != nullptr);

  // Attributes the kernels cannot honour are refused at creation.
  std::vector<PluginField> gelu = {{"top_k", &topk, PluginFieldType::kINT32, 1},
                                   {"activation", "gelu", PluginFieldType::kCHAR, 5}};
  PluginFieldCollection fc_gelu = fields(gelu);
  CHECK(creator->createPlugin("bad", &fc_gelu, TensorRTPhase::kBUILD) == nullptr);
  std::vector<PluginField> no_k = {{"normalize", &norm, PluginFieldType::kINT32, 1}};
  PluginFieldCollection fc_no_k = fields(no_k);
  CHECK(creator->createPlugin("bad", &fc_no_k, TensorRTPhase::kBUILD) == nullptr);
  std::vector<PluginField> unknown = {{"top_k", &topk, PluginFieldType::kINT32, 1},
                                      {"experts", &topk, PluginFieldType::kINT32, 1}};
  PluginFieldCollection fc_unknown = fields(unknown);
  CHECK(creator->createPlugin("bad", &fc_unknown, TensorRTPhase::kBUILD) == nullptr);

  delete attached;
  delete twin;
  delete again;
  delete plugin;
  std::printf("OK\n");
  return 0;
}
