"""Prior preservation: the loss combination on a known batch, class samples in the data, the class-image cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from lightning_custom.data import ConceptDataModule, EvalBatchSpec
from lightning_custom.data import class_images as class_images_module
from lightning_custom.objectives.diffusion import prior_preservation_loss, sample_timesteps
from lightning_custom.errors import UserInputError
from lightning_custom.methods import DreamBooth
from lightning_custom.synthetic.toy_models import make_example_concept_images
from tests.conftest import data_kwargs

SPEC = EvalBatchSpec(num_train_timesteps=1000, latent_channels=4, latent_downsample=2)


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory) -> str:
    """Three class images, different from the concept's."""
    out = tmp_path_factory.mktemp("class")
    make_example_concept_images(out, n=3, size=24, seed=11)
    return str(out)


def prior_kwargs(concept_dir, class_dir=None, **overrides):
    kwargs = data_kwargs(concept_dir, placeholder_token="sks", class_noun="toy", with_prior_preservation=True,
                         class_data_dir=class_dir)
    kwargs.update(overrides)
    return kwargs


def test_prior_preservation_loss_is_the_weighted_sum():
    assert prior_preservation_loss(torch.tensor(2.0), torch.tensor(3.0), 0.5).item() == 3.5
    assert prior_preservation_loss(torch.tensor(2.0), torch.tensor(3.0), 0.0).item() == 2.0


def test_training_items_pair_instance_and_class_samples(concept_dir, class_dir):
    dm = ConceptDataModule(**prior_kwargs(concept_dir, class_dir))
    dataset = dm.train_dataset()
    assert len(dataset) == 4 * 10
    item = dataset[5]
    assert "sks toy" in item["caption"]
    assert item["class_caption"] == "a photo of a toy"  # the default class prompt
    assert item["class_pixel_values"].shape == item["pixel_values"].shape == (3, 16, 16)
    # class image 5 % 3, with an augmentation fixed by (seed, index): a pure function of the index
    expected = dm.class_images[0].sample(5 % 3, np.random.default_rng([59, 5, 1]))["pixel_values"]
    assert torch.equal(item["class_pixel_values"], expected)
    assert not torch.equal(item["class_pixel_values"], item["pixel_values"])
    # the DVAR batch stays instance-only
    eval_batch = dm.build_eval_dataset(SPEC)[0]
    assert not [k for k in eval_batch if k.startswith("class_")]
    assert eval_batch["caption"][0] == "a photo of a sks toy"
    custom = ConceptDataModule(**prior_kwargs(concept_dir, class_dir, class_prompt="a toy on a table"))
    assert custom.train_dataset()[0]["class_caption"] == "a toy on a table"


def test_loss_is_instance_plus_weight_times_class_on_a_known_batch(tiny_sd, concept_dir, class_dir):
    module = DreamBooth(pretrained_model_name_or_path=tiny_sd, placeholder_token="sks", prior_loss_weight=0.7)
    dm = ConceptDataModule(**prior_kwargs(concept_dir, class_dir))
    batch = default_collate([dm.train_dataset()[i] for i in (0, 7)])
    state = module.generator.get_state()
    loss = module.training_loss(batch)

    # Independent recomputation: the same draws (VAE eps, noise, timesteps for the 4 samples, in that order), then
    # two separate forwards, instance-only and class-only.
    generator = torch.Generator().set_state(state)
    pixels = torch.cat([batch["pixel_values"], batch["class_pixel_values"]])
    with torch.no_grad():
        dist = module.vae.encode(pixels).latent_dist
    eps = torch.randn(dist.mean.shape, generator=generator)
    latents = (dist.mean + dist.std * eps) * module.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = sample_timesteps(4, 1000, generator=generator)
    with torch.no_grad():
        instance = module.denoising_loss(latents[:2], noise[:2], timesteps[:2],
                                         {"encoder_hidden_states": module.encode_prompt(batch["caption"])})
        klass = module.denoising_loss(latents[2:], noise[2:], timesteps[2:],
                                      {"encoder_hidden_states": module.encode_prompt(batch["class_caption"])})
    assert torch.allclose(loss, instance + 0.7 * klass, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, instance + klass)  # the weight matters
    # the per-sample form lists the instance samples first
    module.generator.set_state(state)
    per_sample = module.training_loss(batch, reduction="none")
    assert per_sample.shape == (4,)
    assert torch.allclose(per_sample[:2].mean(), instance, rtol=1e-5) and torch.allclose(per_sample[2:].mean(), klass,
                                                                                        rtol=1e-5)


