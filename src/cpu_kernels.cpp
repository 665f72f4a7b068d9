// CPU kernels for MindSpore graphs (ops.Custom, func_type "aot"): convolutions run by the oneDNN library that
// MindSpore itself ships (mindspore/lib/libdnnl.so.3), then RoIAlign over an FPN pyramid, the mask targets, the
// max-IoU assigner, the FPN merge and layout conversion, each in its section below.
//
// Why: MindSpore's own CPU Conv2D gives oneDNN plain OIHW weights. With plain weights oneDNN's AVX-512 code path
// ends in a reference loop (~1 GFLOP/s), so it had to be capped at AVX2 (im2col + AVX2 GEMM, ~190 GFLOP/s).
// Here oneDNN chooses the weight and activation layouts itself ("any"), which selects its AVX-512 kernels; the
// NCHW tensors MindSpore holds are reordered in and out around each call, except where a chain of our
// convolutions passes oneDNN's blocked nChw16c tensors under their NCHW shape (the ResNet stages; only
// elementwise MindSpore operators touch them in between).
//
// Convolution entry points, each for stride S in {1, 2} and padding P in {0..3} on every side (e.g.
// ConvForwardS2P1); tensors are float32 NCHW / OIHW, biases and scales (O,), and `l` (2,) int32 says whether x
// (and dx) and y (and dy) are held NCHW (0) or blocked (1):
//   ConvForward(x, w, b, s, l) -> y = conv(x, w * s) + b     ConvReluForward: the same, then ReLU (a post-op)
//   ConvBackwardData(dy, w, x, s, l) -> dx                    (x gives dx's shape only)
//   ConvBackwardWeights(x, dy, w, s, l) -> dw, db             (w gives dw's shape only; db = dy summed per channel)
//   DeconvForward(x, w, b) -> y (NCHW)                        (transposed convolution = backward data, + b)
//   DeconvReluForward: the same, then ReLU
// where s scales each output channel's filter (a frozen BatchNorm folded in; ones otherwise), applied while the
// weights are reordered anyway; plus BiasGrad(dy) -> db, the deconvolution's bias gradient.
#include <oneapi/dnnl/dnnl.hpp>
#include <oneapi/dnnl/dnnl_threadpool.hpp>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

using dnnl::memory;

// oneDNN built with its "threadpool" runtime (as MindSpore's is) runs on a pool its caller provides.
class ThreadPool : public dnnl::threadpool_interop::threadpool_iface {
 public:
  explicit ThreadPool(int threads) : threads_(threads) {
    for (int t = 1; t < threads_; ++t) workers_.emplace_back([this] { Work(); });
  }
  ~ThreadPool() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto &worker : workers_) worker.join();
  }
  int get_num_threads() const override { return threads_; }
  bool get_in_parallel() const override { return in_parallel_; }
  uint64_t get_flags() const override { return 0; }  // synchronous: parallel_for returns when all jobs are done
  void wait() override {}
  void parallel_for(int jobs, const std::function<void(int, int)> &fn) override {
    if (jobs <= 1 || workers_.empty()) {
      for (int i = 0; i < jobs; ++i) fn(i, jobs);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      jobs_ = jobs;
      next_job_ = 0;
      idle_workers_ = 0;
      ++generation_;
    }
    wake_.notify_all();
    in_parallel_ = true;
    RunJobs();
    in_parallel_ = false;
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return idle_workers_ == static_cast<int>(workers_.size()); });
  }

 private:
  void RunJobs() {
    for (;;) {
      int job;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (next_job_ >= jobs_) return;
        job = next_job_++;
      }
      (*fn_)(job, jobs_);
    }
  }
  void Work() {
    in_parallel_ = true;
    int64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
      }
      RunJobs();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        ++idle_workers_;
      }
      done_.notify_one();
    }
  }

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int, int)> *fn_ = nullptr;
  int jobs_ = 0, next_job_ = 0, idle_workers_ = 0;
  int64_t generation_ = 0;
  bool stopping_ = false;
  static thread_local bool in_parallel_;
};
thread_local bool ThreadPool::in_parallel_ = false;

int AvailableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return CPU_COUNT(&set) > 0 ? CPU_COUNT(&set) : 1;
}

enum class Pass { kForward, kBackwardData, kBackwardWeights };

// One convolution problem: the layouts oneDNN chose for it and the compiled primitive.
struct Plan {
  dnnl::primitive primitive;
  memory::desc src, weights, dst;
};

struct Runtime {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  ThreadPool pool{AvailableCpus()};
  dnnl::stream stream = dnnl::threadpool_interop::make_stream(engine, &pool);
  std::mutex mutex;  // MindSpore may launch kernels from several threads; the pool runs one call at a time
  std::map<std::vector<int64_t>, Plan> plans;
  // Reordered copies of the source, weights and destination, kept between calls: freeing and allocating them
  // anew costs page faults on every call.
  std::vector<float> scratch[3];
};

