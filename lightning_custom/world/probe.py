"""A callback that scores the concept with the world's encoder during training (it never stops training).

Every ``every_n_steps`` optimizer steps (and before the first), it samples images from the training prompt and
from evaluation prompts that put the concept on new backgrounds, and records identity similarity (generated vs
concept images) and prompt fidelity (the encoder names the prompted background). The benchmark replays the
encoder-based early stopping rule (the CLIP early-stopping analogue) on the training-prompt series, and reads each
variant's quality at its stop step from this series. Sampling forks the RNG, so training is unchanged by it.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_custom.callbacks.clip_early_stopping import probe_due
from lightning_custom.errors import UserInputError


class WorldProbe(Callback):
    """Identity similarity and prompt fidelity of samples, by the world's encoder, every ``every_n_steps`` steps.

    Args:
        every_n_steps: probe every this many optimizer steps (also once before training).
        eval_prompts: templates with ``{}`` for the concept phrase, one per entry of ``eval_backgrounds``.
        eval_backgrounds: the background each evaluation prompt asks for (prompt fidelity's target).
        train_prompt: the template the encoder-based early stopping rule scores (as CLIP early stopping does).
        num_images: images per training prompt check, and per evaluation prompt.
        encoder: folder of a saved :class:`~lightning_custom.world.encoder.WorldEncoder` (default: shipped one).
        num_inference_steps: DDIM steps per sample.
        guidance_scale: classifier-free guidance scale.
        seed: image ``i`` uses seed ``seed + i`` at every check, so only the weights change the scores.
    """

    def __init__(self, every_n_steps: int = 10, eval_prompts: list[str] | None = None,
                 eval_backgrounds: list[str] | None = None, train_prompt: str = "a photo of a {}", num_images: int = 4,
                 encoder: str | None = None, num_inference_steps: int = 10, guidance_scale: float = 4.0,
                 seed: int = 0) -> None:
        super().__init__()
        if every_n_steps < 1 or num_images < 1:
            raise UserInputError("WorldProbe: every_n_steps and num_images must be at least 1")
        eval_prompts, eval_backgrounds = list(eval_prompts or []), list(eval_backgrounds or [])
        if len(eval_prompts) != len(eval_backgrounds):
            raise UserInputError("WorldProbe: give one eval_backgrounds entry per eval_prompts entry")
        self.every_n_steps, self.eval_prompts, self.eval_backgrounds = every_n_steps, eval_prompts, eval_backgrounds
        self.train_prompt, self.num_images, self.encoder_path = train_prompt, num_images, encoder
        self.num_inference_steps, self.guidance_scale, self.seed = num_inference_steps, guidance_scale, seed
        self.history: list[list[float]] = []  # [step, identity (train prompt), identity (eval), fidelity (eval)]
        self.seconds = 0.0
        self._encoder: Any = None
        self._references: list = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_custom.data.images import load_rgb_image
        from lightning_custom.world.encoder import WorldEncoder

        self._encoder = WorldEncoder.load(self.encoder_path)
        files = getattr(getattr(trainer.datamodule, "images", None), "files", None)
        if not files:
            raise UserInputError("WorldProbe: the data module exposes no training images (datamodule.images.files)")
        self._references = [load_rgb_image(f) for f in files]
        if not self.history:
            self.probe(trainer, pl_module)

    def scores(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[float]:
        """``[identity (train prompt), identity (eval prompts), fidelity (eval prompts)]`` for the current weights."""
        import numpy as np

        from lightning_custom.data.templates import format_prompt
        from lightning_custom.sampling import generate, pipeline_from_module
        from lightning_custom.world.encoder import identity_similarity, judge

        phrase = getattr(trainer.datamodule, "phrase", None) or pl_module.placeholder_token
        n = self.num_images
        prompts = [format_prompt(self.train_prompt, phrase)] * n
        for template in self.eval_prompts:
            prompts += [format_prompt(template, phrase)] * n
        size = self._references[0].size[0]
        pipe = pipeline_from_module(pl_module, "ddim")
        images = generate(pipe, prompts, [self.seed + i for i in range(len(prompts))], height=size, width=size,
                          guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
                          batch_size=len(prompts))
        identity_train = identity_similarity(self._encoder, images[:n], self._references)
        if not self.eval_prompts:
            return [identity_train, float("nan"), float("nan")]
        evaluated = images[n:]
        identity_eval = identity_similarity(self._encoder, evaluated, self._references)
        predicted = judge(self._encoder, evaluated).labels["background"]
        targets = [b for b in self.eval_backgrounds for _ in range(n)]
        return [identity_train, identity_eval, float(np.mean([p == t for p, t in zip(predicted, targets)]))]

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start = time.perf_counter()
        was_training = pl_module.training
        values = self.scores(trainer, pl_module)
        pl_module.train(was_training)
        self.seconds += time.perf_counter() - start
        self.history.append([trainer.global_step, *values])

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if probe_due(trainer.global_step, self.every_n_steps, self.history):
            self.probe(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.history and self.history[-1][0] < trainer.global_step:
            self.probe(trainer, pl_module)

    def summary_fields(self) -> dict[str, Any]:
        """``world_probe_history`` rows ``[step, identity_train, identity_eval, fidelity]`` and the seconds spent."""
        return {"world_probe_history": self.history, "world_probe_seconds": round(self.seconds, 3),
                "world_probe_every_n_steps": self.every_n_steps}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "seconds": self.seconds}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [list(r) for r in state_dict.get("history", [])]
        self.seconds = float(state_dict.get("seconds", 0.0))
