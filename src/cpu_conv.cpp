// Convolution kernels for MindSpore CPU graphs (ops.Custom, func_type "aot"), run by the oneDNN library that
// MindSpore itself ships (mindspore/lib/libdnnl.so.3).
//
// Why: MindSpore's own CPU Conv2D gives oneDNN plain OIHW weights. With plain weights oneDNN's AVX-512 code path
// ends in a reference loop (~1 GFLOP/s), so it had to be capped at AVX2 (im2col + AVX2 GEMM, ~190 GFLOP/s).
// Here oneDNN chooses the weight and activation layouts itself ("any"), which selects its AVX-512 kernels; the
// NCHW tensors MindSpore holds are reordered in and out around each call.
//
// Entry points, each for stride S in {1, 2} and padding P in {0..3} on every side (e.g. ConvForwardS2P1); every
// tensor is float32 NCHW / OIHW:
//   ConvForward(x, w) -> y
//   ConvBackwardData(dy, w, x) -> dx                (x gives dx's shape only)
//   ConvBackwardWeights(x, dy, w) -> dw             (w gives dw's shape only)
//   DeconvForward(x, w) -> y                        (transposed convolution = convolution backward data)
#include <oneapi/dnnl/dnnl.hpp>
#include <oneapi/dnnl/dnnl_threadpool.hpp>
#include <sched.h>

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

memory::dims Dims(const int64_t *shape) { return memory::dims(shape, shape + 4); }

memory::desc Plain(const memory::dims &dims) {
  return memory::desc(dims, memory::data_type::f32, memory::format_tag::abcd);
}

memory::desc Any(const memory::dims &dims) {
  return memory::desc(dims, memory::data_type::f32, memory::format_tag::any);
}

Plan MakePlan(Runtime &rt, Pass pass, const memory::dims &src, const memory::dims &weights,
              const memory::dims &dst, const memory::dims &strides, const memory::dims &pad_begin,
              const memory::dims &pad_end) {
  using namespace dnnl;
  auto forward = convolution_forward::primitive_desc(
      rt.engine, prop_kind::forward_training, algorithm::convolution_direct, Any(src), Any(weights), Any(dst),
      strides, pad_begin, pad_end);
  switch (pass) {
    case Pass::kForward:
      return {convolution_forward(forward), forward.src_desc(), forward.weights_desc(), forward.dst_desc()};
    case Pass::kBackwardData: {
      auto pd = convolution_backward_data::primitive_desc(rt.engine, algorithm::convolution_direct, Any(src),
                                                          Any(weights), Any(dst), strides, pad_begin, pad_end,
                                                          forward);
      return {convolution_backward_data(pd), pd.diff_src_desc(), pd.weights_desc(), pd.diff_dst_desc()};
    }
    case Pass::kBackwardWeights: {
      auto pd = convolution_backward_weights::primitive_desc(rt.engine, algorithm::convolution_direct, Any(src),
                                                             Any(weights), Any(dst), strides, pad_begin, pad_end,
                                                             forward);
      return {convolution_backward_weights(pd), pd.src_desc(), pd.diff_weights_desc(), pd.diff_dst_desc()};
    }
  }
  throw std::logic_error("unknown pass");
}

// The plain NCHW tensor itself when the primitive wants that layout, else a reordered copy.
memory Scratch(Runtime &rt, Slot slot, const memory::desc &desc) {
  std::vector<float> &buffer = rt.scratch[slot];
  size_t floats = (desc.get_size() + sizeof(float) - 1) / sizeof(float);
  if (buffer.size() < floats) buffer.resize(floats);
  return memory(desc, rt.engine, buffer.data());
}

memory Inbound(Runtime &rt, Slot slot, const memory::desc &wanted, const memory &plain) {
  if (wanted == plain.get_desc()) return plain;
  memory copy = Scratch(rt, slot, wanted);
  dnnl::reorder(plain, copy).execute(rt.stream, const_cast<memory &>(plain), copy);
  return copy;
}

