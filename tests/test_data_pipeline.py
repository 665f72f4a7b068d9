"""Transforms and the input pipeline (src/data/transforms.py, src/data/pipeline.py)."""
import os

import cv2
import numpy as np
import pytest

from data_helpers import (NO_AUGMENTATION, TRAIN_JSON, VAL_JSON, batches_of, raw_records, read_json, samples_of,
                          valid_size, with_overrides)
from src.data.pipeline import EVAL_COLUMNS, TRAIN_COLUMNS, create_maskrcnn_dataset, sample_order
from src.data.records import DatasetError, decode_image, decode_instances
from src.data.transforms import photometric_distortion


@pytest.fixture(scope="module")
def train_batches(tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    return batches_of(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, cfg.train.batch_size))


def test_training_columns_shapes_and_dtypes(tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    b, m, h, w = cfg.train.batch_size, cfg.data.max_instance_count, cfg.data.img_height, cfg.data.img_width
    batches = batches_of(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, b), pixels=False)
    assert len(batches) == 8 // b
    expected = {"image": ((b, 3, h, w), np.float32), "image_shape": ((b, 4), np.float32),
                "box": ((b, m, 4), np.float32), "label": ((b, m), np.int32), "valid_num": ((b, m), np.bool_),
                "mask": ((b, m, h, (w + 7) // 8), np.uint8)}                   # eight pixels a byte
    for batch in batches:
        assert list(batch) == TRAIN_COLUMNS
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected


def test_training_values_are_in_range(train_batches, tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    mean, std = np.array(cfg.data.img_mean), np.array(cfg.data.img_std)
    for sample in samples_of(train_batches):
        valid, n = sample["valid_num"], int(sample["valid_num"].sum())
        assert n >= 1 and valid[:n].all() and not valid[n:].any()
        assert ((sample["label"][:n] >= 1) & (sample["label"][:n] < cfg.num_classes)).all()
        assert not sample["label"][n:].any() and not sample["box"][n:].any() and not sample["mask"][n:].any()
        assert set(np.unique(sample["mask"])) <= {0, 1}
        valid_h, valid_w = valid_size(sample["image_shape"])
        assert valid_h <= cfg.data.img_height and valid_w <= cfg.data.img_width
        assert max(valid_h / cfg.data.img_height, valid_w / cfg.data.img_width) == pytest.approx(1.0, abs=0.01)
        box = sample["box"][:n]
        assert (box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all()
        assert (box >= 0).all() and (box[:, [0, 2]] <= valid_w).all() and (box[:, [1, 3]] <= valid_h).all()
        image = sample["image"]
        assert not image[:, valid_h:].any() and not image[:, :, valid_w:].any()
        low, high = (-mean / std).min() - 1e-4, ((255 - mean) / std).max() + 1e-4
        assert low <= image.min() and image.max() <= high


def _assert_boxes_enclose_masks(samples, tolerance=2.0):
    """Every non-empty transformed mask lies inside its box, and the box is tight around it."""
    checked = empty = 0
    for sample in samples:
        for box, mask in zip(sample["box"][sample["valid_num"]], sample["mask"][sample["valid_num"]]):
            ys, xs = np.nonzero(mask)
            if xs.size == 0:
                empty += 1
                continue
            x1, y1, x2, y2 = box
            extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            assert extent[0] >= x1 - 1 and extent[1] >= y1 - 1 and extent[2] <= x2 + 1 and extent[3] <= y2 + 1
            np.testing.assert_allclose(extent, box, atol=tolerance)
            checked += 1
    assert checked > 4 * empty
    return checked


def test_boxes_follow_masks_through_expand_rescale_and_flip(tiny_mindrecord, synthetic_coco):
    cfg = with_overrides(tiny_mindrecord.cfg, **{"data.expand_ratio": 1.0, "data.photo_ratio": 0.0})
    sizes = {i["id"]: (i["height"], i["width"]) for i in read_json(os.path.join(synthetic_coco, TRAIN_JSON))["images"]}
    expanded = 0
    for flip in (0.0, 1.0):
        flipped = with_overrides(cfg, **{"data.flip_ratio": flip})
        for epoch in range(2):
            samples = samples_of(batches_of(create_maskrcnn_dataset(flipped, tiny_mindrecord.train_files, True, 2,
                                                                epoch=epoch)))
            _assert_boxes_enclose_masks(samples)
            originals = {s for s in sizes.values()}
            expanded += sum((int(s["image_shape"][0]), int(s["image_shape"][1])) not in originals for s in samples)
    assert expanded >= 4


def test_flip_mirrors_image_boxes_and_masks(tiny_mindrecord):
    cfg = with_overrides(tiny_mindrecord.cfg, **NO_AUGMENTATION)
    plain = samples_of(batches_of(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 2)))
    mirrored = samples_of(batches_of(create_maskrcnn_dataset(with_overrides(cfg, **{"data.flip_ratio": 1.0}),
                                                         tiny_mindrecord.train_files, True, 2)))
    for a, b in zip(plain, mirrored):
        np.testing.assert_array_equal(a["image_shape"], b["image_shape"])
        valid_h, valid_w = valid_size(a["image_shape"])
        np.testing.assert_allclose(b["image"][:, :valid_h, :valid_w], a["image"][:, :valid_h, valid_w - 1::-1],
                                   atol=0.05)
        n = int(a["valid_num"].sum())
        np.testing.assert_allclose(b["box"][:n, [0, 2]], valid_w - a["box"][:n, [2, 0]], atol=1e-3)
        np.testing.assert_array_equal(b["box"][:n, [1, 3]], a["box"][:n, [1, 3]])
        differing = (b["mask"][:n, :, :valid_w] != a["mask"][:n, :, valid_w - 1::-1]).sum()
        assert differing <= 0.01 * a["mask"][:n].sum()


def test_photometric_distortion_changes_colours_within_range(tiny_mindrecord):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 30, 3)).astype(np.uint8)
    outputs = [photometric_distortion(np.random.default_rng(seed), image) for seed in range(8)]
    assert all(o.dtype == np.float32 and o.shape == image.shape and 0 <= o.min() and o.max() <= 255 for o in outputs)
    assert sum(not np.allclose(o, image, atol=1.0) for o in outputs) >= 6
    cfg = with_overrides(tiny_mindrecord.cfg, **NO_AUGMENTATION)
    plain = batches_of(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 2))
    distorted = batches_of(create_maskrcnn_dataset(with_overrides(cfg, **{"data.photo_ratio": 1.0}),
                                                 tiny_mindrecord.train_files, True, 2))
    assert not all(np.allclose(a["image"], b["image"]) for a, b in zip(plain, distorted))
    for a, b in zip(plain, distorted):
        for column in ("image_shape", "box", "mask"):
            np.testing.assert_array_equal(a[column], b[column])


def test_crowd_regions_are_not_training_targets(tiny_mindrecord):
    cfg = with_overrides(tiny_mindrecord.cfg, **NO_AUGMENTATION)
    targets = {}
    for record in raw_records(tiny_mindrecord.train_files):
        rows, _ = decode_instances(record["num_instances"], record["annotation"], record["masks"])
        targets[int(record["image_id"])] = rows
    assert any((rows[:, 5] == 1).any() for rows in targets.values())
    order = sample_order(len(targets), True, cfg.train.seed, 0)
    ids = [int(r["image_id"]) for r in raw_records(tiny_mindrecord.train_files)]
    samples = samples_of(batches_of(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 2)))
    for position, sample in zip(order, samples):
        rows = targets[ids[position]]
        non_crowd = rows[rows[:, 5] == 0]
        assert sample["valid_num"].sum() == len(non_crowd)
        np.testing.assert_array_equal(sample["label"][:len(non_crowd)], non_crowd[:, 4])


