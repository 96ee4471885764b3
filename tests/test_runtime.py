"""CPU allocator tuning: freed large blocks stay in glibc's heap (reused, not re-faulted); opt-out works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from longitudinal.runtime import tune_cpu_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
tuned = tune_cpu_allocator()
block = libc.malloc(64 << 20)   # 64 MiB, as big as the largest activations
ctypes.memset(block, 1, 64 << 20)
mapped = libc.mallinfo2().hblkhd  # bytes in mmapped blocks
libc.free(block)
print(tuned, mapped >= 64 << 20, libc.mallinfo2().fordblks >= 64 << 20)
"""


def _probe(**env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_large_blocks_stay_in_the_heap_once_tuned_and_not_when_turned_off():
    # Tuned: the 64 MiB block comes from the heap (not mmap) and its memory stays free in the heap after free.
    assert _probe() == ["True", "False", "True"]
    # Off: glibc maps the block and returns it to the kernel at free.
    assert _probe(LONGITUDINAL_TUNE_MALLOC="false") == ["False", "True", "False"]
