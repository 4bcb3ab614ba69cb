"""Defect 10 end to end on PostgreSQL 15: backup A is in the window between its WAL wait and its
manifest while backup B completes and `expire --retain-full 1` runs. A's marker must keep the WAL
A needs, so that A, once listed, verifies with all its WAL."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pitr.ops.base import backup as backup_op
from pitr.pg.conn import PgSession
from pitr.repo.envelope import parse_codec
from pitr.repo.manifest import list_backup_ids
from tests.support.maint import Repo, backup

pytestmark = pytest.mark.pg


def test_expire_between_a_backups_wal_wait_and_its_manifest(fs_repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = fs_repo
    repo.churn(2)
    backup(repo)  # an older complete backup, so that expire has something to expire
    repo.churn(2)
    seen: dict[str, Any] = {}
    real_wait = backup_op.wait_for_wal

    def wait_then_race(storage: Any, names: list[str], *args: Any, **kw: Any) -> None:
        real_wait(storage, names, *args, **kw)
        # A's WAL is archived; before A writes its manifest, B starts later, completes, and expire runs
        [a_id] = [o.key.split("/")[1] for o in storage.list("backups/") if o.key.endswith("/started")]
        seen["marker"] = json.loads(storage.get(f"backups/{a_id}/started"))
        repo.fix_owner()
        repo.churn(3)
        seen["b"] = backup(repo)
        r = repo.pitr("expire", "--retain-full", "1", "--json")
        assert r.returncode == 0, r.stderr
        seen["expire"] = json.loads(r.stdout)

    monkeypatch.setattr(backup_op, "wait_for_wal", wait_then_race)
    opts = backup_op.BackupOptions(parse_codec("zstd:1"), jobs=2, archive_timeout=60)
    with PgSession(f"host={repo.cluster.sockdir} port={repo.cluster.port} user=postgres dbname=postgres") as pg:
        a = backup_op.take_backup(repo.storage, pg, opts).manifest
    repo.fix_owner()

    assert list_backup_ids(repo.storage) == sorted([a.id, seen["b"].id])  # the older one was expired
    assert a.start_wal in repo.segments()
    r = repo.pitr("verify")
    assert r.returncode == 0, r.stdout + r.stderr  # A restores: every segment from its start is there
    assert seen["marker"]["start_lsn"] == a.start_lsn  # the marker named A's start while A ran
    [ip] = seen["expire"]["in_progress"]
    assert ip["id"] == a.id and ip["honoured"] and ip["start_lsn"] == a.start_lsn
    assert not repo.storage.stat(f"backups/{a.id}/started")
