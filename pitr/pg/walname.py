"""WAL file names, timelines and LSN arithmetic (pure functions, no I/O).

A segment name is TTTTTTTTXXXXXXXXYYYYYYYY: timeline, then the segment number split into
"log" (segno // segments_per_log) and "seg" (segno % segments_per_log), where
segments_per_log = 2**32 // wal_segment_size. Other archive files: NAME.partial (a segment cut
short by a promotion), NAME.XXXXXXXX.backup (backup history), TTTTTTTT.history (timeline history).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_SEG_SIZE = 16 * 1024 * 1024
# .history and .backup files are text of a line per ancestor timeline / a few labelled lines:
# far below this. It bounds what pitr archives and what it will decode of them.
SMALL_FILE_MAX = 1 << 20

_SEG = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_PARTIAL = re.compile(r"^([0-9A-F]{24})\.partial$")
_BACKUP = re.compile(r"^([0-9A-F]{24})\.([0-9A-F]{8})\.backup$")
_HISTORY = re.compile(r"^([0-9A-F]{8})\.history$")
_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


@dataclass(frozen=True)
class WalName:
    """A parsed archive file name. kind: segment | partial | backup | history."""

    name: str
    kind: str
    timeline: int
    segment: str | None  # the 24-hex segment name this file belongs to (None for history)

    @property
    def is_segment(self) -> bool:
        return self.kind == "segment"


def parse(name: str) -> WalName | None:
    """Classify an archive file name; None if it is not one PostgreSQL archives."""
    if _SEG.match(name):
        return WalName(name, "segment", int(name[:8], 16), name)
    if m := _PARTIAL.match(name):
        return WalName(name, "partial", int(name[:8], 16), m.group(1))
    if m := _BACKUP.match(name):
        return WalName(name, "backup", int(name[:8], 16), m.group(1))
    if m := _HISTORY.match(name):
        return WalName(name, "history", int(m.group(1), 16), None)
    return None


def max_size(kind: str, seg_size: int) -> int:
    """The most bytes an archive file of this kind may hold: a segment (or .partial) is at most
    one segment; history and backup-history files are small text."""
    return seg_size if kind in ("segment", "partial") else SMALL_FILE_MAX


def segments_per_log(seg_size: int) -> int:
    return 0x100000000 // seg_size


def segno(name: str, seg_size: int = DEFAULT_SEG_SIZE) -> int:
    """Segment number (without timeline) of a 24-hex segment name."""
    return int(name[8:16], 16) * segments_per_log(seg_size) + int(name[16:24], 16)


def timeline_of(name: str) -> int:
    return int(name[:8], 16)


def seg_name(tli: int, no: int, seg_size: int = DEFAULT_SEG_SIZE) -> str:
    per = segments_per_log(seg_size)
    return f"{tli:08X}{no // per:08X}{no % per:08X}"


def history_name(tli: int) -> str:
    return f"{tli:08X}.history"


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> int; ValueError on bad syntax."""
    m = _LSN.match(text.strip())
    if not m:
        raise ValueError(f"invalid LSN {text!r}; expected the form 16/B374D848")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_segno(lsn: int, seg_size: int = DEFAULT_SEG_SIZE) -> int:
    return lsn // seg_size


def segment_of_lsn(tli: int, lsn: int, seg_size: int = DEFAULT_SEG_SIZE) -> str:
    return seg_name(tli, lsn_segno(lsn, seg_size), seg_size)


def segment_start_lsn(name: str, seg_size: int = DEFAULT_SEG_SIZE) -> int:
    return segno(name, seg_size) * seg_size


def segment_range(tli: int, first_lsn: int, last_lsn: int, seg_size: int = DEFAULT_SEG_SIZE) -> list[str]:
    """Names of every segment on tli holding WAL from first_lsn to last_lsn inclusive."""
    return [seg_name(tli, n, seg_size) for n in range(lsn_segno(first_lsn, seg_size),
                                                      lsn_segno(last_lsn, seg_size) + 1)]


@dataclass(frozen=True)
class HistoryEntry:
    """One line of a .history file: timeline `parent` ended (switched away) at `switch_lsn`."""

    parent: int
    switch_lsn: int
    reason: str


def parse_history(text: str) -> list[HistoryEntry]:
    """Parse a timeline history file: 'parentTLI<TAB>switchpoint<TAB>reason' lines, # comments."""
    out: list[HistoryEntry] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"\s+", line, maxsplit=2)
        if len(parts) < 2:
            raise ValueError(f"malformed timeline history line {line!r}")
        out.append(HistoryEntry(int(parts[0]), parse_lsn(parts[1]), parts[2] if len(parts) > 2 else ""))
    return out
