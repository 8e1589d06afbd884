"""The paper's CLIP early-stopping baseline: sample images while training and stop when CLIP-I stops improving."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_custom.errors import UserInputError
from lightning_custom.runtime.ranges import check_ranges

log = logging.getLogger(__name__)


def probe_due(step: int, every_n_steps: int, history: Sequence[Sequence[float]]) -> bool:
    """Whether a periodic probe should run at ``step``: a positive multiple of the period not yet recorded.

    ``history`` holds ``[step, ...]`` rows; Lightning may call batch-end hooks twice for one step on resume.
    """
    return step > 0 and step % every_n_steps == 0 and not (history and history[-1][0] >= step)


def patience_update(best: float | None, wait: int, value: float, min_delta: float) -> tuple[float, int, bool]:
    """One check of a "maximise with patience" rule: ``(best, wait, improved)`` after seeing ``value``.

    ``value`` improves when it exceeds the best so far by more than ``min_delta`` (the first value always does);
    otherwise the number of checks without improvement, ``wait``, grows by one.
    """
    if best is None or value > best + min_delta:
        return value, 0, True
    return best, wait + 1, False


def patience_stop_index(values: Sequence[float], patience: int, min_delta: float, min_index: int = 0) -> int | None:
    """Index of the check at which the rule stops (``patience`` checks in a row without improvement), or ``None``."""
    best, wait = None, 0
    for index, value in enumerate(values):
        best, wait, _ = patience_update(best, wait, value, min_delta)
        if wait >= patience and index >= min_index:
            return index
    return None


class CLIPEarlyStopping(Callback):
    """CLIP early stopping (the paper's baseline): every ``every_n_steps`` optimizer steps, sample ``num_images``
    images from the training prompts with the current weights, score their CLIP-I against the training images, and
    stop once it has not improved by more than ``min_delta`` for ``patience`` checks in a row.

    Costly by design: it runs the sampler during training. Sampling uses its own seeds (the same ones at every
    check, so only the weights change the score) and leaves every RNG of training untouched. The score is computed
    on rank 0 and broadcast, so all ranks stop together. ``stopped_by`` in ``summary.json`` is ``"clip"``.
    With several concepts in one run (Custom Diffusion), the data module's first concept is the one scored.

    Args:
        clip_model: CLIP model, a hub id or a local folder (the paper: ViT-B/32).
        every_n_steps: check every this many optimizer steps (the paper: 50).
        num_images: images sampled per check (the paper: 8).
        patience: checks without improvement before stopping (the paper: 6 for TI and Custom Diffusion, 3 for LoRA).
        min_delta: the least increase of CLIP-I that counts as an improvement (the paper: 0.02; 0.04 for LoRA).
        prompts: prompt templates with ``{}`` for the concept; default: the data module's training templates.
        num_inference_steps: denoising steps per sample.
        guidance_scale: classifier-free guidance scale.
        scheduler: sampler, ``"default"`` (the model's own) or ``ddim``, ``dpm++``, ``euler``, ``pndm``, ``ddpm``;
            unset: ``ddim`` (the paper's) on SD / SDXL, the model's own flow sampler on FLUX / SD3. A DDPM-family
            sampler on a flow model is refused in one line when the fit starts.
        seed: image ``i`` of every check uses seed ``seed + i``.
        batch_size: images generated at once.
        min_steps: never stop before this many optimizer steps.
        stop: if ``False``, only record the CLIP-I series.
        verbose: print the reason for stopping.
    """

    def __init__(
        self,
        clip_model: str = "openai/clip-vit-base-patch32",
        every_n_steps: int = 50,
        num_images: int = 8,
        patience: int = 6,
        min_delta: float = 0.02,
        prompts: list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        scheduler: str | None = None,
        seed: int = 0,
        batch_size: int = 4,
        min_steps: int = 0,
        stop: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        check_ranges("CLIPEarlyStopping", locals())
        if prompts is not None and not prompts:
            raise UserInputError("CLIPEarlyStopping.prompts: give at least one prompt, or leave it unset")
        self.clip_model, self.every_n_steps, self.num_images = clip_model, every_n_steps, num_images
        self.patience, self.min_delta, self.prompts = patience, min_delta, prompts
        self.num_inference_steps, self.guidance_scale, self.scheduler = num_inference_steps, guidance_scale, scheduler
        self.seed, self.batch_size, self.min_steps = seed, batch_size, min_steps
        self.stop, self.verbose = stop, verbose
        self.history: list[list[float]] = []
        self.best: float | None = None
        self.best_step: int | None = None
        self.wait = 0
        self.seconds = 0.0
        self.stop_step: int | None = None
        self.stopped_by: str | None = None
        self.stop_reason = ""
        self._scorer: Any = None
        self._references: torch.Tensor | None = None
        self._sample_prompts: list[str] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, clip_model=self.clip_model)

    # ------------------------------------------------------------------------------------------------ setup
    def concept_images(self, trainer: L.Trainer) -> list:
        """The training images, as PIL images at their original size."""
        from lightning_custom.data.images import load_rgb_image

        images = getattr(getattr(trainer, "datamodule", None), "images", None)
        files = getattr(images, "files", None)
        if not files:
            raise UserInputError("CLIPEarlyStopping: the data module exposes no training images (datamodule.images.files)")
        return [load_rgb_image(f) for f in files]

    def sample_prompts(self, trainer: L.Trainer) -> list[str]:
        """``num_images`` prompts: the templates in order (cycling), with the concept phrase in place of ``{}``."""
        from lightning_custom.data.templates import format_prompt

        datamodule = getattr(trainer, "datamodule", None)
        templates = self.prompts or list(getattr(datamodule, "templates", []) or [])
        phrase = getattr(datamodule, "phrase", None) or getattr(trainer.lightning_module, "placeholder_token", None)
        if not templates or not phrase:
            raise UserInputError("CLIPEarlyStopping: no prompts; set prompts or use a data module with templates")
        return [format_prompt(templates[i % len(templates)], phrase) for i in range(self.num_images)]

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_custom.inference.pipelines import check_sampler

        scheduler = getattr(pl_module, "noise_scheduler", None)  # absent on a module of your own without one
        if scheduler is not None:
            check_sampler(self.sampler_name(pl_module), type(scheduler).__name__,
                          f"{type(pl_module).__name__}'s model", "CLIPEarlyStopping.scheduler")
        self.setup_scoring(trainer, pl_module)

    def sampler_name(self, pl_module: L.LightningModule) -> str:
        """The sampler of the checks: the one asked for, else DDIM on SD / SDXL and the model's own on flow models."""
        if self.scheduler is not None:
            return self.scheduler
        family = getattr(pl_module, "family", None)
        return "default" if getattr(family, "is_flow", False) else "ddim"

    def setup_scoring(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fix the sampling prompts; on rank 0 load CLIP and embed the training images once."""
        self._sample_prompts = self.sample_prompts(trainer)
        if not trainer.is_global_zero:
            return
        from lightning_custom.inference.metrics import load_clip

        if self._scorer is None:
            self._scorer = load_clip(self.clip_model, device=pl_module.device, argument="CLIPEarlyStopping.clip_model")
        self._references = self._scorer.image_embeddings(self.concept_images(trainer))

    # ------------------------------------------------------------------------------------------------ checks
    def score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """CLIP-I of ``num_images`` fresh samples against the training images."""
        from lightning_custom.inference.metrics import mean_similarity_to_references
        from lightning_custom.inference.pipelines import pipeline_from_module
        from lightning_custom.inference.sampling import generate

        pipe = pipeline_from_module(pl_module, self.sampler_name(pl_module))
        seeds = [self.seed + i for i in range(self.num_images)]
        with trainer.precision_plugin.forward_context():
            images = generate(pipe, self._sample_prompts, seeds, guidance_scale=self.guidance_scale,
                              num_inference_steps=self.num_inference_steps, batch_size=self.batch_size)
        return mean_similarity_to_references(self._scorer.image_embeddings(images), self._references).mean

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not probe_due(step, self.every_n_steps, self.history):
            return
        start = time.perf_counter()
        value = self.score(trainer, pl_module) if trainer.is_global_zero else 0.0
        value = float(trainer.strategy.broadcast(value, src=0))
        self.seconds += time.perf_counter() - start
        self.history.append([step, value])
        self.best, self.wait, improved = patience_update(self.best, self.wait, value, self.min_delta)
        if improved:
            self.best_step = step
        pl_module.log("clip_i", value, prog_bar=True, batch_size=1)
        if self.stop and self.stop_step is None and self.wait >= self.patience and step >= self.min_steps:
            trainer.should_stop = True
            self.stop_step, self.stopped_by = step, "clip"
            self.stop_reason = (
                f"CLIP early stopping: CLIP-I has not improved by more than {self.min_delta} for {self.wait} checks "
                f"(best {self.best:.4f} at step {self.best_step}) at step {step}; stopping."
            )
            if self.verbose and trainer.is_global_zero:
                log.info(self.stop_reason)
                print(self.stop_reason)

    def summary_fields(self) -> dict[str, Any]:
        """Entries for ``summary.json``: the CLIP-I series, the best value and step, the time spent sampling."""
        return {
            "clip_history": self.history,
            "clip_best": self.best,
            "clip_best_step": self.best_step,
            "clip_seconds": round(self.seconds, 3),
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history, "best": self.best, "best_step": self.best_step, "wait": self.wait,
            "seconds": self.seconds, "stop_step": self.stop_step, "stopped_by": self.stopped_by,
            "stop_reason": self.stop_reason,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [list(p) for p in state_dict.get("history", [])]
        self.best = state_dict.get("best")
        self.best_step = state_dict.get("best_step")
        self.wait = int(state_dict.get("wait", 0))
        self.seconds = float(state_dict.get("seconds", 0.0))
        self.stop_step = state_dict.get("stop_step")
        self.stopped_by = state_dict.get("stopped_by")
        self.stop_reason = state_dict.get("stop_reason", "")
