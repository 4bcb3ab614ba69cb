"""The object envelope: header | compressed payload | trailer (size + SHA-256 of the raw bytes).

    header  16 bytes  b"PITR" | version u8 (1) | codec u8 (0 none, 1 zstd) | level i8 | 9 zero bytes
    payload           the raw bytes through the codec (one zstd frame)
    trailer 48 bytes  raw size u64 big-endian | SHA-256 of the raw bytes (32) | b"PITR-END"

The trailer lets a writer stream (the checksum is known only at the end) and lets a reader
learn an object's raw checksum with one ranged read of its last 48 bytes. Decoding always
verifies size and checksum; a mismatch is an IntegrityError. See docs/repository-format.md.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from pitr.errors import ConfigError, IntegrityError

MAGIC = b"PITR"
END = b"PITR-END"
VERSION = 1
HEADER_SIZE = 16
TRAILER_SIZE = 48
_HEADER = struct.Struct(">4sBBb9s")
_RESERVED = bytes(9)
_TRAILER = struct.Struct(">Q32s8s")
CODECS = {"none": 0, "zstd": 1}
CHUNK = 1 << 20
_VERIFY_HINT = "run `pitr verify` to find every damaged object"


class Sink(Protocol):
    """Where decode_stream writes raw bytes: a file, or any object with write(bytes)."""

    def write(self, data: bytes, /) -> object: ...


@dataclass(frozen=True)
class Codec:
    name: str = "zstd"
    level: int = 3

    @property
    def code(self) -> int:
        return CODECS[self.name]

    def __str__(self) -> str:
        return self.name if self.name == "none" else f"{self.name}:{self.level}"


def parse_codec(spec: str) -> Codec:
    """'zstd', 'zstd:6', 'none' -> Codec; ConfigError otherwise."""
    name, _, level = spec.strip().lower().partition(":")
    if name not in CODECS:
        raise ConfigError(f"unknown compression {spec!r}", "use zstd[:LEVEL] (1-19) or none")
    if name == "none":
        return Codec("none", 0)
    try:
        lvl = int(level) if level else 3
    except ValueError:
        raise ConfigError(f"compression level in {spec!r} is not a number", "use e.g. zstd:3") from None
    if not 1 <= lvl <= 19:
        raise ConfigError(f"zstd level {lvl} is out of range", "use a level from 1 to 19")
    return Codec("zstd", lvl)


@dataclass(frozen=True)
class Trailer:
    size: int
    sha256: str  # hex


def header_bytes(codec: Codec) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, codec.code, codec.level, _RESERVED)


def trailer_bytes(size: int, digest: bytes) -> bytes:
    return _TRAILER.pack(size, digest, END)


def parse_trailer(data: bytes, what: str) -> Trailer:
    if len(data) < TRAILER_SIZE:
        raise IntegrityError(f"{what} is truncated (no envelope trailer)")
    size, digest, end = _TRAILER.unpack(data[-TRAILER_SIZE:])
    if end != END:
        raise IntegrityError(f"{what} is truncated or corrupt (bad envelope trailer)")
    return Trailer(size, digest.hex())


def _parse_header(data: bytes, what: str) -> int:
    if len(data) < HEADER_SIZE:
        raise IntegrityError(f"{what} is truncated (no envelope header)")
    magic, version, code, level, reserved = _HEADER.unpack(data[:HEADER_SIZE])
    if magic != MAGIC:
        raise IntegrityError(f"{what} is not a pitr object (bad magic)")
    if version != VERSION:
        raise IntegrityError(f"{what} uses envelope version {version}; this pitr reads version {VERSION}",
                             "upgrade pitr")
    if code not in CODECS.values():
        raise IntegrityError(f"{what} uses an unknown codec {code}")
    # the level is advisory (decoding does not need it) but must be plausible; reserved bytes are zero
    # in version 1, so a damaged header is caught even where it would not change the payload
    if (code == 0 and level != 0) or (code == 1 and not 1 <= level <= 22) or reserved != _RESERVED:
        raise IntegrityError(f"{what} has a corrupt envelope header")
    return code


def _compressor(codec: Codec):  # type: ignore[no-untyped-def]
    import zstandard

    return zstandard.ZstdCompressor(level=codec.level)


def encode(raw: bytes | memoryview, codec: Codec, digest: bytes | None = None) -> bytes:
    """Envelope a whole in-memory object (WAL segments, manifests).

    `digest` is raw's SHA-256 when the caller already has it (one pass over 16 MiB less)."""
    if digest is None:
        digest = hashlib.sha256(raw).digest()
    body = _compressor(codec).compress(raw) if codec.code == 1 else bytes(raw)
    return header_bytes(codec) + body + trailer_bytes(len(raw), digest)


