"""A fleet of Textual Inversion concepts against the same concepts trained alone (issue 24, items 5, 7 and 8).

Two measurements, each a CLI run per row (``python -m lightning_custom fit``, start-up and model loading included),
on held-out concepts of the embedded world (``world:N``, seed 2024) with the quickstart's settings:

* ``equivalence``: each of ``--concepts`` (default 50-59, the studies' test split) trained alone and in one fleet,
  same seeds; the paired differences of the stop step, of the learned vectors and of the identity at the stop
  (the world encoder's similarity of 4 samples to the concept images, as ``before_after`` scores it).
* ``throughput``: N concepts (``--sizes``, default 1 4 16 40) as N separate runs and as one fleet: concepts per
  CPU-hour (the children's user + system CPU time), wall time, and the fleet's peak memory (so the memory per
  concept).

Rows are appended to ``<out>/fleet_runs.jsonl`` as they finish; a row already there is not run again, so the job
resumes where it stopped. ``table`` writes ``fleet.md`` from them::

    nice python benchmarks/fleet.py equivalence throughput --out benchmarks/results/fleet
    python benchmarks/fleet.py table --out benchmarks/results/fleet

``--cli-args`` adds arguments to every fit (``benchmarks/gpu_throughput.sh`` measures the SD 1.5 architecture on a
GPU this way). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_custom.errors import FAILED_RUN_EXIT_CODES  # noqa: E402
from lightning_custom.synthetic.world_concepts import make_concept  # noqa: E402

# per method: (single-run config, fleet config, single-run arguments that make it its fleet concept's twin)
METHODS = {
    "textual_inversion": ("quickstart.yaml", "quickstart_fleet.yaml", []),
    # a fleet concept learns its own token, with no class noun in its prompts
    "dreambooth_lora": ("quickstart_dreambooth_lora.yaml", "quickstart_lora_fleet.yaml",
                        ["--model.init_args.train_token_embedding", "true", "--data.init_args.class_noun", "null"]),
}
METHOD = ["textual_inversion"]  # --method
COMMON = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--overwrite", "true"]
EXTRA: list[str] = []  # --cli-args
INITIALIZER: list[str] = []  # --initializer: one word for every concept (a model whose vocabulary lacks the world's)


def concept_entry(index: int) -> dict[str, str]:
    """The concepts-list entry of held-out world concept ``index``."""
    concept = make_concept(index)
    return {"name": f"c{index:03d}", "instance_data_dir": f"world:{index}",
            "placeholder_token": f"<c{index:03d}>", "initializer_token": (INITIALIZER or [concept.initializer_token])[0]}


# Runs the CLI as ``python -m lightning_custom`` does, then writes the process's own peak memory to a file (the
# children's maximum that getrusage reports in the parent is over every child so far, not this one).
_MEASURED = """import atexit, json, os, resource, runpy, sys
atexit.register(lambda: open(os.environ["FLEET_BENCH_RSS"], "w").write(
    str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))
sys.argv = ["lightning_custom", *sys.argv[1:]]
runpy.run_module("lightning_custom", run_name="__main__")
"""


def run_cli(args: list[str]) -> dict[str, float]:
    """Run ``python -m lightning_custom`` and return its wall time, CPU time and peak memory."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", FLEET_BENCH_RSS=rss.name)
        result = subprocess.run([sys.executable, "-c", _MEASURED, *args, *EXTRA], capture_output=True, text=True,
                                env=env, cwd=ROOT)
        peak_kb = float(Path(rss.name).read_text() or 0)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # A concept that stops as undertrained (or diverged...) makes the run exit 3-6: still a measured run.
    if result.returncode not in (0, *FAILED_RUN_EXIT_CODES.values()):
        raise RuntimeError(f"{' '.join(args[:4])}...: exit {result.returncode}\n{result.stderr[-2000:]}")
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "peak_rss_mb": peak_kb / 1024}


def alone(index: int, folder: Path) -> dict[str, float]:
    """Concept ``index`` trained alone, into ``folder``."""
    entry = concept_entry(index)
    single, _, twin = METHODS[METHOD[0]]
    return run_cli(["fit", "--config", str(ROOT / "configs" / single), "--trainer.default_root_dir", str(folder),
                    "--data.init_args.instance_data_dir", entry["instance_data_dir"],
                    "--model.init_args.placeholder_token", entry["placeholder_token"],
                    "--model.init_args.initializer_token", entry["initializer_token"], *twin, *COMMON])


def fleet(indices: list[int], folder: Path, forward: str) -> dict[str, float]:
    """The concepts ``indices`` trained as one fleet (``forward``: batched or per_concept), into ``folder``."""
    concepts = json.dumps([concept_entry(i) for i in indices])
    return run_cli(["fit", "--config", str(ROOT / "configs" / METHODS[METHOD[0]][1]),
                    "--trainer.default_root_dir", str(folder),
                    "--model.init_args.concepts", concepts, "--data.init_args.concepts", concepts,
                    "--model.init_args.forward", forward, *COMMON])


