"""From S3 the prefetcher fetches the whole window at once (prefetch_jobs), not `jobs` segments at a time.

Fetching WAL from S3 is waiting on the network: with `jobs` (2) workers the stage helper of a
restore fell behind replay (docs/performance.md, "Replay through the stage"). What a user checks:
with prefetch 8 and the default settings, eight segments are on their way at once over a slow
store, each lands verified in the spool; a directory repository keeps `jobs` (CPU-bound there);
prefetch_jobs caps it; a bad value is refused by name.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from pitr.config import load_settings
from pitr.errors import ConfigError
from pitr.ops.wal import archive, prefetch, spool
from pitr.repo.envelope import Codec
from pitr.repo.meta import read_meta
from pitr.storage.fs import FsStorage
from tests.support import walgen

LATENCY = 0.3  # seconds before a GET answers: a store far away (the fault injected)


class SlowStore(FsStorage):
    """A directory repository whose GETs wait first, counting how many wait at the same time."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._lock = threading.Lock()
        self.now = self.peak = 0

    def open(self, key: str) -> BinaryIO:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(LATENCY)
            return super().open(key)
        finally:
            with self._lock:
                self.now -= 1


def _prefetch_all(tmp_path: Path, env: dict[str, str], remote: bool) -> tuple[SlowStore, list[str], Path]:
    repo = walgen.fs_repo(tmp_path / "repo")
    meta = read_meta(repo)
    src = tmp_path / "src"
    src.mkdir()
    names = walgen.names(5, 9)
    for n in names:
        (src / n).write_bytes(walgen.segment(n))
        archive.push(repo, meta, src / n, Codec("zstd", 1))
    settings = load_settings({}, env={"PITR_REPO": str(tmp_path / "repo"), **env})
    store = SlowStore(tmp_path / "repo")
    sp = tmp_path / "spool"
    sp.mkdir()
    spool.write_want(sp, names[0], served=True)  # PostgreSQL took names[0]: the window is the 8 after it
    cfg = prefetch.PrefetchConfig(sp, "fp", settings.prefetch,
                                  prefetch.fetch_workers(settings.prefetch, settings.prefetch_jobs, settings.jobs,
                                                         remote), idle_exit=10)

    def keep_going() -> str | None:
        return "all there" if all((sp / f"{n}.meta").exists() for n in names[1:]) else None

    t0 = time.monotonic()
    reason, fetched = prefetch.serve(store, meta, cfg, keep_going)
    assert reason == "all there", reason
    assert time.monotonic() - t0 < 30
    for n in names[1:]:  # every one in place, as archived, and described for the foreground's check
        assert (sp / n).read_bytes() == (src / n).read_bytes()
        assert spool.read_marker(sp / f"{n}.meta") is not None
    return store, names, sp


def test_the_whole_window_is_fetched_at_once_from_s3_with_default_jobs(tmp_path: Path) -> None:
    # the slow store stands for S3 (remote); jobs stays at its default, 2
    store, _, _ = _prefetch_all(tmp_path, {"PITR_PREFETCH": "8"}, remote=True)
    assert store.peak == 8, f"{store.peak} segments fetched at once, not the window's 8"


def test_a_directory_repository_fetches_jobs_at_once(tmp_path: Path) -> None:
    store, _, _ = _prefetch_all(tmp_path, {"PITR_PREFETCH": "8"}, remote=False)  # CPU-bound: jobs (2)
    assert store.peak == 2, store.peak


def test_prefetch_jobs_caps_the_fetches_at_once(tmp_path: Path) -> None:
    store, _, _ = _prefetch_all(tmp_path, {"PITR_PREFETCH": "8", "PITR_PREFETCH_JOBS": "3"}, remote=True)
    assert store.peak == 3, store.peak


def test_prefetch_jobs_out_of_range_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"prefetch_jobs must be between 0 and 64, not 65 "
                                          r"\(set by environment variable PITR_PREFETCH_JOBS\)"):
        load_settings({}, env={"PITR_REPO": str(tmp_path), "PITR_PREFETCH_JOBS": "65"})
