"""Surgical recovery on real PostgreSQL 15 and 18 (file repository): find-target and --target-exclusive.

One source cluster per server version lives through the accidents, shared by this module's tests:

    invoices (2,000) + items + t_trunc + t_drop -> backup -> DELETE 200 invoices (xid D) -> 50 more
    invoices -> an aborted DELETE (xid A) -> UPDATE 30 items (xid U) -> TRUNCATE t_trunc (xid T)
    -> DROP TABLE t_drop (xid X, its relfilenode noted) -> VACUUM FULL invoices (a rewrite)
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.maint import start_source
from tests.support.pg import PgCluster, chown_pg, make_tmpdir, rmtree_pg, run_as_postgres

pytestmark = pytest.mark.pg


@dataclass
class Accidents:
    src: PgCluster
    base: Path
    env: dict[str, str]
    pitr_exe: Path
    xids: dict[str, int] = field(default_factory=dict)
    drop_relfilenode: int = 0
    shop: str = ""
    before: str = ""  # invoices' checksum just before the DELETE
    n: int = 0

    def pitr(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = run_as_postgres([str(self.pitr_exe), *map(str, args)], env=self.env, cwd="/tmp", check=False,
                            timeout=600)
        if check and p.returncode != 0:
            raise AssertionError(f"pitr {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def find(self, *args: str) -> dict:  # type: ignore[type-arg]
        return json.loads(self.pitr("find-target", "--dbname", self.src.conninfo, "--json", *args).stdout)  # type: ignore[no-any-return]

    def new_dir(self, name: str) -> PgCluster:
        self.n += 1
        return PgCluster(self.src.bindir, self.base / f"{name}{self.n}", name=name)


def _xid_of(pg: PgCluster, sql: str) -> int:
    """Run `sql` in one transaction and return that transaction's xid."""
    with pg.connect() as conn:
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute(sql)
            cur.execute("select txid_current()")
            row = cur.fetchone()
            assert row is not None
        conn.commit()
    return int(row[0])


@pytest.fixture(scope="module")
def acc(pg_bindir: Path, pitr_exe: Path) -> Iterator[Accidents]:
    base = make_tmpdir("pitr-sg-")
    # extract's TMPDIR: its throwaway copies are this module's alone to count (another worker's or test
    # session's extract may run meanwhile)
    (base / "tmp").mkdir()
    chown_pg(base / "tmp")
    env = {"PITR_REPO": f"file://{base / 'repo'}", "TMPDIR": str(base / "tmp")}
    src = start_source(PgCluster(pg_bindir, base / "src", name="src"), env, pitr_exe)
    a = Accidents(src, base, env, pitr_exe)
    try:
        src.sql("create table invoices (id int primary key, customer text not null, amount numeric(12,2) not null)")
        src.sql("insert into invoices select g, 'customer-' || (g % 97), round((g * 7.31)::numeric % 5000, 2)"
                " from generate_series(1, 2000) g")
        src.sql("create table items (id int primary key, qty int)")
        src.sql("insert into items select g, 1 from generate_series(1, 100) g")
        src.sql("create table t_trunc (id int)")
        src.sql("insert into t_trunc select generate_series(1, 10)")
        src.sql("create table t_drop (id int)")
        src.sql("insert into t_drop select generate_series(1, 10)")
        for db in ("shop", "other"):
            src.sql(f"create database {db}")
            src.sql(f"create table {db}_rows (id int primary key, note text)", db=db)
            src.sql(f"insert into {db}_rows select g, '{db} ' || g from generate_series(1, 500) g", db=db)
        a.pitr("backup", "--dbname", src.conninfo, "--pgdata", src.data)
        src.sql("insert into shop_rows select g, 'after backup' from generate_series(501, 600) g", db="shop")
        a.shop = src.table_md5("shop_rows", db="shop")
        a.before = src.table_md5("invoices")
        a.xids["delete"] = _xid_of(src, "delete from invoices where id % 10 = 7")
        src.sql("insert into invoices select g, 'later', 1 from generate_series(2001, 2050) g")
        with src.connect() as conn:
            conn.autocommit = False
            with conn.cursor() as cur:
                cur.execute("delete from invoices where id < 100")
                cur.execute("select txid_current()")
                a.xids["aborted"] = int(cur.fetchone()[0])  # type: ignore[index]
            conn.rollback()
        a.xids["update"] = _xid_of(src, "update items set qty = 2 where id <= 30")
        a.xids["truncate"] = _xid_of(src, "truncate t_trunc")
        a.drop_relfilenode = int(src.scalar("select pg_relation_filenode('t_drop')"))
        a.xids["drop"] = _xid_of(src, "drop table t_drop")
        src.sql("vacuum full invoices")
        src.wait_archived(src.switch_wal())
        assert src.scalar("select count(*) from invoices") == 1850
    except BaseException:
        src.ensure_stopped()
        raise
    yield a
    src.ensure_stopped()
    rmtree_pg(base)