def identity_at_stop(run: Path) -> float:
    """The world encoder's identity similarity of the run's samples to its concept images (``before_after``)."""
    from lightning_custom.world.quickstart import before_after

    summary = json.loads((run / "summary.json").read_text())
    word = summary.get("initializer_token") or json.loads((run / "summary.json").read_text()).get("class_noun")
    with tempfile.TemporaryDirectory() as tmp:
        return float(before_after(run, before_word=word or "shape", out=Path(tmp) / "grid.png")["identity_after"])


def weight_difference(a: Path, b: Path) -> float:
    """The largest difference between the trained weights two runs wrote (token vectors, and LoRA if any)."""
    from safetensors.torch import load_file

    largest = 0.0
    for name in ("learned_embeds.safetensors", "pytorch_lora_weights.safetensors"):
        if (a / name).is_file():
            x, y = load_file(a / name), load_file(b / name)
            largest = max(largest, *(float((x[k] - y[k]).abs().max()) for k in x))
    return largest


class Rows:
    """The measurements so far (``fleet_runs.jsonl``), appended one row at a time."""

    def __init__(self, out: Path) -> None:
        self.path = out / "fleet_runs.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        self.rows = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def has(self, **key: Any) -> bool:
        return any(all(row.get(k) == v for k, v in key.items()) for row in self.rows)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def equivalence(rows: Rows, indices: list[int], work: Path, forward: str) -> None:
    """Each concept alone and in one fleet of all of them: stop steps, vectors, identity at the stop."""
    fleet_dir = work / f"fleet_of_{len(indices)}_{forward}"
    if not rows.has(kind="equivalence_fleet", size=len(indices), forward=forward):
        rows.add({"kind": "equivalence_fleet", "size": len(indices), "forward": forward,
                  **fleet(indices, fleet_dir, forward)})
    for index in indices:
        name = f"c{index:03d}"
        if rows.has(kind="equivalence", concept=name, forward=forward):
            continue
        alone_dir = work / f"alone_{name}"
        cost = alone(index, alone_dir) if not (alone_dir / "summary.json").is_file() else {"wall_s": None}
        own, together = (json.loads((d / "summary.json").read_text()) for d in (alone_dir, fleet_dir / name))
        difference = weight_difference(alone_dir, fleet_dir / name)
        rows.add({"kind": "equivalence", "concept": name, "forward": forward, "stop_alone": own["stop_step"],
                  "stop_fleet": together["stop_step"], "stopped_by_alone": own["stopped_by"],
                  "stopped_by_fleet": together["stopped_by"], "max_vector_difference": difference,
                  "history_identical": own["dvar_history"] == together["dvar_history"],
                  "identity_alone": identity_at_stop(alone_dir), "identity_fleet": identity_at_stop(fleet_dir / name),
                  "alone_wall_s": cost["wall_s"]})


def throughput(rows: Rows, sizes: list[int], work: Path, forwards: list[str]) -> None:
    """N concepts as N separate runs and as one fleet."""
    for size in sizes:
        indices = list(range(size))
        for forward in forwards:
            if not rows.has(kind="throughput_fleet", size=size, forward=forward):
                rows.add({"kind": "throughput_fleet", "size": size, "forward": forward,
                          **fleet(indices, work / f"tp_fleet_{size}_{forward}", forward)})
        if not rows.has(kind="throughput_separate", size=size):
            costs = [alone(i, work / f"tp_alone_{size}_{i}") for i in indices]
            rows.add({"kind": "throughput_separate", "size": size, "wall_s": sum(c["wall_s"] for c in costs),
                      "cpu_s": sum(c["cpu_s"] for c in costs),
                      "peak_rss_mb": max(c["peak_rss_mb"] for c in costs)})


def table(rows: Rows) -> str:
    """The markdown report of the rows."""
    single, fleet_config, _ = METHODS[METHOD[0]]
    title = {"textual_inversion": "Textual Inversion", "dreambooth_lora": "DreamBooth-LoRA"}[METHOD[0]]
    lines = [f"# A fleet of {title} concepts against the same concepts alone", "",
             f"Embedded world model, `configs/{single}` alone against `configs/{fleet_config}` (batch 2 per concept, "
             "DVAR window 40, every 5), one CPU thread per run; `python benchmarks/fleet.py table "
             f"--method {METHOD[0]}` rebuilds this page from `fleet_runs.jsonl`. Max weight difference: over the "
             "token vectors and (LoRA) the adapter's weights.", ""]
    for forward in ("per_concept", "batched"):
        lines += equivalence_section([r for r in rows.rows if r["kind"] == "equivalence"
                                      and r.get("forward") == forward], forward)
    lines += throughput_section(rows)
    return "\n".join(lines) + "\n"


