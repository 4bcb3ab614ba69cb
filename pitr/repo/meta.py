"""The repository's metadata object (pitr.json): which cluster this repo belongs to.

Plain JSON so a human can read it; written once with a conditional put. In an encrypted repository
(format 2) it holds the wrapped data key and the cluster facts sealed under the data key, and
`key-rotate` replaces it (the only object pitr ever replaces).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from pitr.errors import EncryptionKeyError, ForeignClusterError, IntegrityError, NotFoundError, NotInitializedError
from pitr.repo.format import ENCRYPTED_FORMAT_VERSION, FORMAT_VERSION, MAX_FORMAT_VERSION, META_KEY
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
        if meta.format > MAX_FORMAT_VERSION:
            raise IntegrityError(f"the repository uses format {meta.format}; this pitr reads up to "
                                 f"{MAX_FORMAT_VERSION}", "upgrade pitr")
        return meta


def new_meta(system_identifier: int, pg_version: int, wal_segment_size: int, encrypted: bool = False) -> RepoMeta:
    return RepoMeta(ENCRYPTED_FORMAT_VERSION if encrypted else FORMAT_VERSION, system_identifier, pg_version,
                    wal_segment_size, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def encrypted_meta_json(meta: RepoMeta, section: dict[str, Any], sealed: bytes) -> bytes:
    """pitr.json of an encrypted repository: format, the key section, the sealed cluster facts."""
    doc = {"format": ENCRYPTED_FORMAT_VERSION, "encryption": section, "sealed": base64.b64encode(sealed).decode(),
           # zero placeholders: a format-1 reader parses this and refuses with "upgrade pitr", not "malformed"
           "system_identifier": "0", "pg_version": 0, "wal_segment_size": 0}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def read_meta(storage: Storage, fresh: bool = False) -> RepoMeta:
    """The repo's metadata; NotInitializedError when `pitr init` has not run.

    fresh=True reads it from the store again, past RepoStorage's per-process copy: the proof that
    the repository is still there before wal-fetch answers "not archived"."""
    from pitr.repo.sealed import RepoStorage, parse_meta_doc

    src = storage.inner if fresh and isinstance(storage, RepoStorage) else storage
    try:
        data = src.get(META_KEY, max_size=SMALL_JSON_MAX)
    except NotFoundError:
        raise NotInitializedError(
            f"the repository {storage.display} is not initialized",
            "run `pitr init` (with the cluster running) first",
        ) from None
    doc = parse_meta_doc(data)
    if "encryption" not in doc:
        return RepoMeta.from_json(data)
    if int(doc.get("format", 0)) > MAX_FORMAT_VERSION:
        return RepoMeta.from_json(data)  # refused there, with "upgrade pitr"
    if not isinstance(storage, RepoStorage):
        # a path that opened the backend without the key must never write into this repository
        raise EncryptionKeyError(f"the repository {storage.display} is encrypted, and this command opened it "
                                 "without its key")
    try:
        sealed = base64.b64decode(str(doc.get("sealed", "")), validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityError(f"repository metadata {META_KEY} is malformed: the sealed facts are not base64") from None
    return RepoMeta.from_json(storage.cipher.open_bytes(META_KEY, sealed))


def check_cluster(meta: RepoMeta, system_identifier: int, storage: Storage) -> None:
    if meta.system_identifier != system_identifier:
        raise ForeignClusterError(
            f"the repository {storage.display} belongs to the cluster with system identifier "
            f"{meta.system_identifier}, not this one ({system_identifier})",
            "use one repository (or prefix) per cluster",
        )
