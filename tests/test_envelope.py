"""The object envelope: round trips (bytes and streaming), and every corruption or truncation caught."""

from __future__ import annotations

import hashlib
import io
import os
import struct

import blake3
import pytest

from pitr.errors import ConfigError, IntegrityError
from pitr.repo import envelope
from pitr.repo.envelope import Codec, decode, decode_stream, encode, encode_stream, parse_codec
from tests.support.bomb import BOMB_RAW, bomb
from tests.support.envelope_v1 import encode_v1

CODECS = [Codec("none", 0), Codec("zstd", 3)]
IDS = ["none", "zstd"]


def sample(n: int = 200_000) -> bytes:
    """Half compressible, half random: exercises real zstd blocks."""
    return (b"postgres wal " * (n // 26))[: n // 2] + os.urandom(n - n // 2)


def stream_decode(blob: bytes, chunk: int = envelope.CHUNK) -> bytes:
    out = io.BytesIO()
    decode_stream(io.BytesIO(blob), out, chunk=chunk)
    return out.getvalue()


@pytest.mark.parametrize("c", CODECS, ids=IDS)
@pytest.mark.parametrize("raw", [b"", b"x", sample()], ids=["empty", "one-byte", "200k"])
def test_round_trip_bytes_and_stream(c: Codec, raw: bytes) -> None:
    blob = encode(raw, c)
    streamed = b"".join(encode_stream(io.BytesIO(raw), c, chunk=4096))
    assert decode(blob) == raw
    assert decode(streamed) == raw
    assert stream_decode(blob) == raw
    assert stream_decode(streamed, chunk=1000) == raw
    reader = envelope.EncodedReader(encode_stream(io.BytesIO(raw), c, chunk=4096))
    pulled = b"".join(iter(lambda: reader.read(777), b""))
    assert decode(pulled) == raw and reader.emitted == len(pulled) and reader.tail == pulled[-envelope.TRAILER_SIZE:]


def test_layout_matches_the_spec() -> None:
    """docs/repository-format.md describes these bytes; an independent reader can rely on them."""
    raw = b"hello pitr"
    blob = encode(raw, Codec("none", 0))
    assert blob[:4] == b"PITR" and blob[4] == 2 and blob[5] == 0 and blob[6] == 0 and blob[7:16] == bytes(9)
    assert blob[16:-48] == raw
    size, digest, end = struct.unpack(">Q32s8s", blob[-48:])
    # version 2: the trailer holds BLAKE3-256 (blake3's default 32-byte output) of the raw bytes
    assert (size, digest, end) == (len(raw), blake3.blake3(raw).digest(), b"PITR-END")
    z = encode(raw, Codec("zstd", 7))
    assert z[5] == 1 and z[6] == 7 and z[16:20] == b"\x28\xb5\x2f\xfd"  # one zstd frame follows
    t = envelope.parse_trailer(z, "x", version=envelope.parse_header(z, "x"))
    assert t == envelope.Trailer(len(raw), blake3.blake3(raw).hexdigest(), "blake3")


def test_zstd_compresses() -> None:
    raw = b"\0" * 1_000_000
    assert len(encode(raw, Codec("zstd", 3))) < 1000


@pytest.mark.parametrize("c", CODECS, ids=IDS)
def test_every_byte_corruption_is_detected(c: Codec) -> None:
    """Flip each byte in turn: decoding must raise, whether whole or streamed.

    The one exception is the compression level byte (offset 6), which is advisory (not needed to
    decode); flipping it must still never yield different data.
    """
    raw = sample(3000)
    blob = encode(raw, c)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x5A
        if i == 6:
            try:
                assert decode(bytes(bad)) == raw
            except IntegrityError:
                pass
            continue
        with pytest.raises(IntegrityError):
            decode(bytes(bad))
        with pytest.raises(IntegrityError):
            stream_decode(bytes(bad), chunk=512)


@pytest.mark.parametrize("c", CODECS, ids=IDS)
def test_every_truncation_is_detected(c: Codec) -> None:
    raw = sample(3000)
    blob = encode(raw, c)
    for n in [*range(0, 70), *range(70, len(blob), 37), len(blob) - 1]:
        with pytest.raises(IntegrityError):
            decode(blob[:n])
        with pytest.raises(IntegrityError):
            stream_decode(blob[:n], chunk=100)


def test_appended_bytes_are_detected() -> None:
    blob = encode(sample(3000), Codec("zstd", 3))
    with pytest.raises(IntegrityError):
        decode(blob + b"\0")
    with pytest.raises(IntegrityError):
        decode(blob + blob)


@pytest.mark.parametrize("chunk", [100, envelope.CHUNK])
def test_streamed_payload_is_the_frame_and_nothing_that_changes_it(chunk: int) -> None:
    """A stream decode (wal-fetch, restore) reads the payload through zstd's stream reader: junk
    after the frame, a second frame and a frame cut short all fail; a zstd skippable frame after
    the data is passed over, as it cannot change a byte of the output (docs/repository-format.md)."""
    raw = sample(150_000)
    blob = encode(raw, Codec("zstd", 3))
    cut, end = envelope.HEADER_SIZE, len(blob) - envelope.TRAILER_SIZE
    head, frame, trailer = blob[:cut], blob[cut:end], blob[end:]
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"note"
    assert stream_decode(head + frame + skippable + trailer, chunk) == raw
    for bad in (frame + b"xyz", frame + frame, frame[:-3]):
        with pytest.raises(IntegrityError):
            stream_decode(head + bad + trailer, chunk)
        with pytest.raises(IntegrityError):
            decode(head + bad + trailer)


def _frame_with_window(raw: bytes, window_log: int) -> bytes:
    """raw as one zstd frame of unknown content size whose header asks for a 2**window_log window."""
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log)
    out = io.BytesIO()
    w = zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False)
    w.write(raw)
    w.flush(zstandard.FLUSH_FRAME)
    return out.getvalue()


