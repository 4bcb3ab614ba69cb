"""Durations in words, one way for every command's output and message (cli/render, ops/proof/check)."""

from __future__ import annotations


def human_duration(seconds: float | None) -> str:
    """12.3s, 5s, 4.5min, 2.0h, 3.1d; "-" for None (not known)."""
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 120:
        return f"{s:.0f}s" if s == int(s) else f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.1f}min"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"
