"""Does another loss carry the identity's time scale better than L_det? (issue 25, Part 1, last item)

The settings study found that L_det's time scale does not follow identity's across settings (Spearman of the DVAR
stops against the oracle steps near zero). This script recomputes, from each run's weight snapshots, the signals the
issue names as candidates, each on the same snapshot steps:

* ``ldet``: L_det as the run computed it (its fixed evaluation batch; the reference);
* ``ldet_low`` / ``ldet_mid`` / ``ldet_high``: the same fixed images, captions and noise at fixed timesteps in one
  band of the schedule each (t in [0, 250), [250, 750), [750, 1000)): which noise levels carry the concept;
* ``heldout``: L_det on a concept image the run never trained on (rendered by the world, a fresh seed): a
  generalisation loss, which the public reports on flow models say turns up where the training images' keeps falling;
* ``train_ma``: the ordinary training loss (a fresh random batch, noise and timesteps per snapshot, as a training step
  draws them), on its causal moving average of 8 values.

Per run and signal: the step where its (causal 4-value moving average) has made 90% of its total change (``t90``),
against the identity's oracle step (the first probe keeping 90% of the gain), and the Spearman correlation of the
signal with the identity over the probed steps. Across runs and settings: the log-log correlation of t90 with the
oracle step, the signal's adaptivity (does its t90 move with the setting as the oracle does?). Rows go to
``<results>/alternative_signals.jsonl`` (resumable), the table to ``alternative_signals.md``::

    nice python benchmarks/alternative_signals.py --results benchmarks/results/settings_study \
        --workdir runs/settings-study

Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

BANDS = {"ldet_low": (0, 250), "ldet_mid": (250, 750), "ldet_high": (750, 1000)}
SIGNALS = ("ldet", *BANDS, "heldout", "train_ma")
EVERY = 80  # snapshot steps evaluated: every 80th step, plus the probed ones
TRAIN_MA = 8


def build(config_file: Path, instance_dir: Path | None = None):
    """The run's module (weights before the first step) and its data module, set up as ``fit`` sets them up,
    optionally on another image folder (the held-out image)."""
    from lightning_custom.cli import rebuild_run

    overrides = ["--trainer.callbacks=[]"]  # no probe or snapshots: only the losses are computed here
    if instance_dir is not None:
        overrides += ["--data.init_args.instance_data_dir", str(instance_dir)]
    run = rebuild_run(config_file, overrides)
    module, data, trainer = run.model, run.datamodule, run.trainer
    trainer.strategy.connect(module)  # eval_batch_spec and setup read the module through the trainer
    module.trainer = trainer
    data.trainer = trainer
    data.setup("fit")
    return module, data


def fixed_batch(module, data, seed: int, timesteps: list[int] | None = None) -> dict:
    """A fixed evaluation batch drawn as DVAR draws it (``draw_eval_parts``), optionally at given timesteps."""
    import torch

    spec = module.eval_batch_spec()
    batch = data.draw_eval_parts(spec, torch.Generator().manual_seed(seed),
                                 ("images", "captions", "latents", "noise", "timesteps"))
    if timesteps is not None:
        batch["timesteps"] = torch.tensor(timesteps, dtype=torch.long)
    return batch


def band_batches(module, data, seed: int) -> dict[str, dict]:
    """Per band: the fixed images repeated at 4 timesteps spread over the band (16 samples for 4 images)."""
    import torch

    base = fixed_batch(module, data, seed)
    size = len(base["caption"])
    out = {}
    for name, (low, high) in BANDS.items():
        ts = np.linspace(low, high - 1, 4).round().astype(int).tolist()
        batch = {k: (torch.cat([v] * 4) if torch.is_tensor(v) else v * 4) for k, v in base.items()}
        batch["timesteps"] = torch.tensor([t for t in ts for _ in range(size)], dtype=torch.long)
        out[name] = batch
    return out


def measure_run(config_file: Path, snapshot_dir: Path, steps: list[int], concept, images: int) -> dict:
    """Every signal at every step in ``steps`` for one run (step 0: the freshly built module)."""
    import torch

    from lightning_custom.world.probe import load_snapshot
    from settings_study import with_images

    module, data = build(config_file)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    with tempfile.TemporaryDirectory() as tmp:  # one image the run never saw: the concept's next seed
        heldout = with_images(concept, images + 1)
        heldout = replace(heldout, image_seeds=heldout.image_seeds[-1:],
                          image_backgrounds=heldout.image_backgrounds[-1:])
        heldout.write_images(Path(tmp))
        _, heldout_data = build(config_file, Path(tmp))
    spec_seed = 59
    batches = {"ldet": fixed_batch(module, data, spec_seed), **band_batches(module, data, spec_seed),
               "heldout": fixed_batch(module, heldout_data, spec_seed)}
    loader = data.train_dataloader()
    train_rng = torch.Generator().manual_seed(1234)
    module.eval()
    module._generator = train_rng  # the training draws come from the module's generator
    rows: dict[str, list[float]] = {s: [] for s in SIGNALS}
    train_batches = iter(loader)
    for step in steps:
        if step:
            load_snapshot(module, snapshot_dir, step, trainable)
        with torch.no_grad():
            for name, batch in batches.items():
                module._eval_cache = {}
                rows[name].append(float(module.deterministic_loss(batch)))
            try:
                batch = next(train_batches)
            except StopIteration:
                train_batches = iter(loader)
                batch = next(train_batches)
            rows["train_ma"].append(float(module.training_loss(batch)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "settings_study")
    parser.add_argument("--workdir", type=Path, default=Path("runs/settings-study"))
    parser.add_argument("--settings", nargs="*", default=None)
    parser.add_argument("--concepts", type=int, default=None, help="at most this many concepts per setting")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    from settings_table import load_study

    from lightning_custom.synthetic.world_concepts import make_concept

    rows_file = args.results / "alternative_signals.jsonl"
    done = {(r["setting"], r["concept"]) for r in map(json.loads, rows_file.read_text().splitlines())
            } if rows_file.is_file() else set()
    runs = load_study(args.results)
    if not args.table_only:
        per_setting: dict[str, int] = {}
        for run in runs:
            if args.settings and run.setting not in args.settings:
                continue
            per_setting[run.setting] = per_setting.get(run.setting, 0) + 1
            if (run.setting, run.concept) in done or (args.concepts and per_setting[run.setting] > args.concepts):
                continue
            run_dir = args.workdir / "runs" / run.setting / run.concept
            config = args.workdir / "configs" / run.setting / f"{run.concept}.yaml"
            if not (run_dir / "snapshots").is_dir() or not config.is_file():
                continue
            from lightning_custom.world.probe import snapshot_steps

            available = set(snapshot_steps(run_dir / "snapshots")) | {0}
            steps = sorted(s for s in available if s % EVERY == 0 or s in run.probes)
            concept = make_concept(int(run.concept[1:4]))
            signals = measure_run(config, run_dir / "snapshots", steps, concept, int(run.meta["images"]))
            with rows_file.open("a") as f:
                f.write(json.dumps({"setting": run.setting, "concept": run.concept, "steps": steps,
                                    "signals": signals}) + "\n")
            print(f"{run.setting} {run.concept}: {len(steps)} steps", flush=True)
    write_table(rows_file, runs, args.results / "alternative_signals.md")
    return 0


def t90(steps: list[int], values: list[float], max_step: int) -> int:
    """The first step where the causal 4-value moving average has made 90% of its total change (start to min)."""
    from lightning_custom.dvar import rule as dvar

    smooth = np.array(dvar.moving_average(values, 4))
    drop = smooth[0] - smooth.min()
    if drop <= 0:
        return max_step
    return next(s for s, v in zip(steps, smooth) if smooth[0] - v >= 0.9 * drop)


def analyse(rows: list[dict], runs: list) -> dict[str, dict]:
    """Per signal: each run's t90 and Spearman with identity; across runs the log-log correlation with the oracle."""
    from lightning_custom.dvar import rule as dvar
    from lightning_custom.dvar.statistics import spearman

    by_key = {(r.setting, r.concept): r for r in runs}
    out: dict[str, dict] = {}
    for signal in SIGNALS:
        t90s, oracles, rhos, settings = [], [], [], []
        for row in rows:
            run = by_key.get((row["setting"], row["concept"]))
            if run is None or run.gain <= 3 * run.gain_se:
                continue
            values = row["signals"][signal]
            if signal == "train_ma":
                values = dvar.moving_average(values, TRAIN_MA)
            steps = row["steps"]
            t90s.append(t90(steps, values, run.max_steps))
            oracles.append(run.oracle)
            probed = [i for i, s in enumerate(steps) if s in run.probes]
            rhos.append(spearman([values[i] for i in probed], [run.probes[steps[i]]["discriminator"] for i in probed]))
            settings.append(row["setting"])
        if not t90s:
            continue
        logs = np.log(np.maximum(t90s, 1)), np.log(np.maximum(oracles, 1))
        per_setting = {}
        for name in sorted(set(settings)):
            picked = [i for i, s in enumerate(settings) if s == name]
            per_setting[name] = (float(np.median([t90s[i] for i in picked])),
                                 float(np.median([oracles[i] for i in picked])))
        med_t = np.log([v[0] for v in per_setting.values()])
        med_o = np.log([v[1] for v in per_setting.values()])
        out[signal] = {
            "runs": len(t90s),
            "log_corr": float(np.corrcoef(*logs)[0, 1]) if len(t90s) > 2 else float("nan"),
            # 1: the signal's time scale moves with the setting as the identity's does; 0: it stays put
            "setting_slope": float(np.polyfit(med_o, med_t, 1)[0]) if len(per_setting) > 2 else float("nan"),
            "median_spearman": float(np.nanmedian(rhos)),
            "median_t90_over_oracle": float(np.median(np.array(t90s) / np.maximum(oracles, 1))),
            "per_setting": per_setting,
        }
    return out


