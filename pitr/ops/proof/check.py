"""`pitr check`: is the running server archiving into this repository, end to end?

Independent points are all checked (a failure does not hide the next one): the server's
archive_mode, archive_command (calls `pitr wal-push %p`, and names this repo when it names one
at all), archive_library, wal_level; the repository reachable, writable, initialized and of this
cluster. Only when those pass is a WAL switch forced and its segment awaited in the repository.
With max_rpo, the age of the newest archived WAL is judged too — measured before the forced
switch, and counted as zero when the server has written nothing since that segment.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from pitr.config import RepoLocation, parse_repo_url
from pitr.errors import ConfigError, PitrError
from pitr.pg import walname
from pitr.pg.conn import PgSession, ServerInfo
from pitr.redact import redact
from pitr.repo.catalog import TimelineWal, scan_wal
from pitr.repo.format import wal_key
from pitr.repo.meta import RepoMeta, read_meta
from pitr.storage.base import Storage
from pitr.units import human_duration as _dur


@dataclass(frozen=True)
class Point:
    name: str  # the setting or aspect ("archive_mode", "repository", "wal-switch", "rpo", …)
    ok: bool
    detail: str  # what was found
    fix: str = ""  # what to do, when not ok

    def line(self) -> str:
        return f"{self.name}: {self.detail}" + (f"; {self.fix}" if self.fix and not self.ok else "")


@dataclass
class CheckResult:
    points: list[Point] = field(default_factory=list)
    rpo_seconds: float | None = None
    newest_wal: str | None = None
    switched_segment: str | None = None
    wait_seconds: float | None = None
    backup_age_seconds: float | None = None
    newest_backup: str | None = None
    drill_age_seconds: float | None = None
    newest_drill: str | None = None

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.points)

    def add(self, name: str, ok: bool, detail: str, fix: str = "") -> bool:
        self.points.append(Point(name, ok, redact(detail), "" if ok else redact(fix)))  # server text may hold secrets
        return ok

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "points": [asdict(p) for p in self.points], "rpo_seconds": self.rpo_seconds,
                "newest_wal": self.newest_wal, "switched_segment": self.switched_segment,
                "wait_seconds": self.wait_seconds, "backup_age_seconds": self.backup_age_seconds,
                "newest_backup": self.newest_backup, "drill_age_seconds": self.drill_age_seconds,
                "newest_drill": self.newest_drill}


@dataclass(frozen=True)
class CheckOptions:
    repo: RepoLocation
    timeout: float = 60.0
    max_rpo: float | None = None  # seconds
    max_backup_age: float | None = None  # seconds
    max_drill_age: float | None = None  # seconds


# --------------------------------------------------------------------------- archive_command

def archive_command_repo(command: str) -> str | None:
    """The repository an archive_command names explicitly (--repo X, --repo=X, PITR_REPO=X), if any."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    for i, w in enumerate(words):
        if w == "--repo" and i + 1 < len(words):
            return words[i + 1]
        if w.startswith("--repo="):
            return w.split("=", 1)[1]
        if w.startswith("PITR_REPO="):
            return w.split("=", 1)[1]
    return None


def same_repo(a: RepoLocation, b: RepoLocation) -> bool:
    if a.kind != b.kind:
        return False
    if a.kind == "fs":
        return a.path == b.path
    return a.bucket == b.bucket and a.prefix.strip("/") == b.prefix.strip("/")


def judge_archive_command(command: str, ours: RepoLocation) -> tuple[bool, str, str]:
    """(ok, what was found, fix) for an archive_command value."""
    fix = "set archive_command = 'pitr wal-push %p' (PITR_REPO or the config file naming this repository; " \
          "on a busy server the line `pitr archive-command` prints) and reload the server (SELECT pg_reload_conf())"
    shown = redact(command)  # the value is readable by anyone who runs check; its secrets are not shown
    shown = shown if len(shown) <= 120 else shown[:117] + "..."
    if not command.strip() or command.strip() == "(disabled)":
        return False, "is empty, so nothing is archived", fix
    if "pitr" not in command or "wal-push" not in command:
        return False, f"is '{shown}', which does not archive with pitr", fix
    if "%p" not in command:
        return False, f"is '{shown}', which does not pass %p (the file to archive)", fix
    named = archive_command_repo(command)
    if named is None:
        return True, f"is '{shown}' (it names no repository: the server's PITR_REPO or config file decides, " \
                     "which check cannot see; the WAL switch below proves it)", ""
    try:
        loc = parse_repo_url(named)
    except ConfigError:
        return False, f"names the repository {redact(named)!r}, which is not a valid repository URL", fix
    if not same_repo(loc, ours):
        return False, f"archives into {loc.url}, not into this repository {ours.url}", \
            f"point --repo in archive_command at {ours.url}, or run check with --repo {loc.url}"
    return True, f"is '{shown}'", ""


# --------------------------------------------------------------------------- the operation

