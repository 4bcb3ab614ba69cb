"""The block map of a relation file: one content hash and one location per 8 KiB block.

Stored (inside an envelope, like file data) for every block-eligible file of every backup, so
the next incremental backup compares block hashes without reading its parent's data, and a
block-incremental entry says where each block of the file lives (docs/repository-format.md §6.2.1):

    header   8 bytes  b"PITRBM1\\0" | uint32 LE block size | uint32 LE block count
    records  22 bytes per block, struct "<16sHI": blake2b-128 of the block's bytes,
             source index (into the entry's `sources`; 0 = the entry's own object when it has
             none), ordinal (the block's position inside that source)

A map is untrusted input: parse() refuses one whose blocks do not add up to the file's size,
that names a source the entry does not have, or whose ordinals do not increase within a source
(restore decodes each source forward exactly once).
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

import numpy as np

from pitr.errors import IntegrityError
from pitr.repo import envelope
from pitr.repo.format import backup_dir
from pitr.repo.manifest import FileEntry
from pitr.storage.base import Storage

MAGIC = b"PITRBM1\0"
HEADER = struct.Struct("<8sII")
RECORD = struct.Struct("<16sHI")
HASH_SIZE = 16
MAX_SOURCES = 1 << 16  # the source index is a uint16
# a relation data file: digits with an optional .N segment suffix (forks _fsm/_vm/_init are small
# and stay whole files)
_RELATION = re.compile(r"[0-9]+(\.[0-9]+)?")
_TABLESPACE_FILE = re.compile(r"pg_tblspc/[0-9]+/PG_[0-9.]+_[0-9]+/[0-9]+/[^/]+")
MIN_BLOCKS = 8  # smaller files are cheaper to store whole than to describe block by block

_DTYPE = np.dtype([("hash", "S16"), ("source", "<u2"), ("ordinal", "<u4")])


def block_hash(block: bytes | memoryview) -> bytes:
    """The content hash of one block (never its LSN: a block is trusted by its bytes)."""
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
    """Collects records in block order; pack() gives the map's bytes."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._records = bytearray()
        self.count = 0

    def add(self, digest: bytes, source: int, ordinal: int) -> None:
        self._records += RECORD.pack(digest, source, ordinal)
        self.count += 1

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.block_size, self.count) + bytes(self._records)


def max_map_size(size: int, block_size: int) -> int:
    """The decoded size a map of a file of `size` bytes has: a cap for decoding it."""
    return HEADER.size + RECORD.size * (size // max(block_size, 1))


@dataclass(frozen=True)
class BlockMap:
    block_size: int
    records: np.ndarray  # structured: hash (S16), source (u2), ordinal (u4)

    @property
    def count(self) -> int:
        return len(self.records)

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


def whole_file(hashes: bytes | list[bytes], block_size: int) -> bytes:
    """The map of a file stored whole: block b is ordinal b of source 0. hashes: one per block,
    or all of them concatenated (HASH_SIZE bytes each)."""
    hb = b"".join(hashes) if isinstance(hashes, list) else hashes
    n = len(hb) // HASH_SIZE
    rec = np.zeros(n, dtype=_DTYPE)
    rec["hash"] = np.frombuffer(hb, dtype="S16", count=n)
    rec["ordinal"] = np.arange(n, dtype="<u4")
    return HEADER.pack(MAGIC, block_size, n) + rec.tobytes()


def renumber(data: bytes, table: list[int]) -> bytes:
    """A packed map (from Builder.pack) with every source index s replaced by table[s]."""
    _magic, _bs, n = HEADER.unpack_from(data)
    rec = np.frombuffer(data, dtype=_DTYPE, offset=HEADER.size, count=n).copy()
    rec["source"] = np.asarray(table, dtype="<u2")[rec["source"]]
    return data[:HEADER.size] + rec.tobytes()


def parse(data: bytes, size: int, sources: int, block_size: int | None = None, what: str = "block map") -> BlockMap:
    """Check and read a map of a file of `size` bytes whose entry has `sources` sources (1 for a
    whole-file entry). IntegrityError on anything a restore could not follow."""
    if len(data) < HEADER.size:
        raise IntegrityError(f"{what} is truncated (no header)")
    magic, bs, count = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IntegrityError(f"{what} is not a pitr block map (bad magic)")
    if bs <= 0 or bs % 512 or (block_size is not None and bs != block_size):
        raise IntegrityError(f"{what} has an unusable block size {bs}")
    if count * bs != size:
        raise IntegrityError(f"{what} covers {count} blocks of {bs} bytes, but the file has {size} bytes")
    if len(data) != HEADER.size + count * RECORD.size:
        raise IntegrityError(f"{what} has {len(data) - HEADER.size} bytes of records, not {count} x {RECORD.size}")
    rec = np.frombuffer(data, dtype=_DTYPE, offset=HEADER.size, count=count)
    src = rec["source"]
    if count and int(src.max()) >= sources:
        raise IntegrityError(f"{what} names source {int(src.max())}, but its entry has {sources}")
    ordv = rec["ordinal"].astype(np.int64)
    for s in np.unique(src).tolist():
        o = ordv[src == s]
        if len(o) > 1 and not bool(np.all(np.diff(o) > 0)):
            raise IntegrityError(f"{what} lists the blocks of source {s} out of order (ordinals must increase)")
    return BlockMap(bs, rec)


def read(storage: Storage, home: str, e: FileEntry, block_size: int | None = None, what: str | None = None) -> BlockMap:
    """Fetch, decode and check the block map of entry e, whose map lives in backups/<home>/ (e.ref
    or the manifest's own ID). Its source count: len(e.sources), or 1 for a whole-file entry."""
    what = what or f"backup {home}'s block map of {e.path}"
    loc = e.map
    if not loc:
        raise IntegrityError(f"{what} is missing (the entry has no map)")
    length = int(loc.get("length", 0))
    raw = storage.get_range(backup_dir(home) + str(loc["object"]), int(loc.get("offset", 0)), length)
    if len(raw) != length:
        raise IntegrityError(f"{what} is cut short: its object is shorter than the manifest says")
    data = envelope.decode(raw, what, max_size=max_map_size(e.size, block_size or 512))
    return parse(data, e.size, len(e.sources) if e.sources else 1, block_size, what)
