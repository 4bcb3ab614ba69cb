"""The replay stage: verified WAL waiting in pg_wal for a restore_command that is a shell one-liner.

restore_command = 'mv -f S/%f %p 2>/dev/null || { n=0; while [ -e S/.%f.part ] && [ $((n+=1)) -le 150 ];
                   do sleep 0.02; done; mv -f S/%f %p 2>/dev/null || PITR_STAGE=TOKEN ... wal-fetch %f %p; }'
(S = pg_wal/pitr_stage/TOKEN; written by pg/recovery.render_restore_command)

The prefetcher (ops/wal/prefetch.py) runs with the stage as its spool: it writes each file as a hidden
temp file, verifies it (envelope size and digest, page header against the name and the cluster),
then renames it to its name; restore_command renames it on to %p -- an atomic rename on one file
system, no Python start. Anything not staged goes to `pitr wal-fetch`, which keeps every exit
code guarantee (1 only when the repository proves the name absent, above 125 on hard failure)
and restarts the helper if it died.

A segment the helper is still writing is waited for (its .NAME.part exists: look again until it
is gone, ~3 s at most, then try the rename once more) rather than handed to a Python start that
would only wait for the helper too; a .part left by a killed helper costs that bound once (the
helper wal-fetch starts empties the stage).

Why a staged file is never stale or foreign:
  - TOKEN is new for every restore (and every `pitr restore-command`), and `restore` removes
    every earlier stage: files left by an earlier restore, recovery or repository are never
    under the name a new restore_command looks at;
  - only the helper writes into a stage, and it empties the stage when it starts and exits;
    a name in an immutable repository never changes content, so a staged file is what
    wal-fetch would have fetched under that name;
  - the stage is inside pg_wal (same file system: the rename is atomic, checked), mode 0700
    and owned by the server's user; the helper refuses a stage that is a symbolic link, owned
    by someone else, open to group or others, or on another file system than pg_wal.
The server's own OS user and root are trusted: they can rewrite pg_wal and restore_command anyway.

No CRC-32 in a stage: in the prefetch spool NAME.meta carries a CRC-32 of the bytes written, which
wal-fetch recomputes before it hands the file over. In a stage the helper takes none (NAME.meta says
spool.NO_CRC) and wal-fetch checks the size and page header only. The shell rename hands most staged
files over with no re-check at all, so the CRC would guard only wal-fetch's few takes of the same
files, in the same 0700 directory, against a change between the helper's rename and the take: one
only the trusted users above could make on purpose (a CRC proves nothing against them: they would
rewrite it too), and an accidental one (memory, a kernel fault) is equally likely for the files the
shell takes. It saves the helper ~10 ms of CPU per 16 MiB segment and wal-fetch ~5 ms per take.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pitr.ops.wal import spool

if TYPE_CHECKING:
    import subprocess  # wal-fetch's fallback imports this module: subprocess only where a helper is started

STARTER_STAMP = "stage-"  # start_helper's request stamp: stage-PID-NS (PID: the process that started it)
SHELL_STAMP = "sh-"  # the one-liner's own request stamp: sh-.ask.XXXXXXXX (its mktemp file's name)
EXITED = "prefetch.exited"  # written by the helper as it exits, removed as it starts: the one-liner asks no dead helper
STAGE_DIR = "pitr_stage"  # in pg_wal; PostgreSQL ignores sub-directories there, base backups skip it
ENV = "PITR_STAGE"  # names this recovery's stage in restore_command (the token only, not a path)
_HEX = frozenset("0123456789abcdef")


def new_token() -> str:
    import secrets

    return secrets.token_hex(8)


def valid_token(token: str) -> bool:
    return 8 <= len(token) <= 32 and set(token) <= _HEX


def relative_dir(token: str) -> str:
    """The stage as restore_command sees it (PostgreSQL runs it in the data directory)."""
    return f"pg_wal/{STAGE_DIR}/{token}"


def stage_dir(wal_dir: str | os.PathLike[str], token: str) -> Path:
    return Path(wal_dir) / STAGE_DIR / token


def prepare(pgdata: Path, token: str | None, owner: tuple[int, int] | None) -> Path | None:
    """Remove every earlier stage of pgdata and create this restore's (if any), empty, 0700, owned by owner."""
    import shutil

    spool.stop_helpers(pgdata)  # a helper of an earlier replay (paused at its target) still writing
    root = pgdata / "pg_wal" / STAGE_DIR
    if root.is_symlink() or root.is_file():
        root.unlink()
    shutil.rmtree(root, ignore_errors=True)
    if token is None:
        return None
    d = root / token
    for p in (root, d):
        p.mkdir(mode=0o700)
        os.chmod(p, 0o700)
        if owner is not None:
            os.chown(p, *owner)
    return d


