"""Restore planning as pure functions: target parsing, backup choice across timelines, WAL checks."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from pitr.errors import RestoreError, TargetError, UsageError
from pitr.ops.recovery.restore_plan import (
    Target,
    format_time,
    make_plan,
    parse_target,
    parse_timeline,
    resolve_name,
    resolve_timeline,
)
from pitr.pg import walname
from pitr.pg.walname import HistoryEntry
from pitr.repo.catalog import TimelineWal, WalCatalog
from pitr.repo.manifest import Manifest
from pitr.storage.base import ObjectInfo

SEG = 16 << 20
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def lsn(segno: int, off: int = 0x100) -> int:
    return segno * SEG + off


def manifest(bid: str, tli: int, start_seg: int, stop_seg: int, stop_s: float) -> Manifest:
    return Manifest(
        id=bid, type="full", system_identifier=7, pg_version=15, pg_version_num=150018, wal_segment_size=SEG,
        timeline=tli, start_lsn=walname.format_lsn(lsn(start_seg, 0x28)), stop_lsn=walname.format_lsn(lsn(stop_seg)),
        start_wal=walname.seg_name(tli, start_seg), stop_wal=walname.seg_name(tli, stop_seg),
        start_time=at(stop_s - 5).isoformat(), stop_time=at(stop_s).isoformat(), compress="zstd:3",
        backup_label="", tablespace_map=None, checksums_enabled=True, files=[], directories=[])


def catalog(segs: dict[int, dict[int, float]], history: tuple[int, ...] = ()) -> WalCatalog:
    """segs: timeline -> {segno: arrival seconds after T0}."""
    cat = WalCatalog(SEG)
    for tli, nos in segs.items():
        tl = cat.timelines.setdefault(tli, TimelineWal(tli))
        for no, arrived in sorted(nos.items()):
            name = walname.seg_name(tli, no)
            cat.objects[name] = ObjectInfo(f"wal/{name[:16]}/{name}", 100, at(arrived).timestamp())
            tl.segnos.append(no)
            tl.newest_mtime = max(tl.newest_mtime, at(arrived).timestamp())
    for tli in history:
        cat.history_files[tli] = ObjectInfo(f"wal/history/{tli:08X}.history", 40, at(0).timestamp())
    return cat


# Two backups on timeline 1: B1 consistent at 100 s (segment 2), B2 at 200 s (segment 5);
# segments 2..9 archived, each arriving 30 s after the previous one.
B1 = manifest("B1", 1, 2, 2, 100)
B2 = manifest("B2", 1, 5, 5, 200)
LINEAR = catalog({1: {n: 60 + 30 * (n - 2) for n in range(2, 10)}})  # seg 9 arrives at 270 s


# --------------------------------------------------------------------------- targets

def test_no_target_is_end_of_archive() -> None:
    t = parse_target()
    assert t.kind == "latest" and t.recovery_settings() == {}


def test_time_with_zone_becomes_utc() -> None:
    t = parse_target(time="2026-03-01 14:30:00.25+02:00")
    assert t.time == datetime(2026, 3, 1, 12, 30, 0, 250000, tzinfo=UTC)
    assert t.recovery_settings() == {"recovery_target_time": "2026-03-01 12:30:00.250000+00"}
    assert format_time(t.time) == "2026-03-01 12:30:00.250000 UTC"


def test_time_without_zone_is_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        t = parse_target(time="2026-07-01 08:00:00")  # EDT, UTC-4
    finally:
        monkeypatch.undo()
        time.tzset()
    assert t.time == datetime(2026, 7, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("text", ["yesterday-ish", "2026-13-45 10:00", "", "10:00 CEST"])
def test_unparseable_time_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_target(time=text)
    assert e.value.exit_code == 2
    assert "\n" not in str(e.value)


def test_other_targets() -> None:
    assert parse_target(lsn="0/3000148").recovery_settings() == {"recovery_target_lsn": "0/3000148"}
    assert parse_target(xid="74212").recovery_settings() == {"recovery_target_xid": "74212"}
    assert parse_target(name="before-sync").recovery_settings() == {"recovery_target_name": "before-sync"}
    assert parse_target(target="immediate").recovery_settings() == {"recovery_target": "immediate"}


@pytest.mark.parametrize("kw", [{"lsn": "3000148"}, {"xid": "abc"}, {"xid": "1"}, {"target": "now"},
                                {"name": "x" * 64}, {"time": "2026-03-01", "lsn": "0/1"}])
def test_bad_targets(kw: dict[str, str]) -> None:
    with pytest.raises(UsageError):
        parse_target(**kw)


def test_timeline_spec() -> None:
    assert parse_timeline("Latest") == "latest"
    assert parse_timeline("current") == "current"
    assert parse_timeline("3") == "3"
    with pytest.raises(UsageError):
        parse_timeline("0x3")


# --------------------------------------------------------------------------- backup choice

def test_time_between_backups_uses_the_older() -> None:
    p = make_plan([B1, B2], LINEAR, {}, Target("time", time=at(150)))
    assert p.backup.id == "B1"
    assert p.wal_first == walname.seg_name(1, 2)
    # the first segment that arrived after the target holds the stop: seg 5 arrives at 150 s
    assert p.wal_last == walname.seg_name(1, 5)


def test_time_after_newest_backup_and_latest_use_the_newest() -> None:
    assert make_plan([B1, B2], LINEAR, {}, Target("time", time=at(230))).backup.id == "B2"
    p = make_plan([B2, B1], LINEAR, {}, Target("latest"))
    assert (p.backup.id, p.wal_last, p.timeline) == ("B2", walname.seg_name(1, 9), 1)


def test_target_exactly_at_consistent_point() -> None:
    assert make_plan([B1, B2], LINEAR, {}, Target("time", time=at(200))).backup.id == "B2"
    assert make_plan([B1, B2], LINEAR, {}, Target("lsn", lsn=lsn(5))).backup.id == "B2"
    assert make_plan([B1, B2], LINEAR, {}, Target("lsn", lsn=lsn(5) - 1)).backup.id == "B1"


def test_named_point_recorded_by_pitr_uses_the_backup_before_it() -> None:
    """`pitr restore-point` records the point's LSN; a name only PostgreSQL knows uses the newest backup."""
    named = Target("name", name="before-release")
    assert make_plan([B1, B2], LINEAR, {}, named).backup.id == "B2"
    p = make_plan([B1, B2], LINEAR, {}, resolve_name(named, lsn(4)))
    assert p.backup.id == "B1"
    assert p.wal_last == walname.seg_name(1, 4)  # WAL up to the point suffices
    assert p.target.recovery_settings() == {"recovery_target_name": "before-release"}
    assert "LSN 0/4000100" in p.target.describe()
    assert resolve_name(named, None) == named
    with pytest.raises(TargetError, match="before the oldest backup"):
        make_plan([B1, B2], LINEAR, {}, resolve_name(named, lsn(1)))
    with pytest.raises(TargetError, match="past the archive"):
        make_plan([B1, B2], LINEAR, {}, resolve_name(named, lsn(12)))


