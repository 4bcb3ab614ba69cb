"""Commands that keep a repository healthy: verify, check, expire (docs/maintenance.md)."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import typer

from pitr.cli.common import settings_of
from pitr.cli.options import DbName, JsonResult, RepoAsOf
from pitr.cli.render import emit, emit_json, human_bytes, human_duration

log = logging.getLogger("pitr")


def verify_cmd(
    ctx: typer.Context,
    backup: Annotated[str | None, typer.Option("--backup", help="Only this backup and the WAL it needs.", show_default=False)] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="Objects read in parallel [config jobs].", show_default=False)] = None,
    repo_as_of: RepoAsOf = None,
    json_out: JsonResult = False,
) -> None:
    """Re-read every stored object (checksums, WAL headers), check each manifest against its objects and
    that WAL is continuous from each backup to the archive's head. Exit 1 listing every problem."""
    from pitr.cli.repoopen import open_repo, parse_as_of
    from pitr.errors import VerifyError
    from pitr.ops.proof.verify import VerifyOptions, verify

    s = settings_of(ctx, jobs=jobs)
    storage = open_repo(s, as_of=parse_as_of(repo_as_of))
    try:
        started = time.monotonic()
        res = verify(storage, VerifyOptions(backup, s.jobs), progress=log.info)
        took = time.monotonic() - started
    finally:
        storage.close()
    c = res.checked
    if json_out:
        emit_json(res.to_json())
    else:
        for p in res.problems:
            emit(f"{p.kind}: {p.object}: {p.detail}")
        emit(f"checked {c.backups} backup(s) ({c.files} files in {c.backup_objects} objects), "
             f"{c.wal_segments} WAL segments and {c.wal_other} other WAL files on {c.timelines} timeline(s): "
             f"{human_bytes(c.bytes)} read in {human_duration(took)}")
        emit("OK" if res.ok else f"{len(res.problems)} problem(s)")
    if not res.ok:
        raise VerifyError(f"verify found {len(res.problems)} problem(s) in {storage.display}",
                          "each is listed on stdout with the object it concerns")


def check_cmd(
    ctx: typer.Context,
    dbname: DbName = None,
    max_rpo: Annotated[str | None, typer.Option("--max-rpo", help="Fail when the newest archived WAL is older than this (90s, 5m, 2h, 1d).", show_default=False)] = None,
    max_backup_age: Annotated[str | None, typer.Option("--max-backup-age", help="Fail when the newest complete backup is older than this (e.g. 26h).", show_default=False)] = None,
    max_drill_age: Annotated[str | None, typer.Option("--max-drill-age", help="Fail when the newest passing drill is older than this (e.g. 8d).", show_default=False)] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the switched segment to reach the repository.")] = 60.0,
    json_out: JsonResult = False,
    storage_test: Annotated[bool, typer.Option("--storage", help="Instead, run a conformance self-test of the repository's store (atomic conditional create, read-after-write, listing, multipart, checksums); no server needed.")] = False,
) -> None:
    """Check the server's archive settings against this repository, force a WAL switch and wait until
    that segment is archived. Exit 1 with one line per failed point naming the fix."""
    from pitr.cli.repoopen import open_repo
    from pitr.errors import CheckError, UsageError
    from pitr.ops.proof.check import CheckOptions, check, parse_duration

    if storage_test:
        from pitr.ops.admin.storecheck import storage_check

        s = settings_of(ctx, dbname=dbname)
        storage = open_repo(s)
        try:
            res = storage_check(storage, s.allow_unsafe_store)
        finally:
            storage.close()
        bad = _emit_points(res, json_out)
        if not res.ok:
            raise CheckError(f"the store behind {storage.display} lacks {len(bad)} propert"
                             f"{'y' if len(bad) == 1 else 'ies'}: {', '.join(bad)}",
                             "each FAIL line on stdout says what was seen and what to do")
        return

    rpo: float | None = None
    if max_rpo is not None:
        try:
            rpo = parse_duration(max_rpo)
        except ValueError as e:
            raise UsageError(f"--max-rpo: {e}") from None
    ages: dict[str, float | None] = {}
    for flag, val in (("--max-backup-age", max_backup_age), ("--max-drill-age", max_drill_age)):
        try:
            ages[flag] = None if val is None else parse_duration(val)
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from None
    if not 0 <= timeout < float("inf"):  # also refuses nan, which every comparison lets through
        raise UsageError(f"--timeout must be a finite number of seconds, 0 or more, not {timeout}")
    s = settings_of(ctx, dbname=dbname)
    storage = open_repo(s)
    try:
        res = check(storage, s.dbname, CheckOptions(s.location(), timeout, rpo, ages["--max-backup-age"],
                                                     ages["--max-drill-age"]))
    finally:
        storage.close()
    bad = _emit_points(res, json_out)
    if not res.ok:
        raise CheckError(f"check failed on {len(bad)} point(s): {', '.join(dict.fromkeys(bad))}",
                         "each FAIL line on stdout names the setting and the fix")


