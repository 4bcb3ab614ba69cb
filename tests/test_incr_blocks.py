"""Block-incremental backups without PostgreSQL: block maps, the manifest's new fields refused
when hostile, and a full -> incr -> incr chain of real files through the backup Pipeline and back
through the restore file pipeline, byte for byte."""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from pitr.errors import IntegrityError
from pitr.ops.base.backup_files import SourceFile
from pitr.ops.base.backup_incr import Base, BlockJobs, Parent, annotate, plan_files
from pitr.ops.base.backup_store import Pipeline, StoreOptions
from pitr.ops.recovery.restore_files import Item, write_files
from pitr.repo import blockmap, envelope
from pitr.repo.format import MAX_MANIFEST_FORMAT, is_backup_id
from pitr.repo.manifest import Manifest, write_manifest
from pitr.storage.base import Storage
from pitr.storage.memory import MemoryStorage
from pitr.storage.s3 import S3Storage

BS = 8192
IDS = ("20260101T000000F", "20260102T000000F", "20260103T000000F", "20260104T000000F")


# --------------------------------------------------------------------------- block maps

def _map(records: list[tuple[int, int]], bs: int = BS) -> bytes:
    b = blockmap.Builder(bs)
    for n, (s, o) in enumerate(records):
        b.add(n, bytes(16), s, o)
    return b.pack(len(records))


def test_block_map_round_trip_and_hash_bytes_kept() -> None:
    hashes = [blockmap.block_hash(bytes([i]) * BS) for i in range(10)] + [b"\x01" + bytes(15)]
    m = blockmap.parse(blockmap.whole_file(hashes, BS), 11 * BS, 1, BS)
    assert m.count == 11 and m.hashes() == hashes  # a hash ending in NUL bytes comes back whole
    assert m.sources() == [0] * 11 and m.ordinals() == list(range(11))


@pytest.mark.parametrize("data, size, sources, why", [
    (_map([(0, 0), (0, 1)]), 3 * BS, 1, "covers 2 blocks"),
    (_map([(0, 0), (1, 0)]), 2 * BS, 1, "names source 1"),
    (_map([(0, 1), (0, 1)]), 2 * BS, 1, "out of order"),
    (_map([(1, 5), (0, 0), (1, 4)]), 3 * BS, 2, "out of order"),
    (_map([(0, 0)])[:-1], BS, 1, "bytes of records"),
    (b"PITRBM9\0" + _map([(0, 0)])[8:], BS, 1, "bad magic"),
    (_map([(0, 0)], bs=1000), 1000, 1, "block size"),
    (b"PITR", 0, 1, "truncated"),
])
def test_hostile_block_maps_are_refused(data: bytes, size: int, sources: int, why: str) -> None:
    with pytest.raises(IntegrityError, match=why):
        blockmap.parse(data, size, sources)


def test_eligible_files_are_relation_files_of_whole_blocks() -> None:
    assert blockmap.eligible("base/5/16384", 8 * BS, BS)
    assert blockmap.eligible("base/5/16384.1", 100 * BS, BS)
    assert blockmap.eligible("global/1262", 8 * BS, BS)
    assert blockmap.eligible("pg_tblspc/16400/PG_15_202209061/5/16401", 8 * BS, BS)
    assert not blockmap.eligible("base/5/16384", 7 * BS, BS)  # too small
    assert not blockmap.eligible("base/5/16384", 8 * BS + 1, BS)  # not whole blocks
    assert not blockmap.eligible("base/5/16384_fsm", 8 * BS, BS)
    assert not blockmap.eligible("pg_xact/0000", 8 * BS, BS)
    assert not blockmap.eligible("base/5/sub/16384", 8 * BS, BS)


def test_backup_ids() -> None:
    assert is_backup_id("20261125T221530F") and is_backup_id("20261125T221530F-2")
    for bad in ("../x", "20261125T221530F/..", "20261125T221530", "", None, "20261125T221530F-0"):
        assert not is_backup_id(bad)


