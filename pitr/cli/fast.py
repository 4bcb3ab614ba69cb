"""The fast path for archive_command / restore_command: no typer, rich or boto3 at start-up.

Handles exactly `[globals] wal-push PATH` and `[globals] wal-fetch NAME DEST`; anything else
(including --help) returns None and the full typer CLI takes over.
"""

from __future__ import annotations

from pitr.cli.common import GLOBAL_OPTIONS, hoist_globals, report_error, setup_logging


def try_fast(argv: list[str]) -> int | None:
    args = hoist_globals(argv)
    opts: dict[str, str] = {}
    verbose = 0
    quiet = False
    i = 0
    while i < len(args) and args[i].startswith("-"):
        a = args[i]
        name, eq, val = a.partition("=")
        if name in ("-v", "--verbose"):
            verbose += 1
        elif name in ("-q", "--quiet"):
            quiet = True
        elif set(a[1:]) <= {"v", "q"} and not a.startswith("--"):
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
    if not rest or rest[0] not in ("wal-push", "wal-fetch") or any(r.startswith("-") for r in rest[1:]):
        return None
    cmd, pos = rest[0], rest[1:]
    if (cmd == "wal-push" and len(pos) != 1) or (cmd == "wal-fetch" and len(pos) != 2):
        return None
    setup_logging(verbose, quiet)
    from pitr.config import load_settings
    from pitr.errors import EXIT_FETCH_HARD, PitrError

    try:
        settings = load_settings(opts)
    except PitrError as e:
        rc = report_error(e, verbose > 0)
        return EXIT_FETCH_HARD if cmd == "wal-fetch" else rc
    from pitr.cli import walcmds

    if cmd == "wal-push":
        return walcmds.run_wal_push(settings, pos[0])
    return walcmds.run_wal_fetch(settings, pos[0], pos[1])
