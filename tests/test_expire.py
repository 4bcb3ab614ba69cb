"""pitr expire: the pure plan keeps exactly what the policy says (backups, WAL per timeline,
history files, incomplete directories), execution deletes manifests first, and on a real
PostgreSQL 15 archive the kept backups still verify, with all their WAL, after an expire."""

from __future__ import annotations

import datetime
import json
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pitr.errors import StorageError, UsageError
from pitr.ops.admin.retention import Policy, apply, gather_and_plan
from pitr.pg import walname
from pitr.repo.catalog import scan_wal
from pitr.repo.format import META_KEY, backup_data_key, manifest_key, started_key, wal_key
from pitr.repo.manifest import Manifest, list_backup_ids, write_manifest
from pitr.repo.meta import new_meta
from pitr.storage.base import Storage
from pitr.storage.memory import MemoryStorage
from pitr.storage.s3 import S3Storage
from tests.support.maint import Repo, backup, fs_repo, pitr_cli, snapshot
from tests.support.pg import PgCluster
from tests.support.s3 import MotoServer

SEG = 16 << 20
NOW = datetime.datetime(2024, 6, 30, 12, 0, tzinfo=datetime.UTC).timestamp()


def seg(tli: int, n: int) -> str:
    return walname.seg_name(tli, n, SEG)


def days_ago(d: float) -> str:
    return datetime.datetime.fromtimestamp(NOW - d * 86400, datetime.UTC).isoformat()


def manifest(bid: str, tli: int, start: int, stop: int, stop_time: str = "", type: str = "full",
             parent: str | None = None) -> Manifest:
    return Manifest(id=bid, type=type, system_identifier=1, pg_version=15, pg_version_num=150000,
                    wal_segment_size=SEG, timeline=tli, start_lsn=walname.format_lsn(start * SEG + 40),
                    stop_lsn=walname.format_lsn(stop * SEG + 40), start_wal=seg(tli, start), stop_wal=seg(tli, stop),
                    start_time=stop_time or days_ago(1), stop_time=stop_time or days_ago(1), compress="zstd:3",
                    backup_label="", tablespace_map=None, checksums_enabled=True, files=[], directories=[],
                    parent=parent)


class Repo0:
    """An in-memory repository: WAL names only (the plan reads no WAL content but .history)."""

    def __init__(self) -> None:
        self.s = MemoryStorage()
        self.s.put(META_KEY, new_meta(1, 15, SEG).to_json())
        self.manifests: list[Manifest] = []

    def wal(self, tli: int, first: int, last: int) -> Repo0:
        for n in range(first, last + 1):
            self.s.put(wal_key(seg(tli, n)), b"x")
        return self

    def put(self, name: str, body: bytes = b"x") -> Repo0:
        self.s.put(wal_key(name), body)
        return self

    def history(self, tli: int, parent: int, switch_segno: int) -> Repo0:
        from pitr.repo import envelope

        text = f"{parent}\t{walname.format_lsn(switch_segno * SEG + 123)}\tno recovery target\n".encode()
        self.s.put(wal_key(walname.history_name(tli)), envelope.encode(text, envelope.Codec("none", 0)))
        return self

    def backup(self, m: Manifest, objects: int = 2) -> Repo0:
        self.manifests.append(m)
        for i in range(objects):
            self.s.put(backup_data_key(m.id, i), b"d" * 10)
        write_manifest(self.s, m)
        return self

    def plan(self, policy: Policy, now: float = NOW):  # type: ignore[no-untyped-def]
        return gather_and_plan(self.s, policy, now)

    def wal_names(self) -> set[str]:
        return {o.key.rsplit("/", 1)[1] for o in self.s.list("wal/")}


def deleted_wal(p) -> set[str]:  # type: ignore[no-untyped-def]
    return {k.rsplit("/", 1)[1] for k in p.wal_keys}


def decisions(p) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {b.id: b.action for b in p.backups}


# --------------------------------------------------------------------------- the pure plan

