"""Matryoshka groups and retrieval budgets (paper §3.2).

A *budget* is a pair ``(r_q, r_c)``: score with the first ``r_q`` query Meta
Embeddings and the first ``r_c`` candidate Meta Embeddings (Eq. 4).  The MMR
loss trains G nested *groups* of budgets,

    1 <= r_q^(1) < ... < r_q^(G) <= R_q   and   1 <= r_c^(1) < ... < r_c^(G) <= R_c,

so that every prefix is a usable retrieval index on its own.  The paper takes
``r^(G) = R``; a last group below ``(R_q, R_c)`` is accepted (the remaining
tokens are then simply not trained by the loss).
"""
from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Sequence
from typing import Any

from .config import DEFAULT_GROUPS

__all__ = [
    "Budget",
    "DEFAULT_GROUPS",
    "GroupError",
    "format_budget",
    "group_key",
    "parse_budget",
    "validate_budget",
    "validate_groups",
]

#: A retrieval budget / Matryoshka group size ``(r_q, r_c)``.
Budget = tuple[int, int]


class GroupError(ValueError):
    """Matryoshka groups or a retrieval budget are malformed or out of range."""


def _as_int(value: Any, what: str) -> int:
    """``value`` as a Python int; bools, floats and strings are rejected."""
    if isinstance(value, bool):
        raise GroupError(f"{what} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise GroupError(f"{what} must be an integer, got {type(value).__name__} {value!r}") from None


def _as_pair(value: Any, what: str) -> Budget:
    """``value`` as a pair of positive ints ``(r_q, r_c)``; a 1-D NumPy array or torch tensor of 2 ints counts."""
    given = value
    if getattr(value, "ndim", None) == 1 and hasattr(value, "tolist"):  # np.array([2, 4]) is not a Sequence
        value = value.tolist()  # float elements stay floats and are refused below
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise GroupError(f"{what} must be a pair (r_q, r_c), got {given!r}")
    r_q = _as_int(value[0], f"{what}: r_q")
    r_c = _as_int(value[1], f"{what}: r_c")
    if r_q < 1 or r_c < 1:
        raise GroupError(f"{what} must have r_q >= 1 and r_c >= 1, got ({r_q}, {r_c})")
    return r_q, r_c


def _check_token_counts(R_q: Any, R_c: Any) -> tuple[int, int]:
    R_q = _as_int(R_q, "R_q")
    R_c = _as_int(R_c, "R_c")
    if R_q < 1 or R_c < 1:
        raise GroupError(f"token counts must be >= 1, got R_q={R_q}, R_c={R_c}")
    return R_q, R_c


def validate_budget(budget: Sequence[int], R_q: int, R_c: int) -> Budget:
    """Check a retrieval budget ``(r_q, r_c)`` against the token counts (Eq. 4).

    Returns the budget as a tuple of Python ints.  Raises :class:`GroupError`
    when it is not a pair of positive ints or exceeds ``(R_q, R_c)``.
    """
    R_q, R_c = _check_token_counts(R_q, R_c)
    r_q, r_c = _as_pair(budget, "budget")
    if r_q > R_q or r_c > R_c:
        raise GroupError(
            f"budget ({r_q}, {r_c}) exceeds the trained token counts R_q={R_q}, R_c={R_c}"
        )
    return r_q, r_c


def validate_groups(groups: Iterable[Sequence[int]], R_q: int, R_c: int) -> list[Budget]:
    """Check Matryoshka groups ``[(r_q^(g), r_c^(g))]_g`` (§3.2, before Eq. 4).

    Groups must be non-empty, positive ints, strictly increasing in both
    ``r_q`` and ``r_c`` (prefix-nested) and the last one must fit in
    ``(R_q, R_c)``.  Returns them as a list of int tuples.
    """
    R_q, R_c = _check_token_counts(R_q, R_c)
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise GroupError(f"groups must be a sequence of (r_q, r_c) pairs, got {groups!r}")
    out = [_as_pair(g, f"groups[{i}]") for i, g in enumerate(groups)]
    if not out:
        raise GroupError("groups must contain at least one (r_q, r_c) pair")
    for prev, cur in zip(out, out[1:]):
        if not (cur[0] > prev[0] and cur[1] > prev[1]):
            raise GroupError(
                f"groups must be strictly nested: {prev} followed by {cur} "
                f"(r_q and r_c must both increase from one group to the next)"
            )
    last = out[-1]
    if last[0] > R_q or last[1] > R_c:
        raise GroupError(
            f"last group {last} exceeds the trained token counts R_q={R_q}, R_c={R_c}"
        )
    return out


def format_budget(budget: Sequence[int]) -> str:
    """``(16, 64)`` -> ``"(16,64)"`` (the inverse of :func:`parse_budget`)."""
    r_q, r_c = _as_pair(budget, "budget")
    return f"({r_q},{r_c})"


def group_key(budget: Sequence[int]) -> str:
    """Name of a group for logs and dicts: ``(2, 4)`` -> ``"group_2x4"``."""
    r_q, r_c = _as_pair(budget, "group")
    return f"group_{r_q}x{r_c}"


_BUDGET_RE = re.compile(r"^\s*\(?\s*(\d+)\s*[,x]\s*(\d+)\s*\)?\s*$")


def parse_budget(text: str) -> Budget:
    """Parse ``"16,64"`` (also ``"(16,64)"``, ``"16x64"``) into ``(16, 64)``."""
    if not isinstance(text, str):
        raise GroupError(f"budget text must be a str, got {type(text).__name__}")
    m = _BUDGET_RE.match(text)
    if m is None or text.strip().startswith("(") != text.strip().endswith(")"):
        raise GroupError(f"cannot parse budget {text!r}; expected 'r_q,r_c' such as '16,64'")
    return _as_pair((int(m.group(1)), int(m.group(2))), "budget")
