"""Network outputs -> detections in the original image frame (src/detections.py)."""
import numpy as np

from src.detections import boxes_to_original, detections_from_outputs

MASK = 28


def test_boxes_to_original_divides_by_scale_and_clips():
    image_shape = (100.0, 200.0, 0.5, 0.25)            # ori_h, ori_w, scale_h, scale_w
    boxes = np.array([[10, 5, 20, 25], [-4, -2, 60, 80]], np.float32)
    out = boxes_to_original(boxes, image_shape)
    np.testing.assert_allclose(out[0], [40, 10, 80, 50])
    np.testing.assert_allclose(out[1], [0, 0, 200, 100])   # clipped to (ori_w, ori_h)


def test_detections_from_outputs_keeps_valid_rows_in_original_frame():
    boxes = np.array([[10, 10, 38, 38], [0, 0, 5, 5], [20, 4, 48, 32]], np.float32)
    valid = np.array([True, False, True])
    det = detections_from_outputs(boxes, np.array([0.9, 0.8, 0.7]), np.array([1, 2, 3]), valid,
                                  np.ones((3, MASK, MASK), np.float32), (30.0, 40.0, 2.0, 2.0), 0.5)
    np.testing.assert_allclose(det.boxes, [[5, 5, 19, 19], [10, 2, 24, 16]])
    np.testing.assert_array_equal(det.labels, [1, 3])
    assert det.masks.shape == (2, 30, 40)
    assert det.masks[0].sum() == 14 * 14 and det.masks[0, 5:19, 5:19].all()