enum Slot { kSrcSlot = 0, kWeightsSlot = 1, kDstSlot = 2 };

Runtime &GetRuntime() {
  static Runtime runtime;
  return runtime;
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
};

memory::dims Dims(const int64_t *shape) { return memory::dims(shape, shape + 4); }

memory::desc Plain(const memory::dims &dims) {
  return memory::desc(dims, memory::data_type::f32, memory::format_tag::abcd);
}

memory::desc Blocked(const memory::dims &dims) {
  return memory::desc(dims, memory::data_type::f32, memory::format_tag::nChw16c);
}

// How MindSpore holds a convolution's activation tensor.
memory::desc Held(const memory::dims &dims, bool blocked) { return blocked ? Blocked(dims) : Plain(dims); }

memory::desc Any(const memory::dims &dims) {
  return memory::desc(dims, memory::data_type::f32, memory::format_tag::any);
}

memory::desc BiasDesc(const memory::dims &weights) {
  return memory::desc({weights[0]}, memory::data_type::f32, memory::format_tag::a);
}

Plan MakePlan(Runtime &rt, const Conv &conv, const memory::dims &src, const memory::dims &weights,
              const memory::dims &dst) {
  using namespace dnnl;
  memory::dims strides = {conv.stride, conv.stride}, pads = {conv.pad, conv.pad};
  // a blocked tensor fixes its side's layout; otherwise oneDNN chooses
  memory::desc src_md = conv.src_blocked ? Blocked(src) : Any(src), dst_md = conv.dst_blocked ? Blocked(dst) : Any(dst);
  primitive_attr attr;
  if (conv.pass == Pass::kForward && conv.relu) {
    post_ops ops;
    ops.append_eltwise(algorithm::eltwise_relu, 0.0f, 0.0f);
    attr.set_post_ops(ops);
  }
  auto forward = convolution_forward::primitive_desc(
      rt.engine, prop_kind::forward_training, algorithm::convolution_direct, src_md, Any(weights),
      BiasDesc(weights), dst_md, strides, pads, pads, attr);
  switch (conv.pass) {
    case Pass::kForward:
      return {convolution_forward(forward), forward.src_desc(), forward.weights_desc(), forward.dst_desc()};
    case Pass::kBackwardData: {
      auto pd = convolution_backward_data::primitive_desc(rt.engine, algorithm::convolution_direct, src_md,
                                                          Any(weights), dst_md, strides, pads, pads, forward);
      return {convolution_backward_data(pd), pd.diff_src_desc(), pd.weights_desc(), pd.diff_dst_desc()};
    }
    case Pass::kBackwardWeights: {
      auto pd = convolution_backward_weights::primitive_desc(rt.engine, algorithm::convolution_direct, src_md,
                                                             Any(weights), BiasDesc(weights), dst_md, strides,
                                                             pads, pads, forward);
      return {convolution_backward_weights(pd), pd.src_desc(), pd.diff_weights_desc(), pd.diff_dst_desc()};
    }
  }
  throw std::logic_error("unknown pass");
}

// A memory of `desc` over the slot's kept buffer, grown when needed.
memory Scratch(Runtime &rt, Slot slot, const memory::desc &desc) {
  std::vector<float> &buffer = rt.scratch[slot];
  size_t floats = (desc.get_size() + sizeof(float) - 1) / sizeof(float);
  if (buffer.size() < floats) buffer.resize(floats);
  return memory(desc, rt.engine, buffer.data());
}

// Copies `from` into `to` (the layouts may differ), multiplying index o of dimension 0 by scale[o] if scale is set.
void Reorder(Runtime &rt, const memory &from, const memory &to, const float *scale) {
  if (scale == nullptr) {
    dnnl::reorder(from, to).execute(rt.stream, const_cast<memory &>(from), const_cast<memory &>(to));
    return;
  }
  dnnl::primitive_attr attr;
  attr.set_scales_mask(DNNL_ARG_SRC, 1);
  dnnl::reorder::primitive_desc pd(rt.engine, from.get_desc(), rt.engine, to.get_desc(), attr);
  memory scales(memory::desc({from.get_desc().get_dims()[0]}, memory::data_type::f32, memory::format_tag::a),
                rt.engine, const_cast<float *>(scale));
  dnnl::reorder(pd).execute(rt.stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                        {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, scales}});
}

// The tensor as MindSpore holds it when the primitive wants that layout and nothing is scaled, else a reordered
// copy.
memory Inbound(Runtime &rt, Slot slot, const memory::desc &wanted, const memory &held, const float *scale = nullptr) {
  if (wanted == held.get_desc() && scale == nullptr) return held;
  memory copy = Scratch(rt, slot, wanted);
  Reorder(rt, held, copy, scale);
  return copy;
}

