"""The Z-Image model family against diffusers' own Z-Image code, on tiny offline components (issue 28)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from diffusers.training_utils import compute_loss_weighting_for_sd3
from transformers import Qwen3Model

from lightning_custom.objectives import flow_matching as fm
from lightning_custom.errors import UserInputError
from lightning_custom.families.base import FlowMatchingOptions
from lightning_custom.families.z_image import Z_IMAGE_SCHEDULER, ZImageFamily, save_tiny_z_image
from lightning_custom.methods.tokens import tokenize_captions
from tests.families_2026 import (
    assert_sample_equals_stock_pipeline,
    assert_stopped_by_dvar,
    fit_quickstart,
    generator,
    stand_in,
)

PROMPTS = ["a photo of sks toy", "a red dog on the grass near a tree"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny_z_image(tmp_path_factory.mktemp("z_image") / "tiny-z-image", seed=0)


@pytest.fixture(scope="module")
def parts(folder):
    return ZImageFamily.load(str(folder), dtype=torch.float32)


def _ids(parts, prompts: list[str]) -> list[torch.Tensor]:
    """The package's tokenization (the data loader's): the family's chat-template prompt, padded to 512."""
    tokenizer = parts.tokenizer
    return [tokenize_captions(tokenizer, prompts, parts.family.tokenizer_max_length("tokenizer", tokenizer))]


# ------------------------------------------------------------------------------------------------ loading
def test_detected_as_z_image_from_its_own_configs(folder):
    from lightning_custom.families import FAMILIES, detect_family, family_of_pipeline, read_model_configs

    assert detect_family(str(folder)) is ZImageFamily
    index, denoiser = read_model_configs(str(folder))
    assert ZImageFamily.matches(index, denoiser) and ZImageFamily.matches({}, denoiser)
    assert not ZImageFamily.matches({**index, "scheduler": ["diffusers", "DDPMScheduler"]}, denoiser)
    assert [f for f in FAMILIES if f.matches(index, denoiser)] == [ZImageFamily]
    assert family_of_pipeline(ZImagePipeline.from_pretrained(str(folder))) is ZImageFamily


def test_load_returns_frozen_parts_in_the_asked_dtype(folder):
    loaded = ZImageFamily.load(str(folder), dtype=torch.bfloat16,
                               options=FlowMatchingOptions(weighting_scheme="logit_normal"))
    expected = {"transformer": ZImageTransformer2DModel, "vae": AutoencoderKL, "text_encoder": Qwen3Model}
    for name, cls in expected.items():
        module = loaded.components[name]
        assert isinstance(module, cls), name
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
        assert not any(p.requires_grad for p in module.parameters()), name
    assert isinstance(loaded.scheduler, FlowMatchEulerDiscreteScheduler) and loaded.family.scheduler is loaded.scheduler
    assert loaded.family.options.weighting_scheme == "logit_normal"


def test_class_attributes_follow_the_diffusers_script():
    assert ZImageFamily.name == "z_image" and ZImageFamily.pipeline_class_name == "ZImagePipeline"
    assert ZImageFamily.lora_targets == ("to_k", "to_q", "to_v", "to_out.0")  # --lora_layers default
    assert ZImageFamily.trainable_text_encoder_names == () and ZImageFamily.is_flow
    assert ZImageFamily.latent_patch == 2 and not ZImageFamily.supports_custom_diffusion


def test_unknown_embedded_name_lists_the_family_models():
    from lightning_custom.families.components import resolve_model_path

    with pytest.raises(UserInputError, match="embedded:tiny-z-image"):
        resolve_model_path("embedded:tiny-nothing")


# --------------------------------------------------------------------------------------------------- text
def test_encode_text_equals_z_image_pipeline_encode_prompt(parts, single_thread):
    """Chat template (thinking on), penultimate Qwen3 layer, padding dropped per prompt: bit-identical."""
    family, model = parts.family, stand_in(parts.components)
    with torch.no_grad():
        kwargs = family.denoiser_kwargs(model, family.encode_text(model, _ids(parts, PROMPTS)), {})
        expected, _ = family.pipeline(parts).encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)
    assert len(kwargs["cap_feats"]) == 2 and kwargs["cap_feats"][0].shape[0] != kwargs["cap_feats"][1].shape[0]
    for ours, theirs in zip(kwargs["cap_feats"], expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- loss
def _script_loss(transformer, latents, noise, timesteps, scheduler, cap_feats, weighting_scheme):
    """The loss block of diffusers' train_dreambooth_lora_z_image.py, written out independently."""
    schedule_timesteps, schedule_sigmas = scheduler.timesteps, scheduler.sigmas
    step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    sigmas = schedule_sigmas[step_indices].flatten().reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    timestep_normalized = (1000 - timesteps) / 1000
    model_pred = transformer(list(noisy.unsqueeze(2).unbind(dim=0)), timestep_normalized, cap_feats,
                             return_dict=False)[0]
    model_pred = -torch.stack(model_pred, dim=0).squeeze(2)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = noise - latents
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return loss.mean(), loss


@pytest.mark.parametrize("weighting_scheme", ["none", "sigma_sqrt"])
def test_denoising_loss_equals_the_diffusers_z_image_script(parts, weighting_scheme, single_thread):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler.config)
    family = ZImageFamily(scheduler, FlowMatchingOptions(weighting_scheme=weighting_scheme))
    model = stand_in(parts.components)
    gen = generator(3)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    timesteps = scheduler.timesteps[torch.tensor([300, 850])]  # the script's indices into noise_scheduler_copy
    sigmas = scheduler.sigmas[torch.tensor([300, 850])]
    with torch.no_grad():
        conditioning = family.denoiser_kwargs(model, family.encode_text(model, _ids(parts, PROMPTS)), {})
        loss = family.denoising_loss(model, latents, noise, sigmas, conditioning)
        per_sample = family.denoising_loss(model, latents, noise, sigmas, conditioning, reduction="none")
        expected, expected_per_sample = _script_loss(parts.transformer, latents, noise, timesteps, scheduler,
                                                     conditioning["cap_feats"], weighting_scheme)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_sample, expected_per_sample, rtol=1e-6, atol=1e-7)
    assert per_sample[0] != per_sample[1]


