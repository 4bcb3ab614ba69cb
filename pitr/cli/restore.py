"""Command: restore (rebuild a data directory from a backup, configure or run recovery to a target)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pitr.cli.common import settings_of
from pitr.cli.options import JsonResult, RestoreBackup, RestoreJobs
from pitr.cli.render import emit, emit_json, human_bytes, human_duration
from pitr.config import PREFETCH_MAX
from pitr.errors import UsageError


def self_argv() -> list[str]:
    """How PostgreSQL should call this pitr: the absolute path of the running executable."""
    arg0 = sys.argv[0] if sys.argv else ""
    if arg0 and not arg0.endswith((".py", "pytest")) and os.path.basename(arg0).startswith("pitr"):
        path = os.path.abspath(arg0) if os.sep in arg0 else shutil.which(arg0)
        if path and os.access(path, os.X_OK):
            return [path]
    return [sys.executable, "-m", "pitr"]


def parse_tablespace_map(values: list[str] | None) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for v in values or []:
        oid, sep, path = v.partition("=")
        if not sep or not oid.strip().isdigit() or not path.strip():
            raise UsageError(f"--tablespace-map {v!r} is not OID=DIR", "e.g. --tablespace-map 16385=/srv/ts1")
        if not os.path.isabs(path.strip()):
            raise UsageError(f"--tablespace-map {v!r}: the directory must be an absolute path")
        out[oid.strip()] = Path(path.strip())
    return out


def redact_url(url: str | None) -> str | None:
    """Drop any user:password@ from an endpoint URL (restore_command is readable through SHOW)."""
    if not url or "@" not in url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    p = urlsplit(url)
    host = p.netloc.rsplit("@", 1)[-1]
    return urlunsplit((p.scheme, host, p.path, p.query, p.fragment))


DEFAULT_RESTORE_PREFETCH = 8  # 128 MiB of 16 MiB segments in pg_wal/pitr_prefetch


def _server_env(s: Any) -> dict[str, str]:
    """The environment the replay server runs with: ours, plus the repo settings we were given."""
    env = dict(os.environ)
    for key, val in (("PITR_REPO", s.location().url), ("PITR_S3_ENDPOINT", s.s3_endpoint),
                     ("PITR_CONFIG", s.config)):
        if val and key not in env:
            env[key] = str(val)
    return env


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def restore_command_cmd(
    ctx: typer.Context,
    prefetch: Annotated[int | None, typer.Option("--prefetch", help="Segments staged ahead; 0 prints the plain `wal-fetch %f %p` [default: the prefetch setting, or 8].", show_default=False)] = None,
) -> None:
    """Print a restore_command line for a recovery or standby you configure by hand (as fast as `restore`'s)."""
    from pitr.ops.wal import stage
    from pitr.pg.recovery import guc_quote, render_restore_command

    s = settings_of(ctx)
    if prefetch is not None and not 0 <= prefetch <= PREFETCH_MAX:
        raise UsageError(f"--prefetch must be a number of segments from 0 to {PREFETCH_MAX}, not {prefetch}")
    n = prefetch if prefetch is not None else (s.prefetch or DEFAULT_RESTORE_PREFETCH)
    # a new stage token each time: a stage belongs to one restore_command (docs/restore.md §5)
    cmd = render_restore_command(self_argv(), s.location().url, redact_url(s.s3_endpoint),
                                 os.path.abspath(s.config) if s.config else None, n,
                                 stage=stage.new_token() if n > 0 else None)
    emit(f"restore_command = {guc_quote(cmd)}")


def restore_cmd(
    ctx: typer.Context,
    pgdata: Annotated[str | None, typer.Option("--pgdata", "-D", help="Data directory to rebuild (new or empty; existing with --delta) [env PGDATA].", show_default=False)] = None,
    target_time: Annotated[str | None, typer.Option("--target-time", help="Recover to this time (python-dateutil syntax; no zone = local time).", show_default=False)] = None,
    target_lsn: Annotated[str | None, typer.Option("--target-lsn", metavar="LSN", help="Recover to this WAL location (e.g. 0/3000148).", show_default=False)] = None,
    target_xid: Annotated[str | None, typer.Option("--target-xid", metavar="XID", help="Recover to the commit of this transaction ID.", show_default=False)] = None,
    target_name: Annotated[str | None, typer.Option("--target-name", metavar="NAME", help="Recover to this restore point (pg_create_restore_point).", show_default=False)] = None,
    target: Annotated[str | None, typer.Option("--target", metavar="immediate", help="'immediate': stop as soon as the backup is consistent.", show_default=False)] = None,
    target_exclusive: Annotated[bool, typer.Option("--target-exclusive", help="Stop just before the time, LSN or xid target (recovery_target_inclusive = off).")] = False,
    backup: RestoreBackup = None,
    target_action: Annotated[str, typer.Option("--target-action", metavar="ACTION", help="At the target: promote, pause or shutdown.")] = "promote",
    target_timeline: Annotated[str, typer.Option("--target-timeline", metavar="TLI", help="latest, current or a timeline number.")] = "latest",
    jobs: RestoreJobs = None,
    delta: Annotated[bool, typer.Option("--delta", help="Restore over an existing stopped data directory, keeping files that match the backup.")] = False,
    replay: Annotated[bool, typer.Option("--replay", help="Also run PostgreSQL (private socket, no TCP) until the target is reached, then stop it and report.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (backup, WAL range, target in UTC) and change nothing.")] = False,
    archive_mode: Annotated[str, typer.Option("--archive-mode", metavar="MODE", help="preserve (keep the cluster's archiving) or off (drills, copies).")] = "preserve",
    db_include: Annotated[list[str] | None, typer.Option("--db-include", metavar="NAME", help="Restore only this database (repeatable) plus template0, template1 and postgres; the others are left empty and unusable.", show_default=False)] = None,
    tablespace_map: Annotated[list[str] | None, typer.Option("--tablespace-map", metavar="OID=DIR", help="Put tablespace OID at DIR instead of its original location (OID=DIR, repeatable).", show_default=False)] = None,
    pg_bin: Annotated[str | None, typer.Option("--pg-bin", help="PostgreSQL bin directory for --replay [default: found by version].", show_default=False)] = None,
    prefetch: Annotated[int | None, typer.Option("--prefetch", help="Segments wal-fetch fetches ahead during this recovery, written into restore_command; 0 turns it off [default: the prefetch setting, or 8].", show_default=False)] = None,
    replay_timeout: Annotated[float | None, typer.Option("--replay-timeout", help="Give up --replay after this many seconds [default: no limit].", show_default=False)] = None,
    repo_as_of: Annotated[str | None, typer.Option("--repo-as-of", help="Read the versioned S3 bucket as it was at TS (each object's newest version then; later deletes and overwrites ignored) [env PITR_REPO_AS_OF].", show_default=False)] = None,
    json_out: JsonResult = False,
) -> None:
    """Rebuild a data directory from the nearest backup and recover it to a target (or the end of the archive)."""
    from pitr.cli.repoopen import open_repo, parse_as_of
    from pitr.ops.recovery.restore import MARKER, RestoreOptions, run_restore
    from pitr.ops.recovery.restore_plan import make_exclusive, parse_action, parse_target, parse_timeline

    s = settings_of(ctx, pgdata=pgdata, jobs=jobs, pg_bin=pg_bin)
    if not s.pgdata:
        raise UsageError("no data directory given", "pass --pgdata DIR (or set PGDATA)")
    if archive_mode not in ("preserve", "off"):
        raise UsageError(f"--archive-mode must be preserve or off, not {archive_mode!r}")
    if replay_timeout is not None and replay_timeout <= 0:
        raise UsageError("--replay-timeout must be a positive number of seconds")
    if dry_run and replay:
        raise UsageError("--dry-run and --replay exclude each other")
    if prefetch is not None and not 0 <= prefetch <= PREFETCH_MAX:  # wal-fetch refuses more (config.py)
        raise UsageError(f"--prefetch must be a number of segments from 0 to {PREFETCH_MAX}, not {prefetch}")
    tgt = parse_target(target_time, target_lsn, target_xid, target_name, target)
    as_of = parse_as_of(repo_as_of)
    if target_exclusive:
        tgt = make_exclusive(tgt)
    opts = RestoreOptions(
        pgdata=Path(s.pgdata).expanduser().absolute(), target=tgt, timeline=parse_timeline(target_timeline),
        backup_id=backup, action=parse_action(target_action), jobs=s.jobs, delta=delta, dry_run=dry_run,
        archive_mode=archive_mode, tablespace_map=parse_tablespace_map(tablespace_map),
        pitr_argv=self_argv(), repo_url=s.location().url, s3_endpoint=redact_url(s.s3_endpoint),
        config_path=os.path.abspath(s.config) if s.config else None, replay=replay,
        replay_timeout=replay_timeout, pg_bin=s.pg_bin, server_env=_server_env(s),
        # a restore replays a long run of WAL: fetch ahead unless told otherwise (docs/restore.md)
        prefetch=prefetch if prefetch is not None else (s.prefetch or DEFAULT_RESTORE_PREFETCH),
        db_include=tuple(dict.fromkeys(db_include or ())),
        repo_as_of=as_of.isoformat() if as_of else None)
    storage = open_repo(s, as_of=as_of)
    show = sys.stderr.isatty() and not json_out

    def phase(msg: str) -> None:
        if show:
            print(f"\r\x1b[Kpitr: {msg}", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if show and total:
            print(f"\r\x1b[Kpitr: files {done * 100 // total:3d}% ({human_bytes(done)} of {human_bytes(total)})",
                  end="", file=sys.stderr, flush=True)

    old = signal.signal(signal.SIGTERM, _sigterm)
    try:
        result = run_restore(storage, opts, progress=progress, on_phase=phase)
    except KeyboardInterrupt:
        from pitr.errors import Interrupted

        if (opts.pgdata / MARKER).exists():
            raise Interrupted(f"restore interrupted: {opts.pgdata} is incomplete (marked by {MARKER}) and "
                              "PostgreSQL will not start on it",
                              "restore again with --delta to finish, keeping what was written") from None
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
        storage.close()
    if json_out:
        emit_json(result.to_json())
        return
    emit(render_text(result))


def register(app: typer.Typer) -> None:
    app.command("restore-command")(restore_command_cmd)
    app.command("restore")(restore_cmd)


def render_text(r: Any) -> str:
    p = r.plan
    b = p.backup
    lines = []
    if r.dry_run:
        lines.append("restore plan (dry run: nothing was changed)")
    lines += [
        f"  data directory  {r.pgdata}",
        f"  backup          {b.id} ({b.type}, PostgreSQL {b.pg_version}, timeline {b.timeline}, consistent at "
        f"{_utc(b.stop_time)}, LSN {b.stop_lsn})",
        f"  target          {p.target.describe()}",
        f"  timeline        {p.timeline} ({p.timeline_spec})",
        f"  WAL needed      {p.wal_first} .. {p.wal_last} ({p.wal_count} segment{'s' if p.wal_count != 1 else ''})",
    ]
    if p.target.kind != "latest":
        lines.append(f"  target action   {r.recovery_settings.get('recovery_target_action', '')}")
    if r.recovery_settings.get("archive_mode") == "off":
        lines.append("  archiving       off on the restored cluster")
    for n in p.notes + r.notes:
        lines.append(f"  note            {n}")
    if r.dry_run:
        return "\n".join(lines)
    f = r.files
    total = f.bytes_written + f.bytes_kept
    head = (f"restored backup {b.id} into {r.pgdata}: {f.files_written + f.files_kept} files, "
            f"{human_bytes(total)} in {human_duration(f.seconds)} "
            f"({total / (1 << 20) / f.seconds if f.seconds else 0:.1f} MiB/s)")
    if f.files_kept or f.removed:
        head += f"; delta kept {f.files_kept} matching files ({human_bytes(f.bytes_kept)}), removed {f.removed}"
    out = [head, *lines]
    if f.bad_page_files:
        out.append(f"  warning         {len(f.bad_page_files)} file(s) had bad page checksums in the backup: "
                   f"{', '.join(f.bad_page_files[:5])}")
    rp = r.replay
    if rp is None:
        out.append(f"recovery is configured: start PostgreSQL on {r.pgdata} to replay WAL to the target")
    else:
        out.append(f"replay: target reached ({rp.stop_reason or 'end of the archive'}); action {rp.action}")
        out.append(f"  last replayed transaction  {rp.last_xact_time or '-'}")
        out.append(f"  last replayed LSN          {rp.last_lsn or '-'}")
        if rp.new_timeline:
            hist = {True: ", its history file is in the archive", False: ", its history file is NOT in the "
                    "archive yet", None: ""}[rp.history_archived]
            out.append(f"  new timeline               {rp.new_timeline}{hist}")
        if rp.stage is not None:
            out.append(f"  restore_command            {rp.stage[0]} segments from the stage, "
                       f"{rp.stage[1]} through wal-fetch, {rp.stage[2]} answered in the shell")
        out.append(f"  replay took {human_duration(rp.seconds)}; PostgreSQL was stopped cleanly; server log {rp.log_file}")
        for n in rp.notes:
            out.append(f"  note: {n}")
    if rp is None:
        out.append(f"total time: {human_duration(r.seconds)} (recovery not run yet)")
    else:
        out.append(f"total restore time (RTO): {human_duration(r.seconds)}")
    return "\n".join(out)


def _utc(iso: str) -> str:
    from pitr.ops.recovery.restore_plan import format_time, parse_iso

    try:
        return format_time(parse_iso(iso))
    except ValueError:
        return iso
