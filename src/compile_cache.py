"""MindSpore's graph compile cache for predict.py, eval.py and single-device train.py: a repeated run loads
the compiled graph instead of compiling it again.

Where: $MASKRCNN_COMPILE_CACHE_DIR, else $XDG_CACHE_HOME/maskrcnn_mindspore/compile (~/.cache/...), one
directory per key. MASKRCNN_COMPILE_CACHE=0 turns it off; a user who sets MindSpore's own
MS_COMPILER_CACHE_ENABLE keeps MindSpore's settings and this module stays out of the way.

Key: MindSpore checks a hash of the network's Python files on load, but not the values the graph bakes in as
constants. So the key also covers the whole config (shapes, thresholds, amp level), the MindSpore version,
the device, the custom-kernel library (its name carries the hash of the C++ sources), every file of src/
and the entry script.
Weights are not in the cached graph: a changed checkpoint with the same config reuses the entry.

Concurrent runs: a run that finds no entry compiles into its own staging directory and `publish()` renames
it into place after the graph ran; when two cold runs race, the first rename wins and the other drops its
copy. A run never reads or writes a directory another run is writing.

Compiling apart (train.py): compiling a graph leaves MindSpore's compiler state in the process for as long as
it lives (most of the compiled training graph's C heap), and a graph loaded from the cache does not. So on a
cold cache `compile_apart(command)` runs the same training again as a child with COMPILE_ONLY_ENV set, which
compiles, publishes the entry and exits; the run then loads the entry (bench/results.md).
MASKRCNN_COMPILE_APART=0 compiles in the process instead.
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

SWITCH_ENV = "MASKRCNN_COMPILE_CACHE"        # "0" turns the cache off
DIR_ENV = "MASKRCNN_COMPILE_CACHE_DIR"
MS_ENABLE_ENV = "MS_COMPILER_CACHE_ENABLE"
MS_PATH_ENV = "MS_COMPILER_CACHE_PATH"
APART_SWITCH_ENV = "MASKRCNN_COMPILE_APART"    # "0": a cold cache compiles in the run's own process
COMPILE_ONLY_ENV = "MASKRCNN_COMPILE_ONLY"     # "1" in the child of compile_apart()
STAGING_MARK = ".staging-"
STALE_STAGING_SECONDS = 24 * 3600            # a staging directory this old belongs to a run that was killed
SRC = Path(__file__).resolve().parent

_state = {"staging": None, "entry": None, "active": False, "used": False}


def cache_root() -> Path:
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "maskrcnn_mindspore" / "compile"


def enabled() -> bool:
    """On unless switched off or the user runs MindSpore's cache with own settings (a child of a run that
    enabled ours inherits our variables, which point under the cache root)."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return False
    return MS_ENABLE_ENV not in os.environ or os.environ.get(MS_PATH_ENV, "").startswith(str(cache_root()))


def cache_key(cfg, device: str, purpose: str) -> str:
    """Hex digest of everything a compiled graph depends on besides the weights."""
    import mindspore as ms
    from src.ops.backend import library

    digest = hashlib.sha256()
    meta = {"purpose": purpose, "device": device, "mindspore": ms.__version__, "kernels": library(),
            "config": dataclasses.asdict(cfg)}
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for path in _source_files():
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:24]


def _source_files():
    """src/ and the entry script: MindSpore recompiles when these change, and must not do so in an entry."""
    files = sorted(SRC.rglob("*.py"))
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return files + ([Path(main).resolve()] if main and os.path.isfile(main) else [])


def _entry_script_readable() -> bool:
    """MindSpore's cache reads the entry script for its dependencies: sys.argv[0] as it was when MindSpore was
    imported (`python -c` gives '-c', which it would fail to open)."""
    import importlib

    path = sys.argv[0] if sys.argv else None
    for module in ("mindspore.graph.api", "mindspore.common.api"):
        try:
            path = importlib.import_module(module).entry_script_path
            break
        except (ImportError, AttributeError):
            continue
    return bool(path) and os.path.isfile(path)


