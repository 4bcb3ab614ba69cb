"""`pitr backup` and `pitr restore-point`: an online base backup, and a named recovery point.

backup, as a recipe of named steps on ONE connection held from start to stop:
  1. check      repository initialized and ours; primary; archiving on; PGDATA is this server's
  2. claim      a unique backup ID (conditional write of backups/<ID>/started)
  3. start      pg_backup_start (15+) / pg_start_backup non-exclusive (13-14), fast checkpoint;
                the started marker is rewritten with the start LSN, so `expire` keeps the WAL this
                backup needs from here until its manifest exists
  4. copy       scan PGDATA + tablespaces (backup_files), pipeline into the repo (backup_store),
                page checksums verified as files stream past; pg_control last
  5. stop       pg_backup_stop / pg_stop_backup: backup_label + tablespace_map; the server
                switches WAL
  6. wal        wait until every segment from start to stop is in the archive (timeout)
  7. commit     write the manifest (the commit point), drop the claim marker
On a hot standby the same recipe runs on the standby's own session; ops/base/backup_standby.py holds what
differs (check: the repository's cluster, replay neither paused nor stuck; stop: a promotion meanwhile
fails the backup; wal: the primary archives the last segment, a standby cannot switch WAL).
take_backup reads as that list: _check, _claim, _start, _copy, _stop, _wait_wal, _commit (then
_drop_claim), sharing one _Run; _abandon is the failure path.
Any failure or signal before 7: the connection is closed (which aborts the backup on the
server), the objects written so far are deleted (best effort), and no manifest exists, so the
backup is never listed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pitr import __version__
from pitr.errors import AlreadyExistsError, BackupError, Interrupted, PitrError, PostgresError, UsageError
from pitr.ops.base import backup_incr, backup_standby
from pitr.ops.base.backup_files import Scan, ScanOptions, scan
from pitr.ops.base.backup_store import Pipeline, Progress, StoreOptions, is_internal_abort
from pitr.pg import layout, walname
from pitr.pg.conn import BackupStop, PgSession, ServerInfo
from pitr.repo import envelope, restore_points
from pitr.repo.catalog import present_wal
from pitr.repo.format import backup_dir
from pitr.repo.format import started_key as format_started_key
from pitr.repo.manifest import FileEntry, Manifest, write_manifest
from pitr.repo.meta import check_cluster, read_meta
from pitr.storage.base import Storage

log = logging.getLogger("pitr.backup")

BACKUP_TYPES = ("full", "diff", "incr")


@dataclass(frozen=True)
class BackupOptions:
    codec: envelope.Codec
    jobs: int = 2
    pgdata: str | None = None  # default: the server's data_directory
    fast: bool = True  # fast (immediate) checkpoint at start: a backup run by hand should start now
    archive_timeout: float = 300.0  # how long to wait for the backup's WAL to reach the archive
    type: str = "full"
    checksum: bool = False  # diff/incr: read every file, never trust size + mtime (backup_incr)
    standby_stall_timeout: float = backup_standby.STALL_TIMEOUT  # a standby's replay may stand still this long


@dataclass
class BackupResult:
    manifest: Manifest
    objects: int
    vanished: list[str] = field(default_factory=list)
    requested_type: str = "full"
    reason: str | None = None  # why a full backup was taken instead of the requested diff/incr

    @property
    def bad_pages(self) -> dict[str, list[int]]:
        return {f.path: f.bad_pages for f in self.manifest.files if f.bad_pages}


@dataclass(frozen=True)
class ServerFacts:
    """What the backup needs to know about the server, read once at the start."""

    info: ServerInfo
    archive_mode: str
    data_checksums: bool
    block_size: int
    relseg_blocks: int
    catalog_version: int
    stats_temp_directory: str | None


def server_facts(pg: PgSession) -> ServerFacts:
    info = pg.info()
    row = pg.query(
        "select current_setting('archive_mode'), current_setting('data_checksums'),"
        " current_setting('block_size')::int, current_setting('segment_size'),"
        " (select catalog_version_no from pg_control_system()),"
        " current_setting('stats_temp_directory', true)"
    )[0]
    block = int(row[2])
    return ServerFacts(info, str(row[0]), str(row[1]) == "on", block, _size(str(row[3]), block) // block,
                       int(row[4]), str(row[5]) if row[5] else None)


def _size(text: str, block: int) -> int:
    """segment_size shows as '1GB' (or a block count on old servers)."""
    units = {"kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
    for u, mult in units.items():
        if text.endswith(u):
            return int(text[: -len(u)]) * mult
    return int(text) * block


# --------------------------------------------------------------------------- steps

def check_server(storage: Storage, facts: ServerFacts, what: str = "backup", want_archive: bool = True) -> None:
    """The repository is initialized and ours; the server is a primary that archives."""
    meta = read_meta(storage)
    check_cluster(meta, facts.info.system_identifier, storage)
    if facts.info.in_recovery:
        raise BackupError(f"the server is a standby (in recovery); pitr {what} needs the primary",
                          f"run pitr {what} against the primary server")
    if want_archive and facts.archive_mode == "off":
        raise BackupError(f"archive_mode is off, so the WAL pitr {what} needs would never reach the archive",
                          "set archive_mode = on and archive_command = 'pitr wal-push %p', restart, "
                          "then run `pitr check`")


def resolve_pgdata(given: str | None, facts: ServerFacts) -> Path:
    """The data directory to read: --pgdata / PGDATA, else the server's own; must be this server's."""
    server_dir = Path(facts.info.data_directory)
    path = Path(given) if given else server_dir
    control = path / layout.CONTROL_FILE
    try:
        with open(control, "rb") as f:
            sysid = int.from_bytes(f.read(8), "little")
    except FileNotFoundError:
        raise BackupError(f"{path} is not a PostgreSQL data directory (no {layout.CONTROL_FILE})",
                          f"the server's data directory is {server_dir}; pitr backup runs on the database "
                          "host and reads it directly") from None
    except PermissionError:
        raise BackupError(f"cannot read the data directory {path}: permission denied",
                          "run pitr backup as the PostgreSQL server's OS user (e.g. postgres)") from None
    if sysid != facts.info.system_identifier:
        raise BackupError(f"{path} belongs to another cluster than the server pitr is connected to "
                          f"({sysid} vs {facts.info.system_identifier})",
                          f"use --pgdata {server_dir} or fix --dbname / PGHOST / PGPORT")
    return path


def new_backup_id(now: dt.datetime, taken: Callable[[str], bool]) -> str:
    """20261125T221530F; if taken, 20261125T221530F-2, -3, … (still sorts by time)."""
    base = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S") + "F"
    n = 1
    while True:
        bid = base if n == 1 else f"{base}-{n}"
        if not taken(bid):
            return bid
        n += 1


def claim_backup_id(storage: Storage, now: dt.datetime) -> str:
    """Reserve an ID with a conditional write, so two concurrent backups never share a directory."""
    marker = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _iso(now)}).encode()

    def taken(bid: str) -> bool:
        if any(True for _ in storage.list(backup_dir(bid))):
            return True
        try:
            storage.put(started_key(bid), marker, if_absent=True)
        except AlreadyExistsError:
            return True
        return False

    return new_backup_id(now, taken)


def started_key(backup_id: str) -> str:
    """Marker of a backup in progress (or interrupted); never read as a backup (no manifest)."""
    return format_started_key(backup_id)


def mark_started(storage: Storage, backup_id: str, claimed: dt.datetime, start_lsn: int,
                 start_time: dt.datetime, parent: str | None = None) -> None:
    """Rewrite the claim marker with the start position: from now on `expire` keeps WAL from there
    (and, for a diff/incr, the backup it builds on)."""
    doc = {"pid": os.getpid(), "host": socket.gethostname(), "started": _iso(claimed),
           "start_lsn": walname.format_lsn(start_lsn), "start_time": _iso(start_time)}
    if parent is not None:
        doc["parent"] = parent
    storage.put(started_key(backup_id), json.dumps(doc).encode())


def parse_backup_label(text: str) -> tuple[int, int, str]:
    """(start LSN, timeline, start WAL file) from a backup_label's text."""
    m = re.search(r"^START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+) \(file ([0-9A-F]{24})\)", text, re.M)
    t = re.search(r"^START TIMELINE: (\d+)", text, re.M)
    if not m:
        raise BackupError("the backup_label PostgreSQL returned has no START WAL LOCATION line")
    lsn = walname.parse_lsn(m.group(1))
    tli = int(t.group(1)) if t else walname.timeline_of(m.group(2))
    return lsn, tli, m.group(2)


