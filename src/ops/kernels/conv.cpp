// Convolutions for MindSpore graphs (ops.Custom, func_type "aot", src/ops/conv.py), run by the oneDNN library that
// MindSpore itself ships (mindspore/lib/libdnnl.so.3).
//
// Why: MindSpore's own CPU Conv2D gives oneDNN plain OIHW weights. With plain weights oneDNN's AVX-512 code path
// ends in a reference loop, so it has to be capped at AVX2 (im2col + AVX2 GEMM; bench/bench_conv.py measures both).
// Here oneDNN chooses the weight and activation layouts itself ("any"), which selects its AVX-512 kernels; the
// NCHW tensors MindSpore holds are reordered in and out around each call, except where a chain of our
// convolutions passes oneDNN's blocked nChw16c tensors under their NCHW shape (the ResNet stages; only
// elementwise MindSpore operators touch them in between).
//
// Convolution entry points, one per stride S and padding P (on every side) of MASKRCNN_CONV_GEOMETRIES (constants.h;
// e.g. ConvForwardS2P1); tensors are float32 NCHW / OIHW, biases and scales (O,), and the flags `f` are an int32
// tensor whose shape (3 dimensions, each 1 or 2) says whether x (and dx) and y (and dy) are held NCHW (1) or
// blocked (2), and whether the products take bfloat16 inputs (2) or float32 ones (1): shapes, not values, because
// MindSpore shows each entry point's Init the shapes only, and the workspaces it asks for depend on the flags.
// Its values (all the same) say whether the call is skipped: nonzero skips the pass and writes zeros to its
// outputs, so a graph can leave out work that depends on data without a branch.
// In bfloat16 the pass's two inputs are rounded to bfloat16 by the reorders that bring them into the primitive's
// layout (AVX512-BF16 / AMX kernels), its output and accumulation stay float32.
// (oneDNN's fpmath mode bf16 would say the same for float32 tensors, but its convolutions ignore it on CPUs
// without AMX.)
//   ConvForward(x, w, b, s, f) -> y = conv(x, w * s) + b     ConvReluForward: the same, then ReLU (a post-op)
//   ConvBackwardData(dy, w, x, s, f) -> dx                    (x gives dx's shape only)
//   ConvBackwardWeights(x, dy, w, s, f) -> dw, db             (w gives dw's shape only; db = dy summed per channel)
//   DeconvForward(x, w, b, f) -> y (NCHW)                     (transposed convolution = backward data, + b; f's
//   DeconvReluForward: the same, then ReLU                     layout flags must be 0)
// where s scales each output channel's filter (a frozen BatchNorm folded in; ones otherwise), applied while the
// weights are reordered anyway; plus BiasGrad(dy) -> db, the deconvolution's bias gradient.
#include <map>
#include <stdexcept>
#include <unordered_map>

#include "common.h"

