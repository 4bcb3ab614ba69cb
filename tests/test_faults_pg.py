"""Fault suite on real PostgreSQL: kill -9 at each step of backup and restore, the disk filling up
under a backup and a restore, and the repository vanishing in the middle of a recovery.

One source cluster per server version (1 MiB WAL segments, archiving through `pitr wal-push` into
a directory repository, one backup, then a run of later segments) is shared by the module. Each
test ends with what a user would check:
- nothing acknowledged that is not stored: a backup `pitr info` lists passes `pitr verify`;
- nothing presented as complete that is not: a killed backup is not listed, a killed restore
  leaves `pitr-restore.incomplete` in DIR, PostgreSQL will not start on it (before pg_control is
  written), pitr refuses to restore over it without --delta, and a re-run with --delta restores
  the final state;
- PostgreSQL never promoted early: while the repository is gone the server stays in recovery or
  stops, and no new timeline appears.
The kill-step matrices run on PostgreSQL 15 only (their code paths do not depend on the server
version); the vanished-repository recovery runs on 15 and 18.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pitr.ops.wal import archive
from pitr.repo.meta import read_meta
from pitr.storage.fs import FsStorage
from pitr.storage.s3 import S3Storage
from tests.support.faults import MARKER, fill_disk, kill_env, run, tmpfs
from tests.support.pg import PgCluster, chown_pg, make_tmpdir, rmtree_pg
from tests.support.s3 import MotoServer

pytestmark = pytest.mark.pg
AFTER_BACKUP_SEGMENTS = 14  # more than restore's default look-ahead (8) past the first fetch


@dataclass
class Source:
    cluster: PgCluster
    base: Path
    repo: Path
    env: dict[str, str]
    pitr_exe: Path
    final_md5: str = ""
    on_tmpfs: bool = False
    n: int = 0

    @property
    def storage(self) -> FsStorage:
        return FsStorage(self.repo)

    def pitr(self, *args: str | Path, env: dict[str, str] | None = None,
             timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return run([self.pitr_exe, *args], self.cluster.env() | self.env | (env or {}), timeout=timeout)

    def pitr_killed(self, step: tuple[str, str, int, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
        """pitr ARGS SIGKILLed at step (target, before/after, nth call, match); the kill point must be reached."""
        target, when, nth, match = step
        r = self.pitr(*args, env=kill_env(target, when, nth, match))
        assert r.returncode == -9, f"the kill point was not reached: {r.returncode}\n{r.stdout}{r.stderr}"
        return r

    def listed(self) -> list[str]:
        r = self.pitr("info", "--json")
        assert r.returncode == 0, r.stderr
        return [b["id"] for b in json.loads(r.stdout)["backups"]]

    def new_dir(self, name: str) -> PgCluster:
        self.n += 1
        return PgCluster(self.cluster.bindir, self.base / f"{name}{self.n}", name=name)


@pytest.fixture(scope="module")
def src(pg_bindir: Path, pitr_exe: Path) -> Iterator[Source]:
    base = make_tmpdir("pitr-fpg-")
    pg = PgCluster(pg_bindir, base / "src", name="src")
    mnt = base / "repo-fs"
    mounts = contextlib.ExitStack()
    try:  # the repository lives on its own small filesystem, so a test can fill it up
        mounts.enter_context(tmpfs(mnt, "256m", 0o700))
        on_tmpfs = True
    except pytest.skip.Exception:
        mnt.mkdir(exist_ok=True)
        on_tmpfs = False
    chown_pg(mnt)
    repo = mnt / "repo"
    env = {"PITR_REPO": str(repo)}
    pg.run("initdb", "-D", pg.data, "-A", "trust", "-U", "postgres", "--no-sync", "--locale=C",
           "--encoding=UTF8", "--wal-segsize=1", "--data-checksums")
    pg.append_conf(f"wal_level = replica\nfsync = off\narchive_mode = on\nwal_keep_size = '256MB'\n"
                   f"archive_command = '{pitr_exe} wal-push %p'\ncheckpoint_timeout = 30min\n")
    s = Source(pg, base, repo, env, pitr_exe, on_tmpfs=on_tmpfs)
    try:
        pg.start(env=env)
        r = s.pitr("init")
        assert r.returncode == 0, r.stderr
        pg.sql("create table t (id int, v text)")
        pg.sql("insert into t select g, md5(g::text) from generate_series(1, 20000) g")
        r = s.pitr("backup")
        assert r.returncode == 0, r.stdout + r.stderr
        last = ""
        for i in range(AFTER_BACKUP_SEGMENTS):
            pg.sql(f"insert into t select g, 'after {i}' from generate_series(1, 300) g")
            last = pg.switch_wal()
        pg.wait_archived(last)
        s.final_md5 = pg.table_md5("t")
        yield s
    finally:
        pg.ensure_stopped()
        mounts.close()
        rmtree_pg(base)


def assert_acknowledged_wal_readable(s: Source) -> None:
    """Every segment PostgreSQL counts as archived (.done) comes back from the repository byte for
    byte, through the code path of `wal-fetch`."""
    meta = read_meta(s.storage)
    status = s.cluster.data / "pg_wal" / "archive_status"
    done = sorted(p.name[:-5] for p in status.glob("*.done"))
    assert done
    out = s.base / "fetched"
    out.mkdir(exist_ok=True)
    for name in done:
        archive.fetch(s.storage, meta, name, out / name)
        assert (out / name).read_bytes() == (s.cluster.data / "pg_wal" / name).read_bytes(), name
        (out / name).unlink()


def only15(pg_version: str) -> None:
    if pg_version != "15":
        pytest.skip("kill-step matrix: checked on PostgreSQL 15 only (the code path does not depend on the version)")


def wait_no_backup_session(pg: PgCluster) -> None:
    deadline = time.monotonic() + 20
    while pg.scalar("select count(*) from pg_stat_activity where application_name = 'pitr backup'"):
        assert time.monotonic() < deadline, "a killed backup's session is still open on the server"
        time.sleep(0.1)


def wait_promoted(pg: PgCluster, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not pg.scalar("select pg_is_in_recovery()"):
                return
        except Exception:  # noqa: BLE001 - not accepting connections yet
            if not pg.is_running() and time.monotonic() > deadline - timeout + 10:
                raise AssertionError(f"the restored server stopped\n{pg.log_tail()}") from None
        assert time.monotonic() < deadline, pg.log_tail()
        time.sleep(0.2)


def start_and_check(s: Source, dest: PgCluster) -> None:
    """Start the restored directory, let it replay to the end of the archive, compare the table."""
    dest.append_conf()  # this copy's own port and socket
    dest.start(env=s.env)
    try:
        wait_promoted(dest)
        assert dest.table_md5("t") == s.final_md5
    finally:
        dest.ensure_stopped()


def pg_ctl_start_fails(dest: PgCluster) -> bool:
    """pg_ctl start on DIR as a user would try it (port and socket given on the command line, so the
    directory is not touched); True when the server did not come up."""
    opts = f"-c port={dest.port} -c listen_addresses='' -c unix_socket_directories={dest.sockdir}"
    r = dest.run("pg_ctl", "start", "-D", dest.data, "-l", dest.logfile, "-w", "-t", "20", "-o", opts, check=False)
    if r.returncode == 0:
        dest.ensure_stopped()
        return False
    return not dest.is_running()


# --------------------------------------------------------------------------- backup

BACKUP_STEPS = {
    "id-claimed": ("pitr.ops.base.backup:claim_backup_id", "after", 1, ""),
    "some-files-stored": ("pitr.storage.fs:FsStorage.put", "after", 2, "/data/"),
    "waiting-for-wal": ("pitr.ops.base.backup:wait_for_wal", "before", 1, ""),
    "before-manifest": ("pitr.ops.base.backup:write_manifest", "before", 1, ""),
    "manifest-written": ("pitr.ops.base.backup:write_manifest", "after", 1, ""),
}


@pytest.mark.parametrize("step", list(BACKUP_STEPS))
def test_backup_killed_at_each_step(src: Source, pg_version: str, step: str) -> None:
    only15(pg_version)
    before = src.listed()
    r = src.pitr_killed(BACKUP_STEPS[step], "backup")
    assert r.stdout.strip() == "", "a killed backup printed an ID as if it had completed"
    after = src.listed()
    new = [b for b in after if b not in before]
    if step == "manifest-written":
        assert len(new) == 1, "the manifest is the commit point: once written, the backup is listed"
    else:
        assert new == [], f"a backup killed at {step} is listed: {new}"
    wait_no_backup_session(src.cluster)
    v = src.pitr("verify")
    assert v.returncode == 0, f"verify fails on what info lists\n{v.stdout}{v.stderr}"


# --------------------------------------------------------------------------- restore

RESTORE_STEPS = {
    "marker-and-directories": ("pitr.ops.recovery.restore:prepare_tree", "after", 1, ""),
    "some-files": ("pitr.ops.recovery.restore_files:FileWriter._settle", "after", 30, ""),
    "recovery-settings": ("pitr.ops.recovery.restore:write_recovery", "after", 1, ""),
    "synced-before-pg-control": ("pitr.ops.recovery.restore:sync_filesystems", "after", 1, ""),
    "pg-control-written": ("pitr.ops.recovery.restore:fsync_dir", "after", 1, ""),
}


@pytest.mark.parametrize("step", list(RESTORE_STEPS))
def test_restore_killed_at_each_step(src: Source, pg_version: str, step: str) -> None:
    only15(pg_version)
    dest = src.new_dir("rk")
    src.pitr_killed(RESTORE_STEPS[step], "restore", "--pgdata", dest.data, "--archive-mode", "off")
    assert (dest.data / MARKER).exists(), "a killed restore must leave DIR marked incomplete"
    if step != "pg-control-written":
        assert not (dest.data / "global" / "pg_control").exists()
        assert pg_ctl_start_fails(dest), "PostgreSQL started on a half-restored directory"
    again = src.pitr("restore", "--pgdata", dest.data, "--archive-mode", "off")
    assert again.returncode != 0 and "interrupted" in again.stderr, again.stderr
    assert (dest.data / MARKER).exists()
    if step == "some-files":  # the --delta run that finishes it can be killed too, and finished again
        r = src.pitr("restore", "--pgdata", dest.data, "--archive-mode", "off", "--delta",
                     env=kill_env("pitr.ops.recovery.restore_files:FileWriter._settle", "after", 60))
        assert r.returncode == -9, r.stderr
        assert (dest.data / MARKER).exists() and not (dest.data / "global" / "pg_control").exists()
    delta = src.pitr("restore", "--pgdata", dest.data, "--archive-mode", "off", "--delta")
    assert delta.returncode == 0, delta.stderr
    assert not (dest.data / MARKER).exists() and (dest.data / "global" / "pg_control").exists()
    start_and_check(src, dest)
    rmtree_pg(dest.base)


def test_restore_onto_a_disk_that_fills_up(src: Source, pg_version: str) -> None:
    """The destination's filesystem fills up while files are written: the restore fails, stays marked."""
    only15(pg_version)
    dest = src.new_dir("rfull")
    with tmpfs(dest.base / "mnt", "200m", 0o700):
        chown_pg(dest.base / "mnt")
        data = dest.base / "mnt" / "data"
        filler = dest.base / "mnt" / "filler"
        r = src.pitr("restore", "--pgdata", data, "--archive-mode", "off",
                     env=kill_env("pitr.ops.recovery.restore_files:FileWriter._settle", "after", 20, fill=filler))
        assert r.returncode not in (0, -9), r.stdout + r.stderr
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
        assert "space" in r.stderr.lower(), r.stderr
        assert (data / MARKER).exists() and not (data / "global" / "pg_control").exists()
        filler.unlink()
        delta = src.pitr("restore", "--pgdata", data, "--archive-mode", "off", "--delta")
        assert delta.returncode == 0, delta.stderr
        assert not (data / MARKER).exists()


