"""Synthetic WAL segments with valid long page headers, and repositories bound to a fake cluster.

For tests of the archive/prefetch plumbing that need real-looking segments but no server.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

from pitr.ops.wal import archive, spool
from pitr.pg import walname
from pitr.repo.envelope import Codec
from pitr.repo.format import META_KEY
from pitr.repo.meta import new_meta, read_meta
from pitr.storage.fs import FsStorage


def stop_helper(sdir: Path, helper: str = spool.PUSHD) -> None:
    """Tests stop what they start: ask the helper working in sdir to exit and wait until its lock is free."""
    if not sdir.is_dir():
        return
    spool.request_stop(sdir, helper)
    deadline = time.monotonic() + 15
    while spool.helper_state(sdir, helper) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spool.helper_state(sdir, helper) is None, "helper did not stop"


def queue_ready(pgdata: Path, names: list[str], seed: int = 0) -> None:
    """Put segments in pgdata/pg_wal with their archive_status/NAME.ready, as PostgreSQL queues them."""
    for n in names:
        (pgdata / "pg_wal" / n).write_bytes(segment(n, seed=seed))
        (pgdata / "pg_wal" / "archive_status" / f"{n}.ready").touch()


SEG = 16 * 1024 * 1024
SYSID = 7300000000000000001
_LONG = struct.Struct("<HHIQI4xQII")


def segment(name: str, sysid: int = SYSID, seed: int = 0) -> bytes:
    """A 16 MiB segment `name` of cluster sysid: a valid first page header, compressible body."""
    head = _LONG.pack(0xD110, 0x0002, int(name[:8], 16), walname.segment_start_lsn(name, SEG), 0, sysid, SEG, 8192)
    body = (f"{name}:{seed}:".encode() * 64 + os.urandom(256)) * 8
    out = bytearray(head + body * (SEG // len(body) + 1))
    return bytes(out[:SEG])


def fs_repo(path: Path, sysid: int = SYSID) -> FsStorage:
    """A local repository initialised for the fake cluster (what `pitr init` would write)."""
    path.mkdir(parents=True, exist_ok=True)
    st = FsStorage(path)
    st.put(META_KEY, new_meta(sysid, 15, SEG).to_json(), if_absent=True)
    return st


def names(first: int, count: int, tli: int = 1) -> list[str]:
    return [walname.seg_name(tli, first + i, SEG) for i in range(count)]


def archived_cluster(base: Path, names: list[str], seeded: bool = False) -> Path:
    """A fake cluster being recovered: base/data with an empty pg_wal and recovery.signal, and base/repo
    holding `names` stored the way wal-push stores them (originals kept in base/src; seeded: segment i
    made with seed=i). Returns the data directory."""
    pgdata = base / "data"
    (pgdata / "pg_wal").mkdir(parents=True)
    (pgdata / "recovery.signal").touch()  # wal-fetch starts a prefetcher only during archive recovery
    store = fs_repo(base / "repo")
    meta = read_meta(store)
    src = base / "src"
    src.mkdir()
    for i, n in enumerate(names):
        (src / n).write_bytes(segment(n, seed=i if seeded else 0))
        archive.push(store, meta, src / n, Codec("zstd", 1))
    return pgdata
