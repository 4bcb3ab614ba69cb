"""`pitr drill`: prove the repository restores, and record the proof in it (drills/<id>.json).

The recipe (docs/drill.md):
  1. place     a new private work directory under the system temp dir (or --pgdata, new or empty)
  2. restore   `restore --replay` machinery with archiving off (tablespaces relocated into the
               private directory): files, then PostgreSQL on a private socket until the target
               is reached and the server promoted
  3. serve     start the promoted copy again on a private socket, no TCP, trusting only that
               socket (its own pg_hba.conf), and wait until it accepts connections: the RTO
  4. amcheck   `pg_amcheck --all` of the backup's major version (heap and btree); a missing
               binary is reported as skipped, never silently; one running past its bound
               (--amcheck-timeout, default from the bytes restored) is killed and fails the step
  5. checks    each SQL check: at least one row, and the first column true in every row
  6. clean     stop the server and remove what the drill created (unless --keep), also on
               failure and interrupt (try/finally); then write the record, passed or failed
An interrupted drill records nothing: it proved nothing either way.
"""

from __future__ import annotations

import logging
import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pitr import __version__
from pitr.errors import PitrError, UsageError
from pitr.ops.recovery.restore import RestoreOptions, RestoreResult, load_plan, run_restore
from pitr.ops.recovery.restore_plan import Target, format_time, parse_iso
from pitr.ops.wal import spool
from pitr.pg.server import PrivateServer, sleep_until
from pitr.repo import drills
from pitr.storage.base import Storage

log = logging.getLogger("pitr.drill")
RECORD_VERSION = drills.RECORD_VERSION
READY_TIMEOUT = 300.0  # seconds for the promoted copy to accept connections again
AMCHECK_MIN_SECONDS = 600.0  # pg_amcheck's default bound: this, plus a second per AMCHECK_RATE bytes restored
AMCHECK_RATE = 8 << 20  # bytes a second: far below what a single-threaded heap and btree check manages


@dataclass(frozen=True)
class DrillOptions:
    target: Target
    backup_id: str | None = None
    checks: Sequence[str] = ()
    check_db: str = "postgres"
    amcheck: bool = True
    pgdata: Path | None = None
    keep: bool = False
    random_target: bool = False
    jobs: int = 2
    pitr_argv: Sequence[str] = ("pitr",)
    repo_url: str | None = None
    s3_endpoint: str | None = None
    config_path: str | None = None
    pg_bin: str | None = None
    server_env: Mapping[str, str] = field(default_factory=dict)
    prefetch: int | None = None
    timeout: float | None = None  # replay timeout (seconds)
    amcheck_timeout: float | None = None  # seconds pg_amcheck may run (None: amcheck_bound of the bytes restored)
    repo_as_of: str | None = None  # --repo-as-of (UTC ISO): a read-only view of the past; the record is not stored


@dataclass
class Step:
    name: str  # restore | serve | amcheck | check
    passed: bool | None  # None: skipped (and said why)
    message: str
    seconds: float = 0.0
    sql: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "passed": self.passed, "message": self.message,
                             "seconds": round(self.seconds, 3)}
        if self.sql is not None:
            d["sql"] = self.sql
        return d


@dataclass
class DrillResult:
    record: dict[str, Any]
    key: str | None = None  # where it was stored (None when storing failed)
    store_error: str | None = None

    @property
    def passed(self) -> bool:
        return bool(self.record.get("passed"))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- --check-file

