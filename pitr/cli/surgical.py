"""Commands for surgical recovery: find-target (which transaction hurt a table), extract (its rows at a target)."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated, Any

import typer

from pitr.cli.common import settings_of
from pitr.cli.options import DbName, JsonResult, PgBin, RestoreBackup, TableDb
from pitr.cli.render import emit, emit_json, human_duration
from pitr.errors import UsageError


def _when(opt: str, value: str | None) -> datetime | None:
    from pitr.ops.recovery.restore_plan import parse_time

    if value is None:
        return None
    try:
        return parse_time(value)
    except UsageError as e:  # parse_time speaks of "the target time": name the option instead
        raise UsageError(str(e).replace("the target time", opt), e.hint) from None


def find_target_cmd(
    ctx: typer.Context,
    table: Annotated[str | None, typer.Option("--table", metavar="SCHEMA.TABLE", help="The table that was hurt (resolved on the running server through --dbname).", show_default=False)] = None,
    since: Annotated[str | None, typer.Option("--since", help="Start of the window [default: the newest backup's start].", show_default=False)] = None,
    until: Annotated[str | None, typer.Option("--until", help="End of the window [default: the end of the archive].", show_default=False)] = None,
    relfilenode: Annotated[int | None, typer.Option("--relfilenode", help="The table's file number, for a table that no longer exists (with --db).", show_default=False)] = None,
    db: TableDb = None,
    dbname: DbName = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="Segments decoded at once [default: the jobs setting].", show_default=False)] = None,
    pg_bin: Annotated[str | None, typer.Option("--pg-bin", help="PostgreSQL bin directory holding pg_waldump [default: found by version].", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout (docs/find-target.md).")] = False,
) -> None:
    """List the transactions that deleted or updated rows of a table, truncated or dropped it, from archived WAL."""
    from pitr.cli.repoopen import open_repo
    from pitr.ops.surgical.find_target import find_target, resolve

    s = settings_of(ctx, dbname=dbname, jobs=jobs, pg_bin=pg_bin)
    t_since, t_until = _when("--since", since), _when("--until", until)
    if t_since and t_until and t_since > t_until:
        raise UsageError("--since is after --until")
    if relfilenode is not None and relfilenode <= 0:
        raise UsageError(f"--relfilenode must be a positive file number, not {relfilenode}")
    rel = resolve(s.dbname, table, db, relfilenode)
    storage = open_repo(s)
    show = sys.stderr.isatty() and not json_out

    def progress(done: int, total: int) -> None:
        if show:
            print(f"\r\x1b[Kpitr: decoded {done} of {total} segments", end="", file=sys.stderr, flush=True)

    try:
        res = find_target(storage, rel, t_since, t_until, s.jobs, s.pg_bin,
                          progress=progress)
    finally:
        storage.close()
    if show:
        print("\r\x1b[K", end="", file=sys.stderr)
    if json_out:
        emit_json(res.to_json())
        return
    emit(render_text(res))


def extract_cmd(
    ctx: typer.Context,
    table: Annotated[str, typer.Option("--table", metavar="SCHEMA.TABLE", help="The table whose rows to bring back.", show_default=False)],
    target_time: Annotated[str | None, typer.Option("--target-time", help="The rows as they were at this time.", show_default=False)] = None,
    target_lsn: Annotated[str | None, typer.Option("--target-lsn", metavar="LSN", help="The rows as they were at this WAL location.", show_default=False)] = None,
    target_xid: Annotated[str | None, typer.Option("--target-xid", metavar="XID", help="The rows as they were at the commit of this transaction (with --target-exclusive: just before it).", show_default=False)] = None,
    target_name: Annotated[str | None, typer.Option("--target-name", metavar="NAME", help="The rows as they were at this restore point.", show_default=False)] = None,
    target: Annotated[str | None, typer.Option("--target", metavar="immediate", help="'immediate': as of the end of the backup.", show_default=False)] = None,
    target_exclusive: Annotated[bool, typer.Option("--target-exclusive", help="Stop just before the time, LSN or xid target.")] = False,
    backup: RestoreBackup = None,
    db: TableDb = None,
    to: Annotated[str | None, typer.Option("--to", metavar="FILE", help="Write the rows to this new file.", show_default=False)] = None,
    fmt: Annotated[str, typer.Option("--format", help="--to format: CSV with a header, or INSERT statements.")] = "csv",
    into_table: Annotated[str | None, typer.Option("--into-table", metavar="NAME", help="Load the rows into this new table on the running server (--dbname).", show_default=False)] = None,
    where: Annotated[str | None, typer.Option("--where", metavar="SQL", help="Only the rows matching this condition (SQL, run on the throwaway copy).", show_default=False)] = None,
    dbname: DbName = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="Parallel file workers of the restore [default 2].", show_default=False)] = None,
    pg_bin: PgBin = None,
    replay_timeout: Annotated[float | None, typer.Option("--replay-timeout", help="Give up after this many seconds of replay [default: no limit].", show_default=False)] = None,
    json_out: JsonResult = False,
) -> None:
    """Bring back a table's rows as they were at a target, without rewinding the cluster."""
    import os
    import signal
    from pathlib import Path

    from pitr.cli.repoopen import open_repo
    from pitr.cli.restore import DEFAULT_RESTORE_PREFETCH, _server_env, _sigterm, redact_url, self_argv
    from pitr.ops.recovery.restore import RestoreOptions
    from pitr.ops.recovery.restore_plan import make_exclusive, parse_target
    from pitr.ops.surgical.extract import ExtractOptions, run_extract
    from pitr.ops.surgical.find_target import split_table

    s = settings_of(ctx, dbname=dbname, jobs=jobs, pg_bin=pg_bin)
    if (to is None) == (into_table is None):
        raise UsageError("give one output: --to FILE or --into-table NAME")
    if fmt not in ("csv", "sql"):
        raise UsageError(f"--format must be csv or sql, not {fmt!r}")
    if fmt != "csv" and to is None:
        raise UsageError("--format applies to --to FILE only")
    if replay_timeout is not None and replay_timeout <= 0:
        raise UsageError("--replay-timeout must be a positive number of seconds")
    split_table(table)
    if into_table is not None:
        split_table(into_table)
    tgt = parse_target(target_time, target_lsn, target_xid, target_name, target)
    if target_exclusive:
        tgt = make_exclusive(tgt)
    database = db or _current_db(s.dbname)
    ro = RestoreOptions(
        pgdata=Path("/nonexistent"), target=tgt, backup_id=backup, jobs=s.jobs, pitr_argv=self_argv(),
        repo_url=s.location().url, s3_endpoint=redact_url(s.s3_endpoint),
        config_path=os.path.abspath(s.config) if s.config else None, pg_bin=s.pg_bin,
        server_env=_server_env(s), prefetch=s.prefetch or DEFAULT_RESTORE_PREFETCH)
    opts = ExtractOptions(table=table, db=database, target=tgt,
                          to_file=Path(to).expanduser().absolute() if to else None, fmt=fmt,
                          into_table=into_table, where=where, conninfo=s.dbname, restore=ro,
                          timeout=replay_timeout)
    storage = open_repo(s)
    show = sys.stderr.isatty() and not json_out

    def phase(msg: str) -> None:
        if show:
            print(f"pitr: {msg}", file=sys.stderr)

    old = signal.signal(signal.SIGTERM, _sigterm)
    try:
        res = run_extract(storage, opts, phase)
    finally:
        signal.signal(signal.SIGTERM, old)
        storage.close()
    if json_out:
        emit_json(res.to_json())
        return
    rp = res.restore.replay
    lines = [f"extracted {res.rows} row{'s' if res.rows != 1 else ''} of {res.table} (database {res.db}) "
             f"as of {res.restore.plan.target.describe()} into {res.output}",
             f"  backup {res.restore.plan.backup.id}; point reached: "
             f"{(rp.stop_reason if rp else None) or 'end of the archive'}; took {human_duration(res.seconds)}"]
    lines += [f"  note: {n}" for n in res.notes]
    emit("\n".join(lines))


