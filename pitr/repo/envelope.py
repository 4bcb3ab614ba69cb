"""The object envelope: header | compressed payload | trailer (size + digest of the raw bytes).

    header  16 bytes  b"PITR" | version u8 (2) | codec u8 (0 none, 1 zstd) | level i8 | 9 zero bytes
    payload           the raw bytes through the codec (one zstd frame)
    trailer 48 bytes  raw size u64 big-endian | digest of the raw bytes (32) | b"PITR-END"

The version names the digest: 1 SHA-256 (what older pitr wrote; still read), 2 BLAKE3-256 (what
pitr writes: a tenth of SHA-256's cost on CPUs without SHA extensions, docs/performance.md).

The trailer lets a writer stream (the checksum is known only at the end) and lets a reader
learn an object's raw checksum with one ranged read of its last 48 bytes. Decoding always
verifies size and checksum; a mismatch is an IntegrityError. Decoding is capped (max_size): the
repository is untrusted, and a few KiB of zstd can claim gigabytes, so output past the size the
caller allows fails at once instead of filling memory or disk. See docs/repository-format.md.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from pitr.errors import ConfigError, IntegrityError

MAGIC = b"PITR"
END = b"PITR-END"
VERSION = 2  # what this pitr writes
DIGESTS = {1: "sha256", 2: "blake3"}  # envelope version -> the digest its trailer holds (all this pitr reads)
HEADER_SIZE = 16
TRAILER_SIZE = 48
_HEADER = struct.Struct(">4sBBb9s")
_RESERVED = bytes(9)
_TRAILER = struct.Struct(">Q32s8s")
CODECS = {"none": 0, "zstd": 1}
CHUNK = 1 << 20
# the largest zstd window a payload may need: pitr writes levels 1-19 (windows of at most 8 MiB);
# zstd's own limit (128 MiB) would let a hostile frame make every decode running at once allocate that
MAX_WINDOW = 1 << 24
# decode caps when the caller names none; every pitr caller names the size it allows
DEFAULT_MAX_SIZE = 1 << 30
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


class Hasher(Protocol):
    """hashlib.sha256() or blake3.blake3(): what digests are taken with."""

    def update(self, data: bytes | memoryview, /) -> object: ...

    def digest(self) -> bytes: ...

    def hexdigest(self) -> str: ...


def hasher(algo: str) -> Hasher:
    """A fresh hash of the named algorithm ("sha256" or "blake3", 32-byte output)."""
    if algo == "blake3":
        import blake3  # the quick archive path pays for it only when it hashes

        return blake3.blake3()  # type: ignore[no-any-return]
    if algo == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algo!r}")


def digest_of(algo: str, data: bytes | memoryview) -> bytes:
    h = hasher(algo)
    h.update(data)
    return h.digest()


@dataclass(frozen=True)
class Trailer:
    size: int
    digest: str  # hex, of the algorithm `algo`
    algo: str  # "sha256" (envelope version 1) or "blake3" (version 2)

    def matches(self, algo: str, digest: str, size: int) -> bool:
        """The raw bytes this trailer describes are `size` bytes with that digest (of the same algorithm)."""
        return self.algo == algo and self.digest == digest and self.size == size


def header_bytes(codec: Codec) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, codec.code, codec.level, _RESERVED)


def trailer_bytes(size: int, digest: bytes) -> bytes:
    return _TRAILER.pack(size, digest, END)


def parse_trailer(data: bytes, what: str, *, version: int) -> Trailer:
    """The trailer at the end of data; `version` (from the object's header: parse_header) names its digest."""
    if len(data) < TRAILER_SIZE:
        raise IntegrityError(f"{what} is truncated (no envelope trailer)")
    size, digest, end = _TRAILER.unpack(data[-TRAILER_SIZE:])
    if end != END:
        raise IntegrityError(f"{what} is truncated or corrupt (bad envelope trailer)")
    return Trailer(size, digest.hex(), DIGESTS[version])


def parse_header(data: bytes, what: str) -> int:
    """The envelope version of the object whose first bytes are data; IntegrityError if not one this pitr reads."""
    return _parse_header(data, what)[0]


def _parse_header(data: bytes, what: str) -> tuple[int, int]:
    """(version, codec code) of a sound header."""
    if len(data) < HEADER_SIZE:
        raise IntegrityError(f"{what} is truncated (no envelope header)")
    magic, version, code, level, reserved = _HEADER.unpack(data[:HEADER_SIZE])
    if magic != MAGIC:
        raise IntegrityError(f"{what} is not a pitr object (bad magic)")
    if version not in DIGESTS:
        raise IntegrityError(f"{what} uses envelope version {version}; this pitr reads versions "
                             f"{', '.join(map(str, DIGESTS))}", "upgrade pitr")
    if code not in CODECS.values():
        raise IntegrityError(f"{what} uses an unknown codec {code}")
    # the level is advisory (decoding does not need it) but must be plausible; reserved bytes are zero
    # in versions 1 and 2, so a damaged header is caught even where it would not change the payload
    if (code == 0 and level != 0) or (code == 1 and not 1 <= level <= 22) or reserved != _RESERVED:
        raise IntegrityError(f"{what} has a corrupt envelope header")
    return version, code


def _compressor(codec: Codec):  # type: ignore[no-untyped-def]
    import zstandard

    return zstandard.ZstdCompressor(level=codec.level)


def encode(raw: bytes | memoryview, codec: Codec, digest: bytes | None = None) -> bytes:
    """Envelope a whole in-memory object (WAL segments, manifests).

    `digest` is raw's BLAKE3 when the caller already has it (one pass over 16 MiB less)."""
    if digest is None:
        digest = digest_of(DIGESTS[VERSION], raw)
    body = _compressor(codec).compress(raw) if codec.code == 1 else bytes(raw)
    # one copy of the body, not two (a+b+c copies it twice: ~7 MiB of fresh pages each for a segment)
    return b"".join((header_bytes(codec), body, trailer_bytes(len(raw), digest)))


def encode_stream(src: BinaryIO, codec: Codec, chunk: int = CHUNK) -> Iterator[bytes]:
    """Envelope a stream, yielding encoded pieces; reads src to its end. Memory: O(chunk)."""
    yield header_bytes(codec)
    h = hasher(DIGESTS[VERSION])
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
    """A read()-able view of encode_stream's pieces, for uploaders that pull (multipart S3).

    Remembers the trailer (`tail`) and the size (`emitted`); holds at most one piece beyond what
    read() returns (an S3 part is copied once, not thrice)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._it = pieces
        self._left: bytes | memoryview = b""  # the unread rest of the last piece (a view of it)
        self._eof = False
        self.emitted = 0
        self.tail = b""

    def _next(self) -> bytes:
        if self._eof:
            return b""
        try:
            piece = next(self._it)
        except StopIteration:
            self._eof = True
            return b""
        keep = TRAILER_SIZE
        self.tail = piece[-keep:] if len(piece) >= keep else (self.tail + piece)[-keep:]
        return piece

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes | memoryview] = [self._left] if len(self._left) else []
        have = len(self._left)
        self._left = b""
        while n < 0 or have < n:
            piece = self._next()
            if not piece:
                if self._eof:
                    break
                continue
            parts.append(piece)
            have += len(piece)
        if 0 <= n < have:  # split the last piece by views: what is returned is the one copy (the join)
            last = memoryview(parts[-1])
            cut = len(last) - (have - n)
            parts[-1], self._left = last[:cut], last[cut:]
        out = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)
        self.emitted += len(out)
        return out


def decode(data: bytes, what: str = "object", *, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Decode and verify a whole in-memory envelope of at most max_size raw bytes.

    The trailer is read first: a declared size over max_size is refused before any decompression,
    and decompression stops as soon as it passes the declared size."""
    version, code = _parse_header(data, what)
    trailer = parse_trailer(data, what, version=version)
    if trailer.size > max_size:
        raise _too_large(what, max_size)
    body = memoryview(data)[HEADER_SIZE:-TRAILER_SIZE]
    inf = _Inflater(code, max_size, what, declared=trailer.size)
    raw = b"".join(inf.feed(body))
    inf.finish()
    _verify(len(raw), digest_of(trailer.algo, raw).hex(), trailer, what)
    return raw


def _verify(size: int, digest: str, trailer: Trailer, what: str) -> None:
    if size != trailer.size or digest != trailer.digest:
        raise IntegrityError(f"{what} fails its checksum: stored bytes are corrupt", _VERIFY_HINT)


def _too_large(what: str, max_size: int) -> IntegrityError:
    return IntegrityError(f"{what} would decode to more than {max_size} bytes, the most it may hold: "
                          "the object is corrupt or was planted (a decompression bomb)", _VERIFY_HINT)


class _Inflater:
    """Decompresses one payload, never producing more than max_size bytes in all.

    zstd expands at most MAX_RATIO-fold (an RLE block: 4 bytes -> 128 KiB), so input is fed in
    pieces small enough that one call's output cannot pass the cap by more than MAX_RATIO *
    MIN_PIECE bytes; memory stays bounded whatever the object claims."""

    MAX_RATIO = 1 << 15
    MIN_PIECE = 256

    def __init__(self, code: int, max_size: int, what: str, declared: int | None = None) -> None:
        self.what = what
        # more output than the trailer declares fails the checksum anyway: stop as soon as it shows
        self.limit = max_size if declared is None else min(max_size, declared)
        self.max_size = max_size
        self.size = 0
        self._first = True
        self._dobj = None
        if code == 1:
            import zstandard

            self._dobj = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompressobj()

    def feed(self, body: bytes | memoryview) -> Iterator[bytes]:
        """Raw bytes for this piece of payload; IntegrityError on damage or past the cap."""
        if self._dobj is None:
            self._count(len(body))
            if body:
                yield bytes(body)
            return
        view = memoryview(body)
        if self._first and len(view):
            self._first = False
            _check_declared(bytes(view[:18]), self.max_size, self.what)
        pos = 0
        while pos < len(view):
            if self._dobj.eof:  # payload continues past the end of the frame
                raise IntegrityError(f"{self.what} is corrupt (the compressed payload is not exactly one zstd frame)")
            room = max(self.limit - self.size, 0) + 1
            step = min(max(room // self.MAX_RATIO, self.MIN_PIECE), CHUNK)
            piece = view[pos:pos + step]
            pos += len(piece)
            try:
                out = self._dobj.decompress(piece)
            except Exception as e:  # noqa: BLE001 - zstandard.ZstdError
                raise IntegrityError(f"{self.what} is corrupt: its payload does not decompress ({e})",
                                     _VERIFY_HINT) from None
            if self._dobj.unused_data:
                raise IntegrityError(f"{self.what} is corrupt (the compressed payload is not exactly one zstd frame)")
            self._count(len(out))
            if out:
                yield out

    def finish(self) -> None:
        """The payload ended: it must have been one whole frame."""
        if self._dobj is not None and not self._dobj.eof:
            raise IntegrityError(f"{self.what} is truncated (incomplete zstd frame)")

    def _count(self, n: int) -> None:
        self.size += n
        if self.size > self.max_size:
            raise _too_large(self.what, self.max_size)
        if self.size > self.limit:  # past the trailer's own size: corrupt, whatever the cap
            raise IntegrityError(f"{self.what} fails its checksum: stored bytes are corrupt", _VERIFY_HINT)


def _check_declared(head: bytes, max_size: int, what: str) -> None:
    """A frame that declares its content size is refused up front when that is over the cap."""
    import zstandard

    try:
        declared = zstandard.frame_content_size(head)
    except zstandard.ZstdError:
        return  # too short or malformed: decompression reports it
    if declared > max_size:
        raise _too_large(what, max_size)


def decode_stream(src: BinaryIO, dst: Sink | None, what: str = "object", chunk: int = CHUNK, *,
                  max_size: int = DEFAULT_MAX_SIZE) -> Trailer:
    """Decode src into dst (None: just verify), holding back the trailer; raises IntegrityError.

    At most max_size raw bytes are ever produced (and written to dst): a payload that would
    decode to more fails as soon as it passes the cap."""
    pieces = decode_iter(src, what, chunk, max_size=max_size)
    while True:
        try:
            out = next(pieces)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        if dst is not None:
            dst.write(out)


def decode_iter(src: BinaryIO, what: str = "object", chunk: int = CHUNK, *,
                max_size: int = DEFAULT_MAX_SIZE, checksum: bool = True) -> Generator[bytes, None, Trailer]:
    """decode_stream as a generator the caller pulls raw pieces from (a block-incremental restore
    reads several sources forward, a little at a time). The size (and with checksum the digest)
    is verified once the generator is exhausted; a caller that stops early, or passes
    checksum=False, checks what it assembled from the pieces itself.

    Each piece is at most `chunk` raw bytes whatever the payload holds: zstd's stream reader
    decompresses into a buffer of that size, so a bomb is stopped at the cap with memory to
    spare and real data goes through in a few calls per MiB (feeding zstd input in pieces small
    enough to bound its output, as _Inflater does for in-memory objects, costs ~20,000 calls per
    16 MiB WAL segment: 153 ms of CPU per segment against 85, of which zstd itself takes ~50; docs/performance.md)."""
    version, code = _parse_header(src.read(HEADER_SIZE), what)
    body = _Body(src, chunk)
    h = hasher(DIGESTS[version]) if checksum else None
    size = 0
    for out in _payload(body, code, chunk, max_size, what):
        size += len(out)
        if size > max_size:
            raise _too_large(what, max_size)
        if h is not None:
            h.update(out)
        yield out
    trailer = parse_trailer(body.tail(what), what, version=version)
    _verify(size, h.hexdigest() if h is not None else trailer.digest, trailer, what)
    return trailer


def _payload(body: _Body, code: int, chunk: int, max_size: int, what: str) -> Iterator[bytes]:
    """The raw bytes of an envelope's payload, at most `chunk` at a time."""
    if code == 0:
        while out := bytes(body.read(chunk)):
            yield out
        return
    import zstandard

    _check_declared(body.peek(18), max_size, what)
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    reader = dctx.stream_reader(body, read_size=chunk,  # type: ignore[arg-type]
                                read_across_frames=False, closefd=False)
    while True:
        try:
            out = reader.read(chunk)
        except zstandard.ZstdError as e:
            # damage, or bytes after the frame that are not one (a frame cut short decodes short,
            # and the trailer's size refuses it)
            raise IntegrityError(f"{what} is corrupt: its payload does not decompress ({e})", _VERIFY_HINT) from None
        if not out:
            return
        yield out


class _Body:
    """The payload of an envelope being streamed: src's bytes after the header, less the last
    TRAILER_SIZE bytes, which are held back (tail()) until src ends.

    read() hands out views of the pieces src returned, without copying them (a copy of each MiB,
    twice, was ~a third of decoding a WAL segment: fresh buffers fault their pages in); a read
    may return fewer bytes than asked, as a raw stream's may."""

    def __init__(self, src: BinaryIO, chunk: int) -> None:
        self._src, self._chunk = src, chunk
        self._pieces: deque[memoryview] = deque()  # read from src, not handed out yet
        self._held = 0  # bytes in _pieces
        self._eof = False

    def _fill(self, want: int) -> int:
        """Payload bytes available now (reading src until `want` are, or it ends)."""
        while not self._eof and self._held - TRAILER_SIZE < want:
            buf = self._src.read(max(self._chunk, want))
            if not buf:
                self._eof = True
            else:
                self._pieces.append(memoryview(buf).cast("B"))
                self._held += len(buf)
        return max(self._held - TRAILER_SIZE, 0)

    def read(self, n: int = -1) -> memoryview:
        n = self._chunk if n is None or n < 0 else n
        k = min(self._fill(n), n, len(self._pieces[0]) if self._pieces else 0)
        if k == 0:
            return memoryview(b"")
        head = self._pieces[0]
        out = head[:k]
        if k == len(head):
            self._pieces.popleft()
        else:
            self._pieces[0] = head[k:]
        self._held -= k
        return out

    def peek(self, n: int) -> bytes:
        k = min(self._fill(n), n)
        if k == 0:
            return b""
        return bytes(self._pieces[0][:k]) if len(self._pieces[0]) >= k else b"".join(self._pieces)[:k]

    def tail(self, what: str) -> bytes:
        """The trailer: the last bytes of src, once the decoder has read the payload to its end."""
        if self._fill(1):
            raise IntegrityError(f"{what} is corrupt (the compressed payload is not exactly one zstd frame)")
        return b"".join(self._pieces)
