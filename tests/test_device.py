"""Device choice: `auto` takes the best device MindSpore can use; a named device is used as given."""
import os
import subprocess
import sys

import pytest

from src import device
from src.device import AUTO, choose_device, describe


@pytest.mark.parametrize("available, expected", [
    ({"Ascend", "GPU"}, "Ascend"),
    ({"GPU"}, "GPU"),
    (set(), "CPU"),
])
def test_auto_prefers_ascend_then_gpu_then_cpu(available, expected):
    asked = []

    def probe(target):
        asked.append(target)
        return target in available

    assert choose_device(AUTO, probe) == expected
    assert "CPU" not in asked                   # the CPU is the fallback, never probed


def test_a_named_device_is_used_without_probing():
    def probe(target):
        raise AssertionError("probed")

    assert choose_device("GPU", probe) == "GPU"


def test_this_cpu_machine_detects_the_cpu():
    assert not device.is_available("Ascend") and not device.is_available("GPU")
    assert choose_device(AUTO) == "CPU"


def test_a_failing_probe_counts_as_unavailable(monkeypatch):
    import mindspore as ms

    class Broken:
        @staticmethod
        def is_available():
            raise RuntimeError("plugin failed to load")

    monkeypatch.setattr(ms.device_context, "gpu", Broken, raising=True)
    assert device.is_available("GPU") is False


def test_set_device_prints_the_choice(capsys):
    assert device.set_device(AUTO) == "CPU"
    assert capsys.readouterr().out == "device: CPU (auto: best available of Ascend, GPU, CPU)\n"
    assert describe("CPU", "CPU") == "device: CPU (as requested by device_target)"


POOL_SCRIPT = """
import sys
import mindspore as ms
from mindspore._c_expression import RuntimeConf
from src import device
calls, original = [], ms.runtime.set_memory
ms.runtime.set_memory = lambda **sizes: calls.append(sizes) or original(**sizes)
if sys.argv[1] == "user":
    original(init_size="3GB")
before = RuntimeConf.get_instance().is_memory_configured()
device.set_device("CPU", announce=False)
print(before, calls, device.configure_cpu_memory_pool())
"""


@pytest.mark.parametrize("who, expected", [
    ("none", f"False [{{'init_size': '{device.CPU_POOL_BLOCK}', 'increase_size': '{device.CPU_POOL_BLOCK}'}}] False"),
    ("user", "True [] False"),
])
def test_cpu_memory_pool_grows_in_small_blocks_unless_the_user_configured_it(who, expected):
    """The pool is process-wide and set once, so each case runs in its own interpreter; a second configuration
    would raise in MindSpore, so a user's own set_memory must be kept without one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", POOL_SCRIPT, who], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, GLOG_v="3"), check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == expected


def test_release_free_heap_gives_freed_heap_pages_back():
    """Blocks below glibc's mmap threshold come from the heap; freeing all but the last leaves free heap pages
    that only malloc_trim returns."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    blocks = [libc.malloc(64 * 1024) for _ in range(512)]                      # 32 MiB in 64 KiB blocks
    for block in blocks[:-1]:
        ctypes.memset(block, 1, 64 * 1024)
        libc.free(ctypes.c_void_p(block))
    assert device.release_free_heap() is True
    libc.free(ctypes.c_void_p(blocks[-1]))
