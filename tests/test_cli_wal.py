"""The pitr executable as a user (or PostgreSQL) runs it: init / wal-push / wal-fetch, help, errors.

No server is needed: synthetic segments with valid page headers go into a local repository bound
to a fake cluster. Errors must be one sentence + hint on stderr, no traceback unless -v, and the
exit codes PostgreSQL relies on (wal-fetch: 1 only for "not archived", above 125 otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from pitr.errors import EXIT_FETCH_HARD
from pitr.repo import envelope
from pitr.repo.format import wal_key
from pitr.storage.fs import FsStorage
from tests.support.envelope_v1 import encode_v1
from tests.support.walgen import SEG, SYSID, fs_repo, segment

PITR = Path(sys.executable).parent / "pitr"
NAME = "000000010000000000000007"


def pitr(*args: str | Path, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the console script with a clean environment (nothing of the caller's PITR_* leaks in)."""
    base = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8", "PITR_CONFIG": "/dev/null"}
    return subprocess.run([str(PITR), *map(str, args)], env=base | (env or {}), cwd=cwd, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def assert_one_error(proc: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    """Exit code, then exactly `pitr: error: <sentence>` and optionally one `hint:` line."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert lines and lines[0].startswith("pitr: error: ") and needle in lines[0], proc.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def repo(tmp_path: Path) -> FsStorage:
    return fs_repo(tmp_path / "repo")


@pytest.fixture
def seg_file(tmp_path: Path) -> Path:
    d = tmp_path / "pg_wal"
    d.mkdir()
    p = d / NAME
    p.write_bytes(segment(NAME))
    return p


def test_help_lists_the_contract_commands() -> None:
    r = pitr("--help")
    assert r.returncode == 0
    for cmd in ("init", "wal-push", "wal-fetch"):
        assert f"  {cmd} " in r.stdout
    for cmd in ("wal-push", "wal-fetch"):  # the fast path hands --help to the full CLI
        r = pitr(cmd, "--help")
        assert r.returncode == 0 and "Usage: pitr " + cmd in r.stdout
    assert pitr("--version").stdout.startswith("pitr ")


def test_push_fetch_round_trip_with_relative_path_and_options_anywhere(
        repo: FsStorage, seg_file: Path, tmp_path: Path) -> None:
    # PostgreSQL passes %p relative to the data directory it runs us in
    r = pitr("wal-push", f"pg_wal/{NAME}", "--repo", repo.root, cwd=seg_file.parent.parent)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr
    stored = repo.stat(wal_key(NAME))
    assert stored is not None and stored.size < SEG // 2  # compressed
    dest = tmp_path / "RECOVERYXLOG"
    r = pitr("--repo", f"file://{repo.root}", "-q", "wal-fetch", NAME, dest)
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes() == seg_file.read_bytes()
    # identical again: success; -v logs what happened on stderr, stdout stays clean
    r = pitr("-v", "wal-push", seg_file, env={"PITR_REPO": str(repo.root)})
    assert r.returncode == 0 and "already archived" in r.stderr and r.stdout == ""


def test_conflicting_push_is_refused_and_overwrites_nothing(repo: FsStorage, seg_file: Path, tmp_path: Path) -> None:
    assert pitr("wal-push", seg_file, env={"PITR_REPO": str(repo.root)}).returncode == 0
    before = repo.get(wal_key(NAME))
    assert_different_push_refused(repo, tmp_path, before)


def assert_different_push_refused(repo: FsStorage, tmp_path: Path, stored: bytes) -> None:
    """Another segment under NAME is refused in one sentence and the stored object stays as it was."""
    other = tmp_path / "other"
    other.mkdir()
    (other / NAME).write_bytes(segment(NAME, seed=1))
    r = pitr("wal-push", other / NAME, env={"PITR_REPO": str(repo.root)})
    assert_one_error(r, 1, f"the archive already holds a different {NAME}; nothing was overwritten")
    assert repo.get(wal_key(NAME)) == stored


def test_push_stores_envelope_version_2_with_the_segments_blake3(repo: FsStorage, seg_file: Path) -> None:
    assert pitr("wal-push", seg_file, env={"PITR_REPO": str(repo.root)}).returncode == 0
    stored = repo.get(wal_key(NAME))
    raw = seg_file.read_bytes()
    assert stored[:5] == b"PITR\x02" and stored[-48:] == len(raw).to_bytes(8, "big") + blake3.blake3(raw).digest() \
        + b"PITR-END"


def test_repush_over_a_segment_an_older_pitr_archived(repo: FsStorage, seg_file: Path, tmp_path: Path) -> None:
    """The stored object is version 1 (SHA-256 trailer): the same bytes are "already archived" (exit
    0, the object untouched), different bytes under that name are refused, overwriting nothing."""
    old = encode_v1(seg_file.read_bytes(), "zstd", 3)
    repo.put(wal_key(NAME), old)
    r = pitr("-v", "wal-push", seg_file, env={"PITR_REPO": str(repo.root)})
    assert r.returncode == 0 and "already archived with identical content" in r.stderr, r.stderr
    assert repo.get(wal_key(NAME)) == old
    assert_different_push_refused(repo, tmp_path, old)
    dest = tmp_path / "RECOVERYXLOG"  # and it still fetches
    assert pitr("--repo", repo.root, "wal-fetch", NAME, dest).returncode == 0
    assert dest.read_bytes() == seg_file.read_bytes()


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: d / NAME, "does not exist"),
        (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "notes.txt is not a WAL file name"),
        (lambda d: (d / NAME).write_bytes(b"hello") and d / NAME, "is 5 bytes, not the cluster's WAL segment size"),
        (lambda d: (d / NAME).write_bytes(bytes(SEG)) and d / NAME, "starts with a zeroed page"),
        (lambda d: (d / NAME).write_bytes(segment(NAME, sysid=SYSID + 1)) and d / NAME,
         "belongs to the cluster with system identifier"),
        (lambda d: (d / NAME).write_bytes(segment("000000010000000000000008")) and d / NAME, "disagrees with its name"),
        (lambda d: (d / "00000002.history").write_bytes(b"\xff\xfe garbage") and d / "00000002.history",
         "not a timeline history file"),
    ],
    ids=["missing", "not-wal-name", "short", "zeroed", "foreign", "wrong-lsn", "bad-history"],
)
def test_push_refuses_what_is_not_this_clusters_wal(repo: FsStorage, tmp_path: Path, make, needle: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    r = pitr("wal-push", path, env={"PITR_REPO": str(repo.root)})
    assert_one_error(r, 1, needle)
    assert [o.key for o in repo.list()] == ["pitr.json"]  # nothing stored, not even a temp file listed


@pytest.mark.parametrize(
    ("env", "code", "needle"),
    [
        ({}, 2, "no repository is configured"),
        ({"PITR_REPO": "ftp://x/y"}, 2, "unsupported scheme 'ftp'"),
        ({"PITR_REPO": "/nonexistent/pitr-repo"}, 1, "repository directory /nonexistent/pitr-repo does not exist"),
        ({"PITR_REPO": "REPO", "PITR_COMPRESS": "lz4"}, 2, "unknown compression 'lz4'"),
        ({"PITR_REPO": "EMPTY"}, 1, "is not initialized"),
        ({"PITR_REPO": "REPO", "PITR_CONFIG": "/nonexistent.toml"}, 2, "config file /nonexistent.toml does not exist"),
    ],
)
def test_push_configuration_errors(repo: FsStorage, seg_file: Path, tmp_path: Path, env: dict[str, str], code: int,
                                   needle: str) -> None:
    (tmp_path / "empty").mkdir()
    env = {k: v.replace("EMPTY", str(tmp_path / "empty")).replace("REPO", str(repo.root)) for k, v in env.items()}
    assert_one_error(pitr("wal-push", seg_file, env=env), code, needle)
    assert repo.stat(wal_key(NAME)) is None


def test_log_level_setting_and_flags(repo: FsStorage, seg_file: Path, tmp_path: Path) -> None:
    """Default: a successful push is silent (PostgreSQL's log stays clean); log_level = "info" in the
    config file shows what was done; -q beats the setting."""
    env = {"PITR_REPO": str(repo.root)}
    assert pitr("wal-push", seg_file, env=env).stderr == ""
    cfg = tmp_path / "pitr.toml"
    cfg.write_text('log_level = "info"\n')
    r = pitr("wal-push", seg_file, env=env | {"PITR_CONFIG": str(cfg)})
    assert r.returncode == 0 and f"pitr: {NAME} already-archived" in r.stderr
    assert pitr("-q", "wal-push", seg_file, env=env | {"PITR_CONFIG": str(cfg)}).stderr == ""
    assert_one_error(pitr("wal-push", seg_file, env=env | {"PITR_LOG_LEVEL": "loud"}), 2,
                     "log_level must be debug, info, warning or error, not 'loud'")


def test_traceback_only_with_verbose(seg_file: Path) -> None:
    env = {"PITR_REPO": "/nonexistent/pitr-repo"}
    quiet = pitr("wal-push", seg_file, env=env)
    assert "Traceback" not in quiet.stderr
    loud = pitr("-v", "wal-push", seg_file, env=env)
    assert loud.returncode == quiet.returncode == 1
    assert "Traceback (most recent call last)" in loud.stderr
    assert "pitr: error: repository directory /nonexistent/pitr-repo does not exist" in loud.stderr
    # a chattier log level is not -v: still one sentence, no traceback
    info = pitr("wal-push", seg_file, env=env | {"PITR_LOG_LEVEL": "info"})
    assert info.returncode == 1 and "Traceback" not in info.stderr and "does not exist" in info.stderr


def test_fetch_missing_is_exit_1_and_creates_nothing(repo: FsStorage, tmp_path: Path) -> None:
    dest = tmp_path / "RECOVERYXLOG"
    r = pitr("wal-fetch", NAME, dest, env={"PITR_REPO": str(repo.root)})
    assert r.returncode == 1 and r.stderr == ""
    assert not dest.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no-repo-configured", "no repository is configured"),
        ("bad-config-file", "config file /nonexistent.toml does not exist"),
        ("repo-dir-missing", "does not exist"),
        ("not-initialized", "is not initialized"),
        ("corrupt-object", "is corrupt"),
        ("truncated-object", "truncated"),
        ("short-segment", "is 8388608 bytes, not the cluster's WAL segment size of 16777216"),
        ("foreign-segment", "belongs to the cluster with system identifier"),
        ("not-a-wal-name", "is not a WAL file name"),
        ("too-few-arguments", "wal-fetch takes exactly two arguments"),
        ("unknown-option", "wal-fetch takes exactly two arguments"),
    ],
)
def test_fetch_hard_failures_exit_above_125(repo: FsStorage, seg_file: Path, tmp_path: Path, case: str,
                                            needle: str) -> None:
    env = {"PITR_REPO": str(repo.root), "PITR_FETCH_RETRIES": "0"}
    key = wal_key(NAME)
    args: list[str | Path] = [NAME, tmp_path / "RECOVERYXLOG"]
    if case == "no-repo-configured":
        del env["PITR_REPO"]
    elif case == "bad-config-file":
        env["PITR_CONFIG"] = "/nonexistent.toml"
    elif case == "repo-dir-missing":
        env["PITR_REPO"] = str(tmp_path / "gone")
    elif case == "not-initialized":
        repo.delete("pitr.json")
    elif case in ("corrupt-object", "truncated-object"):
        blob = bytearray(envelope.encode(seg_file.read_bytes(), envelope.Codec("zstd", 3)))
        if case == "corrupt-object":
            blob[len(blob) // 2] ^= 1
        else:
            del blob[len(blob) // 2:]
        repo.put(key, bytes(blob))
    elif case == "short-segment":
        repo.put(key, envelope.encode(seg_file.read_bytes()[: SEG // 2], envelope.Codec("zstd", 3)))
    elif case == "foreign-segment":
        repo.put(key, envelope.encode(segment(NAME, sysid=SYSID + 5), envelope.Codec("zstd", 3)))
    elif case == "not-a-wal-name":
        args = ["RECOVERYXLOG", tmp_path / "RECOVERYXLOG"]
    elif case == "too-few-arguments":
        args = [NAME]
    elif case == "unknown-option":
        args = ["--target", NAME, tmp_path / "RECOVERYXLOG"]
    r = pitr("wal-fetch", *args, env=env)
    assert r.returncode == EXIT_FETCH_HARD > 125
    assert_one_error(r, EXIT_FETCH_HARD, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pg_wal", "repo"]  # no file, no temp file


def test_fetch_unexpected_exception_still_exits_above_125(repo: FsStorage, seg_file: Path, tmp_path: Path) -> None:
    """A bug must not look like "end of archive" to PostgreSQL: run main() with a fault injected."""
    code = ("import sys\nimport pitr.ops.wal.archive as a\n"
            "def boom(*args, **kw):\n    raise RuntimeError('injected fault')\n"
            "a.fetch_with_retries = boom\n"
            "sys.argv = ['pitr', 'wal-fetch', sys.argv[1], sys.argv[2]]\n"
            "from pitr.__main__ import main\nmain()\n")
    env = {"PATH": os.environ["PATH"], "PITR_CONFIG": "/dev/null", "PITR_REPO": str(repo.root)}
    r = subprocess.run([sys.executable, "-c", code, NAME, str(tmp_path / "X")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == EXIT_FETCH_HARD, r.stderr
    assert "internal error: RuntimeError: injected fault" in r.stderr and "Traceback" not in r.stderr


def test_usage_errors_exit_2_without_traceback() -> None:
    for args in (["no-such-command"], ["wal-push"], ["init", "--bogus"], ["wal-push", "a", "b"]):
        r = pitr(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and "Error:" in r.stderr


def test_init_without_server_is_one_sentence(tmp_path: Path) -> None:
    r = pitr("init", env={"PITR_REPO": str(tmp_path / "repo"), "PGHOST": str(tmp_path), "PGPORT": "1"})
    assert_one_error(r, 1, "cannot connect to PostgreSQL")
    assert not (tmp_path / "repo" / "pitr.json").exists()


def test_s3_missing_bucket_and_unreachable_endpoint(moto_server, seg_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.support.pg import free_port

    missing = moto_server.env() | {"PITR_REPO": "s3://pitr-no-such-bucket/x", "PITR_FETCH_RETRIES": "0"}
    assert_one_error(pitr("wal-push", seg_file, env=missing), 1, "S3 bucket 'pitr-no-such-bucket' does not exist")
    assert_one_error(pitr("wal-fetch", NAME, tmp_path / "X", env=missing), EXIT_FETCH_HARD,
                     "S3 bucket 'pitr-no-such-bucket' does not exist")
    down = missing | {"PITR_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    for r, code in ((pitr("wal-push", seg_file, env=down), 1),
                    (pitr("wal-fetch", NAME, tmp_path / "X", env=down), EXIT_FETCH_HARD)):
        assert_one_error(r, code, "cannot reach the S3 endpoint http://127.0.0.1:")
        assert "PITR_S3_ENDPOINT" in r.stderr  # the hint says what to check
    assert not (tmp_path / "X").exists()
