"""Settings: option > PITR_* environment > TOML file > default, and bad input as one ConfigError (exit 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pitr import config
from pitr.config import Settings, load_settings, parse_repo_url
from pitr.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_any_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    s = load_settings({}, env={})
    assert s == Settings(wal_compress=config.WAL_COMPRESS_DEFAULT)
    assert s.compress == "zstd:3" and s.fetch_retries == 3 and s.config is None
    assert s.wal_codec() == "zstd:1"


@pytest.mark.parametrize(("env", "toml", "wal"), [
    ({}, "", config.WAL_COMPRESS_DEFAULT),                          # neither set: WAL's own default
    ({"PITR_COMPRESS": "none"}, "", "none"),                        # compress set: WAL follows it
    ({}, 'compress = "zstd:7"\n', "zstd:7"),
    ({"PITR_COMPRESS": "zstd:9", "PITR_WAL_COMPRESS": "zstd:2"}, "", "zstd:2"),  # its own setting wins
    ({}, 'compress = "none"\nwal_compress = "zstd"\n', "zstd"),
])
def test_wal_compress_follows_compress_when_only_that_is_set(
        tmp_path: Path, env: dict[str, str], toml: str, wal: str) -> None:
    cfg = write(tmp_path / "pitr.toml", toml)
    s = load_settings({}, env={"PITR_CONFIG": str(cfg)} | env)
    assert s.wal_compress == wal and s.wal_codec() == wal


def test_precedence_option_env_file_default(tmp_path: Path) -> None:
    cfg = write(tmp_path / "pitr.toml", 'repo = "/from/file"\ns3-endpoint = "http://file:1"\n'
                'compress = "zstd:5"\nfetch_retries = 7\n')
    env = {"PITR_CONFIG": str(cfg), "PITR_S3_ENDPOINT": "http://env:2", "PITR_COMPRESS": "none"}
    s = load_settings({"compress": "zstd:9", "repo": None}, env=env)
    assert s.compress == "zstd:9"                 # option beats env and file
    assert s.s3_endpoint == "http://env:2"        # env beats file
    assert s.repo == "/from/file"                 # file beats default; a None option is "not given"
    assert s.fetch_retries == 7
    assert s.jobs == Settings().jobs              # default
    assert s.config == str(cfg)


def test_option_config_beats_env_config(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", 'repo = "/a"\n')
    b = write(tmp_path / "b.toml", 'repo = "/b"\n')
    assert load_settings({"config": str(b)}, env={"PITR_CONFIG": str(a)}).repo == "/b"


def test_default_config_file_is_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG", write(tmp_path / "etc.toml", 'repo = "/etc-repo"\n'))
    s = load_settings({}, env={})
    assert s.repo == "/etc-repo" and s.config == str(tmp_path / "etc.toml")


def test_env_types_are_coerced() -> None:
    s = load_settings({}, env={"PITR_CONFIG": "/dev/null", "PITR_FETCH_RETRY_FOREVER": "yes",
                               "PITR_JOBS": "8", "PITR_WAL_WAIT_TIMEOUT": "1.5"})
    assert s.fetch_retry_forever is True and s.jobs == 8 and s.wal_wait_timeout == 1.5


def test_aws_endpoint_fallback_and_pitr_wins() -> None:
    env = {"PITR_CONFIG": "/dev/null", "AWS_ENDPOINT_URL": "http://generic", "AWS_ENDPOINT_URL_S3": "http://s3"}
    assert load_settings({}, env=env).s3_endpoint == "http://s3"
    assert load_settings({}, env=env | {"PITR_S3_ENDPOINT": "http://pitr"}).s3_endpoint == "http://pitr"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('repo = "/x"\nbogus_key = 1\n', "unknown key 'bogus_key'"),
        ('repo = "/x\n', "is not valid TOML"),
        ('jobs = "many"\n', "'jobs'"),
        ("fetch_retry_forever = 3\n", "true or false"),
        ("config = '/other.toml'\n", "unknown key 'config'"),
        ("[repo]\nx = 1\n", "'repo'"),
    ],
)
def test_bad_config_file_is_one_config_error(tmp_path: Path, text: str, needle: str) -> None:
    cfg = write(tmp_path / "pitr.toml", text)
    with pytest.raises(ConfigError) as e:
        load_settings({"config": str(cfg)}, env={})
    assert e.value.exit_code == 2
    assert needle in str(e.value) and str(cfg) in str(e.value)
    assert "\n" not in str(e.value)


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    cfg = tmp_path / "pitr.toml"
    cfg.write_bytes(b'repo = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match="is not valid UTF-8") as e:
        load_settings({"config": str(cfg)}, env={})
    assert str(cfg) in str(e.value) and e.value.exit_code == 2


def test_missing_and_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings({"config": str(tmp_path / "nope.toml")}, env={})
    with pytest.raises(ConfigError, match="cannot be read|not readable"):
        load_settings({"config": str(tmp_path)}, env={})  # a directory: unreadable as a file


def test_unreadable_config_file_as_unprivileged_user(tmp_path: Path) -> None:
    """Root reads anything, so prove the permission message as the postgres user."""
    from tests.support.pg import make_tmpdir, rmtree_pg, run_as_postgres

    d = make_tmpdir()
    try:
        cfg = write(d / "secret.toml", 'repo = "/x"\n')
        cfg.chmod(0o600)  # owned by root
        proc = run_as_postgres([Path(sys.executable).parent / "pitr", "--config", cfg,
                                "wal-push", "000000010000000000000001"], check=False)
        assert proc.returncode == 2, proc.stderr
        assert f"config file {cfg} is not readable by this user" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        rmtree_pg(d)


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment variable PITR_FETCH_RETRIES") as e:
        load_settings({}, env={"PITR_CONFIG": "/dev/null", "PITR_FETCH_RETRIES": "three"})
    assert e.value.exit_code == 2


@pytest.mark.parametrize(
    ("settings", "needle"),
    [({"s3_addressing": "sideways"}, "s3_addressing"), ({"jobs": 0}, "jobs"), ({"fetch_retries": -1}, "fetch_retries"),
     ({"log_level": "chatty"}, "log_level")],
)
def test_invalid_values(settings: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings(settings, env={"PITR_CONFIG": "/dev/null"})


def test_unknown_option_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        load_settings({"nope": 1}, env={"PITR_CONFIG": "/dev/null"})


@pytest.mark.parametrize(
    ("url", "kind", "where"),
    [
        ("s3://bucket-1/some/prefix/", "s3", ("bucket-1", "some/prefix")),
        ("s3://bucket-1", "s3", ("bucket-1", "")),
        ("file:///var/lib/pitr", "fs", "/var/lib/pitr"),
        ("/var/lib/pitr/", "fs", "/var/lib/pitr"),
    ],
)
def test_repo_urls(url: str, kind: str, where: object) -> None:
    loc = parse_repo_url(url)
    assert loc.kind == kind
    if kind == "s3":
        assert (loc.bucket, loc.prefix) == where
    else:
        assert str(loc.path) == where


def test_relative_repo_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_repo_url("repo").path == tmp_path / "repo"


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        (None, "no repository is configured"),
        ("   ", "no repository is configured"),
        ("s3://", "malformed"),
        ("s3:///prefix", "malformed"),
        ("s3://Upper_Case/x", "invalid S3 bucket"),
        ("s3://b/x?versionId=1", "malformed"),
        ("file://host/path", "malformed"),
        ("http://example.com/repo", "unsupported scheme 'http'"),
    ],
)
def test_bad_repo_urls(url: str | None, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as e:
        parse_repo_url(url)
    assert e.value.exit_code == 2
    if url is None:
        assert e.value.hint and "PITR_REPO" in e.value.hint


def test_every_setting_is_documented() -> None:
    """docs/configuration.md has a row per Settings field, naming its environment variable and default."""
    from dataclasses import MISSING, fields

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in doc.splitlines() if line.startswith("| `")}
    for f in fields(Settings):
        if f.name == "extra":
            continue
        assert f.name in rows, f"docs/configuration.md lacks a row for {f.name}"
        assert f"`PITR_{f.name.upper()}`" in rows[f.name], f.name
        if f.default not in (None, MISSING) and f.name != "config":
            want = str(f.default).lower() if isinstance(f.default, bool) else str(f.default).removesuffix(".0")
            assert f"`{want}`" in rows[f.name], (f.name, want)


def test_out_of_range_values_name_their_source(tmp_path: Path) -> None:
    """The same bad value is traced to the option, the environment variable, or the file and key."""
    cfg = write(tmp_path / "pitr.toml", "prefetch = 100000\n")
    with pytest.raises(ConfigError, match=rf"prefetch must be between 0 and 64, not 100000 \(set by config file "
                                          rf"{cfg}, key 'prefetch'\)"):
        load_settings({}, env={"PITR_CONFIG": str(cfg)})
    with pytest.raises(ConfigError, match=r"set by environment variable PITR_PREFETCH"):
        load_settings({}, env={"PITR_CONFIG": str(cfg), "PITR_PREFETCH": "65"})
    with pytest.raises(ConfigError, match=r"set by option --prefetch"):
        load_settings({"prefetch": -1}, env={"PITR_CONFIG": str(cfg)})
    assert load_settings({"prefetch": 64}, env={"PITR_CONFIG": str(cfg)}).prefetch == 64  # the option wins


@pytest.mark.parametrize(("env", "needle"), [
    ({"PITR_WAL_WAIT_TIMEOUT": "-5"}, "wal_wait_timeout must be a number of seconds above 0"),
    ({"PITR_WAL_WAIT_TIMEOUT": "0"}, "wal_wait_timeout"),
    ({"PITR_WAL_WAIT_TIMEOUT": "86400"}, "wal_wait_timeout must be at most 43200"),
    ({"PITR_S3_PART_SIZE_MB": "1"}, "s3_part_size_mb must be between 5 and 5120"),
    ({"PITR_S3_PART_SIZE_MB": "5.5"}, "must be a whole number"),
    ({"PITR_S3_ENDPOINT": "minio:9000"}, "s3_endpoint must be an http:// or https:// URL"),
    ({"PITR_S3_ENDPOINT": "http://minio:0"}, "port number outside 1 to 65535"),
    ({"PITR_S3_REGION": "us east 1"}, "s3_region"),
    ({"PITR_COMPRESS": "zstd:0"}, "invalid compression level"),
    ({"PITR_WAL_COMPRESS": "lz4"}, "wal_compress has unknown compression 'lz4' .set by environment variable "
                                   "PITR_WAL_COMPRESS"),
    ({"PITR_WAL_COMPRESS": "zstd:20"}, "wal_compress has an invalid compression level"),
    ({"PITR_RETAIN_DAYS": "nan"}, "finite number"),
    ({"PITR_STANDBY_STALL_TIMEOUT": "-1"}, "standby_stall_timeout must be between 0 and 3600"),
])
def test_every_setting_is_range_checked(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as e:
        load_settings({}, env={"PITR_CONFIG": "/dev/null"} | env)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
