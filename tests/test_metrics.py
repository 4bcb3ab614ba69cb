"""`pitr metrics` and the drill-record readers on a made-up directory repository (no PostgreSQL):
the text parses with prometheus_client's reference parser, every metric is documented, the
repository is listed once with no reads beyond metadata, manifests and drill records, the
textfile is replaced atomically, and damaged drill records are skipped, never trusted."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pitr.ops.proof.check import CheckOptions, CheckResult, age_points
from pitr.ops.proof.metrics import text
from pitr.repo import drills
from pitr.repo.meta import read_meta
from pitr.storage.base import ObjectInfo
from pitr.storage.fs import FsStorage
from tests.support.synthbackup import fake_repo

ROOT = Path(__file__).resolve().parents[1]
NOW = 1772366400.0  # 2026-03-01T12:00:00Z + 1 day - 12 h


class Counting(FsStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lists: list[str] = []
        self.gets: list[str] = []

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.lists.append(prefix)
        return super().list(prefix)

    def get(self, key: str, max_size: int | None = None) -> bytes:
        self.gets.append(key)
        return super().get(key, max_size)


def drill_record(passed: bool, started: float, rto: float = 12.5) -> dict[str, Any]:
    return {"version": 1, "id": drills.new_id(started), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
            time.gmtime(started)), "passed": passed, "rto_seconds": rto, "steps": [],
            "target": {"kind": "latest", "description": "end of the archive"}}


@pytest.fixture
def repo(tmp_path: Path) -> Counting:
    st = Counting(tmp_path / "repo")
    fake_repo(st, {"PG_VERSION": b"15\n", "base/1/1259": b"x" * 9000}, segments=range(2, 1502))
    st.put("restore-points/p.json", b"{}")  # metrics do not report restore points: never read
    return st


def values(body: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {f.name: [(s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(body)}


def test_metrics_parse_are_documented_and_read_little(repo: Counting) -> None:
    drills.write(repo, drill_record(True, NOW - 3600, rto=40.0))
    drills.write(repo, drill_record(False, NOW - 60, rto=33.0))
    repo.lists.clear()
    repo.gets.clear()
    t0 = time.monotonic()
    body = text(repo, now=NOW)
    assert time.monotonic() - t0 < 5
    assert repo.lists == [""]  # one listing of the whole repository
    assert all(k == "pitr.json" or k.endswith("/manifest") or k.startswith("drills/") for k in repo.gets), repo.gets
    v = values(body)
    assert all(name.startswith("pitr_") for name in v)
    documented = (ROOT / "docs" / "metrics.md").read_text()
    assert [n for n in v if f"`{n}`" not in documented] == []
    one = {n: s[0][1] for n, s in v.items() if len(s) == 1 and not s[0][0]}
    assert one["pitr_wal_archived_segments"] == 1500
    assert one["pitr_drill_last_success"] == 0  # the newest drill failed
    assert one["pitr_drill_last_rto_seconds"] == 33.0
    assert one["pitr_drill_last_age_seconds"] == 60
    assert one["pitr_drill_last_success_age_seconds"] == 3600
    assert one["pitr_recoverable_window_start_timestamp_seconds"] == 1772366400.0
    assert one["pitr_backup_newest_age_seconds"] == 0
    assert one["pitr_encryption_enabled"] == 0 and one["pitr_object_lock_enabled"] == 0
    assert one["pitr_repository_size_bytes"] == sum(o.size for o in FsStorage.list(repo, ""))
    assert v["pitr_backups"] == [({"status": "ok", "type": "full"}, 1.0)]
    assert v["pitr_backup_last_size_bytes"] == [({"type": "full"}, 9003.0)]


def test_no_drill_no_wal_means_absent_not_zero(tmp_path: Path) -> None:
    st = FsStorage(tmp_path / "r")
    fake_repo(st, {"PG_VERSION": b"15\n"}, segments=range(0))
    v = values(text(st, now=NOW))
    for name in ("pitr_drill_last_success", "pitr_drill_last_age_seconds", "pitr_rpo_seconds"):
        assert v.get(name, []) == [], name


def test_damaged_drill_records_are_skipped(repo: Counting) -> None:
    good = drill_record(True, NOW - 7200)
    drills.write(repo, good)
    repo.put(drills.key_of(drills.new_id(NOW - 10)), b"not an envelope")
    bad = drill_record(True, NOW - 5)
    bad["started"] = "yesterday"
    drills.write(repo, bad)
    assert drills.newest(repo)["id"] == good["id"]  # type: ignore[index]
    v = values(text(repo, now=NOW))
    assert v["pitr_drill_last_age_seconds"] == [({}, 7200.0)]


def test_check_max_drill_and_backup_age(repo: Counting) -> None:
    meta = read_meta(repo)
    opts = CheckOptions(parse_url(repo), max_backup_age=3600.0, max_drill_age=86400.0)
    res = CheckResult()
    age_points(repo, meta, opts, res, lambda: NOW)
    assert [(p.name, p.ok) for p in res.points] == [("backup-age", True), ("drill-age", False)]
    assert res.points[1].detail == "no passing drill is recorded in the repository"
    drills.write(repo, drill_record(False, NOW - 60))
    drills.write(repo, drill_record(True, NOW - 2 * 86400))
    res = CheckResult()
    age_points(repo, meta, opts, res, lambda: NOW + 7200)
    assert [(p.name, p.ok) for p in res.points] == [("backup-age", False), ("drill-age", False)]
    assert "the newest complete backup (20260301T120000Z) is 2.0h old, over the limit of 60.0min" in \
        res.points[0].detail
    assert "passing drill" in res.points[1].detail and "2.1d old, over the limit of 24.0h" in res.points[1].detail


def parse_url(st: FsStorage) -> Any:
    from pitr.config import parse_repo_url

    return parse_repo_url(str(st.root))


def test_textfile_is_replaced_atomically(repo: Counting, tmp_path: Path) -> None:
    out = tmp_path / "tf" / "pitr.prom"
    out.parent.mkdir()
    out.write_text("old\n")
    argv = [sys.executable, "-m", "pitr", "--repo", str(repo.root), "metrics", "--textfile", str(out)]
    p = subprocess.run(argv, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and "pitr_wal_archived_segments 1500" in out.read_text()
    assert sorted(x.name for x in out.parent.iterdir()) == ["pitr.prom"]  # no temp file left
    p = subprocess.run(argv[:-1] + [str(tmp_path / "nope" / "x.prom")], capture_output=True, text=True)
    assert p.returncode == 2 and "its directory does not exist" in p.stderr
