"""Throughput of every method: time per optimizer step, overall steps per second, DVAR's share, peak memory.

CPU, on the embedded tiny model (a minute or two):
    python benchmarks/throughput.py --device cpu --arch embedded --resolution 32 --steps 60

GPU, on the SD 1.5 architecture with random weights built in-process (no download), as in the issue's table:
    python benchmarks/throughput.py --device cuda --arch random:sd15 --resolution 512 --precision 16-mixed \
        --weight-dtype float16 --steps 120
(`benchmarks/gpu_throughput.sh` runs the whole GPU set in one call.)

Writes ``<out>/throughput_<tag>.json`` and ``.md``. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_custom.callbacks import DVAREarlyStopping  # noqa: E402
from lightning_custom.components import embedded_concept_path  # noqa: E402
from lightning_custom.data import ConceptDataModule  # noqa: E402
from lightning_custom.io import write_json  # noqa: E402
from lightning_custom.methods import CustomDiffusion, DreamBooth, DreamBoothLoRA, TextualInversion  # noqa: E402

METHODS = {
    "textual_inversion": (TextualInversion, dict(placeholder_token="<bench>", initializer_token="toy",
                                                 learning_rate=5e-3)),
    "dreambooth_lora": (DreamBoothLoRA, dict(placeholder_token="<bench>", initializer_token="toy",
                                             train_token_embedding=True, rank=4, learning_rate=5e-4)),
    "custom_diffusion": (CustomDiffusion, dict(placeholder_token="<bench>", initializer_token="toy",
                                               learning_rate=1e-5)),
    "dreambooth": (DreamBooth, dict(placeholder_token="sks", learning_rate=5e-6)),
}


class StepTimer(Callback):
    """Wall time of each training batch and of each validation (DVAR) pass, synchronising the GPU."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.validations: list[float] = []
        self.fit_seconds = 0.0

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_fit_start(self, trainer, pl_module):
        self._fit = self._now(pl_module)

    def on_fit_end(self, trainer, pl_module):
        self.fit_seconds = self._now(pl_module) - self._fit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(self._now(pl_module) - self._step)

    def on_validation_start(self, trainer, pl_module):
        self._val = self._now(pl_module)

    def on_validation_end(self, trainer, pl_module):
        self.validations.append(self._now(pl_module) - self._val)


def peak_memory_gb(device: str) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on the CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_method(name: str, args: argparse.Namespace) -> dict:
    """Train ``name`` for ``args.steps`` steps with DVAR observing every ``args.dvar_every`` steps."""
    cls, kwargs = METHODS[name]
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    setup_start = time.perf_counter()
    module = cls(pretrained_model_name_or_path=args.arch, weight_dtype=args.weight_dtype, compile_unet=args.compile,
                 cache_latents=not args.no_cache, cache_eval_batch=not args.no_cache,
                 channels_last=args.channels_last, **kwargs)
    data = ConceptDataModule(instance_data_dir=embedded_concept_path(), resolution=args.resolution,
                             batch_size=args.batch_size, eval_batch_size=4, center_crop=True,
                             placeholder_token=kwargs["placeholder_token"],
                             class_noun="toy" if name.startswith("dreambooth") else None)
    setup_seconds = time.perf_counter() - setup_start
    timer = StepTimer()
    dvar = DVAREarlyStopping(window=10_000, threshold=1e-9, eval_every_n_steps=args.dvar_every, stop=False)
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[dvar, timer], default_root_dir=tempfile.mkdtemp(),
    )
    trainer.fit(module, datamodule=data)
    warmup = min(args.warmup, len(timer.steps) - 1)
    steady = timer.steps[warmup:]
    # on_train_batch_end comes before the step's validation, so step times exclude DVAR.
    dvar_seconds = sum(timer.validations)
    return {
        "method": name,
        "arch": args.arch,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}",
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "compile": args.compile,
        "caches": not args.no_cache,
        "channels_last": args.channels_last,
        "dvar_every": args.dvar_every,
        "steps": trainer.global_step,
        "setup_seconds": round(setup_seconds, 2),
        "first_step_seconds": round(timer.steps[0], 3),
        "ms_per_step": round(1000 * statistics.median(steady), 2),
        "ms_per_dvar_eval": round(1000 * statistics.median(timer.validations[warmup // args.dvar_every:] or
                                                           timer.validations), 2),
        "steps_per_second": round(trainer.global_step / timer.fit_seconds, 3),
        "dvar_share": round(dvar_seconds / timer.fit_seconds, 4),
        "fit_seconds": round(timer.fit_seconds, 2),
        "peak_memory_gb": round(peak_memory_gb(args.device), 3),
    }


def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    header = ("| method | device | arch | px | batch | precision | compile | caches | DVAR every | ms/step "
              "| ms/DVAR eval | steps/s (with DVAR) | DVAR share | peak mem GB | first step s |")
    lines = [header, "|" + "---|" * 15]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['device']} | {r['arch']} | {r['resolution']} | {r['batch_size']} | {r['precision']} "
            f"| {r['compile']} | {r['caches']} | {r['dvar_every']} | {r['ms_per_step']} | {r['ms_per_dvar_eval']} "
            f"| {r['steps_per_second']} | {100 * r['dvar_share']:.1f}% | {r['peak_memory_gb']} "
            f"| {r['first_step_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--arch", default="embedded", help="embedded, a model folder/hub id, or random:sd15|sd21")
    parser.add_argument("--methods", default="textual_inversion,dreambooth_lora,custom_diffusion",
                        help=f"comma-separated, from {sorted(METHODS)}")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the per-step median")
    parser.add_argument("--dvar-every", type=int, default=1, help="evaluate L_det every k optimizer steps")
    parser.add_argument("--precision", default="32-true", help="Lightning precision: 32-true, 16-mixed, bf16-mixed")
    parser.add_argument("--weight-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--compile", default="none", choices=["none", "regional", "full"],
                        help="torch.compile the UNet: its repeated blocks only, or whole")
    parser.add_argument("--no-cache", action="store_true", help="turn off the latent and evaluation caches")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--tag", default=None, help="output file suffix (default: device)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    tag = args.tag or args.device
    out = Path(args.out)
    for name in args.methods.split(","):
        row = run_method(name.strip(), args)
        print(json.dumps(row), flush=True)
        rows.append(row)
        # Written after every method, so a run cut short (a device call's time limit) keeps what it measured.
        write_json(out / f"throughput_{tag}.json", {"command": " ".join(sys.argv), "rows": rows})
        (out / f"throughput_{tag}.md").write_text(f"Command: `python {' '.join(sys.argv)}`\n\n" + markdown_table(rows))
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
