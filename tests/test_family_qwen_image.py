"""The Qwen-Image model family against diffusers' own Qwen-Image code, on tiny offline components (issue 28)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.training_utils import compute_loss_weighting_for_sd3
from transformers import Qwen2_5_VLForConditionalGeneration

from lightning_custom.objectives import flow_matching as fm
from lightning_custom.errors import UserInputError
from lightning_custom.families.base import FlowMatchingOptions
from lightning_custom.families.qwen_image import QWEN_IMAGE_SCHEDULER, QwenImageFamily, save_tiny_qwen_image
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
    return save_tiny_qwen_image(tmp_path_factory.mktemp("qwen_image") / "tiny-qwen-image", seed=0)


@pytest.fixture(scope="module")
def parts(folder):
    return QwenImageFamily.load(str(folder), dtype=torch.float32)


def _ids(parts, prompts: list[str]) -> list[torch.Tensor]:
    """The package's tokenization (the data loader's): the pipeline's template, padded to 1024 + 34."""
    tokenizer = parts.tokenizer
    return [tokenize_captions(tokenizer, prompts, parts.family.tokenizer_max_length("tokenizer", tokenizer))]


# ------------------------------------------------------------------------------------------------ loading
def test_detected_as_qwen_image_from_its_own_configs(folder):
    from lightning_custom.families import FAMILIES, detect_family, family_of_pipeline, read_model_configs

    assert detect_family(str(folder)) is QwenImageFamily
    index, denoiser = read_model_configs(str(folder))
    assert [f for f in FAMILIES if f.matches(index, denoiser)] == [QwenImageFamily]
    assert not QwenImageFamily.matches({**index, "scheduler": ["diffusers", "DDPMScheduler"]}, denoiser)
    assert family_of_pipeline(QwenImagePipeline.from_pretrained(str(folder))) is QwenImageFamily


def test_load_returns_frozen_parts_in_the_asked_dtype(folder):
    loaded = QwenImageFamily.load(str(folder), dtype=torch.bfloat16)
    expected = {"transformer": QwenImageTransformer2DModel, "vae": AutoencoderKLQwenImage,
                "text_encoder": Qwen2_5_VLForConditionalGeneration}
    for name, cls in expected.items():
        module = loaded.components[name]
        assert isinstance(module, cls), name
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
        assert not any(p.requires_grad for p in module.parameters()), name
    assert loaded.scheduler.config.use_dynamic_shifting


def test_class_attributes_follow_the_diffusers_script():
    assert QwenImageFamily.name == "qwen_image" and QwenImageFamily.pipeline_class_name == "QwenImagePipeline"
    assert QwenImageFamily.lora_targets == ("to_k", "to_q", "to_v", "to_out.0")
    assert QwenImageFamily.trainable_text_encoder_names == () and QwenImageFamily.latent_patch == 2


# --------------------------------------------------------------------------------------------------- text
def test_encode_text_equals_qwen_image_pipeline_encode_prompt(parts, single_thread):
    """Template, last Qwen2.5-VL layer, first 34 tokens dropped, zero-padded to the longest, with its mask.

    Not bit-identical: the package pads every caption to 1058 tokens where the pipeline pads to the batch's longest,
    and the masked attention over a different length sums in another order (differences ~1e-7)."""
    family, model = parts.family, stand_in(parts.components)
    with torch.no_grad():
        kwargs = family.denoiser_kwargs(model, family.encode_text(model, _ids(parts, PROMPTS)), {})
        prompt_embeds, mask = family.pipeline(parts).encode_prompt(list(PROMPTS))
    assert kwargs["encoder_hidden_states"].shape == prompt_embeds.shape
    torch.testing.assert_close(kwargs["encoder_hidden_states"], prompt_embeds, rtol=0, atol=1e-6)
    assert torch.equal(kwargs["encoder_hidden_states_mask"], mask)
    with torch.no_grad():  # one prompt: nothing padded, the mask is None (as the pipeline's)
        single = family.denoiser_kwargs(model, family.encode_text(model, _ids(parts, PROMPTS[:1])), {})
    assert single["encoder_hidden_states_mask"] is None


