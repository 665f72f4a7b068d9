"""Pasting mask probabilities into their boxes (src/mask_paste.py)."""
import cv2
import numpy as np
import pytest

from src.mask_paste import paste_masks

MASK = 28


def test_all_ones_mask_fills_exactly_its_box():
    out = paste_masks(np.ones((1, MASK, MASK)), np.array([[10, 20, 30, 50]]), 60, 40, 0.5)
    expected = np.zeros((60, 40), np.uint8)
    expected[20:50, 10:30] = 1
    np.testing.assert_array_equal(out[0], expected)


def test_box_partly_outside_the_image_is_cut_at_the_border():
    out = paste_masks(np.ones((1, MASK, MASK)), np.array([[-5.0, 30.0, 12.0, 70.0]]), 50, 40, 0.5)
    expected = np.zeros((50, 40), np.uint8)
    expected[30:50, 0:12] = 1
    np.testing.assert_array_equal(out[0], expected)


def test_mask_at_unit_scale_is_copied_pixel_for_pixel():
    rng = np.random.default_rng(0)
    masks = rng.random((2, MASK, MASK)).astype(np.float32)
    boxes = np.array([[5, 7, 5 + MASK, 7 + MASK], [0, 30, MASK, 30 + MASK]], np.float32)
    out = paste_masks(masks, boxes, 64, 40, 0.5)
    np.testing.assert_array_equal(out[0, 7:35, 5:33], masks[0] >= 0.5)
    np.testing.assert_array_equal(out[1, 30:58, 0:28], masks[1] >= 0.5)
    assert out[0].sum() == (masks[0] >= 0.5).sum()      # nothing outside the box


def test_paste_matches_opencv_bilinear_resize_of_the_box():
    rng = np.random.default_rng(1)
    mask = cv2.GaussianBlur(rng.random((MASK, MASK)).astype(np.float32), (5, 5), 0)
    threshold = float(np.median(mask))
    x1, y1, width, height = 12, 3, 45, 70                 # non-square, non-integer scale
    out = paste_masks(mask[None], np.array([[x1, y1, x1 + width, y1 + height]]), 80, 64, threshold)
    reference = cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR) >= threshold
    region = out[0, y1:y1 + height, x1:x1 + width].astype(bool)
    assert (region != reference).mean() < 0.002         # float rounding right at the threshold only
    assert out[0].sum() == region.sum()


def test_left_half_mask_pastes_to_left_half_of_box():
    mask = np.zeros((1, MASK, MASK), np.float32)
    mask[0, :, :MASK // 2] = 1.0
    out = paste_masks(mask, np.array([[0, 0, 2 * MASK, MASK]]), MASK, 2 * MASK, 0.5)
    np.testing.assert_array_equal(out[0].sum(axis=0), [MASK] * MASK + [0] * MASK)


def test_degenerate_box_gives_empty_mask():
    out = paste_masks(np.ones((2, MASK, MASK)), np.array([[10, 10, 10, 30], [5, 5, 5.2, 5.3]]), 40, 40, 0.5)
    assert out.shape == (2, 40, 40) and out.sum() == 0


def test_paste_masks_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="paste_masks"):
        paste_masks(np.ones((2, MASK, MASK)), np.zeros((3, 4)), 10, 10, 0.5)
