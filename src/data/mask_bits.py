"""GT masks as bits. The training pipeline hands the network its (M, H, W) 0/1 masks as (M, H, ceil(W / 8)) uint8:
pixel x of a row is bit x % 8 (least significant first) of byte x // 8, numpy's `packbits(..., bitorder="little")`.
At the recipe size a batch's 128 mask slots are 240 MB as one byte per pixel and 30 MB as bits, in every queue
of the input pipeline and in the training graph's input. The network takes either form (src/ops/mask_targets.py
tells them apart by the last dimension)."""
import numpy as np

BIT_ORDER = "little"


def packed_width(width: int) -> int:
    """Bytes of one packed mask row of `width` pixels."""
    return (width + 7) // 8


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(..., W) 0/1 masks -> (..., ceil(W / 8)) uint8 bits (any nonzero pixel is a 1)."""
    return np.packbits(masks, axis=-1, bitorder=BIT_ORDER)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    """(..., ceil(W / 8)) uint8 bits -> (..., W) uint8 0/1 masks."""
    if packed.shape[-1] != packed_width(width):
        raise ValueError(f"packed masks of {packed.shape[-1]} bytes a row do not hold rows of {width} pixels "
                         f"(expected {packed_width(width)} bytes)")
    return np.unpackbits(packed, axis=-1, count=width, bitorder=BIT_ORDER)
