"""English wording shared by every message the pack shows (errors, plans, benchmark reports)."""

from __future__ import annotations

__all__ = ["count"]


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural when ``n`` is not 1: ``count(1, "pass")`` -> "1 pass", ``count(2, "pass")`` ->
    "2 passes"."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}" + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
