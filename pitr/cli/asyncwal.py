"""Async wal-push and prefetching wal-fetch, as PostgreSQL calls them, plus their helper processes.

- quick(): the first thing `pitr` runs. For `[globals] wal-push PATH` whose file the async helper
  already stored, and `[globals] wal-fetch NAME DEST` whose segment was prefetched, it answers
  with the standard library only (no typer, rich, boto3 or even the settings parser). Anything it
  is not sure about returns None and the normal path decides.
- run_async_push(): the wal-push foreground in async mode: start the helper if needed and wait
  until it acknowledged this file (or reports its error).
- serve_prefetched() / kick_prefetch(): wal-fetch's use of the prefetch spool.
- helper_main(): the hidden `_wal-push-daemon` and `_wal-prefetch` commands (see ops/wal/pushd.py,
  ops/wal/prefetch.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from pitr.cli import globalargs
from pitr.ops.wal import spool

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the quick path stays standard-library light)
if TYPE_CHECKING:
    from pitr.config import Settings

PUSH_HELPER = "_wal-push-daemon"
PREFETCH_HELPER = "_wal-prefetch"
WAIT_LIMIT = 900.0  # an archive_command that never returns blocks PostgreSQL's shutdown
MAX_SPAWNS = 3
QUICK_WAIT_LIMIT = 60.0  # then the normal path supervises the helper (WAIT_LIMIT in all)
# private, for tests only: the prefetcher's idle time-out in seconds (default prefetch.IDLE_EXIT)
IDLE_EXIT_ENV = "_PITR_PREFETCH_IDLE_EXIT"
STAGE_ENV = "PITR_STAGE"  # = stage.ENV (ops/wal/stage.py): restore_command's stage token


def quick(argv: list[str]) -> int | None:
    """0 when the answer is already on local disk; None to let the normal path decide."""
    try:
        if len(argv) >= 2 and argv[-2] == "wal-push":
            return _quick_push(argv)
        if len(argv) >= 3 and argv[-3] == "wal-fetch":
            return _quick_fetch(argv)
    except Exception:  # noqa: BLE001 - never fail here: the normal path will say what is wrong
        return None
    return None


def _quick_push(argv: list[str]) -> int | None:
    glob = globalargs.split_global_args(argv, 1)
    path = argv[-1]
    if glob is None:
        return None
    sdir = spool.archive_spool_dir(os.environ.get("PITR_SPOOL_PATH"), path)
    if not os.path.exists(sdir / f"{os.path.basename(path)}.ok"):
        return _quick_wait(sdir, path, globalargs.fingerprint(glob, os.environ))
    return 0 if spool.acknowledged(sdir, path, globalargs.fingerprint(glob, os.environ)) else None


def _quick_wait(sdir: Path, path: str, fp: str) -> int | None:
    """0 once the running helper with our settings stored `path`; None for anything else.

    With a backlog the helper is busy and this call usually comes before its file is stored. Waiting
    here costs a third of the CPU that loading the settings in the normal path does, CPU the helper's
    compression needs on a small machine. The acknowledgement is the same check as above; an error,
    a stale marker, a helper gone or with other settings, or a long wait go to the normal path,
    which reports, restarts or pushes in the foreground as before.
    """
    name = os.path.basename(path)
    status = os.path.join(os.path.dirname(path) or ".", "archive_status", f"{name}.ready")
    if not os.path.exists(status) or spool.helper_state(sdir, spool.PUSHD) != fp:
        return None
    start = time.monotonic()
    next_look = start + 1.0
    delay = 0.002
    while True:
        if os.path.exists(sdir / f"{name}.ok"):
            return 0 if spool.acknowledged(sdir, path, fp) else None
        if os.path.exists(sdir / f"{name}.error"):
            return None
        now = time.monotonic()
        if now - start > QUICK_WAIT_LIMIT:
            return None
        if now >= next_look:
            if spool.helper_state(sdir, spool.PUSHD) != fp:
                return None
            next_look = now + 1.0
        time.sleep(delay)
        delay = min(0.02, delay * 1.5)


def _quick_fetch(argv: list[str]) -> int | None:
    glob = globalargs.split_global_args(argv, 2)
    name, dest = argv[-2], argv[-1]
    if glob is None or not spool.is_archive_name(name):
        return None
    token = os.environ.get(STAGE_ENV)
    if token is not None and not _valid_token(token):
        return None  # the normal path says what is wrong
    pdir = prefetch_dir(os.environ.get("PITR_SPOOL_PATH"), dest)
    if not os.path.isdir(pdir):
        return None  # never prefetched here: the normal path decides whether to start
    fp = globalargs.fingerprint(glob, os.environ)
    state, why = spool.take_or_ask(pdir, name, dest, fp)
    if state == "served":
        _ensure_prefetcher(glob, pdir)
        return 0
    if state == "missing":
        return 1  # the prefetcher looked after this request: not in the archive
    if why:
        print(f"pitr: warning: {why}", file=sys.stderr)
    return None


def prefetch_dir(spool_path: str | None, dest: str) -> Path:
    """The prefetcher's directory: restore_command's stage (PITR_STAGE, in pg_wal), else the spool."""
    token = os.environ.get(STAGE_ENV)
    if token is not None:  # ops/wal/stage.py: inside pg_wal whatever spool_path says (atomic rename)
        return Path(os.path.dirname(dest) or ".") / "pitr_stage" / token
    return spool.prefetch_spool_dir(spool_path, dest)


def _valid_token(token: str) -> bool:
    return 8 <= len(token) <= 32 and set(token) <= set("0123456789abcdef")


def check_stage_env() -> None:
    """ConfigError for a PITR_STAGE that is not a token pitr wrote (wal-fetch then exits above 125)."""
    token = os.environ.get(STAGE_ENV)
    if token is not None and not _valid_token(token):
        from pitr.errors import ConfigError

        raise ConfigError(f"environment variable {STAGE_ENV} must be the stage token pitr wrote into "
                          f"restore_command (8 to 32 lowercase hexadecimal digits), not {token[:40]!r}",
                          "print a restore_command with `pitr restore-command` and use it unchanged")


# --------------------------------------------------------------------------- wal-push, async mode

def _global_args() -> list[str]:
    """This process's global options in the standard order (what its helpers are started with)."""
    from pitr.cli.common import hoist_globals

    args = hoist_globals(sys.argv[1:])
    for i, a in enumerate(args):
        if a in ("wal-push", "wal-fetch"):
            return args[:i]
    return []


def run_async_push(settings: Settings, path: str) -> int | None:
    """Wait for the helper to store `path`; None when the file is not PostgreSQL's (push it in sync)."""
    from pitr.cli.common import is_verbose, report_error
    from pitr.errors import PitrError, StorageError

    wal = Path(path)
    if not (wal.parent / "archive_status" / f"{wal.name}.ready").exists():
        return None
    sdir = spool.archive_spool_dir(settings.spool_path, wal)
    glob = _global_args()
    fp = globalargs.fingerprint(glob, os.environ)
    try:
        sdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return report_error(StorageError(f"cannot create the spool directory {sdir}: {e.strerror}",
                                         "set spool_path to a directory the postgres user can write"),
                            is_verbose())
    spool.drop_stale_ok(sdir, wal, fp)
    spawned = 0
    next_look = 0.0
    delay = 0.002
    deadline = time.monotonic() + WAIT_LIMIT
    log_path = sdir / f"{spool.PUSHD}.log"
    while True:
        if spool.acknowledged(sdir, wal, fp):
            return 0
        err = spool.take_error(sdir, wal.name) or spool.take_error(sdir, spool.PUSHD)
        if err:
            return report_error(PitrError(err[0], err[1]), is_verbose())
        now = time.monotonic()
        if now >= next_look:
            state = spool.helper_state(sdir, spool.PUSHD)
            if state is None:
                if spawned >= MAX_SPAWNS:
                    return report_error(PitrError(
                        f"the async archiver stopped without storing {wal.name}",
                        f"see {log_path}; or set archive_async = false"), is_verbose())
                spool.start_helper(spool.helper_argv(sys.executable, glob, PUSH_HELPER,
                                                     [os.path.abspath(wal.parent), os.path.abspath(sdir)]), log_path)
                spawned += 1
                next_look = now + 5.0
            elif state != fp:
                spool.request_stop(sdir, spool.PUSHD)  # it runs with outdated settings
                next_look = now + 0.2
            else:
                next_look = now + 1.0
        if now > deadline:
            return report_error(PitrError(f"the async archiver did not store {wal.name} within "
                                          f"{WAIT_LIMIT:.0f}s", f"see {log_path}"), is_verbose())
        time.sleep(delay)
        delay = min(0.02, delay * 1.5)


# --------------------------------------------------------------------------- wal-fetch prefetch

def serve_prefetched(settings: Settings, name: str, dest: str) -> int | None:
    """0 when the prefetcher served `name`, 1 when it found it missing, None to fetch directly."""
    import logging

    check_stage_env()
    if not spool.is_archive_name(name) or not _dest_dir_exists(dest):
        return None  # the direct path says what is wrong with DEST
    pdir = prefetch_dir(settings.spool_path, dest)
    try:
        glob = _global_args()
        fp = globalargs.fingerprint(glob, os.environ)
        if STAGE_ENV in os.environ and spool.helper_state(pdir, spool.PREFETCHD) not in (None, fp):
            # restore_command takes staged files unasked: a helper with other settings must go (it
            # empties the stage as it exits); the next call starts one with these
            spool.request_stop(pdir, spool.PREFETCHD)
        # start the helper now if needed and let it answer: its start-up costs what importing
        # boto3 here would, and every later call finds it warm
        state, why = spool.take_or_ask(pdir, name, dest, fp, lambda: _ensure_prefetcher(glob, pdir))
    except OSError:
        return None
    if state == "served":
        _ensure_prefetcher(glob, pdir)
        return 0
    if state == "missing":
        return 1
    if why:
        logging.getLogger("pitr").warning("%s", why)
    return None


def kick_prefetch(settings: Settings, name: str, dest: str) -> None:
    """Record `name` as PostgreSQL's latest request and make sure a prefetcher is running."""
    import logging

    if not spool.is_archive_name(name) or not _dest_dir_exists(dest):
        return
    pdir = prefetch_dir(settings.spool_path, dest)
    try:
        spool.write_want(pdir, name, served=True)
        _ensure_prefetcher(_global_args(), pdir)
    except OSError as e:
        logging.getLogger("pitr").warning("cannot start prefetching into %s: %s", pdir, e)


def _dest_dir_exists(dest: str) -> bool:
    """The spool beside DEST is created with its parents: never for a DEST whose directory is missing."""
    return os.path.isdir(os.path.dirname(dest) or ".")


def _ensure_prefetcher(glob: list[str], pdir: Path) -> bool:
    """Start the prefetcher unless one runs or recovery is not on (cwd is the data directory);
    True when this call started it."""
    if spool.helper_state(pdir, spool.PREFETCHD) is not None or not spool.in_archive_recovery(Path.cwd()):
        return False
    spool.start_helper(spool.helper_argv(sys.executable, glob, PREFETCH_HELPER, [os.path.abspath(pdir), os.getcwd()]),
                       pdir / f"{spool.PREFETCHD}.log")
    return True


# --------------------------------------------------------------------------- helper processes

