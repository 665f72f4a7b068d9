"""Atomic file writes: a reader (or a run resumed after a kill) sees the old file or the complete new one.

Every writer of the project goes through here. A file is written under a hidden staging name in the
target's own directory (same filesystem, so the final os.replace is atomic) and the staging file is
removed when writing fails or is interrupted. Staging names are `.<name>.partial-<pid>-<n><suffix>`, so a
cleaner can recognise leftovers of a killed writer by the `.partial` part; writing a file again removes the
leftovers of its earlier writers that are gone (SIGKILL runs no cleanup).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
from typing import Iterator

PARTIAL_MARK = ".partial"
_serial = itertools.count()
_active = set()                 # staging paths this process is writing now


def _writer_gone(pid: int, path: str) -> bool:
    if pid == os.getpid():      # ours but not in use: an earlier process that had our pid (containers reuse pids)
        return path not in _active
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:     # another user's live process
        return False
    return False


def remove_stale_staging(path: str) -> None:
    """Remove staging files for `path` (any suffix, e.g. MindSpore's own .tmp) whose writer process is gone."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}{PARTIAL_MARK}-"
    for name in os.listdir(directory):
        pid = name[len(prefix):].split("-", 1)[0]
        leftover = os.path.join(directory, name)
        if name.startswith(prefix) and pid.isdigit() and _writer_gone(int(pid), leftover):
            with contextlib.suppress(FileNotFoundError):        # another writer removed it first
                os.remove(leftover)


@contextlib.contextmanager
def staged_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a staging path next to `path`; on success it replaces `path`, on any exception it is removed.

    `suffix` ends the staging name, for writers that insist on an extension (MindSpore's checkpoint and
    export functions append or check one).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_staging(path)
    staging = os.path.join(directory, f".{os.path.basename(path)}{PARTIAL_MARK}-{os.getpid()}-{next(_serial)}{suffix}")
    _active.add(staging)
    try:
        yield staging
        os.replace(staging, path)
    finally:
        _active.discard(staging)
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