def test_backup_into_a_repository_that_fills_up(src: Source, pg_version: str) -> None:
    """The repository's disk fills up mid-backup: the backup fails, is not listed, verify still passes,
    and once space is back archiving and backups work again."""
    only15(pg_version)
    if not src.on_tmpfs:
        pytest.skip("the repository is not on its own tmpfs here (mount not permitted)")
    filler = src.repo.parent / "filler"
    before = src.listed()
    pg = src.cluster
    failed = pg.scalar("select failed_count from pg_stat_archiver")
    try:
        r = src.pitr("backup", env=kill_env("pitr.storage.fs:FsStorage.put", "after", 2, "/data/", fill=filler))
        assert r.returncode not in (0, -9), r.stdout + r.stderr
        assert r.stdout.strip() == ""
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
        assert "disk is full" in r.stderr, r.stderr
        assert src.listed() == before
        # PostgreSQL's archiver meets the full disk too (the failed backup freed what it had written:
        # fill it again): it must see failures, not acknowledgements
        fill_disk(filler)
        pg.sql("insert into t select g, 'disk full' from generate_series(1, 300) g")
        during = pg.switch_wal()
        deadline = time.monotonic() + 60
        while pg.scalar("select failed_count from pg_stat_archiver") == failed:
            assert time.monotonic() < deadline, "the archiver never tried while the disk was full"
            time.sleep(0.2)
        assert (pg.data / "pg_wal" / "archive_status" / f"{during}.ready").exists()
    finally:
        filler.unlink(missing_ok=True)
    wait_no_backup_session(src.cluster)
    seg = src.cluster.switch_wal()
    src.cluster.wait_archived(seg, timeout=90)
    assert_acknowledged_wal_readable(src)
    v = src.pitr("verify")
    assert v.returncode == 0, v.stdout + v.stderr
    src.final_md5 = src.cluster.table_md5("t")
    r = src.pitr("backup")
    assert r.returncode == 0, r.stderr
    assert len(src.listed()) == len(before) + 1


