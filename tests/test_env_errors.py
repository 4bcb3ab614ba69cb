"""Bad environment input through the real CLI: one sentence naming the cause and its source, exit 2 for
configuration, never "internal error" or a traceback (issue 11, "Environment errors are not bugs")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.walgen import fs_repo

PITR = Path(sys.executable).parent / "pitr"


def pitr(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The console script with a clean environment (nothing of the caller's PITR_* or AWS_* leaks in)."""
    base = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8", "PITR_CONFIG": "/dev/null"}
    return subprocess.run([str(PITR), *map(str, args)], env=base | (env or {}), capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def assert_config_error(proc: subprocess.CompletedProcess[str], *needles: str, code: int = 2) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert lines and lines[0].startswith("pitr: error: "), proc.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], proc.stderr


# --------------------------------------------------------------------------- S3 environment

def test_s3_endpoint_that_is_not_a_url() -> None:
    assert_config_error(pitr("--repo", "s3://bkt/x", "--s3-endpoint", "notaurl", "info"),
                        "s3_endpoint must be an http:// or https:// URL", "'notaurl'", "option --s3-endpoint")
    assert_config_error(pitr("--repo", "s3://bkt/x", "info", env={"AWS_ENDPOINT_URL": "ftp://host"}),
                        "environment variable AWS_ENDPOINT_URL")


def test_unknown_aws_profile(tmp_path: Path) -> None:
    env = {"AWS_PROFILE": "nosuch", "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none2")}
    assert_config_error(pitr("--repo", "s3://bkt/x", "--s3-endpoint", "http://127.0.0.1:9", "info", env=env),
                        "AWS profile 'nosuch'", "AWS_PROFILE")


def test_wal_fetch_with_an_unknown_aws_profile_is_a_hard_failure(tmp_path: Path) -> None:
    """restore_command must stop recovery (above 125), never answer 'not archived'."""
    env = {"AWS_PROFILE": "nosuch", "AWS_CONFIG_FILE": str(tmp_path / "none"), "PITR_REPO": "s3://bkt/x",
           "PITR_S3_ENDPOINT": "http://127.0.0.1:9"}
    p = pitr("wal-fetch", "000000010000000000000001", tmp_path / "out", env=env)
    assert p.returncode == 128, p.stderr
    assert "internal error" not in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- settings out of range

@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"PITR_PREFETCH": "100000"}, ("prefetch must be between 0 and 64", "environment variable PITR_PREFETCH")),
        ({"PITR_WAL_WAIT_TIMEOUT": "-5"}, ("wal_wait_timeout", "PITR_WAL_WAIT_TIMEOUT")),
        ({"PITR_S3_PART_SIZE_MB": "1"}, ("s3_part_size_mb must be between 5 and 5120",)),
        ({"PITR_ARCHIVE_PUSH_JOBS": "0"}, ("archive_push_jobs",)),
        ({"PITR_FETCH_RETRIES": "1e9"}, ("fetch_retries",)),
        ({"PITR_COMPRESS": "lz4"}, ("unknown compression 'lz4'", "PITR_COMPRESS")),
        ({"PITR_RETAIN_DAYS": "-1"}, ("retain_days must be 0 or more",)),
        ({"PITR_RETAIN_FULL": "0"}, ("retain_full must be 1 or more",)),
        ({"PITR_S3_ADDRESSING": "sideways"}, ("s3_addressing must be auto, path or virtual",)),
        ({"PITR_WAL_WAIT_TIMEOUT": "inf"}, ("wal_wait_timeout", "finite")),
    ],
)
def test_out_of_range_setting_from_the_environment(tmp_path: Path, env: dict[str, str],
                                                   needles: tuple[str, ...]) -> None:
    repo = fs_repo(tmp_path / "repo")
    assert_config_error(pitr("--repo", repo.root, "info", env=env), *needles)


def test_out_of_range_setting_in_the_config_file_names_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "pitr.toml"
    cfg.write_text("s3-part-size-mb = 1\n")
    assert_config_error(pitr("--config", cfg, "--repo", tmp_path, "info"),
                        "s3_part_size_mb", f"config file {cfg}, key 's3-part-size-mb'")
    cfg.write_text("prefetch = 100000\n")
    assert_config_error(pitr("--config", cfg, "--repo", tmp_path, "info"), "prefetch", str(cfg))


