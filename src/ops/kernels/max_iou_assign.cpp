// Max-IoU assignment of candidate boxes to GT boxes (src/ops/max_iou_assign.py, same arithmetic) without the
// (M, N) IoU matrix: only the valid GTs are visited, since a padded GT's IoU is exactly 0 with every candidate.
//   MaxIoUAssign(gt (M, 4), gt_valid (M,) bool, boxes (N, 4), box_valid (N,) bool, settings float32 (in the order
//   of MaxIouAssignSetting, constants.h)) -> assigned_gt (N,) int32, positive (N,) bool, negative (N,) bool.
#include "common.h"

namespace maskrcnn_ops {
namespace {

enum Arg { kGts, kGtValid, kBoxes, kBoxValid, kSettings, kAssigned, kPositive, kNegative, kArgs };

inline float Relu(float x) { return std::max(x, 0.0f); }

inline float Iou(const float *gt, float gt_area, const float *box, float box_area, float eps) {
  float inter = Relu(std::min(gt[2], box[2]) - std::max(gt[0], box[0])) *
                Relu(std::min(gt[3], box[3]) - std::max(gt[1], box[1]));
  return inter / std::max((gt_area + box_area) - inter, eps);
}

inline float Area(const float *box) { return Relu(box[2] - box[0]) * Relu(box[3] - box[1]); }

int MaxIoUAssign(int nparam, void **params, const int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != kArgs || !IsDtype(dtypes[kGts], "float32") || !IsDtype(dtypes[kGtValid], "bool") ||
      !IsDtype(dtypes[kBoxes], "float32") || !IsDtype(dtypes[kBoxValid], "bool") ||
      shapes[kSettings][0] != kMaxIouAssignSettings) {
    return kBadArguments;
  }
  const float *gts = static_cast<const float *>(params[kGts]), *boxes = static_cast<const float *>(params[kBoxes]);
  const bool *gt_valid = static_cast<const bool *>(params[kGtValid]);
  const bool *box_valid = static_cast<const bool *>(params[kBoxValid]);
  const float *settings = static_cast<const float *>(params[kSettings]);
  int32_t *assigned = static_cast<int32_t *>(params[kAssigned]);
  bool *positive = static_cast<bool *>(params[kPositive]), *negative = static_cast<bool *>(params[kNegative]);
  int64_t num_gts = shapes[kGts][0], num_boxes = shapes[kBoxes][0];
  const float eps = settings[kIouEps], nowhere_corner = settings[kNowhere];
  const float nowhere[4] = {nowhere_corner, nowhere_corner, nowhere_corner, nowhere_corner};
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
        float iou = Iou(gts + 4 * j, gt_area[j], box, area, eps);
        if (iou > best) best = iou, best_gt = j;
        gt_best[j] = std::max(gt_best[j], iou);
      }
      max_iou[i] = best, assigned[i] = best_gt;
    }
  });
  // A GT claims the candidates at its best IoU, if that is >= min_pos_iou; the last claiming GT wins.
  std::vector<float> claim_level(num_gts, settings[kUnreachableIou]);
  for (int j : valid_gts) {
    float best = 0.0f;
    for (int t = 0; t < threads; ++t) best = std::max(best, thread_gt_best[static_cast<size_t>(t) * num_gts + j]);
    if (best >= settings[kMinPosIou]) claim_level[j] = best;
  }
  ParallelRange(rt, num_boxes, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float *box = box_of(i);
      float area = Area(box);
      bool claimed = false;  // invalid candidates are never claimed (their IoU 0 would meet a min_pos_iou of 0)
      for (auto j = valid_gts.rbegin(); j != valid_gts.rend() && !claimed && box_valid[i]; ++j) {
        if (claim_level[*j] <= 1.0f && Iou(gts + 4 * *j, gt_area[*j], box, area, eps) - claim_level[*j] >= 0.0f) {
          assigned[i] = *j, claimed = true;
        }
      }
      positive[i] = claimed || (box_valid[i] && max_iou[i] >= settings[kPosIou]);
      negative[i] = box_valid[i] && max_iou[i] < settings[kNegIou] && !positive[i];
    }
  });
  return kOk;
}

}  // namespace
}  // namespace maskrcnn_ops

MASKRCNN_ENTRY_POINT(MaxIoUAssign) { return maskrcnn_ops::MaxIoUAssign(nparam, params, ndims, shapes, dtypes); }
