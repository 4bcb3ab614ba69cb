"""WAL names, LSN arithmetic (16 MiB and other segment sizes), history files, segment page headers."""

from __future__ import annotations

import struct

import pytest

from pitr.pg import walheader, walname
from pitr.repo.format import wal_key

MiB = 1 << 20
SYSID = 7301234567890123456


def segment(name: str, seg_size: int = 16 * MiB, sysid: int = SYSID, pageaddr: int | None = None,
            magic: int = 0xD118) -> bytes:
    """A synthetic segment: a long page header as PostgreSQL writes it, then zeros."""
    addr = walname.segment_start_lsn(name, seg_size) if pageaddr is None else pageaddr
    head = struct.pack("<HHIQI4xQII", magic, walheader.XLP_LONG_HEADER, walname.timeline_of(name), addr, 0,
                       sysid, seg_size, 8192)
    return head + bytes(seg_size - len(head))


@pytest.mark.parametrize(
    ("name", "kind", "tli", "seg"),
    [
        ("000000010000000000000001", "segment", 1, "000000010000000000000001"),
        ("0000000A00000003000000FF", "segment", 10, "0000000A00000003000000FF"),
        ("000000020000000000000005.partial", "partial", 2, "000000020000000000000005"),
        ("000000010000000000000002.00000028.backup", "backup", 1, "000000010000000000000002"),
        ("00000003.history", "history", 3, None),
    ],
)
def test_parse_kinds(name: str, kind: str, tli: int, seg: str | None) -> None:
    w = walname.parse(name)
    assert w is not None and (w.kind, w.timeline, w.segment) == (kind, tli, seg)
    assert w.is_segment == (kind == "segment")


@pytest.mark.parametrize("name", ["", "00000001000000000000001", "0000000100000000000000010",
                                  "00000001000000000000000g", "000000010000000000000001.ready",
                                  "RECOVERYXLOG", "00000003.history.tmp", "../000000010000000000000001",
                                  "000000010000000000000001.backup"])
def test_parse_rejects(name: str) -> None:
    assert walname.parse(name) is None


def test_wal_keys() -> None:
    assert wal_key("000000010000000200000003") == "wal/0000000100000002/000000010000000200000003"
    assert wal_key("000000010000000200000003.partial") == "wal/0000000100000002/000000010000000200000003.partial"
    assert wal_key("00000002.history") == "wal/history/00000002.history"
    with pytest.raises(ValueError):
        wal_key("pg_wal/000000010000000200000003")


def test_lsn_parse_and_format() -> None:
    assert walname.parse_lsn("16/B374D848") == 0x16B374D848
    assert walname.parse_lsn("0/0") == 0
    assert walname.format_lsn(0x16B374D848) == "16/B374D848"
    assert walname.format_lsn(walname.parse_lsn("ffffffff/FFFFFFFF")) == "FFFFFFFF/FFFFFFFF"
    for bad in ("16B374D848", "1/2/3", "x/1", "123456789/0", ""):
        with pytest.raises(ValueError):
            walname.parse_lsn(bad)


def test_16mib_arithmetic() -> None:
    seg = 16 * MiB
    assert walname.segments_per_log(seg) == 256
    lsn = walname.parse_lsn("1/FF000028")  # last segment of log 1
    assert walname.segment_of_lsn(1, lsn) == "0000000100000001000000FF"
    nxt = lsn + seg
    assert walname.segment_of_lsn(1, nxt) == "000000010000000200000000"  # rolls into the next log
    assert walname.segno("000000010000000200000000") == 2 * 256
    assert walname.segment_start_lsn("000000010000000200000000") == 0x200000000
    assert walname.seg_name(5, 2 * 256 + 3) == "000000050000000200000003"
    assert walname.segment_range(1, walname.parse_lsn("0/FE000000"), walname.parse_lsn("1/01000000")) == [
        "0000000100000000000000FE", "0000000100000000000000FF",
        "000000010000000100000000", "000000010000000100000001"]


