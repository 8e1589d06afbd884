"""sample, evaluate and before_after on flow-matching runs (FLUX.1, SD3), and LiveSamples on a flow module (issue 13).

Short runs (4 steps) on the embedded tiny models, sampled at 16 px with 2 steps: the run's pipeline is the base
model's class with its flow-matching scheduler, its images equal the live module's, differ from the base model's
for the same prompt and seed, and a DDPM-family sampler is refused in one line.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_custom.callbacks import DVAREarlyStopping, LiveSamples, RunSummary
from lightning_custom.cli import main
from lightning_custom.families.components import embedded_concept_path, resolve_model_path
from lightning_custom.data import ConceptDataModule
from lightning_custom.errors import UserInputError
from lightning_custom.methods import DreamBooth, DreamBoothLoRA, TextualInversion
from lightning_custom.inference.pipelines import auto_dtype, load_pipeline, load_run_pipeline, pipeline_from_module
from lightning_custom.inference.sampling import generate, sample_run
from lightning_custom.synthetic.toy_flow import save_tiny_sd3
from tests.conftest import RESOLUTION, one_thread, trainer_kwargs

pytestmark = pytest.mark.usefixtures("single_thread")
SIZE = dict(height=RESOLUTION, width=RESOLUTION)
FAST = dict(num_inference_steps=2, **SIZE)
PROMPT = "a photo of a toy"  # no learned token: the base model reads it the same way


def fit(root: Path, module: L.LightningModule, callbacks: list | None = None) -> Path:
    """Train ``module`` for 4 steps on the shipped cat-toy images at 16 px; returns the run folder."""
    with one_thread():
        trainer = L.Trainer(max_steps=4, callbacks=[DVAREarlyStopping(window=50, stop=False), RunSummary(),
                                                    *(callbacks or [])], **trainer_kwargs(root))
        trainer.fit(module, datamodule=ConceptDataModule(
            instance_data_dir=embedded_concept_path("cat-toy"), class_noun="toy", resolution=RESOLUTION,
            batch_size=2, eval_batch_size=4, repeats=10, seed=59))
    return root


def lora(model: str) -> DreamBoothLoRA:
    return DreamBoothLoRA(pretrained_model_name_or_path=model, placeholder_token="<cat-toy>", initializer_token="toy",
                          train_token_embedding=True, learning_rate=3e-2)


@pytest.fixture(scope="module")
def flux_lora(tmp_path_factory):
    """A 4-step DreamBooth-LoRA run (new token) on embedded:tiny-flux, with a live grid every 2 steps."""
    module = lora("embedded:tiny-flux")
    live = LiveSamples(every_n_steps=2, images_per_prompt=2, num_inference_steps=2, **SIZE)
    return fit(tmp_path_factory.mktemp("flux-lora"), module, [live]), module, live


@pytest.fixture(scope="module")
def sd3_lora(tmp_path_factory):
    """A 4-step DreamBooth-LoRA run on embedded:tiny-sd3 (CLIP-L, CLIP-G and T5)."""
    module = lora("embedded:tiny-sd3")
    return fit(tmp_path_factory.mktemp("sd3-lora"), module), module


def arrays(folder: Path, manifest: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(folder / record["file"])) for record in manifest["images"]]


def base_images(model: str, prompts: list[str], seeds: list[int], **kwargs) -> list[np.ndarray]:
    """The base model's images (uint8, as the PNGs) for the same prompts and seeds."""
    pipe = load_pipeline(resolve_model_path(model))
    pipe.set_progress_bar_config(disable=True)
    return [np.asarray(image) for image in generate(pipe, prompts, seeds, **FAST, **kwargs)]


