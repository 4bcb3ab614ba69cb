"""The newest complete backup and the newest passing drill, with their times (check --max-*-age).

Reads little: one listing of backups/ (or drills/) and then manifests (records) newest first,
until one is readable and belongs to this cluster.
"""

from __future__ import annotations

from pitr.errors import PitrError
from pitr.ops.recovery.restore_plan import parse_iso
from pitr.repo import drills
from pitr.repo.manifest import list_backup_ids, read_manifest
from pitr.repo.meta import RepoMeta
from pitr.storage.base import Storage


def newest_backup(storage: Storage, meta: RepoMeta) -> tuple[str, float] | None:
    """(id, stop time) of the newest complete backup of this repository's cluster."""
    for bid in reversed(list_backup_ids(storage)):
        try:
            m = read_manifest(storage, bid)
            if m.system_identifier != meta.system_identifier:
                continue
            return m.id, parse_iso(m.stop_time).timestamp()
        except (PitrError, ValueError):
            continue  # an unreadable manifest is no backup; an older one may be
    return None


def newest_passing_drill(storage: Storage, meta: RepoMeta) -> tuple[str, float] | None:
    """(id, start time) of the newest drill that passed."""
    rec = drills.newest(storage, passed_only=True)
    if rec is None:
        return None
    try:
        return str(rec["id"]), parse_iso(str(rec["started"])).timestamp()
    except (KeyError, ValueError):
        return None
