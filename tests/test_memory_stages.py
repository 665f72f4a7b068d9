"""bench/memory_stages.py's largest-mappings column (the process's most resident memory areas from smaps) and the
memory pool's peaks (from MindSpore's log)."""
import mmap
import os
import re
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import memory_stages  # noqa: E402

AREA = re.compile(r"^(\S+) ([\d,]+)/([\d,]+)$")


def _areas(text):
    """[(name, size MiB, resident MiB)] from "name size/resident, ..." ."""
    areas = []
    for item in text.split(", "):
        name, size, resident = AREA.match(item).groups()
        areas.append((name, int(size.replace(",", "")), int(resident.replace(",", ""))))
    return areas


def test_a_touched_mapping_shows_as_a_resident_anonymous_area():
    """A private anonymous mapping of 256 MiB, every page written, is listed as "[anon]" and resident. It is mapped
    directly, not through numpy, so the allocator's choices (heap or mapping) cannot change what is listed."""
    area = mmap.mmap(-1, 256 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    np.frombuffer(area, np.uint8)[::4096] = 1          # one byte per page makes every page resident
    areas = _areas(memory_stages.largest_mappings(count=40))
    assert len(areas) == 40
    assert [resident for _, _, resident in areas] == sorted((r for _, _, r in areas), reverse=True)
    assert all(resident <= size + 1 for _, size, resident in areas)
    assert any(name == "[anon]" and resident >= 250 for name, _, resident in areas), areas
    area.close()


TOY_GRAPH = """
import numpy as np, mindspore as ms


@ms.jit
def doubled_sum(a):
    return (a * 2.0).sum()


ms.set_context(mode=ms.GRAPH_MODE)
ms.set_device("CPU")
print(float(doubled_sum(ms.Tensor(np.ones((64, 1024, 1024), np.float32)))))     # a 256 MiB intermediate
"""


def test_the_pool_peaks_come_from_mindspores_log_at_exit(tmp_path):
    """MindSpore (at INFO for the pool's submodule) logs its pool's state at exit; a graph whose intermediate is a
    256 MiB tensor reaches at least that."""
    env = dict(os.environ, GLOG_v="3", MS_SUBMODULE_LOG_v=memory_stages.POOL_LOG_LEVELS)
    script = tmp_path / "toy_graph.py"                  # MindSpore compiles a graph from a file's source only
    script.write_text(TOY_GRAPH)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True)
    used, reached = memory_stages.pool_peaks(done.stderr)
    assert 256 <= used <= reached < 4096, (used, reached)
    assert memory_stages.pool_peaks("no pool line") is None