# --------------------------------------------------------------------------- the repository vanishes

GATE = """#!/bin/sh
# restore_command for the test: run pitr's own command, then hold recovery after the first segment
# it fetched until the test releases it (by then the repository is gone)
f="$1"; p="$2"
{command}
rc=$?
case "$f" in
  ????????????????????????) if [ $rc -eq 0 ] && [ ! -e {gate}/released ]; then
      touch {gate}/holding
      while [ ! -e {gate}/released ]; do sleep 0.05; done
  fi ;;
esac
exit $rc
"""


def gate_recovery(dest: PgCluster, gate: Path) -> None:
    """Wrap the restore_command pitr wrote into GATE (same command, same prefetch setting)."""
    auto = dest.data / "postgresql.auto.conf"
    lines = auto.read_text().splitlines()
    idx = next(i for i, line in enumerate(lines) if line.startswith("restore_command"))
    m = re.match(r"restore_command\s*=\s*'((?:[^']|'')*)'", lines[idx])
    assert m, lines[idx]
    command = m.group(1).replace("''", "'").replace("%f", '"$f"').replace("%p", '"$p"')
    script = gate / "restore.sh"
    script.write_text(GATE.format(command=command, gate=gate))
    script.chmod(0o755)
    lines[idx] = f"restore_command = '{script} %f %p'"
    auto.write_text("\n".join(lines) + "\n")
    chown_pg(gate, recursive=True)


