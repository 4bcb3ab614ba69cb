"""wal-fetch never lets PostgreSQL promote early: exit 1 ("not in the archive") only when it is true.

What a user checks, with the real `pitr` executable and the real prefetch helper process:
- a repository that vanishes mid-recovery (directory moved away, an unmounted mount point left
  empty, an S3 prefix wiped) makes wal-fetch exit 128, with look-ahead and without, never 1;
- a request for a segment whose look-ahead fetch is in flight is answered as soon as that fetch
  ends (not after a two-minute stall);
- a prefetch helper nobody asks anything, or left waiting for segments that never come, exits
  when idle;
- any unexpected failure, however early, and a DEST that cannot be written exit 128 with one
  sentence.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pitr.errors import EXIT_FETCH_HARD, RepoMissingError
from pitr.ops.wal import archive, spool, stage
from pitr.repo import envelope
from pitr.repo.format import META_KEY, wal_key
from pitr.repo.meta import new_meta
from pitr.storage.base import Storage
from tests.support import walgen
from tests.support.pg import make_tmpdir, rmtree_pg, run_as_postgres
from tests.support.s3 import MotoServer
from tests.support.walgen import stop_helper as _stop_helpers

PITR = str(Path(sys.executable).parent / "pitr")
IDLE_ENV = "_PITR_PREFETCH_IDLE_EXIT"  # private knob of cli/asyncwal.py, for tests


@dataclass
class Site:
    """A fake cluster being restored (pgdata/pg_wal) and its repository (fs dir or S3 prefix)."""

    base: Path
    pgdata: Path
    env: dict[str, str]
    names: list[str]  # archived segments
    kind: str
    moto: MotoServer | None = None
    bucket: str = ""

    @property
    def pdir(self) -> Path:
        return self.pgdata / "pg_wal" / spool.PREFETCH_SPOOL

    @property
    def dest(self) -> Path:
        return self.pgdata / "pg_wal" / "RECOVERYXLOG"

    def fetch(self, name: str, **extra: str) -> subprocess.CompletedProcess[str]:
        self.dest.unlink(missing_ok=True)
        return subprocess.run([PITR, "wal-fetch", name, "pg_wal/RECOVERYXLOG"], cwd=self.pgdata,
                              env=self.env | extra, capture_output=True, text=True, timeout=120)

    def vanish(self, how: str) -> None:
        """The repository goes away the way it does in production."""
        if self.kind == "s3":
            c = self.moto.client()  # type: ignore[union-attr]
            for o in c.list_objects_v2(Bucket=self.bucket, Prefix="db/").get("Contents", []):
                c.delete_object(Bucket=self.bucket, Key=o["Key"])
            return
        repo = self.base / "repo"
        os.rename(repo, self.base / "repo.moved")
        if how == "unmounted":
            repo.mkdir()  # the mount point stays behind, empty


def _s3_put(moto: MotoServer, bucket: str, key: str, body: bytes) -> None:
    moto.client().put_object(Bucket=bucket, Key=f"db/{key}", Body=body)


@pytest.fixture
def make_site(request: pytest.FixtureRequest) -> Iterator[object]:
    made: list[Site] = []

    def make(kind: str, count: int = 3, prefetch: int = 0) -> Site:
        base = make_tmpdir("pitr-vanish-")
        pgdata = base / "data"
        (pgdata / "pg_wal").mkdir(parents=True)
        (pgdata / "recovery.signal").touch()  # in archive recovery: wal-fetch may start a prefetcher
        names = walgen.names(5, count)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PITR_", "AWS_", "_PITR"))}
        env |= {"PITR_CONFIG": "/dev/null", "PITR_FETCH_RETRIES": "0", "PITR_PREFETCH": str(prefetch)}
        site = Site(base, pgdata, env, names, kind)
        if kind == "fs":
            store = walgen.fs_repo(base / "repo")
            site.env["PITR_REPO"] = str(base / "repo")
            for n in names:
                store.put(wal_key(n), envelope.encode(walgen.segment(n), envelope.Codec("zstd", 1)))
        else:
            moto: MotoServer = request.getfixturevalue("moto_server")
            site.moto, site.bucket = moto, request.getfixturevalue("s3_bucket")
            site.env |= moto.env() | {"PITR_REPO": f"s3://{site.bucket}/db"}
            _s3_put(moto, site.bucket, META_KEY, new_meta(walgen.SYSID, 15, walgen.SEG).to_json())
            for n in names:
                _s3_put(moto, site.bucket, wal_key(n), envelope.encode(walgen.segment(n), envelope.Codec("zstd", 1)))
        made.append(site)
        return site

    yield make
    for site in made:
        if site.moto is not None:
            os.kill(site.moto.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        _stop_helpers(site.pdir, spool.PREFETCHD)
        rmtree_pg(site.base)


def _wait_prefetched(pdir: Path, names: list[str]) -> None:
    deadline = time.monotonic() + 30
    while not all((pdir / f"{n}.meta").exists() for n in names):
        assert time.monotonic() < deadline, f"not prefetched: {names}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- defect 3: a vanished repository

@pytest.mark.parametrize("prefetch", [0, 2], ids=["direct", "prefetch"])
@pytest.mark.parametrize(("kind", "how"), [("fs", "moved"), ("fs", "unmounted"), ("s3", "wiped")])
def test_a_vanished_repository_is_never_the_end_of_the_archive(make_site, kind: str, how: str,  # type: ignore[no-untyped-def]
                                                               prefetch: int) -> None:
    site: Site = make_site(kind, prefetch=prefetch)
    r = site.fetch(site.names[0])
    assert r.returncode == 0, r.stderr
    if prefetch:
        _wait_prefetched(site.pdir, site.names[1:])
    site.vanish(how)
    after = walgen.names(5 + len(site.names), 1)[0]  # what PostgreSQL asks for once replay passes the archive
    r = site.fetch(after)
    assert r.returncode == EXIT_FETCH_HARD, (r.returncode, r.stderr)
    assert "pitr: error: " in r.stderr and "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert not site.dest.exists()
    if prefetch:  # the helper keeps refusing while the repository is away: every later miss is 128 too
        assert site.fetch(walgen.names(5 + len(site.names) + 1, 1)[0]).returncode == EXIT_FETCH_HARD


@pytest.mark.parametrize(("kind", "how"), [("fs", "unmounted"), ("fs", "moved"), ("s3", "wiped")])
def test_fetch_checks_the_repository_at_the_miss(make_site, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                                 kind: str, how: str) -> None:
    """The direct path: metadata read at start, repository gone by the time the object is looked up."""
    site: Site = make_site(kind)
    for k, v in site.env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    storage: Storage
    if kind == "fs":
        from pitr.storage.fs import FsStorage

        storage = FsStorage(site.base / "repo")
    else:
        from pitr.storage.s3 import S3Storage

        storage = S3Storage(site.bucket, "db", endpoint=site.moto.endpoint)  # type: ignore[union-attr]
    loader = archive.MetaLoader(storage)
    loader()  # read at start, as wal-fetch does
    site.vanish(how)
    after = walgen.names(20, 1)[0]
    with pytest.raises(RepoMissingError):
        archive.fetch_with_retries(storage, loader, after, site.dest, 0, False)
    assert not site.dest.exists()


# --------------------------------------------------------------------------- defect 7: no stall behind look-ahead

def test_a_request_behind_an_inflight_lookahead_is_answered_when_it_ends(make_site) -> None:  # type: ignore[no-untyped-def]
    site: Site = make_site("s3", count=2, prefetch=2)
    a, b = site.names
    c, d = walgen.names(7, 2)  # not archived
    assert site.fetch(a).returncode == 0  # starts the helper; window b (archived), c (missing)
    _wait_prefetched(site.pdir, [b])
    moto_pid = site.moto.proc.pid  # type: ignore[union-attr]
    os.kill(moto_pid, signal.SIGSTOP)  # every request to the store now hangs until SIGCONT
    try:
        r = site.fetch(b)  # from the spool: the window moves to c, d; d's look-ahead now hangs
        assert r.returncode == 0, r.stderr
        time.sleep(1.0)  # let the helper pick up the request and send d's look-ahead
        site.dest.unlink()
        t0 = time.monotonic()
        proc = subprocess.Popen([PITR, "wal-fetch", d, "pg_wal/RECOVERYXLOG"], cwd=site.pgdata, env=site.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert proc.poll() is None  # waiting for the helper's answer
    finally:
        os.kill(moto_pid, signal.SIGCONT)
    try:
        _out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("wal-fetch was not answered when the look-ahead fetch of its segment ended")
    assert proc.returncode == 1, err  # not archived: PostgreSQL's normal end of the archive
    assert time.monotonic() - t0 < 12
    assert not site.dest.exists()
    assert (site.pdir / "prefetch.log").read_text().count("started:") == 1  # the answer came from that helper


# --------------------------------------------------------------------------- idle helper exits

def _start_helper(site: Site, idle: float) -> subprocess.Popen[bytes]:
    site.pdir.mkdir(exist_ok=True)
    with open(site.pdir / "prefetch.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "pitr", "_wal-prefetch", str(site.pdir), str(site.pgdata)],
                                env=site.env | {IDLE_ENV: str(idle)}, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)


def _exits_within(proc: subprocess.Popen[bytes], limit: float) -> float:
    t0 = time.monotonic()
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the prefetch helper was still running after {limit:.0f}s")
    return time.monotonic() - t0


def test_idle_prefetch_helper_exits(make_site) -> None:  # type: ignore[no-untyped-def]
    site: Site = make_site("fs", count=1, prefetch=3)
    # started outside recovery (no recovery.signal) and never asked anything
    assert _exits_within(_start_helper(site, 2.0), 15) >= 1.5
    # asked once for the last archived segment: its window never comes; re-checks are not requests
    spool.write_want(site.pdir, site.names[0], served=True)
    _exits_within(_start_helper(site, 6.0), 20)
    log = (site.pdir / "prefetch.log").read_text()
    assert log.count("exiting (idle)") == 2, log
    assert not (site.pdir / "want").exists()
    assert spool.helper_state(site.pdir, spool.PREFETCHD) is None


def test_no_prefetcher_is_started_once_recovery_ended(make_site) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL removes recovery.signal, then asks for the parent timeline's history file: a helper
    started by that call could not see recovery end and would linger (CI failure of 2026-11-30)."""
    site: Site = make_site("fs", count=2, prefetch=2)
    r = site.fetch(site.names[0])
    assert r.returncode == 0, r.stderr
    _wait_prefetched(site.pdir, site.names[1:])
    (site.pgdata / "recovery.signal").unlink()  # recovery ends: the running prefetcher leaves
    deadline = time.monotonic() + 10
    while spool.helper_state(site.pdir, spool.PREFETCHD) is not None:
        assert time.monotonic() < deadline, "the prefetcher did not exit when recovery ended"
        time.sleep(0.05)
    assert "exiting (recovery ended)" in (site.pdir / "prefetch.log").read_text()
    for name in ("00000002.history", site.names[1]):  # the last calls: fetched directly, nothing left running
        r = site.fetch(name)
        assert r.returncode == (1 if name.endswith("history") else 0), r.stderr
        assert spool.helper_state(site.pdir, spool.PREFETCHD) is None
    stored = (site.base / "repo" / wal_key(site.names[1])).read_bytes()
    assert site.dest.read_bytes() == envelope.decode(stored, "stored")


