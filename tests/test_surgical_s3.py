"""find-target and extract against an S3 repository (moto) on real PostgreSQL (15 plain, 18 encrypted), for a table in a
non-default tablespace; extract's --format sql; and extract cleans up after a failure (a bad --where)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.conftest import ClusterFactory
from tests.support.pg import chown_pg, pg_bin_dirs, run_as_postgres
from tests.support.s3 import MotoServer

pytestmark = pytest.mark.pg


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_s3_find_target_extract_sql_and_cleanup(cluster_factory: ClusterFactory, pitr_exe: Path,
                                                moto_server: MotoServer, tmp_pg_dir: Path, pg_version: str,
                                                encrypted: bool) -> None:
    if encrypted and pg_version != "18":
        pytest.skip("the encrypted variant runs on PostgreSQL 18 only (reading through the repository layer "
                    "does not depend on the server version)")
    if not encrypted and pg_version != "15" and "15" in pg_bin_dirs():
        pytest.skip("the plain variant runs on PostgreSQL 15 only (the encrypted one covers 18 in S3; "
                    "test_surgical_pg both versions in a directory)")
    if not moto_server.up:
        moto_server.recover()
    env = {"PITR_REPO": f"s3://{moto_server.create_bucket(f'sg-{uuid.uuid4().hex[:12]}')}/x"} | moto_server.env()
    (tmp_pg_dir / "tmp").mkdir()  # extract's TMPDIR: its throwaway copies are this test's alone to count
    chown_pg(tmp_pg_dir / "tmp")
    env |= {"TMPDIR": str(tmp_pg_dir / "tmp")}
    if encrypted:  # the surgical commands read WAL and backups through the same sealed layer as restore
        env |= {"PITR_ENCRYPTION_PASSPHRASE": "surgical test passphrase"}
    src = cluster_factory("src")
    src.initdb(f"archive_mode = on\narchive_command = '{pitr_exe} wal-push %p'\n")
    src.start(env=env)

    def pitr(*args: str | Path, check: bool = True) -> str:
        p = run_as_postgres([str(pitr_exe), *map(str, args)], env=env, cwd="/tmp", check=False, timeout=600)
        if check:
            assert p.returncode == 0, f"pitr {args} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p.stdout + p.stderr

    pitr("init", "--dbname", src.conninfo, *(["--encrypt"] if encrypted else []))
    ts = tmp_pg_dir / "ts"
    ts.mkdir()
    chown_pg(ts)
    src.sql(f"create tablespace ts location '{ts}'")
    src.sql("create table notes (id int primary key, body text) tablespace ts")  # a non-default tablespace
    src.sql("insert into notes select g, 'it''s note ' || g from generate_series(1, 40) g")
    pitr("backup", "--dbname", src.conninfo, "--pgdata", src.data)
    xid = int(src.sql("with d as (delete from notes where id > 30 returning 1) select txid_current() from d")[0][0])
    src.wait_archived(src.switch_wal())

    found = json.loads(run_as_postgres([str(pitr_exe), "find-target", "--dbname", src.conninfo, "--table", "notes",
                                        "--json"], env=env, cwd="/tmp", timeout=600).stdout)
    (tx,) = found["transactions"]
    assert tx["xid"] == xid and tx["rows"] == {"delete": 10} and tx["status"] == "committed"

    out = tmp_pg_dir / "notes.sql"
    text = pitr("extract", "--table", "public.notes", "--target-xid", str(xid), "--target-exclusive",
                "--where", "id > 28", "--to", out, "--format", "sql", "--dbname", src.conninfo)
    assert "extracted 12 rows" in text
    lines = out.read_text().splitlines()
    assert len(lines) == 12 and lines[0].startswith('insert into "public"."notes" ("id", "body") values (')
    src.sql("create table notes_back (id int, body text)")
    src.sql("\n".join(line.replace('"public"."notes"', "notes_back", 1) for line in lines))
    assert src.scalar("select count(*) from notes_back where body like 'it''s note %'") == 12

    before = set((tmp_pg_dir / "tmp").glob("pitr-extract-*"))
    bad = tmp_pg_dir / "bad.csv"
    p = run_as_postgres([str(pitr_exe), "extract", "--table", "notes", "--target-xid", str(xid), "--where",
                         "no_such_column = 1", "--to", bad, "--dbname", src.conninfo], env=env, cwd="/tmp",
                        check=False, timeout=600)
    assert p.returncode == 1 and "no_such_column" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not bad.exists() and not list(tmp_pg_dir.glob(".bad.csv*"))
    assert set((tmp_pg_dir / "tmp").glob("pitr-extract-*")) == before, "the throwaway copy was left"