def linear() -> Repo0:
    """Timeline 1 segments 1..12, backups at 2, 5, 8 with their .backup files."""
    r = Repo0().wal(1, 1, 12)
    for bid, start in (("B1", 2), ("B2", 5), ("B3", 8)):
        r.backup(manifest(bid, 1, start, start + 1))
        r.put(f"{seg(1, start)}.00000028.backup")
    return r


def test_retain_full_keeps_the_n_newest_and_their_wal() -> None:
    r = linear()
    p = r.plan(Policy(retain_full=2))
    assert decisions(p) == {"B1": "expire", "B2": "keep", "B3": "keep"}
    assert deleted_wal(p) == {seg(1, n) for n in range(1, 5)} | {f"{seg(1, 2)}.00000028.backup"}
    [t] = p.wal
    assert (t.timeline, t.keep_from, t.delete_objects) == (1, seg(1, 5), 5)
    assert [b.keys for b in p.backups if b.id == "B1"] == [[backup_data_key("B1", 0), backup_data_key("B1", 1)]]

    p = r.plan(Policy(retain_full=5))  # every backup stays; WAL before the oldest start still goes
    assert set(decisions(p).values()) == {"keep"}
    assert deleted_wal(p) == {seg(1, 1)}

    p = r.plan(Policy(retain_full=1))
    assert decisions(p) == {"B1": "expire", "B2": "expire", "B3": "keep"}
    assert min(walname.segno(n[:24], SEG) for n in r.wal_names() - deleted_wal(p)) == 8


def test_retain_days_keeps_the_window_and_the_backup_before_it() -> None:
    r = Repo0().wal(1, 1, 20)
    for bid, start, age in (("B1", 2, 20), ("B2", 5, 10), ("B3", 8, 8), ("B4", 11, 3), ("B5", 14, 1)):
        r.backup(manifest(bid, 1, start, start, days_ago(age)))
    p = r.plan(Policy(retain_days=7))
    assert decisions(p) == {"B1": "expire", "B2": "expire", "B3": "keep", "B4": "keep", "B5": "keep"}
    assert "before the 7-day window" in next(b.reason for b in p.backups if b.id == "B3")
    assert deleted_wal(p) == {seg(1, n) for n in range(1, 8)}

    p = r.plan(Policy(retain_days=0.5))  # every backup is older than the window: the newest stays
    assert decisions(p) == {"B1": "expire", "B2": "expire", "B3": "expire", "B4": "expire", "B5": "keep"}

    p = r.plan(Policy(retain_full=4, retain_days=7))  # both rules (config + env): either keeps
    assert decisions(p)["B2"] == "keep" and decisions(p)["B1"] == "expire"


def test_incremental_chain_stays_with_a_kept_child() -> None:
    b1, b2, b3, b4 = (f"20240601T00000{n}F" for n in range(1, 5))  # real IDs: a parent is an older one
    r = Repo0().wal(1, 1, 12)
    r.backup(manifest(b1, 1, 2, 2)).backup(manifest(b2, 1, 5, 5, type="incr", parent=b1))
    r.backup(manifest(b3, 1, 8, 8, type="incr", parent=b2))
    assert decisions(r.plan(Policy(retain_full=1))) == {b1: "keep", b2: "keep", b3: "keep"}
    r.backup(manifest(b4, 1, 10, 10))
    assert decisions(r.plan(Policy(retain_full=1))) == {b1: "expire", b2: "expire", b3: "expire", b4: "keep"}


def test_timelines_history_partial_and_backup_files() -> None:
    # B1 on timeline 1 at 2; timeline 2 forks at 6 (1's .partial of 6 archived); B2 on 2 at 8;
    # timeline 1 also went on to 9 (the old primary kept writing for a while)
    r = Repo0().wal(1, 1, 9).history(2, 1, 6).wal(2, 6, 12).put(f"{seg(1, 6)}.partial")
    r.backup(manifest("B1", 1, 2, 3)).backup(manifest("B2", 2, 8, 8))
    p = r.plan(Policy(retain_full=2))
    assert deleted_wal(p) == {seg(1, 1)}  # B1 needs timeline 1 to its head and timeline 2 from 6

    p = r.plan(Policy(retain_full=1))
    assert decisions(p) == {"B1": "expire", "B2": "keep"}
    # timeline 1 is not reached by B2: what lies before B2's start position (8) goes, 8..9 stay
    assert deleted_wal(p) == ({seg(1, n) for n in range(1, 8)} | {f"{seg(1, 6)}.partial"}
                              | {seg(2, 6), seg(2, 7)})
    assert walname.history_name(2) in r.wal_names() - deleted_wal(p)
    by_tli = {t.timeline: t for t in p.wal}
    assert by_tli[2].keep_from == seg(2, 8) and "first segment a retained backup needs" in by_tli[2].reason
    assert "no retained backup reaches" in by_tli[1].reason


