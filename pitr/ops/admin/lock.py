"""`pitr init --lock-days N`: record an S3 Object Lock retention policy in pitr.json.

The bucket must have Object Lock enabled (it can only be chosen when the bucket is created). The
policy goes into pitr.json's plain part (lock_days, lock_mode), readable without the key, and from
then on every object pitr writes carries a retention of at least N days (storage/s3.py).
"""

from __future__ import annotations

import json

from pitr.errors import ConfigError, UsageError
from pitr.repo.format import META_KEY
from pitr.repo.meta import SMALL_JSON_MAX
from pitr.repo.sealed import LOCK_MODES, RepoStorage, apply_lock_policy, parse_meta_doc
from pitr.storage.base import Storage
from pitr.storage.s3 import S3Storage

MAX_LOCK_DAYS = 36500


def validate(days: int, mode: str) -> None:
    if not 1 <= days <= MAX_LOCK_DAYS:
        raise UsageError(f"--lock-days must be a number of days from 1 to {MAX_LOCK_DAYS}, not {days}")
    if mode not in LOCK_MODES:
        raise UsageError(f"--lock-mode must be governance or compliance, not {mode!r}")


def require_lockable(storage: Storage) -> S3Storage:
    """The S3 backend of a bucket with Object Lock enabled, else a ConfigError (exit 2)."""
    inner = storage.inner if isinstance(storage, RepoStorage) else storage
    if not isinstance(inner, S3Storage):
        raise ConfigError(f"--lock-days needs an S3 repository, and {storage.display} is a directory",
                          "drop --lock-days, or use a bucket created with Object Lock enabled")
    if not inner.object_lock_enabled():
        raise ConfigError(f"the bucket s3://{inner.bucket} does not have Object Lock enabled, so pitr cannot lock "
                          "what it writes",
                          "create a new bucket with Object Lock enabled (aws s3api create-bucket "
                          "--object-lock-enabled-for-bucket) and initialize the repository there")
    return inner


def record_lock(storage: Storage, days: int, mode: str) -> bool:
    """Check the bucket and write the policy into pitr.json; False when it was already recorded."""
    validate(days, mode)
    inner = require_lockable(storage)
    doc = parse_meta_doc(inner.get(META_KEY, max_size=SMALL_JSON_MAX))
    if doc.get("lock_days") == days and doc.get("lock_mode") == mode:
        apply_lock_policy(inner, doc)
        return False
    doc["lock_days"], doc["lock_mode"] = days, mode
    # replaced in place: a versioned bucket keeps the previous version (key-rotate does the same)
    storage.put(META_KEY, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    apply_lock_policy(inner, doc)
    return True