@pytest.mark.parametrize("chunk", [4096, envelope.CHUNK])
def test_a_frame_asking_for_a_huge_window_is_refused(chunk: int) -> None:
    """zstd would allocate the window a frame declares (up to 128 MiB by default) for every decode
    running at once; pitr's writers (levels 1-19) never need more than 8 MiB."""
    import zstandard

    raw = sample(300_000)
    blob = encode(raw, Codec("zstd", 3))
    cut, end = envelope.HEADER_SIZE, len(blob) - envelope.TRAILER_SIZE
    for window_log, ok in ((23, True), (24, True), (25, False), (27, False)):
        frame = _frame_with_window(raw, window_log)
        assert zstandard.get_frame_parameters(frame).window_size == 1 << window_log
        forged = blob[:cut] + frame + blob[end:]  # the trailer's size and digest are right
        if ok:
            assert decode(forged) == raw and stream_decode(forged, chunk) == raw
            continue
        for fn in (decode, lambda b: stream_decode(b, chunk)):
            with pytest.raises(IntegrityError, match="does not decompress"):
                fn(forged)


def test_decode_stream_verify_only_returns_trailer() -> None:
    raw = sample(5000)
    t = decode_stream(io.BytesIO(encode(raw, Codec("zstd", 1))), None)
    assert t.size == len(raw) and (t.algo, t.digest) == ("blake3", blake3.blake3(raw).hexdigest())


@pytest.mark.parametrize("version", [0, 3, 255])
def test_unknown_version_says_upgrade(version: int) -> None:
    blob = bytearray(encode(b"abc", Codec("none", 0)))
    blob[4] = version
    for fn in (decode, stream_decode):
        with pytest.raises(IntegrityError, match=f"envelope version {version}; this pitr reads versions 1, 2") as e:
            fn(bytes(blob))
        assert e.value.hint == "upgrade pitr"


# --------------------------------------------------------------------------- version 1 (SHA-256), still read

V1_CODECS = [("none", 0), ("zstd", 3)]


