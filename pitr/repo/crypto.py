"""Authenticated encryption of stored objects: AES-256-GCM in fixed-size chunks (docs/repository-format.md §9).

    header  32 bytes  b"PITRAEAD" | version u8 (1) | cipher u8 (1 = AES-256-GCM) | chunk log2 u8 (16)
                      | 5 zero bytes | salt (16 random bytes)
    chunks            chunk i: AES-256-GCM(K_o, nonce_i, plaintext_i, aad_i) = ciphertext_i | tag (16)

Every chunk but the last holds exactly C = 2**log2 plaintext bytes; the last holds 0..C-1, so a
reader knows from its length alone which chunk is final, and any object of L bytes has exactly one
plaintext size. K_o = HKDF-SHA256(data key, salt, "pitr object key v1"): a fresh key per object, so
nonces never repeat however many objects a repository holds. nonce_i = i (11 bytes big-endian) |
final (1 byte); aad_i = object key name (UTF-8) | 0x00 | i (u64 BE) | final (u8). A chunk altered,
dropped, reordered, cut short, or an object moved to another name therefore fails authentication.
Chunks make streaming (flat memory) and ranged reads (bundle members) possible.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from pitr.errors import IntegrityError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"PITRAEAD"
VERSION = 1
CIPHER_AES256GCM = 1
CHUNK_LOG2 = 16  # 64 KiB: a ranged read of a small bundle member reads at most 2 extra chunks
HEADER_SIZE = 32
TAG = 16
SALT_SIZE = 16
_HEADER = struct.Struct(">8sBBB5s16s")
_ZERO5 = bytes(5)
_HINT = "run `pitr verify` to list every object that fails; restore from an intact copy or an older backup"


def _aesgcm(key: bytes) -> AESGCM:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _object_key(data_key: bytes, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(hashes.SHA256(), 32, salt, b"pitr object key v1").derive(data_key)


def _nonce(i: int, final: bool) -> bytes:
    return i.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def _aad(name: str, i: int, final: bool) -> bytes:
    return name.encode() + b"\x00" + struct.pack(">QB", i, final)


def auth_failure(name: str) -> IntegrityError:
    return IntegrityError(f"object {name} fails authentication: it was altered, truncated, or stored under "
                          "another name", _HINT)


def plain_size(stored: int, chunk: int = 1 << CHUNK_LOG2) -> int | None:
    """The plaintext size of an encrypted object of `stored` bytes; None when no valid object has that size."""
    rest = stored - HEADER_SIZE
    if rest < TAG:
        return None
    full = rest // (chunk + TAG)
    last = rest - full * (chunk + TAG)
    if last < TAG:
        return None
    return full * chunk + last - TAG


def sealed_size(plain: int, chunk: int = 1 << CHUNK_LOG2) -> int:
    """The stored size of an encrypted object of `plain` bytes (the last chunk is always short)."""
    return HEADER_SIZE + (plain // chunk + 1) * TAG + plain


class _Header:
    __slots__ = ("chunk", "aead", "salt")

    def __init__(self, chunk: int, aead: AESGCM, salt: bytes) -> None:
        self.chunk, self.aead, self.salt = chunk, aead, salt


class ObjectCipher:
    """Seals and opens objects under one repository data key. Thread-safe."""

    def __init__(self, data_key: bytes) -> None:
        if len(data_key) != 32:
            raise ValueError("a data key is 32 bytes")
        self._key = data_key
        self._cache: OrderedDict[str, _Header] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show the key
        return "ObjectCipher(<key>)"

    # --- headers
    def _new_header(self) -> tuple[bytes, AESGCM]:
        salt = os.urandom(SALT_SIZE)
        head = _HEADER.pack(MAGIC, VERSION, CIPHER_AES256GCM, CHUNK_LOG2, _ZERO5, salt)
        return head, _aesgcm(_object_key(self._key, salt))

    def _parse_header(self, name: str, head: bytes) -> _Header:
        if len(head) < HEADER_SIZE:
            raise IntegrityError(f"object {name} is truncated (no encryption header)", _HINT)
        magic, version, cipher, log2, zero, salt = _HEADER.unpack(head[:HEADER_SIZE])
        if magic != MAGIC:
            raise IntegrityError(f"object {name} is not encrypted, but the repository is: it was not written by "
                                 "pitr or was replaced", _HINT)
        if version != VERSION or cipher != CIPHER_AES256GCM:
            raise IntegrityError(f"object {name} uses encryption version {version}/cipher {cipher}; this pitr reads "
                                 f"version {VERSION} with AES-256-GCM", "upgrade pitr")
        if not 10 <= log2 <= 24 or zero != _ZERO5:
            raise IntegrityError(f"object {name} has a corrupt encryption header", _HINT)
        h = self._cached(name)
        if h is not None and h.salt == salt:
            return h
        h = _Header(1 << log2, _aesgcm(_object_key(self._key, salt)), salt)
        with self._lock:
            self._cache[name] = h
            while len(self._cache) > 256:
                self._cache.popitem(last=False)
        return h

    def _cached(self, name: str) -> _Header | None:
        """A header seen before under this name (objects are immutable: ranged reads skip re-reading it)."""
        with self._lock:
            h = self._cache.get(name)
            if h is not None:
                self._cache.move_to_end(name)
            return h

    def header_of(self, name: str, head: bytes) -> int:
        """Validate an object's header; its chunk size."""
        return self._parse_header(name, head).chunk

    # --- whole objects
    def seal(self, name: str, data: bytes | bytearray | memoryview) -> bytes:
        head, aead = self._new_header()
        chunk = 1 << CHUNK_LOG2
        view = memoryview(data)
        out = [head]
        i = 0
        while True:
            piece = view[i * chunk:(i + 1) * chunk]
            final = len(piece) < chunk
            out.append(aead.encrypt(_nonce(i, final), bytes(piece), _aad(name, i, final)))
            if final:
                return b"".join(out)
            i += 1

    def open_bytes(self, name: str, data: bytes) -> bytes:
        h = self._parse_header(name, data)
        if plain_size(len(data), h.chunk) is None:
            raise auth_failure(name)
        return self._open_chunks(name, h, memoryview(data)[HEADER_SIZE:], 0, True)

    def _open_chunks(self, name: str, h: _Header, body: memoryview, first: int, to_end: bool) -> bytes:
        """Decrypt consecutive whole chunks starting at index `first`; the last is final iff it is short."""
        step = h.chunk + TAG
        out = []
        i, pos = first, 0
        while pos < len(body):
            piece = body[pos:pos + step]
            final = len(piece) < step
            if final and not to_end:
                raise auth_failure(name)
            try:
                out.append(h.aead.decrypt(_nonce(i, final), bytes(piece), _aad(name, i, final)))
            except Exception:  # noqa: BLE001 - cryptography's InvalidTag
                raise auth_failure(name) from None
            pos += len(piece)
            i += 1
            if final:
                break
        if to_end and (not out or pos < len(body) or len(body) % step == 0):
            raise auth_failure(name)  # ends on a full chunk: the final one was cut off
        return b"".join(out)

    # --- ranges
    def read_range(self, name: str, fetch: Callable[[int, int | None], bytes], start: int, length: int | None,
                   stored_size: Callable[[], int]) -> bytes:
        """Plaintext bytes [start, start+length) read with ranged fetches of the stored object.

        fetch(offset, n) returns stored bytes (fewer at the end); a negative start counts from the end
        (needs stored_size(), one stat)."""
        chunk = 1 << CHUNK_LOG2
        if start < 0:
            total = plain_size(stored_size(), chunk)
            if total is None:
                raise auth_failure(name)
            start = max(0, total + start)
            length = None
        if length is not None and length <= 0:
            return b""
        first = start // chunk
        step = chunk + TAG
        c_start = HEADER_SIZE + first * step
        want = None if length is None else ((start + length - 1) // chunk - first + 1) * step
        h = self._cached(name)
        if h is None and first <= 4:
            # near the start and header unknown: one request for header and chunks
            data = fetch(0, None if want is None else c_start + want)
            h = self._parse_header(name, data)
            body = memoryview(data)[c_start:]
        else:
            if h is None:
                h = self._parse_header(name, fetch(0, HEADER_SIZE))
            body = memoryview(fetch(c_start, want))
        if h.chunk != chunk:
            raise IntegrityError(f"object {name} uses {h.chunk}-byte encryption chunks; this pitr writes and "
                                 f"reads {chunk}", "upgrade pitr")
        if not body:
            return b""  # at or past the end: the caller's length check decides
        # reached the object's end iff we got fewer bytes than asked (or asked for all)
        at_end = want is None or len(body) < want
        plain = self._open_chunks(name, h, body, first, at_end)
        off = start - first * chunk
        return plain[off:] if length is None else plain[off:off + length]

    # --- streams
    def sealing_reader(self, name: str, src: BinaryIO) -> SealingReader:
        head, aead = self._new_header()
        return SealingReader(name, src, head, aead, 1 << CHUNK_LOG2)

    def opening_reader(self, name: str, src: BinaryIO) -> OpeningReader:
        return OpeningReader(self, name, src)


class _ChunkReader:
    """read() over a stream that _step() makes one AEAD chunk at a time into _buf (sealing or opening)."""

    _buf: bytearray
    _done: bool

    def _step(self) -> None:
        raise NotImplementedError

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self._buf) < n) and not self._done:
            self._step()
        if n < 0 or n >= len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
            return out
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


