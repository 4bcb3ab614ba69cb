"""Keep glibc from holding freed large buffers: pin malloc's mmap threshold (one call per process).

pitr moves data in large buffers (16 MiB S3 parts, 1–16 MiB pieces) handed between threads. glibc
raises its mmap threshold each time such a buffer is freed (up to 32 MiB), so later ones come from
the per-thread heaps instead, and a heap keeps the memory after free() wherever a live allocation
sits above it. With several threads the process's RSS then grows with the number of large files
(277 MiB for an S3 backup at pgbench scale 500 against 184 at scale 50; docs/performance.md).
Setting M_MMAP_THRESHOLD explicitly turns that adjustment off: buffers of 4 MiB and more are
mapped and unmapped, and go back to the system the moment they are freed. Smaller ones (the 1 MiB
read chunks) stay on the heap, where reuse is cheap.

Setting it also freezes glibc's trim threshold at its 128 KiB default (the two adjust together), so
a heap gives back the free memory at its top after almost every free() of a 1 MiB piece and faults
it in again at the next allocation. keep_heap_top() raises that threshold for a process whose threads
turn over such pieces all the time: decoding WAL segments on 8 threads took 840-2,140 page faults
and 38-47 ms of CPU per segment with the threshold frozen, against a few faults and 29-32 ms with it
raised (docs/performance.md, tenth session); the peak RSS stayed ~50 MiB.

The async archiver does not pin it (cli/asyncwal.helper_main): each of its pushes allocates and
frees ~16 MiB buffers, and mapping them anew each time made its threads wait on each other.
"""

from __future__ import annotations

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
THRESHOLD = 4 << 20
HEAP_TOP = 32 << 20  # free memory a heap keeps at its top: several threads' 1 MiB pieces
_done = False


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(param, value); False where the C library has none (musl, macOS: no such heap policy)."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(param, value))


def pin_mmap_threshold() -> bool:
    """Set glibc's mmap threshold once; False where the C library is not glibc (nothing to do)."""
    global _done
    if not _done:
        _done = _mallopt(_M_MMAP_THRESHOLD, THRESHOLD)
    return _done


def keep_heap_top(size: int = HEAP_TOP) -> bool:
    """After pin_mmap_threshold: let each heap keep up to `size` of free memory at its top (glibc's trim
    threshold) instead of returning it to the system at each free(); False where there is no glibc."""
    return pin_mmap_threshold() and _mallopt(_M_TRIM_THRESHOLD, size)
