"""Long Textual Inversion runs of many concepts trained as one fleet, laid out as if each had run alone.

The studies (``table1_v2.py --fleet``, issue 24 item 9; ``settings_study.py``, issue 25) need, per concept, one long
run with DVAR observing, its L_det history, snapshots of its weights at every L_det evaluation and identity probes
along the way. Trained one concept per process, each run pays the model load and a batch of 2; trained as a
``TextualInversionFleet`` (one process, one batched forward), the same runs cost a fraction (``fleet.md``).

:func:`train_fleet` trains the concepts of several single-run configs as one fleet and leaves, in each concept's own
run folder, what the single run would have left: ``summary.json`` (its L_det history, its share of the fleet's
time, the periodic identity probes as ``world_probe_history``) and ``snapshots/`` (its vectors under the single run's
parameter names). The single run's config is written beside, so every later step (exact probes at stop steps,
fidelity, ``--probe-missing``) reads the folder exactly as it reads a single run's.

Probes are taken after training, from the snapshots, with the single run's ``WorldProbe`` settings and seeds: the
live probe of a single run samples the same weights with the same seeds, so the scores are the same.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# a single run's method -> its fleet, and the single run's arguments the fleet does not take (it always learns one
# new token per concept, as DreamBoothLoRA with train_token_embedding does)
FLEETS = {"TextualInversion": ("lightning_custom.methods.TextualInversionFleet", ()),
          "DreamBoothLoRA": ("lightning_custom.methods.DreamBoothLoRAFleet", ("train_token_embedding",))}
PROBE_CLASS = "lightning_custom.world.probe.WorldProbe"
SNAPSHOT_CLASS = "lightning_custom.world.probe.TrainableSnapshots"


def fleet_config(singles: dict[str, dict[str, Any]], fleet_dir: Path, forward: str = "batched") -> dict[str, Any]:
    """One fleet config (``TextualInversionFleet``, ``DreamBoothLoRAFleet``) that trains every concept of ``singles``
    (folder name -> its single run config) as its own run would: the same model, data and DVAR settings, seeds and length,
    DVAR observing, snapshots into each single run's ``snapshots/`` and no live probe (probed afterwards).

    Raises:
        ValueError: the configs differ in something but the concept (one fleet trains one setting).
    """
    configs = list(singles.values())
    first = copy.deepcopy(configs[0])
    method = first["model"]["class_path"].rsplit(".", 1)[-1]
    if method not in FLEETS:
        raise ValueError(f"fleet_config: {method} does not train as a fleet (only {sorted(FLEETS)})")
    if method == "DreamBoothLoRA" and not first["model"]["init_args"].get("train_token_embedding"):
        raise ValueError("fleet_config: a DreamBooth-LoRA fleet learns a token per concept (train_token_embedding)")
    for name, config in singles.items():
        if setting_of(config) != setting_of(configs[0]):
            raise ValueError(f"fleet_config: {name}'s config differs from the first one's beyond its concept")
    concepts = [{"name": name, "instance_data_dir": c["data"]["init_args"]["instance_data_dir"],
                 "placeholder_token": c["model"]["init_args"]["placeholder_token"],
                 "initializer_token": c["model"]["init_args"]["initializer_token"],
                 # its own run's passes over its images: they set its shuffle, so its batches are its run's
                 "repeats": c["data"]["init_args"].get("repeats", 100),
                 **({"class_noun": c["data"]["init_args"]["class_noun"]}
                    if c["data"]["init_args"].get("class_noun") else {})} for name, c in singles.items()]
    model, data = first["model"]["init_args"], first["data"]["init_args"]
    first["model"]["class_path"], dropped = FLEETS[method]
    for key in ("placeholder_token", *dropped):
        model.pop(key, None)
    data.pop("class_noun", None)  # each concept's own, in the concepts list
    model.update(concepts=concepts, forward=forward)
    data["concepts"] = concepts
    first["trainer"]["default_root_dir"] = str(fleet_dir)
    callbacks = []
    for callback in first["trainer"].get("callbacks", []):
        if callback["class_path"] == PROBE_CLASS:
            continue
        if callback["class_path"] == SNAPSHOT_CLASS:
            template = str(Path(configs[0]["trainer"]["default_root_dir"]).parent / "{concept}" / "snapshots")
            callback = {**callback, "init_args": {**callback["init_args"], "dirpath": template}}
        callbacks.append(callback)
    first["trainer"]["callbacks"] = callbacks
    first["dvar"]["stop"] = False
    return first


def setting_of(config: dict[str, Any]) -> str:
    """A config without what names its concept (token, initializer, images, folder): equal for one setting."""
    stripped = copy.deepcopy(config)
    for key in ("placeholder_token", "initializer_token"):
        stripped["model"]["init_args"].pop(key, None)
    for key in ("instance_data_dir", "repeats", "class_noun"):
        stripped["data"]["init_args"].pop(key, None)
    stripped["trainer"].pop("default_root_dir", None)
    stripped["trainer"]["callbacks"] = [c["class_path"] for c in stripped["trainer"].get("callbacks", [])]
    return json.dumps(stripped, sort_keys=True)


def probe_steps(config: dict[str, Any]) -> list[int]:
    """The steps a single run's ``WorldProbe`` would have probed: 0, every ``every_n_steps``, and the last."""
    every = next(c["init_args"]["every_n_steps"] for c in config["trainer"]["callbacks"]
                 if c["class_path"] == PROBE_CLASS)
    last = int(config["trainer"]["max_steps"])
    return sorted(set(range(0, last + 1, every)) | {last})


