"""Prior preservation for the concept data module: where each concept's class images come from."""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_custom.data.class_images import (
    ClassImageRequest,
    default_cache_root,
    default_class_prompt,
    ensure_class_images,
    generation_pipeline,
)
from lightning_custom.data.concepts_list import ConceptSpec
from lightning_custom.errors import UserInputError


class PriorPreservationData:
    """Class images per concept for :class:`~lightning_custom.data.ConceptDataModule`.

    A concept's class images come from its ``class_data_dir`` (read and checked at construction, like the concept
    images) or are generated with the attached module's base model in ``prepare_data`` and cached on disk.
    """

    hparams: Any
    trainer: Any
    seed: int
    class_noun: str | None
    concept_specs: list[ConceptSpec] | None
    class_prompts: list[str | None]
    class_images: list[Any]

    def read_images(self, folder: str, argument: str, files: list | None = None) -> Any:
        """Images at the data module's resolution and augmentation (implemented by the data module)."""
        raise NotImplementedError

    def check_class_sources(self, class_data_dir: str | None, class_prompt: str | None, count: int) -> None:
        """Resolve each concept's class prompt and read its class folder, if it has one."""
        if count < 1:
            raise UserInputError(f"--data.num_class_images: must be at least 1, got {count}")
        single = ConceptSpec("concept", "", "", self.class_noun, class_prompt, class_data_dir)
        for i, spec in enumerate(self.concept_specs or [single]):
            where = f"--data.concepts[{i}]." if self.concept_specs else "--data."
            prompt = spec.class_prompt or default_class_prompt(spec.class_noun)
            if not prompt:
                raise UserInputError(f"{where}class_prompt: prior preservation needs a class prompt or a class_noun")
            self.class_prompts.append(prompt)
            folder = spec.class_data_dir
            self.class_images.append(self.read_images(folder, f"{where}class_data_dir") if folder else None)

    def class_image_request(self, index: int, module: L.LightningModule) -> ClassImageRequest:
        """The generation settings of concept ``index``'s class images, from the module's base model."""
        hp = self.hparams
        return ClassImageRequest(
            model=str(module.hparams.get("pretrained_model_name_or_path")), prompt=self.class_prompts[index],
            count=hp.num_class_images, resolution=hp.resolution, seed=self.seed,
            num_inference_steps=hp.class_inference_steps, guidance_scale=hp.class_guidance_scale,
            revision=module.hparams.get("revision"),
        )

    def load_class_images(self, module: L.LightningModule) -> None:
        """Read the generated class images of every concept without a folder, generating what the cache lacks.

        The base model is ``module``'s own components, before any training step (LoRA starts at zero, new tokens
        are not in the class prompt), moved to the trainer's device for sampling.
        """
        root = self.hparams.class_cache_dir or default_cache_root()
        device = self.trainer.strategy.root_device if self.trainer is not None else module.device
        for i, images in enumerate(self.class_images):
            if images is None:
                request = self.class_image_request(i, module)
                files = ensure_class_images(request, root, lambda: generation_pipeline(module, device))
                self.class_images[i] = self.read_images(str(request.folder(root)), "--data.class_cache_dir", files)

    def prepare_data(self) -> None:
        """Generate missing class images (Lightning calls this once per node, before ``setup``)."""
        if any(images is None for images in self.class_images) and self.trainer is not None:
            self.load_class_images(self.trainer.lightning_module)
