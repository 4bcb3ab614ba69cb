"""Assemble a block-incremental file from its sources (docs/repository-format.md §6.2.1).

The entry's block map says, for every block, which source holds it and at which ordinal. Each
source envelope is decoded forward exactly once (ordinals increase within a source, which the
map parser enforces), so the blocks are written in file order while every source is streamed:
memory is one ranged-read window per source plus one run of blocks, whatever the file's size.
What proves the assembly right: for an entry written with a format-2 map (no file digest), every
block's BLAKE3 against the effective map, and the size; for an older entry, the assembled file's
size and digest, of the entry's algorithm (sources are not hashed again on their own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol

import numpy as np

from pitr.errors import IntegrityError
from pitr.repo import blockmap, envelope
from pitr.repo.manifest import FileEntry, Source

RUN_BLOCKS = 128  # blocks written per call (1 MiB of 8 KiB blocks)
DECODE_CHUNK = 64 << 10  # compressed bytes per read from a source


class Reader(Protocol):
    def read(self, n: int = -1) -> bytes: ...

    def close(self) -> None: ...


# (backup, object, offset, length, chunk) -> a reader of those stored bytes
OpenRange = Callable[[str, str, int, int, int], Reader]


class _SourceStream:
    """One source's decoded bytes, read forward: run(k, n) returns blocks k..k+n-1 of it."""

    def __init__(self, pieces: Iterator[bytes], block_size: int, what: str) -> None:
        self.it, self.bs, self.what = pieces, block_size, what
        self.buf = b""
        self.off = 0  # read position in buf
        self.pos = 0  # stream offset of buf[off]

    def _pull(self, k: int) -> bytes:
        piece = next(self.it, None)
        if piece is None:
            raise IntegrityError(f"{self.what} ends before block {k} of it")
        return piece

    def run(self, k: int, n: int) -> bytes:
        start = k * self.bs
        if start < self.pos:
            raise IntegrityError(f"{self.what}: blocks requested out of order")
        skip = start - self.pos
        while skip:
            avail = len(self.buf) - self.off
            if skip >= avail:
                skip -= avail
                self.pos += avail
                self.buf, self.off = self._pull(k), 0
                continue
            self.off += skip
            self.pos += skip
            skip = 0
        want = n * self.bs
        parts: list[bytes] = []
        while want:
            avail = len(self.buf) - self.off
            if not avail:
                self.buf, self.off = self._pull(k), 0
                continue
            take = min(avail, want)
            parts.append(self.buf[self.off:self.off + take])
            self.off += take
            self.pos += take
            want -= take
        return parts[0] if len(parts) == 1 else b"".join(parts)


def runs(src: np.ndarray, ordv: np.ndarray, limit: int = RUN_BLOCKS) -> Iterator[tuple[int, int, int, int]]:
    """(first block, source, first ordinal, count): consecutive blocks read from one source in one go."""
    n = len(src)
    if not n:
        return
    o = ordv.astype(np.int64)
    brk = np.flatnonzero((src[1:] != src[:-1]) | (o[1:] != o[:-1] + 1)) + 1
    starts = [0, *brk.tolist(), n]
    srcl = src.tolist()
    ordl = o.tolist()
    for a, b in zip(starts, starts[1:], strict=False):
        for c in range(a, b, limit):
            yield c, srcl[c], ordl[c], min(limit, b - c)


def assemble(e: FileEntry, home: str, bmap: blockmap.BlockMap, open_range: OpenRange, out: BinaryIO,
             what: str, window: int) -> int:
    """Write e's bytes to out from its sources; returns stored bytes read. IntegrityError on any mismatch.
    home: the backup holding e's object (e.ref or the manifest's own ID); window: ranged-read size."""
    srcs: list[Source] = blockmap.entry_sources(e, home)
    rec = bmap.records
    used = np.unique(rec["source"]).tolist() if len(rec) else []
    chunk = max(256 << 10, window // max(1, len(used)))
    streams: dict[int, _SourceStream] = {}
    readers: list[Reader] = []
    h = envelope.hasher(e.algo) if e.digest else None
    hash_fn, want, hs = bmap.hash_fn, bmap.hash_bytes(), blockmap.HASH_SIZE
    bs = bmap.block_size
    written = 0
    try:
        for i in used:
            s = srcs[i]
            if s.object is None:
                raise IntegrityError(f"{what}: its block map uses source {i}, which holds no blocks")
            r = open_range(s.backup, s.object, s.offset, s.length, chunk)
            readers.append(r)
            sw = f"{what} (source {i}: backup {s.backup}, {s.object})"
            # each piece is at most DECODE_CHUNK raw bytes (envelope.decode_iter); nothing past the last
            # block used is pulled, so the cap's slack only absorbs the last piece
            need = (int(rec["ordinal"][rec["source"] == i].max()) + 1) * bmap.block_size
            pieces = envelope.decode_iter(r, sw, DECODE_CHUNK, max_size=need + (64 << 20),  # type: ignore[arg-type]
                                          checksum=False)
            streams[i] = _SourceStream(pieces, bmap.block_size, sw)
        for first, s_i, o, n in runs(rec["source"], rec["ordinal"]):
            data = streams[s_i].run(o, n)
            if h is not None:
                h.update(data)
            else:
                view = memoryview(data)
                for i in range(n):
                    b = first + i
                    if hash_fn(view[i * bs:(i + 1) * bs]) != want[b * hs:(b + 1) * hs]:
                        raise IntegrityError(f"{what}: block {b} (source {s_i}) does not match its block map's hash",
                                             "run `pitr verify`; restore from another backup with --backup")
            out.write(data)
            written += len(data)
    finally:
        for r in readers:
            r.close()
    if written != e.size or (h is not None and h.hexdigest() != e.digest):
        raise IntegrityError(f"{what} does not match its manifest entry once assembled (size or {e.algo} digest)",
                             "run `pitr verify`; restore from another backup with --backup")
    return sum(getattr(r, "bytes_read", 0) for r in readers)