def equivalence_section(pairs: list[dict[str, Any]], forward: str) -> list[str]:
    """The markdown of one forward mode's equivalence rows."""
    lines: list[str] = []
    if pairs:
        steps = [r["stop_fleet"] - r["stop_alone"] for r in pairs]
        ids = [r["identity_fleet"] - r["identity_alone"] for r in pairs]
        gains = [r["identity_alone"] for r in pairs]

        def se(values: list[float]) -> float:
            return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")

        lines += [f"## Equivalence, forward={forward} ({len(pairs)} held-out concepts, alone vs in one fleet of "
                  f"{len(pairs)})", "",
                  "| concept | stop alone | stop in fleet | stopped_by | max vector difference | L_det history "
                  "identical | identity alone | identity in fleet |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['concept']} | {r['stop_alone']} | {r['stop_fleet']} | {r['stopped_by_alone']} / "
                  f"{r['stopped_by_fleet']} | {r['max_vector_difference']:.3g} | {r['history_identical']} | "
                  f"{r['identity_alone']:.3f} | {r['identity_fleet']:.3f} |" for r in pairs]
        lines += ["", f"Paired difference of the stop step: mean {statistics.mean(steps):+.2f} (SE {se(steps):.2f}); "
                  f"of the identity at the stop: mean {statistics.mean(ids):+.4f} (SE {se(ids):.4f}), against a "
                  "single probe's SD of 0.020-0.025 (benchmarks/results/table1_v2/probe_noise_*.json); median "
                  f"identity alone {statistics.median(gains):.3f}.", ""]
    return lines


def throughput_section(rows: Rows) -> list[str]:
    """The markdown of the throughput rows: separate runs against each forward mode's fleet."""
    tp = {(r["kind"], r["size"], r.get("forward")): r for r in rows.rows if r["kind"].startswith("throughput")}
    sizes = sorted({size for _, size, _ in tp})
    if not sizes:
        return []
    lines = ["## Throughput (start-up and model loading included, one CPU thread)", "",
             "| N | fleet forward | separate runs: wall s | CPU s | concepts / CPU-hour | fleet: wall s | CPU s | "
             "concepts / CPU-hour | gain | fleet peak memory MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        sep = tp.get(("throughput_separate", size, None))
        for forward in ("batched", "per_concept"):
            flt = tp.get(("throughput_fleet", size, forward))
            if not sep or not flt:
                continue
            rate_sep, rate_flt = size / (sep["cpu_s"] / 3600), size / (flt["cpu_s"] / 3600)
            lines.append(f"| {size} | {forward} | {sep['wall_s']:.0f} | {sep['cpu_s']:.0f} | {rate_sep:.0f} | "
                         f"{flt['wall_s']:.0f} | {flt['cpu_s']:.0f} | {rate_flt:.0f} | {rate_flt / rate_sep:.1f}x | "
                         f"{flt['peak_rss_mb']:.0f} |")
    for forward in ("batched", "per_concept"):
        fleets = [tp[("throughput_fleet", s, forward)] for s in sizes if ("throughput_fleet", s, forward) in tp]
        if len(fleets) > 1:
            per = (fleets[-1]["peak_rss_mb"] - fleets[0]["peak_rss_mb"]) / (fleets[-1]["size"] - fleets[0]["size"])
            lines += ["", f"forward={forward}: peak memory grows by {per:.1f} MB per concept (its vectors, batches, "
                      "activations and fixed evaluation batch)."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="+", choices=["equivalence", "throughput", "table"])
    parser.add_argument("--method", choices=list(METHODS), default="textual_inversion")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/fleet (Textual "
                        "Inversion) or fleet_<method>")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lightning_custom_fleet")
    parser.add_argument("--concepts", type=int, nargs="+", default=list(range(50, 60)))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 40])
    parser.add_argument("--cli-args", default="", help="more arguments for every fit, e.g. the GPU and the model")
    parser.add_argument("--initializer", help="one initializer word for every concept (default: each concept's own)")
    parser.add_argument("--forward", nargs="+", default=["batched", "per_concept"], choices=["batched", "per_concept"])
    args = parser.parse_args(argv)
    METHOD[:] = [args.method]
    args.out = args.out or ROOT / "benchmarks" / "results" / (
        "fleet" if args.method == "textual_inversion" else f"fleet_{args.method}")
    args.work = args.work / args.method if args.method != "textual_inversion" else args.work
    EXTRA[:] = shlex.split(args.cli_args)
    INITIALIZER[:] = [args.initializer] if args.initializer else []
    rows = Rows(args.out)
    if "equivalence" in args.parts:
        for forward in args.forward:
            equivalence(rows, args.concepts, args.work, forward)
    if "throughput" in args.parts:
        throughput(rows, args.sizes, args.work, args.forward)
    (args.out / "fleet.md").write_text(table(rows))
    print(f"wrote {args.out / 'fleet.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
