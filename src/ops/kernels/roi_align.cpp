// RoIAlign over an FPN pyramid (src/ops/roi_align.py), read straight from the NCHW maps, with its gradient:
//   RoiAlignForward<out>(rois (R, 5), level (R,) int32, settings (2 + L,), the L maps (B, C, h_l, w_l))
//       -> (R, C, out, out)
//   RoiAlignBackward<out>(dout, rois, level, settings, the L maps (shapes only)) -> the L map gradients
// for each out of MASKRCNN_ROI_ALIGN_SIZES and L = kRoiAlignLevels (constants.h).
#include "roi_taps.h"

namespace maskrcnn_ops {
namespace {

enum ForwardArg { kForwardRois, kForwardLevel, kForwardSettings, kForwardFirstMap };
enum BackwardArg { kBackwardDout, kBackwardRois, kBackwardLevel, kBackwardSettings, kBackwardFirstMap };

int RoiAlignForward(int out, int nparam, void **params, int64_t **shapes) {
  int levels = nparam - kForwardFirstMap - 1;  // the maps, then the one output
  if (levels != kRoiAlignLevels) return kBadArguments;
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  RoiProblem p = MakeRoiProblem(out, static_cast<float *>(params[kForwardRois]),
                                static_cast<int32_t *>(params[kForwardLevel]),
                                static_cast<float *>(params[kForwardSettings]), levels,
                                static_cast<int>(shapes[kForwardRois][0]), shapes + kForwardFirstMap);
  float *output = static_cast<float *>(params[nparam - 1]);
  PoolBins<float>(rt, p, params + kForwardFirstMap, [output](int64_t index, float value) { output[index] = value; });
  return kOk;
}

int RoiAlignBackward(int out, int nparam, void **params, int64_t **shapes) {
  int levels = (nparam - kBackwardFirstMap) / 2;  // the maps, then one gradient per map
  if (levels != kRoiAlignLevels || nparam != kBackwardFirstMap + 2 * levels) return kBadArguments;
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  RoiProblem p = MakeRoiProblem(out, static_cast<float *>(params[kBackwardRois]),
                                static_cast<int32_t *>(params[kBackwardLevel]),
                                static_cast<float *>(params[kBackwardSettings]), levels,
                                static_cast<int>(shapes[kBackwardRois][0]), shapes + kBackwardFirstMap);
  const float *dout = static_cast<const float *>(params[kBackwardDout]);
  void **grads = params + kBackwardFirstMap + levels;
  for (int l = 0; l < levels; ++l) {
    const int64_t *shape = p.map_shapes[l];
    float *grad = static_cast<float *>(grads[l]);
    std::fill(grad, grad + shape[0] * shape[1] * shape[2] * shape[3], 0.0f);
  }
  // One job = one channel over every RoI: each writes its own planes, so no two threads add to the same cell.
  ParallelRange(rt, p.channels, [&](int64_t begin, int64_t end) {
    for (int r = 0; r < p.rois; ++r) {
      for (int64_t c = begin; c < end; ++c) {
        float *plane = static_cast<float *>(grads[p.level[r]]) + p.PlaneBase(r, c);
        const int32_t *offset = p.offset.data() + static_cast<size_t>(r) * p.bins * p.taps_per_bin;
        const float *weight = p.weight.data() + static_cast<size_t>(r) * p.bins * p.taps_per_bin;
        const float *grad = dout + (static_cast<int64_t>(r) * p.channels + c) * p.bins;
        for (int bin = 0; bin < p.bins; ++bin, offset += p.taps_per_bin, weight += p.taps_per_bin) {
          for (int t = 0; t < p.taps_per_bin; ++t) plane[offset[t]] += weight[t] * grad[bin];
        }
      }
    }
  });
  return kOk;
}

}  // namespace
}  // namespace maskrcnn_ops

// One pair per output size: MindSpore keys a custom operator's shape inference by its function name.
#define ROI_ALIGN_ENTRY_POINTS(OUT)                                                  \
  MASKRCNN_ENTRY_POINT(RoiAlignForward##OUT) {                                      \
    return maskrcnn_ops::RoiAlignForward(OUT, nparam, params, shapes);              \
  }                                                                                 \
  MASKRCNN_ENTRY_POINT(RoiAlignBackward##OUT) {                                     \
    return maskrcnn_ops::RoiAlignBackward(OUT, nparam, params, shapes);             \
  }

MASKRCNN_ROI_ALIGN_SIZES(ROI_ALIGN_ENTRY_POINTS)
