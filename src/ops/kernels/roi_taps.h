// RoIAlign's sampling taps, shared by the pyramid RoIAlign (roi_align.cpp) and the mask targets
// (mask_targets.cpp): the conventions of src/ops/roi_align.py (RoIs at least one cell wide; the cell offset setting
// is 0.5 for the aligned RoIAlign, 0 for torchvision's aligned=False).
#pragma once

#include <cmath>

#include "common.h"

namespace maskrcnn_ops {

// settings (2 + L,) float32: the sample ratio, the cell offset (input coordinate X maps to feature coordinate
// X / stride - offset), then the stride of each of the L levels.
enum RoiSetting { kSampleRatio = 0, kCellOffset = 1, kFirstStride = 2 };

struct AxisTaps {  // per sample along one axis: the two cells and their weights (bin average folded in)
  std::vector<int> low, high;
  std::vector<float> w_low, w_high;
};

inline void ComputeAxisTaps(float start, float extent, int size, int samples, int sample_ratio, AxisTaps *taps) {
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

// Inputs shared by both passes: rois (R, 5), level (R,) int32, settings (2 + L,) = sample_ratio, offset, strides...,
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

inline RoiProblem MakeRoiProblem(int out, const float *rois, const int32_t *level, const float *settings, int levels,
                          int num_rois, int64_t **map_shapes) {
  RoiProblem p;
  int sr = static_cast<int>(settings[kSampleRatio]);
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
    float stride = settings[kFirstStride + l];
    int height = static_cast<int>(map_shapes[l][2]), width = static_cast<int>(map_shapes[l][3]);
    float roi_w = std::max((roi[3] - roi[1]) / stride, 1.0f), roi_h = std::max((roi[4] - roi[2]) / stride, 1.0f);
    ComputeAxisTaps(roi[2] / stride - settings[kCellOffset], roi_h, height, out * sr, sr, &y);
    ComputeAxisTaps(roi[1] / stride - settings[kCellOffset], roi_w, width, out * sr, sr, &x);
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

// The bins of every (RoI, channel) pair: output[r, c, bin] = sum over the bin's taps of weight * read(plane, offset),
// where plane = plane_of(r, c) and read(plane, offset) is the map value at a tap's offset y * width + x.
template <typename PlaneOf, typename Read, typename Store>
void PoolTaps(Runtime &rt, const RoiProblem &p, PlaneOf plane_of, Read read, Store store) {
  // One job = one (RoI, channel) pair: its bins.
  ParallelRange(rt, static_cast<int64_t>(p.rois) * p.channels, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      int r = static_cast<int>(job / p.channels);
      const auto plane = plane_of(r, job % p.channels);
      const int32_t *offset = p.offset.data() + static_cast<size_t>(r) * p.bins * p.taps_per_bin;
      const float *weight = p.weight.data() + static_cast<size_t>(r) * p.bins * p.taps_per_bin;
      for (int bin = 0; bin < p.bins; ++bin, offset += p.taps_per_bin, weight += p.taps_per_bin) {
        float sum = 0.0f;
        for (int t = 0; t < p.taps_per_bin; ++t) sum += weight[t] * read(plane, offset[t]);
        store(job * p.bins + bin, sum);
      }
    }
  });
}

// PoolTaps on NCHW maps of element type T, one per level.
template <typename T, typename Store>
void PoolBins(Runtime &rt, const RoiProblem &p, void *const *maps, Store store) {
  PoolTaps(
      rt, p, [&](int r, int64_t c) { return static_cast<const T *>(maps[p.level[r]]) + p.PlaneBase(r, c); },
      [](const T *plane, int32_t offset) { return static_cast<float>(plane[offset]); }, store);
}

}  // namespace maskrcnn_ops