# --------------------------------------------------------------------------- hostile manifests

def _incr_manifest(**entry: object) -> dict:  # type: ignore[type-arg]
    e = {"path": "base/5/16384", "size": 16 * BS, "sha256": "0" * 64, "mode": 0o600, "mtime": 0.0,
         "object": "data/000001", "offset": 0, "length": 100,
         "map": {"object": "data/000001", "offset": 100, "length": 50},
         "sources": [{"backup": IDS[1], "object": "data/000001", "offset": 0, "length": 100, "kind": "blocks"},
                     {"backup": IDS[0], "object": "data/000000", "offset": 0, "length": 900, "kind": "file"}]}
    e.update(entry)
    return {"id": IDS[1], "type": "incr", "parent": IDS[0], "format": 3, "system_identifier": "1", "pg_version": 15,
            "pg_version_num": 150000, "wal_segment_size": 16 << 20, "timeline": 1, "start_lsn": "0/1",
            "stop_lsn": "0/2", "start_wal": "0" * 24, "stop_wal": "0" * 24, "start_time": "x", "stop_time": "x",
            "compress": "zstd:3", "backup_label": "", "tablespace_map": None, "checksums_enabled": True,
            "files": [e], "directories": []}


def _load(d: dict) -> Manifest:  # type: ignore[type-arg]
    return Manifest.from_json(json.dumps(d).encode())


def test_a_sound_incr_manifest_is_read() -> None:
    m = _load(_incr_manifest())
    assert m.format == 3 and m.parent == IDS[0] and m.files[0].sources and len(m.files[0].sources) == 2
    assert _load(_incr_manifest(ref=IDS[0], sources=None, map=None)).files[0].ref == IDS[0]


