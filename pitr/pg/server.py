"""Run PostgreSQL on a restored data directory, privately, and watch its recovery (`--replay`).

The server listens on a unix socket in a fresh private directory only (listen_addresses = ''),
logs to a file we name (logging_collector off, messages in English so the log can be read), and
runs as the data directory's owner when pitr runs as root. Its progress is read from two
sources: the server log (always there, whatever pg_hba.conf says) and, when a connection is
possible, SQL (pg_is_in_recovery(), the replay pause state, the last replayed LSN and time).
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pitr.errors import RestoreError

# Server-log lines recovery writes (lc_messages = C). Matched anywhere in a line: the prefix varies.
RE_STOPPING = re.compile(r"LOG:\s+(recovery stopping [^\n]*)")
RE_LAST_XACT = re.compile(r"LOG:\s+last completed transaction was at log time ([^\n]+)")
RE_REDO_DONE = re.compile(r"LOG:\s+redo done at ([0-9A-F]+/[0-9A-F]+)")
RE_NEW_TLI = re.compile(r"LOG:\s+selected new timeline ID: (\d+)")
RE_PROMOTED = re.compile(r"LOG:\s+database system is ready to accept connections")
RE_PAUSED = re.compile(r"LOG:\s+(pausing at the end of recovery|recovery has paused)")
RE_SHUTDOWN_AT_TARGET = re.compile(r"LOG:\s+shutdown at recovery target")
RE_FATAL = re.compile(r"(FATAL|PANIC):\s+([^\n]*)")
RE_NOT_REACHED = re.compile(r"FATAL:\s+(recovery ended before configured recovery target was reached)")


@dataclass
class LogState:
    """What the server log has said so far."""

    stopping: str | None = None
    last_xact_time: str | None = None
    redo_done_lsn: str | None = None
    new_timeline: int | None = None
    promoted: bool = False
    paused: bool = False
    shutdown_at_target: bool = False
    not_reached: str | None = None
    fatal: list[str] = field(default_factory=list)

    def feed(self, text: str) -> None:
        for line in text.splitlines():
            if m := RE_STOPPING.search(line):
                self.stopping = m.group(1).strip()
            elif m := RE_LAST_XACT.search(line):
                self.last_xact_time = m.group(1).strip()
            elif m := RE_REDO_DONE.search(line):
                self.redo_done_lsn = m.group(1)
            elif m := RE_NEW_TLI.search(line):
                self.new_timeline = int(m.group(1))
            elif RE_PROMOTED.search(line):
                self.promoted = True
            elif RE_PAUSED.search(line):
                self.paused = True
            elif RE_SHUTDOWN_AT_TARGET.search(line):
                self.shutdown_at_target = True
            if m := RE_NOT_REACHED.search(line):
                self.not_reached = line.strip()
            if m := RE_FATAL.search(line):
                self.fatal.append(line.strip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateServer:
    """One postmaster on `pgdata`, started by us (we hold its pid), on a private socket dir."""

    def __init__(self, bindir: Path, pgdata: Path, sockdir: Path, logfile: Path, env: Mapping[str, str],
                 owner: tuple[int, int] | None = None, settings: Mapping[str, str] | None = None) -> None:
        self.bindir = bindir
        self.pgdata = pgdata
        self.sockdir = sockdir
        self.logfile = logfile
        self.env = dict(env)
        self.owner = owner
        self.port = free_port()
        self.settings = {
            "listen_addresses": "",
            "unix_socket_directories": str(sockdir),
            "unix_socket_permissions": "0700",
            "port": str(self.port),
            "hot_standby": "on",  # so we can watch recovery over SQL (and 'pause' does not act as shutdown)
            "logging_collector": "off",
            "log_destination": "stderr",
            "lc_messages": "C",
        } | dict(settings or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_pos = 0
        self.log = LogState()

    def start(self) -> None:
        argv = [str(self.bindir / "postgres"), "-D", str(self.pgdata)]
        for k, v in self.settings.items():
            argv += ["-c", f"{k}={v}"]
        kw: dict[str, Any] = {}
        if self.owner is not None and os.geteuid() == 0:
            kw = {"user": self.owner[0], "group": self.owner[1], "extra_groups": []}
            try:
                home = pwd.getpwuid(self.owner[0]).pw_dir
                self.env.setdefault("HOME", home)
                if self.env.get("HOME", "").startswith("/root"):
                    self.env["HOME"] = home
            except KeyError:
                pass
        with open(self.logfile, "ab") as log:
            try:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             env=self.env, cwd=str(self.pgdata), start_new_session=True, **kw)
            except OSError as e:
                raise RestoreError(f"cannot start PostgreSQL from {self.bindir}: {e.strerror}") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def read_log(self) -> LogState:
        """Feed new log text into the state (whole lines only)."""
        try:
            with open(self.logfile, "rb") as f:
                f.seek(self._log_pos)
                chunk = f.read()
        except OSError:
            return self.log
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            self._log_pos += cut + 1
            self.log.feed(chunk[:cut + 1].decode(errors="replace"))
        return self.log

    def log_lines(self, pattern: str | None = None, n: int = 5) -> list[str]:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return []
        if pattern:
            rx = re.compile(pattern)
            lines = [x for x in lines if rx.search(x)]
        return [x.strip() for x in lines[-n:]]

    def query(self, sql: str, users: list[str]) -> tuple[Any, ...] | None:
        """One row over the private socket, or None when we cannot connect/query (yet)."""
        import psycopg

        for user in users:
            try:
                with psycopg.connect(host=str(self.sockdir), port=self.port, user=user, dbname="postgres",
                                     connect_timeout=3, autocommit=True,
                                     application_name="pitr restore --replay") as conn:
                    row = conn.execute(sql).fetchone()  # type: ignore[arg-type]
                    return tuple(row) if row is not None else None
            except psycopg.Error:
                continue
        return None

    def stop(self, timeout: float = 300) -> int | None:
        """Fast shutdown (SIGINT, like pg_ctl stop -m fast); immediate, then kill, if it hangs."""
        if self.proc is None:
            return None
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 30.0), (signal.SIGKILL, 30.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.poll()


def sleep_until(deadline: float | None, step: float = 0.2) -> bool:
    """Sleep one step; False when the deadline passed."""
    if deadline is not None and time.monotonic() > deadline:
        return False
    time.sleep(step)
    return True
