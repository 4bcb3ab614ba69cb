"""Shared CLI plumbing that must stay light (used by the fast wal-push/wal-fetch path too).

- hoist_globals(): global options (--repo, --config, --s3-endpoint, -v, -q) may be written
  before or after the command name; we move them to the front so one parser owns them.
- setup_logging(), report_error(): stderr conventions (one sentence + hint; traceback with -v);
  both pass what they print through pitr.redact, so no credential reaches stderr or a log.
- GlobalOpts, settings_of(): the global options typer parsed (cli/app's callback keeps them on the
  context) and every command's Settings from them plus its own options; here rather than in
  cli/app so that the command modules do not import the app that imports them.
- open_log_file(), log_exit(): the `log_file` setting (`--log-file PATH`): the same records with a
  UTC timestamp, pid and command, at least at info level (what -v shows), one line per record
  appended with a single write(2), so concurrent pitr processes never interleave (docs/configuration.md).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

from pitr.cli.globalargs import GLOBAL_OPTIONS, is_log_flag
from pitr.errors import PitrError
from pitr.redact import redact

if TYPE_CHECKING:
    import typer

    from pitr.config import Settings


def hoist_globals(argv: list[str]) -> list[str]:
    """Move global options anywhere in argv to its front (stops at a literal '--')."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest.extend(argv[i:])
            break
        name = a.split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            front.append(a)
            if GLOBAL_OPTIONS[name] and "=" not in a and i + 1 < len(argv):
                front.append(argv[i + 1])
                i += 1
        elif is_log_flag(a):
            front.append(a)  # -vv
        else:
            rest.append(a)
        i += 1
    return front + rest


def log_level(verbose: int, quiet: bool) -> int:
    if verbose:
        return logging.DEBUG if verbose > 1 else logging.INFO
    if quiet:
        return logging.ERROR
    env = os.environ.get("PITR_LOG_LEVEL", "").strip().upper()
    if env in ("DEBUG", "INFO", "WARNING", "ERROR"):
        return int(getattr(logging, env))
    return logging.WARNING


_FLAGS_SET_LEVEL = False  # -v/-q given: they beat the log_level setting
_VERBOSE_FLAG = False  # -v given: the only thing that shows tracebacks (log_level=info does not)


