"""ImageTasks -> sharded MindRecord (layout in src.data.records), sealed by a manifest.

Conversion is streamed (bounded windows of images handed to a worker pool), written into a hidden
temporary directory next to the output (named with the writer's pid and locked while it runs, so a later
run can tell a killed conversion's leftovers from a live one), moved into place when complete, and sealed by a manifest written
last: shard files without a matching manifest are never reused. The manifest's fingerprint covers
everything the records depend on (annotation file, every listed image's size and modification time, the
settings that change records); any difference rebuilds. Bad input either raises DatasetError before
anything is written (configuration-level problems, bad TXT lines) or is skipped, counted and logged per
image (see the SKIP_* reasons in src.data.annotations). Every call prints one line: converted or reused,
with the image counts and the skip counts.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import List, Optional, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from mindspore.mindrecord import FileWriter

from src import atomic_io
from src.config import Config
from src.data.annotations import (CLIPPED_BOX, SKIP_CORRUPT_IMAGE, SKIP_DEGENERATE_MASK, SKIP_EMPTY_BOX,
                                  SKIP_MISSING_IMAGE, SKIP_NO_ANNOTATION, SKIP_OVER_MAX, SKIP_SIZE_MISMATCH,
                                  ImageTask, SkipLog, annotation_file, coco_tasks, describe_skips,
                                  txt_tasks)
from src.data.records import (ANNOTATION_WIDTH, MASK_SEPARATOR, RECORD_FORMAT_VERSION, RECORD_SCHEMA, DatasetError,
                              decode_image)

FILE_PREFIX = {True: "MaskRcnn_train.mindrecord", False: "MaskRcnn_eval.mindrecord"}
MANIFEST_SUFFIX = ".manifest.json"
MIN_BOX_SIZE = 1.0                           # boxes narrower or lower than this (pixels, after clipping) are skipped
CONVERT_WINDOW = 32                          # images in flight per conversion worker: bounds memory
PARTIAL_INFIX = ".partial-"                  # staging folder: .<file prefix>.partial-<pid>-<random>
PARTIAL_PATTERN = re.compile(r"^\.(?:%s)%s(\d+)-" % ("|".join(map(re.escape, FILE_PREFIX.values())),
                                                    re.escape(PARTIAL_INFIX)))
LOCK_NAME = "writer.lock"                    # flock-ed by the converting process for as long as it runs
# what a changed fingerprint key means to the user, for the "rebuilding" line
CHANGE_NAMES = {"source": "annotation file changed", "source_size": "annotation file changed",
                "source_mtime_ns": "annotation file changed", "images": "image files changed",
                "image_files": "image files changed", "format_version": "record format changed"}


# ---------------------------------------------------------------- one image -> one record (workers)

def _instance_rle(segmentation, box: List[float], height: int, width: int):
    """Compressed RLE of one instance, or None if the polygons are degenerate or the mask is empty."""
    if segmentation is None:                                   # TXT data: the filled box
        x1, y1, x2, y2 = box
        rle = mask_utils.frPyObjects([[x1, y1, x2, y1, x2, y2, x1, y2]], height, width)[0]
    elif isinstance(segmentation, dict):
        if list(segmentation.get("size", [])) != [height, width]:
            return None
        rle = (mask_utils.frPyObjects(segmentation, height, width)
               if isinstance(segmentation.get("counts"), list) else dict(segmentation))
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return rle if mask_utils.area(rle) > 0 else None


def encode_record(task: ImageTask, is_training: bool, max_instances: int):
    """One image -> (record dict or None, Counter of skip reasons, [log messages])."""
    counts: collections.Counter = collections.Counter()
    messages: List[Tuple[str, str]] = []

    def skip(reason: str, detail: str = "", amount: int = 1):
        counts[reason] += amount
        messages.append((reason, f"{task.where()}{': ' + detail if detail else ''}"))

    try:
        with open(task.path, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        skip(SKIP_MISSING_IMAGE, err.strerror or str(err))
        return None, counts, messages
    if not raw:
        skip(SKIP_CORRUPT_IMAGE, "empty file (0 bytes)")
        return None, counts, messages
    image = decode_image(raw)
    if image is None:
        skip(SKIP_CORRUPT_IMAGE, "cannot be decoded (truncated or not an image)")
        return None, counts, messages
    height, width = image.shape[:2]
    if task.size is not None and task.size != (height, width):
        skip(SKIP_SIZE_MISMATCH, f"annotation says {task.size}, file is {(height, width)}")
        return None, counts, messages

    rows, rles = [], []
    for box, label, crowd, segmentation in zip(task.boxes, task.labels, task.iscrowd, task.segmentations):
        clipped = np.clip(box, 0.0, [width, height, width, height])
        if clipped[2] - clipped[0] < MIN_BOX_SIZE or clipped[3] - clipped[1] < MIN_BOX_SIZE:
            skip(SKIP_EMPTY_BOX, f"box {box}")
            continue
        if not np.allclose(clipped, box):
            counts[CLIPPED_BOX] += 1
        rle = _instance_rle(segmentation, clipped.tolist(), height, width)
        if rle is None:
            skip(SKIP_DEGENERATE_MASK, f"instance with box {box}")
            continue
        rows.append([*clipped, label, crowd])
        rles.append(rle["counts"])

    annotation = np.asarray(rows, np.float32).reshape(-1, ANNOTATION_WIDTH)
    targets = np.flatnonzero(annotation[:, 5] == 0)
    if targets.size > max_instances:
        skip(SKIP_OVER_MAX, f"{targets.size} instances, keeping the first {max_instances}",
             amount=int(targets.size - max_instances))
        keep = np.sort(np.concatenate([np.flatnonzero(annotation[:, 5] != 0), targets[:max_instances]]))
        annotation, rles = annotation[keep], [rles[i] for i in keep]
    if is_training and not (annotation[:, 5] == 0).any():
        skip(SKIP_NO_ANNOTATION)
        return None, counts, messages
    record = {"image": raw, "image_id": int(task.image_id), "num_instances": len(rles),
              "annotation": annotation.astype("<f4").tobytes(), "masks": MASK_SEPARATOR.join(rles)}
    return record, counts, messages


# ---------------------------------------------------------------- conversion driver

def mindrecord_files(cfg: Config, is_training: bool) -> List[str]:
    """The shard paths a conversion writes (whether or not they exist yet).

    Named as MindSpore's FileWriter names them: a single shard has no index suffix.
    """
    base = os.path.join(cfg.data.mindrecord_dir, FILE_PREFIX[is_training])
    if cfg.data.mindrecord_shards == 1:
        return [base]
    return [f"{base}{i}" for i in range(cfg.data.mindrecord_shards)]


def manifest_path(cfg: Config, is_training: bool) -> str:
    return os.path.join(cfg.data.mindrecord_dir, FILE_PREFIX[is_training] + MANIFEST_SUFFIX)


def load_manifest(cfg: Config, is_training: bool) -> Optional[dict]:
    """The manifest of a finished conversion (source, settings, record count, skip counts), or None."""
    path = manifest_path(cfg, is_training)
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


def _fingerprint(cfg: Config, is_training: bool, source: str, image_paths: Sequence[str]) -> dict:
    """Everything that changes the records; a manifest with a different fingerprint is stale."""
    d = cfg.data
    stat = os.stat(source)
    return {"format_version": RECORD_FORMAT_VERSION, "dataset": d.dataset, "training": is_training,
            "source": os.path.abspath(source), "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
            "images": len(image_paths), "image_files": _image_files_digest(image_paths),
            "classes": list(d.classes), "max_instance_count": d.max_instance_count,
            "shards": d.mindrecord_shards}


def _image_files_digest(image_paths: Sequence[str]) -> str:
    """SHA-256 over every listed image's path, size and mtime ("-" if missing): a fixed, added or replaced
    image changes it, without reading the images."""
    digest = hashlib.sha256()
    for path in image_paths:
        try:
            stat = os.stat(path)
            state = f"{stat.st_size} {stat.st_mtime_ns}"
        except OSError:
            state = "-"
        digest.update(f"{path}\t{state}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _shards_complete(cfg: Config, is_training: bool) -> bool:
    return all(os.path.isfile(f) and os.path.isfile(f + ".db") for f in mindrecord_files(cfg, is_training))


def _up_to_date(cfg: Config, is_training: bool, source: str, manifest: Optional[dict]) -> bool:
    """Whether the finished conversion still matches, checked from the image list its manifest keeps, so
    reuse never parses the annotation file (COCO train: hundreds of MB of JSON, on every rank)."""
    if manifest is None or "image_paths" not in manifest or not os.path.isfile(source):
        return False
    if not _shards_complete(cfg, is_training):
        return False
    return _fingerprint(cfg, is_training, source, manifest["image_paths"]) == manifest.get("fingerprint")


def _stale_reason(cfg: Config, is_training: bool, manifest: Optional[dict], fingerprint: dict) -> str:
    """Why the existing MindRecord is not up to date (after _up_to_date said so)."""
    if manifest is None:
        return "no finished conversion"
    if not _shards_complete(cfg, is_training):
        return "shard files missing"
    old = manifest.get("fingerprint", {})
    changed = sorted({CHANGE_NAMES.get(key, f"setting {key} changed")
                      for key in set(old) | set(fingerprint) if old.get(key) != fingerprint.get(key)})
    return ", ".join(changed) or "input files changed while being checked"


@contextlib.contextmanager
def _staging_dir(directory: str, prefix: str):
    """A hidden folder for the shards being written, locked while this process lives, removed at the end."""
    staging = tempfile.mkdtemp(prefix=f".{prefix}{PARTIAL_INFIX}{os.getpid()}-", dir=directory)
    lock = open(os.path.join(staging, LOCK_NAME), "w", encoding="utf-8")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:                      # a filesystem without locks: the pid in the name decides
            pass
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.close()


def _remove_stale_partials(directory: str) -> None:
    """Remove the staging folders of conversions that are no longer running (killed mid-conversion)."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        match = PARTIAL_PATTERN.match(name)
        path = os.path.join(directory, name)
        if match is None or _writer_alive(path, int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed {path}: partial output of a conversion that did not finish (process {match.group(1)} "
              f"is gone)", flush=True)


def _writer_alive(staging: str, pid: int) -> bool:
    """The writer's lock tells, whatever the pid namespace or host; without a usable lock file (killed before
    it was made, a filesystem without locks) the pid does, and our own pid is then a dead process's:
    conversions run one at a time."""
    try:
        with open(os.path.join(staging, LOCK_NAME), "r", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
    except BlockingIOError:
        return True
    except OSError:
        pass
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                  # exists, owned by another user
        return True
    return True


def _remove_outputs(cfg: Config, is_training: bool) -> None:
    """Drop the manifest first, so a conversion interrupted from here on never looks finished."""
    for path in [manifest_path(cfg, is_training)] + [
            p for f in mindrecord_files(cfg, is_training) for p in (f, f + ".db")]:
        if os.path.exists(path):
            os.remove(path)


def _iter_windows(tasks: Sequence[ImageTask], window: int):
    for start in range(0, len(tasks), window):
        yield tasks[start:start + window]


def _encoded_windows(tasks: Sequence[ImageTask], is_training: bool, max_instances: int, workers: int):
    """Yield lists of encode_record results, a bounded window of images at a time, in task order.

    Threads, not processes: the work is file reads and cv2.imdecode, which release the GIL, and forking a
    process that already runs MindSpore threads can deadlock (spawning re-imports MindSpore per worker).
    """
    window = CONVERT_WINDOW * workers
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for part in _iter_windows(tasks, window):
            yield list(pool.map(lambda task: encode_record(task, is_training, max_instances), part))


def data_to_mindrecord(cfg: Config, is_training: bool) -> List[str]:
    """Convert cfg.data (COCO or TXT) to `mindrecord_shards` MindRecord files; reuse finished, up-to-date ones."""
    d = cfg.data
    split = "train" if is_training else "eval"
    files = mindrecord_files(cfg, is_training)
    _remove_stale_partials(d.mindrecord_dir)
    manifest = load_manifest(cfg, is_training)
    if _up_to_date(cfg, is_training, annotation_file(cfg, is_training), manifest):
        _print_reused(cfg, is_training, manifest)
        return files

    skips = SkipLog()
    if d.dataset == "coco":
        tasks, source = coco_tasks(cfg, is_training, skips)
    else:
        tasks, source = txt_tasks(cfg)
    if not tasks:
        raise DatasetError(f"{source}: no images listed")
    image_paths = [os.path.abspath(task.path) for task in tasks]
    fingerprint = _fingerprint(cfg, is_training, source, image_paths)
    print(f"MindRecord {split}: converting {source} ({_stale_reason(cfg, is_training, manifest, fingerprint)})",
          flush=True)
    skips.flush()
    os.makedirs(d.mindrecord_dir, exist_ok=True)
    _remove_outputs(cfg, is_training)
    with _staging_dir(d.mindrecord_dir, FILE_PREFIX[is_training]) as staging:
        num_records = _write_shards(os.path.join(staging, FILE_PREFIX[is_training]), tasks, cfg, is_training,
                                    skips, source)
        for path in files:
            for suffix in ("", ".db"):
                os.replace(os.path.join(staging, os.path.basename(path) + suffix), path + suffix)
        manifest = {"fingerprint": fingerprint, "records": num_records, "images_listed": len(tasks),
                    "skipped": dict(sorted(skips.counts.items())), "files": [os.path.basename(f) for f in files],
                    "image_paths": image_paths}
        atomic_io.write_json(manifest_path(cfg, is_training), manifest, indent=1)

    print(f"MindRecord {split}: converted {num_records} of {len(tasks)} images from {source} into {len(files)} "
          f"shards {os.path.join(d.mindrecord_dir, FILE_PREFIX[is_training])}*; {describe_skips(skips.counts)}",
          flush=True)
    return files


def _print_reused(cfg: Config, is_training: bool, manifest: dict) -> None:
    base = os.path.join(cfg.data.mindrecord_dir, FILE_PREFIX[is_training])
    print(f"MindRecord {'train' if is_training else 'eval'}: reused {manifest['records']} of "
          f"{manifest['images_listed']} images ({base}*, up to date with {manifest['fingerprint']['source']}); "
          f"{describe_skips(manifest['skipped'])}", flush=True)


def _write_shards(base: str, tasks: List[ImageTask], cfg: Config, is_training: bool,
                  skips: SkipLog, source: str) -> int:
    writer = FileWriter(base, shard_num=cfg.data.mindrecord_shards, overwrite=True)
    writer.add_schema(RECORD_SCHEMA, "maskrcnn")
    num_records = 0
    progress = tqdm(total=len(tasks), desc=f"MindRecord {'train' if is_training else 'eval'}", unit="img")
    try:
        for results in _encoded_windows(tasks, is_training, cfg.data.max_instance_count,
                                        cfg.data.convert_workers):
            records = []
            for record, counts, messages in results:
                skips.counts.update(counts)
                for reason, message in messages:
                    skips.note(reason, message)
                if record is not None:
                    records.append(record)
            skips.flush()
            if records:
                writer.write_raw_data(records)
                num_records += len(records)
            progress.update(len(results))
    finally:
        progress.close()
    if num_records == 0:
        raise DatasetError(f"{source}: no image could be converted ({describe_skips(skips.counts)})")
    writer.commit()
    return num_records
