"""The block map of a relation file: one content hash and one location per block (format and checks).

Stored (inside an envelope, like file data) for every block-eligible file of every backup, so
the next incremental backup compares block hashes without reading its parent's data, and a
block-incremental entry says where each block of the file lives (docs/repository-format.md §6.2.1).

Format 2 (written since manifest format 4), a *delta* over the map of the same path in an older
backup of the chain (the entry's `map.base`), or a whole map when it has no base:

    header   20 bytes b"PITRBM2\0" | uint32 LE block size | uint32 LE block count | uint32 LE records
    records  26 bytes each, struct "<I16sHI", strictly increasing block number: block number,
             BLAKE3 of the block's bytes truncated to 16 bytes, source index (into the entry's
             `sources`; 0 = the entry's own object when it has none), ordinal (the block's
             position inside that source)

A whole map lists every block 0..count-1. The *effective* map of a delta (overlay()) is its base's
effective map, translated into this entry's sources (translate()), cut or extended to the count,
with the delta's records put over it; every block past the base's end must be in the delta.

Format 1 (older backups; read, never written): b"PITRBM1\0" | block size | block count, then 22
bytes per block "<16sHI" (blake2b-128, source, ordinal), always a whole map.

A map is untrusted input: parse()/parse_delta()/overlay() refuse one whose blocks do not add up to
the file's size, that names a source the entry does not have, whose records are out of order, or
whose ordinals do not increase within a source (restore decodes each source forward exactly once).
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import blake3
import numpy as np

from pitr.errors import IntegrityError
from pitr.repo.manifest import FileEntry, Source

MAGIC = b"PITRBM2\0"
MAGIC_V1 = b"PITRBM1\0"
HEADER = struct.Struct("<8sIII")
HEADER_V1 = struct.Struct("<8sII")
RECORD = struct.Struct("<I16sHI")
RECORD_V1 = struct.Struct("<16sHI")
HASH_SIZE = 16
MAX_SOURCES = 1 << 16  # the source index is a uint16
# a relation data file: digits with an optional .N segment suffix (forks _fsm/_vm/_init are small
# and stay whole files)
_RELATION = re.compile(r"[0-9]+(\.[0-9]+)?")
_TABLESPACE_FILE = re.compile(r"pg_tblspc/[0-9]+/PG_[0-9.]+_[0-9]+/[0-9]+/[^/]+")
MIN_BLOCKS = 8  # smaller files are cheaper to store whole than to describe block by block

_DTYPE = np.dtype([("hash", "S16"), ("source", "<u2"), ("ordinal", "<u4")])
_DTYPE_DELTA = np.dtype([("block", "<u4"), ("hash", "S16"), ("source", "<u2"), ("ordinal", "<u4")])


def block_hash(block: bytes | memoryview | bytearray) -> bytes:
    """The content hash of one block in a format-2 map (never its LSN: a block is trusted by its bytes).
    BLAKE3: about 3x blake2b and 5x SHA-256 per 8 KiB block on a CPU without SHA extensions."""
    return blake3.blake3(block).digest(HASH_SIZE)


def block_hash_v1(block: bytes | memoryview | bytearray) -> bytes:
    """The content hash of one block in a format-1 map (older backups)."""
    return hashlib.blake2b(block, digest_size=HASH_SIZE).digest()


def eligible(rel: str, size: int, block_size: int) -> bool:
    """A relation data file of whole blocks, at least MIN_BLOCKS of them: it gets a block map."""
    if block_size <= 0 or size < MIN_BLOCKS * block_size or size % block_size:
        return False
    head, _, name = rel.rpartition("/")
    if not _RELATION.fullmatch(name) or not name.isascii():
        return False
    return head == "global" or (head.startswith("base/") and head.count("/") == 1) or \
        _TABLESPACE_FILE.fullmatch(rel) is not None


class Builder:
    """Collects delta records in increasing block order; pack(count) gives the map's bytes."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._records = bytearray()
        self.records = 0

    def add(self, block: int, digest: bytes, source: int, ordinal: int) -> None:
        self._records += RECORD.pack(block, digest, source, ordinal)
        self.records += 1

    def pack(self, count: int) -> bytes:
        return HEADER.pack(MAGIC, self.block_size, count, self.records) + bytes(self._records)


