"""Class images for prior preservation: generated once with the base model, cached on disk with a manifest.

DreamBooth (Ruiz et al., 2023, Section 3.3) and Custom Diffusion (Kumari et al., 2023) regularise fine-tuning with
images of the concept's class, sampled from the model before training. Generating them is slow, so they are cached
under a folder named by the generation settings, with a ``manifest.json`` (prompt, model, seed, count, file names).
A later run with the same settings reuses them; asking for more images generates only the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_custom.runtime.io import atomic_path, default_cache_root, write_json  # noqa: F401 - default_cache_root: re-exported

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def default_class_prompt(class_noun: str | None) -> str | None:
    """``"a photo of a dog"`` for the class noun ``dog`` (DreamBooth's class prompt)."""
    return f"a photo of a {class_noun}" if class_noun else None


@dataclass(frozen=True)
class ClassImageRequest:
    """What to generate: ``count`` images of ``prompt`` from ``model``; image ``i`` uses seed ``seed + i``."""

    model: str
    prompt: str
    count: int
    resolution: int
    seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = "DPMSolverMultistepScheduler"
    revision: str | None = None

    def settings(self) -> dict[str, Any]:
        """Everything that determines the images (all fields but ``count``)."""
        settings = asdict(self)
        settings.pop("count")
        return settings

    def folder(self, root: str | os.PathLike) -> Path:
        """``root/<prompt-slug>-<hash of the settings>``."""
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:12]
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:40] or "class"
        return Path(root).expanduser() / f"{slug}-{digest}"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or ``None`` if it is missing or unreadable."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def cached_class_images(request: ClassImageRequest, folder: Path) -> list[Path]:
    """The leading images of ``folder`` that a manifest with the same settings lists and that still exist."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("settings") != request.settings():
        return []
    files: list[Path] = []
    for name in manifest.get("files", []):
        path = folder / name
        if not path.is_file():
            break
        files.append(path)
    return files


def ensure_class_images(
    request: ClassImageRequest, root: str | os.PathLike, make_pipeline: Callable[[], Any], batch_size: int = 4
) -> list[Path]:
    """The ``request.count`` class images: reused from the cache, with only the missing ones generated.

    ``make_pipeline`` builds the text-to-image pipeline (called only if something must be generated). Each image
    and the manifest are written atomically, and the manifest is updated after each batch, so an interrupted
    generation resumes where it stopped.
    """
    from tqdm.auto import tqdm

    folder = request.folder(root)
    files = cached_class_images(request, folder)
    if len(files) >= request.count:
        return files[: request.count]
    missing = request.count - len(files)
    log.info("prior preservation: generating %d class images of %r (%d cached) into %s", missing, request.prompt,
             len(files), folder)
    started = time.perf_counter()
    pipeline = make_pipeline()
    folder.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=missing, desc="class images", unit="img", leave=False, dynamic_ncols=True)
    for start in range(len(files), request.count, batch_size):
        indices = list(range(start, min(start + batch_size, request.count)))
        generators = [torch.Generator().manual_seed(request.seed + i) for i in indices]
        images = pipeline(
            prompt=[request.prompt] * len(indices),
            height=request.resolution,
            width=request.resolution,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            generator=generators,
        ).images
        for index, image in zip(indices, images):
            with atomic_path(folder / f"{index:05d}.png") as tmp:
                image.save(tmp, format="PNG")
            files.append(folder / f"{index:05d}.png")
        write_json(folder / MANIFEST, {
            "prompt": request.prompt, "model": request.model, "seed": request.seed, "count": len(files),
            "settings": request.settings(), "files": [f.name for f in files],
        })
        bar.update(len(indices))
    bar.close()
    log.info("prior preservation: %d class images generated in %.1f s", missing, time.perf_counter() - started)
    return files


def generation_pipeline(module: Any, device: torch.device | str | None = None,
                        scheduler: str = "DPMSolverMultistepScheduler"):
    """The family's pipeline sharing the (not yet trained) components of a personalization module (SD, SDXL: with
    ``scheduler``; FLUX, SD3: their flow-matching scheduler)."""
    import diffusers

    family = module.family
    # A DDPM-family sampler on a flow model would sample the wrong process: flow models keep their own scheduler.
    sampler = None if family.is_flow else getattr(diffusers, scheduler).from_config(module.noise_scheduler.config)
    pipe = family.pipeline(module, sampler)
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return _InferencePipeline(pipe)


class _InferencePipeline:
    """Calls the pipeline in eval mode (modes restored after), under autocast when the denoiser is half precision."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    def __call__(self, **kwargs):
        denoiser = getattr(self.pipe, "unet", None) or self.pipe.transformer  # SD / SDXL, or FLUX / SD3
        parts = [denoiser, self.pipe.vae] + [getattr(self.pipe, name, None) for name in
                                             ("text_encoder", "text_encoder_2", "text_encoder_3")]
        modules = [m for part in parts if part is not None for m in part.modules()]
        modes = [m.training for m in modules]
        dtype = denoiser.dtype
        try:
            for m in modules:
                m.training = False
            with torch.autocast(self.pipe.device.type, dtype=dtype, enabled=dtype != torch.float32):
                return self.pipe(**kwargs)
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode


class WithClassSamples(Dataset):
    """Adds one class image to every instance item: ``class_pixel_values``, ``class_caption``, ...

    Class image ``index % len(class_images)`` is served with an augmentation drawn from ``(seed, index)``, so the
    item stays a pure function of its index (exact resume).
    """

    def __init__(self, instances: Dataset, class_images, class_prompt: str, seed: int) -> None:
        self.instances, self.class_images, self.class_prompt, self.seed = instances, class_images, class_prompt, seed

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.instances[index])
        sample = self.class_images.sample(index % len(self.class_images), np.random.default_rng([self.seed, index, 1]))
        item.update({f"class_{key}": value for key, value in sample.items()})
        item["class_caption"] = self.class_prompt
        return item


def merge_class_batch(batch: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """One batch of instance then class samples (``x`` followed by ``class_x``), and the number of instances.

    One UNet forward over both halves is what diffusers' DreamBooth example does; the loss is split afterwards.
    """
    merged: dict[str, Any] = {}
    for key, value in batch.items():
        if key.startswith("class_"):
            continue
        other = batch.get(f"class_{key}")
        if other is None:
            merged[key] = value
        elif torch.is_tensor(value):
            merged[key] = torch.cat([value, other.to(value.device)])
        else:
            merged[key] = list(value) + list(other)
    return merged, batch["pixel_values"].shape[0]
