"""Decode one WAL segment with `pg_waldump` into the few facts `find-target` needs.

pg_waldump's text output is the interface (stable across 15..18 for what we read):

    rmgr: Heap   ... tx: 758, lsn: 0/0172E930, ... desc: DELETE ..., blkref #0: rel 1663/5/16384 blk 0
    rmgr: Storage ... tx: 763, lsn: ..., desc: CREATE base/5/16398
    rmgr: XLOG   ... tx: 764, lsn: ..., desc: FPI , blkref #0: rel 1663/5/16403 blk 0 FPW
    rmgr: Transaction ... tx: 765, lsn: ..., desc: COMMIT 2026-11-29 23:25:11.685736 UTC; subxacts: 762;
          rels: base/5/16395; dropped stats: ...

Only records of one database are kept (the table's), aggregated per transaction, so a segment of
100,000 records becomes a handful of counters. A segment is decoded with the following one beside
it (when the archive has it) and `-e` at the next segment's start, so a record that crosses the
boundary is read exactly once, by the segment it starts in.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pitr.errors import PitrError

_HEAD = re.compile(r"^rmgr: (\w+)\s.*?tx:\s+(\d+), lsn: ([0-9A-F]+/[0-9A-F]+),.*?desc: (.*)$")
_BLK = re.compile(r"blkref #\d+: rel (\d+)/(\d+)/(\d+)")
# base/DB/REL, pg_tblspc/SPC/PG_xx_yyy/DB/REL, global/REL (shared: never a user table)
_PATH = re.compile(r"(?:base|pg_tblspc/\d+/[^/\s]+)/(\d+)/(\d+)")
_XACT = re.compile(r"^(COMMIT|ABORT) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \S+)")
HEAP_KINDS = {"DELETE": "delete", "UPDATE": "update", "HOT_UPDATE": "hot_update", "TRUNCATE": "truncate"}


@dataclass
class XactEnd:
    """A COMMIT or ABORT record."""

    xid: int
    status: str  # committed | aborted
    time: str  # as pg_waldump prints it: '2026-11-29 23:25:11.685736 UTC'
    lsn: str
    drops: set[int] = field(default_factory=set)  # relfilenodes in the table's database
    subxacts: list[int] = field(default_factory=list)


@dataclass
class SegmentFacts:
    """What one segment says about relations of one database."""

    heap: Counter[tuple[int, int, str]] = field(default_factory=Counter)  # (xid, relfilenode, kind) -> rows
    creates: dict[int, set[int]] = field(default_factory=dict)  # xid -> relfilenodes created
    written: set[tuple[int, int]] = field(default_factory=set)  # (xid, relfilenode) with full pages (a rewrite)
    ends: list[XactEnd] = field(default_factory=list)
    first_lsn: str | None = None
    last_lsn: str | None = None
    records: int = 0  # lines pg_waldump printed


def parse(lines: Iterable[str] | str, dboid: int) -> SegmentFacts:
    """The facts about database `dboid` in pg_waldump output (streamed: a segment's text is large)."""
    facts = SegmentFacts()
    text = lines.splitlines() if isinstance(lines, str) else lines
    db = str(dboid)
    in_db = f"/{db}/"
    n = 0
    for line in text:
        n += 1
        # cheap string tests first: most records are of other kinds or other relations
        if line.startswith("rmgr: Heap "):
            if in_db not in line:
                continue
        elif line.startswith("rmgr: Transaction"):
            if "desc: COMMIT " not in line and "desc: ABORT " not in line:
                continue
        elif line.startswith("rmgr: Storage"):
            if "desc: CREATE " not in line or in_db not in line:
                continue
        elif line.startswith("rmgr: XLOG"):
            if "desc: FPI ," not in line or in_db not in line:
                continue
        else:
            continue
        m = _HEAD.match(line)
        if not m:
            continue
        rmgr, xid, lsn, desc = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if facts.first_lsn is None:
            facts.first_lsn = lsn
        facts.last_lsn = lsn
        if rmgr == "Heap":
            kind = HEAP_KINDS.get(desc.split(" ", 1)[0])
            if kind is None or kind == "truncate":  # logical-level TRUNCATE names table OIDs, not files
                continue
            for r in {int(r) for _s, d, r in _BLK.findall(desc) if d == db}:
                facts.heap[(xid, r, kind)] += 1
        elif rmgr == "Storage":
            for d, r in _PATH.findall(desc):
                if d == db:
                    facts.creates.setdefault(xid, set()).add(int(r))
        elif rmgr == "XLOG":
            if xid:
                for _s, d, r in _BLK.findall(desc):
                    if d == db:
                        facts.written.add((xid, int(r)))
        else:
            x = _XACT.match(desc)
            if not x:
                continue
            end = XactEnd(xid, "committed" if x.group(1) == "COMMIT" else "aborted", x.group(2), lsn)
            for part in desc.split("; "):
                if part.startswith("rels: "):
                    end.drops = {int(r) for d, r in _PATH.findall(part) if d == db}
                elif part.startswith("subxacts: "):
                    end.subxacts = [int(s) for s in part[10:].split() if s.isdigit()]
            facts.ends.append(end)
    facts.records = n
    return facts


def decode(pg_waldump: Path, waldir: Path, timeline: int, start: str, end: str | None, dboid: int,
           timeout: float = 600) -> SegmentFacts:
    """Run pg_waldump over [start, end) in waldir; PitrError when it cannot read the segment at all."""
    argv = [str(pg_waldump), "-p", str(waldir), "-t", str(timeline), "-s", start]
    if end:
        argv += ["-e", end]
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                    bufsize=1 << 20)
        except OSError as e:
            raise PitrError(f"pg_waldump could not be run on {waldir.name}: {e}") from None
        assert proc.stdout is not None
        try:
            facts = parse(proc.stdout, dboid)  # streamed: memory stays small whatever the segment holds
            rc = proc.wait(timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if rc != 0 and facts.records == 0:
        why = (stderr.strip().splitlines() or ["no output"])[-1]
        raise PitrError(f"pg_waldump could not decode WAL from {start}: {why}")
    # a non-zero exit after output is the end of the readable WAL (the last archived segment ends
    # in zeroes, or a timeline switch): the records before it are complete
    return facts
