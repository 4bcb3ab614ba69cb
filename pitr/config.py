"""Settings: command-line option > PITR_* environment > TOML config file > default.

One frozen `Settings` object is built by the CLI and handed down as explicit values; library code
never reads the environment or the config file itself. Config keys are the long option names with
dashes or underscores (`s3_endpoint` or `s3-endpoint`); an unknown key, a wrong type, an
out-of-range value, an unreadable file or a malformed repo URL is a ConfigError (exit 2) naming
where the value came from (option, environment variable, config file and key).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pitr.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/pitr/pitr.toml")
PREFETCH_MAX = 64  # segments; each helper round scans this window, so a huge value only burns CPU and disk
S3_PART_MIN_MB, S3_PART_MAX_MB = 5, 5120  # S3's own limits on a multipart part
# archived WAL when neither wal_compress nor compress is set: zstd level 1 compresses pgbench WAL about
# twice as fast as level 3 for ~3 % more bytes (decoding is as fast), and a push's CPU is taken on the
# primary while it writes the next segment (docs/performance.md, "Sixth session")
WAL_COMPRESS_DEFAULT = "zstd:1"
WAL_WAIT_MAX = 43200.0  # 12 h: stays below expire's 24 h limit for an in-progress backup's marker


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
    s3_part_size_mb: int = 8  # 2 jobs x (2 in flight + 1 being read) x 8 MiB keeps an S3 backup under 200 MB
    # accept a store that fails the atomic conditional-create test (init, check --storage)
    allow_unsafe_store: bool = False
    pgdata: str | None = None
    dbname: str | None = None
    compress: str = "zstd:3"
    # codec for archived WAL; unset: `compress` where that is set, else WAL_COMPRESS_DEFAULT (resolved
    # when loaded, so a loaded Settings always holds the codec wal-push uses)
    wal_compress: str | None = None
    jobs: int = 2
    log_level: str = "warning"  # debug | info | warning | error (-v / -q override it)
    # also append log records (timestamped, at least info) to this file: cron and systemd runs
    log_file: str | None = None
    # wal-fetch: bounded retries before a hard failure (exit > 125); or retry for ever (standby)
    fetch_retries: int = 3
    fetch_retry_forever: bool = False
    # backup: how long to wait for the backup's WAL to reach the archive
    wal_wait_timeout: float = 300.0
    # backup of a standby: how long its replay may stand still with received WAL waiting (else: stuck)
    standby_stall_timeout: float = 60.0
    # async archiving (wal-push pushes every .ready file in parallel through a warm helper)
    archive_async: bool = True  # async by default: a sync push to S3 costs ~0.5-0.8 s a call (boto3, TLS)
    archive_push_jobs: int = 4
    spool_path: str | None = None
    # restore-side prefetch of the next segments
    prefetch: int = 0
    # segments the prefetcher (and restore's stage helper) fetches at once, at most `prefetch`;
    # 0: automatic (8 on S3, where a fetch waits on the network; `jobs` on a directory, CPU-bound)
    prefetch_jobs: int = 0
    # restore --replay: PostgreSQL bin directory (default: found by the backup's major version)
    pg_bin: str | None = None
    # encryption at rest: the key file of an encrypted repository (the passphrase comes only from the
    # environment, PITR_ENCRYPTION_PASSPHRASE, never a setting)
    encryption_key_file: str | None = None
    # S3 Object Lock for `pitr init --lock-days` (the policy is then recorded in pitr.json)
    lock_days: int | None = None
    lock_mode: str = "governance"  # governance | compliance
    retain_full: int | None = None
    retain_days: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def location(self) -> RepoLocation:
        return parse_repo_url(self.repo)

    def wal_codec(self) -> str:
        """The codec spec archived WAL is stored with (wal_compress as load_settings resolved it)."""
        return self.wal_compress or self.compress


_FIELDS = {f.name: f for f in fields(Settings) if f.name not in ("extra",)}
_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off", ""}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Convert a raw value from env/TOML to the field's type, or raise ConfigError."""
    ftype = str(_FIELDS[key].type)
    if value is None and "None" in ftype:
        return None
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
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            if not isinstance(value, int | float | str):
                raise ValueError(value)
            return int(value)
        if "float" in ftype:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError(value)
            f = float(value)
            if not math.isfinite(f):
                raise ValueError(value)
            return f
        if value is None:
            return None
        if not isinstance(value, str | int | float):
            raise ValueError(value)
        return str(value)
    except (ValueError, TypeError, OverflowError):
        kinds = {"bool": "true or false", "int": "a whole number", "float": "a finite number", "str": "text"}
        kind = kinds.get(ftype.split(" |")[0], ftype)
        raise ConfigError(
            f"setting {key!r} from {source} has the invalid value {value!r}; it must be {kind}",
            f"correct the {source}",
        ) from None


def _read_toml(path: Path, explicit: bool, sources: dict[str, str]) -> dict[str, Any]:
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
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not valid UTF-8 (byte {e.start})",
                          "TOML files are UTF-8 text: fix the encoding") from None
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in _FIELDS or key == "config":
            known = ", ".join(sorted(k for k in _FIELDS if k != "config"))
            raise ConfigError(f"config file {path} has an unknown key {raw_key!r}", f"known keys: {known}")
        out[key] = _coerce(key, value, f"config file {path}")
        sources[key] = f"config file {path}, key {raw_key!r}"
    return out


