"""Decompression bombs: a few KiB of zstd in a valid-looking pitr envelope that expands to 512 MiB."""

from __future__ import annotations

import functools
import hashlib

from pitr.repo import envelope

BOMB_RAW = 512 << 20  # what the payload expands to


@functools.cache
def bomb(declared: int = 8192, *, content_size: bool = False) -> bytes:
    """~16 KiB of zstd that expands to 512 MiB of zeros, in an envelope whose trailer claims `declared` bytes.

    Without content_size the frame does not say how big it is (as a streaming writer leaves it)."""
    import zstandard

    cctx = zstandard.ZstdCompressor(level=1, write_content_size=content_size)
    comp = cctx.compressobj(size=BOMB_RAW if content_size else -1)
    zero = bytes(1 << 20)
    body = b"".join(comp.compress(zero) for _ in range(BOMB_RAW >> 20)) + comp.flush()
    assert len(body) < 32 << 10
    return (envelope.header_bytes(envelope.Codec("zstd", 1)) + body
            + envelope.trailer_bytes(declared, hashlib.sha256(b"x").digest()))
