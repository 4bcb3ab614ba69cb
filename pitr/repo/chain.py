"""Chains of differential and incremental backups: pure functions over manifests.

A diff or incr backup builds on its `parent` (docs/repository-format.md §6.2); restoring it needs
every ancestor up to the root full backup, and every backup its file entries name (`ref`,
`sources[].backup`), all of which must lie in that chain. Nothing here reads storage: callers
pass the manifests they read (and the IDs they could not read), so restore, verify, info and
expire judge a chain the same way.

A chain is whole when, walking from a backup to its root:
- every parent is present and readable, and has the child's system identifier and major version;
- no parent started after its child (a walk also stops at a backup it has seen: no cycles);
- a diff backup's parent is a full backup; an incr's parent is any backup; a full has no parent
  (a `parent` on a full manifest is ignored: restoring it needs nothing else);
- every backup a member's entries name is one of that member's ancestors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from pitr.repo.manifest import FileEntry, Manifest

TYPES = ("full", "diff", "incr")
PARENT_TYPES = {"diff": ("full",), "incr": TYPES}
MAX_CHAIN = 10000  # a longer walk can only be a hostile loop of manifests

Lookup = Callable[[str], "Manifest | None"]  # a manifest by ID, None when there is none (may read lazily)


@dataclass(frozen=True)
class Broken:
    """Why a backup's chain is not whole. `culprit` is the backup whose absence, unreadability or
    inconsistency breaks it (the one a user must look at), `reason` one sentence saying so."""

    backup: str
    culprit: str
    reason: str


def named_backups(e: FileEntry) -> set[str]:
    """IDs of the backups a file entry takes bytes from (its `ref`, its `sources`, its map's `base`),
    itself aside. Read with getattr: manifests written before these fields existed have none."""
    out: set[str] = set()
    ref = getattr(e, "ref", None)
    if isinstance(ref, str):
        out.add(ref)
    loc = getattr(e, "map", None)
    if isinstance(loc, dict) and isinstance(loc.get("base"), str):
        out.add(loc["base"])
    sources = getattr(e, "sources", None)
    if isinstance(sources, list):
        for s in sources:
            b = s.get("backup") if isinstance(s, dict) else None
            if isinstance(b, str):
                out.add(b)
    return out


def _named(m: Manifest) -> set[str]:
    out: set[str] = set()
    for e in m.files:
        out |= named_backups(e)
    out.discard(m.id)
    return out


def _started(m: Manifest) -> datetime | None:
    try:
        t = datetime.fromisoformat(m.start_time.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _link_problem(child: Manifest, by_id: Mapping[str, Manifest], unreadable: Iterable[str]) -> Broken | None:
    """What is wrong with child's own link to its parent (not further up)."""
    if child.type not in TYPES:
        return Broken(child.id, child.id, f"backup {child.id} has the type {child.type!r}, which this pitr does "
                                          "not know (full, diff or incr)")
    if child.type == "full":
        return None
    pid = child.parent
    if not isinstance(pid, str) or not pid:
        return Broken(child.id, child.id, f"backup {child.id} is a {child.type} backup but names no parent")
    p = by_id.get(pid)
    if p is None:
        what = "unreadable" if pid in set(unreadable) else "missing"
        return Broken(child.id, pid, f"backup {child.id} builds on backup {pid}, which is {what}")
    if p.system_identifier != child.system_identifier:
        return Broken(child.id, pid, f"backup {child.id} builds on backup {pid} of another cluster "
                                     f"(system identifier {p.system_identifier}, not {child.system_identifier})")
    if p.pg_version != child.pg_version:
        return Broken(child.id, pid, f"backup {child.id} (PostgreSQL {child.pg_version}) builds on backup {pid} "
                                     f"of PostgreSQL {p.pg_version}")
    if p.type not in PARENT_TYPES[child.type]:
        rule = "a diff backup builds on a full one" if child.type == "diff" else "its type is unknown"
        return Broken(child.id, pid, f"backup {child.id} is a {child.type} backup built on backup {pid}, a "
                                     f"{p.type} backup; {rule}")
    ts, tp = _started(child), _started(p)
    if ts is None or tp is None or tp > ts:  # equal: start times of a test clock's resolution
        return Broken(child.id, pid, f"backup {child.id} builds on backup {pid}, which started after it")
    return None


def parent_chain(m: Manifest, by_id: Mapping[str, Manifest] | Lookup) -> list[Manifest]:
    """m's ancestors and m, root first, as far as they are present (no validation: see chain_problem).
    by_id: the manifests by ID, or a lookup called once per ancestor (repo/mapchain reads them lazily)."""
    lookup: Lookup = by_id.get if isinstance(by_id, Mapping) else by_id
    out = [m]
    seen = {m.id}
    cur = m
    while cur.type != "full" and isinstance(cur.parent, str) and len(out) < MAX_CHAIN:
        nxt = lookup(cur.parent)
        if nxt is None or nxt.id in seen:
            break
        cur = nxt
        seen.add(cur.id)
        out.append(cur)
    out.reverse()
    return out


def chain_problem(m: Manifest, by_id: Mapping[str, Manifest], unreadable: Iterable[str] = (),
                  memo: dict[str, Broken | None] | None = None) -> Broken | None:
    """Why m cannot be restored from its chain, or None when the chain is whole. by_id: every
    readable manifest; unreadable: IDs whose manifest exists but cannot be read; memo: a dict
    reused across calls over the same manifests (verify and info judge every backup)."""
    memo = {} if memo is None else memo
    bad = set(unreadable)
    chain = parent_chain(m, by_id)
    # judge from the root down, so each member's verdict can reuse its parent's
    for i, cur in enumerate(chain):
        if cur.id in memo:
            continue
        up = memo.get(chain[i - 1].id) if i > 0 else None
        # the root cause first: a broken ancestor breaks every descendant, named as it was
        verdict = Broken(cur.id, up.culprit, up.reason) if up is not None else _link_problem(cur, by_id, bad)
        if verdict is None and cur.type != "full" and i == 0:
            # the walk stopped below a full backup: a loop (every start precedes its child's: unreachable
            # unless the link check let it through) or a chain longer than MAX_CHAIN
            verdict = Broken(cur.id, cur.id, f"the chain of backup {cur.id} does not end at a full backup")
        if verdict is None:
            ancestors = {x.id for x in chain[:i]}
            for other in sorted(_named(cur) - ancestors):
                what = ("not one of its ancestors" if other in by_id
                        else "unreadable" if other in bad else "missing")
                verdict = Broken(cur.id, other, f"backup {cur.id} takes file contents from backup {other}, which is "
                                                f"{what}")
                break
        memo[cur.id] = verdict
    out = memo[m.id]
    if out is not None and out.backup != m.id:
        out = Broken(m.id, out.culprit, out.reason)
    return out


def chain_problems(manifests: Iterable[Manifest], unreadable: Iterable[str] = ()) -> dict[str, Broken]:
    """Every backup whose chain is not whole, by ID."""
    ms = list(manifests)
    by_id = {m.id: m for m in ms}
    bad = set(unreadable)
    memo: dict[str, Broken | None] = {}
    out: dict[str, Broken] = {}
    for m in ms:
        b = chain_problem(m, by_id, bad, memo)
        if b is not None:
            out[m.id] = b
    return out


def dependencies(m: Manifest, by_id: Mapping[str, Manifest]) -> set[str]:
    """The backups restoring m needs, m aside: its parent chain and every backup its entries (and
    theirs, transitively) name. Includes IDs that are not present (so a caller can say so)."""
    out: set[str] = set()
    todo = [m]
    while todo:
        cur = todo.pop()
        names = _named(cur)
        if cur.type != "full" and isinstance(cur.parent, str):
            names.add(cur.parent)
        for n in names - out - {m.id}:
            out.add(n)
            if n in by_id:
                todo.append(by_id[n])
    return out


def root_of(m: Manifest, by_id: Mapping[str, Manifest]) -> str | None:
    """The ID of the full backup m's chain starts from (m's own for a full), None if it has none."""
    first = parent_chain(m, by_id)[0]
    return first.id if first.type == "full" else None
