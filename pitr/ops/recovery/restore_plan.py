"""Restore planning: parse the recovery target, pick the base backup, check the WAL it needs.

Pure functions over manifests, the WAL catalog and timeline histories: nothing here reads
storage or touches a data directory, so every refusal happens before a restore writes a byte.

Rules (docs/restore.md):
- time/LSN targets use the newest backup whose consistent point (stop_time / stop_lsn) is at or
  before the target; xid/name/immediate/none use the newest backup. Either way the backup must
  lie on a timeline that leads to the target timeline (its stop LSN before every switch point on
  the way), which the .history files tell.
- diff and incr backups are candidates like full ones; one whose chain is not whole (repo/chain.py)
  is skipped with a note naming the backup that breaks it, and the next candidate is taken;
  `--backup` naming such a backup is refused.
- the WAL from the backup's start up to the target must be archived without a gap; a target
  past the newest archived WAL (time: its arrival time; LSN: the last archived segment) is an
  error, not a silent early promotion.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from pitr.errors import RestoreError, TargetError, UsageError
from pitr.pg import walname
from pitr.pg.walname import HistoryEntry
from pitr.repo.catalog import Stretch, WalCatalog, segments_for, timeline_path
from pitr.repo.chain import Broken, chain_problem, parent_chain
from pitr.repo.manifest import Manifest

ACTIONS = ("promote", "pause", "shutdown")


# --------------------------------------------------------------------------- targets

@dataclass(frozen=True)
class Target:
    """What recovery stops at. kind: time | lsn | xid | name | immediate | latest (no target)."""

    kind: str
    time: datetime | None = None  # aware, UTC
    lsn: int | None = None
    xid: int | None = None
    name: str | None = None
    given: str = ""  # as the user wrote it
    exclusive: bool = False  # stop just before the target (recovery_target_inclusive = off)

    def describe(self) -> str:
        d = self._describe()
        return d + " (exclusive: stop just before it)" if self.exclusive else d

    def _describe(self) -> str:
        if self.kind == "time":
            assert self.time is not None
            return f"time {format_time(self.time)}"
        if self.kind == "lsn":
            assert self.lsn is not None
            return f"LSN {walname.format_lsn(self.lsn)}"
        if self.kind == "xid":
            return f"transaction {self.xid}"
        if self.kind == "name":
            at = f" at LSN {walname.format_lsn(self.lsn)}" if self.lsn is not None else ""
            return f"restore point {self.name!r}{at}"
        if self.kind == "immediate":
            return "immediate (end of the backup)"
        return "end of the archive"

    @property
    def lsn_bound(self) -> int | None:
        """The LSN recovery stops at when it is known before replay: an LSN target, or a named
        point whose position `pitr restore-point` recorded (resolve_name)."""
        return self.lsn if self.kind in ("lsn", "name") else None

    def recovery_settings(self) -> dict[str, str]:
        """The recovery_target_* setting this target becomes (empty for the end of the archive)."""
        if self.kind == "time":
            assert self.time is not None
            return {"recovery_target_time": format_time(self.time, pg=True)}
        if self.kind == "lsn":
            assert self.lsn is not None
            return {"recovery_target_lsn": walname.format_lsn(self.lsn)}
        if self.kind == "xid":
            return {"recovery_target_xid": str(self.xid)}
        if self.kind == "name":
            return {"recovery_target_name": str(self.name)}
        if self.kind == "immediate":
            return {"recovery_target": "immediate"}
        return {}

    def settings(self) -> dict[str, str]:
        """recovery_settings() plus recovery_target_inclusive = off for an exclusive target."""
        out = self.recovery_settings()
        if self.exclusive:
            out["recovery_target_inclusive"] = "off"
        return out

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {"kind": self.kind, "description": self.describe()}
        if self.time is not None:
            d["time_utc"] = self.time.isoformat()
        if self.lsn is not None:
            d["lsn"] = walname.format_lsn(self.lsn)
        if self.xid is not None:
            d["xid"] = str(self.xid)
        if self.name is not None:
            d["name"] = self.name
        if self.given:
            d["given"] = self.given
        if self.exclusive:
            d["exclusive"] = True
        return d


def format_time(t: datetime, pg: bool = False) -> str:
    """UTC, microseconds when present: '2026-03-01 12:00:00.250000+00' (pg) or '... UTC'."""
    t = t.astimezone(UTC)
    s = t.strftime("%Y-%m-%d %H:%M:%S") + (f".{t.microsecond:06d}" if t.microsecond else "")
    return s + ("+00" if pg else " UTC")


_ISO_HINT = "write the date as YYYY-MM-DD with a zone, e.g. '2026-03-01 14:30:00+01' or '2026-03-01 13:30:00 UTC'"
# a numeric date not led by a 4-digit year (03/04/2026, 3.4.26): day and month could be read either way;
# not after ':' or '.' + digit, which would be a time or its fraction (12:30:00.05)
_NUMERIC_DATE = re.compile(r"(?<![\d:.])(\d{1,4})([/.\-])(\d{1,2})(?:\2(\d{1,4}))?(?!\d)")


def _ambiguous_date(s: str) -> str | None:
    """The part of s whose day and month (or century) a reader cannot tell apart, if any."""
    m = _NUMERIC_DATE.search(s)
    if m is None or len(m.group(1)) == 4:  # year first (ISO): unambiguous
        return None
    if len(m.group(1)) == 3:
        return m.group(0)
    a, b, year = int(m.group(1)), int(m.group(3)), m.group(4)
    if (a <= 12 and b <= 12 and a != b) or (year is not None and len(year) < 4):
        return m.group(0)
    return None


def parse_time(text: str) -> datetime:
    """python-dateutil syntax; a time without a zone is in the local zone. Returns aware UTC.
    Refused (UsageError): a numeric date whose day and month could be swapped, and a local time
    that does not exist or occurs twice at a DST change."""
    from dateutil import parser, tz  # type: ignore[import-untyped]

    s = text.strip()
    if not s:
        raise UsageError("the target time is empty", "give a timestamp such as '2026-03-01 14:30:00+01'")
    if (part := _ambiguous_date(s)) is not None:
        raise UsageError(f"the target time {text!r} has the date {part!r}, whose day and month (or year) "
                         "could be read more than one way", _ISO_HINT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", parser.UnknownTimezoneWarning)
        try:
            t = parser.parse(s)
        except parser.UnknownTimezoneWarning:
            raise UsageError(f"the target time {text!r} names a time zone pitr does not know",
                             "use a numeric offset such as +02:00, or UTC") from None
        except (ValueError, OverflowError):
            raise UsageError(f"cannot read the target time {text!r} as a timestamp",
                             "give a timestamp such as '2026-03-01 14:30:00+01' (no zone: local time)") from None
    if t.tzinfo is None:
        local = tz.tzlocal()
        if not tz.datetime_exists(t, local):
            raise UsageError(f"the target time {text!r} does not exist in the local time zone (the clocks "
                             "skipped it at a daylight-saving change)", _ISO_HINT)
        if tz.datetime_ambiguous(t, local):
            raise UsageError(f"the target time {text!r} occurs twice in the local time zone (the clocks went "
                             "back at a daylight-saving change)", _ISO_HINT)
        t = t.replace(tzinfo=local)
    return t.astimezone(UTC)


def parse_target(time: str | None = None, lsn: str | None = None, xid: str | None = None,
                 name: str | None = None, target: str | None = None) -> Target:
    """At most one target; none means the end of the archive. UsageError on bad syntax."""
    given = [(k, v) for k, v in (("--target-time", time), ("--target-lsn", lsn), ("--target-xid", xid),
                                 ("--target-name", name), ("--target", target)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"give one recovery target, not {' and '.join(k for k, _ in given)}")
    if not given:
        return Target("latest")
    opt, value = given[0]
    if opt == "--target-time":
        return Target("time", time=parse_time(value), given=value)
    if opt == "--target-lsn":
        try:
            return Target("lsn", lsn=walname.parse_lsn(value), given=value)
        except ValueError:
            raise UsageError(f"the target LSN {value!r} is not an LSN", "use the form 16/B374D848") from None
    if opt == "--target-xid":
        if not re.fullmatch(r"\s*\d+\s*", value) or int(value) < 3:
            raise UsageError(f"the target transaction ID {value!r} is not a transaction number",
                             "use a number such as 74212 (txid_current())")
        return Target("xid", xid=int(value), given=value)
    if opt == "--target-name":
        if not value or len(value) > 63:
            raise UsageError("the restore point name must be 1 to 63 characters long")
        return Target("name", name=value, given=value)
    if value.strip().lower() != "immediate":
        raise UsageError(f"--target accepts only 'immediate', not {value!r}",
                         "use --target-time, --target-lsn, --target-xid or --target-name for other targets")
    return Target("immediate", given=value)


def make_exclusive(target: Target) -> Target:
    """The same target, stopping just before it; only time, LSN and xid targets have a 'before'."""
    if target.kind not in ("time", "lsn", "xid"):
        what = "no target" if target.kind == "latest" else f"--target-{target.kind}" if target.kind == "name" \
            else "--target immediate"
        raise UsageError(f"--target-exclusive applies to --target-time, --target-lsn or --target-xid, not {what}")
    return replace(target, exclusive=True)


def parse_action(value: str) -> str:
    v = value.strip().lower()
    if v not in ACTIONS:
        raise UsageError(f"--target-action must be promote, pause or shutdown, not {value!r}")
    return v


def parse_timeline(value: str) -> str:
    """'latest' | 'current' | a timeline number (as a decimal string)."""
    v = value.strip().lower()
    if v in ("latest", "current"):
        return v
    if re.fullmatch(r"\d+", v) and 1 <= int(v) < 2**32:
        return str(int(v))
    raise UsageError(f"--target-timeline must be latest, current or a timeline number, not {value!r}")


# --------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class Plan:
    backup: Manifest
    target: Target
    timeline_spec: str  # latest | current | N, as written to recovery_target_timeline
    timeline: int  # the timeline recovery ends on (resolved)
    stretches: list[Stretch]
    wal_first: str
    wal_last: str
    wal_count: int
    archive_end_time: float | None  # arrival time of the newest WAL on the path (epoch)
    notes: list[str] = field(default_factory=list)
    chain: list[Manifest] = field(default_factory=list)  # root full first, ending with backup (restore reads all)
    skipped: list[str] = field(default_factory=list)  # newer candidates passed over: why (broken chains)

    def to_json(self) -> dict[str, object]:
        b = self.backup
        return {
            "backup": {"id": b.id, "type": b.type, "timeline": b.timeline, "start_lsn": b.start_lsn,
                       "stop_lsn": b.stop_lsn, "start_time": b.start_time, "stop_time": b.stop_time,
                       "pg_version": b.pg_version, "bytes": b.bytes, "files": len(b.files)},
            "target": self.target.to_json(),
            "timeline": {"requested": self.timeline_spec, "resolved": self.timeline,
                         "path": [{"timeline": s.timeline, "from_lsn": walname.format_lsn(s.start_lsn),
                                   "to_lsn": None if s.end_lsn is None else walname.format_lsn(s.end_lsn)}
                                  for s in self.stretches]},
            "wal": {"first": self.wal_first, "last": self.wal_last, "segments": self.wal_count},
            "archive_end_time": (datetime.fromtimestamp(self.archive_end_time, UTC).isoformat()
                                 if self.archive_end_time else None),
            "notes": list(self.notes),
            "chain": [c.id for c in self.chain] or [b.id],
            "skipped": list(self.skipped),
        }


def backup_stop_time(m: Manifest) -> datetime:
    return parse_iso(m.stop_time)


def parse_iso(text: str) -> datetime:
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def resolve_timeline(spec: str, backup_tli: int, catalog: WalCatalog) -> int:
    """PostgreSQL's rule: 'latest' probes history files from the backup's timeline upward."""
    if spec == "current":
        return backup_tli
    if spec == "latest":
        tli = backup_tli
        while tli + 1 in catalog.history_files:
            tli += 1
        return tli
    n = int(spec)
    if n != 1 and n not in catalog.history_files:
        raise TargetError(f"timeline {n} does not exist in the archive (no {walname.history_name(n)})",
                          "list the timelines with `pitr info`, or use --target-timeline latest")
    return n


def _on_path(m: Manifest, tli: int, histories: dict[int, list[HistoryEntry]]) -> list[Stretch] | None:
    hist = histories.get(tli, [])
    stop = walname.parse_lsn(m.stop_lsn)
    if timeline_path(hist, tli, m.timeline, stop) is None:
        return None  # the target's branch forked off before this backup became consistent
    return timeline_path(hist, tli, m.timeline, walname.parse_lsn(m.start_lsn))


def _reaches(m: Manifest, target: Target) -> bool:
    """The backup's consistent point is at or before the target."""
    if target.kind == "time":
        assert target.time is not None
        return backup_stop_time(m) <= target.time
    if target.lsn_bound is not None:
        return walname.parse_lsn(m.stop_lsn) <= target.lsn_bound
    return True