def test_incomplete_directories() -> None:
    r = linear()
    for bid in ("B0", "B2x", "B9"):  # old and abandoned / old but just written / newer than every backup
        r.s.put(backup_data_key(bid, 0), b"partial")
    r.s.objects[backup_data_key("B0", 0)] = (b"partial", NOW - 3 * 86400)
    r.s.objects[backup_data_key("B2x", 0)] = (b"partial", NOW - 60)
    r.s.objects[backup_data_key("B9", 0)] = (b"partial", NOW - 3 * 86400)
    p = r.plan(Policy(retain_full=3))
    assert {i.id: i.action for i in p.incomplete} == {"B0": "delete", "B2x": "leave", "B9": "leave"}


def in_progress(r: Repo0, bid: str, start_segno: int | None, age: float = 60.0, raw: bytes | None = None) -> None:
    """A backup in progress as `pitr backup` leaves it: its started marker (with the start LSN once the
    server started it) and a data object, last touched `age` seconds before NOW."""
    body = {"pid": 4242, "host": "db1", "started": days_ago(0.01)}
    if start_segno is not None:
        body["start_lsn"] = walname.format_lsn(start_segno * SEG + 40)
    r.s.put(started_key(bid), raw if raw is not None else json.dumps(body).encode())
    r.s.put(backup_data_key(bid, 0), b"partial")
    for k in (started_key(bid), backup_data_key(bid, 0)):
        r.s.objects[k] = (r.s.objects[k][0], NOW - age)


def test_backup_in_progress_keeps_the_wal_it_needs() -> None:
    """Defect 10: B2y started at segment 6, before B3 (start 8) completed; retain_full=1 keeps only B3,
    which alone would send segments 6 and 7 away before B2y writes its manifest."""
    r = linear()
    assert {seg(1, 6), seg(1, 7)} <= deleted_wal(r.plan(Policy(retain_full=1)))
    in_progress(r, "B2y", 6)
    p = r.plan(Policy(retain_full=1))
    assert deleted_wal(p) == {seg(1, n) for n in range(1, 6)} | {f"{seg(1, n)}.00000028.backup" for n in (2, 5)}
    [ip] = p.in_progress
    assert (ip.id, ip.honoured, ip.start_lsn, ip.host, ip.pid) == ("B2y", True, walname.format_lsn(6 * SEG + 40),
                                                                  "db1", 4242)
    assert {i.id: i.action for i in p.incomplete}["B2y"] == "leave"
    assert p.to_json()["in_progress"][0]["start_lsn"] == ip.start_lsn


def test_backup_in_progress_without_a_start_position_holds_all_wal() -> None:
    r = linear()
    in_progress(r, "B2y", None)  # claimed; the server's checkpoint is still running
    p = r.plan(Policy(retain_full=1))
    assert p.wal_keys == [] and decisions(p)["B1"] == "expire"
    assert any("not recorded its start position" in n for n in p.notes)
    r2 = linear()
    in_progress(r2, "B2y", None, raw=b"\x00not json")  # unreadable marker: the safe reading
    assert r2.plan(Policy(retain_full=1)).wal_keys == []


def test_stale_backup_marker_is_not_honoured() -> None:
    r = linear()
    in_progress(r, "B2y", 6, age=2 * 86400)  # killed two days ago without cleanup
    p = r.plan(Policy(retain_full=1))
    [ip] = p.in_progress
    assert not ip.honoured and "stale" in ip.reason
    assert seg(1, 6) in deleted_wal(p) and seg(1, 7) in deleted_wal(p)
    assert {i.id: i.action for i in p.incomplete}["B2y"] == "delete"


