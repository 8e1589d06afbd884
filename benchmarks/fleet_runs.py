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

FLEET_CLASS = "lightning_custom.methods.TextualInversionFleet"
PROBE_CLASS = "lightning_custom.world.probe.WorldProbe"
SNAPSHOT_CLASS = "lightning_custom.world.probe.TrainableSnapshots"


def fleet_config(singles: dict[str, dict[str, Any]], fleet_dir: Path, forward: str = "batched") -> dict[str, Any]:
    """One ``TextualInversionFleet`` config that trains every concept of ``singles`` (folder name -> its single
    Textual Inversion run config) as its own run would: the same model, data and DVAR settings, seeds and length,
    DVAR observing, snapshots into each single run's ``snapshots/`` and no live probe (probed afterwards).

    Raises:
        ValueError: the configs differ in something but the concept (one fleet trains one setting).
    """
    configs = list(singles.values())
    first = copy.deepcopy(configs[0])
    if first["model"]["class_path"].rsplit(".", 1)[-1] != "TextualInversion":
        raise ValueError(f"fleet_config: only Textual Inversion trains as a fleet, not {first['model']['class_path']}")
    for name, config in singles.items():
        if setting_of(config) != setting_of(configs[0]):
            raise ValueError(f"fleet_config: {name}'s config differs from the first one's beyond its concept")
    concepts = [{"name": name, "instance_data_dir": c["data"]["init_args"]["instance_data_dir"],
                 "placeholder_token": c["model"]["init_args"]["placeholder_token"],
                 "initializer_token": c["model"]["init_args"]["initializer_token"],
                 # its own run's passes over its images: they set its shuffle, so its batches are its run's
                 "repeats": c["data"]["init_args"].get("repeats", 100)} for name, c in singles.items()]
    model, data = first["model"]["init_args"], first["data"]["init_args"]
    first["model"]["class_path"] = FLEET_CLASS
    model.pop("placeholder_token")
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
    for key in ("instance_data_dir", "repeats"):
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
    from lightning_custom.io import write_json
    from lightning_custom.world.probe import probe_snapshots

    run_dir = Path(config["trainer"]["default_root_dir"])
    summary = json.loads((fleet_dir / name / "summary.json").read_text())
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    if not probe:
        write_json(run_dir / "summary.json", summary)
        return summary
    start = time.time()
    scores = probe_snapshots(config_file, run_dir / "snapshots", probe_steps(config))
    seconds = time.time() - start
    every = probe_steps(config)[1]
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
