"""The fast path for archive_command / restore_command: no typer, rich or boto3 at start-up.

Handles exactly `[globals] wal-push PATH` and `[globals] wal-fetch NAME DEST`; anything else
(including --help) returns None and the full typer CLI takes over.
"""

from __future__ import annotations

import time

from pitr.cli.common import (
    apply_log_level,
    hoist_globals,
    is_verbose,
    log_exit,
    open_log_file,
    report_error,
    setup_logging,
)
from pitr.cli.globalargs import GLOBAL_OPTIONS, is_log_flag


def try_fast(argv: list[str]) -> int | None:
    """Run wal-push / wal-fetch here and return the exit code; None hands argv to the typer CLI.

    A restore_command's exit status 1..125 makes PostgreSQL end recovery and promote, so for
    wal-fetch every way of failing here (bad arguments, an unexpected exception) exits above 125.
    """
    fetch = _command_of(argv) == "wal-fetch"
    try:
        rc = _try_fast(argv)
    except BaseException as e:  # noqa: BLE001 - the exit status is the whole interface
        if not fetch or isinstance(e, SystemExit) and e.code == 0:
            raise
        from pitr.errors import EXIT_FETCH_HARD

        report_error(e, is_verbose())
        return EXIT_FETCH_HARD
    if rc is None and fetch and not {"-h", "--help"} & set(argv):
        from pitr.errors import EXIT_FETCH_HARD, UsageError

        report_error(UsageError("wal-fetch takes exactly two arguments, NAME and DEST (and only global options)",
                                "use restore_command = 'pitr wal-fetch %f %p'"), False)
        return EXIT_FETCH_HARD
    return rc


def _command_of(argv: list[str]) -> str | None:
    """The first word that is neither a global option nor its value."""
    args = hoist_globals(argv)
    i = 0
    while i < len(args):
        name = args[i].split("=", 1)[0]
        if not args[i].startswith("-"):
            return args[i]
        if GLOBAL_OPTIONS.get(name) and "=" not in args[i]:
            i += 1
        i += 1
    return None


def _try_fast(argv: list[str]) -> int | None:
    args = hoist_globals(argv)
    opts: dict[str, str] = {}
    verbose = 0
    quiet = False
    i = 0
    while i < len(args) and args[i].startswith("-"):
        a = args[i]
        name, eq, val = a.partition("=")
        if is_log_flag(a):  # -v, -vv, -q, -vq, --verbose, --quiet
            verbose += a.count("v")
            quiet = quiet or "q" in a
        elif GLOBAL_OPTIONS.get(name):
            if not eq:
                if i + 1 >= len(args):
                    return None
                val = args[i + 1]
                i += 1
            opts[name[2:].replace("-", "_")] = val
        else:
            return None
        i += 1
    rest = args[i:]
    if rest and rest[0] in ("_wal-push-daemon", "_wal-prefetch"):  # internal helpers (cli/asyncwal.py)
        from pitr.cli import asyncwal

        return asyncwal.helper_main(rest[0], args[:i], rest[1:], opts)
    if not rest or rest[0] not in ("wal-push", "wal-fetch") or any(r.startswith("-") for r in rest[1:]):
        return None
    cmd, pos = rest[0], rest[1:]
    if (cmd == "wal-push" and len(pos) != 1) or (cmd == "wal-fetch" and len(pos) != 2):
        return None
    setup_logging(verbose, quiet)
    started = time.monotonic()
    from pitr.config import load_settings
    from pitr.errors import EXIT_FETCH_HARD, PitrError

    try:
        settings = load_settings(opts)
    except PitrError as e:
        rc = report_error(e, verbose > 0)
        return EXIT_FETCH_HARD if cmd == "wal-fetch" else rc
    apply_log_level(settings.log_level)
    open_log_file(settings.log_file, cmd, argv)
    from pitr.cli import walcmds

    if cmd == "wal-push":
        return log_exit(walcmds.run_wal_push(settings, pos[0]), started)
    return log_exit(walcmds.run_wal_fetch(settings, pos[0], pos[1]), started)