// Splits [0, n) over the pool's threads.
template <typename Body>
void ParallelRange(Runtime &rt, int64_t n, Body body) {
  int jobs = static_cast<int>(std::min<int64_t>(n, rt.pool.get_num_threads()));
  rt.pool.parallel_for(jobs, [&](int job, int total) {
    body(n * job / total, n * (job + 1) / total);
  });
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
    std::vector<int64_t> key = {static_cast<int64_t>(conv.pass), conv.stride, conv.pad, conv.relu, conv.src_blocked,
                                conv.dst_blocked};
    for (const auto *dims : {&src_dims, &weights_dims, &dst_dims}) key.insert(key.end(), dims->begin(), dims->end());
    auto found = rt.plans.find(key);
    if (found == rt.plans.end()) {
      found = rt.plans.emplace(key, MakePlan(rt, conv, src_dims, weights_dims, dst_dims)).first;
    }
    const Plan &plan = found->second;
    memory src_held(Held(src_dims, conv.src_blocked), rt.engine, conv.src);
    memory weights_held(Plain(weights_dims), rt.engine, conv.weights);
    memory dst_held(Held(dst_dims, conv.dst_blocked), rt.engine, conv.dst);

    // The output of the pass is written into the primitive's layout, then reordered into the held buffer.
    memory *output_held = nullptr;
    const memory::desc *output_desc = nullptr;
    Slot output_slot;
    std::unordered_map<int, memory> args;
    if (conv.pass == Pass::kForward) {
      args[DNNL_ARG_SRC] = Inbound(rt, kSrcSlot, plan.src, src_held);
      args[DNNL_ARG_WEIGHTS] = Inbound(rt, kWeightsSlot, plan.weights, weights_held, conv.scale);
      args[DNNL_ARG_BIAS] = memory(BiasDesc(weights_dims), rt.engine, conv.bias);
      output_held = &dst_held, output_desc = &plan.dst, output_slot = kDstSlot;
    } else if (conv.pass == Pass::kBackwardData) {
      args[DNNL_ARG_DIFF_DST] = Inbound(rt, kDstSlot, plan.dst, dst_held);
      args[DNNL_ARG_WEIGHTS] = Inbound(rt, kWeightsSlot, plan.weights, weights_held, conv.scale);
      output_held = &src_held, output_desc = &plan.src, output_slot = kSrcSlot;
    } else {
      args[DNNL_ARG_SRC] = Inbound(rt, kSrcSlot, plan.src, src_held);
      args[DNNL_ARG_DIFF_DST] = Inbound(rt, kDstSlot, plan.dst, dst_held);
      args[DNNL_ARG_DIFF_BIAS] = memory(BiasDesc(weights_dims), rt.engine, conv.bias);
      output_held = &weights_held, output_desc = &plan.weights, output_slot = kWeightsSlot;
    }
    const float *output_scale = conv.pass == Pass::kBackwardWeights ? conv.scale : nullptr;  // d(w * s)/dw = s
    memory output = *output_desc == output_held->get_desc() && output_scale == nullptr
                        ? *output_held : Scratch(rt, output_slot, *output_desc);
    int output_arg = conv.pass == Pass::kForward ? DNNL_ARG_DST
                     : conv.pass == Pass::kBackwardData ? DNNL_ARG_DIFF_SRC : DNNL_ARG_DIFF_WEIGHTS;
    args[output_arg] = output;
    plan.primitive.execute(rt.stream, args);
    if (output.get() != output_held->get()) Reorder(rt, output, *output_held, output_scale);
    rt.stream.wait();
    if (conv.pass == Pass::kBackwardData && conv.bias != nullptr) AddBias(rt, conv.src, conv.src_shape, conv.bias,
                                                                           conv.relu);
    return 0;
  } catch (const std::exception &error) {
    std::fprintf(stderr, "cpu_kernels: oneDNN failed: %s\n", error.what());
    return 1;
  }
}

// The argument slots of an entry point: params[src], [weights], [dst] are the convolution's 4-d tensors,
// params[bias] its 1-d bias, params[scale] its 1-d filter scale and params[layout] its int32 layout flags
// (-1: none); `inputs` of the nparam are inputs, the rest outputs.
struct Slots {
  int inputs, src, weights, dst, bias, scale, layout;
};