# ---------------------------------------------------------------------------------------------- latents
def test_latents_are_one_frame_of_the_video_vae_normalized_per_channel(parts, single_thread):
    vae, family = parts.vae, parts.family
    pixels = torch.rand(2, 3, 16, 16, generator=generator(2)) * 2 - 1
    with torch.no_grad():
        mean, std = family.latent_distribution(vae, pixels)
        dist = vae.encode(pixels.unsqueeze(2)).latent_dist
    torch.testing.assert_close(mean, dist.mean[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(std, dist.std[:, :, 0], rtol=0, atol=0)
    assert family.latent_spec(vae) == (4, 4) and mean.shape == (2, 4, 4, 4)
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    script = (mean.unsqueeze(2) - latents_mean) * latents_std  # the script's normalization
    torch.testing.assert_close(family.scale_latents(vae, mean), script[:, :, 0])


# --------------------------------------------------------------------------------------------------- loss
def _script_loss(transformer, model_input, noise, timesteps, scheduler, prompt_embeds, prompt_embeds_mask,
                 weighting_scheme):
    """The loss block of diffusers' train_dreambooth_lora_qwen_image.py, written out independently (on the
    normalized one-frame latents ``model_input`` of shape ``(B, C, 1, h, w)``)."""
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().reshape(-1, 1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    bsz, latent_height, latent_width = model_input.shape[0], model_input.shape[3], model_input.shape[4]
    img_shapes = [(1, latent_height // 2, latent_width // 2)] * bsz
    noisy_model_input = noisy_model_input.permute(0, 2, 1, 3, 4)
    packed = QwenImagePipeline._pack_latents(noisy_model_input, batch_size=bsz,
                                             num_channels_latents=model_input.shape[1], height=latent_height,
                                             width=latent_width)
    model_pred = transformer(hidden_states=packed, encoder_hidden_states=prompt_embeds,
                             encoder_hidden_states_mask=prompt_embeds_mask, timestep=timesteps / 1000,
                             img_shapes=img_shapes, return_dict=False)[0]
    vae_scale_factor = 4
    model_pred = QwenImagePipeline._unpack_latents(model_pred, latent_height * vae_scale_factor,
                                                   latent_width * vae_scale_factor, vae_scale_factor)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = noise - model_input
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return loss.mean(), loss


@pytest.mark.parametrize("weighting_scheme", ["none", "sigma_sqrt"])
def test_denoising_loss_equals_the_diffusers_qwen_image_script(parts, weighting_scheme, single_thread):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler.config)
    family = QwenImageFamily(scheduler, FlowMatchingOptions(weighting_scheme=weighting_scheme))
    model = stand_in(parts.components)
    gen = generator(3)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    indices = torch.tensor([300, 850])
    timesteps, sigmas = scheduler.timesteps[indices], scheduler.sigmas[indices]
    with torch.no_grad():
        conditioning = family.denoiser_kwargs(model, family.encode_text(model, _ids(parts, PROMPTS)), {})
        assert conditioning["encoder_hidden_states_mask"] is not None  # the shorter prompt is padded
        loss = family.denoising_loss(model, latents, noise, sigmas, conditioning)
        per_sample = family.denoising_loss(model, latents, noise, sigmas, conditioning, reduction="none")
        expected, expected_per_sample = _script_loss(
            parts.transformer, latents.unsqueeze(2), noise.unsqueeze(2), timesteps, scheduler,
            conditioning["encoder_hidden_states"], conditioning["encoder_hidden_states_mask"], weighting_scheme)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_sample, expected_per_sample, rtol=1e-6, atol=1e-7)
    assert per_sample[0] != per_sample[1]


def test_denoising_loss_in_bfloat16_is_close_and_differentiable(folder, parts, single_thread):
    half = QwenImageFamily.load(str(folder), dtype=torch.bfloat16)
    family, model, full = half.family, stand_in(half.components), stand_in(parts.components)
    gen = generator(4)
    latents = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    sigmas = torch.tensor([0.5, 0.9])
    with torch.no_grad():
        reference = family.denoising_loss(full, latents, noise, sigmas, family.denoiser_kwargs(
            full, family.encode_text(full, _ids(parts, PROMPTS)), {}))
    loss = family.denoising_loss(model, latents, noise, sigmas, family.denoiser_kwargs(
        model, family.encode_text(model, _ids(half, PROMPTS)), {}))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), reference, rtol=0.05, atol=0)
    loss.backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- noise levels
def test_noise_levels_are_the_scripts_unshifted_training_schedule():
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    family = QwenImageFamily(scheduler, FlowMatchingOptions(weighting_scheme="logit_normal"))
    drawn = family.sample_noise_levels(6, generator=generator(7), device=torch.device("cpu"), latent_size=(128, 128))
    _, expected = fm.sample_sigmas(scheduler, 6, generator=generator(7), weighting_scheme="logit_normal")
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)
    assert set(drawn.tolist()) <= set(scheduler.sigmas.tolist())
    fixed = family.fixed_noise_levels(8, generator=generator(11), latent_size=(8, 8))
    assert len(set(fixed.tolist())) == 8