@pytest.mark.parametrize("seg_mb", [1, 2, 64, 1024])
def test_other_segment_sizes(seg_mb: int) -> None:
    seg = seg_mb * MiB
    per = 0x100000000 // seg
    assert walname.segments_per_log(seg) == per
    last_of_log0 = walname.seg_name(1, per - 1, seg)
    assert last_of_log0 == f"0000000100000000{per - 1:08X}"
    first_of_log1 = walname.seg_name(1, per, seg)
    assert first_of_log1 == "000000010000000100000000"
    assert walname.segment_start_lsn(first_of_log1, seg) == 0x100000000
    assert walname.segno(first_of_log1, seg) == per
    lsn = walname.parse_lsn("1/0") - 1  # last byte of log 0
    assert walname.segment_of_lsn(1, lsn, seg) == last_of_log0
    # every name round-trips through its number
    for no in (0, 1, per - 1, per, 3 * per + 1):
        assert walname.segno(walname.seg_name(7, no, seg), seg) == no


def test_history_parsing() -> None:
    text = ("1\t0/3000158\tno recovery target specified\n"
            "\n# a comment PostgreSQL never writes but humans might\n"
            "2\t1/A0000000\tbefore 2024-05-01 10:00:00+00\n"
            "3   1/B0000000\n")
    entries = walname.parse_history(text)
    assert [(e.parent, walname.format_lsn(e.switch_lsn)) for e in entries] == [
        (1, "0/3000158"), (2, "1/A0000000"), (3, "1/B0000000")]
    assert entries[1].reason == "before 2024-05-01 10:00:00+00" and entries[2].reason == ""
    assert walname.parse_history("") == []
    for bad in ("1\n", "x\t0/1\n", "1\tnot-an-lsn\n"):
        with pytest.raises(ValueError):
            walname.parse_history(bad)


# --------------------------------------------------------------------------- page headers

NAME = "000000010000000300000004"


@pytest.mark.parametrize("seg_mb", [1, 16])
def test_header_accepts_a_valid_segment(seg_mb: int) -> None:
    seg = seg_mb * MiB
    data = segment(NAME, seg)
    assert walheader.problem(NAME, data, seg, SYSID) is None
    assert walheader.problem(NAME, data, seg, None) is None  # sysid not known: not compared
    h = walheader.read_header(data)
    assert h is not None and h.pageaddr == walname.segment_start_lsn(NAME, seg) and h.sysid == SYSID


def test_header_ignores_the_timeline_field() -> None:
    """The first segment of a new timeline keeps the old timeline's header: not a problem."""
    data = bytearray(segment("000000020000000300000004"))
    struct.pack_into("<I", data, 4, 1)
    assert walheader.problem("000000020000000300000004", bytes(data), 16 * MiB, SYSID) is None


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (segment(NAME, sysid=SYSID + 1), "belongs to the cluster with system identifier"),
        (segment(NAME, pageaddr=walname.segment_start_lsn(NAME) + 16 * MiB), "disagrees with its name"),
        (segment(NAME)[: 8 * MiB], "is 8388608 bytes, not the cluster's WAL segment size of 16777216"),
        (b"", "is 0 bytes"),
        (bytes(16 * MiB), "zeroed page"),
        (b"\x01" * (16 * MiB), "does not start with a WAL page header"),
        (segment(NAME, seg_size=1 * MiB) + bytes(15 * MiB), "segment size of 1048576"),
        (segment(NAME, magic=0x0718), "does not start with a WAL page header"),
    ],
    ids=["sysid", "pageaddr", "short", "empty", "zero-page", "garbage", "seg-size", "magic"],
)
def test_header_problems(data: bytes, needle: str) -> None:
    why = walheader.problem(NAME, data, 16 * MiB, SYSID)
    assert why is not None and needle in why
