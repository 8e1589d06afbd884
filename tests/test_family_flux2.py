"""The FLUX.2 [klein] model family against diffusers' own FLUX.2 code, on tiny offline components (issue 28)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from diffusers.training_utils import compute_loss_weighting_for_sd3
from transformers import Qwen3ForCausalLM

from lightning_custom.objectives import flow_matching as fm
from lightning_custom.errors import UserInputError
from lightning_custom.families.base import FlowMatchingOptions
from lightning_custom.families.flux2 import FLUX2_SCHEDULER, Flux2KleinFamily, flux2_lora_targets, save_tiny_flux2
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
    return save_tiny_flux2(tmp_path_factory.mktemp("flux2") / "tiny-flux2", seed=0)


@pytest.fixture(scope="module")
def parts(folder):
    return Flux2KleinFamily.load(str(folder), dtype=torch.float32)


def _ids(parts, prompts: list[str]) -> list[torch.Tensor]:
    """The package's tokenization (the data loader's): the family's chat-template prompt, padded to 512."""
    tokenizer = parts.tokenizer
    return [tokenize_captions(tokenizer, prompts, parts.family.tokenizer_max_length("tokenizer", tokenizer))]


# ------------------------------------------------------------------------------------------------ loading
def test_detected_as_flux2_klein_from_its_own_configs(folder):
    from lightning_custom.families import FAMILIES, detect_family, family_of_pipeline, read_model_configs
    from lightning_custom.families.flux import FluxFamily

    assert detect_family(str(folder)) is Flux2KleinFamily
    index, denoiser = read_model_configs(str(folder))
    assert [f for f in FAMILIES if f.matches(index, denoiser)] == [Flux2KleinFamily]
    assert Flux2KleinFamily.matches({}, denoiser)
    assert not Flux2KleinFamily.matches({**index, "scheduler": ["diffusers", "DDPMScheduler"]}, denoiser)
    pipe = Flux2KleinPipeline.from_pretrained(str(folder))
    assert family_of_pipeline(pipe) is Flux2KleinFamily  # not FLUX.1's, whose class name is a prefix
    assert family_of_pipeline(type("FluxPipeline", (), {})()) is FluxFamily


def test_load_returns_frozen_parts_in_the_asked_dtype(folder, tmp_path):
    loaded = Flux2KleinFamily.load(str(folder), dtype=torch.bfloat16)
    expected = {"transformer": Flux2Transformer2DModel, "vae": AutoencoderKLFlux2, "text_encoder": Qwen3ForCausalLM}
    for name, cls in expected.items():
        module = loaded.components[name]
        assert isinstance(module, cls), name
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
        assert not any(p.requires_grad for p in module.parameters()), name
    assert loaded.scheduler.config.use_dynamic_shifting and not loaded.family.is_distilled
    # the LoRA targets of the loaded model: the script's, cut to its one single-stream block
    assert loaded.family.lora_targets == ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                                          "single_transformer_blocks.0.attn.to_out")
    distilled = Flux2KleinFamily.load(str(save_tiny_flux2(tmp_path / "distilled", is_distilled=True)))
    assert distilled.family.is_distilled and distilled.family.pipeline(distilled).config.is_distilled


def test_class_attributes_follow_the_diffusers_script():
    assert Flux2KleinFamily.name == "flux2" and Flux2KleinFamily.pipeline_class_name == "Flux2KleinPipeline"
    script_targets = ["to_k", "to_q", "to_v", "to_out.0"] + [
        "to_qkv_mlp_proj", *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(24)]]
    assert list(Flux2KleinFamily.lora_targets) == script_targets == list(flux2_lora_targets(48))
    assert Flux2KleinFamily.trainable_text_encoder_names == () and Flux2KleinFamily.is_flow
    assert Flux2KleinFamily.text_encoder_out_layers == (9, 18, 27)  # the pipeline's default (the script: 10 20 30)


