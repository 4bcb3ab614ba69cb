"""The repository's metadata object (pitr.json): which cluster this repo belongs to.

Plain JSON so a human can read it; written once with a conditional put and never changed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from pitr.errors import ForeignClusterError, IntegrityError, NotFoundError, NotInitializedError
from pitr.repo.format import FORMAT_VERSION, META_KEY
from pitr.storage.base import Storage

SMALL_JSON_MAX = 1 << 16  # pitr.json and restore-point records are a few hundred bytes


@dataclass(frozen=True)
class RepoMeta:
    format: int
    system_identifier: int
    pg_version: int  # major version (15, 18, ...)
    wal_segment_size: int
    created: str

    def to_json(self) -> bytes:
        d = asdict(self)
        d["system_identifier"] = str(self.system_identifier)  # exceeds JSON-safe integers
        return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> RepoMeta:
        try:
            d = json.loads(data)
            meta = cls(int(d["format"]), int(d["system_identifier"]), int(d["pg_version"]),
                       int(d["wal_segment_size"]), str(d.get("created", "")))
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"repository metadata {META_KEY} is malformed: {e}") from None
        if meta.format > FORMAT_VERSION:
            raise IntegrityError(f"the repository uses format {meta.format}; this pitr reads up to "
                                 f"{FORMAT_VERSION}", "upgrade pitr")
        return meta


def new_meta(system_identifier: int, pg_version: int, wal_segment_size: int) -> RepoMeta:
    return RepoMeta(FORMAT_VERSION, system_identifier, pg_version, wal_segment_size,
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def read_meta(storage: Storage) -> RepoMeta:
    """The repo's metadata; NotInitializedError when `pitr init` has not run."""
    try:
        return RepoMeta.from_json(storage.get(META_KEY, max_size=SMALL_JSON_MAX))
    except NotFoundError:
        raise NotInitializedError(
            f"the repository {storage.display} is not initialized",
            "run `pitr init` (with the cluster running) first",
        ) from None


def check_cluster(meta: RepoMeta, system_identifier: int, storage: Storage) -> None:
    if meta.system_identifier != system_identifier:
        raise ForeignClusterError(
            f"the repository {storage.display} belongs to the cluster with system identifier "
            f"{meta.system_identifier}, not this one ({system_identifier})",
            "use one repository (or prefix) per cluster",
        )
