"""WAL prefetch: wal-fetch keeps the next segments coming; a prefetched file is verified before use.

What a user checks: recovery with prefetch reaches the same rows, also across a timeline switch
(where the old timeline's segments of the same numbers are in the archive too); a damaged or
misnamed prefetched file is never handed to PostgreSQL (the right bytes come from the
repository instead); wal-fetch's exit codes are unchanged (1 = not in the archive).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitr.ops.wal import prefetch, spool
from tests.support import walgen
from tests.support.pg import PgCluster, make_tmpdir, rmtree_pg, run_as_postgres
from tests.support.s3 import MotoServer
from tests.support.walgen import stop_helper as _stop_helpers

PITR = str(Path(sys.executable).parent / "pitr")


def test_window_stays_on_the_timeline() -> None:
    assert prefetch.window("0000000200000000000000FF", 2, walgen.SEG) == [
        "000000020000000100000000", "000000020000000100000001"]
    assert prefetch.window("00000002.history", 3, walgen.SEG) == []
    assert prefetch.window("000000010000000000000003.partial", 3, walgen.SEG) == []
    assert prefetch.window(None, 3, walgen.SEG) == []


@pytest.fixture
def restore_dir() -> Iterator[tuple[Path, Path, list[str]]]:
    """(pgdata being restored, repo, archived segment names) for a fake cluster."""
    base = make_tmpdir("pitr-pf-")
    names = walgen.names(5, 6)
    pgdata = walgen.archived_cluster(base, names)
    yield pgdata, base / "repo", names
    _stop_helpers(pgdata / "pg_wal" / spool.PREFETCH_SPOOL, spool.PREFETCHD)
    rmtree_pg(base)


def _fetch(pgdata: Path, env: dict[str, str], name: str) -> subprocess.CompletedProcess[str]:
    dest = pgdata / "pg_wal" / "RECOVERYXLOG"
    dest.unlink(missing_ok=True)
    return subprocess.run([PITR, "wal-fetch", name, "pg_wal/RECOVERYXLOG"], cwd=pgdata, env=env,
                          capture_output=True, text=True, timeout=120)


def _wait_prefetched(pdir: Path, names: list[str]) -> None:
    deadline = time.monotonic() + 30
    while not all((pdir / f"{n}.meta").exists() for n in names):
        assert time.monotonic() < deadline, f"not prefetched: {names}"
        time.sleep(0.05)


def test_damaged_or_misnamed_prefetched_files_are_not_used(restore_dir: tuple[Path, Path, list[str]]) -> None:
    pgdata, repo, names = restore_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith("PITR_")}
    env |= {"PITR_REPO": str(repo), "PITR_PREFETCH": "3"}
    pdir = pgdata / "pg_wal" / spool.PREFETCH_SPOOL
    src = repo.parent / "src"
    dest = pgdata / "pg_wal" / "RECOVERYXLOG"

    r = _fetch(pgdata, env, names[0])
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes() == (src / names[0]).read_bytes()
    _wait_prefetched(pdir, names[1:4])

    # one flipped byte in the middle of a prefetched segment: rejected, the repository's copy is used
    with open(pdir / names[1], "r+b") as f:
        f.seek(8 << 20)
        b = f.read(1)
        f.seek(8 << 20)
        f.write(bytes([b[0] ^ 0xFF]))
    r = _fetch(pgdata, env, names[1])
    assert r.returncode == 0, r.stderr
    assert "prefetched copy" in r.stderr and "checksum" in r.stderr
    assert dest.read_bytes() == (src / names[1]).read_bytes()

    # another segment's intact file (and its description) under this name: its header gives it away
    _wait_prefetched(pdir, names[2:5])
    os.replace(pdir / names[4], pdir / names[2])
    os.replace(pdir / f"{names[4]}.meta", pdir / f"{names[2]}.meta")
    r = _fetch(pgdata, env, names[2])
    assert r.returncode == 0, r.stderr
    assert "disagrees with its name" in r.stderr
    assert dest.read_bytes() == (src / names[2]).read_bytes()

    # a good prefetched file is served from the spool and leaves it
    _wait_prefetched(pdir, [names[3]])
    r = _fetch(pgdata, env, names[3])
    assert r.returncode == 0 and r.stderr == ""
    assert dest.read_bytes() == (src / names[3]).read_bytes()
    assert not (pdir / names[3]).exists()

    # the end of the archive is still exit 1 with nothing created
    after = walgen.names(11, 1)[0]
    r = _fetch(pgdata, env, after)
    assert r.returncode == 1, r.stderr
    assert not dest.exists()


def _helper_pid(pdir: Path) -> int:
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"_wal-prefetch" in argv and os.fsencode(os.path.abspath(pdir)) in argv:
            return int(proc.name)
    raise AssertionError(f"no prefetcher runs for {pdir}")


def test_a_served_segment_is_not_fetched_again_by_a_late_prefetcher(
        restore_dir: tuple[Path, Path, list[str]]) -> None:
    """On a loaded machine the prefetcher may read a request only after wal-fetch took the file it had
    ready: it must move on, not fetch that segment again (a wasted fetch, a file left behind)."""
    pgdata, repo, names = restore_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith("PITR_")}
    env |= {"PITR_REPO": str(repo), "PITR_PREFETCH": "2"}
    pdir = pgdata / "pg_wal" / spool.PREFETCH_SPOOL
    src = repo.parent / "src"
    assert _fetch(pgdata, env, names[0]).returncode == 0
    _wait_prefetched(pdir, names[1:3])
    pid = _helper_pid(pdir)
    os.kill(pid, signal.SIGSTOP)  # the load, made certain
    try:
        r = _fetch(pgdata, env, names[1])
    finally:
        os.kill(pid, signal.SIGCONT)
    assert r.returncode == 0, r.stderr
    assert (pgdata / "pg_wal" / "RECOVERYXLOG").read_bytes() == (src / names[1]).read_bytes()
    _wait_prefetched(pdir, [names[3]])  # the window moved on past names[1]
    time.sleep(0.5)
    assert not (pdir / names[1]).exists()
    _stop_helpers(pdir, spool.PREFETCHD)
    # names[0..3] once each (names[0] itself only if the helper started in time to answer it)
    fetched = re.findall(r"(\d+) segments prefetched", (pdir / f"{spool.PREFETCHD}.log").read_text())
    assert fetched and int(fetched[-1]) <= 4, fetched


# --------------------------------------------------------------------------- recovery on a real server


def _restore_from(base_data: Path, c: PgCluster, conf: str) -> None:
    run_as_postgres(["cp", "-a", base_data, c.data])
    c.append_conf("restore_command = 'pitr wal-fetch %f %p'\n" + conf)
    run_as_postgres(["touch", c.data / "recovery.signal"])


def _wait_promoted(c: PgCluster, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if c.scalar("select not pg_is_in_recovery()"):
                return
        except Exception:  # noqa: BLE001,S110 - still starting up
            pass
        assert time.monotonic() < deadline, f"{c.name} did not finish recovery\n{c.log_tail()}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("pg_version", ["15"], indirect=True, ids=["pg15"])
def test_recovery_with_prefetch_follows_the_new_timeline(cluster_factory, moto_server: MotoServer,  # type: ignore[no-untyped-def]
                                                         s3_bucket: str, tmp_pg_dir: Path) -> None:
    env = moto_server.env() | {"PITR_REPO": f"s3://{s3_bucket}/db", "PITR_ARCHIVE_ASYNC": "1",
                               "PITR_PREFETCH": "4"}
    p: PgCluster = cluster_factory("p")
    p.initdb("archive_mode = on\narchive_command = 'pitr wal-push %p'\n")
    p.start(env=env)
    run_as_postgres([PITR, "init"], env=env | p.env())
    base = tmp_pg_dir / "base"
    p.run("pg_basebackup", "-D", str(base), "-X", "none", "-c", "fast", "--no-sync")
    p.sql("create table t(tag text)")
    p.pgbench(["-i", "-s", "1", "-q"])
    p.sql("insert into t values ('before')")
    p.sql("select pg_create_restore_point('rp1')")
    p.switch_wal()
    # the old timeline goes on past the restore point: the same segment numbers exist on timeline 1
    p.sql("insert into t values ('p-after')")
    p.pgbench(["-c", "2", "-t", "300", "-n"])
    p.wait_archived(p.switch_wal())

    r1: PgCluster = cluster_factory("r1")
    _restore_from(base, r1, "recovery_target_name = 'rp1'\nrecovery_target_action = 'promote'\n")
    r1.start(env=env)
    _wait_promoted(r1)
    r1.sql("insert into t values ('r1')")
    r1.pgbench(["-c", "2", "-t", "300", "-n"])
    r1.wait_archived(r1.switch_wal())
    expected = {tbl: r1.table_md5(tbl) for tbl in ("t", "pgbench_accounts", "pgbench_history")}
    r1.stop()
    p.stop()

    r2: PgCluster = cluster_factory("r2")
    _restore_from(base, r2, "recovery_target_timeline = 'latest'\n")
    r2.start(env=env)
    _wait_promoted(r2)
    assert {tbl: r2.table_md5(tbl) for tbl in expected} == expected
    assert str(r2.scalar("select pg_walfile_name(pg_current_wal_lsn())")).startswith("00000003")
    pdir = r2.data / "pg_wal" / spool.PREFETCH_SPOOL
    deadline = time.monotonic() + 15
    while spool.helper_state(pdir, spool.PREFETCHD) is not None:  # exits once recovery ended
        assert time.monotonic() < deadline, "prefetcher did not exit after recovery"
        time.sleep(0.1)
    log = (pdir / f"{spool.PREFETCHD}.log").read_text()
    assert "recovery ended" in log
    assert any(int(x.split()[0]) > 0 for x in log.split("): ")[1:]), log  # it did fetch ahead
    assert not [e for e in os.listdir(pdir) if len(e.split(".")[0]) == 24]  # nothing left behind
    r2.stop()
    for c in (p, r1, r2):
        _stop_helpers(c.data / "pg_wal" / spool.ARCHIVE_SPOOL)
