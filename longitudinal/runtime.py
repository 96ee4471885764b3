"""Process-level runtime tuning for CPU work (training, evaluation, forecast queries).

glibc's malloc returns every large block to the kernel when it is freed and trims the heap top, so each of the
many 4-50 MB activations of a 3D network at 32^3 is mapped afresh and page-faulted in at its first touch.
``tune_cpu_allocator`` keeps freed blocks in the heap for reuse instead (the process keeps its peak heap, a few
hundred MB here); why and how much it saves: docs/decisions/malloc-tuning.md. It is a no-op where the C library is
not glibc, and ``LONGITUDINAL_TUNE_MALLOC=false`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_THRESHOLD_BYTES = 1 << 30
_done: bool | None = None


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB once per process. Returns whether they are raised."""
    global _done
    if _done is not None:
        return _done
    _done = False
    from longitudinal.settings import Settings

    if not sys.platform.startswith("linux") or not Settings().tune_malloc:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return False
    # Both together: setting only the trim threshold also freezes the dynamic mmap threshold at 128 KiB,
    # which is slower than the default.
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD_BYTES))
    return _done
