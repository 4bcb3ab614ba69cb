"""pitr check against a running PostgreSQL 15: passes for `pitr wal-push %p` into this repository,
fails with one line naming the setting and the fix for each wrong point, and judges --max-rpo."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitr.config import parse_repo_url
from pitr.ops.proof.check import judge_archive_command, parse_duration
from pitr.repo.format import META_KEY, wal_key
from pitr.repo.meta import new_meta
from pitr.storage.fs import FsStorage
from tests.support.maint import Repo, pg15_cluster, start_repo
from tests.support.pg import chown_pg, make_tmpdir, rmtree_pg

pytestmark = pytest.mark.pg


@pytest.fixture(scope="module")
def repo(pitr_exe: Path) -> Iterator[Repo]:
    """One archiving cluster for the module; each test puts back what it changes."""
    base = make_tmpdir("pitr-check-")
    cluster = pg15_cluster(base)
    root = base / "repo"
    try:
        yield start_repo(cluster, FsStorage(root), {"PITR_REPO": f"file://{root}"}, pitr_exe, root,
                         extra_conf="autovacuum = off\n")  # no background WAL: the RPO test counts on it
    finally:
        cluster.ensure_stopped()
        rmtree_pg(base)


def set_archive_command(repo: Repo, cmd: str) -> None:
    repo.cluster.sql(f"alter system set archive_command = '{cmd}'")
    repo.cluster.sql("select pg_reload_conf()")
    time.sleep(0.3)  # the reload reaches the archiver asynchronously


def lines(out: str, prefix: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(prefix)]


def test_check_passes_and_the_switched_segment_is_archived(repo: Repo) -> None:
    r = repo.pitr("check", "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not lines(r.stdout, "FAIL")
    names = [ln.split()[1].rstrip(":") for ln in lines(r.stdout, "ok")]
    assert names == ["archive_mode", "archive_command", "wal_level", "repository", "wal-switch"]

    r = repo.pitr("check", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["ok"] is True
    seg = out["switched_segment"]
    assert repo.storage.stat(wal_key(seg)) is not None  # really in the repository


def test_wrong_archive_command_is_one_clear_line(repo: Repo, tmp_path: Path) -> None:
    root = repo.fs_root
    try:
        set_archive_command(repo, "/bin/true")
        r = repo.pitr("check", "--timeout", "5")
        assert r.returncode == 1
        fail = lines(r.stdout, "FAIL")
        assert fail == ["FAIL  archive_command: is '/bin/true', which does not archive with pitr; "
                        "set archive_command = 'pitr wal-push %p' (PITR_REPO or the config file naming this "
                        "repository; on a busy server the line `pitr archive-command` prints) and reload the "
                        "server (SELECT pg_reload_conf())"]
        assert len(lines(r.stdout, "ok")) == 3  # the other points were still checked
        assert "check failed on 1 point(s): archive_command" in r.stderr

        other = make_tmpdir("pitr-other-")
        set_archive_command(repo, f"pitr --repo {other} wal-push %p")
        r = repo.pitr("check", "--timeout", "5")
        assert r.returncode == 1
        assert lines(r.stdout, "FAIL") == [f"FAIL  archive_command: archives into {other}, not into this repository "
                                           f"{root}; point --repo in archive_command at {root}, or run check with "
                                           f"--repo {other}"]
        rmtree_pg(other)

        set_archive_command(repo, f"pitr wal-push --repo=file://{root} %p")  # explicit and right
        r = repo.pitr("check", "--timeout", "30")
        assert r.returncode == 0, r.stdout
    finally:
        set_archive_command(repo, "pitr wal-push %p")


def test_max_rpo(repo: Repo) -> None:
    r = repo.pitr("check", "--max-rpo", "1h")
    assert r.returncode == 0, r.stdout
    assert lines(r.stdout, "ok    rpo: the newest archived WAL")

    # right after check's own switch nothing is unarchived: an idle server is not "stale". The
    # background writer may still log a running-transactions record after a switch (it does so
    # within 15 s of any WAL activity), which is WAL not yet archived: allow for one such record.
    for attempt in range(3):
        time.sleep(1.5)
        r = repo.pitr("check", "--json", "--max-rpo", "1s")
        if r.returncode == 0 or attempt == 2:
            break
    assert r.returncode == 0, r.stdout
    assert json.loads(r.stdout)["rpo_seconds"] == 0

    repo.cluster.sql("insert into churn values (1, 'not archived yet')")
    time.sleep(2.2)
    r = repo.pitr("check", "--max-rpo", "1s")
    assert r.returncode == 1
    [fail] = lines(r.stdout, "FAIL")
    assert fail.startswith("FAIL  rpo: the newest archived WAL (") and "old, over the limit of 1s" in fail
    assert lines(r.stdout, "ok    wal-switch")  # archiving itself works: only the age is over

    r = repo.pitr("check", "--max-rpo", "5x")
    assert r.returncode == 2 and "--max-rpo: invalid duration '5x'" in r.stderr


def test_archive_mode_off_and_minimal_wal_level(repo: Repo) -> None:
    pg = repo.cluster
    try:
        pg.sql("alter system set archive_mode = off")
        pg.sql("alter system set wal_level = minimal")
        pg.sql("alter system set max_wal_senders = 0")
        pg.stop()
        pg.start()
        r = repo.pitr("check")
        assert r.returncode == 1
        assert lines(r.stdout, "FAIL") == [
            "FAIL  archive_mode: is off; set archive_mode = on in postgresql.conf and restart the server",
            "FAIL  wal_level: is minimal; set wal_level = replica in postgresql.conf and restart the server",
        ]
        assert lines(r.stdout, "ok    repository:")
    finally:
        for name in ("archive_mode", "wal_level", "max_wal_senders"):
            pg.sql(f"alter system reset {name}")
        pg.stop()
        pg.start()


def test_repository_points_and_unreachable_server(repo: Repo) -> None:
    empty = make_tmpdir("pitr-empty-")
    foreign = make_tmpdir("pitr-foreign-")
    try:
        FsStorage(foreign).put(META_KEY, new_meta(12345, 15, 16 << 20).to_json())
        chown_pg(foreign, recursive=True)
        r = repo.pitr("check", "--timeout", "2", env={"PITR_REPO": str(empty)})
        assert r.returncode == 1
        assert lines(r.stdout, "FAIL") == [f"FAIL  repository: the repository {empty} is not initialized; "
                                           "run `pitr init` (with the cluster running) first"]
        r = repo.pitr("check", "--timeout", "2", env={"PITR_REPO": str(foreign)})
        [fail] = lines(r.stdout, "FAIL")
        assert fail.startswith(f"FAIL  repository: {foreign} belongs to the cluster 12345, not this server's ")

        r = repo.pitr("check", "--dbname", "host=/nonexistent port=1 connect_timeout=2")
        assert r.returncode == 1
        [fail] = lines(r.stdout, "FAIL")
        assert fail.startswith("FAIL  server: cannot connect to PostgreSQL")
        assert lines(r.stdout, "ok    repository:")  # checked although the server is unreachable
        assert "Traceback" not in r.stderr
    finally:
        rmtree_pg(empty)
        rmtree_pg(foreign)


SECRETS = ("pw3secret", "topsecret1", "urlsecret", "hunter22")


def test_check_never_shows_the_secrets_in_archive_command(repo: Repo) -> None:
    """archive_command is readable through check's output, its log and --json: credentials are masked."""
    cmd = ("PGPASSWORD=pw3secret AWS_SECRET_ACCESS_KEY=topsecret1 pitr --s3-endpoint http://u:urlsecret@h:1 "
           "wal-push --password hunter22 %p")
    try:
        set_archive_command(repo, cmd)
        for args in (("check", "--timeout", "2"), ("check", "--timeout", "2", "--json"), ("-vv", "check")):
            r = repo.pitr(*args)
            out = r.stdout + r.stderr
            assert "archive_command" in out
            assert not [s for s in SECRETS if s in out], out
        r = repo.pitr("check", "--timeout", "2")
        [line] = [ln for ln in r.stdout.splitlines() if "archive_command:" in ln]
        assert "PGPASSWORD=*** AWS_SECRET_ACCESS_KEY=*** pitr --s3-endpoint http://u:***@h:1" in line
    finally:
        set_archive_command(repo, "pitr wal-push %p")


