"""Benchmark jobs whose graph is compiled as train.py compiles it on a cold cache (src/compile_cache.py): apart,
by the same job run as a child with the compile-only switch, then loaded from MindSpore's compile cache.

    with tempfile.TemporaryDirectory() as cache:
        env = with_cache(env, cache)
        seconds = compile_apart(command, env)       # the job compiles, then stops (compile_cache.compile_only())
        subprocess.run(command, env=env, ...)        # the measured job loads the graph
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.compile_cache import MS_ENABLE_ENV, MS_PATH_ENV, run_compile_only  # noqa: E402


def with_cache(env, cache_dir):
    """`env` with MindSpore's compile cache in cache_dir."""
    return dict(env, **{MS_ENABLE_ENV: "1", MS_PATH_ENV: str(cache_dir)})


def compile_apart(command, env, timeout=None) -> float:
    """Run the job `command` compile-only (it must stop after compiling when compile_cache.compile_only());
    seconds it took. RuntimeError with its output's end if it fails."""
    started = time.perf_counter()
    done = run_compile_only(command, env, timeout)
    if done.returncode != 0:
        raise RuntimeError(f"compiling apart failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - started
