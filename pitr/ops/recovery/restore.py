"""`pitr restore`: rebuild a data directory from a base backup and configure (or run) recovery.

The recipe, in order (docs/restore.md):
  1. plan      read the repo (manifests, one WAL listing, timeline histories) and choose the
               backup (restore_plan); every refusal about the target or the WAL happens here
  2. check     the destination (restore_dest): not a running server's, empty unless --delta,
               writable, an owner that is not root, enough free space
  3. mark      write `pitr-restore.incomplete` first (with --delta, remove pg_control too), so an
               interrupted restore never looks complete or startable
     stage     with --replay (prefetch > 0): the WAL stage, its helper started now, as the server's
               user, so the first segments are staged while the files are written (ops/wal/stage.py)
  4. files     --jobs workers fetch, verify and write every file (restore_files)
  5. finish    backup_label, tablespace_map, recovery settings + recovery.signal, syncfs, then
               global/pg_control LAST; remove the marker
  6. replay    with --replay, run PostgreSQL until it reaches the target (restore_replay)
run_restore reads as that list, one function per step sharing one _Job: _plan, _check, then _write
(_mark, _start_stage, _write_files, _configure, _write_control), _replay.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pitr.errors import IntegrityError, RestoreError
from pitr.ops.recovery import db_include
from pitr.ops.recovery.restore_dest import (
    MARKER,
    ROOT_SKIP,
    Layout,
    check_destination,
    clean_for_delta,
    fsync_dir,
    prepare_tree,
    render_tablespace_map,
    root_mode,
    tablespace_locations,
    write_marker,
    write_small,
)
from pitr.ops.recovery.restore_files import FileStats, Item, sync_filesystems, write_files
from pitr.ops.recovery.restore_plan import Plan, Target, make_plan, resolve_name
from pitr.ops.recovery.restore_replay import ReplayResult, ReplaySpec, StageHelper, replay, start_stage_helper
from pitr.ops.wal import stage
from pitr.pg import walname
from pitr.pg.layout import CONTROL_FILE
from pitr.pg.recovery import render_restore_command, restore_command_env, restore_command_globals, write_recovery
from pitr.repo import restore_points
from pitr.repo.catalog import WalCatalog, read_history, scan_wal
from pitr.repo.manifest import FileEntry, Manifest, read_manifests
from pitr.repo.meta import RepoMeta, read_meta
from pitr.storage.base import Storage

log = logging.getLogger("pitr.restore")
__all__ = ["MARKER", "RestoreOptions", "RestoreResult", "load_plan", "recovery_settings", "run_restore"]


@dataclass(frozen=True)
class RestoreOptions:
    pgdata: Path
    target: Target
    timeline: str = "latest"  # latest | current | N
    backup_id: str | None = None
    action: str = "promote"
    jobs: int = 2
    delta: bool = False
    dry_run: bool = False
    archive_mode: str = "preserve"  # preserve | off
    tablespace_map: Mapping[str, Path] = field(default_factory=dict)  # oid -> new location
    pitr_argv: Sequence[str] = ("pitr",)  # how PostgreSQL calls this pitr (absolute path)
    repo_url: str | None = None  # the repo settings restore_command repeats (no secrets)
    s3_endpoint: str | None = None
    config_path: str | None = None
    replay: bool = False
    replay_timeout: float | None = None
    pg_bin: str | None = None
    server_env: Mapping[str, str] = field(default_factory=dict)
    prefetch: int | None = None  # written into restore_command (None: left to the server's settings)
    db_include: tuple[str, ...] = ()  # restore only these databases (+ the system ones): ops/recovery/db_include
    repo_as_of: str | None = None  # --repo-as-of in UTC ISO form, repeated in restore_command


@dataclass
class RestoreResult:
    plan: Plan
    pgdata: Path
    dry_run: bool
    files: FileStats | None = None
    recovery_settings: dict[str, str] = field(default_factory=dict)
    replay: ReplayResult | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {"pgdata": str(self.pgdata), "dry_run": self.dry_run} | self.plan.to_json()
        if self.files is not None:
            f = self.files
            d["files"] = {"written": f.files_written, "bytes_written": f.bytes_written, "kept": f.files_kept,
                          "bytes_kept": f.bytes_kept, "removed": f.removed, "stored_bytes_read": f.stored_bytes_read,
                          "seconds": round(f.seconds, 3),
                          "mib_per_second": round(_mibps(f.bytes_written + f.bytes_kept, f.seconds), 1),
                          "bad_page_files": f.bad_page_files}
        if self.recovery_settings:
            d["recovery_settings"] = self.recovery_settings
        d["replay"] = self.replay.to_json() if self.replay else None
        d["seconds"] = round(self.seconds, 3)
        d["notes"] = self.plan.notes + self.notes
        return d


def _mibps(n: int, secs: float) -> float:
    return n / (1 << 20) / secs if secs > 0 else 0.0


def load_plan(storage: Storage, opts: RestoreOptions) -> tuple[Plan, RepoMeta]:
    """Read what planning needs (metadata, manifests, one WAL listing, history files) and plan."""
    meta = read_meta(storage)
    readable, unreadable = read_manifests(storage)
    if opts.backup_id in unreadable:
        raise unreadable[opts.backup_id]  # the backup asked for is unusable: say why, not "does not exist"
    for bid, err in unreadable.items():
        log.warning("skipping backup %s: %s", bid, err)  # one bad manifest must not block the others
    manifests = [m for m in readable if m.system_identifier == meta.system_identifier]
    catalog = scan_wal(storage, meta.wal_segment_size)
    histories = _histories(storage, catalog)
    target = opts.target
    if target.kind == "name" and target.name is not None:
        rp = restore_points.lookup(storage, target.name)
        if rp is not None and rp.system_identifier == meta.system_identifier:
            target = resolve_name(target, walname.parse_lsn(rp.lsn))
    plan = make_plan(manifests, catalog, histories, target, opts.timeline, opts.backup_id, unreadable)
    for why in plan.skipped:
        log.warning("%s", why)
    return plan, meta


def _histories(storage: Storage, catalog: WalCatalog) -> dict[int, list[walname.HistoryEntry]]:
    out = {}
    for tli in catalog.history_files:
        try:
            out[tli] = read_history(storage, tli)
        except ValueError as e:
            raise IntegrityError(f"the archived history file of timeline {tli} is malformed: {e}") from None
    return out


def recovery_settings(plan: Plan, opts: RestoreOptions, stage_token: str | None = None) -> dict[str, str]:
    s = {"restore_command": render_restore_command(opts.pitr_argv, opts.repo_url, opts.s3_endpoint,
                                                   opts.config_path, opts.prefetch, opts.repo_as_of, stage_token)}
    s |= plan.target.settings()
    if plan.target.kind != "latest":
        s["recovery_target_action"] = opts.action
    s["recovery_target_timeline"] = plan.timeline_spec
    if opts.archive_mode == "off":
        s["archive_mode"] = "off"
    return s


@dataclass
class _Job:
    """What the steps of one restore share."""

    storage: Storage
    opts: RestoreOptions
    plan: Plan
    layout: Layout
    token: str | None  # the WAL stage of a prefetching recovery (ops/wal/stage.py), else None
    settings: dict[str, str]  # the recovery settings written (restore_command, target, timeline, ...)
    progress: Callable[[int, int], None] | None
    phase: Callable[[str], None]
    owner: tuple[int, int] | None = None  # who the written files belong to (check_destination)
    left_out: dict[int, str] = field(default_factory=dict)  # --db-include: {oid: name} not restored
    t_files: float = 0.0  # when the file writing began (FileStats.seconds counts from here)
    helper: StageHelper | None = None  # --replay: the stage's helper, started before the files are written

    @property
    def m(self) -> Manifest:
        return self.plan.backup

    @property
    def notes(self) -> list[str]:
        return [f"--db-include: databases left out (unusable; drop them after the restore): "
                f"{', '.join(sorted(self.left_out.values()))}"] if self.left_out else []


def run_restore(storage: Storage, opts: RestoreOptions, progress: Callable[[int, int], None] | None = None,
                on_phase: Callable[[str], None] | None = None) -> RestoreResult:
    """Plan, check, write, configure recovery and (with replay) run it. Nothing is touched on refusal."""
    t0 = time.monotonic()
    job = _plan(storage, opts, progress, on_phase or (lambda _msg: None))
    _check(job)
    if opts.dry_run:
        return RestoreResult(job.plan, job.layout.pgdata, True, recovery_settings=job.settings,
                             seconds=time.monotonic() - t0, notes=job.notes)
    stats = _write(job)
    result = RestoreResult(job.plan, job.layout.pgdata, False, stats, job.settings, notes=job.notes)
    log.info("restored %d files (%d kept) in %.1fs", stats.files_written, stats.files_kept, stats.seconds)
    if opts.replay:
        result.replay = _replay(job)
    result.seconds = time.monotonic() - t0
    return result


def _plan(storage: Storage, opts: RestoreOptions, progress: Callable[[int, int], None] | None,
          phase: Callable[[str], None]) -> _Job:
    """Step 1: the backup and the WAL to replay (restore_plan), where its files go, the recovery settings."""
    plan, _meta = load_plan(storage, opts)
    layout = Layout(opts.pgdata.absolute(), tablespace_locations(plan.backup, opts.tablespace_map))
    # prefetching recoveries stage verified WAL for a shell one-liner (ops/wal/stage.py); a new stage each restore
    token = stage.new_token() if (opts.prefetch or 0) > 0 else None
    return _Job(storage, opts, plan, layout, token, recovery_settings(plan, opts, token), progress, phase)


def _check(job: _Job) -> None:
    """Step 2, read-only (a dry run refuses alike): the destination, and the databases --db-include names."""
    job.owner = check_destination(job.opts.pgdata, job.opts.delta, job.m, job.layout)
    job.left_out = db_include.excluded(job.m, job.opts.db_include) if job.opts.db_include else {}


def _write(job: _Job) -> FileStats:
    """Steps 3-5: mark, (with --replay) start the stage's helper, write every file, finish with pg_control last."""
    try:
        removed = _mark(job)
        _start_stage(job)
        stats = _write_files(job, removed)
        _configure(job)
        _write_control(job, stats)
    except BaseException as e:
        _stop_stage(job)  # a failed restore leaves no helper behind
        if not isinstance(e, OSError):
            raise
        # disk full, I/O error, permissions changed under us: the environment, not a bug
        where = f" ({e.filename})" if e.filename else ""
        raise RestoreError(f"the restore into {job.layout.pgdata} failed: {e.strerror or e}{where}",
                           "fix the cause and restore again (with --delta to keep what was written); until then "
                           f"the directory is marked incomplete ({MARKER}) and has no pg_control") from e
    return stats