namespace maskrcnn_ops {
namespace {

enum class Pass { kForward, kBackwardData, kBackwardWeights };

// One convolution problem: the layouts oneDNN chose for it, the compiled primitive and the scratchpad it asks for.
struct Plan {
  dnnl::primitive primitive;
  memory::desc src, weights, dst, scratchpad;
};

// Compiled plans by problem, and buffers for the reordered copies of the source, weights and destination and for
// the primitives' scratchpads (user mode), one per slot. A call's buffers are workspaces MindSpore lends it from
// its memory pool (each entry point's Init asks for them), so they take pool memory free at that point of the
// graph instead of being held for the whole run; the kept buffers serve only a call without workspaces.
enum Slot { kSrcSlot = 0, kWeightsSlot = 1, kDstSlot = 2, kScratchpadSlot = 3, kSlots };

struct ConvCache {
  std::map<std::vector<int64_t>, Plan> plans;
  std::vector<float> scratch[kSlots];
};

ConvCache &GetCache() {
  static ConvCache cache;
  return cache;
}

// One call: the convolution's plain float32 buffers (for the backward passes the gradients of them), of which
// the pass reads two and writes the third; its bias: read by the forward pass, written (the gradient) by the
// backward-weights pass, added after the backward-data pass when it serves as a transposed convolution (null:
// none); and the per-output-channel filter scale (null: none).
struct Conv {
  Pass pass;
  const int64_t *src_shape, *weights_shape, *dst_shape;
  float *src, *weights, *dst, *bias, *scale;
  int stride, pad;
  bool relu;  // ReLU on the output of a forward or transposed-convolution pass
  bool src_blocked, dst_blocked;  // the layouts src and dst are held in: nChw16c, else NCHW
  bool bf16_math;                 // the pass's inputs rounded to bfloat16, its output float32
  void *workspace[kSlots];        // MindSpore's workspace per slot (null: none), WorkspaceBytes large
};

// The flags tensor's dimensions (see the top of this file).
enum Flag { kSrcBlockedFlag = 0, kDstBlockedFlag = 1, kBf16MathFlag = 2, kFlags };

memory::desc Any(const memory::dims &dims, memory::data_type type = memory::data_type::f32) {
  return memory::desc(dims, type, memory::format_tag::any);
}

// A held side's descriptor in the primitive: its fixed blocked layout, else oneDNN's choice.
memory::desc Side(const memory::dims &dims, bool blocked, memory::data_type type) {
  if (!blocked) return Any(dims, type);
  return memory::desc(dims, type, memory::format_tag::nChw16c);
}

memory::desc BiasDesc(const memory::dims &weights) {
  return memory::desc({weights[0]}, memory::data_type::f32, memory::format_tag::a);
}

Plan MakePlan(Runtime &rt, const Conv &conv, const memory::dims &src, const memory::dims &weights,
              const memory::dims &dst) {
  using namespace dnnl;
  memory::dims strides = {conv.stride, conv.stride}, pads = {conv.pad, conv.pad};
  // a blocked tensor fixes its side's layout; otherwise oneDNN chooses. In bf16 the pass's inputs are bf16:
  // forward src and weights, backward-data diff_dst and weights, backward-weights src and diff_dst.
  using type = memory::data_type;
  type input = conv.bf16_math ? type::bf16 : type::f32;
  bool src_in = conv.pass != Pass::kBackwardData, dst_in = conv.pass != Pass::kForward;
  bool weights_in = conv.pass != Pass::kBackwardWeights;
  memory::desc src_md = Side(src, conv.src_blocked, src_in ? input : type::f32);
  memory::desc dst_md = Side(dst, conv.dst_blocked, dst_in ? input : type::f32);
  memory::desc weights_md = Any(weights, weights_in ? input : type::f32);
  // The backward passes' hint: the forward pass over the same tensors in the inputs' type.
  memory::desc hint_src = Side(src, conv.src_blocked, input), hint_dst = Side(dst, conv.dst_blocked, input);
  primitive_attr attr;
  attr.set_scratchpad_mode(scratchpad_mode::user);
  if (conv.pass == Pass::kForward && conv.relu) {
    post_ops ops;
    ops.append_eltwise(algorithm::eltwise_relu, 0.0f, 0.0f);
    attr.set_post_ops(ops);
  }
  if (conv.pass == Pass::kForward) {
    auto forward = convolution_forward::primitive_desc(
        rt.engine, prop_kind::forward_training, algorithm::convolution_direct, src_md, weights_md,
        BiasDesc(weights), dst_md, strides, pads, pads, attr);
    return {convolution_forward(forward), forward.src_desc(), forward.weights_desc(), forward.dst_desc(),
            forward.scratchpad_desc()};
  }
  auto forward = convolution_forward::primitive_desc(
      rt.engine, prop_kind::forward_training, algorithm::convolution_direct, hint_src, Any(weights, input),
      BiasDesc(weights), hint_dst, strides, pads, pads);
  if (conv.pass == Pass::kBackwardData) {
    auto pd = convolution_backward_data::primitive_desc(rt.engine, algorithm::convolution_direct, src_md,
                                                        weights_md, dst_md, strides, pads, pads, forward, attr);
    return {convolution_backward_data(pd), pd.diff_src_desc(), pd.weights_desc(), pd.diff_dst_desc(),
            pd.scratchpad_desc()};
  }
  auto pd = convolution_backward_weights::primitive_desc(rt.engine, algorithm::convolution_direct, src_md,
                                                         weights_md, BiasDesc(weights), dst_md, strides, pads,
                                                         pads, forward, attr);
  return {convolution_backward_weights(pd), pd.src_desc(), pd.diff_weights_desc(), pd.diff_dst_desc(),
          pd.scratchpad_desc()};
}

// The compiled plan of the call's problem (made on first use).
const Plan &FindPlan(Runtime &rt, const Conv &conv) {
  memory::dims src = Dims(conv.src_shape), weights = Dims(conv.weights_shape), dst = Dims(conv.dst_shape);
  std::vector<int64_t> key = {static_cast<int64_t>(conv.pass), conv.stride, conv.pad, conv.relu, conv.src_blocked,
                              conv.dst_blocked, conv.bf16_math};
  for (const auto *dims : {&src, &weights, &dst}) key.insert(key.end(), dims->begin(), dims->end());
  auto &plans = GetCache().plans;
  auto found = plans.find(key);
  if (found == plans.end()) found = plans.emplace(key, MakePlan(rt, conv, src, weights, dst)).first;
  return found->second;
}

// The bytes each slot needs in a call: a side's copy where the primitive's layout is not the held one, the
// weights' copy always (a filter scale, known only at the call, makes one), the primitive's scratchpad. At least
// one float each, so that every workspace has an address.
std::vector<size_t> WorkspaceBytes(const Plan &plan, const Conv &conv) {
  auto copy = [](const memory::desc &wanted, const memory::desc &held) {
    return wanted == held ? size_t{0} : wanted.get_size();
  };
  std::vector<size_t> bytes = {copy(plan.src, Held(Dims(conv.src_shape), conv.src_blocked)), plan.weights.get_size(),
                               copy(plan.dst, Held(Dims(conv.dst_shape), conv.dst_blocked)),
                               plan.scratchpad.get_size()};
  for (size_t &size : bytes) size = std::max(size, sizeof(float));
  return bytes;
}

// A memory of `desc` over the call's workspace for the slot if it has one, else over the slot's kept buffer, grown
// when needed.
memory Scratch(Runtime &rt, const Conv &conv, Slot slot, const memory::desc &desc) {
  if (conv.workspace[slot] != nullptr) return memory(desc, rt.engine, conv.workspace[slot]);
  std::vector<float> &buffer = GetCache().scratch[slot];
  size_t floats = (desc.get_size() + sizeof(float) - 1) / sizeof(float);
  if (buffer.size() < floats) buffer.resize(floats);
  return memory(desc, rt.engine, buffer.data());
}

// The tensor as MindSpore holds it when the primitive wants that layout and nothing is scaled, else a reordered
// copy.
memory Inbound(Runtime &rt, const Conv &conv, Slot slot, const memory::desc &wanted, const memory &held,
               const float *scale = nullptr) {
  if (wanted == held.get_desc() && scale == nullptr) return held;
  memory copy = Scratch(rt, conv, slot, wanted);
  Reorder(rt, held, copy, scale);
  return copy;
}

// y[n, c] += bias[c] (then ReLU) over a plain (N, C, H, W) tensor.
void AddBias(Runtime &rt, float *y, const int64_t *shape, const float *bias, bool relu) {
  int64_t channels = shape[1], plane = shape[2] * shape[3];
  ParallelRange(rt, shape[0] * channels, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      float b = bias[job % channels], *values = y + job * plane;
      if (relu) {
        for (int64_t i = 0; i < plane; ++i) values[i] = std::max(values[i] + b, 0.0f);
      } else {
        for (int64_t i = 0; i < plane; ++i) values[i] += b;
      }
    }
  });
}