def test_eval_columns_are_the_plain_rescaled_image(tiny_mindrecord, synthetic_coco):
    cfg = tiny_mindrecord.cfg
    coco = read_json(os.path.join(synthetic_coco, VAL_JSON))
    batches = batches_of(create_maskrcnn_dataset(cfg, tiny_mindrecord.val_files, False, 3))
    assert [len(b["image"]) for b in batches] == [3, 1]                  # no drop_remainder for eval
    samples = samples_of(batches)
    assert all(list(b) == EVAL_COLUMNS for b in batches)
    recorded = [int(r["image_id"]) for r in raw_records(tiny_mindrecord.val_files)]
    assert [int(s["image_id"]) for s in samples] == recorded
    infos = {i["id"]: i for i in coco["images"]}
    mean, std = np.array(cfg.data.img_mean, np.float32), np.array(cfg.data.img_std, np.float32)
    for sample in samples:
        info = infos[int(sample["image_id"])]
        assert sample["image"].shape == (3, cfg.data.img_height, cfg.data.img_width)
        assert sample["image_id"].dtype == np.int32
        ori_h, ori_w, scale_h, scale_w = sample["image_shape"]
        assert (ori_h, ori_w) == (info["height"], info["width"])
        valid_h, valid_w = valid_size(sample["image_shape"])
        with open(os.path.join(synthetic_coco, "val2017", info["file_name"]), "rb") as handle:
            rgb = decode_image(handle.read())
        reference = (cv2.resize(rgb, (valid_w, valid_h), interpolation=cv2.INTER_LINEAR) - mean) / std
        got = sample["image"][:, :valid_h, :valid_w].transpose(1, 2, 0)
        assert np.abs(got - reference).mean() < 0.02
        assert not sample["image"][:, valid_h:].any() and not sample["image"][:, :, valid_w:].any()


