"""Calibrate DVAR across training settings: one (window, threshold, eval period) for runs of several settings.

A setting that holds at one learning rate (or image count, batch size) can be a fixed budget in disguise
(benchmarks/results/settings_study). Given full-length probed runs grouped by setting (one folder per setting),
:func:`calibrate_across` keeps the grid's settings whose median retention of each setting's converged identity
reaches the target at **every** setting, and recommends the one with the fewest steps relative to each setting's
converged length (worst setting first). Windows of fewer than :data:`MIN_WINDOW_VALUES` L_det values are degenerate
(with 2 values the ratio is (L_k - L_k-1)^2 / 4 over the whole variance, below any threshold after a few
evaluations) and never chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_custom.dvar.calibrate import (
    DEFAULT_EVAL_EVERY,
    DEFAULT_THRESHOLDS,
    DEFAULT_WINDOWS,
    Calibration,
    ProbedRun,
    calibrate,
)
from lightning_custom.dvar.rule import window_in_values
from lightning_custom.errors import UserInputError

MIN_WINDOW_VALUES = 4


def group_by_folder(runs: Sequence[ProbedRun]) -> dict[str, list[ProbedRun]]:
    """Runs grouped by the folder that holds their run folder (``lr_x1/c000`` -> ``lr_x1``)."""
    groups: dict[str, list[ProbedRun]] = {}
    for run in runs:
        setting = str(Path(run.name).parent) if "/" in run.name else "."
        groups.setdefault(setting, []).append(run)
    return groups


@dataclass
class AcrossCalibration:
    """Each setting's calibration over the same grid, and the one grid entry recommended for all of them."""

    target: float
    per_setting: dict[str, Calibration]
    best: int | None
    degenerate: list[int]  # grid entries whose window holds fewer than MIN_WINDOW_VALUES values

    @property
    def settings(self) -> list[tuple[int, float, int]]:
        return next(iter(self.per_setting.values())).settings

    @property
    def recommended(self) -> tuple[int, float, int] | None:
        return None if self.best is None else self.settings[self.best]


def calibrate_across(groups: dict[str, Sequence[ProbedRun]], target: float = 0.97,
                     windows: Sequence[int] = DEFAULT_WINDOWS, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                     eval_every: Sequence[int] = DEFAULT_EVAL_EVERY, budget: int | None = None,
                     smooth: int = 1) -> AcrossCalibration:
    """The grid entry meeting ``target`` at every setting with the least worst-setting cost (mean steps / that
    setting's converged length); ``best`` is ``None`` when no entry meets it everywhere."""
    if len(groups) < 2:
        raise UserInputError(f"runs: --across needs runs of at least two settings (one folder each), got "
                             f"{len(groups)}: {sorted(groups)}")
    per = {name: calibrate(list(runs), target, windows, thresholds, eval_every, budget=budget, smooth=smooth)
           for name, runs in groups.items()}
    settings = next(iter(per.values())).settings
    degenerate = [i for i, (w, _, k) in enumerate(settings) if window_in_values(w, k) < MIN_WINDOW_VALUES]
    feasible = [i for i in range(len(settings)) if i not in degenerate
                and all(c.outcomes[i].median_retention >= target for c in per.values())]

    def cost(i: int) -> float:
        return max(c.outcomes[i].mean_steps / max(1, c.converged_length) for c in per.values())

    best = min(feasible, key=cost) if feasible else None
    return AcrossCalibration(target, per, best, degenerate)


def across_table(result: AcrossCalibration) -> str:
    """Markdown: the recommended entry (or each setting's own best) at every setting."""
    lines = ["| setting | runs | converged length | window | threshold | eval every | mean steps | median retention |"
             " worst-decile retention |", "|---|---|---|---|---|---|---|---|---|"]
    for name, c in sorted(result.per_setting.items()):
        index = result.best if result.best is not None else c.best
        if index is None:
            lines.append(f"| {name} | {len(c.outcomes[0].steps)} | {c.converged_length} | - | - | - | - | - | - |")
            continue
        (w, t, k), o = c.settings[index], c.outcomes[index]
        lines.append(f"| {name} | {len(o.steps)} | {c.converged_length} | {w} | {t:g} | {k} | {o.mean_steps:.0f} | "
                     f"{o.median_retention:.3f} | {o.worst_decile_retention:.3f} |")
    if result.best is None:
        lines.append(f"\nNo setting of the grid keeps a median {result.target:g} at every setting (each row: that "
                     "setting's own best, which does not carry to the others).")
    lines.append(f"\n{len(result.degenerate)} grid entries with windows of fewer than {MIN_WINDOW_VALUES} L_det values "
                 "are degenerate and never chosen.")
    return "\n".join(lines)
