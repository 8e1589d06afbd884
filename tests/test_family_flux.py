"""The FLUX.1 model family against diffusers' own FLUX code, on tiny offline components (issue 13)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.training_utils import compute_loss_weighting_for_sd3
from transformers import CLIPTextModel, T5EncoderModel

from lightning_custom.objectives import flow_matching as fm
from lightning_custom.synthetic import toy_flow
from lightning_custom.errors import UserInputError
from lightning_custom.families.base import FlowMatchingOptions
from lightning_custom.families.flux import FluxFamily
from lightning_custom.synthetic.toy_flow import EMBEDDED_FLOW_VERSION, save_tiny_flux

PROMPTS = ["a photo of sks toy", "a red dog on the grass"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    """A tiny FLUX.1-dev-style folder (T5, guidance embedding) saved by toy_flow."""
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux", seed=0, with_t5=True, guidance_embeds=True)


@pytest.fixture(scope="module")
def parts(flux_folder):
    """The tiny model loaded through the family, in float32."""
    return FluxFamily.load(str(flux_folder), dtype=torch.float32)


def _stand_in(components: dict) -> SimpleNamespace:
    """What a family may use from the PersonalizationModule: components, module_dtype, frozen_half_precision, device."""
    return SimpleNamespace(
        **components, device=torch.device("cpu"),
        module_dtype=lambda name: next(components[name].parameters()).dtype,
        frozen_half_precision=lambda name: contextlib.nullcontext(),
    )


def _token_ids(family: FluxFamily, parts, prompts: list[str]) -> list[torch.Tensor]:
    """One padded id tensor per text encoder, tokenized the way FluxPipeline does."""
    ids = []
    for name in family.tokenizer_names:
        tokenizer = parts.components[name]
        ids.append(tokenizer(prompts, padding="max_length", max_length=family.tokenizer_max_length(name, tokenizer),
                             truncation=True, return_tensors="pt").input_ids)
    return ids


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ loading
def test_detected_as_flux_from_its_own_configs(flux_folder):
    """detect_family picks FluxFamily for a FluxPipeline folder; matches() wants the FLUX transformer + flow scheduler."""
    from lightning_custom.families import detect_family, read_model_configs

    assert detect_family(str(flux_folder)) is FluxFamily
    index, denoiser = read_model_configs(str(flux_folder))
    assert FluxFamily.matches(index, denoiser)
    assert FluxFamily.matches({}, denoiser)  # a folder saved part by part has no model index
    assert not FluxFamily.matches({**index, "scheduler": ["diffusers", "DDPMScheduler"]}, denoiser)
    assert not FluxFamily.matches(index, {**denoiser, "_class_name": "SD3Transformer2DModel"})


def test_load_returns_frozen_parts_with_the_right_classes_and_dtypes(flux_folder):
    """Transformer, VAE and T5 in the asked dtype; CLIP-L float32; everything frozen; the training scheduler."""
    loaded = FluxFamily.load(str(flux_folder), dtype=torch.bfloat16,
                             options=FlowMatchingOptions(weighting_scheme="logit_normal"))
    c = loaded.components
    assert isinstance(loaded.family, FluxFamily) and loaded.family.options.weighting_scheme == "logit_normal"
    expected = {"transformer": (FluxTransformer2DModel, torch.bfloat16), "vae": (AutoencoderKL, torch.bfloat16),
                "text_encoder": (CLIPTextModel, torch.float32), "text_encoder_2": (T5EncoderModel, torch.bfloat16)}
    for name, (cls, dtype) in expected.items():
        assert isinstance(c[name], cls), name
        assert {p.dtype for p in c[name].parameters()} == {dtype}, name
        assert not any(p.requires_grad for p in c[name].parameters()), name
    assert isinstance(c["scheduler"], FlowMatchEulerDiscreteScheduler) and loaded.scheduler is loaded.family.scheduler
    assert c["scheduler"].config.use_dynamic_shifting
    assert c["tokenizer"].model_max_length == 77 and c["tokenizer_2"] is not None
    assert loaded.transformer.config.guidance_embeds


def test_a_folder_without_t5_is_a_one_line_error(tmp_path):
    folder = save_tiny_flux(tmp_path / "no-t5", seed=0, with_t5=False)
    with pytest.raises(UserInputError) as err:
        FluxFamily.load(str(folder), dtype=torch.float32)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("--model.pretrained_model_name_or_path: ") and str(folder) in message
    assert "T5" in message


def test_class_attributes_follow_diffusers_flux_script():
    assert FluxFamily.name == "flux" and FluxFamily.pipeline_class_name == "FluxPipeline"
    assert FluxFamily.denoiser_name == "transformer" and FluxFamily.is_flow
    assert FluxFamily.text_encoder_names == ("text_encoder", "text_encoder_2")
    assert FluxFamily.embedding_keys == ("clip_l", "t5") and not FluxFamily.supports_custom_diffusion
    assert FluxFamily.lora_targets == (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    family = FluxFamily(FlowMatchEulerDiscreteScheduler(**toy_flow.FLUX_SCHEDULER))
    assert family.tokenizer_max_length("tokenizer_2", SimpleNamespace(model_max_length=10**30)) == 512
    assert family.tokenizer_max_length("tokenizer_2", SimpleNamespace(model_max_length=32)) == 32
    assert family.tokenizer_max_length("tokenizer", SimpleNamespace(model_max_length=77)) == 77


# --------------------------------------------------------------------------------------------------- text
def test_encode_text_equals_flux_pipeline_encode_prompt(parts, single_thread):
    family = parts.family
    model = _stand_in(parts.components)
    with torch.no_grad():
        text = family.encode_text(model, _token_ids(family, parts, PROMPTS))
        pipe = family.pipeline(parts)
        max_len = family.tokenizer_max_length("tokenizer_2", parts.tokenizer_2)
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=max_len)
    torch.testing.assert_close(text["encoder_hidden_states"], prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(text["pooled_projections"], pooled, rtol=0, atol=0)
    kwargs = family.denoiser_kwargs(model, text, {"pixel_values": torch.zeros(2, 3, 16, 16), "caption": PROMPTS})
    torch.testing.assert_close(kwargs["txt_ids"], text_ids, rtol=0, atol=0)
    torch.testing.assert_close(kwargs["guidance"], torch.full((2,), 3.5))


# --------------------------------------------------------------------------------------------------- loss
def _script_loss(transformer, latents, noise, sigmas, text, weighting_scheme, guidance_scale=3.5):
    """The loss block of diffusers' train_dreambooth_lora_flux.py, written out independently."""
    batch, channels, height, width = latents.shape
    sigmas_4d = sigmas.reshape(batch, 1, 1, 1)
    noisy = (1.0 - sigmas_4d) * latents + sigmas_4d * noise
    packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
    guidance = torch.tensor([guidance_scale]).expand(batch) if transformer.config.guidance_embeds else None
    text_ids = torch.zeros(text["encoder_hidden_states"].shape[1], 3)
    prediction = transformer(
        hidden_states=packed, timestep=sigmas * 1000 / 1000, guidance=guidance,
        pooled_projections=text["pooled_projections"], encoder_hidden_states=text["encoder_hidden_states"],
        txt_ids=text_ids, img_ids=image_ids, return_dict=False,
    )[0]
    prediction = FluxPipeline._unpack_latents(prediction, height=height, width=width, vae_scale_factor=1)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas_4d)
    target = noise - latents
    loss = torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(batch, -1), 1)
    return loss.mean(), loss