def _by_xid(out: dict) -> dict[int, dict]:  # type: ignore[type-arg]
    return {int(t["xid"]): t for t in out["transactions"]}


def test_find_target_names_the_deleting_transaction(acc: Accidents) -> None:
    """find-target over archived WAL names the DELETE of 200 invoices with its restore target, shows the
    aborted DELETE as harmless, and follows the table through VACUUM FULL (a new relfilenode)."""
    out = acc.find("--table", "public.invoices")
    txs = _by_xid(out)
    d = txs[acc.xids["delete"]]
    assert d["status"] == "committed" and d["rows"] == {"delete": 200} and d["kinds"] == ["delete"], d
    assert d["restore_target"] == f"--target-xid {acc.xids['delete']} --target-exclusive"
    assert d["lsn"] and d["time"]
    ab = txs[acc.xids["aborted"]]
    assert ab["status"] == "aborted" and ab["harmless"] is True and ab["restore_target"] is None
    assert ab["rows"]["delete"] == 89  # ids < 100 less the 10 already deleted
    assert any("rewrite" in t["kinds"] for t in out["transactions"]), out["transactions"]
    assert out["segments"]["count"] >= 1
    text = acc.pitr("find-target", "--dbname", acc.src.conninfo, "--table", "invoices").stdout
    assert f"xid {acc.xids['delete']}: delete (200 delete rows)" in text
    assert f"--target-xid {acc.xids['delete']} --target-exclusive" in text and "harmless" in text


def test_find_target_update_truncate_drop(acc: Accidents) -> None:
    upd = _by_xid(acc.find("--table", "public.items"))
    u = upd[acc.xids["update"]]
    assert u["kinds"] == ["update"] and sum(u["rows"].values()) == 30, u
    assert set(upd) == {acc.xids["update"]}
    tr = _by_xid(acc.find("--table", "t_trunc"))
    assert tr[acc.xids["truncate"]]["kinds"] == ["truncate"], tr
    dr = _by_xid(acc.find("--relfilenode", str(acc.drop_relfilenode), "--db", "postgres"))
    assert dr[acc.xids["drop"]]["kinds"] == ["drop"], dr
    later = acc.pitr("find-target", "--dbname", acc.src.conninfo, "--table", "items", "--since", "2100-01-01 00:00+00")
    assert "no transaction deleted, updated, truncated or dropped it" in later.stdout
    gone = acc.pitr("find-target", "--dbname", acc.src.conninfo, "--table", "public.t_drop", check=False)
    assert gone.returncode == 2 and "--relfilenode" in gone.stderr and "Traceback" not in gone.stderr


def test_target_exclusive_stops_just_before_the_delete(acc: Accidents) -> None:
    """restore --target-xid D --target-exclusive --replay: the 200 deleted rows are there; without
    --target-exclusive the DELETE is replayed and they are gone."""
    counts = {}
    for label, extra in (("excl", ["--target-exclusive"]), ("incl", [])):
        pg = acc.new_dir(label)
        acc.pitr("restore", "--pgdata", pg.data, "--target-xid", str(acc.xids["delete"]), "--replay",
                 "--archive-mode", "off", "--replay-timeout", "240", *extra)
        pg.append_conf()
        pg.start(env={})
        try:
            counts[label] = pg.scalar("select count(*) from invoices")
        finally:
            pg.ensure_stopped()
    assert counts == {"excl": 2000, "incl": 1800}


def test_db_include_restores_only_the_named_database(acc: Accidents) -> None:
    """restore --db-include shop: shop (with the rows written after the backup) is right, postgres is
    there, the server starts; 'other' is left out and named as unusable; an unknown name is refused."""
    bad = acc.new_dir("bad")
    p = acc.pitr("restore", "--pgdata", bad.data, "--db-include", "nosuchdb", check=False)
    assert p.returncode == 2 and "nosuchdb" in p.stderr and "shop" in p.stderr, p.stderr
    assert not bad.data.exists()
    pg = acc.new_dir("dbinc")
    out = json.loads(acc.pitr("restore", "--pgdata", pg.data, "--db-include", "shop", "--replay", "--archive-mode",
                              "off", "--replay-timeout", "240", "--json").stdout)
    assert any("other" in n and "unusable" in n for n in out["notes"]), out["notes"]
    assert "other" in (pg.data / "pitr-excluded-databases").read_text()
    pg.append_conf()
    pg.start(env={})
    try:
        assert pg.table_md5("shop_rows", db="shop") == acc.shop
        assert pg.scalar("select count(*) from invoices") == 1850
        # the left-out database's files are zeroes: it does not hold its rows
        other_oid = pg.scalar("select oid from pg_database where datname = 'other'")
        rel = next(p for p in (pg.data / "base" / str(other_oid)).iterdir() if p.name.isdigit()
                   and p.stat().st_size > 0)
        assert set(rel.read_bytes()) == {0}
        pg.sql("drop database other")
    finally:
        pg.ensure_stopped()


