"""Offline DVAR replay and calibration: where would DVAR have stopped, for a grid of (window, threshold)?

DVAR only observes the deterministic loss, so the ``dvar_history`` that a finished run wrote to its ``summary.json``
is all a replay needs. The ratios come from :func:`lightning_custom.dvar.rule.ratio_series` (the function the live
callback calls), so replaying a full-length run gives, to the bit, the step where a live DVAR run of the same seed
and settings stops. A run that was itself stopped early only tells where *earlier* stops would have happened;
settings that would have stopped later are reported as censored (``>N``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_custom.dvar.rule import (
    DIVERGENCE_LOSS_TOLERANCE,
    DIVERGENCE_NORM_FACTOR,
    loss_divergence,
    norm_divergence,
    ratio_series,
    window_in_values,
)
from lightning_custom.errors import UserInputError
from lightning_custom.runtime.io import atomic_path, write_json
from lightning_custom.runs.summary import SUMMARY_FILE, find_summaries, read_summary  # noqa: F401

DEFAULT_WINDOWS: tuple[int, ...] = (50, 100, 200, 310, 440)
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)


@dataclass
class RunHistory:
    """The deterministic-loss series of one finished run, as its ``summary.json`` recorded it."""

    name: str
    path: str
    series: dict[str, list[list[float]]]
    eval_every_n_steps: int
    max_steps: int | None
    stop_step: int | None
    stopped_by: str | None
    live: dict[str, Any] = field(default_factory=dict)
    norm_history: list[list[float]] = field(default_factory=list)
    initial_norm: float | None = None

    @property
    def steps(self) -> list[int]:
        """The steps of the evaluations (of the first series; all series are evaluated together)."""
        return [int(s) for s, _ in next(iter(self.series.values()))]

    @property
    def complete(self) -> bool:
        """Whether the run went to its end (no stopping rule cut the series short)."""
        return self.stopped_by in ("max_steps", "max_epochs")


def load_run(summary_file: Path, root: Path | None = None) -> RunHistory:
    """A :class:`RunHistory` from one ``summary.json`` (one-line error if it holds no DVAR history)."""
    summary = read_summary(summary_file.parent, argument="runs")
    series = summary.get("dvar_histories") or {"dvar_loss": summary.get("dvar_history") or []}
    if not any(series.values()):
        raise UserInputError(f"runs: {summary_file} has an empty dvar_history (was DVAREarlyStopping attached?)")
    folder = summary_file.parent
    name = str(folder.relative_to(root)) if root and folder != root else folder.name
    return RunHistory(
        name=name or str(summary_file.parent),
        path=str(summary_file),
        series={k: [[int(s), float(v)] for s, v in points] for k, points in series.items()},
        eval_every_n_steps=int(summary.get("dvar_eval_every_n_steps") or 1),
        max_steps=summary.get("max_steps"),
        stop_step=summary.get("stop_step"),
        stopped_by=summary.get("stopped_by"),
        live={k: summary.get(k) for k in ("dvar_window", "dvar_threshold", "stop_step", "stopped_by")},
        norm_history=[[int(s), float(n)] for s, n in summary.get("dvar_trainable_norm_history") or []],
        initial_norm=summary.get("dvar_initial_trainable_norm"),
    )


def load_runs(paths: Sequence[str | Path]) -> list[RunHistory]:
    """Every run under ``paths`` (see :func:`find_summaries`)."""
    files = find_summaries(paths)
    root = Path(paths[0]).expanduser() if len(paths) == 1 and Path(paths[0]).is_dir() else None
    return [load_run(f, root) for f in files]


def replay_stop_indices(values_by_series: Sequence[Sequence[float]], window: int, thresholds: Sequence[float],
                        min_index: int = 0) -> list[int | None]:
    """For each threshold, the first evaluation index after which DVAR stops (every series converged), or None.

    Same rule as :func:`lightning_custom.dvar.rule.first_stop_index` (and the live callback), with the ratio series
    computed once per window and shared by all thresholds.
    """
    ratios = [ratio_series(values, window) for values in values_by_series]
    length = min(len(r) for r in ratios)
    out: list[int | None] = []
    for threshold in thresholds:
        stop = None
        for i in range(max(window - 1, min_index), length):
            if all(r[i] is not None and r[i] < threshold for r in ratios):
                stop = i
                break
        out.append(stop)
    return out


@dataclass
class ReplayResult:
    """Stop steps of every run for every (window, threshold); ``None`` = never stopped (or censored)."""

    runs: list[RunHistory]
    windows: list[int]
    thresholds: list[float]
    min_steps: int
    stop_steps: np.ndarray  # (runs, windows, thresholds), float with NaN where DVAR did not stop
    censored: np.ndarray  # (runs, windows, thresholds), bool: the run ended before this setting could stop
    diverged: np.ndarray | None = None  # (runs, windows, thresholds), bool: the stop would be "diverged"

    def effective_steps(self) -> np.ndarray:
        """Steps each run would train: the stop step, else its full length (``max_steps`` or the last step)."""
        ends = np.array([r.max_steps if r.complete and r.max_steps else r.steps[-1] for r in self.runs], dtype=float)
        return np.where(np.isnan(self.stop_steps), ends[:, None, None], self.stop_steps)

    def cell_text(self, run: int, w: int, t: int) -> str:
        """``"123"``, ``"never"`` or ``">456"`` (censored) for one run and setting."""
        if self.censored[run, w, t]:
            return f">{self.runs[run].steps[-1]}"
        value = self.stop_steps[run, w, t]
        return "never" if math.isnan(value) else str(int(value))


def replay(paths: Sequence[str | Path], windows: Sequence[int] = DEFAULT_WINDOWS,
           thresholds: Sequence[float] = DEFAULT_THRESHOLDS, min_steps: int = 0) -> ReplayResult:
    """Replay DVAR on every run under ``paths`` for every ``window`` (in steps, like ``--dvar.window``) and threshold."""
    if not windows or not thresholds:
        raise UserInputError("replay: give at least one window and one threshold")
    if any(w < 2 for w in windows):
        raise UserInputError(f"--windows: every window must be at least 2 steps, got {list(windows)}")
    if any(t <= 0 for t in thresholds):
        raise UserInputError(f"--thresholds: every threshold must be positive, got {list(thresholds)}")
    runs = load_runs(paths)
    stops = np.full((len(runs), len(windows), len(thresholds)), np.nan)
    censored = np.zeros_like(stops, dtype=bool)
    diverged = np.zeros_like(stops, dtype=bool)
    for r, run in enumerate(runs):
        steps = run.steps
        values = [[v for _, v in points] for points in run.series.values()]
        min_index = next((i for i, s in enumerate(steps) if s >= min_steps), len(steps))
        for w, window in enumerate(windows):
            indices = replay_stop_indices(values, window_in_values(window, run.eval_every_n_steps), thresholds,
                                          min_index)
            for t, index in enumerate(indices):
                if index is not None:
                    stops[r, w, t] = steps[index]
                    reason = divergence_at(run, window_in_values(window, run.eval_every_n_steps), index)
                    diverged[r, w, t] = reason is not None
                else:
                    censored[r, w, t] = not run.complete
    return ReplayResult(runs, list(windows), [float(t) for t in thresholds], min_steps, stops, censored, diverged)


def divergence_at(run: RunHistory, window: int, index: int, tolerance: float = DIVERGENCE_LOSS_TOLERANCE,
                  factor: float = DIVERGENCE_NORM_FACTOR) -> str | None:
    """Why the live callback would call a stop at evaluation ``index`` "diverged" rather than DVAR, or ``None``.

    The same checks as the callback: the trainable norm exploded at or before that evaluation (when the summary
    recorded it), or any series' last ``window`` values are above its first values (see
    :func:`lightning_custom.dvar.rule.divergence`).
    """
    step = run.steps[index]
    for norm_step, norm in run.norm_history:
        if norm_step <= step and (reason := norm_divergence(run.initial_norm, norm, factor)):
            return reason
    for points in run.series.values():
        if reason := loss_divergence([v for _, v in points[: index + 1]], window, tolerance):
            return reason
    return None


# ------------------------------------------------------------------------------------------------ outputs
def window_label(window: int, result: ReplayResult) -> str:
    """``"25"``, or ``"25 (-> 30)"`` when the runs evaluate every 10 steps and the window spans whole evaluations."""
    effective = sorted({window_in_values(window, run.eval_every_n_steps) * run.eval_every_n_steps
                        for run in result.runs})
    return str(window) if effective == [window] else f"{window} (-> {'/'.join(map(str, effective))})"


def markdown_table(result: ReplayResult) -> str:
    """Rows: windows; columns: thresholds. One run: its stop step. Several: mean steps trained, and how many stopped."""
    header = "| window \\ threshold | " + " | ".join(f"{t:g}" for t in result.thresholds) + " |"
    lines = [header, "|" + "---|" * (len(result.thresholds) + 1)]
    effective = result.effective_steps()
    for w, window in enumerate(result.windows):
        cells = []
        for t in range(len(result.thresholds)):
            if len(result.runs) == 1:
                cells.append(result.cell_text(0, w, t))
            else:
                stopped = int(np.sum(~np.isnan(result.stop_steps[:, w, t])))
                mark = "*" if result.censored[:, w, t].any() else ""
                cells.append(f"{effective[:, w, t].mean():.0f}{mark} ({stopped}/{len(result.runs)})")
        lines.append(f"| {window_label(window, result)} | " + " | ".join(cells) + " |")
    periods = sorted({run.eval_every_n_steps for run in result.runs})
    if any(window_label(window, result) != str(window) for window in result.windows):
        lines.append("")
        lines.append(f"-> a window that is not a multiple of the evaluation period ({'/'.join(map(str, periods))} "
                     "steps) is rounded up to whole evaluations, as the live callback does.")
    lines.append("")
    if len(result.runs) > 1:
        lines.append("Cells: mean steps trained (runs where DVAR stopped / runs). A run where DVAR never stops counts "
                     "its full length; * = some run ended before this setting could stop (a lower bound).")
    else:
        lines.append("Cells: the step where DVAR stops. >N: the run ended at step N before this window could fill, so "
                     "DVAR would stop after N (a lower bound); never: the run was long enough and DVAR did not stop.")
    return "\n".join(lines)


def csv_text(result: ReplayResult) -> str:
    """One row per (run, window, threshold): the stop step and L_det at the stop relative to the run's range."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "window", "threshold", "stop_step", "stopped", "censored", "steps_saved",
                     "loss_progress", "diverged"])
    for r, run in enumerate(result.runs):
        steps = run.steps
        first = [v for _, v in next(iter(run.series.values()))]
        for w, window in enumerate(result.windows):
            for t, threshold in enumerate(result.thresholds):
                value = result.stop_steps[r, w, t]
                stopped = not math.isnan(value)
                saved = int(run.max_steps - value) if stopped and run.max_steps and run.max_steps > 0 else ""
                # Share of the run's total L_det decrease reached at the stop: (L_0 - L_stop) / (L_0 - L_end).
                progress = ""
                if stopped and first[0] != first[-1]:
                    index = steps.index(int(value))
                    progress = f"{(first[0] - first[index]) / (first[0] - first[-1]):.4f}"
                writer.writerow([run.name, window, f"{threshold:g}", int(value) if stopped else "",
                                 int(stopped), int(result.censored[r, w, t]), saved, progress,
                                 int(result.diverged is not None and result.diverged[r, w, t])])
    return buffer.getvalue()


