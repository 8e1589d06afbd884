"""Sampling a finished run: deterministic per seed, follows the learned embedding, same as the live module."""

from __future__ import annotations

import json
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.cli import main
from lightning_custom.data import ConceptDataModule
from lightning_custom.errors import UserInputError
from lightning_custom.methods import TextualInversion
from lightning_custom.inference.pipelines import load_run_pipeline, method_class, pipeline_from_module
from lightning_custom.inference.sampling import generate, sample_run
from lightning_custom.runs.summary import read_summary
from tests.conftest import data_kwargs, one_thread, ti_kwargs, trainer_kwargs

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = dict(num_inference_steps=2, guidance_scale=3.0)


@pytest.fixture(scope="module")
def trained(tiny_sd, concept_dir, tmp_path_factory):
    """A 3-step Textual Inversion run (its folder) and the trained module."""
    root = tmp_path_factory.mktemp("run")
    with one_thread():
        module = TextualInversion(**ti_kwargs(tiny_sd, learning_rate=0.5))
        trainer = L.Trainer(max_steps=3, callbacks=[DVAREarlyStopping(window=50, stop=False), RunSummary()],
                            **trainer_kwargs(root))
        trainer.fit(module, datamodule=ConceptDataModule(**data_kwargs(concept_dir)))
    return root, module


def arrays(folder, names):
    return [np.asarray(Image.open(folder / n)) for n in names]


def test_sampling_is_deterministic_and_writes_pngs_and_a_grid(trained, tmp_path):
    run, _ = trained
    prompts = ["a photo of {}", "{} on the beach"]
    first = sample_run(run, prompts, images_per_prompt=2, seed=5, output_dir=tmp_path / "a", **FAST)
    second = sample_run(run, prompts, images_per_prompt=2, seed=5, output_dir=tmp_path / "b", **FAST, batch_size=3)
    names = [r["file"] for r in first["images"]]
    assert names == ["p00-s5.png", "p00-s6.png", "p01-s5.png", "p01-s6.png"]
    assert [r["file"] for r in second["images"]] == names
    for a, b in zip(arrays(tmp_path / "a", names), arrays(tmp_path / "b", names)):
        assert a.shape == (16, 16, 3) and np.array_equal(a, b)  # same seed, other batching: the same image
    a = arrays(tmp_path / "a", names)
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], a[2])  # seeds and prompts matter
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.width == 2 * 128 and grid.height > 2 * 128
    manifest = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert manifest["prompts"][1] == {"template": "{} on the beach", "prompt": "<cat-toy> on the beach",
                                      "text": "on the beach", "concept": "concept"}
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_images_follow_the_learned_embedding(trained, tmp_path):
    run, _ = trained
    changed = tmp_path / "changed"
    shutil.copytree(run, changed, ignore=shutil.ignore_patterns("samples"))
    embeds = load_file(changed / "learned_embeds.safetensors")
    # a random direction (a constant offset would vanish in the text encoder's first LayerNorm)
    noise = torch.randn(embeds["<cat-toy>"].shape, generator=torch.Generator().manual_seed(0))
    save_file({k: v + noise for k, v in embeds.items()}, str(changed / "learned_embeds.safetensors"))
    names = [r["file"] for r in sample_run(run, ["a photo of {}"], images_per_prompt=2, output_dir=tmp_path / "a",
                                           **FAST)["images"]]
    sample_run(changed, ["a photo of {}"], images_per_prompt=2, output_dir=tmp_path / "b", **FAST)
    for a, b in zip(arrays(tmp_path / "a", names), arrays(tmp_path / "b", names)):
        assert not np.array_equal(a, b)
    # a prompt without the placeholder does not see the embedding at all
    sample_run(run, ["a photo of a toy"], images_per_prompt=1, output_dir=tmp_path / "c", **FAST)
    sample_run(changed, ["a photo of a toy"], images_per_prompt=1, output_dir=tmp_path / "d", **FAST)
    assert np.array_equal(*arrays(tmp_path / "c", ["p00-s0.png"]), *arrays(tmp_path / "d", ["p00-s0.png"]))


def test_exported_run_samples_like_the_live_module(trained):
    run, module = trained
    assert method_class(read_summary(run)) is TextualInversion  # dispatch through the method's own hook
    prompts, seeds = ["a photo of <cat-toy>", "<cat-toy> in the snow"], [0, 1]
    exported, _ = load_run_pipeline(run, device="cpu")
    from_run = generate(exported, prompts, seeds, output_type="np", **FAST)
    rng_before = torch.get_rng_state()
    live = generate(pipeline_from_module(module.eval()), prompts, seeds, output_type="np", **FAST)
    assert torch.equal(torch.get_rng_state(), rng_before)
    np.testing.assert_allclose(np.stack(live), np.stack(from_run), atol=1e-5)
    # ... and the comparison is not vacuous: the live module's images move with its trained vector
    vectors = module.token_vectors.vectors
    saved = vectors.detach().clone()
    with torch.no_grad():
        vectors.add_(torch.randn(saved.shape, generator=torch.Generator().manual_seed(1)))
        moved = generate(pipeline_from_module(module), prompts, seeds, output_type="np", **FAST)
        vectors.copy_(saved)
    assert np.abs(np.stack(moved) - np.stack(live)).max() > 1e-3


