"""Commands: backup, restore-point."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from pitr.cli.common import settings_of
from pitr.cli.options import DbName, JsonResult
from pitr.cli.render import emit, emit_json, human_bytes, human_duration


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a cron timeout, systemd stop) stops a backup the way Ctrl-C does: aborted and unlisted."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A progress bar on stderr when it is a terminal; None otherwise (logs and pipes stay clean)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress("backup", BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task("backup", total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total or None)

    with bar:
        yield update


def backup_cmd(
    ctx: typer.Context,
    type_: Annotated[str, typer.Option("--type", help="full; diff (blocks changed since the newest full backup) or incr (since the newest backup); a full one is taken, with a notice, when there is nothing safe to build on.")] = "full",
    checksum: Annotated[bool, typer.Option("--checksum", help="diff/incr: read every file, never trusting an unchanged size and mtime.")] = False,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="Files read, compressed and stored in parallel [config jobs, default 2].", show_default=False)] = None,
    compress: Annotated[str | None, typer.Option("--compress", help="zstd[:LEVEL] or none [config compress, default zstd:3].", show_default=False)] = None,
    fast: Annotated[bool, typer.Option("--fast/--no-fast", help="Start with an immediate checkpoint (default), or a spread one that loads the server less but may take up to checkpoint_timeout.")] = True,
    archive_timeout: Annotated[float | None, typer.Option("--archive-timeout", help="Seconds to wait for the backup's WAL to reach the archive [config wal_wait_timeout, default 300].", show_default=False)] = None,
    pgdata: Annotated[str | None, typer.Option("--pgdata", "-D", help="The data directory [env PGDATA; default: the server's data_directory].", show_default=False)] = None,
    dbname: DbName = None,
    json_out: JsonResult = False,
) -> None:
    """Take an online base backup of the running cluster (run on the database host as its OS user).

    The backup is listed only once complete: every file stored and verified, and all the WAL from
    its start to its stop in the archive. The last line of stdout is the backup ID.
    """
    from pitr.cli.repoopen import open_repo
    from pitr.errors import UsageError
    from pitr.ops.base.backup import BACKUP_TYPES, BackupOptions, take_backup
    from pitr.pg.conn import PgSession
    from pitr.repo.envelope import parse_codec

    if type_ not in BACKUP_TYPES:
        raise UsageError(f"unknown backup type {type_!r}", "use --type full, diff or incr")
    if archive_timeout is not None and archive_timeout < 0:
        raise UsageError("--archive-timeout must be 0 or more seconds")
    s = settings_of(ctx, jobs=jobs, compress=compress, pgdata=pgdata, dbname=dbname,
                    wal_wait_timeout=archive_timeout)
    opts = BackupOptions(parse_codec(s.compress), s.jobs, s.pgdata, fast, s.wal_wait_timeout, type_, checksum,
                         standby_stall_timeout=s.standby_stall_timeout)
    storage = open_repo(s, max_connections=max(10, s.jobs * 4))
    try:
        with _sigterm_interrupts(), PgSession(s.dbname, "pitr backup") as pg, _progress(not json_out) as prog:
            res = take_backup(storage, pg, opts, prog)
    finally:
        storage.close()
    m = res.manifest
    if res.reason:
        print(f"pitr: notice: taking a full backup instead of {res.requested_type}: {res.reason}", file=sys.stderr)
    bad = res.bad_pages
    if bad:
        total = sum(len(v) for v in bad.values())
        print(f"pitr: warning: backup {m.id} is complete, but {total} page(s) in {len(bad)} file(s) failed "
              "their PostgreSQL checksum (corruption on the server, copied as is):", file=sys.stderr)
        for path, blocks in sorted(bad.items()):
            shown = ", ".join(str(b) for b in blocks[:20]) + (", …" if len(blocks) > 20 else "")
            print(f"  {path}: block(s) {shown}", file=sys.stderr)
        print("hint: check the server's storage; `pg_checksums --check` (server stopped) or pg_amcheck "
              "tell which relations are affected", file=sys.stderr)
    if json_out:
        emit_json({
            "id": m.id, "type": m.type, "requested_type": res.requested_type, "reason": res.reason,
            "parent": m.parent, "timeline": m.timeline,
            "start_lsn": m.start_lsn, "stop_lsn": m.stop_lsn, "start_wal": m.start_wal, "stop_wal": m.stop_wal,
            "start_time": m.start_time, "stop_time": m.stop_time, "duration": m.duration,
            "bytes": m.bytes, "stored_bytes": m.stored_bytes, "files": len(m.files), "objects": res.objects,
            "compress": m.compress, "checksums_enabled": m.checksums_enabled,
            "bad_pages": bad, "bad_pages_total": sum(len(v) for v in bad.values()),
            "vanished_files": len(res.vanished), "repo": storage.display,
            "timings": m.extra.get("timings", {}), "from_standby": bool(m.extra.get("from_standby")),
        })
        return
    rate = m.bytes / m.duration if m.duration else 0.0
    kind = f"{m.type} backup {m.id} (on {m.parent})" if m.parent else f"backup {m.id}"
    emit(f"{kind}: {len(m.files)} files, {human_bytes(m.bytes)} ({human_bytes(m.stored_bytes)} stored) "
         f"in {human_duration(m.duration)} ({human_bytes(rate)}/s); timeline {m.timeline}, "
         f"WAL {m.start_lsn} .. {m.stop_lsn} archived" + ("; taken from a standby" if m.extra.get("from_standby") else ""))
    emit(m.id)


def restore_point_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The restore point's name, for `pitr restore --target-name NAME`.")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Switch WAL and wait until the point is in the archive (default), so it is restorable at once.")] = True,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds to wait for the archive [config wal_wait_timeout, default 300].", show_default=False)] = None,
    dbname: DbName = None,
    json_out: JsonResult = False,
) -> None:
    """Create a named restore point (pg_create_restore_point) and, by default, wait until it is archived."""
    from pitr.cli.repoopen import open_repo
    from pitr.errors import UsageError
    from pitr.ops.base.backup import create_restore_point
    from pitr.pg import walname
    from pitr.pg.conn import PgSession

    if timeout is not None and timeout < 0:
        raise UsageError("--timeout must be 0 or more seconds")
    s = settings_of(ctx, dbname=dbname, wal_wait_timeout=timeout)
    storage = open_repo(s)
    try:
        with PgSession(s.dbname, "pitr restore-point") as pg:
            rp = create_restore_point(storage, pg, name, wait, s.wal_wait_timeout)
    finally:
        storage.close()
    lsn = walname.format_lsn(rp.lsn)
    if json_out:
        emit_json({"name": rp.name, "lsn": lsn, "wal": rp.wal, "archived": rp.archived})
        return
    emit(f"restore point {rp.name!r} at {lsn} (WAL {rp.wal}, "
         f"{'archived' if rp.archived else 'not waited for'})")
    emit(lsn)


def register(app: typer.Typer) -> None:
    app.command("backup")(backup_cmd)
    app.command("restore-point")(restore_point_cmd)
