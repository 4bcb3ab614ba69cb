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


def history_problem(tli: int, text: str) -> str | None:
    """Why `text` is not the history file of timeline tli, or None: PostgreSQL writes one line per
    ancestor, oldest first (parent timelines strictly increasing, all below tli; switch points
    never decreasing)."""
    if tli <= 1:
        return "names timeline 1, which has no history file"
    try:
        entries = parse_history(text)
    except ValueError as err:
        return f"is not a timeline history file ({err})"
    if not entries:
        return "is not a timeline history file (it names no parent timeline)"
    prev_tli, prev_lsn = 0, 0
    for e in entries:
        if not prev_tli < e.parent < tli:
            return (f"is not the history of timeline {tli}: it names timeline {e.parent} after "
                    f"{prev_tli or 'none'} (ancestors must be increasing and below {tli})")
        if e.switch_lsn < prev_lsn:
            return f"is not a timeline history file: switch point {format_lsn(e.switch_lsn)} goes backwards"
        prev_tli, prev_lsn = e.parent, e.switch_lsn
    return None


_BACKUP_LOC = re.compile(r"^(START|STOP) WAL LOCATION: ([0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}) \(file ([0-9A-F]{24})\)$")
_BACKUP_TLI = re.compile(r"^(START|STOP) TIMELINE: ([0-9]+)$")


def backup_history_problem(name: str, text: str, seg_size: int) -> str | None:
    """Why `text` is not backup history file `name` (SEGMENT.OFFSET.backup), or None.

    PostgreSQL names it after the segment and offset of the backup's START WAL LOCATION (the
    timeline part: the start or the stop timeline) and writes START and STOP WAL LOCATION lines,
    each with the segment file that holds it."""
    w = parse(name)
    assert w is not None and w.kind == "backup" and w.segment is not None
    locs: dict[str, tuple[int, str]] = {}
    tlis: dict[str, int] = {}
    for line in text.splitlines():
        if m := _BACKUP_LOC.match(line.strip()):
            locs.setdefault(m.group(1), (parse_lsn(m.group(2)), m.group(3)))
        elif m := _BACKUP_TLI.match(line.strip()):
            tlis.setdefault(m.group(1), int(m.group(2)))
    if "START" not in locs or "STOP" not in locs:
        return "is not a backup history file (no START and STOP WAL LOCATION lines)"
    for kind, (lsn, file) in locs.items():
        if segment_of_lsn(timeline_of(file), lsn, seg_size) != file:
            return f"is not a backup history file: {kind} WAL LOCATION {format_lsn(lsn)} is not in {file}"
    start, start_file = locs["START"]
    if locs["STOP"][0] < start:
        return "is not a backup history file: its STOP WAL LOCATION precedes its START"
    offset = int(name[25:33], 16)
    if start_file[8:] != w.segment[8:] or start % seg_size != offset:
        return (f"does not match its name: START WAL LOCATION is {format_lsn(start)} (file {start_file}), "
                f"the name says segment {w.segment[8:]} at offset {offset:08X}")
    if w.timeline not in {timeline_of(start_file), *tlis.values()}:
        return f"does not match its name: timeline {w.timeline} is neither its start nor its stop timeline"
    return None
