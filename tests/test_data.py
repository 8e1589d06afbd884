"""ConceptDataModule: the fixed DVAR batch, RNG isolation, resampling, resumable loading and bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_custom.data import ConceptDataModule, EvalBatchSpec
from lightning_custom.data.loader import ResumableDataLoader
from lightning_custom.errors import UserInputError
from lightning_custom.methods import TextualInversion
from lightning_custom.synthetic.toy_models import make_example_concept_images
from tests.conftest import data_kwargs, ti_kwargs

SPEC = EvalBatchSpec(num_train_timesteps=1000, latent_channels=4, latent_downsample=2)


def assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_fixed_eval_batch_is_fixed_and_never_touches_global_rng(concept_dir):
    rng_before = torch.get_rng_state()
    np_before = np.random.get_state()[1].copy()
    dm = ConceptDataModule(**data_kwargs(concept_dir))
    dataset = dm.build_eval_dataset(SPEC)
    first, second = dataset[0], dataset[0]
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert np.array_equal(np.random.get_state()[1], np_before)
    assert_same_batch(first, second)
    # a second data module with the same seed draws the very same batch
    assert_same_batch(first, ConceptDataModule(**data_kwargs(concept_dir)).build_eval_dataset(SPEC)[0])
    # ... and another eval seed a different one
    other = ConceptDataModule(**data_kwargs(concept_dir, eval_seed=1)).build_eval_dataset(SPEC)[0]
    assert not torch.equal(first["noise"], other["noise"])


def test_fixed_eval_batch_content(concept_dir):
    dm = ConceptDataModule(**data_kwargs(concept_dir, eval_batch_size=6))
    batch = dm.build_eval_dataset(SPEC)[0]
    assert batch["pixel_values"].shape == (6, 3, 16, 16)
    assert batch["noise"].shape == batch["latent_noise"].shape == (6, 4, 8, 8)
    assert batch["timesteps"].unique().numel() == 6  # distinct timesteps
    assert batch["caption"] == [t.format("<cat-toy>") for t in dm.templates[:6]]
    # the first images, cycling: slot 4 is image 0 again, unflipped or mirrored
    image0 = dm.images.sample(0, np.random.default_rng(0))["pixel_values"]
    assert torch.equal(batch["pixel_values"][4], image0) or torch.equal(batch["pixel_values"][4], image0.flip(-1))


def test_fixed_timesteps_are_distinct_even_when_they_fill_the_schedule(concept_dir):
    # 16 draws from 16 timesteps: drawn with replacement they would repeat one with probability 1 - 16!/16**16
    spec = EvalBatchSpec(num_train_timesteps=16, latent_channels=4, latent_downsample=2)
    full = ConceptDataModule(**data_kwargs(concept_dir, eval_batch_size=16)).build_eval_dataset(spec)[0]
    assert sorted(full["timesteps"].tolist()) == list(range(16))
    # a batch larger than the schedule covers it evenly: every timestep twice
    double = ConceptDataModule(**data_kwargs(concept_dir, eval_batch_size=32)).build_eval_dataset(spec)[0]
    assert torch.bincount(double["timesteps"], minlength=16).tolist() == [2] * 16


@pytest.mark.parametrize("part,keys", [
    ("images", ["pixel_values"]), ("latents", ["latent_noise"]), ("noise", ["noise"]),
    ("captions", ["caption"]), ("timesteps", ["timesteps"]),
])
def test_resampled_part_changes_and_others_stay(concept_dir, part, keys):
    fixed = ConceptDataModule(**data_kwargs(concept_dir)).build_eval_dataset(SPEC)[0]
    dataset = ConceptDataModule(**data_kwargs(concept_dir, resample=[part])).build_eval_dataset(SPEC)
    draws = [dataset[0] for _ in range(4)]
    # a resampled part must switch off the module's cache of what depends on it
    invalidated = {"images": "latents_cache_key", "latents": "latents_cache_key", "captions": "text_cache_key"}
    for cache_key in ("latents_cache_key", "text_cache_key"):
        assert (cache_key in draws[0]) == (invalidated.get(part) != cache_key)
    for key in fixed:
        if key.endswith("_cache_key"):
            continue
        if key in keys:
            distinct = {str(d[key].tolist() if torch.is_tensor(d[key]) else d[key]) for d in draws}
            assert len(distinct) > 1, f"{part} was not resampled"
        elif key not in ("original_size", "crop_top_left"):
            for d in draws:
                assert (torch.equal(d[key], fixed[key]) if torch.is_tensor(d[key]) else d[key] == fixed[key]), key


def eval_cache_keys(folder, **overrides) -> tuple[str, str]:
    batch = ConceptDataModule(**data_kwargs(folder, **overrides)).build_eval_dataset(SPEC)[0]
    return batch["latents_cache_key"], batch["text_cache_key"]


def test_eval_cache_keys_name_what_the_cached_values_depend_on(concept_dir, tmp_path):
    latents_key, text_key = eval_cache_keys(concept_dir)
    assert eval_cache_keys(concept_dir) == (latents_key, text_key)  # the same batch: the cache is reused
    make_example_concept_images(tmp_path, n=4, size=32, seed=4)
    # what the latents are computed from (images, their augmentation, the latent draw) changes the latents' key
    for folder, overrides in ((str(tmp_path), {}), (concept_dir, dict(eval_seed=1)),
                              (concept_dir, dict(resolution=32)), (concept_dir, dict(random_flip=False))):
        assert eval_cache_keys(folder, **overrides)[0] != latents_key, overrides
    # the captions alone determine the text states
    assert eval_cache_keys(str(tmp_path))[1] == text_key
    assert eval_cache_keys(concept_dir, placeholder_token="<other>")[1] != text_key


def test_module_evaluated_on_a_new_concept_does_not_reuse_the_first_ones_latents(tiny_sd, concept_dir, tmp_path):
    make_example_concept_images(tmp_path, n=4, size=32, seed=4)
    module = TextualInversion(**ti_kwargs(tiny_sd))
    first, second = (ConceptDataModule(**data_kwargs(folder)).build_eval_dataset(module.eval_batch_spec())[0]
                     for folder in (concept_dir, str(tmp_path)))
    module.deterministic_loss(first)  # fills the evaluation cache
    fresh = TextualInversion(**ti_kwargs(tiny_sd))
    assert torch.equal(module.deterministic_loss(second), fresh.deterministic_loss(second))


def test_training_latent_keys_follow_image_content(tmp_path):
    folder = tmp_path / "concept"
    make_example_concept_images(folder, n=4, size=32, seed=3)
    keys = {ConceptDataModule(**data_kwargs(str(folder))).train_dataset()[i]["latent_key"] for i in range(8)}
    make_example_concept_images(folder, n=4, size=32, seed=4)  # the same file names, other pictures
    edited = {ConceptDataModule(**data_kwargs(str(folder))).train_dataset()[i]["latent_key"] for i in range(8)}
    assert not keys & edited


def test_training_items_are_a_function_of_seed_and_index(concept_dir):
    dm = ConceptDataModule(**data_kwargs(concept_dir))
    a, b = dm.train_dataset(), ConceptDataModule(**data_kwargs(concept_dir)).train_dataset()
    assert len(a) == 4 * 10
    for i in (0, 5, 39):
        assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) and a[i]["caption"] == b[i]["caption"]
        assert "<cat-toy>" in a[i]["caption"]
    captions = {a[i]["caption"] for i in range(len(a))}
    assert len(captions) > 5
    flips = {bool(torch.equal(a[i]["pixel_values"], a[i % 4]["pixel_values"])) for i in range(4, 40)}
    assert flips == {True, False}  # random flip happens, and not always


def test_style_templates_and_class_noun(concept_dir):
    style = ConceptDataModule(**data_kwargs(concept_dir, learnable_property="style"))
    assert all("style" in t for t in style.templates)
    db = ConceptDataModule(**data_kwargs(concept_dir, placeholder_token="sks", class_noun="toy"))
    assert db.train_dataset()[0]["caption"].endswith("sks toy") or "sks toy" in db.train_dataset()[0]["caption"]


def test_resumable_loader_skips_consumed_batches(concept_dir):
    dm = ConceptDataModule(**data_kwargs(concept_dir))
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    full = [b["caption"] for b in loader]
    loader.progress.consumed = 3
    state = loader.state_dict()
    fresh = ConceptDataModule(**data_kwargs(concept_dir)).train_dataloader()
    fresh.load_state_dict(state)
    assert [b["caption"] for b in fresh] == full[3:]
    assert [b["caption"] for b in fresh] == full  # the skip applies once


# ------------------------------------------------------------------------------------------------ bad inputs
def write(path: Path, mode: str, size=(32, 32)) -> Path:
    Image.new(mode, size).save(path)
    return path


def assert_one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(UserInputError) as excinfo:
        ConceptDataModule(**data_kwargs(str(tmp_path / "nope")))
    assert_one_line_error(excinfo, "--data.instance_data_dir", "does not exist", "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError) as excinfo:
        ConceptDataModule(**data_kwargs(str(tmp_path / "empty")))
    assert_one_line_error(excinfo, "holds no images", "empty")


@pytest.mark.parametrize("name,make,needle", [
    ("broken.png", lambda p: p.write_bytes(b"\x89PNG not really"), "cannot be read as an image"),
    # Grayscale, alpha and 16-bit images are converted now (tests/test_image_input.py asserts their pixels).
])
def test_bad_image_files(tmp_path, name, make, needle):
    write(tmp_path / "good.png", "RGB")
    make(tmp_path / name)
    with pytest.raises(UserInputError) as excinfo:
        ConceptDataModule(**data_kwargs(str(tmp_path)))
    assert_one_line_error(excinfo, name, needle)


def test_bad_arguments(concept_dir):
    with pytest.raises(UserInputError, match="--data.resample"):
        ConceptDataModule(**data_kwargs(concept_dir, resample=["colours"]))
    with pytest.raises(UserInputError, match="--data.prompt_templates"):
        ConceptDataModule(**data_kwargs(concept_dir, prompt_templates=["no placeholder"]))
    with pytest.raises(UserInputError, match="--data.batch_size"):
        ConceptDataModule(**data_kwargs(concept_dir, batch_size=0))