def test_generated_class_images_are_cached_with_a_manifest_and_reused(tiny_sd, concept_dir, tmp_path, monkeypatch):
    module = DreamBooth(pretrained_model_name_or_path=tiny_sd, placeholder_token="sks")
    kwargs = prior_kwargs(concept_dir, num_class_images=3, class_cache_dir=str(tmp_path), class_inference_steps=2)
    calls = []
    real_pipeline = class_images_module.generation_pipeline

    def counting_pipeline(*args, **kw):
        pipe = real_pipeline(*args, **kw)

        def call(**call_kwargs):
            calls.append(len(call_kwargs["prompt"]))
            return pipe(**call_kwargs)

        return call

    monkeypatch.setattr("lightning_custom.data.prior.generation_pipeline", counting_pipeline)
    unet_before = {k: v.clone() for k, v in module.unet.state_dict().items()}
    first = ConceptDataModule(**kwargs)
    first.load_class_images(module)
    assert calls == [3]
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.startswith("a-photo-of-a-toy-")
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    assert manifest["prompt"] == "a photo of a toy" and manifest["model"] == tiny_sd and manifest["seed"] == 59
    assert manifest["count"] == 3 and manifest["files"] == ["00000.png", "00001.png", "00002.png"]
    assert [Path(f).name for f in first.class_images[0].files] == manifest["files"]
    assert first.train_dataset()[0]["class_pixel_values"].shape == (3, 16, 16)
    assert not list(tmp_path.rglob("*.tmp"))
    assert all(torch.equal(v, unet_before[k]) for k, v in module.unet.state_dict().items())  # sampling changed nothing

    # a second run reuses them; asking for more generates only the missing ones, with the same first images
    second = ConceptDataModule(**kwargs)
    second.load_class_images(module)
    assert calls == [3]
    third = ConceptDataModule(**{**kwargs, "num_class_images": 4})
    third.load_class_images(module)
    assert calls == [3, 1]
    assert json.loads((folders[0] / "manifest.json").read_text())["count"] == 4
    for a, b in zip(second.class_images[0].images, third.class_images[0].images):
        assert a.tobytes() == b.tobytes()
    # other settings (another prompt) get their own folder
    ConceptDataModule(**{**kwargs, "class_prompt": "a toy"}).load_class_images(module)
    assert calls == [3, 1, 3] and len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def assert_one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_bad_class_folders_and_prompts(concept_dir, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError) as excinfo:
        ConceptDataModule(**prior_kwargs(concept_dir, str(tmp_path / "empty")))
    assert_one_line_error(excinfo, "--data.class_data_dir", "holds no images", "empty")
    with pytest.raises(UserInputError) as excinfo:
        ConceptDataModule(**prior_kwargs(concept_dir, str(tmp_path / "missing")))
    assert_one_line_error(excinfo, "--data.class_data_dir", "does not exist")
    broken = tmp_path / "broken"
    make_example_concept_images(broken, n=2, size=24, seed=1)
    (broken / "02.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(UserInputError) as excinfo:
        ConceptDataModule(**prior_kwargs(concept_dir, str(broken)))
    assert_one_line_error(excinfo, "02.png", "cannot be read as an image")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_iterdir = Path.iterdir

    def denied(self):
        if self == locked:
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(UserInputError) as excinfo:
        ConceptDataModule(**prior_kwargs(concept_dir, str(locked)))
    assert_one_line_error(excinfo, "--data.class_data_dir", "cannot read folder", "Permission denied")
    monkeypatch.undo()
    with pytest.raises(UserInputError) as excinfo:
        ConceptDataModule(**prior_kwargs(concept_dir, class_noun=None))
    assert_one_line_error(excinfo, "--data.class_prompt", "needs a class prompt or a class_noun")
    with pytest.raises(UserInputError, match="--data.num_class_images"):
        ConceptDataModule(**prior_kwargs(concept_dir, num_class_images=0))


def test_empty_class_folder_through_the_cli_is_one_line(tmp_path, tiny_sd, concept_dir, capsys):
    from lightning_custom.cli import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart_dreambooth.yaml"),
              "--trainer.default_root_dir", str(tmp_path), "--model.init_args.pretrained_model_name_or_path", tiny_sd,
              "--data.init_args.instance_data_dir", concept_dir, "--data.init_args.class_data_dir",
              str(tmp_path / "empty")])
    assert excinfo.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --data.class_data_dir: folder {tmp_path / 'empty'} holds no images "
                      "(expected png/jpg/jpeg/webp files)"]