def wait_for_wal(storage: Storage, names: list[str], timeout: float, what: str,
                 archiver_status: Callable[[], str | None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
    """Return once every named segment is archived; BackupError naming the first missing one after timeout."""
    deadline = clock() + timeout
    pending = list(names)
    delay = 0.1
    while pending:
        have = present_wal(storage, pending)
        pending = [n for n in pending if n not in have]
        if not pending:
            return
        if clock() >= deadline:
            status = archiver_status() if archiver_status else None
            raise BackupError(
                f"WAL segment {pending[0]} needed by {what} did not reach the archive within {timeout:g}s"
                + (f" ({status})" if status else ""),
                "check archive_command (it must be 'pitr wal-push %p' with this repository) and the server log; "
                "`pitr check` tests archiving end to end",
            )
        sleep(delay)
        delay = min(0.5, delay * 1.5)  # archive_command usually takes a fraction of a second


def archiver_status(pg: PgSession) -> Callable[[], str | None]:
    def status() -> str | None:
        try:
            rows = pg.query("select last_failed_wal, last_failed_time, last_archived_wal from pg_stat_archiver")
        except PitrError:
            return None
        if not rows or not rows[0][0]:
            return "PostgreSQL reports no failed archive attempts; is archiving slow or stuck?"
        failed, at, last_ok = rows[0]
        when = at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if at else "?"
        return f"PostgreSQL's archiver last failed on {failed} at {when}; last archived: {last_ok or 'none'}"
    return status


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _cleanup(storage: Storage, backup_id: str) -> None:
    """Best effort: remove what an unfinished backup wrote (a missing manifest already hides it)."""
    try:
        keys = [o.key for o in storage.list(backup_dir(backup_id)) if not o.key.endswith("/manifest")]
        storage.delete_many(keys)
    except Exception as e:  # noqa: BLE001 - cleanup must not mask the real failure
        log.warning("could not delete the partial backup %s (%s); `pitr expire` can remove it later", backup_id, e)


# --------------------------------------------------------------------------- recipe

@dataclass
class _Run:
    """What the steps of one backup share; filled in as the recipe goes."""

    storage: Storage
    pg: PgSession
    opts: BackupOptions
    t0: float
    facts: ServerFacts
    pgdata: Path
    base: backup_incr.Base
    claimed: dt.datetime
    backup_id: str = ""
    start_lsn: int = 0
    start_time: dt.datetime | None = None  # with start_lsn: set by _start
    marks: dict[str, float] = field(default_factory=dict)  # step -> monotonic time it ended
    stopped: bool = False  # pg_backup_stop returned: the server holds no backup open any more

    @property
    def standby(self) -> bool:
        """A hot standby is backed up too (ops/base/backup_standby.py holds what differs)."""
        return self.facts.info.in_recovery

    @property
    def parent_id(self) -> str | None:
        return self.base.parent.id if self.base.parent is not None else None


@dataclass(frozen=True)
class _Copied:
    """What step 4 (copy) leaves for the manifest."""

    found: Scan
    refs: list[FileEntry]  # a diff/incr's files taken whole from its parent
    pipe: Pipeline


@dataclass(frozen=True)
class _Stopped:
    """What step 5 (stop) learned: the stop position and what the backup_label says."""

    stop: BackupStop
    label_lsn: int
    tli: int
    start_wal: str


def take_backup(storage: Storage, pg: PgSession, opts: BackupOptions, progress: Progress | None = None,
                abort: threading.Event | None = None) -> BackupResult:
    """Run the whole recipe (module doc). On any failure the session is closed and nothing is listed."""
    run = _check(storage, pg, opts)
    _claim(run)
    try:
        _start(run)
        copied = _copy(run, progress, abort)
        stopped = _stop(run)
        _wait_wal(run, stopped)
        m = _commit(run, copied, stopped)
    except BaseException as e:
        instead = _abandon(run, e)
        if instead is None:
            raise
        raise instead from None
    _drop_claim(run)
    res = copied.pipe.result
    log.info("backup %s: complete (%d files, %d bytes)", run.backup_id, len(m.files), m.bytes)
    return BackupResult(m, res.objects, res.vanished, run.base.requested, run.base.reason)


def _check(storage: Storage, pg: PgSession, opts: BackupOptions) -> _Run:
    """Step 1: the type, the server (primary or standby), PGDATA, and what a diff/incr builds on."""
    if opts.type not in BACKUP_TYPES:
        raise UsageError(f"unknown backup type {opts.type!r}", "use --type full, diff or incr")
    t0 = time.monotonic()
    facts = server_facts(pg)
    if facts.info.in_recovery:  # standby hook
        backup_standby.check_standby(storage, pg, facts.info, opts.standby_stall_timeout)
    else:
        check_server(storage, facts)
    pgdata = resolve_pgdata(opts.pgdata, facts)
    base = _choose_base(storage, pg, facts, opts.type)
    return _Run(storage, pg, opts, t0, facts, pgdata, base, claimed=dt.datetime.now(dt.UTC))


def _claim(run: _Run) -> None:
    """Step 2: a backup ID of our own."""
    run.backup_id = claim_backup_id(run.storage, run.claimed)
    log.info("backup %s: starting (%s checkpoint)", run.backup_id, "fast" if run.opts.fast else "spread")


def _start(run: _Run) -> None:
    """Step 3: pg_backup_start, then the claim marker names the start LSN (and the parent)."""
    run.start_lsn, run.start_time = run.pg.backup_start(f"pitr backup {run.backup_id}", run.opts.fast)
    mark_started(run.storage, run.backup_id, run.claimed, run.start_lsn, run.start_time, run.parent_id)
    run.marks["start"] = time.monotonic()
    log.info("backup %s: started at %s", run.backup_id, walname.format_lsn(run.start_lsn))


def _copy(run: _Run, progress: Progress | None, abort: threading.Event | None) -> _Copied:
    """Step 4: scan PGDATA and store what changed, pg_control last."""
    facts, storage, opts, pgdata, base = run.facts, run.storage, run.opts, run.pgdata, run.base
    found = scan(pgdata, ScanOptions(
        version_dir=layout.tablespace_version_dir(facts.info.major, facts.catalog_version),
        checksums=facts.data_checksums, relseg_blocks=facts.relseg_blocks, block_size=facts.block_size,
        extra_empty=tuple(x for x in [layout.stats_temp_rel(facts.stats_temp_directory, str(pgdata))] if x),
    ))
    to_read, refs, _ = backup_incr.plan_files(found.files, base.parent, opts.checksum)
    jobs = backup_incr.BlockJobs(storage, run.backup_id, facts.block_size, base.parent)
    pipe = Pipeline(storage, StoreOptions(run.backup_id, opts.codec, opts.jobs, run.start_lsn, facts.block_size),
                    found.total_bytes - sum(e.size for e in refs), progress, abort, jobs)
    pipe.run(to_read)
    pipe.run(found.last)  # pg_control after everything else
    run.marks["copy"] = time.monotonic()
    return _Copied(found, refs, pipe)


def _stop(run: _Run) -> _Stopped:
    """Step 5: pg_backup_stop; a diff/incr must still be on its parent's timeline."""
    pg = run.pg
    stop = backup_standby.stop_backup(pg, run.backup_id) if run.standby else pg.backup_stop()  # standby hook
    run.marks["stop"] = time.monotonic()
    run.stopped = True
    label_lsn, tli, start_wal = parse_backup_label(stop.backup_label)
    parent = run.base.parent
    if parent is not None and tli != parent.manifest.timeline:
        raise BackupError(f"backup {run.backup_id} started on timeline {tli}, not its parent's "
                          f"({parent.manifest.timeline}); nothing was listed", "run the backup again")
    return _Stopped(stop, label_lsn, tli, start_wal)


def _wait_wal(run: _Run, s: _Stopped) -> None:
    """Step 6: every segment from start to stop reaches the archive."""
    wal = walname.segment_range(s.tli, s.label_lsn, s.stop.lsn, run.facts.info.wal_segment_size)
    log.info("backup %s: stopped at %s; waiting for %d WAL segment(s) to be archived", run.backup_id,
             walname.format_lsn(s.stop.lsn), len(wal))
    wait_for_wal(run.storage, wal, run.opts.archive_timeout, f"backup {run.backup_id}",
                 backup_standby.archive_status(run.pg) if run.standby else archiver_status(run.pg))  # standby hook
    run.marks["wal_wait"] = time.monotonic()


def _commit(run: _Run, copied: _Copied, s: _Stopped) -> Manifest:
    """Step 7: write the manifest, the commit point: from here the backup is listed."""
    m = _manifest(run, copied, s)
    write_manifest(run.storage, m)  # the commit point
    return m


def _manifest(run: _Run, copied: _Copied, s: _Stopped) -> Manifest:
    facts, stop, res, refs = run.facts, s.stop, copied.pipe.result, copied.refs
    assert run.start_time is not None  # _start ran before any stop
    timings = _timings(run.t0, run.marks)
    seg = facts.info.wal_segment_size
    files = sorted(res.entries + refs, key=lambda e: e.path)
    # {oid: name}: what `restore --db-include` tells the databases' directories apart by
    databases = {str(oid): str(name) for oid, name in run.pg.query("select oid, datname from pg_database")}
    m = Manifest(
        id=run.backup_id, type="full", system_identifier=facts.info.system_identifier, pg_version=facts.info.major,
        pg_version_num=facts.info.version_num, wal_segment_size=seg, timeline=s.tli,
        start_lsn=walname.format_lsn(s.label_lsn), stop_lsn=walname.format_lsn(stop.lsn),
        start_wal=s.start_wal, stop_wal=walname.segment_of_lsn(s.tli, stop.lsn, seg),
        start_time=_iso(run.start_time), stop_time=_iso(stop.time), compress=str(run.opts.codec),
        backup_label=stop.backup_label, tablespace_map=stop.tablespace_map,
        checksums_enabled=facts.data_checksums, files=files, directories=copied.found.dirs,
        tablespaces=copied.found.tablespaces, bytes=res.raw_bytes + sum(e.size for e in refs),
        stored_bytes=res.stored_bytes,
        duration=0.0, pitr_version=__version__,
        extra={"block_size": facts.block_size, "objects": res.objects, "vanished": len(res.vanished),
               "pgdata": str(run.pgdata), "timings": timings, "databases": databases},
    )
    backup_incr.annotate(m, run.base)
    if run.standby:  # standby hook: informational
        m.extra["from_standby"] = True
    m.duration = round(time.monotonic() - run.t0, 3)
    return m


def _timings(t0: float, marks: dict[str, float]) -> dict[str, float]:
    """Seconds per step (checkpoint at start, copy, stop, waiting for WAL): where the time went."""
    timings, prev = {}, t0
    for step, at in marks.items():
        timings[step] = round(at - prev, 3)
        prev = at
    return timings


def _abandon(run: _Run, e: BaseException) -> BaseException | None:
    """After a failure before the commit: abort the server's backup, delete what was written; the
    exception to raise instead of e (None: re-raise e)."""
    if not run.stopped:
        run.pg.close()  # ends the session: the server aborts the non-exclusive backup
    _cleanup(run.storage, run.backup_id)
    if is_internal_abort(e) or isinstance(e, KeyboardInterrupt):
        aborted = "" if run.stopped else "the server's backup was aborted and "
        return Interrupted(f"backup {run.backup_id} was interrupted; {aborted}nothing was listed")
    if isinstance(e, PostgresError) and not run.stopped:
        return BackupError(f"backup {run.backup_id} failed: {e}", e.hint)
    return None


def _drop_claim(run: _Run) -> None:
    """The manifest exists: the claim marker has done its job (best effort; verify ignores it)."""
    try:
        run.storage.delete(started_key(run.backup_id))
    except PitrError:
        pass


def _choose_base(storage: Storage, pg: PgSession, facts: ServerFacts, requested: str) -> backup_incr.Base:
    """What a diff/incr builds on (ops/base/backup_incr), with the server's current timeline."""
    if requested == "full":
        return backup_incr.Base("full", "full")
    # the timeline WAL is written on now (the last checkpoint's may lag just after a promotion)
    tli = int(pg.query("select case when pg_is_in_recovery() then (select timeline_id from pg_control_checkpoint())"
                       " else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int end")[0][0])
    return backup_incr.choose_base(storage, requested, backup_incr.Server(
        facts.info.system_identifier, facts.info.major, tli, facts.block_size))


# --------------------------------------------------------------------------- restore point

@dataclass(frozen=True)
class RestorePoint:
    name: str
    lsn: int
    wal: str  # segment holding the restore point record
    archived: bool  # waited until that segment reached the archive


def create_restore_point(storage: Storage, pg: PgSession, name: str, wait: bool = True,
                         timeout: float = 300.0) -> RestorePoint:
    """pg_create_restore_point(name); then switch WAL and wait for that segment to be archived, so
    `restore --target-name NAME` works immediately."""
    if not name or len(name.encode()) >= 64:
        raise UsageError(f"restore point name {name!r} must be 1 to 63 bytes long")
    facts = server_facts(pg)
    check_server(storage, facts, "restore-point", want_archive=wait)
    lsn, wal = pg.create_restore_point(name)
    # lets `restore --target-name` start from the newest backup before the point (repo/restore_points.py)
    restore_points.record(storage, restore_points.RestorePointRecord(
        name, walname.format_lsn(lsn), walname.timeline_of(wal),
        dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"), facts.info.system_identifier))
    if not wait:
        return RestorePoint(name, lsn, wal, False)
    closed, _ = pg.switch_wal()
    seg = facts.info.wal_segment_size
    first = walname.segno(wal, seg)
    last = max(first, walname.segno(closed, seg))
    names = [walname.seg_name(walname.timeline_of(wal), n, seg) for n in range(first, last + 1)]
    wait_for_wal(storage, names, timeout, f"restore point {name!r}", archiver_status(pg))
    return RestorePoint(name, lsn, wal, True)