class _RedactingFormatter(logging.Formatter):
    """Log lines (messages from libpq, botocore, archive_command values) with credentials masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    global _FLAGS_SET_LEVEL, _VERBOSE_FLAG, _STDERR
    _FLAGS_SET_LEVEL = bool(verbose or quiet)
    _VERBOSE_FLAG = verbose > 0
    level = log_level(verbose, quiet)
    root = logging.getLogger("pitr")
    if not root.handlers:
        _STDERR = logging.StreamHandler(sys.stderr)
        _STDERR.setFormatter(_RedactingFormatter("pitr: %(message)s"))
        root.addHandler(_STDERR)
    root.propagate = False
    _set_level(level)


def apply_log_level(setting: str) -> None:
    """Once settings are loaded: their log_level (PITR_LOG_LEVEL > config file) unless -v/-q was given."""
    if not _FLAGS_SET_LEVEL:
        _set_level(getattr(logging, setting.upper()))


def helper_log_level(setting: str) -> None:
    """The helpers log at info into their own log file; at debug when the log_level setting asks."""
    if setting == "debug":
        _set_level(logging.DEBUG)


_STDERR: logging.Handler | None = None
_FILE: _AppendLines | None = None


def _set_level(level: int) -> None:
    """stderr shows `level`; the log file at least info (what -v shows): the logger passes the lower."""
    if _STDERR is not None:
        _STDERR.setLevel(level)
    if _FILE is not None:
        _FILE.setLevel(min(level, logging.INFO))
        level = min(level, logging.INFO)
    logging.getLogger("pitr").setLevel(level)


class _AppendLines(logging.Handler):
    """Each record as one line, appended to a file opened O_APPEND with one write(2): PostgreSQL runs
    several wal-push at once, and their lines must never interleave or overwrite each other."""

    def __init__(self, path: str, fd: int, command: str) -> None:
        super().__init__()
        self.path, self.fd, self.command, self.failed = path, fd, command, False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record).replace("\r", "\\r").replace("\n", "\\n")  # a traceback too: one line
            os.write(self.fd, (text + "\n").encode("utf-8", "backslashreplace"))
        except OSError as e:  # a full disk must not fail an archive_command: say it once, go on
            if not self.failed:
                self.failed = True
                print(redact(f"pitr: warning: cannot write the log file {self.path}: {e.strerror}"), file=sys.stderr)


class _FileFormatter(_RedactingFormatter):
    """`2026-11-30T02:18:13.123Z pitr[4242] wal-push INFO: message` (UTC, redacted)."""

    def __init__(self, command: str) -> None:
        super().__init__(f"%(asctime)s pitr[%(process)d] {command or '-'} %(levelname)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def open_log_file(path: str | None, command: str, argv: list[str] | None = None) -> None:
    """Append this process's log records to `path` too (the log_file setting); a no-op without one.

    A file that cannot be opened is a warning, not an error: an archive_command that fails over its
    log would stop archiving. The first line names the command run (redacted like every line).
    """
    global _FILE
    if not path or (_FILE is not None and _FILE.path == path):
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as e:
        print(redact(f"pitr: warning: cannot open the log file {path}: {e.strerror}; logging to stderr only"),
              file=sys.stderr)
        return
    root = logging.getLogger("pitr")
    if _FILE is not None:
        root.removeHandler(_FILE)
        os.close(_FILE.fd)
    _FILE = _AppendLines(path, fd, command)
    _FILE.setFormatter(_FileFormatter(command))
    root.addHandler(_FILE)
    _set_level(_STDERR.level if _STDERR is not None else root.level)
    args = sys.argv[1:] if argv is None else argv
    _to_file(logging.INFO, "started: pitr %s (pitr %s)", " ".join(args), _pitr_version())


def _pitr_version() -> str:
    from pitr import __version__

    return __version__


def _to_file(level: int, msg: str, *args: object, exc: BaseException | None = None) -> None:
    """A record for the log file only (stderr has it already, printed by report_error, or needs none)."""
    if _FILE is None:
        return
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    _FILE.handle(logging.getLogger("pitr").makeRecord("pitr", level, __file__, 0, msg, args, exc_info))


def log_exit(rc: int, started: float | None = None) -> int:
    """Note the exit status in the log file (cron and systemd runs read it there); returns rc."""
    if started is not None:
        _to_file(logging.INFO, "exit %d after %.1fs", rc, time.monotonic() - started)
    else:
        _to_file(logging.INFO, "exit %d", rc)
    return rc


def is_verbose() -> bool:
    """-v was given: errors come with their traceback."""
    return _VERBOSE_FLAG


def report_error(err: BaseException, verbose: bool) -> int:
    """Print one sentence (+ hint) on stderr and return the exit code to use."""
    if verbose:
        print(redact("".join(traceback.format_exception(err))), end="", file=sys.stderr)
    if isinstance(err, PitrError):
        print(redact(f"pitr: error: {err}"), file=sys.stderr)
        if err.hint:
            print(redact(f"hint: {err.hint}"), file=sys.stderr)
        _to_file(logging.ERROR, "%s%s", err, f" (hint: {err.hint})" if err.hint else "",
                 exc=err if verbose else None)
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        print("pitr: interrupted", file=sys.stderr)
        _to_file(logging.ERROR, "interrupted")
        return 130
    _to_file(logging.ERROR, "internal error: %s: %s", type(err).__name__, err, exc=err)  # the traceback, always
    print(redact(f"pitr: internal error: {type(err).__name__}: {err}"), file=sys.stderr)
    if not verbose:
        print("hint: run again with -v for the details and report it", file=sys.stderr)
    return 1


class GlobalOpts:
    """The global options given to the typer app (--repo, --config, --s3-endpoint; None = not given)."""

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self.values: dict[str, Any] = values if values is not None else {}


def settings_of(ctx: typer.Context, **options: Any) -> Settings:
    """Settings from the global options plus a command's own (None = not given)."""
    from pitr.config import load_settings  # not at import: the fast path reads its settings itself

    obj = ctx.find_object(GlobalOpts)
    merged = dict(obj.values if obj else {})
    merged.update(options)
    s = load_settings(merged)
    apply_log_level(s.log_level)
    open_log_file(s.log_file, ctx.info_name or "")
    return s
