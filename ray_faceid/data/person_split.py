"""A split of a dataset's people (never of their photos) into training and held-out people.

Deterministic from the names alone, so training (the attribute flow) and evaluation (eval-edits)
agree on it without sharing state, and adding people does not move the others between sides.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable

HOLD_OUT_SHARE = 0.2
MIN_PEOPLE = 5  # below this every person is needed for training; nothing is held out


def held_out_people(people: Iterable[str], share: float = HOLD_OUT_SHARE) -> list[str]:
    """The held-out share of `people` (at least one when there are MIN_PEOPLE or more), sorted."""
    names = sorted(set(people))
    if len(names) < MIN_PEOPLE:
        return []
    ranked = sorted(names, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    return sorted(ranked[: max(1, math.ceil(share * len(names)))])