def enable(cfg, device: str, purpose: str = "inference") -> Optional[Path]:
    """Points MindSpore's compile cache at the entry for this key (or a private staging directory when
    there is none yet). Call before the graph compiles. Returns the directory used, or None when off.

    Once per process: MindSpore keeps the first cache path it saw and numbers cached graphs across the
    process, so a second entry would receive graph 1 in the first entry's directory."""
    if not enabled() or _state["used"]:
        return None
    _state["used"] = True
    if not _entry_script_readable():
        return None
    root = cache_root()
    entry = root / f"{purpose}-{cache_key(cfg, device, purpose)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(root)
        if entry.is_dir():
            target = entry
        else:
            target = root / f"{entry.name}{STAGING_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            target.mkdir()
            _state.update(staging=target, entry=entry)
            atexit.register(_drop_staging)
    except OSError as err:                   # an unwritable cache costs time, never the run
        print(f"compile cache off: cannot use '{root}' ({err}); set {DIR_ENV} to a writable directory")
        return None
    os.environ[MS_ENABLE_ENV] = "1"
    os.environ[MS_PATH_ENV] = str(target)
    _state["active"] = True
    return target


def publish() -> None:
    """After the first call of the cached graph: caching ends for this process (MindSpore numbers cached
    graphs in compile order, so a later graph must neither load from nor land in the entry), and the staging
    directory becomes the entry by one rename, unless another run published the same entry first."""
    if _state["active"]:
        _state["active"] = False
        os.environ.pop(MS_ENABLE_ENV, None)
        os.environ.pop(MS_PATH_ENV, None)
    staging, entry = _state["staging"], _state["entry"]
    if staging is None:
        return
    _state["staging"] = None
    try:
        os.rename(staging, entry)
    except OSError:                          # the entry exists: a concurrent run published it first
        shutil.rmtree(staging, ignore_errors=True)


def compile_only() -> bool:
    """This process is the child of `compile_apart`: it compiles, publishes and stops."""
    return os.environ.get(COMPILE_ONLY_ENV) == "1"


def run_compile_only(command, env, timeout=None) -> subprocess.CompletedProcess:
    """Run `command` (a run of the same graph) as a compile-only child under `env`, its output captured."""
    return subprocess.run(list(command), env=dict(env, **{COMPILE_ONLY_ENV: "1"}), capture_output=True, text=True,
                          timeout=timeout, check=False)


def compile_apart(command) -> bool:
    """On a cold cache, run `command` (this run again, as a child with COMPILE_ONLY_ENV set) to compile the graph
    into the entry, then point this process at the entry. True if the entry now serves this process; False
    (this process compiles itself) when the cache is warm or off, switched off, or the child failed."""
    staging, entry = _state["staging"], _state["entry"]
    if staging is None or not command or compile_only() or os.environ.get(APART_SWITCH_ENV, "1") == "0":
        return False
    started = time.perf_counter()
    done = run_compile_only(command, {name: value for name, value in os.environ.items()
                                      if name not in (MS_ENABLE_ENV, MS_PATH_ENV)})
    if done.returncode != 0 or not entry.is_dir():
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        print(f"compile cache: compiling apart failed (exit code {done.returncode}: {last}); compiling in this "
              f"process", file=sys.stderr, flush=True)
        return False
    shutil.rmtree(staging, ignore_errors=True)
    _state["staging"] = None
    os.environ[MS_PATH_ENV] = str(entry)
    print(f"compiled the graph apart in {time.perf_counter() - started:.1f} s; loading it from {entry}", flush=True)
    return True


def _drop_staging() -> None:
    if _state["staging"] is not None:
        shutil.rmtree(_state["staging"], ignore_errors=True)
        _state["staging"] = None


def _remove_stale_staging(root: Path) -> None:
    now = time.time()
    for path in root.glob(f"*{STAGING_MARK}*"):
        try:
            if now - path.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass
