"""Fault suite, wal-fetch with look-ahead: the prefetch helper killed at each step of fetching ahead.

What PostgreSQL relies on afterwards: every archived segment it asks for comes back whole and
byte-identical (never a half-written or unverified spool file, never "not archived" for one that
is), whether the answer comes from a restarted helper or from a direct fetch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitr.ops.wal import spool
from tests.support import walgen
from tests.support.faults import PITR, kill_env, run
from tests.support.pg import chown_pg, make_tmpdir, rmtree_pg

NAMES = walgen.names(5, 5)


@pytest.fixture
def restoring() -> Iterator[tuple[Path, Path, Path]]:
    """(pgdata being recovered, repository, directory with the original segments)."""
    base = make_tmpdir("pitr-ff-")
    pgdata = walgen.archived_cluster(base, NAMES, seeded=True)
    chown_pg(base, recursive=True)
    yield pgdata, base / "repo", base / "src"
    pdir = pgdata / "pg_wal" / spool.PREFETCH_SPOOL
    if pdir.is_dir():
        spool.request_stop(pdir, spool.PREFETCHD)
        deadline = time.monotonic() + 15
        while spool.helper_state(pdir, spool.PREFETCHD) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    rmtree_pg(base)


STEPS = {
    "mid-write": ("pitr.ops.wal.prefetch:_CrcWriter.write", "after", 3, ""),
    "renamed-before-meta": ("os:replace", "after", 1, f"{spool.PREFETCH_SPOOL}/{NAMES[1]}"),
    "before-meta": ("pitr.ops.wal.spool:write_marker", "before", 1, f"{NAMES[2]}.meta"),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_prefetch_helper_killed_at_each_step(restoring: tuple[Path, Path, Path], step: str) -> None:
    pgdata, repo, src = restoring
    target, when, nth, match = STEPS[step]
    once = pgdata.parent / "killed-once"
    env = {"PITR_REPO": str(repo), "PITR_PREFETCH": "3"} | kill_env(target, when, nth, match, once=once)
    for name in NAMES:
        dest = pgdata / "pg_wal" / "RECOVERYXLOG"
        dest.unlink(missing_ok=True)
        r = run([PITR, "wal-fetch", name, "pg_wal/RECOVERYXLOG"], env, cwd=pgdata, timeout=120)
        assert r.returncode == 0, f"{name}: exit {r.returncode}: {r.stderr}"
        assert dest.read_bytes() == (src / name).read_bytes(), f"{name}: other bytes than archived"
    assert once.exists(), "the helper never reached the kill point"
