"""The op layer between the model (src/maskrcnn/) and the CPU kernels (src/ops/kernels/).

Each module is one op that runs our CPU kernel when `backend.enabled()` at build time, else MindSpore's
operators: conv (Conv2d / Conv2dTranspose), roi_align, mask_targets, max_iou_assign, upsample_add, and layout
(oneDNN's blocked tensors, an internal contract between the convolutions and the backbone that chains them).
constants holds the numbers the kernels share with Python, build compiles the kernels (`python -m src.ops.build`).
"""
