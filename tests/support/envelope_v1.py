"""Version-1 envelopes (SHA-256 trailer), as pitr wrote them before envelope version 2.

Built here by hand from the spec (docs/repository-format.md §3), not by pitr's writer (which writes
version 2 only): a repository an older pitr filled must keep restoring and verifying."""

from __future__ import annotations

import hashlib
import struct


def encode_v1(raw: bytes, codec: str = "zstd", level: int = 3) -> bytes:
    """header (version 1) | payload | trailer (size, SHA-256 of raw, b"PITR-END")."""
    if codec == "zstd":
        import zstandard

        body = zstandard.ZstdCompressor(level=level).compress(raw)
        head = struct.pack(">4sBBb9s", b"PITR", 1, 1, level, bytes(9))
    else:
        body = raw
        head = struct.pack(">4sBBb9s", b"PITR", 1, 0, 0, bytes(9))
    return head + body + struct.pack(">Q32s8s", len(raw), hashlib.sha256(raw).digest(), b"PITR-END")
