"""Reading one image file the way the eval pipeline feeds the network (predict.py, preprocess.py)."""
from __future__ import annotations

import numpy as np


def read_image_input(path: str, transform):
    """Image file -> (RGB (h, w, 3) uint8, image (1, 3, H, W) float32, image_shape (1, 4) float32).

    `transform` is the eval pipeline's src.data.transforms.EvalTransform, so predict.py and preprocess.py feed the
    network exactly what eval.py does. An unreadable, empty or undecodable file is a ValueError or
    FileNotFoundError naming it.
    """
    from src.data.records import decode_image

    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        raise FileNotFoundError(f"cannot read image '{path}': {err.strerror or err}") from None
    if not raw:
        raise ValueError(f"image '{path}' cannot be decoded (the file is empty)")
    rgb = decode_image(raw)
    if rgb is None:
        raise ValueError(f"image '{path}' cannot be decoded (truncated or not an image)")
    image, image_shape, _ = transform(np.frombuffer(raw, np.uint8), np.zeros(1, np.int32))
    return rgb, image[None], image_shape[None]