def test_extract_brings_back_the_deleted_rows(acc: Accidents) -> None:
    """The surgical story: find-target names the DELETE; extract --target-xid D --target-exclusive
    --into-table gives back the table as it was just before it (checksum equal), so the 200 missing
    rows can be re-inserted while the 50 later ones stay; --to FILE writes CSV; existing outputs are
    refused before anything is restored; the throwaway copy is gone afterwards."""
    src = acc.src
    xid = acc.xids["delete"]
    assert acc.find("--table", "public.invoices")["transactions"][0]["xid"] == xid
    before = set(Path(acc.env["TMPDIR"]).glob("pitr-extract-*"))
    out = json.loads(acc.pitr("extract", "--table", "public.invoices", "--target-xid", str(xid),
                              "--target-exclusive", "--into-table", "public.recovered", "--dbname", src.conninfo,
                              "--replay-timeout", "240", "--json").stdout)
    assert out["rows"] == 2000 and out["target"]["xid"] == str(xid) and out["target"]["exclusive"] is True
    assert "before commit" in out["point_reached"]["stop_reason"] and out["seconds"] > 0
    assert src.table_md5("recovered") == acc.before
    missing = src.scalar("select count(*) from recovered r where not exists (select 1 from invoices i"
                         " where i.id = r.id)")
    assert missing == 200
    src.sql("insert into invoices select r.* from recovered r where not exists (select 1 from invoices i"
            " where i.id = r.id)")
    assert src.scalar("select count(*) from invoices") == 2050
    assert set(Path(acc.env["TMPDIR"]).glob("pitr-extract-*")) == before, "the throwaway copy was left"

    again = acc.pitr("extract", "--table", "invoices", "--target-xid", str(xid), "--into-table", "recovered",
                     "--dbname", src.conninfo, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    csv = acc.base / f"deleted{acc.n}.csv"
    acc.n += 1
    text = acc.pitr("extract", "--table", "invoices", "--target-xid", str(xid), "--target-exclusive",
                    "--where", "id % 10 = 7", "--to", csv, "--dbname", src.conninfo).stdout
    assert "extracted 200 rows" in text
    lines = csv.read_text().splitlines()
    assert lines[0] == "id,customer,amount" and len(lines) == 201 and lines[1].split(",")[0].endswith("7")
    refused = acc.pitr("extract", "--table", "invoices", "--to", csv, "--dbname", src.conninfo, check=False)
    assert refused.returncode == 2 and "already exists" in refused.stderr


def test_extract_interrupted_leaves_nothing_behind(acc: Accidents) -> None:
    """SIGTERM while the throwaway server replays: extract stops it, removes the directory, writes no
    file and exits non-zero."""
    import os
    import signal
    import time

    from tests.support.pg import as_pg_argv, pg_env

    out = acc.base / "interrupted.csv"
    before = set(Path(acc.env["TMPDIR"]).glob("pitr-extract-*"))
    proc = subprocess.Popen(as_pg_argv([acc.pitr_exe, "extract", "--table", "invoices", "--target-xid",
                                        str(acc.xids["delete"]), "--to", out, "--dbname", acc.src.conninfo]),
                            env=pg_env(acc.env), cwd="/tmp", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    server_pid = 0
    while time.monotonic() < deadline and proc.poll() is None:
        new = set(Path(acc.env["TMPDIR"]).glob("pitr-extract-*")) - before
        pid_file = next((d / "data" / "postmaster.pid" for d in new if (d / "data" / "postmaster.pid").exists()), None)
        try:
            server_pid = int(pid_file.read_text().split("\n", 1)[0]) if pid_file else 0
        except (OSError, ValueError):  # being written or removed: look again
            server_pid = 0
        if server_pid:
            break
        time.sleep(0.05)
    assert server_pid, "the throwaway server never started"
    proc.send_signal(signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    assert set(Path(acc.env["TMPDIR"]).glob("pitr-extract-*")) == before, "the throwaway directory was left"
    assert not out.exists()
    time.sleep(0.5)
    try:
        os.kill(server_pid, 0)
        alive = Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except ProcessLookupError:
        alive = False
    assert not alive, "the throwaway server is still running"
