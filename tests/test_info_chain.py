"""`pitr info` with diff/incr backups: each backup's type, the backup it builds on and the size it
added, in text and --json; a backup whose chain is broken is not counted as restorable."""

from __future__ import annotations

import dataclasses
import json

from pitr.cli.info import render_text, to_json
from pitr.ops.admin.info import gather
from pitr.repo import envelope
from pitr.repo.format import META_KEY, manifest_key, wal_key
from pitr.repo.manifest import write_manifest
from pitr.repo.meta import new_meta
from pitr.storage.memory import MemoryStorage
from tests.test_info import SEG, SYSID, manifest, seg

B1, B2, B3 = "20261101T000000F", "20261104T000000F", "20261106T000000F"


def repo() -> MemoryStorage:
    s = MemoryStorage()
    s.put(META_KEY, new_meta(SYSID, 15, SEG).to_json())
    for n in range(1, 10):
        s.put(wal_key(seg(1, n)), envelope.encode(b"wal", envelope.Codec("none", 0)))
    full = manifest(B1, 1, 2, 2, "2026-11-01T00:00:00Z")
    write_manifest(s, dataclasses.replace(full, start_time="2026-10-31T23:59:00Z", stored_bytes=5000))
    for bid, typ, parent, n, stored in ((B2, "diff", B1, 4, 300), (B3, "incr", B2, 6, 40)):
        m = manifest(bid, 1, n, n, f"2026-11-0{n}T00:00:00Z")
        write_manifest(s, dataclasses.replace(m, type=typ, parent=parent, stored_bytes=stored,
                                              start_time=f"2026-11-0{n}T00:00:00Z"))
    return s


def test_json_shows_type_parent_and_added_size() -> None:
    doc = json.loads(json.dumps(to_json(gather(repo()))))
    got = [(b["id"], b["status"], b["type"], b["parent"], b["stored_bytes"]) for b in doc["backups"]]
    assert got == [(B1, "ok", "full", None, 5000), (B2, "ok", "diff", B1, 300), (B3, "ok", "incr", B2, 40)]


def test_text_shows_what_each_builds_on() -> None:
    text = render_text(gather(repo()))
    row = next(line for line in text.splitlines() if line.startswith(B3))
    assert f"incr on {B2}" in row and "40 B" in row and row.rstrip().endswith("ok")
    assert "full on" not in text


def test_a_broken_chain_is_not_restorable() -> None:
    s = repo()
    s.delete(manifest_key(B2))
    r = gather(s)
    b3 = next(b for b in r.backups if b.id == B3)
    assert b3.status == "chain-broken" and b3.problem == f"backup {B3} builds on backup {B2}, which is missing"
    assert f"chain broken: {b3.problem}" in render_text(r)
    doc = to_json(r)
    assert doc["backups"][-1]["problem"] == b3.problem
    # the window counts only restorable backups: B1 (the earliest) still, B3 no longer
    assert r.window.earliest_backup == B1
    s.put(manifest_key(B2), b"garbage")
    b3 = next(b for b in gather(s).backups if b.id == B3)
    assert b3.status == "chain-broken" and f"{B2}, which is unreadable" in str(b3.problem)