@pytest.mark.parametrize("change, why", [
    ({"ref": "../../etc"}, "not the ID of an older backup"),
    ({"ref": IDS[2]}, "not the ID of an older backup"),  # a later backup cannot be built on
    ({"map": {"object": "../x", "offset": 0, "length": 1}}, "block map location"),
    ({"map": {"object": "data/1", "offset": -1, "length": 1}}, "block map location"),
    ({"map": None}, "no block map"),
    ({"sources": []}, "not a non-empty list"),
    ({"sources": "x"}, "not a non-empty list"),
    ({"sources": [{"backup": "../..", "object": "data/000001", "offset": 0, "length": 100, "kind": "blocks"}]},
     "naming the backup"),
    ({"sources": [{"backup": IDS[1], "object": "data//1", "offset": 0, "length": 100, "kind": "blocks"}]},
     "not a relative key"),
    ({"sources": [{"backup": IDS[1], "object": "data/000001", "offset": 0, "length": 100, "kind": "odd"}]},
     "unknown kind"),
    ({"sources": [{"backup": IDS[1], "object": "data/000001", "offset": 0, "length": 99, "kind": "blocks"}]},
     "does not match its object"),
    ({"sources": [{"backup": IDS[0], "object": "data/000001", "offset": 0, "length": 100, "kind": "blocks"}]},
     "not its own changed blocks"),
    ({"sources": [{"backup": IDS[1], "object": "data/000001", "offset": 0, "length": 100, "kind": "blocks"},
                  {"backup": IDS[2], "object": "data/0", "offset": 0, "length": 1, "kind": "file"}]},
     "naming the backup"),
])
def test_hostile_incr_entries_are_refused(change: dict, why: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(IntegrityError, match=why):
        _load(_incr_manifest(**change))


def test_hostile_parent_and_newer_format_are_refused() -> None:
    d = _incr_manifest()
    d["parent"] = "../x"
    with pytest.raises(IntegrityError, match="parent"):
        _load(d)
    d = _incr_manifest()
    d["format"] = MAX_MANIFEST_FORMAT + 1
    with pytest.raises(IntegrityError, match=f"uses format {MAX_MANIFEST_FORMAT + 1}; this pitr reads up to 5"):
        _load(d)


# --------------------------------------------------------------------------- a chain, end to end

class Chain:
    """Real files in a directory, backed up through the Pipeline into a MemoryStorage."""

    def __init__(self, root: Path, codec: envelope.Codec = envelope.Codec("zstd", 1),
                 storage: Storage | None = None) -> None:
        self.root = root
        self.codec = codec
        self.storage: Storage = storage or MemoryStorage()
        self.manifests: list[Manifest] = []

    def write(self, rel: str, data: bytes, mtime: float | None = None) -> None:
        p = self.root / "src" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if mtime is not None:
            os.utime(p, (mtime, mtime))

    def patch(self, rel: str, block: int, data: bytes) -> None:
        with open(self.root / "src" / rel, "r+b") as f:
            f.seek(block * BS)
            f.write(data)

    def scan(self) -> list[SourceFile]:
        out = []
        for p in sorted((self.root / "src").rglob("*")):
            if p.is_file():
                st = p.stat()
                out.append(SourceFile(str(p.relative_to(self.root / "src")), str(p), st.st_size, False, 0,
                                      st.st_mtime, st.st_mode & 0o7777))
        return out

    def backup(self, checksum: bool = False, diff: bool = False) -> Manifest:
        """An incr on the newest backup (a full one first); diff: on the first (full) backup."""
        bid = IDS[len(self.manifests)]
        parent = None
        if self.manifests:
            pm = self.manifests[0] if diff else self.manifests[-1]
            chain = [m.id for m in self.manifests if m.id <= pm.id and (not diff or m.id == pm.id)]
            parent = Parent(pm, chain, {e.path: e for e in pm.files}, {m.id: m for m in self.manifests})
        read, refs, _ = plan_files(self.scan(), parent, checksum)
        pipe = Pipeline(self.storage, StoreOptions(bid, self.codec, 2, large_file=200 * BS),
                        block_jobs=BlockJobs(self.storage, bid, BS, parent))
        pipe.run(read)
        files = sorted(pipe.result.entries + refs, key=lambda e: e.path)
        now = time.time()
        iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now))
        m = Manifest(id=bid, type="incr" if parent else "full", system_identifier=1, pg_version=15,
                     pg_version_num=150000, wal_segment_size=16 << 20, timeline=1, start_lsn="0/1", stop_lsn="0/2",
                     start_wal="0" * 24, stop_wal="0" * 24, start_time=iso, stop_time=iso, compress="zstd:1",
                     backup_label="", tablespace_map=None, checksums_enabled=False, files=files, directories=[],
                     stored_bytes=pipe.result.stored_bytes)
        annotate(m, Base(("diff" if diff else "incr") if parent else "full", "incr", parent))
        write_manifest(self.storage, m)
        m = Manifest.from_json(m.to_json())  # what a restore reads back, validated
        self.manifests.append(m)
        return m

    def restore(self, m: Manifest, dest: Path, delta: bool = False) -> dict[str, int]:
        dest.mkdir(parents=True, exist_ok=True)
        items = []
        for e in m.files:
            (dest / e.path).parent.mkdir(parents=True, exist_ok=True)
            items.append(Item(e, dest / e.path))
        st = write_files(self.storage, m, items, 2, None, delta)
        return {"written": st.files_written, "kept": st.files_kept}

    def same(self, dest: Path) -> None:
        for p in (self.root / "src").rglob("*"):
            if p.is_file():
                q = dest / p.relative_to(self.root / "src")
                assert hashlib.sha256(q.read_bytes()).digest() == hashlib.sha256(p.read_bytes()).digest(), p


