"""`pitr metrics`: the repository's state as Prometheus text (docs/metrics.md lists every metric).

Cheap enough for a minute-by-minute timer on a repository of thousands of WAL segments: the
repository is listed once (every other listing is answered from that one), and the only objects
read are the metadata, the manifests, the timeline .history files (the recoverable window needs
them) and the newest drill records. The catalogue is ops.info's, so `info` and `metrics` agree.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pitr.errors import PitrError
from pitr.ops.admin.info import InfoReport, gather
from pitr.ops.recovery.restore_plan import parse_iso
from pitr.repo import drills
from pitr.repo.format import META_KEY, WAL_PREFIX
from pitr.repo.meta import SMALL_JSON_MAX
from pitr.storage.base import ObjectInfo, Storage

HIDDEN = ("restore-points/",)  # metrics do not report restore points: do not read their records


class OneListing(Storage):
    """A read-mostly view of a storage whose list() is served from a single listing of everything."""

    def __init__(self, inner: Storage, hide: tuple[str, ...] = ()) -> None:
        self.inner = inner
        self.display = inner.display
        self.objects = list(inner.list(""))  # everything, for the repository's size
        self.hide = hide

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return iter([o for o in self.objects if o.key.startswith(prefix) and not o.key.startswith(self.hide)])

    def put(self, key: str, data: bytes | BinaryIO, *, if_absent: bool = False) -> None:
        self.inner.put(key, data, if_absent=if_absent)

    def open(self, key: str) -> BinaryIO:
        return self.inner.open(key)

    def get(self, key: str, max_size: int | None = None) -> bytes:
        return self.inner.get(key, max_size)

    def get_range(self, key: str, start: int, length: int | None = None) -> bytes:
        return self.inner.get_range(key, start, length)

    def stat(self, key: str) -> ObjectInfo | None:
        return self.inner.stat(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def check(self, write: bool = False) -> None:
        self.inner.check(write)


@dataclass
class Metric:
    name: str
    help: str
    kind: str = "gauge"
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float | None, **labels: str) -> None:
        if value is not None and not math.isnan(value):
            self.samples.append((labels, float(value)))


@dataclass
class Snapshot:
    report: InfoReport
    repo_bytes: int
    repo_objects: int
    drill: dict[str, Any] | None
    drill_ok: dict[str, Any] | None
    encryption: bool
    object_lock: bool
    wal_bytes: int = 0


def collect(storage: Storage, now: float | None = None) -> Snapshot:
    view = OneListing(storage, HIDDEN)
    report = gather(view, now)
    ids = drills.list_ids(view)
    drill = drills.newest(view, ids)
    drill_ok = drill if drill and drill.get("passed") else drills.newest(view, ids, passed_only=True)
    enc, lock = repo_protection(storage)
    wal_bytes = sum(o.size for o in view.list(WAL_PREFIX))
    return Snapshot(report, sum(o.size for o in view.objects), len(view.objects), drill, drill_ok, enc, lock,
                    wal_bytes)


def repo_protection(storage: Storage) -> tuple[bool, bool]:
    """(encryption on, Object Lock on) as the repository metadata says; off when it says nothing."""
    try:
        raw = json.loads(storage.get(META_KEY, max_size=SMALL_JSON_MAX))
    except (PitrError, ValueError):
        return False, False
    if not isinstance(raw, dict):
        return False, False
    enc = raw.get("encryption")
    lock = raw.get("lock_days", raw.get("object_lock"))
    enc_on = bool(enc) and enc not in ("none", "off")
    lock_on = isinstance(lock, (int, float)) and not isinstance(lock, bool) and lock > 0 or lock is True
    return enc_on, bool(lock_on)


def _ts(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return parse_iso(iso).timestamp()
    except ValueError:
        return None


def build(snap: Snapshot) -> list[Metric]:
    r = snap.report
    now = r.now
    out: list[Metric] = []

    def metric(name: str, help_: str, value: float | None = None, kind: str = "gauge") -> Metric:
        m = Metric(name, help_, kind)
        m.add(value)
        out.append(m)
        return m

    metric("pitr_metrics_generated_timestamp_seconds", "When these metrics were computed (unix time).", now)
    metric("pitr_rpo_seconds", "Age of the newest archived WAL segment (absent when none is archived).",
           r.rpo_seconds)
    w = r.window
    metric("pitr_recoverable_window_start_timestamp_seconds",
           "Earliest restorable time: end of the oldest backup whose WAL is all archived.", _ts(w.earliest_time))
    metric("pitr_recoverable_window_end_timestamp_seconds",
           "Latest restorable time (upper bound): arrival of the newest WAL segment a restore reaches.",
           w.latest.arrival if w.latest else None)
    usable = [b.manifest for b in r.backups if b.status == "ok" and b.manifest is not None]
    newest = max((_ts(m.stop_time) or 0.0 for m in usable), default=None)
    metric("pitr_backup_newest_age_seconds", "Age of the newest complete backup with its WAL archived.",
           None if newest is None else max(0.0, now - newest))
    count = metric("pitr_backups", "Complete backups in the repository, by type and status.")
    age = metric("pitr_backup_last_age_seconds", "Age of the newest complete backup of each type.")
    size = metric("pitr_backup_last_size_bytes", "Database bytes of the newest backup of each type.")
    stored = metric("pitr_backup_last_stored_bytes", "Bytes stored for the newest backup of each type.")
    took = metric("pitr_backup_last_duration_seconds", "How long the newest backup of each type took.")
    by: dict[tuple[str, str], int] = {}
    for b in r.backups:
        key = (b.manifest.type if b.manifest else "unknown", b.status)
        by[key] = by.get(key, 0) + 1
    for (typ, status), n in sorted(by.items()):
        count.add(n, type=typ, status=status)
    for typ in ("full", "diff", "incr"):
        ms = [m for m in usable if m.type == typ]
        if not ms:
            continue
        m = max(ms, key=lambda x: (x.stop_time, x.id))
        stop = _ts(m.stop_time)
        age.add(None if stop is None else max(0.0, now - stop), type=typ)
        size.add(m.bytes, type=typ)
        stored.add(m.stored_bytes, type=typ)
        took.add(m.duration, type=typ)
    segs = sum(t.count for t in r.timelines)
    metric("pitr_wal_archived_segments", "WAL segments in the archive (all timelines).", segs)
    metric("pitr_wal_archived_bytes", "Stored bytes of the archived WAL (segments, history, partial files).",
           snap.wal_bytes)
    metric("pitr_wal_gaps", "Missing stretches of WAL between archived segments (all timelines).",
           sum(len(t.gaps) for t in r.timelines))
    d, ok = snap.drill, snap.drill_ok
    metric("pitr_drill_last_age_seconds", "Age of the newest drill (its start).",
           None if d is None or _ts(d.get("started")) is None else max(0.0, now - (_ts(d.get("started")) or 0)))
    metric("pitr_drill_last_success", "1 when the newest drill passed, 0 when it failed (absent: no drill).",
           None if d is None else float(bool(d.get("passed"))))
    rto = d.get("rto_seconds") if d else None
    metric("pitr_drill_last_rto_seconds", "Newest drill: seconds from its start to a promoted, consistent server.",
           float(rto) if isinstance(rto, (int, float)) else None)
    metric("pitr_drill_last_success_age_seconds", "Age of the newest drill that passed.",
           None if ok is None or _ts(ok.get("started")) is None else max(0.0, now - (_ts(ok.get("started")) or 0)))
    metric("pitr_repository_size_bytes", "Bytes of every object in the repository.", snap.repo_bytes)
    metric("pitr_repository_objects", "Objects in the repository.", snap.repo_objects)
    metric("pitr_encryption_enabled", "1 when the repository is encrypted at rest.", float(snap.encryption))
    metric("pitr_object_lock_enabled", "1 when objects are written under an S3 Object Lock retention.",
           float(snap.object_lock))
    return out


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def render(metrics: list[Metric]) -> str:
    lines: list[str] = []
    for m in metrics:
        lines.append(f"# HELP {m.name} {m.help}")
        lines.append(f"# TYPE {m.name} {m.kind}")
        for labels, value in m.samples:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{m.name}{'{' + lab + '}' if lab else ''} {_num(value)}")
    return "\n".join(lines) + "\n"


def text(storage: Storage, now: float | None = None) -> str:
    return render(build(collect(storage, now if now is not None else time.time())))


def write_textfile(path: Path, body: str) -> None:
    """Atomically replace path (node_exporter must never read half a file): temp file, fsync, rename."""
    d = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