# --------------------------------------------------------------------------- pure parts

@pytest.mark.parametrize("cmd, ok, says", [
    ("pitr wal-push %p", True, "names no repository"),
    ("/usr/local/bin/pitr wal-push %p", True, ""),
    ("PITR_REPO=s3://bkt/prod/main pitr wal-push %p", True, ""),
    ("pitr --repo s3://bkt/prod/main/ wal-push %p", True, ""),
    ("pitr --repo s3://bkt/prod/other wal-push %p", False, "archives into s3://bkt/prod/other"),
    ("pitr --repo=s3://other/prod/main wal-push %p", False, "archives into s3://other/prod/main"),
    ("pitr --repo /var/lib/pitr wal-push %p", False, "archives into /var/lib/pitr"),
    ("pitr wal-push", False, "does not pass %p"),
    ("cp %p /mnt/archive/%f", False, "does not archive with pitr"),
    ("", False, "is empty"),
])
def test_judge_archive_command(cmd: str, ok: bool, says: str) -> None:
    got_ok, found, fix = judge_archive_command(cmd, parse_repo_url("s3://bkt/prod/main"))
    assert got_ok is ok
    assert says in found
    assert bool(fix) is not ok


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("5m", 300), ("2h", 7200), ("1d", 86400), ("45", 45),
                                           ("1.5h", 5400), ("10min", 600)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5x", "-1m", "1 day"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("cmd, secret", [
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY pitr wal-push %p", "wJalrXUtnFEMI"),
    ("PITR_ENCRYPTION_PASSPHRASE='correct horse' pitr wal-push %p", "correct horse"),
    ('PGPASSWORD="s3cr3t" pitr wal-push %p', "s3cr3t"),
    ("pitr wal-push --password=hunter2 %p", "hunter2"),
    ("pitr --s3-endpoint https://minio:miniosecret@minio.local:9000 wal-push %p", "miniosecret"),
    ("AWS_SESSION_TOKEN=FwoGZXIvYXdzEJr pitr wal-push %p", "FwoGZXIvYXdzEJr"),
    ("AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE pitr wal-push %p", "AKIAIOSFODNN7EXAMPLE"),
])
def test_judge_archive_command_masks_credentials(cmd: str, secret: str) -> None:
    ok, found, _fix = judge_archive_command(cmd, parse_repo_url("s3://bkt/prod/main"))
    assert ok and secret not in found and "***" in found


def test_redact_keeps_what_is_not_a_secret() -> None:
    from pitr.redact import redact

    for text in ("pitr wal-push %p", "test ! -f /mnt/archive/%f && cp %p /mnt/archive/%f", "s3://bucket/prefix",
                 "PITR_REPO=/var/lib/pitr pitr wal-push %p", "PITR_ENCRYPTION_PASSPHRASE_FILE=/etc/pitr/key pitr",
                 "segment 000000010000000000000003 sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c1"):
        assert redact(text) == text
    assert redact("host=db password=x user=y") == "host=db password=*** user=y"
    assert redact('{"token": "abc", "n": 1}') == '{"token": "***", "n": 1}'