@pytest.fixture(params=["memory", "encrypted", "s3"])
def store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Storage:
    """In memory, encrypted (sealed objects: ranged reads inside them), and on a moto S3 server."""
    if request.param == "memory":
        return MemoryStorage()
    if request.param == "encrypted":
        from pitr.ops.admin.init import init_repo
        from pitr.pg.conn import ServerInfo
        from pitr.repo import keys
        from pitr.repo.sealed import RepoStorage
        from pitr.storage.fs import FsStorage

        src = keys.passphrase_source("pw", "PITR_ENCRYPTION_PASSPHRASE")
        repo = RepoStorage(FsStorage(tmp_path / "repo"), src)
        assert init_repo(repo, ServerInfo(150010, 1, 16 << 20, "/data", False), encrypt=True).encrypted
        return repo
    moto = request.getfixturevalue("moto_server")
    for k, v in moto.env().items():
        monkeypatch.setenv(k, v)
    return S3Storage(request.getfixturevalue("s3_bucket"), "prod", endpoint=moto.endpoint)


def test_full_incr_incr_restores_every_backup_of_the_chain(tmp_path: Path, store: Storage) -> None:
    c = Chain(tmp_path, storage=store)
    old = time.time() - 3600
    small = os.urandom(40 * BS)  # bundled
    big = os.urandom(300 * BS)  # its own streamed object
    c.write("base/5/16384", small)
    c.write("base/5/16385", big)
    c.write("base/5/16386", os.urandom(20 * BS), mtime=old)  # never changes: referenced whole
    c.write("base/5/PG_VERSION", b"15\n")
    c.write("global/pg_control", os.urandom(BS))
    full = c.backup()
    maps = {e.path: e.map for e in full.files}
    assert maps["base/5/16384"] and maps["base/5/16385"] and maps["base/5/16386"]
    assert maps["base/5/PG_VERSION"] is None and maps["global/pg_control"] is None

    c.patch("base/5/16384", 3, os.urandom(BS))
    c.patch("base/5/16385", 0, os.urandom(BS))
    c.patch("base/5/16385", 150, os.urandom(2 * BS))
    with open(tmp_path / "src/base/5/16385", "ab") as f:
        f.write(os.urandom(5 * BS))  # grew
    c.write("base/5/16390", os.urandom(10 * BS))  # new
    i1 = c.backup()
    e = {x.path: x for x in i1.files}
    assert e["base/5/16386"].ref == IDS[0] and e["base/5/16386"].object == full.files[2].object
    assert e["base/5/16384"].sources and len(e["base/5/16384"].sources) == 2
    assert e["base/5/16385"].sources and e["base/5/16385"].sources[1]["kind"] == "file"
    assert e["base/5/16390"].sources is None and e["base/5/16390"].map  # new: stored whole, with a map
    assert i1.stored_bytes < full.stored_bytes / 5, (i1.stored_bytes, full.stored_bytes)
    r1 = tmp_path / "r1"
    c.restore(i1, r1)
    c.same(r1)
    state_i1 = tmp_path / "state-i1"
    shutil.copytree(tmp_path / "src", state_i1)

    c.patch("base/5/16385", 150, os.urandom(BS))  # overrides a block of i1
    c.patch("base/5/16385", 302, os.urandom(BS))  # a block new in i1, changed again
    with open(tmp_path / "src/base/5/16384", "r+b") as f:
        f.truncate(20 * BS)  # shrank
    i2 = c.backup()
    e2 = {x.path: x for x in i2.files}
    kinds = [(s["backup"], s["kind"]) for s in e2["base/5/16385"].sources or []]
    assert kinds == [(IDS[2], "blocks"), (IDS[1], "blocks"), (IDS[0], "file")]
    assert e2["base/5/16386"].ref == IDS[0]  # a ref of a ref names the backup that holds the object
    r2 = tmp_path / "r2"
    c.restore(i2, r2)
    c.same(r2)

    # an older restore brought up to date with --delta: unchanged files are kept, the rest assembled
    out = c.restore(i2, r1, delta=True)
    assert out["kept"] >= 3 and out["written"] >= 2, out
    c.same(r1)
    # the middle of the chain still restores as it was
    r3 = tmp_path / "r3"
    c.restore(i1, r3)
    for p in state_i1.rglob("*"):
        if p.is_file():
            assert (r3 / p.relative_to(state_i1)).read_bytes() == p.read_bytes()


