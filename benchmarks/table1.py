"""The paper's Table 1 in the micro world: every method x {full-length, DVAR, encoder early stopping, few iters}.

For each held-out concept (lightning_custom.synthetic.world_concepts) and method, ONE full-length run is trained with DVAR
observing only (``--dvar.stop false``) and a :class:`~lightning_custom.world.probe.WorldProbe` scoring samples
every ``--probe-every`` steps. The variants are then replayed on the logged series, since no rule changes
training before it stops:

* full-length: the last step;
* DVAR: the first step where ``var(last W) / var(all) < threshold`` of the deterministic loss (the live rule);
* encoder early stopping (the CLIP early-stopping analogue): identity similarity of training-prompt samples,
  stop after ``patience`` probes without an improvement of more than ``min_delta``;
* few iters: a fixed budget, the mean stop step of encoder early stopping over the concepts (as in the paper).

A variant's quality is the probe at the last probe step not after its stop; its time is its steps at the run's
measured seconds per step (training + the deterministic-loss evaluation), plus the probes it used (encoder
early stopping only). ``--live K`` re-trains the first K concepts with DVAR stopping live and checks that the
live stop step equals the replayed one.

    OMP_NUM_THREADS=1 python benchmarks/table1.py --concepts 10            # smoke, on the embedded model
    python benchmarks/table1.py --concepts 100 --model lightning_custom/assets/world-sd
    # on a many-core machine: N parallel shards first, then the same command without --shard
    for k in $(seq 0 15); do OMP_NUM_THREADS=1 python benchmarks/table1.py --concepts 100 --shard $k/16 & done; wait

Writes ``<out>/table1.md`` (the table, the live check, the settings and this command), ``table1.csv`` (one row
per run and variant), ``table1_dvar_stops.png`` and ``table1_quality_vs_step.png``. Runs already finished under
``--workdir`` are reused (the script resumes).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("full_length", "dvar", "encoder_es", "few_iters")
TRAINED = {"runs": 0}


@dataclass(frozen=True)
class MethodSettings:
    """One method's config and rule settings (window and steps are scaled by ``--steps`` / its default)."""

    config: str
    steps: int
    window: int
    threshold: float
    patience: int
    min_delta: float
    token: str | None = None  # None: the concept's own placeholder token


METHODS: dict[str, MethodSettings] = {
    # Paper: TI 6100 steps, W 310, t 0.15; CD 500 / 180 / 0.15; LoRA 1000 / 440 / 0.4; CLIP-ES 6/0.02 (LoRA 3/0.04).
    "textual_inversion": MethodSettings("configs/quickstart.yaml", 400, 40, 0.15, 6, 0.02),
    "dreambooth_lora": MethodSettings("configs/quickstart_dreambooth_lora.yaml", 300, 60, 0.4, 3, 0.04),
    "custom_diffusion": MethodSettings("configs/quickstart_custom_diffusion.yaml", 200, 40, 0.15, 6, 0.02,
                                       token="<new1>"),
    "dreambooth": MethodSettings("configs/quickstart_dreambooth.yaml", 200, 40, 0.4, 3, 0.04, token="sks"),
}


def shard_spec(text: str) -> tuple[int, int]:
    """Parse ``--shard K/N`` (this process's share K of N processes), refusing a K outside 0..N-1.

    Raises:
        argparse.ArgumentTypeError: for anything but two integers with 0 <= K < N (so "2/2" cannot silently
            skip job 0, which no shard of 1/2 and 2/2 would run).
    """
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N (e.g. 0/2 and 1/2), got {text!r}")
    return k, n


def shard(items: list, spec: tuple[int, int] | None) -> list:
    """Items K, K+N, ... for ``spec`` (K, N) from ``--shard K/N`` (all of them for None): N processes share a list."""
    if not spec:
        return items
    k, n = spec
    return items[k::n]


def scaled(settings: MethodSettings, steps: int | None) -> tuple[int, int]:
    """(max steps, DVAR window) with the window kept at the same fraction of the run when ``steps`` is given."""
    if steps is None:
        return settings.steps, settings.window
    return steps, max(2, round(settings.window * steps / settings.steps))


@functools.lru_cache(maxsize=4)
def base_tokenizer(model: str):
    from transformers import CLIPTokenizer

    from lightning_custom.families.components import resolve_model_path

    return CLIPTokenizer.from_pretrained(resolve_model_path(model), subfolder="tokenizer")


def initializer_token(concept, model: str) -> str:
    """The concept's shape word if the base model's tokenizer holds it as one token, else ``"shape"``."""
    word = concept.initializer_token
    return word if len(base_tokenizer(model).encode(word, add_special_tokens=False)) == 1 else "shape"


