"""In-memory backend for unit tests of the layers above storage."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO

from pitr.errors import AlreadyExistsError, NotFoundError
from pitr.storage.base import ObjectInfo, Storage


class MemoryStorage(Storage):
    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, float]] = {}
        self.display = "memory://"
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes | BinaryIO, *, if_absent: bool = False) -> None:
        body = bytes(data) if isinstance(data, bytes | bytearray | memoryview) else data.read()
        with self._lock:
            if if_absent and key in self.objects:
                raise AlreadyExistsError(f"object {key} already exists")
            self.objects[key] = (body, time.time())

    def open(self, key: str) -> BinaryIO:
        with self._lock:
            if key not in self.objects:
                raise NotFoundError(f"object {key} not found")
            return io.BytesIO(self.objects[key][0])

    def get_range(self, key: str, start: int, length: int | None = None) -> bytes:
        data = self.get(key)
        if start < 0:
            start = max(0, len(data) + start)
        return data[start:] if length is None else data[start : start + length]

    def stat(self, key: str) -> ObjectInfo | None:
        with self._lock:
            if key not in self.objects:
                return None
            body, mtime = self.objects[key]
            return ObjectInfo(key, len(body), mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            items = sorted((k, len(v[0]), v[1]) for k, v in self.objects.items() if k.startswith(prefix))
        for k, size, mtime in items:
            yield ObjectInfo(k, size, mtime)

    def delete(self, key: str) -> None:
        with self._lock:
            self.objects.pop(key, None)

    def check(self, write: bool = False) -> None:
        return None
