"""ConceptDataModule: the concept images every method trains on, and DVAR's fixed evaluation batch."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.types import EVAL_DATALOADERS
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
)

from lightning_custom.data.class_images import WithClassSamples
from lightning_custom.data.concepts_list import ConceptSpec, parse_concepts
from lightning_custom.data.fleet import FleetLoader
from lightning_custom.data.images import (
    ConceptImages,
    convert_to_rgb,
    list_image_files,
    open_image,
    parse_background,
)
from lightning_custom.data.loader import (
    EpochShuffleSampler,
    ResumableDataLoader,
    _Progress,
    collate_with_token_ids,
)
from lightning_custom.data.prior import PriorPreservationData
from lightning_custom.data.templates import (
    TEMPLATES,
    check_templates,
    concept_phrase,
    format_prompt,
)
from lightning_custom.dvar.eval_batch import (  # noqa: F401 - EvalBatchSpec, content_key: their home before issue 26
    EVAL_PARTS,
    EvalBatchSpec,
    EvalPart,
    FixedEvalBatchData,
    FixedEvalDataset,
    content_key,
)
from lightning_custom.errors import UserInputError
from lightning_custom.families.base import denoiser_latent_patch
from lightning_custom.runtime.ranges import check_ranges
from lightning_custom.synthetic.embedded import resolve_instance_dir

log = logging.getLogger(__name__)


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


# The data module's placeholder when none is given: replaced by the attached module's at setup.
DEFAULT_PLACEHOLDER = "<concept>"


class ConceptDataModule(FixedEvalBatchData, PriorPreservationData, L.LightningDataModule):
    """Concept images with prompt templates, shared by every personalization method.

    Args:
        instance_data_dir: folder of 3-5 concept images (png/jpg/jpeg/webp; grayscale, palette, CMYK, 16-bit and
            transparent images are converted to RGB).
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
        concepts: several concepts in one run (Custom Diffusion): a list of mappings, or the path of a JSON file of
            one, each with ``instance_data_dir`` and ``placeholder_token``, optionally ``name``, ``class_noun``,
            ``class_prompt``, ``class_data_dir``. Replaces those single-concept arguments; DVAR then keeps one
            fixed batch and one loss series (``dvar_loss/<name>``) per concept.
        with_prior_preservation: pair every training sample with a class image (DreamBooth's prior preservation);
            the DVAR batch stays instance-only.
        class_data_dir: folder of class images, used whole; without it they are generated with the base model.
        class_prompt: prompt of the class images (default ``"a photo of a <class_noun>"``).
        num_class_images: number of class images to generate.
        class_cache_dir: cache of generated class images (default ``~/.cache/lightning_custom/class_images``);
            a folder per generation setting, with a ``manifest.json``, reused by later runs.
        class_inference_steps: sampling steps per generated class image.
        class_guidance_scale: classifier-free guidance scale of the generated class images.
        alpha_background: colour that transparent images are composited onto: ``white``, ``black`` or ``#rrggbb``.
    """

    def __init__(
        self,
        instance_data_dir: str = "embedded",
        placeholder_token: str = DEFAULT_PLACEHOLDER,
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
        concepts: list[dict[str, Any]] | str | None = None,
        with_prior_preservation: bool = False,
        class_data_dir: str | None = None,
        class_prompt: str | None = None,
        num_class_images: int = 100,
        class_cache_dir: str | None = None,
        class_inference_steps: int = 25,
        class_guidance_scale: float = 7.5,
        alpha_background: str = "white",
    ) -> None:
        super().__init__()
        # Logged as ``data_seed``: Lightning merges the data module's hyperparameters with the model's and refuses
        # a run where two keys of one name differ, and the model has its own ``seed``.
        self.save_hyperparameters(ignore=["seed"])
        self.save_hyperparameters({"data_seed": seed})
        self.alpha_background = parse_background(alpha_background)
        self.instance_data_dir = instance_data_dir = resolve_instance_dir(instance_data_dir)
        unknown = sorted(set(resample or ()) - set(EVAL_PARTS))
        if unknown:
            raise UserInputError(f"--data.resample: unknown part(s) {unknown}; choose from {list(EVAL_PARTS)}")
        check_ranges("data", {**self.hparams, "seed": seed})
        if prompt_templates is not None:  # an empty list is an error, not a request for the built-in templates
            check_templates(prompt_templates, "--data.prompt_templates")
        self.templates = list(prompt_templates) if prompt_templates is not None else list(TEMPLATES[learnable_property])
        self.placeholder_token, self.class_noun = placeholder_token, class_noun
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.eval_batch_size = eval_batch_size
        self.eval_seed = seed if eval_seed is None else eval_seed
        self.resample = list(resample or ())
        # Read and check the images now, so a bad folder fails before any model is loaded.
        self.concept_specs: list[ConceptSpec] | None = parse_concepts(concepts) if concepts is not None else None
        if self.concept_specs is None:
            self.concept_images = [self.read_images(instance_data_dir, "--data.instance_data_dir")]
        else:
            self.concept_images = [
                self.read_images(resolve_instance_dir(c.instance_data_dir), f"--data.concepts[{i}].instance_data_dir")
                for i, c in enumerate(self.concept_specs)
            ]
        self.images = self.concept_images[0]
        self.class_prompts: list[str | None] = []
        self.class_images: list[ConceptImages | None] = []
        if with_prior_preservation:
            self.check_class_sources(class_data_dir, class_prompt, num_class_images)
        self._progress = _Progress()
        # The evaluation datasets built so far (one per concept), and resample-generator states from a checkpoint.
        self._eval_datasets: dict[int, FixedEvalDataset] = {}
        self._restored_resample_states: dict[int, torch.Tensor] = {}

    @property
    def phrase(self) -> str:
        """The words for the concept inside a prompt."""
        return concept_phrase(self.placeholder_token, self.class_noun)

    def read_images(self, folder: str, argument: str, files: list | None = None) -> ConceptImages:
        """Read and check a folder of images (or the given ``files``) at this module's size and augmentation."""
        hp = self.hparams
        return ConceptImages(folder, hp.resolution, hp.center_crop, hp.random_flip, argument, files,
                             background=self.alpha_background)

    def setup(self, stage: str) -> None:
        """Load the cached class images and check the concepts' tokens against the module's."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or stage != "fit":
            return
        if hasattr(module, "eval_batch_spec"):
            self.check_resolution(module.eval_batch_spec().latent_downsample, denoiser_latent_patch(module))
        self.match_placeholder(module)
        # The training loader's collate tokenizes the captions with the module's tokenizer(s) (issue 15).
        self.caption_tokenizer = module.caption_tokenizer() if hasattr(module, "caption_tokenizer") else None
        if any(images is None for images in self.class_images):
            self.load_class_images(module)
        tokens = getattr(module, "placeholder_tokens", None)
        for i, spec in enumerate(self.concept_specs or []):
            if tokens is not None and spec.placeholder_token not in tokens:
                raise UserInputError(f"--data.concepts[{i}].placeholder_token: {spec.placeholder_token!r} is not "
                                     f"one of the model's tokens {tokens}")

    def match_placeholder(self, module: L.LightningModule) -> None:
        """Use the module's placeholder token in the captions (the CLI links the two; from Python, this does).

        A data module still on the default placeholder takes the module's (and its class noun, if it has one);
        a different explicit placeholder is an error, since the captions would never contain the trained token.
        """
        token = getattr(module, "placeholder_token", None)
        if self.concept_specs is not None or not isinstance(token, str) or token == self.placeholder_token:
            return
        if self.placeholder_token != DEFAULT_PLACEHOLDER:
            raise UserInputError(f"--data.placeholder_token: {self.placeholder_token!r} differs from the model's "
                                 f"placeholder_token {token!r}; the captions must contain the token being trained")
        self.placeholder_token = token
        if self.class_noun is None and getattr(module, "class_noun", None):
            self.class_noun = module.class_noun

    def check_resolution(self, latent_downsample: int, latent_patch: int = 1) -> None:
        """Refuse a resolution the model cannot map to a whole grid of latent patches.

        Args:
            latent_downsample: the VAE's downsampling factor (pixels per latent side).
            latent_patch: latents per side of one denoiser token (FLUX packs 2x2 latents; SD3 embeds
                ``patch_size`` patches; UNets 1).
        """
        resolution = self.hparams.resolution
        multiple = latent_downsample * latent_patch
        if resolution % multiple:
            lower = resolution // multiple * multiple
            choices = f"{lower} or {lower + multiple}" if lower else str(multiple)
            reason = "the model's VAE downsampling factor" if latent_patch == 1 else (
                f"the VAE's downsampling {latent_downsample} x the denoiser's {latent_patch}x{latent_patch} latent "
                "patches")
            raise UserInputError(f"--data.resolution: {resolution} is not a multiple of {multiple}, {reason}; use "
                                 f"e.g. {choices}")

    @property
    def concept_names(self) -> list[str]:
        """One name per concept (``dvar_loss/<name>``); ``["concept"]`` in single-concept mode."""
        return [c.name for c in self.concept_specs] if self.concept_specs else ["concept"]

    def concept_phrase(self, index: int) -> str:
        """The prompt words of concept ``index`` ("<new1> cat")."""
        if self.concept_specs is None:
            return self.phrase
        spec = self.concept_specs[index]
        return concept_phrase(spec.placeholder_token, spec.class_noun)

    def caption(self, template: int, concept: int = 0) -> str:
        """Template number ``template`` with concept ``concept``'s words (what DVAR's fixed batch captions are)."""
        return format_prompt(self.templates[template], self.concept_phrase(concept))

    def train_dataset(self) -> Dataset:
        """The training dataset (a pure function of the seed and the index): concepts in turn, class images added."""
        parts: list[Dataset] = []
        for i, images in enumerate(self.concept_images):
            part = ConceptDataset(images, self.templates, self.concept_phrase(i), self.hparams.repeats, self.seed + i)
            if self.hparams.with_prior_preservation:
                if self.class_images[i] is None:
                    raise RuntimeError("class images are not loaded: call load_class_images(module) or use Trainer.fit")
                part = WithClassSamples(part, self.class_images[i], self.class_prompts[i], self.seed + i)
            parts.append(part)
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def train_dataloader(self) -> ResumableDataLoader | FleetLoader:
        """Shuffled, resumable batches of ``{"pixel_values", "caption", "original_size", "crop_top_left"}``.

        For a module that trains a fleet of independent concepts (``trains_a_fleet``), a :class:`FleetLoader` of
        ``{concept name: batch}``, each concept's batches exactly those of its own run.
        """
        module = self.trainer.lightning_module if self.trainer is not None else None
        if getattr(module, "trains_a_fleet", False):
            return self.fleet_loader(module)
        dataset = self.train_dataset()
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed),
            num_workers=self.num_workers,
            drop_last=len(dataset) >= self.batch_size,
            persistent_workers=self.num_workers > 0,
            progress=self._progress,
            collate_fn=partial(collate_with_token_ids, tokenize=getattr(self, "caption_tokenizer", None)),
        )

    def fleet_loader(self, module: Any) -> FleetLoader:
        """Per-concept loaders as each concept's own run would build them (its images, the run's seed), served
        together for the concepts ``module.active_concepts`` still trains."""
        collate = partial(collate_with_token_ids, tokenize=getattr(self, "caption_tokenizer", None))
        loaders = {}
        for i, name in enumerate(self.concept_names):
            repeats = getattr(self.concept_specs[i], "repeats", None) if self.concept_specs else None
            dataset = ConceptDataset(self.concept_images[i], self.templates, self.concept_phrase(i),
                                     repeats or self.hparams.repeats, self.seed)
            loader = DataLoader(dataset, batch_size=self.batch_size, sampler=EpochShuffleSampler(len(dataset), self.seed),
                                drop_last=len(dataset) >= self.batch_size, collate_fn=collate)
            if self.trainer is not None:  # under DDP, each rank its share, exactly as Lightning shares a single run's
                from lightning.pytorch.trainer.connectors.data_connector import (
                    _process_dataloader,
                )
                from lightning.pytorch.trainer.states import RunningStage

                loader = _process_dataloader(self.trainer, self.trainer.state.fn, RunningStage.TRAINING, loader)
            loaders[name] = loader
        return FleetLoader(loaders, lambda: list(module.active_concepts), self._progress)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count training batches as they are consumed (not as they are prefetched), for exact resume."""
        if self.trainer is not None and self.trainer.training:
            self._progress.consumed += 1
        return batch

    def val_dataloader(self) -> EVAL_DATALOADERS:
        """DVAR's fixed evaluation batch, served whole (``batch_size=None``); one loader per concept, or one loader
        of every concept's batch for a module that evaluates them together (``evaluates_concepts_together``: a
        fleet with a batched forward)."""
        spec = self.eval_batch_spec()
        datasets = [self.build_eval_dataset(spec, i) for i in range(len(self.concept_images))]
        module = self.trainer.lightning_module if self.trainer is not None else None
        if len(datasets) > 1 and getattr(module, "evaluates_concepts_together", False):
            from lightning_custom.data.fleet import FleetEvalDataset

            together = FleetEvalDataset(dict(zip(self.concept_names, datasets)))
            return DataLoader(together, batch_size=None, num_workers=0)  # type: ignore[arg-type]
        loaders = [DataLoader(dataset, batch_size=None, num_workers=0) for dataset in datasets]
        return loaders[0] if len(loaders) == 1 else loaders


