"""pg_waldump output -> find-target facts: PostgreSQL 15 and 18 record formats, relfilenode chains."""
# ruff: noqa: E501  (pg_waldump lines are long)

from __future__ import annotations

from pitr.ops.surgical.find_target import relate
from pitr.pg.waldump import parse

PG15 = """\
rmgr: Heap        len (rec/tot):     54/    54, tx:        730, lsn: 0/01773B18, prev 0/017737F8, desc: DELETE off 1 flags 0x00 KEYS_UPDATED , blkref #0: rel 1663/5/16384 blk 0
rmgr: Heap        len (rec/tot):     54/    54, tx:        730, lsn: 0/01773B50, prev 0/01773B18, desc: DELETE off 2 flags 0x00 KEYS_UPDATED , blkref #0: rel 1663/5/16384 blk 0
rmgr: Heap        len (rec/tot):     54/    54, tx:        730, lsn: 0/01773B60, prev 0/01773B18, desc: DELETE off 2 flags 0x00 KEYS_UPDATED , blkref #0: rel 1663/6/16384 blk 0
rmgr: Transaction len (rec/tot):     34/    34, tx:        730, lsn: 0/01773BC0, prev 0/01773B88, desc: COMMIT 2026-11-29 23:25:03.999982 UTC
rmgr: Heap        len (rec/tot):     69/    69, tx:        731, lsn: 0/01773BE8, prev 0/01773BC0, desc: HOT_UPDATE off 10 xmax 731 flags 0x20 ; new off 21 xmax 0, blkref #0: rel 1663/5/16384 blk 0
rmgr: Transaction len (rec/tot):     34/    34, tx:        731, lsn: 0/01773CC0, prev 0/01773C78, desc: COMMIT 2026-11-29 23:25:04.008852 UTC
rmgr: Heap        len (rec/tot):     54/    54, tx:        732, lsn: 0/01773CE8, prev 0/01773CC0, desc: DELETE off 15 flags 0x00 KEYS_UPDATED , blkref #0: rel 1663/5/16384 blk 0
rmgr: Transaction len (rec/tot):     34/    34, tx:        732, lsn: 0/01773D20, prev 0/01773CE8, desc: ABORT 2026-11-29 23:25:04.017232 UTC
rmgr: Heap        len (rec/tot):     54/    54, tx:        734, lsn: 0/01773D48, prev 0/01773D20, desc: DELETE off 16 flags 0x00 KEYS_UPDATED , blkref #0: rel 1663/5/16384 blk 0
rmgr: Transaction len (rec/tot):     46/    46, tx:        733, lsn: 0/01773D80, prev 0/01773D48, desc: COMMIT 2026-11-29 23:25:04.025300 UTC; subxacts: 734
rmgr: Storage     len (rec/tot):     42/    42, tx:        736, lsn: 0/01778A08, prev 0/017789D8, desc: CREATE base/5/16398
rmgr: Storage     len (rec/tot):     42/    42, tx:        736, lsn: 0/0178BE60, prev 0/0178BE30, desc: CREATE base/5/16401
rmgr: XLOG        len (rec/tot):     49/   649, tx:        736, lsn: 0/01790C88, prev 0/01790C58, desc: FPI , blkref #0: rel 1663/5/16398 blk 0 FPW
rmgr: Transaction len (rec/tot):   2561/  2561, tx:        736, lsn: 0/01798298, prev 0/01798260, desc: COMMIT 2026-11-29 23:25:04.049648 UTC; rels: base/5/16384 base/5/16387 base/5/16388; dropped stats: 2/5/16401 2/5/16398; inval msgs: catcache 80
rmgr: Heap        len (rec/tot):     54/    54, tx:        738, lsn: 0/01799000, prev 0/01798298, desc: DELETE off 3 flags 0x00 KEYS_UPDATED , blkref #0: rel 1663/5/16398 blk 0
rmgr: Transaction len (rec/tot):     34/    34, tx:        738, lsn: 0/01799100, prev 0/01799000, desc: COMMIT 2026-11-29 23:25:05.000000 UTC
rmgr: Storage     len (rec/tot):     42/    42, tx:        739, lsn: 0/01799200, prev 0/01799100, desc: CREATE pg_tblspc/16500/PG_15_202209061/5/16410
rmgr: Transaction len (rec/tot):    114/   114, tx:        739, lsn: 0/01799300, prev 0/01799200, desc: COMMIT 2026-11-29 23:25:06.000000 UTC; rels: base/5/16398; inval msgs: relcache 16391
rmgr: Transaction len (rec/tot):    114/   114, tx:        740, lsn: 0/01799400, prev 0/01799300, desc: COMMIT 2026-11-29 23:25:07.000000 UTC; rels: pg_tblspc/16500/PG_15_202209061/5/16410; dropped stats: 2/5/16410
"""

PG18_DELETE = ("rmgr: Heap        len (rec/tot):     54/    54, tx:        758, lsn: 0/0172E930, prev 0/0172E610, "
               "desc: DELETE xmax: 758, off: 1, infobits: [KEYS_UPDATED], flags: 0x00, blkref #0: rel 1663/5/16384 blk 0")
PG18_UPDATE = ("rmgr: Heap        len (rec/tot):     69/    69, tx:        759, lsn: 0/0172EA00, prev 0/0172E9D8, "
               "desc: HOT_UPDATE old_xmax: 759, old_off: 10, old_infobits: [], flags: 0x20, new_xmax: 0, new_off: 21, "
               "blkref #0: rel 1663/5/16384 blk 0")


def test_parse_keeps_only_the_database_and_aggregates() -> None:
    f = parse(PG15, 5)
    assert f.heap[(730, 16384, "delete")] == 2  # the row in database 6 is not ours
    assert f.heap[(731, 16384, "hot_update")] == 1
    assert f.creates[736] == {16398, 16401} and (736, 16398) in f.written
    ends = {e.xid: e for e in f.ends}
    assert ends[732].status == "aborted" and ends[733].subxacts == [734]
    assert ends[736].drops == {16384, 16387, 16388}  # not the "dropped stats" numbers
    assert ends[730].time == "2026-11-29 23:25:03.999982 UTC" and ends[730].lsn == "0/01773BC0"
    assert f.creates[739] == {16410} and ends[740].drops == {16410}  # tablespace paths


def test_parse_pg18_format() -> None:
    f = parse(PG18_DELETE + "\n" + PG18_UPDATE, 5)
    assert f.heap[(758, 16384, "delete")] == 1 and f.heap[(759, 16384, "hot_update")] == 1


def test_relate_follows_rewrites_and_finds_truncate_and_drop() -> None:
    f = parse(PG15, 5)
    # the table's last file is 16410 (TRUNCATE 739 made it from 16398, which VACUUM FULL 736 made from
    # 16384), dropped by 740 (a table given by --relfilenode 16410)
    out = {x.xid: x for x in relate([f], 16410)}
    assert out[730].rows == {"delete": 2} and out[730].kinds == ["delete"]
    assert out[730].target == "--target-xid 730 --target-exclusive"
    assert out[732].harmless and out[732].target is None
    assert 734 not in out and out[733].rows == {"delete": 1}  # a subtransaction's work counts for its top
    assert out[736].kinds == ["rewrite"] and out[739].kinds == ["truncate"]
    assert out[738].rows == {"delete": 1}
    assert 740 in out and out[740].kinds == ["drop"]
    order = [x.xid for x in relate([f], 16410)]
    assert order == sorted(order)
    # another table of the database: nothing
    assert relate([f], 99999) == []