int Call(Pass pass, Slots slots, bool relu, int stride, int pad, int nparam, void **params, const int *ndims,
         int64_t **shapes, const char **dtypes) {
  int outputs = pass == Pass::kBackwardWeights ? 2 : 1;
  if (nparam != slots.inputs + outputs) return 2;
  for (int i = 0; i < nparam; ++i) {
    bool vector = i == slots.bias || i == slots.scale || i == slots.layout;
    if (ndims[i] != (vector ? 1 : 4) || std::string(dtypes[i]) != (i == slots.layout ? "int32" : "float32")) return 2;
  }
  const int32_t *layout = slots.layout < 0 ? nullptr : static_cast<const int32_t *>(params[slots.layout]);
  auto tensor = [&](int slot) { return slot < 0 ? nullptr : static_cast<float *>(params[slot]); };
  // A scale of ones (every layer without a folded norm) is no scale: the weights then skip the scaled reorder.
  float *scale = tensor(slots.scale);
  if (scale != nullptr && std::all_of(scale, scale + shapes[slots.weights][0], [](float s) { return s == 1.0f; })) {
    scale = nullptr;
  }
  return Run(Conv{pass, shapes[slots.src], shapes[slots.weights], shapes[slots.dst], tensor(slots.src),
                  tensor(slots.weights), tensor(slots.dst), tensor(slots.bias), scale, stride, pad, relu,
                  layout != nullptr && layout[0] != 0, layout != nullptr && layout[1] != 0});
}

// BiasGrad(dy (N, C, H, W)) -> db (C,): dy summed over everything but the channel.
int BiasGrad(int nparam, void **params, const int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 2 || ndims[0] != 4 || ndims[1] != 1 || std::string(dtypes[0]) != "float32") return 2;
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  const int64_t *shape = shapes[0];
  int64_t channels = shape[1], plane = shape[2] * shape[3];
  const float *dy = static_cast<const float *>(params[0]);
  float *db = static_cast<float *>(params[1]);
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
  return 0;
}

}  // namespace

extern "C" int BiasGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                        void *) {
  return BiasGrad(nparam, params, ndims, shapes, dtypes);
}

// One set of entry points per (stride, padding on every side): MindSpore keys a custom operator's shape
// inference by its function name, so the geometry has to be part of the name. Argument order: see the top.
#define CPU_CONV_ENTRY_POINT(NAME, STRIDE, PAD, PASS, RELU, ...)                                                     \
  extern "C" int NAME##S##STRIDE##P##PAD(int nparam, void **params, int *ndims, int64_t **shapes,                    \
                                         const char **dtypes, void *, void *) {                                      \
    return Call(PASS, Slots{__VA_ARGS__}, RELU, STRIDE, PAD, nparam, params, ndims, shapes, dtypes);                 \
  }
// Slots: inputs, src, weights, dst, bias, scale, layout.
#define CPU_CONV_ENTRY_POINTS(STRIDE, PAD)                                                                           \
  CPU_CONV_ENTRY_POINT(ConvForward, STRIDE, PAD, Pass::kForward, false, 5, 0, 1, 5, 2, 3, 4)      /* x, w, b, s, l */\
  CPU_CONV_ENTRY_POINT(ConvReluForward, STRIDE, PAD, Pass::kForward, true, 5, 0, 1, 5, 2, 3, 4)                      \
  CPU_CONV_ENTRY_POINT(ConvBackwardData, STRIDE, PAD, Pass::kBackwardData, false, 5, 5, 1, 0, -1, 3, 4)              \
  /* dy, w, x, s, l -> dx */                                                                                         \
  CPU_CONV_ENTRY_POINT(ConvBackwardWeights, STRIDE, PAD, Pass::kBackwardWeights, false, 5, 0, 5, 1, 6, 3, 4)         \
  /* x, dy, w, s, l -> dw, db */                                                                                     \
  CPU_CONV_ENTRY_POINT(DeconvForward, STRIDE, PAD, Pass::kBackwardData, false, 3, 3, 1, 0, 2, -1, -1) /* x, w, b */  \
  CPU_CONV_ENTRY_POINT(DeconvReluForward, STRIDE, PAD, Pass::kBackwardData, true, 3, 3, 1, 0, 2, -1, -1)

CPU_CONV_ENTRY_POINTS(1, 0)
CPU_CONV_ENTRY_POINTS(1, 1)
CPU_CONV_ENTRY_POINTS(1, 2)
CPU_CONV_ENTRY_POINTS(1, 3)
CPU_CONV_ENTRY_POINTS(2, 0)
CPU_CONV_ENTRY_POINTS(2, 1)
CPU_CONV_ENTRY_POINTS(2, 2)
CPU_CONV_ENTRY_POINTS(2, 3)