def finish_concept(fleet_dir: Path, name: str, config: dict[str, Any], config_file: Path, probe: bool = True
                   ) -> dict[str, Any]:
    """Turn concept ``name``'s part of a finished fleet into its single run's folder (returns its summary); with
    ``probe``, its ``WorldProbe``'s periodic probes are taken from the snapshots into ``world_probe_history``."""
    from lightning_custom.runtime.io import write_json
    from lightning_custom.cli import rebuild_run
    from lightning_custom.world.probe import probe_snapshots

    run_dir = Path(config["trainer"]["default_root_dir"])
    summary = json.loads((fleet_dir / name / "summary.json").read_text())
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    if not probe:
        write_json(run_dir / "summary.json", summary)
        return summary
    start = time.time()
    steps = probe_steps(config)
    scores = probe_snapshots(rebuild_run(config_file), run_dir / "snapshots", steps)
    seconds = time.time() - start
    every = steps[1]
    summary.update(world_probe_history=[[step, *rows[0]] for step, rows in sorted(scores.items())],
                   world_probe_seconds=round(seconds, 3), world_probe_every_n_steps=every,
                   world_probe_note="probed after training from the snapshots (trained in a fleet)")
    # The single run's wall time holds its probes (load_method_runs subtracts them to get the training pace).
    summary["wall_seconds"] = round(float(summary.get("wall_seconds") or 0.0) + seconds, 3)
    write_json(run_dir / "summary.json", summary)
    return summary


