"""A read-only view of a versioned S3 repository as it was at a moment (`--repo-as-of TS`).

Each key reads as its newest version whose LastModified is at or before the moment; delete
markers and every later version are ignored, so objects an attacker deleted or overwrote since
read as they were. The version map is built once, from ListObjectVersions (paginated), when the
view opens; reads then name the VersionId. Writes and deletes are refused: the view is evidence,
not a place to write (restore into a new repository).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, BinaryIO

from pitr.errors import ConfigError, NotFoundError, UsageError
from pitr.storage.base import ObjectInfo, Storage
from pitr.storage.s3 import S3Storage


class S3AsOfStorage(Storage):
    def __init__(self, inner: S3Storage, as_of: datetime) -> None:
        self.inner = inner
        self.as_of = as_of
        stamp = as_of.strftime("%Y-%m-%d %H:%M:%S UTC")
        self.display = f"{inner.display} as of {stamp}"
        self._versions: dict[str, tuple[str, int, float]] | None = None  # key -> (version id, size, mtime)

    # --- the version map
    def _map(self) -> dict[str, tuple[str, int, float]]:
        if self._versions is None:
            self._check_versioned()
            self._versions = self._scan()
        return self._versions

    def _check_versioned(self) -> None:
        s3 = self.inner
        s3._check_bucket()
        r = s3._call("read the bucket's versioning", s3.client.get_bucket_versioning, Bucket=s3.bucket)
        if r.get("Status") not in ("Enabled", "Suspended"):
            raise ConfigError(f"--repo-as-of needs a versioned bucket, and versioning was never enabled on "
                              f"s3://{s3.bucket}, so it keeps no earlier versions to read",
                              "enable versioning (and Object Lock) on the bucket before you need it; see "
                              "docs/runbook.md")

    def _scan(self) -> dict[str, tuple[str, int, float]]:
        s3 = self.inner
        full = s3.prefix + "/" if s3.prefix else ""
        cut = len(full)
        limit = self.as_of.timestamp()
        best: dict[str, tuple[str | None, int, float]] = {}  # None version: a delete marker is newest
        try:
            pages = s3.client.get_paginator("list_object_versions").paginate(Bucket=s3.bucket, Prefix=full)
            for page in pages:
                entries = [(v, False) for v in page.get("Versions", [])]
                entries += [(m, True) for m in page.get("DeleteMarkers", [])]
                for v, marker in entries:
                    t = v["LastModified"].timestamp()
                    if t > limit:
                        continue
                    key = v["Key"][cut:]
                    seen = best.get(key)
                    if seen is not None and seen[2] >= t:
                        continue
                    best[key] = (None if marker else v["VersionId"], 0 if marker else int(v["Size"]), t)
        except Exception as e:  # noqa: BLE001
            raise s3._translate(e, "list object versions") from e
        return {k: (vid, size, t) for k, (vid, size, t) in best.items() if vid is not None}

    def _version(self, key: str) -> str:
        v = self._map().get(key)
        if v is None:
            raise NotFoundError(f"cannot read {key}: no such object in {self.display}")
        return v[0]

    # --- reads
    def open(self, key: str) -> BinaryIO:
        return self.inner.open(key, VersionId=self._version(key))

    def get_range(self, key: str, start: int, length: int | None = None) -> bytes:
        vid = self._version(key)
        size = self._map()[key][1]
        if start < 0:  # the view knows the size: explicit offsets, never a suffix range
            start = max(0, size + start)
            length = None
        end = size if length is None else min(size, start + length)
        if end <= start:
            return b""
        return self.inner.read_range(key, f"bytes={start}-{end - 1}", start, end - start, VersionId=vid)

    def stat(self, key: str) -> ObjectInfo | None:
        v = self._map().get(key)
        return None if v is None else ObjectInfo(key, v[1], v[2])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for key in sorted(k for k in self._map() if k.startswith(prefix)):
            _, size, t = self._map()[key]
            yield ObjectInfo(key, size, t)

    def check(self, write: bool = False) -> None:
        if write:
            self._refuse("write to")
        self._map()

    # --- writes: refused
    def _refuse(self, what: str) -> Any:
        raise UsageError(f"cannot {what} {self.display}: --repo-as-of opens a read-only view of the past",
                         "run the command without --repo-as-of (restore into a new repository first)")

    def put(self, key: str, data: bytes | BinaryIO, *, if_absent: bool = False) -> None:
        self._refuse(f"write {key} into")

    def delete(self, key: str) -> None:
        self._refuse(f"delete {key} from")

    def delete_many(self, keys: Sequence[str]) -> None:
        self._refuse("delete objects from")

    def close(self) -> None:
        self.inner.close()