# --------------------------------------------------------------------------------------------------- text
def test_encode_text_equals_flux2_klein_pipeline_encode_prompt(parts, single_thread):
    """Chat template (thinking off), layers 9/18/27 side by side, 512 padded tokens, 4-axis text ids."""
    family, model = parts.family, stand_in(parts.components)
    with torch.no_grad():
        kwargs = family.denoiser_kwargs(model, family.encode_text(model, _ids(parts, PROMPTS)), {})
        prompt_embeds, text_ids = family.pipeline(parts).encode_prompt(list(PROMPTS))
    assert prompt_embeds.shape == (2, 512, 24)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(kwargs["txt_ids"], text_ids, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- latents
def test_scale_latents_is_the_script_normalization_in_the_vae_layout(parts):
    vae = parts.vae
    latents = torch.randn(2, 1, 8, 8, generator=generator(1))
    ours = parts.family.scale_latents(vae, latents)
    # the script: patchify, then (x - bn_mean) / bn_std
    patched = Flux2KleinPipeline._patchify_latents(latents)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    torch.testing.assert_close(Flux2KleinPipeline._patchify_latents(ours), (patched - mean) / std)
    assert ours.shape == latents.shape and not torch.allclose(ours, latents)


# --------------------------------------------------------------------------------------------------- loss
def _script_loss(transformer, model_input, noise, timesteps, scheduler, prompt_embeds, text_ids, weighting_scheme):
    """The loss block of diffusers' train_dreambooth_lora_flux2_klein.py, written out independently (on the
    patchified, normalized latents ``model_input``)."""
    model_input_ids = Flux2KleinPipeline._prepare_latent_ids(model_input)
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    packed = Flux2KleinPipeline._pack_latents(noisy)
    guidance = None  # klein has no guidance embeddings
    model_pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                             encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=model_input_ids,
                             return_dict=False)[0]
    model_pred = model_pred[:, : packed.size(1) :]
    model_pred = Flux2KleinPipeline._unpack_latents_with_ids(model_pred, model_input_ids)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = noise - model_input
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return loss.mean(), loss


@pytest.mark.parametrize("weighting_scheme", ["none", "sigma_sqrt"])
def test_denoising_loss_equals_the_diffusers_flux2_klein_script(parts, weighting_scheme, single_thread):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler.config)
    family = Flux2KleinFamily(scheduler, FlowMatchingOptions(weighting_scheme=weighting_scheme))
    model = stand_in(parts.components)
    gen = generator(3)
    latents, noise = torch.randn(2, 1, 16, 16, generator=gen), torch.randn(2, 1, 16, 16, generator=gen)
    indices = torch.tensor([300, 850])
    timesteps, sigmas = scheduler.timesteps[indices], scheduler.sigmas[indices]
    with torch.no_grad():
        conditioning = family.denoiser_kwargs(model, family.encode_text(model, _ids(parts, PROMPTS)), {})
        loss = family.denoising_loss(model, latents, noise, sigmas, conditioning)
        per_sample = family.denoising_loss(model, latents, noise, sigmas, conditioning, reduction="none")
        expected, expected_per_sample = _script_loss(
            parts.transformer, Flux2KleinPipeline._patchify_latents(latents),
            Flux2KleinPipeline._patchify_latents(noise), timesteps, scheduler,
            conditioning["encoder_hidden_states"], conditioning["txt_ids"], weighting_scheme)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_sample, expected_per_sample, rtol=1e-6, atol=1e-7)
    assert per_sample[0] != per_sample[1]


