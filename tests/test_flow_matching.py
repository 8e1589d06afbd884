"""The flow-matching objective (lightning_custom/flow_matching.py) against diffusers, and the tiny flow models."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from lightning_custom.objectives import flow_matching as fm
from lightning_custom.errors import UserInputError
from lightning_custom.synthetic.toy_flow import (
    FLUX_SCHEDULER,
    SD3_SCHEDULER,
    build_tiny_flux_components,
    build_tiny_sd3_components,
    save_tiny_flux,
    save_tiny_sd3,
)

SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")
DENSITY_ARGS = {"logit_mean": 0.3, "logit_std": 1.2, "mode_scale": 1.29}


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _script_get_sigmas(scheduler, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' train_dreambooth_lora_{flux,sd3}.py: u -> indices -> timesteps -> get_sigmas(timesteps)."""
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    return timesteps, scheduler.sigmas[step_indices].flatten()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_density_draws_match_diffusers(scheme):
    ours = fm.sample_density(scheme, 64, generator=_generator(3), **DENSITY_ARGS)
    theirs = compute_density_for_timestep_sampling(scheme, 64, generator=_generator(3), **DENSITY_ARGS)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert ((ours >= 0) & (ours <= 1)).all()


@pytest.mark.parametrize("scheme", ("logit_normal", "mode", "none"))
def test_sd3_sigmas_match_the_script_lookup_with_static_shift(scheme):
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    u = fm.sample_density(scheme, 32, generator=_generator(1))
    timesteps, sigmas = fm.sigmas_from_density(u, scheduler)
    script_timesteps, script_sigmas = _script_get_sigmas(scheduler, u)
    torch.testing.assert_close(timesteps, script_timesteps, rtol=0, atol=0)
    torch.testing.assert_close(sigmas, script_sigmas, rtol=0, atol=0)
    # the static shift 3.0 is really in there: sigma = 3s / (1 + 2s) of the linear schedule's s
    linear = (scheduler.config.num_train_timesteps - (u * 1000).long()).float() / 1000
    torch.testing.assert_close(sigmas, fm.static_shift(linear, 3.0), rtol=0, atol=1e-6)
    assert (sigmas > linear - 1e-7).all() and (sigmas > linear + 1e-3).any()


def test_sigmas_ignore_a_used_scheduler_and_survive_u_equal_one():
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    fresh_timesteps, fresh_sigmas = fm.training_schedule(scheduler)
    scheduler.set_timesteps(4)  # an inference schedule must not leak into training sigmas
    timesteps, sigmas = fm.sigmas_from_density(torch.tensor([0.0, 0.5, 1.0]), scheduler)
    torch.testing.assert_close(sigmas, fresh_sigmas[[0, 500, 999]], rtol=0, atol=0)
    torch.testing.assert_close(timesteps, fresh_timesteps[[0, 500, 999]], rtol=0, atol=0)


