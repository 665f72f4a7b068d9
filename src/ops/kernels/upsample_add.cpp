// The FPN's top-down merge (src/ops/upsample_add.py): lateral + nearest upsampling of the coarser map, as
// ops.interpolate(mode="nearest") (source cell floor(i * h_in / h_out), float32 scale), and its gradient.
#include <cmath>

#include "common.h"

namespace maskrcnn_ops {
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
  enum Arg { kCoarse, kLateral, kMerged, kArgs };
  if (nparam != kArgs) return kBadArguments;
  const int64_t *in = shapes[kCoarse], *out = shapes[kLateral];
  std::vector<int> rows = NearestSources(in[2], out[2]), cols = NearestSources(in[3], out[3]);
  const float *coarse = static_cast<const float *>(params[kCoarse]);
  const float *lateral = static_cast<const float *>(params[kLateral]);
  float *merged = static_cast<float *>(params[kMerged]);
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
  return kOk;
}

// UpsampleAddGrad(dmerged (N, C, H, W), coarse (N, C, h, w)) -> dcoarse: dmerged summed over each coarse cell's
// copies (coarse gives the shape only).
int UpsampleAddGrad(int nparam, void **params, int64_t **shapes) {
  enum Arg { kDmerged, kCoarse, kDcoarse, kArgs };
  if (nparam != kArgs) return kBadArguments;
  const int64_t *out = shapes[kDmerged], *in = shapes[kCoarse];
  std::vector<int> rows = NearestSources(in[2], out[2]), cols = NearestSources(in[3], out[3]);
  const float *dmerged = static_cast<const float *>(params[kDmerged]);
  float *dcoarse = static_cast<float *>(params[kDcoarse]);
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
  return kOk;
}

}  // namespace
}  // namespace maskrcnn_ops

MASKRCNN_ENTRY_POINT(UpsampleAdd) { return maskrcnn_ops::UpsampleAdd(nparam, params, shapes); }

MASKRCNN_ENTRY_POINT(UpsampleAddGrad) { return maskrcnn_ops::UpsampleAddGrad(nparam, params, shapes); }