@pytest.mark.parametrize("weighting_scheme", ["none", "sigma_sqrt"])
def test_denoising_loss_equals_diffusers_flux_script(parts, weighting_scheme, single_thread):
    family = FluxFamily(parts.scheduler, FlowMatchingOptions(weighting_scheme=weighting_scheme))
    model = _stand_in(parts.components)
    generator = _generator(3)
    latents = torch.randn(2, 1, 16, 16, generator=generator)
    noise = torch.randn(2, 1, 16, 16, generator=generator)
    sigmas = torch.tensor([0.3, 0.85])
    with torch.no_grad():
        text = family.encode_text(model, _token_ids(family, parts, PROMPTS))
        conditioning = family.denoiser_kwargs(model, text, {"caption": PROMPTS})
        loss = family.denoising_loss(model, latents, noise, sigmas, conditioning)
        per_sample = family.denoising_loss(model, latents, noise, sigmas, conditioning, reduction="none")
        expected, expected_per_sample = _script_loss(parts.transformer, latents, noise, sigmas, text, weighting_scheme)
    assert loss.shape == () and per_sample.shape == (2,)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_sample, expected_per_sample, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_sample.mean(), loss, rtol=0, atol=0)
    assert per_sample[0] != per_sample[1]


def test_denoising_loss_in_bfloat16_is_close_and_differentiable(flux_folder, parts, single_thread):
    """A bf16 transformer gets bf16 inputs (the model dtype); the loss stays float32 and near the fp32 one."""
    half = FluxFamily.load(str(flux_folder), dtype=torch.bfloat16)
    model = _stand_in(half.components)
    family = half.family
    generator = _generator(4)
    latents = torch.randn(2, 1, 16, 16, generator=generator, requires_grad=True)
    noise = torch.randn(2, 1, 16, 16, generator=generator)
    sigmas = torch.tensor([0.5, 0.9])
    with torch.no_grad():
        text32 = family.encode_text(_stand_in(parts.components), _token_ids(family, parts, PROMPTS))
        reference = family.denoising_loss(_stand_in(parts.components), latents, noise, sigmas,
                                          family.denoiser_kwargs(model, text32, {}))
    text = family.encode_text(model, _token_ids(family, half, PROMPTS))
    loss = family.denoising_loss(model, latents, noise, sigmas, family.denoiser_kwargs(model, text, {}))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), reference, rtol=0.05, atol=0)
    loss.backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- noise levels
