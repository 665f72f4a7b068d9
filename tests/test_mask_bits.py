"""GT masks as bits (src/data/mask_bits.py): the layout the pipeline, the mask-target kernel and its graph version
share."""
import numpy as np
import pytest

from src.data.mask_bits import pack_masks, packed_width, unpack_masks


@pytest.mark.parametrize("width", [1, 7, 8, 9, 16, 17, 192])
def test_pack_then_unpack_gives_the_masks_back(width):
    masks = (np.random.RandomState(width).rand(3, 5, width) < 0.4).astype(np.uint8)
    packed = pack_masks(masks)
    assert packed.shape == (3, 5, packed_width(width)) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_masks(packed, width), masks)


def test_pixel_x_is_bit_x_mod_8_of_byte_x_div_8():
    row = np.zeros((1, 20), np.uint8)
    row[0, [0, 3, 9, 19]] = 1
    packed = pack_masks(row)
    assert packed.tolist() == [[0b00001001, 0b00000010, 0b00001000]]          # padding bits stay 0


def test_any_nonzero_pixel_is_a_one():
    np.testing.assert_array_equal(unpack_masks(pack_masks(np.array([[0, 2, 255, 1]], np.uint8)), 4),
                                  [[0, 1, 1, 1]])


def test_unpacking_with_the_wrong_width_says_which():
    with pytest.raises(ValueError, match="3 bytes a row do not hold rows of 30 pixels"):
        unpack_masks(np.zeros((2, 3), np.uint8), 30)