def _mark(job: _Job) -> int:
    """Step 3: the marker first (with --delta, pg_control goes too), then the directory tree; the
    number of files --delta removed."""
    m, layout = job.m, job.layout
    data_mode = root_mode(m)
    dir_mode = 0o750 if data_mode & 0o050 else 0o700
    job.phase(f"restoring backup {m.id} into {layout.pgdata}")
    write_marker(layout.pgdata, m, job.owner, data_mode)
    removed = 0
    if job.opts.delta:
        (layout.pgdata / CONTROL_FILE).unlink(missing_ok=True)  # never startable while half-updated
        removed = clean_for_delta(m, layout)
    prepare_tree(m, layout, job.owner, dir_mode)
    return removed


def _start_stage(job: _Job) -> None:
    """Step 3b (--replay with prefetch): the stage, and its helper started now, as the server's user: it
    boots and stages the first segments while the files are written, so PostgreSQL's first requests
    find them (ops/wal/stage.py). It reads the repository only, and nothing in the data directory
    but its stage; it does not go idle while this restore runs (stage.starter_alive)."""
    if not (job.token and job.opts.replay):
        return
    pgdata = job.layout.pgdata
    stage.prepare(pgdata, job.token, job.owner)  # earlier stages go: never served to this recovery
    h = _stage_helper(job)
    job.helper = dataclasses.replace(h, running=start_stage_helper(h, job.opts.server_env, pgdata, job.owner))


