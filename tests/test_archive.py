"""End to end on PostgreSQL 15 and 18: the server itself archives through `pitr wal-push %p` and
restores through `pitr wal-fetch %f %p`, into a local directory and into S3 (moto on 127.0.0.1).

One archiving cluster per (server version, repo kind) is shared by the tests of this module; each
test checks what a DBA would: bytes fetched back equal pg_wal's, no gap in the archive, exit codes
PostgreSQL relies on, objects untouched after a refused push, and that an S3 outage during
recovery stops PostgreSQL instead of letting it promote early.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pitr.pg import walname
from pitr.repo.format import wal_key
from pitr.storage.base import Storage
from pitr.storage.fs import FsStorage
from tests.conftest import ClusterFactory
from tests.support.maint import new_repo
from tests.support.pg import PgCluster, chown_pg, make_tmpdir, rmtree_pg, run_as_postgres
from tests.support.s3 import MotoServer

pytestmark = pytest.mark.pg


@dataclass
class Archiving:
    """A running cluster whose archive_command is pitr wal-push into `storage`."""

    kind: str
    cluster: PgCluster
    base: Path
    env: dict[str, str]  # what pitr needs to reach the repo (PostgreSQL's environment too)
    storage: Storage
    pitr_exe: Path
    extra: dict[str, str] = field(default_factory=dict)

    def pitr(self, *args: str | Path, cwd: Path | str = "/tmp", env: dict[str, str] | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run pitr as postgres, the way PostgreSQL runs archive/restore commands."""
        return run_as_postgres([self.pitr_exe, *args], env=self.env | (env or {}), cwd=cwd, check=False,
                               timeout=timeout)

    def segments(self) -> list[str]:
        """Archived segment names (no .history/.backup/.partial), sorted."""
        names = [o.key.rsplit("/", 1)[1] for o in self.storage.list("wal/")]
        return sorted(n for n in names if (w := walname.parse(n)) and w.kind == "segment")

    def archive_some(self, n: int = 2) -> str:
        """Write a little, switch segments n times, wait until the last one is archived."""
        seg = ""
        for _ in range(n):
            self.cluster.sql("insert into churn select g, md5(g::text) from generate_series(1, 500) g")
            seg = self.cluster.switch_wal()
        self.cluster.wait_archived(seg)
        return seg


def assert_no_gap(segments: list[str], seg_size: int) -> None:
    numbers = [walname.segno(s, seg_size) for s in segments]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), f"gap in the archive: {segments}"


def start_archiving(kind: str, bindir: Path, pitr_exe: Path, moto: MotoServer | None) -> Archiving:
    base = make_tmpdir("pitr-arch-")
    env, storage = new_repo(kind, base, moto, "prod/main")
    pg = PgCluster(bindir, base / "pg", name=f"arch-{kind}")
    # wal_keep_size: keep every segment in pg_wal so the test can compare them with the archive
    pg.initdb(f"archive_mode = on\narchive_command = '{pitr_exe} wal-push %p'\nwal_keep_size = '2GB'\n")
    arch = Archiving(kind, pg, base, env, storage, pitr_exe)
    try:
        pg.start(env=env)
        r = arch.pitr("init", env=pg.env())
        assert r.returncode == 0, r.stderr
        assert "initialized for cluster" in r.stdout
        pg.sql("create table churn (id int, v text)")
        pg.pgbench(["-i", "-s", "1", "-q"])
        pg.pgbench(["-T", "3", "-c", "2", "-n"])
        arch.archive_some(3)
    except BaseException:
        pg.ensure_stopped()
        raise
    return arch


@pytest.fixture(scope="module")
def arch_fs(pg_bindir: Path, pitr_exe: Path) -> Iterator[Archiving]:
    arch = start_archiving("fs", pg_bindir, pitr_exe, None)
    yield arch
    arch.cluster.ensure_stopped()
    rmtree_pg(arch.base)


@pytest.fixture(scope="module")
def arch_s3(pg_bindir: Path, pitr_exe: Path, moto_env: MotoServer) -> Iterator[Archiving]:
    if not moto_env.up:
        moto_env.recover()
    arch = start_archiving("s3", pg_bindir, pitr_exe, moto_env)
    yield arch
    if not moto_env.up:
        moto_env.recover()
    arch.cluster.ensure_stopped()
    rmtree_pg(arch.base)


@pytest.fixture(params=["fs", "s3"])
def arch(request: pytest.FixtureRequest, pg_version: str) -> Archiving:
    return request.getfixturevalue(f"arch_{request.param}")  # type: ignore[no-any-return]


