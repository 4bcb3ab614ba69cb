"""Where the encryption key comes from, and opening a repository with it (light: the wal-push path uses it).

The key is never a flag: `encryption_key_file` (config file or PITR_ENCRYPTION_KEY_FILE) or the
environment variable PITR_ENCRYPTION_PASSPHRASE. It is loaded only when the repository turns out
to be encrypted, never logged, and never written into the spool or the recovery settings: helpers
and the restored server's restore_command inherit the environment or read the same config file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from pitr.config import Settings
from pitr.storage.base import Storage

PASSPHRASE_ENV = "PITR_ENCRYPTION_PASSPHRASE"
KEY_FILE_ENV = "PITR_ENCRYPTION_KEY_FILE"
NEW_PASSPHRASE_ENV = "PITR_NEW_ENCRYPTION_PASSPHRASE"

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


def open_repo(settings: Settings, *, max_connections: int | None = None) -> Storage:
    """The repository's storage: encrypted repositories encrypt and authenticate every object."""
    from pitr.repo.sealed import RepoStorage
    from pitr.storage import open_storage

    cfg = f"the config file {settings.config}" if settings.config else "a config file (none was read)"
    looked = f"encryption_key_file in {cfg}, {KEY_FILE_ENV} and {PASSPHRASE_ENV}"
    return RepoStorage(open_storage(settings, max_connections=max_connections), key_loader(settings), looked)
