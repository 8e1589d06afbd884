"""Table 1, second edition (issue 12): long runs with quality at the exact stop step, calibrated on one split.

Three phases, each resumable (finished runs, probes and files are reused):

``run``: per (method, concept), ONE long run with DVAR observing (``--dvar.stop false``, L_det every 5 steps), a
    :class:`~lightning_custom.world.probe.WorldProbe` every ``--probe-every`` steps, and
    :class:`~lightning_custom.world.probe.TrainableSnapshots` saving the trainable weights at every L_det
    evaluation. After the run, every step where a setting of the calibration grid
    (:func:`lightning_custom.dvar.calibrate.grid_stop_steps`) stops is probed from its snapshot into
    ``exact_probes.json``, with the same sampling seeds as the periodic probes (paired across steps and variants).
    Snapshots stay in the work folder, so more steps can be probed later; full DreamBooth's (the whole UNet) are
    deleted once probed, and ``table --probe-missing`` trains the run again to any step it still needs.
    ``summary.json`` (without the training-loss series) and ``exact_probes.json`` are copied to
    ``--results``/probed_runs.
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
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import table1 as v1  # noqa: E402  (the first edition: method settings, run configs, fit)

ROOT = Path(__file__).resolve().parents[1]
LONG_STEPS = {"textual_inversion": 1200, "dreambooth_lora": 900, "custom_diffusion": 600, "dreambooth": 600}
# Snapshots kept after a run, so stops the grid did not foresee (the equal-cost fixed budget) are probed from them.
# Full DreamBooth's (the whole UNet, ~11 MB each: 2.6 GB per 1200-step run) are deleted once the grid's stops are
# probed; `table --probe-missing` trains such a run again to the steps it needs (replay_snapshots: bit-identical).
KEEP_SNAPSHOTS = {"textual_inversion", "dreambooth_lora", "custom_diffusion"}
CALIBRATION, TEST = range(0, 50), range(50, 100)
DEFAULT_CONCEPT_SEED = 2024  # world.concepts.heldout_concepts' seed: the concepts this repository's study uses
RESULT_RUNS = "probed_runs"  # not "runs": .gitignore ignores every folder of that name
BULKY_FIELDS = ("train_loss_history",)  # left out of the committed copies of summary.json (a third of its size)
EVAL_EVERY = 5  # L_det (and a snapshot) every 5 steps; the calibration grid replays periods 5, 10 and 20
FIDELITY_FILE = "fidelity_probes.json"  # recolour / prior fidelity by step (world.fidelity.fidelity_checks)
FIDELITY_CURVE = (0, 50, 100, 200, 400)  # + half the run and its end: the fidelity-against-step curve


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
    from lightning_custom.dvar.calibrate import EXACT_PROBES_FILE, grid_stop_steps, load_probed_run
    from lightning_custom.runtime.io import write_json
    from lightning_custom.cli import rebuild_run
    from lightning_custom.world.probe import probe_snapshots, snapshot_steps

    run = load_probed_run(run_dir / "summary.json")
    path = run_dir / EXACT_PROBES_FILE
    done = json.loads(path.read_text()) if path.is_file() else {"steps": {}}
    have = set(run.probes) | {int(s) for s in done["steps"]}
    available = set(snapshot_steps(run_dir / "snapshots"))
    needed = sorted(s for s in grid_stop_steps(run) if s not in have and s in available)
    if needed:
        start = time.time()
        scores = probe_snapshots(rebuild_run(config_file), run_dir / "snapshots", needed)
        done["steps"].update({str(s): rows[0] for s, rows in scores.items()})
        done["steps"] = dict(sorted(done["steps"].items(), key=lambda kv: int(kv[0])))
        done["seconds"] = round(done.get("seconds", 0.0) + time.time() - start, 1)
        write_json(path, done)
    return done


def concept_of(name: str, seed: int = DEFAULT_CONCEPT_SEED):
    """The held-out concept of a run folder name such as ``c050-off_palette``, drawn with ``seed``."""
    from lightning_custom.synthetic.world_concepts import make_concept

    return make_concept(int(name[1:4]), seed)


def fidelity_curve_steps(max_steps: int) -> list[int]:
    """The steps of the fidelity-against-step curve of a run of ``max_steps`` (multiples of the snapshot period)."""
    return sorted({s for s in FIDELITY_CURVE if s <= max_steps} | {to_eval_step(max_steps / 2), max_steps})


def read_fidelity(folder: Path) -> dict[int, dict[str, float]]:
    """``{step: {"recolour": x, "prior": y}}`` from ``folder/fidelity_probes.json`` (empty if absent)."""
    path = folder / FIDELITY_FILE
    return {int(s): v for s, v in json.loads(path.read_text())["steps"].items()} if path.is_file() else {}


def fidelity_probe(run_dir: Path, config_file: Path, name: str, steps: list[int], copies: list[Path],
                   seed: int = DEFAULT_CONCEPT_SEED, snapshot_dir: Path | None = None) -> dict:
    """Recolour / prior fidelity (:func:`lightning_custom.world.fidelity.fidelity_checks`) of every step in ``steps``
    that has a snapshot (in ``snapshot_dir``, default the run's own; step 0: the weights before training) and no
    score yet; written to ``run_dir`` and ``copies``. Returns every score of the run."""
    from dataclasses import asdict

    from lightning_custom.runtime.io import write_json
    from lightning_custom.cli import rebuild_run
    from lightning_custom.world.fidelity import fidelity_checks, fidelity_snapshots
    from lightning_custom.world.probe import snapshot_steps

    snapshot_dir = snapshot_dir or run_dir / "snapshots"
    done = read_fidelity(run_dir) or (read_fidelity(copies[0]) if copies else {})
    available = set(snapshot_steps(snapshot_dir)) | {0}
    needed = sorted({s for s in steps if s in available and s not in done})
    if needed and config_file.is_file():
        checks = fidelity_checks(concept_of(name, seed))
        start = time.time()
        done.update(fidelity_snapshots(rebuild_run(config_file), snapshot_dir, needed, checks))
        report = {"checks": [asdict(c) for c in checks], "seconds": round(time.time() - start, 1),
                  "steps": {str(s): done[s] for s in sorted(done)}}
        for folder in [run_dir, *copies]:
            if folder.is_dir():
                write_json(folder / FIDELITY_FILE, report)
    return done


def replay_snapshots(config_file: Path, steps: list[int], folder: Path) -> Path:
    """Train the run of ``config_file`` again up to the last of ``steps``, saving its trainable weights at ``steps``
    into ``folder``/snapshots (returned): the scheme for full DreamBooth, whose snapshots are not kept.

    Training is deterministic (same config, seed and data order; the original's periodic probes included), so these
    are the original run's weights at those steps; ``test_replayed_snapshots_equal_the_kept_ones`` checks it.
    """
    import yaml

    config = yaml.safe_load(config_file.read_text())
    config["trainer"]["default_root_dir"] = str(folder / "run")
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith(".TrainableSnapshots"):
            callback["init_args"] = {"dirpath": str(folder / "snapshots"), "steps": sorted(steps),
                                     "stop_after_last": True}
    v1.fit(config, folder / "config.yaml")
    return folder / "snapshots"


def run_phase(args) -> int:
    """Train (or reuse) every long run, probe its exact stop steps, copy the small results."""
    from lightning_custom.synthetic.world_concepts import heldout_concepts

    work, results = Path(args.workdir), Path(args.results) / RESULT_RUNS
    concepts = heldout_concepts(max(parse_concepts(args.concepts)) + 1, seed=args.concept_seed)
    start = time.time()
    jobs = v1.shard([(index, method) for index in parse_concepts(args.concepts) for method in args.methods],
                    args.shard)
    if args.fleet:
        train_as_fleets(args, work, [concepts[i] for i, method in jobs if method == "textual_inversion"])
    for index, method in jobs:
        concept = concepts[index]
        if not (work / "concepts" / concept.name).exists():
            concept.write_images(work / "concepts" / concept.name)
        run_dir, config_file = run_paths(work, method, concept.name)
        began = time.time()
        trained = not v1.finished(run_dir)
        summary = v1.fit(long_config(method, concept, args), config_file)
        exact = exact_probe(run_dir, config_file)
        target = results / method / concept.name
        target.mkdir(parents=True, exist_ok=True)
        fidelity_steps = fidelity_curve_steps(summary.get("max_steps") or LONG_STEPS[method])
        if method not in KEEP_SNAPSHOTS:  # the stops' fidelity now: these snapshots are deleted below
            fidelity_steps += [int(s) for s in exact["steps"]]
        fidelity_probe(run_dir, config_file, concept.name, fidelity_steps, [target], args.concept_seed)
        if method not in KEEP_SNAPSHOTS:
            shutil.rmtree(run_dir / "snapshots", ignore_errors=True)
        slim = {k: v for k, v in summary.items() if k not in BULKY_FIELDS}
        (target / "summary.json").write_text(json.dumps(slim, separators=(",", ":")) + "\n")
        if (run_dir / "exact_probes.json").exists():
            shutil.copy(run_dir / "exact_probes.json", target / "exact_probes.json")
        print(f"[{time.strftime('%H:%M:%S')} +{time.time() - start:.0f}s] {method} {concept.name}: "
              f"{'trained' if trained else 'reused'} in {time.time() - began:.0f}s (train "
              f"{summary['wall_seconds']:.0f}s of which probes {summary.get('world_probe_seconds', 0):.0f}s; "
              f"{len(exact['steps'])} exact probes in {exact.get('seconds', 0):.0f}s)", flush=True)
    return 0


def train_as_fleets(args, work: Path, concepts: list) -> None:
    """Train the Textual Inversion runs of ``concepts`` not trained yet as fleets of ``--fleet`` concepts
    (``fleet_runs.train_fleet``): each concept's folder then holds what its single run would, and is reused."""
    from fleet_runs import train_fleet

    todo = [c for c in concepts if not v1.finished(run_paths(work, "textual_inversion", c.name)[0])]
    for first in range(0, len(todo), args.fleet):
        group = todo[first:first + args.fleet]
        for concept in group:
            if not (work / "concepts" / concept.name).exists():
                concept.write_images(work / "concepts" / concept.name)
        singles = {c.name: (long_config("textual_inversion", c, args), run_paths(work, "textual_inversion", c.name)[1])
                   for c in group}
        began = time.time()
        train_fleet(singles, work / "runs" / "fleets" / f"{group[0].name[:4]}-{group[-1].name[:4]}", args.forward)
        print(f"[{time.strftime('%H:%M:%S')}] fleet of {len(group)} ({group[0].name}..{group[-1].name}) trained "
              f"and probed in {time.time() - began:.0f}s", flush=True)


def noise_phase(args) -> int:
    """The probe's standard error: the steps' snapshots of one run, probed with many sampling seeds (paired)."""
    from lightning_custom.runtime.io import write_json
    from lightning_custom.cli import rebuild_run
    from lightning_custom.world.probe import probe_snapshots

    run_dir, config_file = run_paths(Path(args.workdir), args.methods[0], args.concept)
    seeds = [1000 * k for k in range(args.seeds)]
    scores = probe_snapshots(rebuild_run(config_file), run_dir / "snapshots", args.steps_to_probe, seeds)
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


# ------------------------------------------------------------------------------------------------ the table
# The paper's (window / full length, threshold); DreamBooth (full) has none there: LoRA's, as in the first edition.
PAPER_RATIO = {"textual_inversion": (310 / 6100, 0.15), "dreambooth_lora": (440 / 1000, 0.4),
               "custom_diffusion": (180 / 500, 0.15), "dreambooth": (440 / 1000, 0.4)}
ROWS = ("full_length", "dvar_paper", "dvar_calibrated", "fixed_budget", "encoder_es", "few_iters")
VARIANTS = ("smoothed", "min_windows", "slope")  # rule variants (lightning_custom.dvar.rule), rows "variant_<name>"
# The converged length's 1% criterion reads the median identity curve averaged over 5 probes (125 steps): one
# probe's noise is 2-3% per concept (probe_noise_*.json), so on raw probes one lucky median ended Textual
# Inversion's climb at step 50 on 3 calibration concepts, where the test concepts kept 87%.
SMOOTH_PROBES = 5
STUDY_CONCEPTS = 20  # per split: the convergence study
MIN_TEST_CONCEPTS = 10  # fewer test concepts than this decide nothing about a variant (worst decile = 1 concept)


def to_eval_step(step: float) -> int:
    """The nearest step with a snapshot (a multiple of the L_det period)."""
    return max(EVAL_EVERY, int(round(step / EVAL_EVERY)) * EVAL_EVERY)


def load_method_runs(results: Path, method: str, calibration_results: Path | None = None
                     ) -> tuple[list, list, dict[str, float]]:
    """(calibration-split runs, test-split runs, seconds per step by run) of ``method`` under ``results/probed_runs``.

    Seconds per step: the run's wall time without its probes (training, L_det evaluations, snapshots) / steps.
    With ``calibration_results`` (another study's results folder, e.g. concepts drawn with another seed), the
    calibration split is that study's, and every run under ``results`` is a test run.
    """
    if calibration_results is not None:
        calibration, _, pace = load_method_runs(calibration_results, method)
        own, test, own_pace = load_method_runs(results, method)
        return calibration, own + test, {**pace, **own_pace}
    from lightning_custom.dvar.calibrate import load_probed_run

    folder = results / RESULT_RUNS / method
    files = sorted(f / "summary.json" for f in folder.iterdir()) if folder.is_dir() else []
    runs = [load_probed_run(f, f.parent.name) for f in files if f.is_file()]
    pace = {}
    for f in files:
        if f.is_file():
            summary = json.loads(f.read_text())
            pace[f.parent.name] = ((summary.get("wall_seconds", 0.0) - summary.get("world_probe_seconds", 0.0))
                                   / max(1, summary.get("max_steps") or 1))
    return ([r for r in runs if int(r.name[1:4]) in CALIBRATION], [r for r in runs if int(r.name[1:4]) in TEST],
            pace)


def probe_missing(args, method: str, runs: list, steps: dict[str, set[int]]) -> None:
    """Probe, from the work folder's snapshots, each run's steps in ``steps`` (by run name) that have no identity
    probe yet, and their recolour / prior fidelity; one model rebuild per run. A run whose snapshots were not kept
    (full DreamBooth) is trained again to those steps (:func:`replay_snapshots`)."""
    from lightning_custom.world.probe import snapshot_steps

    for run in v1.shard(runs, args.shard):  # N processes may share the probing (DreamBooth's replays take minutes)
        run_dir, config_file = run_paths(Path(args.workdir), method, run.name)
        copy = Path(args.results) / RESULT_RUNS / method / run.name
        if not config_file.is_file():
            continue
        snapshot_dir = run_dir / "snapshots"
        available = set(snapshot_steps(snapshot_dir))
        missing = sorted(s for s in steps[run.name] if s not in run.probes and s not in run.exact)
        scored = read_fidelity(copy)
        unscored = {s for s in steps[run.name] if s and s not in scored}
        wanted = sorted(set(missing) | unscored)
        with tempfile.TemporaryDirectory(dir=run_dir.parent, prefix=f".{run.name}-replay-") as replay:
            if any(s not in available for s in wanted):  # snapshots not kept: train the run again to these steps
                snapshot_dir = replay_snapshots(config_file, wanted, Path(replay))
                print(f"{method} {run.name}: steps {wanted} replayed from step 0 (snapshots not kept)", flush=True)
            probe_steps(args, run, run_dir, config_file, copy, snapshot_dir, missing, steps[run.name])


def probe_steps(args, run, run_dir: Path, config_file: Path, copy: Path, snapshot_dir: Path,
                missing: list[int], fidelity_steps: set[int]) -> None:
    """Identity of the ``missing`` steps and recolour / prior fidelity of ``fidelity_steps`` from ``snapshot_dir``
    (where it has them), written to the run's and its copy's probe files."""
    from lightning_custom.dvar.calibrate import EXACT_PROBES_FILE
    from lightning_custom.runtime.io import write_json
    from lightning_custom.cli import rebuild_run
    from lightning_custom.world.probe import probe_snapshots, snapshot_steps

    missing = [s for s in missing if s in set(snapshot_steps(snapshot_dir))]
    if missing:
        scores = probe_snapshots(rebuild_run(config_file), snapshot_dir, missing)
        run.exact.update({s: rows[0] for s, rows in scores.items()})
        for folder in (run_dir, copy):
            path = folder / EXACT_PROBES_FILE
            done = json.loads(path.read_text()) if path.is_file() else {"steps": {}}
            done["steps"].update({str(s): run.exact[s] for s in missing})
            done["steps"] = dict(sorted(done["steps"].items(), key=lambda kv: int(kv[0])))
            write_json(path, done)
    fidelity_probe(run_dir, config_file, run.name, sorted(fidelity_steps), [copy], args.concept_seed, snapshot_dir)


def method_rows(args, method: str, calibration: list, test: list, pace: dict[str, float]) -> dict:
    """Every row of one method on the test split (and on the calibration split), with the settings behind them."""
    from lightning_custom.dvar import calibrate as cal
    from lightning_custom.callbacks.clip_early_stopping import patience_stop_index

    settings = v1.METHODS[method]
    length = cal.converged_length(calibration or test, smooth=SMOOTH_PROBES)
    tuned = cal.calibrate(calibration, budget=length, smooth=SMOOTH_PROBES) if calibration else None
    variants = {name: cal.calibrate_variant(calibration, name, budget=length, smooth=SMOOTH_PROBES)
                for name in VARIANTS} if calibration else {}
    ratio, threshold = PAPER_RATIO[method]
    paper_window = to_eval_step(ratio * length)

    def es_stop(run) -> int:
        checks = [(s, row[0]) for s, row in sorted(run.probes.items()) if 0 < s <= length]
        index = patience_stop_index([v for _, v in checks], settings.patience, settings.min_delta)
        return checks[index][0] if index is not None else length

    smoothed = " / ".join(str(cal.converged_length(calibration or test, smooth=k)) for k in (1, 3, 9))
    out = {"converged_length": length, "smoothed_lengths": smoothed, "paper_window": paper_window,
           "paper_threshold": threshold,
           "calibrated": tuned.recommended if tuned and tuned.recommended else None, "splits": {}}
    for split, runs in (("test", test), ("calibration", calibration)):
        if not runs:
            continue
        references = [cal.converged_identity(r, length) for r in runs]
        stops = {"full_length": [min(length, r.max_steps) for r in runs],
                 "dvar_paper": [min(length, cal.stop_steps(r, paper_window, [threshold], EVAL_EVERY)[0]) for r in runs],
                 "encoder_es": [es_stop(r) for r in runs]}
        if out["calibrated"]:
            w, t, k = out["calibrated"]
            stops["dvar_calibrated"] = [min(length, cal.stop_steps(r, w, [t], k)[0]) for r in runs]
        budget_from = stops.get("dvar_calibrated", stops["dvar_paper"])
        stops["fixed_budget"] = [to_eval_step(np.mean(budget_from))] * len(runs)
        stops["few_iters"] = [to_eval_step(np.mean(stops["encoder_es"]))] * len(runs)
        for name, result in variants.items():
            if result.recommended:
                w, t, k, parameter = result.recommended
                stops[f"variant_{name}"] = [min(length, cal.variant_stop_steps(r, name, w, [t], k, parameter)[0])
                                            for r in runs]
        curve = {r.name: set(fidelity_curve_steps(r.max_steps)) for r in runs}
        # Another study's calibration runs (--calibration-results) are read as committed, never probed here: this
        # work folder's runs of the same names are other concepts.
        borrowed = split == "calibration" and args.calibration_results is not None
        results = Path(args.calibration_results if borrowed else args.results)
        if args.probe_missing and not borrowed:
            wanted = {r.name: {variant[i] for variant in stops.values()} | curve[r.name]
                      for i, r in enumerate(runs)}
            probe_missing(args, method, runs, wanted)
            if args.shard:  # this process probed only its share: the other shards' probes may still be missing
                continue
        fidelity = {r.name: read_fidelity(results / RESULT_RUNS / method / r.name) for r in runs}
        rows = {}
        for variant in [*(r for r in ROWS if r in stops), *(k for k in stops if k not in ROWS)]:
            result = cal.outcome(variant, runs, stops[variant], references)
            seconds = [step * pace.get(r.name, 0.0) for step, r in zip(stops[variant], runs)]
            identity = [ref * x for ref, x in zip(references, result.retention)]
            # The first edition read a stop's quality at the last periodic probe before it: how far off was that?
            earlier = [r.probes[max(p for p in r.probes if p <= step)][1] for r, step in zip(runs, stops[variant])]
            bias = [old - new for old, new, step, r in zip(earlier, identity, stops[variant], runs)
                    if step not in r.probes and step in r.exact]
            edits = {group: [fidelity[r.name].get(step, {}).get(group, float("nan"))
                             for r, step in zip(runs, stops[variant])] for group in ("recolour", "prior")}
            rows[variant] = {"outcome": result, "identity": identity, "seconds": seconds, "old_reading_bias": bias,
                             **edits}
        oracle = [cal.oracle_step(r, ref) for r, ref in zip(runs, references)]
        dvar = stops.get("dvar_calibrated", stops["dvar_paper"])
        out["splits"][split] = {"runs": runs, "references": references, "rows": rows, "oracle": oracle,
                                "oracle_dvar": dvar, "spearman": cal.spearman(oracle, dvar), "fidelity": fidelity}
    out["tuned"], out["variants"] = tuned, variants
    return out


def nan_median(values: list[float]) -> str:
    """The median of the measured values with their count, e.g. ``0.33 (5)``; ``-`` when none is measured."""
    kept = [v for v in values if v == v]
    return f"{np.median(kept):.2f} ({len(kept)})" if kept else "-"


def method_markdown(method: str, data: dict, split: str, variants: bool = False) -> list[str]:
    """One method's rows on one split (``variants``: the rule variants' rows instead of the table's)."""
    part = data["splits"][split]
    length = data["converged_length"]
    lines = []
    for variant, row in part["rows"].items():
        if (variant in ROWS) != (not variants):
            continue
        o = row["outcome"]
        lines.append(f"| {method} | {variant} | {len(o.steps)} | {np.median(row['identity']):.3f} | "
                     f"{o.median_retention:.3f} | {o.worst_decile_retention:.3f} | {np.median(o.fidelity):.2f} | "
                     f"{nan_median(row['recolour'])} | {nan_median(row['prior'])} | {o.mean_steps:.0f} | "
                     f"{np.median(o.steps):.0f} | {length / max(o.mean_steps, 1):.1f} | "
                     f"{np.mean(row['seconds']):.1f} | {o.exact}/{len(o.steps)} |")
    return lines


def goal_lines(method: str, data: dict) -> list[str]:
    """The issue's goal on the test split, met or with its distance, and each number's SE over concepts."""
    from lightning_custom.dvar.calibrate import bootstrap_se, worst_decile

    part = data["splits"].get("test")
    if not part or "dvar_calibrated" not in part["rows"]:
        return [f"- {method}: pending (no test-split runs, or no calibrated setting)."]
    tuned, fixed = part["rows"]["dvar_calibrated"]["outcome"], part["rows"]["fixed_budget"]["outcome"]
    length = data["converged_length"]
    speedup = length / max(tuned.mean_steps, 1)

    def verdict(met: bool, short: str) -> str:
        return "met" if met else f"not met, {short}"

    gap = fixed.worst_decile_retention - tuned.worst_decile_retention
    excess = tuned.mean_steps - length / 5
    # the noise of drawing these concepts (a held-out draw will differ by about this much)
    median_se = bootstrap_se(np.median, tuned.retention)
    gap_se = bootstrap_se(lambda a, b: worst_decile(a) - worst_decile(b), fixed.retention, tuned.retention)
    checks = [f"median retention {tuned.median_retention:.3f} (SE {median_se:.3f}; goal >= 0.97: "
              f"{verdict(tuned.median_retention >= 0.97, f'{0.97 - tuned.median_retention:.4f} short')})",
              f"speed-up {speedup:.1f}x over the converged length {length} (goal >= 5x: "
              f"{verdict(speedup >= 5, f'{excess:.0f} mean steps too many')})",
              f"worst decile {tuned.worst_decile_retention:.3f} vs the equal-cost fixed budget's "
              f"{fixed.worst_decile_retention:.3f} (difference SE {gap_se:.3f}; goal: more: "
              f"{verdict(gap < 0, f'{gap:.3f} short')})"]
    # What a rule that knew each concept could reach: every concept stopped at its own 97% step (capped like the rules)
    oracle = np.mean([min(step, length) for step in part["oracle"]])
    checks.append(f"an oracle stopping each concept at its first probe with 97% of its converged identity would "
                  f"take {oracle:.0f} mean steps ({length / max(oracle, 1):.1f}x)")
    return [f"- {method} ({len(tuned.steps)} test concepts): " + "; ".join(checks)]


def fidelity_curve(fidelity: dict[str, dict[int, dict[str, float]]], lengths: dict[str, int],
                   group: str) -> list[tuple[int, float]]:
    """(step, mean over runs) of one fidelity group at the curve steps (:func:`fidelity_curve_steps`) that every
    run with scores has scored."""
    scored = {name: by_step for name, by_step in fidelity.items() if by_step}
    if not scored:
        return []
    common = set.intersection(*(set(by_step) & set(fidelity_curve_steps(lengths[name]))
                                for name, by_step in scored.items()))
    return [(s, float(np.mean([by_step[s][group] for by_step in scored.values()]))) for s in sorted(common)]


def variant_verdict(data: dict, name: str) -> str:
    """Does the rule variant beat calibrated DVAR on the test split (the issue's bar), or why it is undecided."""
    rows = data["splits"].get("test", {}).get("rows", {})
    if f"variant_{name}" not in rows or "dvar_calibrated" not in rows:
        return "undecided: no test-split runs or no calibrated setting"
    from lightning_custom.dvar.calibrate import bootstrap_se, worst_decile

    new, dvar = rows[f"variant_{name}"]["outcome"], rows["dvar_calibrated"]["outcome"]
    # Pareto-better on the test split: fewer steps at no lower retention (median and worst decile), or a higher worst
    # decile at no more steps and no lower median
    fewer = (new.mean_steps < dvar.mean_steps and new.median_retention >= dvar.median_retention
             and new.worst_decile_retention >= dvar.worst_decile_retention)
    safer = (new.worst_decile_retention > dvar.worst_decile_retention and new.mean_steps <= dvar.mean_steps
             and new.median_retention >= dvar.median_retention)
    # the gain's paired bootstrap SE over the test concepts: a gain inside it could vanish on another draw
    steps_se = bootstrap_se(lambda a, b: np.mean(b) - np.mean(a), new.steps, dvar.steps)
    worst_se = bootstrap_se(lambda a, b: worst_decile(a) - worst_decile(b), new.retention, dvar.retention)
    clear = ((fewer and dvar.mean_steps - new.mean_steps > steps_se)
             or (safer and new.worst_decile_retention - dvar.worst_decile_retention > worst_se))
    said = (f"{new.mean_steps:.0f} vs {dvar.mean_steps:.0f} mean steps (difference SE {steps_se:.0f}), median "
            f"retention {new.median_retention:.3f} vs {dvar.median_retention:.3f}, worst decile "
            f"{new.worst_decile_retention:.3f} vs {dvar.worst_decile_retention:.3f} (difference SE {worst_se:.3f})")
    if len(new.steps) < MIN_TEST_CONCEPTS:
        return f"undecided: {len(new.steps)} test concepts (< {MIN_TEST_CONCEPTS}); {said}"
    if fewer or safer:
        return ("beats DVAR: " if clear else "beats DVAR only within the noise (gain < its SE): ") + said
    return "does not beat DVAR: " + said


def table_plots(methods: list[str], data: dict, out: Path) -> None:
    """The stop-step histogram, median identity against step, and the oracle scatter (test split)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lightning_custom.dvar.calibrate import median_curve

    shown = [m for m in methods if data[m]["splits"]]
    if not shown:
        return
    for name, draw in (("stops", 0), ("quality_vs_step", 1), ("oracle", 2)):
        fig = Figure(figsize=(4 * len(shown), 3.2), dpi=100)
        FigureCanvasAgg(fig)
        for ax, method in zip(np.atleast_1d(fig.subplots(1, len(shown))), shown):
            d = data[method]
            part = d["splits"].get("test") or next(iter(d["splits"].values()))
            if draw == 0:
                for variant in ("dvar_paper", "dvar_calibrated", "encoder_es"):
                    if variant in part["rows"]:
                        ax.hist(part["rows"][variant]["outcome"].steps, bins=np.linspace(0, d["converged_length"], 21),
                                alpha=0.5, label=variant)
                ax.set_xlabel("stop step")
                ax.set_ylabel("concepts")
                split = "test" if "test" in d["splits"] else "calibration"
                ax.set_title(f"{method} ({split} split, {len(part['runs'])} concepts)", fontsize=10)
                ax.legend(fontsize=7)
            elif draw == 1:  # every run of both splits: the curve shows the convergence study
                runs = [r for p in d["splits"].values() for r in p["runs"]]
                steps, median = median_curve(runs)
                ax.plot(steps, median, label="median identity")
                ax.axvline(d["converged_length"], color="k", ls="--", lw=0.8, label="converged length")
                ax.set_xlabel("step")
                ax.set_ylabel("identity similarity")
                ax.set_title(f"{method} ({len(runs)} runs)", fontsize=10)
                # Does long training cost prompt fidelity here? (the paper's other half of the argument)
                fidelity = [float(np.mean([r.probes[s][2] for r in runs])) for s in steps]
                twin = ax.twinx()
                twin.plot(steps, fidelity, color="tab:red", lw=0.8, label="background")
                for group, style in (("recolour", "-o"), ("prior", ":s")):
                    curve = fidelity_curve({r.name: p["fidelity"][r.name] for p in d["splits"].values()
                                            for r in p["runs"]}, {r.name: r.max_steps for r in runs}, group)
                    if curve:
                        twin.plot(*zip(*curve), style, color="tab:red", lw=0.8, ms=3, label=group)
                twin.set_ylabel("mean prompt fidelity", color="tab:red")
                twin.set_ylim(0, 1.05)
                twin.legend(fontsize=6, loc="lower right")
                ax.legend(fontsize=6, loc="lower center")
            else:
                top, title = 1, []
                for split, colour in (("calibration", "tab:grey"), ("test", "tab:blue")):
                    if split in d["splits"]:
                        p = d["splits"][split]
                        ax.scatter(p["oracle"], p["oracle_dvar"], s=14, color=colour,
                                   label=f"{split} ({len(p['oracle'])})")
                        top = max([top, *p["oracle"], *p["oracle_dvar"]])
                        title.append(f"{split} {p['spearman']:.2f}")
                ax.plot([0, top], [0, top], color="k", lw=0.6)
                ax.set_xlabel("oracle step (97% of converged identity)")
                ax.set_ylabel("DVAR stop step (calibrated)")
                ax.set_title(f"{method}: Spearman " + ", ".join(title), fontsize=9)
                ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"table1_v2_{name}.png")


def table_phase(args) -> int:
    """Write ``table1_v2.md`` / ``.csv`` and the figures from the runs copied to ``--results``/probed_runs."""
    import csv
    import shlex

    results = Path(args.results)
    data = {}
    for method in args.methods:
        calibration, test, pace = load_method_runs(results, method, args.calibration_results)
        if calibration or test:
            data[method] = method_rows(args, method, calibration, test, pace)
        else:
            data[method] = {"splits": {}}
    if args.shard:
        k, n = args.shard
        print(f"probe shard {k}/{n} done; run the table without --shard once every shard has finished")
        return 0
    noise = sorted(results.glob("probe_noise_*.json"))
    header = ["| method | variant | concepts | identity | retention | worst-decile retention | fidelity: background | "
              "fidelity: recolour (n) | fidelity: prior (n) | mean steps | median steps | speed-up (x) | seconds | "
              "exact stops |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines = ["# Table 1, second edition (issue 12)", "",
             "Command: `python benchmarks/table1_v2.py " + " ".join(shlex.quote(a) for a in args.argv) + "`", "",
             "**Status: " + "; ".join(
                 f"{m} {len(data[m]['splits'].get('calibration', {}).get('runs', []))} calibration / "
                 f"{len(data[m]['splits'].get('test', {}).get('runs', []))} test concepts" for m in args.methods)
             + f". The issue's study asks for at least {STUDY_CONCEPTS} concepts per split; with fewer, every number "
             "below is a first look, the calibrated setting is fitted to a handful of concepts, and a worst decile "
             "is the single worst concept.**", "",
             "Runs: " + ", ".join(f"{m} {args.steps or LONG_STEPS[m]} steps "
                                  f"({(args.steps or LONG_STEPS[m]) / v1.METHODS[m].steps:g}x the first edition's "
                                  "full length)" for m in args.methods) + ", DVAR observing "
             f"(L_det every {EVAL_EVERY} steps), identity probes every {args.probe_every} steps and at every replayed "
             "stop step (from snapshots of the trainable weights, or for full DreamBooth from a deterministic replay "
             "of the run to that step; 'exact stops' counts the stops read at their own step). Converged length: the first probe step after which the calibration split's median identity "
             f"(averaged over {SMOOTH_PROBES} consecutive probes) never rises more than 1% above its value there. "
             "Retention: identity / the concept's converged identity (mean of its probes "
             "from the converged length or half the run on). Worst decile: the mean retention of the worst 10% of "
             "concepts. Speed-up: converged length / mean steps. Seconds: steps x the run's measured seconds per "
             "step on this shared CPU. Sampling seeds are the same at every probe (differences are paired). "
             "Oracle step: the earliest probed step (periodic or exact) reaching 97% of the converged identity; "
             "DVAR in the oracle scatter is the calibrated setting (else the paper's ratio). Encoder early stopping: "
             "the CLIP early-stopping rule (the first edition's patience / minimum improvement per method) replayed "
             "on the training-prompt identity of the periodic probes (every 25 steps; the paper checks every 50); "
             "few iters: a fixed budget at its mean stop. Every rule is capped at the converged length.", "",
             "Prompt fidelity, three measures (share of sampled images the world's encoder judges right): "
             "*background*: the concept on an evaluation background, the background head (the first edition's; "
             "it cannot fail here: 1.00 at every probe); *recolour*: 'a photo of a <colour> <concept> on a "
             "<background> background' with the 3 palette colours farthest from the concept's own, the colour and "
             "background heads (a token or weights that absorbed the concept's colour override the word: the "
             "world's analogue of the paper's falling CLIP-T); *prior*: 2 describable objects without the concept "
             "('a photo of a yellow circle on a grey background'), every head (drift of the class prior; constant "
             "for Textual Inversion by construction). Recolour and prior are scored post hoc from the snapshots "
             "(2 images per prompt, the probe's sampler and seeds; `--probe-missing`); '(n)' counts the concepts "
             "measured, '-' none.", ""]
    for n in noise:
        report = json.loads(n.read_text())
        sds = ", ".join(f"step {s}: {v['sd_over_seeds']:.4f} ({100 * v['sd_over_seeds'] / v['mean']:.1f}% of "
                        f"{v['mean']:.3f})" for s, v in report["steps"].items())
        diffs = ", ".join(f"{k}: {v['sd_over_seeds']:.4f}" for k, v in report.get("paired_differences", {}).items())
        lines.append(f"Probe noise ({report['method']} {report['concept']}, {len(report['seeds'])} seed sets): SD of "
                     f"one probe's identity over seeds {sds}; SD of a paired difference {diffs}.")
    if noise:
        lines.append("One concept's retention therefore moves by about the SD's share (2-3%) from sampling alone, as "
                     "much as the 3% the 97% target allows; the sampling error of a median over n concepts is about 1.25 "
                     "x that SD / sqrt(n) (paired seeds: every variant of a concept is sampled with the same noise).")
    test_title = ("Test split (concepts 50-99)" if args.calibration_results is None else
                  f"Test split (every concept of seed {args.concept_seed}; calibrated on "
                  f"{args.calibration_results}'s concepts 0-49)")
    lines += ["", f"## {test_title}: the headline", "", *header]
    csv_rows = []
    for method in args.methods:
        d = data[method]
        if "test" in d["splits"]:
            lines += method_markdown(method, d, "test")
    lines += ["", "## Goal (test split)", "", "SE: the bootstrap standard error over the test concepts (2000 "
              "resamplings; the worst-decile difference paired per concept), i.e. how much another draw of as many "
              "concepts would move the number; each concept's probe noise is inside it.", ""]
    lines += [g for m in args.methods for g in goal_lines(m, data[m])]
    lines += ["", "## Calibration split (concepts 0-49)", "", *header]
    for method in args.methods:
        if "calibration" in data[method]["splits"]:
            lines += method_markdown(method, data[method], "calibration")
    lines += ["", "## Settings per method", "", f"Converged length: the 1% criterion on the median curve averaged "
              f"over {SMOOTH_PROBES} probes; beside it, its sensitivity: the same criterion on the raw probes (1), "
              "and averaged over 3 and 9.", "", "| method | runs (calibration / test) | converged length | "
              "averaged over 1 / 3 / 9 probes | "
              "paper-ratio DVAR (window, threshold) | calibrated DVAR (window, threshold, eval every) | "
              "oracle vs DVAR Spearman (test) |", "|---|---|---|---|---|---|---|"]
    for method in args.methods:
        d = data[method]
        if not d["splits"]:
            lines.append(f"| {method} | 0 / 0 | pending | | | | |")
            continue
        counts = " / ".join(str(len(d["splits"].get(s, {}).get("runs", []))) for s in ("calibration", "test"))
        tuned = d["calibrated"]
        rho = d["splits"].get("test", {}).get("spearman", float("nan"))
        lines.append(f"| {method} | {counts} | {d['converged_length']} | {d['smoothed_lengths']} | {d['paper_window']}, "
                     f"{d['paper_threshold']:g} | {', '.join(f'{x:g}' for x in tuned) if tuned else 'none'} | "
                     f"{rho:.2f} |")
        for split, part in d["splits"].items():
            for variant, row in part["rows"].items():
                o = row["outcome"]
                for run, step, ret, fid, recolour, prior, ident, sec in zip(
                        part["runs"], o.steps, o.retention, o.fidelity, row["recolour"], row["prior"],
                        row["identity"], row["seconds"]):
                    csv_rows.append({"method": method, "split": split, "concept": run.name, "variant": variant,
                                     "step": step, "identity": round(ident, 5), "retention": round(ret, 5),
                                     "fidelity": fid, "recolour": recolour, "prior": prior,
                                     "seconds": round(sec, 2)})
    lines += ["", "## Rule variants (issue 12 item 5; none ships as the default)", "",
              "Each variant (`lightning_custom.dvar.rule`) calibrated like DVAR on the calibration split (fewest mean steps "
              "with median retention >= 0.97; its own parameter in the grid), then replayed on both splits. "
              "*smoothed*: DVAR's ratio on a causal moving average of `span` L_det values; *min_windows*: DVAR, not "
              "before the series holds `min_windows` windows; *slope*: stop when the last window's least-squares "
              "slope x window < threshold x the series' range. A variant would ship (as an option) only if, on the "
              f"test split with at least {MIN_TEST_CONCEPTS} concepts, it takes fewer mean steps than calibrated "
              "DVAR at no lower median retention, or keeps a higher worst decile at no more mean steps.", "",
              "| method | variant | calibrated (window, threshold, eval every, parameter) | verdict |",
              "|---|---|---|---|"]
    for method in args.methods:
        for name, result in data[method].get("variants", {}).items():
            setting = ", ".join(f"{x:g}" for x in result.recommended) if result.recommended else "none meets 0.97"
            lines.append(f"| {method} | {name} | {setting} | {variant_verdict(data[method], name)} |")
    lines += ["", *header]
    for split in ("test", "calibration"):
        for method in args.methods:
            if split in data[method]["splits"]:
                lines += [line.replace(f"| {method} | ", f"| {method} ({split}) | ", 1)
                          for line in method_markdown(method, data[method], split, variants=True)]
    lines += ["", "## The first edition's reading", "",
              "Identity read at the last periodic probe before the stop minus identity probed at the stop itself, "
              "over the stops that fall between probes (test split, else calibration split).", "",
              "| method | variant | stops between probes | median bias | most negative | most positive |",
              "|---|---|---|---|---|---|"]
    for method in args.methods:
        splits = data[method]["splits"]
        part = splits.get("test") or splits.get("calibration")
        for variant, row in (part["rows"].items() if part else []):
            bias = row["old_reading_bias"]
            if variant.startswith("dvar") and bias:
                lines.append(f"| {method} | {variant} | {len(bias)}/{len(part['runs'])} | {np.median(bias):+.4f} | "
                             f"{min(bias):+.4f} | {max(bias):+.4f} |")
    lines += ["", "## Prompt fidelity against step (does long training cost it?)", "",
              "Mean over the runs scored at every listed step (test and calibration split together).", "",
              "| method | measure | runs | " + " | ".join(f"step {s}" for s in ("0", "50", "100", "200", "400",
                                                                                "half", "end")) + " |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for method in args.methods:
        splits = data[method]["splits"]
        fidelity = {name: by_step for part in splits.values() for name, by_step in part["fidelity"].items()}
        lengths = {r.name: r.max_steps for part in splits.values() for r in part["runs"]}
        scored = {name: by_step for name, by_step in fidelity.items() if by_step}
        for group in ("recolour", "prior"):
            if not scored:
                lines.append(f"| {method} | {group} | 0 | not measured yet (`table --probe-missing`) |||||||")
                break
            cells = []
            for s in (0, 50, 100, 200, 400, "half", "end"):
                values = [by_step.get(s if isinstance(s, int) else
                                      (to_eval_step(lengths[n] / 2) if s == "half" else lengths[n]), {}).get(group)
                          for n, by_step in scored.items()]
                values = [v for v in values if v is not None]
                cells.append(f"{np.mean(values):.2f}" if values else "-")
            lines.append(f"| {method} | {group} | {len(scored)} | " + " | ".join(cells) + " |")
    lines += ["", "Figures: `table1_v2_stops.png`, `table1_v2_quality_vs_step.png`, `table1_v2_oracle.png`.", ""]
    out = results
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1_v2.md").write_text("\n".join(lines))
    if csv_rows:
        with open(out / "table1_v2.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
            writer.writeheader()
            writer.writerows(csv_rows)
    table_plots(args.methods, data, out)
    print("\n".join(lines))
    return 0


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
    parser.add_argument("--workdir", default=None, help="work folder (runs, snapshots; default runs/table1-v2, "
                        "with -seedS appended for --concept-seed S)")
    parser.add_argument("--results", default=None, help="results folder (default benchmarks/results/table1_v2, "
                        "with _seedS appended for --concept-seed S)")
    parser.add_argument("--concept-seed", type=int, default=DEFAULT_CONCEPT_SEED,
                        help="draw the held-out concepts with this seed: a check of the calibrated settings on "
                        "concepts this repository never saw (see --calibration-results)")
    parser.add_argument("--calibration-results", type=Path, default=None, help="table: calibrate on this results "
                        "folder's calibration split (e.g. benchmarks/results/table1_v2) and treat every run under "
                        "--results as a test run")
    parser.add_argument("--fleet", type=int, default=0, metavar="N", help="run: train Textual Inversion's runs "
                        "as fleets of N concepts (one process, one batched forward; fleet_runs.py), 0: one by one")
    parser.add_argument("--forward", choices=("batched", "per_concept"), default="batched",
                        help="run --fleet: the fleet's forward (per_concept: bit-identical to the single runs)")
    parser.add_argument("--concept", default=None, help="noise: the concept folder name, e.g. c000-new_shape")
    parser.add_argument("--steps-to-probe", type=int, nargs="+", default=None, help="noise: snapshot steps")
    parser.add_argument("--seeds", type=int, default=16, help="noise: sampling seeds")
    parser.add_argument("--shard", type=v1.shard_spec, default=None, metavar="K/N", help="run: only jobs K, K+N, "
                        "... of the (concept, method) list, so N processes can share the runs (e.g. 0/2 and 1/2 on two "
                        "free cores); table --probe-missing: probe only runs K, K+N, ... of each split and write no "
                        "table (then run the table once more without --shard)")
    parser.add_argument("--probe-missing", action="store_true", help="table: probe, from the work folder's "
                        "snapshots, stop steps that have no probe yet (e.g. the fixed budget)")
    args = parser.parse_args(argv)
    if args.shard and args.phase == "table" and not args.probe_missing:
        parser.error("--shard: the table phase shares only its probing (--probe-missing) between processes")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    suffix = "" if args.concept_seed == DEFAULT_CONCEPT_SEED else f"seed{args.concept_seed}"
    args.workdir = args.workdir or "runs/table1-v2" + (f"-{suffix}" if suffix else "")
    args.results = args.results or "benchmarks/results/table1_v2" + (f"_{suffix}" if suffix else "")
    if args.phase == "run":
        return run_phase(args)
    if args.phase == "noise":
        return noise_phase(args)
    return table_phase(args)


if __name__ == "__main__":
    raise SystemExit(main())
