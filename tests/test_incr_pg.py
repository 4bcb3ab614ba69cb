"""Block-incremental backups on real PostgreSQL 15 and 18 (directory repository).

    pgbench -s 1 + a doomed table -> full F -> contiguous UPDATE, INSERT, a new table, DROP of the
    doomed one -> incr I1 -> time T1 (state S1) -> more changes -> diff D (on F) -> more changes
    -> incr I2 (on D) -> final state

Each backup is restored with `pitr restore --backup ID --replay` and the table checksums compared
with what the source had: I1 to T1, I2 to the end of the archive, and I2 again with --delta over
the stopped copy of I1 (unchanged files kept, the rest assembled). A small-change incr stores far
less than the full backup; a diff/incr with nothing to build on becomes a full one and says so.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pitr.repo.manifest import read_manifest
from pitr.storage.fs import FsStorage
from tests.support.maint import start_source
from tests.support.pg import PgCluster, make_tmpdir, rmtree_pg, run_as_postgres

pytestmark = pytest.mark.pg
TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history", "fresh")


@dataclass
class Chain:
    src: PgCluster
    base: Path
    env: dict[str, str]
    pitr_exe: Path
    ids: dict[str, str] = field(default_factory=dict)
    out: dict[str, dict] = field(default_factory=dict)  # type: ignore[type-arg]
    t1: str = ""
    s1: dict[str, str] = field(default_factory=dict)
    final: dict[str, str] = field(default_factory=dict)
    fallback: dict = field(default_factory=dict)  # type: ignore[type-arg]
    n: int = 0

    def pitr(self, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        p = run_as_postgres([str(self.pitr_exe), *map(str, args)], env=self.src.env() | self.env, cwd="/tmp",
                            check=False, timeout=timeout)
        assert p.returncode == 0, f"pitr {args} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def backup(self, name: str, kind: str) -> dict:  # type: ignore[type-arg]
        out = json.loads(self.pitr("backup", "--type", kind, "--json", "--pgdata", self.src.data).stdout)
        self.ids[name] = out["id"]
        self.out[name] = out
        return out  # type: ignore[no-any-return]

    def state(self, pg: PgCluster) -> dict[str, str]:
        return {t: pg.table_md5(t) for t in TABLES}

    def new_dir(self, name: str) -> PgCluster:
        self.n += 1
        return PgCluster(self.src.bindir, self.base / f"{name}{self.n}", name=name)

    def restore(self, dest: Path, *args: str) -> dict:  # type: ignore[type-arg]
        p = self.pitr("restore", "--pgdata", dest, "--json", "--replay", "--replay-timeout", "240",
                      "--archive-mode", "off", *args)
        return json.loads(p.stdout)  # type: ignore[no-any-return]


def _now(pg: PgCluster) -> str:
    time.sleep(1)
    t = str(pg.scalar("select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"
                      " || '+00:00'"))
    time.sleep(1)
    return t


@pytest.fixture(scope="module")
def chain(pg_bindir: Path, pitr_exe: Path) -> Iterator[Chain]:
    base = make_tmpdir("pitr-incr-")
    env = {"PITR_REPO": f"file://{base / 'repo'}"}
    src = start_source(PgCluster(pg_bindir, base / "src", name="src-incr"), env, pitr_exe)
    c = Chain(src, base, env, pitr_exe)
    try:
        # nothing to build on yet: a full backup, with the reason on stderr and in --json
        p = c.pitr("backup", "--type", "incr", "--json", "--pgdata", src.data)
        c.fallback = json.loads(p.stdout) | {"stderr": p.stderr}
        src.pgbench(["-i", "-s", "1", "-q"])
        src.sql("create table doomed as select g, repeat('x', 200) as pad from generate_series(1, 20000) g")
        src.sql("create table fresh (id int)")  # replaced below: a new relation file for the same name
        src.sql("checkpoint")
        c.backup("F", "full")
        src.sql("update pgbench_accounts set abalance = abalance + 7 where aid between 5001 and 6000")
        src.sql("insert into pgbench_history (tid, bid, aid, delta, mtime) "
                "select 1, 1, g, g, now() from generate_series(1, 500) g")
        src.sql("drop table fresh")
        src.sql("create table fresh as select g as id, md5(g::text) as h from generate_series(1, 5000) g")
        src.sql("drop table doomed")
        c.backup("I1", "incr")
        src.wait_archived(src.switch_wal())
        c.s1 = c.state(src)
        c.t1 = _now(src)
        src.sql("update pgbench_accounts set abalance = abalance - 3 where aid between 50001 and 52000")
        src.sql("delete from fresh where id % 5 = 0")
        src.sql("vacuum fresh")
        c.backup("D", "diff")
        src.sql("update pgbench_tellers set tbalance = tbalance + 1")
        src.sql("insert into fresh select g, 'late' from generate_series(100001, 103000) g")
        src.sql("update pgbench_accounts set filler = 'z' where aid between 90001 and 90100")
        c.backup("I2", "incr")
        src.sql("insert into pgbench_history (tid, bid, aid, delta, mtime) values (1, 1, 1, 1, now())")
        c.final = c.state(src)
        src.wait_archived(src.switch_wal())
    except BaseException:
        src.ensure_stopped()
        rmtree_pg(base)
        raise
    yield c
    src.ensure_stopped()
    rmtree_pg(base)


def test_backups_build_on_their_parents_and_store_little(chain: Chain) -> None:
    c = chain
    fb = c.fallback
    assert fb["type"] == "full" and fb["requested_type"] == "incr" and fb["parent"] is None
    assert "no full backup" in fb["reason"] and "taking a full backup instead of incr" in fb["stderr"]
    f, i1, d, i2 = (c.out[k] for k in ("F", "I1", "D", "I2"))
    assert f["type"] == "full" and f["reason"] is None
    assert (i1["type"], i1["parent"], i1["reason"]) == ("incr", c.ids["F"], None)
    assert (d["type"], d["parent"]) == ("diff", c.ids["F"])  # a diff builds on the newest full, not on I1
    assert (i2["type"], i2["parent"]) == ("incr", c.ids["D"])
    # a small change stores a small fraction of the full backup (the rest is referenced, block by block)
    print(f"stored bytes: full {f['stored_bytes']}, incr {i1['stored_bytes']}, diff {d['stored_bytes']}, "
          f"incr {i2['stored_bytes']}")
    assert i1["stored_bytes"] < 0.15 * f["stored_bytes"], (i1["stored_bytes"], f["stored_bytes"])
    assert i2["stored_bytes"] < 0.15 * f["stored_bytes"], (i2["stored_bytes"], f["stored_bytes"])
    storage = FsStorage(c.base / "repo")
    m = read_manifest(storage, c.ids["I2"])
    assert m.format == 5 and m.extra["chain"] == [c.ids["F"], c.ids["D"], c.ids["I2"]]  # blake3 entries (5)
    assert any(e.sources for e in m.files) and any(e.ref for e in m.files)
    mf = read_manifest(storage, c.ids["F"])
    assert mf.format == 5 and any(e.map for e in mf.files)  # a full backup writes (format-2) block maps too


def test_restore_the_newest_incr_and_then_delta_over_an_older_one(chain: Chain) -> None:
    c = chain
    a = c.new_dir("i1")
    out = c.restore(a.data, "--backup", c.ids["I1"], "--target-time", c.t1)
    assert out["backup"]["id"] == c.ids["I1"] and out["replay"]["reached"], out
    a.append_conf()
    a.start(env={})
    assert c.state(a) == c.s1, "the copy restored from I1 is not the state at T1"
    assert a.scalar("select count(*) from pg_class where relname = 'doomed'") == 0
    a.stop()

    b = c.new_dir("i2")
    out = c.restore(b.data, "--backup", c.ids["I2"], "--target-timeline", "1")
    assert out["backup"]["id"] == c.ids["I2"] and out["replay"]["reached"], out
    b.append_conf()
    b.start(env={})
    assert c.state(b) == c.final
    r = b.run("pg_amcheck", "--install-missing", "--all", "--heapallindexed", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    b.stop()

    # --delta over the stopped copy of I1: the files that match I2 are kept, the others assembled
    out = c.restore(a.data, "--delta", "--backup", c.ids["I2"], "--target-timeline", "1")
    files = out["files"]
    assert files["kept"] > 0 and files["written"] > 0, files
    a.append_conf()  # the source's postgresql.conf came back: its own port and socket again
    a.start(env={})
    assert c.state(a) == c.final
    a.stop()
