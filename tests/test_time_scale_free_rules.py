"""The time-scale-free stopping rules (issue 25): they stop an exponential decay at a fixed multiple of its time
constant whatever the constant is, and never stop a steady straight-line drift, where DVAR with a fixed window stops
after a fixed number of windows."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_custom.dvar.rule import (
    first_stop_index,
    growing_window_ratio,
    growing_window_stop_index,
    late_improvement,
    late_improvement_stop_index,
)


def decay(tau: float, length: int = 4000, noise: float = 0.0, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=float)
    return (1.0 + np.exp(-t / tau) + noise * rng.standard_normal(length)).tolist()


def drift(length: int = 2000, slope: float = 1e-5) -> list[float]:
    return (1.0 - slope * np.arange(length, dtype=float)).tolist()


@pytest.mark.parametrize("rule", [lambda v: growing_window_stop_index(v, 0.3, 0.02),
                                  lambda v: late_improvement_stop_index(v, 0.05, span=4)])
def test_an_exponential_decay_stops_at_the_same_multiple_of_its_time_constant(rule):
    stops = {tau: rule(decay(tau)) for tau in (20, 80, 320)}
    assert all(stop is not None for stop in stops.values())
    multiples = [stops[tau] / tau for tau in stops]
    assert max(multiples) / min(multiples) < 1.2, stops  # the same t / tau, within discretisation
    assert min(multiples) > 1.5  # and not before the loss has made most of its drop (1 - e^-1.5 = 78%)


@pytest.mark.parametrize("rule", [lambda v: growing_window_stop_index(v, 0.3, 0.05),
                                  lambda v: late_improvement_stop_index(v, 0.3, span=4)])
def test_a_steady_drift_never_stops(rule):
    assert rule(drift()) is None
    assert rule(drift(slope=1e-2)) is None  # however fast


def test_dvar_with_a_fixed_window_stops_a_steady_drift_after_a_fixed_number_of_windows():
    """The failure the new rules avoid: a slow and a fast drift stop at the same index."""
    slow, fast = first_stop_index(drift(slope=1e-6), 20, 0.15), first_stop_index(drift(slope=1e-2), 20, 0.15)
    assert slow is not None and slow == fast


def test_the_ratios_are_what_their_docstrings_say():
    line = drift()
    assert growing_window_ratio(line[:400], 0.25) == pytest.approx(0.25 ** 2, rel=0.02)
    assert late_improvement(line[:400], 4) == pytest.approx(0.5, rel=0.02)
    assert late_improvement([1.0] * 40, 4) is None  # nothing fell: not converged, not a stop
    assert late_improvement(list(np.linspace(1, 2, 40)), 4) is None  # a rise is not convergence


def test_noise_on_a_decay_still_stops_near_the_noise_free_stop():
    clean = late_improvement_stop_index(decay(40), 0.05, span=8)
    noisy = late_improvement_stop_index(decay(40, noise=0.002, seed=3), 0.05, span=8)
    assert clean is not None and noisy is not None and abs(noisy - clean) < 0.5 * clean
