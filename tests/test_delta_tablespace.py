"""`restore --delta` and tablespace locations (issue 11, defect 2): a refresh cleans only the
PG_<major>_<catalog> directory of a location DIR's own pg_tblspc/<oid> link already points at;
another cluster's version directory, an operator's files and the live source's tablespace are
never touched. First on made-up backups, then on real PostgreSQL 15 and 18 with `pitr backup`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pitr.errors import RestoreError
from pitr.ops.recovery.restore import RestoreOptions, run_restore
from pitr.ops.recovery.restore_plan import Target
from pitr.storage.fs import FsStorage
from tests.conftest import ClusterFactory
from tests.support.pg import PgCluster, chown_pg, make_tmpdir, rmtree_pg, run_as_postgres
from tests.support.synthbackup import fake_repo

VDIR = "PG_15_202209061"
TS_FILE = f"pg_tblspc/16400/{VDIR}/5/16401"
FILES = {"PG_VERSION": b"15\n", "global/pg_control": b"\x01" * 8192, "base/1/1259": os.urandom(9000),
         TS_FILE: os.urandom(12000)}


def tree(path: Path) -> dict[str, str]:
    """Every entry under path: a file's SHA-256, a link's target, "dir" for a directory."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def opts(dest: Path, **kw: Any) -> RestoreOptions:
    base: dict[str, Any] = {"pgdata": dest, "target": Target("latest"), "pitr_argv": ["/opt/pitr/bin/pitr"],
                            "repo_url": "/srv/repo"}
    return RestoreOptions(**(base | kw))


@pytest.fixture
def work() -> Iterator[Path]:
    path = make_tmpdir("pitr-dt-")
    yield path
    rmtree_pg(path)


@pytest.fixture
def live(work: Path) -> Path:
    """The source cluster's tablespace location, in use on this host (what the manifest names)."""
    loc = work / "live-ts"
    (loc / VDIR / "5").mkdir(parents=True)
    (loc / VDIR / "5" / "16401").write_bytes(b"the live cluster's newer data")
    (loc / VDIR / "5" / "16999").write_bytes(b"a table created after the backup")
    return loc


@pytest.fixture
def repo(work: Path, live: Path) -> FsStorage:
    storage = FsStorage(work / "repo")
    fake_repo(storage, FILES, tablespaces={"16400": str(live)})
    chown_pg(work / "repo", recursive=True)
    return storage


def test_delta_cleans_only_its_own_version_directory(repo: FsStorage, work: Path) -> None:
    dest, ts = work / "copy", work / "copy-ts"
    run_restore(repo, opts(dest, tablespace_map={"16400": ts}))
    (ts / "PG_99_202501011" / "7").mkdir(parents=True)
    (ts / "PG_99_202501011" / "7" / "1259").write_bytes(b"another cluster's catalog")
    (ts / "README.operator").write_text("this disk is shared by two clusters\n")
    (ts / VDIR / "5" / "16402").write_bytes(b"dropped since the backup")
    (ts / VDIR / "5" / "16401").write_bytes(b"changed since the backup")
    foreign = {k: v for k, v in tree(ts).items() if not k.startswith(VDIR)}
    r = run_restore(repo, opts(dest, delta=True, tablespace_map={"16400": ts}))
    assert {k: v for k, v in tree(ts).items() if not k.startswith(VDIR)} == foreign
    assert (ts / VDIR / "5" / "16401").read_bytes() == FILES[TS_FILE]
    assert not (ts / VDIR / "5" / "16402").exists()
    assert r.files is not None and r.files.removed >= 1


