"""Calibrate DVAR on finished full-length runs that carry quality probes: which (window, threshold, eval period)
stops soonest while keeping a target share of the converged quality?

A run qualifies if its ``summary.json`` holds the deterministic-loss series (``dvar_history``, recorded by an
observe-only DVAR, ``--dvar.stop false``) and quality probes: ``world_probe_history`` rows
``[step, identity_train, identity_eval, fidelity]`` (:class:`~lightning_custom.world.probe.WorldProbe`), plus,
optionally, ``exact_probes.json`` beside it (``{"steps": {"125": [identity_train, identity_eval, fidelity]}}``,
probes of saved weights at the steps where replayed rules stop, see
:func:`lightning_custom.world.probe.probe_snapshots`). On a real model, CLIP early stopping's ``clip_history``
(CLIP-I of training-prompt samples; give it a patience longer than the run) serves as the identity probe.

Definitions (all pure functions below):

* the **converged length** of a set of runs: the first probe step after which the median identity over runs never
  rises more than ``tolerance`` (1%) above its value there (a plateau, or the peak where it falls);
* a run's **converged identity**: the mean of its identity probes from the converged length (or half the run,
  whichever is later) on;
* **retention** of a stop: identity at the stop step / converged identity. The identity at a stop step is the
  exact probe of that step where one exists, else the last probe before it (marked inexact);
* the objective: the fewest mean steps subject to median retention >= ``target`` (default 0.97).

The stop steps come from :func:`lightning_custom.dvar.replay.replay_stop_indices` (the live rule's own code).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from lightning_custom.dvar.rule import window_in_values
from lightning_custom.dvar.statistics import bootstrap_se, spearman, worst_decile  # noqa: F401 - re-exported
from lightning_custom.errors import UserInputError

EXACT_PROBES_FILE = "exact_probes.json"
DEFAULT_WINDOWS: tuple[int, ...] = (20, 40, 60, 80, 120, 160, 240, 320, 440)
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
DEFAULT_EVAL_EVERY: tuple[int, ...] = (5, 10, 20)
IDENTITY, FIDELITY = 2, 3  # columns of a probe row [step, identity_train, identity_eval, fidelity]


@dataclass
class ProbedRun:
    """One full-length run: its deterministic-loss series and its quality probes by step."""

    name: str
    max_steps: int
    eval_every_n_steps: int
    losses: list[tuple[int, float]]  # (step, L_det), in evaluation order
    probes: dict[int, list[float]]  # step -> [identity_train, identity_eval, fidelity] (periodic probes)
    exact: dict[int, list[float]] = field(default_factory=dict)  # step -> the same, probed from saved weights

    def quality(self, step: int) -> tuple[list[float], bool]:
        """``([identity_train, identity_eval, fidelity], exact)`` at ``step``: the exact probe of that step, else
        the last periodic probe at or before it."""
        if step in self.exact:
            return self.exact[step], True
        if step in self.probes:
            return self.probes[step], True
        before = [s for s in self.probes if s <= step]
        if not before:
            raise ValueError(f"{self.name}: no probe at or before step {step}")
        return self.probes[max(before)], False

    def identity(self, step: int) -> float:
        """Identity (evaluation prompts) at ``step`` (see :meth:`quality`)."""
        return self.quality(step)[0][IDENTITY - 1]


def load_probed_run(summary_file: str | Path, name: str | None = None) -> ProbedRun:
    """A :class:`ProbedRun` from a ``summary.json`` (and ``exact_probes.json`` beside it, if present)."""
    path = Path(summary_file)
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserInputError(f"runs: cannot read {path}: {err}") from None
    history, probes = summary.get("dvar_history") or [], summary.get("world_probe_history") or []
    if not probes and summary.get("clip_history"):  # a real model: CLIP-I of CLIPEarlyStopping's checks
        probes = [[s, v, v, float("nan")] for s, v in summary["clip_history"]]
    if not history:
        raise UserInputError(f"runs: {path} has no dvar_history (train with DVAR observing: --dvar.stop false)")
    if not probes:
        raise UserInputError(f"runs: {path} has no quality probes (world_probe_history from a WorldProbe, or "
                             "clip_history from CLIPEarlyStopping)")
    if summary.get("stopped_by") not in ("max_steps", "max_epochs", None):
        raise UserInputError(f"runs: {path} was stopped early ({summary.get('stopped_by')}); calibrate needs "
                             "full-length runs (--dvar.stop false)")
    exact_file = path.parent / EXACT_PROBES_FILE
    exact = json.loads(exact_file.read_text()).get("steps", {}) if exact_file.is_file() else {}
    return ProbedRun(
        name=name or path.parent.name,
        max_steps=int(summary.get("max_steps") or history[-1][0]),
        eval_every_n_steps=int(summary.get("dvar_eval_every_n_steps") or 1),
        losses=[(int(s), float(v)) for s, v in history],
        # a probe without evaluation prompts records identity_eval and fidelity as NaN: null in strict JSON
        probes={int(row[0]): [float("nan") if x is None else float(x) for x in row[1:4]] for row in probes},
        exact={int(s): [float("nan") if x is None else float(x) for x in row[:3]] for s, row in exact.items()},
    )


def load_probed_runs(paths: Sequence[str | Path]) -> list[ProbedRun]:
    """Every run under ``paths`` (run folders, summary files, or folders searched recursively)."""
    from lightning_custom.dvar.replay import find_summaries

    files = find_summaries(paths)
    root = Path(os.path.commonpath([f.parent.resolve() for f in files])) if len(files) > 1 else None
    return [load_probed_run(f, str(f.parent.resolve().relative_to(root)) if root else None) for f in files]


# ------------------------------------------------------------------------------------------------ the rule
def stop_steps(run: ProbedRun, window: int, thresholds: Sequence[float], eval_every: int) -> list[int]:
    """Where DVAR evaluated every ``eval_every`` steps with ``window`` (steps) stops, for each threshold; a rule that
    never fires trains the run's full length. ``eval_every`` must be a multiple of the run's recorded period."""
    from lightning_custom.dvar.replay import replay_stop_indices

    if eval_every % run.eval_every_n_steps:
        raise UserInputError(f"--eval_every: {eval_every} is not a multiple of the runs' recorded evaluation period "
                             f"{run.eval_every_n_steps} ({run.name})")
    kept = [(s, v) for s, v in run.losses if s % eval_every == 0]
    indices = replay_stop_indices([[v for _, v in kept]], window_in_values(window, eval_every), thresholds)
    return [kept[i][0] if i is not None else run.max_steps for i in indices]


def grid_stop_steps(run: ProbedRun, windows: Sequence[int] = DEFAULT_WINDOWS,
                    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                    eval_every: Sequence[int] = DEFAULT_EVAL_EVERY) -> set[int]:
    """Every step where some setting of the grid stops (the steps worth an exact probe)."""
    steps: set[int] = set()
    for period in eval_every:
        if period % run.eval_every_n_steps:
            continue
        for window in windows:
            steps.update(stop_steps(run, window, thresholds, period))
    return steps


# ------------------------------------------------------------------------------------------------ quality
def median_curve(runs: Sequence[ProbedRun]) -> tuple[list[int], list[float]]:
    """The probe steps every run has, and the median identity over runs at each."""
    common = sorted(set.intersection(*(set(r.probes) for r in runs)))
    return common, [float(np.median([r.probes[s][IDENTITY - 1] for r in runs])) for s in common]


def converged_length(runs: Sequence[ProbedRun], tolerance: float = 0.01, smooth: int = 1) -> int:
    """The first probe step after which the median identity never rises more than ``tolerance`` above its value
    there: the plateau's start, or the peak if identity falls afterwards (never step 0: some training).

    ``smooth``: apply the criterion to the mean of ``smooth`` consecutive probes of the median curve (centred, the
    first and last probes average fewer), so one lucky probe cannot end the climb; 1: the probes themselves."""
    steps, median = median_curve(runs)
    if steps and steps[0] == 0 and len(steps) > 1:
        steps, median = steps[1:], median[1:]
    if smooth > 1:
        half = smooth // 2
        median = [float(np.mean(median[max(0, i - half): i + half + 1])) for i in range(len(median))]
    for i, value in enumerate(median):
        if max(median[i:]) <= value * (1 + tolerance):
            return steps[i]
    return steps[-1]


def converged_identity(run: ProbedRun, from_step: int) -> float:
    """The mean of the run's periodic identity probes from ``from_step`` or half the run, whichever is later.

    Several probes average out the probe's noise; starting no earlier than half the run keeps a concept that
    learns later than the median one (still rising at ``from_step``) from getting a reference below its plateau.
    """
    start = max(from_step, run.max_steps / 2)
    values = [row[IDENTITY - 1] for s, row in run.probes.items() if s >= start]
    if not values:
        raise ValueError(f"{run.name}: no probe at or after step {from_step}")
    return float(np.mean(values))


def oracle_step(run: ProbedRun, reference: float, share: float = 0.97) -> int:
    """The earliest step whose identity (exact or periodic probes) reaches ``share`` of ``reference``."""
    rows = sorted({**run.probes, **run.exact}.items())
    return next((s for s, row in rows if row[IDENTITY - 1] >= share * reference), run.max_steps)


@dataclass(frozen=True)
class Outcome:
    """One rule on a set of runs: per-run stop steps and retention, and their summaries."""

    label: str
    steps: tuple[int, ...]
    retention: tuple[float, ...]
    fidelity: tuple[float, ...]
    exact: int  # how many stops were read from a probe of that very step

    @property
    def mean_steps(self) -> float:
        return float(np.mean(self.steps))

    @property
    def median_retention(self) -> float:
        return float(np.median(self.retention))

    @property
    def worst_decile_retention(self) -> float:
        return worst_decile(self.retention)


def outcome(label: str, runs: Sequence[ProbedRun], steps: Sequence[int], references: Sequence[float]) -> Outcome:
    """Retention and fidelity of stopping each run at its step in ``steps``."""
    qualities = [run.quality(min(step, run.max_steps)) for run, step in zip(runs, steps)]
    return Outcome(label, tuple(int(s) for s in steps),
                   tuple(q[IDENTITY - 1] / ref for (q, _), ref in zip(qualities, references)),
                   tuple(q[FIDELITY - 1] for q, _ in qualities), sum(exact for _, exact in qualities))


@dataclass
class Calibration:
    """Every setting of the grid on a set of runs, and the recommended one (``None``: none meets the target)."""

    target: float
    converged_length: int
    settings: list[tuple[int, float, int]]  # (window, threshold, eval_every)
    outcomes: list[Outcome]
    best: int | None

    @property
    def recommended(self) -> tuple[int, float, int] | None:
        return None if self.best is None else self.settings[self.best]


def calibrate(runs: Sequence[ProbedRun], target: float = 0.97, windows: Sequence[int] = DEFAULT_WINDOWS,
              thresholds: Sequence[float] = DEFAULT_THRESHOLDS, eval_every: Sequence[int] = DEFAULT_EVAL_EVERY,
              tolerance: float = 0.01, budget: int | None = None, smooth: int = 1) -> Calibration:
    """Replay every (window, threshold, eval period) on ``runs``; recommend the one with the fewest mean steps among
    those whose median retention of the converged identity is at least ``target`` (ties: higher worst decile).

    ``budget``: the full length a user would train (a rule that has not fired stops there); default: each run's
    own length. ``smooth``: see :func:`converged_length`."""
    if not runs:
        raise UserInputError("runs: no runs to calibrate on")
    if not 0 < target <= 1.5:
        raise UserInputError(f"--target: a share of the converged identity such as 0.97, got {target}")
    length = converged_length(runs, tolerance, smooth)
    references = [converged_identity(run, length) for run in runs]
    settings, outcomes = [], []
    for period in eval_every:
        for window in windows:
            per_run = [stop_steps(run, window, thresholds, period) for run in runs]
            for t, threshold in enumerate(thresholds):
                settings.append((int(window), float(threshold), int(period)))
                outcomes.append(outcome(f"W={window} t={threshold:g} every {period}", runs,
                                        [min(steps[t], budget or steps[t]) for steps in per_run], references))
    feasible = [i for i, o in enumerate(outcomes) if o.median_retention >= target]
    best = min(feasible, key=lambda i: (outcomes[i].mean_steps, -outcomes[i].worst_decile_retention,
                                        settings[i][2] * -1)) if feasible else None
    return Calibration(target, length, settings, outcomes, best)


# ------------------------------------------------------------------------------------------------ rule variants
# Issue 12 allows at most three variants of the rule (lightning_custom.dvar.rule): each has DVAR's (window, threshold,
# eval period) plus one parameter of its own. Slope thresholds are a share of the series' range, not a ratio.
VARIANT_PARAMETERS: dict[str, tuple[float, ...]] = {"smoothed": (2, 4, 8), "min_windows": (1.5, 2.0, 3.0),
                                                     "slope": (0.0,)}
VARIANT_THRESHOLDS: dict[str, tuple[float, ...]] = {"smoothed": DEFAULT_THRESHOLDS, "min_windows": DEFAULT_THRESHOLDS,
                                                     "slope": (0.01, 0.02, 0.05, 0.1, 0.2)}


def variant_statistics(values: Sequence[float], variant: str, window: int, parameter: float) -> tuple[list, int]:
    """(the statistic after each value, the first index the rule may stop at) of a variant; it stops at the first
    index from there whose statistic is below the threshold (as :mod:`lightning_custom.dvar.rule`'s functions do)."""
    from lightning_custom.dvar.rule import moving_average, ratio_series, relative_slope

    if variant == "smoothed":
        return ratio_series(moving_average(values, int(parameter)), window), window - 1
    if variant == "min_windows":
        return ratio_series(values, window), max(window - 1, math.ceil(parameter * window) - 1)
    if variant == "slope":
        return [relative_slope(values[: i + 1], window) for i in range(len(values))], window - 1
    raise UserInputError(f"variant: one of {', '.join(VARIANT_PARAMETERS)}, got {variant!r}")


def variant_stop_steps(run: ProbedRun, variant: str, window: int, thresholds: Sequence[float], eval_every: int,
                       parameter: float) -> list[int]:
    """:func:`stop_steps` for a rule variant (``"smoothed"``, ``"min_windows"`` or ``"slope"``)."""
    if eval_every % run.eval_every_n_steps:
        raise UserInputError(f"--eval_every: {eval_every} is not a multiple of the runs' recorded evaluation period "
                             f"{run.eval_every_n_steps} ({run.name})")
    kept = [(s, v) for s, v in run.losses if s % eval_every == 0]
    stats, first = variant_statistics([v for _, v in kept], variant, window_in_values(window, eval_every), parameter)
    out = []
    for threshold in thresholds:
        index = next((i for i in range(first, len(stats)) if stats[i] is not None and stats[i] < threshold), None)
        out.append(kept[index][0] if index is not None else run.max_steps)
    return out


def calibrate_variant(runs: Sequence[ProbedRun], variant: str, target: float = 0.97,
                      windows: Sequence[int] = DEFAULT_WINDOWS, eval_every: Sequence[int] = DEFAULT_EVAL_EVERY,
                      tolerance: float = 0.01, budget: int | None = None, smooth: int = 1) -> Calibration:
    """:func:`calibrate` for a rule variant over its own grid; settings are (window, threshold, eval period,
    parameter). Stops without an exact probe are read at the last probe before them (conservative)."""
    if not runs:
        raise UserInputError("runs: no runs to calibrate on")
    length = converged_length(runs, tolerance, smooth)
    references = [converged_identity(run, length) for run in runs]
    thresholds = VARIANT_THRESHOLDS[variant]
    settings, outcomes = [], []
    for parameter in VARIANT_PARAMETERS[variant]:
        for period in eval_every:
            for window in windows:
                per_run = [variant_stop_steps(run, variant, window, thresholds, period, parameter) for run in runs]
                for t, threshold in enumerate(thresholds):
                    settings.append((int(window), float(threshold), int(period), float(parameter)))
                    outcomes.append(outcome(f"{variant} W={window} t={threshold:g} every {period} p={parameter:g}",
                                            runs, [min(steps[t], budget or steps[t]) for steps in per_run],
                                            references))
    feasible = [i for i, o in enumerate(outcomes) if o.median_retention >= target]
    best = min(feasible, key=lambda i: (outcomes[i].mean_steps, -outcomes[i].worst_decile_retention)) \
        if feasible else None
    return Calibration(target, length, settings, outcomes, best)


# ------------------------------------------------------------------------------------------------ outputs
def trade_off_table(result: Calibration, rows: int = 15) -> str:
    """Markdown: the Pareto front of mean steps vs median retention (fewest steps first), the pick marked."""
    order = sorted(range(len(result.outcomes)), key=lambda i: (result.outcomes[i].mean_steps,
                                                               -result.outcomes[i].median_retention))
    front, best_retention = [], -math.inf
    for i in order:
        if result.outcomes[i].median_retention > best_retention:
            front.append(i)
            best_retention = result.outcomes[i].median_retention
    if result.best is not None and result.best not in front:
        front.append(result.best)
    lines = ["| window | threshold | eval every | mean steps | median retention (SE) | worst-decile retention | "
             "exact stops | |", "|---|---|---|---|---|---|---|---|"]
    for i in sorted(front, key=lambda i: result.outcomes[i].mean_steps)[:rows]:
        (w, t, k), o = result.settings[i], result.outcomes[i]
        mark = "**recommended**" if i == result.best else ""
        lines.append(f"| {w} | {t:g} | {k} | {o.mean_steps:.1f} | {o.median_retention:.3f} "
                     f"({bootstrap_se(np.median, o.retention):.3f}) | {o.worst_decile_retention:.3f} | "
                     f"{o.exact}/{len(o.steps)} | {mark} |")
    lines.append("\nSE: bootstrap over the runs' concepts: how far another draw of as many concepts may move the "
                 "median; a setting picked at the target's edge keeps less than the target on about half of them.")
    return "\n".join(lines)


def yaml_snippet(result: Calibration, runs: int) -> str:
    """The ``dvar:`` block to paste into a config (a comment when no setting meets the target)."""
    if result.recommended is None:
        return (f"# calibrate: no setting kept a median {result.target:g} of the converged identity on {runs} runs; "
                "widen --windows or lower --thresholds\n")
    (window, threshold, period), o = result.recommended, result.outcomes[result.best]
    return (f"# calibrated on {runs} runs (python -m lightning_custom calibrate): mean {o.mean_steps:.0f} steps, "
            f"median retention {o.median_retention:.3f},\n# worst decile {o.worst_decile_retention:.3f} of the "
            f"converged identity (converged length {result.converged_length} steps)\n"
            + yaml.safe_dump({"dvar": {"window": window, "threshold": threshold, "eval_every_n_steps": period}},
                             sort_keys=False))
