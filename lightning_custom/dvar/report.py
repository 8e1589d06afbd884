"""The run report: one PNG with the training loss, DVAR's deterministic loss and the variance ratio over steps.

Drawn from the ``summary.json`` contract alone, so it can be redrawn for any finished run. The ratio series is
recomputed with :func:`lightning_custom.dvar.rule.ratio_series`, the function the live callback uses.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from lightning_custom.dvar.rule import head_values, moving_average, ratio_series, window_in_values
from lightning_custom.runtime.io import atomic_path

REPORT_FILE = "report.png"
# Stops that are not convergence: the report spells out their reason.
ALARMS = ("diverged", "non_finite", "not_training")
FIGSIZE = (8.0, 8.0)
DPI = 100


def dvar_ratios(summary: dict[str, Any]) -> list[list[float]]:
    """``[[step, ratio], ...]`` for the summary's DVAR history (empty without a DVAR window)."""
    history = points(summary.get("dvar_history"))
    window = summary.get("dvar_window")
    if not len(history) or not window:
        return []
    every = summary.get("dvar_eval_every_n_steps") or 1
    ratios = ratio_series(history[:, 1].tolist(), window_in_values(window, every))
    return [[step, r] for (step, _), r in zip(history.tolist(), ratios) if r is not None]


def points(rows: Any) -> np.ndarray:
    """``[[step, value], ...]`` as an ``(n, 2)`` float array; ``null`` (a non-finite value in JSON) becomes NaN."""
    return np.asarray([[np.nan if v is None else v for v in row] for row in rows or []],
                      dtype=np.float64).reshape(-1, 2)


def report_figure(summary: dict[str, Any]):
    """A matplotlib ``Figure`` (Agg canvas, no pyplot state) of the run's losses and DVAR ratio."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    stop_step = summary.get("stop_step")
    stopped_by = summary.get("stopped_by") or "?"

    train = points(summary.get("train_loss_history"))
    ax = axes[0]
    if len(train):
        width = max(1, len(train) // 50)
        if width > 1:
            ax.plot(train[:, 0], train[:, 1], color="tab:gray", alpha=0.35, lw=0.8, label="training loss")
            ax.plot(train[:, 0], moving_average(train[:, 1], width), color="tab:blue", lw=1.4,
                    label=f"moving mean ({width} steps)")
            ax.legend(loc="upper right", fontsize=8)
        else:
            ax.plot(train[:, 0], train[:, 1], color="tab:blue", lw=1.0)
    else:
        ax.text(0.5, 0.5, "no training loss recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("training loss")

    history = points(summary.get("dvar_history"))
    ax = axes[1]
    if len(history):
        ax.plot(history[:, 0], history[:, 1], color="tab:orange", lw=1.2)
        window = summary.get("dvar_window")
        if stopped_by == "diverged" and window:
            # Where the loss started: a diverged run ends above it.
            head = head_values(window_in_values(window, summary.get("dvar_eval_every_n_steps") or 1))
            ax.axhline(float(np.nanmean(history[:head, 1])), color="tab:red", ls="--", lw=1.0,
                       label="L_det at the start")
            ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no deterministic loss recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("deterministic loss $L_{det}$")
    for loss_axis in axes[:2]:  # plain numbers: an offset ("+1.08e-1") reads as a different value
        loss_axis.ticklabel_format(axis="y", style="plain", useOffset=False)

    ratios = np.asarray(dvar_ratios(summary), dtype=np.float64).reshape(-1, 2)
    threshold = summary.get("dvar_threshold")
    ax = axes[2]
    if len(ratios):
        positive = ratios[:, 1] > 0
        ax.plot(ratios[positive, 0], ratios[positive, 1], color="tab:green", lw=1.2, label="variance ratio")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "ratio undefined (history shorter than the window)", ha="center", va="center",
                transform=ax.transAxes)
    if threshold:
        ax.axhline(threshold, color="tab:red", ls="--", lw=1.0, label=f"threshold {threshold:g}")
        below = np.flatnonzero(ratios[:, 1] < threshold) if len(ratios) else []
        if len(below) and stopped_by != "dvar":
            # An observing run (dvar.stop=false, a baseline): where DVAR with these settings would have stopped.
            first = ratios[below[0]]
            ax.plot([first[0]], [max(first[1], 1e-12)], "v", color="tab:red",
                    label=f"DVAR would stop: step {first[0]:.0f}")
    if stop_step is not None:
        for axis in axes:
            axis.axvline(stop_step, color="black", ls=":", lw=1.0)
        ax.lines[-1].set_label(f"stop: step {stop_step} ({stopped_by})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel(f"var(last W) / var(all)\nW = {summary.get('dvar_window')} steps")
    ax.set_xlabel("optimizer step")

    for axis in axes:
        axis.grid(alpha=0.3)
    title = f"{summary.get('method', 'run')}: stopped at step {stop_step} of {summary.get('max_steps')} by {stopped_by}"
    if stopped_by in ALARMS and summary.get("stop_reason"):
        title += "\n" + textwrap.shorten(summary["stop_reason"], width=200, placeholder=" ...")
    saved = summary.get("steps_saved")
    if saved is not None and summary.get("seconds_saved") is not None:
        rate = summary.get("seconds_per_step") or 0.0
        title += f"\n{saved} steps saved, ~{summary['seconds_saved']:.1f} s at {rate:.3g} s/step"
    fig.suptitle("\n".join(textwrap.fill(line, width=110) for line in title.split("\n")), fontsize=9,
                 color="tab:red" if stopped_by in ALARMS else "black")
    fig.tight_layout()
    return fig


def write_report(summary: dict[str, Any], path: str | Path) -> Path:
    """Draw :func:`report_figure` and save it as a ``800 x 800`` PNG, atomically."""
    fig = report_figure(summary)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)
