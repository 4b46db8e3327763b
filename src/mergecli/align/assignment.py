"""The linear assignment problem, solved by scipy, imported on first use."""

from __future__ import annotations

import numpy as np


def linear_sum_assignment(
    scores: np.ndarray, maximize: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """`scipy.optimize.linear_sum_assignment`. Importing scipy.optimize takes about 0.2 s, which
    every run paid when a method module loaded, though only the align steps solve assignments."""
    from scipy.optimize import linear_sum_assignment as solve

    return solve(scores, maximize=maximize)
