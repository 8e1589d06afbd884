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
# Where DVAR would stop, L_det must have moved by at least this share of its level, or the run is "undertrained":
# the ratio var(last W)/var(all) is blind to scale and falls below any threshold on a slow steady drift. On the
# quickstart, L_det moves 0.011% at learning rate 1e-6 and 0.11% at 1e-5 before the ratio flattens (no identity
# gain), 0.5% at 5e-5 (+0.006 identity), 17% at the default 5e-3 (+0.154); every committed study run (217 stops
# at their own settings) moved at least 6.9% by its stop, and 0.27% at the most eager setting of a window of 4 or
# more values (benchmarks/divergence_guard.py).
UNDERTRAINED_RELATIVE_SPREAD = 2e-3


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


def relative_spread(values: Sequence[float]) -> float:
    """``(max - min) / mean(|values|)``: how far a series moved, as a share of its level (0 for < 2 values)."""
    if len(values) < 2:
        return 0.0
    series = np.asarray(values, dtype=np.float64)
    return float(series.max() - series.min()) / max(float(np.abs(series).mean()), np.finfo(np.float64).tiny)


def is_flat(values: Sequence[float], rel_spread: float = FLAT_RELATIVE_SPREAD) -> bool:
    """Whether a series has not moved at all (max - min within ``rel_spread`` of its mean magnitude).

    The variance ratio of such a series is 0/0; read as "converged" it hides a run where nothing trains.
    """
    return len(values) >= 2 and relative_spread(values) <= rel_spread


def barely_moved(values: Sequence[float], min_spread: float = UNDERTRAINED_RELATIVE_SPREAD) -> str | None:
    """Why a series that DVAR would call converged has in truth barely moved (it is undertrained), or ``None``.

    The variance ratio compares the last window with the whole series, whatever their scale: a slow, steady
    drift falls below any threshold after a fixed number of windows. A run whose L_det moved by less than
    ``min_spread`` of its level has barely started to learn.
    """
    spread = relative_spread(values)
    if len(values) < 2 or spread >= min_spread:
        return None
    return (f"L_det moved by only {100 * spread:.3g}% of its value over {len(values)} evaluations (less than "
            f"{100 * min_spread:g}%)")


# ------------------------------------------------------------------------------ rule variants (issue 12, item 5)
# At most three variants of the stopping rule, replayed on recorded series (benchmarks/table1_v2.py reports them).
# None is used by the live callback: a variant ships only if it beats DVAR on the test split.


def moving_average(values: Sequence[float], span: int) -> list[float]:
    """Causal moving average: value ``i`` is the mean of ``values[max(0, i - span + 1) : i + 1]``.

    Causal, so the rule applied to it at index ``i`` still sees only the losses up to ``i``.
    """
    if span < 1:
        raise ValueError(f"span must be at least 1, got {span}")
    series = np.asarray(values, dtype=np.float64)
    sums = np.concatenate([[0.0], np.cumsum(series)])
    ends = np.arange(1, len(series) + 1)
    starts = np.maximum(0, ends - span)
    return ((sums[ends] - sums[starts]) / (ends - starts)).tolist()


def smoothed_stop_index(values: Sequence[float], window: int, threshold: float, span: int) -> int | None:
    """Variant 1, *smoothed ratio*: DVAR's ratio on the causal :func:`moving_average` of the series.

    Averaging ``span`` neighbouring values removes the evaluation-to-evaluation jitter of L_det that a short window
    otherwise reads as "still moving", so a smaller window can fire without firing on noise.
    """
    return first_stop_index(moving_average(values, span), window, threshold)


def min_windows_stop_index(values: Sequence[float], window: int, threshold: float, min_windows: float) -> int | None:
    """Variant 2, *minimum history*: DVAR, but not before the series holds ``min_windows`` windows of values.

    The ratio's denominator is the variance of the whole series; early on that is barely more than the window's,
    so the ratio can dip below the threshold before the loss has fallen at all. Waiting for ``min_windows`` windows
    makes the denominator hold the drop.
    """
    return first_stop_index(values, window, threshold, min_index=max(0, math.ceil(min_windows * window) - 1))


