// Mask targets (src/ops/mask_targets.py): MaskTargets<out>(rois (R, 5) = (mask row, x1, y1, x2, y2), settings
// (3,) = (sample_ratio, cell offset, stride), masks uint8 (B, M, H, W), read as B * M one-channel maps) -> (R, out, out)
// float32: 1 where the RoIAlign of the RoI's mask is >= the threshold (constants.h), else 0; for each out of
// MASKRCNN_MASK_TARGET_SIZES.
#include "roi_taps.h"

namespace maskrcnn_ops {
namespace {

enum Arg { kRois, kSettings, kMasks, kTargets, kArgs };

int MaskTargets(int out, int nparam, void **params, const int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != kArgs || ndims[kMasks] != 4 || !IsDtype(dtypes[kMasks], "uint8")) return kBadArguments;
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  const int64_t *masks = shapes[kMasks];
  int64_t mask_shape[4] = {masks[0] * masks[1], 1, masks[2], masks[3]};
  int64_t *map_shapes[1] = {mask_shape};
  RoiProblem p = MakeRoiProblem(out, static_cast<float *>(params[kRois]), nullptr,
                                static_cast<float *>(params[kSettings]), 1, static_cast<int>(shapes[kRois][0]),
                                map_shapes);
  float *output = static_cast<float *>(params[kTargets]);
  PoolBins<uint8_t>(rt, p, params + kMasks, [output](int64_t index, float value) {
    output[index] = value >= kMaskTargetThreshold ? 1.0f : 0.0f;
  });
  return kOk;
}

}  // namespace
}  // namespace maskrcnn_ops

#define MASK_TARGETS_ENTRY_POINT(OUT)                                                        \
  MASKRCNN_ENTRY_POINT(MaskTargets##OUT) {                                                  \
    return maskrcnn_ops::MaskTargets(OUT, nparam, params, ndims, shapes, dtypes);          \
  }

MASKRCNN_MASK_TARGET_SIZES(MASK_TARGETS_ENTRY_POINT)
