"""wal-push and wal-fetch as PostgreSQL calls them: light imports, exit codes PostgreSQL relies on.

Shared by the fast path (cli/fast.py, no typer/rich) and the typer commands (for --help).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pitr.cli.common import is_verbose, report_error
from pitr.config import Settings
from pitr.errors import EXIT_FETCH_HARD, NotFoundError

log = logging.getLogger("pitr")


def run_wal_push(settings: Settings, path: str) -> int:
    if settings.archive_async:
        from pitr.cli.asyncwal import run_async_push

        rc = run_async_push(settings, path)  # None: not a file PostgreSQL queued; push it here
        if rc is not None:
            return rc
    from pitr.cli.repoopen import open_repo
    from pitr.ops.wal import archive
    from pitr.repo.envelope import parse_codec
    from pitr.repo.meta import read_meta

    storage = None
    try:
        storage = open_repo(settings)
        meta = read_meta(storage)
        r = archive.push(storage, meta, Path(path), parse_codec(settings.wal_codec()))
        log.info("%s %s (%d -> %d bytes)", r.name, r.status, r.raw_size, r.stored_size)
        return 0
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - one sentence on stderr, never a bare traceback
        return report_error(e, is_verbose())
    finally:
        if storage is not None:
            storage.close()


def run_wal_fetch(settings: Settings, name: str, dest: str) -> int:
    """0 fetched; 1 not in the archive (PostgreSQL's end of archive); >125 anything else."""
    from pitr.cli.repoopen import open_repo, parse_as_of
    from pitr.ops.wal import archive

    if settings.prefetch > 0:
        from pitr.cli import asyncwal

        rc = asyncwal.serve_prefetched(settings, name, dest)  # 0 served, 1 not archived, None: fetch here
        if rc is not None:
            log.info("%s %s by the prefetcher", name, "served" if rc == 0 else "reported missing")
            return rc
    try:
        storage = open_repo(settings, as_of=parse_as_of(None))  # PITR_REPO_AS_OF: restore --repo-as-of
        archive.fetch_with_retries(storage, archive.MetaLoader(storage), name, Path(dest),
                                   settings.fetch_retries, settings.fetch_retry_forever)
        log.info("fetched %s", name)
        if settings.prefetch > 0:
            from pitr.cli import asyncwal

            asyncwal.kick_prefetch(settings, name, dest)
        return 0
    except NotFoundError:
        log.info("%s is not in the archive", name)
        return 1
    except KeyboardInterrupt as e:
        report_error(e, is_verbose())
        return EXIT_FETCH_HARD
    except Exception as e:  # noqa: BLE001 - PitrError, OSError, and any bug alike
        report_error(e, is_verbose())
        # any failure but "not archived" must stop recovery, never end it early (see errors.py)
        return EXIT_FETCH_HARD