def _stage_helper(job: _Job) -> StageHelper:
    """How restore_command would start the stage's helper: pitr, its global options and assignments."""
    opts = job.opts
    assert job.token is not None
    return StageHelper(job.token, [*opts.pitr_argv, *restore_command_globals(opts.repo_url, opts.s3_endpoint,
                                                                             opts.config_path)],
                       restore_command_env(opts.prefetch, opts.repo_as_of, job.token), job.plan.wal_first)


def _write_files(job: _Job, removed: int) -> FileStats:
    """Step 4: every file but pg_control by --jobs workers (--db-include: the left-out databases sparse)."""
    m, layout, owner, left_out = job.m, job.layout, job.owner, job.left_out
    files, zeroed = db_include.split(m.files, dict(left_out)) if left_out else (m.files, [])
    items = [Item(f, layout.dest(f.path)) for f in files
             if f.path != CONTROL_FILE and not ("/" not in f.path and f.path in ROOT_SKIP)]
    _control_entry(m)  # refused before any file is written
    job.t_files = time.monotonic()
    stats = write_files(job.storage, m, items, job.opts.jobs, owner, job.opts.delta, job.progress, fsync=False)
    stats.removed = removed
    if left_out:
        db_include.write_sparse([(f, layout.dest(f.path)) for f in zeroed], owner)
        write_small(layout.pgdata / db_include.NOTE_FILE, db_include.note_text(dict(left_out)).encode(), owner,
                    0o600)
    return stats