// ---------------------------------------------------------------------------------------------------------------
// RoIAlign over an FPN pyramid, the conventions of src/maskrcnn/roi_align.py, read straight from the NCHW maps.
namespace {

struct AxisTaps {  // per sample along one axis: the two cells and their weights (bin average folded in)
  std::vector<int> low, high;
  std::vector<float> w_low, w_high;
};

void ComputeAxisTaps(float start, float extent, int size, int samples, int sample_ratio, AxisTaps *taps) {
  taps->low.resize(samples), taps->high.resize(samples), taps->w_low.resize(samples), taps->w_high.resize(samples);
  for (int k = 0; k < samples; ++k) {
    float coord = start + (static_cast<float>(k) + 0.5f) / static_cast<float>(samples) * extent;
    float inside = (coord >= -1.0f && coord <= static_cast<float>(size)) ? 1.0f : 0.0f;
    coord = std::min(std::max(coord, 0.0f), static_cast<float>(size - 1));
    float low = std::floor(coord);
    float frac = coord - low;
    float scale = inside / static_cast<float>(sample_ratio);
    taps->low[k] = static_cast<int>(low);
    taps->high[k] = std::min(static_cast<int>(low) + 1, size - 1);
    taps->w_low[k] = (1.0f - frac) * scale;
    taps->w_high[k] = frac * scale;
  }
}

// Inputs shared by both passes: rois (R, 5), level (R,) int32, settings (1 + L,) = sample_ratio, strides...,
// then the L maps (B, C, h_l, w_l) (for the backward pass only their shapes are used). Each RoI's taps are
// worked out once, as (cell offset in a channel plane, weight) per tap, grouped by output bin, and serve all
// channels.
struct RoiProblem {
  int rois = 0, channels = 0, bins = 0, taps_per_bin = 0;
  std::vector<const int64_t *> map_shapes;
  std::vector<int> level, image;
  std::vector<int32_t> offset;  // (R, bins, taps_per_bin)
  std::vector<float> weight;    // (R, bins, taps_per_bin)

  int64_t PlaneBase(int r, int64_t c) const {  // first element of RoI r's channel c plane in its level's map
    const int64_t *shape = map_shapes[level[r]];
    return (static_cast<int64_t>(image[r]) * shape[1] + c) * shape[2] * shape[3];
  }
};

RoiProblem MakeRoiProblem(int out, const float *rois, const int32_t *level, const float *settings, int levels,
                          int num_rois, int64_t **map_shapes) {
  RoiProblem p;
  int sr = static_cast<int>(settings[0]);
  p.rois = num_rois, p.channels = static_cast<int>(map_shapes[0][1]), p.bins = out * out;
  p.taps_per_bin = sr * sr * 4;
  p.map_shapes.assign(map_shapes, map_shapes + levels);
  p.level.resize(num_rois), p.image.resize(num_rois);
  p.offset.resize(static_cast<size_t>(num_rois) * p.bins * p.taps_per_bin);
  p.weight.resize(p.offset.size());
  AxisTaps y, x;
  for (int r = 0; r < num_rois; ++r) {
    const float *roi = rois + 5 * r;
    int l = level == nullptr ? 0 : std::min(std::max(static_cast<int>(level[r]), 0), levels - 1);
    p.level[r] = l, p.image[r] = static_cast<int>(roi[0]);
    float stride = settings[1 + l];
    int height = static_cast<int>(map_shapes[l][2]), width = static_cast<int>(map_shapes[l][3]);
    float roi_w = std::max((roi[3] - roi[1]) / stride, 1.0f), roi_h = std::max((roi[4] - roi[2]) / stride, 1.0f);
    ComputeAxisTaps(roi[2] / stride - 0.5f, roi_h, height, out * sr, sr, &y);
    ComputeAxisTaps(roi[1] / stride - 0.5f, roi_w, width, out * sr, sr, &x);
    size_t t = static_cast<size_t>(r) * p.bins * p.taps_per_bin;
    for (int by = 0; by < out; ++by) {
      for (int bx = 0; bx < out; ++bx) {
        for (int sy = by * sr; sy < (by + 1) * sr; ++sy) {
          for (int sx = bx * sr; sx < (bx + 1) * sr; ++sx) {
            const int rows[2] = {y.low[sy], y.high[sy]}, cols[2] = {x.low[sx], x.high[sx]};
            const float row_w[2] = {y.w_low[sy], y.w_high[sy]}, col_w[2] = {x.w_low[sx], x.w_high[sx]};
            for (int i = 0; i < 2; ++i) {
              for (int j = 0; j < 2; ++j, ++t) {
                p.offset[t] = rows[i] * width + cols[j];
                p.weight[t] = row_w[i] * col_w[j];
              }
            }
          }
        }
      }
    }
  }
  return p;
}

// The bins of every (RoI, channel) pair: output[r, c, bin] = sum over the bin's taps of weight * map value.
template <typename T, typename Store>
void PoolBins(Runtime &rt, const RoiProblem &p, void *const *maps, Store store) {
  // One job = one (RoI, channel) pair: its bins.
  ParallelRange(rt, static_cast<int64_t>(p.rois) * p.channels, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      int r = static_cast<int>(job / p.channels);
      const T *plane = static_cast<const T *>(maps[p.level[r]]) + p.PlaneBase(r, job % p.channels);
      const int32_t *offset = p.offset.data() + static_cast<size_t>(r) * p.bins * p.taps_per_bin;
      const float *weight = p.weight.data() + static_cast<size_t>(r) * p.bins * p.taps_per_bin;
      for (int bin = 0; bin < p.bins; ++bin, offset += p.taps_per_bin, weight += p.taps_per_bin) {
        float sum = 0.0f;
        for (int t = 0; t < p.taps_per_bin; ++t) sum += weight[t] * static_cast<float>(plane[offset[t]]);
        store(job * p.bins + bin, sum);
      }
    }
  });
}