// Runs one pass (see Conv).
int Run(const Conv &conv) {
  Runtime &rt = GetRuntime();
  try {
    std::lock_guard<std::mutex> lock(rt.mutex);
    memory::dims src_dims = Dims(conv.src_shape), weights_dims = Dims(conv.weights_shape);
    memory::dims dst_dims = Dims(conv.dst_shape);
    const Plan &plan = FindPlan(rt, conv);
    memory src_held(Held(src_dims, conv.src_blocked), rt.engine, conv.src);
    memory weights_held(Plain(weights_dims), rt.engine, conv.weights);
    memory dst_held(Held(dst_dims, conv.dst_blocked), rt.engine, conv.dst);

    // The output of the pass is written into the primitive's layout, then reordered into the held buffer.
    memory *output_held = nullptr;
    const memory::desc *output_desc = nullptr;
    Slot output_slot;
    std::unordered_map<int, memory> args;
    if (conv.pass == Pass::kForward) {
      args[DNNL_ARG_SRC] = Inbound(rt, conv, kSrcSlot, plan.src, src_held);
      args[DNNL_ARG_WEIGHTS] = Inbound(rt, conv, kWeightsSlot, plan.weights, weights_held, conv.scale);
      args[DNNL_ARG_BIAS] = memory(BiasDesc(weights_dims), rt.engine, conv.bias);
      output_held = &dst_held, output_desc = &plan.dst, output_slot = kDstSlot;
    } else if (conv.pass == Pass::kBackwardData) {
      args[DNNL_ARG_DIFF_DST] = Inbound(rt, conv, kDstSlot, plan.dst, dst_held);
      args[DNNL_ARG_WEIGHTS] = Inbound(rt, conv, kWeightsSlot, plan.weights, weights_held, conv.scale);
      output_held = &src_held, output_desc = &plan.src, output_slot = kSrcSlot;
    } else {
      args[DNNL_ARG_SRC] = Inbound(rt, conv, kSrcSlot, plan.src, src_held);
      args[DNNL_ARG_DIFF_DST] = Inbound(rt, conv, kDstSlot, plan.dst, dst_held);
      args[DNNL_ARG_DIFF_BIAS] = memory(BiasDesc(weights_dims), rt.engine, conv.bias);
      output_held = &weights_held, output_desc = &plan.weights, output_slot = kWeightsSlot;
    }
    const float *output_scale = conv.pass == Pass::kBackwardWeights ? conv.scale : nullptr;  // d(w * s)/dw = s
    memory output = *output_desc == output_held->get_desc() && output_scale == nullptr
                        ? *output_held : Scratch(rt, conv, output_slot, *output_desc);
    int output_arg = conv.pass == Pass::kForward ? DNNL_ARG_DST
                     : conv.pass == Pass::kBackwardData ? DNNL_ARG_DIFF_SRC : DNNL_ARG_DIFF_WEIGHTS;
    args[output_arg] = output;
    if (plan.scratchpad.get_size() > 0) {
      args[DNNL_ARG_SCRATCHPAD] = Scratch(rt, conv, kScratchpadSlot, plan.scratchpad);
    }
    plan.primitive.execute(rt.stream, args);
    if (output.get() != output_held->get()) Reorder(rt, output, *output_held, output_scale);
    rt.stream.wait();
    if (conv.pass == Pass::kBackwardData && conv.bias != nullptr) AddBias(rt, conv.src, conv.src_shape, conv.bias,
                                                                           conv.relu);
    return kOk;
  } catch (const std::exception &error) {
    return ReportOneDnnFailure(error);
  }
}

