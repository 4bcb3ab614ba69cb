"""Block-level diff and incr backups: which backup to build on, which files changed, which blocks.

- choose_base: a diff builds on the newest full backup, an incr on the newest backup of any
  type; the candidate must be of this cluster, major version, timeline and block size, with a
  whole chain down to a full backup. Otherwise a full backup is taken and the reason given.
- plan_files: a file is referenced whole (`ref`, not read) only when its size and mtime equal
  its parent entry's and that mtime is older than the parent's start minus MTIME_SLACK; if any
  file's mtime went backwards, or with --checksum, every file is read (docs/backup.md says why).
- BlockJobs: for each block-eligible file read, hash every block once (BLAKE3) as it streams past
  and, when the parent has a format-2 map for it, keep only the blocks whose hash differs from the
  parent's effective map (repo/mapchain); the new map is a delta over the parent's (the changed and
  new blocks, docs/repository-format.md §6.2.1) and the entry's `sources` say where the unchanged
  blocks live. No whole-file SHA-256 is computed for such a file: its effective map is its proof.
  A parent map of format 1 (blake2b) cannot be compared with: that file is stored whole, with a
  whole format-2 map, and the log says so. Each job holds the parent's map and one chunk at a time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from pitr.errors import BackupError, PitrError
from pitr.ops.base.backup_files import SourceFile
from pitr.ops.base.backup_store import BlockJob
from pitr.repo import blockmap
from pitr.repo.chain import chain_problem, parent_chain
from pitr.repo.format import BLAKE3_MANIFEST_FORMAT, INCR_MANIFEST_FORMAT, MAP2_MANIFEST_FORMAT
from pitr.repo.manifest import FileEntry, Manifest, Source, read_manifests
from pitr.repo.mapchain import Resolver
from pitr.storage.base import Storage

log = logging.getLogger("pitr.backup")

MTIME_SLACK = 2.0  # seconds: a file written within this of the parent's start may have changed unseen


@dataclass(frozen=True)
class Parent:
    manifest: Manifest
    chain: list[str]  # IDs from the root full backup to the parent
    entries: dict[str, FileEntry] = field(default_factory=dict)
    by_id: Mapping[str, Manifest] = field(default_factory=dict)  # the readable manifests (bases of its maps)

    @property
    def id(self) -> str:
        return self.manifest.id


@dataclass(frozen=True)
class Base:
    """What kind of backup is taken and on what it builds."""

    type: str  # taken: full | diff | incr
    requested: str
    parent: Parent | None = None
    reason: str | None = None  # why a full backup was taken instead of the requested one


@dataclass(frozen=True)
class Server:
    system_identifier: int
    pg_version: int
    timeline: int
    block_size: int


def choose_base(storage: Storage, requested: str, server: Server) -> Base:
    """The parent of a diff/incr (module doc), or a full backup with the reason it had to be one."""
    if requested == "full":
        return Base("full", "full")
    readable, bad = read_manifests(storage)
    mine = {m.id: m for m in readable if m.system_identifier == server.system_identifier}
    cands = [m for m in mine.values() if requested == "incr" or m.type == "full"]
    if not cands:
        return Base("full", requested, reason="there is no full backup of this cluster to build on")
    p = max(cands, key=lambda m: m.id)
    # judged as restore, verify, info and expire judge it (repo/chain.py)
    broken = chain_problem(p, mine, bad)
    why = _unusable(p, server) or (f"cannot be built on: {broken.reason}" if broken else None)
    if why:
        return Base("full", requested, reason=f"the newest backup to build on, {p.id}, {why}")
    chain = [m.id for m in parent_chain(p, mine)]
    return Base(requested, requested, Parent(p, chain, {e.path: e for e in p.files}, mine))


def _unusable(p: Manifest, s: Server) -> str | None:
    if p.pg_version != s.pg_version:
        return f"is of PostgreSQL {p.pg_version}, the server runs {s.pg_version}"
    if p.timeline != s.timeline:
        return f"is on timeline {p.timeline}, the server is on timeline {s.timeline}"
    if p.extra.get("block_size", s.block_size) != s.block_size:
        return f"has blocks of {p.extra.get('block_size')} bytes, the server's are {s.block_size}"
    return None


def _epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


# --------------------------------------------------------------------------- which files changed

def plan_files(files: list[SourceFile], parent: Parent | None, checksum: bool = False
               ) -> tuple[list[SourceFile], list[FileEntry], str | None]:
    """(files to read, entries referenced whole from the parent's chain, why everything is read or None)."""
    if parent is None:
        return files, [], None
    if checksum:
        return files, [], "--checksum"
    back = next((f for f in files if f.rel in parent.entries and f.mtime < parent.entries[f.rel].mtime), None)
    if back is not None:
        why = f"the mtime of {back.rel} went backwards since backup {parent.id}; every file is read"
        log.warning("%s", why)
        return files, [], why
    horizon = _epoch(parent.manifest.start_time) - MTIME_SLACK
    read: list[SourceFile] = []
    refs: list[FileEntry] = []
    for f in files:
        pe = parent.entries.get(f.rel)
        if pe is None or pe.size == 0 or (pe.object is None and not pe.sources) or f.size != pe.size \
                or f.mtime != pe.mtime or f.mtime >= horizon:
            read.append(f)
            continue
        refs.append(FileEntry(f.rel, pe.size, pe.sha256, f.mode if f.mode >= 0 else pe.mode, pe.mtime, pe.object,
                              pe.offset, pe.length, list(pe.bad_pages), ref=pe.ref or parent.id,
                              map=dict(pe.map) if pe.map else None,
                              sources=[dict(s) for s in pe.sources] if pe.sources else None,
                              blake3=pe.blake3))  # the parent's digest, of the parent's algorithm
    return read, refs, None


# --------------------------------------------------------------------------- which blocks changed

class BlockJobs:
    """The Pipeline's block_jobs hook: a job for every block-eligible file (module doc)."""

    def __init__(self, storage: Storage, backup_id: str, block_size: int, parent: Parent | None) -> None:
        self.storage, self.backup_id, self.block_size, self.parent = storage, backup_id, block_size, parent
        self.resolver = Resolver(storage, parent.by_id.get, parent.chain, block_size) if parent is not None else None

    def __call__(self, f: SourceFile) -> BlockJob | None:
        if not blockmap.eligible(f.rel, f.size, self.block_size):
            return None
        pe = self.parent.entries.get(f.rel) if self.parent is not None else None
        if pe is None or pe.map is None or pe.size == 0:
            return WholeJob(self.block_size)
        assert self.parent is not None and self.resolver is not None
        home = pe.ref or self.parent.id
        if pe.map.get("sha256") is None:  # format 1: blake2b hashes cannot be compared with BLAKE3 ones
            log.info("backup %s's block map of %s is of format 1 (blake2b); copying the file whole", home, f.rel)
            return WholeJob(self.block_size)
        try:
            pmap = self.resolver.effective(home, pe)
        except PitrError as e:  # a damaged parent map costs a whole copy, never a wrong one
            log.warning("backup %s's block map of %s is unusable (%s); copying the file whole", home, f.rel, e)
            return WholeJob(self.block_size)
        return IncrJob(self.block_size, self.backup_id, self.parent.id, pmap, blockmap.entry_sources(pe, home))


class _Blocks:
    """Cuts fed bytes into whole blocks (a chunk may end inside one)."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.rest = b""

    def blocks(self, data: bytes) -> tuple[memoryview, int]:
        if self.rest:
            data = self.rest + data
        whole = len(data) - len(data) % self.bs
        self.rest = data[whole:]
        return memoryview(data)[:whole], whole // self.bs


class WholeJob(_Blocks):
    """A file stored whole (full backups, files new since the parent): only its map is computed."""

    def __init__(self, block_size: int) -> None:
        super().__init__(block_size)
        self.hashes = bytearray()  # 16 bytes a block: 2 MiB for a 1 GiB segment
        self.map_sha = ""

    def feed(self, data: bytes) -> bytes:
        view, n = self.blocks(data)
        bs = self.bs
        h = blockmap.block_hash
        for i in range(n):
            self.hashes += h(view[i * bs:(i + 1) * bs])
        return data

    def map_bytes(self) -> bytes | None:
        if self.rest or not self.hashes:
            return None  # shrank to a partial block while read: no map (WAL replay fixes the file)
        mb = blockmap.whole_file(bytes(self.hashes), self.bs)
        self.map_sha = hashlib.sha256(mb).hexdigest()
        return mb

    def finish(self, entry: FileEntry) -> None:
        if entry.map is not None:
            entry.map["sha256"] = self.map_sha  # binds the map to the manifest (format 2)


class IncrJob(_Blocks):
    """A file whose parent has a format-2 map: keep the blocks whose hash differs (or are new); the
    map is a delta over the parent's. Memory: the parent's effective map (about 22 bytes a block)
    and the delta, never the file."""

    def __init__(self, block_size: int, backup_id: str, parent_id: str, parent: blockmap.BlockMap,
                 sources: list[Source]) -> None:
        super().__init__(block_size)
        self.backup_id, self.parent_id = backup_id, parent_id
        self.sources = sources  # the parent entry's, which its effective map indexes
        self.p_hash = parent.hash_bytes()
        self.p_src = parent.records["source"]
        self.pc = parent.count
        self.out = blockmap.Builder(block_size)
        self.blocks_seen = 0
        self.unchanged = bytearray(self.pc)  # 1 where the block equals the parent's
        self.changed = 0
        self.map_sha = ""

    def feed(self, data: bytes) -> bytes:
        view, n = self.blocks(data)
        bs, hs = self.bs, blockmap.HASH_SIZE
        keep: list[memoryview] = []
        first = self.blocks_seen
        h_of = blockmap.block_hash
        for i in range(n):
            block = view[i * bs:(i + 1) * bs]
            h = h_of(block)
            b = first + i
            if b < self.pc and self.p_hash[b * hs:(b + 1) * hs] == h:
                self.unchanged[b] = 1
            else:
                self.out.add(b, h, 0, self.changed)
                self.changed += 1
                keep.append(block)
        self.blocks_seen += n
        return b"".join(keep)

    def map_bytes(self) -> bytes | None:
        if self.rest:
            raise BackupError(f"a relation file shrank to a partial block while backup {self.backup_id} read it",
                              "run the backup again")
        mb = self.out.pack(self.blocks_seen)
        self.map_sha = hashlib.sha256(mb).hexdigest()
        return mb

    def finish(self, entry: FileEntry) -> None:
        entry.sha256 = entry.blake3 = ""  # the effective map (checked block by block) is this entry's integrity
        if entry.map is not None:
            entry.map["sha256"] = self.map_sha
            entry.map["base"] = self.parent_id
        # parent sources no unchanged block points at any more are dropped
        n = min(self.pc, self.blocks_seen)
        mask = np.frombuffer(bytes(self.unchanged[:n]), dtype=np.uint8).astype(bool)
        used = np.unique(self.p_src[:n][mask]).tolist() if n else []
        own = Source(self.backup_id, entry.object, entry.offset, entry.length, "blocks")
        entry.sources = [own.to_json()] + [self.sources[s].to_json() for s in used]


def annotate(m: Manifest, base: Base) -> None:
    """Type, parent, format 3 and the chain on a diff/incr manifest; the fall-back reason on a full one;
    format 4 on any manifest with a format-2 block map and 5 on any with a blake3 file digest (an older
    pitr must refuse it, not misread it)."""
    if any(e.map and e.map.get("sha256") for e in m.files):
        m.format = max(m.format, MAP2_MANIFEST_FORMAT)
    if any(e.blake3 for e in m.files):
        m.format = max(m.format, BLAKE3_MANIFEST_FORMAT)
    if base.parent is None:
        if base.reason:
            m.extra["requested_type"] = base.requested
            m.extra["fallback_reason"] = base.reason
        return
    m.type = base.type
    m.parent = base.parent.id
    m.format = max(m.format, INCR_MANIFEST_FORMAT)
    m.extra["chain"] = [*base.parent.chain, m.id]