def resolve_name(target: Target, point_lsn: int | None) -> Target:
    """A --target-name target with the LSN the repository recorded for it (None: not recorded)."""
    if target.kind != "name" or point_lsn is None:
        return target
    return replace(target, lsn=point_lsn)


def make_plan(manifests: list[Manifest], catalog: WalCatalog, histories: dict[int, list[HistoryEntry]],
              target: Target, timeline_spec: str = "latest", backup_id: str | None = None,
              unreadable: Iterable[str] = ()) -> Plan:
    """Choose the backup and check the WAL; TargetError/RestoreError with one clear sentence.
    unreadable: IDs of backups whose manifest exists but cannot be read (a chain through one is broken)."""
    if not manifests:
        raise RestoreError("the repository holds no complete backup to restore from",
                           "take one with `pitr backup`")
    ordered = sorted(manifests, key=lambda m: (walname.parse_lsn(m.stop_lsn), m.stop_time, m.id))
    by_id = {m.id: m for m in manifests}
    bad = set(unreadable)
    memo: dict[str, Broken | None] = {}
    if backup_id is not None:
        chosen = [m for m in ordered if m.id == backup_id]
        if not chosen:
            raise RestoreError(f"backup {backup_id} does not exist in the repository",
                               "list the backups with `pitr info`")
        broken = chain_problem(chosen[0], by_id, bad, memo)
        if broken is not None:
            raise RestoreError(f"backup {backup_id} cannot be restored: {broken.reason}",
                               "restore another backup with --backup (see `pitr info`), and run `pitr verify`")
        candidates = chosen
    else:
        candidates = ordered
    on_path: list[tuple[Manifest, int, list[Stretch]]] = []
    for m in reversed(candidates):  # newest first
        tli = resolve_timeline(timeline_spec, m.timeline, catalog)
        path = _on_path(m, tli, histories)
        if path is not None:
            on_path.append((m, tli, path))
    if not on_path:
        if backup_id is not None:
            raise TargetError(f"backup {backup_id} is not on a timeline that leads to the requested timeline",
                              "choose another backup or --target-timeline")
        raise TargetError("no backup lies on a timeline that leads to the requested timeline",
                          "list the backups and timelines with `pitr info`")
    skipped: list[str] = []
    pick = None
    for m, tli, path in on_path:
        if not _reaches(m, target):
            continue
        broken = chain_problem(m, by_id, bad, memo)
        if broken is None:
            pick = (m, tli, path)
            break
        skipped.append(f"skipped backup {m.id}: {broken.reason}")
    if pick is None and skipped:
        raise RestoreError(f"no backup before the target can be restored: {skipped[-1]}",
                           "run `pitr verify` to see every broken chain")
    if pick is None:
        oldest = on_path[-1][0]
        point = (f"{format_time(backup_stop_time(oldest))}" if target.kind == "time" else oldest.stop_lsn)
        if backup_id is not None:
            raise TargetError(f"the target ({target.describe()}) is before backup {backup_id} became "
                              f"consistent ({point})", "choose an older backup or a later target")
        raise TargetError(f"the target ({target.describe()}) is before the oldest backup {oldest.id}, which "
                          f"is consistent from {point} on", f"the earliest restorable point is {point}")
    m, tli, path = pick
    plan = _wal_plan(m, tli, path, catalog, target, timeline_spec)
    return replace(plan, notes=skipped + plan.notes, chain=parent_chain(m, by_id), skipped=skipped)


