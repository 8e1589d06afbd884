"""Does evaluating L_det every k steps (window counted in steps) stop where every-step evaluation does?

Replays recorded every-step DVAR histories (any ``summary.json`` of a full-length or DVAR run, with
``dvar_eval_every_n_steps == 1``) and synthetic series shaped like the paper's curves (a decay to a plateau plus
noise), at k = 1, 2, 5, 10, 20, and reports how far the stop step moves.

    python benchmarks/dvar_frequency.py [--summaries runs/*/summary.json] [--synthetic 200]

Writes benchmarks/results/dvar_frequency.{md,json,png}. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_custom.dvar.rule import stop_step_every  # noqa: E402
from lightning_custom.runtime.io import write_json  # noqa: E402

PERIODS = (1, 2, 5, 10, 20)


def synthetic_history(rng: np.random.Generator, steps: int = 3000) -> list[list[float]]:
    """A decay to a plateau with noise: time constant, noise level and drift drawn at random."""
    tau = rng.uniform(50, 600)
    noise = rng.uniform(0.002, 0.03)
    drift = rng.uniform(-2e-5, 2e-5)
    t = np.arange(1, steps + 1)
    values = 0.1 + 0.05 * np.exp(-t / tau) + drift * t + noise * 0.05 * rng.standard_normal(steps)
    return [[int(s), float(v)] for s, v in zip(t, values)]


def recorded_histories(paths: list[str]) -> list[tuple[str, list[list[float]]]]:
    """Every-step histories from summary.json files."""
    out = []
    for path in paths:
        summary = json.loads(Path(path).read_text())
        if summary.get("dvar_eval_every_n_steps", 1) == 1 and summary.get("dvar_history"):
            out.append((path, summary["dvar_history"]))
    return out


def csv_histories(specs: list[str]) -> list[tuple[str, list[list[float]]]]:
    """Every-step histories from CSV columns, given as ``path:column`` (a ``step`` column gives the steps)."""
    import csv

    out = []
    for spec in specs:
        path, column = spec.rsplit(":", 1)
        with open(path) as f:
            rows = list(csv.DictReader(f))
        out.append((spec, [[int(r["step"]), float(r[column])] for r in rows]))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summaries", nargs="*", default=[])
    parser.add_argument("--csv", nargs="*", default=[], help="recorded series as path.csv:column")
    parser.add_argument("--synthetic", type=int, default=200, help="number of synthetic series")
    parser.add_argument("--window", type=int, default=310)
    parser.add_argument("--threshold", type=float, default=0.15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    series = [(f"synthetic-{i}", synthetic_history(rng)) for i in range(args.synthetic)]
    series += recorded_histories(args.summaries) + csv_histories(args.csv)
    rows = []
    for name, history in series:
        window = args.window if name.startswith("synthetic") else max(10, min(args.window, len(history) // 4))
        base = stop_step_every(history, window, args.threshold, 1)
        if base is None:
            continue
        row = {"series": name, "window": window, "stop_every_1": base}
        for k in PERIODS[1:]:
            row[f"stop_every_{k}"] = stop_step_every(history, window, args.threshold, k)
        rows.append(row)
    stats = {}
    for k in PERIODS[1:]:
        diffs = np.array([r[f"stop_every_{k}"] - r["stop_every_1"] for r in rows if r[f"stop_every_{k}"] is not None])
        never = sum(r[f"stop_every_{k}"] is None for r in rows)
        stats[k] = {
            "series": len(rows), "never_stopped": never,
            "within_k": float(np.mean(np.abs(diffs) <= k)), "within_2k": float(np.mean(np.abs(diffs) <= 2 * k)),
            "median_abs_diff": float(np.median(np.abs(diffs))), "max_abs_diff": int(np.abs(diffs).max()),
            "mean_diff": float(diffs.mean()),
            "median_relative_diff": float(np.median(np.abs(diffs) / np.array(
                [r["stop_every_1"] for r in rows if r[f"stop_every_{k}"] is not None]))),
        }
    out = Path(args.out)
    write_json(out / "dvar_frequency.json", {"command": " ".join(sys.argv), "stats": stats, "rows": rows})
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             f"{len(rows)} series (window {args.window} steps for synthetic ones, threshold {args.threshold}); "
             f"median every-step stop: {int(np.median([r['stop_every_1'] for r in rows]))} steps.", "",
             "| k | within k | within 2k | median abs diff (steps) | median relative diff | max abs diff | mean diff "
             "| never stopped |",
             "|---|---|---|---|---|---|---|---|"]
    for k, s in stats.items():
        lines.append(f"| {k} | {100 * s['within_k']:.1f}% | {100 * s['within_2k']:.1f}% | {s['median_abs_diff']:.1f} "
                     f"| {100 * s['median_relative_diff']:.1f}% | {s['max_abs_diff']} | {s['mean_diff']:+.1f} | {s['never_stopped']} |")
    (out / "dvar_frequency.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "dvar_frequency.png")
    print("\n".join(lines))
    return stats


def plot(rows: list[dict], path: Path) -> None:
    """Stop step at k against every-step evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    base = np.array([r["stop_every_1"] for r in rows])
    for k in PERIODS[1:]:
        other = np.array([r[f"stop_every_{k}"] if r[f"stop_every_{k}"] is not None else np.nan for r in rows])
        ax.scatter(base, other, s=8, label=f"every {k} steps")
    lim = [0, np.nanmax(base) * 1.05]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set_xlabel("stop step, evaluated every step")
    ax.set_ylabel("stop step, evaluated every k steps")
    ax.set_title("DVAR stop step vs evaluation period (window in steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
