"""Chains of diff/incr backups (repo/chain.py) and restore's choice among them (ops/recovery/restore_plan.py):
hand-built manifests, read back through the real manifest codec from memory storage."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pitr.errors import RestoreError
from pitr.ops.recovery.restore_plan import Target, make_plan
from pitr.pg import walname
from pitr.repo.chain import chain_problem, chain_problems, dependencies, parent_chain, root_of
from pitr.repo.manifest import FileEntry, Manifest, read_manifests, write_manifest
from pitr.repo.mapchain import chain_ids
from pitr.storage.memory import MemoryStorage
from tests.test_restore_plan import LINEAR, at, manifest


def mk(bid: str, type: str, parent: str | None, stop_seg: int, stop_s: float, **kw: Any) -> Manifest:
    m = dataclasses.replace(manifest(bid, 1, stop_seg, stop_seg, stop_s), type=type, parent=parent)
    return dataclasses.replace(m, **kw) if kw else m


def entry(path: str, ref: str | None = None, sources: list[str] | None = None) -> FileEntry:
    srcs = None if sources is None else [{"backup": b, "object": "data/000001", "offset": 0, "length": 10,
                                          "kind": "blocks" if i == 0 else "file"} for i, b in enumerate(sources)]
    return FileEntry(path, 8192 * 8, "ab" * 32, 0o600, 0.0, "data/000001", 0, 10, ref=ref, sources=srcs)


F1 = mk("B1", "full", None, 2, 100)
D1 = mk("B2", "diff", "B1", 3, 130)
I1 = mk("B3", "incr", "B2", 4, 160)
I2 = mk("B4", "incr", "B3", 5, 200)
ALL = [F1, D1, I1, I2]


def by_id(*ms: Manifest) -> dict[str, Manifest]:
    return {m.id: m for m in ms}


def test_fields_survive_the_manifest_codec() -> None:
    s = MemoryStorage()
    full, incr = "20261101T000000F", "20261102T000000F"  # real IDs: the reader checks a ref is an older one
    loc = {"object": "data/000002", "offset": 0, "length": 40}
    e = FileEntry("base/1/16384", 8192 * 8, "ab" * 32, 0o600, 0.0, None, 0, 0, map=loc,
                  sources=[{"backup": incr, "object": None, "offset": 0, "length": 0, "kind": "blocks"},
                           {"backup": full, **loc, "kind": "file"}])
    write_manifest(s, dataclasses.replace(I1, id=incr, parent=full,
                                          files=[e, dataclasses.replace(entry("base/1/1259"), ref=full)]))
    (back,), bad = read_manifests(s)
    assert not bad
    assert back.files[0].sources == e.sources and back.files[0].map == e.map
    assert back.files[1].ref == full and back.files[0].ref is None


def test_whole_chain() -> None:
    ids = by_id(*ALL)
    assert [m.id for m in parent_chain(I2, ids)] == ["B1", "B2", "B3", "B4"]
    assert chain_problems(ALL) == {}
    assert root_of(I2, ids) == "B1" and root_of(F1, ids) == "B1"
    assert dependencies(I2, ids) == {"B1", "B2", "B3"}
    assert dependencies(F1, ids) == set()


def test_a_lazy_lookup_walks_the_same_chain_once_per_ancestor() -> None:
    ids = by_id(*ALL)
    asked: list[str] = []

    def lookup(bid: str) -> Manifest | None:
        asked.append(bid)
        return ids.get(bid)

    assert [m.id for m in parent_chain(I2, lookup)] == ["B1", "B2", "B3", "B4"]
    assert asked == ["B3", "B2", "B1"]
    assert chain_ids(I2, ids.get) == {"B1", "B2", "B3", "B4"}
    # a parent that cannot be looked up stays in the chain's IDs (a base there is "missing", not foreign)
    assert chain_ids(I2, by_id(I1, I2).get) == {"B2", "B3", "B4"}
    assert [m.id for m in parent_chain(I2, by_id(I1, I2).get)] == ["B3", "B4"]


def test_missing_and_unreadable_parent_break_every_descendant() -> None:
    got = chain_problems([F1, I1, I2])
    assert set(got) == {"B3", "B4"}
    assert got["B3"].culprit == "B2" and got["B3"].reason == "backup B3 builds on backup B2, which is missing"
    assert got["B4"].culprit == "B2" and got["B4"].backup == "B4"
    assert "unreadable" in chain_problems([F1, I1], unreadable=["B2"])["B3"].reason
    assert root_of(I2, by_id(I1, I2)) is None


@pytest.mark.parametrize("bad, words", [
    (mk("B2", "diff", "B1", 3, 130, system_identifier=8), "another cluster"),
    (mk("B2", "diff", "B1", 3, 130, pg_version=16), "PostgreSQL 15"),
    (mk("B2", "diff", "B1", 3, 130, start_time=at(10).isoformat()), "started after it"),
    (mk("B2", "diff", None, 3, 130), "names no parent"),
    (mk("B2", "weird", "B1", 3, 130), "does not know"),
])
def test_inconsistent_links(bad: Manifest, words: str) -> None:
    got = chain_problems([F1, bad, I1])
    assert words in got["B2"].reason
    assert got["B3"] == dataclasses.replace(got["B2"], backup="B3")  # the descendant names the root cause


def test_diff_must_build_on_a_full() -> None:
    d2 = mk("B5", "diff", "B3", 6, 220)
    got = chain_problems([*ALL, d2])
    assert list(got) == ["B5"] and "a diff backup builds on a full one" in got["B5"].reason


def test_refs_and_sources_must_name_ancestors() -> None:
    other = mk("B0", "full", None, 1, 50)
    good = dataclasses.replace(I2, files=[entry("base/1/1", ref="B1"), entry("base/1/2", sources=["B4", "B2"])])
    assert chain_problem(good, by_id(F1, D1, I1, good)) is None
    stray = dataclasses.replace(I2, files=[entry("base/1/1", ref="B0")])
    b = chain_problem(stray, by_id(other, *ALL[:3], stray))
    assert b is not None and b.culprit == "B0" and "not one of its ancestors" in b.reason
    gone = dataclasses.replace(I2, files=[entry("base/1/2", sources=["B4", "B9"])])
    b = chain_problem(gone, by_id(*ALL[:3], gone))
    assert b is not None and b.culprit == "B9" and "missing" in b.reason
    # dependencies: whatever is named, present or not, so expire can keep it
    assert dependencies(gone, by_id(*ALL[:3], gone)) == {"B1", "B2", "B3", "B9"}


# --------------------------------------------------------------------------- restore's choice

def test_restore_considers_incrementals() -> None:
    p = make_plan(ALL, LINEAR, {}, Target("time", time=at(170)))
    assert p.backup.id == "B3" and [c.id for c in p.chain] == ["B1", "B2", "B3"]
    assert p.to_json()["chain"] == ["B1", "B2", "B3"]
    assert make_plan(ALL, LINEAR, {}, Target("latest")).backup.id == "B4"
    assert make_plan(ALL, LINEAR, {}, Target("time", time=at(140))).backup.id == "B2"


def test_restore_skips_a_broken_chain_and_says_which_backup_is_missing() -> None:
    p = make_plan([F1, I1, I2], LINEAR, {}, Target("latest"))
    assert p.backup.id == "B1"
    assert p.skipped == ["skipped backup B4: backup B3 builds on backup B2, which is missing",
                         "skipped backup B3: backup B3 builds on backup B2, which is missing"]
    assert p.skipped[0] in p.notes
    # unreadable parent: named as such
    p = make_plan([F1, I1], LINEAR, {}, Target("latest"), unreadable=["B2"])
    assert p.backup.id == "B1" and "B2, which is unreadable" in p.skipped[0]


def test_restore_refuses_when_only_broken_chains_reach_the_target() -> None:
    with pytest.raises(RestoreError, match="no backup before the target can be restored: skipped backup B3"):
        make_plan([mk("B1", "full", None, 2, 300), I1], LINEAR, {}, Target("time", time=at(170)))


def test_explicit_backup_with_a_broken_chain_is_refused() -> None:
    with pytest.raises(RestoreError) as e:
        make_plan([F1, I1, I2], LINEAR, {}, Target("latest"), backup_id="B4")
    assert str(e.value) == "backup B4 cannot be restored: backup B3 builds on backup B2, which is missing"
    assert "\n" not in str(e.value)
    assert make_plan(ALL, LINEAR, {}, Target("latest"), backup_id="B3").backup.id == "B3"


def test_lsns_in_the_fixture_are_ordered() -> None:  # guards the fixture the tests above rely on
    assert [walname.parse_lsn(m.stop_lsn) for m in ALL] == sorted(walname.parse_lsn(m.stop_lsn) for m in ALL)


def test_cli_refuses_a_backup_whose_chain_is_broken(tmp_path: Path) -> None:
    """One sentence on stderr naming the missing backup, exit 1, the data directory not created."""
    from pitr.repo.format import META_KEY
    from pitr.repo.meta import new_meta
    from pitr.storage.fs import FsStorage

    full, incr = "20261101T000000F", "20261102T000000F"
    fs = FsStorage(tmp_path / "repo")
    fs.create()
    fs.put(META_KEY, new_meta(7, 15, 16 << 20).to_json())
    write_manifest(fs, dataclasses.replace(I1, id=incr, parent=full))  # its parent was never written
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "PITR_CONFIG": "/dev/null", "PITR_REPO": str(fs.root)}
    dest = tmp_path / "restored"
    r = subprocess.run([str(Path(sys.executable).parent / "pitr"), "restore", "-D", str(dest), "--backup", incr,
                        "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert f"backup {incr} cannot be restored: backup {incr} builds on backup {full}, which is missing" in r.stderr
    assert "Traceback" not in r.stderr and not dest.exists()


@pytest.mark.parametrize("parent", ["20261102T000000F", "20261103T000000F", "B1", "20261101T000000F/../x", 7])
def test_a_hand_edited_parent_that_is_not_an_older_backup_is_refused(tmp_path: Path, parent: object) -> None:
    """The incr's own ID, a newer one (a walk forward in time, or a loop), something that is no backup ID:
    restore refuses the manifest in one sentence naming the parent, before it creates anything."""
    import json

    from pitr.repo import envelope
    from pitr.repo.format import META_KEY, manifest_key
    from pitr.repo.meta import new_meta
    from pitr.storage.fs import FsStorage

    full, incr, newer = "20261101T000000F", "20261102T000000F", "20261103T000000F"
    fs = FsStorage(tmp_path / "repo")
    fs.create()
    fs.put(META_KEY, new_meta(7, 15, 16 << 20).to_json())
    for m in (dataclasses.replace(F1, id=full), dataclasses.replace(I1, id=incr, parent=full, type="diff"),
              dataclasses.replace(I1, id=newer, parent=incr)):
        write_manifest(fs, dataclasses.replace(m, system_identifier=7))
    d = json.loads(envelope.decode(fs.get(manifest_key(incr)), "test manifest"))
    d["parent"] = parent
    fs.put(manifest_key(incr), envelope.encode(json.dumps(d).encode(), envelope.Codec("zstd", 3)))
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "PITR_CONFIG": "/dev/null", "PITR_REPO": str(fs.root)}
    dest = tmp_path / "restored"
    r = subprocess.run([str(Path(sys.executable).parent / "pitr"), "restore", "-D", str(dest), "--backup", incr,
                        "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert (f"manifest of backup {incr} is unsafe to use: its parent {parent!r} is not the ID of an older backup"
            in r.stderr), r.stderr
    assert "Traceback" not in r.stderr and not dest.exists()
    good, bad = read_manifests(fs)  # the others still read
    assert [m.id for m in good] == [full, newer] and list(bad) == [incr]