def test_denoising_loss_in_bfloat16_is_close_and_differentiable(folder, parts, single_thread):
    half = Flux2KleinFamily.load(str(folder), dtype=torch.bfloat16)
    family, model, full = half.family, stand_in(half.components), stand_in(parts.components)
    gen = generator(4)
    latents = torch.randn(2, 1, 16, 16, generator=gen, requires_grad=True)
    noise = torch.randn(2, 1, 16, 16, generator=gen)
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
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER)
    family = Flux2KleinFamily(scheduler, FlowMatchingOptions(weighting_scheme="logit_normal"))
    drawn = family.sample_noise_levels(6, generator=generator(7), device=torch.device("cpu"), latent_size=(128, 128))
    small = family.sample_noise_levels(6, generator=generator(7), device=torch.device("cpu"), latent_size=(8, 8))
    torch.testing.assert_close(drawn, small, rtol=0, atol=0)
    _, expected = fm.sample_sigmas(scheduler, 6, generator=generator(7), weighting_scheme="logit_normal")
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)
    # dynamic shifting: the training schedule (noise_scheduler_copy.sigmas) is the unshifted linear one
    assert set(drawn.tolist()) <= set(scheduler.sigmas.tolist())
    torch.testing.assert_close(scheduler.sigmas, torch.linspace(1.0, 0.001, 1000), rtol=0, atol=1e-6)
    fixed = family.fixed_noise_levels(8, generator=generator(11), latent_size=(8, 8))
    assert len(set(fixed.tolist())) == 8


# ----------------------------------------------------------------------------------------- LoRA, pipeline
def test_save_lora_round_trips_through_flux2_klein_pipeline_load_lora_weights(folder, tmp_path, single_thread):
    from lightning_custom.methods.lora import ADAPTER, add_lora, lora_layers

    trained = Flux2KleinFamily.load(str(folder), dtype=torch.float32)
    transformer = trained.transformer
    add_lora(transformer, rank=4, alpha=4, dropout=0.0, targets=trained.family.lora_targets,
             argument="--model.target_modules", model_name="transformer")
    assert any("single_transformer_blocks.0.attn.to_out.lora_A" in n for n, _ in transformer.named_parameters())
    gen = generator(5)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    trained.family.save_lora(tmp_path, "pytorch_lora_weights.safetensors",
                             {"transformer": lora_layers(transformer, peft_naming=True)},
                             {"transformer": transformer.peft_config[ADAPTER].to_dict()})
    pipe = Flux2KleinPipeline.from_pretrained(str(folder))
    before = _transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path))
    expected = _transformer_output(transformer)
    assert not torch.allclose(before, expected, atol=1e-3)
    torch.testing.assert_close(_transformer_output(pipe.transformer), expected, rtol=0, atol=1e-5)
    with pytest.raises(UserInputError, match="transformer only"):
        trained.family.save_lora(tmp_path, "x.safetensors", {"text_encoder": {}}, {})


def _transformer_output(transformer) -> torch.Tensor:
    gen = generator(9)
    latents = torch.randn(1, 4, 4, 4, generator=gen)
    text = torch.randn(1, 6, 24, generator=gen)
    with torch.no_grad():
        return transformer(hidden_states=Flux2KleinPipeline._pack_latents(latents), encoder_hidden_states=text,
                           timestep=torch.tensor([0.6]), img_ids=Flux2KleinPipeline._prepare_latent_ids(latents),
                           txt_ids=Flux2KleinPipeline._prepare_text_ids(text), return_dict=False)[0]


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("flux2_quickstart")
    return root, fit_quickstart("flux2", root)


def test_quickstart_stops_by_dvar(quickstart_run):
    """``configs/flux2/quickstart_flux2.yaml`` as shipped (embedded:tiny-flux2, the example concept)."""
    root, summary = quickstart_run
    assert_stopped_by_dvar(summary, root, "flux2")
    assert summary["artifacts"] == ["pytorch_lora_weights.safetensors"]


def test_lora_run_loads_in_the_stock_pipeline_and_sample_equals_it(quickstart_run):
    from lightning_custom.families.components import resolve_model_path

    root, _ = quickstart_run
    assert_sample_equals_stock_pipeline(root, Flux2KleinPipeline, resolve_model_path("embedded:tiny-flux2"),
                                        "a photo of {} on the beach", "sks toy", height=16, width=16)
