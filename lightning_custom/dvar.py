"""The DVAR stopping rule as pure functions (Voronov et al., NeurIPS 2023, Section 4).

Once the series of deterministic losses holds at least ``window`` values,
``ratio = var(last window values) / var(all values)`` (population variance), and training stops as soon as
``ratio < threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def window_in_values(window_steps: int, eval_every_n_steps: int = 1) -> int:
    """How many loss values span ``window_steps`` optimizer steps when evaluating every ``eval_every_n_steps``."""
    return max(2, math.ceil(window_steps / eval_every_n_steps))


def variance_ratio(values: Sequence[float], window: int) -> float | None:
    """``var(values[-window:]) / var(values)``, or ``None`` while fewer than ``window`` values exist.

    A constant series (zero total variance) has ratio 0: nothing is changing any more.
    """
    if len(values) < window:
        return None
    series = np.asarray(values, dtype=np.float64)
    total = series.var()
    if total == 0.0:
        return 0.0
    return float(series[-window:].var() / total)


def ratio_series(values: Sequence[float], window: int) -> list[float | None]:
    """The ratio after each value of the series (``None`` before the window is full)."""
    return [variance_ratio(values[: i + 1], window) for i in range(len(values))]


def first_stop_index(values: Sequence[float], window: int, threshold: float, min_index: int = 0) -> int | None:
    """Index of the first value after which DVAR stops, or ``None`` if it never does.

    Args:
        values: the deterministic-loss series in evaluation order.
        window: window length in values.
        threshold: stop once the ratio falls below this.
        min_index: do not stop before this index (e.g. a minimum number of steps).
    """
    # The same variance_ratio the live callback uses, so a replay agrees with a live run to the bit.
    for i in range(max(window - 1, min_index), len(values)):
        ratio = variance_ratio(values[: i + 1], window)
        if ratio is not None and ratio < threshold:
            return i
    return None


def stop_step_every(
    history: Sequence[Sequence[float]], window_steps: int, threshold: float, eval_every_n_steps: int = 1
) -> int | None:
    """Where DVAR evaluated every ``eval_every_n_steps`` steps would stop, replayed on an every-step history.

    Args:
        history: ``[[step, loss], ...]`` recorded at every optimizer step (as in ``summary.json``).
        window_steps: the window in optimizer steps.
        threshold: the ratio threshold.
        eval_every_n_steps: the evaluation period k; the values at steps k, 2k, ... are kept.

    Returns:
        The stop step, or ``None`` if the rule never fires on this history.
    """
    kept = [loss for step, loss in history if int(step) % eval_every_n_steps == 0]
    steps = [int(step) for step, _ in history if int(step) % eval_every_n_steps == 0]
    index = first_stop_index(kept, window_in_values(window_steps, eval_every_n_steps), threshold)
    return None if index is None else steps[index]


# ------------------------------------------------------------------------------ when a flat ratio is not convergence
# A ratio below the threshold means "L_det has stopped moving", not "L_det has improved". These checks tell the
# other reasons apart, on the same series the rule sees, so the live callback and a replay agree.

# The last window's mean L_det may exceed the mean of the first values by at most this share before a would-be DVAR
# stop counts as divergence (healthy runs end below their start: see benchmarks/divergence_guard.py).
DIVERGENCE_LOSS_TOLERANCE = 0.02
# The trainable parameters' norm may grow by at most this factor over its value before the first step. Healthy runs
# grow it x1.0 (LoRA, Custom Diffusion), x7 (Textual Inversion on the world model, 1000 steps), x45 (the same at 10x
# the learning rate, still improving L_det) and x22 (a tiny random model's embedding, 300 steps at 4x the learning
# rate); the quickstart at learning rate 100 reaches x4092 by step 5.
DIVERGENCE_NORM_FACTOR = 100.0
# A series whose spread is below this share of its mean has not moved at all (float32 L_det is exact to ~1e-7).
FLAT_RELATIVE_SPREAD = 1e-6


def head_values(window: int) -> int:
    """How many of the first values stand for "where training started" (a quarter of the window, at least 1)."""
    return max(1, window // 4)


def loss_divergence(values: Sequence[float], window: int,
                    tolerance: float = DIVERGENCE_LOSS_TOLERANCE) -> str | None:
    """Why the series ends worse than it started, or ``None``.

    Compares the mean of the last ``window`` values with the mean of the first :func:`head_values` ones: a run
    whose L_det settled above where it began has diverged, however flat its last window is.
    """
    if len(values) < window:
        return None
    series = np.asarray(values, dtype=np.float64)
    start = float(series[: head_values(window)].mean())
    end = float(series[-window:].mean())
    if start > 0 and end > start * (1.0 + tolerance):
        return (f"L_det's last window averages {end:.4g}, {100 * (end / start - 1):.1f}% above its first values "
                f"({start:.4g}): training made the model worse")
    return None


def norm_divergence(initial_norm: float | None, norm: float, factor: float = DIVERGENCE_NORM_FACTOR) -> str | None:
    """Why the trainable parameters have exploded (their norm grew more than ``factor`` times), or ``None``."""
    if initial_norm is None or not initial_norm > 0:
        return None
    if norm > factor * initial_norm:
        return (f"the trainable parameters' norm grew from {initial_norm:.4g} to {norm:.4g} "
                f"(x{norm / initial_norm:.0f}, more than x{factor:g}): the learning rate is too high")
    return None


def divergence(values: Sequence[float], window: int, initial_norm: float | None = None, norm: float | None = None,
               tolerance: float = DIVERGENCE_LOSS_TOLERANCE, factor: float = DIVERGENCE_NORM_FACTOR) -> str | None:
    """The reason, in words, why a run has diverged, or ``None`` (see :func:`loss_divergence`, :func:`norm_divergence`).

    Args:
        values: the deterministic-loss series so far.
        window: the DVAR window in values.
        initial_norm: norm of the trainable parameters before the first step (``None``: not known).
        norm: their norm now.
        tolerance: see :func:`loss_divergence`.
        factor: see :func:`norm_divergence`.
    """
    if norm is not None:
        reason = norm_divergence(initial_norm, norm, factor)
        if reason:
            return reason
    return loss_divergence(values, window, tolerance)


def is_flat(values: Sequence[float], rel_spread: float = FLAT_RELATIVE_SPREAD) -> bool:
    """Whether a series has not moved at all (max - min within ``rel_spread`` of its mean magnitude).

    The variance ratio of such a series is 0/0; read as "converged" it hides a run where nothing trains.
    """
    if len(values) < 2:
        return False
    series = np.asarray(values, dtype=np.float64)
    spread = float(series.max() - series.min())
    return spread <= rel_spread * max(float(np.abs(series).mean()), np.finfo(np.float64).tiny)
