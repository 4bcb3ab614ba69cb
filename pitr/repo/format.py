"""Object keys of the repository format and its version (docs/repository-format.md)."""

from __future__ import annotations

import re

from pitr.pg import walname

FORMAT_VERSION = 1  # what plain repositories and full backups' manifests are written as
ENCRYPTED_FORMAT_VERSION = 2  # pitr.json of an encrypted repository (docs/repository-format.md §9)
MAX_FORMAT_VERSION = 2  # the newest repository format this pitr reads
# diff/incr manifests: an older pitr must refuse them ("upgrade pitr") rather than restore a file
# whose blocks live in other backups (docs/repository-format.md §6.2)
INCR_MANIFEST_FORMAT = 3
# any manifest with a format-2 block map (BLAKE3, delta over a base, bound by map.sha256): an older
# pitr would misread the maps (docs/repository-format.md §6.2.1)
MAP2_MANIFEST_FORMAT = 4
# any manifest with a `blake3` file digest (the file's envelope is version 2): an older pitr would see
# no digest and refuse every file, or worse (docs/repository-format.md §6.2)
BLAKE3_MANIFEST_FORMAT = 5
MAX_MANIFEST_FORMAT = 5  # the newest manifest format this pitr reads
META_KEY = "pitr.json"
WAL_PREFIX = "wal/"
HISTORY_PREFIX = "wal/history/"
BACKUP_PREFIX = "backups/"


def wal_key(name: str) -> str:
    """wal/<timeline+log>/<name> for segments, .partial, .backup; wal/history/<name> for .history."""
    w = walname.parse(name)
    if w is None:
        raise ValueError(f"not a WAL archive file name: {name!r}")
    if w.kind == "history":
        return HISTORY_PREFIX + name
    return f"{WAL_PREFIX}{name[:16]}/{name}"


_BACKUP_ID = re.compile(r"[0-9]{8}T[0-9]{6}F(-[1-9][0-9]{0,5})?")


def is_backup_id(s: object) -> bool:
    """20261125T221530F or 20261125T221530F-2: the only IDs pitr writes (and sorts by time)."""
    return isinstance(s, str) and s.isascii() and _BACKUP_ID.fullmatch(s) is not None


def backup_dir(backup_id: str) -> str:
    return f"{BACKUP_PREFIX}{backup_id}/"


def started_key(backup_id: str) -> str:
    """The backup-in-progress marker: JSON {pid, host, started, and once the server has started the
    backup start_lsn, start_time}. Written first (claiming the ID), deleted after the manifest;
    `expire` keeps WAL from start_lsn on while it is fresh (docs/repository-format.md)."""
    return f"{BACKUP_PREFIX}{backup_id}/started"


def manifest_key(backup_id: str) -> str:
    return f"{BACKUP_PREFIX}{backup_id}/manifest"


def backup_data_key(backup_id: str, n: int) -> str:
    return f"{BACKUP_PREFIX}{backup_id}/data/{n:06d}"