def test_target_before_oldest_backup() -> None:
    with pytest.raises(TargetError, match="before the oldest backup B1"):
        make_plan([B1, B2], LINEAR, {}, Target("time", time=at(90)))
    with pytest.raises(TargetError, match="before the oldest backup"):
        make_plan([B1, B2], LINEAR, {}, Target("lsn", lsn=lsn(1)))


def test_target_past_the_archive() -> None:
    with pytest.raises(TargetError, match="past the archive"):
        make_plan([B1, B2], LINEAR, {}, Target("time", time=at(400)))
    with pytest.raises(TargetError, match="past the archive"):
        make_plan([B1, B2], LINEAR, {}, Target("lsn", lsn=lsn(10)))
    p = make_plan([B1, B2], LINEAR, {}, Target("lsn", lsn=lsn(9, 0x5000)))
    assert p.wal_last == walname.seg_name(1, 9)


def test_gap_in_the_wal() -> None:
    holed = catalog({1: {n: 60 + 30 * (n - 2) for n in range(2, 10) if n != 4}})
    with pytest.raises(TargetError, match=f"gap.*{walname.seg_name(1, 4)}"):
        make_plan([B1], holed, {}, Target("time", time=at(200)))
    with pytest.raises(TargetError, match="gap"):
        make_plan([B1], holed, {}, Target("latest"))
    with pytest.raises(TargetError, match="gap"):
        make_plan([B1], holed, {}, Target("lsn", lsn=lsn(6)))
    # before the hole is fine; B2 is past it
    assert make_plan([B1], holed, {}, Target("lsn", lsn=lsn(3))).wal_last == walname.seg_name(1, 3)
    assert make_plan([B1, B2], holed, {}, Target("latest")).backup.id == "B2"
    # xid/name: where the target lies is unknown, so the gap is a note, not a refusal
    assert make_plan([B1], holed, {}, Target("xid", xid=900)).notes


