"""Speed options change cost, not results: latent and evaluation caches, channels-last, optimizers."""

from __future__ import annotations

import pytest
import torch

from lightning_custom.data import ConceptDataModule
from lightning_custom.errors import UserInputError
from lightning_custom.methods import CustomDiffusion, DreamBooth, TextualInversion
from lightning_custom.runtime.optimizers import fused_adamw_applies
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


def test_fused_adamw_only_where_nothing_clips_before_it(tiny_sd):
    # Found on an H100: fused AdamW under 16-mixed made Lightning refuse Custom Diffusion's gradient clipping.
    from types import SimpleNamespace

    cuda32 = [SimpleNamespace(is_cuda=True, dtype=torch.float32)] * 2
    assert fused_adamw_applies(cuda32, clips_gradients=False)
    assert not fused_adamw_applies(cuda32, clips_gradients=True)
    on_cpu = SimpleNamespace(is_cuda=False, dtype=torch.float32)
    assert not fused_adamw_applies(cuda32 + [on_cpu], clips_gradients=False)
    assert not fused_adamw_applies([SimpleNamespace(is_cuda=True, dtype=torch.float16)], clips_gradients=False)
    assert not fused_adamw_applies([], clips_gradients=False)
    assert CustomDiffusion(pretrained_model_name_or_path=tiny_sd, placeholder_token="<v>",
                           initializer_token="toy").clips_gradients()  # max_grad_norm 1.0, as in the paper
    assert not CustomDiffusion(pretrained_model_name_or_path=tiny_sd, placeholder_token="<v>", initializer_token="toy",
                               max_grad_norm=None).clips_gradients()
    assert not TextualInversion(**ti_kwargs(tiny_sd)).clips_gradients()


@pytest.mark.gpu
def test_clipped_custom_diffusion_trains_in_fp16_mixed_on_cuda(tiny_sd, concept_dir, tmp_path):
    import lightning as L

    module = CustomDiffusion(pretrained_model_name_or_path=tiny_sd, placeholder_token="<v>", initializer_token="toy")
    before = module.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.detach().clone()
    trainer = L.Trainer(accelerator="cuda", devices=1, precision="16-mixed", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ConceptDataModule(**data_kwargs(concept_dir, placeholder_token="<v>")))
    after = module.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.detach().cpu()
    assert trainer.global_step == 3 and not torch.equal(before.cpu(), after)


def test_adamw_8bit_uses_bitsandbytes_or_says_how_to_get_it(tiny_sd, monkeypatch):
    module = TextualInversion(**ti_kwargs(tiny_sd, optimizer="adamw_8bit"))
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    with pytest.raises(UserInputError, match="pip install bitsandbytes"):
        module.configure_optimizers()


def test_cuda_autocast_emulation_casts_as_cuda_would():
    # benchmarks/throughput.py --profile-ops counts ops under CUDA's cast rules on a CPU (issue 15).
    import sys
    from pathlib import Path

    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from throughput import CudaAutocastEmulation, OpCounter, cuda_autocast_rules

    rules = cuda_autocast_rules()
    assert {"linear", "conv2d", "baddbmm", "scaled_dot_product_attention"} <= rules["lower"]
    assert {"group_norm", "layer_norm", "mse_loss"} <= rules["fp32"] and "softmax" in rules["fp32_opt"]
    weight = torch.nn.Parameter(torch.randn(4, 4))  # an fp32 leaf that trains: cast once per autocast region
    frozen = torch.randn(4, dtype=torch.float16)
    x = torch.randn(2, 4)
    counter = OpCounter()
    counter.active = True
    with CudaAutocastEmulation(rules), counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = F.linear(x, weight)
            b = F.linear(x, weight)
            normed = F.layer_norm(a, (4,), frozen, frozen)
            probabilities = torch.softmax(b, -1)
            summed = a + b  # not on any list: runs as it comes
        with torch.autocast("cpu", enabled=False):
            plain = F.linear(x, weight)
    assert a.dtype == b.dtype == summed.dtype == torch.float16  # CUDA casts linear's inputs to fp16
    assert normed.dtype == probabilities.dtype == torch.float32  # and norms / softmax to fp32
    assert plain.dtype == torch.float32  # outside autocast nothing is cast
    # casts: x twice, the weight once (cached), the layer norm's input and its two fp16 parameters, the softmax input
    assert sum(counter.casts.values()) == 2 + 1 + 3 + 1