def test_sample_noise_levels_are_seeded_and_follow_the_resolution_shift():
    scheduler = FlowMatchEulerDiscreteScheduler(**toy_flow.FLUX_SCHEDULER)
    options = FlowMatchingOptions(weighting_scheme="logit_normal", logit_mean=0.2, logit_std=1.3)
    family = FluxFamily(scheduler, options)
    latent_size = (64, 64)  # 1024 image tokens
    drawn = family.sample_noise_levels(6, generator=_generator(7), device=torch.device("cpu"), latent_size=latent_size)
    again = family.sample_noise_levels(6, generator=_generator(7), device=torch.device("cpu"), latent_size=latent_size)
    torch.testing.assert_close(drawn, again, rtol=0, atol=0)
    _, expected = fm.sample_sigmas(scheduler, 6, generator=_generator(7), weighting_scheme="logit_normal",
                                   logit_mean=0.2, logit_std=1.3, image_seq_len=1024)
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)
    assert drawn.shape == (6,) and drawn.dtype == torch.float32
    unshifted_family = FluxFamily(scheduler, FlowMatchingOptions(weighting_scheme="logit_normal", logit_mean=0.2,
                                                                 logit_std=1.3, resolution_shift=False))
    unshifted = unshifted_family.sample_noise_levels(6, generator=_generator(7), device=torch.device("cpu"),
                                                     latent_size=latent_size)
    _, expected_unshifted = fm.sample_sigmas(scheduler, 6, generator=_generator(7), weighting_scheme="logit_normal",
                                             logit_mean=0.2, logit_std=1.3)
    torch.testing.assert_close(unshifted, expected_unshifted, rtol=0, atol=0)
    assert (drawn > unshifted).all()  # FLUX's shift moves sigmas towards noise at this resolution (mu > 0)
    small = family.sample_noise_levels(6, generator=_generator(7), device=torch.device("cpu"), latent_size=(8, 8))
    assert (small < drawn).all()  # fewer image tokens, smaller shift


def test_fixed_noise_levels_are_reproducible_distinct_and_in_range():
    options = FlowMatchingOptions(weighting_scheme="mode")
    first = FluxFamily(FlowMatchEulerDiscreteScheduler(**toy_flow.FLUX_SCHEDULER), options)
    second = FluxFamily(FlowMatchEulerDiscreteScheduler(**toy_flow.FLUX_SCHEDULER), options)
    state = torch.random.get_rng_state()
    sigmas = first.fixed_noise_levels(8, generator=_generator(11), latent_size=(16, 16))
    torch.testing.assert_close(second.fixed_noise_levels(8, generator=_generator(11), latent_size=(16, 16)), sigmas,
                               rtol=0, atol=0)
    torch.testing.assert_close(first.fixed_noise_levels(8, generator=_generator(11), latent_size=(16, 16)), sigmas,
                               rtol=0, atol=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never touched
    assert sigmas.shape == (8,) and sigmas.dtype == torch.float32 and sigmas.device.type == "cpu"
    assert len(set(sigmas.tolist())) == 8 and ((sigmas > 0) & (sigmas <= 1)).all()
    _, expected = fm.fixed_evaluation_sigmas(first.scheduler, 8, generator=_generator(11), weighting_scheme="mode",
                                             image_seq_len=fm.packed_sequence_length(16, 16))
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=0)
    resampled = first.fixed_noise_levels(8, generator=_generator(11), latent_size=(16, 16), resample=True)
    _, expected_resampled = fm.sample_sigmas(first.scheduler, 8, generator=_generator(11), weighting_scheme="mode",
                                             image_seq_len=64)
    torch.testing.assert_close(resampled, expected_resampled, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- pipeline, LoRA
def test_pipeline_wraps_the_live_components_and_generates(parts, single_thread):
    pipe = parts.family.pipeline(parts)
    assert isinstance(pipe, FluxPipeline) and pipe.transformer is parts.transformer and pipe.vae is parts.vae
    assert pipe.scheduler is not parts.scheduler and pipe.scheduler.config == parts.scheduler.config
    image = pipe(PROMPTS[0], height=16, width=16, num_inference_steps=2, max_sequence_length=32,
                 generator=_generator(0), output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all() and image.std() > 0


def test_save_lora_round_trips_through_flux_pipeline_load_lora_weights(flux_folder, tmp_path, single_thread):
    from lightning_custom.methods.lora import ADAPTER, add_lora, lora_layers

    trained = FluxFamily.load(str(flux_folder), dtype=torch.float32)
    transformer = trained.transformer
    add_lora(transformer, rank=4, alpha=4, dropout=0.0, targets=FluxFamily.lora_targets,
             argument="--model.target_modules", model_name="transformer")
    generator = _generator(5)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    layers = {"transformer": lora_layers(transformer)}
    assert len(layers["transformer"]) > 0
    trained.family.save_lora(tmp_path / "out", "pytorch_lora_weights.safetensors", layers,
                             {"transformer": transformer.peft_config[ADAPTER].to_dict()})
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["pytorch_lora_weights.safetensors"]

    pipe = FluxPipeline.from_pretrained(str(flux_folder))
    before = _transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "out"))
    after = _transformer_output(pipe.transformer)
    expected = _transformer_output(transformer)
    assert not torch.allclose(before, expected, atol=1e-3)  # the perturbed LoRA changes the output
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)