def test_delta_refuses_a_location_its_link_does_not_point_at(repo: FsStorage, work: Path, live: Path) -> None:
    """Refreshing a copy on the source's host without --tablespace-map would write the backup's
    tablespace over the live one: refused, naming --tablespace-map; the live files stay as they were."""
    before = tree(live)
    dest, ts = work / "copy", work / "copy-ts"
    run_restore(repo, opts(dest, tablespace_map={"16400": ts}))
    assert tree(live) == before
    for d in (dest, work / "new-copy"):  # DIR's link points elsewhere / DIR is new
        with pytest.raises(RestoreError, match=r"16400 is not empty and .*does not link to it") as e:
            run_restore(repo, opts(d, delta=True))
        assert "--tablespace-map 16400=" in (e.value.hint or "")
        assert tree(live) == before
    assert not (work / "new-copy").exists()
    assert os.readlink(dest / "pg_tblspc" / "16400") == str(ts)


# --------------------------------------------------------------------------- real PostgreSQL

def _pitr(exe: Path, env: dict[str, str], *args: str | Path, check: bool = True) -> Any:
    p = run_as_postgres([exe, *args], env=env, cwd="/tmp", check=False, timeout=300)
    if check:
        assert p.returncode == 0, f"pitr {args} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def test_delta_refresh_with_a_tablespace_on_postgres(cluster_factory: ClusterFactory, pitr_exe: Path) -> None:
    src = cluster_factory("dts-src")
    repo = src.base.parent / "dts-repo"
    env = {"PITR_REPO": str(repo)}
    src.initdb(f"archive_mode = on\narchive_command = '{pitr_exe} wal-push %p'\n")
    src.start(env=env)
    _pitr(pitr_exe, env, "init", "-d", src.conninfo)
    live = src.base / "ts"
    live.mkdir()
    chown_pg(live)
    src.sql(f"create tablespace fast location '{live}'")
    # no autovacuum on it: the live location's files must stay byte-identical while the test looks
    src.sql("create table hot (id int primary key, v text) with (autovacuum_enabled = off) tablespace fast")
    src.sql("insert into hot select g, md5(g::text) from generate_series(1, 3000) g")
    oid = str(src.scalar("select oid from pg_tablespace where spcname = 'fast'"))
    _pitr(pitr_exe, env | src.env(), "backup")
    src.sql("update hot set v = 'after' where id % 5 = 0")
    final = src.table_md5("hot")
    src.wait_archived(src.switch_wal())
    src.sql("checkpoint")

    copy = PgCluster(src.bindir, src.base.parent / "dts-copy", name="dts-copy")
    ts2 = copy.base / "ts"
    argv: list[str | Path] = ["restore", "--pgdata", copy.data, "--replay", "--archive-mode", "off", "--json"]
    _pitr(pitr_exe, env, *argv, "--tablespace-map", f"{oid}={ts2}")
    vdir = next(p.name for p in ts2.iterdir() if p.name.startswith("PG_"))
    (ts2 / "PG_99_202501011").mkdir()
    (ts2 / "PG_99_202501011" / "1259").write_bytes(b"another cluster's file")
    (ts2 / "notes.txt").write_text("operator notes\n")
    chown_pg(ts2, recursive=True)
    foreign = {k: v for k, v in tree(ts2).items() if not k.startswith(vdir)}

    # refreshing the copy: its own link points at ts2, so only ts2/PG_<ver>_<cat> is renewed
    out = json.loads(_pitr(pitr_exe, env, *argv, "--delta", "--tablespace-map", f"{oid}={ts2}").stdout)
    assert out["replay"]["reached"]
    assert {k: v for k, v in tree(ts2).items() if not k.startswith(vdir)} == foreign
    copy.append_conf()
    copy.start()
    try:
        assert copy.table_md5("hot") == final
        assert copy.scalar("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'fast'") == str(ts2)
    finally:
        copy.stop()

    # without --tablespace-map the location is the live source's: refused, for the copy and a new DIR
    src.sql("checkpoint")
    live_before = tree(live)
    for dest in (copy.data, src.base.parent / "dts-new" / "data"):
        p = _pitr(pitr_exe, env, "restore", "--pgdata", dest, "--delta", check=False)
        assert p.returncode == 1 and f"tablespace {oid} is not empty" in p.stderr, p.stderr
        assert "--tablespace-map" in p.stderr and "Traceback" not in p.stderr
    assert tree(live) == live_before
    assert src.is_running() and src.table_md5("hot") == final