class SealingReader(_ChunkReader):
    """A read()-able encrypted view of a plaintext stream (for put() of large objects). Memory: O(chunk)."""

    def __init__(self, name: str, src: BinaryIO, head: bytes, aead: AESGCM, chunk: int) -> None:
        self._name, self._src, self._aead, self._chunk = name, src, aead, chunk
        self._buf = bytearray(head)
        self._i = 0
        self._done = False
        self._pending = b""

    def _step(self) -> None:
        # read one chunk plus a byte ahead, so we know whether this chunk is the last
        while len(self._pending) <= self._chunk:
            more = self._src.read(self._chunk + 1 - len(self._pending))
            if not more:
                break
            self._pending += more
        piece, self._pending = self._pending[:self._chunk], self._pending[self._chunk:]
        final = len(piece) < self._chunk
        self._buf += self._aead.encrypt(_nonce(self._i, final), piece, _aad(self._name, self._i, final))
        self._i += 1
        self._done = final

    def close(self) -> None:
        close = getattr(self._src, "close", None)
        if close:
            close()


class OpeningReader(_ChunkReader):
    """A read()-able decrypted view of a stored object's stream; authentication fails loudly, at the
    chunk where it fails (never returns bytes of an unauthenticated chunk)."""

    def __init__(self, cipher: ObjectCipher, name: str, src: BinaryIO) -> None:
        self._cipher, self._name, self._src = cipher, name, src
        self._h: _Header | None = None
        self._i = 0
        self._raw = b""
        self._buf = bytearray()
        self._done = False

    def __enter__(self) -> OpeningReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_raw(self, n: int) -> None:
        while len(self._raw) < n:
            more = self._src.read(n - len(self._raw))
            if not more:
                return
            self._raw += more

    def _step(self) -> None:
        if self._h is None:
            self._read_raw(HEADER_SIZE)
            self._h = self._cipher._parse_header(self._name, self._raw)
            self._raw = self._raw[HEADER_SIZE:]
        step = self._h.chunk + TAG
        self._read_raw(step + 1)
        piece, self._raw = self._raw[:step], self._raw[step:]
        final = len(piece) < step
        if final and (len(piece) < TAG):
            raise auth_failure(self._name)
        try:
            self._buf += self._h.aead.decrypt(_nonce(self._i, final), piece, _aad(self._name, self._i, final))
        except Exception:  # noqa: BLE001 - InvalidTag
            raise auth_failure(self._name) from None
        self._i += 1
        self._done = final

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._src.close()
