"""What `pitr verify` reads for each backup, chains and block maps included.

Every file entry becomes one or more *pieces*: an envelope at (object, offset, length) in some
backup's directory, with what its decoded bytes must be — the size and digest of a file stored
whole, and/or the content hash of given blocks (ordinal -> BLAKE3 or, in format-1 maps, blake2b,
from effective block maps: repo/mapchain, the same resolution restore uses). Pieces
are grouped by object, merged when several entries name the same envelope (a file referenced
whole by later backups, a parent's blocks reused by an incremental), so each object is streamed
once, in offset order, by verify.check_data_object.

- a plain entry: its own envelope must decode to its size and digest; with a `map`, each block
  must also match the map's hash (the next incremental trusts those hashes).
- a `ref` entry: the backup it names must hold an entry of the same path with the same content
  and location; its envelope (and map) are checked in that backup's directory.
- a block-incremental entry (`sources`): its map must match the SHA-256 its entry records, resolve
  over its base chain (repo-format §6.2.1) and every block of the effective map must be present at
  its ordinal in its source and match its hash. Restore checks the same hashes (format 2) or the
  whole file's SHA-256 (older entries) after assembly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pitr.errors import IntegrityError, NotFoundError
from pitr.repo import blockmap
from pitr.repo.format import backup_dir
from pitr.repo.manifest import FileEntry, Manifest, path_problem
from pitr.repo.mapchain import Lookup, MapCache, Resolver, chain_ids
from pitr.storage.base import Storage

# kinds of problem (docs/maintenance.md), beside those of verify.py
CHAIN = "chain-broken"  # a diff/incr backup whose chain is not whole (repo/chain.py)
BLOCK_MAP = "block-map"  # a block map that does not decode or cannot be followed
BAD_BLOCK = "bad-block"  # a block that is missing from its source or does not match its hash

def block_hash(block: bytes | memoryview | bytearray, version: int = 2) -> bytes:
    return blockmap.block_hash(block) if version == 2 else blockmap.block_hash_v1(block)


@dataclass
class Piece:
    """One envelope to decode: where (offset, length inside its object), what it is for (path),
    and what it must decode to."""

    path: str  # what the problem lines name: "file base/1/2 of backup X"
    offset: int
    length: int
    size: int  # the most it may decode to (the largest size of a file read from it)
    digest: str | None = None  # the whole file's digest (hex), or None
    algo: str = "sha256"  # of digest: the envelope's trailer must hold the same algorithm
    exact: bool = False  # a file stored whole: it must decode to file_size bytes with that digest
    file_size: int = 0
    file: bool = False  # counts as a checked file
    block_size: int = 0
    # ordinal -> [(hash, block number in its file, "file P of backup B", map format: 1 blake2b, 2 BLAKE3)]
    blocks: dict[int, list[tuple[bytes, int, str, int]]] = field(default_factory=dict)

    def expect_block(self, block_size: int, ordinal: int, digest: bytes, block: int, label: str,
                     version: int = 2) -> str | None:
        if self.block_size and self.block_size != block_size:
            return f"is read with block sizes {self.block_size} and {block_size}"
        self.block_size = block_size
        self.blocks.setdefault(ordinal, []).append((digest, block, label, version))
        return None


class BlockSink:
    """A decode_stream sink that hashes the blocks a piece has expectations for, one block of
    memory at a time; `bad` lists the (block number, file label) that did not match."""

    def __init__(self, piece: Piece) -> None:
        self.piece = piece
        self.bs = piece.block_size
        self.buf = bytearray()
        self.ordinal = 0
        self.bad: list[tuple[int, str]] = []

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            take = min(self.bs - len(self.buf), len(view) - pos)
            if not self.buf and take == self.bs:
                self._block(view[pos:pos + take])
            else:
                self.buf += view[pos:pos + take]
                if len(self.buf) == self.bs:
                    self._block(self.buf)
                    self.buf = bytearray()
            pos += take
        return len(data)

    def _block(self, block: bytes | memoryview | bytearray) -> None:
        want = self.piece.blocks.get(self.ordinal)
        if want:
            got: dict[int, bytes] = {}
            for h, n, label, version in want:
                if version not in got:
                    got[version] = block_hash(block, version)
                if h != got[version]:
                    self.bad.append((n, label))
        self.ordinal += 1

    def missing(self) -> list[tuple[int, str]]:
        """Expected blocks past the end of what was decoded: (block number, file label)."""
        return [(block, label) for o, lst in sorted(self.piece.blocks.items()) if o >= self.ordinal
                for _h, block, label, _v in lst]


@dataclass
class MapTask:
    key: str  # full key of the object holding the map's envelope
    offset: int
    length: int
    entry: FileEntry
    home: str  # the backup whose directory holds the entry's objects
    backup: str  # the backup whose manifest lists the entry (for problem lines)
    lookup: Lookup | None = None  # manifests by ID, and the IDs of backup's chain: where its map's
    chain: set[str] = field(default_factory=set)  # bases may be resolved (set by collect)
    index: dict[str, dict[str, FileEntry]] = field(default_factory=dict)  # shared: path -> entry per backup
    version: int = 2  # the map's format, once read_map has read it (which hash its blocks have)
    cache: MapCache | None = None  # shared: effective maps already resolved (a delta's base, read once)


@dataclass
class Work:
    """Everything verify decodes for a set of backups, and the problems found on the way."""

    pieces: dict[str, dict[tuple[int, int], Piece]] = field(default_factory=dict)  # key -> (offset, length) -> piece
    needed_by: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # key -> [(backup, path)]
    maps: dict[tuple[str, int, int], MapTask] = field(default_factory=dict)
    manifest_problems: list[tuple[str, str]] = field(default_factory=list)  # (backup, detail)
    known: set[str] = field(default_factory=set)  # IDs of the backups present (only those are read)
    files: int = 0  # entries checked through another entry's envelope (ref) or block by block (sources)
    index: dict[str, dict[str, FileEntry]] = field(default_factory=dict)  # path -> entry, per backup (map bases)
    map_cache: MapCache = field(default_factory=MapCache)  # effective maps of this run, bounded

    def piece(self, home: str, obj: str, offset: int, length: int, backup: str, path: str, size: int) -> Piece:
        key = backup_dir(home) + obj
        by_pos = self.pieces.setdefault(key, {})
        p = by_pos.get((offset, length))
        if p is None:
            p = by_pos[(offset, length)] = Piece(path, offset, length, size)
        p.size = max(p.size, size)
        self.needed_by.setdefault(key, []).append((backup, path))
        return p


def own_keys(m: Manifest) -> set[str]:
    """Keys under m's own directory its entries reference (data, maps, its own changed blocks)."""
    base = backup_dir(m.id)
    out: set[str] = set()
    for e in m.files:
        if getattr(e, "ref", None) is not None:
            continue
        if e.object is not None:
            out.add(base + e.object)
        loc = getattr(e, "map", None)
        if isinstance(loc, dict) and isinstance(loc.get("object"), str):
            out.add(base + loc["object"])
        for s in getattr(e, "sources", None) or []:
            if isinstance(s, dict) and s.get("backup") == m.id and isinstance(s.get("object"), str):
                out.add(base + s["object"])
    return out