def relative_slope(values: Sequence[float], window: int) -> float | None:
    """``|least-squares slope of the last window| x window / (max - min of the whole series)``; ``None`` while fewer
    than ``window`` values exist, 0 for a series that has not moved.

    How much of the series' whole range the recent trend would still cover in one more window.
    """
    if len(values) < window:
        return None
    series = np.asarray(values, dtype=np.float64)
    spread = float(series.max() - series.min())
    if spread == 0.0:
        return 0.0
    tail = series[-window:]
    x = np.arange(window, dtype=np.float64)
    slope = float(np.polyfit(x, tail, 1)[0])
    return abs(slope) * window / spread


def slope_stop_index(values: Sequence[float], window: int, threshold: float) -> int | None:
    """Variant 3, *relative slope*: stop once :func:`relative_slope` of the last ``window`` values < ``threshold``.

    DVAR's variance ratio also falls when the tail is noisy around a steady decline; the slope asks for the trend
    itself to have flattened.
    """
    for i in range(window - 1, len(values)):
        slope = relative_slope(values[: i + 1], window)
        if slope is not None and slope < threshold:
            return i
    return None


# ------------------------------------------------------------------- time-scale-free rules (issue 25, Part 2)
# DVAR's fixed window makes it a fixed budget in disguise: on any steady drift var(last W) / var(all) falls below
# the threshold after a fixed number of windows, however slow the drift. The two rules below measure the recent
# change against the whole run's, so they stop at a fixed multiple of the loss's own time constant (exponential
# decay: L = a + b exp(-t / tau)) whatever tau is, and never on a straight-line drift.
MIN_RULE_VALUES = 4  # a window of fewer values is degenerate (2 values: (L_k - L_k-1)^2 / 4 over the whole variance)


def growing_window_ratio(values: Sequence[float], fraction: float, min_values: int = MIN_RULE_VALUES) -> float | None:
    """DVAR's ratio with a window of the last ``fraction`` of the series (at least ``min_values`` values); ``None``
    while the series is shorter than twice that minimum.

    On a straight line the ratio is ``fraction ** 2`` at every length; on an exponential decay it falls with
    ``t / tau`` alone.
    """
    if len(values) < 2 * min_values:
        return None
    window = max(min_values, round(fraction * len(values)))
    return variance_ratio(values, window)


def growing_window_stop_index(values: Sequence[float], fraction: float, threshold: float,
                              min_values: int = MIN_RULE_VALUES) -> int | None:
    """The first index where :func:`growing_window_ratio` is below ``threshold`` (``None``: never). Only a
    ``threshold`` below ``fraction ** 2`` tells a decay from a drift (a straight line's ratio is ``fraction ** 2``)."""
    for i in range(2 * min_values - 1, len(values)):
        ratio = growing_window_ratio(values[: i + 1], fraction, min_values)
        if ratio is not None and ratio < threshold:
            return i
    return None


def late_improvement(values: Sequence[float], span: int) -> float | None:
    """How much of the whole run's improvement the second half of the run made: ``(L(t/2) - L(t)) / (L(0) - L(t))``
    on the causal moving average of ``span`` values; ``None`` before ``4 * span`` values or while the loss has not
    fallen at all (a rise is not convergence).

    A straight-line drift gives 0.5 at every length; an exponential decay ``(e^-x/2 - e^-x) / (1 - e^-x)`` with
    ``x = t / tau``, which falls towards 0 as the run outlasts its time constant.
    """
    if len(values) < 4 * span:
        return None
    smooth = moving_average(values, span)
    start, middle, end = smooth[span - 1], smooth[(len(smooth) - 1) // 2], smooth[-1]
    total = start - end
    if not total > 0:
        return None
    return (middle - end) / total


def late_improvement_stop_index(values: Sequence[float], fraction: float, span: int = 4) -> int | None:
    """The first index where :func:`late_improvement` is below ``fraction`` (``None``: never)."""
    for i in range(4 * span - 1, len(values)):
        share = late_improvement(values[: i + 1], span)
        if share is not None and share < fraction:
            return i
    return None
