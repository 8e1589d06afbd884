"""Can the identity probe tell a trained concept from no training at all? (issue 25, Part 1)

For each run of a study's work folder (``table1_v2.py run`` or ``settings_study.py``; their snapshots are kept), the
training prompt is sampled at step 0 (the untrained model) and at the run's last step (converged), ``--groups``
probes of ``--images`` images each, every probe with its own seeds. Two identity measures score each probe:

* ``cosine``: the world encoder's mean cosine similarity to the concept images (CLIP-I's form; Table 1 v2's);
* ``discriminator``: :class:`lightning_custom.synthetic.world_identity.ConceptDiscriminator`, the probability that an image
  shows the concept rather than one of its near misses (DINO's intent: the subject, not its class).

Per run and measure: the gain (converged - untrained, means over the probes), the SD of one probe at that image
count (over the probes, pooled over the two steps), and gain / SD. ``instrument.md`` states, per measure and image
count, the share of concepts whose gain is at least 8 SDs of one probe (the issue's goal: 90%)::

    nice python benchmarks/instrument.py --workdir runs/table1-v2-fleet --out benchmarks/results/instrument

Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_RATIO = 8.0
# cosine and discriminator score the training prompt's images; discriminator_all_prompts also the probe's
# evaluation prompts' (the concept on other backgrounds: the discriminator is trained on every background).
MEASURES = ("cosine", "discriminator", "discriminator_all_prompts")


def sample_prompts(probe, module, templates: list[str], phrase: str, count: int, first_seed: int) -> list:
    """``count`` samples of each template (the concept phrase filled in), seeds ``first_seed``.. (the probe's
    sampler settings); template after template."""
    from lightning_custom.data.templates import format_prompt
    from lightning_custom.inference.pipelines import pipeline_from_module
    from lightning_custom.inference.sampling import generate

    size = probe._references[0].size[0]
    pipe = pipeline_from_module(module, "ddim")
    prompts = [format_prompt(t, phrase) for t in templates for _ in range(count)]
    return generate(pipe, prompts, [first_seed + i for i in range(len(prompts))], height=size, width=size,
                    guidance_scale=probe.guidance_scale, num_inference_steps=probe.num_inference_steps,
                    batch_size=min(len(prompts), 64))


def measure_run(config_file: Path, snapshot_dir: Path, step: int, concept, images: int, groups: int) -> dict:
    """Per measure: ``{"untrained": [score per probe], "converged": [...]}`` for one run."""
    from lightning_custom.synthetic.world_encoder import identity_similarity
    from lightning_custom.synthetic.world_identity import ConceptDiscriminator
    from lightning_custom.cli import rebuild_run
    from lightning_custom.world.probe import load_snapshot, prepared_probe

    probe, module, phrase, trainable = prepared_probe(rebuild_run(config_file))
    discriminator = ConceptDiscriminator(probe._encoder, concept)
    out: dict[str, dict[str, list[float]]] = {m: {} for m in MEASURES}
    templates = [probe.train_prompt, *probe.eval_prompts]
    for label, at in (("untrained", 0), ("converged", step)):
        if at:
            load_snapshot(module, snapshot_dir, at, trainable)
        out["cosine"][label], out["discriminator"][label], out["discriminator_all_prompts"][label] = [], [], []
        for group in range(groups):  # a probe: `images` per template, its own seeds
            samples = sample_prompts(probe, module, templates, phrase, images, first_seed=10_000 + 1000 * group)
            train = samples[:images]
            out["cosine"][label].append(identity_similarity(probe._encoder, train, probe._references))
            out["discriminator"][label].append(discriminator.score(train))
            out["discriminator_all_prompts"][label].append(discriminator.score(samples))
    return out


def ceiling_scores(concept, images: int, groups: int) -> list[float]:
    """The instrument's ceiling: per probe, the discriminator's score of fresh renders of the concept itself (as a
    model that learned it perfectly would draw it), ``images`` per prompt over the probe's 5 prompts."""
    from lightning_custom.synthetic.world_encoder import WorldEncoder
    from lightning_custom.synthetic.world_identity import ConceptDiscriminator, concept_renders

    discriminator = ConceptDiscriminator(WorldEncoder.load(), concept)
    return [discriminator.score(concept_renders(concept, 5 * images, seed=500 + group)) for group in range(groups)]