def test_flux_dynamic_shift_matches_flux_pipeline():
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    u = fm.sample_density("logit_normal", 32, generator=_generator(2))
    script_timesteps, unshifted = _script_get_sigmas(scheduler, u)
    # without a sequence length: exactly diffusers' FLUX script (its dynamic scheduler trains unshifted)
    timesteps, sigmas = fm.sigmas_from_density(u, scheduler)
    torch.testing.assert_close(sigmas, unshifted, rtol=0, atol=0)
    torch.testing.assert_close(timesteps, script_timesteps, rtol=0, atol=0)
    # at 1024 px (64x64 packed tokens): FluxPipeline's mu and the scheduler's own time_shift
    seq_len = fm.packed_sequence_length(128, 128)
    assert seq_len == 4096
    config = scheduler.config
    mu = diffusers_calculate_shift(
        seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    assert fm.calculate_shift(seq_len) == pytest.approx(mu, abs=1e-12) == pytest.approx(1.15)
    timesteps, sigmas = fm.sigmas_from_density(u, scheduler, image_seq_len=seq_len)
    expected = scheduler.time_shift(mu, 1.0, unshifted)
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(timesteps, expected * 1000, rtol=0, atol=1e-3)
    assert (sigmas > unshifted).all()


def test_noised_input_target_weighting_and_loss_match_the_script():
    generator = _generator(4)
    latents = torch.randn(3, 4, 6, 6, generator=generator)
    noise = torch.randn(3, 4, 6, 6, generator=generator)
    prediction = torch.randn(3, 4, 6, 6, generator=generator)
    sigmas = torch.tensor([0.9, 0.35, 0.02])
    broadcast = sigmas.view(-1, 1, 1, 1)
    noised = fm.noisy_model_input(latents, noise, sigmas)
    torch.testing.assert_close(noised, (1.0 - broadcast) * latents + broadcast * noise, rtol=0, atol=1e-7)
    target = fm.flow_matching_target(latents, noise)
    torch.testing.assert_close(target, noise - latents, rtol=0, atol=0)
    for scheme in SCHEMES:
        weighting = fm.loss_weighting(scheme, sigmas)
        script_weighting = compute_loss_weighting_for_sd3(scheme, broadcast)
        torch.testing.assert_close(weighting.view(-1, 1, 1, 1), script_weighting, rtol=0, atol=1e-6)
        script_loss = torch.mean(
            (script_weighting.float() * (prediction.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1
        ).mean()
        loss = fm.weighted_mse(prediction, target, weighting).mean()
        torch.testing.assert_close(loss, script_loss, rtol=1e-6, atol=1e-6)
    assert fm.loss_weighting("sigma_sqrt", sigmas)[2] == pytest.approx(1 / 0.02**2)


def test_unknown_weighting_scheme_is_a_one_line_user_error():
    with pytest.raises(UserInputError, match="weighting_scheme: 'logit-normal' is not one of"):
        fm.sample_density("logit-normal", 2, generator=_generator())
    with pytest.raises(UserInputError, match="weighting_scheme"):
        fm.loss_weighting("sqrt", torch.ones(2))


def test_latent_normalization_matches_the_script_and_round_trips():
    vae = build_tiny_flux_components()["vae"]
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    latents = torch.randn(2, 1, 8, 8, generator=_generator(5))
    normalized = fm.normalize_latents(latents, scale, shift)
    torch.testing.assert_close(normalized, (latents - shift) * scale, rtol=0, atol=0)
    torch.testing.assert_close(fm.denormalize_latents(normalized, scale, shift), latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(fm.normalize_latents(latents, 0.18215, None), latents * 0.18215, rtol=0, atol=0)


def test_packing_and_image_ids_match_flux_pipeline_and_round_trip():
    latents = torch.randn(2, 16, 6, 10, generator=_generator(6))
    packed = fm.pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10), rtol=0, atol=0)
    assert packed.shape == (2, 15, 64)
    # FluxPipeline unpacks from pixel sizes; FLUX's VAE downsamples by 8
    torch.testing.assert_close(fm.unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 48, 80, 8))
    torch.testing.assert_close(fm.unpack_latents(packed, 6, 10), latents, rtol=0, atol=0)
    expected_ids = FluxPipeline._prepare_latent_image_ids(2, 6 // 2, 10 // 2, "cpu", torch.bfloat16)
    torch.testing.assert_close(fm.latent_image_ids(6, 10, dtype=torch.bfloat16), expected_ids, rtol=0, atol=0)
    assert fm.latent_image_ids(6, 10)[6].tolist() == [0.0, 1.0, 1.0]  # row 1, column 1 of a 3x5 patch grid
    with pytest.raises(ValueError, match="not even"):
        fm.pack_latents(torch.zeros(1, 4, 5, 6))


@pytest.mark.parametrize(
    ("scheduler_config", "image_seq_len"), [(SD3_SCHEDULER, None), (FLUX_SCHEDULER, 1024)], ids=["sd3", "flux"]
)
def test_fixed_evaluation_sigmas_are_distinct_reproducible_and_leave_the_global_rng(scheduler_config, image_seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config)
    batch = 96  # large enough that plain draws from 1000 levels repeat (birthday bound)
    rng_before = torch.get_rng_state()
    first = fm.fixed_evaluation_sigmas(
        scheduler, batch, generator=_generator(7), weighting_scheme="logit_normal", image_seq_len=image_seq_len
    )
    second = fm.fixed_evaluation_sigmas(
        scheduler, batch, generator=_generator(7), weighting_scheme="logit_normal", image_seq_len=image_seq_len
    )
    assert torch.equal(torch.get_rng_state(), rng_before)
    timesteps, sigmas = first
    assert torch.equal(sigmas, second[1]) and torch.equal(timesteps, second[0])
    assert sigmas.shape == (batch,) and len(set(sigmas.tolist())) == batch
    assert ((sigmas > 0) & (sigmas <= 1)).all()
    # the same generator's plain draws do repeat: the redraw is what makes the levels distinct
    _, plain = fm.sample_sigmas(
        scheduler, batch, generator=_generator(7), weighting_scheme="logit_normal", image_seq_len=image_seq_len
    )
    assert len(set(plain.tolist())) < batch
    # draws after the shift, from the training density: the first draws are kept in order
    unique_prefix = len(dict.fromkeys(plain.tolist()))
    assert sigmas[:5].tolist() == list(dict.fromkeys(plain.tolist()))[:5] and unique_prefix < batch
    other = fm.fixed_evaluation_sigmas(scheduler, batch, generator=_generator(8), weighting_scheme="logit_normal")
    assert not torch.equal(other[1], sigmas)


def test_flux_guidance_only_where_the_transformer_embeds_it():
    assert fm.flux_guidance(False, 3) is None
    assert fm.flux_guidance(True, 3).tolist() == [3.5, 3.5, 3.5]
    assert fm.flux_guidance(True, 2, scale=1.0).tolist() == [1.0, 1.0]


def _flux_text_inputs(components, batch: int) -> dict[str, torch.Tensor]:
    """CLIP-L pooled states and T5 states for a fixed prompt, as FluxPipeline.encode_prompt lays them out."""
    prompts = ["a photo of sks toy"] * batch
    clip_ids = components["tokenizer"](prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    t5_ids = components["tokenizer_2"](
        prompts, padding="max_length", max_length=8, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        pooled = components["text_encoder"](clip_ids).pooler_output
        states = components["text_encoder_2"](t5_ids)[0]
    return {"pooled_projections": pooled, "encoder_hidden_states": states, "txt_ids": torch.zeros(states.shape[1], 3)}


def test_tiny_flux_transformer_forward_on_packed_latents(single_thread):
    components = build_tiny_flux_components(seed=0, sample_size=8, guidance_embeds=True, with_t5=True)
    latents = torch.randn(2, 1, 8, 8, generator=_generator(9))
    packed = fm.pack_latents(latents)
    output = components["transformer"](
        hidden_states=packed, timestep=torch.tensor([0.3, 0.8]), img_ids=fm.latent_image_ids(8, 8),
        guidance=fm.flux_guidance(components["transformer"].config.guidance_embeds, 2), return_dict=False,
        **_flux_text_inputs(components, 2),
    )[0]
    assert output.shape == packed.shape == (2, 16, 4)
    assert fm.unpack_latents(output, 8, 8).shape == latents.shape
    assert torch.isfinite(output).all() and output.std() > 0


def test_tiny_sd3_transformer_forward_on_latents(single_thread):
    components = build_tiny_sd3_components(seed=0, sample_size=8)
    transformer = components["transformer"]
    latents = torch.randn(2, 4, 8, 8, generator=_generator(10))
    output = transformer(
        hidden_states=latents, encoder_hidden_states=torch.randn(2, 5, transformer.config.joint_attention_dim),
        pooled_projections=torch.randn(2, transformer.config.pooled_projection_dim),
        timestep=torch.tensor([300.0, 800.0]), return_dict=False,
    )[0]
    assert output.shape == latents.shape
    assert torch.isfinite(output).all() and output.std() > 0


def test_flow_matching_loss_decreases_when_training_a_tiny_flux_transformer(single_thread):
    """20 AdamW steps on one fixed batch (fixed latents, noise and sigmas) must cut the loss to under a quarter."""
    components = build_tiny_flux_components(seed=0, sample_size=8, with_t5=True)
    transformer = components["transformer"].train()
    scheduler = components["scheduler"]
    generator = _generator(11)
    vae_config = components["vae"].config
    latents = fm.normalize_latents(
        torch.randn(2, 1, 8, 8, generator=generator), vae_config.scaling_factor, vae_config.shift_factor
    )
    noise = torch.randn(latents.shape, generator=generator)
    timesteps, sigmas = fm.sample_sigmas(
        scheduler, 2, generator=generator, weighting_scheme="logit_normal",
        image_seq_len=fm.packed_sequence_length(8, 8),
    )
    text = _flux_text_inputs(components, 2)
    image_ids = fm.latent_image_ids(8, 8)
    packed_input = fm.pack_latents(fm.noisy_model_input(latents, noise, sigmas))
    target = fm.flow_matching_target(latents, noise)
    weighting = fm.loss_weighting("logit_normal", sigmas)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        prediction = transformer(
            hidden_states=packed_input, timestep=timesteps / 1000, img_ids=image_ids, return_dict=False, **text
        )[0]
        loss = fm.weighted_mse(fm.unpack_latents(prediction, 8, 8), target, weighting).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # measured: 3.60 -> 0.27 (seed 0, torch 2.13 CPU)
    assert losses[-1] < 0.25 * losses[0], losses


@pytest.mark.parametrize(
    ("pipeline_class", "save", "kwargs", "missing"),
    [
        (FluxPipeline, save_tiny_flux, {"guidance_embeds": True}, ()),
        (StableDiffusion3Pipeline, save_tiny_sd3, {"with_t5": True}, ()),
        (StableDiffusion3Pipeline, save_tiny_sd3, {}, ("text_encoder_3", "tokenizer_3")),
    ],
    ids=["flux", "sd3-t5", "sd3-no-t5"],
)
def test_tiny_flow_pipelines_save_load_and_generate_offline(tmp_path, single_thread, pipeline_class, save, kwargs,
                                                            missing):
    """The stock pipelines run on the tiny parts and give the same image after save_pretrained/from_pretrained."""
    build = build_tiny_flux_components if save is save_tiny_flux else build_tiny_sd3_components
    built = pipeline_class(**build(seed=0, **kwargs))
    loaded = pipeline_class.from_pretrained(save(tmp_path / "tiny", seed=0, **kwargs), **dict.fromkeys(missing))
    call = {"prompt": "a photo of sks toy", "height": 16, "width": 16, "num_inference_steps": 2,
            "max_sequence_length": 16, "output_type": "pt"}
    image = built(**call, generator=_generator(0)).images
    assert image.shape == (1, 3, 16, 16) and image.std() > 0
    torch.testing.assert_close(loaded(**call, generator=_generator(0)).images, image, rtol=0, atol=0)
    assert isinstance(loaded.scheduler, FlowMatchEulerDiscreteScheduler)
    assert loaded.vae.config.shift_factor == pytest.approx(0.0609)