def train_fleet(singles: dict[str, tuple[dict[str, Any], Path]], fleet_dir: Path, forward: str = "batched",
                probe: bool = True) -> dict[str, dict[str, Any]]:
    """Train the concepts of ``singles`` (folder name -> (single-run config, where its config file goes)) as one
    fleet in this process, then lay each concept out as its single run's folder. Returns the summaries by name."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import table1 as v1

    config = fleet_config({name: c for name, (c, _) in singles.items()}, fleet_dir, forward)
    if not v1.finished(fleet_dir):
        v1.fit(config, fleet_dir.parent / f"{fleet_dir.name}.yaml")
    return {name: finish_concept(fleet_dir, name, c, path, probe) for name, (c, path) in singles.items()}


# ------------------------------------------------------------------------------------------- against single runs
def compare(single: Path, fleet: Path, method: str, window: int, threshold: float, eval_every: int,
            converged_from: int) -> str:
    """Markdown: each concept's fleet run against its committed single run (``<results>/probed_runs/<method>``):
    the L_det history, the converged identity (mean of the probes from ``converged_from`` on), the DVAR stop of one
    setting (``window``, ``threshold``, ``eval_every``) and the identity there (exact probe)."""
    import statistics

    from lightning_custom.dvar.calibrate import load_probed_run, stop_steps

    rows, diffs = [], {"converged": [], "at_stop": [], "stop": []}
    for folder in sorted((fleet / "probed_runs" / method).iterdir()):
        twin = single / "probed_runs" / method / folder.name
        if not (twin / "summary.json").is_file():
            continue
        a, b = (load_probed_run(d / "summary.json", d.name) for d in (twin, folder))
        la, lb = (dict(r.losses) for r in (a, b))
        ldet = max(abs(lb[s] - la[s]) / abs(la[s]) for s in la)
        conv = [statistics.mean(r.probes[s][0] for s in r.probes if s >= converged_from) for r in (a, b)]
        stops = [stop_steps(r, window, [threshold], eval_every)[0] for r in (a, b)]
        at = [r.exact.get(s, r.probes.get(s, [float("nan")]))[0] for r, s in zip((a, b), stops)]
        for key, d in (("wall_single", twin), ("wall_fleet", folder)):
            diffs.setdefault(key, []).append(json.loads((d / "summary.json").read_text())["wall_seconds"])
        diffs["converged"].append(conv[1] - conv[0])
        diffs["at_stop"].append(at[1] - at[0])
        diffs["stop"].append(stops[1] - stops[0])
        rows.append(f"| {folder.name} | {ldet:.2g} | {conv[0]:.3f} / {conv[1]:.3f} | {stops[0]} / {stops[1]} | "
                    f"{at[0]:.3f} / {at[1]:.3f} |")

    def mean_se(values: list[float]) -> str:
        se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):+.2g} (SE {se:.2g}, largest {max(values, key=abs):+.2g})"

    return "\n".join([
        f"# {method}: runs trained in a fleet against the same runs trained alone", "",
        f"Single runs: `{single}`; fleet runs: `{fleet}` (`table1_v2.py run --fleet 10`, forward batched). Identity: "
        "the world encoder's cosine identity of the training prompt's probe (2 images, Table 1 v2's instrument). "
        f"DVAR: the calibrated setting of Table 1 v2 (window {window}, threshold {threshold}, every {eval_every}).", "",
        "| concept | largest relative L_det difference | converged identity alone / fleet | DVAR stop alone / fleet | "
        "identity at the stop alone / fleet |", "|---|---|---|---|---|", *rows, "",
        f"Paired differences (fleet - alone) over {len(rows)} concepts: converged identity {mean_se(diffs['converged'])}; "
        f"identity at the stop {mean_se(diffs['at_stop'])}; stop step {mean_se(diffs['stop'])}. One probe's SD is "
        "0.020-0.025 (Table 1 v2's probe_noise_*.json).", "",
        f"Time (training, L_det, snapshots and the periodic probes; a fleet concept's share of its fleet's training "
        f"plus its own probes): {sum(diffs['wall_single']):.0f} s for the single runs, "
        f"{sum(diffs['wall_fleet']):.0f} s in the fleet (the single runs shared this CPU with other jobs, so the "
        "ratio is indicative only).", ""])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="compare fleet-trained runs with their committed single runs")
    parser.add_argument("compare", choices=["compare"])
    parser.add_argument("--single", type=Path, default=Path("benchmarks/results/table1_v2"))
    parser.add_argument("--fleet", type=Path, default=Path("benchmarks/results/table1_v2_fleet"))
    parser.add_argument("--method", default="textual_inversion")
    parser.add_argument("--setting", type=float, nargs=3, default=[20, 0.4, 10], metavar=("WINDOW", "THRESHOLD",
                                                                                          "EVERY"))
    parser.add_argument("--converged-from", type=int, default=200)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    text = compare(args.single, args.fleet, args.method, int(args.setting[0]), args.setting[1],
                   int(args.setting[2]), args.converged_from)
    (args.fleet / "compare.md").write_text(text)
    print(text)
