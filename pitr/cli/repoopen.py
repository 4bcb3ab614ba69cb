"""Where the encryption key comes from, and opening a repository with it (light: the wal-push path uses it).

The key is never a flag: `encryption_key_file` (config file or PITR_ENCRYPTION_KEY_FILE) or the
environment variable PITR_ENCRYPTION_PASSPHRASE. It is loaded only when the repository turns out
to be encrypted, never logged, and never written into the spool or the recovery settings: helpers
and the restored server's restore_command inherit the environment or read the same config file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from pitr.config import Settings
from pitr.storage.base import Storage

PASSPHRASE_ENV = "PITR_ENCRYPTION_PASSPHRASE"
KEY_FILE_ENV = "PITR_ENCRYPTION_KEY_FILE"
NEW_PASSPHRASE_ENV = "PITR_NEW_ENCRYPTION_PASSPHRASE"
# --repo-as-of for the restored server's restore_command (restore writes it there, in UTC)
AS_OF_ENV = "PITR_REPO_AS_OF"

if TYPE_CHECKING:
    from pitr.repo.keys import KeySource


def key_loader(settings: Settings) -> Callable[[], KeySource | None]:
    def load() -> KeySource | None:
        from pitr.errors import ConfigError
        from pitr.repo.keys import passphrase_source, read_key_file

        passphrase = os.environ.get(PASSPHRASE_ENV)
        if settings.encryption_key_file:
            if passphrase is not None:
                raise ConfigError(f"both encryption_key_file and {PASSPHRASE_ENV} are set",
                                  "give the repository's key one way only")
            setting = KEY_FILE_ENV if os.environ.get(KEY_FILE_ENV) else "encryption_key_file"
            return read_key_file(settings.encryption_key_file, setting)
        if passphrase is not None:
            return passphrase_source(passphrase, PASSPHRASE_ENV)
        return None

    return load


def parse_as_of(text: str | None) -> datetime | None:
    """--repo-as-of TS (else PITR_REPO_AS_OF), read like --target-time; None when neither is given."""
    if text is None:
        text = os.environ.get(AS_OF_ENV) or None
    if text is None:
        return None
    from pitr.errors import UsageError
    from pitr.ops.recovery.restore_plan import parse_time

    try:
        return parse_time(text)
    except UsageError as e:
        raise UsageError(f"--repo-as-of: {e}", e.hint) from None


def open_repo(settings: Settings, *, max_connections: int | None = None, as_of: datetime | None = None) -> Storage:
    """The repository's storage: encrypted repositories encrypt and authenticate every object.
    With as_of: a read-only view of a versioned S3 bucket as it was then (storage/s3_asof.py)."""
    from pitr.repo.sealed import RepoStorage
    from pitr.storage import open_storage

    inner = open_storage(settings, max_connections=max_connections)
    if as_of is not None:
        from pitr.errors import UsageError
        from pitr.storage.s3 import S3Storage
        from pitr.storage.s3_asof import S3AsOfStorage

        if not isinstance(inner, S3Storage):
            raise UsageError(f"--repo-as-of reads earlier versions of a versioned S3 bucket, and {inner.display} "
                             "is a directory, which keeps none", "drop --repo-as-of")
        inner = S3AsOfStorage(inner, as_of)
    cfg = f"the config file {settings.config}" if settings.config else "a config file (none was read)"
    looked = f"encryption_key_file in {cfg}, {KEY_FILE_ENV} and {PASSPHRASE_ENV}"
    return RepoStorage(inner, key_loader(settings), looked)
