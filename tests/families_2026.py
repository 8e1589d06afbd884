"""Shared checks of the 2026 families (issue 28: Z-Image, FLUX.2 [klein], Qwen-Image), used by their test files.

Each family test file runs the same end-to-end checks on its own tiny model: the shipped quickstart stops by DVAR
through the CLI, the LoRA it writes loads into the stock pipeline (``from_pretrained`` + ``load_lora_weights``), and
the package's ``sample`` equals that stock pipeline image for image on the same seeds.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from lightning_custom.cli import main
from tests.conftest import one_thread

ROOT = Path(__file__).resolve().parents[1]


def stand_in(components: dict) -> SimpleNamespace:
    """What a family uses from the PersonalizationModule: components, module_dtype, frozen_half_precision, device."""
    return SimpleNamespace(
        **components, device=torch.device("cpu"),
        module_dtype=lambda name: next(components[name].parameters()).dtype,
        frozen_half_precision=lambda name: contextlib.nullcontext(),
    )


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fit_quickstart(family: str, root: Path, *overrides: str) -> dict:
    """``configs/<family>/quickstart_<family>.yaml`` through the CLI (the embedded model and concept, as shipped);
    returns summary.json."""
    with one_thread():
        main(["fit", "--config", str(ROOT / "configs" / family / f"quickstart_{family}.yaml"),
              "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *overrides])
    return json.loads((root / "summary.json").read_text())


def assert_stopped_by_dvar(summary: dict, root: Path, family: str) -> None:
    assert summary["stopped_by"] == "dvar" and summary["stop_step"] < summary["max_steps"], summary["stop_reason"]
    assert summary["prediction_type"] == "flow_matching"
    assert summary["model_family"] == family
    for artifact in summary["artifacts"]:
        assert (root / artifact).exists(), artifact


def assert_sample_equals_stock_pipeline(run: Path, pipeline_class, model_folder: str, prompt_template: str,
                                        phrase: str, height: int, width: int, steps: int = 2,
                                        lora: bool = True) -> None:
    """The package's ``sample`` of a run equals the stock pipeline on the same prompt, seeds, steps and guidance:
    ``<Pipeline>.from_pretrained(model_folder) + load_lora_weights(run)`` for a LoRA run, or
    ``<Pipeline>.from_pretrained(run / "pipeline")`` (``model_folder``) for full DreamBooth."""
    from lightning_custom.inference.sampling import sample_run

    with one_thread():
        manifest = sample_run(run, [prompt_template], images_per_prompt=2, seed=7, num_inference_steps=steps,
                              batch_size=1, height=height, width=width, device="cpu", dtype="float32",
                              output_dir=run / "samples-test")
        pipe = pipeline_class.from_pretrained(model_folder, dtype=torch.float32)
        if lora:
            pipe.load_lora_weights(str(run))
        pipe.set_progress_bar_config(disable=True)
        prompt = prompt_template.format(phrase)
        assert manifest["prompts"][0]["prompt"] == prompt
        for record in manifest["images"]:
            stock = pipe(prompt=prompt, generator=torch.Generator().manual_seed(record["seed"]), height=height,
                         width=width, num_inference_steps=steps, guidance_scale=manifest["guidance_scale"]).images[0]
            ours = Image.open(run / "samples-test" / record["file"])
            assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(stock.convert("RGB"))), record