def _from_env(env: Mapping[str, str], sources: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _FIELDS:
        name = "PITR_" + key.upper()
        if name in env and key != "config":
            out[key] = _coerce(key, env[name], f"environment variable {name}")
            sources[key] = f"environment variable {name}"
    # standard fallbacks the contract names
    if "s3_endpoint" not in out:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if env.get(name):
                out["s3_endpoint"] = env[name]
                sources["s3_endpoint"] = f"environment variable {name}"
                break
    if "pgdata" not in out and env.get("PGDATA"):
        out["pgdata"] = env["PGDATA"]
        sources["pgdata"] = "environment variable PGDATA"
    return out


def load_settings(options: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Merge option > environment > config file > default. `options` values of None are unset."""
    env = os.environ if env is None else env
    opts = {k.replace("-", "_"): v for k, v in (options or {}).items() if v is not None}
    unknown = [k for k in opts if k not in _FIELDS]
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}")
    cfg_path = opts.get("config") or env.get("PITR_CONFIG")
    sources: dict[str, str] = {}
    if cfg_path:
        file_values = _read_toml(Path(cfg_path), explicit=True, sources=sources)
    else:
        file_values = _read_toml(DEFAULT_CONFIG, explicit=False, sources=sources)
        cfg_path = str(DEFAULT_CONFIG) if file_values else None
    merged: dict[str, Any] = {}
    merged.update(file_values)
    merged.update(_from_env(env, sources))
    for k, v in opts.items():
        merged[k] = _coerce(k, v, f"option --{k.replace('_', '-')}")
        sources[k] = f"option --{k.replace('_', '-')}"
    merged["config"] = cfg_path
    s = Settings(**merged)
    _validate(s, sources)
    if s.wal_compress is None:
        s = replace(s, wal_compress=s.compress if "compress" in sources else WAL_COMPRESS_DEFAULT)
    return s


_ENUMS = {"s3_addressing": ("auto", "path", "virtual"), "log_level": ("debug", "info", "warning", "error")}
# key -> (lowest, highest) allowed, for every numeric setting (None: no bound on that side)
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "jobs": (1, 64), "archive_push_jobs": (1, 64), "fetch_retries": (0, 100), "prefetch": (0, PREFETCH_MAX),
    "prefetch_jobs": (0, 64),
    "s3_part_size_mb": (S3_PART_MIN_MB, S3_PART_MAX_MB), "wal_wait_timeout": (None, WAL_WAIT_MAX),
    "standby_stall_timeout": (0, 3600),
    "retain_full": (1, None), "retain_days": (0, None),
}
_URL = re.compile(r"https?://(?:[^@/\s]+@)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?(/[^\s?#]*)?", re.ASCII)


def _validate(s: Settings, sources: Mapping[str, str]) -> None:
    """Every value within its domain; the error names the setting, its value and where it was set."""

    def bad(key: str, value: Any, must: str, hint: str | None = None) -> ConfigError:
        where = sources.get(key, "default")
        return ConfigError(f"{key} {must}, not {value!r} (set by {where})", hint or f"correct the {where}")

    for key, allowed in _ENUMS.items():
        value = getattr(s, key)
        if str(value).lower() not in allowed:
            raise bad(key, value, f"must be {', '.join(allowed[:-1])} or {allowed[-1]}")
    for key, (lo, hi) in _RANGES.items():
        value = getattr(s, key)
        if value is None:
            continue
        if lo is not None and hi is not None and not lo <= value <= hi:
            raise bad(key, value, f"must be between {lo:g} and {hi:g}")
        if lo is not None and value < lo:
            raise bad(key, value, f"must be {lo:g} or more")
        if hi is not None and value > hi:
            raise bad(key, value, f"must be at most {hi:g}")
    if s.log_file is not None and not os.path.isabs(s.log_file):
        # archive_command runs in the data directory, cron in $HOME: a relative path would scatter logs
        raise bad("log_file", s.log_file, "must be an absolute path", "write it from / (e.g. /var/log/pitr/pitr.log)")
    if s.wal_wait_timeout <= 0:
        raise bad("wal_wait_timeout", s.wal_wait_timeout, "must be a number of seconds above 0")
    for key in ("compress", "wal_compress"):
        spec = getattr(s, key)
        if spec is None or _valid_compress(spec):
            continue
        where = sources.get(key, "default")
        known = spec.strip().lower().partition(":")[0] in ("zstd", "none")
        what = "an invalid compression level in" if known else "unknown compression"
        raise ConfigError(f"{key} has {what} {spec!r} (set by {where}); it must be zstd, zstd:LEVEL "
                          "(LEVEL 1 to 19) or none", f"correct the {where}")
    endpoint = (s.s3_endpoint or "").strip()  # empty = unset (AWS)
    m = _URL.fullmatch(endpoint) if endpoint else None
    if endpoint and m is None:
        raise bad("s3_endpoint", s.s3_endpoint, "must be an http:// or https:// URL",
                  "e.g. https://minio.internal:9000; leave it unset for AWS S3")
    if m is not None and m.group(2) and not 0 < int(m.group(2)[1:]) < 65536:
        raise bad("s3_endpoint", s.s3_endpoint, "has a port number outside 1 to 65535")
    if s.s3_ca_bundle and (s.repo or "").strip().startswith("s3://") and not os.path.isfile(s.s3_ca_bundle):
        raise bad("s3_ca_bundle", s.s3_ca_bundle, "must name an existing PEM file readable by this user")
    if s.s3_region and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", s.s3_region):
        raise bad("s3_region", s.s3_region, "must be a region name such as us-east-1")


def _valid_compress(spec: str) -> bool:
    """The syntax repo.envelope.parse_codec accepts (config may not import it: layers)."""
    name, sep, level = spec.strip().lower().partition(":")
    if name == "none":
        return not sep
    if name != "zstd":
        return False
    if not sep:
        return True
    return level.isdigit() and 1 <= int(level) <= 19


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
