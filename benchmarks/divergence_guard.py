"""How often do DVAR's guards fire? Replays them over finished runs' ``summary.json`` files.

Two guards stop a run for another reason where DVAR's variance ratio would call it converged (both used live by
DVAREarlyStopping):

* *diverged* (lightning_custom.dvar.rule.divergence): the trainable parameters' norm grew more than ``--norm-factor``
  times, or L_det's last window is more than ``--tolerance`` above its first values;
* *undertrained* (lightning_custom.dvar.rule.barely_moved): L_det moved by less than ``--undertrained-below`` of its
  level over the whole run (a slow drift at a far too small learning rate also flattens the ratio).

On healthy runs neither may fire. For every run this replays DVAR with the run's own window and threshold (or
``--window`` / ``--threshold``), applies the guards where DVAR would stop (and the norm check at every evaluation
up to there), and prints one line per run, then the counts and the margins:

    python benchmarks/divergence_guard.py benchmarks/results

Columns: the replayed stop step, L_det's last-window mean relative to its first values at that stop (the loss
rule fires above +tolerance), L_det's spread (max - min over its mean) up to the stop (the undertrained rule fires
below its bound), the largest trainable-norm growth up to the stop (the norm rule fires above the factor; "-" when
the summary has no norm history), and the verdict. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_custom.dvar.rule import (  # noqa: E402
    DIVERGENCE_LOSS_TOLERANCE,
    DIVERGENCE_NORM_FACTOR,
    UNDERTRAINED_RELATIVE_SPREAD,
    barely_moved,
    head_values,
    relative_spread,
    window_in_values,
)
from lightning_custom.dvar.replay import RunHistory, divergence_at, load_run, find_summaries, replay_stop_indices  # noqa: E402


def guard_row(run: RunHistory, window_steps: int, threshold: float, tolerance: float, factor: float,
              undertrained_below: float = UNDERTRAINED_RELATIVE_SPREAD) -> dict:
    """The replayed stop of one run, the guard's margins there, and whether it fires."""
    window = window_in_values(window_steps, run.eval_every_n_steps)
    values = [[v for _, v in points] for points in run.series.values()]
    index = replay_stop_indices(values, window, [threshold])[0]
    end = index if index is not None else len(run.steps) - 1
    loss_change = spread = None
    if index is not None:  # the loss rules apply only where DVAR would stop
        changes = []
        spread = min(relative_spread(series[: index + 1]) for series in values)
        for series in values:
            kept = np.asarray(series[: index + 1], dtype=np.float64)
            start = kept[: head_values(window)].mean()
            changes.append(kept[-window:].mean() / start - 1 if start > 0 else 0.0)
        loss_change = max(changes)
    growth = None
    if run.norm_history and run.initial_norm:
        norms = [n for s, n in run.norm_history if s <= run.steps[end]]
        growth = max(norms) / run.initial_norm if norms else None
    reason = divergence_at(run, window, end, tolerance, factor) if index is not None else None
    if index is None and growth is not None and growth > factor:
        reason = f"norm grew x{growth:.0f}"
    if reason is None and index is not None and undertrained_below > 0:
        reason = next((why for series in values if (why := barely_moved(series[: index + 1], undertrained_below))),
                      None)
    return {"name": run.name, "stopped_by": run.stopped_by, "stop": run.steps[index] if index is not None else None,
            "loss_change": loss_change, "spread": spread, "norm_growth": growth, "reason": reason}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders, summary.json files, or folders holding them")
    parser.add_argument("--window", type=int, help="DVAR window in steps (default: each run's own)")
    parser.add_argument("--threshold", type=float, help="DVAR threshold (default: each run's own)")
    parser.add_argument("--tolerance", type=float, default=DIVERGENCE_LOSS_TOLERANCE)
    parser.add_argument("--norm-factor", type=float, default=DIVERGENCE_NORM_FACTOR)
    parser.add_argument("--undertrained-below", type=float, default=UNDERTRAINED_RELATIVE_SPREAD)
    args = parser.parse_args(argv)
    # Only folders and summary.json files (a shell glob like runs/* may also catch logs); a folder without runs
    # is said and skipped.
    files, skipped = [], []
    for path in args.runs:
        if Path(path).is_dir() or Path(path).name == "summary.json":
            try:
                files.extend(find_summaries([path]))
            except ValueError as err:
                skipped.append(str(err))
    rows = []
    for file in dict.fromkeys(files):
        try:
            run = load_run(file)
        except ValueError as err:  # e.g. a summary without a DVAR history
            skipped.append(f"{file}: {err}")
            continue
        window = args.window or run.live.get("dvar_window")
        threshold = args.threshold or run.live.get("dvar_threshold")
        if not window or not threshold:
            skipped.append(f"{file}: no DVAR window/threshold recorded (give --window and --threshold)")
            continue
        row = guard_row(run, int(window), float(threshold), args.tolerance, args.norm_factor, args.undertrained_below)
        row["name"] = str(file.parent)
        rows.append(row)
    print(f"{'run':60s} {'live':>12s} {'stop':>6s} {'L_det end/start':>15s} {'spread':>7s} {'norm growth':>11s}  "
          "guard")
    for row in rows:
        change = "-" if row["loss_change"] is None else f"{100 * row['loss_change']:+.1f}%"
        spread = "-" if row["spread"] is None else f"{100 * row['spread']:.2f}%"
        growth = "-" if row["norm_growth"] is None else f"x{row['norm_growth']:.2f}"
        stop = "never" if row["stop"] is None else str(row["stop"])
        verdict = f"FIRES: {row['reason']}" if row["reason"] else "quiet"
        print(f"{row['name'][-60:]:60s} {str(row['stopped_by']):>12s} {stop:>6s} {change:>15s} {spread:>7s} "
              f"{growth:>11s}  {verdict}")
    for line in skipped:
        print(f"skipped {line}")
    fired = sum(1 for row in rows if row["reason"])
    changes = [row["loss_change"] for row in rows if row["loss_change"] is not None]
    growths = [row["norm_growth"] for row in rows if row["norm_growth"] is not None]
    spreads = [row["spread"] for row in rows if row["spread"] is not None]
    print(f"\nguards fire on {fired} of {len(rows)} runs (tolerance +{100 * args.tolerance:g}%, norm "
          f"x{args.norm_factor:g}, undertrained below {100 * args.undertrained_below:g}%)"
          + (f"; largest L_det end/start {100 * max(changes):+.1f}%" if changes else "")
          + (f"; smallest L_det spread {100 * min(spreads):.2f}%" if spreads else "")
          + (f"; largest norm growth x{max(growths):.2f}" if growths else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