def split_statements(text: str) -> list[str]:
    """SQL text -> statements at top-level ';' (quotes, dollar quotes and comments respected)."""
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "-" and text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
            buf.append("\n")
            continue
        if c == "/" and text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            buf.append(" ")
            continue
        if c in ("'", '"'):
            j = i + 1
            while j < n:
                if text[j] == c:
                    if j + 1 < n and text[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            buf.append(text[i:j + 1])
            i = j + 1
            continue
        if c == "$":
            end = text.find("$", i + 1)
            tag = text[i:end + 1] if end > 0 else ""
            if tag and (len(tag) == 2 or tag[1:-1].replace("_", "a").isalnum()) and not tag[1].isdigit():
                j = text.find(tag, end + 1)
                j = n if j < 0 else j + len(tag)
                buf.append(text[i:j])
                i = j
                continue
        if c == ";":
            stmt = "".join(buf).strip()
            if stmt:
                out.append(stmt)
            buf = []
            i += 1
            continue
        buf.append(c)
        i += 1
    stmt = "".join(buf).strip()
    if stmt:
        out.append(stmt)
    return out


# --------------------------------------------------------------------------- random target

def random_target(storage: Storage, rng: random.Random | None = None) -> tuple[Target, str]:
    """A time target drawn uniformly from the oldest usable backup's end to the newest one's end.

    The window's tail after the newest backup is left to the default drill (the end of the
    archive): a time after the last commit in the archive cannot be reached, and PostgreSQL
    refuses to promote short of a time target, so the draw stops where a backup proves WAL exists.
    """
    from pitr.ops.admin.info import gather

    report = gather(storage)
    ends = sorted(parse_iso(b.manifest.stop_time) for b in report.backups
                  if b.status == "ok" and b.manifest is not None)
    if not ends:
        raise PitrError("the repository holds no backup with all its WAL archived: nothing to drill",
                        "take a backup with `pitr backup` and check archiving with `pitr check`")
    lo, hi = ends[0], ends[-1]
    if hi <= lo:
        return Target("latest"), "one usable backup only: the drill replays to the end of the archive"
    r = rng or random.SystemRandom()
    t = lo + (hi - lo) * r.random()
    return Target("time", time=t, given=format_time(t)), \
        f"random time between {format_time(lo)} and {format_time(hi)}"


# --------------------------------------------------------------------------- the drill

class _Place:
    """Where the drill works: a private dir (socket, hba, logs) and the data directory."""

    def __init__(self, pgdata: Path | None) -> None:
        self.owner = _owner_for(pgdata)
        self.work = Path(tempfile.mkdtemp(prefix="pitr-drill-"))
        self.pgdata = self.work / "data"
        self.created_pgdata = False
        try:
            self._make(pgdata)
        except BaseException:
            self.remove()
            raise

    def _make(self, pgdata: Path | None) -> None:
        os.chmod(self.work, 0o700)
        if self.owner:
            os.chown(self.work, *self.owner)
        if pgdata is not None:
            self.pgdata = pgdata.absolute()
            if not self.pgdata.exists():
                self.pgdata.mkdir(mode=0o700, parents=False)
                self.created_pgdata = True
                if self.owner:
                    os.chown(self.pgdata, *self.owner)
        self.run = self.work / "run"
        self.run.mkdir(mode=0o700)
        if self.owner:
            os.chown(self.run, *self.owner)

    @property
    def replay_log(self) -> Path:  # where restore --replay puts its server log
        return self.pgdata.parent / f"pitr-replay-{self.pgdata.name}.log"

    def keep(self) -> str | None:
        """--keep: drop the socket dir and the trust pg_hba.conf; keep the private dir only when it
        holds the data or its tablespaces (the kept copy needs them). Returns it when kept."""
        shutil.rmtree(self.run, ignore_errors=True)
        (self.work / "pg_hba.conf").unlink(missing_ok=True)
        if self.pgdata.parent == self.work or (self.work / "tablespaces").exists():
            return str(self.work)
        shutil.rmtree(self.work, ignore_errors=True)
        return None

    def remove(self) -> None:
        spool.stop_helpers(self.pgdata)  # the recovery's prefetcher may still be writing into pg_wal
        if self.pgdata.parent != self.work:  # --pgdata: leave no data, no replay log
            if self.created_pgdata:
                shutil.rmtree(self.pgdata, ignore_errors=True)
            elif self.pgdata.is_dir():
                for child in self.pgdata.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
            self.replay_log.unlink(missing_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)


def _owner_for(pgdata: Path | None) -> tuple[int, int] | None:
    """As root, whom PostgreSQL runs as: --pgdata's (or its parent's) owner, else the postgres user."""
    if os.geteuid() != 0:
        return None
    for ref in ([pgdata, pgdata.parent] if pgdata is not None else []):
        try:
            st = ref.stat()
        except OSError:
            continue
        if st.st_uid != 0:
            return st.st_uid, st.st_gid
        break
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise UsageError("pitr runs as root and there is no postgres OS user for PostgreSQL to run as",
                         "run the drill as the PostgreSQL OS user, or give --pgdata a directory it owns") from None
    return pw.pw_uid, pw.pw_gid


def check_pgdata(pgdata: Path) -> None:
    """--pgdata must be new or empty: a drill never restores over anything."""
    if pgdata.exists() and (not pgdata.is_dir() or any(pgdata.iterdir())):
        raise UsageError(f"--pgdata {pgdata} exists and is not an empty directory; a drill restores only into "
                         "a new or empty one", "give a new directory, or leave --pgdata out (a temp dir is used)")
    if not pgdata.parent.is_dir():
        raise UsageError(f"--pgdata {pgdata}: its parent directory does not exist")


def run_drill(storage: Storage, opts: DrillOptions, on_phase: Callable[[str], None] | None = None) -> DrillResult:
    """Run one drill end to end; the record is returned (and stored) whether it passed or failed."""
    phase = on_phase or (lambda _m: None)
    t0 = time.monotonic()
    started = time.time()
    drill_id = drills.new_id(started)
    target, target_note = opts.target, None
    if opts.random_target:
        target, target_note = random_target(storage)
    if opts.pgdata is not None:
        check_pgdata(opts.pgdata)
    rec: dict[str, Any] = {
        "version": RECORD_VERSION, "id": drill_id, "started": _iso(started), "finished": None, "passed": False,
        "pitr_version": __version__, "pg_version": None, "backup": None,
        "target": target.to_json() | {"random": opts.random_target} | ({"note": target_note} if target_note else {}),
        "reached": None, "rto_seconds": None, "rto_checks_seconds": None, "bytes_restored": None,
        "wal_segments": None, "steps": [], "error": None, "kept": None, "kept_workdir": None,
    }
    steps: list[Step] = []
    place = _Place(opts.pgdata)
    srv: PrivateServer | None = None
    try:
        phase(f"drill {drill_id}: restoring into {place.pgdata}")
        ropts = RestoreOptions(
            pgdata=place.pgdata, target=target, backup_id=opts.backup_id, action="promote", jobs=opts.jobs,
            archive_mode="off", pitr_argv=opts.pitr_argv, repo_url=opts.repo_url, s3_endpoint=opts.s3_endpoint,
            config_path=opts.config_path, replay=True, replay_timeout=opts.timeout, pg_bin=opts.pg_bin,
            server_env=opts.server_env, prefetch=opts.prefetch, repo_as_of=opts.repo_as_of)
        t_restore = time.monotonic()
        try:
            ropts = _relocate_tablespaces(storage, ropts, place)
            res = run_restore(storage, ropts, on_phase=phase)
        except PitrError as e:
            steps.append(Step("restore", False, str(e) + (f" ({e.hint})" if e.hint else ""),
                              time.monotonic() - t_restore))
            rec["error"] = str(e)
            raise _Failed() from None
        _describe_restore(rec, res)
        steps.append(Step("restore", True, f"restored backup {res.plan.backup.id} and replayed to "
                          f"{res.plan.target.describe()}", time.monotonic() - t_restore))
        phase("starting the promoted copy on a private socket")
        t_serve = time.monotonic()
        try:
            srv, users = _serve(place, res, opts)
        except PitrError as e:  # promoted, but it does not come up again: the restore is not usable
            steps.append(Step("serve", False, str(e), time.monotonic() - t_serve))
            rec["error"] = str(e)
            raise _Failed() from None
        row = _one(srv, users, opts.check_db, "select current_setting('server_version')") or \
            _one(srv, users, "postgres", "select current_setting('server_version')")
        rec["pg_version"] = str(row[0]) if row else None
        rec["rto_seconds"] = round(time.monotonic() - t0, 3)
        if opts.amcheck:
            phase("running pg_amcheck --all")
            steps.append(_amcheck(srv, users, opts.amcheck_timeout or amcheck_bound(rec["bytes_restored"])))
        else:
            steps.append(Step("amcheck", None, "skipped (--no-amcheck)"))
        for sql in opts.checks:
            phase(f"check: {sql[:60]}")
            steps.append(run_check(srv, users, opts.check_db, sql))
        rec["rto_checks_seconds"] = round(time.monotonic() - t0, 3)
    except _Failed:
        pass
    finally:
        if srv is not None:
            srv.stop()
        if opts.keep:
            rec["kept"] = str(place.pgdata)
            rec["kept_workdir"] = place.keep()
        else:
            place.remove()
    rec["steps"] = [s.to_json() for s in steps]
    rec["passed"] = bool(steps) and all(s.passed is not False for s in steps) and rec["error"] is None
    rec["finished"] = _iso(time.time())
    out = DrillResult(rec)
    if opts.repo_as_of is not None:  # the view of the past is read-only: the record is printed, not stored
        rec["repo_as_of"] = opts.repo_as_of
        return out
    try:
        out.key = drills.write(storage, rec)
    except PitrError as e:
        out.store_error = str(e)
    return out


def _relocate_tablespaces(storage: Storage, ropts: RestoreOptions, place: _Place) -> RestoreOptions:
    """Every tablespace of the chosen backup goes under the drill's private directory: on the
    production host its original location is production's own (restore would refuse it anyway)."""
    plan, _meta = load_plan(storage, ropts)
    spaces = plan.backup.tablespaces
    if not spaces:
        return ropts
    root = place.work / "tablespaces"
    root.mkdir(mode=0o700, exist_ok=True)
    if place.owner:
        os.chown(root, *place.owner)
    return replace(ropts, tablespace_map={t.oid: root / t.oid for t in spaces})


class _Failed(Exception):
    """A step failed and is recorded; skip the rest."""


def _describe_restore(rec: dict[str, Any], res: RestoreResult) -> None:
    p = res.plan
    b = p.backup
    rec["backup"] = {"id": b.id, "type": b.type, "timeline": b.timeline, "stop_time": b.stop_time,
                     "stop_lsn": b.stop_lsn, "pg_version": b.pg_version}
    rp = res.replay
    rec["reached"] = None if rp is None else {
        "lsn": rp.last_lsn, "time": rp.last_xact_time, "stop_reason": rp.stop_reason,
        "timeline": rp.new_timeline}
    f = res.files
    rec["bytes_restored"] = None if f is None else f.bytes_written + f.bytes_kept
    rec["wal_segments"] = p.wal_count


def _serve(place: _Place, res: RestoreResult, opts: DrillOptions) -> tuple[PrivateServer, list[str]]:
    """Start the promoted copy privately, trusting only its private socket; wait until it answers."""
    from pitr.ops.recovery.restore_replay import sql_users
    from pitr.pg.binaries import find_pg_bin

    bindir = find_pg_bin(res.plan.backup.pg_version, opts.pg_bin, opts.server_env.get("PATH"))
    hba = place.work / "pg_hba.conf"
    hba.write_text("# pitr drill: only the private socket (mode 0700) reaches this copy\nlocal all all trust\n")
    logfile = place.work / "server.log"
    logfile.touch()
    if place.owner:
        os.chown(hba, *place.owner)
        os.chown(logfile, *place.owner)
    srv = PrivateServer(bindir, place.pgdata, place.run, logfile, opts.server_env, place.owner,
                        {"hba_file": str(hba), "archive_mode": "off", "max_connections": "20"})
    users = sql_users(place.owner)
    srv.start()
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if srv.query("select 1", users) is not None:
            return srv, users
        if not srv.alive():
            line = (srv.log_lines(r"FATAL|PANIC", 1) or [""])[0]
            raise PitrError(f"the restored copy did not start again after promotion (exit code {srv.exit_code})"
                            f"{': ' + line if line else ''}")
        if not sleep_until(deadline):
            raise PitrError(f"the restored copy did not accept connections within {READY_TIMEOUT:.0f}s")


def _connect(srv: PrivateServer, users: list[str], dbname: str) -> Any:
    import psycopg

    last: Exception | None = None
    for user in users:
        try:
            return psycopg.connect(host=str(srv.sockdir), port=srv.port, user=user, dbname=dbname,
                                   connect_timeout=10, autocommit=True, application_name="pitr drill")
        except psycopg.Error as e:
            last = e
    raise PitrError(f"cannot connect to the restored copy's database {dbname!r}: {str(last).strip()}")


def _one(srv: PrivateServer, users: list[str], dbname: str, sql: str) -> tuple[Any, ...] | None:
    try:
        with _connect(srv, users, dbname) as conn:
            row = conn.execute(sql).fetchone()
            return tuple(row) if row is not None else None
    except Exception:  # noqa: BLE001 - a report detail (the version) must not fail the drill
        return None


def run_check(srv: PrivateServer, users: list[str], dbname: str, sql: str) -> Step:
    """One check: at least one row, and the first column true in every row."""
    import psycopg

    t = time.monotonic()
    try:
        with _connect(srv, users, dbname) as conn:
            cur = conn.execute(sql)  # type: ignore[arg-type]
            if cur.description is None:
                return Step("check", False, "returned no rows (it is not a query)", time.monotonic() - t, sql)
            rows = cur.fetchall()
    except psycopg.Error as e:
        return Step("check", False, f"failed: {str(e).strip().splitlines()[0]}", time.monotonic() - t, sql)
    except PitrError as e:
        return Step("check", False, str(e), time.monotonic() - t, sql)
    secs = time.monotonic() - t
    if not rows:
        return Step("check", False, "returned no rows (a check must return at least one)", secs, sql)
    for i, row in enumerate(rows, 1):
        if not row or row[0] is not True:
            return Step("check", False, f"row {i} of {len(rows)}: the first column is {row[0] if row else None!r},"
                        " not true", secs, sql)
    return Step("check", True, f"{len(rows)} row(s), all true", secs, sql)


def amcheck_bound(bytes_restored: int | None) -> float:
    """The default bound on pg_amcheck (seconds): AMCHECK_MIN_SECONDS, plus one per AMCHECK_RATE bytes restored."""
    return AMCHECK_MIN_SECONDS + (bytes_restored or 0) / AMCHECK_RATE


def _run_bounded(argv: list[str], env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """argv in a process group of its own, killed as a group when it outlives timeout (TimeoutExpired) or
    the drill is interrupted: a hung pg_amcheck must neither hang the drill nor outlive it."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                          env=dict(env), start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=max(timeout, 0.001))
        except BaseException:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass  # gone already
            p.communicate()
            raise
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def _amcheck(srv: PrivateServer, users: list[str], timeout: float) -> Step:
    """pg_amcheck --all (heap and btree) of the server's own version, within timeout seconds in all;
    skipped, and said so, when absent."""
    exe = srv.bindir / "pg_amcheck"
    if not exe.is_file():
        return Step("amcheck", None, f"skipped: pg_amcheck is not installed in {srv.bindir} (install the "
                    "PostgreSQL client package of this version to check heap and index integrity)")
    t = time.monotonic()
    env = dict(srv.env) | {"PGCONNECT_TIMEOUT": "10"}
    env.pop("PGPASSWORD", None)
    last = ""
    for user in users:
        argv = [str(exe), "-h", str(srv.sockdir), "-p", str(srv.port), "-U", user, "--no-password", "--all",
                "--install-missing"]
        try:
            p = _run_bounded(argv, env, t + timeout - time.monotonic())
        except OSError as e:
            return Step("amcheck", False, f"pg_amcheck could not run: {e.strerror}", time.monotonic() - t)
        except subprocess.TimeoutExpired:
            return Step("amcheck", False, f"pg_amcheck did not finish within {timeout:g}s and was stopped (a hung "
                        "or very slow check: raise --amcheck-timeout, or skip it with --no-amcheck)",
                        time.monotonic() - t)
        out = (p.stdout + p.stderr).strip()
        if p.returncode == 0:
            return Step("amcheck", True, "pg_amcheck --all found no corruption (heap and btree)",
                        time.monotonic() - t)
        last = out
        if "connection" not in out or "role" not in out:
            break  # not a login problem: a finding
    lines = last.splitlines()
    shown = "; ".join(lines[:5]) + (f"; ... ({len(lines)} lines)" if len(lines) > 5 else "")
    return Step("amcheck", False, f"pg_amcheck reported problems: {shown}", time.monotonic() - t)
