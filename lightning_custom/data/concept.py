"""ConceptDataModule: the concept images every method trains on, and DVAR's fixed evaluation batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.types import EVAL_DATALOADERS
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_custom.data.images import crop_box, list_image_files, load_rgb_image, resize_shorter_side, to_tensor
from lightning_custom.data.templates import TEMPLATES, concept_phrase, format_prompt
from lightning_custom.diffusion import distinct_timesteps
from lightning_custom.errors import UserInputError

EvalPart = Literal["images", "latents", "noise", "captions", "timesteps"]
EVAL_PARTS: tuple[str, ...] = ("images", "latents", "noise", "captions", "timesteps")


@dataclass(frozen=True)
class EvalBatchSpec:
    """What the data module must know about the model to draw the fixed batch's noise and timesteps."""

    num_train_timesteps: int
    latent_channels: int
    latent_downsample: int


class ConceptImages:
    """Concept images decoded and resized once, with a deterministic augmentation per (seed, index)."""

    def __init__(self, folder: str, resolution: int, center_crop: bool, random_flip: bool, argument: str) -> None:
        self.files = list_image_files(folder, argument)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.images: list[Image.Image] = []
        self.original_sizes: list[tuple[int, int]] = []
        for file in self.files:
            image = load_rgb_image(file)
            self.original_sizes.append((image.height, image.width))
            self.images.append(resize_shorter_side(image, resolution))

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """Image ``index`` with a crop and flip drawn from ``rng``, plus its SDXL micro-conditioning sizes."""
        image = self.images[index % len(self.images)]
        top, left = crop_box(image.size, self.resolution, self.center_crop, rng)
        flip = bool(self.random_flip and rng.random() < 0.5)
        return {
            "pixel_values": to_tensor(image, top, left, self.resolution, flip),
            "original_size": torch.tensor(self.original_sizes[index % len(self.images)]),
            "crop_top_left": torch.tensor((top, left)),
        }


class ConceptDataset(Dataset):
    """``repeats`` passes over the concept images; item ``i`` is a pure function of ``(seed, i)``.

    Making every augmentation and caption a function of the index (not of a global RNG) is what lets a resumed
    run see exactly the samples an uninterrupted run would have seen.
    """

    def __init__(self, images: ConceptImages, templates: Sequence[str], phrase: str, repeats: int, seed: int) -> None:
        self.images, self.templates, self.phrase = images, list(templates), phrase
        self.repeats, self.seed = repeats, seed

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, index])
        item = self.images.sample(index % len(self.images), rng)
        item["caption"] = format_prompt(self.templates[int(rng.integers(len(self.templates)))], self.phrase)
        return item


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)``; Lightning calls ``set_epoch`` each epoch."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


class _Progress:
    """Batches consumed by training in the current epoch, shared by a loader and its DDP re-instantiation."""

    def __init__(self) -> None:
        self.consumed = 0
        self.skip = 0


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside an epoch is saved in Lightning checkpoints.

    Lightning stores ``state_dict()`` of stateful train loaders and calls ``load_state_dict`` on resume; the
    next epoch iterator then skips the batches that were already trained on.
    """

    def __init__(self, *args: Any, progress: _Progress | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress if progress is not None else _Progress()

    def __iter__(self):
        iterator = super().__iter__()
        skip, self.progress.skip = self.progress.skip, 0
        self.progress.consumed = skip
        for _ in range(skip):
            next(iterator)
        yield from iterator

    def state_dict(self) -> dict[str, int]:
        """Batches consumed so far in this epoch (``0`` at an epoch boundary)."""
        return {"consumed": self.progress.consumed % max(1, len(self))}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Skip the consumed batches at the next iteration."""
        self.progress.skip = int(state_dict.get("consumed", 0))


class FixedEvalDataset(Dataset):
    """One item: DVAR's evaluation batch. Fixed parts are drawn once; resampled parts are redrawn per access.

    Both draws use generators owned by this dataset, never the global RNG, so evaluating cannot change training.
    """

    def __init__(self, datamodule: ConceptDataModule, spec: EvalBatchSpec, resample: Sequence[str]) -> None:
        self.dm, self.spec, self.resample = datamodule, spec, set(resample)
        self.fixed = datamodule.draw_eval_parts(spec, torch.Generator().manual_seed(datamodule.eval_seed), EVAL_PARTS)
        self.resample_generator = torch.Generator().manual_seed(datamodule.eval_seed + 1)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.resample:
            return dict(self.fixed)
        redrawn = self.dm.draw_eval_parts(self.spec, self.resample_generator, tuple(self.resample), fixed=self.fixed)
        return {**self.fixed, **redrawn}


