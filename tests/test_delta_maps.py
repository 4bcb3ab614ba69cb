"""Block map format 2 without PostgreSQL: delta maps over a chain of real files (full -> incr -> incr ->
diff) restored byte for byte, hostile deltas refused, an older chain with format-1 maps still restored
and built on, the stored size of an incremental at 1 % changed blocks, and verify on delta chains."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from pathlib import Path

import blake3
import numpy as np
import pytest

from pitr.errors import IntegrityError
from pitr.ops.proof.verify import VerifyOptions, verify
from pitr.repo import blockmap, envelope
from pitr.repo.format import BLAKE3_MANIFEST_FORMAT, MAP2_MANIFEST_FORMAT, META_KEY
from pitr.repo.manifest import FileEntry, Manifest, write_manifest
from pitr.repo.mapchain import MapCache
from pitr.repo.meta import new_meta
from pitr.storage.memory import MemoryStorage
from tests.support.envelope_v1 import encode_v1
from tests.test_incr_blocks import BS, Chain

REL = "base/5/16384"


def entry(m: Manifest, path: str = REL) -> FileEntry:
    return next(e for e in m.files if e.path == path)


def map_bytes(c: Chain, m: Manifest, path: str = REL) -> bytes:
    e = entry(m, path)
    assert e.map is not None
    home = e.ref or m.id
    raw = c.storage.get_range(f"backups/{home}/{e.map['object']}", e.map["offset"], e.map["length"])
    return envelope.decode(raw, "map")


def restored(c: Chain, m: Manifest, dest: Path) -> None:
    c.restore(m, dest)
    c.same(dest)


def test_delta_chain_full_incr_incr_diff_restores_byte_for_byte(tmp_path: Path) -> None:
    c = Chain(tmp_path)
    c.write(REL, os.urandom(40 * BS))
    c.write("base/5/16385", os.urandom(30 * BS))
    c.write("base/5/16386", os.urandom(12 * BS))
    full = c.backup()
    # an older pitr refuses it rather than misread its maps (4) or its files' BLAKE3 digests (5)
    assert full.format == BLAKE3_MANIFEST_FORMAT > MAP2_MANIFEST_FORMAT
    assert all(e.blake3 and not e.sha256 for e in full.files)
    fm = entry(full).map
    assert fm and "base" not in fm and fm["sha256"] == hashlib.sha256(map_bytes(c, full)).hexdigest()
    assert map_bytes(c, full)[:8] == b"PITRBM2\0"
    restored(c, full, tmp_path / "r0")

    c.patch(REL, 3, os.urandom(BS))
    with open(tmp_path / "src" / "base/5/16385", "ab") as f:
        f.write(os.urandom(4 * BS))  # grew: its new blocks must be in the delta
    c.patch("base/5/16385", 7, os.urandom(BS))
    c.write("base/5/16390", os.urandom(9 * BS))  # appeared
    i1 = c.backup()
    e1 = entry(i1)
    assert e1.sha256 == e1.blake3 == "" and e1.map and e1.map["base"] == full.id
    d = blockmap.parse_delta(map_bytes(c, i1), e1.size, len(e1.sources or []), BS, False)
    assert d.records["block"].tolist() == [3]  # only the changed block: not the file's 40
    g = entry(i1, "base/5/16385")
    assert blockmap.parse_delta(map_bytes(c, i1, g.path), g.size, 2, BS, False).records["block"].tolist() == \
        [7, 30, 31, 32, 33]
    assert entry(i1, "base/5/16390").sources is None  # new: stored whole, with a whole map
    restored(c, i1, tmp_path / "r1")

    with open(tmp_path / "src" / REL, "r+b") as f:
        f.truncate(20 * BS)  # shrank: the effective map is cut to the new count
    c.patch(REL, 10, os.urandom(BS))
    c.patch("base/5/16385", 31, os.urandom(BS))  # a block new in i1, changed again
    i2 = c.backup()
    e2 = entry(i2)
    assert e2.map and e2.map["base"] == i1.id and e2.size == 20 * BS
    assert [s["backup"] for s in e2.sources or []] == [i2.id, i1.id, full.id]
    restored(c, i2, tmp_path / "r2")

    c.patch(REL, 0, os.urandom(BS))
    dif = c.backup(diff=True)  # on the full: its map is a delta over the full's
    assert dif.type == "diff" and dif.parent == full.id and entry(dif).map["base"] == full.id  # type: ignore[index]
    restored(c, dif, tmp_path / "r3")
    # the middle of the chain is untouched by what came after
    r1b = tmp_path / "r1b"
    c.restore(i1, r1b)
    assert (r1b / "base/5/16390").read_bytes() == (tmp_path / "r1" / "base/5/16390").read_bytes()
    assert (r1b / REL).read_bytes() == (tmp_path / "r1" / REL).read_bytes()


def _chain(tmp_path: Path, grow: bool = False) -> tuple[Chain, Manifest, Manifest]:
    c = Chain(tmp_path, envelope.Codec("none", 0))
    c.write(REL, os.urandom(16 * BS))
    c.write("base/5/16385", os.urandom(10 * BS), mtime=time.time() - 3600)
    full = c.backup()
    c.patch(REL, 2, os.urandom(BS))
    c.patch(REL, 9, os.urandom(BS))
    if grow:
        with open(tmp_path / "src" / REL, "ab") as f:
            f.write(os.urandom(2 * BS))
    return c, full, c.backup()


def _replace_map(c: Chain, m: Manifest, data: bytes, sha: str | None = None, **extra: object) -> Manifest:
    """m with REL's map replaced by data (in a new object of m's directory), bound by sha (default: right)."""
    env = envelope.encode(data, envelope.Codec("none", 0))
    c.storage.put(f"backups/{m.id}/data/009999", env)
    e = entry(m)
    assert e.map is not None
    e.map = {**e.map, "object": "data/009999", "offset": 0, "length": len(env),
             "sha256": sha or hashlib.sha256(data).hexdigest(), **extra}
    write_manifest(c.storage, m)
    return Manifest.from_json(m.to_json())


def _records(data: bytes) -> tuple[bytes, list[tuple[int, bytes, int, int]]]:
    n = struct.unpack_from("<I", data, 16)[0]
    return data[:20], [blockmap.RECORD.unpack_from(data, 20 + i * blockmap.RECORD.size) for i in range(n)]


def _pack(header: bytes, recs: list[tuple[int, bytes, int, int]]) -> bytes:
    return header[:16] + struct.pack("<I", len(recs)) + b"".join(blockmap.RECORD.pack(*r) for r in recs)


def _refused(c: Chain, m: Manifest, dest: Path, why: str) -> None:
    with pytest.raises(IntegrityError, match=why):
        c.restore(m, dest)
    assert not (dest / REL).exists() or (dest / REL).read_bytes() != (c.root / "src" / REL).read_bytes()


def test_a_delta_out_of_order_is_refused(tmp_path: Path) -> None:
    c, _full, i1 = _chain(tmp_path)
    head, recs = _records(map_bytes(c, i1))
    assert [r[0] for r in recs] == [2, 9]
    _refused(c, _replace_map(c, i1, _pack(head, recs[::-1])), tmp_path / "r", "out of order")


def test_a_delta_missing_a_block_past_its_base_is_refused(tmp_path: Path) -> None:
    c, _full, i1 = _chain(tmp_path, grow=True)
    head, recs = _records(map_bytes(c, i1))
    assert [r[0] for r in recs] == [2, 9, 16, 17]
    _refused(c, _replace_map(c, i1, _pack(head, recs[:-1])), tmp_path / "r", "does not list block 17")


def test_a_delta_whose_base_is_not_in_the_chain_is_refused(tmp_path: Path) -> None:
    c, _full, i1 = _chain(tmp_path)
    data = map_bytes(c, i1)
    _refused(c, _replace_map(c, i1, data, base="20251231T000000F"), tmp_path / "r", "not an older backup of its chain")
    c2, _f, i1b = _chain(tmp_path / "b")
    write_manifest(c2.storage, Manifest.from_json(i1b.to_json()))
    e = entry(i1b)
    assert e.map is not None
    e.map["base"] = i1b.id  # itself: not older
    with pytest.raises(IntegrityError, match="base"):
        Manifest.from_json(i1b.to_json())


def test_a_map_that_does_not_match_its_manifest_is_refused(tmp_path: Path) -> None:
    c, _full, i1 = _chain(tmp_path)
    _refused(c, _replace_map(c, i1, map_bytes(c, i1), sha="0" * 64), tmp_path / "r", "SHA-256 its manifest")


def test_a_flipped_block_in_a_parent_source_is_refused(tmp_path: Path) -> None:
    """Block 5 of REL was not changed in i1: it is read from the full's envelope; flipping a byte
    there fails the incremental's restore on that block's BLAKE3, and verify reports the envelope."""
    c, full, i1 = _chain(tmp_path)
    fe = entry(full)
    key = f"backups/{full.id}/{fe.object}"
    assert isinstance(c.storage, MemoryStorage)
    body, t = c.storage.objects[key]
    at = fe.offset + envelope.HEADER_SIZE + 5 * BS + 100
    c.storage.objects[key] = (body[:at] + bytes([body[at] ^ 1]) + body[at + 1:], t)
    _refused(c, i1, tmp_path / "r", "block 5 .*does not match its block map's hash")
    c.storage.put(META_KEY, new_meta(1, 15, 16 << 20).to_json())
    res = verify(c.storage, VerifyOptions(i1.id))  # the envelope it is read from fails its own check
    assert {(p.kind, p.object) for p in res.problems if p.object.startswith("backups/")} == {("corrupt", key)}


def test_verify_checks_the_effective_maps_of_a_delta_chain(tmp_path: Path) -> None:
    c, _full, i1 = _chain(tmp_path, grow=True)
    c.patch(REL, 17, os.urandom(BS))
    i2 = c.backup()
    c.storage.put(META_KEY, new_meta(1, 15, 16 << 20).to_json())
    res = verify(c.storage, VerifyOptions())
    assert not [p for p in res.problems if p.object.startswith("backups/")], res.problems
    _replace_map(c, i2, map_bytes(c, i2), sha="1" * 64)
    res = verify(c.storage, VerifyOptions())
    probs = [p for p in res.problems if p.object.startswith("backups/")]
    assert [p.kind for p in probs] == ["block-map"] and "SHA-256 its manifest" in probs[0].detail, probs


class CountingStorage(MemoryStorage):
    """Memory storage that records every ranged read (verify reads block maps that way)."""

    def __init__(self) -> None:
        super().__init__()
        self.ranges: list[tuple[str, int]] = []

    def get_range(self, key: str, start: int, length: int | None = None) -> bytes:
        self.ranges.append((key, start))
        return super().get_range(key, start, length)


@pytest.mark.parametrize("depth", [4, 7])
def test_verify_reads_each_map_of_a_chain_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int) -> None:
    """Each delta of REL builds on the one before; verify resolves them all, reading each map once
    (it used to resolve every map down to the full anew: depth * (depth + 1) / 2 reads)."""
    monkeypatch.setattr("tests.test_incr_blocks.IDS", tuple(f"202601{d:02d}T000000F" for d in range(1, 10)))
    storage = CountingStorage()
    c = Chain(tmp_path, envelope.Codec("none", 0), storage)
    c.write(REL, os.urandom(16 * BS))
    c.write("base/5/16385", os.urandom(10 * BS), mtime=time.time() - 3600)
    ms = [c.backup()]
    for k in range(1, depth):
        c.patch(REL, k, os.urandom(BS))
        ms.append(c.backup())
    assert [entry(m).map["base"] for m in ms[1:]] == [m.id for m in ms[:-1]]  # type: ignore[index]
    maps = {(f"backups/{m.id}/{entry(m).map['object']}", entry(m).map["offset"]) for m in ms}  # type: ignore[index]
    assert len(maps) == depth
    c.storage.put(META_KEY, new_meta(1, 15, 16 << 20).to_json())
    storage.ranges.clear()
    res = verify(c.storage, VerifyOptions(jobs=3))
    assert not [p for p in res.problems if p.object.startswith("backups/")], res.problems
    assert sorted(r for r in storage.ranges if r in maps) == sorted(maps)


def test_the_map_cache_is_bounded_and_used_only_within_its_chain() -> None:
    def bmap() -> blockmap.BlockMap:
        return blockmap.BlockMap(BS, np.zeros(10, dtype=[("hash", "S16"), ("source", "<u2"), ("ordinal", "<u4")]))

    cache = MapCache(max_bytes=3 * bmap().records.nbytes)
    for k in range(5):
        cache.put(("B", None, str(k)), bmap(), frozenset({"A"}))
    assert [k for k in range(5) if cache.get(("B", None, str(k)), {"A", "B"})] == [2, 3, 4]  # the oldest out
    assert cache.get(("B", None, "4"), {"B"}) is None  # resolved through A, which this chain does not have
    cache.put(("C", None, "big"), blockmap.BlockMap(BS, np.zeros(40, dtype=bmap().records.dtype)), frozenset())
    assert cache.get(("C", None, "big"), {"C"}) is None  # larger than the whole budget: not kept


# --------------------------------------------------------------------------- an older chain (format 1)

def _as_format_1(c: Chain, m: Manifest) -> Manifest:
    """m (a full backup) rewritten as a pitr before format 2 wrote it: version-1 envelopes (SHA-256)
    under `sha256` entries, whole blake2b maps with no SHA-256, format 1."""
    written = [o.key for o in c.storage.list(f"backups/{m.id}/data/")]
    for e in m.files:
        if e.object is not None:
            env = c.storage.get_range(f"backups/{m.id}/{e.object}", e.offset, e.length)
            raw = envelope.decode(env, max_size=e.size)
            env = encode_v1(raw, c.codec.name, c.codec.level)
            key = f"data/{700000 + len(list(c.storage.list(f'backups/{m.id}/data/'))):06d}"  # after the 000NNN
            c.storage.put(f"backups/{m.id}/{key}", env)
            e.object, e.offset, e.length = key, 0, len(env)
            e.sha256, e.blake3 = hashlib.sha256(raw).hexdigest(), ""
        if e.map is None:
            continue
        data = (c.root / "src" / e.path).read_bytes()  # unchanged since m was taken (callers see to it)
        recs = b"".join(blockmap.RECORD_V1.pack(blockmap.block_hash_v1(data[b * BS:(b + 1) * BS]), 0, b)
                        for b in range(len(data) // BS))
        old = blockmap.HEADER_V1.pack(blockmap.MAGIC_V1, BS, len(data) // BS) + recs
        env = encode_v1(old, c.codec.name, c.codec.level)
        key = f"data/{800000 + len(list(c.storage.list(f'backups/{m.id}/data/'))):06d}"
        c.storage.put(f"backups/{m.id}/{key}", env)
        e.map = {"object": key, "offset": 0, "length": len(env)}
    for key in written:  # every entry and map now lives in the rewritten objects
        c.storage.delete(key)
    m.format = 1
    write_manifest(c.storage, m)
    out = Manifest.from_json(m.to_json())
    c.manifests[c.manifests.index(m)] = out
    return out


def test_an_older_format_1_chain_restores_and_a_new_incr_builds_on_it(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    c = Chain(tmp_path)
    c.write(REL, os.urandom(30 * BS))
    c.write("base/5/16385", os.urandom(10 * BS), mtime=time.time() - 3600)  # unchanged since: referenced
    old_full = _as_format_1(c, c.backup())
    assert map_bytes(c, old_full)[:8] == b"PITRBM1\0"
    assert old_full.format == 1 and all(e.sha256 and not e.blake3 for e in old_full.files)
    restored(c, old_full, tmp_path / "r0")
    c.patch(REL, 4, os.urandom(BS))
    with caplog.at_level(logging.INFO, logger="pitr.backup"):
        inc = c.backup()  # the parent's maps are format 1 (blake2b): the changed file is stored whole
    assert f"block map of {REL} is of format 1 (blake2b); copying the file whole" in caplog.text
    e = entry(inc)
    assert e.sources is None and e.sha256 == ""
    assert e.blake3 == blake3.blake3((tmp_path / "src" / REL).read_bytes()).hexdigest()
    assert e.map and map_bytes(c, inc)[:8] == b"PITRBM2\0"
    # a mixed chain: the unchanged file is the old full's (v1, sha256 entry), the changed one v2
    assert entry(inc, "base/5/16385").ref == old_full.id and entry(inc, "base/5/16385").sha256
    assert inc.format == BLAKE3_MANIFEST_FORMAT
    restored(c, inc, tmp_path / "r1")
    c.storage.put(META_KEY, new_meta(1, 15, 16 << 20).to_json())
    assert [p for p in verify(c.storage, VerifyOptions()).problems if p.object.startswith("backups/")] == []
    c.patch(REL, 8, os.urandom(BS))
    inc2 = c.backup()  # and the next one is a delta again
    assert entry(inc2).map["base"] == inc.id  # type: ignore[index]
    restored(c, inc2, tmp_path / "r2")


# --------------------------------------------------------------------------- what an incremental stores

def _page(i: int) -> bytes:
    """An 8 KiB block that compresses about as well as pgbench's data (~20x with zstd: scale 50,
    770 MiB, is a 41 MiB full backup), so a whole map (22-26 bytes a block) is ~5 % of a full."""
    return os.urandom(400) + bytes(BS - 400 - 4) + i.to_bytes(4, "little")


def test_an_incr_of_one_percent_changed_blocks_stores_under_five_percent_of_a_full(tmp_path: Path) -> None:
    c = Chain(tmp_path, envelope.Codec("zstd", 3))
    files = {f"base/5/{16384 + k}": 400 for k in range(4)}
    for rel, n in files.items():
        c.write(rel, b"".join(_page(i) for i in range(n)))
    full = c.backup()
    for rel, n in files.items():
        for b in range(0, n, 100):  # 1 % of the blocks
            c.patch(rel, b + 7, _page(b))
    inc = c.backup()
    full_maps = sum(e.map["length"] for e in full.files if e.map)
    inc_maps = sum(e.map["length"] for e in inc.files if e.map)
    assert inc_maps < full_maps * 0.05, (inc_maps, full_maps)  # the maps store what changed, not every block
    assert inc.stored_bytes < full.stored_bytes * 0.05, (inc.stored_bytes, full.stored_bytes)
    restored(c, inc, tmp_path / "r")


def test_a_delta_over_a_parent_entry_that_is_a_ref(tmp_path: Path) -> None:
    """base/5/16385 was referenced whole by i1 (from the full): i2's delta names i1, whose entry is
    resolved through its ref to the full's map."""
    c, full, i1 = _chain(tmp_path)
    assert entry(i1, "base/5/16385").ref == full.id
    c.patch("base/5/16385", 4, os.urandom(BS))
    i2 = c.backup()
    e = entry(i2, "base/5/16385")
    assert e.map and e.map["base"] == i1.id and [s["backup"] for s in e.sources or []] == [i2.id, full.id]
    restored(c, i2, tmp_path / "r")
