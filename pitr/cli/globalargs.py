"""Global options as argv carries them, read without typer: the quick path's view of the settings.

archive_command and restore_command run once per WAL file, and cli/asyncwal.quick answers from
the spools before anything heavy is imported (standard library only, like ops/wal/spool). What it
needs of the command line is here: which global options there are (cli/common.hoist_globals and
cli/fast parse with the same table), the split of `[globals] COMMAND POS...`, the config file the
settings would be read from, and a fingerprint of every input of the settings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# global option -> takes a value
GLOBAL_OPTIONS = {"--repo": True, "--config": True, "--s3-endpoint": True, "-v": False, "--verbose": False,
                  "-q": False, "--quiet": False, "--log-file": True}
VALUE_OPTIONS = tuple(o for o, takes_value in GLOBAL_OPTIONS.items() if takes_value)
DEFAULT_CONFIG = "/etc/pitr/pitr.toml"  # same default as pitr.config (not imported: it is heavy)
# env that feeds Settings and names the repository; credentials do not change where bytes go
_ENV_PREFIXES = ("PITR_",)
_ENV_NAMES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
# secrets stay out of the spool, even hashed (a fast hash of a passphrase invites guessing); a changed
# passphrase does not change where WAL goes, and a wrong one makes the helper fail and say so
_ENV_SECRETS = ("PITR_ENCRYPTION_PASSPHRASE", "PITR_NEW_ENCRYPTION_PASSPHRASE")


def config_file(global_args: list[str], env: Mapping[str, str]) -> str:
    for i, a in enumerate(global_args):
        if a == "--config" and i + 1 < len(global_args):
            return global_args[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return env.get("PITR_CONFIG") or DEFAULT_CONFIG


def fingerprint(global_args: list[str], env: Mapping[str, str]) -> str:
    """A digest of everything that decides the settings: global options, PITR_* env, config file.

    Settings are a pure function of these inputs, so equal fingerprints mean the same repository
    and the same async/prefetch choice, without paying for parsing the settings.
    """
    import hashlib

    args = [a for a in global_args if not is_log_flag(a)]
    cfg = config_file(global_args, env)
    try:
        st = os.stat(cfg)
        cfg_sig = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        cfg_sig = "-"
    envs = sorted((k, v) for k, v in env.items()
                  if (k.startswith(_ENV_PREFIXES) and k != "PITR_LOG_LEVEL" and k not in _ENV_SECRETS)
                  or k in _ENV_NAMES)
    text = repr((args, envs, cfg, cfg_sig))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def archive_token(global_args: list[str]) -> str:
    """The archive one-liner's token: a digest of the global options its fallback passes pitr.

    `pitr archive-command` writes it into the line, the async archiver computes it from its own
    options: a helper started with other options (another repository) never writes a marker the
    line accepts. The environment and the config file are the helper's own checks (pushd)."""
    import hashlib

    args = [a for a in global_args if not is_log_flag(a)]
    return hashlib.sha256("\0".join(["pitr-archive-1", *args]).encode()).hexdigest()[:16]


def is_log_flag(arg: str) -> bool:
    """-v, -q, -vv, --verbose, --quiet: flags that change only logging, never where WAL goes."""
    return arg in ("--verbose", "--quiet") or (len(arg) > 1 and arg[0] == "-" and arg[1] != "-"
                                               and set(arg[1:]) <= {"v", "q"})


def split_global_args(argv: list[str], npos: int) -> list[str] | None:
    """argv = [global options...] COMMAND POS... -> the global options, or None when not that shape.

    pitr/__main__._is_wal_fetch walks argv the same way on purpose: its guard must work even when
    importing pitr.cli fails, so it keeps its own copy of this loop and of VALUE_OPTIONS."""
    head = argv[: len(argv) - npos - 1]
    i = 0
    while i < len(head):
        a = head[i]
        if a in VALUE_OPTIONS:
            i += 2
            continue
        if not a.startswith("-"):
            return None
        i += 1
    return head if i == len(head) else None
