"""pitr expire and drill records (docs/maintenance.md): a record of a backup that is gone goes with it,
except the newest record and the newest passing one (info, metrics and check --max-drill-age read
them); an unreadable record is never deleted; --dry-run shows the plan and deletes nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pitr.ops.admin.retention import Policy, apply
from pitr.repo import drills
from pitr.storage.base import Storage
from tests.support.maint import fs_repo, pitr_cli
from tests.test_expire import linear, manifest


def record(did: str, backup: str | None, passed: bool) -> dict[str, Any]:
    started = f"{did[0:4]}-{did[4:6]}-{did[6:8]}T{did[9:11]}:{did[11:13]}:{did[13:15]}Z"
    return {"version": 1, "id": did, "started": started, "finished": started, "passed": passed,
            "backup": None if backup is None else {"id": backup}, "target": {"description": "latest"}, "steps": []}


# B1, B2, B3 all stopped a day before NOW (2024-06-30 12:00)
OLD_ORPHAN = "20240601T000000Z-000001"  # names no backup, older than every backup
OF_B1_PASSED = "20240629T100000Z-000002"
OF_B2_PASSED = "20240629T110000Z-000003"
NO_BACKUP_NEW = "20240629T120000Z-000004"  # failed before choosing a backup, newer than the backups
DAMAGED = "20240629T130000Z-000005"
OF_B1_FAILED = "20240629T140000Z-000006"  # the newest record


def with_drills(s: Storage) -> None:
    for did, bid, ok in ((OLD_ORPHAN, None, False), (OF_B1_PASSED, "B1", True), (OF_B2_PASSED, "B2", True),
                         (NO_BACKUP_NEW, None, False), (OF_B1_FAILED, "B1", False)):
        drills.write(s, record(did, bid, ok))
    s.put(drills.key_of(DAMAGED), b"not an envelope")


def actions(p) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {d.id: d.action for d in p.drills}


def test_records_of_expired_backups_go_but_the_newest_and_newest_passing_stay() -> None:
    r = linear()
    with_drills(r.s)
    p = r.plan(Policy(retain_full=2))  # B1 expires
    assert actions(p) == {OLD_ORPHAN: "delete", OF_B1_PASSED: "delete", OF_B2_PASSED: "keep",
                          NO_BACKUP_NEW: "keep", DAMAGED: "keep", OF_B1_FAILED: "keep"}
    why = {d.id: d.reason for d in p.drills}
    assert "B1" in why[OF_B1_PASSED] and "cannot be read" in why[DAMAGED] and "newest drill" in why[OF_B1_FAILED]
    assert not p.empty
    done = apply(r.s, p)
    assert done.drills == 2
    assert drills.list_ids(r.s) == sorted([OF_B2_PASSED, NO_BACKUP_NEW, DAMAGED, OF_B1_FAILED])

    p = r.plan(Policy(retain_full=1))  # B2 expires too: its record is the newest passing one, it stays
    assert actions(p)[OF_B2_PASSED] == "keep" and "newest passing" in {d.id: d.reason for d in p.drills}[OF_B2_PASSED]
    assert "delete" not in actions(p).values()
    apply(r.s, p)
    assert drills.newest(r.s, passed_only=True)["id"] == OF_B2_PASSED  # type: ignore[index]


def test_dry_run_shows_the_records_and_deletes_nothing(tmp_path: Path) -> None:
    fs = fs_repo(tmp_path / "repo", [manifest(bid, 1, start, start + 1, "2024-06-29T12:00:00+00:00")
                                     for bid, start in (("B1", 2), ("B2", 5), ("B3", 8))], 12)
    with_drills(fs)
    before = sorted(p.name for p in (fs.root / "drills").iterdir())
    r = pitr_cli(fs, "expire", "--retain-full", "2", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"delete  drill {OF_B1_PASSED}" in r.stdout and "B1" in r.stdout.split(OF_B1_PASSED, 1)[1].split("\n")[0]
    assert f"delete  drill {OLD_ORPHAN}" in r.stdout
    assert f"note: drill record {DAMAGED} cannot be read" in r.stdout
    assert sorted(p.name for p in (fs.root / "drills").iterdir()) == before
    r = pitr_cli(fs, "expire", "--retain-full", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {d["id"]: d["action"] for d in out["drills"]}[OF_B1_PASSED] == "delete"
    assert out["deleted"]["drills"] == 2
    assert not (fs.root / drills.key_of(OF_B1_PASSED)).exists()
    assert (fs.root / drills.key_of(DAMAGED)).exists() and (fs.root / drills.key_of(OF_B1_FAILED)).exists()