// The argument slots of each kind of entry point, in MindSpore's order: inputs, then outputs.
enum ForwardArg { kForwardX, kForwardW, kForwardBias, kForwardScale, kForwardFlags, kForwardY };
enum BackwardDataArg { kBackwardDataDy, kBackwardDataW, kBackwardDataX, kBackwardDataScale, kBackwardDataFlags,
                       kBackwardDataDx };  // x gives dx's shape only
enum BackwardWeightsArg { kBackwardWeightsX, kBackwardWeightsDy, kBackwardWeightsW, kBackwardWeightsScale,
                          kBackwardWeightsFlags, kBackwardWeightsDw, kBackwardWeightsDb };  // w gives dw's shape
enum DeconvArg { kDeconvX, kDeconvW, kDeconvBias, kDeconvFlags, kDeconvY };
constexpr int kAbsent = -1;

// Where a pass finds the convolution's tensors: params[src], [weights], [dst] are its 4-d tensors (for the
// backward passes their gradients), params[bias] its 1-d bias, params[scale] its 1-d filter scale and
// params[flags] its int32 flags; the first `inputs` of the nparam are inputs, the rest outputs.
struct Slots {
  int inputs, src, weights, dst, bias, scale, flags;
};
constexpr Slots kForwardSlots = {kForwardY, kForwardX, kForwardW, kForwardY,
                                 kForwardBias, kForwardScale, kForwardFlags};
