"""`pitr init`: bind a repository to one cluster (system identifier, major version, segment size).

With encrypt=True the repository is encrypted from its first object: a random data key is wrapped
under the user's key and written in pitr.json (docs/repository-format.md §9).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pitr.errors import AlreadyExistsError, EncryptionKeyError, NotFoundError, NotInitializedError
from pitr.ops.admin.storecheck import require_conditional_create
from pitr.pg.conn import ServerInfo
from pitr.repo import keys
from pitr.repo.crypto import ObjectCipher
from pitr.repo.format import META_KEY
from pitr.repo.meta import RepoMeta, check_cluster, encrypted_meta_json, new_meta, read_meta
from pitr.repo.sealed import RepoStorage, parse_meta_doc
from pitr.storage.base import Storage

log = logging.getLogger("pitr.init")


@dataclass(frozen=True)
class InitResult:
    meta: RepoMeta
    created: bool
    encrypted: bool = False


def init_repo(storage: Storage, server: ServerInfo, allow_unsafe_store: bool = False,
              encrypt: bool = False) -> InitResult:
    """Write the metadata once; same cluster again is a no-op; another cluster is refused.

    First the store must prove its conditional create (racing creates: exactly one wins; a second
    create refused), on every run: a store that fails is refused unless the user accepted it."""
    if encrypt and isinstance(storage, RepoStorage):
        storage.require_key_for_init()  # no key: refused before the store is probed or written
    storage.create()
    for p in require_conditional_create(storage, allow_unsafe_store):
        log.warning("the store %s fails %s (%s); accepted because allow_unsafe_store is set",
                    storage.display, p.name, p.detail)
    if encrypt:
        return _init_encrypted(storage, server)
    try:
        meta = read_meta(storage)
    except NotInitializedError:
        meta = new_meta(server.system_identifier, server.major, server.wal_segment_size)
        try:
            storage.put(META_KEY, meta.to_json(), if_absent=True)
            return InitResult(meta, True)
        except AlreadyExistsError:
            meta = read_meta(storage)  # a concurrent init won: judge its result like any other
    check_cluster(meta, server.system_identifier, storage)
    return InitResult(meta, False, _encrypted(storage))


def _encrypted(storage: Storage) -> bool:
    return isinstance(storage, RepoStorage) and storage.encrypted


def _init_encrypted(storage: Storage, server: ServerInfo) -> InitResult:
    if not isinstance(storage, RepoStorage):
        raise TypeError("init --encrypt needs a RepoStorage")
    inner = storage.inner
    try:
        existing = inner.get(META_KEY)
    except NotFoundError:
        existing = None
    if existing is None:
        key = storage.require_key_for_init()
        data_key = os.urandom(32)
        meta = new_meta(server.system_identifier, server.major, server.wal_segment_size, encrypted=True)
        sealed = ObjectCipher(data_key).seal(META_KEY, meta.to_json())
        body = encrypted_meta_json(meta, keys.wrap(data_key, key), sealed)
        try:
            inner.put(META_KEY, body, if_absent=True)
            storage.adopt(data_key, body)
            return InitResult(meta, True, True)
        except AlreadyExistsError:
            existing = inner.get(META_KEY)  # a concurrent init won: judge it like any other
    if "encryption" not in parse_meta_doc(existing):
        raise EncryptionKeyError(
            f"the repository {storage.display} already exists unencrypted; it cannot be encrypted in place",
            "initialize an encrypted repository under a new prefix or directory and take a new backup there")
    meta = read_meta(storage)  # unlocks with the key: a wrong or missing one is refused here
    check_cluster(meta, server.system_identifier, storage)
    return InitResult(meta, False, True)
