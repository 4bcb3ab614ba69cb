"""The one narrow storage interface every repository backend implements.

Keys are relative, '/'-separated paths ("wal/0000000100000000/000000010000000000000003.zst").
Contract (checked by tests/test_storage_contract.py on every backend):
- put() is atomic: a reader sees either no object or the whole new one, never a partial one.
  With if_absent=True it never replaces an existing object and raises AlreadyExistsError; two
  racing writers cannot both succeed. A backend that cannot prove this of its store (an S3
  endpoint that ignores If-None-Match, accepted with allow_unsafe_store) says so with
  conditional_writes_trusted = False: it then looks before it writes, and callers read back what
  they wrote (a concurrent writer can still slip in between). `pitr init` and `check --storage`
  test the store itself (ops/admin/storecheck.py).
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

from pitr.errors import IntegrityError

CHUNK = 1 << 20
UNSAFE_STORE_HINT = ("if you accept the risk, set allow_unsafe_store = true (config) or "
                     "PITR_ALLOW_UNSAFE_STORE=true: pitr then looks before it writes and reads back after, "
                     "which a concurrent writer can still defeat")


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
    #: False when put(if_absent=True) only emulates an atomic conditional create (see module doc)
    conditional_writes_trusted: bool = True

    def native(self) -> Storage:
        """This store without pitr's emulation of conditional creates (what a conformance test probes)."""
        return self

    def rejects_bad_checksum(self, key: str) -> bool | None:
        """Whether the store refuses an upload whose declared checksum is wrong (None: not applicable)."""
        return None

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

    def get(self, key: str, max_size: int | None = None) -> bytes:
        """The whole object; with max_size, an object larger than that is an IntegrityError
        (the repository is untrusted: a planted giant must not fill memory)."""
        with self.open(key) as f:
            if max_size is None:
                return f.read()
            buf = bytearray()
            while len(buf) <= max_size:  # in pieces: read(max_size + 1) would allocate it all up front
                piece = f.read(min(CHUNK, max_size + 1 - len(buf)))
                if not piece:
                    break
                buf += piece
            data = bytes(buf)
        if len(data) > max_size:
            raise IntegrityError(f"{self.display}: object {key} is larger than {max_size} bytes, more than it may hold",
                                 "the object is corrupt or was planted; run `pitr verify`")
        return data

    def delete_many(self, keys: Sequence[str]) -> None:
        for k in keys:
            self.delete(k)

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under prefix (and, where the backend has them, its emptied directories)."""
        self.delete_many([o.key for o in self.list(prefix)])

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
