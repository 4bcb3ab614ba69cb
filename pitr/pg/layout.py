"""What a base backup of a data directory copies, skips, and keeps as an empty directory.

Pure knowledge (no I/O), after PostgreSQL's documentation ("Backing Up / Making a Base Backup
Using the Low Level API": what a base backup may omit) and pg_basebackup's exclusion lists:

- directories kept but emptied: pg_wal (its subdirectories archive_status, summaries are kept
  empty too), pg_replslot, pg_dynshmem, pg_notify, pg_serial, pg_snapshots, pg_stat_tmp,
  pg_subtrans, and a stats_temp_directory configured inside PGDATA (PostgreSQL 13/14);
- files skipped anywhere: postmaster.pid/.opts, backup_label/tablespace_map/backup_manifest left
  by an earlier backup (a restore writes the ones of *this* backup), postgresql.auto.conf.tmp,
  current_logfiles(.tmp), standby.signal/recovery.signal (a restore decides the mode),
  pg_internal.init* (the relcache init file is rebuilt at start);
- pgsql_tmp* files and directories anywhere; in database directories, temporary relations
  (t<backend>_<relfilenode>…) and unlogged relations except their init forks (a restore starts
  an unlogged relation empty from its init fork, exactly as crash recovery does).

A restore recreates every directory the manifest lists plus REQUIRED_DIRS.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# directories whose contents are skipped (the directory itself is kept, with its mode)
EMPTY_DIRS = frozenset({
    "pg_wal", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots", "pg_stat_tmp",
    "pg_subtrans",
})

# file names skipped wherever they are
SKIP_FILES = frozenset({
    "postmaster.pid", "postmaster.opts",
    "backup_label", "tablespace_map", "backup_manifest",
    "postgresql.auto.conf.tmp", "current_logfiles", "current_logfiles.tmp",
    "standby.signal", "recovery.signal",
})

# directories a started server needs even if a backup leaves them out or empty (restore creates them, 0700;
# pg_wal/summaries too from PostgreSQL 17)
REQUIRED_DIRS = ("pg_wal", "pg_wal/archive_status", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial",
                 "pg_snapshots", "pg_stat_tmp", "pg_subtrans", "pg_logical", "pg_logical/snapshots",
                 "pg_logical/mappings", "pg_twophase", "pg_commit_ts", "pg_multixact",
                 "pg_multixact/members", "pg_multixact/offsets", "pg_xact", "pg_stat", "pg_tblspc", "global",
                 "base")

TEMP_PREFIX = "pgsql_tmp"
RELCACHE_INIT = "pg_internal.init"
CONTROL_FILE = "global/pg_control"

# a relation file: <relfilenode>[_fork][.segment]
_REL_FILE = re.compile(r"^(\d+)(?:_(fsm|vm|init))?(?:\.(\d+))?$")
# a temporary relation: t<backend id>_<relfilenode>[_fork][.segment]
_TEMP_REL = re.compile(r"^t\d+_\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?$")
_DB_DIR = re.compile(r"^(?:base/\d+|pg_tblspc/\d+/[^/]+/\d+)$")


def tablespace_version_dir(major: int, catalog_version: int) -> str:
    """The per-version subdirectory PostgreSQL uses inside a tablespace location (PG_15_202209061)."""
    return f"PG_{major}_{catalog_version}"


def is_db_dir(rel_dir: str) -> bool:
    """base/<dboid> or pg_tblspc/<spcoid>/<version dir>/<dboid>: where relation files live."""
    return bool(_DB_DIR.match(rel_dir))


def empties_contents(rel_dir: str, extra_empty: Iterable[str] = ()) -> bool:
    """True for a directory kept in the backup without any of its contents."""
    return rel_dir in EMPTY_DIRS or rel_dir in set(extra_empty)


def keeps_subdirs_of(rel_dir: str) -> bool:
    """pg_wal's subdirectories (archive_status, summaries) are kept, empty; other emptied dirs lose theirs."""
    return rel_dir == "pg_wal" or rel_dir.startswith("pg_wal/")


def skip_name(name: str) -> bool:
    """A file or directory name skipped wherever it appears."""
    return name in SKIP_FILES or name.startswith(TEMP_PREFIX) or name.startswith(RELCACHE_INIT)


def relation_file(name: str) -> tuple[int, str, int] | None:
    """(relfilenode, fork, segment) of a relation file name, or None. fork is 'main' for no suffix."""
    m = _REL_FILE.match(name)
    if not m:
        return None
    return int(m.group(1)), m.group(2) or "main", int(m.group(3) or 0)


def is_temp_relation(name: str) -> bool:
    return bool(_TEMP_REL.match(name))


def db_dir_skips(names: Iterable[str]) -> set[str]:
    """Names in one database directory that a backup skips: temporary relations, and every fork of an
    unlogged relation (one that has an _init fork) except the init fork itself."""
    names = list(names)
    unlogged = set()
    for n in names:
        r = relation_file(n)
        if r is not None and r[1] == "init":
            unlogged.add(r[0])
    out = set()
    for n in names:
        if is_temp_relation(n):
            out.add(n)
            continue
        r = relation_file(n)
        if r is not None and r[0] in unlogged and r[1] != "init":
            out.add(n)
    return out


def stats_temp_rel(setting: str | None, pgdata: str) -> str | None:
    """stats_temp_directory (PostgreSQL 13/14) as a path relative to PGDATA, if it lies inside it."""
    if not setting:
        return None
    s = setting.rstrip("/")
    if s.startswith("/"):
        root = pgdata.rstrip("/") + "/"
        return s[len(root):] if s.startswith(root) else None
    return s[2:] if s.startswith("./") else s


def has_page_checksums(rel_path: str) -> bool:
    """Files made of checksummed pages: relation files in global/ and database directories."""
    d, _, name = rel_path.rpartition("/")
    return relation_file(name) is not None and (d == "global" or is_db_dir(d))