@pytest.mark.parametrize(("codec", "level"), V1_CODECS, ids=IDS)
@pytest.mark.parametrize("raw", [b"", b"x", sample()], ids=["empty", "one-byte", "200k"])
def test_version_1_still_decodes(codec: str, level: int, raw: bytes) -> None:
    """Objects an older pitr wrote (SHA-256 trailer) decode, whole and streamed, and say their algorithm."""
    blob = encode_v1(raw, codec, level)
    assert blob[4] == 1
    assert decode(blob) == raw and stream_decode(blob, chunk=1000) == raw
    t = decode_stream(io.BytesIO(blob), None)
    assert t == envelope.Trailer(len(raw), hashlib.sha256(raw).hexdigest(), "sha256")
    assert envelope.parse_trailer(blob, "x", version=envelope.parse_header(blob, "x")) == t


@pytest.mark.parametrize(("codec", "level"), V1_CODECS, ids=IDS)
def test_version_1_relabelled_2_fails(codec: str, level: int) -> None:
    """A v1 object whose version byte says 2: its SHA-256 is no BLAKE3, so the checksum fails."""
    raw = sample(5000)
    bad = bytearray(encode_v1(raw, codec, level))
    bad[4] = 2
    with pytest.raises(IntegrityError, match="fails its checksum"):
        decode(bytes(bad))
    with pytest.raises(IntegrityError, match="fails its checksum"):
        stream_decode(bytes(bad), chunk=512)


@pytest.mark.parametrize("c", CODECS, ids=IDS)
def test_version_2_relabelled_1_fails(c: Codec) -> None:
    bad = bytearray(encode(sample(5000), c))
    bad[4] = 1
    with pytest.raises(IntegrityError, match="fails its checksum"):
        decode(bytes(bad))
    with pytest.raises(IntegrityError, match="fails its checksum"):
        stream_decode(bytes(bad), chunk=512)


def test_version_2_with_one_flipped_payload_byte_fails() -> None:
    raw = sample(5000)
    bad = bytearray(encode(raw, Codec("none", 0)))
    bad[envelope.HEADER_SIZE + 100] ^= 0x01  # stored uncompressed: only the BLAKE3 can tell
    with pytest.raises(IntegrityError, match="fails its checksum"):
        decode(bytes(bad))
    with pytest.raises(IntegrityError, match="fails its checksum"):
        stream_decode(bytes(bad), chunk=512)


@pytest.mark.parametrize(("codec", "level"), V1_CODECS, ids=IDS)
def test_version_1_every_byte_corruption_is_detected(codec: str, level: int) -> None:
    raw = sample(2000)
    blob = encode_v1(raw, codec, level)
    for i in range(len(blob)):
        if i == 6:  # the advisory level byte (see test_every_byte_corruption_is_detected)
            continue
        bad = bytearray(blob)
        bad[i] ^= 0x5A
        with pytest.raises(IntegrityError):
            decode(bytes(bad))
        with pytest.raises(IntegrityError):
            stream_decode(bytes(bad), chunk=512)


@pytest.mark.parametrize(("spec", "want"), [("zstd", "zstd:3"), ("zstd:19", "zstd:19"), ("ZSTD:1", "zstd:1"),
                                            ("none", "none"), (" none ", "none")])
def test_parse_codec(spec: str, want: str) -> None:
    assert str(parse_codec(spec)) == want