def test_backup_without_its_own_wal() -> None:
    cat = catalog({1: {n: 60 + 30 * (n - 2) for n in range(3, 10)}})
    with pytest.raises(RestoreError, match="needs to become consistent"):
        make_plan([B1], cat, {}, Target("immediate"))


def test_explicit_backup() -> None:
    assert make_plan([B1, B2], LINEAR, {}, Target("latest"), backup_id="B1").backup.id == "B1"
    with pytest.raises(RestoreError, match="backup NOPE does not exist"):
        make_plan([B1, B2], LINEAR, {}, Target("latest"), backup_id="NOPE")
    with pytest.raises(TargetError, match="before backup B2 became consistent"):
        make_plan([B1, B2], LINEAR, {}, Target("time", time=at(150)), backup_id="B2")
    p = make_plan([B1, B2], LINEAR, {}, Target("immediate"), backup_id="B1")
    assert (p.wal_first, p.wal_last) == (walname.seg_name(1, 2), walname.seg_name(1, 2))


def test_empty_repository() -> None:
    with pytest.raises(RestoreError, match="no complete backup"):
        make_plan([], LINEAR, {}, Target("latest"))


# --------------------------------------------------------------------------- timelines

# Timeline 2 forked off timeline 1 inside segment 6 (a restore to ~220 s, promoted). The old
# primary went on on timeline 1 and took B3 at 290 s (segment 7), which is not on timeline 2's path.
FORK = lsn(6, 0x2000)
HIST = {2: [HistoryEntry(1, FORK, "before 2026-03-01 12:03:40+00")]}
B3 = manifest("B3", 1, 7, 7, 290)
FORKED = catalog({1: {n: 60 + 30 * (n - 2) for n in range(2, 10)}, 2: {6: 500, 7: 530, 8: 560}}, history=(2,))


def test_latest_timeline_follows_history_files() -> None:
    assert resolve_timeline("latest", 1, FORKED) == 2
    assert resolve_timeline("current", 1, FORKED) == 1
    assert resolve_timeline("2", 1, FORKED) == 2
    with pytest.raises(TargetError, match="timeline 5 does not exist"):
        resolve_timeline("5", 1, FORKED)


def test_backup_on_another_branch_is_skipped() -> None:
    p = make_plan([B1, B2, B3], FORKED, HIST, Target("latest"))
    assert (p.backup.id, p.timeline) == ("B2", 2)
    names = [s.timeline for s in p.stretches]
    assert names == [1, 2]
    # the switch segment comes from the new timeline; the end is timeline 2's last segment
    assert p.wal_last == walname.seg_name(2, 8)
    assert p.wal_count == len(range(5, 9))
    # on timeline 1 itself B3 is the newest
    assert make_plan([B1, B2, B3], FORKED, HIST, Target("latest"), "current").backup.id == "B3"
    with pytest.raises(TargetError, match="not on a timeline that leads"):
        make_plan([B1, B2, B3], FORKED, HIST, Target("latest"), backup_id="B3")


def test_time_on_new_timeline() -> None:
    p = make_plan([B1, B2, B3], FORKED, HIST, Target("time", time=at(540)))
    assert (p.backup.id, p.timeline) == ("B2", 2)
    assert p.wal_last == walname.seg_name(2, 8)  # arrived at 560 s, after the target
    with pytest.raises(TargetError, match="past the archive"):
        make_plan([B1, B2, B3], FORKED, HIST, Target("time", time=at(700)))


def test_plan_json_is_serialisable() -> None:
    import json

    p = make_plan([B1, B2], LINEAR, {}, Target("time", time=at(150), given="x"))
    d = json.loads(json.dumps(p.to_json()))
    assert d["backup"]["id"] == "B1" and d["target"]["time_utc"] == at(150).isoformat()
    assert d["wal"]["first"] == walname.seg_name(1, 2)
