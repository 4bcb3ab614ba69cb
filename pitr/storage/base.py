"""The one narrow storage interface every repository backend implements.

Keys are relative, '/'-separated paths ("wal/0000000100000000/000000010000000000000003.zst").
Contract (checked by tests/test_storage_contract.py on every backend):
- put() is atomic: a reader sees either no object or the whole new one, never a partial one.
  With if_absent=True it never replaces an existing object and raises AlreadyExistsError; two
  racing writers cannot both succeed.
- open()/get()/get_range() raise NotFoundError for a missing key; a missing repository
  (directory, bucket) raises RepoMissingError, never NotFoundError, so callers can tell
  "not archived" from "cannot look".
- list(prefix) yields every object whose key starts with prefix, sorted by key, with sizes.
- delete() of a missing key is not an error.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

CHUNK = 1 << 20


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch (UTC)


@dataclass(frozen=True)
class TempObject:
    """A leftover of an interrupted write: a temp file, or an incomplete multipart upload (upload_id)."""

    key: str
    size: int
    mtime: float  # last touched, seconds since the epoch
    upload_id: str | None = None


class Storage(ABC):
    """A flat key/value object store with atomic puts."""

    #: a human, secret-free description for messages ("s3://bucket/prefix", "/var/lib/pitr")
    display: str = ""

    @abstractmethod
    def put(self, key: str, data: bytes | BinaryIO, *, if_absent: bool = False) -> None:
        """Store data (bytes, or a binary stream read to its end) under key, atomically."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable stream of the whole object; the caller closes it."""

    @abstractmethod
    def get_range(self, key: str, start: int, length: int | None = None) -> bytes:
        """Bytes [start, start+length) of the object; a negative start counts from the end."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """The object's info, or None when it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under prefix, sorted by key (handles any number of objects)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; missing is fine."""

    @abstractmethod
    def check(self, write: bool = False) -> None:
        """Raise RepoMissingError/StorageError unless the repository exists (and is writable)."""

    def create(self) -> None:
        """Make the repository location exist where the backend can (a directory); else check it."""
        self.check(write=True)

    def get(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def delete_many(self, keys: Sequence[str]) -> None:
        for k in keys:
            self.delete(k)

    def stale_temps(self, older_than: float, now: float) -> Sequence[TempObject]:
        """Leftovers of interrupted writes (never listed by list()) untouched for older_than seconds.
        A write in progress keeps touching its own, so it is never among them."""
        return []

    def remove_temps(self, temps: Sequence[TempObject]) -> None:  # noqa: B027 - optional hook
        """Remove leftovers found by stale_temps (one already gone is fine)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (optional)."""


def as_stream(data: bytes | BinaryIO) -> BinaryIO:
    return io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
