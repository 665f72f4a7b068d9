"""The MindRecord row layout, one row per image, shared by the conversion (writer) and the transforms (readers).

    image          bytes   the image file exactly as stored on disk (never re-encoded)
    image_id       int32   COCO image id; for TXT data the 1-based line number
    num_instances  int32   n
    annotation     bytes   float32 (n, 6) little-endian: x1, y1, x2, y2, label, iscrowd (input pixels)
    masks          bytes   n COCO compressed-RLE strings joined by b"\\n", each of the image's size
Annotations travel as bytes plus a count because MindRecord cannot store empty numeric arrays.
Masks are decoded in the pipeline, so a record costs about as much disk as its JPEG.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import cv2
import numpy as np

RECORD_SCHEMA = {
    "image": {"type": "bytes"},
    "image_id": {"type": "int32"},
    "num_instances": {"type": "int32"},
    "annotation": {"type": "bytes"},
    "masks": {"type": "bytes"},
}
RECORD_COLUMNS = list(RECORD_SCHEMA)
ANNOTATION_WIDTH = 6                         # x1, y1, x2, y2, label, iscrowd
MASK_SEPARATOR = b"\n"                       # never occurs in compressed RLE (characters 48..111)
# Bump when the layout above or the meaning of a field changes: older files are rebuilt.
# 2: TXT class numbers are label indices into data.classes (ModelZoo), no longer 0-based foreground indices.
RECORD_FORMAT_VERSION = 2


class DatasetError(ValueError):
    """Input that cannot be converted at all; the message names the file, line or key."""


def decode_image(raw: bytes) -> Optional[np.ndarray]:
    """Encoded bytes -> (h, w, 3) uint8 RGB, or None if undecodable. EXIF rotation is ignored, as in COCO."""
    if not raw:
        return None                          # imdecode raises on an empty buffer instead of returning None
    try:
        image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:                        # some malformed headers raise rather than return None
        return None
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def column_bytes(column: np.ndarray) -> bytes:
    """A MindRecord bytes column arrives as a (1,) numpy 'S' array; tobytes keeps trailing zero bytes."""
    return column.tobytes()


def column_scalar(column: np.ndarray) -> int:
    return int(np.asarray(column).reshape(-1)[0])


def decode_instances(num_instances, annotation, masks) -> Tuple[np.ndarray, List[bytes]]:
    """Record columns -> ((n, 6) float32 annotation rows, n compressed RLE strings)."""
    n = column_scalar(num_instances)
    rows = np.frombuffer(column_bytes(annotation)[:n * ANNOTATION_WIDTH * 4], "<f4").reshape(n, ANNOTATION_WIDTH)
    rles = column_bytes(masks).split(MASK_SEPARATOR) if n else []
    return rows, rles