constexpr Slots kBackwardDataSlots = {kBackwardDataDx, kBackwardDataDx, kBackwardDataW, kBackwardDataDy,
                                      kAbsent, kBackwardDataScale, kBackwardDataFlags};
constexpr Slots kBackwardWeightsSlots = {kBackwardWeightsDw, kBackwardWeightsX, kBackwardWeightsDw,
                                         kBackwardWeightsDy, kBackwardWeightsDb, kBackwardWeightsScale,
                                         kBackwardWeightsFlags};
// A transposed convolution is a convolution's backward-data pass: its x is that pass's dy, its y the dx.
constexpr Slots kDeconvSlots = {kDeconvY, kDeconvY, kDeconvW, kDeconvX, kDeconvBias, kAbsent, kDeconvFlags};

// The call's convolution from MindSpore's arguments (tensor pointers null when `params` is), or kBadArguments.
int Describe(Pass pass, Slots slots, bool relu, int stride, int pad, int tensors, void **params, const int *ndims,
             int64_t **shapes, const char **dtypes, Conv *conv) {
  for (int i = 0; i < tensors; ++i) {
    bool vector = i == slots.bias || i == slots.scale;
    int rank = i == slots.flags ? kFlags : vector ? 1 : 4;
    if (ndims[i] != rank || !IsDtype(dtypes[i], i == slots.flags ? "int32" : "float32")) return kBadArguments;
  }
  const int64_t *flags = shapes[slots.flags];
  if (!std::all_of(flags, flags + kFlags, [](int64_t dim) { return dim == 1 || dim == 2; })) return kBadArguments;
  auto tensor = [&](int slot) { return slot < 0 || params == nullptr ? nullptr : static_cast<float *>(params[slot]); };
  // A scale of ones (every layer without a folded norm) is no scale: the weights then skip the scaled reorder.
  float *scale = tensor(slots.scale);
  if (scale != nullptr && std::all_of(scale, scale + shapes[slots.weights][0], [](float s) { return s == 1.0f; })) {
    scale = nullptr;
  }
  *conv = Conv{pass, shapes[slots.src], shapes[slots.weights], shapes[slots.dst], tensor(slots.src),
               tensor(slots.weights), tensor(slots.dst), tensor(slots.bias), scale, stride, pad, relu,
               flags[kSrcBlockedFlag] == 2, flags[kDstBlockedFlag] == 2, flags[kBf16MathFlag] == 2, {}};
  return kOk;
}

int Outputs(Pass pass) { return pass == Pass::kBackwardWeights ? 2 : 1; }

// At graph compile time: makes the call's plan and asks MindSpore for its workspaces.
int Init(Pass pass, Slots slots, bool relu, int stride, int pad, const int *ndims, int64_t **shapes,
         const char **dtypes, void *extra) {
  Conv conv;
  int status = Describe(pass, slots, relu, stride, pad, slots.inputs + Outputs(pass), nullptr, ndims, shapes, dtypes,
                        &conv);
  if (status != kOk) return status;
  Runtime &rt = GetRuntime();
  try {
    std::lock_guard<std::mutex> lock(rt.mutex);
    RequestWorkspaces(extra, WorkspaceBytes(FindPlan(rt, conv), conv));
    return kOk;
  } catch (const std::exception &error) {
    return ReportOneDnnFailure(error);
  }
}

int Call(Pass pass, Slots slots, bool relu, int stride, int pad, int nparam, void **params, const int *ndims,
         int64_t **shapes, const char **dtypes) {
  int tensors = slots.inputs + Outputs(pass);
  if (nparam != tensors && nparam != tensors + kSlots) return kBadArguments;
  Conv conv;
  int status = Describe(pass, slots, relu, stride, pad, tensors, params, ndims, shapes, dtypes, &conv);
  if (status != kOk) return status;
  if (*static_cast<const int32_t *>(params[slots.flags]) != 0) {  // skipped: zeros out
    for (int i = slots.inputs; i < tensors; ++i) {
      int64_t count = 1;
      for (int d = 0; d < ndims[i]; ++d) count *= shapes[i][d];
      std::fill_n(static_cast<float *>(params[i]), count, 0.0f);
    }
    return kOk;
  }
  if (nparam == tensors + kSlots) std::copy(params + tensors, params + nparam, conv.workspace);
  return Run(conv);
}

