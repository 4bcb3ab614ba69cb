"""`restore --db-include NAME`: restore only some databases (pgBackRest's approach).

The backup records its databases (`extra.databases`, {oid: name}, read from pg_database when the
backup stopped). The named databases and the system ones (template0, template1, postgres) are
restored as usual. Every relation file of the other databases (base/<oid>/<digits>[_fork][.n], and
the same under pg_tblspc/<spc>/<PG_ver>/<oid>/) is written as a *sparse file of zeroes* of its
original size instead of being fetched: the directories, PG_VERSION and pg_filenode.map stay real,
so PostgreSQL starts and WAL replay finds every block it expects (the first change of a block after
the backup's checkpoint carries a full page image). Those databases are unusable afterwards: the
DBA drops them (docs/restore.md). The restored directory names them in `pitr-excluded-databases`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from pitr.errors import RestoreError, UsageError
from pitr.repo.manifest import FileEntry, Manifest

SYSTEM_DATABASES = ("template0", "template1", "postgres")
NOTE_FILE = "pitr-excluded-databases"
_REL = re.compile(r"^(?:base|pg_tblspc/\d+/[^/]+)/(\d+)/(\d+)(?:_(?:fsm|vm|init))?(?:\.\d+)?$")


def databases(m: Manifest) -> dict[int, str]:
    """{oid: name} the backup recorded; RestoreError for a backup taken before pitr recorded it."""
    raw = m.extra.get("databases") if isinstance(m.extra, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise RestoreError(f"backup {m.id} does not record its databases (taken by an older pitr), so "
                           "--db-include cannot tell them apart",
                           "restore without --db-include, or take a new backup and restore from it")
    out: dict[int, str] = {}
    for k, v in raw.items():  # untrusted: only plain OIDs and names
        if not (isinstance(k, str) and k.isdigit() and isinstance(v, str) and 0 < len(v) < 64):
            raise RestoreError(f"backup {m.id} records a malformed database entry ({k!r}: {v!r})")
        out[int(k)] = v
    return out


def excluded(m: Manifest, include: Sequence[str]) -> dict[int, str]:
    """{oid: name} of the databases NOT restored; UsageError for a name the backup does not have."""
    dbs = databases(m)
    names = set(dbs.values())
    unknown = [n for n in include if n not in names]
    if unknown:
        raise UsageError(f"--db-include {unknown[0]!r}: backup {m.id} has no database of that name",
                         f"its databases are {', '.join(sorted(names))}")
    keep = set(include) | set(SYSTEM_DATABASES)
    return {oid: name for oid, name in dbs.items() if name not in keep}


def is_excluded(path: str, oids: Iterable[int]) -> bool:
    """A relation file of one of these databases (not PG_VERSION, pg_filenode.map, ...)."""
    m = _REL.match(path)
    return m is not None and int(m.group(1)) in set(oids)


def split(files: Sequence[FileEntry], oids: dict[int, str]) -> tuple[list[FileEntry], list[FileEntry]]:
    """(files to restore, relation files of excluded databases to write as sparse zeroes)."""
    keep: list[FileEntry] = []
    zero: list[FileEntry] = []
    s = set(oids)
    for f in files:
        (zero if is_excluded(f.path, s) else keep).append(f)
    return keep, zero


def write_sparse(entries: Sequence[tuple[FileEntry, Path]], owner: tuple[int, int] | None) -> int:
    """Create each file as a hole of its original size; returns the count."""
    for e, dest in entries:
        tmp = dest.with_name(f".{dest.name}.pitr-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, (e.mode & 0o7777) or 0o600)
            if owner is not None:
                os.fchown(fd, *owner)
            os.ftruncate(fd, e.size)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    return len(entries)


def note_text(oids: dict[int, str]) -> str:
    names = ", ".join(sorted(oids.values()))
    return (f"pitr restore --db-include left these databases out: {names}\n"
            "Their files are empty (zeroes): the databases are unusable. Drop them:\n"
            + "".join(f"  DROP DATABASE {_ident(n)};\n" for n in sorted(oids.values())))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
