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
    # archive_command's one-liner (pg/archive_command.py): NAME.ok also carries `sh=TOKEN:identity`
    # when shell_ok() says this helper's settings and server are still the ones it started with
    shell_token: str | None = None
    shell_ok: Callable[[], bool] | None = None


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


def push_one(storage: Storage, meta: RepoMeta, cfg: PushdConfig, name: str) -> tuple[os.stat_result, str]:
    """Push pg_wal/name; returns (the file's stat, status). Raises PitrError/OSError/_Changed."""
    path = cfg.pg_wal / name
    st = os.stat(path)
    began, cpu = time.monotonic(), time.thread_time()
    r = archive.push(storage, meta, path, cfg.codec, archive.thread_buffer(meta.wal_segment_size))
    if spool.file_identity(os.stat(path)) != spool.file_identity(st):
        raise _Changed(name)
    if log.isEnabledFor(logging.DEBUG):  # the store's own time, and the CPU this thread got, against the whole
        log.debug("%s: %s, %.0f ms in all, %.0f ms of it storing, %.0f ms of CPU", name, r.status,
                  (time.monotonic() - began) * 1e3, r.store_seconds * 1e3, (time.thread_time() - cpu) * 1e3)
    return st, r.status


def serve(storage: Storage, meta: RepoMeta, cfg: PushdConfig,
          keep_going: Callable[[], str | None]) -> PushdStats:
    """Push ready files until idle for cfg.idle_exit seconds or keep_going() returns a reason to stop."""
    with ThreadPoolExecutor(max_workers=cfg.jobs, thread_name_prefix="pushd") as pool:
        return _Pusher(storage, meta, cfg, pool).run(keep_going)