def _loc(d: object) -> tuple[str, int, int] | None:
    if not isinstance(d, dict):
        return None
    obj, off, ln = d.get("object"), d.get("offset", 0), d.get("length", 0)
    if not isinstance(obj, str) or path_problem(obj) or not isinstance(off, int) or not isinstance(ln, int) \
            or off < 0 or ln < 0:
        return None
    return obj, off, ln


def collect(m: Manifest, by_id: dict[str, Manifest], work: Work) -> None:
    """Add the pieces and maps backup m needs to `work` (m's chain has been judged already: a ref
    to a backup that is not present is a chain problem, reported there, and skipped here)."""
    chain: set[str] | None = None
    for e in m.files:
        ref = getattr(e, "ref", None)
        home = m.id
        if ref is not None:
            holder = by_id.get(ref)
            if holder is None:
                continue  # reported as a broken chain
            theirs = next((x for x in holder.files if x.path == e.path), None)
            mine = (e.size, e.sha256, e.blake3, e.object, e.offset, e.length, getattr(e, "map", None),
                    getattr(e, "sources", None))
            if theirs is None or mine != (theirs.size, theirs.sha256, theirs.blake3, theirs.object, theirs.offset,
                                          theirs.length, getattr(theirs, "map", None),
                                          getattr(theirs, "sources", None)):
                work.manifest_problems.append((m.id, f"file {e.path} refers to backup {ref}, whose entry for it "
                                                     f"{'does not exist' if theirs is None else 'differs'}"))
                continue
            home = ref
            work.files += 1  # its envelope is checked once, as the holder's piece
        sources = getattr(e, "sources", None)
        label = f"file {e.path} of backup {m.id}"
        loc = _loc(getattr(e, "map", None))
        if getattr(e, "map", None) is not None and loc is None:
            work.manifest_problems.append((m.id, f"file {e.path} has an unusable block map location"))
        if sources is None:
            if e.object is None:
                continue
            p = work.piece(home, e.object, e.offset, e.length, m.id, e.path, e.size)
            p.digest, p.algo, p.exact, p.file, p.file_size = e.digest, e.algo, True, True, e.size
        if loc is not None:
            if chain is None:
                chain = chain_ids(m, by_id.get)
            work.maps.setdefault((backup_dir(home) + loc[0], loc[1], loc[2]),
                                 MapTask(backup_dir(home) + loc[0], loc[1], loc[2], e, home, m.id, by_id.get, chain,
                                         work.index, cache=work.map_cache))
        elif sources is not None:
            work.manifest_problems.append((m.id, f"{label} has sources but no block map"))