# ----------------------------------------------------------------------------------------- LoRA, pipeline
def test_save_lora_round_trips_through_qwen_image_pipeline_load_lora_weights(folder, tmp_path, single_thread):
    from lightning_custom.methods.lora import ADAPTER, add_lora, lora_layers

    trained = QwenImageFamily.load(str(folder), dtype=torch.float32)
    transformer = trained.transformer
    add_lora(transformer, rank=4, alpha=4, dropout=0.0, targets=QwenImageFamily.lora_targets,
             argument="--model.target_modules", model_name="transformer")
    gen = generator(5)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    trained.family.save_lora(tmp_path, "pytorch_lora_weights.safetensors",
                             {"transformer": lora_layers(transformer, peft_naming=True)},
                             {"transformer": transformer.peft_config[ADAPTER].to_dict()})
    pipe = QwenImagePipeline.from_pretrained(str(folder))
    before = _transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path))
    expected = _transformer_output(transformer)
    assert not torch.allclose(before, expected, atol=1e-3)
    torch.testing.assert_close(_transformer_output(pipe.transformer), expected, rtol=0, atol=1e-5)
    with pytest.raises(UserInputError, match="transformer only"):
        trained.family.save_lora(tmp_path, "x.safetensors", {"text_encoder": {}}, {})


def _transformer_output(transformer) -> torch.Tensor:
    gen = generator(9)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(1, 16, 16, generator=gen),
                           encoder_hidden_states=torch.randn(1, 6, 16, generator=gen), timestep=torch.tensor([0.6]),
                           img_shapes=[(1, 4, 4)], return_dict=False)[0]


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("qwen_image_quickstart")
    return root, fit_quickstart("qwen_image", root)


def test_quickstart_stops_by_dvar(quickstart_run):
    """``configs/qwen_image/quickstart_qwen_image.yaml`` as shipped (embedded:tiny-qwen-image, the example concept)."""
    root, summary = quickstart_run
    assert_stopped_by_dvar(summary, root, "qwen_image")
    assert summary["artifacts"] == ["pytorch_lora_weights.safetensors"]


def test_lora_run_loads_in_the_stock_pipeline_and_sample_equals_it(quickstart_run):
    from lightning_custom.families.components import resolve_model_path

    root, _ = quickstart_run
    assert_sample_equals_stock_pipeline(root, QwenImagePipeline, resolve_model_path("embedded:tiny-qwen-image"),
                                        "a photo of {} on the beach", "sks toy", height=32, width=32)
