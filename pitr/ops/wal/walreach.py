"""Which archived WAL a backup needs: to become consistent, and to reach the archive's head on
every timeline it leads to. Shared by verify (is it all there?) and expire (what must stay).

Pure functions over a WalCatalog and the parsed .history files; the only I/O is
load_histories(). Segment numbers here are positions on one timeline (catalog.TimelineWal.segnos).
"""

from __future__ import annotations

from dataclasses import dataclass

from pitr.errors import IntegrityError, NotFoundError
from pitr.pg import walname
from pitr.pg.walname import HistoryEntry
from pitr.repo.catalog import Stretch, WalCatalog, read_history, timeline_path
from pitr.repo.manifest import Manifest
from pitr.storage.base import Storage

#: timeline -> its parsed history, or None when the .history file is missing or unreadable
Histories = dict[int, list[HistoryEntry] | None]


@dataclass(frozen=True)
class Need:
    """Segments first..last (inclusive) of `timeline`; `consistent_upto` marks the part the
    backup needs to become consistent (its start to stop segment), the rest reaches the head."""

    timeline: int
    first: int
    last: int
    consistent_upto: int | None = None  # segno of the backup's stop segment, on its own timeline


def load_histories(storage: Storage, cat: WalCatalog) -> Histories:
    """Every timeline the archive mentions (by segments or .history files) -> its history."""
    out: Histories = {1: []}
    for tli in sorted(set(cat.timelines) | set(cat.history_files)):
        if tli == 1:
            continue
        if tli not in cat.history_files:
            out[tli] = None
            continue
        try:
            out[tli] = read_history(storage, tli)
        except (IntegrityError, NotFoundError, ValueError, UnicodeDecodeError):
            out[tli] = None
    return out


def leads_to(m: Manifest, histories: Histories) -> list[int]:
    """Timelines a restore of backup m can end on: its own and every descendant of its start."""
    start = walname.parse_lsn(m.start_lsn)
    out = [m.timeline]
    for tli, hist in sorted(histories.items()):
        if tli == m.timeline or hist is None:
            continue
        if timeline_path(hist, tli, m.timeline, start) is not None:
            out.append(tli)
    return out


def backup_needs(m: Manifest, cat: WalCatalog, histories: Histories) -> list[Need]:
    """Segment ranges backup m needs, per timeline stretch, from its start segment to the
    archive's head on each timeline it leads to (and at least to its stop segment)."""
    seg = cat.seg_size
    start = walname.parse_lsn(m.start_lsn)
    stop_segno = walname.parse_lsn(m.stop_lsn) // seg
    needs: list[Need] = []
    for target in leads_to(m, histories):
        hist = histories.get(target) or []
        path = timeline_path(hist, target, m.timeline, start) if target != m.timeline else None
        if path is None:  # its own timeline: one open stretch from the start
            path = [Stretch(m.timeline, start, None)]
        for st in path:
            first = st.start_lsn // seg
            if st.end_lsn is not None:
                # the segment holding the switch point is read from the next timeline
                last = st.end_lsn // seg - 1
            else:
                tl = cat.timelines.get(st.timeline)
                head = tl.last if tl is not None and tl.last is not None else first - 1
                last = max(head, stop_segno) if st.timeline == m.timeline else head
            upto = stop_segno if st.timeline == m.timeline else None
            if last >= first:
                needs.append(Need(st.timeline, first, last, upto))
    return needs