// Runs one pass. src/weights/dst are the convolution's tensors (for the backward passes the gradients of them);
// the pass reads two of them and writes the third, all plain float32 buffers.
int Run(Pass pass, const int64_t *src_shape, const int64_t *weights_shape, const int64_t *dst_shape, int stride,
        int pad, float *src, float *weights, float *dst) {
  Runtime &rt = GetRuntime();
  try {
    std::lock_guard<std::mutex> lock(rt.mutex);
    memory::dims src_dims = Dims(src_shape), weights_dims = Dims(weights_shape), dst_dims = Dims(dst_shape);
    memory::dims strides = {stride, stride}, pad_begin = {pad, pad}, pad_end = {pad, pad};
    std::vector<int64_t> key = {static_cast<int64_t>(pass)};
    for (const auto *dims : {&src_dims, &weights_dims, &dst_dims, &strides, &pad_begin, &pad_end}) {
      key.insert(key.end(), dims->begin(), dims->end());
    }
    auto found = rt.plans.find(key);
    if (found == rt.plans.end()) {
      found = rt.plans.emplace(key, MakePlan(rt, pass, src_dims, weights_dims, dst_dims, strides, pad_begin,
                                             pad_end)).first;
    }
    const Plan &plan = found->second;
    memory src_plain(Plain(src_dims), rt.engine, src), weights_plain(Plain(weights_dims), rt.engine, weights);
    memory dst_plain(Plain(dst_dims), rt.engine, dst);

    // The output of the pass is written into the primitive's layout, then reordered into the plain buffer.
    memory *output_plain = nullptr;
    const memory::desc *output_desc = nullptr;
    Slot output_slot;
    std::unordered_map<int, memory> args;
    if (pass == Pass::kForward) {
      args[DNNL_ARG_SRC] = Inbound(rt, kSrcSlot, plan.src, src_plain);
      args[DNNL_ARG_WEIGHTS] = Inbound(rt, kWeightsSlot, plan.weights, weights_plain);
      output_plain = &dst_plain, output_desc = &plan.dst, output_slot = kDstSlot;
    } else if (pass == Pass::kBackwardData) {
      args[DNNL_ARG_DIFF_DST] = Inbound(rt, kDstSlot, plan.dst, dst_plain);
      args[DNNL_ARG_WEIGHTS] = Inbound(rt, kWeightsSlot, plan.weights, weights_plain);
      output_plain = &src_plain, output_desc = &plan.src, output_slot = kSrcSlot;
    } else {
      args[DNNL_ARG_SRC] = Inbound(rt, kSrcSlot, plan.src, src_plain);
      args[DNNL_ARG_DIFF_DST] = Inbound(rt, kDstSlot, plan.dst, dst_plain);
      output_plain = &weights_plain, output_desc = &plan.weights, output_slot = kWeightsSlot;
    }
    memory output = *output_desc == output_plain->get_desc() ? *output_plain
                                                             : Scratch(rt, output_slot, *output_desc);
    int output_arg = pass == Pass::kForward ? DNNL_ARG_DST
                     : pass == Pass::kBackwardData ? DNNL_ARG_DIFF_SRC : DNNL_ARG_DIFF_WEIGHTS;
    args[output_arg] = output;
    plan.primitive.execute(rt.stream, args);
    if (output.get() != output_plain->get()) dnnl::reorder(output, *output_plain).execute(rt.stream, output,
                                                                                          *output_plain);
    rt.stream.wait();
    return 0;
  } catch (const std::exception &error) {
    std::fprintf(stderr, "cpu_conv: oneDNN failed: %s\n", error.what());
    return 1;
  }
}

bool CheckArgs(int nparam, int expected, const int *ndims, const char **dtypes) {
  if (nparam != expected) return false;
  for (int i = 0; i < nparam; ++i) {
    if (ndims[i] != 4 || std::string(dtypes[i]) != "float32") return false;
  }
  return true;
}

}  // namespace

// One set of entry points per (stride, padding on every side): MindSpore keys a custom operator's shape
// inference by its function name, so the geometry has to be part of the name.
#define CPU_CONV_ENTRY_POINTS(STRIDE, PAD)                                                                           \
  extern "C" int ConvForwardS##STRIDE##P##PAD(int nparam, void **params, int *ndims, int64_t **shapes,               \
                                       const char **dtypes, void *, void *) {                                        \
    if (!CheckArgs(nparam, 3, ndims, dtypes)) return 2;                                                              \
    return Run(Pass::kForward, shapes[0], shapes[1], shapes[2], STRIDE, PAD, static_cast<float *>(params[0]),        \
               static_cast<float *>(params[1]), static_cast<float *>(params[2]));                                    \
  }                                                                                                                  \
  extern "C" int ConvBackwardDataS##STRIDE##P##PAD(int nparam, void **params, int *ndims, int64_t **shapes,          \
                                            const char **dtypes, void *, void *) {                                   \
    if (!CheckArgs(nparam, 4, ndims, dtypes)) return 2;                                                              \
    return Run(Pass::kBackwardData, shapes[3], shapes[1], shapes[0], STRIDE, PAD, static_cast<float *>(params[3]),   \
               static_cast<float *>(params[1]), static_cast<float *>(params[0]));                                    \
  }                                                                                                                  \
  extern "C" int ConvBackwardWeightsS##STRIDE##P##PAD(int nparam, void **params, int *ndims, int64_t **shapes,       \
                                               const char **dtypes, void *, void *) {                                \
    if (!CheckArgs(nparam, 4, ndims, dtypes)) return 2;                                                              \
    return Run(Pass::kBackwardWeights, shapes[0], shapes[3], shapes[1], STRIDE, PAD, static_cast<float *>(params[0]), \
               static_cast<float *>(params[3]), static_cast<float *>(params[1]));                                    \
  }                                                                                                                  \
  extern "C" int DeconvForwardS##STRIDE##P##PAD(int nparam, void **params, int *ndims, int64_t **shapes,             \
                                         const char **dtypes, void *, void *) {                                      \
    if (!CheckArgs(nparam, 3, ndims, dtypes)) return 2;                                                              \
    return Run(Pass::kBackwardData, shapes[2], shapes[1], shapes[0], STRIDE, PAD, static_cast<float *>(params[2]),   \
               static_cast<float *>(params[1]), static_cast<float *>(params[0]));                                    \
  }

CPU_CONV_ENTRY_POINTS(1, 0)
CPU_CONV_ENTRY_POINTS(1, 1)
CPU_CONV_ENTRY_POINTS(1, 2)
CPU_CONV_ENTRY_POINTS(1, 3)
CPU_CONV_ENTRY_POINTS(2, 0)
CPU_CONV_ENTRY_POINTS(2, 1)
CPU_CONV_ENTRY_POINTS(2, 2)
CPU_CONV_ENTRY_POINTS(2, 3)
