"""The typer application: global options, command registration, error translation at the edge."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from pitr import __version__
from pitr.cli import backup, helpcmd, info, keys, maintenance, proof, restore, surgical, wal
from pitr.cli.common import GlobalOpts, hoist_globals, is_verbose, log_exit, report_error, setup_logging
from pitr.cli.helpdoc import PitrGroup, dress
from pitr.errors import PitrError
from pitr.memtune import pin_mmap_threshold

app = typer.Typer(
    name="pitr",
    cls=PitrGroup,
    help="PostgreSQL point-in-time recovery: base backups, continuous WAL archiving to S3 or a "
    "directory, and restore to any moment (with replay and proof).",
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"pitr {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(
    ctx: typer.Context,
    repo: Annotated[str | None, typer.Option("--repo", help="Repository: s3://bucket/prefix, file:///path or a directory [env PITR_REPO].", show_default=False)] = None,
    config: Annotated[str | None, typer.Option("--config", help="TOML config file [env PITR_CONFIG; default /etc/pitr/pitr.toml].", show_default=False)] = None,
    s3_endpoint: Annotated[str | None, typer.Option("--s3-endpoint", help="S3-compatible endpoint URL [env PITR_S3_ENDPOINT, AWS_ENDPOINT_URL_S3].", show_default=False)] = None,
    log_file: Annotated[str | None, typer.Option("--log-file", help="Also append the log, timestamped and at least at info level, to this file (cron, systemd) [env PITR_LOG_FILE, config log_file].", show_default=False)] = None,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="More log detail on stderr (-vv: debug); tracebacks.")] = 0,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only errors on stderr.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    setup_logging(verbose, quiet)
    pin_mmap_threshold()  # backups, restores and the helpers move large buffers between threads
    ctx.obj = GlobalOpts({"repo": repo, "config": config, "s3_endpoint": s3_endpoint, "log_file": log_file})


for _commands in (wal, backup, restore, info, maintenance, keys, proof, surgical, helpcmd):
    _commands.register(app)
dress(app)


def run(argv: list[str]) -> None:
    args = hoist_globals(argv)
    started = time.monotonic()
    try:
        # not standalone: an Exit raised by a command comes back as its exit code
        rc = app(args, prog_name="pitr", standalone_mode=False)
    except (PitrError, KeyboardInterrupt, OSError) as e:
        sys.exit(log_exit(report_error(e, is_verbose()), started))
    except Exception as e:  # noqa: BLE001 - usage errors, Abort, or a bug: never a bare traceback
        sys.exit(log_exit(_click_failure(e), started))
    sys.exit(log_exit(rc if isinstance(rc, int) else 0, started))


def _click_failure(e: Exception) -> int:
    """Typer >= 0.16 vendors click (typer._click), older typer raises click's own: match both by name."""
    names = {c.__name__ for c in type(e).__mro__}
    if "Abort" in names:
        print("pitr: interrupted", file=sys.stderr)
        return 130
    if "ClickException" in names:
        e.show()  # type: ignore[attr-defined]
        return 2 if "UsageError" in names else int(getattr(e, "exit_code", 1))
    return report_error(e, is_verbose())
