"""Spool directories of the async archiver and the WAL prefetcher, and the foreground's light checks.

archive_command and restore_command run once per WAL file, so what they do before answering must
be cheap: this module imports only light standard-library modules and pg/walheader (itself light),
never a storage SDK.

Async archiving (spool dir default `pg_wal/pitr_spool`; PostgreSQL ignores sub-directories of
pg_wal and base backups skip pg_wal's contents):
    NAME.ok       the helper stored NAME durably; binds the settings fingerprint and the file's
                  identity (device, inode, size, mtime) so a stale or foreign marker never
                  acknowledges different bytes or another repository; its `sh=TOKEN:IDENTITY` line
                  is what `pitr archive-command`'s one-liner checks (pg/archive_command.py)
    NAME.error    the helper's last failure for NAME (message, hint), reported once by the next call
    pushd.error   the helper could not start (bad settings, repository unreachable, ...)
    pushd.lock    flock held by the running helper; its content is that helper's fingerprint
    pushd.stop    asks the running helper to exit (its settings are outdated)
    pushd.exited  written by a helper as it exits, removed by the next once it holds the lock: the
                  one-liner waits for NAME.ok only while a helper runs

Prefetch (spool dir default `pg_wal/pitr_prefetch`):
    NAME          a segment fetched ahead, verified against its envelope trailer (size, digest)
                  and page header; NAME.meta (written after it) holds the fingerprint, the size,
                  the trailer's digest, a CRC-32 of the bytes written and the cluster identity;
                  size, CRC-32 and header are checked again before the file goes to PostgreSQL
    want          PostgreSQL's latest request: "NAME STAMP". The prefetcher fetches NAME first
                  (any archive file, history files too) and the segments after it; when it
                  cannot give NAME it answers NAME.missing / NAME.failed carrying STAMP, so
                  the waiting wal-fetch knows the answer is about its own request
    prefetch.lock flock held by the running prefetcher
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pitr.pg import walheader

if TYPE_CHECKING:
    import subprocess

ARCHIVE_SPOOL = "pitr_spool"
PREFETCH_SPOOL = "pitr_prefetch"
PUSHD = "pushd"
PUSHD_EXITED = "pushd.exited"
PREFETCHD = "prefetch"
STARTING_GRACE = 15.0  # seconds a helper just started gets to take its lock before a request gives up on it


# --------------------------------------------------------------------------- locations

RECOVERY_SIGNALS = ("recovery.signal", "standby.signal")


def in_archive_recovery(pgdata: Path) -> bool:
    """Whether PostgreSQL is in archive recovery in pgdata (it runs restore_command there).

    PostgreSQL removes the signal file when recovery ends, *before* it fetches the parent timeline's
    history file for the new one: a prefetcher started by that last call would never see recovery
    end, so none is started without a signal file (pg_rewind's restore_command fetches directly).
    """
    return any(os.path.exists(pgdata / s) for s in RECOVERY_SIGNALS)


def pid_alive(pid: int) -> bool:
    """Whether process pid exists (another user's included: restore runs as root, helpers as postgres)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return pid > 0


def archive_spool_dir(spool_path: str | None, wal_path: str | os.PathLike[str]) -> Path:
    """Where markers for this cluster live: spool_path/archive, else pg_wal/pitr_spool."""
    if spool_path:
        return Path(spool_path) / "archive"
    return Path(os.path.abspath(os.path.dirname(os.fspath(wal_path)) or ".")) / ARCHIVE_SPOOL


def prefetch_spool_dir(spool_path: str | None, dest: str | os.PathLike[str]) -> Path:
    """Where prefetched segments wait: spool_path/prefetch, else beside DEST (pg_wal)/pitr_prefetch."""
    if spool_path:
        return Path(spool_path) / "prefetch"
    return Path(os.path.abspath(os.path.dirname(os.fspath(dest)) or ".")) / PREFETCH_SPOOL


# --------------------------------------------------------------------------- markers

def file_identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def shell_identity(st: os.stat_result) -> str:
    """file_identity as GNU `stat -c %d:%i:%s:%.9Y` prints it (the archive one-liner compares the two)."""
    sec, nsec = divmod(st.st_mtime_ns, 1_000_000_000)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{sec}.{nsec:09d}"


def server_identity(pgdata: Path) -> str | None:
    """Which server runs in pgdata: postmaster.pid's PID and start time, None when none runs.

    A server's environment is fixed for its life, so a helper that still sees the server it was
    started under still has the environment the archive one-liner's fallback would have."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return f"{lines[0]}:{lines[2]}" if len(lines) > 2 and lines[0].strip() else None


def write_marker(path: Path, fields: Mapping[str, str]) -> None:
    """Write key=value lines atomically (temp + rename): a reader sees all of it or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{k}={v}\n" for k, v in fields.items()))
    os.replace(tmp, path)


def read_marker(path: Path) -> dict[str, str] | None:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    out: dict[str, str] = {}
    for line in text.splitlines():
        k, eq, v = line.partition("=")
        if eq:
            out[k] = v
    return out


def acknowledged(spool: Path, wal_path: str | os.PathLike[str], fp: str) -> bool:
    """True when the helper stored exactly this file under these settings (NAME.ok matches)."""
    name = os.path.basename(os.fspath(wal_path))
    m = read_marker(spool / f"{name}.ok")
    if not m or m.get("fp") != fp:
        return False
    try:
        st = os.stat(wal_path)
    except OSError:
        return False
    return m.get("file") == file_identity(st)


def write_ok(spool: Path, name: str, fp: str, identity: str, status: str, shell: str | None = None) -> None:
    """NAME.ok; `shell` (TOKEN:shell_identity) adds the line the archive one-liner accepts."""
    fields = {"fp": fp, "file": identity, "status": status, "time": f"{time.time():.3f}"}
    if shell:
        fields["sh"] = shell
    write_marker(spool / f"{name}.ok", fields)
    try:
        (spool / f"{name}.error").unlink()
    except FileNotFoundError:
        pass


def write_error(spool: Path, name: str, message: str, hint: str | None) -> None:
    fields = {"message": message.replace("\n", " ")}
    if hint:
        fields["hint"] = hint.replace("\n", " ")
    write_marker(spool / f"{name}.error", fields)


def take_error(spool: Path, name: str) -> tuple[str, str | None] | None:
    """The recorded failure for name, removed so that the next attempt starts clean."""
    path = spool / f"{name}.error"
    m = read_marker(path)
    if m is None:
        return None
    try:
        path.unlink()
    except FileNotFoundError:
        return None  # someone else reported it
    return m.get("message", "the async archiver failed"), m.get("hint")


# --------------------------------------------------------------------------- helper processes

def helper_state(spool: Path, helper: str) -> str | None:
    """None when no helper holds `helper`.lock, else the fingerprint it wrote into the lock."""
    import fcntl

    path = spool / f"{helper}.lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def take_lock(spool: Path, helper: str) -> int | None:
    """Become the one running helper: the locked fd (kept open for life), or None if taken."""
    import fcntl

    spool.mkdir(parents=True, exist_ok=True)
    fd = os.open(spool / f"{helper}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def request_stop(spool: Path, helper: str) -> None:
    flag = spool / f"{helper}.stop"
    flag.touch()
    if os.geteuid() == 0:  # root (restore, drill) asking: a helper that exits before it sees the flag
        try:  # leaves it behind, and the data directory must hold nothing root-owned
            st = os.stat(spool)
            os.chown(flag, st.st_uid, st.st_gid)
        except OSError:
            pass


def stop_helpers(pgdata: Path, timeout: float = 10.0) -> None:
    """Ask the async archiver and the prefetcher working in pgdata's spools to exit, and wait for
    them (bounded): a throwaway directory is removed only once nothing writes into it any more."""
    live = []
    dirs = [(pgdata / "pg_wal" / ARCHIVE_SPOOL, PUSHD), (pgdata / "pg_wal" / PREFETCH_SPOOL, PREFETCHD)]
    try:  # the prefetchers of replay stages (ops/wal/stage.py)
        dirs += [(d, PREFETCHD) for d in sorted((pgdata / "pg_wal" / "pitr_stage").iterdir())]
    except OSError:
        pass
    for d, helper in dirs:
        try:
            if helper_state(d, helper) is not None:
                request_stop(d, helper)
                live.append((d, helper))
        except OSError:
            continue  # no spool there (or already gone): nothing to stop
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        live = [(d, h) for d, h in live if helper_state(d, h) is not None]


def stop_requested(spool: Path, helper: str) -> bool:
    """True (once) when someone asked the helper to exit."""
    try:
        (spool / f"{helper}.stop").unlink()
    except FileNotFoundError:
        return False
    return True


def drop_stale_ok(spool: Path, wal_path: str | os.PathLike[str], fp: str) -> None:
    """Remove NAME.ok when it does not acknowledge this file under these settings."""
    name = os.path.basename(os.fspath(wal_path))
    if (spool / f"{name}.ok").exists() and not acknowledged(spool, wal_path, fp):
        _discard(spool / f"{name}.ok")


def publish_fingerprint(fd: int, fp: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, fp.encode(), 0)


def start_helper(argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 owner: tuple[int, int] | None = None, log_mode: int = 0o666) -> subprocess.Popen[bytes]:
    """Start a helper process detached (own session, no inherited stdio, output appended to log), not waited for.

    The one starter of pitr's background helpers (async archiver, prefetcher, stage helper). A log
    over 1 MiB is started afresh. env/cwd default to this process's; owner (uid, gid) is the user
    the helper runs as when we are root, and owns the log; log_mode is the new log's mode (umask applies).
    """
    import subprocess  # here: wal-push's quick path imports this module and never starts a helper

    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        if log.stat().st_size > 1 << 20:
            log.unlink()
    except OSError:
        pass
    kw: dict[str, object] = {}
    if owner is not None and os.geteuid() == 0:
        kw = {"user": owner[0], "group": owner[1], "extra_groups": []}
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, log_mode)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        # returned for a starter that must know whether it is still booting (stage.stop); others drop it
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, close_fds=True,
                                start_new_session=True, env=None if env is None else dict(env),
                                cwd=None if cwd is None else str(cwd), **kw)  # type: ignore[call-overload,no-any-return]
    finally:
        os.close(fd)


def helper_argv(python: str, global_args: list[str], command: str, args: Iterable[str]) -> list[str]:
    """`pitr [globals] COMMAND ARGS` run by this Python (what wal-push and wal-fetch start)."""
    return [python, "-m", "pitr", *global_args, command, *args]


# --------------------------------------------------------------------------- prefetch

NO_CRC = -1  # NAME.meta's crc32 when the prefetcher took none (a stage: ops/wal/stage.py); a CRC-32 is >= 0


def take_prefetched(pdir: Path, name: str, dest: str | os.PathLike[str], fp: str) -> str | None:
    """Move a verified prefetched `name` to dest atomically.

    Returns None when served, "absent" when there is nothing usable prefetched for name, or a
    sentence saying why the prefetched file was rejected (it is deleted then).
    """
    import mmap
    import zlib

    meta_path, data_path = pdir / f"{name}.meta", pdir / name
    m = read_marker(meta_path)
    if m is None:
        return "absent"
    if m.get("fp") != fp:
        _discard(meta_path, data_path)
        return "absent"  # fetched under other settings: not ours to judge
    try:
        size, crc = int(m["size"]), int(m["crc32"])
        sysid, seg_size = int(m["sysid"]), int(m["seg_size"])
        with open(data_path, "rb") as f:
            actual = os.fstat(f.fileno()).st_size
            if actual != size or (size == 0 and len(name) == 24):
                why: str | None = f"is {actual} bytes, not {size}"
            else:
                # the bytes were verified against the envelope's digest when fetched; the CRC-32
                # taken then proves they are still those bytes (no copy: the page cache is hashed)
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    why = "fails its checksum" if crc != NO_CRC and zlib.crc32(mm) != crc else walheader.problem(
                        name, mm[: walheader.HEAD_BYTES], seg_size, sysid, size) if len(name) == 24 else None
    except FileNotFoundError:
        _discard(meta_path)
        return "absent"
    except (OSError, KeyError, ValueError):
        _discard(meta_path, data_path)
        return "absent"
    if why:
        _discard(meta_path, data_path)
        return f"the prefetched copy of {name} {why}; fetching it from the repository"
    dest = os.fspath(dest)
    try:
        os.replace(data_path, dest)
    except FileNotFoundError:
        _discard(meta_path)
        return "absent"  # the prefetcher pruned it meanwhile
    except OSError:
        # another file system: copy beside dest, then rename (PostgreSQL never sees a partial file)
        import shutil

        tmp = os.path.join(os.path.dirname(dest) or ".", f".{os.path.basename(dest)}.pitr-{os.getpid()}")
        try:
            shutil.copyfile(data_path, tmp)
            os.replace(tmp, dest)
        except BaseException:
            _discard(Path(tmp))
            raise
        _discard(data_path)
    _discard(meta_path)
    return None


def _discard(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def partial_name(name: str) -> str:
    """The prefetcher's file for `name` while it is being fetched (one prefetcher at a time)."""
    return f".{name}.part"


def write_want(pdir: Path, name: str, served: bool = False) -> str:
    """Record PostgreSQL's request for `name`; returns the request's stamp (see ask_prefetcher).

    served=True: the caller already has name; only the look-ahead after it is wanted.
    """
    pdir.mkdir(parents=True, exist_ok=True)
    stamp = f"{'done' if served else 'ask'}-{os.getpid()}-{time.monotonic_ns()}"
    tmp = pdir / f".want.{os.getpid()}"
    tmp.write_text(f"{name} {stamp}")
    os.replace(tmp, pdir / "want")
    return stamp


def read_want(pdir: str | Path) -> tuple[str, str] | None:
    """(name, stamp) of the latest request, or None. (The prefetcher reads it every turn of its loop:
    bytes, no Path, no text layer.)"""
    try:
        with open(os.path.join(pdir, "want"), "rb") as f:
            name, _, stamp = f.read(512).decode(errors="replace").strip().partition(" ")
    except OSError:
        return None
    return (name, stamp) if name else None


def is_archive_name(name: str) -> bool:
    """A segment or timeline history name (what restore_command asks for), checked cheaply."""
    hexdigits = "0123456789ABCDEF"
    if len(name) == 24:
        return all(c in hexdigits for c in name)
    return len(name) == 16 and name.endswith(".history") and all(c in hexdigits for c in name[:8])


def answer(pdir: Path, name: str, stamp: str, verdict: str) -> None:
    """The prefetcher's answer to request `stamp` when it has no file to give: missing | failed."""
    write_marker(pdir / f"{name}.{verdict}", {"stamp": stamp})


def take_ready(pdir: Path, name: str, dest: str | os.PathLike[str], fp: str) -> tuple[str, str | None] | None:
    """Serve name at once when its verified file is already in place, else None (ask the prefetcher).

    The request is recorded as already served first: an "ask" would make a prefetcher that reads
    it only after the file was taken (a loaded machine) fetch the segment again. States as
    ask_prefetcher's; a file that turns out unusable means fetching directly.
    """
    if not os.path.exists(pdir / f"{name}.meta"):
        return None
    write_want(pdir, name, served=True)  # the prefetcher moves on past name and keeps it until taken
    why = take_prefetched(pdir, name, dest, fp)
    if why is None:
        return "served", None
    return ("rejected", why) if why != "absent" else ("direct", None)


def take_or_ask(pdir: Path, name: str, dest: str | os.PathLike[str], fp: str,
                start_helper: Callable[[], bool] | None = None) -> tuple[str, str | None]:
    """take_ready, else ask_prefetcher: what wal-fetch does with a spool. start_helper runs once
    the request is written (the helper it may start must find it) and says whether it started
    one, which is then given time to take its lock. States as ask_prefetcher's."""
    ready = take_ready(pdir, name, dest, fp)
    if ready is not None:
        return ready
    stamp = write_want(pdir, name)  # first: the prefetcher keeps `name` and moves on past it
    started = start_helper() if start_helper is not None else False
    return ask_prefetcher(pdir, name, dest, fp, stamp, grace=STARTING_GRACE if started else 0.0)


def ask_prefetcher(pdir: Path, name: str, dest: str | os.PathLike[str], fp: str, stamp: str,
                   limit: float = 120.0, grace: float = 0.0) -> tuple[str, str | None]:
    """Let the running prefetcher (same settings) answer request `stamp` with its warm client.

    Returns ("served", None), ("missing", None) when the archive lacks name (checked after the
    request), ("rejected", why) when its file failed verification, or ("direct", None) when the
    caller must fetch by itself (no prefetcher with these settings, or it failed).
    """
    deadline = time.monotonic() + limit
    delay = 0.001
    next_alive = 0.0  # after a first look: a verified file is served even if the helper left
    grace_end = time.monotonic() + grace  # a helper just started may not hold its lock yet
    while time.monotonic() < deadline:
        if os.path.exists(pdir / f"{name}.meta"):
            why = take_prefetched(pdir, name, dest, fp)
            if why is None:
                return "served", None
            return ("rejected", why) if why != "absent" else ("direct", None)
        for verdict in ("missing", "failed"):
            m = read_marker(pdir / f"{name}.{verdict}")
            if m is not None and m.get("stamp") == stamp:
                _discard(pdir / f"{name}.{verdict}")
                return (verdict, None) if verdict == "missing" else ("direct", None)
        if time.monotonic() >= next_alive:
            state = helper_state(pdir, PREFETCHD)
            if state != fp and (state is not None or time.monotonic() >= grace_end):
                return "direct", None
            next_alive = time.monotonic() + (0.05 if state is None else 1.0)
        time.sleep(delay)
        delay = min(0.01, delay * 1.5)
    return "direct", None
