"""Fault suite, wal-push: kill -9 at each step (sync and async), a store that fails mid-write.

What a user checks after each fault: nothing was acknowledged that is not stored (a killed or
failed wal-push never exits 0; the async archiver's `NAME.ok` exists only for a stored file),
whatever is stored reads back byte-identical through `wal-fetch`, and archiving the same file
again succeeds and stores exactly PostgreSQL's bytes. No PostgreSQL server is needed: the
segments are synthetic ones with valid page headers (tests/support/walgen.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pitr.ops.wal import spool
from pitr.repo.format import META_KEY, wal_key
from pitr.repo.meta import new_meta
from pitr.storage.base import Storage
from pitr.storage.fs import TMP_PREFIX, FsStorage
from pitr.storage.s3 import S3Storage
from tests.support import walgen
from tests.support.faults import PITR, FaultProxy, kill_env, remount, run, tmpfs
from tests.support.pg import chown_pg, make_tmpdir, rmtree_pg
from tests.support.s3 import MotoServer

SEG = walgen.names(0x10, 1)[0]


# archive_async is on by default; the sync cases say so (the async ones override it with ASYNC)
SYNC = {"PITR_ARCHIVE_ASYNC": "false"}


@dataclass
class Site:
    """A fake cluster's pg_wal (one queued segment) and a repository initialised for it."""

    pgdata: Path
    storage: Storage
    env: dict[str, str]
    fs_root: Path | None = None

    @property
    def wal(self) -> Path:
        return self.pgdata / "pg_wal" / SEG

    def push(self, *extra_env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
        env = self.env.copy()
        for e in extra_env:
            env |= e
        r = run([PITR, "wal-push", self.wal], env, cwd=self.pgdata, timeout=timeout)
        return r.returncode, r.stderr

    def fetch(self, name: str = SEG) -> tuple[int, bytes | None]:
        out = self.pgdata / "fetched"
        out.mkdir(exist_ok=True)
        chown_pg(out)
        dest = out / name
        dest.unlink(missing_ok=True)
        r = run([PITR, "wal-fetch", name, dest], self.env)
        assert r.returncode in (0, 1), f"wal-fetch exited {r.returncode}: {r.stderr}"
        return r.returncode, dest.read_bytes() if r.returncode == 0 else None

    def assert_stored_or_absent(self) -> bool:
        """The archive holds the whole segment or nothing of it; True when it holds it."""
        rc, data = self.fetch()
        if rc == 0:
            assert data == self.wal.read_bytes(), "wal-fetch returned other bytes than were pushed"
        return rc == 0

    def assert_repush_stores_it(self) -> None:
        rc, err = self.push()
        assert rc == 0, err
        rc, data = self.fetch()
        assert rc == 0 and data == self.wal.read_bytes()


def _make_pgdata(base: Path) -> Path:
    pgdata = base / "data"
    (pgdata / "pg_wal" / "archive_status").mkdir(parents=True)
    (pgdata / "pg_wal" / SEG).write_bytes(walgen.segment(SEG, seed=7))
    (pgdata / "pg_wal" / "archive_status" / f"{SEG}.ready").touch()
    chown_pg(base, recursive=True)
    return pgdata


@pytest.fixture
def fs_site() -> Iterator[Site]:
    base = make_tmpdir("pitr-fw-")
    pgdata = _make_pgdata(base)
    storage = walgen.fs_repo(base / "repo")
    chown_pg(base / "repo", recursive=True)
    yield Site(pgdata, storage, {"PITR_REPO": str(base / "repo")} | SYNC, base / "repo")
    _stop_helper(pgdata)
    rmtree_pg(base)


@pytest.fixture
def s3_env(moto_server: MotoServer) -> Iterator[MotoServer]:
    mp = pytest.MonkeyPatch()
    for k, v in moto_server.env().items():
        mp.setenv(k, v)
    yield moto_server
    mp.undo()


def _s3_site(moto: MotoServer, bucket: str, endpoint: str | None = None) -> Site:
    base = make_tmpdir("pitr-fw-")
    pgdata = _make_pgdata(base)
    storage = S3Storage(bucket, "fault/main", endpoint=moto.endpoint)
    storage.put(META_KEY, new_meta(walgen.SYSID, 15, walgen.SEG).to_json(), if_absent=True)
    env = moto.env() | {"PITR_REPO": f"s3://{bucket}/fault/main", "PITR_S3_ENDPOINT": endpoint or moto.endpoint} | SYNC
    return Site(pgdata, storage, env)


@pytest.fixture
def s3_site(s3_env: MotoServer, s3_bucket: str) -> Iterator[Site]:
    site = _s3_site(s3_env, s3_bucket)
    yield site
    _stop_helper(site.pgdata)
    rmtree_pg(site.pgdata.parent)


def _stop_helper(pgdata: Path) -> None:
    sdir = pgdata / "pg_wal" / spool.ARCHIVE_SPOOL
    if not sdir.is_dir():
        return
    spool.request_stop(sdir, spool.PUSHD)
    deadline = time.monotonic() + 15
    while spool.helper_state(sdir, spool.PUSHD) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


# --------------------------------------------------------------------------- sync, directory repository

FS_STEPS = {
    "encoded-not-written": ("pitr.repo.envelope:encode", "after", ""),
    "temp-written-not-linked": ("os:link", "before", TMP_PREFIX),
    "linked-dir-not-fsynced": ("os:link", "after", TMP_PREFIX),
    "stored-not-answered": ("pitr.ops.wal.archive:push", "after", ""),
}


@pytest.mark.parametrize("step", list(FS_STEPS))
def test_sync_push_killed_at_each_step_fs(fs_site: Site, step: str) -> None:
    target, when, match = FS_STEPS[step]
    rc, err = fs_site.push(kill_env(target, when, match=match))
    assert rc == -9, f"the kill point was not reached: {rc} {err}"
    stored = fs_site.assert_stored_or_absent()
    assert stored == (step in ("linked-dir-not-fsynced", "stored-not-answered"))
    fs_site.assert_repush_stores_it()


def test_killed_push_leaves_no_visible_partial_object(fs_site: Site) -> None:
    """A temp file left by kill -9 is never listed, fetched or taken for the segment."""
    rc, _ = fs_site.push(kill_env("os:link", "before", match=TMP_PREFIX))
    assert rc == -9
    assert fs_site.fs_root is not None
    leftovers = [p for p in fs_site.fs_root.rglob(f"{TMP_PREFIX}*")]
    assert leftovers, "the kill point should leave the fsynced temp file behind"
    assert [o.key for o in fs_site.storage.list("wal/")] == []
    assert fs_site.fetch()[0] == 1


# --------------------------------------------------------------------------- sync, S3 repository

S3_STEPS = {
    "before-put": ("pitr.storage.s3:S3Storage._put_small", "before", "wal/"),
    "put-returned": ("pitr.storage.s3:S3Storage._put_small", "after", "wal/"),
}


@pytest.mark.parametrize("step", list(S3_STEPS))
def test_sync_push_killed_at_each_step_s3(s3_site: Site, step: str) -> None:
    target, when, match = S3_STEPS[step]
    rc, err = s3_site.push(kill_env(target, when, match=match))
    assert rc == -9, f"the kill point was not reached: {rc} {err}"
    assert s3_site.assert_stored_or_absent() == (step != "before-put")
    s3_site.assert_repush_stores_it()


# --------------------------------------------------------------------------- async (archive_async)

ASYNC = {"PITR_ARCHIVE_ASYNC": "true", "PITR_ARCHIVE_PUSH_JOBS": "2"}
ASYNC_STEPS = {
    "helper-before-push": ("pitr.ops.wal.archive:push", "before"),
    "helper-stored-no-ok": ("pitr.ops.wal.spool:write_ok", "before"),
    "helper-after-ok": ("pitr.ops.wal.spool:write_ok", "after"),
}


def _ok_marker(site: Site) -> Path:
    return site.pgdata / "pg_wal" / spool.ARCHIVE_SPOOL / f"{SEG}.ok"


@pytest.mark.parametrize("step", list(ASYNC_STEPS))
def test_async_helper_killed_once_then_the_push_completes(fs_site: Site, step: str) -> None:
    """The helper dies at the step once; the foreground starts another and exits 0 only when stored."""
    target, when = ASYNC_STEPS[step]
    once = fs_site.pgdata.parent / "killed-once"
    rc, err = fs_site.push(ASYNC, kill_env(target, when, once=once), timeout=60)
    assert once.exists(), "the helper never reached the kill point"
    assert rc == 0, err
    assert _ok_marker(fs_site).exists()
    rc, data = fs_site.fetch()
    assert rc == 0 and data == fs_site.wal.read_bytes()


def test_async_helper_killed_every_time_acknowledges_nothing(fs_site: Site) -> None:
    """Every helper dies after storing but before `.ok`: wal-push must fail, and no `.ok` is left."""
    rc, err = fs_site.push(ASYNC, kill_env("pitr.ops.wal.spool:write_ok", "before"), timeout=90)
    assert rc != 0 and rc != -9, err
    assert "async archiver" in err and "Traceback" not in err
    assert not _ok_marker(fs_site).exists()
    # what it stored before dying is whole; a normal push afterwards completes
    assert fs_site.assert_stored_or_absent()
    rc, err = fs_site.push(ASYNC)
    assert rc == 0, err


def test_async_helper_killed_once_s3(s3_site: Site) -> None:
    """The S3 helper dies after storing, before `.ok`: the next helper finds the object and acknowledges."""
    target, when = ASYNC_STEPS["helper-stored-no-ok"]
    once = s3_site.pgdata.parent / "killed-once"
    rc, err = s3_site.push(ASYNC, kill_env(target, when, once=once), timeout=60)
    assert once.exists() and rc == 0, err
    rc, data = s3_site.fetch()
    assert rc == 0 and data == s3_site.wal.read_bytes()


# --------------------------------------------------------------------------- the store failing mid-write

@pytest.fixture
def proxied(s3_env: MotoServer, s3_bucket: str) -> Iterator[tuple[Site, FaultProxy]]:
    proxy = FaultProxy(s3_env.port)
    site = _s3_site(s3_env, s3_bucket, endpoint=proxy.endpoint)
    yield site, proxy
    proxy.close()
    _stop_helper(site.pgdata)
    rmtree_pg(site.pgdata.parent)


def _put_needle(site: Site) -> bytes:
    return f"PUT /{site.env['PITR_REPO'][5:].split('/', 1)[0]}/fault/main/{wal_key(SEG)}".encode()


def test_store_cuts_every_upload_midway(proxied: tuple[Site, FaultProxy]) -> None:
    site, proxy = proxied
    proxy.arm("cut", _put_needle(site), times=-1)
    rc, err = site.push({"PITR_LOG_LEVEL": "info"})
    assert proxy.fired >= 1
    assert rc not in (0, -9), "a push whose every upload was cut must not be acknowledged"
    assert "Traceback" not in err
    assert site.storage.stat(wal_key(SEG)) is None, "a truncated upload became an object"
    proxy.arm("off", b"")
    site.assert_repush_stores_it()


def test_store_cuts_one_upload_midway(proxied: tuple[Site, FaultProxy]) -> None:
    site, proxy = proxied
    proxy.arm("cut", _put_needle(site), times=1)
    rc, err = site.push()
    assert proxy.fired == 1
    assert rc != -9
    if rc == 0:  # botocore retried the request: the stored object must be the whole segment
        assert site.assert_stored_or_absent()
    else:
        assert not site.assert_stored_or_absent()
    site.assert_repush_stores_it()


def test_store_acts_but_the_answer_is_lost(proxied: tuple[Site, FaultProxy]) -> None:
    """The server stored the segment and the connection died before the reply: the retry finds it."""
    site, proxy = proxied
    proxy.arm("drop-response", _put_needle(site), times=1)
    rc, err = site.push()
    assert proxy.fired == 1
    assert rc != -9
    assert site.assert_stored_or_absent(), "the server stored it; it must read back whole"
    site.assert_repush_stores_it()


# --------------------------------------------------------------------------- the disk full

def test_push_into_a_full_repository_disk(tmp_pg_dir: Path) -> None:
    """ENOSPC while writing the object: wal-push fails with a sentence, stores nothing, leaves no temp."""
    with tmpfs(tmp_pg_dir / "mnt", "4m", 0o755) as mnt:
        repo = mnt / "repo"
        walgen.fs_repo(repo)
        chown_pg(repo, recursive=True)
        pgdata = _make_pgdata(tmp_pg_dir / "site")
        wal = pgdata / "pg_wal" / SEG
        wal.write_bytes(wal.read_bytes()[:64] + os.urandom(walgen.SEG - 64))  # incompressible: 16 MiB > 4 MiB
        chown_pg(wal)
        site = Site(pgdata, FsStorage(repo), {"PITR_REPO": str(repo)}, repo)
        rc, err = site.push()
        assert rc not in (0, -9), err
        assert "disk is full" in err and "Traceback" not in err, err
        assert not list(repo.rglob(f"{TMP_PREFIX}*")), "a temp file was left on the full disk"
        assert site.fetch()[0] == 1
        remount(mnt, "40m")
        site.assert_repush_stores_it()


def test_fetch_into_a_full_pg_wal_is_a_hard_failure(fs_site: Site, tmp_pg_dir: Path) -> None:
    """wal-fetch cannot write DEST: exit above 125 (stop recovery), never 1 (promote), no partial DEST."""
    rc, err = fs_site.push()
    assert rc == 0, err
    with tmpfs(tmp_pg_dir / "pg_wal", "2m", 0o777) as pg_wal:
        dest = pg_wal / "RECOVERYXLOG"
        r = run([PITR, "wal-fetch", SEG, dest], fs_site.env)
        assert r.returncode > 125, f"exit {r.returncode}: {r.stderr}"
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
        assert os.listdir(pg_wal) == [], "a partial file was left in pg_wal"
