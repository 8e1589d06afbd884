"""Table 1, second edition (issue 12): long runs with quality at the exact stop step, calibrated on one split.

Three phases, each resumable (finished runs, probes and files are reused):

``run``: per (method, concept), ONE long run with DVAR observing (``--dvar.stop false``, L_det every 5 steps), a
    :class:`~lightning_custom.world.probe.WorldProbe` every ``--probe-every`` steps, and
    :class:`~lightning_custom.world.probe.TrainableSnapshots` saving the trainable weights at every L_det
    evaluation. After the run, every step where a setting of the calibration grid
    (:func:`lightning_custom.calibrate.grid_stop_steps`) stops is probed from its snapshot into
    ``exact_probes.json``, with the same sampling seeds as the periodic probes (paired across steps and variants).
    Full DreamBooth's snapshots (the whole UNet, ~11 MB each) are deleted once probed; the small methods' stay, so
    more steps can be probed later. ``summary.json`` and ``exact_probes.json`` are copied to ``--results``/runs.
``noise``: the probe's own noise: one run's snapshots at given steps, probed with ``--seeds`` sampling seeds.
``table``: the second-edition table from the runs that exist (see :func:`main`).

    # the convergence study (3x the first edition's lengths), TI and LoRA first; rerun the same line to resume
    nohup nice -n 19 python benchmarks/table1_v2.py run --methods textual_inversion dreambooth_lora \\
        --concepts 0-19 > /tmp/table1_v2.log 2>&1 &
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import table1 as v1  # noqa: E402  (the first edition: method settings, run configs, fit)

ROOT = Path(__file__).resolve().parents[1]
LONG_STEPS = {"textual_inversion": 1200, "dreambooth_lora": 900, "custom_diffusion": 600, "dreambooth": 600}
KEEP_SNAPSHOTS = {"textual_inversion", "dreambooth_lora", "custom_diffusion"}  # small; DreamBooth's are deleted
CALIBRATION, TEST = range(0, 50), range(50, 100)
EVAL_EVERY = 5  # L_det (and a snapshot) every 5 steps; the calibration grid replays periods 5, 10 and 20


def parse_concepts(spec: str) -> list[int]:
    """``"0-19,50-54,60"`` -> ``[0, ..., 19, 50, ..., 54, 60]`` (held-out concept indices)."""
    out: list[int] = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        out.extend(range(int(first), int(last or first) + 1))
    return list(dict.fromkeys(out))


def run_paths(work: Path, method: str, concept_name: str) -> tuple[Path, Path]:
    """(run folder, config file) of one long run."""
    return work / "runs" / "full" / method / concept_name, work / "configs" / method / f"{concept_name}.yaml"


def long_config(method: str, concept, args) -> dict:
    """The first edition's run config at this edition's length, with the snapshot callback added."""
    settings = copy.copy(args)
    settings.steps = args.steps or LONG_STEPS[method]
    config = v1.run_config(method, concept, Path(args.workdir), settings, live=False)
    config["dvar"]["eval_every_n_steps"] = EVAL_EVERY
    run_dir = Path(config["trainer"]["default_root_dir"])
    config["trainer"]["callbacks"].append({"class_path": "lightning_custom.world.probe.TrainableSnapshots",
                                           "init_args": {"dirpath": str(run_dir / "snapshots")}})
    return config


def exact_probe(run_dir: Path, config_file: Path) -> dict:
    """Probe, from the snapshots, every grid stop step that has no probe yet; returns ``exact_probes.json``."""
    from lightning_custom.calibrate import EXACT_PROBES_FILE, grid_stop_steps, load_probed_run
    from lightning_custom.io import write_json
    from lightning_custom.world.probe import probe_snapshots, snapshot_steps

    run = load_probed_run(run_dir / "summary.json")
    path = run_dir / EXACT_PROBES_FILE
    done = json.loads(path.read_text()) if path.is_file() else {"steps": {}}
    have = set(run.probes) | {int(s) for s in done["steps"]}
    available = set(snapshot_steps(run_dir / "snapshots"))
    needed = sorted(s for s in grid_stop_steps(run) if s not in have and s in available)
    if needed:
        start = time.time()
        scores = probe_snapshots(config_file, run_dir / "snapshots", needed)
        done["steps"].update({str(s): rows[0] for s, rows in scores.items()})
        done["steps"] = dict(sorted(done["steps"].items(), key=lambda kv: int(kv[0])))
        done["seconds"] = round(done.get("seconds", 0.0) + time.time() - start, 1)
        write_json(path, done)
    return done


def run_phase(args) -> int:
    """Train (or reuse) every long run, probe its exact stop steps, copy the small results."""
    from lightning_custom.world.concepts import heldout_concepts

    work, results = Path(args.workdir), Path(args.results) / "runs"
    concepts = heldout_concepts(max(parse_concepts(args.concepts)) + 1)
    start = time.time()
    for index in parse_concepts(args.concepts):
        concept = concepts[index]
        if not (work / "concepts" / concept.name).exists():
            concept.write_images(work / "concepts" / concept.name)
        for method in args.methods:
            run_dir, config_file = run_paths(work, method, concept.name)
            began = time.time()
            trained = not (run_dir / "summary.json").exists()
            summary = v1.fit(long_config(method, concept, args), config_file)
            exact = exact_probe(run_dir, config_file)
            if method not in KEEP_SNAPSHOTS:
                shutil.rmtree(run_dir / "snapshots", ignore_errors=True)
            target = results / method / concept.name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(run_dir / "summary.json", target / "summary.json")
            if (run_dir / "exact_probes.json").exists():
                shutil.copy(run_dir / "exact_probes.json", target / "exact_probes.json")
            print(f"[{time.strftime('%H:%M:%S')} +{time.time() - start:.0f}s] {method} {concept.name}: "
                  f"{'trained' if trained else 'reused'} in {time.time() - began:.0f}s (train "
                  f"{summary['wall_seconds']:.0f}s of which probes {summary.get('world_probe_seconds', 0):.0f}s; "
                  f"{len(exact['steps'])} exact probes in {exact.get('seconds', 0):.0f}s)", flush=True)
    return 0


def noise_phase(args) -> int:
    """The probe's standard error: the steps' snapshots of one run, probed with many sampling seeds (paired)."""
    from lightning_custom.io import write_json
    from lightning_custom.world.probe import probe_snapshots

    run_dir, config_file = run_paths(Path(args.workdir), args.methods[0], args.concept)
    seeds = [1000 * k for k in range(args.seeds)]
    scores = probe_snapshots(config_file, run_dir / "snapshots", args.steps_to_probe, seeds)
    identity = {s: np.array([row[1] for row in rows]) for s, rows in scores.items()}
    report = {"method": args.methods[0], "concept": args.concept, "seeds": seeds, "steps": {}}
    for step, values in identity.items():
        report["steps"][str(step)] = {"identity": values.tolist(), "mean": float(values.mean()),
                                      "sd_over_seeds": float(values.std(ddof=1))}
    steps = list(identity)
    for a, b in zip(steps, steps[1:]):
        diff = identity[b] - identity[a]
        report.setdefault("paired_differences", {})[f"{b}-{a}"] = {
            "mean": float(diff.mean()), "sd_over_seeds": float(diff.std(ddof=1))}
    out = Path(args.results) / f"probe_noise_{args.methods[0]}_{args.concept}.json"
    write_json(out, report)
    print(json.dumps(report, indent=1))
    return 0


def table_phase(args) -> int:
    """The second-edition table (not written yet)."""
    raise NotImplementedError


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the phases (``run``, ``noise``, ``table``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("run", "noise", "table"))
    parser.add_argument("--concepts", default="0-19", help="held-out concept indices, e.g. 0-19,50-69")
    parser.add_argument("--methods", nargs="+", default=["textual_inversion", "dreambooth_lora"],
                        choices=list(v1.METHODS))
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--encoder", default=None, help="world encoder folder (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=None, help="run length for every method (default: "
                        + ", ".join(f"{m} {s}" for m, s in LONG_STEPS.items()) + ")")
    parser.add_argument("--probe-every", type=int, default=25)
    parser.add_argument("--probe-images", type=int, default=2)
    parser.add_argument("--probe-inference-steps", type=int, default=10)
    parser.add_argument("--class-images", type=int, default=4)
    parser.add_argument("--accelerator", default=None)
    parser.add_argument("--workdir", default="runs/table1-v2")
    parser.add_argument("--results", default="benchmarks/results/table1_v2")
    parser.add_argument("--concept", default=None, help="noise: the concept folder name, e.g. c000-new_shape")
    parser.add_argument("--steps-to-probe", type=int, nargs="+", default=None, help="noise: snapshot steps")
    parser.add_argument("--seeds", type=int, default=16, help="noise: sampling seeds")
    args = parser.parse_args(argv)
    if args.phase == "run":
        return run_phase(args)
    if args.phase == "noise":
        return noise_phase(args)
    return table_phase(args)


if __name__ == "__main__":
    raise SystemExit(main())
