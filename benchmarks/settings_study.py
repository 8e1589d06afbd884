"""Where an adaptive stop earns its keep: DVAR across learning rates, image counts and batch sizes (issue 25).

Phase ``run`` trains, per setting, one fleet of 10 held-out concepts (``fleet_runs.py``: one process, each concept
as its own run would train) for ``--steps`` steps with DVAR observing (L_det every 5 steps) and a snapshot of each
concept's weights at every evaluation; then probes every run on a log-spaced schedule of steps with the sharper
instrument (:class:`lightning_custom.synthetic.world_identity.ConceptDiscriminator` over the training and evaluation prompts'
images; ``benchmarks/results/instrument``), beside the Table 1 v2 cosine identity. Settings (Textual Inversion):

* calibration, concepts 0-9: learning rate x0.25, x1, x4 of the quickstart's; 2 and 8 concept images;
* test, concepts 60-69 (never used to choose a rule or the instrument): learning rate x0.5, x1, x2; 4 images;
  batch size 1 and 4.

Everything is resumable: a setting whose fleet finished is not trained again, a run's probes are kept per step.
Each run's slim summary (L_det history, setting) and probes go to ``--results``/runs/<setting>/<concept>/::

    nohup nice -n 19 python benchmarks/settings_study.py run > /tmp/settings_study.log 2>&1 &

Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import table1_v2 as v2  # noqa: E402  (long run configs, run folders)

ROOT = Path(__file__).resolve().parents[1]
METHOD = ["textual_inversion"]  # --method
PROBE_SCHEDULE = (0, 10, 20, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300, 400, 500, 600, 800, 1000, 1200)
PROBE_IMAGES = 4  # per prompt; a probe samples the training prompt and every evaluation prompt (20 images)


@dataclass(frozen=True)
class Setting:
    """One training setting: the quickstart's with one axis moved."""

    name: str
    split: str  # "calibration" or "test"
    lr_factor: float = 1.0
    images: int | None = None  # concept images (None: the concept's own 4-6)
    batch_size: int = 2
    rank: int | None = None  # LoRA rank (None: the quickstart's 4)


COMMON_SETTINGS = (
    Setting("lr_x1", "calibration"), Setting("lr_x0.25", "calibration", lr_factor=0.25),
    Setting("lr_x4", "calibration", lr_factor=4.0), Setting("images_2", "calibration", images=2),
    Setting("images_8", "calibration", images=8),
    Setting("test_lr_x1", "test"), Setting("test_lr_x0.5", "test", lr_factor=0.5),
    Setting("test_lr_x2", "test", lr_factor=2.0), Setting("test_images_4", "test", images=4),
    Setting("test_batch_1", "test", batch_size=1), Setting("test_batch_4", "test", batch_size=4),
)
SETTINGS_BY_METHOD = {
    "textual_inversion": COMMON_SETTINGS,
    "dreambooth_lora": (*COMMON_SETTINGS, Setting("test_rank_16", "test", rank=16),
                        Setting("test_rank_64", "test", rank=64)),
}
CONCEPTS = {"calibration": range(0, 10), "test": range(60, 70)}


def with_images(concept, count: int | None):
    """The concept with ``count`` example images (its own seeds first, more drawn from its index)."""
    if count is None:
        return concept
    rng = np.random.default_rng([int(concept.name[1:4]), 99])
    seeds = list(concept.image_seeds) + [int(s) for s in rng.integers(0, 2**31 - 1, max(0, count - len(concept.image_seeds)))]
    backgrounds = [concept.image_backgrounds[i % 2] for i in range(count)]
    return replace(concept, image_seeds=tuple(seeds[:count]), image_backgrounds=tuple(backgrounds))


