"""The six synthetic skills: deterministic prompt/answer generators shared by the task data and the zoo trainer.

Every document is ``{"prompt": str, "answer": str}``. A prompt opens with its skill's tag token (``[add]``, ...) and
ends with ``=``; the model must produce ``answer`` followed by a newline. Formats (chosen so that a 4-layer model can
learn every skill in minutes on a CPU):

- ``add``: two 3-digit operands (zero-padded) written least-significant digit first, the 4-digit sum likewise:
  123 + 456 = 579 is ``[add]321+654=`` -> ``9750``.
- ``reverse``: ``[reverse]abcde=`` -> ``edcba`` (3-8 distinct letters).
- ``sort``: ``[sort]dbca=`` -> ``abcd`` (3-8 distinct letters).
- ``copy``: ``[copy]abcd=`` -> ``abcd`` (3-8 letters, repeats allowed).
- ``lookup``: query key first, then 3-5 key/value pairs: ``[lookup]c?a1b2c3d4=`` -> ``3``.
- ``count``: query letter first, then 3-8 letters from ``a``-``e``: ``[count]a?abacad=`` -> ``3``.
"""
from __future__ import annotations

import random
import string
from collections.abc import Callable

SKILLS: tuple[str, ...] = ("add", "reverse", "sort", "copy", "lookup", "count")
LETTERS = string.ascii_lowercase
COUNT_ALPHABET = "abcde"


def tag(skill: str) -> str:
    """The tag token that opens every prompt of ``skill``."""
    return f"[{skill}]"


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(1000), rng.randrange(1000)
    return f"{a:03d}"[::-1] + "+" + f"{b:03d}"[::-1], f"{a + b:04d}"[::-1]


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.sample(LETTERS, rng.randint(3, 8)))
    return s, s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.sample(LETTERS, rng.randint(3, 8)))
    return s, "".join(sorted(s))


def _copy(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))
    return s, s


def _lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(LETTERS, rng.randint(3, 5))
    values = [rng.choice(string.digits) for _ in keys]
    i = rng.randrange(len(keys))
    pairs = "".join(k + v for k, v in zip(keys, values))
    return f"{keys[i]}?{pairs}", values[i]


def _count(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choice(COUNT_ALPHABET) for _ in range(rng.randint(3, 8)))
    q = rng.choice(COUNT_ALPHABET)
    return f"{q}?{s}", str(s.count(q))


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "reverse": _reverse, "sort": _sort, "copy": _copy, "lookup": _lookup, "count": _count,
}


def check_skill(skill: str) -> str:
    """Return ``skill`` or raise a ValueError that lists the known skills."""
    if skill not in _GENERATORS:
        raise ValueError(f"unknown skill {skill!r}; known skills: {', '.join(SKILLS)}")
    return skill


def sample(skill: str, rng: random.Random) -> dict[str, str]:
    """One document ``{"prompt", "answer"}`` of ``skill`` drawn with ``rng``."""
    body, answer = _GENERATORS[check_skill(skill)](rng)
    return {"prompt": f"{tag(skill)}{body}=", "answer": answer}


def mc_choices(skill: str, doc: dict[str, str]) -> list[str]:
    """Answer options of the multiple-choice variant of ``skill``; the correct one is among them.

    ``count``: every count 0-8. ``lookup``: every digit.
    ``add``: the sum and four near misses (the sum +-1 and +-10, in reversed-digit notation), sorted.
    """
    if skill == "count":
        return [str(i) for i in range(9)]
    if skill == "lookup":
        return list(string.digits)
    if skill == "add":
        total = int(doc["answer"][::-1])
        return sorted({f"{total + d:04d}"[::-1] for d in (0, -10, -1, 1, 10) if 0 <= total + d <= 9999})
    raise ValueError(f"skill {skill!r} has no multiple-choice variant; these do: count, lookup, add")


MC_SKILLS: tuple[str, ...] = ("add", "count", "lookup")
