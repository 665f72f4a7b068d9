"""Device choice: `auto` takes the best device MindSpore can use; a named device is used as given."""
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
