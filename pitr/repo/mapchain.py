"""The effective block map of an entry: fetched, bound to its manifest, resolved over the chain.

A format-2 map may be a delta over the map of the same path in an older backup (`map.base`,
docs/repository-format.md §6.2.1). Resolving it reads the base backup's entry (following its
`ref` once: a ref entry carries its holder's map), resolves that entry's map the same way, and
overlays this one (repo/blockmap.overlay). Each step goes to a strictly older backup of the chain,
so the walk ends within the chain's length at a whole map.

Every map is untrusted: its decoded bytes must have the SHA-256 the entry's `map.sha256` records
(format 2; a format-1 map has none), a base must be an older backup of the chain being read and
hold an entry for the path; anything else is an IntegrityError naming the backup and the path.

A MapCache (optional) keeps the effective maps a Resolver computed, so resolving the maps of one
path over a whole chain, oldest first (verify), reads each map once instead of walking every
delta down to its whole map again.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Collection

from pitr.errors import IntegrityError, NotFoundError
from pitr.repo import blockmap, envelope
from pitr.repo.chain import Lookup, parent_chain
from pitr.repo.format import backup_dir, is_backup_id
from pitr.repo.manifest import FileEntry, Manifest, read_manifest
from pitr.storage.base import Storage


def storage_lookup(storage: Storage, known: Collection[Manifest] = ()) -> Lookup:
    """A thread-safe, caching lookup of manifests by ID (None when a backup has none)."""
    cache: dict[str, Manifest | None] = {m.id: m for m in known}
    lock = threading.Lock()

    def lookup(bid: str) -> Manifest | None:
        with lock:
            if bid in cache:
                return cache[bid]
        try:
            m: Manifest | None = read_manifest(storage, bid)
        except NotFoundError:
            m = None
        with lock:
            cache[bid] = m
        return m

    return lookup


def chain_ids(m: Manifest, lookup: Lookup) -> set[str]:
    """m and its ancestors as far as they can be looked up (repo/chain.py judges whether that is whole),
    and the parent the walk could not look up: a base there is then reported missing, not foreign."""
    chain = parent_chain(m, lookup)
    out = {x.id for x in chain}
    root = chain[0]
    if root.type != "full" and isinstance(root.parent, str):
        out.add(root.parent)
    return out


MAP_CACHE_BYTES = 64 << 20  # a 1 GiB relation segment of 8 KiB blocks has a ~2.9 MiB effective map


class MapCache:
    """Effective maps already resolved, least recently used out first past max_bytes (thread-safe).
    Each is kept with the IDs of the backups its resolution took as members of the chain (bases,
    ref holders): a resolver uses it only when they all are members of its own chain."""

    def __init__(self, max_bytes: int = MAP_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._maps: OrderedDict[tuple[str, int | None, str], tuple[blockmap.BlockMap, frozenset[str]]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(home: str, e: FileEntry, block_size: int | None) -> tuple[str, int | None, str]:
        """What an effective map depends on: where the entry's objects are, and every field resolving reads.
        Not (backup, path, map SHA-256) alone: a hostile manifest can keep those and change the size
        or sources, which change the resolved map; one JSON dump (10-25 µs here) per lookup is the price."""
        return home, block_size, json.dumps([e.path, e.size, e.object, e.offset, e.length, e.map, e.sources],
                                            sort_keys=True, default=repr)

    def get(self, key: tuple[str, int | None, str], chain: Collection[str]
            ) -> tuple[blockmap.BlockMap, frozenset[str]] | None:
        """The map and the chain members it was resolved through, if they all are in chain."""
        with self._lock:
            hit = self._maps.get(key)
            if hit is None or not all(b in chain for b in hit[1]):
                return None
            self._maps.move_to_end(key)
            return hit

    def put(self, key: tuple[str, int | None, str], bmap: blockmap.BlockMap, used: frozenset[str]) -> None:
        size = bmap.records.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._maps.pop(key, None)
            if old is not None:
                self._bytes -= old[0].records.nbytes
            self._maps[key] = (bmap, used)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _k, (gone, _u) = self._maps.popitem(last=False)
                self._bytes -= gone.records.nbytes


class Resolver:
    """Effective maps of the entries of one chain (chain: the IDs a base may be taken from)."""

    def __init__(self, storage: Storage, lookup: Lookup, chain: Collection[str], block_size: int | None = None,
                 index: dict[str, dict[str, FileEntry]] | None = None, cache: MapCache | None = None) -> None:
        self.storage, self.lookup, self.chain, self.block_size = storage, lookup, set(chain), block_size
        self._entries = index if index is not None else {}  # path -> entry, per backup (may be shared)
        self.cache = cache  # shared by resolvers of one run over the same storage and lookup (verify)
        self._lock = threading.Lock()

    def _entry(self, bid: str, path: str) -> FileEntry | None:
        with self._lock:
            by_path = self._entries.get(bid)
        if by_path is None:
            m = self.lookup(bid)
            by_path = {e.path: e for e in m.files} if m is not None else {}
            with self._lock:
                self._entries[bid] = by_path
        return by_path.get(path)

    def raw(self, home: str, e: FileEntry, what: str) -> bytes:
        """The decoded bytes of e's map (in backups/<home>/), checked against `map.sha256` when it has one."""
        loc = e.map
        if not loc:
            raise IntegrityError(f"{what} is missing (the entry has no map)")
        length = int(loc.get("length", 0))
        raw = self.storage.get_range(backup_dir(home) + str(loc["object"]), int(loc.get("offset", 0)), length)
        if len(raw) != length:
            raise IntegrityError(f"{what} is cut short: its object is shorter than the manifest says")
        data = envelope.decode(raw, what, max_size=min(blockmap.max_map_size(e.size, self.block_size or 512), 64 << 20))
        want = loc.get("sha256")
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise IntegrityError(f"{what} does not have the SHA-256 its manifest entry records")
        return data

    def effective(self, home: str, e: FileEntry, what: str | None = None) -> blockmap.BlockMap:
        """The map of entry e (its objects in backups/<home>/: e.ref or its manifest's ID), one record per block.
        Walks down the bases to a whole map, then overlays the deltas back up (a loop, not recursion:
        a chain may be longer than Python's recursion limit)."""
        what = what or f"backup {home}'s block map of {e.path}"
        deltas: list[tuple[blockmap.Delta, FileEntry, str, str]] = []  # newest first
        bmap: blockmap.BlockMap | None = None
        used: frozenset[str] = frozenset()  # the chain members the map below the deltas was resolved through
        while bmap is None:
            hit = self._cached(home, e)
            if hit is not None:
                bmap, used = hit
                break
            data = self.raw(home, e, what)
            nsrc = len(e.sources) if e.sources else 1
            loc = e.map or {}
            if loc.get("sha256") is None:  # format 1: whole maps, no binding (older backups)
                if data[:8] != blockmap.MAGIC_V1:
                    raise IntegrityError(f"{what} is not a format-1 map, yet its entry records no SHA-256 for it")
                bmap = blockmap.parse(data, e.size, nsrc, self.block_size, what)
                self._keep(home, e, bmap, used)
                break
            base = loc.get("base")
            delta = blockmap.parse_delta(data, e.size, nsrc, self.block_size, base is None, what)
            if base is None:
                bmap = delta.as_map()
                blockmap.check_order(bmap.records, what)
                self._keep(home, e, bmap, used)
                break
            deltas.append((delta, e, home, what))
            home, e, what = self._base(base, home, e, what)
        for delta, de, dhome, dwhat in reversed(deltas):
            table = blockmap.translate(blockmap.entry_sources(e, home), blockmap.entry_sources(de, dhome))
            bmap = blockmap.overlay(bmap, table, delta, dwhat)
            used = used | {str((de.map or {}).get("base")), home}  # what _base checked are chain members
            e, home = de, dhome
            self._keep(home, e, bmap, used)
        return bmap

    def _cached(self, home: str, e: FileEntry) -> tuple[blockmap.BlockMap, frozenset[str]] | None:
        return self.cache.get(MapCache.key(home, e, self.block_size), self.chain) if self.cache is not None else None

    def _keep(self, home: str, e: FileEntry, bmap: blockmap.BlockMap, used: frozenset[str]) -> None:
        if self.cache is not None:
            self.cache.put(MapCache.key(home, e, self.block_size), bmap, used)

    def _base(self, base: object, home: str, e: FileEntry, what: str) -> tuple[str, FileEntry, str]:
        """(its home, the entry, its label) of the base a delta names; IntegrityError unless it is an
        older backup of the chain holding an entry for the path (each step goes strictly back)."""
        if not is_backup_id(base) or not isinstance(base, str) or base >= home or base not in self.chain:
            raise IntegrityError(f"{what} builds on backup {base!r}, which is not an older backup of its chain",
                                 "run `pitr verify`; restore another backup with --backup")
        be = self._entry(base, e.path)
        if be is None:
            gone = "is missing" if self.lookup(base) is None else f"has no entry for {e.path}"
            raise IntegrityError(f"{what} builds on backup {base}, which {gone}",
                                 "run `pitr verify`; restore another backup with --backup")
        bhome = be.ref or base
        if bhome != base and (bhome >= base or bhome not in self.chain):
            raise IntegrityError(f"{what} builds on backup {base}, whose entry for {e.path} refers outside the chain")
        return bhome, be, f"backup {bhome}'s block map of {e.path}"