def helper_main(command: str, global_args: list[str], pos: list[str], opts: dict[str, str]) -> int:
    """Entry of the hidden helper commands (started detached, stdout/stderr = their log file)."""
    import logging

    from pitr.cli.common import setup_logging
    from pitr.memtune import keep_heap_top

    setup_logging(1, False)
    if command != PUSH_HELPER:
        # the prefetcher's worker threads pass 16 MiB segments and S3 parts around (pinned threshold), and
        # each turns over 1 MiB pieces all the time (a heap top kept, not faulted in again per piece)
        keep_heap_top()
    # not the async archiver: each push allocates ~16 MiB for zstd's output and joins the envelope, and
    # mapping those anew every time (what the pinned threshold does) costs page faults and, with several
    # pushing threads in one process, waits on each other's mappings: a file-repository backlog drained at
    # 7.6-8.3 segments/s pinned, 10.6 not (docs/performance.md, ninth session); its RSS stays ~80 MiB
    for h in logging.getLogger("pitr").handlers:
        h.setFormatter(logging.Formatter(f"%(asctime)s pitr {command[1:]}[{os.getpid()}]: %(message)s"))
    if command == PUSH_HELPER and len(pos) == 2:
        return _push_helper(global_args, Path(pos[0]), Path(pos[1]), opts)
    if command == PREFETCH_HELPER and len(pos) == 2:
        return _prefetch_helper(global_args, Path(pos[0]), Path(pos[1]), opts)
    print(f"pitr: error: {command} is an internal command", file=sys.stderr)
    return 2


def _push_helper(glob: list[str], pg_wal: Path, sdir: Path, opts: dict[str, str]) -> int:
    import logging

    from pitr.cli.common import helper_log_level, open_log_file
    from pitr.cli.repoopen import open_repo
    from pitr.config import load_settings
    from pitr.errors import PitrError
    from pitr.ops.wal import pushd
    from pitr.repo.envelope import parse_codec
    from pitr.repo.meta import read_meta

    log = logging.getLogger("pitr")
    fd = spool.take_lock(sdir, spool.PUSHD)
    if fd is None:
        return 0  # another helper is running
    fp = globalargs.fingerprint(glob, os.environ)  # before the settings are read (see globalargs.fingerprint)
    spool.publish_fingerprint(fd, fp)
    (sdir / spool.PUSHD_EXITED).unlink(missing_ok=True)  # the one-liner waits for us again
    storage = None
    try:
        settings = load_settings(opts)
        open_log_file(settings.log_file, "wal-push-daemon", [])  # its pushes/fetches beside the callers' lines
        helper_log_level(settings.log_level)  # debug: each push's time (where archive lag comes from)
        jobs = max(1, settings.archive_push_jobs)
        storage = open_repo(settings, max_connections=jobs + 2)
        meta = read_meta(storage)

        def current_fp() -> str:
            return globalargs.fingerprint(glob, os.environ)

        token = _shell_token(glob)
        cfg = pushd.PushdConfig(pg_wal, sdir, fp, jobs, parse_codec(settings.wal_codec()), shell_token=token,
                                shell_ok=pushd.shell_ok_check(pg_wal.parent, fp, current_fp) if token else None)
        log.info("started: %d jobs into %s%s", jobs, storage.display,
                 " (archive_command's one-liner acknowledges from the shell)" if cfg.shell_ok else "")
        stats = pushd.serve(storage, meta, cfg, pushd.keep_going_checks(cfg, pg_wal.parent, current_fp))
        log.info("exiting (%s): %d pushed, %d failed", stats.reason, stats.pushed, stats.failed)
        return 0
    except PitrError as e:
        spool.write_error(sdir, spool.PUSHD, f"the async archiver cannot start: {e}", e.hint)
        log.error("cannot start: %s", e)
        return 1
    finally:
        with contextlib.suppress(OSError):
            (sdir / spool.PUSHD_EXITED).touch()  # before the lock goes: a successor removes it after taking it
        if storage is not None:
            storage.close()


def _shell_token(glob: list[str]) -> str | None:
    """The one-liner's token when this helper was started by its fallback with the options it names."""
    import logging

    from pitr.pg.archive_command import TOKEN_ENV

    token = os.environ.get(TOKEN_ENV)
    if not token:
        return None
    if token != globalargs.archive_token(glob):
        logging.getLogger("pitr").warning(
            "%s does not match the options archive_command passes pitr (edited by hand?): every file is "
            "acknowledged through `pitr wal-push`; print the line again with `pitr archive-command`", TOKEN_ENV)
        return None
    return token