def read_map(storage: Storage, t: MapTask) -> tuple[int, list[tuple[bytes, int, int]]]:
    """Fetch, check and resolve one map (its binding to the manifest, its base chain) into its
    effective map; IntegrityError (or NotFoundError) when it cannot be. Sets t.version."""
    e = t.entry
    what = f"the block map of {e.path} (backup {t.backup}) at offset {t.offset}"
    resolver = Resolver(storage, t.lookup or (lambda _b: None), t.chain or {t.backup, t.home}, None, t.index,
                        t.cache)
    bm = resolver.effective(t.home, e, what)
    t.version = bm.version
    return bm.block_size, list(zip(bm.hashes(), bm.sources(), bm.ordinals(), strict=True))


MapOutcome = tuple[int, list[tuple[bytes, int, int]]] | IntegrityError | NotFoundError


def by_path(tasks: list[MapTask]) -> list[list[MapTask]]:
    """The tasks grouped by the path they map, each group oldest backup first (IDs sort by time): read
    in that order by one thread, each delta finds its base's effective map in the cache."""
    groups: dict[str, list[MapTask]] = {}
    for t in tasks:
        groups.setdefault(t.entry.path, []).append(t)
    return [sorted(g, key=lambda t: (t.home, t.backup)) for g in groups.values()]


def read_maps(storage: Storage, tasks: list[MapTask]) -> list[MapOutcome]:
    """read_map of each task in turn: its result, or why its map cannot be read (any other error ends the run)."""
    out: list[MapOutcome] = []
    for t in tasks:
        try:
            out.append(read_map(storage, t))
        except (IntegrityError, NotFoundError) as e:
            out.append(e)
    return out


def expect_blocks(t: MapTask, bs: int, recs: list[tuple[bytes, int, int]], work: Work) -> str | None:
    """Turn a parsed map into block expectations on the pieces holding the blocks; a problem
    sentence when the map points at a source that holds nothing."""
    e = t.entry
    sources = getattr(e, "sources", None)
    label = f"file {e.path} of backup {t.backup}"
    target: list[Piece | None]
    absent: set[int] = set()  # sources in backups that are not present: reported as a broken chain
    if sources is None:
        if e.object is None:
            return f"{label} has a block map but no object"
        target = [work.piece(t.home, e.object, e.offset, e.length, t.backup, e.path, e.size)]
    else:
        target = []
        for s in sources:
            loc = _loc(s) if isinstance(s, dict) else None
            b = s.get("backup") if isinstance(s, dict) else None
            if isinstance(b, str) and b not in work.known:
                absent.add(len(target))
            if loc is None or not isinstance(b, str) or b not in work.known:
                target.append(None)
                continue
            target.append(work.piece(b, loc[0], loc[1], loc[2], t.backup, e.path, e.size))
    for n, (h, src, ordinal) in enumerate(recs):
        p = target[src]
        if src in absent:
            continue
        if p is None:
            return f"{label}: its block map puts block {n} in source {src}, which holds no readable object"
        why = p.expect_block(bs, ordinal, h, n, label, t.version)
        if why:
            return f"{label}: its envelope {why}"
    return None
