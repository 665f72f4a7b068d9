"""Build the CPU kernels: `python -m src.ops.build` (run by scripts/setup_env.sh; a no-op when up to date).

Compiles src/ops/kernels/*.cpp with g++ into one library, backend.library_path(), against the libdnnl that
MindSpore ships and oneDNN's headers from the pinned `onednn-devel` requirement (installed into the environment's
include/; MASKRCNN_ONEDNN_INCLUDE may name another directory holding oneapi/dnnl/). The constants shared with
Python are written first into the generated constants.h (src/ops/constants.py). When the library cannot be built
it prints one line saying why and exits 0: MindSpore's operators then run.
"""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from src.ops import backend, constants

HEADERS_ENV = "MASKRCNN_ONEDNN_INCLUDE"
# MindSpore's libdnnl runs on a thread pool its caller provides; the headers must say so.
THREADING_DEFINE = "#define DNNL_CPU_THREADING_RUNTIME"


class BuildError(RuntimeError):
    """Why the library cannot be built here."""


def _mindspore_libdnnl() -> Path:
    spec = importlib.util.find_spec("mindspore")
    path = Path(spec.submodule_search_locations[0]) / "lib" / "libdnnl.so.3" if spec else None
    if path is None or not path.exists():
        raise BuildError("MindSpore's libdnnl.so.3 was not found")
    return path


def _onednn_headers() -> Path:
    """The include directory holding oneapi/dnnl/dnnl.hpp."""
    candidates = [Path(os.environ[HEADERS_ENV])] if os.environ.get(HEADERS_ENV) else []
    candidates.append(Path(sysconfig.get_paths()["data"]) / "include")
    for directory in candidates:
        if (directory / "oneapi" / "dnnl" / "dnnl.hpp").is_file():
            return directory
    raise BuildError("oneDNN's headers were not found (install the onednn-devel pinned in requirements.txt)")


def _stage_headers(source: Path, target: Path):
    """Copy oneDNN's headers to target/oneapi/dnnl with the threading runtime set to the caller's thread pool."""
    staging = target.parent / f".{target.name}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source / "oneapi" / "dnnl", staging / "oneapi" / "dnnl")
    config = staging / "oneapi" / "dnnl" / "dnnl_config.h"
    lines = config.read_text().splitlines()
    config.write_text("\n".join(f"{THREADING_DEFINE} DNNL_RUNTIME_THREADPOOL" if line.startswith(THREADING_DEFINE)
                                else line for line in lines) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def build() -> Path:
    """Compile the library into backend.library_path() unless it is there; concurrent builds are safe (temp
    files + rename)."""
    target = backend.library_path()
    if target.exists():
        return target
    libdnnl = _mindspore_libdnnl()
    headers = _onednn_headers()
    if shutil.which("g++") is None:
        raise BuildError("g++ was not found")
    work = target.parent
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        include = Path(tmp) / "include"
        _stage_headers(headers, include)
        (include / "constants.h").write_text(constants.header_text())
        library = Path(tmp) / target.name
        sources = [str(path) for path in backend.kernel_sources() if path.suffix == ".cpp"]
        result = subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{include}", *sources,
                                 "-o", str(library), str(libdnnl), f"-Wl,-rpath,{libdnnl.parent}", "-lpthread"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"g++ failed on src/ops/kernels, errors on stderr\n{result.stderr[-3000:]}")
        os.replace(library, target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    if backend.library_path().exists():
        return 0
    try:
        print(f"built {build()}")
    except BuildError as error:
        first, _, detail = str(error).partition("\n")
        print(f"CPU kernels not built ({first}); MindSpore's operators will run", flush=True)
        if detail:
            print(detail, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