def _idle_exit() -> float:
    from pitr.ops.wal.prefetch import IDLE_EXIT

    try:
        return max(0.1, float(os.environ.get(IDLE_EXIT_ENV, IDLE_EXIT)))
    except ValueError:
        return IDLE_EXIT


def _prefetch_helper(glob: list[str], pdir: Path, pgdata: Path, opts: dict[str, str]) -> int:
    import logging

    from pitr.cli.common import helper_log_level, open_log_file
    from pitr.cli.repoopen import open_repo, parse_as_of
    from pitr.config import load_settings
    from pitr.errors import PitrError
    from pitr.ops.wal import prefetch
    from pitr.repo.meta import read_meta

    log = logging.getLogger("pitr")
    staged = os.environ.get(STAGE_ENV) == pdir.name  # restore_command takes files from here unasked
    if staged:
        from pitr.ops.wal import stage

        os.umask(0o077)  # WAL is the cluster's data: nobody but the server's user reads a staged file
        stage.ensure(pdir)
        why = stage.problem(pdir)
        if why:
            log.error("not staging: %s (restore_command falls back to wal-fetch for every file)", why)
            req = spool.read_want(pdir)
            if req:
                try:
                    spool.answer(pdir, req[0], req[1], "failed")  # the waiting call fetches by itself
                except OSError:
                    pass
            return 1
    fd = spool.take_lock(pdir, spool.PREFETCHD)
    if fd is None:
        return 0
    fp = globalargs.fingerprint(glob, os.environ)
    spool.publish_fingerprint(fd, fp)
    storage = None
    if staged:
        prefetch.clear(pdir, want=False)  # whatever an earlier helper left: only this one's files are served
        (pdir / stage.EXITED).unlink(missing_ok=True)  # the one-liner may ask us (docs/restore.md §5)
    try:
        settings = load_settings(opts)
        open_log_file(settings.log_file, "wal-prefetch", [])  # its pushes/fetches beside the callers' lines
        helper_log_level(settings.log_level)  # debug: each request and each "not archived" answer
        jobs = prefetch.fetch_workers(settings.prefetch, settings.prefetch_jobs, settings.jobs,
                                      settings.location().kind == "s3")
        # a restore --repo-as-of reads the bucket's past (PITR_REPO_AS_OF in restore_command)
        storage = open_repo(settings, max_connections=jobs + 2, as_of=parse_as_of(None))
        meta = read_meta(storage)
        cfg = prefetch.PrefetchConfig(pdir, fp, settings.prefetch, jobs, idle_exit=_idle_exit(), stage=staged)
        log.info("started: %d segments ahead, %d jobs, from %s", settings.prefetch, jobs, storage.display)
        checks = prefetch.keep_going_checks(pgdata, pdir)

        def keep_going() -> str | None:
            if not staged:
                return checks()
            if not pdir.is_dir():
                return "the stage was removed"
            # the one-liner asks us without wal-fetch's fingerprint check: leave when our settings are
            # outdated (a config file edited), so that its next wal-fetch starts a helper with the new ones
            return checks() or (None if globalargs.fingerprint(glob, os.environ) == fp else "settings changed")

        reason, fetched = prefetch.serve(storage, meta, cfg, keep_going)
        # its CPU (all threads): what staging ahead costs beside replay on the same cores (docs/performance.md)
        log.info("exiting (%s): %d segments prefetched, %.2f s of CPU", reason, fetched, time.process_time())
        return 0
    except PitrError as e:
        log.error("cannot prefetch: %s", e)  # wal-fetch itself still works without us
        req = spool.read_want(pdir)
        if req:
            spool.answer(pdir, req[0], req[1], "failed")  # the waiting call fetches by itself now
        return 1
    finally:
        prefetch.clear(pdir)
        if staged:
            with contextlib.suppress(OSError):  # the stage may be gone (restore removed it)
                (pdir / stage.EXITED).touch()  # before the lock goes: a successor removes it after taking it
        if storage is not None:
            storage.close()
