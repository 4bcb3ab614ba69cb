"""A psycopg 3 session with the server: identity, settings, backup start/stop, WAL switch.

All SQL pitr sends lives here, with the 13/14 vs 15+ differences in one place.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from pitr.errors import PostgresError


@dataclass(frozen=True)
class ServerInfo:
    version_num: int  # 150018
    system_identifier: int
    wal_segment_size: int
    data_directory: str
    in_recovery: bool

    @property
    def major(self) -> int:
        return self.version_num // 10000


@dataclass(frozen=True)
class BackupStop:
    """What pg_backup_stop returns: the stop LSN and the two files a restore must write."""

    lsn: int
    backup_label: str
    tablespace_map: str | None  # None when the cluster has no tablespaces
    time: datetime.datetime


@dataclass(frozen=True)
class ReplayState:
    """A standby's WAL replay as its own functions report it."""

    paused: bool  # paused, or a pause requested (pg_wal_replay_pause)
    receive_lsn: int | None  # last WAL received by streaming; None without a WAL receiver (archive only)
    replay_lsn: int | None  # end of the last record replayed


class PgSession:
    """One connection (autocommit), kept open for the whole operation."""

    def __init__(self, conninfo: str | None, application_name: str = "pitr") -> None:
        import psycopg

        self._psycopg = psycopg
        try:
            self.conn = psycopg.connect(conninfo or "", autocommit=True, application_name=application_name,
                                        connect_timeout=10)
        except psycopg.OperationalError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "connection failed"
            raise PostgresError(
                f"cannot connect to PostgreSQL: {first}",
                "set --dbname CONNINFO or PGHOST/PGPORT/PGUSER, and check the server is running",
            ) from None

    def query(self, sql: str, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql, params)  # type: ignore[arg-type]
                return cur.fetchall() if cur.description else []
        except self._psycopg.Error as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PostgresError(f"PostgreSQL refused a query: {msg}") from None

    def scalar(self, sql: str, params: tuple[Any, ...] | None = None) -> Any:
        rows = self.query(sql, params)
        return rows[0][0] if rows else None

    def info(self) -> ServerInfo:
        row = self.query(
            "select current_setting('server_version_num')::int, (select system_identifier from pg_control_system()),"
            " current_setting('wal_segment_size'), current_setting('data_directory'), pg_is_in_recovery()"
        )[0]
        return ServerInfo(int(row[0]), int(row[1]), _size_setting(row[2]), str(row[3]), bool(row[4]))

    def setting(self, name: str) -> str:
        return str(self.scalar("select current_setting(%s)", (name,)))

    def switch_wal(self) -> tuple[str, int]:
        """Close the current segment (emitting a record first so there is one to close).

        Returns (name of the segment just closed, its end LSN)."""
        rows = self.query(
            "with m as (select pg_logical_emit_message(false, 'pitr', 'switch') as l)"
            " select pg_walfile_name(s), s::text from m, lateral pg_switch_wal() s"
        )
        from pitr.pg.walname import parse_lsn

        return str(rows[0][0]), parse_lsn(str(rows[0][1]))

    # --- non-exclusive base backup (this connection must stay open from start to stop: closing it
    # aborts the backup on the server, which is what an interrupted `pitr backup` relies on)
    def backup_start(self, label: str, fast: bool) -> tuple[int, datetime.datetime]:
        """Start a non-exclusive backup; returns (start LSN, server time)."""
        if self.conn.info.server_version >= 150000:
            sql = "select pg_backup_start(%s, %s)::text, clock_timestamp()"
        else:
            sql = "select pg_start_backup(%s, %s, false)::text, clock_timestamp()"
        lsn, at = self.query(sql, (label, fast))[0]
        from pitr.pg.walname import parse_lsn

        return parse_lsn(str(lsn)), at

    def backup_stop(self) -> BackupStop:
        """Finish the backup without waiting for archiving (pitr waits on its own repository)."""
        if self.conn.info.server_version >= 150000:
            sql = ("select b.lsn::text, b.labelfile, b.spcmapfile, clock_timestamp()"
                   " from pg_backup_stop(wait_for_archive => false) b")
        else:
            sql = ("select b.lsn::text, b.labelfile, b.spcmapfile, clock_timestamp()"
                   " from pg_stop_backup(false, false) b")
        lsn, label, spcmap, at = self.query(sql)[0]
        from pitr.pg.walname import parse_lsn

        return BackupStop(parse_lsn(str(lsn)), str(label), str(spcmap) if spcmap else None, at)

    def replay_state(self) -> ReplayState:
        """Where a standby's replay stands (pg_get_wal_replay_pause_state on 14+)."""
        paused = ("pg_get_wal_replay_pause_state() <> 'not paused'" if self.conn.info.server_version >= 140000
                  else "pg_is_wal_replay_paused()")
        row = self.query(f"select {paused}, pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text")[0]
        from pitr.pg.walname import parse_lsn

        return ReplayState(bool(row[0]), parse_lsn(str(row[1])) if row[1] else None,
                           parse_lsn(str(row[2])) if row[2] else None)

    def recovery_timeline(self) -> int | None:
        """The timeline of a standby's minimum recovery point (pg_control); None once out of recovery."""
        tli = self.scalar("select min_recovery_end_timeline from pg_control_recovery()")
        return int(tli) if tli else None

    def create_restore_point(self, name: str) -> tuple[int, str]:
        """pg_create_restore_point(name): (its LSN, the WAL segment holding it)."""
        lsn, wal = self.query("select l::text, pg_walfile_name(l) from pg_create_restore_point(%s) l", (name,))[0]
        from pitr.pg.walname import parse_lsn

        return parse_lsn(str(lsn)), str(wal)

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001,S110 - closing a broken connection is fine
            pass

    def __enter__(self) -> PgSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _size_setting(value: Any) -> int:
    """wal_segment_size is shown as '16MB' (or bytes on old versions)."""
    s = str(value).strip()
    units = {"kB": 1024, "MB": 1024**2, "GB": 1024**3}
    for u, mult in units.items():
        if s.endswith(u):
            return int(s[: -len(u)]) * mult
    return int(s)
