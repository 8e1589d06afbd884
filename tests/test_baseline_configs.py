"""The baseline and semi-deterministic configs carry the paper's settings and build their callbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_custom import callbacks
from lightning_custom.cli import main
from lightning_custom.dvar.eval_batch import EVAL_PARTS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The paper's baseline settings (PAPER.md): CLIP ES every 50 steps, 8 images, patience / min improvement;
# "few iters" budgets.
CLIP_ES = {"every_n_steps": 50, "num_images": 8}
BASELINES = [
    ("textual_inversion_clip_es.yaml", "TextualInversion", 6100, "CLIPEarlyStopping",
     {**CLIP_ES, "patience": 6, "min_delta": 0.02}),
    ("textual_inversion_fixed_budget.yaml", "TextualInversion", 6100, "FixedBudget", {"steps": 475}),
    ("textual_inversion_full_length.yaml", "TextualInversion", 6100, None, {}),
    ("custom_diffusion_clip_es.yaml", "CustomDiffusion", 500, "CLIPEarlyStopping",
     {**CLIP_ES, "patience": 6, "min_delta": 0.02}),
    ("dreambooth_lora_clip_es.yaml", "DreamBoothLoRA", 1000, "CLIPEarlyStopping",
     {**CLIP_ES, "patience": 3, "min_delta": 0.04}),
    ("dreambooth_clip_es.yaml", "DreamBooth", 800, "CLIPEarlyStopping", {**CLIP_ES, "patience": 3, "min_delta": 0.04}),
]


@pytest.mark.parametrize("name,method,max_steps,callback,expected", BASELINES, ids=[b[0] for b in BASELINES])
def test_baseline_configs_carry_the_paper_settings(name, method, max_steps, callback, expected):
    config = yaml.safe_load((CONFIGS / name).read_text())
    assert config["trainer"]["max_steps"] == max_steps and config["dvar"]["stop"] is False  # DVAR observes
    assert config["model"]["class_path"] == f"lightning_custom.methods.{method}"
    listed = config["trainer"].get("callbacks", [])
    if callback is None:
        assert not listed
        return
    (entry,) = listed
    assert entry["class_path"] == f"lightning_custom.callbacks.{callback}"
    assert expected.items() <= entry["init_args"].items()
    getattr(callbacks, callback)(**entry["init_args"])  # builds without loading any model


@pytest.mark.parametrize("part", EVAL_PARTS)
def test_semideterministic_configs_resample_one_part_each(part):
    config = yaml.safe_load((CONFIGS / "semideterministic" / f"resample_{part}.yaml").read_text())
    assert config["data"]["init_args"]["resample"] == [part]
    assert config["model"]["init_args"]["pretrained_model_name_or_path"] == "embedded:tiny-sd"  # as committed
    assert config["dvar"]["stop"] is False


def test_help_lists_the_run_subcommands(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert all(f"``{name}``" in out for name in ("sample", "evaluate", "replay"))
    for name, option in (("sample", "--images_per_prompt"), ("evaluate", "--dino_model"), ("replay", "--thresholds")):
        with pytest.raises(SystemExit) as excinfo:
            main([name, "--help"])
        assert excinfo.value.code == 0 and option in capsys.readouterr().out
