"""`pitr backup` of a hot standby: the checks, the stop and the archive wait that differ from a primary's.

backup.take_backup runs the same recipe on a standby (non-exclusive pg_backup_start/stop on the standby's
own session, PGDATA copied with pg_control last) and calls in here where a standby differs:
  - check        the standby replays the repository's cluster (system identifier), its replay is not
                 paused, and not stuck (received WAL waiting while the replayed LSN stands still)
  - stop         pg_backup_stop raises on a standby promoted since pg_backup_start: that becomes one
                 BackupError; a standby that moved to another timeline meanwhile (it followed a promoted
                 upstream) fails too, since a manifest names one timeline
  - archive      a standby cannot switch WAL (pg_switch_wal is refused in recovery) and pitr asks the
                 primary nothing: the backup's last segment reaches the archive when the PRIMARY
                 finishes it (full, its archive_timeout, or any switch there), and the wait says so
The manifest carries extra.from_standby = true (informational; a restore treats it like any backup:
PostgreSQL itself reads "BACKUP FROM: standby" in the backup_label).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from pitr.errors import BackupError, ForeignClusterError, PitrError, PostgresError
from pitr.pg import walname
from pitr.pg.conn import BackupStop, PgSession, ServerInfo
from pitr.repo.meta import read_meta
from pitr.storage.base import Storage

log = logging.getLogger("pitr.backup")

# how long replay may stand still while received WAL waits before the standby counts as stuck: above
# max_standby_streaming_delay's default (30 s), so a query conflict PostgreSQL resolves itself is not "stuck"
STALL_TIMEOUT = 60.0

PAUSED_HINT = "resume replay with `select pg_wal_replay_resume()` on the standby, or back up the primary"


def check_standby(storage: Storage, pg: PgSession, info: ServerInfo, stall_timeout: float = STALL_TIMEOUT,
                  sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
    """Refuse a standby whose backup would not belong to the repository or would not be current."""
    meta = read_meta(storage)
    if meta.system_identifier != info.system_identifier:
        raise ForeignClusterError(
            f"the standby replays the cluster with system identifier {info.system_identifier}, but the repository "
            f"{storage.display} holds the cluster {meta.system_identifier}",
            "back up a standby of the repository's cluster, or point --repo at this cluster's repository")
    check_replay(pg, stall_timeout, sleep, clock)


def check_replay(pg: PgSession, stall_timeout: float, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
    """Replay is running: not paused, and advancing whenever it has received WAL it has not replayed."""
    st = pg.replay_state()
    first = st.replay_lsn
    deadline = clock() + stall_timeout
    delay = 0.1
    while True:
        if st.paused:
            raise BackupError("WAL replay on the standby is paused (pg_wal_replay_pause), so its backup would "
                              "copy a standing-still cluster", PAUSED_HINT)
        behind = st.receive_lsn is not None and st.replay_lsn is not None and st.replay_lsn < st.receive_lsn
        if not behind or (first is not None and st.replay_lsn is not None and st.replay_lsn > first):
            return  # caught up (or replaying from the archive only), or moving
        if clock() >= deadline:
            assert st.replay_lsn is not None and st.receive_lsn is not None
            raise BackupError(
                f"WAL replay on the standby is stuck at {walname.format_lsn(st.replay_lsn)} while it has received "
                f"WAL up to {walname.format_lsn(st.receive_lsn)} (no progress in {stall_timeout:g}s)",
                "the standby's log says why (a query conflict with max_standby_streaming_delay = -1, a lock, "
                "an error); fix it, or raise standby_stall_timeout")
        sleep(delay)
        delay = min(1.0, delay * 1.5)
        st = pg.replay_state()


def stop_backup(pg: PgSession, backup_id: str) -> BackupStop:
    """pg_backup_stop on the standby; a promotion or timeline change since the start is one BackupError."""
    try:
        stop = pg.backup_stop()
    except PostgresError as e:
        if "promoted" in str(e):
            raise BackupError(f"backup {backup_id} failed: the standby was promoted while it was being copied, so "
                              "the copy is not a consistent backup and nothing was listed",
                              "back up the new primary (or a standby of it)") from None
        raise BackupError(f"backup {backup_id} failed on the standby: {e}", e.hint) from None
    start_tli = label_timeline(stop.backup_label)
    try:
        stop_tli = pg.recovery_timeline()
    except PitrError:
        stop_tli = None
    if start_tli is not None and stop_tli is not None and stop_tli != start_tli:
        raise BackupError(f"backup {backup_id} failed: the standby moved from timeline {start_tli} to {stop_tli} "
                          "while it was being copied (its upstream was promoted); nothing was listed",
                          "take the backup again: it will be on the new timeline")
    return stop


def label_timeline(label: str) -> int | None:
    m = re.search(r"^START TIMELINE: (\d+)", label, re.M)
    return int(m.group(1)) if m else None


def archive_status(pg: PgSession) -> Callable[[], str | None]:
    """What the WAL-wait timeout says on a standby: who archives the missing segment, and when."""
    def status() -> str | None:
        try:
            mode = pg.setting("archive_mode")
            st = pg.replay_state()
        except PitrError:
            return None
        at = walname.format_lsn(st.replay_lsn) if st.replay_lsn is not None else "?"
        who = ("this standby archives it too (archive_mode = always) once it has received the whole segment"
               if mode == "always" else "the primary archives it")
        return (f"the standby has replayed up to {at}; {who} when the primary finishes that segment: when it is "
                "full, at the primary's archive_timeout, or at a WAL switch there (a standby cannot switch WAL)")
    return status
