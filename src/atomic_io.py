"""Atomic file writes: a reader (or a run resumed after a kill) sees the old file or the complete new one.

Every writer of the project goes through here. A file is written under a hidden staging name in the
target's own directory (same filesystem, so the final os.replace is atomic) and the staging file is
removed when writing fails or is interrupted. Staging names are `.<name>.partial-<pid>-<n><suffix>`, so a
cleaner can recognise leftovers of a killed writer by the `.partial` part.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
from typing import Iterator

PARTIAL_MARK = ".partial"
_serial = itertools.count()


@contextlib.contextmanager
def staged_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a staging path next to `path`; on success it replaces `path`, on any exception it is removed.

    `suffix` ends the staging name, for writers that insist on an extension (MindSpore's checkpoint and
    export functions append or check one).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    staging = os.path.join(directory, f".{os.path.basename(path)}{PARTIAL_MARK}-{os.getpid()}-{next(_serial)}{suffix}")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def write_bytes(path: str, data: bytes) -> None:
    with staged_path(path) as staging:
        with open(staging, "wb") as out:
            out.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj, **dump_options) -> None:
    """`dump_options` go to json.dumps (indent, separators); the file is UTF-8."""
    write_text(path, json.dumps(obj, **dump_options))