def test_checksum_and_mtime_going_backwards_read_every_file(tmp_path: Path) -> None:
    c = Chain(tmp_path)
    old = time.time() - 3600
    c.write("base/5/16384", os.urandom(10 * BS), mtime=old)
    c.write("base/5/16385", os.urandom(10 * BS), mtime=old)
    c.backup()
    files = c.scan()
    parent = Parent(c.manifests[0], [IDS[0]], {e.path: e for e in c.manifests[0].files})
    read, refs, why = plan_files(files, parent)
    assert not read and len(refs) == 2 and why is None
    read, refs, why = plan_files(files, parent, checksum=True)
    assert len(read) == 2 and not refs and why == "--checksum"
    os.utime(tmp_path / "src/base/5/16385", (old - 100, old - 100))  # a clock that went backwards
    read, refs, why = plan_files(c.scan(), parent)
    assert len(read) == 2 and not refs and why and "went backwards" in why
    # a file written just before the parent started (inside the mtime granularity window) is read
    recent = c.manifests[0].start_time
    t = calendar.timegm(time.strptime(recent[:19], "%Y-%m-%dT%H:%M:%S")) - 1
    os.utime(tmp_path / "src/base/5/16385", (t, t))
    os.utime(tmp_path / "src/base/5/16384", (old, old))
    parent.entries["base/5/16385"].mtime = t
    read, refs, _ = plan_files(c.scan(), parent)
    assert [f.rel for f in read] == ["base/5/16385"] and [r.path for r in refs] == ["base/5/16384"]


def test_a_damaged_block_fails_the_assembled_check(tmp_path: Path) -> None:
    """Sources are not hashed on their own: each assembled block's hash against the effective map catches it."""
    c = Chain(tmp_path, envelope.Codec("none", 0))
    c.write("base/5/16384", os.urandom(40 * BS))
    c.backup()
    c.patch("base/5/16384", 7, os.urandom(BS))
    i1 = c.backup()
    e = next(x for x in i1.files if x.path == "base/5/16384")
    assert e.sources and e.object
    key = f"backups/{IDS[1]}/{e.object}"
    assert isinstance(c.storage, MemoryStorage)
    body, t = c.storage.objects[key]
    at = e.offset + envelope.HEADER_SIZE + 100  # inside the one changed block, uncompressed
    c.storage.objects[key] = (body[:at] + bytes([body[at] ^ 1]) + body[at + 1:], t)
    with pytest.raises(IntegrityError, match="block 7 .*does not match its block map's hash"):
        c.restore(i1, tmp_path / "r")


def test_runs_group_consecutive_blocks_of_one_source() -> None:
    import numpy as np

    from pitr.ops.recovery.restore_assemble import runs

    src = np.array([1, 1, 1, 0, 1, 1], dtype="<u2")
    ordv = np.array([0, 1, 2, 0, 4, 5], dtype="<u4")
    assert list(runs(src, ordv, limit=2)) == [(0, 1, 0, 2), (2, 1, 2, 1), (3, 0, 0, 1), (4, 1, 4, 2)]


def test_sources_no_block_points_at_are_dropped(tmp_path: Path) -> None:
    c = Chain(tmp_path)
    c.write("base/5/16384", os.urandom(10 * BS))
    c.backup()
    c.patch("base/5/16384", 0, os.urandom(10 * BS))  # every block rewritten: the full's copy is no longer used
    i1 = c.backup()
    e = i1.files[0]
    assert e.sources is not None and [s["backup"] for s in e.sources] == [IDS[1]]
    c.restore(i1, tmp_path / "r")
    c.same(tmp_path / "r")


