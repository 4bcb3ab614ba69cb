"""The WAL prefetcher: keeps the next segments of recovery on local disk before PostgreSQL asks.

Started on demand by `pitr wal-fetch` when `prefetch` > 0 and gone when idle or when recovery
ended. It reads the spool's `want` file (the name PostgreSQL asked for last) and keeps the next
`count` segments of the same timeline in the spool: each is stream-decoded (size and digest
checked against the envelope trailer), its first page header checked against its name and the
cluster, renamed into place, and described by NAME.meta, which the foreground checks again before
it hands the file over. Files outside the window (consumed, skipped, other timelines) are deleted.
A timeline switch simply moves the window: files are only ever served under their own name.

The spool may also be a stage (ops/wal/stage.py) that restore_command empties by renaming a file
away without asking: a look-ahead file that vanished counts as PostgreSQL's latest request.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pitr.errors import IntegrityError, NotFoundError, PitrError
from pitr.ops.wal import spool, stage
from pitr.ops.wal.archive import confirm_missing
from pitr.pg import walheader, walname
from pitr.repo import envelope
from pitr.repo.format import wal_key
from pitr.repo.meta import RepoMeta
from pitr.storage.base import Storage

log = logging.getLogger("pitr.prefetch")

IDLE_EXIT = 30.0  # seconds without a new request before the prefetcher exits
MISSING_RECHECK = 5.0  # a segment not yet archived is looked for again after this long
RECOVERY_ENDED = "recovery ended"
# after recovery ended, requests are answered this long still: PostgreSQL removes the signal file
# before its last probes (the new timeline's history, the parent's), which the one-liner asks us
END_GRACE = 3.0


@dataclass(frozen=True)
class PrefetchConfig:
    spool: Path
    fingerprint: str
    count: int
    jobs: int
    idle_exit: float = IDLE_EXIT
    poll: float = 0.005
    stage: bool = False  # restore_command takes files unasked (ops/wal/stage.py): a vanished file moves the window


REMOTE_FETCHES = 8  # segments fetched at once from S3 when prefetch_jobs is 0 (automatic)


def fetch_workers(prefetch: int, prefetch_jobs: int, jobs: int, remote: bool) -> int:
    """Segments fetched at once, at most the window: prefetch_jobs, or when 0 REMOTE_FETCHES on S3 (a
    fetch mostly waits on the network) and `jobs` on a directory (CPU-bound: more at once only
    delays the segment replay needs next; measured in docs/performance.md)."""
    return max(1, min(prefetch, prefetch_jobs or (REMOTE_FETCHES if remote else jobs)))


def window(want: str | None, count: int, seg_size: int) -> list[str]:
    """The segments after `want` on its timeline (empty unless want is a plain segment name)."""
    if want is None or count <= 0:
        return []
    w = walname.parse(want)
    if w is None or w.kind != "segment":
        return []
    no = walname.segno(want, seg_size)
    return [walname.seg_name(w.timeline, no + i, seg_size) for i in range(1, count + 1)]


def fetch_one(storage: Storage, meta: RepoMeta, cfg: PrefetchConfig, name: str) -> None:
    """Fetch name into the spool, verified, then describe it in NAME.meta. NotFoundError if absent."""
    src = storage.open(wal_key(name))
    tmp = cfg.spool / spool.partial_name(name)
    try:
        with src, open(tmp, "wb") as raw:
            out = _CrcWriter(raw, skip=cfg.stage)
            t = envelope.decode_stream(src, out, f"archived {name}", max_size=meta.wal_segment_size)
        with open(tmp, "rb") as f:
            head = f.read(walheader.HEAD_BYTES)
        why = None
        if len(name) == 24:
            why = walheader.problem(name, head, meta.wal_segment_size, meta.system_identifier, t.size)
        if why:
            raise IntegrityError(f"archived {name} {why}")
        os.replace(tmp, cfg.spool / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    spool.write_marker(cfg.spool / f"{name}.meta", {
        "fp": cfg.fingerprint, "size": str(t.size), "digest": f"{t.algo}:{t.digest}", "crc32": str(out.crc),
        "sysid": str(meta.system_identifier), "seg_size": str(meta.wal_segment_size)})


class _CrcWriter:
    """Writes through, keeping a CRC-32 of what was written (the foreground's cheap re-check).

    skip: in a stage no CRC is taken (crc stays spool.NO_CRC): the shell rename hands most files
    over without any re-check, so the CRC would guard only the few wal-fetch takes against a
    change nothing in the stage's threat model can make (ops/wal/stage.py).
    """

    def __init__(self, out: BinaryIO, skip: bool = False) -> None:
        self._out = out
        self.crc = spool.NO_CRC if skip else 0

    def write(self, b: bytes) -> int:
        if self.crc != spool.NO_CRC:
            self.crc = zlib.crc32(b, self.crc)
        return self._out.write(b)


def serve(storage: Storage, meta: RepoMeta, cfg: PrefetchConfig,
          keep_going: Callable[[], str | None]) -> tuple[str, int]:
    """Answer requests and keep the window filled until idle or told to stop.

    Returns why it stopped and how many files it fetched.
    """
    # one worker more than the window may use: a request never queues behind look-ahead
    with ThreadPoolExecutor(max_workers=cfg.jobs + 1, thread_name_prefix="prefetch") as pool:
        return _Prefetcher(storage, meta, cfg, pool).run(keep_going)


class _Prefetcher:
    """One prefetcher's state between the turns of its loop: follow the request, fetch, collect, prune."""

    def __init__(self, storage: Storage, meta: RepoMeta, cfg: PrefetchConfig, pool: ThreadPoolExecutor) -> None:
        self.storage, self.meta, self.cfg, self.pool = storage, meta, cfg, pool
        self.inflight: dict[Future[None], tuple[str, str | None]] = {}  # -> (name, stamp if a request)
        self.asked: dict[str, str] = {}  # requests for a segment whose look-ahead fetch was in flight: name -> stamp
        self.missing: dict[str, float] = {}  # name -> when to look for it again
        self.failed: dict[str, float] = {}
        self.last_req: tuple[str, str] | None = None
        self.base: str | None = None  # the segment the window follows: the latest request or file taken
        self.ready: set[str] = set()  # segments fetched ahead and in place (taken when they vanish)
        self.taken = self.requests = self.fetched = 0
        self.shell_asks = 0  # requests the stage's one-liner made itself (stage.SHELL_STAMP): no Python start
        self.ending_at = 0.0  # after recovery ended: requests are still answered until then
        self.handled: str | None = None  # stamp of the request already taken care of
        self.last_change = time.monotonic()
        self.next_prune = 0.0
        self.sp = os.fspath(cfg.spool) + os.sep  # the loop's file checks, without a Path per look (its hot path)

    def run(self, keep_going: Callable[[], str | None]) -> tuple[str, int]:
        reason: str | None = None
        next_check = 0.0
        while True:
            now = time.monotonic()
            req, moved = self.follow()
            wanted = window(self.base, self.cfg.count, self.meta.wal_segment_size)
            if moved or now >= self.next_prune:
                self.prune(now, req, moved, wanted)
            if reason is None or now < self.ending_at:
                self.request(req)  # also in the grace after recovery ended: its last history probes
            if reason is None:
                self.fill_window(now, wanted)
            if now >= next_check:  # before the wait below: fetches in flight must not starve this check
                next_check = now + 1.0
                if reason is None:
                    reason = keep_going()
                    if reason == RECOVERY_ENDED:
                        self.ending_at = now + END_GRACE
            if self.inflight:
                self.collect()
                continue
            if reason is not None and now < self.ending_at and not spool.stop_requested(self.cfg.spool,
                                                                                         spool.PREFETCHD):
                time.sleep(self.cfg.poll)
                continue
            # idle, unless the request is still the starter's and it runs: restore --replay starts the
            # helper while it writes the files, which may take longer than idle_exit
            if (reason is None and now - self.last_change > self.cfg.idle_exit
                    and not (req and stage.starter_alive(req[1]))):
                reason = "idle"
            if reason is not None:
                # what a user checks: files restore_command took straight from the spool (a stage's
                # one-liner) against requests that went through wal-fetch
                log.info("%d prefetched segments taken, %d requests through wal-fetch, %d answered in the shell",
                         self.taken, self.requests, self.shell_asks)
                return reason, self.fetched
            time.sleep(self.cfg.poll)

    def _busy(self) -> set[str]:
        return {n for n, _ in self.inflight.values()}

    def follow(self) -> tuple[tuple[str, str] | None, bool]:
        """PostgreSQL's latest request, and whether the window moved (new request, or files taken)."""
        req = spool.read_want(self.sp)
        want = req[0] if req else None
        moved = req != self.last_req
        if moved and want and len(want) == 24:  # a history request does not move the window
            self.base = want
        gone = {n for n in self.ready if not os.path.exists(self.sp + n)} if self.cfg.stage else set()
        if gone:  # taken by restore_command from a stage (or by the foreground, after its request)
            self.ready -= gone
            self.taken += len(gone)
            self.base, moved = max(gone, key=lambda n: walname.segno(n, self.meta.wal_segment_size)), True
        return req, moved

    def prune(self, now: float, req: tuple[str, str] | None, moved: bool, wanted: list[str]) -> None:
        """Delete what PostgreSQL will not ask for any more (at most every 0.5 s unless the window moved)."""
        if moved:
            self.last_req, self.last_change = req, now
        self.next_prune = now + 0.5
        want = req[0] if req else None
        keep = set(wanted) | ({want} if want else set()) | ({self.base} if self.base else set()) | self._busy()
        self.ready &= keep
        _prune(self.cfg.spool, keep)

    def request(self, req: tuple[str, str] | None) -> None:
        """Fetch a new request first (a look-ahead fetch of it in flight answers it when it ends)."""
        if not req or req[1] == self.handled:
            return
        self.handled = req[1]
        if req[1].startswith(stage.SHELL_STAMP):
            self.shell_asks += 1
        elif not req[1].startswith(stage.STARTER_STAMP):  # wal-fetch's (stage.start_helper's is not a request)
            self.requests += 1
        rname = req[0]
        log.debug("request for %s (%s)", rname, req[1])
        if not req[1].startswith("done") and not self._in_place(rname):
            if rname in self._busy():
                self.asked[rname] = req[1]  # answered when that fetch ends, not by a 120 s time-out
            else:
                self._submit(rname, req[1])

    def _in_place(self, name: str) -> bool:
        """Whether name is fetched and waiting (in a stage, a file the one-liner took leaves its .meta behind:
        PostgreSQL asking for it again needs it fetched again)."""
        return os.path.exists(f"{self.sp}{name}.meta") and (not self.cfg.stage or os.path.exists(self.sp + name))

    def fill_window(self, now: float, wanted: list[str]) -> None:
        """Start look-ahead fetches for the window's segments, at most cfg.jobs at once."""
        window_busy = sum(1 for _, st in self.inflight.values() if st is None)
        if window_busy >= self.cfg.jobs:
            return
        busy = self._busy()
        for name in wanted:
            if window_busy >= self.cfg.jobs:
                break
            if name in busy or name in self.ready or os.path.exists(f"{self.sp}{name}.meta"):
                continue
            if self.missing.get(name, 0.0) > now or self.failed.get(name, 0.0) > now:
                continue
            self._submit(name, None)
            window_busy += 1

    def _submit(self, name: str, stamp: str | None) -> None:
        self.inflight[self.pool.submit(fetch_one, self.storage, self.meta, self.cfg, name)] = (name, stamp)

    def collect(self) -> None:
        """Wait briefly for fetches to end; record each, answering the request it carried if it failed."""
        finished, _ = wait(list(self.inflight), timeout=self.cfg.poll, return_when=FIRST_COMPLETED)
        for fut in finished:
            name, stamp = self.inflight.pop(fut)
            stamp = self.asked.pop(name, None) or stamp
            try:
                fut.result()
                self.fetched += 1
                if len(name) == 24 and not (stamp or "").startswith("ask"):  # wal-fetch's own: not "taken"
                    self.ready.add(name)
                self.last_change = time.monotonic()  # misses and failures are not progress (idle exit)
            except NotFoundError:
                self.missing[name] = time.monotonic() + MISSING_RECHECK
                if stamp:
                    verdict = _verdict_on_miss(self.storage, self.meta, name)
                    spool.answer(self.cfg.spool, name, stamp, verdict)
                    log.debug("%s not archived: answered %s (%s)", name, verdict, stamp)
            except (PitrError, OSError) as e:
                log.warning("prefetching %s failed: %s", name, e)
                self.failed[name] = time.monotonic() + 2.0
                if stamp:
                    spool.answer(self.cfg.spool, name, stamp, "failed")


def _verdict_on_miss(storage: Storage, meta: RepoMeta, name: str) -> str:
    """"missing" only while the repository proves it is there (see archive.confirm_missing).

    Otherwise "failed": the waiting wal-fetch then fetches by itself and, finding no repository,
    exits 128 with the reason, so PostgreSQL stops recovery instead of promoting.
    """
    try:
        confirm_missing(storage, meta, name)
    except (PitrError, OSError) as e:
        log.warning("not answering %s as missing: %s", name, e)
        return "failed"
    return "missing"


def _prune(spool_dir: Path, keep: set[str]) -> None:
    """Delete prefetched files and answers PostgreSQL will not ask for (consumed, skipped, other timeline)."""
    try:
        entries = list(os.scandir(spool_dir))
    except FileNotFoundError:
        return
    for e in entries:
        name = e.name
        if name.startswith(".") and name.endswith(".part"):
            name = name[1:-5]
        for suffix in (".meta", ".missing", ".failed"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        if name in keep or walname.parse(name) is None:
            continue
        try:
            os.unlink(e.path)
        except FileNotFoundError:
            pass


def _postmaster_pid(pgdata: Path) -> str | None:
    """The PID of the server running in pgdata (None while none runs: no postmaster.pid, or one left
    by a server that died -- restore --replay starts the stage's helper before it removes that)."""
    try:
        with open(pgdata / "postmaster.pid") as f:
            pid = f.readline().strip()
    except OSError:
        return None
    return pid if pid.isdigit() and spool.pid_alive(int(pid)) else None


def clear(spool_dir: Path, want: bool = True) -> None:
    """Remove every prefetched file (on exit: nothing will use them); want=False keeps the request."""
    _prune(spool_dir, set())
    if want:
        (spool_dir / "want").unlink(missing_ok=True)


def keep_going_checks(pgdata: Path, spool_dir: Path) -> Callable[[], str | None]:
    """Stop once recovery is over (PostgreSQL removes recovery.signal/standby.signal at its end).

    Recovery counts as begun once a signal file has been seen: restore --replay starts the stage's
    helper before it writes recovery.signal.
    """
    seen = [spool.in_archive_recovery(pgdata)]
    server = [_postmaster_pid(pgdata)]

    def check() -> str | None:
        if spool.stop_requested(spool_dir, spool.PREFETCHD):
            return "asked to stop"
        now = spool.in_archive_recovery(pgdata)
        if seen[0] and not now:
            return RECOVERY_ENDED
        seen[0] = now
        pid = _postmaster_pid(pgdata)
        if server[0] and pid and pid != server[0]:
            # a new server may run with another environment (restore_command's settings): the next
            # wal-fetch starts a helper with its own; until then the one-liner does not ask us
            return "the server restarted"
        server[0] = server[0] or pid
        return None

    return check
