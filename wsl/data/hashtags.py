"""Hashtag text: canonical form, extraction from captions, synonym files.

Every place that compares hashtags goes through `canonical_tag`, so `#Cat`, `cat` and the
full-width `＃ｃａｔ` are one tag everywhere (shards, vocabulary, training targets).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from wsl.errors import WslError

# A hashtag is '#' (or the full-width '＃') followed by word characters, in any script.
_HASHTAG_RE = re.compile(r"[#＃](\w+)")


def canonical_tag(tag: str) -> str:
    """NFKC-normalise, case-fold and strip leading '#' and whitespace."""
    tag = unicodedata.normalize("NFKC", tag).strip().lstrip("#").strip()
    return tag.casefold()


def extract_hashtags(caption: str) -> list[str]:
    """The hashtags in a caption, as typed (without '#'), in order of appearance."""
    return _HASHTAG_RE.findall(unicodedata.normalize("NFKC", caption))


def unique_canonical(tags: list[str]) -> list[str]:
    """Canonical forms of `tags`, first occurrence kept, empty tags dropped."""
    seen: dict[str, None] = {}
    for tag in tags:
        canonical = canonical_tag(tag)
        if canonical:
            seen.setdefault(canonical, None)
    return list(seen)


def load_synonyms(path: str | Path) -> dict[str, list[str]]:
    """Read a synonym file: one class a line, `canonical: synonym, synonym ...`.

    Separators may be ':', ',' or whitespace; the first tag of a line is the class name;
    '#' starts a comment only at the beginning of a line (tags may be written with '#').
    Returns {canonical: [synonyms]}, all in canonical form.
    """
    path = Path(path)
    if not path.is_file():
        raise WslError(f"synonym file not found: {path}")
    groups: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("# ") or line.strip() == "#":
            continue
        tags = unique_canonical(re.split(r"[:,\s]+", line))
        if not tags:
            continue
        head, synonyms = tags[0], tags[1:]
        for tag in tags:
            if tag in owner and owner[tag] != head:
                raise WslError(
                    f"{path}:{line_no}: '{tag}' is already a synonym of '{owner[tag]}'; "
                    "a tag can belong to one class only"
                )
            owner[tag] = head
        groups.setdefault(head, [])
        groups[head] += [s for s in synonyms if s not in groups[head]]
    return groups