@pytest.mark.parametrize("family, model, pipeline, guidance", [
    ("flux", "embedded:tiny-flux", "FluxPipeline", 3.5),
    ("sd3", "embedded:tiny-sd3", "StableDiffusion3Pipeline", 7.0),
], ids=["flux", "sd3"])
def test_sample_a_flow_lora_run_like_its_live_module_and_unlike_the_base_model(family, model, pipeline, guidance,
                                                                              request, tmp_path):
    run, module = request.getfixturevalue(f"{family}_lora")[:2]
    pipe, _ = load_run_pipeline(run, device="cpu")
    assert type(pipe).__name__ == pipeline and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    manifest = sample_run(run, ["a photo of {}", PROMPT], images_per_prompt=2, seed=3, output_dir=tmp_path, pipe=pipe,
                          **FAST)
    assert manifest["guidance_scale"] == guidance  # the pipeline's own default
    images = arrays(tmp_path, manifest)
    assert [image.shape for image in images] == [(RESOLUTION, RESOLUTION, 3)] * 4
    assert manifest["prompts"][0]["prompt"] == "a photo of <cat-toy> toy"
    # The exported LoRA (and token) through the stock loader sample what the trained module samples.
    prompts = [entry["prompt"] for entry in manifest["prompts"] for _ in range(2)]
    seeds = [3, 4, 3, 4]
    loaded = generate(pipe, prompts, seeds, output_type="np", **FAST)
    live = generate(pipeline_from_module(module.eval()), prompts, seeds, output_type="np", **FAST)
    np.testing.assert_allclose(np.stack(loaded), np.stack(live), atol=1e-4)
    # Training changed the transformer: the same prompt and seed give another image than the base model.
    before = base_images(model, [PROMPT, PROMPT], [3, 4])
    assert all(np.abs(b.astype(int) - a.astype(int)).max() > 0 for b, a in zip(before, images[2:]))


def samples_like_the_live_module(run: Path, module: L.LightningModule, pipeline: str) -> None:
    """The run loaded by ``load_run_pipeline`` (the method's ``load_into_pipeline``) samples the concept as the
    trained module does, and the learned token matters."""
    pipe, _ = load_run_pipeline(run, device="cpu")
    assert type(pipe).__name__ == pipeline
    prompts = ["a photo of <cat-toy> toy"] * 2
    loaded = generate(pipe, prompts, [0, 1], output_type="np", **FAST)
    live = generate(pipeline_from_module(module.eval()), prompts, [0, 1], output_type="np", **FAST)
    np.testing.assert_allclose(np.stack(loaded), np.stack(live), atol=1e-4)
    without = generate(pipe, ["a photo of toy toy"] * 2, [0, 1], output_type="np", **FAST)
    assert np.abs(np.stack(loaded) - np.stack(without)).max() > 1e-3


@pytest.mark.parametrize("model, pipeline", [("embedded:tiny-flux", "FluxPipeline"),
                                             ("embedded:tiny-sd3", "StableDiffusion3Pipeline")],
                         ids=["flux", "sd3"])
def test_textual_inversion_flow_run_samples_like_its_live_module(model, pipeline, tmp_path):
    module = TextualInversion(pretrained_model_name_or_path=model, placeholder_token="<cat-toy>",
                              initializer_token="toy", learning_rate=5e-2)
    samples_like_the_live_module(fit(tmp_path / "run", module), module, pipeline)


def test_sd3_run_without_t5_samples_like_its_live_module(tmp_path):
    """A base model saved without T5 (``text_encoder_3: [null, null]`` in its model index) loads with it ``None``."""
    base = save_tiny_sd3(tmp_path / "sd3-no-t5", seed=0, with_t5=False)
    module = lora(str(base))
    run = fit(tmp_path / "run", module)
    assert load_run_pipeline(run, device="cpu")[0].text_encoder_3 is None
    samples_like_the_live_module(run, module, "StableDiffusion3Pipeline")


def test_full_dreambooth_flux_run_samples_from_its_exported_pipeline(tmp_path):
    module = DreamBooth(pretrained_model_name_or_path="embedded:tiny-flux", placeholder_token="sks",
                        learning_rate=1e-3, gradient_checkpointing=False)
    run = fit(tmp_path / "run", module)
    assert (run / "pipeline" / "model_index.json").is_file()
    manifest = sample_run(run, [PROMPT], images_per_prompt=2, output_dir=tmp_path / "s", device="cpu", **FAST)
    images = arrays(tmp_path / "s", manifest)
    live = generate(pipeline_from_module(module.eval()), [PROMPT] * 2, [0, 1], **FAST)
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(live, images))
    before = base_images("embedded:tiny-flux", [PROMPT] * 2, [0, 1], guidance_scale=3.5)
    assert any(not np.array_equal(b, a) for b, a in zip(before, images))


