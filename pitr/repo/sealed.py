"""A repository's storage as operations see it: encrypted repositories seal every object on put
and authenticate it on read; plain ones pass through.

RepoStorage wraps a backend and keeps the Storage contract in plaintext terms (sizes, ranges,
streams), so every operation that writes or reads objects encrypts without knowing it. Whether the
repository is encrypted is decided from pitr.json before the first object is read or written (and
re-checked before every write while the repository has no pitr.json), so no path writes an object
in clear into an encrypted repository. Only pitr.json (the wrapped key and the sealed cluster
facts) passes through as it is. A missing or wrong key fails there, before any other object is read.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

from pitr.errors import EncryptionKeyError, IntegrityError, NotFoundError
from pitr.repo.crypto import ObjectCipher, plain_size, sealed_size
from pitr.repo.format import META_KEY
from pitr.repo.keys import KeySource, unwrap
from pitr.storage.base import ObjectInfo, Storage, TempObject, as_stream

_PLAIN = "plain"


def parse_meta_doc(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise IntegrityError(f"repository metadata {META_KEY} is malformed: {e}") from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"repository metadata {META_KEY} is malformed: not a JSON object")
    return doc


LOCK_MODES = ("governance", "compliance")


def lock_policy(doc: dict[str, Any]) -> tuple[str, int] | None:
    """(mode, days) from pitr.json's plain lock_days/lock_mode; None when absent or unreadable."""
    days, mode = doc.get("lock_days"), doc.get("lock_mode", "governance")
    if not isinstance(days, int) or isinstance(days, bool) or days <= 0 or mode not in LOCK_MODES:
        return None
    return mode, days


def apply_lock_policy(inner: Storage, doc: dict[str, Any]) -> None:
    """Every later put through a backend that can lock (S3) carries the repository's retention."""
    policy = lock_policy(doc)
    if policy is not None and hasattr(inner, "retention"):
        inner.retention = (policy[0].upper(), policy[1])


