"""Directory repositories: nothing is acknowledged that is not durable, and an fsync that fails fails the command.

Faults are injected by making os.fsync fail for one path (EIO, as a dying disk reports it).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pitr.errors import AlreadyExistsError, StorageError
from pitr.ops.wal import archive
from pitr.repo.envelope import Codec
from pitr.repo.format import wal_key
from pitr.repo.meta import read_meta
from pitr.storage.fs import FsStorage
from tests.support.walgen import fs_repo, segment

NAME = "000000010000000000000007"


def fail_fsync_of(monkeypatch: pytest.MonkeyPatch, doomed: Callable[[Path], bool]) -> list[Path]:
    """os.fsync raises EIO for descriptors whose path `doomed` picks; returns every path synced."""
    real = os.fsync
    seen: list[Path] = []

    def fsync(fd: int) -> None:
        p = Path(os.readlink(f"/proc/self/fd/{fd}"))
        seen.append(p)
        if doomed(p):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.fixture
def wal_file(tmp_path: Path) -> Path:
    d = tmp_path / "pg_wal"
    d.mkdir()
    p = d / NAME
    p.write_bytes(segment(NAME))
    return p


def test_identical_repush_syncs_the_existing_entry(tmp_path: Path, wal_file: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A first push may have died after linking the object but before syncing its directory: the
    re-push that PostgreSQL retries must not report success until that entry is durable."""
    repo = fs_repo(tmp_path / "repo")
    meta = read_meta(repo)
    assert archive.push(repo, meta, wal_file, Codec()).status == "stored"
    stored_dir = (repo.root / wal_key(NAME)).parent
    seen = fail_fsync_of(monkeypatch, lambda p: p == stored_dir)
    with pytest.raises(StorageError, match="Input/output error"):
        archive.push(FsStorage(repo.root), meta, wal_file, Codec())
    assert stored_dir in seen
    monkeypatch.undo()
    assert archive.push(FsStorage(repo.root), meta, wal_file, Codec()).status == "already-archived"


def test_existing_object_is_synced_before_already_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    FsStorage(root).put("a/b/obj", b"x", if_absent=True)
    seen = fail_fsync_of(monkeypatch, lambda p: False)
    with pytest.raises(AlreadyExistsError):
        FsStorage(root).put("a/b/obj", b"x", if_absent=True)
    assert root / "a/b/obj" in seen and root / "a/b" in seen


def test_existing_directory_entry_is_synced_in_its_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crashed writer made wal/<dir> but never synced wal/: the next put must sync it, and fail if it cannot."""
    root = tmp_path / "repo"
    (root / "wal/0000000100000000").mkdir(parents=True)
    seen = fail_fsync_of(monkeypatch, lambda p: p == root / "wal")
    with pytest.raises(StorageError, match="Input/output error"):
        FsStorage(root).put("wal/0000000100000000/x", b"data", if_absent=True)
    assert root / "wal" in seen
    monkeypatch.undo()
    seen = fail_fsync_of(monkeypatch, lambda p: False)
    st = FsStorage(root)
    st.put("wal/0000000100000000/y", b"data")
    assert {root, root / "wal", root / "wal/0000000100000000"} <= set(seen)
    seen.clear()
    st.put("wal/0000000100000000/z", b"data")  # the same process does not sync the parents twice
    assert root / "wal" not in seen and root / "wal/0000000100000000" in seen


def test_fsync_failure_of_new_object_fails_put_and_leaves_nothing(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    fail_fsync_of(monkeypatch, lambda p: p.name.startswith(".tmp."))
    with pytest.raises(StorageError, match="Input/output error"):
        FsStorage(root).put("k/obj", b"data", if_absent=True)
    assert not (root / "k/obj").exists() and list((root / "k").iterdir()) == []


def test_create_syncs_new_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = fail_fsync_of(monkeypatch, lambda p: False)
    FsStorage(tmp_path / "x/y/repo").create()
    assert {tmp_path, tmp_path / "x", tmp_path / "x/y"} <= set(seen)
