"""Shared CLI plumbing that must stay light (used by the fast wal-push/wal-fetch path too).

- hoist_globals(): global options (--repo, --config, --s3-endpoint, -v, -q) may be written
  before or after the command name; we move them to the front so one parser owns them.
- setup_logging(), report_error(): stderr conventions (one sentence + hint; traceback with -v);
  both pass what they print through pitr.redact, so no credential reaches stderr or a log.
- GlobalOpts, settings_of(): the global options typer parsed (cli/app's callback keeps them on the
  context) and every command's Settings from them plus its own options; here rather than in
  cli/app so that the command modules do not import the app that imports them.
"""

from __future__ import annotations

import logging
import os
import sys
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
    global _FLAGS_SET_LEVEL, _VERBOSE_FLAG
    _FLAGS_SET_LEVEL = bool(verbose or quiet)
    _VERBOSE_FLAG = verbose > 0
    level = log_level(verbose, quiet)
    root = logging.getLogger("pitr")
    root.setLevel(level)
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(_RedactingFormatter("pitr: %(message)s"))
        root.addHandler(h)
    root.propagate = False


def apply_log_level(setting: str) -> None:
    """Once settings are loaded: their log_level (PITR_LOG_LEVEL > config file) unless -v/-q was given."""
    if not _FLAGS_SET_LEVEL:
        logging.getLogger("pitr").setLevel(getattr(logging, setting.upper()))


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
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        print("pitr: interrupted", file=sys.stderr)
        return 130
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
    return s
