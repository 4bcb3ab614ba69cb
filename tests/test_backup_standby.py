"""`pitr backup` of a hot standby (pg_basebackup -R streaming from a primary that archives into the
repository), on real PostgreSQL 15 and 18, the way a DBA runs it: as postgres, with the standby's
PGDATA and connection.

What a user would check: the standby's backup, taken while the primary writes, restores to a time
after a marker row with the primary's exact table contents; it is marked as taken from a standby;
a standby of another cluster, a paused one and a stuck one are refused with one sentence and
nothing listed; a promotion during the backup, or a cascaded standby following its promoted
upstream onto a new timeline, fails it cleanly and lists nothing; on an idle primary the backup
waits for the primary's next WAL switch. One primary and one standby per server version for the
whole module (throwaway standbys for the promotions); one S3 (moto) case on PostgreSQL 18.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pitr.repo.format import META_KEY
from pitr.repo.manifest import list_backup_ids, read_manifest
from pitr.repo.meta import new_meta
from pitr.storage.fs import FsStorage
from tests.support.faults import kill_env
from tests.support.pg import (
    PgCluster,
    as_pg_argv,
    chown_pg,
    make_standby,
    make_tmpdir,
    pg_env,
    pg_major,
    rmtree_pg,
    run_as_postgres,
    wait_replayed,
)
from tests.support.s3 import MotoServer

pytestmark = pytest.mark.pg


@dataclass
class Pair:
    primary: PgCluster
    standby: PgCluster
    base: Path
    repo: Path
    pitr_exe: Path
    env: dict[str, str]  # how pitr and the servers reach the repository

    def pitr(self, *args: str | Path, on: PgCluster | None = None, env: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """pitr as postgres, pointed at the standby (its PGDATA and socket) unless told otherwise."""
        target = on or self.standby
        return run_as_postgres([self.pitr_exe, *map(str, args)], env=target.env() | self.env | (env or {}),
                               cwd="/tmp", check=False, timeout=timeout)

    def backups(self) -> list[str]:
        return list_backup_ids(FsStorage(self.repo))

    def paused_backup(self, on: PgCluster, pause: Path, *args: str, when: str = "before") -> subprocess.Popen[str]:
        """`pitr backup ARGS` of `on` in the background, held at pg_backup_stop (before or after it) until
        the test creates PAUSE.go; returns once it is held there."""
        env = on.env() | self.env | kill_env("pitr.pg.conn:PgSession.backup_stop", when, pause=pause)
        proc = subprocess.Popen(as_pg_argv([self.pitr_exe, "backup", *args]), env=pg_env(env), cwd="/tmp",
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not Path(f"{pause}.reached").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                stdout, stderr = proc.communicate()
                raise AssertionError(f"pitr backup never reached pg_backup_stop\n{stdout}{stderr}")
            time.sleep(0.05)
        return proc


@contextlib.contextmanager
def started_pair(bindir: Path, pitr_exe: Path, env: dict[str, str] | None = None) -> Iterator[Pair]:
    """A primary archiving into a repository (a directory unless env names one) and its streaming standby."""
    base = make_tmpdir("pitr-sb-")
    repo = base / "repo"
    repo.mkdir()
    chown_pg(repo)
    env = env or {"PITR_REPO": str(repo)}
    # archive_timeout: the primary finishes a segment every few seconds when it has written anything,
    # which is what brings a standby backup's last segment to the archive (docs/backup-standby.md)
    primary = PgCluster(bindir, base / "primary", name="primary")
    primary.initdb(f"archive_mode = on\narchive_command = '{pitr_exe} wal-push %p'\narchive_timeout = 3\n")
    standby: PgCluster | None = None
    try:
        primary.start(env=env)
        r = run_as_postgres([pitr_exe, "init"], env=primary.env() | env, cwd="/tmp", check=False)
        assert r.returncode == 0, r.stderr
        primary.sql("create table t (id bigserial primary key, note text not null)")
        primary.sql("insert into t (note) select md5(g::text) from generate_series(1, 5000) g")
        # max_standby_streaming_delay = -1: a query conflict holds replay until the query ends (a stuck standby)
        standby = make_standby(primary, base / "standby", extra_conf="max_standby_streaming_delay = -1\n", env=env)
        yield Pair(primary, standby, base, repo, pitr_exe, env)
    finally:
        if standby is not None:
            standby.ensure_stopped()
        primary.ensure_stopped()
        rmtree_pg(base)


@pytest.fixture(scope="module")
def pair(pg_bindir: Path, pitr_exe: Path) -> Iterator[Pair]:
    with started_pair(pg_bindir, pitr_exe) as p:
        yield p


class Writer:
    """Inserts into t on the primary from another thread while a backup runs."""

    def __init__(self, pg: PgCluster) -> None:
        self.pg = pg
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with self.pg.connect() as conn:
            while not self.stop.is_set():
                conn.execute("insert into t (note) select 'load ' || g from generate_series(1, 100) g")
                time.sleep(0.02)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def server_time(pg: PgCluster) -> str:
    return str(pg.scalar("select to_char(clock_timestamp() at time zone 'UTC', "
                         "'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00'"))


def test_standby_backup_restores_to_a_time_after_a_marker(pair: Pair) -> None:
    """Backed up from the standby while the primary writes; restored to a time after a marker row,
    the table is exactly the primary's at that time, and later rows are not there."""
    before = pair.backups()
    backup_id = backup_under_load_and_restore(pair)
    assert pair.backups() == [*before, backup_id]
    m = read_manifest(FsStorage(pair.repo), backup_id)
    assert m.extra["from_standby"] is True and m.timeline == 1
    assert "BACKUP FROM: standby" in m.backup_label
    assert m.extra["pgdata"] == str(pair.standby.data)


