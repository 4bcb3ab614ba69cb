"""Commands: init, wal-push, wal-fetch."""

from __future__ import annotations

from typing import Annotated

import typer

from pitr.cli import walcmds
from pitr.cli.common import settings_of
from pitr.cli.options import DbName, JsonResult
from pitr.cli.render import emit, emit_json


def init_cmd(
    ctx: typer.Context,
    dbname: DbName = None,
    json_out: JsonResult = False,
    encrypt: Annotated[bool, typer.Option("--encrypt", help="Encrypt every object (AES-256-GCM) under the key "
                                          "from encryption_key_file or PITR_ENCRYPTION_PASSPHRASE.")] = False,
    lock_days: Annotated[int | None, typer.Option("--lock-days", help="S3 Object Lock: every object written from now on is retained at least N days (the bucket must have Object Lock enabled) [config lock_days].", show_default=False)] = None,
    lock_mode: Annotated[str | None, typer.Option("--lock-mode", help="governance or compliance [config lock_mode, default governance].", show_default=False)] = None,
) -> None:
    """Bind the repository to this cluster (system identifier, version, WAL segment size). Idempotent."""
    from pitr.cli.repoopen import open_repo
    from pitr.ops.admin.init import init_repo
    from pitr.pg.conn import PgSession

    s = settings_of(ctx, dbname=dbname, lock_days=lock_days, lock_mode=lock_mode)
    if s.lock_days is not None:
        from pitr.ops.admin.lock import validate

        validate(s.lock_days, s.lock_mode)
    storage = open_repo(s)
    with PgSession(s.dbname) as pg:
        server = pg.info()
    if s.lock_days is not None:  # refused before anything is written when the bucket cannot lock
        from pitr.ops.admin.lock import record_lock, require_lockable

        require_lockable(storage)
    r = init_repo(storage, server, allow_unsafe_store=s.allow_unsafe_store, encrypt=encrypt)
    if s.lock_days is not None:
        record_lock(storage, s.lock_days, s.lock_mode)
    m = r.meta
    if r.created and r.encrypted:
        from pitr.cli.keys import lost_key_warning

        key = getattr(storage, "key_source", None)
        lost_key_warning(storage, key.where if key else "key")
    if json_out:
        emit_json({"repo": storage.display, "created": r.created, "system_identifier": str(m.system_identifier),
                   "pg_version": m.pg_version, "wal_segment_size": m.wal_segment_size, "format": m.format,
                   "encrypted": r.encrypted,
                   "object_lock": {"days": s.lock_days, "mode": s.lock_mode} if s.lock_days else None})
    else:
        what = "initialized" if r.created else "already initialized"
        what += " (encrypted)" if r.encrypted else ""
        what += f" (Object Lock: {s.lock_mode}, {s.lock_days} days)" if s.lock_days else ""
        emit(f"repository {storage.display} {what} for cluster {m.system_identifier} "
             f"(PostgreSQL {m.pg_version}, {m.wal_segment_size >> 20} MiB WAL segments)")


def wal_push_cmd(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="The WAL file to archive (%p), relative to the data directory.")],
) -> None:
    """Archive one WAL file (archive_command = 'pitr wal-push %p'). Exit 0 only once durable and verified."""
    raise typer.Exit(walcmds.run_wal_push(settings_of(ctx), path))


def wal_fetch_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The archive file name PostgreSQL asks for (%f).")],
    dest: Annotated[str, typer.Argument(help="Where to write it (%p).")],
) -> None:
    """Restore one WAL file (restore_command = 'pitr wal-fetch %f %p').

    Exit 0 fetched and verified; 1 not in the archive; 128 any other failure (makes
    PostgreSQL abort recovery instead of promoting early).
    """
    from pitr.errors import EXIT_FETCH_HARD

    try:
        s = settings_of(ctx)
    except Exception as e:  # noqa: BLE001 - any failure here must stop recovery, never end it (exit > 125)
        from pitr.cli.common import is_verbose, report_error

        report_error(e, is_verbose())
        raise typer.Exit(EXIT_FETCH_HARD) from None
    raise typer.Exit(walcmds.run_wal_fetch(s, name, dest))


def archive_command_cmd(ctx: typer.Context) -> None:
    """Print an archive_command line that acknowledges the async archiver's work from the shell (no Python start per file)."""
    import logging
    import os

    from pitr.cli.common import GlobalOpts
    from pitr.cli.globalargs import archive_token
    from pitr.cli.restore import redact_url, self_argv
    from pitr.pg.archive_command import render_archive_command
    from pitr.pg.recovery import guc_quote, restore_command_globals

    s = settings_of(ctx)
    obj = ctx.find_object(GlobalOpts)
    given = obj.values if obj else {}
    # the options given here, made absolute (archive_command runs in the data directory), never a secret
    def absolute(path: str | None) -> str | None:
        return os.path.abspath(os.path.expanduser(path)) if path else None

    repo, log_file = given.get("repo"), given.get("log_file")
    glob = restore_command_globals(repo if repo and "://" in repo else absolute(repo),
                                   redact_url(given.get("s3_endpoint")), absolute(given.get("config")))
    glob += ["--log-file", log_file] if log_file else []
    spool_dir = os.path.join(os.path.abspath(s.spool_path), "archive") if s.spool_path else None
    if not s.archive_async:
        logging.getLogger("pitr").warning("archive_async is off here: the line then runs `pitr wal-push` for "
                                          "every file (the server's own settings decide)")
    emit(f"archive_command = {guc_quote(render_archive_command(self_argv(), glob, archive_token(glob), spool_dir))}")


def register(app: typer.Typer) -> None:
    app.command("init")(init_cmd)
    app.command("archive-command")(archive_command_cmd)
    app.command("wal-push")(wal_push_cmd)
    app.command("wal-fetch")(wal_fetch_cmd)