// BiasGrad(dy (N, C, H, W)) -> db (C,): dy summed over everything but the channel.
int BiasGrad(int nparam, void **params, const int *ndims, int64_t **shapes, const char **dtypes) {
  enum Arg { kDy, kDb, kArgs };
  if (nparam != kArgs || ndims[kDy] != 4 || ndims[kDb] != 1 || !IsDtype(dtypes[kDy], "float32")) {
    return kBadArguments;
  }
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  const int64_t *shape = shapes[kDy];
  int64_t channels = shape[1], plane = shape[2] * shape[3];
  const float *dy = static_cast<const float *>(params[kDy]);
  float *db = static_cast<float *>(params[kDb]);
  ParallelRange(rt, channels, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sum = 0.0;
      for (int64_t n = 0; n < shape[0]; ++n) {
        const float *values = dy + (n * channels + c) * plane;
        float partial = 0.0f;
        for (int64_t i = 0; i < plane; ++i) partial += values[i];
        sum += partial;
      }
      db[c] = static_cast<float>(sum);
    }
  });
  return kOk;
}

}  // namespace
}  // namespace maskrcnn_ops

using maskrcnn_ops::Pass;

MASKRCNN_ENTRY_POINT(BiasGrad) { return maskrcnn_ops::BiasGrad(nparam, params, ndims, shapes, dtypes); }

// Bytes held by the kept buffer of a slot (0 src, 1 weights, 2 dst, 3 scratchpad): how much the workspaces missed.
extern "C" int64_t ConvKeptBufferBytes(int slot) {
  if (slot < 0 || slot >= maskrcnn_ops::kSlots) return -1;
  return static_cast<int64_t>(maskrcnn_ops::GetCache().scratch[slot].size() * sizeof(float));
}

// One set of entry points per (stride, padding on every side): MindSpore keys a custom operator's shape
// inference by its function name, so the geometry has to be part of the name.
#define CONV_ENTRY_POINT(NAME, STRIDE, PAD, PASS, RELU, SLOTS)                                                 \
  MASKRCNN_INIT_POINT(NAME##S##STRIDE##P##PAD) {                                                                \
    return maskrcnn_ops::Init(PASS, maskrcnn_ops::SLOTS, RELU, STRIDE, PAD, ndims, shapes, dtypes, extra);      \
  }                                                                                                              \
  MASKRCNN_ENTRY_POINT(NAME##S##STRIDE##P##PAD) {                                                               \
    return maskrcnn_ops::Call(PASS, maskrcnn_ops::SLOTS, RELU, STRIDE, PAD, nparam, params, ndims, shapes, dtypes); \
  }
#define CONV_ENTRY_POINTS(STRIDE, PAD)                                                                          \
  CONV_ENTRY_POINT(ConvForward, STRIDE, PAD, Pass::kForward, false, kForwardSlots)                              \
  CONV_ENTRY_POINT(ConvReluForward, STRIDE, PAD, Pass::kForward, true, kForwardSlots)                           \
  CONV_ENTRY_POINT(ConvBackwardData, STRIDE, PAD, Pass::kBackwardData, false, kBackwardDataSlots)               \
  CONV_ENTRY_POINT(ConvBackwardWeights, STRIDE, PAD, Pass::kBackwardWeights, false, kBackwardWeightsSlots)      \
  CONV_ENTRY_POINT(DeconvForward, STRIDE, PAD, Pass::kBackwardData, false, kDeconvSlots)                        \
  CONV_ENTRY_POINT(DeconvReluForward, STRIDE, PAD, Pass::kBackwardData, true, kDeconvSlots)

MASKRCNN_CONV_GEOMETRIES(CONV_ENTRY_POINTS)