class RepoStorage(Storage):
    """`key`: the user's key (or a function loading it, called only for an encrypted repository), None when
    none is configured; `looked` says where it was looked for (for the message)."""

    def __init__(self, inner: Storage, key: KeySource | Callable[[], KeySource | None] | None,
                 looked: str = "") -> None:
        self.inner = inner
        self.display = inner.display
        self.conditional_writes_trusted = inner.conditional_writes_trusted  # fixed when the backend is made
        self._key_arg = key
        self._looked = looked
        self._state: ObjectCipher | str | None = None  # None: not decided yet
        self._meta: bytes | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RepoStorage({self.display})"

    @property
    def key_source(self) -> KeySource | None:
        if callable(self._key_arg):
            self._key_arg = self._key_arg()
        return self._key_arg

    def _cipher(self) -> ObjectCipher | None:
        """The repository's cipher, None for a plain (or not yet initialized) repository."""
        state = self._state
        if state is None:
            with self._lock:
                if self._state is None:
                    try:
                        data = self.inner.get(META_KEY)
                    except NotFoundError:
                        return None  # not initialized: decided again at the next call
                    self._meta = data
                    doc = parse_meta_doc(data)
                    apply_lock_policy(self.inner, doc)
                    if "encryption" not in doc:
                        self._state = _PLAIN
                    else:
                        self._state = ObjectCipher(unwrap(doc["encryption"], self.require_key(), self.display))
                state = self._state
        return None if state == _PLAIN else state  # type: ignore[return-value]

    def require_key(self) -> KeySource:
        key = self.key_source
        if key is None:
            raise EncryptionKeyError(
                f"the repository {self.display} is encrypted and no key was found (looked in {self._looked})",
                "set encryption_key_file (config file or PITR_ENCRYPTION_KEY_FILE) or PITR_ENCRYPTION_PASSPHRASE")
        return key

    def require_key_for_init(self) -> KeySource:
        key = self.key_source
        if key is None:
            raise EncryptionKeyError(
                f"init --encrypt needs a key and none was found (looked in {self._looked})",
                "set encryption_key_file (a file only its owner may read) or PITR_ENCRYPTION_PASSPHRASE")
        return key

    @property
    def encrypted(self) -> bool:
        return self._cipher() is not None

    @property
    def cipher(self) -> ObjectCipher:
        c = self._cipher()
        if c is None:
            raise IntegrityError(f"the repository {self.display} is not encrypted")
        return c

    def adopt(self, data_key: bytes | None, meta: bytes) -> None:
        """After init/key-rotate wrote pitr.json: use this data key (None: plain) from now on."""
        with self._lock:
            self._state = _PLAIN if data_key is None else ObjectCipher(data_key)
            self._meta = meta

    def put(self, key: str, data: bytes | BinaryIO, *, if_absent: bool = False) -> None:
        if key == META_KEY:
            self.inner.put(key, data, if_absent=if_absent)
            with self._lock:
                self._meta = None
            return
        c = self._cipher()
        if c is None:
            self.inner.put(key, data, if_absent=if_absent)
        elif isinstance(data, bytes | bytearray | memoryview):
            self.inner.put(key, c.seal(key, data), if_absent=if_absent)
        else:
            self.inner.put(key, c.sealing_reader(key, as_stream(data)), if_absent=if_absent)  # type: ignore[arg-type]

    def open(self, key: str) -> BinaryIO:
        if key == META_KEY:
            return self.inner.open(key)
        c = self._cipher()
        src = self.inner.open(key)
        return src if c is None else c.opening_reader(key, src)  # type: ignore[return-value]

    def get(self, key: str, max_size: int | None = None) -> bytes:
        if key == META_KEY:
            self._cipher()  # decides once, keeping the bytes: later reads of pitr.json cost no request
            with self._lock:
                cached = self._meta
            if cached is not None and (max_size is None or len(cached) <= max_size):
                return cached
            return self.inner.get(key, max_size=max_size)
        c = self._cipher()
        if c is None:
            return self.inner.get(key, max_size=max_size)
        return c.open_bytes(key, self.inner.get(key, max_size=None if max_size is None else sealed_size(max_size)))

    def get_range(self, key: str, start: int, length: int | None = None) -> bytes:
        c = self._cipher() if key != META_KEY else None
        if c is None:
            return self.inner.get_range(key, start, length)

        def size() -> int:
            st = self.inner.stat(key)
            if st is None:
                raise NotFoundError(f"object {key} not found in {self.display}")
            return st.size

        return c.read_range(key, lambda off, n: self.inner.get_range(key, off, n), start, length, size)

    def _plain(self, info: ObjectInfo) -> ObjectInfo:
        if info.key == META_KEY or self._cipher() is None:
            return info
        size = plain_size(info.size)
        # an impossible stored size (a damaged object) shows as 0; reading it fails authentication
        return ObjectInfo(info.key, 0 if size is None else size, info.mtime)

    def stat(self, key: str) -> ObjectInfo | None:
        info = self.inner.stat(key)
        return None if info is None else self._plain(info)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for info in self.inner.list(prefix):
            yield self._plain(info)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def delete_many(self, keys: Sequence[str]) -> None:
        self.inner.delete_many(keys)

    # the rest of the interface is the backend's own (nothing in it reads or writes object bodies)
    def native(self) -> Storage:
        return self.inner.native()

    def rejects_bad_checksum(self, key: str) -> bool | None:
        return self.inner.rejects_bad_checksum(key)

    def delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(prefix)

    def stale_temps(self, older_than: float, now: float) -> Sequence[TempObject]:
        return self.inner.stale_temps(older_than, now)

    def remove_temps(self, temps: Sequence[TempObject]) -> None:
        self.inner.remove_temps(temps)

    def check(self, write: bool = False) -> None:
        self.inner.check(write)

    def create(self) -> None:
        self.inner.create()

    def close(self) -> None:
        self.inner.close()