# --------------------------------------------------------------------------- the parent

def _stored(storage: Storage, bid: str, type_: str = "full", parent: str | None = None, tli: int = 1,
            pg: int = 15, sysid: int = 1) -> None:
    from pitr.repo.manifest import write_manifest

    write_manifest(storage, Manifest(
        id=bid, type=type_, system_identifier=sysid, pg_version=pg, pg_version_num=pg * 10000,
        wal_segment_size=16 << 20, timeline=tli, start_lsn="0/1", stop_lsn="0/2", start_wal="0" * 24,
        stop_wal="0" * 24, start_time="2026-01-01T00:00:00Z", stop_time="2026-01-01T00:00:01Z", compress="zstd:3",
        backup_label="", tablespace_map=None, checksums_enabled=True, files=[], directories=[], parent=parent,
        format=3 if parent else 1, extra={"block_size": BS}))


def test_the_parent_is_the_newest_usable_backup_or_a_full_one_is_taken() -> None:
    from pitr.ops.base.backup_incr import Server, choose_base

    s = MemoryStorage()
    server = Server(1, 15, 1, BS)
    b = choose_base(s, "incr", server)
    assert (b.type, b.requested, b.parent) == ("full", "incr", None) and b.reason and "no full backup" in b.reason
    _stored(s, IDS[0])
    _stored(s, IDS[1], "incr", IDS[0])
    _stored(s, "20260104T000000F", sysid=2)  # another cluster's: never a parent
    b = choose_base(s, "incr", server)
    assert b.type == "incr" and b.parent is not None and b.parent.id == IDS[1] and b.parent.chain == list(IDS[:2])
    b = choose_base(s, "diff", server)
    assert b.type == "diff" and b.parent is not None and b.parent.id == IDS[0]  # a diff builds on the full
    for srv, why in ((Server(1, 15, 2, BS), "timeline 1, the server is on timeline 2"),
                     (Server(1, 16, 1, BS), "PostgreSQL 15, the server runs 16"),
                     (Server(1, 15, 1, 2 * BS), "blocks of 8192 bytes")):
        b = choose_base(s, "incr", srv)
        assert b.type == "full" and b.reason and why in b.reason, b.reason
    s.delete(f"backups/{IDS[0]}/manifest")  # the incr's parent is gone: its chain is broken
    b = choose_base(s, "incr", server)
    assert b.type == "full" and b.reason and f"builds on backup {IDS[0]}, which is missing" in b.reason


def test_a_missing_ancestor_is_a_clear_error(tmp_path: Path) -> None:
    c = Chain(tmp_path)
    c.write("base/5/16384", os.urandom(40 * BS))
    c.write("base/5/16385", os.urandom(20 * BS), mtime=time.time() - 3600)
    full = c.backup()
    c.patch("base/5/16384", 7, os.urandom(BS))
    i1 = c.backup()
    assert any(e.ref for e in i1.files) and any(e.sources for e in i1.files)
    for o in list(c.storage.list(f"backups/{full.id}/data/")):
        c.storage.delete(o.key)  # the full backup the incr builds on was removed by hand
    with pytest.raises(IntegrityError, match="builds on an older backup's data, and some is missing"):
        c.restore(i1, tmp_path / "r")


def test_the_started_marker_of_an_incr_names_its_parent() -> None:
    import datetime as dt

    from pitr.ops.base.backup import mark_started, started_key

    s = MemoryStorage()
    now = dt.datetime.now(dt.UTC)
    mark_started(s, IDS[1], now, 0x2000028, now, IDS[0])
    assert json.loads(s.get(started_key(IDS[1])))["parent"] == IDS[0]  # expire keeps it while this runs
    mark_started(s, IDS[2], now, 0x2000028, now)
    assert "parent" not in json.loads(s.get(started_key(IDS[2])))