class _Pusher:
    """The async archiver's state between the turns of its loop: scan, submit, settle, clean up."""

    def __init__(self, storage: Storage, meta: RepoMeta, cfg: PushdConfig, pool: ThreadPoolExecutor) -> None:
        self.storage, self.meta, self.cfg, self.pool = storage, meta, cfg, pool
        self.stats = PushdStats()
        self.status_dir = cfg.pg_wal / "archive_status"
        self.done: set[str] = set()  # acknowledged by us or a predecessor with the same settings
        # -> (name, when its push began)
        self.inflight: dict[Future[tuple[os.stat_result, str]], tuple[str, float]] = {}
        self.retry_at: dict[str, float] = {}
        self.not_before = 0.0  # back-off after storage failures, for every file
        self.failures = 0  # storage failures in a row
        self.idle_since = time.monotonic()

    def run(self, keep_going: Callable[[], str | None]) -> PushdStats:
        next_cleanup = 0.0
        stop: str | None = None
        while True:
            now = time.monotonic()
            ready = self.scan()
            if stop is None and now >= self.not_before:
                self.submit(now, ready)
            if self.inflight:
                self.settle()
                self.idle_since = time.monotonic()
            elif stop is None and any(n not in self.done for n in ready):
                self.idle_since = now  # waiting out a back-off is not idleness
            now = time.monotonic()
            if now >= next_cleanup:
                next_cleanup = now + CLEANUP_EVERY
                self.cleanup(ready)
                if stop is None:
                    stop = keep_going()
            if self.inflight:
                continue
            if stop is not None:
                self.stats.reason = stop
                return self.stats
            if now - self.idle_since > self.cfg.idle_exit:
                self.stats.reason = "idle"
                return self.stats
            time.sleep(self.cfg.poll if now - self.idle_since < 1.0 else self.cfg.poll * 3)

    def scan(self) -> list[str]:
        """The files PostgreSQL wants archived now, in its order."""
        return ready_files(self.status_dir)

    def submit(self, now: float, ready: list[str]) -> None:
        """Start pushes of ready files not stored yet, keeping at most 2 x jobs in flight."""
        busy = {n for n, _ in self.inflight.values()}
        for name in ready:
            if len(self.inflight) >= self.cfg.jobs * 2:
                break
            if name in busy or name in self.done or self.retry_at.get(name, 0.0) > now:
                continue
            if spool.acknowledged(self.cfg.spool, self.cfg.pg_wal / name, self.cfg.fingerprint):
                self.done.add(name)
                continue
            fut = self.pool.submit(push_one, self.storage, self.meta, self.cfg, name)
            self.inflight[fut] = (name, time.monotonic())

    def settle(self) -> None:
        """Wait briefly for pushes to end and record each; storage failures in a row back every file off."""
        finished, _ = wait(list(self.inflight), timeout=self.cfg.poll * 5, return_when=FIRST_COMPLETED)
        for fut in finished:
            name, began = self.inflight.pop(fut)
            self.failures = self._record(fut, name)
            if log.isEnabledFor(logging.DEBUG):  # where archive lag comes from
                log.debug("%s: push ended after %.0f ms, %d in flight", name, (time.monotonic() - began) * 1e3,
                          len(self.inflight))
            if self.failures:
                self.not_before = time.monotonic() + min(10.0, 0.5 * 2 ** min(self.failures - 1, 5))

    def _record(self, fut: Future[tuple[os.stat_result, str]], name: str) -> int:
        """Record one finished push as .ok or .error; returns the count of storage failures in a row."""
        cfg = self.cfg
        try:
            st, status = fut.result()
        except FileNotFoundError:
            return self.failures  # PostgreSQL archived or removed it meanwhile
        except _Changed:
            self.retry_at[name] = time.monotonic() + 1.0
            return self.failures
        except (PitrError, OSError) as e:
            self.stats.failed += 1
            spool.write_error(cfg.spool, name, str(e), e.hint if isinstance(e, PitrError) else None)
            log.warning("pushing %s failed: %s", name, e)
            self.retry_at[name] = time.monotonic() + 2.0
            return self.failures + 1 if isinstance(e, StorageError) else self.failures
        shell = None
        if cfg.shell_token and cfg.shell_ok is not None and cfg.shell_ok():
            shell = f"{cfg.shell_token}:{spool.shell_identity(st)}"
        spool.write_ok(cfg.spool, name, cfg.fingerprint, spool.file_identity(st), status, shell)
        self.retry_at.pop(name, None)
        self.done.add(name)
        self.stats.pushed += 1
        return 0

    def cleanup(self, ready: list[str]) -> None:
        _cleanup(self.cfg.spool, set(ready), self.done)


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


def shell_ok_check(pgdata: Path, fingerprint: str, current_fp: Callable[[], str]) -> Callable[[], bool] | None:
    """Whether a marker may carry the one-liner's line now (None: never, no server runs in pgdata).

    The one-liner cannot compute the settings fingerprint that a Python caller compares, so this
    helper vouches for it at each marker: the config file is unchanged (current_fp) and the server
    that started it, whose environment its own is, still runs. A restart or an edit takes the line
    to `pitr wal-push`, which stops an outdated helper."""
    server = spool.server_identity(pgdata)
    if server is None:
        return None

    def check() -> bool:
        return current_fp() == fingerprint and spool.server_identity(pgdata) == server

    return check


def keep_going_checks(cfg: PushdConfig, pgdata: Path, current_fp: Callable[[], str]) -> Callable[[], str | None]:
    """The reasons to stop early: the server stopped or restarted, settings changed, or a caller asked us to.

    A restarted server may have another environment: the next archive_command starts a helper with it
    (and the one-liner's acknowledgements, which this helper stops vouching for, come back)."""
    server = spool.server_identity(pgdata)
    had_server = server is not None or (pgdata / "postmaster.pid").exists()

    def check() -> str | None:
        if spool.stop_requested(cfg.spool, spool.PUSHD):
            return "asked to stop"
        if had_server and not (pgdata / "postmaster.pid").exists():
            return "the server is not running"
        if server is not None and spool.server_identity(pgdata) not in (server, None):
            return "the server restarted"
        if current_fp() != cfg.fingerprint:
            return "the settings changed"
        return None

    return check
