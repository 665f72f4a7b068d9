"""The oldest MindSpore this code runs on, checked once at start-up.

Older releases fail deep inside a run (a missing API, a changed signature) with a message that does not say
the install is too old; this check says so in one line. Why the floor is where it is, and what was run on
which version: docs/compatibility.md. requirements.txt carries the same floor for pip.
"""
import importlib.metadata
import sys

from packaging.version import InvalidVersion, Version

MINDSPORE_FLOOR = "2.9.0"


class MindSporeVersionError(ImportError):
    """The installed MindSpore is older than MINDSPORE_FLOOR."""


def installed_mindspore_version() -> str:
    """The version of an already imported MindSpore, else of the installed distribution: read from its metadata,
    so that commands which never run a network (`--help`, data conversion) do not pay MindSpore's import."""
    if "mindspore" in sys.modules:
        return sys.modules["mindspore"].__version__
    try:
        return importlib.metadata.version("mindspore")
    except importlib.metadata.PackageNotFoundError:     # a source tree on sys.path has no metadata
        import mindspore
        return mindspore.__version__


def check_mindspore_version() -> None:
    """Raise MindSporeVersionError naming the installed and the required version when MindSpore is too old.
    A version string that does not parse (a local build) is let through: the check is for releases."""
    installed = installed_mindspore_version()
    try:
        too_old = Version(installed) < Version(MINDSPORE_FLOOR)
    except InvalidVersion:
        return
    if too_old:
        raise MindSporeVersionError(
            f"MindSpore {installed} is installed, this code needs mindspore>={MINDSPORE_FLOOR} "
            f"(see docs/compatibility.md): pip install -r requirements.txt")