int RoiAlignForward(int out, int nparam, void **params, int64_t **shapes) {
  int levels = nparam - 4;
  if (levels < 1) return 2;
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  RoiProblem p = MakeRoiProblem(out, static_cast<float *>(params[0]), static_cast<int32_t *>(params[1]),
                                static_cast<float *>(params[2]), levels, static_cast<int>(shapes[0][0]), shapes + 3);
  float *output = static_cast<float *>(params[nparam - 1]);
  PoolBins<float>(rt, p, params + 3, [output](int64_t index, float value) { output[index] = value; });
  return 0;
}

// MaskTargets(rois (R, 5) = (mask row, x1, y1, x2, y2), settings (2,) = (sample_ratio, stride), masks uint8
// (B, M, H, W), read as B * M one-channel maps) -> (R, out, out) float32: 1 where the RoIAlign of the RoI's
// mask is >= 0.5, else 0.
int MaskTargets(int out, int nparam, void **params, const int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 4 || ndims[2] != 4 || std::string(dtypes[2]) != "uint8") return 2;
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  int64_t mask_shape[4] = {shapes[2][0] * shapes[2][1], 1, shapes[2][2], shapes[2][3]};
  int64_t *map_shapes[1] = {mask_shape};
  RoiProblem p = MakeRoiProblem(out, static_cast<float *>(params[0]), nullptr, static_cast<float *>(params[1]), 1,
                                static_cast<int>(shapes[0][0]), map_shapes);
  float *output = static_cast<float *>(params[3]);
  PoolBins<uint8_t>(rt, p, params + 2, [output](int64_t index, float value) {
    output[index] = value >= 0.5f ? 1.0f : 0.0f;
  });
  return 0;
}

int RoiAlignBackward(int out, int nparam, void **params, int64_t **shapes) {
  // Inputs: dout (R, C, out, out), rois, level, settings, the L maps (shapes only); outputs: L map gradients.
  int levels = (nparam - 4) / 2;
  if (levels < 1 || nparam != 4 + 2 * levels) return 2;
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  RoiProblem p = MakeRoiProblem(out, static_cast<float *>(params[1]), static_cast<int32_t *>(params[2]),
                                static_cast<float *>(params[3]), levels, static_cast<int>(shapes[1][0]), shapes + 4);
  const float *dout = static_cast<const float *>(params[0]);
  for (int l = 0; l < levels; ++l) {
    const int64_t *shape = p.map_shapes[l];
    float *grad = static_cast<float *>(params[4 + levels + l]);
    std::fill(grad, grad + shape[0] * shape[1] * shape[2] * shape[3], 0.0f);
  }
  // One job = one channel over every RoI: each writes its own planes, so no two threads add to the same cell.
  ParallelRange(rt, p.channels, [&](int64_t begin, int64_t end) {
    for (int r = 0; r < p.rois; ++r) {
      for (int64_t c = begin; c < end; ++c) {
        float *plane = static_cast<float *>(params[4 + levels + p.level[r]]) + p.PlaneBase(r, c);
        const int32_t *offset = p.offset.data() + static_cast<size_t>(r) * p.bins * p.taps_per_bin;
        const float *weight = p.weight.data() + static_cast<size_t>(r) * p.bins * p.taps_per_bin;
        const float *grad = dout + (static_cast<int64_t>(r) * p.channels + c) * p.bins;
        for (int bin = 0; bin < p.bins; ++bin, offset += p.taps_per_bin, weight += p.taps_per_bin) {
          for (int t = 0; t < p.taps_per_bin; ++t) plane[offset[t]] += weight[t] * grad[bin];
        }
      }
    }
  });
  return 0;
}

}  // namespace

#define ROI_ALIGN_ENTRY_POINTS(OUT)                                                                              \
  extern "C" int RoiAlignForward##OUT(int nparam, void **params, int *, int64_t **shapes, const char **, void *, \
                                      void *) {                                                                 \
    return RoiAlignForward(OUT, nparam, params, shapes);                                                        \
  }                                                                                                             \
  extern "C" int RoiAlignBackward##OUT(int nparam, void **params, int *, int64_t **shapes, const char **, void *,\
                                       void *) {                                                                \
    return RoiAlignBackward(OUT, nparam, params, shapes);                                                       \
  }

