"""src.version_check: a MindSpore older than the floor is refused at start-up, in one line naming both versions."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import mindspore
import pytest

from src.version_check import MINDSPORE_FLOOR, MindSporeVersionError, check_mindspore_version

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("installed", ["2.8.0", "2.7.1.post1", "2.4.10", "1.10.1", f"{MINDSPORE_FLOOR}rc1"])
def test_older_mindspore_is_refused_naming_both_versions(monkeypatch, installed):
    monkeypatch.setattr(mindspore, "__version__", installed)
    with pytest.raises(MindSporeVersionError) as error:
        check_mindspore_version()
    assert str(error.value).startswith(f"MindSpore {installed} is installed, this code needs "
                                       f"mindspore>={MINDSPORE_FLOOR} ")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("installed", [MINDSPORE_FLOOR, f"{MINDSPORE_FLOOR}.post1", "2.10.0", "2.11.0rc1", "3.0.0",
                                       "local-build"])
def test_floor_and_newer_pass(monkeypatch, installed):
    """Compared as versions, not strings ("2.10.0" < "2.9.0" as text); a string that is no version is let through."""
    monkeypatch.setattr(mindspore, "__version__", installed)
    check_mindspore_version()


def test_importing_src_with_an_old_mindspore_stops_before_our_modules_load():
    code = ("import sys, mindspore\nmindspore.__version__ = '2.6.0'\ntry:\n    import src\n"
            "except ImportError as error:\n    print(type(error).__name__, error)\n"
            "    print('src.ops.backend' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        f"MindSporeVersionError MindSpore 2.6.0 is installed, this code needs mindspore>={MINDSPORE_FLOOR} "
        "(see docs/compatibility.md): pip install -r requirements.txt", "False"]


def test_before_mindspore_is_imported_the_installed_distribution_is_checked(monkeypatch):
    monkeypatch.delitem(sys.modules, "mindspore")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: {"mindspore": "2.6.0"}[name])
    with pytest.raises(MindSporeVersionError, match="MindSpore 2.6.0 is installed"):
        check_mindspore_version()
    assert "mindspore" not in sys.modules


def test_commands_that_run_no_network_do_not_import_mindspore():
    """`--help` and the data tools start in a fraction of a second: MindSpore's import alone takes 1-2 s."""
    code = ("import sys, src.config, src.synthetic, src.rank_table, src.convert_checkpoint, eval, predict\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mindspore'))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["[]"]