def run_config(setting: Setting, concept, work: Path, args) -> dict:
    """The single Textual Inversion run of ``concept`` at ``setting`` (Table 1 v2's long run, one axis moved)."""
    config = v2.long_config(METHOD[0], concept, args)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    model["learning_rate"] = float(model["learning_rate"]) * setting.lr_factor
    if setting.rank is not None:
        model["rank"] = setting.rank
    data["batch_size"] = setting.batch_size
    data["instance_data_dir"] = str(work / "concepts" / setting.name / concept.name)
    data["repeats"] = max(1, -(-args.steps * setting.batch_size // len(concept.image_seeds)) + 1)
    run_dir = work / "runs" / setting.name / concept.name
    config["trainer"]["default_root_dir"] = str(run_dir)
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("TrainableSnapshots"):
            callback["init_args"]["dirpath"] = str(run_dir / "snapshots")
        if callback["class_path"].endswith("WorldProbe"):
            callback["init_args"]["num_images"] = PROBE_IMAGES
    return config


def probe_run(run_dir: Path, config_file: Path, concept, steps: list[int], results: Path,
              recolour_steps: tuple[int, ...] = ()) -> dict:
    """Probe ``steps`` of one run not probed yet: cosine identity (training prompt), the discriminator's identity
    (every prompt's images) and background fidelity; and at ``recolour_steps`` (the rules' stops) the recolour
    fidelity (the concept in a colour it never has, ``world.fidelity.fidelity_checks``). Kept in ``probes.json``."""
    from lightning_custom.runtime.io import write_json
    from lightning_custom.synthetic.world_identity import ConceptDiscriminator
    from lightning_custom.cli import rebuild_run
    from lightning_custom.world.fidelity import fidelity_checks, sample_fidelity
    from lightning_custom.world.probe import load_snapshot, prepared_probe, snapshot_steps

    path = results / "probes.json"
    done = json.loads(path.read_text()) if path.is_file() else {"steps": {}}
    available = set(snapshot_steps(run_dir / "snapshots")) | {0}
    todo = sorted(s for s in available if (s in steps and str(s) not in done["steps"])
                  or (s in recolour_steps and "recolour" not in done["steps"].get(str(s), {})))
    if not todo:
        return done
    probe, module, phrase, trainable = prepared_probe(rebuild_run(config_file))
    discriminator = ConceptDiscriminator(probe._encoder, concept)
    checks = [c for c in fidelity_checks(concept) if c.group == "recolour"]
    from instrument import sample_prompts

    from lightning_custom.synthetic.world_encoder import identity_similarity, judge

    templates = [probe.train_prompt, *probe.eval_prompts]
    targets = [b for b in probe.eval_backgrounds for _ in range(PROBE_IMAGES)]
    for step in todo:  # ascending: step 0 first, from the freshly built module
        if step:
            load_snapshot(module, snapshot_dir=run_dir / "snapshots", step=step, trainable=trainable)
        row = done["steps"].get(str(step))
        if row is None:
            images = sample_prompts(probe, module, templates, phrase, PROBE_IMAGES, first_seed=0)
            evaluated = images[PROBE_IMAGES:]
            background = judge(probe._encoder, evaluated).labels["background"]
            row = {"discriminator": discriminator.score(images),
                   "cosine": identity_similarity(probe._encoder, images[:PROBE_IMAGES], probe._references),
                   "background": float(np.mean([p == t for p, t in zip(background, targets)]))}
        if step in recolour_steps and "recolour" not in row:
            row["recolour"] = sample_fidelity(probe, module, phrase, checks)["recolour"]
        done["steps"][str(step)] = row
        done["steps"] = dict(sorted(done["steps"].items(), key=lambda kv: int(kv[0])))
        write_json(path, done)
    return done


def run_phase(args) -> int:
    """Train (or reuse) every setting's fleet, then probe its runs on the schedule."""
    from fleet_runs import train_fleet

    from lightning_custom.synthetic.world_concepts import make_concept

    work, results = Path(args.workdir), Path(args.results)
    wanted = [s for s in SETTINGS_BY_METHOD[METHOD[0]] if not args.settings or s.name in args.settings]
    for setting in wanted:
        began = time.time()
        concepts = [with_images(make_concept(i, args.concept_seed), setting.images) for i in CONCEPTS[setting.split]]
        singles = {}
        for concept in concepts:
            folder = work / "concepts" / setting.name / concept.name
            if not folder.exists():
                concept.write_images(folder)
            singles[concept.name] = (run_config(setting, concept, work, args),
                                     work / "configs" / setting.name / f"{concept.name}.yaml")
        summaries = train_fleet(singles, work / "runs" / "fleets" / setting.name, probe=False)
        trained = time.time() - began
        for concept in concepts:
            run_dir = work / "runs" / setting.name / concept.name
            target = results / "runs" / setting.name / concept.name
            target.mkdir(parents=True, exist_ok=True)
            slim = {k: v for k, v in summaries[concept.name].items() if k not in v2.BULKY_FIELDS}
            slim["setting"] = {"name": setting.name, "split": setting.split, "lr_factor": setting.lr_factor,
                               "images": len(concept.image_seeds), "batch_size": setting.batch_size,
                               "rank": setting.rank, "method": METHOD[0]}
            (target / "summary.json").write_text(json.dumps(slim, separators=(",", ":")) + "\n")
            probe_run(run_dir, singles[concept.name][1], concept, list(PROBE_SCHEDULE), target)
        print(f"[{time.strftime('%H:%M:%S')}] {setting.name}: trained in {trained:.0f}s, probed in "
              f"{time.time() - began - trained:.0f}s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("run",))
    parser.add_argument("--method", choices=sorted(SETTINGS_BY_METHOD), default="textual_inversion",
                        help="dreambooth_lora trains DreamBoothLoRAFleet (a token and a LoRA per concept); its work "
                             "and results folders get a _lora suffix by default")
    parser.add_argument("--settings", nargs="*", default=None, help="only these settings (names in SETTINGS)")
    parser.add_argument("--steps", type=int, default=1200, help="run length (the slowest setting must converge)")
    parser.add_argument("--workdir", default=None, help="default runs/settings-study (_lora)")
    parser.add_argument("--results", default=None, help="default benchmarks/results/settings_study (_lora)")
    parser.add_argument("--concept-seed", type=int, default=v2.DEFAULT_CONCEPT_SEED)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--encoder", default=None)
    args = parser.parse_args(argv)
    METHOD[:] = [args.method]
    suffix = "" if args.method == "textual_inversion" else "_lora"
    args.workdir = args.workdir or f"runs/settings-study{suffix.replace('_', '-')}"
    args.results = args.results or str(ROOT / "benchmarks" / "results" / f"settings_study{suffix}")
    # Table 1 v2's long-run settings that this study keeps (its probes are taken here, on PROBE_SCHEDULE)
    args = argparse.Namespace(**vars(args), probe_every=25, probe_images=PROBE_IMAGES, probe_inference_steps=10,
                              class_images=4, accelerator=None)
    return {"run": run_phase}[args.phase](args)


if __name__ == "__main__":
    raise SystemExit(main())
