"""`restore --replay`: run PostgreSQL on the restored directory until recovery reaches the target.

The server runs privately (pitr.pg.server), with the cluster's own archive settings and our
environment, so restore_command and archive_command reach the repository. We wait for the state
the target action asks for -- promoted, paused at the target, or shut down at the target -- then
stop it cleanly and report the point reached. Recovery that ends short of the target (missing WAL,
a hard wal-fetch failure) is an error that quotes the server log line; the server is stopped
either way.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pitr.errors import RestoreError
from pitr.ops.recovery.restore_dest import MARKER
from pitr.ops.recovery.restore_plan import Plan
from pitr.ops.wal import spool, stage
from pitr.pg import walname
from pitr.pg.server import PrivateServer
from pitr.repo.format import wal_key
from pitr.storage.base import Storage


@dataclass
class ReplayResult:
    reached: bool
    action: str
    stop_reason: str | None  # "recovery stopping before commit of transaction 745, time ..."
    last_xact_time: str | None
    last_lsn: str | None
    new_timeline: int | None
    log_file: str
    seconds: float
    history_archived: bool | None = None
    notes: list[str] = field(default_factory=list)
    stage: tuple[int, int, int] | None = None  # (segments from the stage, through wal-fetch, asked in the shell)

    def to_json(self) -> dict[str, object]:
        return {"reached": self.reached, "action": self.action, "stop_reason": self.stop_reason,
                "last_transaction_time": self.last_xact_time, "last_replayed_lsn": self.last_lsn,
                "new_timeline": self.new_timeline, "server_log": self.log_file, "seconds": round(self.seconds, 3),
                "history_archived": self.history_archived, "notes": self.notes,
                "restore_command": None if self.stage is None else {
                    "from_stage": self.stage[0], "through_wal_fetch": self.stage[1],
                    "answered_in_shell": self.stage[2]}}


@dataclass(frozen=True)
class StageHelper:
    """How to start the stage's prefetcher the way restore_command would (ops/wal/stage.py)."""

    token: str
    argv: Sequence[str]  # pitr and its global options, as in restore_command
    env: Mapping[str, str]  # restore_command's assignments (PITR_PREFETCH, PITR_STAGE, ...)
    first: str  # the first segment recovery reads
    running: subprocess.Popen[bytes] | None = None  # started already, while restore wrote the files


@dataclass(frozen=True)
class ReplaySpec:
    action: str  # promote | pause | shutdown
    archive_mode: str  # preserve | off
    timeout: float | None
    pg_bin: str | None
    env: Mapping[str, str]
    stage: StageHelper | None = None


def start_stage_helper(helper: StageHelper, env: Mapping[str, str], pgdata: Path,
                       owner: tuple[int, int] | None) -> subprocess.Popen[bytes]:
    """Start the stage's prefetcher as restore_command would start it (env: the server's)."""
    return stage.start_helper(helper.argv, {**env, **helper.env}, stage.stage_dir(pgdata / "pg_wal", helper.token),
                              pgdata, owner, helper.first)


def server_settings(pg_version: int) -> dict[str, str]:
    """Settings for the replay run only (not written to the cluster's configuration)."""
    import sys

    # PostgreSQL 15+ reads ahead the blocks WAL records touch; 'on' needs posix_fadvise (Linux has it),
    # and older servers refuse the unknown setting at start
    return {"recovery_prefetch": "on"} if pg_version >= 15 and sys.platform.startswith("linux") else {}


