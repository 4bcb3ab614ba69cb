"""Named restore points recorded in the repository (restore-points/<quoted name>.json).

PostgreSQL keeps a restore point only as a WAL record, so a restore to `--target-name` could
not tell which base backup precedes it and had to start from the newest one, which misses a
point older than that backup. `pitr restore-point` therefore also records the point's LSN,
timeline and time here; restore uses it to pick the newest backup consistent before the point.
A name PostgreSQL knows but the repository does not (created with plain SQL) still restores,
from the newest backup, as before. Plain JSON, one object per name; a name created again
replaces the record, as the newest point is what a DBA means by it (docs/repository-format.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from urllib.parse import quote

from pitr.errors import IntegrityError, NotFoundError
from pitr.repo.meta import SMALL_JSON_MAX
from pitr.storage.base import Storage

PREFIX = "restore-points/"


@dataclass(frozen=True)
class RestorePointRecord:
    name: str
    lsn: str  # "16/B374D848"
    timeline: int
    time: str  # ISO-8601 UTC, when pg_create_restore_point returned
    system_identifier: int

    def to_json(self) -> bytes:
        d = asdict(self)
        d["system_identifier"] = str(self.system_identifier)
        return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> RestorePointRecord | None:
        try:
            d = json.loads(data)
            return cls(str(d["name"]), str(d["lsn"]), int(d["timeline"]), str(d["time"]),
                       int(d["system_identifier"]))
        except (ValueError, KeyError, TypeError):
            return None  # a damaged record only costs the backup choice; restore falls back


def key_of(name: str) -> str:
    # names may hold '/', spaces, anything up to 63 bytes: quote every byte outside [A-Za-z0-9_.-~]
    return PREFIX + quote(name, safe="") + ".json"


def record(storage: Storage, rp: RestorePointRecord) -> None:
    storage.put(key_of(rp.name), rp.to_json())


def lookup(storage: Storage, name: str) -> RestorePointRecord | None:
    try:
        return RestorePointRecord.from_json(storage.get(key_of(name), max_size=SMALL_JSON_MAX))
    except (NotFoundError, IntegrityError):  # oversized: as damaged, restore falls back
        return None


def list_points(storage: Storage) -> list[RestorePointRecord]:
    out = []
    for o in storage.list(PREFIX):
        if not o.key.endswith(".json"):
            continue
        try:
            rp = RestorePointRecord.from_json(storage.get(o.key, max_size=SMALL_JSON_MAX))
        except NotFoundError:
            continue  # deleted while listing
        except IntegrityError:
            continue  # oversized: as damaged
        if rp is not None:
            out.append(rp)
    return sorted(out, key=lambda r: (r.time, r.name))
