"""Entry point: the fast wal-push/wal-fetch path first, the full CLI otherwise."""

from __future__ import annotations

import sys


def main() -> None:
    from pitr.cli.asyncwal import quick

    rc = quick(sys.argv[1:])  # async/prefetch answers already on disk: standard library only
    if rc is not None:
        sys.exit(rc)
    from pitr.cli.fast import try_fast

    rc = try_fast(sys.argv[1:])
    if rc is not None:
        sys.exit(rc)
    from pitr.cli.app import run

    run(sys.argv[1:])


if __name__ == "__main__":
    main()
