"""The rectified-flow (flow-matching) training objective of FLUX.1 and SD3/SD3.5, as pure functions.

Each function follows diffusers' own flow scripts (``examples/dreambooth/train_dreambooth_lora_flux.py`` and
``train_dreambooth_lora_sd3.py``), its ``training_utils`` and its pipelines, and names its source. Nothing here
imports Lightning or touches torch's global RNG: every draw takes an explicit ``torch.Generator``.

The objective, per sample: ``x`` is the normalized VAE latent, ``sigma`` in (0, 1] a noise level,
``x_t = (1 - sigma) x + sigma * noise`` the model input and ``noise - x`` the target (the velocity of the straight
path from data to noise). The loss is the weighted MSE, averaged over each sample's elements, then over the batch.

How sigmas are drawn (diffusers' scripts): ``u`` in [0, 1] from the density of ``weighting_scheme``
(:func:`sample_density`) picks the index ``int(u * num_train_timesteps)`` into the scheduler's training schedule,
whose sigmas already carry a static shift (SD3: ``shift=3.0``). FLUX's scheduler uses dynamic shifting instead
(``use_dynamic_shifting=True``): its training schedule is unshifted and diffusers' FLUX script trains on it as is;
:func:`sigmas_from_density` applies the resolution-dependent shift of ``FluxPipeline`` (``calculate_shift`` +
the scheduler's ``time_shift``) when given the packed image sequence length, so training sees the noise levels that
inference at that resolution uses (as kohya's ``flux_shift`` and SimpleTuner do).

Where it is used: the model families :mod:`lightning_custom.families.flux` and :mod:`lightning_custom.families.sd3`
draw training sigmas with :func:`sample_sigmas`, DVAR's fixed ones with :func:`fixed_evaluation_sigmas`, and build
the loss from :func:`noisy_model_input`, :func:`flow_matching_target`, :func:`loss_weighting` and
:func:`weighted_mse`; ``tests/test_flow_matching.py`` checks each function against diffusers. Not covered: SD3's
``--precondition_outputs`` variant of diffusers' SD3 script (prediction mapped back to x).
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch

from lightning_custom.errors import UserInputError

__all__ = [
    "WeightingScheme",
    "WEIGHTING_SCHEMES",
    "sample_density",
    "training_schedule",
    "calculate_shift",
    "time_shift",
    "static_shift",
    "sigmas_from_density",
    "sample_sigmas",
    "expand_to_ndim",
    "noisy_model_input",
    "flow_matching_target",
    "loss_weighting",
    "weighted_mse",
    "normalize_latents",
    "denormalize_latents",
    "pack_latents",
    "unpack_latents",
    "latent_image_ids",
    "packed_sequence_length",
    "fixed_evaluation_sigmas",
    "flux_guidance",
]

# diffusers' flow scripts use one ``--weighting_scheme`` for both the sigma density and the loss weight:
# logit_normal / mode change the density (weight 1); sigma_sqrt / cosmap keep u uniform and weight the loss.
WeightingScheme = Literal["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"]
WEIGHTING_SCHEMES: tuple[str, ...] = get_args(WeightingScheme)


def _check_scheme(weighting_scheme: str) -> None:
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise UserInputError(
            f"--model.init_args.weighting_scheme: {weighting_scheme!r} is not one of {', '.join(WEIGHTING_SCHEMES)}"
        )


def sample_density(
    weighting_scheme: WeightingScheme,
    batch_size: int,
    *,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Draws ``u`` in [0, 1] from the training density of ``weighting_scheme`` (SD3 paper, Section 3.1).

    Same draws as diffusers' ``training_utils.compute_density_for_timestep_sampling`` for the same generator:
    ``sigmoid(N(logit_mean, logit_std))`` for logit_normal, the mode density with ``mode_scale`` for mode, uniform
    otherwise. Defaults are those of diffusers' flow scripts.

    Args:
        weighting_scheme: One of :data:`WEIGHTING_SCHEMES`.
        batch_size: Number of draws.
        generator: The generator to draw from (its device is the output's device); never the global RNG.
        logit_mean: Mean of the logit-normal's normal.
        logit_std: Standard deviation of the logit-normal's normal.
        mode_scale: Scale of the mode density.

    Returns:
        A float32 tensor of shape ``(batch_size,)``.
    """
    _check_scheme(weighting_scheme)
    device = generator.device
    if weighting_scheme == "logit_normal":
        normal = torch.normal(mean=logit_mean, std=logit_std, size=(batch_size,), device=device, generator=generator)
        return torch.sigmoid(normal)
    u = torch.rand(size=(batch_size,), device=device, generator=generator)
    if weighting_scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def training_schedule(scheduler: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the training timesteps and sigmas of a ``FlowMatchEulerDiscreteScheduler``'s config.

    Built from a fresh scheduler, as diffusers' scripts keep ``noise_scheduler_copy`` before any ``set_timesteps``
    call replaces the schedule with an inference one: ``num_train_timesteps`` values from 1 down to
    ``1 / num_train_timesteps``, with the static ``shift`` applied unless ``use_dynamic_shifting``.

    Args:
        scheduler: A ``FlowMatchEulerDiscreteScheduler`` (only its config is read).

    Returns:
        ``(timesteps, sigmas)``, both float32 of length ``num_train_timesteps``, descending; ``timesteps = 1000 *
        sigmas`` for the usual 1000 steps.
    """
    fresh = type(scheduler).from_config(scheduler.config)
    return fresh.timesteps.clone(), fresh.sigmas.clone()


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Returns FLUX's ``mu`` for an image sequence length (diffusers' ``pipelines.flux.pipeline_flux.calculate_shift``).

    Linear in the packed sequence length: ``base_shift`` at ``base_seq_len`` (256 = 512 px), ``max_shift`` at
    ``max_seq_len`` (4096 = 1024 px).
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def time_shift(mu: float, sigmas: torch.Tensor, kind: Literal["exponential", "linear"] = "exponential") -> torch.Tensor:
    """Shifts sigmas towards noise by ``mu`` (``FlowMatchEulerDiscreteScheduler.time_shift`` with its sigma 1.0).

    Exponential: ``e^mu / (e^mu + (1 / sigma - 1))``; linear: ``mu / (mu + (1 / sigma - 1))``.
    """
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return mu / (mu + (1 / sigmas - 1))


def static_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Applies SD3's static shift ``shift * s / (1 + (shift - 1) s)`` (``FlowMatchEulerDiscreteScheduler.__init__``)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigmas_from_density(
    u: torch.Tensor, scheduler: Any, image_seq_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps density draws to the scheduler's training timesteps and sigmas, as diffusers' flow scripts do.

    ``indices = int(u * num_train_timesteps)`` pick from :func:`training_schedule` (the scripts' ``get_sigmas``).
    A scheduler with ``use_dynamic_shifting`` (FLUX) then has its sigmas shifted by ``calculate_shift`` of
    ``image_seq_len`` with the scheduler's own bounds, as ``FluxPipeline`` does at inference; without
    ``image_seq_len`` they stay unshifted, exactly as diffusers' FLUX script trains.

    Args:
        u: Draws in [0, 1] from :func:`sample_density`.
        scheduler: A ``FlowMatchEulerDiscreteScheduler``.
        image_seq_len: Packed image tokens per sample (:func:`packed_sequence_length`); FLUX only.

    Returns:
        ``(timesteps, sigmas)`` of ``u``'s shape, on ``u``'s device; ``timesteps = sigmas * num_train_timesteps``.
    """
    timesteps, sigmas = training_schedule(scheduler)
    config = scheduler.config
    # u == 1 (possible for mode) would index one past the end; diffusers' scripts would fail there.
    indices = (u.cpu() * config.num_train_timesteps).long().clamp(max=config.num_train_timesteps - 1)
    timesteps, sigmas = timesteps[indices], sigmas[indices]
    if config.use_dynamic_shifting and image_seq_len is not None:
        mu = calculate_shift(
            image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
        )
        sigmas = time_shift(mu, sigmas, config.time_shift_type)
        timesteps = sigmas * config.num_train_timesteps
    return timesteps.to(u.device), sigmas.to(u.device)


def sample_sigmas(
    scheduler: Any,
    batch_size: int,
    *,
    generator: torch.Generator,
    weighting_scheme: WeightingScheme = "none",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    image_seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws training timesteps and sigmas: :func:`sample_density` then :func:`sigmas_from_density`.

    Returns:
        ``(timesteps, sigmas)``, each of shape ``(batch_size,)``.
    """
    u = sample_density(
        weighting_scheme, batch_size, generator=generator, logit_mean=logit_mean, logit_std=logit_std,
        mode_scale=mode_scale,
    )
    return sigmas_from_density(u, scheduler, image_seq_len)


def expand_to_ndim(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Appends singleton dims to per-sample ``values`` so they broadcast over a tensor of ``ndim`` dims."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def noisy_model_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Returns ``x_t = (1 - sigma) x + sigma * noise`` (diffusers' flow scripts; per-sample ``sigmas``)."""
    sigmas = expand_to_ndim(sigmas, latents.ndim).to(latents.dtype)
    return (1.0 - sigmas) * latents + sigmas * noise


def flow_matching_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Returns the velocity target ``noise - x`` (diffusers' flow scripts)."""
    return noise - latents


def loss_weighting(weighting_scheme: WeightingScheme, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights (``training_utils.compute_loss_weighting_for_sd3``).

    ``sigma ** -2`` for sigma_sqrt, ``2 / (pi (1 - 2 sigma + 2 sigma^2))`` for cosmap, ones otherwise.
    """
    _check_scheme(weighting_scheme)
    if weighting_scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor) -> torch.Tensor:
    """Weighted MSE per sample, in float32 (the loss block of diffusers' flow scripts before ``.mean()``).

    Args:
        prediction: Model output, ``(B, ...)``.
        target: :func:`flow_matching_target`, same shape.
        weighting: Per-sample weights ``(B,)`` from :func:`loss_weighting`.

    Returns:
        ``(B,)`` losses; their mean is the training loss.
    """
    weighting = expand_to_ndim(weighting, target.ndim).float()
    squared = weighting * (prediction.float() - target.float()) ** 2
    return squared.reshape(target.shape[0], -1).mean(dim=1)


def normalize_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float | None = None) -> torch.Tensor:
    """Maps VAE latents to the transformer's scale: ``(latents - shift_factor) * scaling_factor``.

    As diffusers' flow scripts (``vae.config.shift_factor`` / ``scaling_factor``); ``None`` shift (SD1/SDXL VAEs) is 0.
    """
    return (latents - (shift_factor or 0.0)) * scaling_factor


def denormalize_latents(
    latents: torch.Tensor, scaling_factor: float, shift_factor: float | None = None
) -> torch.Tensor:
    """Inverse of :func:`normalize_latents`: ``latents / scaling_factor + shift_factor`` (as the pipelines decode)."""
    return latents / scaling_factor + (shift_factor or 0.0)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Packs ``(B, C, H, W)`` latents into FLUX's ``(B, H/2 * W/2, 4C)`` 2x2 patches (``FluxPipeline._pack_latents``).

    Raises:
        ValueError: When the latent height or width is odd.
    """
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches; latent size {height}x{width} is not even")
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` (``FluxPipeline._unpack_latents``), given the latent ``height`` and ``width``."""
    batch, _, packed_channels = packed.shape
    patches = packed.view(batch, height // 2, width // 2, packed_channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, packed_channels // 4, height, width)


def latent_image_ids(
    height: int, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """FLUX's positional ids of packed latents (``FluxPipeline._prepare_latent_image_ids(..., H // 2, W // 2)``).

    Args:
        height: Latent height (before packing).
        width: Latent width (before packing).
        device: Output device.
        dtype: Output dtype.

    Returns:
        ``(H/2 * W/2, 3)``: 0, the patch row, the patch column.
    """
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def flux_guidance(
    guidance_embeds: bool, batch_size: int, scale: float = 3.5, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """FLUX's ``guidance`` input: ``scale`` per sample where the transformer has ``guidance_embeds`` (FLUX.1-dev).

    As diffusers' FLUX script (``--guidance_scale``, default 3.5); ``None`` for models without it (FLUX.1-schnell).
    """
    if not guidance_embeds:
        return None
    return torch.full((batch_size,), float(scale), device=device)


def packed_sequence_length(height: int, width: int) -> int:
    """Image tokens of packed ``height x width`` latents: FLUX's ``image_seq_len`` for :func:`calculate_shift`."""
    return (height // 2) * (width // 2)


def fixed_evaluation_sigmas(
    scheduler: Any,
    batch_size: int,
    *,
    generator: torch.Generator,
    weighting_scheme: WeightingScheme = "none",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    image_seq_len: int | None = None,
    max_draws: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DVAR's fixed noise levels on a flow model: ``batch_size`` distinct sigmas from the training density.

    The flow counterpart of the fixed timesteps of the evaluation batch (PAPER.md): drawn once, by the batch's own
    generator, from the same density and shift as training (:func:`sample_sigmas`), so the deterministic loss
    estimates the training objective; a repeated noise level is drawn again, so the B samples cover B levels.
    The global RNG is never touched, so the same seed gives the same sigmas in every process and call.

    Args:
        scheduler: A ``FlowMatchEulerDiscreteScheduler``.
        batch_size: B, at most the scheduler's ``num_train_timesteps``.
        generator: The evaluation batch's generator.
        weighting_scheme: The training run's scheme (sets the density).
        logit_mean: As :func:`sample_density`.
        logit_std: As :func:`sample_density`.
        mode_scale: As :func:`sample_density`.
        image_seq_len: As :func:`sigmas_from_density` (FLUX's dynamic shift).
        max_draws: Rounds of redrawing before giving up (a very peaked density with a large B).

    Returns:
        ``(timesteps, sigmas)`` of shape ``(batch_size,)``, in draw order, sigmas distinct and in (0, 1].

    Raises:
        ValueError: When ``batch_size`` distinct levels are not found in ``max_draws`` rounds.
    """
    if not 0 < batch_size <= scheduler.config.num_train_timesteps:
        raise ValueError(f"batch_size must be in [1, {scheduler.config.num_train_timesteps}], got {batch_size}")
    timesteps: list[torch.Tensor] = []
    sigmas: list[torch.Tensor] = []
    seen: set[float] = set()
    for _ in range(max_draws):
        drawn_timesteps, drawn_sigmas = sample_sigmas(
            scheduler, batch_size, generator=generator, weighting_scheme=weighting_scheme, logit_mean=logit_mean,
            logit_std=logit_std, mode_scale=mode_scale, image_seq_len=image_seq_len,
        )
        for timestep, sigma in zip(drawn_timesteps, drawn_sigmas):
            if sigma.item() not in seen and len(sigmas) < batch_size:
                seen.add(sigma.item())
                timesteps.append(timestep)
                sigmas.append(sigma)
        if len(sigmas) == batch_size:
            return torch.stack(timesteps), torch.stack(sigmas)
    raise ValueError(f"found only {len(sigmas)} distinct sigmas of {batch_size} in {max_draws} draws")
