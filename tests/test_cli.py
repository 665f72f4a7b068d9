"""What the entry points share (src/cli.py): output directory checks."""
import os

from src import cli


def test_a_new_or_existing_writable_directory_is_fine(tmp_path):
    assert cli.output_dir_problem(str(tmp_path), "--out") == ""
    assert cli.output_dir_problem(str(tmp_path / "new" / "deeper"), "--out") == ""
    assert not (tmp_path / "new").exists()                   # checking creates nothing


def test_a_file_or_a_path_under_a_file_is_named_with_the_problem(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    assert cli.output_dir_problem(str(blocker), "--out") == (
        f"--out '{blocker}' is a file, not a directory; choose a directory path")
    assert cli.output_dir_problem(str(blocker / "a" / "b"), "data.mindrecord_dir") == (
        f"data.mindrecord_dir '{blocker / 'a' / 'b'}' lies under the file '{blocker}', not a directory; "
        f"choose a directory path")


def test_a_directory_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    locked = str(tmp_path / "locked")
    os.mkdir(locked)
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda path, mode: path != locked and real_access(path, mode))
    assert cli.output_dir_problem(locked, "--output_dir") == (
        f"--output_dir '{locked}' is not writable; choose a directory you can write to")
    assert cli.output_dir_problem(os.path.join(locked, "run"), "--output_dir") == (
        f"--output_dir '{os.path.join(locked, 'run')}' (its existing parent '{locked}') is not writable; "
        f"choose a directory you can write to")