def run_config(method: str, concept, folder: Path, args, live: bool) -> dict:
    """The YAML config of one run: the method's quickstart config with the concept, model and rules filled in."""
    settings = METHODS[method]
    config = yaml.safe_load((ROOT / settings.config).read_text())
    steps, window = scaled(settings, args.steps)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    model["pretrained_model_name_or_path"] = args.model
    model["placeholder_token"] = settings.token or concept.placeholder_token
    if "initializer_token" in model:
        model["initializer_token"] = initializer_token(concept, args.model)
    data["instance_data_dir"] = str(folder / "concepts" / concept.name)
    data["repeats"] = max(1, math.ceil(steps * data.get("batch_size", 1) / len(concept.image_seeds)) + 1)
    if "class_noun" in data:
        data["class_noun"] = concept.class_word
    if data.get("with_prior_preservation"):
        data["num_class_images"] = args.class_images
        data["class_cache_dir"] = str(folder / "class_images")
    run_dir = folder / "runs" / ("live" if live else "full") / method / concept.name
    if args.accelerator:
        config["trainer"]["accelerator"] = args.accelerator
    config["trainer"].update(max_steps=steps, default_root_dir=str(run_dir), enable_progress_bar=False,
                             enable_model_summary=False, logger=False, enable_checkpointing=False)
    config["dvar"] = {"window": window, "threshold": settings.threshold, "stop": live, "verbose": False}
    config["summary"] = {"export": False, "report": False}
    if not live:
        backgrounds = list(concept.eval_backgrounds)
        config["trainer"]["callbacks"] = [{
            "class_path": "lightning_custom.world.probe.WorldProbe",
            "init_args": {"every_n_steps": args.probe_every, "num_images": args.probe_images,
                          "eval_prompts": ["a photo of a {} on a %s background" % b for b in backgrounds],
                          "eval_backgrounds": backgrounds, "num_inference_steps": args.probe_inference_steps,
                          "encoder": args.encoder},
        }]
    return config


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that ran to its end: a run stopped by Ctrl-C or a signal also writes
    summary.json (``stopped_by: interrupted``), and is trained again from step 0 instead of being reused."""
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("stopped_by") != "interrupted"


def fit(config: dict, path: Path) -> dict:
    """Trains one run in-process (skipped when its summary exists) and returns its summary."""
    from lightning_custom.cli import main

    run_dir = Path(config["trainer"]["default_root_dir"])
    if not finished(run_dir):
        TRAINED["runs"] += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when sys.argv holds this script's arguments
        try:
            main(["fit", "--config", str(path)])
        finally:
            sys.argv = saved
    return json.loads((run_dir / "summary.json").read_text())


# ------------------------------------------------------------------------------------------------ replay
def replay_variants(summary: dict, settings: MethodSettings, few_iters: int | None, *,
                    dvar_window: int | None = None, dvar_threshold: float | None = None) -> dict[str, dict]:
    """Stop step, quality and seconds of each variant, replayed on one full-length run's logged series.

    ``dvar_window`` (steps) and ``dvar_threshold`` replace the run's own DVAR settings (for the sensitivity table).
    """
    from lightning_custom.callbacks.clip_early_stopping import patience_stop_index
    from lightning_custom.dvar.rule import window_in_values
    from lightning_custom.dvar.replay import replay_stop_indices

    max_steps = summary["max_steps"]
    probes = summary["world_probe_history"]
    every = summary.get("dvar_eval_every_n_steps") or 1
    dvar_steps = [int(s) for s, _ in summary["dvar_history"]]
    window = window_in_values(dvar_window or summary["dvar_window"], every)
    index = replay_stop_indices([[v for _, v in summary["dvar_history"]]], window,
                                [dvar_threshold or summary["dvar_threshold"]])[0]
    checks = [row for row in probes if row[0] > 0]
    es_index = patience_stop_index([row[1] for row in checks], settings.patience, settings.min_delta)
    stops = {
        "full_length": max_steps,
        "dvar": dvar_steps[index] if index is not None else max_steps,
        "encoder_es": int(checks[es_index][0]) if es_index is not None else max_steps,
        "few_iters": min(max_steps, few_iters) if few_iters else None,
    }
    probe_seconds = summary.get("world_probe_seconds", 0.0)
    per_step = (summary["wall_seconds"] - probe_seconds) / max(1, max_steps)
    per_probe = probe_seconds / max(1, len(probes))
    out = {}
    for variant, step in stops.items():
        if step is None:
            continue
        row = [r for r in probes if r[0] <= step][-1]
        seconds = step * per_step + (per_probe * sum(1 for r in checks if r[0] <= step) if variant == "encoder_es"
                                     else 0.0)
        out[variant] = {"step": step, "identity": row[2], "fidelity": row[3], "identity_train": row[1],
                        "seconds": seconds, "probe_step": row[0]}
    out["untrained"] = {"step": 0, "identity": probes[0][2], "fidelity": probes[0][3], "identity_train": probes[0][1],
                        "seconds": 0.0, "probe_step": 0}
    return out


def median_iqr(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return f"{med:{fmt}} ± {q3 - q1:{fmt}}"


def markdown(rows: list[dict], methods: list[str]) -> str:
    lines = ["| method | variant | identity ↑ | prompt fidelity ↑ | steps | seconds | concepts |",
             "|---|---|---|---|---|---|---|"]
    for method in methods:
        for variant in ("untrained", *VARIANTS):
            sel = [r for r in rows if r["method"] == method and r["variant"] == variant]
            if not sel:
                continue
            lines.append(f"| {method} | {variant} | {median_iqr([r['identity'] for r in sel], '.3f')} | "
                         f"{median_iqr([r['fidelity'] for r in sel], '.2f')} | "
                         f"{median_iqr([r['step'] for r in sel], '.0f')} | "
                         f"{median_iqr([r['seconds'] for r in sel], '.1f')} | {len(sel)} |")
    return "\n".join(lines)


def sensitivity(summaries: dict, methods: list[str], concepts: list) -> str:
    """DVAR replayed with other windows (x1, x2, x3) and thresholds (x1, x1/2) on the same logged series: the
    median stop step and identity, against full length, so the settings can be chosen for a model."""
    lines = ["| method | DVAR window | threshold | steps | identity | full-length identity |",
             "|---|---|---|---|---|---|"]
    for method in methods:
        settings = METHODS[method]
        runs = [summaries[method, c.name] for c in concepts]
        full = np.median([replay_variants(r, settings, None)["full_length"]["identity"] for r in runs])
        window = runs[0]["dvar_window"]
        threshold = runs[0]["dvar_threshold"]
        for w in (window, 2 * window, 3 * window):
            for t in (threshold, threshold / 2):
                stops = [replay_variants(r, settings, None, dvar_window=w, dvar_threshold=t)["dvar"] for r in runs]
                lines.append(f"| {method} | {w} | {t:g} | {np.median([d['step'] for d in stops]):.0f} | "
                             f"{np.median([d['identity'] for d in stops]):.3f} | {full:.3f} |")
    return "\n".join(lines)


def plots(rows: list[dict], summaries: dict, methods: list[str], out: Path, curves: int = 4) -> None:
    """The histogram of DVAR stop steps per method, and identity against step for a few concepts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(methods), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    for ax, method in zip(np.atleast_1d(fig.subplots(1, len(methods))), methods):
        steps = [r["step"] for r in rows if r["method"] == method and r["variant"] == "dvar"]
        max_steps = max([r["step"] for r in rows if r["method"] == method and r["variant"] == "full_length"] or [1])
        ax.hist(steps, bins=np.linspace(0, max_steps, 21), color="tab:blue")
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("DVAR stop step")
        ax.set_ylabel("concepts")
    fig.tight_layout()
    fig.savefig(out / "table1_dvar_stops.png")

    fig = Figure(figsize=(4 * len(methods), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    for ax, method in zip(np.atleast_1d(fig.subplots(1, len(methods))), methods):
        for (m, name), summary in list((k, v) for k, v in summaries.items() if k[0] == method)[:curves]:
            probes = summary["world_probe_history"]
            line, = ax.plot([p[0] for p in probes], [p[2] for p in probes], label=name.split("-")[0])
            stop = next(r["step"] for r in rows if r["method"] == m and r["concept"] == name and r["variant"] == "dvar")
            ax.axvline(stop, color=line.get_color(), ls="--", lw=0.8)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("step (dashed: DVAR stop)")
        ax.set_ylabel("identity similarity")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "table1_quality_vs_step.png")


def main(argv: list[str] | None = None) -> int:
    """Train (or reuse), replay, write the table and figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=10, help="the first N held-out concepts")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--model", default="embedded", help="base model (diffusers folder, hub id or 'embedded')")
    parser.add_argument("--encoder", default=None, help="world encoder folder (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=None, help="full-length steps for every method "
                        "(default: per method); DVAR windows scale with it")
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--probe-images", type=int, default=2)
    parser.add_argument("--probe-inference-steps", type=int, default=10)
    parser.add_argument("--class-images", type=int, default=4)
    parser.add_argument("--live", type=int, default=1, help="re-train the first K concepts with live DVAR")
    parser.add_argument("--accelerator", default=None, help="override the configs' trainer.accelerator (cpu, gpu)")
    parser.add_argument("--shard", type=shard_spec, default=None, metavar="K/N", help="only train runs K, K+N, "
                        "K+2N, ... of the (method, concept) list and exit; run once more without --shard to replay and "
                        "write the table")
    parser.add_argument("--note", default="", help="a paragraph written under the title (e.g. what the model is)")
    parser.add_argument("--workdir", default="runs/table1")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    from lightning_custom.synthetic.world_concepts import heldout_concepts

    start = time.time()
    work, out = Path(args.workdir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    concepts = heldout_concepts(args.concepts)
    for concept in concepts:
        if not (work / "concepts" / concept.name).exists():
            concept.write_images(work / "concepts" / concept.name)
    summaries: dict[tuple[str, str], dict] = {}
    jobs = [(method, concept) for method in args.methods for concept in concepts]
    if args.shard:
        for method, concept in shard(jobs, args.shard):
            fit(run_config(method, concept, work, args, live=False), work / "configs" / method / f"{concept.name}.yaml")
        return 0
    for method, concept in jobs:
        config = run_config(method, concept, work, args, live=False)
        summaries[method, concept.name] = fit(config, work / "configs" / method / f"{concept.name}.yaml")
        print(f"[{time.time() - start:.0f}s] {method} {concept.name} done", flush=True)

    rows: list[dict] = []
    for method in args.methods:
        settings = METHODS[method]
        replays = {c.name: replay_variants(summaries[method, c.name], settings, None) for c in concepts}
        budget = round(float(np.mean([r["encoder_es"]["step"] for r in replays.values()])))
        for concept in concepts:
            replayed = replay_variants(summaries[method, concept.name], settings, budget)
            for variant, values in replayed.items():
                rows.append({"method": method, "concept": concept.name, "kind": concept.kind, "variant": variant,
                             **values})

    agreement = []
    for method in args.methods:
        for concept in concepts[: args.live]:
            config = run_config(method, concept, work, args, live=True)
            live = fit(config, work / "configs" / "live" / method / f"{concept.name}.yaml")
            replayed = next(r["step"] for r in rows
                            if r["method"] == method and r["concept"] == concept.name and r["variant"] == "dvar")
            agreement.append((method, concept.name, live["stop_step"], live["stopped_by"], replayed))

    with open(out / "table1.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plots(rows, summaries, args.methods, out)
    command = "OMP_NUM_THREADS=1 python benchmarks/table1.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    agree = sum(live_step == replayed for _, _, live_step, _, replayed in agreement)
    settings_lines = [f"| {m} | {scaled(METHODS[m], args.steps)[0]} | {scaled(METHODS[m], args.steps)[1]} | "
                      f"{METHODS[m].threshold} | {METHODS[m].patience} / {METHODS[m].min_delta} |"
                      for m in args.methods]
    text = "\n".join([
        "# Table 1 in the micro world", "", *([args.note, ""] if args.note else []),
        f"Command: `{command}`", "",
        f"Model: `{args.model}`; {len(concepts)} held-out concepts; probe every {args.probe_every} steps "
        f"({args.probe_images} images per prompt, {args.probe_inference_steps} DDIM steps). Median ± IQR over concepts. "
        f"Identity: world-encoder cosine similarity of samples from the evaluation prompts (the concept on new "
        f"backgrounds) to the concept images; prompt fidelity: fraction of those samples whose background the encoder "
        f"names as prompted. Seconds: this machine, training + deterministic-loss evaluation at the run's measured "
        f"rate, plus sampling for encoder early stopping. Wall time of this invocation: {time.time() - start:.0f} s "
        f"({TRAINED['runs']} runs trained, the rest reused from `{args.workdir}`).", "",
        markdown(rows, args.methods), "",
        "## Settings", "", "| method | full-length steps | DVAR window | DVAR threshold | encoder ES patience / min delta |",
        "|---|---|---|---|---|", *settings_lines, "",
        "## DVAR settings, replayed", "",
        "The same full-length runs, with DVAR replayed at longer windows and a stricter threshold (medians over "
        "concepts; the first row of each method is the setting above).", "",
        sensitivity(summaries, args.methods, concepts), "",
        f"## Replay vs live DVAR ({agree}/{len(agreement)} agree)", "",
        "| method | concept | live stop step | live stopped by | replayed stop step |", "|---|---|---|---|---|",
        *[f"| {m} | {c} | {s} | {b} | {r} |" for m, c, s, b, r in agreement], "",
        "Figures: `table1_dvar_stops.png` (DVAR stop steps), `table1_quality_vs_step.png` (identity vs step).", "",
    ])
    (out / "table1.md").write_text(text)
    print(text)
    return 0 if agree == len(agreement) else 1


if __name__ == "__main__":
    raise SystemExit(main())
