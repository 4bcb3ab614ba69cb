"""pitr expire with diff/incr backups: the pure plan never expires a backup a retained one depends
on (its chain, and any backup its entries take bytes from), --retain-full keeps the dependants of
the kept full backups, and --dry-run says who needs what."""

from __future__ import annotations

from pathlib import Path

import pytest

from pitr.errors import StorageError
from pitr.ops.admin.retention import Policy, apply, gather_and_plan
from pitr.repo.format import backup_data_key, manifest_key
from pitr.repo.manifest import FileEntry, list_backup_ids
from tests.support.maint import fs_repo, pitr_cli
from tests.test_expire import NOW, Recording, Repo0, days_ago, decisions, deleted_wal, manifest, seg

# real backup IDs: manifests are read back through the validating reader (a parent is an older ID)
B1, B2, B3, B4, B5, B6 = (f"20240601T00000{n}F" for n in range(1, 7))


def entry(path: str, home: str, ref: str | None = None, source: str | None = None) -> FileEntry:
    """A file of backup `home`: byte-identical to backup `ref`'s, or its blocks partly in backup `source`."""
    loc = {"object": "data/000000", "offset": 0, "length": 10}
    e = FileEntry(path, 8192 * 8, "ab" * 32, 0o600, 0.0, "data/000000", 0, 10, ref=ref, map=dict(loc))
    if source is not None:
        e.sources = [{"backup": home, **loc, "kind": "blocks"}, {"backup": source, **loc, "kind": "file"}]
    return e


def reasons(p) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {b.id: b.reason for b in p.backups}


def two_chains() -> Repo0:
    """B1 full, B2 diff on B1, B3 full, B4 incr on B3, B5 incr on B4; WAL 1..16."""
    r = Repo0().wal(1, 1, 16)
    r.backup(manifest(B1, 1, 2, 2, days_ago(9))).backup(manifest(B2, 1, 4, 4, days_ago(8), "diff", B1))
    r.backup(manifest(B3, 1, 6, 6, days_ago(7))).backup(manifest(B4, 1, 8, 8, days_ago(6), "incr", B3))
    r.backup(manifest(B5, 1, 10, 10, days_ago(5), "incr", B4))
    return r


def test_retain_full_keeps_the_kept_fulls_dependants() -> None:
    r = two_chains()
    p = r.plan(Policy(retain_full=1))
    assert decisions(p) == {B1: "expire", B2: "expire", B3: "keep", B4: "keep", B5: "keep"}
    assert reasons(p)[B4] == f"builds on kept full backup {B3}"
    assert min(deleted_wal(p) ^ r.wal_names()) == seg(1, 6)  # WAL from the oldest retained start on

    p = r.plan(Policy(retain_full=2))  # B2 depends on B1, which is kept: it stays too
    assert set(decisions(p).values()) == {"keep"}
    assert reasons(p)[B2] == f"builds on kept full backup {B1}"


def test_retain_days_keeps_what_every_retained_backup_depends_on() -> None:
    r = two_chains()
    p = r.plan(Policy(retain_days=5.5))  # B5 in the window, B4 the anchor before it
    assert decisions(p) == {B1: "expire", B2: "expire", B3: "keep", B4: "keep", B5: "keep"}
    assert reasons(p)[B3] == f"needed by kept backups {B4}, {B5}"
    p = r.plan(Policy(retain_days=0.5))  # only the newest: still its whole chain
    assert decisions(p) == {B1: "expire", B2: "expire", B3: "keep", B4: "keep", B5: "keep"}


def test_a_backup_an_entry_takes_bytes_from_stays() -> None:
    """Even outside the parent chain (a broken manifest): expire must not make it worse."""
    r = two_chains()
    stray = manifest(B6, 1, 12, 12, days_ago(1), "incr", B5)
    stray.files = [entry("base/1/1", B6, ref=B2), entry("base/1/2", B6, source=B1)]
    r.backup(stray)
    p = r.plan(Policy(retain_full=1))
    assert decisions(p) == {b: "keep" for b in (B1, B2, B3, B4, B5, B6)}
    assert reasons(p)[B2] == f"needed by kept backup {B6}"
    assert reasons(p)[B1] == f"needed by kept backup {B6}"


def test_dry_run_says_who_needs_a_backup(tmp_path: Path) -> None:
    fs = fs_repo(tmp_path / "repo", [manifest(B1, 1, 2, 2, days_ago(9)), manifest(B2, 1, 4, 4, days_ago(8), "incr", B1),
                                     manifest(B3, 1, 6, 6, days_ago(1), "incr", B2)], 12)
    r = pitr_cli(fs, "expire", "--retain-days", "2", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"keep    {B1}  full" in r.stdout and f"needed by kept backup {B3}" in r.stdout
    assert f"keep    {B2}  incr" in r.stdout and f"needed by kept backup {B3}" in r.stdout
    assert "dry run: nothing was deleted" in r.stdout


def test_an_expired_chain_goes_from_its_newest_member() -> None:
    """Interrupted after the first manifest, no listed backup has lost a backup it builds on."""
    r = two_chains()
    rec = Recording(r.s, fail_on_data=True)
    with pytest.raises(StorageError):
        apply(rec, gather_and_plan(rec, Policy(retain_full=1), NOW))
    assert rec.calls == [manifest_key(B2)]  # the diff before the full it builds on
    assert list_backup_ids(rec) == [B1, B3, B4, B5]
    ok = Recording(r.s)
    apply(ok, gather_and_plan(ok, Policy(retain_full=1), NOW))
    assert ok.calls.index(manifest_key(B2)) < ok.calls.index(manifest_key(B1))
    assert ok.calls.index(backup_data_key(B2, 0)) < ok.calls.index(manifest_key(B1))