ROI_ALIGN_ENTRY_POINTS(7)
ROI_ALIGN_ENTRY_POINTS(14)

extern "C" int MaskTargets28(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                             void *) {
  return MaskTargets(28, nparam, params, ndims, shapes, dtypes);
}


// ---------------------------------------------------------------------------------------------------------------
// Max-IoU assignment of candidate boxes to GT boxes (src/maskrcnn/bbox_assign_sample.py MaxIoUAssigner, same
// arithmetic): only the valid GTs are visited, since a padded GT's IoU is exactly 0 with every candidate.
namespace {

constexpr float kNowhere = -1.0e4f;  // the zero-area box invalid candidates become (bbox_assign_sample.NOWHERE)
constexpr float kIouEps = 1e-9f;      // box_ops.IOU_EPS
constexpr float kUnreachableIou = 2.0f;

inline float Relu(float x) { return std::max(x, 0.0f); }

inline float Iou(const float *gt, float gt_area, const float *box, float box_area) {
  float inter = Relu(std::min(gt[2], box[2]) - std::max(gt[0], box[0])) *
                Relu(std::min(gt[3], box[3]) - std::max(gt[1], box[1]));
  return inter / std::max((gt_area + box_area) - inter, kIouEps);
}

inline float Area(const float *box) { return Relu(box[2] - box[0]) * Relu(box[3] - box[1]); }

// MaxIoUAssign(gt (M, 4), gt_valid (M,) bool, boxes (N, 4), box_valid (N,) bool, thresholds (3,) = (pos_iou,
// neg_iou, min_pos_iou)) -> assigned_gt (N,) int32, positive (N,) bool, negative (N,) bool.
int MaxIoUAssign(int nparam, void **params, const int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 8 || std::string(dtypes[0]) != "float32" || std::string(dtypes[1]) != "bool" ||
      std::string(dtypes[2]) != "float32" || std::string(dtypes[3]) != "bool") {
    return 2;
  }
  const float *gts = static_cast<const float *>(params[0]), *boxes = static_cast<const float *>(params[2]);
  const bool *gt_valid = static_cast<const bool *>(params[1]), *box_valid = static_cast<const bool *>(params[3]);
  const float *thresholds = static_cast<const float *>(params[4]);
  int32_t *assigned = static_cast<int32_t *>(params[5]);
  bool *positive = static_cast<bool *>(params[6]), *negative = static_cast<bool *>(params[7]);
  int64_t num_gts = shapes[0][0], num_boxes = shapes[2][0];
  const float nowhere[4] = {kNowhere, kNowhere, kNowhere, kNowhere};
  std::vector<int> valid_gts;
  std::vector<float> gt_area(num_gts);
  for (int64_t j = 0; j < num_gts; ++j) {
    if (gt_valid[j]) valid_gts.push_back(static_cast<int>(j)), gt_area[j] = Area(gts + 4 * j);
  }
  auto box_of = [&](int64_t i) { return box_valid[i] ? boxes + 4 * i : nowhere; };
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  int threads = rt.pool.get_num_threads();
  std::vector<float> max_iou(num_boxes), thread_gt_best(static_cast<size_t>(threads) * num_gts, 0.0f);
  // Pass 1: each candidate's best IoU and GT (the first on ties; with every IoU 0 that is GT 0, valid or not),
  // each GT's best IoU.
  rt.pool.parallel_for(threads, [&](int job, int total) {
    float *gt_best = thread_gt_best.data() + static_cast<size_t>(job) * num_gts;
    for (int64_t i = num_boxes * job / total; i < num_boxes * (job + 1) / total; ++i) {
      const float *box = box_of(i);
      float area = Area(box), best = 0.0f;
      int best_gt = 0;
      for (int j : valid_gts) {
        float iou = Iou(gts + 4 * j, gt_area[j], box, area);
        if (iou > best) best = iou, best_gt = j;
        gt_best[j] = std::max(gt_best[j], iou);
      }
      max_iou[i] = best, assigned[i] = best_gt;
    }
  });
  // A GT claims the candidates at its best IoU, if that is >= min_pos_iou; the last claiming GT wins.
  std::vector<float> claim_level(num_gts, kUnreachableIou);
  for (int j : valid_gts) {
    float best = 0.0f;
    for (int t = 0; t < threads; ++t) best = std::max(best, thread_gt_best[static_cast<size_t>(t) * num_gts + j]);
    if (best >= thresholds[2]) claim_level[j] = best;
  }
  ParallelRange(rt, num_boxes, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float *box = box_of(i);
      float area = Area(box);
      bool claimed = false;  // invalid candidates are never claimed (their IoU 0 would meet a min_pos_iou of 0)
      for (auto j = valid_gts.rbegin(); j != valid_gts.rend() && !claimed && box_valid[i]; ++j) {
        if (claim_level[*j] <= 1.0f && Iou(gts + 4 * *j, gt_area[*j], box, area) - claim_level[*j] >= 0.0f) {
          assigned[i] = *j, claimed = true;
        }
      }
      positive[i] = claimed || (box_valid[i] && max_iou[i] >= thresholds[0]);
      negative[i] = box_valid[i] && max_iou[i] < thresholds[1] && !positive[i];
    }
  });
  return 0;
}

}  // namespace

