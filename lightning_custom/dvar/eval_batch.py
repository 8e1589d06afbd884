"""DVAR's fixed evaluation batch: the images, captions, latent draws, noise and noise levels that the
deterministic loss L_det is computed on at every evaluation (Voronov et al., 2023, Section 4; PAPER.md, "DVAR").

The data module draws it with generators of its own, never the global RNG, so evaluating cannot change training;
:class:`FixedEvalBatchData` is the part of :class:`~lightning_custom.data.concept.ConceptDataModule` that does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_custom.objectives.diffusion import distinct_timesteps

EvalPart = Literal["images", "latents", "noise", "captions", "timesteps"]
EVAL_PARTS: tuple[str, ...] = ("images", "latents", "noise", "captions", "timesteps")


@dataclass(frozen=True)
class EvalBatchSpec:
    """What the data module must know about the model to draw the fixed batch's noise and noise levels.

    ``noise_levels(batch_size, generator=, latent_size=, resample=)`` is the model family's draw of the fixed noise
    levels (:meth:`ModelFamily.fixed_noise_levels <lightning_custom.families.base.ModelFamily.fixed_noise_levels>`:
    distinct DDPM timesteps for SD / SDXL, distinct sigmas from the training density for FLUX / SD3); without it,
    distinct timesteps of a ``num_train_timesteps`` schedule. They are stored under ``"timesteps"`` either way.
    """

    num_train_timesteps: int
    latent_channels: int
    latent_downsample: int
    noise_levels: Callable[..., torch.Tensor] | None = None


def content_key(*parts: Any) -> str:
    """A digest of ``parts`` (tensors, arrays, or values with a faithful ``repr``), to key a cache by its inputs."""
    digest = hashlib.sha1()
    for part in parts:
        if torch.is_tensor(part):
            part = part.detach().cpu().contiguous()
            digest.update(f"tensor{part.dtype}{tuple(part.shape)}".encode())
            digest.update(part.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(part, np.ndarray):
            digest.update(f"array{part.dtype}{part.shape}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()


class FixedEvalBatchData:
    """Mixin of the data module: builds, draws and checkpoints DVAR's evaluation batch.

    The host provides ``concept_images`` (one image set per concept, each with ``sample(index, rng)``),
    ``concept_names``, ``caption(template_index, concept)``, ``templates``, ``eval_batch_size``, ``eval_seed``,
    ``resample``, ``hparams.resolution`` and ``trainer``, and sets ``_eval_datasets = {}`` and
    ``_restored_resample_states = {}`` in ``__init__``.
    """

    def eval_batch_spec(self) -> EvalBatchSpec:
        """Ask the attached LightningModule for the latent shape and the number of timesteps."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or not hasattr(module, "eval_batch_spec"):
            raise RuntimeError("ConceptDataModule.val_dataloader needs a module with eval_batch_spec(); "
                               "call build_eval_dataset(spec) yourself when using the data module alone")
        return module.eval_batch_spec()

    def build_eval_dataset(self, spec: EvalBatchSpec, concept: int = 0) -> FixedEvalDataset:
        """The one-item dataset holding DVAR's evaluation batch (of concept ``concept``)."""
        dataset = FixedEvalDataset(self, spec, self.resample, concept)
        if concept in self._restored_resample_states:  # a resumed run redraws where the uninterrupted one was
            dataset.resample_generator.set_state(self._restored_resample_states.pop(concept))
        self._eval_datasets[concept] = dataset
        return dataset

    def state_dict(self) -> dict[str, Any]:
        """The generator states of the resampled evaluation parts (saved in checkpoints; empty without ``resample``).

        Every rank draws the same resampled parts, so rank 0's states serve all ranks.
        """
        if not self.resample:
            return {}
        return {"resample_states": {i: d.resample_generator.get_state() for i, d in self._eval_datasets.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the resampled evaluation parts from a checkpoint (applied when the datasets are built)."""
        self._restored_resample_states = dict(state_dict.get("resample_states", {}))

    def draw_eval_parts(
        self,
        spec: EvalBatchSpec,
        generator: torch.Generator,
        parts: Sequence[str],
        fixed: dict[str, Any] | None = None,
        concept: int = 0,
    ) -> dict[str, Any]:
        """Draw the named parts of the evaluation batch from ``generator`` (PAPER.md, "DVAR").

        Fixed images are the first ``eval_batch_size`` concept images (cycling), each with one augmentation;
        captions take templates in order, one per slot; latents are a fixed standard-normal draw for the VAE's
        reparameterisation; timesteps are distinct (``randperm(T)[:B]``). When ``fixed`` is given, the parts are
        being *resampled*: images and captions are then drawn at random, and timesteps uniformly. ``concept``
        picks the concept's images and prompt words (the fixed batch stays instance-only).
        """
        images = self.concept_images[concept]
        size, resample = self.eval_batch_size, fixed is not None
        side = self.hparams.resolution // spec.latent_downsample
        latent_shape = (size, spec.latent_channels, side, side)
        out: dict[str, Any] = {}
        # Draw in a fixed order regardless of `parts`, so the fixed batch never depends on the resample setting.
        if "images" in parts:
            seeds = torch.randint(0, 2**31 - 1, (size,), generator=generator).tolist()
            indices = torch.randint(0, len(images), (size,), generator=generator).tolist() if resample else list(
                range(size)
            )
            samples = [images.sample(i, np.random.default_rng(s)) for i, s in zip(indices, seeds)]
            out["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
            out["original_size"] = torch.stack([s["original_size"] for s in samples])
            out["crop_top_left"] = torch.stack([s["crop_top_left"] for s in samples])
        if "captions" in parts:
            if resample:
                picks = torch.randint(0, len(self.templates), (size,), generator=generator).tolist()
            else:
                picks = [i % len(self.templates) for i in range(size)]
            out["caption"] = [self.caption(i, concept) for i in picks]
        if "latents" in parts:
            out["latent_noise"] = torch.randn(latent_shape, generator=generator)
        if "noise" in parts:
            out["noise"] = torch.randn(latent_shape, generator=generator)
        if "timesteps" in parts and spec.noise_levels is not None:
            out["timesteps"] = spec.noise_levels(size, generator=generator, latent_size=(side, side), resample=resample)
        elif "timesteps" in parts:
            if resample:
                out["timesteps"] = torch.randint(0, spec.num_train_timesteps, (size,), generator=generator)
            else:
                out["timesteps"] = distinct_timesteps(size, spec.num_train_timesteps, generator=generator)
        return out


class FixedEvalDataset(Dataset):
    """One item: DVAR's evaluation batch. Fixed parts are drawn once; resampled parts are redrawn per access.

    Both draws use generators owned by this dataset, never the global RNG, so evaluating cannot change training.
    """

    def __init__(
        self, datamodule: FixedEvalBatchData, spec: EvalBatchSpec, resample: Sequence[str], concept: int = 0
    ) -> None:
        self.dm, self.spec, self.resample, self.concept = datamodule, spec, set(resample), concept
        generator = torch.Generator().manual_seed(datamodule.eval_seed)
        self.fixed = datamodule.draw_eval_parts(spec, generator, EVAL_PARTS, concept=concept)
        if len(datamodule.concept_images) > 1:
            self.fixed["concept"] = datamodule.concept_names[concept]  # logged as dvar_loss/<name>
        self.resample_generator = torch.Generator().manual_seed(datamodule.eval_seed + 1)
        # Keys under which the module may cache what only depends on fixed parts (latents; text states). They
        # digest those parts, so that one module fitted on another concept, seed or resolution misses the cache.
        if not {"images", "latents"} & self.resample:
            self.fixed["latents_cache_key"] = content_key(self.fixed["pixel_values"], self.fixed["latent_noise"])
        if "captions" not in self.resample:
            self.fixed["text_cache_key"] = content_key(self.fixed["caption"])

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.resample:
            return dict(self.fixed)
        redrawn = self.dm.draw_eval_parts(
            self.spec, self.resample_generator, tuple(self.resample), fixed=self.fixed, concept=self.concept
        )
        return {**self.fixed, **redrawn}