def test_denoising_loss_in_bfloat16_is_close_and_differentiable(folder, parts, single_thread):
    half = ZImageFamily.load(str(folder), dtype=torch.bfloat16)
    family, model = half.family, stand_in(half.components)
    gen = generator(4)
    latents = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    sigmas = torch.tensor([0.5, 0.9])
    with torch.no_grad():
        full = stand_in(parts.components)
        reference = family.denoising_loss(full, latents, noise, sigmas, family.denoiser_kwargs(
            full, family.encode_text(full, _ids(parts, PROMPTS)), {}))
    loss = family.denoising_loss(model, latents, noise, sigmas, family.denoiser_kwargs(
        model, family.encode_text(model, _ids(half, PROMPTS)), {}))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), reference, rtol=0.05, atol=0)
    loss.backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- noise levels
def test_noise_levels_follow_the_script_schedule_without_a_resolution_shift():
    scheduler = FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER)
    family = ZImageFamily(scheduler, FlowMatchingOptions(weighting_scheme="logit_normal"))
    drawn = family.sample_noise_levels(6, generator=generator(7), device=torch.device("cpu"), latent_size=(128, 128))
    small = family.sample_noise_levels(6, generator=generator(7), device=torch.device("cpu"), latent_size=(8, 8))
    torch.testing.assert_close(drawn, small, rtol=0, atol=0)  # no resolution dependence
    _, expected = fm.sample_sigmas(scheduler, 6, generator=generator(7), weighting_scheme="logit_normal")
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)
    # the statically shifted training schedule (shift 3) the script indexes
    assert set(drawn.tolist()) <= set(scheduler.sigmas.tolist())
    state = torch.random.get_rng_state()
    fixed = family.fixed_noise_levels(8, generator=generator(11), latent_size=(8, 8))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(set(fixed.tolist())) == 8 and fixed.dtype == torch.float32
    torch.testing.assert_close(family.fixed_noise_levels(8, generator=generator(11), latent_size=(8, 8)), fixed,
                               rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- LoRA, pipeline
def test_save_lora_round_trips_through_z_image_pipeline_load_lora_weights(folder, tmp_path, single_thread):
    from lightning_custom.methods.lora import ADAPTER, add_lora, lora_layers

    trained = ZImageFamily.load(str(folder), dtype=torch.float32)
    transformer = trained.transformer
    add_lora(transformer, rank=4, alpha=4, dropout=0.0, targets=ZImageFamily.lora_targets,
             argument="--model.target_modules", model_name="transformer")
    gen = generator(5)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    trained.family.save_lora(tmp_path, "pytorch_lora_weights.safetensors",
                             {"transformer": lora_layers(transformer, peft_naming=True)},
                             {"transformer": transformer.peft_config[ADAPTER].to_dict()})
    pipe = ZImagePipeline.from_pretrained(str(folder))
    before = _transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path))
    expected = _transformer_output(transformer)
    assert not torch.allclose(before, expected, atol=1e-3)
    torch.testing.assert_close(_transformer_output(pipe.transformer), expected, rtol=0, atol=1e-5)
    with pytest.raises(UserInputError, match="transformer only"):
        trained.family.save_lora(tmp_path, "x.safetensors", {"transformer": {}, "text_encoder": {}}, {})


def _transformer_output(transformer) -> torch.Tensor:
    gen = generator(9)
    with torch.no_grad():
        out = transformer([torch.randn(4, 1, 8, 8, generator=gen)], torch.tensor([0.4]),
                          [torch.randn(6, 16, generator=gen)], return_dict=False)[0]
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("z_image_quickstart")
    return root, fit_quickstart("z_image", root)


def test_quickstart_stops_by_dvar(quickstart_run):
    """``configs/z_image/quickstart_z_image.yaml`` as shipped (embedded:tiny-z-image, the example concept)."""
    root, summary = quickstart_run
    assert_stopped_by_dvar(summary, root, "z_image")
    assert summary["artifacts"] == ["pytorch_lora_weights.safetensors"]


def test_lora_run_loads_in_the_stock_pipeline_and_sample_equals_it(quickstart_run):
    from lightning_custom.families.components import resolve_model_path

    root, _ = quickstart_run
    assert_sample_equals_stock_pipeline(root, ZImagePipeline, resolve_model_path("embedded:tiny-z-image"),
                                        "a photo of {} on the beach", "sks toy", height=64, width=64)
