"""memtune: with the mmap threshold pinned, large buffers freed by worker threads go back to the system.

The pattern is backup's to S3: two jobs, each handing 16 MiB parts to two upload threads that copy
them (as botocore does). Without the pin glibc raises its threshold after the first free and later
parts stay in the threads' heaps; the peak RSS then grows with the number of parts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, sys, random
    from concurrent.futures import ThreadPoolExecutor
    if sys.argv[1] == "pin":
        from pitr.memtune import pin_mmap_threshold
        assert pin_mmap_threshold()
    data = os.urandom(1 << 20) * 64
    def upload(chunk):
        return len(bytes(chunk))
    def job(n):
        with ThreadPoolExecutor(2) as pool:
            futs = []
            for i in range(n):
                chunk = data[(i % 4) << 24:((i % 4) + 1) << 24] + b"x" * random.randint(0, 1000)
                if len(futs) >= 2:
                    futs.pop(0).result()
                futs.append(pool.submit(upload, chunk))
            for f in futs:
                f.result()
    with ThreadPoolExecutor(2) as jobs:
        list(jobs.map(job, [24] * 4))
    print([int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
""")


def peak_kib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc policy")
def test_pinned_threshold_keeps_the_peak_of_threaded_large_buffers_down() -> None:
    plain, pinned = peak_kib("plain"), peak_kib("pin")
    # measured here: 309 MiB plain, 178 MiB pinned (64 MiB of it is the test's own data)
    assert pinned < plain - 48 * 1024, (plain, pinned)


TURNOVER = textwrap.dedent("""
    import os, resource, sys
    from concurrent.futures import ThreadPoolExecutor
    from pitr.memtune import keep_heap_top, pin_mmap_threshold
    assert pin_mmap_threshold() if sys.argv[1] == "pin" else keep_heap_top()
    src = os.urandom(1 << 20)
    def turn(n):
        total = 0
        for _ in range(n):  # a decoder's pieces: one 1 MiB buffer made, used and freed at a time
            piece = bytearray(src)
            total += piece[-1]
            del piece
        return total
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(turn, [200] * 4))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print(faults, peak)
""")


def turnover(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", TURNOVER, mode], capture_output=True, text=True, check=True)
    faults, peak = out.stdout.split()
    return int(faults), int(peak)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc policy")
def test_kept_heap_top_stops_threads_faulting_their_pieces_in_again() -> None:
    pinned_faults, pinned_peak = turnover("pin")
    kept_faults, kept_peak = turnover("keep")
    # 800 pieces of 256 pages each: pinned alone, most are given back and faulted in again
    assert pinned_faults > 800 * 128, pinned_faults
    assert kept_faults < pinned_faults // 10, (kept_faults, pinned_faults)
    assert kept_peak < pinned_peak + 16 * 1024, (kept_peak, pinned_peak)  # no more memory held at the peak