def test_save_lora_refuses_a_t5_adapter(parts, tmp_path):
    with pytest.raises(UserInputError, match="text_encoder_2"):
        parts.family.save_lora(tmp_path, "x.safetensors", {"transformer": {}, "text_encoder_2": {}}, {})


def _transformer_output(transformer) -> torch.Tensor:
    """The transformer on a fixed packed input (16x16 latents, 8 text tokens)."""
    generator = _generator(9)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 64, 4, generator=generator),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=generator),
            pooled_projections=torch.randn(1, 32, generator=generator), timestep=torch.tensor([0.6]),
            guidance=torch.tensor([3.5]), txt_ids=torch.zeros(8, 3), img_ids=fm.latent_image_ids(16, 16),
            return_dict=False,
        )[0]


# ---------------------------------------------------------------------------------------- embedded models
def test_embedded_flow_model_is_built_once_atomically_and_reused(tmp_path, monkeypatch, single_thread):
    monkeypatch.setenv("LIGHTNING_CUSTOM_CACHE", str(tmp_path / "cache"))
    state = torch.random.get_rng_state()
    folder = toy_flow.embedded_flow_model("tiny-flux")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert folder == tmp_path / "cache" / f"tiny-flux-{EMBEDDED_FLOW_VERSION}"
    assert (folder / "model_index.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"tiny-flux-{EMBEDDED_FLOW_VERSION}"]  # no temporary folder left
    loaded = FluxFamily.load(str(folder), dtype=torch.float32)
    assert loaded.transformer.config.guidance_embeds and loaded.text_encoder_2 is not None
    # Deterministic: the same weights as a fresh seed-0 build.
    fresh = toy_flow.build_tiny_flux_components(0, with_t5=True, guidance_embeds=True)["transformer"]
    for (name, a), b in zip(loaded.transformer.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # Reused: no rebuild.
    monkeypatch.setattr(toy_flow, "save_tiny_flux", lambda *a, **k: pytest.fail("rebuilt a complete folder"))
    assert toy_flow.embedded_flow_model("tiny-flux") == folder
    with pytest.raises(UserInputError, match="unknown embedded flow model"):
        toy_flow.embedded_flow_model("tiny-flux2")


def test_embedded_flow_model_uses_the_winner_of_a_concurrent_build(tmp_path, monkeypatch, single_thread):
    monkeypatch.setenv("LIGHTNING_CUSTOM_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / f"tiny-sd3-{EMBEDDED_FLOW_VERSION}"
    real_save = toy_flow.save_tiny_sd3

    def racing_save(path, **kwargs):
        """Another process finishes its build (and renames it into place) while this one is still writing."""
        real_save(path, **kwargs)
        shutil.copytree(path, target)
        return Path(path)

    monkeypatch.setattr(toy_flow, "save_tiny_sd3", racing_save)
    assert toy_flow.embedded_flow_model("tiny-sd3") == target
    assert os.listdir(tmp_path / "cache") == [f"tiny-sd3-{EMBEDDED_FLOW_VERSION}"]
    assert (target / "text_encoder_3" / "config.json").is_file()
