"""Hostile or damaged repository content never leads a restore to do harm (issue 11, defects 1, 5, 6, 9).

A made-up backup in a real directory repository (tests/support/synthbackup.fake_repo), whose
manifest is then rewritten the way an attacker with write access to the repository could: paths
leaving the data directory, duplicate entries, bad tablespaces, unknown fields, garbage. Checked
as a user would: the exit status, the message, and that nothing outside the data directory (or
inside it, for a refusal) changed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pitr.errors import IntegrityError, RestoreError
from pitr.ops.recovery import restore_dest
from pitr.ops.recovery.restore import MARKER, RestoreOptions, run_restore
from pitr.ops.recovery.restore_dest import Layout, prepare_tree
from pitr.ops.recovery.restore_plan import Target
from pitr.repo import envelope
from pitr.repo.format import META_KEY, manifest_key
from pitr.repo.manifest import read_manifest
from pitr.repo.meta import new_meta
from pitr.storage.fs import FsStorage
from tests.support.pg import IS_ROOT, chown_pg, make_tmpdir, pg_env, rmtree_pg, run_as_postgres
from tests.support.synthbackup import fake_repo

BID = "20260301T120000Z"
FILES = {
    "PG_VERSION": b"15\n",
    "global/pg_control": b"\x01" * 8192,
    "base/1/1259": os.urandom(9000),
    "postgresql.conf": b"port = 5432\n",
}
TS_FILE = "pg_tblspc/16400/PG_15_202209061/5/16401"

Manifest = dict[str, Any]


@pytest.fixture
def work() -> Iterator[Path]:
    path = make_tmpdir("pitr-hm-")
    yield path
    rmtree_pg(path)


@pytest.fixture
def repo(work: Path) -> FsStorage:
    storage = FsStorage(work / "repo")
    fake_repo(storage, FILES | {TS_FILE: os.urandom(5000)}, tablespaces={"16400": str(work / "orig-ts")})
    chown_pg(work / "repo", recursive=True)
    return storage


def rewrite(storage: FsStorage, change: Callable[[Manifest], None], backup_id: str = BID) -> None:
    key = manifest_key(backup_id)
    d = json.loads(envelope.decode(storage.get(key), "test manifest"))
    change(d)
    storage.put(key, envelope.encode(json.dumps(d).encode(), envelope.Codec("zstd", 3)))
    chown_pg(storage.root, recursive=True)


def opts(dest: Path, **kw: Any) -> RestoreOptions:
    base: dict[str, Any] = {"pgdata": dest, "target": Target("latest"), "pitr_argv": ["/opt/pitr/bin/pitr"],
                            "repo_url": "/srv/repo"}
    return RestoreOptions(**(base | kw))


def pitr(exe: Path, work: Path, *args: str | Path, as_root: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [str(exe), "--repo", str(work / "repo"), *map(str, args)]
    if as_root:
        return subprocess.run(argv, env=pg_env({}), capture_output=True, text=True, timeout=120, cwd="/tmp",
                              stdin=subprocess.DEVNULL)
    return run_as_postgres(argv, check=False, cwd="/tmp")


def fingerprint(path: Path) -> list[tuple[str, int, int, int, bytes]]:
    out = []
    for p in [path, *sorted(path.rglob("*"))] if path.exists() else []:
        st = p.lstat()
        out.append((str(p), st.st_mode, st.st_uid, st.st_gid, p.read_bytes() if stat.S_ISREG(st.st_mode) else b""))
    return out


def _file(path: str) -> Callable[[Manifest], None]:
    def change(d: Manifest) -> None:
        d["files"][0]["path"] = path
    return change


def _dir(path: str) -> Callable[[Manifest], None]:
    return lambda d: d["directories"].append({"path": path, "mode": 0o777})


def _ts(oid: str, location: str) -> Callable[[Manifest], None]:
    def change(d: Manifest) -> None:
        d["tablespaces"][0]["oid"], d["tablespaces"][0]["location"] = oid, location
    return change


HOSTILE: dict[str, tuple[Callable[[Manifest], None], str]] = {
    "absolute dir": (_dir("/etc"), "'/etc' is absolute"),
    "dir with ..": (_dir("../escape"), "'../escape' contains '..'"),
    "file with ..": (_file("../x"), "'../x' contains '..'"),
    "deep file with ..": (_file("base/1/../../../x"), "contains '..'"),
    "absolute file": (_file("/tmp/x"), "'/tmp/x' is absolute"),
    "empty file path": (_file(""), "'' is empty"),
    "double slash": (_file("base//1259"), "not in normal form"),
    "dot component": (_file("./PG_VERSION"), "not in normal form"),
    "trailing slash": (_dir("base/1/"), "not in normal form"),
    "NUL byte": (_file("base/1/12\x0059"), "NUL"),
    "not a string": (_file(5), "is not a string"),  # type: ignore[arg-type]
    "duplicate file": (lambda d: d["files"].append(dict(d["files"][1])), "is listed twice"),
    "file under unknown tablespace": (_file("pg_tblspc/999/PG_15_202209061/5/1"), "names no tablespace"),
    "file loose in a location": (_file("pg_tblspc/16400/operator-notes.txt"), "PG_<version>_<catalog>"),
    "tablespace oid ..": (_ts("..", "/srv/ts"), "OID '..'"),
    "tablespace oid not digits": (_ts("16400/../..", "/srv/ts"), "not a (unique) decimal number"),
    "relative location": (_ts("16400", "srv/ts"), "is not absolute"),
    "root location": (_ts("16400", "/"), "is the root directory"),
    "location with ..": (_ts("16400", "/srv/../etc"), "not in normal form"),
    "tablespace_map with another oid": (lambda d: d.update(tablespace_map=d["tablespace_map"] + "16500 /etc\n"),
                                        "names tablespace 16500"),
    "another backup's id": (lambda d: d.update(id="../../x"), "names itself '../../x'"),
    "object outside": (lambda d: d["files"][1].update(object="../../../pitr.json"), "not a relative key"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_unsafe_manifest_is_refused_when_read(repo: FsStorage, case: str) -> None:
    change, why = HOSTILE[case]
    rewrite(repo, change)
    with pytest.raises(IntegrityError) as e:
        read_manifest(repo, BID)
    assert f"manifest of backup {BID} is unsafe to use" in str(e.value) and why in str(e.value)


@pytest.mark.skipif(not IS_ROOT, reason="the harm (chown of an outside directory to postgres) needs root")
def test_restore_as_root_writes_nothing_outside(repo: FsStorage, work: Path, pitr_exe: Path) -> None:
    """The reported attack: a manifest entry naming a directory outside DIR, restored as root,
    handed it to postgres. Now verify, --dry-run and the restore itself refuse; nothing changes."""
    outside = work / "outside"
    outside.mkdir(mode=0o755)
    (outside / "config").write_text("root's\n")
    os.chown(outside, 0, 0)
    os.chown(outside / "config", 0, 0)
    dest = work / "pg" / "data"
    (work / "pg").mkdir()
    chown_pg(work / "pg")

    def hostile(d: Manifest) -> None:
        d["directories"] += [{"path": str(outside), "mode": 0o777}, {"path": "../escape", "mode": 0o777}]
        d["files"].append(dict(d["files"][1], path="../x"))

    rewrite(repo, hostile)
    before = fingerprint(work / "outside")
    v = pitr(pitr_exe, work, "verify")
    assert v.returncode == 1 and f"manifest: {manifest_key(BID)}:" in v.stdout and str(outside) in v.stdout, v
    for args in (["--dry-run"], [], ["--backup", BID], ["--delta"]):
        p = pitr(pitr_exe, work, "restore", "-D", dest, *args)
        assert p.returncode != 0 and "Traceback" not in p.stderr and "internal error" not in p.stderr, p
        assert BID in p.stderr, p.stderr
        assert fingerprint(work / "outside") == before
        assert not (work / "pg" / "escape").exists() and not (work / "pg" / "x").exists()
        assert not dest.exists()


def test_links_inside_the_data_directory_are_replaced_not_followed(repo: FsStorage, work: Path) -> None:
    """A link planted in DIR (base -> elsewhere) is replaced by a directory, whether a --delta
    restore's cleaning or the tree preparation meets it first; the link's target is untouched."""
    dest = work / "data"
    run_restore(repo, opts(dest, tablespace_map={"16400": work / "ts"}))
    elsewhere = work / "elsewhere"
    (elsewhere / "1").mkdir(parents=True)
    (elsewhere / "1" / "1259").write_bytes(b"not yours")
    before = fingerprint(elsewhere)
    m = read_manifest(repo, BID)
    layout = Layout(dest, {"16400": work / "ts"})
    restore_dest.remove_path(dest / "base")
    (dest / "base").symlink_to(elsewhere)
    prepare_tree(m, layout, None, 0o700)  # the write step alone: no link may be followed
    assert not (dest / "base").is_symlink() and (dest / "base" / "1").is_dir()
    assert fingerprint(elsewhere) == before
    restore_dest.remove_path(dest / "base")
    (dest / "base").symlink_to(elsewhere)
    (work / "ts" / "PG_15_202209061" / "5").rename(work / "moved")
    (work / "ts" / "PG_15_202209061" / "5").symlink_to(elsewhere)
    run_restore(repo, opts(dest, delta=True, tablespace_map={"16400": work / "ts"}))
    assert fingerprint(elsewhere) == before
    assert (dest / "base" / "1" / "1259").read_bytes() == FILES["base/1/1259"]
    assert not (work / "ts" / "PG_15_202209061" / "5").is_symlink()
    assert (work / "ts" / TS_FILE.split("/", 2)[2]).read_bytes() == (work / "moved" / "16401").read_bytes()


def test_tablespace_location_inside_the_data_directory_is_refused(repo: FsStorage, work: Path) -> None:
    dest = work / "data"
    for loc in (dest, dest / "ts", work):
        with pytest.raises(RestoreError, match="data directory"):
            run_restore(repo, opts(dest, tablespace_map={"16400": loc}))
        assert not (dest / MARKER).exists()


# --------------------------------------------------------------------------- unknown fields (defect 6)

def test_unknown_fields_are_ignored_at_every_level(repo: FsStorage, work: Path) -> None:
    def newer(d: Manifest) -> None:
        d["compression_dictionary"] = {"id": 7}
        d["files"][0]["block_hashes"] = ["ab"]
        d["directories"][0]["xattrs"] = {}
        d["tablespaces"][0]["name"] = "fast"

    rewrite(repo, newer)
    run_restore(repo, opts(work / "data", tablespace_map={"16400": work / "ts"}))
    assert (work / "data" / "base/1/1259").read_bytes() == FILES["base/1/1259"]

    rewrite(repo, lambda d: d["files"][0].pop("sha256"))
    with pytest.raises(IntegrityError, match=f"manifest of backup {BID} is malformed.*sha256"):
        read_manifest(repo, BID)


def _set_digest(field: str, value: object, fmt: int | None = None) -> Callable[[Manifest], None]:
    def change(d: Manifest) -> None:
        f = next(x for x in d["files"] if x["size"])
        f[field] = value
        if fmt is not None:
            d["format"] = fmt
    return change


@pytest.mark.parametrize(("change", "why"), [
    (_set_digest("blake3", "AB" * 32), "has a blake3 digest that is not 64 lower-case hex digits"),
    (_set_digest("blake3", "ab" * 31), "has a blake3 digest that is not 64 lower-case hex digits"),
    (_set_digest("blake3", 7), "has a blake3 digest that is not 64 lower-case hex digits"),
    (_set_digest("sha256", "xyz"), "has a sha256 digest that is not 64 lower-case hex digits"),
    (_set_digest("sha256", "ab" * 32), "has both a sha256 and a blake3 digest"),
    (_set_digest("blake3", "ab" * 32, 4), "has a blake3 digest in a manifest of format 4"),
], ids=["upper-case", "short", "not-a-string", "sha256-not-hex", "both", "format-4"])
def test_a_malformed_file_digest_is_refused(repo: FsStorage, work: Path, change: Callable[[Manifest], None],
                                            why: str) -> None:
    """Digests are validated like map.sha256, before anything is written; blake3 needs format 5 (an
    older pitr, reading up to 4, must refuse such a manifest rather than see no digest)."""
    rewrite(repo, change)
    with pytest.raises(IntegrityError, match=f"manifest of backup {BID} is unsafe to use: file entry .*{why}"):
        read_manifest(repo, BID)
    with pytest.raises(RestoreError, match="no complete backup"):  # the only backup is unusable
        run_restore(repo, opts(work / "data"))
    assert not (work / "data").exists()


# --------------------------------------------------------------------------- unreadable manifests (defect 5)

def test_one_unreadable_manifest_does_not_block_the_others(work: Path, pitr_exe: Path) -> None:
    storage = FsStorage(work / "repo")
    fake_repo(storage, FILES, backup_id="20260301T110000Z")
    fake_repo(storage, FILES, backup_id=BID)
    storage.put(manifest_key(BID), b"PITR garbage, not an envelope")
    chown_pg(work / "repo", recursive=True)
    dest = work / "data"
    p = pitr(pitr_exe, work, "restore", "-D", dest, "--dry-run", as_root=False)
    assert p.returncode == 0, p.stderr
    assert f"skipping backup {BID}" in p.stderr and "20260301T110000Z" in p.stdout
    p = pitr(pitr_exe, work, "restore", "-D", dest, "--dry-run", "--backup", "20260301T110000Z", as_root=False)
    assert p.returncode == 0, p.stderr
    p = pitr(pitr_exe, work, "restore", "-D", dest, "--dry-run", "--backup", BID, as_root=False)
    assert p.returncode == 1 and f"manifest of backup {BID}" in p.stderr and "does not exist" not in p.stderr
    v = pitr(pitr_exe, work, "verify", as_root=False)
    assert v.returncode == 1 and f"manifest: {manifest_key(BID)}:" in v.stdout
    i = pitr(pitr_exe, work, "info", as_root=False)
    assert "Traceback" not in i.stderr and BID in i.stdout + i.stderr and "20260301T110000Z" in i.stdout
    assert not dest.exists()


# --------------------------------------------------------------------------- durability (defect 9, restore side)

class _FailingLibc:
    """libc whose syncfs fails with EIO (the kernel lost written-back pages)."""

    def __init__(self, *_a: object, **_k: object) -> None:
        pass

    def syncfs(self, _fd: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1


def test_a_failed_syncfs_fails_the_restore_before_pg_control(repo: FsStorage, work: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes, "CDLL", _FailingLibc)
    dest = work / "data"
    with pytest.raises(RestoreError, match="not durable"):
        run_restore(repo, opts(dest, tablespace_map={"16400": work / "ts"}))
    assert (dest / MARKER).exists() and not (dest / "global/pg_control").exists()


def test_a_failed_directory_fsync_fails_the_restore(repo: FsStorage, work: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    dest = work / "data"
    with pytest.raises(RestoreError, match="Input/output error"):
        run_restore(repo, opts(dest, tablespace_map={"16400": work / "ts"}))
    assert not (dest / "global/pg_control").exists()


def test_a_full_disk_is_a_restore_error_not_an_internal_one(repo: FsStorage, work: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def write(_fd: int, _data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    dest = work / "data"
    with pytest.raises(RestoreError, match="No space left on device") as e:
        run_restore(repo, opts(dest, tablespace_map={"16400": work / "ts"}))
    assert "--delta" in (e.value.hint or "")
    assert not (dest / "global/pg_control").exists()


# --------------------------------------------------------------------------- environment errors

@pytest.mark.skipif(not IS_ROOT, reason="needs a directory postgres cannot enter")
def test_data_directory_under_an_unreadable_parent(repo: FsStorage, work: Path, pitr_exe: Path) -> None:
    locked = work / "locked"
    locked.mkdir(mode=0o700)
    os.chown(locked, 0, 0)
    p = pitr(pitr_exe, work, "restore", "-D", locked / "data", "--tablespace-map", f"16400={work / 'ts'}",
             as_root=False)
    assert p.returncode != 0 and "internal error" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert str(locked) in p.stderr and "permission denied" in p.stderr, p.stderr


def test_verify_of_an_empty_repository_says_so(work: Path, pitr_exe: Path) -> None:
    storage = FsStorage(work / "repo")
    storage.create()
    storage.put(META_KEY, new_meta(7000000000000000001, 15, 16 << 20).to_json())
    chown_pg(work / "repo", recursive=True)
    p = pitr(pitr_exe, work, "verify", as_root=False)
    assert p.returncode == 1 and "no backup and no archived WAL" in p.stdout, p
