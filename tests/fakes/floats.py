"""The float next to a threshold, for tests that put a value exactly on a boundary and one
float step either side (hand-picked values such as 0.24 / 0.26 never sit on a boundary, so a
flipped ``<`` / ``<=`` survives them)."""
from __future__ import annotations

import math

import numpy as np


def up(x: float) -> float:
    """The next float above x."""
    return float(np.nextafter(x, math.inf))


def down(x: float) -> float:
    """The next float below x."""
    return float(np.nextafter(x, -math.inf))