def test_same_seed_and_epoch_give_identical_batches_for_any_worker_count(tiny_mindrecord, train_batches):
    cfg = tiny_mindrecord.cfg
    again = batches_of(create_maskrcnn_dataset(with_overrides(cfg, **{"data.num_parallel_workers": 2}),
                                             tiny_mindrecord.train_files, True, cfg.train.batch_size))
    assert len(again) == len(train_batches)
    for a, b in zip(again, train_batches):
        for column in TRAIN_COLUMNS:
            np.testing.assert_array_equal(a[column], b[column])


def test_other_epoch_or_seed_changes_order_and_augmentation(tiny_mindrecord, train_batches):
    cfg = tiny_mindrecord.cfg
    assert not np.array_equal(sample_order(8, True, cfg.train.seed, 0), sample_order(8, True, cfg.train.seed, 1))
    assert not np.array_equal(sample_order(8, True, 1, 0), sample_order(8, True, 2, 0))
    later = batches_of(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, cfg.train.batch_size, epoch=1))
    assert not all(np.array_equal(a["image_shape"], b["image_shape"]) for a, b in zip(later, train_batches))


def test_resumed_epoch_skips_to_the_same_batches(tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    full = batches_of(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 2, epoch=3))
    resumed = batches_of(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 2, epoch=3).skip(2))
    assert len(resumed) == len(full) - 2
    for a, b in zip(resumed, full[2:]):
        for column in TRAIN_COLUMNS:
            np.testing.assert_array_equal(a[column], b[column])


@pytest.mark.parametrize("num_records, num_shards", [(8, 2), (9, 2), (7, 3)])
def test_training_shards_are_disjoint_and_equal_sized(num_records, num_shards):
    shards = [sample_order(num_records, True, 3, 5, num_shards, s) for s in range(num_shards)]
    merged = np.concatenate(shards)
    assert len(set(merged.tolist())) == merged.size == (num_records // num_shards) * num_shards
    assert {len(s) for s in shards} == {num_records // num_shards}
    assert set(merged.tolist()) <= set(range(num_records))


def test_eval_shards_cover_every_image_once(tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    ids = [[int(i) for b in batches_of(create_maskrcnn_dataset(cfg, tiny_mindrecord.val_files, False, 1,
                                                             num_shards=2, shard_id=s)) for i in b["image_id"]]
           for s in range(2)]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(int(r["image_id"]) for r in raw_records(tiny_mindrecord.val_files))


def test_training_shard_batches(tiny_mindrecord):
    cfg = tiny_mindrecord.cfg
    shards = [batches_of(create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 2, num_shards=2,
                                               shard_id=s)) for s in range(2)]
    assert [len(s) for s in shards] == [2, 2]
    images = [b["image"][i].tobytes() for s in shards for b in s for i in range(2)]
    assert len(set(images)) == len(images) == 8
    with pytest.raises(DatasetError, match="fewer than one batch"):
        create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, 5, num_shards=2)


def test_operator_queues_are_kept_short(tiny_mindrecord):
    """Each queued training row holds all its mask slots at input size; MindSpore's default 16-row queues filled
    7.8 GB behind a slow step at the recipe size (bench/results.md)."""
    import mindspore.dataset as ds

    from src.data import pipeline

    ds.config.set_prefetch_size(16)
    cfg = tiny_mindrecord.cfg
    create_maskrcnn_dataset(cfg, tiny_mindrecord.train_files, True, cfg.train.batch_size)
    assert ds.config.get_prefetch_size() == pipeline.QUEUE_ROWS == 2
