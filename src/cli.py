"""What every command-line entry point shares: one-line errors instead of tracebacks, output path checks."""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Sequence


def run_script(main: Callable, argv: Sequence[str]) -> None:
    """Run a command-line entry point; bad input (missing file, wrong checkpoint, bad value) ends with
    one 'ERROR: ...' line and exit status 1 instead of a traceback."""
    from src.checkpoint import CheckpointError

    try:
        main(argv)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(1)


def output_dir_problem(path: str, option: str) -> str:
    """'' if `path` is, or can be made, a writable directory; otherwise one line naming it and the problem."""
    target = os.path.abspath(path)
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == target else f"lies under the file '{existing}'"
        return f"{option} '{path}' {where}, not a directory; choose a directory path"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == target else f" (its existing parent '{existing}')"
        return f"{option} '{path}'{where} is not writable; choose a directory you can write to"
    return ""


def check_output_dirs(paths: Dict[str, str]) -> None:
    """ValueError naming the first of {option or config key: path} that cannot be an output directory."""
    for option, path in paths.items():
        problem = output_dir_problem(path, option)
        if problem:
            raise ValueError(problem)