def ensure(d: Path) -> None:
    """Create the stage (and its parent) 0700 if missing: the helper's side of prepare()."""
    for p in (d.parent, d):
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077:
                os.chmod(p, 0o700)  # ours but opened up: close it (the helper then empties it)


def problem(d: Path) -> str | None:
    """Why the helper must not stage into d (None when it may)."""
    wal = d.parent.parent
    try:
        wal_dev = os.stat(wal).st_dev
        for p in (d.parent, d):
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                return f"{p} is not a directory"
            if st.st_uid != os.geteuid():
                return f"{p} is owned by uid {st.st_uid}, not by the server's user (uid {os.geteuid()})"
            if st.st_mode & 0o077:
                return f"{p} has mode {stat.S_IMODE(st.st_mode):04o}; a stage must be 0700"
            if st.st_dev != wal_dev:
                return f"{p} is on another file system than {wal} (restore_command's rename would copy)"
    except OSError as e:
        return f"cannot check {d}: {e.strerror}"
    return None


def start_helper(argv: Sequence[str], env: Mapping[str, str], d: Path, pgdata: Path,
                 owner: tuple[int, int] | None, first: str | None) -> subprocess.Popen[bytes]:
    """Start the prefetcher on stage d before PostgreSQL, as restore_command would, as the server's user.

    argv is `pitr [global options]` exactly as restore_command runs it and env the server's
    environment with restore_command's assignments, so the helper's settings (and fingerprint)
    are those of every later wal-fetch. `first` is the first segment recovery will ask for; its
    request names this process (STARTER_STAMP): the helper does not go idle while we run, since
    `restore --replay` starts it while it still writes the files, long before PostgreSQL asks.
    """
    if first:  # where recovery starts: staged first, then the segments after it (not counted as a request)
        tmp = d / f".want.{os.getpid()}"
        tmp.write_text(f"{first} {STARTER_STAMP}{os.getpid()}-{time.monotonic_ns()}")
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, d / "want")
    return spool.start_helper([*argv, "_wal-prefetch", str(d), str(pgdata)], d / f"{spool.PREFETCHD}.log",
                              env=env, cwd=pgdata, owner=owner, log_mode=0o600)


def starter_alive(stamp: str) -> bool:
    """Whether the request stamp is start_helper's and the process that wrote it still runs."""
    pid = stamp[len(STARTER_STAMP):].split("-")[0]
    return stamp.startswith(STARTER_STAMP) and pid.isdigit() and spool.pid_alive(int(pid))


def wait_started(d: Path, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """True once the helper holds its lock (it then answers PostgreSQL's first requests); False at
    the time-out, or at once when proc (the helper started) has exited without it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if spool.helper_state(d, spool.PREFETCHD) is not None:
            return True
        if proc is not None and proc.poll() is not None:
            return spool.helper_state(d, spool.PREFETCHD) is not None
        time.sleep(0.02)
    return False


def helper_dirs(pgdata: Path) -> list[Path]:
    """Every stage of pgdata (a helper may work in any of them)."""
    try:
        return sorted(p for p in (pgdata / "pg_wal" / STAGE_DIR).iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def stop(d: Path, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Ask the helper working in stage d to exit (it empties the stage) and wait for it, bounded.

    proc: the helper start_helper started, maybe still booting (no lock yet): waited for until it
    holds its lock or has exited, so a helper that was starting is not left running.
    """
    if proc is not None:
        deadline = time.monotonic() + timeout
        while (proc.poll() is None and spool.helper_state(d, spool.PREFETCHD) is None
               and time.monotonic() < deadline):
            time.sleep(0.02)
    if spool.helper_state(d, spool.PREFETCHD) is None:
        if proc is not None:
            proc.poll()
        return
    spool.request_stop(d, spool.PREFETCHD)
    deadline = time.monotonic() + timeout
    while spool.helper_state(d, spool.PREFETCHD) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc is not None:
        import subprocess

        try:
            proc.wait(max(0.1, deadline - time.monotonic()))  # reaped: it is our child
        except subprocess.TimeoutExpired:
            pass


def counts(d: Path) -> tuple[int, int, int] | None:
    """(segments restore_command took from the stage, requests through wal-fetch, requests the one-liner
    made itself) from the helper's log, summed over the helpers that worked in the stage."""
    import re

    try:
        text = (d / f"{spool.PREFETCHD}.log").read_text(errors="replace")
    except OSError:
        return None
    found = re.findall(r"(\d+) prefetched segments taken, (\d+) requests through wal-fetch, "
                       r"(\d+) answered in the shell", text)
    if not found:
        return None
    return sum(int(f[0]) for f in found), sum(int(f[1]) for f in found), sum(int(f[2]) for f in found)