def _configure(job: _Job) -> None:
    """Step 5a: backup_label, tablespace_map and the recovery settings; then everything durable."""
    pgdata, owner = job.layout.pgdata, job.owner
    job.phase("writing backup_label, tablespace_map and recovery settings")
    write_small(pgdata / "backup_label", job.m.backup_label.encode(), owner, 0o600)
    tsmap = render_tablespace_map(job.m, job.layout.tablespaces)
    if tsmap:
        write_small(pgdata / "tablespace_map", tsmap.encode(), owner, 0o600)
    else:
        (pgdata / "tablespace_map").unlink(missing_ok=True)
    for name in ("recovery.conf", "postmaster.pid", "postmaster.opts"):
        (pgdata / name).unlink(missing_ok=True)
    if job.helper is None:  # else _start_stage prepared it, and its helper is filling it
        stage.prepare(pgdata, job.token, owner)  # earlier stages go: never served to this recovery
    write_recovery(pgdata, job.settings, owner)
    sync_filesystems(job.layout.roots())  # every file and directory entry durable before pg_control


def _write_control(job: _Job, stats: FileStats) -> None:
    """Step 5b: pg_control LAST (until it exists PostgreSQL refuses to start on the directory), then
    the marker goes."""
    pgdata = job.layout.pgdata
    cstats = write_files(job.storage, job.m, [Item(_control_entry(job.m), pgdata / CONTROL_FILE)], 1, job.owner,
                         False)
    stats.add(cstats)
    stats.seconds = time.monotonic() - job.t_files  # files, flushed to disk, pg_control included
    fsync_dir(pgdata / "global")
    (pgdata / MARKER).unlink()
    fsync_dir(pgdata)


def _control_entry(m: Manifest) -> FileEntry:
    control = next((f for f in m.files if f.path == CONTROL_FILE), None)
    if control is None:
        raise IntegrityError(f"backup {m.id} has no global/pg_control in its manifest")
    return control


def _replay(job: _Job) -> ReplayResult:
    """Step 6 (--replay): run PostgreSQL on the directory until it reaches the target."""
    opts, plan = job.opts, job.plan
    job.phase("starting PostgreSQL to replay WAL to the target")
    # the stage's helper (started with the file writing) runs before PostgreSQL asks for its first segment
    helper = job.helper or (_stage_helper(job) if job.token else None)
    try:
        return replay(job.storage, plan, job.layout.pgdata, job.owner, ReplaySpec(
            opts.action, opts.archive_mode, opts.replay_timeout, opts.pg_bin, opts.server_env, helper))
    except BaseException:
        _stop_stage(job)  # replay stops it once the server ran; not when refusing to start one (no binaries)
        raise


def _stop_stage(job: _Job) -> None:
    """Stop the helper _start_stage started (on a failure: never hiding the error being raised)."""
    if job.helper is not None:
        try:
            stage.stop(stage.stage_dir(job.layout.pgdata / "pg_wal", job.helper.token), proc=job.helper.running)
        except OSError as e:
            log.warning("could not stop the stage's helper: %s", e)