def write_table(rows_file: Path, runs: list, out: Path) -> None:
    """``alternative_signals.md``: per signal, how well its time scale follows the identity's."""
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.is_file() else []
    result = analyse(rows, runs)
    lines = ["# Does another loss follow the identity's time scale better than L_det?", "",
             "From each run's snapshots (`benchmarks/alternative_signals.py`; runs whose identity gain is within 3 SE of "
             "zero left out). t90: the step where the signal's causal moving average has made 90% of its total drop; "
             "oracle: the first probe keeping 90% of the identity gain. `log corr`: correlation of log t90 with log "
             "oracle over runs; `setting slope`: the slope of log t90 against log oracle over the settings' medians (1: "
             "the signal's time scale moves with the setting as the identity's does; 0: it stays put); Spearman: the signal against the identity over a run's probes (a loss "
             "that tracks identity is strongly negative).", "",
             "| signal | runs | log corr (runs) | setting slope (medians) | median Spearman with identity | "
             "median t90 / oracle |", "|---|---|---|---|---|---|"]
    for signal, r in result.items():
        lines.append(f"| {signal} | {r['runs']} | {r['log_corr']:.2f} | {r['setting_slope']:.2f} | "
                     f"{r['median_spearman']:.2f} | {r['median_t90_over_oracle']:.2f} |")
    if result:
        settings = sorted({s for r in result.values() for s in r["per_setting"]})
        lines += ["", "## Median t90 per setting (oracle in the last column)", "",
                  "| setting | " + " | ".join(result) + " | oracle |", "|---|" + "---|" * (len(result) + 1)]
        for name in settings:
            cells = [f"{result[s]['per_setting'][name][0]:.0f}" if name in result[s]["per_setting"] else ""
                     for s in result]
            oracle = next(r["per_setting"][name][1] for r in result.values() if name in r["per_setting"])
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {oracle:.0f} |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
