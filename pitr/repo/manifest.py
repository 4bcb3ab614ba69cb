"""A backup's manifest: the commit point of a backup (written last, deleted first).

Stored at backups/<ID>/manifest as a zstd envelope of UTF-8 JSON. Lists every file with its
size, SHA-256 and where its envelope sits (object key relative to the backup dir, offset and
length inside that object: small files share "bundle" objects, large ones have their own).
Schema: docs/repository-format.md.
"""

from __future__ import annotations

import builtins
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pitr.errors import IntegrityError, NotFoundError
from pitr.repo import codec as envelope
from pitr.repo.format import BACKUP_PREFIX, FORMAT_VERSION, manifest_key
from pitr.storage.base import Storage

# A manifest is JSON with a SHA-256 per file: it compresses a few-fold, never a hundred-fold. Its
# decoded size is capped in proportion to the stored size (and absolutely), so a planted object
# cannot make `info` or `restore` decompress gigabytes (docs/repository-format.md).
MANIFEST_MAX_SIZE = 1 << 30
MANIFEST_MAX_RATIO = 64


def manifest_cap(stored_size: int) -> int:
    return min(MANIFEST_MAX_SIZE, (64 << 20) + MANIFEST_MAX_RATIO * stored_size)


@dataclass
class FileEntry:
    path: str  # relative to PGDATA ("base/1/1259", "pg_tblspc/16385/PG_15_202209061/5/16386")
    size: int  # raw bytes
    sha256: str  # hex of the raw bytes ("" for size 0)
    mode: int  # st_mode & 0o7777
    mtime: float
    object: str | None  # key relative to backups/<ID>/ ("data/000003"); None for an empty file
    offset: int = 0  # of the file's envelope inside the object
    length: int = 0  # of the file's envelope
    bad_pages: list[int] = field(default_factory=list)  # blocks whose page checksum failed


@dataclass
class DirEntry:
    path: str
    mode: int


@dataclass
class Tablespace:
    oid: str
    location: str  # absolute path on the source host


@dataclass
class Manifest:
    id: str
    type: str  # "full" (| "incr" later)
    system_identifier: int
    pg_version: int  # major
    pg_version_num: int
    wal_segment_size: int
    timeline: int
    start_lsn: str
    stop_lsn: str
    start_wal: str
    stop_wal: str
    start_time: str  # ISO-8601 UTC
    stop_time: str  # ISO-8601 UTC: when pg_backup_stop returned (the consistent point is at or before)
    compress: str
    backup_label: str
    tablespace_map: str | None
    checksums_enabled: bool
    files: list[FileEntry]
    directories: list[DirEntry]
    tablespaces: list[Tablespace] = field(default_factory=list)
    bytes: int = 0  # raw total
    stored_bytes: int = 0
    duration: float = 0.0
    pitr_version: str = ""
    parent: str | None = None  # for incremental backups (future)
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> builtins.bytes:  # `bytes` is a field name here
        d = asdict(self)
        d["system_identifier"] = str(self.system_identifier)
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: builtins.bytes, what: str = "manifest") -> Manifest:
        try:
            d = json.loads(data)
            if int(d.get("format", 0)) > FORMAT_VERSION:
                raise IntegrityError(f"{what} uses format {d['format']}; this pitr reads up to {FORMAT_VERSION}",
                                     "upgrade pitr")
            d["system_identifier"] = int(d["system_identifier"])
            d["files"] = [FileEntry(**f) for f in d["files"]]
            d["directories"] = [DirEntry(**x) for x in d["directories"]]
            d["tablespaces"] = [Tablespace(**t) for t in d.get("tablespaces", [])]
            return cls(**d)
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{what} is malformed: {e}") from None


def write_manifest(storage: Storage, m: Manifest) -> None:
    """The commit point: call only after every data object is durably stored."""
    storage.put(manifest_key(m.id), envelope.encode(m.to_json(), envelope.Codec("zstd", 3)))


def read_manifest(storage: Storage, backup_id: str) -> Manifest:
    key = manifest_key(backup_id)
    try:
        stored = storage.get(key, max_size=MANIFEST_MAX_SIZE)
        raw = envelope.decode(stored, f"manifest of backup {backup_id}", max_size=manifest_cap(len(stored)))
    except NotFoundError:
        raise NotFoundError(f"backup {backup_id} does not exist in {storage.display}",
                            "list the backups with `pitr info`") from None
    return Manifest.from_json(raw, f"manifest of backup {backup_id}")


def list_backup_ids(storage: Storage) -> list[str]:
    """IDs of complete backups (those with a manifest), oldest first (IDs sort by time)."""
    ids = []
    for o in storage.list(BACKUP_PREFIX):
        parts = o.key.split("/")
        if len(parts) == 3 and parts[2] == "manifest":
            ids.append(parts[1])
    return sorted(ids)


def list_manifests(storage: Storage) -> list[Manifest]:
    return [read_manifest(storage, i) for i in list_backup_ids(storage)]