def replay(storage: Storage, plan: Plan, pgdata: Path, owner: tuple[int, int] | None,
           opts: ReplaySpec) -> ReplayResult:
    """Run PostgreSQL on the restored dir until it reaches the target; stop it cleanly either way."""
    from pitr.pg.binaries import find_pg_bin
    from pitr.pg.server import sleep_until

    if (pgdata / MARKER).exists():
        raise RestoreError(f"{pgdata} holds an incomplete restore ({MARKER}); refusing to start PostgreSQL on it")
    bindir = find_pg_bin(plan.backup.pg_version, opts.pg_bin, opts.env.get("PATH"))
    sockdir = Path(tempfile.mkdtemp(prefix="pitr-replay-", dir="/tmp"))
    os.chmod(sockdir, 0o700)
    if owner:
        os.chown(sockdir, *owner)
    logfile = _replay_log_path(pgdata, owner)
    srv = PrivateServer(bindir, pgdata, sockdir, logfile, opts.env, owner, server_settings(plan.backup.pg_version))
    action = "promote" if plan.target.kind == "latest" else opts.action
    deadline = None if not opts.timeout else time.monotonic() + opts.timeout
    users = sql_users(owner)
    started = time.monotonic()
    reached = False
    point: tuple[object, ...] | None = None
    timed_out = False
    sdir = stage.stage_dir(pgdata / "pg_wal", opts.stage.token) if opts.stage else None
    proc = opts.stage.running if opts.stage else None
    try:
        if opts.stage and sdir:
            if proc is None or (proc.poll() is not None and spool.helper_state(sdir, spool.PREFETCHD) is None):
                proc = start_stage_helper(opts.stage, opts.env, pgdata, owner)  # not started, or gone
            stage.wait_started(sdir, proc=proc)  # else the first wal-fetch starts one: slower, as safe
        srv.start()
        while True:
            st = srv.read_log()
            if not srv.alive():
                srv.read_log()
                reached = action == "shutdown" and st.shutdown_at_target
                break
            reached = (st.promoted if action == "promote"
                       else action == "pause" and (st.paused or _paused(srv, users)))
            if reached:
                point = srv.query("select pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()::text",
                                  users)
                break
            if not sleep_until(deadline):
                timed_out = True
                break
    finally:
        srv.stop()
        if sdir:
            stage.stop(sdir, proc=proc)  # it stops by itself at the end of recovery; not when paused at the target
        shutil.rmtree(sockdir, ignore_errors=True)
    st = srv.read_log()
    last_lsn = (str(point[0]) if point and point[0] else None) or st.redo_done_lsn
    last_time = (str(point[1]) if point and point[1] else None) or st.last_xact_time
    res = ReplayResult(reached, action, st.stopping, last_time, last_lsn, st.new_timeline, str(logfile),
                       time.monotonic() - started, stage=stage.counts(sdir) if sdir else None)
    if reached and plan.target.kind not in ("latest",) and st.stopping is None and action == "promote":
        reached = res.reached = False  # PostgreSQL < 14 promotes at the end of WAL short of the target
    if not reached:
        if timed_out:
            why = f"recovery did not reach the target within {opts.timeout:.0f}s"
        elif st.not_reached:
            why = "recovery ended before reaching the target (WAL is missing)"
        elif action == "promote" and plan.target.kind != "latest" and st.promoted:
            why = "recovery reached the end of the archived WAL without reaching the target"
        else:
            why = f"PostgreSQL stopped during recovery (exit code {srv.exit_code})"
        line = st.not_reached or (st.fatal[-1] if st.fatal else "")
        raise RestoreError(f"{why}{': ' + line if line else ''}; the server was stopped",
                           f"the server log is {logfile}; the data directory holds the restored backup with "
                           "recovery settings (restore again with --delta after fixing the cause)")
    if res.new_timeline and opts.archive_mode != "off":
        try:
            res.history_archived = storage.stat(wal_key(walname.history_name(res.new_timeline))) is not None
        except Exception:  # noqa: BLE001 - a report detail, not a reason to fail a finished restore
            res.history_archived = None
        if res.history_archived is False:
            res.notes.append(f"timeline {res.new_timeline}'s history file has not reached the archive yet; "
                             "check archive_command: it is archived when the server next runs")
    return res


def _paused(srv: PrivateServer, users: list[str]) -> bool:
    row = srv.query("select case when current_setting('server_version_num')::int >= 140000 "
                    "then pg_get_wal_replay_pause_state() = 'paused' else pg_is_wal_replay_paused() end", users)
    return bool(row and row[0])


def sql_users(owner: tuple[int, int] | None) -> list[str]:
    """Roles to try on a restored cluster's private socket: the files' owner, this user, postgres."""
    import pwd

    names = []
    for uid in ([owner[0]] if owner else []) + [os.geteuid()]:
        try:
            names.append(pwd.getpwuid(uid).pw_name)
        except KeyError:
            pass
    names.append("postgres")
    return list(dict.fromkeys(n for n in names if n != "root"))


def _replay_log_path(pgdata: Path, owner: tuple[int, int] | None) -> Path:
    """<parent>/pitr-replay-<dirname>.log when the parent is writable, else a temp file."""
    candidate = pgdata.parent / f"pitr-replay-{pgdata.name}.log"
    try:
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        if owner:
            os.chown(candidate, *owner)
        return candidate
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    fd, name = tempfile.mkstemp(prefix=f"pitr-replay-{pgdata.name}-", suffix=".log")
    os.close(fd)
    return Path(name)