class VanishingRepo:
    """The source's repository as seen by one restore: the directory itself, or a copy of its objects
    under an S3 prefix (same format); gone() removes it the way an operator or an outage would."""

    def __init__(self, src: Source, kind: str, moto: MotoServer | None, bucket: str | None) -> None:
        self.src, self.kind = src, kind
        self.moved = src.repo.with_name("repo.gone")
        self.env = dict(src.env)
        if kind == "s3":
            assert moto is not None and bucket is not None
            self.s3 = S3Storage(bucket, "prod/main", endpoint=moto.endpoint)
            self.objects = {o.key: src.storage.get(o.key) for o in src.storage.list("")}
            self.back()
            self.env = moto.env() | {"PITR_REPO": f"s3://{bucket}/prod/main"}

    def gone(self) -> None:
        if self.kind == "fs":
            self.src.repo.rename(self.moved)  # unmounted, or moved away
        else:
            self.s3.delete_many([o.key for o in self.s3.list("")])  # the prefix wiped

    def back(self) -> None:
        if self.kind == "fs":
            if self.moved.exists():
                self.moved.rename(self.src.repo)
        else:
            for key, data in self.objects.items():
                self.s3.put(key, data)


VANISH_CASES = [("fs", "8", "15"), ("fs", "8", "18"), ("s3", "8", "15"), ("s3", "0", "18")]


