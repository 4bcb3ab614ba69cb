"""`pitr extract`: a table's rows as they were at a target, without rewinding the cluster.

The recipe (docs/extract.md):
  1. check      the output first: --to FILE must not exist, --into-table NAME must not exist on
                the running server (nothing is restored for an output that would be refused)
  2. restore    into a fresh throwaway directory: only the table's database (restore --db-include,
                plus the system ones), replayed to TARGET with archiving off on a private socket
                (ops/recovery/restore + restore_replay, promote at the target)
  3. read       start the copy again privately, COPY the rows out (--where filters them): to a
                temp file renamed into place (CSV with a header, or INSERT statements), or into a
                new table on the running server (same columns and types, no constraints) in one
                transaction
  4. clean      stop the server and remove the directory -- also on failure and Ctrl-C
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pitr.errors import PitrError, PostgresError, RestoreError, UsageError
from pitr.ops.recovery import db_include
from pitr.ops.recovery.restore import RestoreOptions, RestoreResult, load_plan, run_restore
from pitr.ops.recovery.restore_plan import Target
from pitr.ops.recovery.restore_replay import sql_users
from pitr.ops.surgical.find_target import split_table
from pitr.ops.wal import spool
from pitr.storage.base import Storage


@dataclass(frozen=True)
class ExtractOptions:
    table: str  # SCHEMA.TABLE
    db: str  # the table's database
    target: Target
    to_file: Path | None = None
    fmt: str = "csv"  # csv | sql
    into_table: str | None = None
    where: str | None = None
    conninfo: str | None = None  # the running server (--into-table)
    restore: RestoreOptions | None = None  # repo settings, pg_bin, env, jobs (pgdata/target are ours)
    timeout: float | None = None


@dataclass
class ExtractResult:
    rows: int
    table: str
    db: str
    output: str
    restore: RestoreResult
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        rp = self.restore.replay
        return {"rows": self.rows, "table": self.table, "database": self.db, "output": self.output,
                "backup": self.restore.plan.backup.id, "target": self.restore.plan.target.to_json(),
                "point_reached": None if rp is None else {
                    "stop_reason": rp.stop_reason, "last_transaction_time": rp.last_xact_time,
                    "last_replayed_lsn": rp.last_lsn},
                "seconds": round(self.seconds, 3), "notes": self.notes}


def _ident(schema: str, name: str) -> Any:
    from psycopg import sql

    return sql.Identifier(schema, name)


def _running(conninfo: str | None) -> Any:
    import psycopg

    try:
        return psycopg.connect(conninfo or "", autocommit=True, connect_timeout=10, application_name="pitr extract")
    except psycopg.Error as e:
        first = (str(e).strip().splitlines() or ["connection failed"])[0]
        raise PostgresError(f"cannot connect to PostgreSQL: {first}", "set --dbname CONNINFO") from None


def check_outputs(opts: ExtractOptions) -> None:
    """Refuse an output that exists before anything is restored."""
    if opts.to_file is not None:
        f = opts.to_file
        if f.exists() or f.is_symlink():
            raise UsageError(f"{f} already exists; extract does not overwrite files", "give a new file name")
        if not f.parent.is_dir():
            raise UsageError(f"the directory of {f} does not exist")
        if not os.access(f.parent, os.W_OK | os.X_OK):
            raise UsageError(f"{f.parent} is not writable by this user")
    if opts.into_table is not None:
        schema, name = split_table(opts.into_table)
        with _running(opts.conninfo) as conn:
            row = conn.execute("select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace"
                               " where n.nspname = %s and c.relname = %s", (schema, name)).fetchone()
        if row is not None:
            raise UsageError(f"{schema}.{name} already exists on the running server; extract creates a new table",
                             "give --into-table a new name")


def _workdir() -> tuple[Path, tuple[int, int] | None]:
    base = Path(tempfile.mkdtemp(prefix="pitr-extract-"))
    owner = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: the copy belongs to the postgres user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base, ignore_errors=True)
            raise RestoreError("running as root, and there is no 'postgres' OS user to run the throwaway "
                               "server as", "run pitr extract as the PostgreSQL OS user") from None
        owner = (pw.pw_uid, pw.pw_gid)
        os.chown(base, *owner)
    return base, owner


def run_extract(storage: Storage, opts: ExtractOptions,
                on_phase: Callable[[str], None] | None = None) -> ExtractResult:
    from pitr.pg.binaries import find_pg_bin
    from pitr.pg.server import PrivateServer, sleep_until

    t0 = time.monotonic()
    phase = on_phase or (lambda _m: None)
    schema, name = split_table(opts.table)
    check_outputs(opts)
    ro = opts.restore or RestoreOptions(pgdata=Path("/nonexistent"), target=opts.target)
    base, owner = _workdir()
    notes: list[str] = []
    srv = None
    try:
        pgdata = base / "data"
        ropts = replace(ro, pgdata=pgdata, target=opts.target, replay=True, action="promote",
                        archive_mode="off", delta=False, dry_run=False, db_include=(opts.db,),
                        replay_timeout=opts.timeout)
        plan, _meta = load_plan(storage, ropts)
        # tablespaces go inside the throwaway directory too: their own locations are the live cluster's
        ropts = replace(ropts, tablespace_map={t.oid: base / f"tablespace-{t.oid}" for t in plan.backup.tablespaces})
        try:
            db_include.databases(plan.backup)
        except RestoreError:
            ropts = replace(ropts, db_include=())
            notes.append(f"backup {plan.backup.id} does not record its databases: all of them were restored")
        phase(f"restoring database {opts.db} of backup {plan.backup.id} into {pgdata}")
        res = run_restore(storage, ropts)
        phase("reading the rows")
        bindir = find_pg_bin(plan.backup.pg_version, ro.pg_bin, ro.server_env.get("PATH"))
        sock = base / "sock"
        sock.mkdir(mode=0o700)
        if owner:
            os.chown(sock, *owner)
        srv = PrivateServer(bindir, pgdata, sock, base / "server.log", dict(ro.server_env), owner)
        srv.start()
        deadline = time.monotonic() + 120
        users = sql_users(owner)
        while srv.query("select 1", users) is None:
            if not srv.alive() or not sleep_until(deadline):
                raise RestoreError(f"the restored copy did not start (server log {base / 'server.log'})")
        rows, output = _read_out(srv, users, opts, schema, name)
        return ExtractResult(rows, f"{schema}.{name}", opts.db, output, res, time.monotonic() - t0, notes)
    finally:
        if srv is not None:
            srv.stop()
        spool.stop_helpers(base / "data")  # the recovery's prefetcher may still be writing into pg_wal
        shutil.rmtree(base, ignore_errors=True)


def _private(srv: Any, users: Sequence[str], db: str) -> Any:
    import psycopg

    err: Exception | None = None
    for user in users:
        try:
            return psycopg.connect(host=str(srv.sockdir), port=srv.port, user=user, dbname=db, autocommit=True,
                                   connect_timeout=10, application_name="pitr extract")
        except psycopg.Error as e:
            err = e
    raise RestoreError(f"cannot connect to the restored copy of database {db}: {err}")


def _read_out(srv: Any, users: Sequence[str], opts: ExtractOptions, schema: str, name: str) -> tuple[int, str]:
    import psycopg
    from psycopg import sql

    src = _private(srv, users, opts.db)
    try:
        cols = src.execute("select a.attname, format_type(a.atttypid, a.atttypmod) from pg_attribute a"
                           " where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped"
                           " order by a.attnum", (sql.Identifier(schema, name).as_string(src),)).fetchall()
    except psycopg.Error as e:
        src.close()
        raise UsageError(f"table {schema}.{name} does not exist in database {opts.db} at the target: "
                         f"{str(e).strip().splitlines()[0]}") from None
    try:
        where = sql.SQL(" where ({})").format(sql.SQL(opts.where)) if opts.where else sql.SQL("")  # type: ignore[arg-type]
        select = sql.SQL("select {} from {}{}").format(
            sql.SQL(", ").join(sql.Identifier(c) for c, _t in cols), sql.Identifier(schema, name), where)
        if opts.to_file is not None:
            return _to_file(src, select, cols, opts, schema, name), str(opts.to_file)
        return _into_table(src, select, cols, opts), str(opts.into_table)
    except psycopg.Error as e:
        raise PostgresError(f"reading {schema}.{name} failed: {str(e).strip().splitlines()[0]}") from None
    finally:
        src.close()


def _to_file(src: Any, select: Any, cols: list[tuple[str, str]], opts: ExtractOptions, schema: str,
             name: str) -> int:
    from psycopg import sql

    assert opts.to_file is not None
    dest = opts.to_file
    tmp = dest.with_name(f".{dest.name}.pitr-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "xb") as out:
            if opts.fmt == "csv":
                with src.cursor().copy(sql.SQL("copy ({}) to stdout with (format csv, header)").format(select)) as cp:
                    for chunk in cp:
                        out.write(chunk)
                # the copy is a stopped point in time: counting again gives the rows written
                n = src.execute(sql.SQL("select count(*) from ({}) s").format(select)).fetchone()[0]
            else:
                head = sql.SQL("insert into {} ({}) values (").format(
                    sql.Identifier(schema, name), sql.SQL(", ").join(sql.Identifier(c) for c, _t in cols)
                ).as_string(src)
                vals = sql.SQL(" || ', ' || ").join(
                    sql.SQL("quote_nullable({})").format(sql.Identifier(c)) for c, _t in cols)
                q = sql.SQL("select {} || ({}) || ');' from ({}) s").format(sql.Literal(head), vals, select)
                # a server-side cursor streams the rows; it lives in a transaction
                with src.transaction(), src.cursor(name="pitr_extract") as cur:
                    cur.execute(q)
                    for (line,) in cur:
                        out.write(line.encode() + b"\n")
                        n += 1
            out.flush()
            os.fsync(out.fileno())
        os.link(tmp, dest)  # atomic, and never over a file that appeared meanwhile
    except FileExistsError:
        raise UsageError(f"{dest} appeared while extracting; it was not overwritten") from None
    finally:
        tmp.unlink(missing_ok=True)
    return int(n)


def _into_table(src: Any, select: Any, cols: list[tuple[str, str]], opts: ExtractOptions) -> int:
    from psycopg import sql

    assert opts.into_table is not None
    schema, name = split_table(opts.into_table)
    dst = _running(opts.conninfo)
    n = 0
    try:
        dst.autocommit = False
        with dst.cursor() as cur:
            cur.execute(sql.SQL("create table {} ({})").format(
                sql.Identifier(schema, name),
                sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in cols)))
            with src.cursor().copy(sql.SQL("copy ({}) to stdout").format(select)) as out, \
                    cur.copy(sql.SQL("copy {} from stdin").format(sql.Identifier(schema, name))) as into:
                for chunk in out:
                    into.write(chunk)
            n = cur.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(schema, name))).fetchone()[0]
        dst.commit()
    except Exception as e:
        dst.rollback()
        if isinstance(e, PitrError):
            raise
        import psycopg

        if isinstance(e, psycopg.Error):
            raise PostgresError(f"loading the rows into {schema}.{name} failed: "
                                f"{str(e).strip().splitlines()[0]}; nothing was created") from None
        raise
    finally:
        dst.close()
    return int(n)
