"""PostgreSQL data page checksums, verified many pages at a time with numpy.

The algorithm (src/include/storage/checksum_impl.h): the page is read as 32 columns of uint32;
each column runs its own FNV-1a-like hash, `h = (h ^ v) * FNV_PRIME ^ ((h ^ v) >> 17)`, from a
fixed base offset, with the page's own pd_checksum field zeroed, followed by two rounds of
zeros; the 32 sums are xor-folded, xor'ed with the block number (relative to the whole relation,
so segment N of a relation starts at N * RELSEG_SIZE), and reduced to `sum % 65535 + 1`.

The 32 columns map onto numpy lanes, and many pages are processed in one pass, so one core
checks several hundred MiB/s. Pages are read in the host's byte order, which is the order
PostgreSQL wrote them in (pitr backs up the server's own host).

A page is not reported when it cannot be judged from a concurrent read:
- a new page (pd_upper == 0) that is all zeros (allocated, never written);
- a page whose pd_lsn is at or after the backup's start LSN: it was written during the backup,
  may be torn by our read, and WAL replay (full-page images) rewrites it anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

N_SUMS = 32
FNV_PRIME = np.uint32(16777619)
BASE_OFFSETS = np.array([
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
], dtype=np.uint32)

# page header offsets (bufpage.h): pd_lsn u32 xlogid + u32 xrecoff, pd_checksum u16 at 8, pd_upper at 14
_CHECKSUM_WORD = 2  # the uint32 word holding pd_checksum (bytes 8..11) ...
_CHECKSUM_MASK = np.frombuffer(b"\x00\x00\xff\xff", dtype=np.uint32)[0]  # ... and its other half kept


def page_checksums(pages: bytes | memoryview, blknos: np.ndarray, block_size: int = 8192) -> np.ndarray:
    """Checksums (uint16) PostgreSQL would compute for each whole page in `pages`, page i being
    relation block blknos[i]."""
    words_per_page = block_size // 4
    rows = words_per_page // N_SUMS
    n = len(pages) // block_size
    w = np.frombuffer(pages, dtype=np.uint32, count=n * words_per_page).reshape(n, rows, N_SUMS)
    # rows outermost and contiguous, so each step below is one vector op over every page's 32 lanes
    data = w.transpose(1, 0, 2).copy().reshape(rows, n * N_SUMS)  # a copy: we zero pd_checksum in it
    data[0, _CHECKSUM_WORD::N_SUMS] &= _CHECKSUM_MASK  # pd_checksum counts as zero
    sums = np.tile(BASE_OFFSETS, n)
    tmp = np.empty_like(sums)
    zeros = np.zeros_like(sums)
    for row in (*data, zeros, zeros):
        np.bitwise_xor(sums, row, out=tmp)
        np.multiply(tmp, FNV_PRIME, out=sums)
        np.right_shift(tmp, 17, out=tmp)
        np.bitwise_xor(sums, tmp, out=sums)
    folded = np.bitwise_xor.reduce(sums.reshape(n, N_SUMS), axis=1)
    folded ^= blknos.astype(np.uint32)
    return (folded % np.uint32(65535) + np.uint32(1)).astype(np.uint16)


def bad_pages(pages: bytes | memoryview, blknos: np.ndarray, start_lsn: int, block_size: int = 8192) -> np.ndarray:
    """Indexes (within `pages`) of whole pages whose checksum fails and that cannot be explained by
    a concurrent write (see the module doc). blknos[i] is page i's relation block number."""
    n = len(pages) // block_size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    raw = np.frombuffer(pages, dtype=np.uint8, count=n * block_size).reshape(n, block_size)
    hdr = np.ascontiguousarray(raw[:, :16])
    lsn = (hdr[:, 0:4].copy().view(np.uint32)[:, 0].astype(np.uint64) << np.uint64(32)) \
        | hdr[:, 4:8].copy().view(np.uint32)[:, 0].astype(np.uint64)
    stored = hdr[:, 8:10].copy().view(np.uint16)[:, 0]
    upper = hdr[:, 14:16].copy().view(np.uint16)[:, 0]
    new = upper == 0
    # a new page must be all zeros; a non-zero one is as broken as a checksum failure
    new_bad = new & raw.any(axis=1)
    judged = ~new & (lsn < np.uint64(start_lsn))
    if not judged.any():
        return np.flatnonzero(new_bad)
    computed = page_checksums(pages, blknos, block_size)
    return np.flatnonzero((judged & (computed != stored)) | new_bad)


def bad_blocks(pages: bytes | memoryview, first_blkno: int, start_lsn: int, block_size: int = 8192) -> list[int]:
    """bad_pages() for consecutive blocks starting at first_blkno; plain ints."""
    n = len(pages) // block_size
    blknos = np.arange(first_blkno, first_blkno + n, dtype=np.uint64)
    return [int(i) for i in bad_pages(pages, blknos, start_lsn, block_size)]


class BatchChecker:
    """Checks the pages of many small files in one vector pass (per-call overhead would dominate
    one file at a time). add() each file, then run() -> {key: bad block numbers within that file}."""

    def __init__(self, start_lsn: int, block_size: int = 8192) -> None:
        self.start_lsn = start_lsn
        self.block_size = block_size
        self._parts: list[bytes | memoryview] = []
        self._blknos: list[np.ndarray] = []
        self._owner: list[tuple[str, int]] = []  # (key, pages) per added file, in order

    def add(self, key: str, data: bytes, blkno_base: int) -> None:
        n = len(data) // self.block_size
        if n:
            self._parts.append(memoryview(data)[: n * self.block_size])
            self._blknos.append(np.arange(blkno_base, blkno_base + n, dtype=np.uint64))
            self._owner.append((key, n))

    def run(self, group_pages: int = 512) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        start = 0
        while start < len(self._owner):
            end, pages = start, 0
            while end < len(self._owner) and (pages < group_pages or end == start):
                pages += self._owner[end][1]
                end += 1
            self._run_group(start, end, out)  # a few MiB at a time: bounded temporary arrays
            start = end
        return out

    def _run_group(self, start: int, end: int, out: dict[str, list[int]]) -> None:
        owners = self._owner[start:end]
        pages = b"".join(self._parts[start:end])
        blknos = np.concatenate(self._blknos[start:end])
        firsts = np.cumsum([0] + [n for _, n in owners])
        for i in bad_pages(pages, blknos, self.start_lsn, self.block_size):
            k = int(np.searchsorted(firsts, i, side="right")) - 1
            out.setdefault(owners[k][0], []).append(int(i - firsts[k]))


@dataclass
class PageChecker:
    """Verifies one file as it streams past, in any chunk sizes; collects bad block numbers.

    blkno_base: the relation block number of the file's first page (segment * RELSEG_SIZE)."""

    start_lsn: int
    blkno_base: int = 0
    block_size: int = 8192
    bad: list[int] = field(default_factory=list)  # block numbers within this file
    _pos: int = 0  # bytes of whole pages checked so far
    _carry: bytes = b""

    def feed(self, data: bytes | memoryview) -> None:
        if self._carry:
            data = self._carry + bytes(data)
            self._carry = b""
        whole = len(data) - len(data) % self.block_size
        if whole:
            first = self._pos // self.block_size
            for i in bad_blocks(memoryview(data)[:whole], self.blkno_base + first, self.start_lsn, self.block_size):
                self.bad.append(first + i)
            self._pos += whole
        if whole < len(data):
            self._carry = bytes(memoryview(data)[whole:])  # a partial page: wait for the rest (or EOF)
