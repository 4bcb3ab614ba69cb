"""`pitr info` / `pitr list` on repositories built object by object: gaps, timelines, which backups
are restorable, the recoverable window, the RPO, the documented JSON shape, and clear errors for
a missing or uninitialized repository. (test_backup.py checks info against real backups.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pitr.ops.admin.info import gather
from pitr.pg import walname
from pitr.repo import envelope
from pitr.repo.format import META_KEY, wal_key
from pitr.repo.manifest import Manifest, write_manifest
from pitr.repo.meta import new_meta
from pitr.storage.fs import FsStorage

SEG = 16 << 20
SYSID = 7301234567890123456
PITR = Path(sys.executable).parent / "pitr"
DOC = Path(__file__).resolve().parents[1] / "docs" / "info-json.md"
T0 = float(int(time.time()) - 86400)  # segment n arrived at T0 + 60 * n, a day ago


def seg(tli: int, n: int) -> str:
    return walname.seg_name(tli, n, SEG)


def put_wal(repo: FsStorage, name: str, arrival: float, body: bytes = b"wal") -> None:
    repo.put(wal_key(name), envelope.encode(body, envelope.Codec("none", 0)))
    os.utime(repo.root / wal_key(name), (arrival, arrival))


def manifest(bid: str, tli: int, start_seg: int, stop_seg: int, stop_time: str) -> Manifest:
    start, stop = start_seg * SEG + 0x28, stop_seg * SEG + 0x100
    return Manifest(
        id=bid, type="full", system_identifier=SYSID, pg_version=15, pg_version_num=150018, wal_segment_size=SEG,
        timeline=tli, start_lsn=walname.format_lsn(start), stop_lsn=walname.format_lsn(stop),
        start_wal=seg(tli, start_seg), stop_wal=seg(tli, stop_seg), start_time=stop_time, stop_time=stop_time,
        compress="zstd:3", backup_label="", tablespace_map=None, checksums_enabled=True, files=[], directories=[],
        bytes=1000, stored_bytes=100, duration=1.5)


@pytest.fixture
def repo(tmp_path: Path) -> FsStorage:
    s = FsStorage(tmp_path / "repo")
    s.create()
    s.put(META_KEY, new_meta(SYSID, 15, SEG).to_json())
    return s


def pitr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PITR), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")})


def build_history(repo: FsStorage) -> None:
    """Timeline 1: segments 1-5 and 7-9 (6 is missing). Timeline 2 branched off in segment 4:
    segments 4-6 (with its .history). Backups: A (seg 2), B (seg 8), C whose own WAL (seg 6) is missing."""
    for n in (1, 2, 3, 4, 5, 7, 8, 9):
        put_wal(repo, seg(1, n), T0 + 60 * n)
    put_wal(repo, walname.history_name(2), T0 + 250, f"1\t{walname.format_lsn(4 * SEG + 0x5000)}\tpromoted\n".encode())
    for n in (4, 5, 6):
        put_wal(repo, seg(2, n), T0 + 300 + 60 * n)
    write_manifest(repo, manifest("20261101T000000F", 1, 2, 2, "2026-11-01T00:00:00.000001Z"))
    write_manifest(repo, manifest("20261102T000000F", 1, 8, 8, "2026-11-02T00:00:00.000001Z"))
    write_manifest(repo, manifest("20261103T000000F", 1, 6, 6, "2026-11-03T00:00:00.000001Z"))


def test_gaps_timelines_window_and_rpo(repo: FsStorage) -> None:
    build_history(repo)
    r = gather(repo, now=T0 + 2000)
    status = {b.id: b.status for b in r.backups}
    assert status == {"20261101T000000F": "ok", "20261102T000000F": "ok", "20261103T000000F": "wal-missing"}
    assert r.backups[2].missing_wal == seg(1, 6)
    tl1, tl2 = r.timelines
    assert (tl1.first, tl1.last, tl1.count) == (seg(1, 1), seg(1, 9), 8)
    assert [(g.first, g.last, g.count) for g in tl1.gaps] == [(seg(1, 6), seg(1, 6), 1)]
    assert (tl2.first, tl2.last, tl2.count, tl2.gaps, tl2.has_history) == (seg(2, 4), seg(2, 6), 3, [], True)
    # earliest: the oldest restorable backup's stop; latest: backup A crosses to timeline 2 in segment 4
    # and reaches its segment 6 (arrived T0+660); B reaches 1/9 (T0+540); the gap at 1/6 stops A on tl 1
    assert r.window.earliest_backup == "20261101T000000F"
    assert r.window.earliest_time == "2026-11-01T00:00:00.000001Z"
    assert r.window.latest is not None
    assert (r.window.latest.wal, r.window.latest.timeline) == (seg(2, 6), 2)
    assert r.window.latest.arrival == pytest.approx(T0 + 660)
    assert r.window.latest.end_lsn == 7 * SEG
    assert r.newest_wal == seg(2, 6)
    assert r.rpo_seconds == pytest.approx(2000 - 660)


def test_a_gap_cuts_the_window_even_if_later_wal_exists(repo: FsStorage) -> None:
    for n in (1, 2, 3, 5, 6):
        put_wal(repo, seg(1, n), T0 + 60 * n)
    write_manifest(repo, manifest("20261101T000000F", 1, 2, 2, "2026-11-01T00:00:00.000001Z"))
    r = gather(repo, now=T0 + 1000)
    assert r.window.latest is not None and r.window.latest.wal == seg(1, 3)
    assert r.rpo_seconds == pytest.approx(1000 - 360)  # the RPO still counts the newest arrival


def test_json_output_follows_the_documented_schema(repo: FsStorage) -> None:
    from pitr.repo import drills

    build_history(repo)
    drills.write(repo, {"version": 1, "id": "20261101T020000Z-abcdef", "started": "2026-11-01T02:00:00Z",
                        "finished": "2026-11-01T02:01:00Z", "passed": False, "rto_seconds": 30.5,
                        "rto_checks_seconds": 41.0, "target": {"kind": "latest", "description": "end of the archive"},
                        "backup": {"id": "20261101T000000F"}, "reached": {"lsn": "0/7000000"},
                        "steps": [{"name": "restore", "passed": True}, {"name": "check", "passed": False}]})
    for args in (("info", "--json"), ("list", "--json")):
        p = pitr("--repo", str(repo.root), *args)
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert doc["version"] == 1 and doc["repo"] == str(repo.root)
        assert doc["cluster"]["system_identifier"] == str(SYSID)
        assert [b["status"] for b in doc["backups"]] == ["ok", "ok", "wal-missing"]
        assert doc["backups"][2]["missing_wal"] == seg(1, 6)
        assert doc["wal"]["timelines"][0]["gaps"] == [{"first": seg(1, 6), "last": seg(1, 6), "count": 1}]
        rec = doc["recoverable"]
        assert rec["latest_wal"] == seg(2, 6) and rec["latest_lsn"] == walname.format_lsn(7 * SEG)
        assert rec["latest_time"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + 660))
        assert rec["earliest_backup"] == "20261101T000000F" and rec["latest_is_upper_bound"] is True
        assert doc["rpo_seconds"] > 0
        assert doc["drill"]["id"] == "20261101T020000Z-abcdef" and doc["drill"]["failed_steps"] == ["check"]
        assert doc["drill"]["rto_seconds"] == 30.5 and doc["drill"]["target"] == "end of the archive"
    # every field the command emits is documented, and every documented field is emitted
    documented = set(re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)?", DOC.read_text(), re.M))
    names = {n for pair in documented for n in pair if n}
    emitted: set[str] = set()

    def walk(x: object) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                emitted.add(k)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    assert emitted - names == set(), "emitted but not documented"
    assert names - emitted - {"problem"} == set(), "documented but never emitted"


def test_text_output_and_empty_repository(repo: FsStorage) -> None:
    p = pitr("--repo", str(repo.root), "info")
    assert p.returncode == 0, p.stderr
    assert "backups: none yet" in p.stdout and "archived WAL: none yet" in p.stdout
    assert "recoverable  nothing yet" in p.stdout
    build_history(repo)
    p = pitr("--repo", str(repo.root), "list")
    assert p.returncode == 0, p.stderr
    assert "20261102T000000F" in p.stdout and f"WAL missing ({seg(1, 6)})" in p.stdout
    assert f"{seg(1, 6)}" in p.stdout.split("archived WAL", 1)[1]  # the gap is shown
    assert "upper bound" in p.stdout and p.stderr == ""


def test_uninitialized_and_missing_repositories_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    p = pitr("--repo", str(tmp_path / "empty"), "info", "--json")
    assert p.returncode == 1 and p.stdout == ""
    assert "is not initialized" in p.stderr and "pitr init" in p.stderr and "Traceback" not in p.stderr
    p = pitr("--repo", str(tmp_path / "nowhere"), "info")
    assert p.returncode == 1 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_a_backup_taken_on_a_standby_says_so(repo: FsStorage) -> None:
    build_history(repo)
    m = manifest("20261104T000000F", 1, 8, 8, "2026-11-04T00:00:00.000001Z")
    m.extra["from_standby"] = True
    write_manifest(repo, m)
    m = manifest("20261105T000000F", 1, 8, 8, "2026-11-05T00:00:00.000001Z")
    m.extra["from_standby"] = "yes"  # untrusted: anything but true reads as "not from a standby"
    write_manifest(repo, m)
    p = pitr("--repo", str(repo.root), "info", "--json")
    assert p.returncode == 0, p.stderr
    flags = {b["id"]: b["from_standby"] for b in json.loads(p.stdout)["backups"]}
    assert flags == {"20261101T000000F": False, "20261102T000000F": False, "20261103T000000F": False,
                     "20261104T000000F": True, "20261105T000000F": False}
    p = pitr("--repo", str(repo.root), "info")
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines() if line.startswith("2026")}
    assert "full from standby" in rows["20261104T000000F"]
    assert [bid for bid, line in rows.items() if "standby" in line] == ["20261104T000000F"]
