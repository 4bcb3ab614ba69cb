"""Hostile objects that decompress past what they may hold: every reader stops at its cap.

A decompression bomb (16 KiB of zstd expanding to 512 MiB) posing as a WAL segment, a backup
file, a manifest; oversized plain-JSON metadata. wal-fetch (the real executable), prefetch,
restore, verify and manifest reads must refuse them quickly, write nothing in place and keep
memory small.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitr.errors import EXIT_FETCH_HARD, IntegrityError
from pitr.ops.proof.verify import VerifyOptions, verify
from pitr.ops.recovery import restore_files
from pitr.ops.recovery.restore import run_restore
from pitr.ops.wal import prefetch
from pitr.repo.format import META_KEY, manifest_key, wal_key
from pitr.repo.manifest import read_manifest, write_manifest
from pitr.repo.meta import read_meta
from pitr.storage.fs import FsStorage
from tests.support.bomb import bomb
from tests.support.pg import chown_pg, make_tmpdir, rmtree_pg
from tests.support.walgen import SEG, fs_repo

PITR = Path(sys.executable).parent / "pitr"
NAME = "000000010000000000000007"

# Runs a command and prints the peak RSS (KiB) of its process tree's largest member.
_RSS_WRAPPER = ("import resource, subprocess, sys\n"
                "rc = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL).returncode\n"
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
                "sys.exit(rc)\n")


def test_wal_fetch_of_a_bomb_fails_hard_fast_small_and_writes_nothing(tmp_path: Path) -> None:
    repo = fs_repo(tmp_path / "repo")
    repo.put(wal_key(NAME), bomb())
    dest_dir = tmp_path / "pg_wal"
    dest_dir.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8", "PITR_CONFIG": "/dev/null",
           "PITR_FETCH_RETRIES": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, str(PITR), "--repo", str(repo.root),
                           "wal-fetch", NAME, str(dest_dir / "RECOVERYXLOG")],
                          env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    *lines, rss = proc.stderr.splitlines()
    assert proc.returncode == EXIT_FETCH_HARD, proc.stderr
    assert any("more than 16777216 bytes" in line and NAME in line for line in lines), proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(dest_dir.iterdir()) == []  # nothing in place, no temp file left behind
    assert int(rss) < 100 * 1024, f"peak RSS {int(rss) // 1024} MiB"
    assert elapsed < 30, elapsed  # one retry (~1 s back-off), each attempt stops at 16 MiB


def test_prefetch_of_a_bomb_stops_at_a_segment(tmp_path: Path) -> None:
    repo = fs_repo(tmp_path / "repo")
    repo.put(wal_key(NAME), bomb())
    sp = tmp_path / "spool"
    sp.mkdir()
    cfg = prefetch.PrefetchConfig(sp, "fp", 4, 1)
    with pytest.raises(IntegrityError, match=f"more than {SEG} bytes"):
        prefetch.fetch_one(repo, read_meta(repo), cfg, NAME)
    assert list(sp.iterdir()) == []


@pytest.fixture
def work() -> Iterator[Path]:
    path = make_tmpdir("pitr-bomb-")  # reachable by the postgres OS user, as restore requires
    yield path
    rmtree_pg(path)


@pytest.fixture
def backup_repo(work: Path) -> FsStorage:
    from tests.support.synthbackup import fake_repo

    storage = FsStorage(work / "repo")
    fake_repo(storage, {"PG_VERSION": b"15\n", "global/pg_control": b"\x01" * 8192,
                        "base/1/1259": os.urandom(200_000)}, bundle_max=64 << 10)
    return storage


def _plant_bomb(storage: FsStorage, path: str) -> int:
    """Replace the object holding `path` with a bomb; the manifest still says the real size."""
    m = read_manifest(storage, "20260301T120000Z")
    e = next(f for f in m.files if f.path == path)
    b = bomb(e.size)  # the trailer even agrees with the manifest
    assert e.object is not None
    storage.put(f"backups/{m.id}/{e.object}", b)
    e.offset, e.length = 0, len(b)
    write_manifest(storage, m)
    return e.size


def test_restore_refuses_a_file_that_expands_past_its_manifest_size(
        backup_repo: FsStorage, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_restore_files import opts

    monkeypatch.setattr(restore_files, "CHUNK", 128 << 10)
    size = _plant_bomb(backup_repo, "base/1/1259")
    chown_pg(work / "repo", recursive=True)
    dest = work / "data"
    with pytest.raises(IntegrityError, match=f"base/1/1259 would decode to more than {size} bytes"):
        run_restore(backup_repo, opts(dest))
    written = dest / "base/1/1259"
    assert not written.exists() or written.stat().st_size <= size
    assert not (dest / "global/pg_control").exists()


def test_verify_names_bombs_in_wal_and_backup_files(backup_repo: FsStorage) -> None:
    _plant_bomb(backup_repo, "base/1/1259")
    backup_repo.put(wal_key("000000010000000000000003"), bomb())
    res = verify(backup_repo, VerifyOptions(None, jobs=1))
    got = {(p.kind, p.object): p.detail for p in res.problems}
    assert "would decode to more than" in got[("corrupt", wal_key("000000010000000000000003"))]
    assert any("would decode to more than 200000 bytes" in d for (k, key), d in got.items()
               if k == "corrupt" and "/data/" in key)


def test_manifest_bomb_is_refused_with_little_memory(backup_repo: FsStorage) -> None:
    backup_repo.put(manifest_key("20260301T120000Z"), bomb(512 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match="manifest of backup 20260301T120000Z would decode to more than"):
            read_manifest(backup_repo, "20260301T120000Z")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 128 << 20, peak


def test_oversized_metadata_is_refused(tmp_path: Path) -> None:
    repo = fs_repo(tmp_path / "repo")
    (repo.root / META_KEY).write_bytes(b" " * (1 << 20) + (repo.root / META_KEY).read_bytes())
    with pytest.raises(IntegrityError, match="larger than 65536 bytes"):
        read_meta(repo)