def check_concept_images(init_args: Mapping[str, Any]) -> None:
    """Open every concept image that these ``ConceptDataModule`` arguments name, without building anything.

    The CLI calls it before the model is instantiated (jsonargparse builds the model, and so loads its weights,
    before the data module), so an empty folder, a non-image or a truncated file fails in a second, not after the
    model has loaded.
    """
    background = parse_background(init_args.get("alpha_background") or "white")
    concepts = init_args.get("concepts")
    if concepts is not None:
        folders = [(resolve_instance_dir(spec.instance_data_dir), f"--data.concepts[{i}].instance_data_dir")
                   for i, spec in enumerate(parse_concepts(concepts))]
    else:
        folders = [(resolve_instance_dir(init_args.get("instance_data_dir") or "embedded"), "--data.instance_data_dir")]
    for folder, argument in folders:
        for file in list_image_files(folder, argument):
            convert_to_rgb(open_image(file), background, file)


def check_data_config(data: Any) -> None:
    """:func:`check_concept_images` for the CLI's ``data`` config (``class_path`` + ``init_args``), if it names a
    :class:`ConceptDataModule` (or a subclass); other data modules are left to check themselves."""
    class_path = getattr(data, "class_path", None) or (data.get("class_path") if isinstance(data, Mapping) else None)
    if not class_path:
        return
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return  # jsonargparse reports an unknown class itself
    if isinstance(cls, type) and issubclass(cls, ConceptDataModule):
        init_args = getattr(data, "init_args", None) if not isinstance(data, Mapping) else data.get("init_args")
        check_concept_images(init_args or {})