def seg_size(a: Archiving) -> int:
    return int(a.cluster.scalar("select setting::int * 1 from pg_settings where name = 'wal_segment_size'"))


# --------------------------------------------------------------------------- tests


def test_every_archived_segment_comes_back_byte_identical(arch: Archiving) -> None:
    a = arch
    size = seg_size(a)
    last = a.archive_some(1)
    segs = a.segments()
    assert segs[0] == "000000010000000000000001"  # initdb's first segment: nothing was skipped
    assert segs[-1] == last
    assert len(segs) >= 5
    assert_no_gap(segs, size)
    out = a.base / f"fetched-{uuid.uuid4().hex[:6]}"
    out.mkdir()
    chown_pg(out)
    # one shell as postgres fetches them all through the real restore_command path
    script = 'for f in "$@"; do "$PITR" wal-fetch "$f" "$OUT/$f" || exit $?; done'
    r = run_as_postgres(["sh", "-c", script, "sh", *segs], env=a.env | {"PITR": str(a.pitr_exe), "OUT": str(out)},
                        check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    for name in segs:
        original = (a.cluster.data / "pg_wal" / name).read_bytes()
        fetched = (out / name).read_bytes()
        assert len(fetched) == size and fetched == original, name
    # stored compressed, not as the raw file
    stored = sum(o.size for o in a.storage.list("wal/0000000100000000/"))
    assert stored < len(segs) * size * 0.8
    shutil.rmtree(out)


def test_repush_identical_succeeds_and_conflicting_is_refused(arch: Archiving) -> None:
    a = arch
    name = a.segments()[-2]
    key = wal_key(name)
    before = a.storage.get(key)
    # exactly as PostgreSQL calls it: relative %p, data directory as working directory
    r = a.pitr("wal-push", f"pg_wal/{name}", cwd=a.cluster.data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "error" not in r.stderr
    # same name, one byte different past the page header
    evil = a.base / f"evil-{uuid.uuid4().hex[:6]}"
    evil.mkdir()
    data = bytearray((a.cluster.data / "pg_wal" / name).read_bytes())
    data[100_000] ^= 0xFF
    (evil / name).write_bytes(bytes(data))
    chown_pg(evil, recursive=True)
    r = a.pitr("wal-push", evil / name)
    assert r.returncode == 1, r.stderr
    assert f"the archive already holds a different {name}; nothing was overwritten" in r.stderr
    assert "Traceback" not in r.stderr
    assert a.storage.get(key) == before
    shutil.rmtree(evil)


def test_history_partial_and_backup_files(arch: Archiving) -> None:
    a = arch
    work = a.base / f"misc-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    tli = 40 + uuid.uuid4().int % 1000  # a timeline this repo has not seen
    hist = work / walname.history_name(tli)
    hist.write_text(f"{tli - 1}\t0/5000000\tno recovery target specified\n")
    seg = a.segments()[1]
    partial = work / f"{seg}.partial"
    partial.write_bytes((a.cluster.data / "pg_wal" / seg).read_bytes())
    backup = work / f"{seg}.00000028.backup"
    start = walname.segment_start_lsn(seg) + 0x28  # a .backup file must match its name (wal-push checks)
    backup.write_text(f"START WAL LOCATION: {walname.format_lsn(start)} (file {seg})\n"
                      f"STOP WAL LOCATION: {walname.format_lsn(start + 0x100)} (file {seg})\n")
    chown_pg(work, recursive=True)
    for f in (hist, partial, backup):
        r = a.pitr("wal-push", f)
        assert r.returncode == 0, r.stderr
        got = work / f"got-{f.name}"
        r = a.pitr("wal-fetch", f.name, got)
        assert r.returncode == 0, r.stderr
        assert got.read_bytes() == f.read_bytes()
    assert a.storage.stat(f"wal/history/{hist.name}") is not None
    # a timeline history is never overwritten, even by a well-formed one
    original = a.storage.get(wal_key(hist.name))
    hist.write_text(f"{tli - 1}\t0/6000000\tno recovery target specified\n")
    r = a.pitr("wal-push", hist)
    assert r.returncode == 1 and "already holds a different" in r.stderr
    assert a.storage.get(wal_key(hist.name)) == original
    shutil.rmtree(work)


def test_missing_segment_exits_1_and_creates_nothing(arch: Archiving) -> None:
    a = arch
    dest = a.base / "pg_wal_RECOVERYXLOG"
    r = a.pitr("wal-fetch", "0000000100000099000000FF", dest)
    assert r.returncode == 1, r.stderr
    assert "error" not in r.stderr
    assert not dest.exists()
    assert not [p for p in a.base.iterdir() if "RECOVERYXLOG" in p.name]  # no temp file either
    r = a.pitr("wal-fetch", "000000AA.history", dest)
    assert r.returncode == 1 and not dest.exists()


def test_init_idempotent_and_foreign_cluster_refused(arch_fs: Archiving, cluster_factory: ClusterFactory) -> None:
    a = arch_fs
    r = a.pitr("init", env=a.cluster.env())
    assert r.returncode == 0 and "already initialized" in r.stdout, r.stderr
    meta_before = a.storage.get("pitr.json")

    other = cluster_factory("other").initdb()
    other.start()
    r = a.pitr("init", env=other.env())
    assert r.returncode == 1, r.stderr
    assert "belongs to the cluster with system identifier" in r.stderr and "hint:" in r.stderr
    # its WAL, under a name the repo already holds, is refused before anything is written
    name = "000000010000000000000001"
    before = a.storage.get(wal_key(name))
    r = a.pitr("wal-push", f"pg_wal/{name}", cwd=other.data)
    assert r.returncode == 1
    assert f"refusing to archive {name}" in r.stderr and "belongs to the cluster with system identifier" in r.stderr
    assert a.storage.get(wal_key(name)) == before
    assert a.storage.get("pitr.json") == meta_before


def test_one_mib_segments_end_to_end(pg_version: str, cluster_factory: ClusterFactory, pitr_exe: Path) -> None:
    """A cluster initialised with --wal-segsize=1: names, sizes and headers follow its segment size."""
    if pg_version != "15":
        pytest.skip("segment-size handling does not depend on the server version; run once")
    pg = cluster_factory("seg1")
    repo = pg.base / "repo"
    pg.run("initdb", "-D", pg.data, "-A", "trust", "-U", "postgres", "--no-sync", "--locale=C",
           "--encoding=UTF8", "--wal-segsize=1")
    pg.append_conf(f"wal_level = replica\nfsync = off\narchive_mode = on\nwal_keep_size = '1GB'\n"
                   f"archive_command = '{pitr_exe} wal-push %p'\n")
    env = {"PITR_REPO": str(repo)}
    pg.start(env=env)
    r = run_as_postgres([pitr_exe, "init", "--json"], env=env | pg.env(), check=False)
    assert r.returncode == 0, r.stderr
    assert '"wal_segment_size": 1048576' in r.stdout
    pg.sql("create table t as select g from generate_series(1, 50000) g")  # a few MiB of WAL
    last = pg.switch_wal()
    pg.wait_archived(last)
    a = Archiving("fs", pg, pg.base, env, FsStorage(repo), pitr_exe)
    segs = a.segments()
    assert len(segs) >= 4 and segs[-1] == last
    assert_no_gap(segs, 1 << 20)
    out = pg.base / "fetched"
    out.mkdir()
    chown_pg(out)
    for name in (segs[0], segs[-1]):
        r = a.pitr("wal-fetch", name, out / name)
        assert r.returncode == 0, r.stderr
        assert (out / name).read_bytes() == (pg.data / "pg_wal" / name).read_bytes()
        assert (out / name).stat().st_size == 1 << 20


def test_endpoint_outage_then_archiver_catches_up(arch_s3: Archiving, moto_env: MotoServer) -> None:
    a = arch_s3
    pg = a.cluster
    failed_before = pg.scalar("select failed_count from pg_stat_archiver")
    archived = a.segments()[-1]
    moto_env.outage()
    try:
        r = a.pitr("wal-push", f"pg_wal/{archived}", cwd=pg.data)
        assert r.returncode == 1
        assert f"cannot reach the S3 endpoint {moto_env.endpoint}" in r.stderr and "Traceback" not in r.stderr
        pg.sql("insert into churn select g, 'during outage' from generate_series(1, 100) g")
        during = pg.switch_wal()
        deadline = time.monotonic() + 60
        while pg.scalar("select failed_count from pg_stat_archiver") == failed_before:
            assert time.monotonic() < deadline, "the archiver never tried"
            time.sleep(0.2)
        pg.switch_wal()
    finally:
        moto_env.recover()
    assert during not in a.segments()
    last = pg.switch_wal()  # also wakes the archiver from its back-off
    pg.wait_archived(last, timeout=120)
    segs = a.segments()
    assert during in segs and last in segs
    assert_no_gap(segs, seg_size(a))


def wait_for_log(pg: PgCluster, needles: tuple[str, ...], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = pg.log_text()
        for n in needles:
            if n in text:
                return n
        if time.monotonic() > deadline:
            raise TimeoutError(f"none of {needles} in the log\n{pg.log_tail()}")
        time.sleep(0.2)


def wait_stopped(pg: PgCluster, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while pg.is_running():
        assert time.monotonic() < deadline, f"postmaster still running\n{pg.log_tail()}"
        time.sleep(0.2)


def wait_promoted(pg: PgCluster, timeout: float = 120) -> None:
    wait_for_log(pg, ("database system is ready to accept connections",), timeout)
    deadline = time.monotonic() + timeout
    while pg.scalar("select pg_is_in_recovery()"):
        assert time.monotonic() < deadline, pg.log_tail()
        time.sleep(0.2)


@pytest.mark.slow
def test_fetch_hard_failure_aborts_recovery_instead_of_promoting(
        arch_s3: Archiving, moto_env: MotoServer, cluster_factory: ClusterFactory, pitr_exe: Path) -> None:
    """With S3 down mid-recovery, PostgreSQL must stop rather than take the outage for the end of the archive.

    The restored directory holds the WAL up to the backup's end point locally, so PostgreSQL can
    become consistent without the archive; everything later (table after_backup) is only in S3.
    A restore_command that exited 1 on the outage would make PostgreSQL promote without it: the
    control run below proves this setup would catch that.
    """
    a = arch_s3
    src = a.cluster
    restored = cluster_factory("restored")
    src.run("pg_basebackup", "-D", restored.data, "-X", "none", "-c", "fast")
    label = (restored.data / "backup_label").read_text()
    start_seg = label.split("(file ", 1)[1][:24]
    backup_file = next(p for p in (src.data / "pg_wal").iterdir()
                       if p.name.startswith(start_seg) and p.name.endswith(".backup"))
    stop_seg = backup_file.read_text().split("STOP WAL LOCATION:", 1)[1].split("(file ", 1)[1][:24]
    assert walname.parse(backup_file.name) is not None
    src.sql("create table after_backup as select g as id, md5(g::text) as v from generate_series(1, 2000) g")
    a.archive_some(2)
    expected = src.table_md5("after_backup")
    assert a.storage.stat(wal_key(backup_file.name)) is not None  # the .backup file was archived too
    for seg in a.segments():
        if start_seg <= seg <= stop_seg:
            shutil.copy2(src.data / "pg_wal" / seg, restored.data / "pg_wal" / seg)
    chown_pg(restored.data / "pg_wal", recursive=True)

    restore_cmd = f"restore_command = '{pitr_exe} wal-fetch %f %p'\n"
    restored.append_conf("archive_mode = off\n" + restore_cmd)
    (restored.data / "recovery.signal").touch()
    chown_pg(restored.data / "recovery.signal")
    naive = cluster_factory("naive")
    env = a.env | {"PITR_FETCH_RETRIES": "1"}

    moto_env.outage()
    try:
        restored.start(env=env, wait=False)
        # PostgreSQL 15 says "shutting down due to …", later versions "aborting startup due to …"
        seen = wait_for_log(restored, ("due to startup process failure",
                                       "database system is ready to accept connections"))
        assert seen.startswith("due to"), restored.log_tail()
        wait_stopped(restored)
        log = restored.log_text()
        assert "could not restore file" in log and "exit code 128" in log, log
        assert "cannot reach the S3 endpoint" in log  # pitr's own sentence reaches the server log
        assert "selected new timeline ID" not in log and "archive recovery complete" not in log
        assert (restored.data / "backup_label").exists()  # nothing consumed, nothing promoted
        assert not list((restored.data / "pg_wal").glob("*.history"))

        # control: the same directory with a restore_command that reports the outage as "not found"
        shutil.copytree(restored.data, naive.data, symlinks=True)
        chown_pg(naive.data, recursive=True)
        naive.append_conf(restore_cmd.replace("%p'", "%p || exit 1'"))
        naive.start(env=env | {"PITR_FETCH_RETRIES": "0"}, wait=False)
        wait_promoted(naive)
        assert naive.scalar("select to_regclass('after_backup')") is None  # promoted early: data lost
        naive.stop()
    finally:
        moto_env.recover()

    # the same directory recovers fully once the endpoint is back
    restored.start(env=env, wait=False)
    wait_promoted(restored)
    assert restored.table_md5("after_backup") == expected
