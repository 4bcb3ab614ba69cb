"""`pitr expire`: a pure retention plan (which backups and WAL go, and why), then its execution.

Backups (oldest first; the newest is always kept):
- retain_full N: the N newest full backups stay.
- retain_days D: every backup that became consistent within the last D days stays, plus the
  newest one that did so before the window opened — without it the first part of the D-day
  window (from now-D to the next backup) could not be restored.
- both set (config file + environment): a backup stays when either rule keeps it.
- a diff or incr backup whose chain starts at a full backup retain_full keeps stays with it (a
  chain is kept or expired whole).
- every backup a kept one depends on stays (repo/chain.py: its parent chain and every backup its
  entries take bytes from), whatever the policy says: the plan names who needs it.
WAL: a segment (and a .partial or .backup file, by the segment it belongs to) goes only when it
lies before the first segment any retained backup needs on its timeline — a retained backup
needs everything from its start segment to the archive's head on every timeline it leads to.
On a timeline no retained backup reaches, only what lies before the oldest retained backup's
start position goes. .history files always stay (tiny, and every later restore needs them).
Execution deletes each expired backup's manifest first (its commit point), then its data, and
WAL last, so an interruption never leaves a listed backup without its files or WAL; expired
backups go newest first, so a diff/incr never outlives (listed) a backup it builds on.
Backup directories without a manifest (a failed backup, an interrupted expire) are deleted when
older than the newest complete backup and untouched for `incomplete_grace`; newer ones may be a
backup in progress and are left alone.
A backup in progress (a directory without a manifest holding a `started` marker, touched within
`incomplete_grace`) needs WAL from its start LSN on, whatever the policy: every segment from
that position on is kept, on every timeline; while its marker does not name a start LSN yet
(the server's checkpoint is still running) no WAL is deleted at all. A marker untouched for
longer is stale (a backup killed without cleanup) and is not honoured.
Drill records (drills/<id>.json) go with the backup they restored: a record naming a backup that
is expired (or already gone) is deleted, except the newest record and the newest passing one —
info, metrics and `check --max-drill-age` read those, and a drill stays proof of the restore
procedure after its backup ages out. A record naming no backup (the drill failed before choosing
one) goes once it is older than every retained backup; an unreadable record is never deleted.
A backup whose manifest cannot be read (damaged, hostile, vanished mid-run) is never deleted, and
neither is anything it may need or that needs it: every older backup stays (it may be a diff or
incr built on any of them), every readable backup whose chain or entries name it stays (with what
they need), and no WAL is deleted (which WAL it needs is unknown). The rest of the policy is
applied; the CLI then exits 1 naming it.
Temporary objects of interrupted writes (`.tmp.*` files, incomplete multipart uploads) last
touched more than `temp_grace` ago are removed too; a write in progress is younger than that.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime

from pitr.errors import IntegrityError, NotFoundError, PitrError, StorageError, UsageError
from pitr.ops.wal.walreach import Histories, backup_needs, load_histories
from pitr.pg import walname
from pitr.repo import drills
from pitr.repo.catalog import WalCatalog, scan_wal
from pitr.repo.chain import dependencies, root_of
from pitr.repo.format import BACKUP_PREFIX, manifest_key, started_key
from pitr.repo.manifest import Manifest, read_manifest
from pitr.repo.meta import read_meta
from pitr.storage.base import ObjectInfo, Storage, TempObject

DAY = 86400.0
INCOMPLETE_GRACE = DAY  # also how long a backup-in-progress marker is honoured without activity
TEMP_GRACE = 3600.0  # a temp file untouched this long belongs to no write in progress
DELETE_BATCH = 1000
_UNREADABLE = "run `pitr verify`; expire keeps that backup, every older one and all WAL until it can read it"


@dataclass(frozen=True)
class Policy:
    retain_full: int | None = None
    retain_days: float | None = None

    def validate(self) -> None:
        if self.retain_full is None and self.retain_days is None:
            raise UsageError("no retention policy is set",
                             "give --retain-full N or --retain-days D, or set retain_full / retain_days in the config")
        if self.retain_full is not None and self.retain_full < 1:
            raise UsageError(f"--retain-full must be 1 or more, not {self.retain_full}")
        if self.retain_days is not None and (self.retain_days < 0 or not math.isfinite(self.retain_days)):
            raise UsageError(f"--retain-days must be 0 or more, not {self.retain_days}")


@dataclass
class BackupDecision:
    id: str
    action: str  # keep | expire
    reason: str
    type: str
    stop_time: str
    stored_bytes: int
    keys: list[str] = field(default_factory=list)  # data objects to delete after the manifest


@dataclass
class DrillDecision:
    id: str
    action: str  # keep | delete
    reason: str
    backup: str | None  # the backup the drill restored (None: it names none, or the record is unreadable)


@dataclass
class Incomplete:
    id: str
    action: str  # delete | leave
    reason: str
    objects: int
    bytes: int
    keys: list[str] = field(default_factory=list)


@dataclass
class InProgress:
    """A backup whose marker says it is running: the WAL it will need must stay."""

    id: str
    honoured: bool  # False: stale (untouched for longer than the grace), ignored
    start_lsn: str | None  # None: the server had not started it yet (or the marker is unreadable)
    host: str
    pid: int | None
    started: str
    reason: str


@dataclass
class WalTimeline:
    timeline: int
    keep_from: str | None  # the first segment kept on this timeline
    delete_objects: int
    delete_bytes: int
    first: str | None
    last: str | None
    reason: str


@dataclass
class RetentionPlan:
    policy: Policy
    backups: list[BackupDecision] = field(default_factory=list)  # oldest first
    incomplete: list[Incomplete] = field(default_factory=list)
    in_progress: list[InProgress] = field(default_factory=list)
    wal: list[WalTimeline] = field(default_factory=list)
    wal_keys: list[str] = field(default_factory=list)
    temps: list[TempObject] = field(default_factory=list)  # leftovers of interrupted writes, to remove
    drills: list[DrillDecision] = field(default_factory=list)  # oldest first
    unreadable: dict[str, str] = field(default_factory=dict)  # backup id -> why its manifest cannot be read
    notes: list[str] = field(default_factory=list)

    @property
    def expired(self) -> list[BackupDecision]:
        return [b for b in self.backups if b.action == "expire"]

    @property
    def drills_deleted(self) -> list[DrillDecision]:
        return [d for d in self.drills if d.action == "delete"]

    @property
    def wal_bytes(self) -> int:
        return sum(t.delete_bytes for t in self.wal)

    @property
    def empty(self) -> bool:
        return (not self.expired and not self.wal_keys and not self.temps and not self.drills_deleted
                and not any(i.action == "delete" for i in self.incomplete))

    def to_json(self) -> dict[str, object]:
        def strip(d: dict[str, object]) -> dict[str, object]:
            return {k: v for k, v in d.items() if k != "keys"}

        return {
            "policy": asdict(self.policy),
            "backups": [strip(asdict(b)) for b in self.backups],
            "incomplete": [strip(asdict(i)) for i in self.incomplete],
            "in_progress": [asdict(b) for b in self.in_progress],
            "wal": {"delete_objects": len(self.wal_keys), "delete_bytes": self.wal_bytes,
                    "timelines": [asdict(t) for t in self.wal]},
            "temps": {"delete_objects": len(self.temps), "delete_bytes": sum(t.size for t in self.temps),
                      "keys": [t.key for t in self.temps]},
            "drills": [asdict(d) for d in self.drills],
            "unreadable": [{"id": bid, "problem": why} for bid, why in sorted(self.unreadable.items())],
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- the pure plan

def _stop_epoch(m: Manifest) -> float:
    try:
        return datetime.fromisoformat(m.stop_time).timestamp()
    except ValueError:
        raise IntegrityError(f"the manifest of backup {m.id} has an invalid stop_time {m.stop_time!r}",
                             _UNREADABLE) from None


def choose_backups(manifests: list[Manifest], policy: Policy, now: float) -> dict[str, str]:
    """id -> why it stays, for the backups the policy keeps (manifests oldest first)."""
    keep: dict[str, str] = {}
    if not manifests:
        return keep
    by_id = {m.id: m for m in manifests}
    keep[manifests[-1].id] = "the newest backup (always kept)"
    if policy.retain_full is not None:
        fulls = [m for m in manifests if m.type == "full"]
        kept_fulls = {m.id for m in fulls[-policy.retain_full:]}
        for m in fulls[-policy.retain_full:]:
            keep.setdefault(m.id, f"one of the {policy.retain_full} newest full backups")
        for m in manifests:
            root = root_of(m, by_id) if m.type != "full" else None
            if root in kept_fulls:
                keep.setdefault(m.id, f"builds on kept full backup {root}")
    if policy.retain_days is not None:
        cutoff = now - policy.retain_days * DAY
        anchor: Manifest | None = None
        for m in manifests:
            if _stop_epoch(m) > cutoff:
                keep.setdefault(m.id, f"consistent within the last {policy.retain_days:g} days")
            else:
                anchor = m
        if anchor is not None:
            keep.setdefault(anchor.id, f"the newest backup from before the {policy.retain_days:g}-day window: "
                                       "restoring to the window's start needs it")
    needed_by: dict[str, list[str]] = {}
    for bid in sorted(keep):
        for dep in sorted(dependencies(by_id[bid], by_id)):
            if dep in by_id:
                needed_by.setdefault(dep, []).append(bid)
    for dep, users in sorted(needed_by.items()):
        keep.setdefault(dep, f"needed by kept backup{'s' if len(users) > 1 else ''} {', '.join(users)}")
    return keep


def plan(manifests: list[Manifest], listing: dict[str, list[ObjectInfo]], cat: WalCatalog,
         histories: Histories, policy: Policy, now: float,
         incomplete_grace: float = INCOMPLETE_GRACE, markers: dict[str, dict[str, object] | None] | None = None,
         temps: Sequence[TempObject] | None = None, temp_grace: float = TEMP_GRACE,
         drill_records: dict[str, dict[str, object] | None] | None = None,
         unreadable: dict[str, str] | None = None) -> RetentionPlan:
    """Decide what goes. manifests: complete backups, oldest first; listing: backup id -> every
    object under its directory; markers: backup id -> its parsed `started` marker (None when
    unreadable) for directories without a manifest; temps: leftovers of interrupted writes;
    drill_records: drill id -> its record (None when unreadable); unreadable: backup id -> why its
    manifest cannot be read; now: seconds since the epoch. Touches no storage."""
    policy.validate()
    p = RetentionPlan(policy)
    p.temps = sorted((t for t in temps or [] if now - t.mtime > temp_grace), key=lambda t: t.key)
    manifests = sorted(manifests, key=lambda m: m.id)
    keep = choose_backups(manifests, policy, now)
    bad = dict(sorted((unreadable or {}).items()))
    p.unreadable = bad
    if bad:
        _keep_around_unreadable(keep, manifests, bad)
    for m in manifests:
        objs = listing.get(m.id, [])
        if m.id in keep:
            p.backups.append(BackupDecision(m.id, "keep", keep[m.id], m.type, m.stop_time, m.stored_bytes))
        else:
            why = _expire_reason(policy)
            keys = sorted(o.key for o in objs if o.key != manifest_key(m.id))
            p.backups.append(BackupDecision(m.id, "expire", why, m.type, m.stop_time,
                                            sum(o.size for o in objs), keys))
    for bid, why in bad.items():
        objs = listing.get(bid, [])
        p.backups.append(BackupDecision(bid, "keep", f"its manifest cannot be read ({why}): kept, with every older "
                                        "backup and every backup that builds on it", "unknown", "",
                                        sum(o.size for o in objs)))
        p.notes.append(f"backup {bid} cannot be read: it, every older backup, every backup building on it and "
                       "all WAL are kept; run `pitr verify`")
    p.backups.sort(key=lambda b: b.id)
    _plan_incomplete(p, manifests, listing, now, incomplete_grace, set(bad))
    _plan_drills(p, drill_records or {}, [m for m in manifests if m.id in keep], set(bad))
    hold = _plan_in_progress(p, listing, markers or {}, manifests, now, incomplete_grace)
    retained = [m for m in manifests if m.id in keep]
    if bad:  # the WAL an unreadable backup needs is unknown (its notes say so)
        return p
    if not retained:
        p.notes.append("no complete backup exists: WAL is kept (it is expired only relative to a retained backup)")
        return p
    if hold == "all":
        p.notes.append("a backup in progress has not recorded its start position yet: no WAL is deleted this time")
        return p
    _plan_wal(p, retained, cat, histories, hold)
    return p


def _plan_in_progress(p: RetentionPlan, listing: dict[str, list[ObjectInfo]],
                      markers: dict[str, dict[str, object] | None], manifests: list[Manifest], now: float,
                      grace: float) -> int | str | None:
    """Record each backup in progress; the lowest start LSN any fresh one needs, "all" when one has
    not recorded it yet, None when none runs."""
    complete = {m.id for m in manifests}
    hold: int | str | None = None
    for bid, marker in sorted(markers.items()):
        objs = listing.get(bid, [])
        if bid in complete or not objs:
            continue
        age = now - max(o.mtime for o in objs)
        m = marker or {}
        lsn_text = m.get("start_lsn")
        lsn: int | None = None
        if isinstance(lsn_text, str):
            try:
                lsn = walname.parse_lsn(lsn_text)
            except ValueError:
                lsn = None
        pid = m.get("pid")
        pid_n = pid if isinstance(pid, int) else None
        host, started = str(m.get("host", "?")), str(m.get("started", "?"))
        if age > grace:
            p.in_progress.append(InProgress(bid, False, walname.format_lsn(lsn) if lsn is not None else None, host,
                                            pid_n, started, f"stale: untouched for {age / 3600:.1f}h, not honoured"))
            continue
        if lsn is None:
            hold = "all"
            why = "its start position is not recorded yet (or its marker is unreadable): every WAL segment is kept"
        else:
            if hold != "all":
                hold = lsn if hold is None else min(int(hold), lsn)
            why = f"it needs WAL from {walname.format_lsn(lsn)} on: kept on every timeline"
        p.in_progress.append(InProgress(bid, True, walname.format_lsn(lsn) if lsn is not None else None, host,
                                        pid_n, started, why))
    return hold


def _drilled_backup(rec: dict[str, object]) -> str | None:
    b = rec.get("backup")
    bid = b.get("id") if isinstance(b, dict) else None
    return bid if isinstance(bid, str) else None


def _plan_drills(p: RetentionPlan, records: dict[str, dict[str, object] | None], retained: list[Manifest],
                 unreadable: set[str]) -> None:
    """Drill records of backups that are gone go, but never the two that info, metrics and check read."""
    readable = {did: r for did, r in records.items() if r is not None}
    newest = max(readable, default=None)
    newest_ok = max((did for did, r in readable.items() if r.get("passed") is True), default=None)
    kept = {m.id for m in retained} | unreadable
    expired = {b.id for b in p.expired}
    floor = min((_stop_epoch(m) for m in retained), default=None)
    for did in sorted(records):
        rec = records[did]
        if rec is None:
            p.drills.append(DrillDecision(did, "keep", "the record cannot be read: expire never deletes what it "
                                                       "cannot read", None))
            p.notes.append(f"drill record {did} cannot be read: kept (look at {drills.key_of(did)} by hand)")
            continue
        bid = _drilled_backup(rec)
        action, why = "keep", ""
        if did == newest:
            why = "the newest drill (info and metrics show it)"
        elif did == newest_ok:
            why = "the newest passing drill (check --max-drill-age reads it)"
        elif bid is not None:
            if bid in kept:
                why = f"its backup {bid} is retained"
            else:
                action = "delete"
                why = f"its backup {bid} {'is expired' if bid in expired else 'no longer exists'}"
        elif floor is not None and _drill_epoch(rec) < floor:
            action, why = "delete", "it names no backup and is older than every retained backup"
        else:
            why = "it names no backup and is not older than every retained backup"
        p.drills.append(DrillDecision(did, action, why, bid))


def _drill_epoch(rec: dict[str, object]) -> float:
    try:  # drills.read checked that `started` is an ISO time
        return datetime.fromisoformat(str(rec.get("started")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return math.inf  # not datable: never "older than every retained backup"


def _keep_around_unreadable(keep: dict[str, str], manifests: list[Manifest], bad: dict[str, str]) -> None:
    """Add to keep what an unreadable backup may build on (every older backup: its chain is unknown)
    and what builds on it (its dependants), then everything those need."""
    by_id = {m.id: m for m in manifests}
    for m in manifests:
        later = [b for b in bad if b > m.id]  # IDs sort by start time; a chain only builds on older backups
        if later:
            keep.setdefault(m.id, f"older than unreadable backup {later[0]}, which may build on it")
            continue
        named = sorted(dependencies(m, by_id) & bad.keys())
        if named:
            keep.setdefault(m.id, f"builds on unreadable backup {named[0]}")
    for bid in sorted(keep):
        if bid in by_id:
            for dep in sorted(dependencies(by_id[bid], by_id)):
                if dep in by_id:
                    keep.setdefault(dep, f"needed by kept backup {bid}")


def _expire_reason(policy: Policy) -> str:
    parts = []
    if policy.retain_full is not None:
        parts.append(f"not among the {policy.retain_full} newest full backups")
    if policy.retain_days is not None:
        parts.append(f"older than {policy.retain_days:g} days and not needed to restore the window's start")
    return " and ".join(parts)


def _plan_incomplete(p: RetentionPlan, manifests: list[Manifest], listing: dict[str, list[ObjectInfo]],
                     now: float, grace: float, unreadable: set[str]) -> None:
    complete = {m.id for m in manifests} | unreadable  # an unreadable manifest is still a manifest
    newest = manifests[-1].id if manifests else None
    for bid, objs in sorted(listing.items()):
        if bid in complete or not objs:
            continue
        age = now - max(o.mtime for o in objs)
        size = sum(o.size for o in objs)
        keys = sorted(o.key for o in objs)
        if newest is not None and bid < newest and age > grace:
            p.incomplete.append(Incomplete(bid, "delete", f"no manifest and untouched for {age / 3600:.1f}h: left by a "
                                           "failed backup or an interrupted expire", len(objs), size, keys))
        else:
            p.incomplete.append(Incomplete(bid, "leave", "no manifest, but it may be a backup in progress",
                                           len(objs), size))


def _plan_wal(p: RetentionPlan, retained: list[Manifest], cat: WalCatalog, histories: Histories,
              hold: int | str | None = None) -> None:
    seg = cat.seg_size
    floor = min(walname.parse_lsn(m.start_lsn) // seg for m in retained)  # the oldest retained start position
    first_needed: dict[int, int] = {}
    for m in retained:
        for n in backup_needs(m, cat, histories):
            first_needed[n.timeline] = min(first_needed.get(n.timeline, n.first), n.first)
    if isinstance(hold, int):  # a backup in progress: its start segment and everything after, on every timeline
        held = hold // seg
        floor = min(floor, held)
        first_needed = {tli: min(first, held) for tli, first in first_needed.items()}
    doomed: dict[int, list[tuple[int, str, ObjectInfo]]] = {}
    for name, info in cat.objects.items():
        w = walname.parse(name)
        if w is None or w.kind == "history" or w.segment is None:
            continue
        pos = walname.segno(w.segment, seg)
        if pos < first_needed.get(w.timeline, floor):
            doomed.setdefault(w.timeline, []).append((pos, name, info))
    for tli in sorted(set(doomed) | set(first_needed)):
        items = sorted(doomed.get(tli, []), key=lambda x: x[1])
        threshold = first_needed.get(tli, floor)
        keep_from = cat.seg_name(tli, threshold)
        if tli in first_needed:
            reason = f"before {keep_from}, the first segment a retained backup needs on timeline {tli}"
        else:
            reason = (f"older than the oldest retained backup's start ({keep_from}) on a timeline no retained "
                      f"backup reaches")
        if not items and tli not in first_needed:
            continue
        p.wal.append(WalTimeline(tli, keep_from, len(items), sum(i[2].size for i in items),
                                 items[0][1] if items else None, items[-1][1] if items else None,
                                 reason if items else "nothing to delete"))
        p.wal_keys.extend(i[2].key for i in items)


# --------------------------------------------------------------------------- I/O: gather, apply

@dataclass
class Applied:
    backups: int = 0
    incomplete: int = 0
    objects: int = 0
    bytes: int = 0
    temps: int = 0
    drills: int = 0


def gather_and_plan(storage: Storage, policy: Policy, now: float,
                    incomplete_grace: float = INCOMPLETE_GRACE, temp_grace: float = TEMP_GRACE) -> RetentionPlan:
    """List the repository (paginated listings, one per area), read every manifest, and plan."""
    policy.validate()
    meta = read_meta(storage)
    listing: dict[str, list[ObjectInfo]] = {}
    for o in storage.list(BACKUP_PREFIX):
        parts = o.key.split("/")
        if len(parts) >= 3:
            listing.setdefault(parts[1], []).append(o)
    ids = sorted(b for b, objs in listing.items() if any(o.key == manifest_key(b) for o in objs))
    markers = {b: read_marker(storage, b) for b, objs in listing.items()
               if b not in ids and any(o.key == started_key(b) for o in objs)}
    temps = storage.stale_temps(temp_grace, now)
    drill_records = {did: read_drill(storage, did) for did in drills.list_ids(storage)}
    manifests: list[Manifest] = []
    unreadable: dict[str, str] = {}
    for b in ids:
        try:
            m = read_manifest(storage, b)
        except NotFoundError as e:  # vanished since the listing (another expire): nothing to decide now
            unreadable[b] = str(e)
            continue
        except StorageError:
            raise  # the repository, not this manifest, is at fault: decide nothing
        except PitrError as e:
            unreadable[b] = str(e)
            continue
        problem = _position_problem(m)
        if problem:
            unreadable[b] = problem
        else:
            manifests.append(m)
    cat = scan_wal(storage, meta.wal_segment_size)  # listed after the markers: see _plan_in_progress
    return plan(manifests, listing, cat, load_histories(storage, cat), policy, now, incomplete_grace, markers,
                temps, temp_grace, drill_records, unreadable)


def _position_problem(m: Manifest) -> str | None:
    """Why a readable manifest's positions cannot be planned with (None when they can)."""
    try:
        walname.parse_lsn(m.start_lsn)
        walname.parse_lsn(m.stop_lsn)
    except ValueError:
        return f"the manifest of backup {m.id} has an invalid LSN"
    try:
        _stop_epoch(m)
    except IntegrityError as e:
        return str(e)
    return None


