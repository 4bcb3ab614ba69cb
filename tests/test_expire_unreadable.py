"""pitr expire with a manifest it cannot read (docs/maintenance.md): that backup stays, with every
older backup (it may build on them) and every backup that builds on it; the rest of the policy is
applied, no WAL is deleted, and expire exits 1 naming the backup."""

from __future__ import annotations

import time
from pathlib import Path

from pitr.ops.admin.retention import Policy, apply, gather_and_plan
from pitr.repo import drills
from pitr.repo.format import backup_data_key, manifest_key
from pitr.repo.manifest import list_backup_ids
from tests.support.maint import fs_repo, pitr_cli
from tests.test_expire import Repo0, decisions, manifest

# real backup IDs: manifests are read back through the validating reader (a parent is an older ID)
B1, B2, B3, B4, B5, B6 = (f"20240601T00000{n}F" for n in range(1, 7))


def damaged(r: Repo0) -> Repo0:
    """Fulls B1, B2; B3 whose manifest is garbage; B4 an incr on B3; fulls B5, B6 (segments 1-20)."""
    r.wal(1, 1, 20)
    r.backup(manifest(B1, 1, 2, 3)).backup(manifest(B2, 1, 5, 6))
    r.backup(manifest(B3, 1, 8, 9))
    r.s.put(manifest_key(B3), b"this is not a manifest")
    r.backup(manifest(B4, 1, 11, 12, type="incr", parent=B3))
    r.backup(manifest(B5, 1, 14, 15)).backup(manifest(B6, 1, 17, 18))
    return r


def test_an_unreadable_backup_keeps_what_it_may_need_and_what_needs_it() -> None:
    r = damaged(Repo0())
    drills.write(r.s, {"version": 1, "id": "20240101T000000Z-000001", "started": "2024-01-01T00:00:00Z",
                       "passed": True, "backup": {"id": B3}})
    drills.write(r.s, {"version": 1, "id": "20240101T000000Z-000002", "started": "2024-01-01T00:00:00Z",
                       "passed": True, "backup": {"id": B5}})
    drills.write(r.s, {"version": 1, "id": "20240102T000000Z-000003", "started": "2024-01-02T00:00:00Z",
                       "passed": True, "backup": {"id": B6}})
    later = time.time() + 3 * 86400  # every directory is old enough to count as a leftover if it had no manifest
    p = gather_and_plan(r.s, Policy(retain_full=1), later)
    assert decisions(p) == {B1: "keep", B2: "keep", B3: "keep", B4: "keep", B5: "expire", B6: "keep"}
    why = {b.id: b.reason for b in p.backups}
    assert "cannot be read" in why[B3] and B3 in why[B1] and B3 in why[B4]
    assert list(p.unreadable) == [B3] and p.wal_keys == [] and p.incomplete == []
    assert any(B3 in n and "WAL" in n for n in p.notes)
    assert {d.id: d.action for d in p.drills} == {"20240101T000000Z-000001": "keep",  # its backup cannot be read
                                                  "20240101T000000Z-000002": "delete",
                                                  "20240102T000000Z-000003": "keep"}
    apply(r.s, p)
    assert list_backup_ids(r.s) == [B1, B2, B3, B4, B6]
    assert r.s.get(backup_data_key(B3, 0)) and r.s.get(manifest_key(B3)) == b"this is not a manifest"
    assert len(r.wal_names()) == 20


def test_the_cli_applies_the_rest_and_exits_1_naming_the_backup(tmp_path: Path) -> None:
    fs = fs_repo(tmp_path / "repo", [manifest(bid, 1, start, start + 1)
                                     for bid, start in (("B1", 2), ("B2", 5), ("B3", 8), ("B5", 14), ("B6", 17))], 20)
    fs.put(manifest_key("B1"), b"garbage")  # the oldest one: nothing else depends on what it is
    r = pitr_cli(fs, "expire", "--retain-full", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert "B1" in r.stderr and "pitr verify" in r.stderr
    assert "keep    B1" in r.stdout and "expire  B3" in r.stdout
    assert list_backup_ids(fs) == ["B1", "B6"]
    assert sum(1 for _ in fs.list("wal/")) == 20  # which WAL B1 needs is unknown: none is deleted