def test_dry_run_shows_the_backup_in_progress(tmp_path: Path) -> None:
    """`expire --dry-run` names the running backup, where it runs and what it holds back (CLI, fs repo)."""
    fs = fs_repo(tmp_path / "repo", [manifest(bid, 1, start, start + 1) for bid, start in (("B1", 2), ("B3", 8))], 12)
    lsn = walname.format_lsn(6 * SEG + 40)
    fs.put(started_key("B2y"), json.dumps({"pid": 4242, "host": "db1", "started": "2026-11-29T10:00:00Z",
                                           "start_lsn": lsn}).encode())
    r = pitr_cli(fs, "expire", "--retain-full", "1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert (f"running B2y  in progress since 2026-11-29T10:00:00Z on db1 pid 4242: it needs WAL from {lsn} on"
            in r.stdout)
    assert f"{seg(1, 5)}: before {seg(1, 6)}" in r.stdout  # segments 6 and 7 stay for B2y


def test_no_backups_and_bad_policies() -> None:
    r = Repo0().wal(1, 1, 5)
    p = r.plan(Policy(retain_full=1))
    assert p.empty and p.wal_keys == [] and "no complete backup" in p.notes[0]
    for bad in (Policy(), Policy(retain_full=0), Policy(retain_days=-1)):
        with pytest.raises(UsageError):
            r.plan(bad)


# --------------------------------------------------------------------------- execution order

class Recording(MemoryStorage):
    def __init__(self, src: MemoryStorage, fail_on_data: bool = False) -> None:
        super().__init__()
        self.objects = dict(src.objects)
        self.calls: list[str] = []
        self.fail_on_data = fail_on_data

    def delete(self, key: str) -> None:
        self.calls.append(key)
        super().delete(key)

    def delete_many(self, keys: Sequence[str]) -> None:
        if self.fail_on_data and any("/data/" in k for k in keys):
            raise StorageError("simulated outage")
        for k in keys:
            self.delete(k)


def test_manifest_goes_first_and_an_interrupted_expire_is_finished_later() -> None:
    r = linear()
    rec = Recording(r.s)
    p = gather_and_plan(rec, Policy(retain_full=2), NOW)
    apply(rec, p)
    assert rec.calls[0] == manifest_key("B1")
    assert rec.calls.index(manifest_key("B1")) < rec.calls.index(backup_data_key("B1", 0))
    assert all(not c.startswith("wal/") for c in rec.calls[:3])  # WAL only after the backup is gone
    assert list_backup_ids(rec) == ["B2", "B3"]
    assert not [o for o in rec.list("backups/B1/")]

    broken = Recording(linear().s, fail_on_data=True)
    with pytest.raises(StorageError):
        apply(broken, gather_and_plan(broken, Policy(retain_full=2), NOW))
    assert list_backup_ids(broken) == ["B2", "B3"]  # B1 is no longer listed, its data is left
    assert [o.key for o in broken.list("backups/B1/")] == [backup_data_key("B1", 0), backup_data_key("B1", 1)]
    assert seg(1, 1) in {o.key.rsplit("/", 1)[1] for o in broken.list("wal/")}  # WAL untouched so far
    broken.fail_on_data = False
    later = gather_and_plan(broken, Policy(retain_full=2), time.time() + 2 * 86400)
    assert [(i.id, i.action) for i in later.incomplete] == [("B1", "delete")]
    apply(broken, later)
    assert not list(broken.list("backups/B1/"))
    assert seg(1, 1) not in {o.key.rsplit("/", 1)[1] for o in broken.list("wal/")}


# --------------------------------------------------------------------------- S3: thousands of objects

