"""The one error every checkpoint problem becomes, and the wording its messages share."""

from __future__ import annotations

import os
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint could not be used. The message names the file and says what to do."""

    def __init__(self, path: str | os.PathLike | None, problem: str, fix: str = "") -> None:
        where = f"{os.fspath(path)}: " if path is not None else ""
        text = f"{where}{problem}"
        if fix:
            text += f" {fix}"
        super().__init__(text)
        self.path = os.fspath(path) if path is not None else None


def describe_size(path: str | os.PathLike) -> str:
    """``"1,234 bytes"`` for a message, or ``"unknown size"`` when the file cannot be examined."""
    try:
        return f"{Path(path).stat().st_size:,} bytes"
    except OSError:
        return "unknown size"


def with_article(noun: str) -> str:
    """``noun`` with "a" or "an" as it is read aloud: "an Inf-DiT", "an SDXL checkpoint", "a UNet", "a VAE"."""
    word = noun.split(maxsplit=1)[0] if noun.strip() else noun
    spoken_vowel = word[:1].lower() in "aeiou" and not word.lower().startswith(("uni", "une", "use", "eu"))
    if word[:2] == "UN" or word.startswith("UNet"):
        spoken_vowel = False
    # an acronym read letter by letter ("SD", "F1", "MLP") starts with a vowel sound for these letters
    acronym = len(word) > 1 and (word[:2].isupper() or any(c.isdigit() for c in word[:3])) and word[:1].isupper()
    if acronym and word[0] in "AEFHILMNORSX":
        spoken_vowel = True
    return f"{'an' if spoken_vowel else 'a'} {noun}"


def short_list(items: list[str], limit: int = 6) -> str:
    """The first ``limit`` items joined by commas, then "and N more"."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
