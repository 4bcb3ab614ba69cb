"""Read-only queries over a repository: archived WAL per timeline (with gaps), timeline history,
complete backups, and which WAL a backup needs. Used by info, restore, verify and expire.

One listing of wal/ feeds everything (S3 list is paginated; thousands of segments are fine).
Times: an archived object's storage mtime is when it arrived, the basis of the RPO and of the
"latest restorable time" estimate (a segment's last commit happened before it was archived).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pitr.pg import walname
from pitr.pg.walname import HistoryEntry
from pitr.repo import envelope
from pitr.repo.format import WAL_PREFIX, wal_key
from pitr.repo.manifest import Manifest, list_manifests
from pitr.storage.base import ObjectInfo, Storage


@dataclass
class TimelineWal:
    timeline: int
    segnos: list[int] = field(default_factory=list)  # sorted, archived segment numbers
    partials: list[str] = field(default_factory=list)
    newest_mtime: float = 0.0

    @property
    def first(self) -> int | None:
        return self.segnos[0] if self.segnos else None

    @property
    def last(self) -> int | None:
        return self.segnos[-1] if self.segnos else None

    def gaps(self, start: int | None = None, end: int | None = None) -> list[tuple[int, int]]:
        """Missing segment-number ranges (inclusive) between start (default first) and end (default last)."""
        have = set(self.segnos)
        lo = self.first if start is None else start
        hi = self.last if end is None else end
        if lo is None or hi is None:
            return []
        out: list[tuple[int, int]] = []
        run: int | None = None
        for n in range(lo, hi + 1):
            if n not in have:
                if run is None:
                    run = n
            elif run is not None:
                out.append((run, n - 1))
                run = None
        if run is not None:
            out.append((run, hi))
        return out


@dataclass
class WalCatalog:
    seg_size: int
    timelines: dict[int, TimelineWal] = field(default_factory=dict)
    history_files: dict[int, ObjectInfo] = field(default_factory=dict)
    backup_files: list[str] = field(default_factory=list)  # NAME.XXXXXXXX.backup
    objects: dict[str, ObjectInfo] = field(default_factory=dict)  # name -> info, every WAL object
    newest_mtime: float = 0.0
    newest_name: str | None = None

    def has(self, name: str) -> bool:
        return name in self.objects

    def seg_name(self, tli: int, segno: int) -> str:
        return walname.seg_name(tli, segno, self.seg_size)


def scan_wal(storage: Storage, seg_size: int) -> WalCatalog:
    """One listing of the WAL area, classified."""
    cat = WalCatalog(seg_size)
    for o in storage.list(WAL_PREFIX):
        name = o.key.rsplit("/", 1)[-1]
        w = walname.parse(name)
        if w is None:
            continue
        cat.objects[name] = o
        if w.kind == "history":
            cat.history_files[w.timeline] = o
            continue
        if w.kind == "backup":
            cat.backup_files.append(name)
            continue
        tl = cat.timelines.setdefault(w.timeline, TimelineWal(w.timeline))
        if w.kind == "partial":
            tl.partials.append(name)
        else:
            tl.segnos.append(walname.segno(name, seg_size))
            if o.mtime >= cat.newest_mtime:
                cat.newest_mtime = o.mtime
                cat.newest_name = name
        tl.newest_mtime = max(tl.newest_mtime, o.mtime)
    for tl in cat.timelines.values():
        tl.segnos.sort()
    return cat


def read_history(storage: Storage, tli: int) -> list[HistoryEntry]:
    """Parsed history of timeline tli (empty for timeline 1); NotFoundError if missing."""
    if tli == 1:
        return []
    data = envelope.decode(storage.get(wal_key(walname.history_name(tli))), f"history file of timeline {tli}",
                           max_size=walname.SMALL_FILE_MAX)
    return walname.parse_history(data.decode())


@dataclass(frozen=True)
class Stretch:
    """WAL of one timeline from start_lsn up to (not including) end_lsn (None = open end)."""

    timeline: int
    start_lsn: int
    end_lsn: int | None


def timeline_path(history: list[HistoryEntry], target_tli: int, from_tli: int, from_lsn: int) -> list[Stretch] | None:
    """The stretches recovery replays from (from_tli, from_lsn) to target_tli, or None when
    target_tli does not descend from from_tli at from_lsn (a backup on another branch)."""
    # history lists ancestors oldest first: (parent, switch_lsn) means parent ended at switch_lsn
    chain = [(h.parent, h.switch_lsn) for h in history] + [(target_tli, None)]
    out: list[Stretch] = []
    start = from_lsn
    started = False
    for tli, end in chain:
        if not started:
            if tli != from_tli:
                continue
            started = True
            if end is not None and from_lsn >= end:
                return None  # the backup is past the point where the target branched off
        out.append(Stretch(tli, start, end))
        if end is not None:
            start = end
    return out if started else None


def segments_for(stretches: list[Stretch], until_lsn: int | None, seg_size: int) -> list[str]:
    """Segment names needed to replay the stretches up to until_lsn (None: up to each end).

    The segment holding a switch point is read from the new timeline (PostgreSQL copies the old
    timeline's part into it), so an ancestor contributes segments up to the one before it."""
    names: list[str] = []
    for st in stretches:
        first = st.start_lsn // seg_size
        if st.end_lsn is not None:
            last = st.end_lsn // seg_size - 1
            if until_lsn is not None and until_lsn < st.end_lsn:
                last = until_lsn // seg_size
        elif until_lsn is not None:
            last = until_lsn // seg_size
        else:
            break
        names.extend(walname.seg_name(st.timeline, n, seg_size) for n in range(first, last + 1))
        if until_lsn is not None and (st.end_lsn is None or until_lsn < st.end_lsn):
            break
    return names


def present_wal(storage: Storage, names: list[str]) -> set[str]:
    """Which of the named WAL files the archive holds: one listing per wal/<timeline+log>/ folder
    involved (a backup's range spans one or two), instead of one request per segment."""
    wanted = set(names)
    found: set[str] = set()
    for folder in sorted({wal_key(n).rsplit("/", 1)[0] + "/" for n in wanted}):
        for o in storage.list(folder):
            name = o.key.rsplit("/", 1)[-1]
            if name in wanted:
                found.add(name)
    return found


def backups(storage: Storage) -> list[Manifest]:
    """Complete backups, oldest first."""
    return list_manifests(storage)


def backup_wal(m: Manifest) -> list[str]:
    """Segments a backup needs to become consistent (start to stop on its timeline)."""
    return walname.segment_range(m.timeline, walname.parse_lsn(m.start_lsn), walname.parse_lsn(m.stop_lsn),
                                 m.wal_segment_size)
