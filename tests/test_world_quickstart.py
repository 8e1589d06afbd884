"""Issue 5, item 6: the quickstart visibly learns the example concept (needs the trained world model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_custom.world.encoder import WorldEncoder, default_encoder_path
from lightning_custom.world.model import staging_model_path

IDENTITY_MARGIN = 0.05  # identity similarity after training minus before, on the example concept
WORLD_MODEL = Path(staging_model_path())


def fit_quickstart(root: Path, model: str, concept_dir: str, steps: int, token: str = "<c002>") -> Path:
    from lightning_custom.cli import main

    out = root / "run"
    main(["fit", "--config", "configs/quickstart.yaml", "--model.init_args.pretrained_model_name_or_path", model,
          "--data.init_args.instance_data_dir", concept_dir, "--model.init_args.placeholder_token", token,
          "--model.init_args.initializer_token", "star", "--trainer.max_steps", str(steps),
          "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--summary.report", "false", "--dvar.stop", "false"])
    return out


def test_before_after_grid_on_the_tiny_model(tmp_path, tiny_sd, single_thread, monkeypatch):
    from lightning_custom.world.concepts import make_concept
    from lightning_custom.world.quickstart import before_after

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    concept = make_concept(2)
    folder = concept.write_images(tmp_path / "concept", size=16)
    run = fit_quickstart(tmp_path, tiny_sd, str(folder), steps=3)
    WorldEncoder(width=8, dim=16).save(tmp_path / "encoder")
    result = before_after(run, before_word="star", num_images=2, num_inference_steps=2,
                          encoder=str(tmp_path / "encoder"))
    assert Path(result["grid"]).stat().st_size > 0
    assert -1.0 <= result["identity_before"] <= 1.0 and -1.0 <= result["identity_after"] <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(not (WORLD_MODEL / "unet" / "config.json").exists()
                    or not (Path(default_encoder_path()) / "model.safetensors").exists(),
                    reason="the world model is not trained/exported yet (scripts/train_world_sd.py --export)")
def test_quickstart_learns_the_example_concept(tmp_path, monkeypatch):
    from lightning_custom.world.concepts import make_concept
    from lightning_custom.world.quickstart import before_after

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    concept = make_concept(2)  # an off-palette striped star
    folder = concept.write_images(tmp_path / "concept")
    run = fit_quickstart(tmp_path, str(WORLD_MODEL), str(folder), steps=300)
    result = before_after(run, before_word="star", prompts=["a photo of a {}", "a photo of a {} on a grey background"])
    assert result["identity_after"] - result["identity_before"] > IDENTITY_MARGIN, result
