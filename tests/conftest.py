"""Shared fixtures: moto S3 server, PostgreSQL clusters per server version, the `pitr` executable."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pitr.cli.asyncwal import PREFETCH_HELPER, PUSH_HELPER
from pitr.storage.fs import FsStorage
from tests.support.maint import Repo, pg15_cluster, start_repo
from tests.support.pg import MADE_TMPDIRS, PgCluster, make_tmpdir, pg_bin_dirs, rmtree_pg, run_as_postgres
from tests.support.s3 import MotoServer

PG_VERSIONS = [v for v in ("15", "18") if v in pg_bin_dirs()]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pg: needs a real PostgreSQL server")
    config.addinivalue_line("markers", "slow: long end-to-end scenario")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Anything using a PostgreSQL fixture is marked `pg` automatically (-m 'not pg' works)."""
    for item in items:
        if "pg_bindir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.pg)


HELPER_COMMANDS = (PREFETCH_HELPER, PUSH_HELPER)


@pytest.fixture(scope="session", autouse=True)
def _stop_pitr_helpers() -> Iterator[None]:
    """Safety net: pitr's detached helpers exit by themselves once recovery ends or after 30 s idle;
    any still working on a directory this session made (make_tmpdir) when it ends is stopped here."""
    yield
    import signal

    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if any(c in words for c in HELPER_COMMANDS) and any(w.startswith(d) for w in words for d in MADE_TMPDIRS):
            try:
                os.kill(int(pid), signal.SIGTERM)
            except OSError:
                pass


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def moto_env(moto_server: MotoServer) -> Iterator[MotoServer]:
    """The moto server with its endpoint and credentials in os.environ for the module's tests: what the
    in-process S3Storage a test inspects the repository with reads (subprocesses get their env explicitly)."""
    mp = pytest.MonkeyPatch()
    for k, v in moto_server.env().items():
        mp.setenv(k, v)
    yield moto_server
    mp.undo()


@pytest.fixture
def s3_bucket(moto_server: MotoServer) -> Iterator[str]:
    """A fresh bucket per test; a test that left the server in an outage gets it back up after."""
    if not moto_server.up:
        moto_server.recover()
    name = moto_server.create_bucket(f"t-{uuid.uuid4().hex[:16]}")
    yield name
    if not moto_server.up:
        moto_server.recover()


@pytest.fixture(scope="session", params=PG_VERSIONS, ids=lambda v: f"pg{v}")
def pg_version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def pg_bindir(pg_version: str) -> Path:
    return pg_bin_dirs()[pg_version]


@pytest.fixture
def tmp_pg_dir() -> Iterator[Path]:
    """Per-test dir under /tmp owned by postgres; kept when KEEP=1 (path printed)."""
    path = make_tmpdir("pitr-t-")
    yield path
    if os.environ.get("KEEP") == "1":
        print(f"\nkept test dir: {path}")
    else:
        rmtree_pg(path)


ClusterFactory = Callable[..., PgCluster]


@pytest.fixture
def cluster_factory(pg_bindir: Path, tmp_pg_dir: Path) -> Iterator[ClusterFactory]:
    """make(name="pg", bindir=None, port=None) -> PgCluster under tmp_pg_dir/name; all stopped at teardown."""
    made: list[PgCluster] = []

    def make(name: str = "pg", bindir: Path | None = None, port: int | None = None) -> PgCluster:
        cluster = PgCluster(bindir or pg_bindir, tmp_pg_dir / name, port, name=name)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.ensure_stopped()


@pytest.fixture
def fs_repo(tmp_pg_dir: Path, pitr_exe: Path) -> Iterator[Repo]:
    """A PostgreSQL 15 cluster archiving into a directory repository (support/maint.py), stopped after the test."""
    cluster = pg15_cluster(tmp_pg_dir)
    root = tmp_pg_dir / "repo"
    try:
        yield start_repo(cluster, FsStorage(root), {"PITR_REPO": f"file://{root}"}, pitr_exe, root)
    finally:
        cluster.ensure_stopped()


@pytest.fixture(scope="session")
def pitr_exe() -> Path:
    """The installed `pitr` console script, which PostgreSQL (as postgres) must be able to run."""
    exe = Path(sys.executable).parent / "pitr"
    if not exe.is_file():
        pytest.fail(f"{exe} not found: install the package into the venv (pip install -e '.[test]')")
    if run_as_postgres(["test", "-x", exe], check=False).returncode != 0:
        pytest.fail(f"{exe} is not executable by the postgres user (check dir permissions)")
    return exe