# --------------------------------------------------------------------------- defect 14 and DEST errors

def test_an_early_unexpected_failure_exits_128(make_site) -> None:  # type: ignore[no-untyped-def]
    """A fault before the fast path even runs (here: a module that fails to import)."""
    site: Site = make_site("fs")
    code = ("import sys\nsys.modules['pitr.cli.fast'] = None\n"
            "sys.argv = ['pitr', *sys.argv[1:]]\nfrom pitr.__main__ import main\nmain()\n")
    for args, want in ((["wal-fetch", site.names[0], str(site.dest)], EXIT_FETCH_HARD),
                       (["--repo", str(site.base / "repo"), "wal-fetch", site.names[0], str(site.dest)],
                        EXIT_FETCH_HARD),
                       (["wal-push", str(site.dest)], 1)):
        r = subprocess.run([sys.executable, "-c", code, *args], env=site.env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == want, (args, r.returncode, r.stderr)
        if want == EXIT_FETCH_HARD:
            assert r.stderr.startswith("pitr: internal error: ") and "Traceback" not in r.stderr, r.stderr
    assert not site.dest.exists()


@pytest.mark.parametrize("prefetch", [0, 2], ids=["direct", "prefetch"])
def test_dest_that_cannot_be_written_is_one_sentence_and_128(make_site, prefetch: int) -> None:  # type: ignore[no-untyped-def]
    site: Site = make_site("fs", prefetch=prefetch)
    (site.base / "afile").write_text("")
    cases = [(site.base / "nodir" / "RECOVERYXLOG", "does not exist"),
             (site.base / "afile" / "RECOVERYXLOG", "is not a directory")]
    for dest, needle in cases:
        r = subprocess.run([PITR, "wal-fetch", site.names[0], str(dest)], env=site.env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == EXIT_FETCH_HARD, r.stderr
        lines = r.stderr.splitlines()
        assert lines[0].startswith("pitr: error: ") and str(dest) in lines[0] and needle in lines[0], r.stderr
        assert len(lines) == 2 and lines[1].startswith("hint: ") and "%p" in lines[1], r.stderr
    assert not (site.base / "nodir").exists()
    # a directory the postgres OS user cannot write (pitr runs as that user from restore_command)
    ro = site.base / "readonly"
    ro.mkdir(mode=0o755)
    shutil.chown(site.base / "repo", "postgres")
    for p in (site.base / "repo").rglob("*"):
        shutil.chown(p, "postgres")
    r = run_as_postgres([PITR, "wal-fetch", site.names[0], ro / "RECOVERYXLOG"], env=site.env, check=False)
    assert r.returncode == EXIT_FETCH_HARD, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("pitr: error: ") and str(ro / "RECOVERYXLOG") in lines[0], r.stderr
    assert "permission denied" in lines[0] and "internal error" not in r.stderr, r.stderr
    assert os.listdir(ro) == []


# --------------------------------------------------------------------------- a real recovery

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fs", "s3"])
@pytest.mark.parametrize("pg_version", ["15"], indirect=True, ids=["pg15"])
def test_recovery_stops_instead_of_promoting_when_the_repository_vanishes(  # type: ignore[no-untyped-def]
        cluster_factory, tmp_pg_dir: Path, pitr_exe: Path, request: pytest.FixtureRequest, kind: str) -> None:
    """`pitr restore` (prefetch on, as it configures), the repository's mount goes away (or its S3
    prefix is wiped) mid-replay: PostgreSQL stops (restore_command exited 128) and never promotes;
    once the repository is back, a restart resumes recovery and every row arrives."""
    repo = tmp_pg_dir / "repo"
    env = {"PITR_REPO": f"file://{repo}", "PITR_FETCH_RETRIES": "0"}
    if kind == "s3":
        moto: MotoServer = request.getfixturevalue("moto_server")
        bucket: str = request.getfixturevalue("s3_bucket")
        env |= moto.env() | {"PITR_REPO": f"s3://{bucket}/db"}
        saved: dict[str, bytes] = {}
    src = cluster_factory("src")
    src.initdb(f"archive_mode = on\narchive_command = '{pitr_exe} wal-push %p'\n")
    src.start(env=env)
    run_as_postgres([pitr_exe, "init", "--dbname", src.conninfo], env=env)
    run_as_postgres([pitr_exe, "backup", "--dbname", src.conninfo, "--pgdata", src.data], env=env)
    src.sql("create table t (i int)")
    for i in range(14):  # 14 segments with a commit each: more than the 8 the restore prefetches
        src.sql(f"insert into t values ({i})")
        last = src.switch_wal()
    src.wait_archived(last)
    src.stop()

    dst = cluster_factory("dst")
    run_as_postgres([pitr_exe, "restore", "--pgdata", dst.data], env=env)
    # replay holds at the first commit (made minutes ago, so "1h" away) until the delay is lifted
    # (recovery_prefetch off: its WAL read-ahead would ask for the next segments past the held commit)
    dst.append_conf("recovery_min_apply_delay = '1h'\nrecovery_prefetch = off\n")
    dst.start(env=env)
    assert dst.scalar("select pg_is_in_recovery()") is True
    stages = dst.data / "pg_wal" / stage.STAGE_DIR  # restore's restore_command: the one-liner over a stage
    deadline = time.monotonic() + 60

    def staged() -> list[str]:  # segments the helper verified ahead of replay, waiting under their name
        return [e for d in stages.iterdir() if d.is_dir() for e in os.listdir(d) if len(e) == 24]

    while not stages.is_dir() or not staged():
        assert time.monotonic() < deadline, dst.log_tail()
        time.sleep(0.1)

    if kind == "fs":
        os.rename(repo, tmp_pg_dir / "repo.away")  # unmounted: the empty mount point stays behind
        repo.mkdir()
        shutil.chown(repo, "postgres", "postgres")
    else:
        c = moto.client()
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="db/"):
            for o in page.get("Contents", []):
                saved[o["Key"]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                c.delete_object(Bucket=bucket, Key=o["Key"])
    dst.append_conf("recovery_min_apply_delay = 0\n")
    dst.sql("select pg_reload_conf()")
    deadline = time.monotonic() + 120
    while dst.is_running():
        assert "selected new timeline ID" not in dst.log_text(), "PostgreSQL promoted early\n" + dst.log_tail()
        assert time.monotonic() < deadline, "recovery did not stop\n" + dst.log_tail()
        time.sleep(0.2)
    log = dst.log_text()
    assert "selected new timeline ID" not in log and "archive recovery complete" not in log, log[-3000:]
    assert "FATAL:  could not restore file" in log and "exit code 128" in log, log[-3000:]
    state = dst.run("pg_controldata", "-D", str(dst.data)).stdout
    assert "in archive recovery" in state, state

    # the repository is back: the same server resumes recovery and reaches the end of the archive
    if kind == "fs":
        repo.rmdir()
        os.rename(tmp_pg_dir / "repo.away", repo)
    else:
        for key, body in saved.items():
            c.put_object(Bucket=bucket, Key=key, Body=body)
    dst.start()
    deadline = time.monotonic() + 120
    while dst.scalar("select pg_is_in_recovery()"):
        assert time.monotonic() < deadline, dst.log_tail()
        time.sleep(0.2)
    assert dst.scalar("select count(*) from t") == 14
    dst.stop()
    spool.stop_helpers(dst.data)