def read_drill(storage: Storage, drill_id: str) -> dict[str, object] | None:
    """A drill record, None when it cannot be read (then it is kept: never delete what cannot be read)."""
    try:
        return drills.read(storage, drill_id)
    except PitrError:
        return None


def read_marker(storage: Storage, backup_id: str) -> dict[str, object] | None:
    """A backup's `started` marker as a dict; None when it vanished or cannot be read (then the
    plan keeps all WAL while the directory is fresh: the safe reading of untrusted content)."""
    try:
        data = json.loads(storage.get(started_key(backup_id))[:65536])
    except (PitrError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def apply(storage: Storage, p: RetentionPlan, progress: Callable[[str], None] | None = None) -> Applied:
    """Execute a plan: per backup the manifest first, then its data; incomplete dirs; WAL last."""
    say = progress or (lambda _msg: None)
    done = Applied()
    # newest first: a diff/incr goes before the backups it builds on, so an interrupted expire
    # never leaves a listed backup whose chain lost a member
    for b in sorted(p.expired, key=lambda b: b.id, reverse=True):
        storage.delete(manifest_key(b.id))  # from here on the backup is not listed
        _delete(storage, b.keys)
        done.backups += 1
        done.objects += 1 + len(b.keys)
        done.bytes += b.stored_bytes
        say(f"expired backup {b.id} ({len(b.keys) + 1} objects)")
    gone = [drills.key_of(d.id) for d in p.drills_deleted]
    _delete(storage, gone)
    done.drills = len(gone)
    done.objects += len(gone)
    if gone:
        say(f"deleted {len(gone)} drill record(s) of expired backups")
    for i in p.incomplete:
        if i.action == "delete":
            _delete(storage, i.keys)
            done.incomplete += 1
            done.objects += len(i.keys)
            done.bytes += i.bytes
            say(f"deleted incomplete backup directory {i.id}")
    _delete(storage, p.wal_keys)
    done.objects += len(p.wal_keys)
    done.bytes += p.wal_bytes
    if p.wal_keys:
        say(f"deleted {len(p.wal_keys)} WAL objects")
    if p.temps:
        storage.remove_temps(p.temps)
        done.temps = len(p.temps)
        say(f"removed {len(p.temps)} leftover temporary object(s) of interrupted writes")
    return done


def _delete(storage: Storage, keys: list[str]) -> None:
    for i in range(0, len(keys), DELETE_BATCH):
        storage.delete_many(keys[i:i + DELETE_BATCH])