def test_standby_backup_into_s3(pg_bindir: Path, pitr_exe: Path, moto_server: MotoServer) -> None:
    """The same with the primary archiving into S3 (moto), on one server version: the standby's backup
    lands in the bucket, is listed as taken from a standby, and restores to the time after the marker."""
    if pg_major(pg_bindir) != 18:
        pytest.skip("checked on PostgreSQL 18 only (the storage path does not depend on the version)")
    if not moto_server.up:
        moto_server.recover()
    env = {"PITR_REPO": f"s3://{moto_server.create_bucket(f'sb-{uuid.uuid4().hex[:12]}')}/prod"} | moto_server.env()
    with started_pair(pg_bindir, pitr_exe, env) as pair:
        backup_id = backup_under_load_and_restore(pair)
        r = pair.pitr("info", "--json")
        assert r.returncode == 0, r.stderr
        assert [b["id"] for b in json.loads(r.stdout)["backups"]] == [backup_id]


def backup_under_load_and_restore(pair: Pair) -> str:
    with Writer(pair.primary):
        time.sleep(0.5)
        r = pair.pitr("backup", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["from_standby"] is True and out["timeline"] == 1

    pair.primary.sql("insert into t (note) values ('marker')")
    time.sleep(1.1)
    target = server_time(pair.primary)
    at_target = pair.primary.table_md5("t")
    time.sleep(1.1)
    pair.primary.sql("insert into t (note) select 'after ' || g from generate_series(1, 300) g")
    pair.primary.wait_archived(pair.primary.switch_wal())

    dest = PgCluster(pair.primary.bindir, pair.base / "restored", name="restored")
    r = pair.pitr("restore", "--pgdata", dest.data, "--backup", out["id"], "--target-time", target, "--replay",
                  "--archive-mode", "off", "--replay-timeout", "240", "--json", on=pair.primary)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        dest.append_conf()
        dest.start(env={})
        assert dest.scalar("select pg_is_in_recovery()") is False
        assert dest.table_md5("t") == at_target
        assert dest.scalar("select count(*) from t where note = 'marker'") == 1
        assert dest.scalar("select count(*) from t where note like 'after %'") == 0
    finally:
        dest.ensure_stopped()
        rmtree_pg(dest.base)
    return str(out["id"])


def test_a_standby_of_another_cluster_is_refused(pair: Pair) -> None:
    """The repository holds another cluster: one sentence naming both, exit non-zero, nothing written."""
    other = pair.base / "other-repo"
    other.mkdir()
    sysid = int(pair.standby.scalar("select system_identifier from pg_control_system()"))
    FsStorage(other).put(META_KEY, new_meta(sysid + 1, pair.standby.major, 16 << 20).to_json())
    chown_pg(other, recursive=True)
    r = pair.pitr("backup", env={"PITR_REPO": str(other)})
    assert r.returncode != 0
    assert f"the standby replays the cluster with system identifier {sysid}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in other.iterdir()) == [META_KEY]


def test_a_paused_standby_is_refused(pair: Pair) -> None:
    before = pair.backups()
    pair.standby.sql("select pg_wal_replay_pause()")
    try:
        r = pair.pitr("backup")
    finally:
        pair.standby.sql("select pg_wal_replay_resume()")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "WAL replay on the standby is paused" in r.stderr and "pg_wal_replay_resume()" in r.stderr
    assert "Traceback" not in r.stderr
    assert pair.backups() == before


def test_a_stuck_standby_is_refused(pair: Pair) -> None:
    """Replay waits on a lock a standby query holds (max_standby_streaming_delay = -1) while the
    primary streams on: the backup is refused once replay stood still for standby_stall_timeout."""
    before = pair.backups()
    pair.primary.sql("create table stuck (x int)")
    wait_replayed(pair.primary, pair.standby)
    blocker = pair.standby.connect()
    try:
        blocker.autocommit = False
        blocker.execute("select count(*) from stuck")  # holds AccessShareLock until rollback
        pair.primary.sql("drop table stuck")
        pair.primary.sql("insert into t (note) select 'while stuck ' || g from generate_series(1, 100) g")
        deadline = time.monotonic() + 30
        while not pair.standby.scalar("select pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()"):
            assert time.monotonic() < deadline, "the standby never fell behind"
            time.sleep(0.1)
        r = pair.pitr("backup", env={"PITR_STANDBY_STALL_TIMEOUT": "3"})
    finally:
        blocker.rollback()
        blocker.close()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "WAL replay on the standby is stuck at" in r.stderr and "no progress in 3s" in r.stderr, r.stderr
    assert pair.backups() == before
    wait_replayed(pair.primary, pair.standby)


def boundary(lsn: str) -> bool:
    return int(lsn.split("/")[1], 16) % (16 << 20) == 0


def test_on_an_idle_primary_the_backup_waits_for_the_primarys_next_switch(pair: Pair) -> None:
    """Idle primary (no archive_timeout) whose last record is a WAL switch: the standby's backup stops
    exactly where the next segment begins, and a restore to the backup's end (--target immediate) reads
    the first record after it, in a segment the primary has not finished. The backup waits for it and
    completes once the primary switches (a standby cannot), then restores to its end; with a short
    --archive-timeout it fails naming the primary's archive_timeout and lists nothing."""
    p = pair.primary
    p.sql("alter system set archive_timeout = 0")
    p.sql("select pg_reload_conf()")
    bg: subprocess.Popen[str] | None = None
    try:
        for _ in range(3):  # the primary's bgwriter may log a record between the switch and pg_backup_start
            p.sql("insert into t (note) select 'boundary ' || g from generate_series(1, 200) g")
            state = p.table_md5("t")  # sets hint bits (WAL with data checksums) before the switch
            p.wait_archived(p.switch_wal())
            wait_replayed(p, pair.standby)
            # pause right after pg_backup_stop, so the primary's switch below comes after the stop point
            pause = pair.base / f"pause-idle-{uuid.uuid4().hex[:6]}"
            bg = pair.paused_backup(pair.standby, pause, "--json", "--archive-timeout", "120", when="after")
            Path(f"{pause}.go").touch()
            time.sleep(3)
            assert bg.poll() is None, bg.communicate()  # waiting for the primary
            p.switch_wal()
            stdout, stderr = bg.communicate(timeout=120)
            assert bg.returncode == 0, stdout + stderr
            out = json.loads(stdout)
            if boundary(out["stop_lsn"]):
                break
        assert boundary(out["stop_lsn"]), out  # the case under test
        before = pair.backups()
        r = pair.pitr("backup", "--archive-timeout", "3")
    finally:
        if bg is not None and bg.poll() is None:
            bg.kill()
        p.sql("alter system reset archive_timeout")
        p.sql("select pg_reload_conf()")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "did not reach the archive within 3s" in r.stderr and "the primary's archive_timeout" in r.stderr
    assert pair.backups() == before

    dest = PgCluster(p.bindir, pair.base / "boundary", name="boundary")
    r = pair.pitr("restore", "--pgdata", dest.data, "--backup", out["id"], "--target", "immediate", "--replay",
                  "--archive-mode", "off", "--replay-timeout", "240", "--json", on=p)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        dest.append_conf()
        dest.start(env={})
        assert dest.table_md5("t") == state
    finally:
        dest.ensure_stopped()
        rmtree_pg(dest.base)


def test_promotion_during_the_backup_fails_it_cleanly(pair: Pair) -> None:
    """The standby is promoted after pg_backup_start, before pg_backup_stop: the backup fails with one
    sentence, exit 1, nothing listed and nothing left of it in the repository."""
    before = pair.backups()
    dirs = {d.name for d in (pair.repo / "backups").iterdir()}
    # a standby of its own (promotion ends it), which archives nothing once promoted
    victim = make_standby(pair.primary, pair.base / "victim", name="victim", extra_conf="archive_mode = off\n")
    try:
        pause = pair.base / "pause"
        proc = pair.paused_backup(victim, pause)
        try:
            assert {d.name for d in (pair.repo / "backups").iterdir()} - dirs  # it had started writing
            assert victim.scalar("select pg_promote(true, 60)") is True
            Path(f"{pause}.go").touch()
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        victim.ensure_stopped()
    assert proc.returncode == 1, stdout + stderr
    assert "the standby was promoted while it was being copied" in stderr, stderr
    assert "Traceback" not in stderr
    assert pair.backups() == before
    # the partial backup's objects are gone (its directory at most keeps nothing but the claim marker)
    leftovers = [p for d in (pair.repo / "backups").iterdir() if d.name not in dirs for p in d.rglob("*")
                 if p.is_file() and p.name != "started"]
    assert leftovers == []


def test_a_timeline_switch_during_the_backup_fails_it_cleanly(pair: Pair) -> None:
    """A cascaded standby follows its upstream onto a new timeline (the upstream was promoted) while
    it is being backed up: the backup fails with one sentence and lists nothing (a manifest names one
    timeline)."""
    before = pair.backups()
    upstream = make_standby(pair.primary, pair.base / "upstream", name="upstream", extra_conf="archive_mode = off\n")
    cascaded: PgCluster | None = None
    try:
        cascaded = make_standby(upstream, pair.base / "cascaded", name="cascaded")
        pause = pair.base / "pause-tli"
        proc = pair.paused_backup(cascaded, pause)
        try:
            assert upstream.scalar("select pg_promote(true, 60)") is True
            upstream.sql("create table after_promotion as select 1 x")
            upstream.sql("checkpoint")
            deadline = time.monotonic() + 60
            while cascaded.scalar("select received_tli from pg_stat_wal_receiver") != 2:
                assert time.monotonic() < deadline, "the cascaded standby did not follow onto timeline 2"
                time.sleep(0.2)
            wait_replayed(upstream, cascaded)
            cascaded.sql("checkpoint")  # a restartpoint on timeline 2
            Path(f"{pause}.go").touch()
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        if cascaded is not None:
            cascaded.ensure_stopped()
        upstream.ensure_stopped()
    assert proc.returncode == 1, stdout + stderr
    assert "the standby moved from timeline 1 to 2 while it was being copied" in stderr, stderr
    assert "Traceback" not in stderr
    assert pair.backups() == before
