// Shared by every kernel file: the entry-point signature, the thread pool oneDNN and our loops run on, the one
// runtime (engine, stream, lock) of the process, and the oneDNN layout helpers. Constants shared with Python come
// from the generated constants.h (src/ops/constants.py, written by `python -m src.ops.build`).
#pragma once

#include <oneapi/dnnl/dnnl.hpp>
#include <oneapi/dnnl/dnnl_threadpool.hpp>
#include <sched.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "constants.h"

// MindSpore's AOT custom-operator signature: the inputs then the outputs in params, with their ranks, shapes and
// dtype names.
#define MASKRCNN_ENTRY_POINT(NAME)                                                                          \
  extern "C" int NAME(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, \
                      void *)

// An entry point's initialisation, called by MindSpore once per graph node with the inputs' and outputs' ranks, shapes
// and dtype names; `extra` is MindSpore's AotExtra (see RequestWorkspaces).
#define MASKRCNN_INIT_POINT(NAME) \
  extern "C" int NAME##Init(int *ndims, int64_t **shapes, const char **dtypes, void *extra)

namespace maskrcnn_ops {

using dnnl::memory;

// Asks MindSpore for workspaces of these sizes in bytes, from its memory pool for the duration of each call; the
// entry point then finds them in params after the outputs. MindSpore's AotExtra (utils/custom_aot_extra.h, whose
// includes the wheel does not ship) is a polymorphic class whose first member is the workspace sizes vector.
struct AotExtraLayout {
  void *vtable;
  std::vector<size_t> workspace;
};
inline void RequestWorkspaces(void *extra, std::vector<size_t> bytes) {
  static_cast<AotExtraLayout *>(extra)->workspace = std::move(bytes);
}

// What an entry point returns.
enum Status { kOk = 0, kOneDnnFailed = 1, kBadArguments = 2 };

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
  static inline thread_local bool in_parallel_ = false;
};

inline int AvailableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return CPU_COUNT(&set) > 0 ? CPU_COUNT(&set) : 1;
}

struct Runtime {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  ThreadPool pool{AvailableCpus()};
  dnnl::stream stream = dnnl::threadpool_interop::make_stream(engine, &pool);
  std::mutex mutex;  // MindSpore may launch kernels from several threads; the pool runs one call at a time
};

// The process's one runtime (an inline function's static: one instance across the kernel files).
inline Runtime &GetRuntime() {
  static Runtime runtime;
  return runtime;
}

// Splits [0, n) over the pool's threads.
template <typename Body>
void ParallelRange(Runtime &rt, int64_t n, Body body) {
  int jobs = static_cast<int>(std::min<int64_t>(n, rt.pool.get_num_threads()));
  rt.pool.parallel_for(jobs, [&](int job, int total) {
    body(n * job / total, n * (job + 1) / total);
  });
}

inline bool IsDtype(const char *dtype, const char *name) { return std::string(dtype) == name; }

inline memory::dims Dims(const int64_t *shape) { return memory::dims(shape, shape + 4); }

inline memory::desc Plain(const memory::dims &dims) {
  return memory::desc(dims, memory::data_type::f32, memory::format_tag::abcd);
}

// oneDNN's blocked layout (channels in groups of kBlockChannels) under the NCHW shape.
inline memory::desc Blocked(const memory::dims &dims) {
  static_assert(kBlockChannels == 16, "nChw16c holds channels in groups of 16");
  return memory::desc(dims, memory::data_type::f32, memory::format_tag::nChw16c);
}

// How MindSpore holds a convolution's activation tensor.
inline memory::desc Held(const memory::dims &dims, bool blocked) { return blocked ? Blocked(dims) : Plain(dims); }

// Copies `from` into `to` (the layouts may differ), multiplying index o of dimension 0 by scale[o] if scale is set.
inline void Reorder(Runtime &rt, const memory &from, const memory &to, const float *scale) {
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

inline int ReportOneDnnFailure(const std::exception &error) {
  std::fprintf(stderr, "maskrcnn ops: oneDNN failed: %s\n", error.what());
  return kOneDnnFailed;
}

}  // namespace maskrcnn_ops
