"""Entry point: the fast wal-push/wal-fetch path first, the full CLI otherwise."""

from __future__ import annotations

import sys

# = errors.EXIT_FETCH_HARD, repeated so that the guard below needs nothing of pitr to work
_EXIT_FETCH_HARD = 128
# = cli/globalargs.VALUE_OPTIONS, and _is_wal_fetch walks argv as globalargs.split_global_args does: repeated on
# purpose, not imported, because the guard must work when importing pitr (even pitr.cli) fails
_VALUE_OPTIONS = ("--repo", "--config", "--s3-endpoint", "--log-file")


def main() -> None:
    argv = sys.argv[1:]
    try:
        _main(argv)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the exit status is restore_command's whole interface
        if not _is_wal_fetch(argv):
            raise
        # restore_command reads 1..125 as "not in the archive" and PostgreSQL would promote there:
        # a failure nothing else caught (even an import that failed) must stop recovery instead
        if "-v" in argv or "--verbose" in argv:
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        print(f"pitr: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        print("hint: run again with -v for the details and report it", file=sys.stderr)
        sys.exit(_EXIT_FETCH_HARD)


def _main(argv: list[str]) -> None:
    from pitr.cli.asyncwal import quick

    rc = quick(argv)  # async/prefetch answers already on disk: standard library only
    if rc is not None:
        sys.exit(rc)
    from pitr.cli.fast import try_fast

    rc = try_fast(argv)
    if rc is not None:
        sys.exit(rc)
    from pitr.cli.app import run

    run(argv)


def _is_wal_fetch(argv: list[str]) -> bool:
    """The command word (the first argument that is neither an option nor an option's value).

    Deliberately a copy of cli/globalargs.split_global_args's walk (see _VALUE_OPTIONS)."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _VALUE_OPTIONS:
            i += 2
            continue
        if not a.startswith("-"):
            return a == "wal-fetch"
        i += 1
    return False


if __name__ == "__main__":
    main()