def test_cli_sample_and_bad_run_folders(trained, tmp_path, capsys):
    run, _ = trained
    main(["sample", str(run), "--images_per_prompt", "1", "--num_inference_steps", "1", "--prompts",
          '["a photo of {}"]', "--output_dir", str(tmp_path / "cli")])
    assert (tmp_path / "cli" / "grid.png").exists() and (tmp_path / "cli" / "p00-s0.png").exists()
    assert "wrote 1 images" in capsys.readouterr().out
    for args, needle in [
        ([str(tmp_path / "missing")], "run_dir: no such run folder"),
        ([str(tmp_path / "cli")], "has no summary.json"),
    ]:
        with pytest.raises(SystemExit) as excinfo:
            main(["sample", *args])
        assert excinfo.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0]
    with pytest.raises(UserInputError, match="--scheduler: 'fast'"):
        sample_run(run, scheduler="fast")


def test_evaluate_applies_the_protocol_and_writes_metrics_json(trained, tmp_path, capsys):
    from lightning_custom.data.images import list_image_files, load_rgb_image
    from lightning_custom.inference.metrics import clip_i, clip_t, dino, load_clip, load_dino
    from lightning_custom.synthetic.toy_models import save_tiny_clip, save_tiny_dino

    run, _ = trained
    clip, dino_model = save_tiny_clip(tmp_path / "clip"), save_tiny_dino(tmp_path / "dino")
    args = ["evaluate", str(run), "--clip_model", str(clip), "--dino_model", str(dino_model), "--images_per_prompt",
            "2", "--num_inference_steps", "1", "--prompts", '["a photo of {}", "{} in the snow"]', "--seed", "3"]
    main(args)
    metrics = json.loads((run / "metrics.json").read_text())
    assert "clip_i" in capsys.readouterr().out
    assert (metrics["num_prompts"], metrics["images_per_prompt"], metrics["concept_images"]) == (2, 2, 4)
    assert [(r["prompt_index"], r["seed"]) for r in metrics["per_image"]] == [(0, 3), (0, 4), (1, 3), (1, 4)]
    assert [p["text"] for p in metrics["per_prompt"]] == ["a photo of", "in the snow"]
    assert metrics["stop_step"] == 3 and metrics["method"] == "TextualInversion"
    # the scores are those of the written images against the run's concept images
    samples = run / "eval" / "samples"
    generated = [load_rgb_image(samples / r["file"]) for r in metrics["per_image"]]
    concept = [load_rgb_image(f) for f in list_image_files(read_summary(run)["instance_data_dir"])]
    scorer = load_clip(str(clip))
    assert metrics["clip_i"] == pytest.approx(clip_i(scorer, generated, concept).mean, abs=1e-9)
    texts = ["a photo of", "a photo of", "in the snow", "in the snow"]
    assert metrics["clip_t"] == pytest.approx(clip_t(scorer, generated, texts).mean, abs=1e-9)
    assert metrics["dino"] == pytest.approx(dino(load_dino(str(dino_model)), generated, concept).mean, abs=1e-9)
    first = metrics["clip_i"]
    main(args)  # fixed seeds: the same numbers again
    assert json.loads((run / "metrics.json").read_text())["clip_i"] == first
    with pytest.raises(SystemExit):
        main(["evaluate", str(run), "--metrics", '["fid"]'])
    assert "--metrics: ['fid'] not among" in capsys.readouterr().err


METHODS = {
    "DreamBoothLoRA": dict(rank=4, lora_alpha=8, train_token_embedding=True, learning_rate=0.05),
    "CustomDiffusion": dict(learning_rate=0.05),
    "DreamBooth": dict(train_token_embedding=True, learning_rate=1e-3),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_samples_its_exported_run_like_its_live_module(name, tiny_sd, concept_dir, tmp_path):
    import lightning_custom.methods as methods

    module = getattr(methods, name)(pretrained_model_name_or_path=tiny_sd, placeholder_token="<sks>",
                                    initializer_token="toy", **METHODS[name])
    datamodule = ConceptDataModule(**data_kwargs(concept_dir, placeholder_token="<sks>", class_noun="toy"))
    trainer = L.Trainer(max_steps=2, callbacks=[DVAREarlyStopping(window=50, stop=False), RunSummary(report=False)],
                        **trainer_kwargs(tmp_path))
    trainer.fit(module, datamodule=datamodule)
    prompts, seeds = ["a photo of <sks> toy"], [0]
    exported, summary = load_run_pipeline(tmp_path, device="cpu")
    assert summary["method"] == name
    from_run = generate(exported, prompts, seeds, output_type="np", **FAST)
    live = generate(pipeline_from_module(module.eval()), prompts, seeds, output_type="np", **FAST)
    np.testing.assert_allclose(np.stack(live), np.stack(from_run), atol=1e-4)
    # not vacuous: without the new token, the run's weights still change the images against the base model
    from diffusers import DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    plain = ["a photo of a toy"]
    trained_images = generate(exported, plain, seeds, output_type="np", **FAST)
    assert np.abs(generate(base, plain, seeds, output_type="np", **FAST)[0] - trained_images[0]).max() > 1e-4
