"""pitr verify on diff/incr backups built object by object as an older pitr wrote them (version-1
envelopes, sha256 entries, format-1 block maps), decoded by the real envelope codec: a whole
chain verifies clean; a broken chain, a missing referenced object, a damaged block map and a block
that does not match its hash are each reported against the backup they concern, with --backup too."""

from __future__ import annotations

import dataclasses
import hashlib
import struct

from pitr.ops.proof.verify import VerifyOptions, VerifyResult, verify
from pitr.pg import walname
from pitr.repo.format import META_KEY, backup_data_key, manifest_key
from pitr.repo.manifest import FileEntry, Manifest, write_manifest
from pitr.repo.meta import new_meta
from pitr.storage.memory import MemoryStorage
from tests.support.envelope_v1 import encode_v1

SEG = 16 << 20
BS = 8192
FULL, INCR = "20261101T000000F", "20261102T000000F"
DATA = "data/000000"


def block(tag: int) -> bytes:
    return hashlib.sha256(bytes([tag])).digest() * (BS // 32)


def bhash(b: bytes) -> bytes:
    return hashlib.blake2b(b, digest_size=16).digest()


def blockmap(records: list[tuple[bytes, int, int]]) -> bytes:
    return struct.pack("<8sII", b"PITRBM1\0", BS, len(records)) + b"".join(struct.pack("<16sHI", *r) for r in records)


def manifest(bid: str, typ: str, parent: str | None, day: int, files: list[FileEntry]) -> Manifest:
    return Manifest(id=bid, type=typ, system_identifier=7, pg_version=15, pg_version_num=150000, wal_segment_size=SEG,
                    timeline=1, start_lsn=walname.format_lsn(2 * SEG), stop_lsn=walname.format_lsn(2 * SEG + 100),
                    start_wal=walname.seg_name(1, 2, SEG), stop_wal=walname.seg_name(1, 2, SEG),
                    start_time=f"2026-11-0{day}T00:00:00+00:00", stop_time=f"2026-11-0{day}T00:01:00+00:00",
                    compress="zstd:3", backup_label="", tablespace_map=None, checksums_enabled=True, files=files,
                    directories=[], parent=parent)


class Bundle:
    """Envelopes appended into one data object; returns their (offset, length). Version 1 (SHA-256),
    as the older pitr that wrote format-1 maps (and sha256 entries) wrote them."""

    def __init__(self) -> None:
        self.data = bytearray()

    def add(self, raw: bytes) -> dict[str, object]:
        env = encode_v1(raw, "zstd", 3)
        loc = {"object": DATA, "offset": len(self.data), "length": len(env)}
        self.data += env
        return loc


OLD = [block(i) for i in range(8)]
NEW = list(OLD)
NEW[2], NEW[5] = block(102), block(105)  # the incr backup's changed blocks


def build(bad_own_block: bool = False, bad_full_map: bool = False, grow: bool = False) -> MemoryStorage:
    """FULL: base/1/16384 (8 blocks, whole, with its map) and PG_VERSION; INCR on FULL: the relation
    with blocks 2 and 5 changed (its own "blocks" envelope + FULL's file as source 1), PG_VERSION by ref."""
    s = MemoryStorage()
    s.put(META_KEY, new_meta(7, 15, SEG).to_json())
    old = b"".join(OLD)
    fb = Bundle()
    rel_loc = fb.add(old)
    full_map = [(bhash(b), 0, i) for i, b in enumerate(OLD)]
    if bad_full_map:
        full_map[0] = (bhash(b"not the block"), 0, 0)
    rel_map = fb.add(blockmap(full_map))
    ver_loc = fb.add(b"15\n")
    rel = FileEntry("base/1/16384", len(old), hashlib.sha256(old).hexdigest(), 0o600, 0.0, DATA,
                    int(rel_loc["offset"]), int(rel_loc["length"]), map=rel_map)  # type: ignore[call-overload]
    ver = FileEntry("PG_VERSION", 3, hashlib.sha256(b"15\n").hexdigest(), 0o600, 0.0, DATA,
                    int(ver_loc["offset"]), int(ver_loc["length"]))  # type: ignore[call-overload]
    s.put(backup_data_key(FULL, 0), bytes(fb.data))
    write_manifest(s, manifest(FULL, "full", None, 1, [rel, ver]))

    ib = Bundle()
    blocks = NEW + ([block(108), block(109)] if grow else [])  # grown: two blocks past the old end
    changed = [2, 5, 8, 9] if grow else [2, 5]
    stored = [block(99) if bad_own_block and i == 5 else blocks[i] for i in changed]
    own = ib.add(b"".join(stored))
    recs = []
    for i, b in enumerate(blocks):
        recs.append((bhash(b), 0, changed.index(i)) if i in changed else (bhash(b), 1, i))
    imap = ib.add(blockmap(recs))
    new = b"".join(blocks)
    sources = [{"backup": INCR, **own, "kind": "blocks"}, {"backup": FULL, **rel_loc, "kind": "file"}]
    irel = FileEntry("base/1/16384", len(new), hashlib.sha256(new).hexdigest(), 0o600, 1.0, DATA,
                     int(own["offset"]), int(own["length"]), map=imap, sources=sources)  # type: ignore[call-overload]
    s.put(backup_data_key(INCR, 0), bytes(ib.data))
    write_manifest(s, manifest(INCR, "incr", FULL, 2, [irel, dataclasses.replace(ver, ref=FULL)]))
    return s


def backup_problems(res: VerifyResult) -> set[tuple[str, str]]:
    """(kind, object) of the problems about backups (the hand-built repository has no WAL)."""
    return {(p.kind, p.object) for p in res.problems if p.object.startswith("backups/")}


def details(res: VerifyResult, kind: str) -> list[str]:
    return [p.detail for p in res.problems if p.kind == kind]


def test_a_whole_chain_verifies_clean() -> None:
    s = build()
    res = verify(s, VerifyOptions())
    assert backup_problems(res) == set()
    assert res.checked.files == 4  # FULL's two, INCR's relation (block by block) and PG_VERSION (FULL's envelope)
    res = verify(s, VerifyOptions(INCR))
    assert backup_problems(res) == set()


def test_a_file_that_grew_since_its_parent() -> None:
    """The parent's whole-file envelope serves the grown file's first blocks: it is still checked
    against the parent's own size, not the grown one."""
    assert backup_problems(verify(build(grow=True), VerifyOptions())) == set()


def test_a_block_that_does_not_match_its_hash() -> None:
    res = verify(build(bad_own_block=True), VerifyOptions())
    assert backup_problems(res) == {("bad-block", backup_data_key(INCR, 0))}
    [d] = details(res, "bad-block")
    assert d.startswith(f"block 5 of file base/1/16384 of backup {INCR} ") and "does not match its hash" in d
    assert backup_problems(verify(build(bad_own_block=True), VerifyOptions(INCR))) == {
        ("bad-block", backup_data_key(INCR, 0))}


def test_a_parent_map_that_lies_is_caught_in_the_parent() -> None:
    """The next incremental trusts the parent's map: a wrong hash there is reported, though the file's
    SHA-256 is right. INCR reuses block 0 of FULL's file, so its check fails on the same block."""
    res = verify(build(bad_full_map=True), VerifyOptions())
    assert backup_problems(res) == {("bad-block", backup_data_key(FULL, 0))}
    [d] = details(res, "bad-block")
    assert f"block 0 of file base/1/16384 of backup {FULL}" in d


def test_a_missing_parent_breaks_the_chain() -> None:
    s = build()
    s.delete(manifest_key(FULL))
    for opts in (VerifyOptions(), VerifyOptions(INCR)):
        res = verify(s, opts)
        assert backup_problems(res) == {("chain-broken", manifest_key(INCR))}  # said once, not per block
        assert details(res, "chain-broken") == [f"backup {INCR} builds on backup {FULL}, which is missing"]


def test_a_missing_referenced_object() -> None:
    s = build()
    s.delete(backup_data_key(FULL, 0))
    res = verify(s, VerifyOptions(INCR))  # one backup: its ancestor's objects are read too
    assert backup_problems(res) == {("object-missing", backup_data_key(FULL, 0))}
    [d] = details(res, "object-missing")
    assert d.startswith(f"backup {INCR} needs it for 2 file(s)") and "PG_VERSION" in d
    res = verify(s, VerifyOptions())
    assert details(res, "object-missing")[0].startswith(f"backups {FULL}, {INCR} need it")


def test_a_damaged_block_map() -> None:
    s = build()
    data = bytearray(s.get(backup_data_key(INCR, 0)))
    data[-60] ^= 0xFF  # inside the map's envelope, the last in the object
    s.put(backup_data_key(INCR, 0), bytes(data))
    res = verify(s, VerifyOptions())
    assert ("block-map", backup_data_key(INCR, 0)) in backup_problems(res)
    assert "the block map of base/1/16384" in details(res, "block-map")[0]


def test_a_ref_to_a_file_the_parent_does_not_have() -> None:
    s = build()
    from pitr.repo.manifest import read_manifest

    m = read_manifest(s, INCR)
    m.files[1] = dataclasses.replace(m.files[1], path="PG_VERSION2")
    write_manifest(s, m)
    res = verify(s, VerifyOptions())
    assert details(res, "manifest") == [f"file PG_VERSION2 refers to backup {FULL}, whose entry for it does not exist"]
