"""Commands: init, wal-push, wal-fetch."""

from __future__ import annotations

from typing import Annotated

import typer

from pitr.cli import walcmds
from pitr.cli.render import emit, emit_json


def register(app: typer.Typer) -> None:
    from pitr.cli.app import settings_of

    @app.command("init")
    def init_cmd(
        ctx: typer.Context,
        dbname: Annotated[str | None, typer.Option("--dbname", "-d", help="libpq conninfo of the running server [libpq env].")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")] = False,
    ) -> None:
        """Bind the repository to this cluster (system identifier, version, WAL segment size). Idempotent."""
        from pitr.ops.init import init_repo
        from pitr.pg.conn import PgSession
        from pitr.storage import open_storage

        s = settings_of(ctx, dbname=dbname)
        storage = open_storage(s)
        with PgSession(s.dbname) as pg:
            server = pg.info()
        r = init_repo(storage, server, s.allow_unsafe_store)
        m = r.meta
        if json_out:
            emit_json({"repo": storage.display, "created": r.created, "system_identifier": str(m.system_identifier),
                       "pg_version": m.pg_version, "wal_segment_size": m.wal_segment_size, "format": m.format})
        else:
            what = "initialized" if r.created else "already initialized"
            emit(f"repository {storage.display} {what} for cluster {m.system_identifier} "
                 f"(PostgreSQL {m.pg_version}, {m.wal_segment_size >> 20} MiB WAL segments)")

    @app.command("wal-push")
    def wal_push_cmd(
        ctx: typer.Context,
        path: Annotated[str, typer.Argument(help="The WAL file to archive (%p), relative to the data directory.")],
    ) -> None:
        """Archive one WAL file (archive_command = 'pitr wal-push %p'). Exit 0 only once durable and verified."""
        raise typer.Exit(walcmds.run_wal_push(settings_of(ctx), path))

    @app.command("wal-fetch")
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
