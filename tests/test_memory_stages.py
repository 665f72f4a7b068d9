"""bench/memory_stages.py's largest-mappings column: the process's most resident memory areas from smaps."""
import os
import re
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


def test_a_touched_array_shows_as_a_resident_anonymous_area():
    block = np.ones(768 * 2**20 // 8)                 # 768 MiB, every page written
    areas = _areas(memory_stages.largest_mappings(count=40))
    assert len(areas) == 40
    assert [resident for _, _, resident in areas] == sorted((r for _, _, r in areas), reverse=True)
    assert all(resident <= size + 1 for _, size, resident in areas)
    assert any(name == "[anon]" and resident >= 760 for name, _, resident in areas), areas
    del block
