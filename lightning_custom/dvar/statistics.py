"""The statistics of the calibration tables: worst-decile means, bootstrap standard errors over concepts, rank
correlation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def worst_decile(values: Sequence[float]) -> float:
    """The mean of the lowest 10% of ``values`` (at least one value)."""
    ordered = sorted(values)
    return float(np.mean(ordered[: max(1, math.ceil(len(ordered) / 10))]))


def bootstrap_se(statistic: Callable[..., float], *samples: Sequence[float], draws: int = 2000,
                 seed: int = 0) -> float:
    """The standard error of ``statistic(*samples)`` over concepts: its SD over ``draws`` resamplings of the concepts
    with replacement.

    This is the noise of "which concepts were drawn", the one a held-out set of concepts will show; the probe's
    sampling noise is inside each value already. Paired samples (one value per concept in each, e.g. two rules'
    retentions) are resampled together, so a difference between rules keeps its pairing.

    Args:
        statistic: maps the resampled samples (numpy arrays, one per sample) to a number.
        *samples: equally long sequences, one value per concept.
        draws: bootstrap resamplings.
        seed: the resampling seed (the table is reproducible).
    """
    arrays = [np.asarray(sample, dtype=float) for sample in samples]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(arrays[0]), size=(draws, len(arrays[0])))
    return float(np.std([statistic(*(a[pick] for a in arrays)) for pick in picks], ddof=1))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN for fewer than 3 pairs or a constant side."""
    if len(x) != len(y):
        raise ValueError("spearman: x and y differ in length")
    if len(x) < 3:
        return float("nan")

    def ranks(values: Sequence[float]) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        order = values.argsort(kind="stable")
        out = np.empty(len(values))
        out[order] = np.arange(len(values), dtype=np.float64)
        for value in np.unique(values):  # average the ranks of ties
            tied = values == value
            out[tied] = out[tied].mean()
        return out

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
