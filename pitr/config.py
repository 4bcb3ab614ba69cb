"""Settings: command-line option > PITR_* environment > TOML config file > default.

One frozen `Settings` object is built by the CLI and handed down as explicit values; library code
never reads the environment or the config file itself. Config keys are the long option names with
dashes or underscores (`s3_endpoint` or `s3-endpoint`); an unknown key, a wrong type, an
unreadable file or a malformed repo URL is a ConfigError (exit 2).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pitr.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/pitr/pitr.toml")


@dataclass(frozen=True)
class RepoLocation:
    """A parsed repository URL: either a local directory or an S3 bucket + key prefix."""

    kind: str  # "fs" | "s3"
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""

    @property
    def url(self) -> str:
        if self.kind == "fs":
            return str(self.path)
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class Settings:
    """Every setting a command may use. Field names are the config-file keys."""

    config: str | None = None
    repo: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_addressing: str = "auto"  # auto | path | virtual ; auto = path style for custom endpoints
    s3_ca_bundle: str | None = None
    s3_part_size_mb: int = 16
    pgdata: str | None = None
    dbname: str | None = None
    compress: str = "zstd:3"
    jobs: int = 2
    log_level: str = "warning"  # debug | info | warning | error (-v / -q override it)
    # wal-fetch: bounded retries before a hard failure (exit > 125); or retry for ever (standby)
    fetch_retries: int = 3
    fetch_retry_forever: bool = False
    # backup: how long to wait for the backup's WAL to reach the archive
    wal_wait_timeout: float = 300.0
    # async archiving (wal-push pushes every .ready file in parallel through a warm helper)
    archive_async: bool = False
    archive_push_jobs: int = 4
    spool_path: str | None = None
    # restore-side prefetch of the next segments
    prefetch: int = 0
    # restore --replay: PostgreSQL bin directory (default: found by the backup's major version)
    pg_bin: str | None = None
    # encryption at rest: the key file of an encrypted repository (the passphrase comes only from the
    # environment, PITR_ENCRYPTION_PASSPHRASE, never a setting)
    encryption_key_file: str | None = None
    retain_full: int | None = None
    retain_days: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def location(self) -> RepoLocation:
        return parse_repo_url(self.repo)

    def with_(self, **kw: Any) -> Settings:
        return replace(self, **kw)


_FIELDS = {f.name: f for f in fields(Settings) if f.name not in ("extra",)}
_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off", ""}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Convert a raw value from env/TOML to the field's type, or raise ConfigError."""
    ftype = str(_FIELDS[key].type)
    try:
        if "bool" in ftype:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _BOOL_TRUE:
                return True
            if s in _BOOL_FALSE:
                return False
            raise ValueError(value)
        if "int" in ftype:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if "float" in ftype:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if value is None:
            return None
        if not isinstance(value, str | int | float):
            raise ValueError(value)
        return str(value)
    except ValueError:
        kind = "true or false" if "bool" in ftype else ftype.split(" |")[0].replace("str", "text")
        raise ConfigError(
            f"setting {key!r} from {source} has the invalid value {value!r}; it must be {kind}"
        ) from None


def _read_toml(path: Path, explicit: bool) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if not explicit:
            return {}
        raise ConfigError(f"config file {path} does not exist", "check --config / PITR_CONFIG") from None
    except PermissionError:
        raise ConfigError(
            f"config file {path} is not readable by this user",
            "make it readable by the user running pitr (e.g. the postgres OS user)",
        ) from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in _FIELDS or key == "config":
            known = ", ".join(sorted(k for k in _FIELDS if k != "config"))
            raise ConfigError(f"config file {path} has an unknown key {raw_key!r}", f"known keys: {known}")
        out[key] = _coerce(key, value, f"config file {path}")
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _FIELDS:
        name = "PITR_" + key.upper()
        if name in env and key != "config":
            out[key] = _coerce(key, env[name], f"environment variable {name}")
    # standard fallbacks the contract names
    if "s3_endpoint" not in out:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if env.get(name):
                out["s3_endpoint"] = env[name]
                break
    if "pgdata" not in out and env.get("PGDATA"):
        out["pgdata"] = env["PGDATA"]
    return out


def load_settings(options: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Merge option > environment > config file > default. `options` values of None are unset."""
    env = os.environ if env is None else env
    opts = {k.replace("-", "_"): v for k, v in (options or {}).items() if v is not None}
    unknown = [k for k in opts if k not in _FIELDS]
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}")
    cfg_path = opts.get("config") or env.get("PITR_CONFIG")
    if cfg_path:
        file_values = _read_toml(Path(cfg_path), explicit=True)
    else:
        file_values = _read_toml(DEFAULT_CONFIG, explicit=False)
        cfg_path = str(DEFAULT_CONFIG) if file_values else None
    merged: dict[str, Any] = {}
    merged.update(file_values)
    merged.update(_from_env(env))
    merged.update({k: _coerce(k, v, f"option --{k.replace('_', '-')}") for k, v in opts.items()})
    merged["config"] = cfg_path
    s = Settings(**merged)
    _validate(s)
    return s


def _validate(s: Settings) -> None:
    if s.s3_addressing not in ("auto", "path", "virtual"):
        raise ConfigError(f"s3_addressing must be auto, path or virtual, not {s.s3_addressing!r}")
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level must be debug, info, warning or error, not {s.log_level!r}")
    if s.jobs < 1 or s.jobs > 64:
        raise ConfigError(f"jobs must be between 1 and 64, not {s.jobs}")
    if s.fetch_retries < 0:
        raise ConfigError("fetch_retries must be 0 or more")


def require_repo(s: Settings) -> RepoLocation:
    """The repo location, or a ConfigError naming all three ways to set it."""
    return parse_repo_url(s.repo)


def parse_repo_url(url: str | None) -> RepoLocation:
    """Parse `s3://bucket/prefix`, `file:///abs/path` or a plain directory path."""
    if not url or not url.strip():
        raise ConfigError(
            "no repository is configured",
            "set --repo URL, the PITR_REPO environment variable, or repo = \"…\" in the config file",
        )
    url = url.strip()
    if url.startswith("s3://"):
        parts = urlsplit(url)
        bucket = parts.netloc
        prefix = parts.path.strip("/")
        if not bucket or parts.query or parts.fragment:
            raise ConfigError(f"repository URL {url!r} is malformed", "use s3://bucket/prefix")
        if not _valid_bucket(bucket):
            raise ConfigError(f"repository URL {url!r} names an invalid S3 bucket {bucket!r}")
        return RepoLocation(kind="s3", bucket=bucket, prefix=prefix)
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(f"repository URL {url!r} is malformed", "use file:///absolute/path")
        return RepoLocation(kind="fs", path=Path(parts.path).resolve())
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ConfigError(
            f"repository URL {url!r} has an unsupported scheme {scheme!r}",
            "use s3://bucket/prefix, file:///absolute/path or a plain directory path",
        )
    return RepoLocation(kind="fs", path=Path(url).expanduser().resolve())


def _valid_bucket(name: str) -> bool:
    if not 3 <= len(name) <= 63:
        return False
    return all(c.islower() or c.isdigit() or c in "-." for c in name) and name[0].isalnum()
