"""wal-fetch with fetch_retry_forever (a standby waiting out outages) and a repository that vanished:
it must never answer "not in the archive" (exit 1), which makes PostgreSQL promote early. It stops
recovery (exit 128) at once, saying why, or keeps waiting; it never writes the file."""

from __future__ import annotations

import subprocess
import threading

import pytest

from pitr.errors import EXIT_FETCH_HARD, RepoMissingError
from pitr.ops.wal import archive
from pitr.storage.base import Storage
from pitr.storage.fs import FsStorage
from pitr.storage.s3 import S3Storage
from tests.support import walgen
from tests.test_wal_fetch_safety import PITR, Site, make_site  # noqa: F401 - make_site is a fixture used here

WAIT = 20.0  # a fetch still running by then is waiting, which is safe too


@pytest.mark.parametrize(("kind", "how"), [("fs", "unmounted"), ("fs", "moved"), ("s3", "wiped")])
def test_a_vanished_repository_never_ends_recovery_even_retrying_forever(make_site, kind: str,  # type: ignore[no-untyped-def]  # noqa: F811
                                                                         how: str) -> None:
    site: Site = make_site(kind)
    assert site.fetch(site.names[0], PITR_FETCH_RETRY_FOREVER="true").returncode == 0
    site.vanish(how)
    after = walgen.names(5 + len(site.names), 1)[0]  # what PostgreSQL asks for once replay passes the archive
    site.dest.unlink()
    try:
        r = subprocess.run([PITR, "wal-fetch", after, "pg_wal/RECOVERYXLOG"], cwd=site.pgdata, capture_output=True,
                           env=site.env | {"PITR_FETCH_RETRY_FOREVER": "true"}, text=True, timeout=WAIT)
    except subprocess.TimeoutExpired:
        pass  # still waiting for the repository to come back: PostgreSQL waits with it
    else:
        assert r.returncode == EXIT_FETCH_HARD, (r.returncode, r.stderr)
        assert "pitr: error: " in r.stderr and "Traceback" not in r.stderr
    assert not site.dest.exists()


@pytest.mark.parametrize(("kind", "how"), [("fs", "unmounted"), ("s3", "wiped")])
def test_retrying_forever_checks_the_repository_at_the_miss(make_site, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]  # noqa: F811
                                                            kind: str, how: str) -> None:
    """In one process (metadata read while the repository was there, as the prefetcher holds it): the
    miss after it vanished is RepoMissingError (not "not archived"), or the fetch keeps waiting."""
    site: Site = make_site(kind)
    for k, v in site.env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    storage: Storage = (FsStorage(site.base / "repo") if kind == "fs"
                        else S3Storage(site.bucket, "db", endpoint=site.moto.endpoint))  # type: ignore[union-attr]
    loader = archive.MetaLoader(storage)
    loader()
    site.vanish(how)
    after = walgen.names(20, 1)[0]
    caught: list[BaseException] = []

    def fetch() -> None:
        try:
            archive.fetch_with_retries(storage, loader, after, site.dest, 0, True)
        except BaseException as e:  # noqa: BLE001 - the outcome under test
            caught.append(e)

    t = threading.Thread(target=fetch, daemon=True)  # daemon: a fetch that waits must not hold the test run
    t.start()
    t.join(WAIT)
    assert t.is_alive() or [type(e) for e in caught] == [RepoMissingError], caught  # waiting is safe too
    assert not site.dest.exists()