class ConceptDataModule(L.LightningDataModule):
    """Concept images with prompt templates, shared by every personalization method.

    Args:
        instance_data_dir: folder of 3-5 concept images (png/jpg/jpeg/webp, 8-bit RGB).
        placeholder_token: the token that stands for the concept (linked from the model by the CLI).
        class_noun: optional class word after the token ("sks dog"), for DreamBooth-style prompts.
        learnable_property: ``"object"`` or ``"style"`` prompt templates.
        prompt_templates: your own templates with one ``{}``; replaces the built-in ones.
        resolution: square training resolution in pixels.
        center_crop: center crop (else a random crop).
        random_flip: mirror images with probability 0.5.
        repeats: passes over the images per epoch.
        batch_size: training batch size per device.
        num_workers: DataLoader workers for training.
        seed: seed of the training augmentations and shuffling.
        eval_batch_size: size of DVAR's fixed evaluation batch.
        eval_seed: seed of the fixed batch (defaults to ``seed``).
        resample: parts of the evaluation batch to redraw at every evaluation (the semi-deterministic study):
            any of ``images``, ``latents``, ``noise``, ``captions``, ``timesteps``.
    """

    def __init__(
        self,
        instance_data_dir: str = "embedded",
        placeholder_token: str = "<concept>",
        class_noun: str | None = None,
        learnable_property: Literal["object", "style"] = "object",
        prompt_templates: list[str] | None = None,
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: bool = True,
        repeats: int = 100,
        batch_size: int = 2,
        num_workers: int = 0,
        seed: int = 59,
        eval_batch_size: int = 4,
        eval_seed: int | None = None,
        resample: list[EvalPart] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if instance_data_dir in ("embedded", "embedded:cat-toy"):
            from lightning_custom.components import embedded_concept_path

            instance_data_dir = embedded_concept_path()
        self.instance_data_dir = instance_data_dir
        unknown = sorted(set(resample or ()) - set(EVAL_PARTS))
        if unknown:
            raise UserInputError(f"--data.resample: unknown part(s) {unknown}; choose from {list(EVAL_PARTS)}")
        for name, value in (("resolution", resolution), ("batch_size", batch_size), ("repeats", repeats),
                            ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise UserInputError(f"--data.{name}: must be at least 1, got {value}")
        self.templates = list(prompt_templates) if prompt_templates else list(TEMPLATES[learnable_property])
        if any("{}" not in t for t in self.templates):
            raise UserInputError("--data.prompt_templates: every template needs one '{}' for the placeholder")
        self.placeholder_token, self.class_noun = placeholder_token, class_noun
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.eval_batch_size = eval_batch_size
        self.eval_seed = seed if eval_seed is None else eval_seed
        self.resample = list(resample or ())
        # Read and check the images now, so a bad folder fails before any model is loaded.
        self.images = ConceptImages(instance_data_dir, resolution, center_crop, random_flip, "--data.instance_data_dir")
        self._progress = _Progress()

    @property
    def phrase(self) -> str:
        """The words for the concept inside a prompt."""
        return concept_phrase(self.placeholder_token, self.class_noun)

    def train_dataset(self) -> ConceptDataset:
        """The training dataset (a pure function of the seed and the index)."""
        return ConceptDataset(self.images, self.templates, self.phrase, self.hparams.repeats, self.seed)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled, resumable batches of ``{"pixel_values", "caption", "original_size", "crop_top_left"}``."""
        dataset = self.train_dataset()
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed),
            num_workers=self.num_workers,
            drop_last=len(dataset) >= self.batch_size,
            persistent_workers=self.num_workers > 0,
            progress=self._progress,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count training batches as they are consumed (not as they are prefetched), for exact resume."""
        if self.trainer is not None and self.trainer.training:
            self._progress.consumed += 1
        return batch

    def eval_batch_spec(self) -> EvalBatchSpec:
        """Ask the attached LightningModule for the latent shape and the number of timesteps."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or not hasattr(module, "eval_batch_spec"):
            raise RuntimeError("ConceptDataModule.val_dataloader needs a module with eval_batch_spec(); "
                               "call build_eval_dataset(spec) yourself when using the data module alone")
        return module.eval_batch_spec()

    def build_eval_dataset(self, spec: EvalBatchSpec) -> FixedEvalDataset:
        """The one-item dataset holding DVAR's evaluation batch."""
        return FixedEvalDataset(self, spec, self.resample)

    def val_dataloader(self) -> EVAL_DATALOADERS:
        """DVAR's fixed evaluation batch, served whole (``batch_size=None``)."""
        return DataLoader(self.build_eval_dataset(self.eval_batch_spec()), batch_size=None, num_workers=0)

    def draw_eval_parts(
        self,
        spec: EvalBatchSpec,
        generator: torch.Generator,
        parts: Sequence[str],
        fixed: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Draw the named parts of the evaluation batch from ``generator`` (PAPER.md, "DVAR").

        Fixed images are the first ``eval_batch_size`` concept images (cycling), each with one augmentation;
        captions take templates in order, one per slot; latents are a fixed standard-normal draw for the VAE's
        reparameterisation; timesteps are distinct (``randperm(T)[:B]``). When ``fixed`` is given, the parts are
        being *resampled*: images and captions are then drawn at random, and timesteps uniformly.
        """
        size, resample = self.eval_batch_size, fixed is not None
        side = self.hparams.resolution // spec.latent_downsample
        latent_shape = (size, spec.latent_channels, side, side)
        out: dict[str, Any] = {}
        # Draw in a fixed order regardless of `parts`, so the fixed batch never depends on the resample setting.
        if "images" in parts:
            seeds = torch.randint(0, 2**31 - 1, (size,), generator=generator).tolist()
            indices = torch.randint(0, len(self.images), (size,), generator=generator).tolist() if resample else list(
                range(size)
            )
            samples = [self.images.sample(i, np.random.default_rng(s)) for i, s in zip(indices, seeds)]
            out["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
            out["original_size"] = torch.stack([s["original_size"] for s in samples])
            out["crop_top_left"] = torch.stack([s["crop_top_left"] for s in samples])
        if "captions" in parts:
            if resample:
                picks = torch.randint(0, len(self.templates), (size,), generator=generator).tolist()
            else:
                picks = [i % len(self.templates) for i in range(size)]
            out["caption"] = [format_prompt(self.templates[i], self.phrase) for i in picks]
        if "latents" in parts:
            out["latent_noise"] = torch.randn(latent_shape, generator=generator)
        if "noise" in parts:
            out["noise"] = torch.randn(latent_shape, generator=generator)
        if "timesteps" in parts:
            if resample:
                out["timesteps"] = torch.randint(0, spec.num_train_timesteps, (size,), generator=generator)
            else:
                out["timesteps"] = distinct_timesteps(size, spec.num_train_timesteps, generator=generator)
        return out