def test_expire_on_s3_across_listing_pages(moto_server: MotoServer, s3_bucket: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    s3 = S3Storage(s3_bucket, f"p/{uuid.uuid4().hex[:6]}", endpoint=moto_server.endpoint, region="us-east-1")
    s3.put(META_KEY, new_meta(1, 15, SEG).to_json())
    names = [seg(1, n) for n in range(1, 1031)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: s3.put(wal_key(n), b"x"), names))
    for bid, start in (("B1", 10), ("B2", 1021)):
        write_manifest(s3, manifest(bid, 1, start, start))
        s3.put(backup_data_key(bid, 0), b"d")
    p = gather_and_plan(s3, Policy(retain_full=1), NOW)
    assert len(p.wal_keys) == 1020  # over one listing page and one delete batch
    apply(s3, p)
    left = sorted(o.key.rsplit("/", 1)[1] for o in s3.list("wal/"))
    assert left == names[1020:]
    assert list_backup_ids(s3) == ["B2"]
    assert [o.key for o in s3.list("backups/")] == [backup_data_key("B2", 0), manifest_key("B2")]


# --------------------------------------------------------------------------- real PostgreSQL

def wal_segnos(storage: Storage) -> list[int]:
    return sorted(walname.segno(o.key.rsplit("/", 1)[1], SEG) for o in storage.list("wal/")
                  if (w := walname.parse(o.key.rsplit("/", 1)[1])) and w.kind == "segment")


def test_expire_keeps_exactly_the_policy_then_restore_inside_the_window(fs_repo: Repo, tmp_pg_dir: Path) -> None:
    repo = fs_repo
    pg = repo.cluster
    backups = []
    for i in range(3):
        repo.churn(1)
        backups.append(backup(repo))
        if i == 1:  # a point inside the window the kept backups cover
            pg.sql("insert into churn values (424242, 'inside the window')")
            mark = str(pg.scalar("select pg_current_wal_lsn()"))
            expected = pg.table_md5("churn")
            pg.sql("insert into churn values (999999, 'after the mark')")
    repo.churn(1)
    b1, b2, b3 = backups
    before = snapshot(repo.storage)

    r = repo.pitr("expire", "--retain-full", "2", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"expire  {b1.id}  full" in r.stdout and f"keep    {b2.id}" in r.stdout
    assert "dry run: nothing was deleted" in r.stdout
    assert snapshot(repo.storage) == before

    cfg = tmp_pg_dir / "pitr.toml"
    cfg.write_text("retain_full = 1\n")
    cfg.chmod(0o644)
    r = repo.pitr("--config", str(cfg), "expire", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["policy"] == {"retain_full": 1, "retain_days": None} and out["deleted"] is None
    assert [b["action"] for b in out["backups"]] == ["expire", "expire", "keep"]

    segs_before = wal_segnos(repo.storage)
    r = repo.pitr("expire", "--retain-full", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    keep_from = walname.segno(b2.start_wal, SEG)
    assert out["deleted"]["backups"] == 1
    assert list_backup_ids(repo.storage) == [b2.id, b3.id]
    assert not list(repo.storage.list(f"backups/{b1.id}/"))
    assert min(segs_before) < keep_from
    assert wal_segnos(repo.storage) == [n for n in segs_before if n >= keep_from]  # older gone, newer all kept
    assert scan_wal(repo.storage, SEG).timelines[1].gaps() == []

    r = repo.pitr("verify")
    assert r.returncode == 0, r.stdout + r.stderr  # the kept backups and all their WAL are intact
    r = repo.pitr("expire", "--retain-full", "2")
    assert r.returncode == 0 and "nothing to expire" in r.stdout
    r = repo.pitr("expire")
    assert r.returncode == 2 and "no retention policy is set" in r.stderr

    # a point between the two kept backups still restores, from the older kept one
    restored = PgCluster(pg.bindir, tmp_pg_dir / "restored", name="restored")
    try:
        r = repo.pitr("restore", "--pgdata", str(restored.data), "--target-lsn", mark, "--replay",
                      "--archive-mode", "off")
        assert r.returncode == 0, r.stdout + r.stderr
        assert b2.id in r.stdout
        restored.append_conf()  # its own port and socket, beside the original
        restored.start()
        assert restored.table_md5("churn") == expected
    finally:
        restored.ensure_stopped()
