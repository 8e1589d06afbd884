"""What a DreamBooth-LoRA fleet could gain at best (issue 24, item 6), before anyone builds one.

A fleet of N LoRA concepts would run one forward and backward of batch 2N through the shared frozen model, each
sample through its own concept's adapter, where N separate runs each load the model and run batches of 2. The
adapters' own matmuls are small (rank 4 on the embedded model), so the best a fleet can do is the gain of one run at
batch 2N over N runs at batch 2: this script measures exactly that, with the DreamBooth-LoRA quickstart (one CPU
thread, DVAR observing every 5 steps, start-up and model loading included)::

    nice python benchmarks/lora_fleet_bound.py --out benchmarks/results/fleet

It writes ``lora_fleet_bound.md``: start-up, seconds per step by batch size, and the bound on concepts per CPU-hour
for N = 1, 4, 16 at a run length of ``--steps`` (the quickstart's median stop). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart_dreambooth_lora.yaml"


def timed_run(batch_size: int, steps: int, folder: Path) -> float:
    """Wall seconds of one CLI fit of the quickstart at ``batch_size`` for ``steps`` steps (DVAR observing)."""
    import os

    args = [sys.executable, "-m", "lightning_custom", "fit", "--config", str(CONFIG),
            "--data.batch_size", str(batch_size), "--trainer.max_steps", str(steps), "--dvar.stop", "false",
            "--trainer.default_root_dir", str(folder), "--trainer.enable_progress_bar", "false",
            "--summary.report", "false"]
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, cwd=ROOT,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], help="fleet sizes N")
    parser.add_argument("--steps", type=int, default=100, help="run length the bound is stated at")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fleet")
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        short, long = 10, 10 + args.steps
        base_short = timed_run(2, short, Path(tmp) / "a")
        per_step = {}
        for n in args.sizes:
            per_step[n] = (timed_run(2 * n, long, Path(tmp) / f"b{n}") - base_short) / args.steps
            print(f"batch {2 * n}: {per_step[n]:.4f} s per step", flush=True)
    startup = base_short - short * per_step[args.sizes[0]]
    one = startup + args.steps * per_step[1] if 1 in per_step else None
    lines = ["# DreamBooth-LoRA: what a fleet could gain at best", "",
             "One run at batch 2N against N runs at batch 2 (`configs/quickstart_dreambooth_lora.yaml`, one CPU "
             "thread, DVAR observing every 5 steps; `python benchmarks/lora_fleet_bound.py` rebuilds this page). A "
             "fleet also needs each sample to pass its own concept's adapter, which this bound leaves out.", "",
             f"Start-up and model loading: {startup:.1f} s. Run length: {args.steps} steps.", "",
             "| N | batch | seconds per step | N separate runs: s | one batched run: s | best possible gain |",
             "|---|---|---|---|---|---|"]
    for n in args.sizes:
        fleet = startup + args.steps * per_step[n]
        separate = n * one if one is not None else float("nan")
        lines.append(f"| {n} | {2 * n} | {per_step[n]:.4f} | {separate:.1f} | {fleet:.1f} | "
                     f"{separate / fleet:.1f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_fleet_bound.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
