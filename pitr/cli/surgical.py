"""Commands for surgical recovery: find-target (which transaction hurt a table)."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated, Any

import typer

from pitr.cli.render import emit, emit_json, human_duration
from pitr.errors import UsageError


def _when(opt: str, value: str | None) -> datetime | None:
    from pitr.ops.restore_plan import parse_time

    if value is None:
        return None
    try:
        return parse_time(value)
    except UsageError as e:
        raise UsageError(f"{opt} {value!r} is not a timestamp",
                         "give a timestamp such as '2026-03-01 14:30:00+01' (no zone: local time)") from e


def register(app: typer.Typer) -> None:
    from pitr.cli.app import settings_of

    @app.command("find-target")
    def find_target_cmd(
        ctx: typer.Context,
        table: Annotated[str | None, typer.Option("--table", metavar="SCHEMA.TABLE", help="The table that was hurt (resolved on the running server through --dbname).", show_default=False)] = None,
        since: Annotated[str | None, typer.Option("--since", metavar="TS", help="Start of the window [default: the newest backup's start].", show_default=False)] = None,
        until: Annotated[str | None, typer.Option("--until", metavar="TS", help="End of the window [default: the end of the archive].", show_default=False)] = None,
        relfilenode: Annotated[int | None, typer.Option("--relfilenode", metavar="N", help="The table's file number, for a table that no longer exists (with --db).", show_default=False)] = None,
        db: Annotated[str | None, typer.Option("--db", metavar="NAME", help="The table's database [default: the one --dbname connects to].", show_default=False)] = None,
        dbname: Annotated[str | None, typer.Option("--dbname", "-d", help="libpq conninfo of the running server [libpq env].", show_default=False)] = None,
        jobs: Annotated[int | None, typer.Option("--jobs", "-j", metavar="N", help="Segments decoded at once [default: the jobs setting].", show_default=False)] = None,
        pg_bin: Annotated[str | None, typer.Option("--pg-bin", metavar="DIR", help="PostgreSQL bin directory holding pg_waldump [default: found by version].", show_default=False)] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout (docs/find-target.md).")] = False,
    ) -> None:
        """List the transactions that deleted or updated rows of a table, truncated or dropped it, from archived WAL."""
        from pitr.ops.find_target import find_target, resolve
        from pitr.storage import open_storage

        s = settings_of(ctx, dbname=dbname, jobs=jobs, pg_bin=pg_bin)
        t_since, t_until = _when("--since", since), _when("--until", until)
        if t_since and t_until and t_since > t_until:
            raise UsageError("--since is after --until")
        if relfilenode is not None and relfilenode <= 0:
            raise UsageError(f"--relfilenode must be a positive file number, not {relfilenode}")
        rel = resolve(s.dbname, table, db, relfilenode)
        storage = open_storage(s)
        show = sys.stderr.isatty() and not json_out

        def progress(done: int, total: int) -> None:
            if show:
                print(f"\r\x1b[Kpitr: decoded {done} of {total} segments", end="", file=sys.stderr, flush=True)

        try:
            res = find_target(storage, rel, t_since, t_until, s.jobs, s.pg_bin, is_gone=relfilenode is not None,
                              progress=progress)
        finally:
            storage.close()
        if show:
            print("\r\x1b[K", end="", file=sys.stderr)
        if json_out:
            emit_json(res.to_json())
            return
        emit(render_text(res))


def render_text(r: Any) -> str:
    rel = r.relation
    segs = r.segments
    span = f"{segs[0]} .. {segs[-1]}" if segs else "none"
    lines = [f"{rel.table} (database {rel.db}, relfilenode {rel.relfilenode}): {len(segs)} archived segment"
             f"{'s' if len(segs) != 1 else ''} read ({span}) in {human_duration(r.seconds)}"]
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
