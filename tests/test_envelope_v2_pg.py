"""Envelope version 2 on real PostgreSQL: a repository an older pitr filled (version-1 envelopes,
`sha256` entries, format 4) keeps working under this pitr, and what this pitr adds on top is v2.

    pgbench -s 1 -> pitr backup (full F) -> F and the WAL so far rewritten as an older pitr wrote
    them -> changes -> pitr backup --type incr (I, on F) -> more changes -> archive

I mixes both (its changed files in v2 with `blake3`, unchanged ones referenced from F with
`sha256`, relation blocks assembled from F's v1 envelopes); `pitr verify` passes, I restores with
replay to the final state, and a tampered `blake3` entry makes both verify and restore fail.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pitr.repo.format import BLAKE3_MANIFEST_FORMAT, MAP2_MANIFEST_FORMAT, manifest_key
from pitr.repo.manifest import read_manifest, write_manifest
from pitr.storage.fs import FsStorage
from tests.support.legacy import downgrade_backup, downgrade_wal
from tests.support.maint import start_source
from tests.support.pg import PgCluster, chown_pg, make_tmpdir, rmtree_pg, run_as_postgres

pytestmark = pytest.mark.pg
TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")


def test_a_mixed_v1_v2_chain_backs_up_verifies_and_restores(pg_version: str, request: pytest.FixtureRequest,
                                                          pitr_exe: Path) -> None:
    if pg_version != "15":
        pytest.skip("checked on PostgreSQL 15 only (envelopes do not depend on the server version)")
    bindir: Path = request.getfixturevalue("pg_bindir")
    base = make_tmpdir("pitr-env2-")
    repo = base / "repo"
    env = {"PITR_REPO": f"file://{repo}"}
    storage = FsStorage(repo)
    src = start_source(PgCluster(bindir, base / "src", name="src-env2"), env, pitr_exe)

    def pitr(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
        p = run_as_postgres([str(pitr_exe), *map(str, args)], env=src.env() | env, cwd="/tmp", check=False,
                            timeout=300)
        assert not ok or p.returncode == 0, f"pitr {args} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    try:
        src.pgbench(["-i", "-s", "1", "-q"])
        src.sql("checkpoint")
        full = json.loads(pitr("backup", "--type", "full", "--json", "--pgdata", src.data).stdout)["id"]
        src.wait_archived(src.switch_wal())
        # what an older pitr had written: the full backup and the WAL so far in version-1 envelopes
        downgrade_backup(storage, full)
        assert downgrade_wal(storage)
        chown_pg(repo, recursive=True)
        mf = read_manifest(storage, full)
        assert mf.format == MAP2_MANIFEST_FORMAT and all(not e.blake3 for e in mf.files)
        assert storage.get_range(manifest_key(full), 0, 5) == b"PITR\x01"

        src.sql("update pgbench_accounts set abalance = abalance + 7 where aid between 5001 and 6000")
        src.sql("create table fresh as select g as id, md5(g::text) as h from generate_series(1, 5000) g")
        incr = json.loads(pitr("backup", "--type", "incr", "--json", "--pgdata", src.data).stdout)["id"]
        src.sql("update pgbench_tellers set tbalance = tbalance + 1")
        final = {t: src.table_md5(t) for t in (*TABLES, "fresh")}
        src.wait_archived(src.switch_wal())

        mi = read_manifest(storage, incr)
        assert mi.format == BLAKE3_MANIFEST_FORMAT and mi.parent == full
        assert any(e.blake3 for e in mi.files), "the incr stores what changed in version 2"
        assert any(e.ref == full and e.sha256 for e in mi.files), "and references F's version-1 entries"
        assert any(e.sources and any(s["backup"] == full for s in e.sources) for e in mi.files), \
            "and assembles relation blocks from F's version-1 envelopes"

        r = pitr("verify", "--json")
        assert json.loads(r.stdout)["problems"] == [], r.stdout

        dest = PgCluster(src.bindir, base / "copy", name="copy-env2")
        out = json.loads(pitr("restore", "--pgdata", dest.data, "--json", "--replay", "--replay-timeout", "240",
                              "--archive-mode", "off", "--backup", incr).stdout)
        assert out["replay"]["reached"], out
        dest.append_conf()
        dest.start(env={})
        try:
            assert {t: dest.table_md5(t) for t in final} == final
        finally:
            dest.stop()

        # a tampered blake3 entry: verify reports it, restore refuses the file
        m = read_manifest(storage, incr)
        victim = next(e for e in m.files if e.blake3 and e.object and e.size > 0)
        victim.blake3 = "0" * 64
        write_manifest(storage, m)
        chown_pg(repo, recursive=True)
        r = pitr("verify", "--backup", incr, "--json", ok=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert [p["kind"] for p in json.loads(r.stdout)["problems"]] == ["file-mismatch"], r.stdout
        bad = PgCluster(src.bindir, base / "bad", name="bad-env2")
        r = pitr("restore", "--pgdata", bad.data, "--backup", incr, ok=False)
        assert r.returncode == 1 and f"copy of {victim.path} does not match its manifest entry" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    finally:
        src.ensure_stopped()
        rmtree_pg(base)
