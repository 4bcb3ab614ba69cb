"""`pitr key-rotate`: re-wrap an encrypted repository's data key under a new key.

One small write (pitr.json, replaced atomically); the data key and so every object stay as they
are, and the time taken does not depend on the repository's size. The current key must open the
repository first, so a wrong current key changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from pitr.errors import EncryptionKeyError
from pitr.repo import keys
from pitr.repo.format import META_KEY
from pitr.repo.meta import read_meta
from pitr.repo.sealed import RepoStorage, parse_meta_doc
from pitr.storage.base import Storage


@dataclass(frozen=True)
class RotateResult:
    kind: str  # "key-file" | "passphrase": what opens the repository now


def rotate(storage: Storage, new: keys.KeySource) -> RotateResult:
    if not isinstance(storage, RepoStorage):
        raise TypeError("key-rotate needs a RepoStorage")
    read_meta(storage)  # initialized? opened with the current key (refused when missing or wrong)
    if not storage.encrypted:
        raise EncryptionKeyError(f"the repository {storage.display} is not encrypted; there is no key to rotate",
                                 "encrypted repositories are made by `pitr init --encrypt` under a new prefix")
    doc = parse_meta_doc(storage.inner.get(META_KEY))
    data_key = keys.unwrap(doc["encryption"], storage.require_key(), storage.display)
    doc["encryption"] = keys.wrap(data_key, new)
    body = (_dumps(doc) + "\n").encode()
    storage.inner.put(META_KEY, body)  # atomic replace: readers see the old or the new wrapping
    storage.adopt(data_key, body)
    # read it back: the new key must open what was written before we report success
    check = parse_meta_doc(storage.inner.get(META_KEY))
    if keys.unwrap(check["encryption"], new, storage.display) != data_key:
        raise EncryptionKeyError("the rewritten pitr.json does not open with the new key")
    return RotateResult(new.kind)


def _dumps(doc: dict[str, object]) -> str:
    import json

    return json.dumps(doc, indent=2, sort_keys=True)


__all__ = ["RotateResult", "rotate"]
