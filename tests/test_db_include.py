"""restore --db-include: which files are left out, and refusals for old or hostile manifests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pitr.errors import RestoreError, UsageError
from pitr.ops.recovery import db_include


def _m(dbs: object) -> object:
    return SimpleNamespace(id="B1", extra={"databases": dbs} if dbs is not None else {})


def test_excluded_keeps_system_and_named_databases() -> None:
    m = _m({"1": "template1", "4": "template0", "5": "postgres", "16384": "shop", "16385": "other"})
    assert db_include.excluded(m, ["shop"]) == {16385: "other"}  # type: ignore[arg-type]


def test_unknown_name_is_a_usage_error_listing_the_databases() -> None:
    with pytest.raises(UsageError, match="'nope'.*no database") as e:
        db_include.excluded(_m({"5": "postgres", "16384": "shop"}), ["nope"])  # type: ignore[arg-type]
    assert "shop" in str(e.value.hint)


@pytest.mark.parametrize("dbs", [None, {}, {"x": "a"}, {"5": 7}])
def test_backup_without_a_usable_database_list_is_refused(dbs: object) -> None:
    with pytest.raises(RestoreError):
        db_include.excluded(_m(dbs), ["shop"])  # type: ignore[arg-type]


@pytest.mark.parametrize(("path", "out"), [
    ("base/16385/16390", True), ("base/16385/16390_fsm", True), ("base/16385/16390.1", True),
    ("pg_tblspc/16400/PG_15_202209061/16385/16390_vm", True),
    ("base/16385/PG_VERSION", False), ("base/16385/pg_filenode.map", False), ("base/16384/16390", False),
    ("global/1262", False),
])
def test_only_relation_files_of_left_out_databases_are_zeroed(path: str, out: bool) -> None:
    assert db_include.is_excluded(path, {16385}) is out
