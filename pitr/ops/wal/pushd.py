"""The async archiver: one warm process that pushes every `.ready` WAL file in parallel.

Started on demand by `pitr wal-push` in async mode and gone when idle. It watches
pg_wal/archive_status, pushes the oldest ready files first (history files before segments, like
PostgreSQL's archiver) on `jobs` threads sharing one storage client, and writes NAME.ok only
after archive.push() returned, i.e. after the object is durably stored and verified, and only if
the file did not change while it was read. A failure becomes NAME.error (reported by the next
archive_command call for NAME) and is retried after a back-off; nothing is ever acknowledged that
was not stored.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from pitr.errors import PitrError, StorageError
from pitr.ops.wal import archive, spool
from pitr.repo.envelope import Codec
from pitr.repo.meta import RepoMeta
from pitr.storage.base import Storage

log = logging.getLogger("pitr.pushd")

IDLE_EXIT = 30.0  # seconds without work before the helper exits
CLEANUP_EVERY = 2.0


@dataclass(frozen=True)
class PushdConfig:
    pg_wal: Path
    spool: Path
    fingerprint: str
    jobs: int
    codec: Codec
    idle_exit: float = IDLE_EXIT
    poll: float = 0.01


@dataclass
class PushdStats:
    pushed: int = 0
    failed: int = 0
    reason: str = ""


class _Changed(Exception):
    """The WAL file changed while it was being pushed (not expected from PostgreSQL)."""


def ready_files(status_dir: Path) -> list[str]:
    """Names PostgreSQL wants archived, in its own order: history files first, then by name."""
    try:
        names = [e.name[:-6] for e in os.scandir(status_dir) if e.name.endswith(".ready")]
    except FileNotFoundError:
        return []
    return sorted(names, key=lambda n: (not n.endswith(".history"), n))


def push_one(storage: Storage, meta: RepoMeta, cfg: PushdConfig, name: str) -> tuple[str, str]:
    """Push pg_wal/name; returns (file identity, status). Raises PitrError/OSError/_Changed."""
    path = cfg.pg_wal / name
    before = spool.file_identity(os.stat(path))
    r = archive.push(storage, meta, path, cfg.codec)
    if spool.file_identity(os.stat(path)) != before:
        raise _Changed(name)
    return before, r.status


def serve(storage: Storage, meta: RepoMeta, cfg: PushdConfig,
          keep_going: Callable[[], str | None]) -> PushdStats:
    """Push ready files until idle for cfg.idle_exit seconds or keep_going() returns a reason to stop."""
    stats = PushdStats()
    status_dir = cfg.pg_wal / "archive_status"
    done: set[str] = set()  # acknowledged by us or a predecessor with the same settings
    inflight: dict[Future[tuple[str, str]], str] = {}
    retry_at: dict[str, float] = {}
    not_before = 0.0  # back-off after storage failures, for every file
    failures = 0
    idle_since = time.monotonic()
    next_cleanup = 0.0
    stop: str | None = None
    with ThreadPoolExecutor(max_workers=cfg.jobs, thread_name_prefix="pushd") as pool:
        while True:
            now = time.monotonic()
            ready = ready_files(status_dir)
            busy = set(inflight.values())
            if stop is None and now >= not_before:
                for name in ready:
                    if len(inflight) >= cfg.jobs * 2:
                        break
                    if name in busy or name in done or retry_at.get(name, 0.0) > now:
                        continue
                    if spool.acknowledged(cfg.spool, cfg.pg_wal / name, cfg.fingerprint):
                        done.add(name)
                        continue
                    inflight[pool.submit(push_one, storage, meta, cfg, name)] = name
            if inflight:
                finished, _ = wait(list(inflight), timeout=cfg.poll * 5, return_when=FIRST_COMPLETED)
                for fut in finished:
                    name = inflight.pop(fut)
                    failures = _settle(fut, name, cfg, stats, done, retry_at, failures)
                    if failures:
                        not_before = time.monotonic() + min(10.0, 0.5 * 2 ** min(failures - 1, 5))
                idle_since = time.monotonic()
            elif stop is None and any(n not in done for n in ready):
                idle_since = now  # waiting out a back-off is not idleness
            now = time.monotonic()
            if now >= next_cleanup:
                next_cleanup = now + CLEANUP_EVERY
                _cleanup(cfg.spool, set(ready), done)
                if stop is None:
                    stop = keep_going()
            if inflight:
                continue
            if stop is not None:
                stats.reason = stop
                return stats
            if now - idle_since > cfg.idle_exit:
                stats.reason = "idle"
                return stats
            time.sleep(cfg.poll if now - idle_since < 1.0 else cfg.poll * 3)


def _settle(fut: Future[tuple[str, str]], name: str, cfg: PushdConfig, stats: PushdStats, done: set[str],
            retry_at: dict[str, float], failures: int) -> int:
    """Record one finished push as .ok or .error; returns the count of storage failures in a row."""
    try:
        identity, status = fut.result()
    except FileNotFoundError:
        return failures  # PostgreSQL archived or removed it meanwhile
    except _Changed:
        retry_at[name] = time.monotonic() + 1.0
        return failures
    except (PitrError, OSError) as e:
        stats.failed += 1
        spool.write_error(cfg.spool, name, str(e), e.hint if isinstance(e, PitrError) else None)
        log.warning("pushing %s failed: %s", name, e)
        retry_at[name] = time.monotonic() + 2.0
        return failures + 1 if isinstance(e, StorageError) else failures
    spool.write_ok(cfg.spool, name, cfg.fingerprint, identity, status)
    retry_at.pop(name, None)
    done.add(name)
    stats.pushed += 1
    return 0


def _cleanup(spool_dir: Path, ready: set[str], done: set[str]) -> None:
    """Forget markers of files PostgreSQL no longer wants archived (it marked them .done)."""
    try:
        entries = list(os.scandir(spool_dir))
    except FileNotFoundError:
        return
    for e in entries:
        base, dot, ext = e.name.rpartition(".")
        if not dot or ext not in ("ok", "error") or base in ready or base == spool.PUSHD:
            continue
        try:
            os.unlink(e.path)
        except FileNotFoundError:
            pass
        done.discard(base)
    for name in list(done):
        if not os.path.exists(spool_dir / f"{name}.ok"):
            done.discard(name)  # a caller found the marker stale and removed it: push again


def keep_going_checks(cfg: PushdConfig, pgdata: Path, current_fp: Callable[[], str]) -> Callable[[], str | None]:
    """The reasons to stop early: the server stopped, settings changed, or a caller asked us to."""
    had_server = (pgdata / "postmaster.pid").exists()

    def check() -> str | None:
        if spool.stop_requested(cfg.spool, spool.PUSHD):
            return "asked to stop"
        if had_server and not (pgdata / "postmaster.pid").exists():
            return "the server is not running"
        if current_fp() != cfg.fingerprint:
            return "the settings changed"
        return None

    return check