def register(app: typer.Typer) -> None:
    app.command("find-target")(find_target_cmd)
    app.command("extract")(extract_cmd)


def _current_db(conninfo: str | None) -> str:
    from pitr.ops.surgical.find_target import current_database

    return current_database(conninfo)


def render_text(r: Any) -> str:
    rel = r.relation
    segs = r.segments
    span = f"{segs[0]} .. {segs[-1]}" if segs else "none"
    lines = [f"{rel.table} (database {rel.db}, relfilenode {rel.relfilenode}): {len(segs)} archived segment"
             f"{'s' if len(segs) != 1 else ''} read ({span}) in {human_duration(r.seconds)}"]
    if r.since is not None:
        lines.append(f"  window from {r.since.astimezone().isoformat(sep=' ', timespec='seconds')}"
                     + (" (the newest backup's start; --since TS looks further back)" if r.since_default else "")
                     + (f" to {r.until.astimezone().isoformat(sep=' ', timespec='seconds')}" if r.until else ""))
    if not r.findings:
        lines.append("no transaction deleted, updated, truncated or dropped it in this window")
        return "\n".join(lines)
    for f in r.findings:
        rows = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(f.rows.items()))
        what = " + ".join(f.kinds) + (f" ({rows} rows)" if rows else "")
        when = f"{f.status} {f.time or ''} at LSN {f.lsn}" if f.lsn else "no commit or abort in the window"
        lines.append(f"  xid {f.xid}: {what}; {when}")
        if f.harmless:
            lines.append("      aborted: harmless, nothing to recover")
        else:
            lines.append(f"      restore target just before it: {f.target}")
    return "\n".join(lines)