extern "C" int MaxIoUAssign(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                            void *) {
  return MaxIoUAssign(nparam, params, ndims, shapes, dtypes);
}

// ---------------------------------------------------------------------------------------------------------------
// The FPN's top-down merge: lateral + nearest upsampling of the coarser map, as ops.interpolate(mode="nearest")
// (source cell floor(i * h_in / h_out), float32 scale).
namespace {

std::vector<int> NearestSources(int64_t in, int64_t out) {
  std::vector<int> source(out);
  float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t i = 0; i < out; ++i) {
    source[i] = std::min(static_cast<int>(std::floor(static_cast<float>(i) * scale)), static_cast<int>(in - 1));
  }
  return source;
}

// UpsampleAdd(coarse (N, C, h, w), lateral (N, C, H, W)) -> lateral + nearest upsampling of coarse to (H, W).
int UpsampleAdd(int nparam, void **params, int64_t **shapes) {
  if (nparam != 3) return 2;
  const int64_t *in = shapes[0], *out = shapes[1];
  std::vector<int> rows = NearestSources(in[2], out[2]), cols = NearestSources(in[3], out[3]);
  const float *coarse = static_cast<const float *>(params[0]), *lateral = static_cast<const float *>(params[1]);
  float *merged = static_cast<float *>(params[2]);
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  ParallelRange(rt, out[0] * out[1], [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const float *source = coarse + plane * in[2] * in[3];
      for (int64_t i = 0; i < out[2]; ++i) {
        const float *source_row = source + rows[i] * in[3];
        int64_t offset = (plane * out[2] + i) * out[3];
        for (int64_t j = 0; j < out[3]; ++j) merged[offset + j] = lateral[offset + j] + source_row[cols[j]];
      }
    }
  });
  return 0;
}

// UpsampleAddGrad(dmerged (N, C, H, W), coarse (N, C, h, w)) -> dcoarse: dmerged summed over each coarse cell's
// copies (coarse gives the shape only).
int UpsampleAddGrad(int nparam, void **params, int64_t **shapes) {
  if (nparam != 3) return 2;
  const int64_t *out = shapes[0], *in = shapes[1];
  std::vector<int> rows = NearestSources(in[2], out[2]), cols = NearestSources(in[3], out[3]);
  const float *dmerged = static_cast<const float *>(params[0]);
  float *dcoarse = static_cast<float *>(params[2]);
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  ParallelRange(rt, out[0] * out[1], [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      float *target = dcoarse + plane * in[2] * in[3];
      std::fill(target, target + in[2] * in[3], 0.0f);
      for (int64_t i = 0; i < out[2]; ++i) {
        float *target_row = target + rows[i] * in[3];
        const float *grad = dmerged + (plane * out[2] + i) * out[3];
        for (int64_t j = 0; j < out[3]; ++j) target_row[cols[j]] += grad[j];
      }
    }
  });
  return 0;
}

}  // namespace

extern "C" int UpsampleAdd(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return UpsampleAdd(nparam, params, shapes);
}

extern "C" int UpsampleAddGrad(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  return UpsampleAddGrad(nparam, params, shapes);
}

// ---------------------------------------------------------------------------------------------------------------
// BlockedToPlain(x) -> y: a (N, C, H, W) tensor held blocked (nChw16c, C a multiple of 16), as NCHW;
// PlainToBlocked the other way (each is the other's gradient).
namespace {

int Relayout(bool to_plain, int nparam, void **params, const int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 2 || ndims[0] != 4 || std::string(dtypes[0]) != "float32" || shapes[0][1] % 16 != 0) return 2;
  Runtime &rt = GetRuntime();
  try {
    std::lock_guard<std::mutex> lock(rt.mutex);
    memory::dims dims = Dims(shapes[0]);
    memory from(Held(dims, to_plain), rt.engine, params[0]), to(Held(dims, !to_plain), rt.engine, params[1]);
    Reorder(rt, from, to, nullptr);
    rt.stream.wait();
    return 0;
  } catch (const std::exception &error) {
    std::fprintf(stderr, "cpu_kernels: oneDNN failed: %s\n", error.what());
    return 1;
  }
}

}  // namespace

extern "C" int BlockedToPlain(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  return Relayout(true, nparam, params, ndims, shapes, dtypes);
}

extern "C" int PlainToBlocked(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  return Relayout(false, nparam, params, ndims, shapes, dtypes);
}
