"""Speed options change cost, not results: latent and evaluation caches, channels-last, optimizers."""

from __future__ import annotations

import pytest
import torch

from lightning_custom.data import ConceptDataModule
from lightning_custom.errors import UserInputError
from lightning_custom.methods import DreamBooth, TextualInversion
from tests.conftest import data_kwargs, ti_kwargs


def collate(dataset, indices):
    return torch.utils.data.default_collate([dataset[i] for i in indices])


def test_cached_training_latents_match_the_vae(tiny_sd, concept_dir):
    cached = TextualInversion(**ti_kwargs(tiny_sd, cache_latents=True))
    plain = TextualInversion(**ti_kwargs(tiny_sd, cache_latents=False))
    dataset = ConceptDataModule(**data_kwargs(concept_dir)).train_dataset()
    for indices in ([0, 1], [4, 5], [0, 9]):  # [4, 5] repeats images 0 and 1: served from the cache
        batch = collate(dataset, indices)
        a, b = cached.training_loss(batch), plain.training_loss(batch)  # same seed: same noise and timesteps
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    keys = {dataset[i]["latent_key"] for i in (0, 1, 4, 5, 0, 9)}
    assert set(cached._latent_cache) == keys and plain._latent_cache == {}


def test_latent_keys_name_the_augmentation(concept_dir):
    dataset = ConceptDataModule(**data_kwargs(concept_dir)).train_dataset()
    by_key = {}
    for i in range(len(dataset)):
        item = dataset[i]
        if item["latent_key"] in by_key:  # same key, same pixels
            assert torch.equal(by_key[item["latent_key"]], item["pixel_values"])
        by_key[item["latent_key"]] = item["pixel_values"]
    assert len(by_key) == 8  # 4 images x (flipped or not), center crop


def test_eval_batch_cache_gives_the_same_loss(tiny_sd, concept_dir):
    dm = ConceptDataModule(**data_kwargs(concept_dir, class_noun="toy", placeholder_token="sks"))
    for cls, kwargs in ((TextualInversion, ti_kwargs(tiny_sd)), (DreamBooth, dict(pretrained_model_name_or_path=tiny_sd))):
        cached, plain = cls(**kwargs, cache_eval_batch=True), cls(**kwargs, cache_eval_batch=False)
        batch = dm.build_eval_dataset(cached.eval_batch_spec())[0]
        values = [cached.deterministic_loss(batch) for _ in range(2)]
        assert torch.allclose(values[0], plain.deterministic_loss(batch), rtol=1e-5)
        assert torch.equal(values[0], values[1])
        kinds = {kind for kind, _ in cached._eval_cache}
        # TI trains inside the text path (its token vectors); full DreamBooth here trains only the UNet
        assert kinds == ({"latents"} if cls is TextualInversion else {"latents", "text"})
        assert cached.text_path_trains == (cls is TextualInversion)


def test_eval_cache_follows_training_of_the_text_path(tiny_sd, concept_dir):
    module = TextualInversion(**ti_kwargs(tiny_sd, learning_rate=0.5))
    batch = ConceptDataModule(**data_kwargs(concept_dir)).build_eval_dataset(module.eval_batch_spec())[0]
    before = module.deterministic_loss(batch)
    with torch.no_grad():
        # as an optimizer step would (a random direction: a constant shift is erased by CLIP's LayerNorms)
        module.token_vectors.vectors.add_(torch.randn(module.token_vectors.vectors.shape, generator=torch.Generator().manual_seed(0)))
    assert module.deterministic_loss(batch) != before  # the text states were not cached


def test_resampled_latents_are_not_cached(tiny_sd, concept_dir):
    module = TextualInversion(**ti_kwargs(tiny_sd))
    dataset = ConceptDataModule(**data_kwargs(concept_dir, resample=["latents"])).build_eval_dataset(
        module.eval_batch_spec())
    losses = {module.deterministic_loss(dataset[0]).item() for _ in range(3)}
    assert len(losses) == 3 and module._eval_cache == {}


def test_channels_last_and_optimizer_choices(tiny_sd):
    module = TextualInversion(**ti_kwargs(tiny_sd, channels_last=True))
    conv = module.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["params"] == [module.token_vectors.vectors]


def test_adamw_8bit_uses_bitsandbytes_or_says_how_to_get_it(tiny_sd, monkeypatch):
    module = TextualInversion(**ti_kwargs(tiny_sd, optimizer="adamw_8bit"))
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    with pytest.raises(UserInputError, match="pip install bitsandbytes"):
        module.configure_optimizers()
