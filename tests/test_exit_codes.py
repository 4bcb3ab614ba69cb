"""docs/exit-codes.md and pitr/errors.py say the same thing: every class, its status, wal-fetch's mapping."""

from __future__ import annotations

import re
from pathlib import Path

from pitr import errors
from pitr.errors import EXIT_FETCH_HARD, all_error_classes

DOC = Path(__file__).resolve().parent.parent / "docs" / "exit-codes.md"


def table_rows(section: str) -> list[list[str]]:
    """Cells of the markdown table under the `## section` heading (header and rule skipped)."""
    text = DOC.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines()
            if line.startswith("|")]
    return rows[2:]


def test_every_status_is_documented() -> None:
    documented = {int(r[0]) for r in table_rows("Statuses")}
    used = {c.exit_code for c in all_error_classes()} | {0, EXIT_FETCH_HARD}
    assert used <= documented, used - documented
    assert EXIT_FETCH_HARD > 125  # PostgreSQL's limit for "not available"


def test_every_error_class_is_documented_with_its_status() -> None:
    rows = {r[0].strip("`"): r for r in table_rows("Error classes")}
    classes = {c.__name__: c for c in all_error_classes()}
    assert set(rows) == set(classes), set(rows) ^ set(classes)
    for name, cls in classes.items():
        _, code, fetch_code, meaning = rows[name]
        assert int(code) == cls.exit_code, name
        assert int(fetch_code) == (1 if issubclass(cls, errors.NotFoundError) else EXIT_FETCH_HARD), name
        assert meaning, name


def test_error_classes_document_themselves() -> None:
    for cls in all_error_classes():
        assert cls.__doc__ and re.search(r"\w", cls.__doc__), cls.__name__
        assert 0 <= cls.exit_code <= 255
