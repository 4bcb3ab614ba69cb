"""The PitrError tree: every failure the CLI reports, with its exit code and an optional hint.

Library code raises these and never exits; the CLI layer prints `str(err)` (one sentence) and
`hint: …` on stderr and exits with `err.exit_code`. docs/exit-codes.md mirrors this table and a
test keeps the two in step.
"""

from __future__ import annotations

# wal-fetch hard failures must exceed 125: PostgreSQL treats 1..125 as "file not available" and
# ends recovery (promoting at the wrong point); anything above makes recovery abort instead.
EXIT_FETCH_HARD = 128


class PitrError(Exception):
    """Base of every expected failure. exit_code 1 unless a subclass says otherwise."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(PitrError):
    """Bad command line or configuration (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """Missing or malformed settings: repo URL, config file, unknown key (exit 2)."""


class EncryptionKeyError(UsageError):
    """An encrypted repository's key is missing or wrong; nothing was read or written (exit 2)."""


class StorageError(PitrError):
    """The repository cannot be reached or used: endpoint down, credentials, permissions."""


class NotFoundError(StorageError):
    """The requested object does not exist (a missing repository is RepoMissingError, never this)."""


class RepoMissingError(StorageError):
    """The repository location (bucket, directory) does not exist."""


class AlreadyExistsError(StorageError):
    """A conditional write found the key taken (internal; callers decide what that means)."""


class IntegrityError(PitrError):
    """Stored bytes do not match their checksum, size or header: corruption or tampering."""


class ConflictError(PitrError):
    """A different file already sits under this name in the archive; nothing was overwritten."""


class WalFileError(PitrError):
    """The file given to wal-push is not a valid WAL file for this repository's cluster."""


class ForeignClusterError(PitrError):
    """The repository belongs to a different PostgreSQL cluster (system identifier)."""


class NotInitializedError(PitrError):
    """The repository has no metadata yet: `pitr init` has not been run."""


class PostgresError(PitrError):
    """Talking to the server failed, or the server is not in the state the command needs."""


class BackupError(PitrError):
    """A base backup could not be completed; nothing was listed as complete."""


class RestoreError(PitrError):
    """A restore cannot proceed or did not reach its target; the data directory was not presented as done."""


class TargetError(RestoreError):
    """The recovery target is invalid or outside what the repository can reach (exit 1)."""


class VerifyError(PitrError):
    """`pitr verify` found problems (listed on stdout)."""


class CheckError(PitrError):
    """`pitr check` found a misconfiguration or an RPO over the limit."""


class DrillError(PitrError):
    """`pitr drill` ran and a step failed (restore, pg_amcheck or a check); the result is recorded."""


class LockedError(PitrError):
    """Another pitr process holds the repository lock for this operation."""


class Interrupted(PitrError):
    """Stopped by a signal; partial work was cleaned up or left unlisted."""

    exit_code = 130


def all_error_classes() -> list[type[PitrError]]:
    """Every concrete error class (for the exit-code table test)."""
    out: list[type[PitrError]] = []
    todo: list[type[PitrError]] = [PitrError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(out, key=lambda c: c.__name__)