@pytest.mark.parametrize(("kind", "prefetch", "only"), VANISH_CASES,
                         ids=[f"{k}-prefetch{p}-{o}" for k, p, o in VANISH_CASES])
def test_repository_vanishes_mid_recovery(src: Source, pg_version: str, kind: str, prefetch: str, only: str,
                                          request: pytest.FixtureRequest) -> None:
    """The repository disappears (directory unmounted or moved; S3 prefix wiped) after recovery fetched
    its first segment, with restore's look-ahead on (8, the default) or off.

    PostgreSQL must not take that for the end of the archive: it stays in recovery or stops, and
    no new timeline appears. Once the directory repository is back, the same directory recovers fully.
    """
    if pg_version != only:
        pytest.skip(f"case run on PostgreSQL {only}")
    moto: MotoServer | None = None
    bucket: str | None = None
    mp = pytest.MonkeyPatch()
    if kind == "s3":
        moto = request.getfixturevalue("moto_server")
        bucket = request.getfixturevalue("s3_bucket")
        for k, v in moto.env().items():
            mp.setenv(k, v)
    try:
        _vanish_mid_recovery(src, VanishingRepo(src, kind, moto, bucket), prefetch)
    finally:
        mp.undo()


def _vanish_mid_recovery(src: Source, repo: VanishingRepo, prefetch: str) -> None:
    dest = src.new_dir("rv")
    r = run([src.pitr_exe, "restore", "--pgdata", dest.data, "--archive-mode", "off", "--prefetch", prefetch],
            repo.env)
    assert r.returncode == 0, r.stderr
    gate = dest.base / "gate"
    gate.mkdir()
    gate_recovery(dest, gate)
    dest.append_conf()
    dest.start(env=repo.env | {"PITR_FETCH_RETRIES": "0"}, wait=False)
    try:
        deadline = time.monotonic() + 60
        while not (gate / "holding").exists():
            assert time.monotonic() < deadline, f"recovery never fetched a segment\n{dest.log_tail()}"
            time.sleep(0.05)
        time.sleep(0.5)  # let the look-ahead fill its window while the repository is there
        repo.gone()
        (gate / "released").touch()
        deadline = time.monotonic() + 40
        while dest.is_running() and time.monotonic() < deadline and "selected new timeline ID" not in dest.log_text():
            time.sleep(0.2)
        log = dest.log_text()
        assert "selected new timeline ID" not in log and "archive recovery complete" not in log, log
        assert not list((dest.data / "pg_wal").glob("*.history")), "a new timeline was created"
        if dest.is_running():
            assert dest.scalar("select pg_is_in_recovery()") is True
        else:
            assert "could not restore file" in log and "exit code 128" in log, log
    finally:
        dest.ensure_stopped()
        repo.back()
    if repo.kind == "s3":
        rmtree_pg(dest.base)  # the S3 prefix is a copy; recovering again from it adds nothing but time
        return
    # with the repository back, the same directory recovers fully
    dest.start(env=repo.env)
    try:
        wait_promoted(dest)
        assert dest.table_md5("t") == src.final_md5
    finally:
        dest.ensure_stopped()
    rmtree_pg(dest.base)