@pytest.mark.parametrize("spec", ["gzip", "zstd:0", "zstd:20", "zstd:fast", ""])
def test_parse_codec_rejects(spec: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_codec(spec)
    assert e.value.exit_code == 2


def test_repository_format_doc_covers_the_schema() -> None:
    """docs/repository-format.md is the spec: it names the current version and every stored field."""
    from dataclasses import fields
    from pathlib import Path

    from pitr.repo.format import FORMAT_VERSION
    from pitr.repo.manifest import DirEntry, FileEntry, Manifest, Tablespace
    from pitr.repo.meta import RepoMeta

    doc = (Path(__file__).resolve().parent.parent / "docs" / "repository-format.md").read_text()
    assert doc.startswith(f"# pitr repository format, version {FORMAT_VERSION}\n")
    assert f"- **{FORMAT_VERSION}** (" in doc  # a changelog entry for it
    for cls in (Manifest, FileEntry, DirEntry, Tablespace, RepoMeta):
        missing = [f.name for f in fields(cls) if f"`{f.name}`" not in doc]
        assert missing == [], f"{cls.__name__}: {missing}"
    assert f"u8, {envelope.VERSION}" in doc and envelope.MAGIC.decode() in doc and envelope.END.decode() in doc


# --------------------------------------------------------------------------- decompression bombs

CAP = 16 << 20  # a WAL segment: the most such an object may hold


def _peak_traced(fn) -> int:  # type: ignore[no-untyped-def]
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


class _CountingSink:
    def __init__(self) -> None:
        self.n = 0

    def write(self, b: bytes) -> None:
        self.n += len(b)


@pytest.mark.parametrize("declared", [8192, BOMB_RAW], ids=["trailer-lies", "trailer-honest"])
def test_bomb_stream_decode_stops_at_the_cap(declared: int) -> None:
    """Streaming (wal-fetch, restore): never more than the cap reaches dst, memory stays small."""
    blob = bomb(declared)
    sink = _CountingSink()

    def run() -> None:
        with pytest.raises(IntegrityError, match="more than 16777216 bytes") as e:
            decode_stream(io.BytesIO(blob), sink, "archived 000000010000000000000001", max_size=CAP)
        assert "000000010000000000000001" in str(e.value)

    peak = _peak_traced(run)
    assert sink.n <= CAP
    assert peak < 64 << 20, peak


def test_bomb_whole_decode_refused_by_declared_size_without_decompressing() -> None:
    """In memory: a trailer declaring more than the cap is refused before decompressing."""
    blob = bomb(BOMB_RAW)
    peak = _peak_traced(lambda: pytest.raises(IntegrityError, decode, blob, "manifest", max_size=CAP))
    assert peak < 1 << 20, peak


def test_bomb_whole_decode_with_lying_trailer_stops_early() -> None:
    """A trailer claiming a small size: decompression stops just past that size, not at 512 MiB."""
    blob = bomb(8192)
    peak = _peak_traced(lambda: pytest.raises(IntegrityError, decode, blob, "manifest", max_size=CAP))
    assert peak < 64 << 20, peak


def test_frame_declaring_too_much_is_refused_up_front() -> None:
    blob = bomb(8192, content_size=True)
    sink = _CountingSink()
    with pytest.raises(IntegrityError, match="more than"):
        decode_stream(io.BytesIO(blob), sink, max_size=CAP)
    assert sink.n == 0


@pytest.mark.parametrize("c", CODECS, ids=IDS)
def test_cap_is_inclusive_and_applies_to_plain_objects(c: Codec) -> None:
    raw = sample(100_000)
    blob = encode(raw, c)
    assert decode(blob, max_size=len(raw)) == raw
    out = io.BytesIO()
    decode_stream(io.BytesIO(blob), out, chunk=4096, max_size=len(raw))
    assert out.getvalue() == raw
    with pytest.raises(IntegrityError, match=f"more than {len(raw) - 1} bytes"):
        decode(blob, max_size=len(raw) - 1)
    out = io.BytesIO()
    with pytest.raises(IntegrityError, match=f"more than {len(raw) - 1} bytes"):
        decode_stream(io.BytesIO(blob), out, chunk=4096, max_size=len(raw) - 1)
    assert len(out.getvalue()) < len(raw)


def test_encoded_reader_returns_exactly_the_stream_whatever_the_read_sizes() -> None:
    # an S3 multipart upload pulls fixed-size parts; the reader splits pieces by views (one copy per
    # part), so every split point must hand each byte over once, in order
    import random

    rnd = random.Random(16)
    for _ in range(60):
        data = rnd.randbytes(rnd.randint(0, 200_000)) + b"a" * rnd.randint(0, 300_000)
        pieces = list(encode_stream(io.BytesIO(data), Codec("zstd", 1), chunk=rnd.randint(1000, 70_000)))
        whole = b"".join(pieces)
        r = envelope.EncodedReader(iter(pieces))
        got = []
        while True:
            assert r.read(0) == b""  # asks for nothing, takes nothing
            chunk = r.read(rnd.choice([1, 7, 4096, 65_536, 1 << 20, -1]))
            if not chunk:
                break
            assert isinstance(chunk, bytes)
            got.append(chunk)
        assert b"".join(got) == whole and r.emitted == len(whole) and r.tail == whole[-48:]
