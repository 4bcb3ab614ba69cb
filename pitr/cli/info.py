"""Commands: info (alias list) — the repository's backups, WAL, recoverable window and RPO.

The --json shape is documented in docs/info-json.md; change both together.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import typer

from pitr.cli.common import settings_of
from pitr.cli.options import JsonReport, RepoAsOf
from pitr.cli.render import emit, emit_json, human_bytes, human_duration, table

INFO_JSON_VERSION = 1


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _human_time(iso: str | None) -> str:
    if not iso:
        return "-"
    t = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def to_json(r: Any) -> dict[str, Any]:
    """The documented JSON object (docs/info-json.md) of an ops.info.InfoReport."""
    from pitr.pg import walname

    backups = []
    for b in r.backups:
        m = b.manifest
        item: dict[str, Any] = {"id": b.id, "status": b.status}
        if m is not None:
            item.update({
                "type": m.type, "parent": b.parent, "timeline": m.timeline, "start_time": m.start_time, "stop_time": m.stop_time,
                "start_lsn": m.start_lsn, "stop_lsn": m.stop_lsn, "start_wal": m.start_wal, "stop_wal": m.stop_wal,
                "bytes": m.bytes, "stored_bytes": m.stored_bytes, "files": len(m.files), "duration": m.duration,
                "compress": m.compress, "pg_version": m.pg_version, "checksums_enabled": m.checksums_enabled,
                "bad_pages": b.bad_pages, "from_standby": b.from_standby,
            })
        if b.missing_wal:
            item["missing_wal"] = b.missing_wal
        if b.problem:
            item["problem"] = b.problem
        backups.append(item)
    w = r.window
    latest = w.latest
    return {
        "version": INFO_JSON_VERSION,
        "repo": r.repo,
        "cluster": {"system_identifier": str(r.meta.system_identifier), "pg_version": r.meta.pg_version,
                    "wal_segment_size": r.meta.wal_segment_size, "repo_format": r.meta.format,
                    "initialized": r.meta.created},
        "now": _iso(r.now),
        "backups": backups,
        "wal": {
            "timelines": [{
                "timeline": t.timeline, "first": t.first, "last": t.last, "count": t.count,
                "gaps": [{"first": g.first, "last": g.last, "count": g.count} for g in t.gaps],
                "newest_arrival": _iso(t.newest_arrival), "partials": t.partials, "history": t.has_history,
            } for t in r.timelines],
            "newest": r.newest_wal,
            "newest_arrival": _iso(r.newest_arrival),
        },
        "recoverable": {
            "earliest_time": w.earliest_time, "earliest_backup": w.earliest_backup, "earliest_lsn": w.earliest_lsn,
            "latest_time": _iso(latest.arrival) if latest else None,
            "latest_lsn": walname.format_lsn(latest.end_lsn) if latest else None,
            "latest_wal": latest.wal if latest else None,
            "latest_timeline": latest.timeline if latest else None,
            "latest_is_upper_bound": True,
        },
        "restore_points": [{"name": p.name, "lsn": p.lsn, "timeline": p.timeline, "time": p.time}
                           for p in r.restore_points],
        "rpo_seconds": None if r.rpo_seconds is None else round(r.rpo_seconds, 3),
        "drill": drill_json(getattr(r, "drill", None)),
    }


def drill_json(d: dict[str, Any] | None) -> dict[str, Any] | None:
    """The newest drill in info's terms (docs/info-json.md): when, target, result, RTO.

    The record comes from the repository (untrusted): a field of the wrong type reads as absent."""
    if not d:
        return None

    def obj(v: Any) -> dict[str, Any]:
        return v if isinstance(v, dict) else {}

    def num(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    raw = d.get("steps")
    steps: list[Any] = raw if isinstance(raw, list) else []
    failed = [obj(s).get("name") for s in steps if obj(s).get("passed") is False]
    return {"id": d.get("id"), "started": d.get("started"), "finished": d.get("finished"),
            "passed": d.get("passed"), "target": obj(d.get("target")).get("description"),
            "backup": obj(d.get("backup")).get("id"), "reached_lsn": obj(d.get("reached")).get("lsn"),
            "rto_seconds": num(d.get("rto_seconds")), "rto_checks_seconds": num(d.get("rto_checks_seconds")),
            "failed_steps": failed}


def render_text(r: Any) -> str:
    lines = [f"repository  {r.repo}",
             f"cluster     {r.meta.system_identifier} (PostgreSQL {r.meta.pg_version}, "
             f"{r.meta.wal_segment_size >> 20} MiB WAL segments)", ""]
    if r.backups:
        rows = []
        for b in r.backups:
            m = b.manifest
            if m is None:
                rows.append([b.id, "-", "-", "-", "-", "-", "-", "-", "-", "-", "unreadable"])
                continue
            status = b.status if b.status != "wal-missing" else f"WAL missing ({b.missing_wal})"
            if b.status == "chain-broken":
                status = f"chain broken: {b.problem}"
            if b.bad_pages:
                status += f", {b.bad_pages} bad page(s)"
            kind = m.type + (" from standby" if b.from_standby else "") + (f" on {b.parent}" if b.parent else "")
            rows.append([b.id, kind, str(m.timeline), _human_time(m.start_time), _human_time(m.stop_time),
                         m.start_lsn, m.stop_lsn, human_bytes(m.bytes), human_bytes(m.stored_bytes),
                         human_duration(m.duration), status])
        lines.append("backups (times in UTC)")
        lines.append(table(["id", "type", "tli", "start", "stop", "start lsn", "stop lsn", "size", "stored",
                            "took", "status"], rows))
    else:
        lines.append("backups: none yet (take one with `pitr backup`)")
    lines.append("")
    segs = [t for t in r.timelines if t.count]
    if segs:
        rows = []
        for t in r.timelines:
            gaps = ", ".join(f"{g.first}..{g.last} ({g.count})" if g.count > 1 else g.first for g in t.gaps)
            rows.append([str(t.timeline), t.first or "-", t.last or "-", str(t.count), gaps or "none",
                         _human_time(_iso(t.newest_arrival))])
        lines.append("archived WAL")
        lines.append(table(["tli", "first", "last", "segments", "gaps", "newest arrival"], rows))
    else:
        lines.append("archived WAL: none yet (check archive_command with `pitr check`)")
    lines.append("")
    w = r.window
    if w.earliest_time and w.latest:
        lines.append(f"recoverable  {_human_time(w.earliest_time)} UTC (backup {w.earliest_backup}) .. "
                     f"{_human_time(_iso(w.latest.arrival))} UTC at the latest (WAL {w.latest.wal}, timeline "
                     f"{w.latest.timeline})")
        lines.append("             the end is an upper bound: the arrival time of the newest WAL segment "
                     "a restore can reach")
    else:
        lines.append("recoverable  nothing yet: no backup with all its WAL archived")
    if r.restore_points:
        lines.append("")
        lines.append("restore points (made with `pitr restore-point`; restore with --target-name)")
        lines.append(table(["name", "time", "lsn", "tli"],
                           [[p.name, _human_time(p.time), p.lsn, str(p.timeline)] for p in r.restore_points]))
    dj = drill_json(getattr(r, "drill", None))
    if dj is None:
        lines.append("drill        none recorded (prove a restore with `pitr drill`)")
    else:
        res = "passed" if dj["passed"] else f"FAILED ({', '.join(map(str, dj['failed_steps'])) or 'restore'})"
        lines.append(f"drill        {_human_time(dj['started'])} UTC: {res}, target {dj['target'] or '-'}, "
                     f"RTO {human_duration(dj['rto_seconds'])} (drill {dj['id']})")
    rpo = r.rpo_seconds
    lines.append(f"RPO          {human_duration(rpo)}" + (" (age of the newest archived WAL segment)"
                                                         if rpo is not None else " (no WAL archived)"))
    return "\n".join(lines)


def _show_info(ctx: typer.Context, json_out: bool, repo_as_of: str | None = None) -> None:
    """What info and list print: the gathered report plus the encryption and Object Lock lines."""
    from pitr.cli.repoopen import open_repo, parse_as_of
    from pitr.ops.admin.info import gather

    storage = open_repo(settings_of(ctx), as_of=parse_as_of(repo_as_of))
    try:
        report = gather(storage)
        encrypted = bool(getattr(storage, "encrypted", False))
        # (MODE, days) from pitr.json, set on the S3 backend when the repository was read
        lock = getattr(getattr(storage, "inner", None), "retention", None)
    finally:
        storage.close()
    if json_out:
        emit_json({**to_json(report), "encryption": {"enabled": encrypted,
                                                      "cipher": "AES-256-GCM" if encrypted else None},
                   "object_lock": {"enabled": lock is not None, "mode": lock[0].lower() if lock else None,
                                   "days": lock[1] if lock else None}})
    else:
        emit(render_text(report))
        emit(f"Encryption   {'on (AES-256-GCM)' if encrypted else 'off'}")
        emit(f"Object Lock  {f'on ({lock[0].lower()}, {lock[1]} days)' if lock else 'off'}")


def info_cmd(
    ctx: typer.Context,
    json_out: JsonReport = False,
    repo_as_of: RepoAsOf = None,
) -> None:
    """Backups, archived WAL per timeline (with gaps), the recoverable window and the current RPO."""
    _show_info(ctx, json_out, repo_as_of)


def list_cmd(
    ctx: typer.Context,
    json_out: JsonReport = False,
) -> None:
    """Alias of `pitr info`."""
    _show_info(ctx, json_out)


def register(app: typer.Typer) -> None:
    app.command("info")(info_cmd)
    app.command("list")(list_cmd)
