// Mask targets (src/ops/mask_targets.py): MaskTargets<out>(rois (R, 5) = (mask row, x1, y1, x2, y2), settings
// (4,) = (sample_ratio, cell offset, stride, mask width W), masks uint8 (B, M, H, W) one byte per pixel or
// (B, M, H, ceil(W / 8)) eight pixels per byte (src/data/mask_bits.py), read as B * M one-channel maps) ->
// (R, out, out) float32: 1 where the RoIAlign of the RoI's mask is >= the threshold (constants.h), else 0; for each
// out of MASKRCNN_MASK_TARGET_SIZES.
#include "roi_taps.h"

namespace maskrcnn_ops {
namespace {

enum Arg { kRois, kSettings, kMasks, kTargets, kArgs };
constexpr int kMaskWidth = kFirstStride + 1;  // settings: roi_taps.h's, then the mask width in pixels

// PoolTaps on bit-packed one-channel maps: a tap's offset y * width + x is pixel x of row y, which is bit x % 8 of
// byte x / 8 of a row of row_bytes bytes.
template <typename Store>
void PoolBits(Runtime &rt, const RoiProblem &p, const uint8_t *maps, int64_t height, int64_t width,
              int64_t row_bytes, Store store) {
  PoolTaps(
      rt, p, [&](int r, int64_t) { return maps + static_cast<int64_t>(p.image[r]) * height * row_bytes; },
      [width, row_bytes](const uint8_t *plane, int32_t offset) {
        int64_t y = offset / width, x = offset % width;
        return static_cast<float>((plane[y * row_bytes + (x >> 3)] >> (x & 7)) & 1);
      },
      store);
}

int MaskTargets(int out, int nparam, void **params, const int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != kArgs || ndims[kMasks] != 4 || !IsDtype(dtypes[kMasks], "uint8")) return kBadArguments;
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  const int64_t *masks = shapes[kMasks];
  const float *settings = static_cast<float *>(params[kSettings]);
  const int64_t width = static_cast<int64_t>(settings[kMaskWidth]);
  const bool bits = masks[3] != width;
  if (bits && masks[3] != (width + 7) / 8) return kBadArguments;
  int64_t mask_shape[4] = {masks[0] * masks[1], 1, masks[2], width};
  int64_t *map_shapes[1] = {mask_shape};
  RoiProblem p = MakeRoiProblem(out, static_cast<float *>(params[kRois]), nullptr, settings, 1,
                                static_cast<int>(shapes[kRois][0]), map_shapes);
  float *output = static_cast<float *>(params[kTargets]);
  auto threshold = [output](int64_t index, float value) {
    output[index] = value >= kMaskTargetThreshold ? 1.0f : 0.0f;
  };
  if (bits) {
    PoolBits(rt, p, static_cast<const uint8_t *>(params[kMasks]), masks[2], width, masks[3], threshold);
  } else {
    PoolBins<uint8_t>(rt, p, params + kMasks, threshold);
  }
  return kOk;
}

}  // namespace
}  // namespace maskrcnn_ops

#define MASK_TARGETS_ENTRY_POINT(OUT)                                                        \
  MASKRCNN_ENTRY_POINT(MaskTargets##OUT) {                                                  \
    return maskrcnn_ops::MaskTargets(OUT, nparam, params, ndims, shapes, dtypes);          \
  }

MASKRCNN_MASK_TARGET_SIZES(MASK_TARGETS_ENTRY_POINT)