def expire_cmd(
    ctx: typer.Context,
    retain_full: Annotated[int | None, typer.Option("--retain-full", help="Keep the N newest full backups [config retain_full].", show_default=False)] = None,
    retain_days: Annotated[float | None, typer.Option("--retain-days", help="Keep what restores any point of the last D days [config retain_days].", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; delete nothing.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable plan and result on stdout.")] = False,
) -> None:
    """Delete backups outside the retention policy and the WAL no retained backup needs. Never deletes the
    newest backup or anything a retained backup needs to become consistent and reach the archive's head."""
    from pitr.cli.repoopen import open_repo
    from pitr.ops.admin.retention import Policy, apply, gather_and_plan

    s = settings_of(ctx)
    if retain_full is not None or retain_days is not None:
        policy = Policy(retain_full, retain_days)  # the command line replaces the config's policy
    else:
        policy = Policy(s.retain_full, s.retain_days)
    policy.validate()
    storage = open_repo(s)
    try:
        plan = gather_and_plan(storage, policy, time.time())
        done = None if dry_run else apply(storage, plan, progress=log.info)
    finally:
        storage.close()
    # versions an Object Lock still retains: left in place, reported, not a failure
    locked = list(getattr(getattr(storage, "inner", storage), "locked_left", []))
    if json_out:
        out = plan.to_json() | {"dry_run": dry_run}
        out["locked"] = [{"object": k, "retained_until": u.isoformat()} for k, u in locked]
        out["deleted"] = None if done is None else {"backups": done.backups, "incomplete": done.incomplete,
                                                    "objects": done.objects, "bytes": done.bytes,
                                                    "temps": done.temps, "drills": done.drills}
        emit_json(out)
        _fail_on_unreadable(plan.unreadable)
        return
    emit(f"policy: {_describe(policy)}")
    for b in plan.backups:
        emit(f"{b.action:<6}  {b.id}  {b.type}  {b.stop_time}  {b.reason}")
    for i in plan.incomplete:
        verb = "delete" if i.action == "delete" else "leave"
        emit(f"{verb:<6}  {i.id}  incomplete  {i.objects} objects, {human_bytes(i.bytes)}: {i.reason}")
    for ip in plan.in_progress:
        by = f"{ip.host} pid {ip.pid}" if ip.pid is not None else ip.host
        emit(f"{'running' if ip.honoured else 'stale':<7} {ip.id}  in progress since {ip.started} on {by}: "
             f"{ip.reason}")
    for t in plan.wal:
        if t.delete_objects:
            emit(f"WAL timeline {t.timeline}: delete {t.delete_objects} objects ({human_bytes(t.delete_bytes)}), "
                 f"{t.first} to {t.last}: {t.reason}")
        else:
            emit(f"WAL timeline {t.timeline}: keep everything from {t.keep_from}")
    for d in plan.drills:
        if d.action == "delete":
            emit(f"{d.action:<6}  drill {d.id}  {d.reason}")
    if plan.temps:
        emit(f"temp    {len(plan.temps)} leftover temporary object(s) of interrupted writes "
             f"({human_bytes(sum(t.size for t in plan.temps))}): remove")
    for n in plan.notes:
        emit(f"note: {n}")
    if done is None:
        emit("dry run: nothing was deleted")
    elif plan.empty:
        emit("nothing to expire")
    else:
        emit(f"expired {done.backups} backup(s), deleted {done.objects} objects ({human_bytes(done.bytes)})")
    if locked:
        until = max(u for _, u in locked)
        emit(f"locked  {len(locked)} object version(s) are still under Object Lock and were left in place "
             f"(the last unlocks {until.strftime('%Y-%m-%d %H:%M UTC')}); a later expire deletes them")
    _fail_on_unreadable(plan.unreadable)


def _fail_on_unreadable(unreadable: dict[str, str]) -> None:
    """After the rest of the policy was applied: exit 1 naming the backups expire could not judge."""
    from pitr.errors import IntegrityError

    if unreadable:
        ids = ", ".join(unreadable)
        one = len(unreadable) == 1
        raise IntegrityError(f"the manifest of backup{'' if one else 's'} {ids} cannot be read "
                             f"({next(iter(unreadable.values()))}{'' if one else ', …'}): "
                             f"{'it was' if one else 'they were'} kept, with every older backup and every backup "
                             "building on it, and no WAL was deleted",
                             "run `pitr verify`; once the backup is repaired or deleted by hand, the next expire "
                             "applies the whole policy")


def register(app: typer.Typer) -> None:
    app.command("verify")(verify_cmd)
    app.command("check")(check_cmd)
    app.command("expire")(expire_cmd)


def _emit_points(res: Any, json_out: bool) -> list[str]:
    """Print a check's result (one line per point, or JSON); return the names of the failed points."""
    if json_out:
        emit_json(res.to_json())
    else:
        for p in res.points:
            emit(f"{'ok  ' if p.ok else 'FAIL'}  {p.line()}")
    return [p.name for p in res.points if not p.ok]


def _describe(policy: object) -> str:
    full = getattr(policy, "retain_full", None)
    days = getattr(policy, "retain_days", None)
    parts = []
    if full is not None:
        parts.append(f"keep the {full} newest full backup(s)")
    if days is not None:
        parts.append(f"keep every point of the last {days:g} day(s) restorable")
    return " and ".join(parts)