def max_map_size(size: int, block_size: int) -> int:
    """The largest decoded size a map of a file of `size` bytes has (every block listed): a cap for decoding it."""
    return HEADER.size + RECORD.size * (size // max(block_size, 1))


@dataclass(frozen=True)
class BlockMap:
    """An effective map: one record per block of the file, in block order."""

    block_size: int
    records: np.ndarray  # structured: hash (S16), source (u2), ordinal (u4)
    version: int = 2  # 1: blake2b hashes (an older backup's map); 2: BLAKE3

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def hash_fn(self) -> Callable[[bytes | memoryview | bytearray], bytes]:
        return block_hash if self.version == 2 else block_hash_v1

    def hashes(self) -> list[bytes]:
        # numpy's S16 strips trailing NUL bytes: pad back to HASH_SIZE
        return [h.ljust(HASH_SIZE, b"\0") for h in self.records["hash"].tolist()]

    def hash_bytes(self) -> bytes:
        """Every block's hash, concatenated (HASH_SIZE bytes each): compact for big files."""
        return self.records["hash"].tobytes()

    def sources(self) -> list[int]:
        return self.records["source"].tolist()  # type: ignore[no-any-return]

    def ordinals(self) -> list[int]:
        return self.records["ordinal"].tolist()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Delta:
    """A parsed format-2 map: the file's block count and its records (block, hash, source, ordinal)."""

    block_size: int
    count: int
    records: np.ndarray  # structured: block (u4), hash (S16), source (u2), ordinal (u4)

    def as_map(self) -> BlockMap:
        """The effective map of a whole map (one record per block, parse_delta checked that)."""
        return BlockMap(self.block_size, _plain(self.records))


def _plain(rec: np.ndarray) -> np.ndarray:
    out = np.zeros(len(rec), dtype=_DTYPE)
    for f in ("hash", "source", "ordinal"):
        out[f] = rec[f]
    return out


def whole_file(hashes: bytes | list[bytes], block_size: int) -> bytes:
    """The whole map of a file stored whole: block b is ordinal b of source 0. hashes: one per block,
    or all of them concatenated (HASH_SIZE bytes each)."""
    hb = b"".join(hashes) if isinstance(hashes, list) else hashes
    n = len(hb) // HASH_SIZE
    rec = np.zeros(n, dtype=_DTYPE_DELTA)
    rec["block"] = np.arange(n, dtype="<u4")
    rec["hash"] = np.frombuffer(hb, dtype="S16", count=n)
    rec["ordinal"] = rec["block"]
    return HEADER.pack(MAGIC, block_size, n, n) + rec.tobytes()


def entry_sources(e: FileEntry, home: str) -> list[Source]:
    """The sources an entry's map indexes: its `sources`, or its own object (a whole-file entry)."""
    if e.sources:
        return [Source(s["backup"], s.get("object"), s.get("offset", 0), s.get("length", 0), s["kind"])
                for s in e.sources]
    return [Source(home, e.object, e.offset, e.length, "file")]


def translate(theirs: Sequence[Source], mine: Sequence[Source]) -> list[int]:
    """For each of a base entry's sources, its index in this entry's sources (-1: not listed). The one
    rule by which a base map's records are read as this entry's: a source is the same envelope
    (backup, object, offset, length, kind)."""
    index = {(s.backup, s.object, s.offset, s.length, s.kind): i for i, s in enumerate(mine)}
    return [index.get((s.backup, s.object, s.offset, s.length, s.kind), -1) for s in theirs]


def _check_header(data: bytes, hdr: struct.Struct, size: int, block_size: int | None, what: str
                  ) -> tuple[int, int]:
    if len(data) < hdr.size:
        raise IntegrityError(f"{what} is truncated (no header)")
    bs, count = hdr.unpack_from(data)[1:3]
    if bs <= 0 or bs % 512 or (block_size is not None and bs != block_size):
        raise IntegrityError(f"{what} has an unusable block size {bs}")
    if count * bs != size:
        raise IntegrityError(f"{what} covers {count} blocks of {bs} bytes, but the file has {size} bytes")
    return bs, count


def check_order(rec: np.ndarray, what: str) -> None:
    """Ordinals strictly increase within each source: restore decodes every source forward, once."""
    src = rec["source"]
    ordv = rec["ordinal"].astype(np.int64)
    for s in np.unique(src).tolist():
        o = ordv[src == s]
        if len(o) > 1 and not bool(np.all(np.diff(o) > 0)):
            raise IntegrityError(f"{what} lists the blocks of source {s} out of order (ordinals must increase)")


def parse(data: bytes, size: int, sources: int, block_size: int | None = None, what: str = "block map") -> BlockMap:
    """Check and read a whole map (format 1, or format 2 with every block) of a file of `size` bytes
    whose entry has `sources` sources (1 for a whole-file entry). IntegrityError on anything a restore
    could not follow."""
    if data[:8] == MAGIC:
        d = parse_delta(data, size, sources, block_size, True, what)
        m = d.as_map()
        check_order(m.records, what)
        return m
    if len(data) >= 8 and data[:8] != MAGIC_V1:
        raise IntegrityError(f"{what} is not a pitr block map (bad magic)")
    bs, count = _check_header(data, HEADER_V1, size, block_size, what)
    if len(data) != HEADER_V1.size + count * RECORD_V1.size:
        raise IntegrityError(f"{what} has {len(data) - HEADER_V1.size} bytes of records, "
                             f"not {count} x {RECORD_V1.size}")
    rec = np.frombuffer(data, dtype=_DTYPE, offset=HEADER_V1.size, count=count)
    if count and int(rec["source"].max()) >= sources:
        raise IntegrityError(f"{what} names source {int(rec['source'].max())}, but its entry has {sources}")
    check_order(rec, what)
    return BlockMap(bs, rec, 1)


def parse_delta(data: bytes, size: int, sources: int, block_size: int | None, whole: bool,
                what: str = "block map") -> Delta:
    """Check and read a format-2 map (whole: it has no base, so it lists every block)."""
    if len(data) >= 8 and data[:8] != MAGIC:
        raise IntegrityError(f"{what} is not a format-2 pitr block map (bad magic)")
    bs, count = _check_header(data, HEADER, size, block_size, what)
    n = HEADER.unpack_from(data)[3]
    if len(data) != HEADER.size + n * RECORD.size:
        raise IntegrityError(f"{what} has {len(data) - HEADER.size} bytes of records, not {n} x {RECORD.size}")
    if whole and n != count:
        raise IntegrityError(f"{what} has no base but lists {n} of its {count} blocks")
    rec = np.frombuffer(data, dtype=_DTYPE_DELTA, offset=HEADER.size, count=n)
    blocks = rec["block"].astype(np.int64)
    if n and (int(blocks[-1]) >= count or (n > 1 and not bool(np.all(np.diff(blocks) > 0)))):
        raise IntegrityError(f"{what} lists its blocks out of order or past the file's {count} blocks")
    if n and int(rec["source"].max()) >= sources:
        raise IntegrityError(f"{what} names source {int(rec['source'].max())}, but its entry has {sources}")
    return Delta(bs, count, rec)


def overlay(base: BlockMap, table: list[int], delta: Delta, what: str = "block map") -> BlockMap:
    """The effective map of a delta: base's effective map with its sources translated by table (from
    translate()), cut or extended to delta.count, overlaid by the delta's records (module doc)."""
    if base.version != 2:
        raise IntegrityError(f"{what} is a delta over a format-1 (blake2b) map, which pitr never writes")
    if base.block_size != delta.block_size:
        raise IntegrityError(f"{what} has blocks of {delta.block_size} bytes, its base {base.block_size}")
    n, k = delta.count, min(base.count, delta.count)
    covered = np.zeros(n, dtype=bool)
    covered[delta.records["block"].astype(np.int64)] = True
    if n > base.count and not bool(covered[base.count:].all()):
        b = base.count + int(np.flatnonzero(~covered[base.count:])[0])
        raise IntegrityError(f"{what} does not list block {b}, which lies past the end of its base's map")
    out = np.zeros(n, dtype=_DTYPE)
    out[:k] = base.records[:k]
    if k:
        t = np.asarray(table, dtype=np.int64)[base.records["source"][:k].astype(np.int64)]
        lost = np.flatnonzero((t < 0) & ~covered[:k])
        if len(lost):
            raise IntegrityError(f"{what} leaves block {int(lost[0])} in a source of its base that its entry "
                                 "does not list")
        out["source"][:k] = np.where(t < 0, 0, t)
    if len(delta.records):
        out[delta.records["block"].astype(np.int64)] = _plain(delta.records)
    check_order(out, what)
    return BlockMap(delta.block_size, out)
