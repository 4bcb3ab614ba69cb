"""Check a WAL segment's first page header against its file name and the repository's cluster.

The first page of every segment carries a long header (XLogLongPageHeaderData, little-endian on
every platform PostgreSQL ships for here): xlp_magic u16, xlp_info u16, xlp_tli u32,
xlp_pageaddr u64, xlp_rem_len u32, 4 bytes padding, then xlp_sysid u64, xlp_seg_size u32,
xlp_xlog_blcksz u32. xlp_pageaddr must equal the segment's start LSN; xlp_sysid is the cluster's
system identifier. (xlp_tli is not compared with the name: the first segment of a new timeline
starts as a copy of the old timeline's segment and keeps its header.)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pitr.pg import walname

XLP_LONG_HEADER = 0x0002
_LONG = struct.Struct("<HHIQI4xQII")
LONG_HEADER_SIZE = _LONG.size  # 40


@dataclass(frozen=True)
class SegmentHeader:
    magic: int
    info: int
    tli: int
    pageaddr: int
    sysid: int
    seg_size: int
    blcksz: int


def read_header(data: bytes) -> SegmentHeader | None:
    """The long page header, or None when the bytes do not start with one."""
    if len(data) < LONG_HEADER_SIZE:
        return None
    magic, info, tli, pageaddr, _rem, sysid, seg_size, blcksz = _LONG.unpack_from(data, 0)
    if magic & 0xFF00 != 0xD100 or not info & XLP_LONG_HEADER:
        return None
    return SegmentHeader(magic, info, tli, pageaddr, sysid, seg_size, blcksz)


def problem(name: str, data: bytes, seg_size: int, sysid: int | None) -> str | None:
    """Why `data` is not a valid segment `name` of this cluster, or None when it is."""
    if len(data) != seg_size:
        return f"is {len(data)} bytes, not the cluster's WAL segment size of {seg_size}"
    h = read_header(data)
    if h is None:
        if not any(data[:8192]):
            return "starts with a zeroed page, not a WAL page header"
        return "does not start with a WAL page header"
    if h.seg_size != seg_size:
        return f"header says a segment size of {h.seg_size}, the repository's is {seg_size}"
    expected = walname.segment_start_lsn(name[:24], seg_size)
    if h.pageaddr != expected:
        return (f"header LSN {walname.format_lsn(h.pageaddr)} disagrees with its name "
                f"(which starts at {walname.format_lsn(expected)})")
    if sysid is not None and h.sysid != sysid:
        return f"belongs to the cluster with system identifier {h.sysid}, not the repository's {sysid}"
    return None