def summarise(scores: dict[str, list[float]]) -> dict[str, float]:
    """Gain, the SD of one probe (pooled over the two steps) and their ratio."""
    a, b = np.array(scores["untrained"]), np.array(scores["converged"])
    sd = float(np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2))
    gain = float(b.mean() - a.mean())
    return {"untrained": float(a.mean()), "converged": float(b.mean()), "gain": gain, "probe_sd": sd,
            "ratio": gain / sd if sd > 0 else float("inf")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a study's work folder (runs/full/<method>/...)")
    parser.add_argument("--methods", nargs="+", default=["textual_inversion"])
    parser.add_argument("--concepts", default=None, help="only these run folder prefixes, e.g. c050,c051")
    parser.add_argument("--images", type=int, nargs="+", default=[2, 8], help="images per probe")
    parser.add_argument("--groups", type=int, default=8, help="probes per step (their SD is one probe's noise)")
    parser.add_argument("--concept-seed", type=int, default=2024)
    parser.add_argument("--settings", nargs="+", default=None,
                        help="read a settings study's work folder (settings_study.py: runs/<setting>/<concept>/) at "
                             "these settings instead of Table 1 v2's (runs/full/<method>/<concept>/)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "instrument")
    args = parser.parse_args(argv)
    from lightning_custom.synthetic.world_concepts import make_concept
    from lightning_custom.world.probe import snapshot_steps

    args.out.mkdir(parents=True, exist_ok=True)
    rows_file = args.out / "instrument_runs.jsonl"
    done = {(r["method"], r["run"], r["images"]) for r in map(json.loads, rows_file.read_text().splitlines())
            } if rows_file.is_file() else set()
    for method, run_dir, config_file in study_runs(args):
        if args.concepts and not any(run_dir.name.startswith(p) for p in args.concepts.split(",")):
            continue
        steps = snapshot_steps(run_dir / "snapshots")
        if not steps or not config_file.is_file():
            continue
        concept = make_concept(int(run_dir.name[1:4]), args.concept_seed)
        for images in args.images:
            if (method, run_dir.name, images) in done:
                continue
            measured = measure_run(config_file, run_dir / "snapshots", steps[-1], concept, images, args.groups)
            row = {"method": method, "run": run_dir.name, "images": images, "groups": args.groups,
                   "step": steps[-1], "scores": measured,
                   **{m: summarise(s) for m, s in measured.items()}}
            with rows_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{method} {run_dir.name} {images} images: " + ", ".join(
                f"{m} gain {row[m]['gain']:.3f} / sd {row[m]['probe_sd']:.3f} = {row[m]['ratio']:.1f}"
                for m in measured), flush=True)
    ceilings_file = args.out / "instrument_ceiling.json"
    ceilings = json.loads(ceilings_file.read_text()) if ceilings_file.is_file() else {}
    for row in map(json.loads, rows_file.read_text().splitlines()):
        key = f"{row['run']}:{row['images']}"
        if key not in ceilings:
            ceilings[key] = ceiling_scores(make_concept(int(row["run"][1:4]), args.concept_seed), row["images"],
                                           row["groups"])
            ceilings_file.write_text(json.dumps(ceilings, indent=1, sort_keys=True) + "\n")
    write_table(rows_file, args.out / "instrument.md", ceilings)
    return 0


def study_runs(args) -> list[tuple[str, Path, Path]]:
    """``(method, run folder, its config)`` for every run of the work folder: Table 1 v2's layout, or a settings
    study's at ``args.settings`` (the method read from the setting's configs)."""
    if not args.settings:
        return [(method, run_dir, args.workdir / "configs" / method / f"{run_dir.name}.yaml")
                for method in args.methods for run_dir in sorted((args.workdir / "runs" / "full" / method).iterdir())]
    import yaml

    found = []
    for setting in args.settings:
        for run_dir in sorted((args.workdir / "runs" / setting).glob("c[0-9][0-9][0-9]-*")):
            config_file = args.workdir / "configs" / setting / f"{run_dir.name}.yaml"
            if config_file.is_file():
                class_path = yaml.safe_load(config_file.read_text())["model"]["class_path"]
                method = "dreambooth_lora" if class_path.endswith("LoRA") else "textual_inversion"
                found.append((f"{method} ({setting})", run_dir, config_file))
    return found


