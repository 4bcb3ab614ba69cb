"""The store's conformance self-test (`pitr check --storage`, and the conditional-create part in `pitr init`).

pitr's safety rests on a few properties of the store that S3-compatible servers do not all have:
a conditional create that refuses an existing object and lets exactly one of racing writers win
(else a second cluster, or a restored copy, silently overwrites archived WAL), read-after-write,
complete sorted listings, multipart uploads, server-side checksum verification. Each is probed
with small objects under `.pitr-check/<random>/`, which are removed afterwards (best effort).
The probes run against the store itself (Storage.native()), never against pitr's emulation.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import uuid
from dataclasses import dataclass

from pitr.errors import AlreadyExistsError, PitrError, StorageError
from pitr.ops.proof.check import CheckResult
from pitr.repo.format import META_KEY
from pitr.repo.meta import SMALL_JSON_MAX
from pitr.repo.sealed import lock_policy, parse_meta_doc
from pitr.storage.base import UNSAFE_STORE_HINT, Storage

log = logging.getLogger("pitr.storecheck")

PROBE_PREFIX = ".pitr-check/"
RACERS = 8
CONDITIONAL = ("conditional-create", "atomic-conditional-create")


@dataclass(frozen=True)
class Property:
    name: str
    ok: bool
    detail: str


def conformance(storage: Storage, *, full: bool = True) -> list[Property]:
    """Probe the store; `full` adds listing, multipart and checksums to the conditional-create core."""
    st = storage.native()
    base = f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}/"
    out: list[Property] = []
    try:
        out.append(_read_after_write(st, base))
        out.append(_second_create(st, base))
        out.append(_racing_creates(st, base))
        if full:
            out.append(_listing(st, base))
            out.append(_multipart(st, base))
            chk = _checksums(st, base)
            if chk is not None:
                out.append(chk)
    finally:
        _cleanup(st, base)
        if st is not storage:
            st.close()
    return out


def storage_check(storage: Storage, allow_unsafe: bool) -> CheckResult:
    """`pitr check --storage`: every property as a check point; a conditional-create failure the
    user accepted (allow_unsafe_store) is shown but does not fail the check."""
    res = CheckResult()
    for p in conformance(storage, full=True):
        if not p.ok and allow_unsafe and p.name in CONDITIONAL:
            res.add(p.name, True, f"{p.detail} (accepted: allow_unsafe_store = true)")
        else:
            res.add(p.name, p.ok, p.detail, UNSAFE_STORE_HINT if p.name in CONDITIONAL else
                    "use a store that has this property (docs/configuration.md)")
    lock = _object_lock(storage)
    if lock is not None:
        res.add(lock.name, lock.ok, lock.detail, "the repository's pitr.json asks for Object Lock: use a bucket "
                "created with Object Lock enabled (docs/runbook.md 4.9)")
    return res


def _object_lock(storage: Storage) -> Property | None:
    """When pitr.json records a lock policy (read when the repository was opened): the bucket still
    has Object Lock enabled. None when no policy is recorded."""
    inner = getattr(storage, "inner", storage)
    if not hasattr(inner, "object_lock_enabled"):
        return None
    try:  # the plain part of pitr.json: no key needed
        policy = lock_policy(parse_meta_doc(inner.get(META_KEY, max_size=SMALL_JSON_MAX)))
    except PitrError:
        return None  # not initialized, or unreadable: other commands say so
    if policy is None:
        return None
    try:
        on = bool(inner.object_lock_enabled())
    except PitrError as e:
        return Property("object-lock", False, f"cannot read the bucket's Object Lock configuration: {e}")
    mode, days = policy
    return Property("object-lock", on, f"objects are written under a {mode} retention of {days} days"
                    if on else "pitr.json records an Object Lock policy but the bucket does not have Object Lock "
                    "enabled")


def require_conditional_create(storage: Storage, allow_unsafe: bool) -> list[Property]:
    """The `init` gate: raise StorageError when the store's conditional create does not hold,
    unless the user accepted that (then the failures are returned, for a warning)."""
    bad = [p for p in conformance(storage, full=False) if not p.ok]
    if not bad:
        return []
    unsafe = [p for p in bad if p.name in CONDITIONAL]
    if not unsafe or not allow_unsafe:
        raise StorageError(f"the store behind {storage.display} fails pitr's conformance test: "
                           + "; ".join(f"{p.name}: {p.detail}" for p in bad),
                           UNSAFE_STORE_HINT if unsafe and len(unsafe) == len(bad) else None)
    return bad


def _body(tag: str) -> bytes:
    return f"pitr store probe {tag} {uuid.uuid4().hex}\n".encode() + os.urandom(64)


def _read_after_write(st: Storage, base: str) -> Property:
    name = "read-after-write"
    key, body = base + "raw", _body("raw")
    try:
        st.put(key, body)
        got = st.get(key)
        info = st.stat(key)
    except PitrError as e:
        return Property(name, False, f"writing and reading back a probe failed: {e}")
    if got != body or info is None or info.size != len(body):
        return Property(name, False, "an object read right after it was written is missing or different")
    return Property(name, True, "an object reads back whole right after it is written")


def _second_create(st: Storage, base: str) -> Property:
    name = "conditional-create"
    key, first = base + "once", _body("first")
    try:
        st.put(key, first, if_absent=True)
        try:
            st.put(key, _body("second"), if_absent=True)
        except AlreadyExistsError:
            kept = st.get(key) == first
            return Property(name, kept, "a create of an existing object is refused" if kept else
                            "a create of an existing object was refused, yet the object changed")
    except PitrError as e:
        return Property(name, False, f"a conditional create failed: {e}")
    replaced = st.get(key) != first
    return Property(name, False, "a create of an existing object was accepted"
                    + (" and replaced it (If-None-Match is ignored)" if replaced else ""))


def _racing_creates(st: Storage, base: str) -> Property:
    name = "atomic-conditional-create"
    key = base + "race"
    bodies = [_body(f"racer{i}") for i in range(RACERS)]
    won: list[int] = []
    errors: list[str] = []
    gate = threading.Barrier(RACERS)

    def race(i: int) -> None:
        try:
            gate.wait(timeout=30)
            st.put(key, bodies[i], if_absent=True)
            won.append(i)
        except AlreadyExistsError:
            pass
        except (PitrError, threading.BrokenBarrierError) as e:
            errors.append(str(e))

    threads = [threading.Thread(target=race, args=(i,), name=f"pitr-race-{i}") for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        return Property(name, False, f"racing conditional creates failed: {errors[0]}")
    try:
        final = st.get(key)
    except PitrError as e:
        return Property(name, False, f"the object racing creates made cannot be read: {e}")
    if len(won) != 1:
        return Property(name, False, f"{len(won)} of {RACERS} racing creates of one object were acknowledged")
    if final != bodies[won[0]]:
        return Property(name, False, "the one acknowledged racing create is not what the object holds")
    return Property(name, True, f"of {RACERS} racing creates of one object exactly one wins")


def _listing(st: Storage, base: str) -> Property:
    name = "listing"
    want = {f"{base}list/{i:02d}": _body(f"list{i}") for i in (3, 1, 2)}
    try:
        for k, v in want.items():
            st.put(k, v)
        got = [(o.key, o.size) for o in st.list(base + "list/")]
    except PitrError as e:
        return Property(name, False, f"listing probes failed: {e}")
    expected = sorted((k, len(v)) for k, v in want.items())
    if got != expected:
        return Property(name, False, f"listing returned {got}, expected {expected} (every object, sorted, with sizes)")
    return Property(name, True, "listings are complete, sorted and give sizes")


def _multipart(st: Storage, base: str) -> Property:
    name = "multipart"
    part = int(getattr(st, "part_size", 1 << 20))
    data = os.urandom(1 << 16) * (part // (1 << 16) + 1)  # more than one part: the multipart path
    key = base + "multipart"
    try:
        st.put(key, io.BytesIO(data))
        same = st.get(key) == data
    except PitrError as e:
        return Property(name, False, f"a {len(data)}-byte streamed upload failed: {e}")
    return Property(name, same, f"a {len(data)}-byte streamed upload reads back whole" if same else
                    f"a {len(data)}-byte streamed upload reads back different")


def _checksums(st: Storage, base: str) -> Property | None:
    name = "checksums"
    try:
        refused = st.rejects_bad_checksum(base + "checksum")
    except PitrError as e:
        return Property(name, False, f"the checksum probe failed: {e}")
    if refused is None:
        return None
    return Property(name, refused, "an upload whose SHA-256 does not match its body is refused" if refused else
                    "an upload whose SHA-256 does not match its body was stored: the store does not verify "
                    "checksums, so corruption in transit goes unnoticed until a read")


def _cleanup(st: Storage, base: str) -> None:
    try:
        st.delete_prefix(base)
    except PitrError as e:  # a locked or read-only store keeps them; they are tiny and out of the way
        log.warning("could not remove the store probes under %s: %s", base, e)
