"""PostgreSQL page checksums: the vectorized check agrees with pages PostgreSQL itself wrote, finds
damage at the right block, and leaves alone what a concurrent write explains."""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pitr.pg import layout, pagecheck
from tests.support.pg import PgCluster, make_tmpdir, pg_bin_dirs, rmtree_pg

BLCKSZ = 8192
NOT_STARTED = 1 << 62  # a backup start LSN past every page: every page is judged


def reference_checksum(page: bytes, blkno: int) -> int:
    """checksum_impl.h transcribed one word at a time (slow, obviously equal to the C code)."""
    words = list(struct.unpack(f"<{BLCKSZ // 4}I", page))
    words[2] &= 0xFFFF0000  # pd_checksum (bytes 8-9) counts as zero
    sums = [int(x) for x in pagecheck.BASE_OFFSETS]

    def comp(s: int, v: int) -> int:
        t = s ^ v
        return ((t * 16777619) & 0xFFFFFFFF) ^ (t >> 17)

    for i in range(BLCKSZ // 128):
        for j in range(32):
            sums[j] = comp(sums[j], words[i * 32 + j])
    for _ in range(2):
        for j in range(32):
            sums[j] = comp(sums[j], 0)
    result = 0
    for s in sums:
        result ^= s
    return ((result ^ blkno) % 65535) + 1


@pytest.fixture(scope="module")
def real_files() -> Iterator[dict[str, bytes]]:
    """Every checksummed relation file of a small PostgreSQL 15 cluster, after a clean shutdown."""
    base = make_tmpdir("pitr-pc-")
    pg = PgCluster(pg_bin_dirs()["15"], base / "pg").initdb(checksums=True)
    try:
        pg.start()
        pg.sql("create table t as select g, md5(g::text) as h from generate_series(1, 20000) g")
        pg.sql("create index on t (h)")
        pg.sql("vacuum t")
        pg.stop()
        out = {}
        for root, _dirs, names in os.walk(pg.data):
            for n in names:
                rel = os.path.relpath(os.path.join(root, n), pg.data)
                if layout.has_page_checksums(rel):
                    out[rel] = Path(root, n).read_bytes()
        yield out
    finally:
        pg.ensure_stopped()
        rmtree_pg(base)


def _largest(files: dict[str, bytes]) -> tuple[str, bytes]:
    rel = max(files, key=lambda r: len(files[r]))
    return rel, files[rel]


def test_matches_the_reference_on_random_pages() -> None:
    rng = random.Random(7)
    pages = b"".join(rng.randbytes(BLCKSZ) for _ in range(5))
    got = pagecheck.page_checksums(pages, np.array([0, 1, 77, 131072, 4294967294], dtype=np.uint64))
    want = [reference_checksum(pages[i * BLCKSZ:(i + 1) * BLCKSZ], b)
            for i, b in enumerate([0, 1, 77, 131072, 4294967294])]
    assert [int(x) for x in got] == want


def test_every_page_postgresql_wrote_verifies(real_files: dict[str, bytes]) -> None:
    pages = 0
    for rel, data in real_files.items():
        seg = layout.relation_file(rel.rsplit("/", 1)[-1])
        assert seg is not None
        assert pagecheck.bad_blocks(data, seg[2] * 131072, NOT_STARTED) == [], rel
        pages += len(data) // BLCKSZ
    assert pages > 300  # the check ran over a real amount of data, heap, index, fsm and vm pages
    # the stored checksums are what the reference computes, so agreement is not vacuous
    rel, data = _largest(real_files)
    stored = struct.unpack_from("<H", data, 8 + 3 * BLCKSZ)[0]
    assert stored == reference_checksum(data[3 * BLCKSZ:4 * BLCKSZ], 3)


def test_damage_is_found_at_its_block(real_files: dict[str, bytes]) -> None:
    rel, data = _largest(real_files)
    broken = bytearray(data)
    broken[5 * BLCKSZ + 4000] ^= 0x01  # one bit inside the tuple area of block 5
    broken[9 * BLCKSZ + 8] ^= 0xFF  # the stored checksum of block 9
    assert pagecheck.bad_blocks(bytes(broken), 0, NOT_STARTED) == [5, 9]
    # the same page read as another block number (a transposed page) fails too
    assert pagecheck.bad_blocks(data[:BLCKSZ], 1, NOT_STARTED) == [0]


def test_pages_written_during_the_backup_and_new_pages_are_not_judged(real_files: dict[str, bytes]) -> None:
    _rel, data = _largest(real_files)
    page = bytearray(data[2 * BLCKSZ:3 * BLCKSZ])
    page[5000] ^= 0x40  # torn by a concurrent write...
    lsn = (struct.unpack_from("<I", page, 0)[0] << 32) | struct.unpack_from("<I", page, 4)[0]
    assert pagecheck.bad_blocks(bytes(page), 2, lsn + 1) == [0]  # ...judged if older than the backup start
    assert pagecheck.bad_blocks(bytes(page), 2, lsn) == []  # ...not if written at or after it
    zero = bytes(BLCKSZ)
    assert pagecheck.bad_blocks(zero * 3, 0, NOT_STARTED) == []  # allocated, never written
    junk = bytearray(zero)
    junk[100] = 1  # pd_upper == 0 ("new") yet not zeroed: broken
    assert pagecheck.bad_blocks(bytes(junk), 0, NOT_STARTED) == [0]


def test_streaming_and_batched_checks_agree(real_files: dict[str, bytes]) -> None:
    rel, data = _largest(real_files)
    broken = bytearray(data)
    broken[3 * BLCKSZ + 777] ^= 0x10
    c = pagecheck.PageChecker(NOT_STARTED, 0)
    pos = 0
    for size in (1, 5000, BLCKSZ, 3 * BLCKSZ + 17, 1 << 20):  # chunks not aligned to pages
        c.feed(bytes(broken[pos:pos + size]))
        pos += size
    c.feed(bytes(broken[pos:]))
    assert c.bad == [3]
    batch = pagecheck.BatchChecker(NOT_STARTED)
    batch.add("a", bytes(broken), 0)
    batch.add("b", data, 0)
    batch.add("c", bytes(broken[:4 * BLCKSZ + 100]), 0)  # a trailing partial page is ignored
    assert batch.run(group_pages=2) == {"a": [3], "c": [3]}
