"""The ModelZoo's `src/dataset.py` names, kept importable; the code lives in the `src.data` package.

New code imports from `src.data.conversion`, `src.data.transforms` and `src.data.pipeline` directly.
"""
from src.data.annotations import (CLIPPED_BOX, SKIP_CORRUPT_IMAGE, SKIP_DEGENERATE_MASK, SKIP_EMPTY_BOX,
                                  SKIP_MISSING_IMAGE, SKIP_NO_ANNOTATION, SKIP_ORPHAN_ANNOTATION, SKIP_OVER_MAX,
                                  SKIP_SIZE_MISMATCH, ImageTask, SkipLog)
from src.data.conversion import (FILE_PREFIX, MANIFEST_SUFFIX, data_to_mindrecord, encode_record, load_manifest,
                                 manifest_path, mindrecord_files)
from src.data.pipeline import EVAL_COLUMNS, TRAIN_COLUMNS, create_maskrcnn_dataset, sample_order
from src.data.records import (ANNOTATION_WIDTH, RECORD_COLUMNS, RECORD_SCHEMA, DatasetError, decode_image,
                              decode_instances)
from src.data.transforms import (EvalTransform, Geometry, TrainTransform, fitted_size, photometric_distortion,
                                 warp_planes)

__all__ = [
    "ANNOTATION_WIDTH", "CLIPPED_BOX", "EVAL_COLUMNS", "FILE_PREFIX", "MANIFEST_SUFFIX", "RECORD_COLUMNS",
    "RECORD_SCHEMA", "SKIP_CORRUPT_IMAGE", "SKIP_DEGENERATE_MASK", "SKIP_EMPTY_BOX", "SKIP_MISSING_IMAGE",
    "SKIP_NO_ANNOTATION", "SKIP_ORPHAN_ANNOTATION", "SKIP_OVER_MAX", "SKIP_SIZE_MISMATCH", "TRAIN_COLUMNS",
    "DatasetError", "EvalTransform", "Geometry", "ImageTask", "SkipLog", "TrainTransform", "create_maskrcnn_dataset",
    "data_to_mindrecord", "decode_image", "decode_instances", "encode_record", "fitted_size", "load_manifest",
    "manifest_path", "mindrecord_files", "photometric_distortion", "sample_order", "warp_planes",
]