def write_table(rows_file: Path, out: Path, ceilings: dict[str, list[float]]) -> None:
    """``instrument.md``: per method, measure and image count, the gain-to-noise of the concepts; and the
    instrument's ceiling (what a perfectly learned concept would gain) against the method's converged gain."""
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    lines = ["# Can the identity probe tell a trained concept from no training at all?", "",
             "Per run: the training prompt sampled at step 0 and at the run's last step, several probes each (own "
             "seeds); gain = converged - untrained (means), one probe's SD pooled over the two steps. Goal: gain >= "
             f"{GOAL_RATIO:g} SDs of one probe for at least 90% of concepts. `cosine` is Table 1 v2's instrument "
             "(the world encoder's cosine similarity to the concept images, training prompt); `discriminator` scores "
             "the same images with the concept discriminator (world/identity.py); `discriminator_all_prompts` also "
             "the images of the 4 evaluation prompts (the concept on new backgrounds). "
             "`python benchmarks/instrument.py` rebuilds this page.", "",
             "| method | measure | images per prompt (all_prompts: 5 prompts) | runs | median untrained | median converged | median gain | "
             "median probe SD | median gain / SD | concepts with gain >= 8 SD |", "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["method"], m, r["images"]) for r in rows for m in MEASURES if m in r})
    for method, measure, images in keys:
        picked = [r[measure] for r in rows if r["method"] == method and r["images"] == images]
        med = {k: float(np.median([p[k] for p in picked])) for k in ("untrained", "converged", "gain", "probe_sd",
                                                                      "ratio")}
        passing = sum(p["ratio"] >= GOAL_RATIO for p in picked)
        lines.append(f"| {method} | {measure} | {images} | {len(picked)} | {med['untrained']:.3f} | "
                     f"{med['converged']:.3f} | {med['gain']:.3f} | {med['probe_sd']:.3f} | {med['ratio']:.1f} | "
                     f"{passing}/{len(picked)} ({100 * passing / len(picked):.0f}%) |")
    lines += ["", "## Can the instrument see a learned concept? (its ceiling against the method's gain)", "",
              "Ceiling: the discriminator's score (all prompts' measure) of fresh renders of the concept itself, as a "
              "model that learned it perfectly would draw it, minus the untrained model's score, in SDs of one probe. "
              "Where the ceiling clears 8 SDs and the converged gain does not, the instrument can see the concept "
              "and the method did not learn it (to the instrument's eye): a fact about training, not about noise.", "",
              "| method | images per prompt | runs | median ceiling gain / SD | runs with ceiling >= 8 SD | "
              "median converged share of the ceiling | runs with converged gain >= 8 SD |", "|---|---|---|---|---|---|---|"]
    measure = "discriminator_all_prompts"
    for method, images in sorted({(r["method"], r["images"]) for r in rows if measure in r}):
        picked = [r for r in rows if r["method"] == method and r["images"] == images
                  and f"{r['run']}:{images}" in ceilings]
        if not picked:
            continue
        ratios, shares = [], []
        for r in picked:
            top = float(np.mean(ceilings[f"{r['run']}:{images}"])) - r[measure]["untrained"]
            ratios.append(top / r[measure]["probe_sd"])
            shares.append(r[measure]["gain"] / top)
        passing = sum(r[measure]["ratio"] >= GOAL_RATIO for r in picked)
        lines.append(f"| {method} | {images} | {len(picked)} | {np.median(ratios):.1f} | "
                     f"{sum(x >= GOAL_RATIO for x in ratios)}/{len(picked)} | {np.median(shares):.2f} | "
                     f"{passing}/{len(picked)} |")
    lines += ["", "## Per run (gain / SD of one probe)", "", "| method | run | images | " + " | ".join(MEASURES) + " |",
              "|---|---|---|" + "---|" * len(MEASURES)]
    for r in rows:
        cells = [f"{r[m]['gain']:.3f} / {r[m]['probe_sd']:.3f}" if m in r else "" for m in MEASURES]
        lines.append(f"| {r['method']} | {r['run']} | {r['images']} | " + " | ".join(cells) + " |")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