def _wal_plan(m: Manifest, tli: int, path: list[Stretch], catalog: WalCatalog, target: Target,
              timeline_spec: str) -> Plan:
    seg = catalog.seg_size
    notes: list[str] = []
    # 1. the backup's own WAL: without it the copy never becomes consistent
    own = walname.segment_range(m.timeline, walname.parse_lsn(m.start_lsn), walname.parse_lsn(m.stop_lsn), seg)
    missing = [n for n in own if not catalog.has(n)]
    if missing:
        raise RestoreError(f"the archive lacks WAL segment {missing[0]} that backup {m.id} needs to become "
                           "consistent", "check archiving, or restore from another backup with --backup")
    # 2. every segment on the path up to the end of the archive (or the target LSN)
    final = catalog.timelines.get(tli)
    last_final = final.last if final else None
    at_lsn = target.lsn_bound is not None
    if at_lsn:
        until: int | None = target.lsn_bound
    elif target.kind == "immediate":
        until = walname.parse_lsn(m.stop_lsn)
    elif last_final is not None and last_final * seg >= path[-1].start_lsn:
        until = (last_final + 1) * seg - 1
    else:
        until = path[-1].start_lsn - 1 if len(path) > 1 else None
    needed = segments_for(path, until, seg) if until is not None else list(own)
    if not needed:
        needed = list(own)
    avail = 0
    while avail < len(needed) and catalog.has(needed[avail]):
        avail += 1
    present = needed[:avail]
    end_time = max((catalog.objects[n].mtime for n in present), default=None)
    gap = needed[avail] if avail < len(needed) else None
    later = any(catalog.has(n) for n in needed[avail:])  # WAL exists beyond the hole: a gap, not the end

    if at_lsn and gap is not None:
        assert target.lsn is not None
        if later:
            raise TargetError(f"the archive has a gap: WAL segment {gap} is missing on the way to "
                              f"{target.describe()}",
                              f"the latest reachable point is in {present[-1] if present else own[-1]}")
        reach = present[-1] if present else own[-1]
        raise TargetError(f"the target {target.describe()} is past the archive (the last "
                          f"archived segment on its path is {reach})",
                          "archive more WAL (pitr check forces a switch) or choose an earlier target")
    if target.kind == "time":
        assert target.time is not None
        tt = target.time.timestamp()
        slack = 1.0  # S3 reports arrival times in whole seconds
        if gap is not None and later and (end_time is None or end_time + slack < tt):
            raise TargetError(f"the archive has a gap: WAL segment {gap} is missing before the target time",
                              f"the latest reachable time is about {_fmt_epoch(end_time)}")
        if end_time is None or end_time + slack < tt:
            raise TargetError(f"the target time {format_time(target.time)} is past the archive (the newest "
                              f"WAL on its path arrived at {_fmt_epoch(end_time)})",
                              "wait for more WAL to be archived (pitr check forces a switch) or choose an "
                              "earlier time")
        # WAL needed: up to the first segment that arrived after the target
        cut = next((i for i, n in enumerate(present) if catalog.objects[n].mtime >= tt), len(present) - 1)
        present = present[:cut + 1]
    if target.kind == "latest" and gap is not None and later:
        raise TargetError(f"the archive has a gap: WAL segment {gap} is missing, so replay cannot reach the "
                          "end of the archive", f"restore to a point before it with --target-time or --target-lsn "
                          f"(the last segment before the gap is {present[-1] if present else own[-1]})")
    if target.kind in ("xid", "name") and gap is not None and later:
        notes.append(f"the archive has a gap at {gap}; the target must lie before it")
    if target.kind == "xid" or (target.kind == "name" and not at_lsn):
        notes.append(f"PostgreSQL finds this target while replaying: it must come after backup {m.id} became "
                     f"consistent ({format_time(backup_stop_time(m))}); for an earlier one name an older "
                     "backup with --backup")
    if target.kind == "immediate":
        present = [n for n in present if n in own] or list(own)
    if not present:
        present = list(own)
    if target.kind == "latest" and last_final is None and tli != m.timeline:
        notes.append(f"timeline {tli} has no archived WAL segment yet; replay ends where it branched off")
    return Plan(m, target, timeline_spec, tli, path, present[0], present[-1], len(present), end_time, notes)


def _fmt_epoch(t: float | None) -> str:
    return "never" if t is None else format_time(datetime.fromtimestamp(t, UTC).replace(microsecond=0))