def text_colour_on(rgba: Sequence[float]) -> str:
    """Black on a light cell, white on a dark one (white on viridis' yellow end was unreadable)."""
    luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
    return "black" if luminance > 0.5 else "white"


def write_heatmap(result: ReplayResult, path: str | Path) -> Path:
    """Heat-map PNG of the (mean) steps trained per (window, threshold), each cell annotated."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    effective = result.effective_steps().mean(axis=0)
    fig = Figure(figsize=(1.2 * len(result.thresholds) + 2.5, 0.7 * len(result.windows) + 2.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(effective, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(result.thresholds)), [f"{t:g}" for t in result.thresholds])
    ax.set_yticks(range(len(result.windows)), [str(w) for w in result.windows])
    ax.set_xlabel("threshold")
    ax.set_ylabel("window (steps)")
    for w in range(len(result.windows)):
        for t in range(len(result.thresholds)):
            mark = "*" if result.censored[:, w, t].any() else ""
            text = result.cell_text(0, w, t) if len(result.runs) == 1 else f"{effective[w, t]:.0f}{mark}"
            colour = text_colour_on(image.cmap(image.norm(effective[w, t])))
            ax.text(t, w, text, ha="center", va="center", fontsize=8, color=colour)
    fig.colorbar(image, ax=ax, label="steps trained" + (" (mean over runs)" if len(result.runs) > 1 else ""))
    what = result.runs[0].name if len(result.runs) == 1 else f"{len(result.runs)} runs"
    ax.set_title(f"DVAR replay: stop step ({what})", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def write_replay(result: ReplayResult, output_dir: str | Path) -> dict[str, Path]:
    """Write ``replay.md``, ``replay.csv``, ``replay.json`` and ``replay.png`` into ``output_dir``."""
    out = Path(output_dir)
    files = {"markdown": out / "replay.md", "csv": out / "replay.csv", "json": out / "replay.json",
             "heatmap": out / "replay.png"}
    with atomic_path(files["markdown"]) as tmp:
        tmp.write_text(markdown_table(result) + "\n")
    with atomic_path(files["csv"]) as tmp:
        tmp.write_text(csv_text(result))
    write_json(files["json"], {
        "windows": result.windows,
        "thresholds": result.thresholds,
        "min_steps": result.min_steps,
        "runs": [
            {"name": run.name, "summary": run.path, "live": run.live,
             "stop_steps": [[None if math.isnan(v) else int(v) for v in row] for row in result.stop_steps[r]],
             "censored": result.censored[r].tolist(),
             "diverged": result.diverged[r].tolist() if result.diverged is not None else None}
            for r, run in enumerate(result.runs)
        ],
    })
    write_heatmap(result, files["heatmap"])
    return files
