"""Semi-deterministic study: which randomness of the evaluation batch hides the trend of the loss?

DVAR's evaluation batch has five parts: images, VAE latents, noise, captions and timesteps. Each config in
``configs/semideterministic/`` redraws ONE of them at every evaluation (``--data.resample``). This script trains
each for a short run (plus the fully deterministic batch as the reference), then plots the six deterministic-loss
curves side by side. In the paper (Voronov et al., 2023), resampling timesteps makes the loss uninformative,
images or noise hide the trend unless the batch is large, and captions or latents keep it.

    python benchmarks/semideterministic.py --steps 200
    # -> benchmarks/results/semideterministic.png (+ .csv with the curves)

Not collected by pytest. The configs train on the embedded tiny model, so the curves show the mechanics of the
study, not the paper's numbers; point --model at a real Stable Diffusion to reproduce those.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "semideterministic"
PARTS = ("images", "latents", "noise", "captions", "timesteps")


def run_one(part: str | None, steps: int, workdir: Path, model: str | None, eval_batch_size: int) -> dict:
    """Fit one config (``part=None``: nothing resampled) and return its summary."""
    from lightning_custom.cli import main

    config = CONFIGS / f"resample_{part or 'images'}.yaml"
    out = workdir / (f"resample_{part}" if part else "fixed")
    args = ["fit", "--config", str(config), "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(out),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--summary.report", "false", "--data.init_args.eval_batch_size", str(eval_batch_size)]
    if part is None:
        args += ["--data.init_args.resample", "[]"]
    if model:
        args += ["--model.init_args.pretrained_model_name_or_path", model]
    main(args)
    return json.loads((out / "summary.json").read_text())


def plot(curves: dict[str, list[list[float]]], path: Path, title: str) -> None:
    """Six panels, one per resampled part; the fully fixed batch is drawn in grey in each for reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3, sharex=True).ravel()
    reference = curves.get("fixed")
    for ax, (name, history) in zip(axes, curves.items()):
        steps = [s for s, _ in history]
        values = [v for _, v in history]
        if reference is not None and name != "fixed":
            ax.plot([s for s, _ in reference], [v for _, v in reference], color="0.7", lw=1.0, label="all fixed")
        ax.plot(steps, values, color="tab:orange" if name != "fixed" else "tab:blue", lw=1.0,
                label=f"resample {name}" if name != "fixed" else "all fixed (DVAR)")
        ax.set_title("all parts fixed" if name == "fixed" else f"resample {name}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    for ax in axes[3:]:
        ax.set_xlabel("optimizer step")
    for ax in axes[::3]:
        ax.set_ylabel("evaluation-batch loss")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def main() -> None:
    """Parse the arguments, run the six fits and write the figure and the curves."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--eval-batch-size", type=int, default=4, help="size of the evaluation batch")
    parser.add_argument("--model", default=None, help="diffusers model instead of the embedded tiny one")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "semideterministic.png"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on busy CPUs)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        curves: dict[str, list[list[float]]] = {}
        for part in (None, *PARTS):
            summary = run_one(part, args.steps, workdir, args.model, args.eval_batch_size)
            curves[part or "fixed"] = summary["dvar_history"]
            print(f"{part or 'fixed':>9}: {len(summary['dvar_history'])} evaluations, "
                  f"{summary['seconds_per_step']:.3f} s/step")
    output = Path(args.output)
    model = args.model or "embedded tiny model"
    plot(curves, output, f"Semi-deterministic study: Textual Inversion on the {model}, evaluation batch "
                         f"{args.eval_batch_size}, one part resampled per panel")
    with output.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *curves])
        for row in zip(*curves.values()):
            writer.writerow([int(row[0][0]), *(f"{v:.6f}" for _, v in row)])
    print(f"wrote {output} and {output.with_suffix('.csv')} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
