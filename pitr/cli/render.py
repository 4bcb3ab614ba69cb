"""Output helpers: results on stdout (text or JSON), never logs."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

from pitr.units import human_duration as human_duration  # re-exported: the commands' one duration format

JSON_VERSION = 1  # shape version of every --json output that does not carry its own (docs/json.md)


def emit_json(obj: Mapping[str, Any]) -> None:
    """One JSON object on stdout, led by `version` (of its shape) and `pitr_version` (docs/json.md)."""
    from pitr import __version__

    head = {"version": obj.get("version", JSON_VERSION), "pitr_version": __version__}
    sys.stdout.write(json.dumps(head | dict(obj), indent=2, sort_keys=False, default=str) + "\n")


def emit(text: str) -> None:
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table (stable for scripts and tests; rich is not needed here)."""
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    return "\n".join(lines)
