"""`pitr info`: what the repository can restore — backups, archived WAL per timeline with gaps,
the recoverable window and the current RPO. Read-only: one listing of wal/, one of backups/,
each manifest, and the .history files.

The window, and why its end is an estimate:
- earliest: the stop time of the oldest backup whose own WAL (start to stop) is all archived —
  the first moment a restore can reach.
- latest: from every such backup, follow each timeline it leads to, segment by segment, up to
  the first missing one; the newest segment reached bounds what a restore can replay. Its
  arrival time in the repository is an UPPER bound of the last restorable commit (that commit
  happened before its segment was closed and archived), and its end LSN an upper bound of the
  position. A gap cuts the window there even if later WAL exists.
- a diff or incr backup counts like a full one when its chain is whole (repo/chain.py); one whose
  chain is broken (an ancestor missing, unreadable or inconsistent) has status "chain-broken".
- RPO: now minus the arrival time of the newest archived segment. On an idle server no segment
  is closed, so the RPO grows without data at risk; archive_timeout bounds it on a busy one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pitr.errors import PitrError
from pitr.ops.wal.walreach import Histories, leads_to, load_histories
from pitr.pg import walname
from pitr.repo import drills
from pitr.repo.catalog import Stretch, WalCatalog, backup_wal, scan_wal, timeline_path
from pitr.repo.chain import chain_problems
from pitr.repo.manifest import Manifest, list_backup_ids, read_manifest
from pitr.repo.meta import RepoMeta, read_meta
from pitr.repo.restore_points import RestorePointRecord, list_points
from pitr.storage.base import Storage

log = logging.getLogger("pitr.info")


@dataclass
class BackupSummary:
    id: str
    # "ok" | "wal-missing" (its start..stop WAL is not all archived) | "unreadable" | "chain-broken"
    # (a diff/incr whose chain is not whole: `problem` says which backup breaks it)
    status: str
    manifest: Manifest | None = None
    problem: str | None = None
    missing_wal: str | None = None  # first segment of its start..stop range not archived

    @property
    def parent(self) -> str | None:
        """The backup this one builds on (None for a full backup)."""
        m = self.manifest
        return m.parent if m is not None and m.type != "full" else None

    @property
    def from_standby(self) -> bool:
        """Taken on a hot standby (backup_standby.py marks it); only a literal true counts (untrusted)."""
        return self.manifest is not None and self.manifest.extra.get("from_standby") is True

    @property
    def bad_pages(self) -> int:
        return sum(len(f.bad_pages) for f in self.manifest.files) if self.manifest else 0


@dataclass(frozen=True)
class Gap:
    first: str
    last: str
    count: int


@dataclass
class TimelineSummary:
    timeline: int
    first: str | None
    last: str | None
    count: int
    gaps: list[Gap]
    newest_arrival: float | None
    partials: list[str]
    has_history: bool


@dataclass(frozen=True)
class Reach:
    """Where replay from a backup stops: the last segment reached before the first missing one."""

    timeline: int
    wal: str
    end_lsn: int  # end of that segment (upper bound of the position)
    arrival: float  # its arrival time in the repository (upper bound of the last commit)


@dataclass
class Window:
    earliest_time: str | None = None
    earliest_backup: str | None = None
    earliest_lsn: str | None = None
    latest: Reach | None = None


@dataclass
class InfoReport:
    repo: str
    meta: RepoMeta
    backups: list[BackupSummary]
    timelines: list[TimelineSummary]
    history_files: list[int]
    window: Window
    newest_wal: str | None
    newest_arrival: float | None
    now: float
    restore_points: list[RestorePointRecord] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)
    drill: dict[str, object] | None = None  # the newest drill record (repo/drills.py), passed or not

    @property
    def rpo_seconds(self) -> float | None:
        return None if self.newest_arrival is None else max(0.0, self.now - self.newest_arrival)


def gather(storage: Storage, now: float | None = None) -> InfoReport:
    meta = read_meta(storage)  # NotInitializedError: the CLI says so and exits 1
    now = time.time() if now is None else now
    cat = scan_wal(storage, meta.wal_segment_size)
    histories = load_histories(storage, cat)
    backups = [_summary(storage, bid, cat) for bid in list_backup_ids(storage)]
    broken = chain_problems([b.manifest for b in backups if b.manifest is not None],
                            [b.id for b in backups if b.status == "unreadable"])
    for b in backups:
        if b.id in broken:
            b.status, b.problem = "chain-broken", broken[b.id].reason
    window = Window()
    usable = [b.manifest for b in backups if b.status == "ok" and b.manifest is not None]
    if usable:
        first = min(usable, key=lambda m: (m.stop_time, m.id))
        window.earliest_time, window.earliest_backup, window.earliest_lsn = first.stop_time, first.id, first.stop_lsn
        reaches = [r for m in usable for r in reach_from(m, cat, histories)]
        if reaches:
            window.latest = max(reaches, key=lambda r: (r.arrival, r.end_lsn))
    points = [p for p in list_points(storage) if p.system_identifier == meta.system_identifier]
    report = InfoReport(storage.display, meta, backups, timeline_summaries(cat), sorted(cat.history_files), window,
                        cat.newest_name, cat.newest_mtime or None, now, points)
    report.drill = drills.newest(storage)
    return report


def _summary(storage: Storage, bid: str, cat: WalCatalog) -> BackupSummary:
    try:
        m = read_manifest(storage, bid)
    except PitrError as e:
        log.warning("backup %s is unreadable: %s", bid, e)  # listed as such; the others still count
        return BackupSummary(bid, "unreadable", problem=str(e))
    missing = [n for n in backup_wal(m) if not cat.has(n)]
    if missing:
        return BackupSummary(bid, "wal-missing", m, missing_wal=missing[0])
    return BackupSummary(bid, "ok", m)


def timeline_summaries(cat: WalCatalog) -> list[TimelineSummary]:
    out = []
    for tli in sorted(set(cat.timelines) | set(cat.history_files)):
        tl = cat.timelines.get(tli)
        if tl is None or not tl.segnos:
            out.append(TimelineSummary(tli, None, None, 0, [], None, list(tl.partials) if tl else [],
                                       tli in cat.history_files))
            continue
        gaps = [Gap(cat.seg_name(tli, a), cat.seg_name(tli, b), b - a + 1) for a, b in tl.gaps()]
        out.append(TimelineSummary(tli, cat.seg_name(tli, tl.segnos[0]), cat.seg_name(tli, tl.segnos[-1]),
                                   len(tl.segnos), gaps, tl.newest_mtime or None, sorted(tl.partials),
                                   tli in cat.history_files or tli == 1))
    return out


def reach_from(m: Manifest, cat: WalCatalog, histories: Histories) -> list[Reach]:
    """For each timeline backup m leads to: the last segment replay gets to (None-free list)."""
    seg = cat.seg_size
    start = walname.parse_lsn(m.start_lsn)
    out: list[Reach] = []
    for target in leads_to(m, histories):
        if target == m.timeline:
            path: list[Stretch] | None = [Stretch(m.timeline, start, None)]
        else:
            path = timeline_path(histories.get(target) or [], target, m.timeline, start)
        if not path:
            continue
        r = _walk(path, cat, seg)
        if r is not None:
            out.append(r)
    return out


def _walk(path: list[Stretch], cat: WalCatalog, seg: int) -> Reach | None:
    last: tuple[int, int] | None = None
    for st in path:
        tl = cat.timelines.get(st.timeline)
        have = set(tl.segnos) if tl else set()
        first = st.start_lsn // seg
        end = st.end_lsn // seg - 1 if st.end_lsn is not None else (tl.last if tl and tl.last is not None else -1)
        n = first
        while n <= end and n in have:
            last = (st.timeline, n)
            n += 1
        if n <= end:
            break  # a gap: replay stops here
    if last is None:
        return None
    tli, n = last
    name = cat.seg_name(tli, n)
    return Reach(tli, name, (n + 1) * seg, cat.objects[name].mtime)
