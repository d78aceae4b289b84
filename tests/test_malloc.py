"""keep_freed_memory: large buffers come from the heap and stay there when freed."""

import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, sys
import numpy as np
from rnnrep.malloc import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Mallinfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
big = np.ones(16 << 20, np.float32)  # 64 MiB, above glibc's largest default mmap threshold
mmapped = mallinfo2().hblkhd
del big
print(mmapped >> 20, mallinfo2().fordblks >> 20)  # MiB mmapped while held, MiB free in the heap after
"""


def _run(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    mmapped, free_in_heap = map(int, out.stdout.split())
    return mmapped, free_in_heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_large_buffers_come_from_the_heap_and_stay():
    mmapped, _ = _run("default")
    assert mmapped >= 64  # the premise: by default the buffer is its own mmap, unmapped on free
    mmapped, free_in_heap = _run("keep")
    assert mmapped < 64 and free_in_heap >= 64, (mmapped, free_in_heap)
