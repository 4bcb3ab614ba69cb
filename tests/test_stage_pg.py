"""Replay through the stage on real PostgreSQL 15 and 18, from a directory and from S3 (moto).

What a user checks: `restore --replay` reports how many segments restore_command took from the
stage and how many went through wal-fetch (most come from the stage), the restored rows equal the
source's; a foreign file left under a needed name in an earlier restore's stage is never replayed;
the helper killed in the middle of recovery does not stop recovery (wal-fetch takes over).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from pitr.ops.wal import stage
from tests.support.maint import new_repo, start_source
from tests.support.pg import PgCluster, make_tmpdir, rmtree_pg, run_as_postgres
from tests.support.s3 import MotoServer

pytestmark = pytest.mark.pg
SEGMENTS = 30


@dataclass
class Source:
    src: PgCluster
    base: Path
    env: dict[str, str]
    pitr_exe: Path
    rows: str = ""
    segments: int = 0

    def pitr(self, *args: str | Path, check: bool = True, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
        p = run_as_postgres([self.pitr_exe, *map(str, args)], env=self.env | (env or {}), cwd="/tmp", check=False,
                            timeout=400)
        if check and p.returncode:
            raise AssertionError(f"pitr {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p


_SOURCES: dict[tuple[str, str], Source] = {}


def source(kind: str, bindir: Path, pitr_exe: Path, moto: MotoServer | None) -> Source:
    """A cluster with a backup and SEGMENTS archived segments after it (one per kind and version)."""
    key = (str(bindir), kind)
    if key in _SOURCES:
        return _SOURCES[key]
    base = make_tmpdir("pitr-stpg-")
    env = new_repo(kind, base, moto, "db")[0]
    src = start_source(PgCluster(bindir, base / "src", name=f"src-{kind}"), env, pitr_exe)
    s = Source(src, base, env, pitr_exe)
    src.sql("create table t (id int, pad text)")
    # replay maintains the indexes: PostgreSQL works on each segment as a server does (and not faster than
    # a helper on a machine loaded by parallel test runs can stage)
    for col in ("pad", "md5(pad)", "id"):
        src.sql(f"create index on t ({col})")
    s.pitr("backup", "--dbname", src.conninfo, "--pgdata", src.data)
    first = src.switch_wal()
    last = first
    for i in range(SEGMENTS):
        # a few MB of WAL per segment: PostgreSQL spends real time replaying each, as in production
        src.sql(f"insert into t select g, md5(g::text) || repeat('x', 200) from generate_series({i * 10000}, "
                f"{i * 10000 + 9999}) g")
        last = src.switch_wal()
    src.wait_archived(last, timeout=300)
    s.rows = src.table_md5("t")
    s.segments = int(last[16:], 16) - int(first[16:], 16)
    src.stop()
    _SOURCES[key] = s
    return s


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> object:
    yield
    for s in _SOURCES.values():
        s.src.ensure_stopped()
        rmtree_pg(s.base)
    _SOURCES.clear()


@pytest.fixture(params=["fs", "s3"])
def src(request: pytest.FixtureRequest, pg_bindir: Path, pitr_exe: Path) -> Source:
    moto = request.getfixturevalue("moto_server") if request.param == "s3" else None
    return source(request.param, pg_bindir, pitr_exe, moto)


def _restore(s: Source, dest: PgCluster, *args: str) -> dict:  # type: ignore[type-arg]
    # PITR_JOBS reaches the helper through the server's environment: 4 workers keep ahead of replay here
    p = s.pitr("restore", "--pgdata", dest.data, "--json", "--archive-mode", "off", "--replay-timeout", "300", *args,
               env={"PITR_JOBS": "4"})
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def _stages(dest: PgCluster) -> list[Path]:
    return stage.helper_dirs(dest.data)


def test_replay_takes_most_segments_from_the_stage(src: Source) -> None:
    s = src
    dest = PgCluster(s.src.bindir, s.base / f"r-{uuid.uuid4().hex[:6]}", name="r")
    # an earlier restore of this directory left a stage holding a foreign file under a name this
    # recovery needs (another cluster's bytes, a flipped byte): the new restore never serves it
    out = _restore(s, dest)
    (old,) = _stages(dest)
    needed = out["wal"]["first"]
    planted = bytearray(16 << 20)
    planted[:8] = b"\x10\xd1\x06\x00\x01\x00\x00\x00"
    (old / needed).write_bytes(bytes(planted))
    nxt = f"{needed[:16]}{int(needed[16:], 16) + 3:08X}"
    (old / nxt).write_bytes(bytes(planted))

    out = _restore(s, dest, "--delta", "--replay")
    rp = out["replay"]
    assert rp["reached"], rp
    (new,) = _stages(dest)
    assert new != old and not old.exists()
    assert os.stat(new).st_mode & 0o777 == 0o700 and os.stat(new).st_uid == os.stat(dest.data).st_uid
    taken, asked = rp["restore_command"]["from_stage"], rp["restore_command"]["through_wal_fetch"]
    # what is not staged in time goes through wal-fetch (the helper answers it); on a loaded machine
    # the helper falls behind more often, yet most segments come from the stage
    assert taken > s.segments / 2 and asked < taken, rp["restore_command"]
    # the history probes and the end of the archive: asked of the helper by the one-liner, no Python start
    assert rp["restore_command"]["answered_in_shell"] >= 2, rp["restore_command"]
    dest.append_conf()
    dest.start(env={})
    try:
        assert dest.table_md5("t") == s.rows
    finally:
        dest.stop()
        rmtree_pg(dest.base)


@pytest.mark.parametrize("kind", ["fs"])
def test_recovery_completes_when_the_helper_is_killed(kind: str, pg_bindir: Path, pitr_exe: Path) -> None:
    s = source(kind, pg_bindir, pitr_exe, None)
    dest = PgCluster(s.src.bindir, s.base / f"k-{uuid.uuid4().hex[:6]}", name="k")
    _restore(s, dest)  # recovery configured, the server started by hand (the stage fills on the first call)
    dest.append_conf("hot_standby = on\n")
    dest.start(env=s.env, wait=False)
    (d,) = _stages(dest)
    killed = 0
    try:
        deadline = time.monotonic() + 120
        while not killed:  # once it staged files PostgreSQL has not taken yet
            assert time.monotonic() < deadline, dest.log_tail()
            pids = _helper_pids(d)
            if pids and any(len(f) == 24 for f in os.listdir(d)):
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed += 1
                time.sleep(0.5)
            time.sleep(0.01)
        deadline = time.monotonic() + 180
        while True:
            try:
                if dest.scalar("select not pg_is_in_recovery()"):
                    break
            except Exception:  # noqa: BLE001,S110 - still starting
                pass
            assert time.monotonic() < deadline, dest.log_tail()
            time.sleep(0.2)
        assert dest.table_md5("t") == s.rows
        assert (d / "prefetch.log").read_text().count("started:") >= 2
    finally:
        dest.ensure_stopped()
        for x in _stages(dest):
            stage.stop(x)
        rmtree_pg(dest.base)


def _helper_pids(d: Path) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"_wal-prefetch" in argv and str(d).encode() in argv:
            out.append(int(pid))
    return out


def test_a_restore_that_fails_while_writing_stops_the_helper_it_started(pg_bindir: Path, pitr_exe: Path) -> None:
    """restore --replay starts the stage's helper before it writes the files (it stages while they are
    written); a restore that fails while writing them (a corrupt object in the repository) stops it: no
    helper left running on the failed directory, nothing left staged."""
    from pitr.storage.fs import FsStorage
    from tests.support.maint import flip_byte
    from tests.support.pg import chown_pg

    s = source("fs", pg_bindir, pitr_exe, None)
    storage = FsStorage(s.base / "repo")
    obj = max((o for o in storage.list("backups/") if "/data/" in o.key), key=lambda o: o.size)
    flip_byte(storage, obj.key, obj.size // 2)
    chown_pg(s.base / "repo", recursive=True)
    dest = PgCluster(s.src.bindir, s.base / f"f-{uuid.uuid4().hex[:6]}", name="f")
    try:
        p = s.pitr("restore", "--pgdata", dest.data, "--archive-mode", "off", "--replay", check=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        (d,) = _stages(dest)
        log = (d / "prefetch.log").read_text()
        assert "started:" in log and "exiting (asked to stop)" in log, log
        assert _helper_pids(d) == []
        assert not [f for f in os.listdir(d) if len(f) == 24]
        assert not (dest.data / "global" / "pg_control").exists()
    finally:
        flip_byte(storage, obj.key, obj.size // 2)
        chown_pg(s.base / "repo", recursive=True)
        rmtree_pg(dest.base)
