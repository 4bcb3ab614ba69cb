"""Synthetic WAL segments with valid long page headers, and repositories bound to a fake cluster.

For tests of the archive/prefetch plumbing that need real-looking segments but no server.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from pitr.pg import walname
from pitr.repo.format import META_KEY
from pitr.repo.meta import new_meta
from pitr.storage.fs import FsStorage

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
