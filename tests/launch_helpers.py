"""Helpers of the launch-script tests (test_scripts.py, test_train.py and launch_fixtures.py): dash, a checkout
with its own scripts/ folder, a free port, and the step counts of the shared real-model launches."""
import os
import shutil
import socket
from pathlib import Path

from inference_helpers import ROOT

SCRIPTS = os.path.join(ROOT, "scripts")
STANDALONE_STEPS = 3
PARALLEL_STEPS = 2


def dash():
    path = shutil.which("dash")
    assert path, "dash is missing: the scripts must work under Debian's /bin/sh (apt-get install -y dash)"
    return path


def make_checkout(repo: Path) -> Path:
    """A checkout whose scripts/ is a fresh directory (so `cd scripts && sh X.sh` writes its outputs there, not
    into the repository); everything else is the repository's own."""
    (repo / "scripts").mkdir(parents=True)
    for name in os.listdir(ROOT):
        if name not in ("scripts", ".git"):
            os.symlink(os.path.join(ROOT, name), repo / name)
    for name in os.listdir(SCRIPTS):
        os.symlink(os.path.join(SCRIPTS, name), repo / "scripts" / name)
    return repo


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
