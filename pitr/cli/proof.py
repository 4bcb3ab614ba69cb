"""Commands that prove recoverability and feed monitoring: drill, metrics (docs/drill.md, docs/metrics.md)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pitr.cli.common import settings_of
from pitr.cli.options import PgBin, RestoreJobs
from pitr.cli.render import emit, emit_json, human_bytes, human_duration
from pitr.errors import UsageError


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def render_drill(rec: dict[str, Any]) -> str:
    ok = rec.get("passed")
    lines = [f"drill {rec.get('id')}: {'PASSED' if ok else 'FAILED'}"]
    b = rec.get("backup") or {}
    if b:
        lines.append(f"  backup          {b.get('id')} ({b.get('type')}, PostgreSQL {b.get('pg_version')})")
    t = rec.get("target") or {}
    lines.append(f"  target          {t.get('description', '-')}" + (" (random)" if t.get("random") else ""))
    r = rec.get("reached") or {}
    if r:
        lines.append(f"  reached         LSN {r.get('lsn') or '-'}, last transaction {r.get('time') or '-'}"
                     + (f", new timeline {r['timeline']}" if r.get("timeline") else ""))
    if rec.get("bytes_restored") is not None:
        lines.append(f"  restored        {human_bytes(rec['bytes_restored'])}, {rec.get('wal_segments')} WAL "
                     "segment(s) replayed")
    lines.append(f"  RTO             {human_duration(rec.get('rto_seconds'))} to a promoted, consistent server; "
                 f"{human_duration(rec.get('rto_checks_seconds'))} with the checks")
    if rec.get("pg_version"):
        lines.append(f"  PostgreSQL      {rec['pg_version']} (pitr {rec.get('pitr_version')})")
    for s in rec.get("steps") or []:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[s.get("passed")]
        what = s["name"] + (f" {s['sql']!r}" if s.get("sql") else "")
        lines.append(f"  {mark}  {what}: {s.get('message')}")
    if rec.get("kept"):
        lines.append(f"  kept            {rec['kept']} (--keep: remove it when done)")
        if rec.get("kept_workdir") and not str(rec["kept"]).startswith(str(rec["kept_workdir"])):
            lines.append(f"  kept            {rec['kept_workdir']} (its tablespaces and logs: remove it too)")
    return "\n".join(lines)


def drill_cmd(
    ctx: typer.Context,
    target_time: Annotated[str | None, typer.Option("--target-time", help="Drill to this time (as restore).", show_default=False)] = None,
    target_lsn: Annotated[str | None, typer.Option("--target-lsn", metavar="LSN", help="Drill to this WAL location.", show_default=False)] = None,
    target_xid: Annotated[str | None, typer.Option("--target-xid", metavar="XID", help="Drill to the commit of this transaction.", show_default=False)] = None,
    target_name: Annotated[str | None, typer.Option("--target-name", metavar="NAME", help="Drill to this restore point.", show_default=False)] = None,
    target: Annotated[str | None, typer.Option("--target", metavar="immediate", help="'immediate': the end of the backup.", show_default=False)] = None,
    random_target: Annotated[bool, typer.Option("--random-target", help="Drill to a random time inside the recoverable window.")] = False,
    backup: Annotated[str | None, typer.Option("--backup", help="Restore this backup ID.", show_default=False)] = None,
    check: Annotated[list[str] | None, typer.Option("--check", metavar="SQL", help="A query whose first column must be true in every row, with at least one row (repeatable).", show_default=False)] = None,
    check_file: Annotated[str | None, typer.Option("--check-file", metavar="FILE", help="A file of checks, one per SQL statement.", show_default=False)] = None,
    check_db: Annotated[str, typer.Option("--check-db", metavar="NAME", help="Database the checks run in.")] = "postgres",
    no_amcheck: Annotated[bool, typer.Option("--no-amcheck", help="Skip pg_amcheck --all.")] = False,
    pgdata: Annotated[str | None, typer.Option("--pgdata", help="Restore here (new or empty) instead of a new temp directory.", show_default=False)] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Leave the restored directory (stopped) for inspection.")] = False,
    pg_bin: PgBin = None,
    jobs: RestoreJobs = None,
    replay_timeout: Annotated[float | None, typer.Option("--replay-timeout", help="Fail the drill when replay takes longer.", show_default=False)] = None,
    amcheck_timeout: Annotated[float | None, typer.Option("--amcheck-timeout", help="Fail the drill when pg_amcheck takes longer (default: 10 minutes plus 1 s per 8 MiB restored).", show_default=False)] = None,
    repo_as_of: Annotated[str | None, typer.Option("--repo-as-of", help="Drill from the versioned S3 bucket as it was at TS; the record is printed, not stored [env PITR_REPO_AS_OF].", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="The drill record on stdout (docs/drill.md).")] = False,
) -> None:
    """Prove the repository restores: restore into a throwaway directory, replay to TARGET, run pg_amcheck
    and the checks, remove it, and record the result in the repository. Exit 0 only when all passed."""
    from pitr.cli.repoopen import open_repo, parse_as_of
    from pitr.cli.restore import DEFAULT_RESTORE_PREFETCH, _server_env, redact_url, self_argv
    from pitr.errors import DrillError
    from pitr.ops.proof.drill import DrillOptions, run_drill, split_statements
    from pitr.ops.recovery.restore_plan import parse_target

    tgt = parse_target(target_time, target_lsn, target_xid, target_name, target)
    as_of = parse_as_of(repo_as_of)
    if random_target and tgt.kind != "latest":
        raise UsageError("--random-target and an explicit target exclude each other")
    if replay_timeout is not None and replay_timeout <= 0:
        raise UsageError("--replay-timeout must be a positive number of seconds")
    if amcheck_timeout is not None and not 0 < amcheck_timeout < float("inf"):
        raise UsageError("--amcheck-timeout must be a positive number of seconds")
    checks = [c for c in (check or []) if c.strip()]
    if check_file:
        try:
            text = Path(check_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --check-file {check_file}: {getattr(e, 'strerror', None) or e}") from None
        found = split_statements(text)
        if not found:
            raise UsageError(f"--check-file {check_file} holds no SQL statement")
        checks += found
    s = settings_of(ctx, jobs=jobs, pg_bin=pg_bin)
    opts = DrillOptions(
        target=tgt, backup_id=backup, checks=checks, check_db=check_db, amcheck=not no_amcheck,
        pgdata=Path(pgdata).expanduser().absolute() if pgdata else None, keep=keep,
        random_target=random_target, jobs=s.jobs, pitr_argv=self_argv(), repo_url=s.location().url,
        s3_endpoint=redact_url(s.s3_endpoint), config_path=os.path.abspath(s.config) if s.config else None,
        pg_bin=s.pg_bin, server_env=_server_env(s), prefetch=s.prefetch or DEFAULT_RESTORE_PREFETCH,
        timeout=replay_timeout, amcheck_timeout=amcheck_timeout, repo_as_of=as_of.isoformat() if as_of else None)
    show = sys.stderr.isatty() and not json_out

    def phase(msg: str) -> None:
        if show:
            print(f"pitr: {msg}", file=sys.stderr)

    storage = open_repo(s, as_of=as_of)
    old = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = run_drill(storage, opts, on_phase=phase)
    except KeyboardInterrupt:
        from pitr.errors import Interrupted

        raise Interrupted("drill interrupted: the server was stopped and the drill directory removed; "
                          "nothing was recorded") from None
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        storage.close()
    rec = result.record
    if json_out:
        emit_json(rec | {"stored": result.key})
    else:
        emit(render_drill(rec))
    if result.store_error:
        raise DrillError(f"the drill {'passed' if result.passed else 'failed'} but its record could not be "
                         f"stored in the repository: {result.store_error}")
    if not result.passed:
        bad = [st["name"] for st in rec["steps"] if st.get("passed") is False]
        raise DrillError(f"drill {rec['id']} failed ({', '.join(dict.fromkeys(bad)) or 'restore'}); "
                         + ("with --repo-as-of nothing is recorded" if as_of else
                            "the failure is recorded in the repository"),
                         "each FAIL line says what went wrong; docs/runbook.md says what to do")


def metrics_cmd(
    ctx: typer.Context,
    textfile: Annotated[str | None, typer.Option("--textfile", help="Write atomically to PATH (node_exporter textfile collector) instead of stdout.", show_default=False)] = None,
) -> None:
    """The repository's state in the Prometheus text format (metrics named pitr_*, docs/metrics.md)."""
    from pitr.cli.repoopen import open_repo
    from pitr.ops.proof.metrics import text, write_textfile

    if textfile is not None and not Path(textfile).expanduser().parent.is_dir():
        raise UsageError(f"--textfile {textfile}: its directory does not exist",
                         "point it into node_exporter's --collector.textfile.directory")
    storage = open_repo(settings_of(ctx))
    try:
        body = text(storage)
    finally:
        storage.close()
    if textfile is None:
        sys.stdout.write(body)
    else:
        write_textfile(Path(textfile).expanduser(), body)


def register(app: typer.Typer) -> None:
    app.command("drill")(drill_cmd)
    app.command("metrics")(metrics_cmd)
