"""RepoStorage forwards the Storage interface by hand: a method added to Storage and not to
RepoStorage would silently act on the wrapper's defaults (plaintext, no key), so every public
method of the interface must be defined on the wrapper itself."""

from __future__ import annotations

import inspect

from pitr.repo.sealed import RepoStorage
from pitr.storage.base import Storage


def _public_methods(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if not n.startswith("_") and inspect.isfunction(v)}


def test_repo_storage_defines_every_storage_method() -> None:
    missing = _public_methods(Storage) - set(vars(RepoStorage))
    assert not missing, f"RepoStorage does not forward: {sorted(missing)}"
