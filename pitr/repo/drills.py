"""Drill records kept in the repository (drills/<id>.json): the proof that a restore worked.

`pitr drill` writes one record per run, passed or failed; `info`, `metrics` and
`check --max-drill-age` read the newest ones. The id starts with the drill's UTC start time
(YYYYMMDDTHHMMSSZ-<random>), so ids sort by time and the newest record is found from one
listing without reading the others. Each record is JSON inside the object envelope
(repo/envelope.py), like a manifest, so its bytes are checksummed and an encrypted repository can
seal it with the other objects (docs/repository-format.md).
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime
from typing import Any

from pitr.errors import IntegrityError, NotFoundError
from pitr.repo import envelope
from pitr.storage.base import Storage

PREFIX = "drills/"
RECORD_VERSION = 1
RECORD_MAX = 4 << 20  # a record is a few KiB; the repository is untrusted: a planted giant is refused


def new_id(now: float | None = None) -> str:
    t = time.time() if now is None else now
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t)) + "-" + secrets.token_hex(3)


def key_of(drill_id: str) -> str:
    return f"{PREFIX}{drill_id}.json"


def write(storage: Storage, record: dict[str, Any]) -> str:
    """Store a record under its id; returns the key."""
    key = key_of(str(record["id"]))
    raw = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    storage.put(key, envelope.encode(raw, envelope.Codec("none", 0)))
    return key


def read(storage: Storage, drill_id: str) -> dict[str, Any]:
    """One record; IntegrityError when its bytes are damaged or not a drill record."""
    raw = envelope.decode(storage.get(key_of(drill_id), max_size=RECORD_MAX), f"drill record {drill_id}",
                          max_size=RECORD_MAX)
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise IntegrityError(f"drill record {drill_id} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("passed"), bool) or not isinstance(d.get("started"), str):
        raise IntegrityError(f"drill record {drill_id} lacks its 'passed' or 'started' field")
    try:
        datetime.fromisoformat(d["started"].replace("Z", "+00:00"))
    except ValueError:
        raise IntegrityError(f"drill record {drill_id} has a malformed start time") from None
    return d


def list_ids(storage: Storage) -> list[str]:
    """Every drill id in the repository, oldest first (one listing)."""
    ids = [o.key[len(PREFIX):-len(".json")] for o in storage.list(PREFIX)
           if o.key.endswith(".json") and "/" not in o.key[len(PREFIX):]]
    return sorted(ids)


def newest(storage: Storage, ids: list[str] | None = None, passed_only: bool = False,
           limit: int = 50) -> dict[str, Any] | None:
    """The newest readable record (the newest passing one with passed_only), reading back at most `limit`."""
    for drill_id in reversed(list_ids(storage) if ids is None else ids):
        if limit <= 0:
            break
        limit -= 1
        try:
            rec = read(storage, drill_id)
        except (IntegrityError, NotFoundError):
            continue  # a damaged or vanished record is not proof; an older one may be
        if rec.get("passed") or not passed_only:
            return rec
    return None
