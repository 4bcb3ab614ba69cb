"""Check a WAL segment's first page header against its file name and the repository's cluster.

The first page of every segment carries a long header (XLogLongPageHeaderData, little-endian on
every platform PostgreSQL ships for here): xlp_magic u16, xlp_info u16, xlp_tli u32,
xlp_pageaddr u64, xlp_rem_len u32, 4 bytes padding, then xlp_sysid u64, xlp_seg_size u32,
xlp_xlog_blcksz u32. xlp_pageaddr must equal the segment's start LSN; xlp_sysid is the cluster's
system identifier. (xlp_tli is not compared with the name: the first segment of a new timeline
starts as a copy of the old timeline's segment and keeps its header.)

Every check of a segment's header (wal-push, wal-fetch, the prefetcher, the foreground's re-check
of a prefetched file, verify) is problem() here. It runs on the quick path of wal-fetch
(ops/wal/spool.take_prefetched, standard library only), so this module imports nothing heavier than
struct and collections: no dataclasses, no typing, and pg/walname (which compiles its regular
expressions at import) only when a problem is to be described.
"""

from __future__ import annotations

import struct
from collections import namedtuple

XLP_LONG_HEADER = 0x0002
_LONG = struct.Struct("<HHIQI4xQII")
LONG_HEADER_SIZE = _LONG.size  # 40
HEAD_BYTES = 8192  # what callers pass of a segment: the first page (header + the zeroed-page test)

# a namedtuple, not a dataclass or typing.NamedTuple: those imports cost the quick path milliseconds
SegmentHeader = namedtuple("SegmentHeader", "magic info tli pageaddr sysid seg_size blcksz")


def read_header(data: bytes | memoryview) -> SegmentHeader | None:
    """The long page header, or None when the bytes do not start with one."""
    if len(data) < LONG_HEADER_SIZE:
        return None
    magic, info, tli, pageaddr, _rem, sysid, seg_size, blcksz = _LONG.unpack_from(data, 0)
    if magic & 0xFF00 != 0xD100 or not info & XLP_LONG_HEADER:
        return None
    return SegmentHeader(magic, info, tli, pageaddr, sysid, seg_size, blcksz)


def problem(name: str, data: bytes | memoryview, seg_size: int, sysid: int | None,
            size: int | None = None) -> str | None:
    """Why `data` is not a valid segment `name` of this cluster, or None when it is.

    `data` is the whole segment or its first bytes (HEAD_BYTES are enough) with `size` the whole
    segment's size; `sysid` None when the cluster's system identifier is not known.
    """
    size = len(data) if size is None else size
    if size != seg_size:
        return f"is {size} bytes, not the cluster's WAL segment size of {seg_size}"
    h = read_header(data)
    if h is None:
        if not any(data[:HEAD_BYTES]):
            return "starts with a zeroed page, not a WAL page header"
        return "does not start with a WAL page header"
    if h.seg_size != seg_size:
        return f"header says a segment size of {h.seg_size}, the repository's is {seg_size}"
    # = walname.segment_start_lsn(name[:24], seg_size), inline: walname is too slow to import here
    expected = (int(name[8:16], 16) * (0x100000000 // seg_size) + int(name[16:24], 16)) * seg_size
    if h.pageaddr != expected:
        from pitr.pg.walname import format_lsn

        return (f"header LSN {format_lsn(h.pageaddr)} disagrees with its name "
                f"(which starts at {format_lsn(expected)})")
    if sysid is not None and h.sysid != sysid:
        return f"belongs to the cluster with system identifier {h.sysid}, not the repository's {sysid}"
    return None