def check(storage: Storage, conninfo: str | None, opts: CheckOptions,
          session: Callable[[str | None], PgSession] = PgSession,
          clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> CheckResult:
    """Judge every point; raise nothing for a failed point (each is a Point with its fix)."""
    res = CheckResult()
    pg: PgSession | None = None
    server: ServerInfo | None = None
    try:
        pg = session(conninfo)
        server = pg.info()
    except PitrError as e:
        res.add("server", False, str(e), e.hint or "set --dbname or the PG* environment variables")
    try:
        archiving_ok = _server_points(pg, opts.repo, res) if pg is not None else False
        meta = _repo_points(storage, server, res)
        if opts.max_rpo is not None:
            _rpo_point(storage, meta, pg, opts.max_rpo, res, clock)
        age_points(storage, meta, opts, res, clock)
        if pg is not None and server is not None and archiving_ok and meta is not None:
            if server.in_recovery:
                res.add("wal-switch", False, "the server is a standby, where no WAL switch can be forced",
                        "run pitr check against the primary")
            else:
                _switch_point(storage, pg, opts.timeout, res, sleep)
    finally:
        if pg is not None:
            pg.close()
    return res


def _server_points(pg: PgSession, ours: RepoLocation, res: CheckResult) -> bool:
    """archive_mode, archive_library, archive_command, wal_level; True when archiving can work."""
    mode = pg.setting("archive_mode")
    ok = res.add("archive_mode", mode in ("on", "always"), f"is {mode}",
                 "set archive_mode = on in postgresql.conf and restart the server")
    library = str(pg.scalar("select setting from pg_settings where name = 'archive_library'") or "")
    if library:  # PostgreSQL 15+: a library takes precedence over archive_command
        ok = res.add("archive_library", False, f"is '{library}', so archive_command is not used",
                     "set archive_library = '' and restart the server") and ok
    command: str | None = pg.setting("archive_command")
    if command == "(disabled)":  # what the server shows while archive_mode is off: read the config files
        command = _configured_archive_command(pg)
    if command is not None:
        cmd_ok, found, fix = judge_archive_command(command, ours)
        ok = res.add("archive_command", cmd_ok, found, fix) and ok
    level = pg.setting("wal_level")
    level_ok = res.add("wal_level", level in ("replica", "logical"), f"is {level}",
                       "set wal_level = replica in postgresql.conf and restart the server")
    return ok and level_ok


def _configured_archive_command(pg: PgSession) -> str | None:
    """archive_command as the config files set it (pg_file_settings; None when not readable)."""
    try:
        rows = pg.query("select setting from pg_file_settings where name = 'archive_command' and error is null"
                        " order by seqno desc limit 1")
    except PitrError:
        return None  # not a superuser: the archive_mode line already says what to fix first
    return str(rows[0][0]) if rows else ""


def _repo_points(storage: Storage, server: ServerInfo | None, res: CheckResult) -> RepoMeta | None:
    """Reachable and writable, initialized, and (when the server answered) of this cluster."""
    try:
        storage.check(write=True)
    except PitrError as e:
        res.add("repository", False, f"{storage.display} is not usable: {e}", e.hint or "fix access to it")
        return None
    try:
        meta = read_meta(storage)
    except PitrError as e:
        res.add("repository", False, str(e), e.hint or "")
        return None
    if server is None:
        res.add("repository", True, f"{storage.display} is reachable, writable and initialized")
        return meta
    if meta.system_identifier != server.system_identifier:
        res.add("repository", False, f"{storage.display} belongs to the cluster {meta.system_identifier}, "
                f"not this server's {server.system_identifier}",
                "use one repository (or prefix) per cluster: point PITR_REPO/--repo at this cluster's")
        return None
    if meta.wal_segment_size != server.wal_segment_size:
        res.add("repository", False, f"{storage.display} holds {meta.wal_segment_size}-byte WAL segments, "
                f"the server writes {server.wal_segment_size}-byte ones", "use a repository made for this cluster")
        return None
    res.add("repository", True, f"{storage.display} is reachable, writable and belongs to this cluster "
            f"({meta.system_identifier})")
    return meta


def _rpo_point(storage: Storage, meta: RepoMeta | None, pg: PgSession | None, max_rpo: float,
               res: CheckResult, clock: Callable[[], float]) -> None:
    """Age of the newest archived segment against max_rpo; zero when nothing newer was written."""
    if meta is None:
        res.add("rpo", False, "cannot be measured: the repository is not usable", "fix the repository first")
        return
    cat = scan_wal(storage, meta.wal_segment_size)
    if cat.newest_name is None:
        res.add("rpo", False, "no WAL segment is archived yet", "fix archiving (see the lines above), then "
                "force a switch with SELECT pg_switch_wal()")
        return
    res.newest_wal = cat.newest_name
    age = max(0.0, clock() - cat.newest_mtime)
    if pg is not None and _nothing_unarchived(pg, cat.timelines, meta.wal_segment_size):
        age = 0.0
    res.rpo_seconds = age
    limit = _dur(max_rpo)
    if age > max_rpo:
        res.add("rpo", False, f"the newest archived WAL ({cat.newest_name}) is {_dur(age)} old, over the "
                f"limit of {limit}", "look at pg_stat_archiver and the server log for failing archive_command "
                "calls; on a quiet server set archive_timeout below the limit")
    else:
        res.add("rpo", True, f"the newest archived WAL ({cat.newest_name}) is {_dur(age)} old "
                f"(limit {limit})")


def age_points(storage: Storage, meta: RepoMeta | None, opts: CheckOptions, res: CheckResult,
               clock: Callable[[], float]) -> None:
    """--max-backup-age and --max-drill-age: the newest complete backup / passing drill against its limit."""
    from pitr.ops.proof.proof_ages import newest_backup, newest_passing_drill

    for name, limit, find, what in (
            ("backup-age", opts.max_backup_age, newest_backup, "complete backup"),
            ("drill-age", opts.max_drill_age, newest_passing_drill, "passing drill")):
        if limit is None:
            continue
        if meta is None:
            res.add(name, False, "cannot be measured: the repository is not usable", "fix the repository first")
            continue
        found = find(storage, meta)
        if found is None:
            fix = "take one with `pitr backup`" if name == "backup-age" else "run `pitr drill` (docs/runbook.md)"
            res.add(name, False, f"no {what} is recorded in the repository", fix)
            continue
        ident, when = found
        age = max(0.0, clock() - when)
        if name == "backup-age":
            res.backup_age_seconds, res.newest_backup = round(age, 3), ident
        else:
            res.drill_age_seconds, res.newest_drill = round(age, 3), ident
        if age > limit:
            fix = ("check the backup timer and its log; take one with `pitr backup`" if name == "backup-age"
                   else "check the drill timer and its log; a failed drill does not count (`pitr info`)")
            res.add(name, False, f"the newest {what} ({ident}) is {_dur(age)} old, over the limit of "
                    f"{_dur(limit)}", fix)
        else:
            res.add(name, True, f"the newest {what} ({ident}) is {_dur(age)} old (limit {_dur(limit)})")


def _nothing_unarchived(pg: PgSession, timelines: dict[int, TimelineWal], seg_size: int) -> bool:
    """True when the server's WAL ends exactly where its newest archived segment on its timeline ends."""
    try:
        row = pg.query("select pg_walfile_name(pg_current_wal_lsn()), pg_current_wal_lsn()::text")[0]
    except PitrError:
        return False  # a standby cannot say; judge by age alone
    tli = walname.timeline_of(str(row[0]))
    lsn = walname.parse_lsn(str(row[1]))
    tl = timelines.get(tli)
    last = tl.last if tl is not None else None
    return last is not None and lsn <= (last + 1) * seg_size


def _switch_point(storage: Storage, pg: PgSession, timeout: float, res: CheckResult,
                  sleep: Callable[[float], None]) -> None:
    """Force a WAL switch and wait until that segment is stored in the repository."""
    try:
        name, _end = pg.switch_wal()
    except PitrError as e:
        res.add("wal-switch", False, f"cannot force a WAL switch: {e}",
                "run check as a superuser or a role granted EXECUTE on pg_switch_wal()")
        return
    res.switched_segment = name
    key = wal_key(name)
    started = time.monotonic()
    delay = 0.1
    while True:
        try:
            found = storage.stat(key) is not None
        except PitrError:
            found = False
        waited = time.monotonic() - started
        if found:
            res.wait_seconds = round(waited, 2)
            res.add("wal-switch", True, f"segment {name} reached the repository in {waited:.1f}s")
            return
        if waited >= timeout:
            break
        sleep(min(delay, max(0.0, timeout - waited)))
        delay = min(delay * 1.5, 2.0)
    failure = ""
    try:
        row = pg.query("select last_failed_wal, last_failed_time::text, failed_count from pg_stat_archiver")[0]
        if row[0]:
            failure = f" (pg_stat_archiver: {row[2]} failed attempts, the last on {row[0]} at {row[1]})"
    except PitrError:
        pass
    res.add("wal-switch", False, f"segment {name} did not reach the repository within {timeout:g}s{failure}",
            "check the server log for archive_command errors, and that the server's environment "
            "(PITR_REPO, credentials) points at this repository")


_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'90s', '5m', '2h', '1d', '1w' or plain seconds -> seconds; ValueError otherwise."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):] or "s"
    if unit not in _UNITS or not num:
        raise ValueError(f"invalid duration {text!r}; use e.g. 90s, 5m, 2h or 1d")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"invalid duration {text!r}; use e.g. 90s, 5m, 2h or 1d") from None
    if value < 0:
        raise ValueError(f"invalid duration {text!r}: it must not be negative")
    return value * _UNITS[unit]
