"""Async archiving: one wal-push call pushes every .ready file through a warm helper; markers are honest.

What a user checks: every segment PostgreSQL produced under load is in the repository, byte for
byte; a segment the helper did not store is never acknowledged (outage); an already-stored
segment is acknowledged without importing boto3/typer/rich; a stale or foreign marker is not
trusted; the helper's errors reach PostgreSQL through the next call.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitr.cli import globalargs
from pitr.ops.wal import archive, spool
from pitr.pg import walname
from pitr.repo.envelope import Codec
from pitr.repo.format import wal_key
from pitr.repo.meta import read_meta
from pitr.storage.s3 import S3Storage
from tests.support import walgen
from tests.support.pg import PgCluster, make_tmpdir, rmtree_pg, run_as_postgres
from tests.support.s3 import MotoServer

PITR = str(Path(sys.executable).parent / "pitr")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PITR_", "AWS_ENDPOINT"))}
    return env | extra


# --------------------------------------------------------------------------- without a server

@pytest.fixture
def fake_pgdata() -> Iterator[tuple[Path, Path]]:
    """(pgdata with pg_wal/archive_status, initialised fs repo) for a fake cluster."""
    base = make_tmpdir("pitr-spool-")
    pgdata = base / "data"
    (pgdata / "pg_wal" / "archive_status").mkdir(parents=True)
    walgen.fs_repo(base / "repo")
    yield pgdata, base / "repo"
    walgen.stop_helper(pgdata / "pg_wal" / spool.ARCHIVE_SPOOL)
    rmtree_pg(base)


_queue = walgen.queue_ready


def test_lookahead_ack_without_heavy_imports_and_stale_markers(fake_pgdata: tuple[Path, Path]) -> None:
    pgdata, repo = fake_pgdata
    env = _env(PITR_REPO=str(repo), PITR_ARCHIVE_ASYNC="true", PITR_ARCHIVE_PUSH_JOBS="2")
    a, b, c = walgen.names(3, 3)
    _queue(pgdata, [a, b, c])
    store = walgen.FsStorage(repo)

    r = subprocess.run([PITR, "wal-push", f"pg_wal/{a}"], cwd=pgdata, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    # the one call stored the other queued files too (look-ahead), each verifiable byte for byte
    deadline = time.monotonic() + 30
    while not all((pgdata / "pg_wal" / spool.ARCHIVE_SPOOL / f"{n}.ok").exists() for n in (b, c)):
        assert time.monotonic() < deadline, "look-ahead segments were not pushed"
        time.sleep(0.05)
    meta = read_meta(store)
    for n in (a, b, c):
        out = pgdata / f"back-{n}"
        archive.fetch(store, meta, n, out)
        assert out.read_bytes() == (pgdata / "pg_wal" / n).read_bytes()

    # b is acknowledged from its marker alone: no settings parser, typer, rich or boto3 imported
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "pitr", "wal-push", f"pg_wal/{b}"],
                       cwd=pgdata, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert not imported & {"boto3", "botocore", "typer", "rich", "click", "pitr.config", "zstandard"}

    # a marker whose file changed (same name, new bytes) acknowledges nothing: the conflict surfaces
    (pgdata / "pg_wal" / c).write_bytes(walgen.segment(c, seed=1))
    r = subprocess.run([PITR, "wal-push", f"pg_wal/{c}"], cwd=pgdata, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert f"already holds a different {c}" in r.stderr
    assert "Traceback" not in r.stderr

    # a marker written for one repository does not acknowledge for another (settings changed)
    other = pgdata.parent / "other-repo"
    other.mkdir()
    r = subprocess.run([PITR, "wal-push", f"pg_wal/{b}"], cwd=pgdata, env=env | {"PITR_REPO": str(other)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "not initialized" in r.stderr
    assert not list(other.rglob(b))


def test_debug_log_level_shows_each_push_time(fake_pgdata: tuple[Path, Path]) -> None:
    """A DBA tracing archive lag sets log_level = debug: the async archiver's log then has each push's time."""
    pgdata, repo = fake_pgdata
    env = _env(PITR_REPO=str(repo), PITR_ARCHIVE_ASYNC="true", PITR_LOG_LEVEL="debug")
    names = walgen.names(9, 2)
    _queue(pgdata, names)
    r = subprocess.run([PITR, "wal-push", f"pg_wal/{names[0]}"], cwd=pgdata, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    sdir = pgdata / "pg_wal" / spool.ARCHIVE_SPOOL
    deadline = time.monotonic() + 30
    while not (sdir / f"{names[1]}.ok").exists():
        assert time.monotonic() < deadline, "the look-ahead segment was not pushed"
        time.sleep(0.05)
    walgen.stop_helper(sdir)
    log = (sdir / "pushd.log").read_text()
    for n in names:
        assert re.search(rf"{n}: push ended after \d+ ms, \d in flight", log), log


def test_wal_is_stored_with_wal_compress_by_the_helper_and_in_the_foreground(
        fake_pgdata: tuple[Path, Path]) -> None:
    """zstd level 1 unless wal_compress (or compress) says otherwise, as the envelope header records it."""
    pgdata, repo = fake_pgdata
    store = walgen.FsStorage(repo)

    def codec_and_level(name: str) -> tuple[int, int]:
        head = store.get_range(wal_key(name), 0, 16)
        return head[5], head[6]

    a, b, c, d = walgen.names(20, 4)
    _queue(pgdata, [a, b])  # queued: the async helper pushes them
    r = subprocess.run([PITR, "wal-push", f"pg_wal/{a}"], cwd=pgdata, env=_env(PITR_REPO=str(repo)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 30
    while not (pgdata / "pg_wal" / spool.ARCHIVE_SPOOL / f"{b}.ok").exists():  # b: only the helper pushes it
        assert time.monotonic() < deadline, "the look-ahead segment was not pushed"
        time.sleep(0.05)
    assert codec_and_level(a) == codec_and_level(b) == (1, 1)
    for name, env, want in ((c, {"PITR_COMPRESS": "zstd:5"}, (1, 5)), (d, {"PITR_WAL_COMPRESS": "none"}, (0, 0))):
        (pgdata / "pg_wal" / name).write_bytes(walgen.segment(name))  # not queued: pushed in the foreground
        r = subprocess.run([PITR, "wal-push", f"pg_wal/{name}"], cwd=pgdata, env=_env(PITR_REPO=str(repo)) | env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert codec_and_level(name) == want
        out = pgdata / f"back-{name}"
        archive.fetch(store, read_meta(store), name, out)
        assert out.read_bytes() == (pgdata / "pg_wal" / name).read_bytes()


def test_call_waiting_for_a_busy_helper_stays_light_and_acks_only_once_stored(
        fake_pgdata: tuple[Path, Path]) -> None:
    """With a backlog the helper has not stored a file yet when PostgreSQL asks for it: the call waits
    for the helper's acknowledgement without loading the settings (CPU the helper needs), and
    acknowledges nothing before the marker says the file is stored; the helper's error still reaches
    PostgreSQL through the normal path."""
    pgdata, repo = fake_pgdata
    env = _env(PITR_REPO=str(repo), PITR_ARCHIVE_ASYNC="true")
    d, e = walgen.names(7, 2)
    _queue(pgdata, [d, e])
    sdir = pgdata / "pg_wal" / spool.ARCHIVE_SPOOL
    fp = globalargs.fingerprint([], env)
    fd = spool.take_lock(sdir, spool.PUSHD)  # this test plays the busy helper: it holds the lock
    assert fd is not None
    try:
        spool.publish_fingerprint(fd, fp)
        call = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "pitr", "wal-push", f"pg_wal/{d}"],
                                cwd=pgdata, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert call.poll() is None, "acknowledged before the helper stored the file"
        # the helper stores d: archive.push returned, then the marker (what pushd._settle does)
        archive.push(walgen.FsStorage(repo), read_meta(walgen.FsStorage(repo)), pgdata / "pg_wal" / d,
                     Codec("zstd", 3))
        spool.write_ok(sdir, d, fp, spool.file_identity(os.stat(pgdata / "pg_wal" / d)), "stored")
        _, err = call.communicate(timeout=60)
        assert call.returncode == 0, err
        imported = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if "|" in line}
        assert not imported & {"pitr.config", "typer", "boto3", "zstandard"}

        # the helper fails on e: the call reports its message and exits 1, as before
        call = subprocess.Popen([PITR, "wal-push", f"pg_wal/{e}"], cwd=pgdata, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        spool.write_error(sdir, e, f"cannot write {e}: disk full", "free space in the repository")
        _, err = call.communicate(timeout=60)
        assert call.returncode == 1
        assert f"cannot write {e}: disk full" in err
        assert not (sdir / f"{e}.ok").exists()
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- with a server


def _archiving_cluster(cluster_factory, moto_server: MotoServer, bucket: str, name: str = "pg") -> PgCluster:  # type: ignore[no-untyped-def]
    c: PgCluster = cluster_factory(name)
    c.initdb("archive_mode = on\narchive_command = 'pitr wal-push %p'\nwal_keep_size = 1GB\n")
    env = moto_server.env() | {"PITR_REPO": f"s3://{bucket}/db", "PITR_ARCHIVE_ASYNC": "1",
                               "PITR_ARCHIVE_PUSH_JOBS": "2"}
    c.start(env=env)
    run_as_postgres([PITR, "init"], env=env | c.env())
    return c


def _check_archive(c: PgCluster, moto_server: MotoServer, bucket: str, first: str, last: str) -> list[str]:
    """Every segment first..last is in the bucket and decodes to the bytes still in pg_wal."""
    store = S3Storage(bucket, "db", endpoint=moto_server.endpoint)
    meta = read_meta(store)
    keys = {o.key.rsplit("/", 1)[-1] for o in store.list("wal/")}
    tli = walname.timeline_of(first)
    want = [walname.seg_name(tli, n) for n in range(walname.segno(first), walname.segno(last) + 1)]
    missing = [n for n in want if n not in keys]
    assert not missing, f"gap in the archive: {missing}"
    out = c.base / "fetched"
    for n in want:
        archive.fetch(store, meta, n, out)
        assert out.read_bytes() == (c.data / "pg_wal" / n).read_bytes(), n
    return want


@pytest.mark.slow
def test_async_archiving_keeps_up_under_pgbench(cluster_factory, moto_server: MotoServer, s3_bucket: str,  # type: ignore[no-untyped-def]
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    c = _archiving_cluster(cluster_factory, moto_server, s3_bucket)
    first = str(c.scalar("select pg_walfile_name(pg_current_wal_lsn())"))
    c.pgbench(["-i", "-s", "1", "-q"])
    stop = threading.Event()
    switches = [0]

    def switcher() -> None:  # many short segments: a deep .ready queue for the helper
        while not stop.wait(0.1):
            c.switch_wal()
            switches[0] += 1

    t = threading.Thread(target=switcher)
    t.start()
    try:
        c.pgbench(["-c", "2", "-T", "4", "-n"])
        deadline = time.monotonic() + 60  # a loaded machine switches less often in 4 s: go on to 20
        while switches[0] < 20 and time.monotonic() < deadline:
            c.pgbench(["-c", "2", "-t", "50", "-n"])
    finally:
        stop.set()
        t.join()
    last = c.switch_wal()
    c.wait_archived(last, timeout=120)
    segs = _check_archive(c, moto_server, s3_bucket, first, last)
    assert len(segs) >= 20
    log = (c.data / "pg_wal" / spool.ARCHIVE_SPOOL / "pushd.log").read_text()
    assert "started: 2 jobs" in log  # the helper did the pushing
    assert c.scalar("select failed_count from pg_stat_archiver") == 0
    c.stop()
    walgen.stop_helper(c.data / "pg_wal" / spool.ARCHIVE_SPOOL)


@pytest.mark.slow
@pytest.mark.parametrize("pg_version", ["15"], indirect=True, ids=["pg15"])
def test_outage_never_acknowledges_unstored_and_catches_up(cluster_factory, moto_server: MotoServer,  # type: ignore[no-untyped-def]
                                                           s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    c = _archiving_cluster(cluster_factory, moto_server, s3_bucket)
    sdir = c.data / "pg_wal" / spool.ARCHIVE_SPOOL
    first = c.switch_wal()
    c.wait_archived(first)
    moto_server.outage()
    try:
        during = [c.switch_wal() for _ in range(3)]
        deadline = time.monotonic() + 60
        while c.scalar("select failed_count from pg_stat_archiver") == 0:
            assert time.monotonic() < deadline, "archive_command did not fail during the outage"
            time.sleep(0.2)
        for _ in range(10):  # the helper keeps retrying: never an .ok for what it could not store
            assert not [n for n in during if (sdir / f"{n}.ok").exists()]
            assert c.scalar("select last_archived_wal from pg_stat_archiver") == first
            time.sleep(0.2)
        assert "cannot reach the S3 endpoint" in c.log_text()  # the helper's error, surfaced by PostgreSQL
    finally:
        moto_server.recover()
    last = c.switch_wal()  # wakes the archiver, which may be sleeping after repeated failures
    c.wait_archived(last, timeout=120)
    _check_archive(c, moto_server, s3_bucket, first, last)
    c.stop()
    walgen.stop_helper(sdir)
