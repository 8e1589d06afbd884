"""Pure diffusion-training math shared by every method (no Lightning here).

The noise/target/loss block that diffusers' example scripts copy into every training script lives here once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, *, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Uniform random training timesteps in ``[0, num_train_timesteps)``, as in DDPM training."""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device).long()


def distinct_timesteps(batch_size: int, num_train_timesteps: int, *, generator: torch.Generator) -> torch.Tensor:
    """Distinct timesteps spread uniformly over the schedule: ``randperm(T)[:batch_size]`` (DVAR's fixed batch).

    If the batch is larger than the schedule, the permutation is repeated.
    """
    repeats = -(-batch_size // num_train_timesteps)
    perm = torch.cat([torch.randperm(num_train_timesteps, generator=generator) for _ in range(repeats)])
    return perm[:batch_size].long()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, standard_normal: torch.Tensor) -> torch.Tensor:
    """Reparameterised sample of the VAE's diagonal Gaussian: ``mean + std * eps`` (as ``latent_dist.sample()``)."""
    return mean + std * standard_normal.to(device=mean.device, dtype=mean.dtype)


def scale_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float | None = None) -> torch.Tensor:
    """Map VAE latents to the diffusion model's input scale (``(z - shift) * scaling_factor``)."""
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * scaling_factor


def add_noise(
    alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion ``sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (equation 4 of Ho et al., 2020)."""
    alpha = _per_sample(alphas_cumprod, timesteps, latents)
    return alpha.sqrt() * latents + (1.0 - alpha).sqrt() * noise


def diffusion_target(
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """The regression target for the scheduler's prediction type.

    ``epsilon`` -> the noise; ``v_prediction`` -> the velocity ``sqrt(a_t) eps - sqrt(1 - a_t) x_0``
    (Section 2.4 of Salimans & Ho, 2022, used by SD 2.x 768 px); ``sample`` -> ``x_0``.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha = _per_sample(alphas_cumprod, timesteps, latents)
        return alpha.sqrt() * noise - (1.0 - alpha).sqrt() * latents
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (expected epsilon, v_prediction or sample)")


def diffusion_mse(prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error in fp32 (the simple loss of Ho et al., 2020). ``reduction="none"`` keeps one per sample."""
    per_element = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if reduction == "none":
        return per_element.flatten(1).mean(1)
    return per_element.mean()


def prior_preservation_loss(
    instance_loss: torch.Tensor, class_loss: torch.Tensor, prior_loss_weight: float
) -> torch.Tensor:
    """DreamBooth's prior-preservation objective: ``instance_loss + prior_loss_weight * class_loss``.

    Equation 2 of Ruiz et al. (2023), "DreamBooth": the class term keeps the model's prior for the class noun.
    """
    return instance_loss + prior_loss_weight * class_loss


def scale_learning_rate(
    learning_rate: float, batch_size: int, accumulate_grad_batches: int = 1, num_devices: int = 1
) -> float:
    """Scale a base learning rate linearly by the effective batch, as the paper's reference code does."""
    return learning_rate * batch_size * accumulate_grad_batches * num_devices


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    picked = values.to(device=like.device, dtype=torch.float32)[timesteps.to(like.device)]
    return picked.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)
