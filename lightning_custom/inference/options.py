"""The sampling settings that ``sample`` and ``evaluate`` share, declared once with their defaults and help.

Light on purpose (no torch): the command line reads it to build ``--help`` before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingOptions:
    """How images are sampled from a finished run.

    Args:
        images_per_prompt: images per prompt; image j of every prompt uses seed + j.
        seed: the first seed.
        guidance_scale: guidance scale (default: the model folder's sampling_defaults.json, 4.0 on the embedded
            world model; else the model's own: 7.5 on SD and SDXL, 3.5 on FLUX.1, 7.0 on SD3).
        num_inference_steps: denoising steps (default: the model folder's recommendation, 25 on the embedded world
            model; else 50).
        scheduler: sampler: default (the model folder's recommendation, DDIM on the embedded world model; else the
            model's own), ddim, dpm++, euler, pndm or ddpm (SD and SDXL only; FLUX.1 and SD3 keep their
            flow-matching sampler).
        height: image height in pixels (default: the model's).
        width: image width in pixels (default: the model's).
        batch_size: images generated at once.
        base_model: load this base model instead of the one recorded in summary.json.
        device: auto, cpu, cuda, cuda:1, ...
        dtype: auto (on CUDA float16, bfloat16 for FLUX.1 and SD3; else float32), float32, float16 or bfloat16.
    """

    images_per_prompt: int = 4
    seed: int = 0
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    scheduler: str = "default"
    height: int | None = None
    width: int | None = None
    batch_size: int = 4
    base_model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