def test_out_of_range_prefetch_makes_wal_fetch_stop_recovery(tmp_path: Path) -> None:
    repo = fs_repo(tmp_path / "repo")
    p = pitr("wal-fetch", "000000010000000000000001", tmp_path / "out",
             env={"PITR_REPO": str(repo.root), "PITR_PREFETCH": "100000"})
    assert p.returncode == 128 and "prefetch" in p.stderr and "Traceback" not in p.stderr


def test_restore_prefetch_option_stays_within_what_wal_fetch_accepts(tmp_path: Path) -> None:
    repo = fs_repo(tmp_path / "repo")
    p = pitr("--repo", repo.root, "restore", "--pgdata", tmp_path / "d", "--prefetch", "65", "--dry-run")
    assert_config_error(p, "--prefetch must be a number of segments from 0 to 64")


# --------------------------------------------------------------------------- target times

@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("03/04/2026", "day and month"),
        ("03/04/2026 10:00", "day and month"),
        ("3.4.26", "day and month"),
        ("2026-03-29 02:30", "does not exist in the local time zone"),
        ("2026-10-25 02:30", "occurs twice in the local time zone"),
    ],
)
def test_unclear_target_time_is_refused(tmp_path: Path, value: str, needle: str) -> None:
    repo = fs_repo(tmp_path / "repo")
    p = pitr("--repo", repo.root, "restore", "--pgdata", tmp_path / "d", "--target-time", value, "--dry-run",
             env={"TZ": "Europe/Berlin"})
    assert_config_error(p, needle)
    assert "hint: write the date as YYYY-MM-DD with a zone" in p.stderr
    assert not (tmp_path / "d").exists()


def test_clear_target_times_still_parse() -> None:
    """The same hours with a zone, or on other days, are fine (the refusals above are not blanket)."""
    code = ("from pitr.ops.recovery.restore_plan import parse_time as p;"
            "print(p('2026-10-25 02:30+01'), p('2026-03-29 03:30'), p('13/04/2026 10:00'),"
            " p('2026-03-01 14:30:00.05'))")
    r = subprocess.run([sys.executable, "-c", code], env={"TZ": "Europe/Berlin", "PATH": os.environ["PATH"]},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(" ")[0:2] == ["2026-10-25", "01:30:00+00:00"]
    assert "2026-03-29 01:30:00+00:00" in r.stdout and "2026-04-13 08:00:00+00:00" in r.stdout
    assert "2026-03-01 13:30:00.050000+00:00" in r.stdout


# --------------------------------------------------------------------------- secrets never echoed

def test_error_messages_and_logs_mask_credentials(tmp_path: Path) -> None:
    """A bad value that carries a credential is named, but the credential is not printed (defect 12)."""
    p = pitr("--repo", "s3://bkt/x", "--s3-endpoint", "http://minio:topsecret@h:99999", "info")
    assert_config_error(p, "s3_endpoint", "http://minio:***@h:99999")
    assert "topsecret" not in p.stderr
    p = pitr("-vv", "--repo", "s3://bkt/x", "--s3-endpoint", "http://minio:topsecret@h:99999", "info")
    assert p.returncode == 2 and "topsecret" not in p.stderr and "***" in p.stderr  # -v traceback too


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_check_timeout_must_be_finite(tmp_path: Path, value: str) -> None:
    repo = fs_repo(tmp_path / "repo")
    assert_config_error(pitr("--repo", repo.root, "check", "--timeout", value), "--timeout must be a finite number")


def test_missing_s3_ca_bundle_is_named(tmp_path: Path) -> None:
    p = pitr("--repo", "s3://bkt/x", "--s3-endpoint", "https://127.0.0.1:9", "info",
             env={"PITR_S3_CA_BUNDLE": str(tmp_path / "nope.pem")})
    assert_config_error(p, "s3_ca_bundle must name an existing PEM file", "environment variable PITR_S3_CA_BUNDLE")
    assert pitr("--repo", tmp_path, "info", env={"PITR_S3_CA_BUNDLE": "/nope"}).returncode != 2  # unused for fs
