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