def test_evaluate_and_before_after_on_a_flux_run(flux_lora, tmp_path, capsys):
    run = flux_lora[0]
    result = main(["evaluate", str(run), "--metrics", '["identity"]', "--prompts", "a photo of {}",
                   "--images_per_prompt", "2",
                   "--num_inference_steps", "2", "--height", "16", "--width", "16", "--device", "cpu",
                   "--output", str(tmp_path / "metrics.json")])
    assert math.isfinite(result["identity"]) and result["guidance_scale"] == 3.5
    assert json.loads((tmp_path / "metrics.json").read_text())["identity"] == result["identity"]
    sizes = {Image.open(Path(result["samples_dir"]) / r["file"]).size for r in result["per_image"]}
    assert sizes == {(RESOLUTION, RESOLUTION)} and len(result["per_image"]) == 2 * result["num_prompts"]

    out = tmp_path / "before_after.png"
    compared = main(["before_after", str(run), "--prompts", "a photo of a {}", "--images_per_prompt", "2",
                     "--num_inference_steps", "2", "--height", "16", "--width", "16", "--output", str(out)])
    assert compared["prompts"] == {"before": ["a photo of a toy"], "after": ["a photo of a <cat-toy> toy"]}
    assert out.is_file() and math.isfinite(compared["identity_before"]) and math.isfinite(compared["identity_after"])
    assert compared["identity_after"] != compared["identity_before"]
    assert "identity similarity to the concept images: before" in capsys.readouterr().out


def test_a_ddpm_sampler_on_a_flow_run_is_refused_in_one_line(flux_lora, tmp_path, capsys):
    run, module, _ = flux_lora
    for command in ("sample", "evaluate"):
        with pytest.raises(SystemExit) as stopped:
            main([command, str(run), "--scheduler", "ddim", "--device", "cpu", "--output_dir" if command == "sample"
                  else "--output", str(tmp_path / command)])
        assert stopped.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --scheduler: 'ddim' is a DDPM-family sampler, but {run} is a flow-matching model "
                       f"that samples with its own FlowMatchEulerDiscreteScheduler; leave --scheduler at 'default'"]
    assert not (tmp_path / "sample").exists() and not (tmp_path / "evaluate").exists()
    with pytest.raises(UserInputError, match="^--sample.scheduler: 'euler' is a DDPM-family sampler"):
        LiveSamples(every_n_steps=1, scheduler="euler").on_fit_start(None, module)
    with pytest.raises(UserInputError, match="^--scheduler: 'dpm\\+\\+' is a DDPM-family sampler"):
        pipeline_from_module(module, "dpm++")


def test_live_samples_draw_grids_on_a_flow_module(flux_lora):
    run, _, live = flux_lora
    assert live.sampled_steps == [2, 4]
    for grid in live.grids:
        assert Image.open(run / grid["file"]).width == 2 * 128  # two images per row
    summary = json.loads((run / "summary.json").read_text())
    assert summary["live_samples"]["grids"] == live.grids


def test_sd3_folder_without_t5_loads_without_it(tmp_path):
    """A downloaded SD3 folder without T5's subfolders (model_index.json still lists them) samples without T5."""
    folder = tmp_path / "sd3-no-t5"
    shutil.copytree(resolve_model_path("embedded:tiny-sd3"), folder)
    shutil.rmtree(folder / "text_encoder_3")
    shutil.rmtree(folder / "tokenizer_3")
    pipe = load_pipeline(str(folder))
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    pipe.set_progress_bar_config(disable=True)
    image = generate(pipe, [PROMPT], [0], **FAST)[0]
    assert image.size == (RESOLUTION, RESOLUTION)


def test_auto_dtype_is_bfloat16_for_flow_models_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert auto_dtype(cuda, "FlowMatchEulerDiscreteScheduler") == "bfloat16"
    assert auto_dtype(cuda, "PNDMScheduler") == "float16" and auto_dtype(cuda, None) == "float16"
    assert auto_dtype(cpu, "FlowMatchEulerDiscreteScheduler") == "float32"