def encode_stream(src: BinaryIO, codec: Codec, chunk: int = CHUNK) -> Iterator[bytes]:
    """Envelope a stream, yielding encoded pieces; reads src to its end. Memory: O(chunk)."""
    yield header_bytes(codec)
    h = hashlib.sha256()
    size = 0
    comp = _compressor(codec).compressobj() if codec.code == 1 else None
    while True:
        buf = src.read(chunk)
        if not buf:
            break
        size += len(buf)
        h.update(buf)
        out = comp.compress(buf) if comp else buf
        if out:
            yield out
    if comp:
        tail = comp.flush()
        if tail:
            yield tail
    yield trailer_bytes(size, h.digest())


class EncodedReader:
    """A read()-able view of encode_stream, for uploaders that pull (multipart S3)."""

    def __init__(self, src: BinaryIO, codec: Codec) -> None:
        self._it = encode_stream(src, codec)
        self._buf = bytearray()

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            try:
                self._buf += next(self._it)
            except StopIteration:
                break
        if n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def decode(data: bytes, what: str = "object") -> bytes:
    """Decode and verify a whole in-memory envelope."""
    code = _parse_header(data, what)
    trailer = parse_trailer(data, what)
    body = memoryview(data)[HEADER_SIZE:-TRAILER_SIZE]
    if code == 1:
        import zstandard

        dobj = zstandard.ZstdDecompressor().decompressobj()
        try:
            raw = dobj.decompress(body)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{what} is corrupt: its payload does not decompress ({e})", _VERIFY_HINT) from None
        # exactly one whole frame: bytes after it (or a cut frame) mean a damaged object
        if not dobj.eof or dobj.unused_data:
            raise IntegrityError(f"{what} is corrupt (the compressed payload is not exactly one zstd frame)")
    else:
        raw = bytes(body)
    _verify(len(raw), hashlib.sha256(raw).hexdigest(), trailer, what)
    return raw


def _verify(size: int, sha: str, trailer: Trailer, what: str) -> None:
    if size != trailer.size or sha != trailer.sha256:
        raise IntegrityError(f"{what} fails its checksum: stored bytes are corrupt", _VERIFY_HINT)


def decode_stream(src: BinaryIO, dst: Sink | None, what: str = "object", chunk: int = CHUNK) -> Trailer:
    """Decode src into dst (None: just verify), holding back the trailer; raises IntegrityError."""
    head = src.read(HEADER_SIZE)
    code = _parse_header(head, what)
    dobj = None
    if code == 1:
        import zstandard

        dobj = zstandard.ZstdDecompressor().decompressobj()
    h = hashlib.sha256()
    size = 0
    pending = b""
    while True:
        buf = src.read(chunk)
        if not buf:
            break
        pending += buf
        if len(pending) <= TRAILER_SIZE:
            continue
        body, pending = pending[:-TRAILER_SIZE], pending[-TRAILER_SIZE:]
        if dobj is not None:
            if dobj.eof:  # payload continues past the end of the frame
                raise IntegrityError(f"{what} is corrupt (the compressed payload is not exactly one zstd frame)")
            try:
                out = dobj.decompress(body)
            except Exception as e:  # noqa: BLE001 - zstandard.ZstdError
                raise IntegrityError(f"{what} is corrupt: its payload does not decompress ({e})",
                                     _VERIFY_HINT) from None
            if dobj.unused_data:
                raise IntegrityError(f"{what} is corrupt (the compressed payload is not exactly one zstd frame)")
        else:
            out = body
        if out:
            h.update(out)
            size += len(out)
            if dst is not None:
                dst.write(out)
    trailer = parse_trailer(pending, what)
    if dobj is not None and not dobj.eof:
        raise IntegrityError(f"{what} is truncated (incomplete zstd frame)")
    _verify(size, h.hexdigest(), trailer, what)
    return trailer
