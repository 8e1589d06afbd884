"""A callback that scores the concept with the world's encoder during training (it never stops training).

Every ``every_n_steps`` optimizer steps (and before the first), it samples images from the training prompt and
from evaluation prompts that put the concept on new backgrounds, and records identity similarity (generated vs
concept images) and prompt fidelity (the encoder names the prompted background). The benchmark replays the
encoder-based early stopping rule (the CLIP early-stopping analogue) on the training-prompt series, and reads each
variant's quality at its stop step from this series. Sampling forks the RNG, so training is unchanged by it.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

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
        encoder: folder of a saved :class:`~lightning_custom.synthetic.world_encoder.WorldEncoder` (default: shipped one).
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
        self.prepare(trainer.datamodule)
        if not self.history:
            self.probe(trainer, pl_module)

    def prepare(self, datamodule: Any) -> None:
        """Load the encoder and the concept images (what :meth:`scores` compares samples with)."""
        from lightning_custom.data.images import load_rgb_image
        from lightning_custom.synthetic.world_encoder import WorldEncoder

        self._encoder = WorldEncoder.load(self.encoder_path)
        files = getattr(getattr(datamodule, "images", None), "files", None)
        if not files:
            raise UserInputError("WorldProbe: the data module exposes no training images (datamodule.images.files)")
        self._references = [load_rgb_image(f) for f in files]

    def scores(self, pl_module: L.LightningModule, phrase: str, seed: int | None = None) -> list[float]:
        """``[identity (train prompt), identity (eval prompts), fidelity (eval prompts)]`` for the current weights.

        Args:
            pl_module: the module whose weights are scored (its live components are sampled, nothing is copied).
            phrase: the words for the concept inside a prompt.
            seed: image ``i`` is sampled with seed ``seed + i`` (default: this probe's ``seed``). Every check with
                the same seed uses the same noise, so differences between steps or variants are paired.
        """
        import numpy as np

        from lightning_custom.data.templates import format_prompt
        from lightning_custom.inference.pipelines import pipeline_from_module
        from lightning_custom.inference.sampling import generate
        from lightning_custom.synthetic.world_encoder import identity_similarity, judge

        first = self.seed if seed is None else seed
        n = self.num_images
        prompts = [format_prompt(self.train_prompt, phrase)] * n
        for template in self.eval_prompts:
            prompts += [format_prompt(template, phrase)] * n
        size = self._references[0].size[0]
        pipe = pipeline_from_module(pl_module, "ddim")
        images = generate(pipe, prompts, [first + i for i in range(len(prompts))], height=size, width=size,
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
        phrase = getattr(trainer.datamodule, "phrase", None) or pl_module.placeholder_token
        values = self.scores(pl_module, phrase)
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


SNAPSHOT_PATTERN = "step-{:06d}.safetensors"


class TrainableSnapshots(Callback):
    """Saves the trainable weights at every deterministic-loss evaluation, one safetensors file per step.

    With these, quality can be read at any step where a (replayed) stopping rule could stop, after the run
    (:func:`probe_snapshots`), instead of at the last periodic probe before it. The files hold only parameters with
    ``requires_grad`` (a token embedding, LoRA or Custom Diffusion weights: small; full DreamBooth: the whole UNet).

    A run's snapshots can also be made again later, without keeping them on disk (full DreamBooth's are ~11 MB
    each): training is deterministic, so the same config with ``steps`` and ``stop_after_last`` saves the weights of
    the original run at those steps and ends after the last one.

    In a fleet (``TextualInversionFleet``) each concept still training gets its own folder, ``dirpath`` with
    ``{concept}`` replaced by its name, and its snapshots hold its vectors under its own run's parameter names: they
    load into the single run of that concept (:func:`probe_snapshots` with the single run's config).

    Args:
        dirpath: folder of the ``step-NNNNNN.safetensors`` files (in a fleet, with ``{concept}`` in it).
        every_n_evaluations: keep every this many evaluations (1: all of them).
        steps: save only at these steps (evaluation steps); ``None``: at every kept evaluation.
        stop_after_last: end training once the last of ``steps`` is saved.
    """

    def __init__(self, dirpath: str, every_n_evaluations: int = 1, steps: list[int] | None = None,
                 stop_after_last: bool = False) -> None:
        super().__init__()
        if every_n_evaluations < 1:
            raise UserInputError("TrainableSnapshots: every_n_evaluations must be at least 1")
        if stop_after_last and not steps:
            raise UserInputError("TrainableSnapshots: stop_after_last needs the steps to save")
        self.dirpath, self.every_n_evaluations = dirpath, every_n_evaluations
        self.steps = sorted(set(steps)) if steps else None
        self.stop_after_last = stop_after_last
        self.evaluations = 0

    def save(self, pl_module: L.LightningModule, step: int) -> None:
        """Write the trainable weights of ``pl_module`` as the snapshot of ``step``."""
        from pathlib import Path

        from safetensors.torch import save_file

        from lightning_custom.runtime.io import atomic_path

        if getattr(pl_module, "trains_a_fleet", False):
            if "{concept}" not in self.dirpath:
                raise UserInputError(f"TrainableSnapshots: dirpath {self.dirpath!r} needs '{{concept}}' in a fleet "
                                     "(one folder per concept)")
            folders = {Path(self.dirpath.format(concept=name)): pl_module.single_run_weights(name)
                       for name in pl_module.active_concepts}
        else:
            folders = {Path(self.dirpath): {name: p.detach().to("cpu", copy=True).contiguous()
                                            for name, p in pl_module.named_parameters() if p.requires_grad}}
        for folder, tensors in folders.items():
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / SNAPSHOT_PATTERN.format(step)) as tmp:
                save_file(tensors, str(tmp))

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.evaluations += 1
        step = trainer.global_step
        if self.stop_after_last and step >= self.steps[-1]:  # on every rank, so all of them stop together
            trainer.should_stop = True
        if not trainer.is_global_zero:
            return
        if self.steps is not None:
            keep = step in self.steps
        else:
            keep = (self.evaluations - 1) % self.every_n_evaluations == 0
        if keep:
            self.save(pl_module, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.evaluations = int(state_dict.get("evaluations", 0))


def snapshot_steps(dirpath: str | Any) -> list[int]:
    """The steps that have a snapshot in ``dirpath`` (sorted; empty if the folder does not exist)."""
    from pathlib import Path

    folder = Path(dirpath)
    return sorted(int(f.name[5:11]) for f in folder.glob("step-*.safetensors")) if folder.is_dir() else []


class RebuiltRun(Protocol):
    """A run built from its config but not fitted: what :func:`lightning_custom.cli.rebuild_run` returns (the
    world takes it from the caller rather than import the CLI, which sits above it)."""

    model: L.LightningModule
    datamodule: L.LightningDataModule
    trainer: L.Trainer


def prepared_probe(run: RebuiltRun) -> tuple[WorldProbe, Any, str, set[str]]:
    """The run's :class:`WorldProbe` (prepared), freshly built module (its weights before the first step), concept
    phrase and trainable parameter names."""
    probes = [c for c in run.trainer.callbacks if isinstance(c, WorldProbe)]
    if not probes:
        raise UserInputError("the run's config has no WorldProbe callback to score with")
    probe, module, data = probes[0], run.model, run.datamodule
    probe.prepare(data)
    phrase = getattr(data, "phrase", None) or module.placeholder_token
    return probe, module, phrase, {name for name, p in module.named_parameters() if p.requires_grad}


def load_snapshot(module: Any, snapshot_dir: str | Any, step: int, trainable: set[str]) -> None:
    """Load the trainable weights saved at ``step`` into ``module``."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(snapshot_dir) / SNAPSHOT_PATTERN.format(step)
    if not path.is_file():
        raise UserInputError(f"{snapshot_dir}: no snapshot of step {step} ({path.name})")
    weights = load_file(str(path))
    if set(weights) != trainable:
        raise UserInputError(f"{path}: its weights are not this config's trainable parameters")
    module.load_state_dict(weights, strict=False)


def probe_snapshots(run: RebuiltRun, snapshot_dir: str | Any, steps: list[int],
                    seeds: list[int] | None = None) -> dict[int, list[list[float]]]:
    """Score saved trainable weights with the run's own :class:`WorldProbe` settings, after the run.

    The model, data module and probe come rebuilt from the run's config (``run``: :func:`lightning_custom.cli.
    rebuild_run`, which reads it as ``fit --config`` does); for each step the snapshot's weights are loaded and sampled with each seed (default: the probe's own seed,
    so the scores equal the live probe's at that step).

    Step 0 is the weights before training (the freshly built module), with or without a snapshot.

    Returns:
        ``{step: [[identity_train, identity_eval, fidelity] per seed]}``.
    """
    probe, module, phrase, trainable = prepared_probe(run)
    out: dict[int, list[list[float]]] = {}
    for step in sorted(steps):  # step 0 first: the freshly built module holds its weights
        if step:
            load_snapshot(module, snapshot_dir, step, trainable)
        out[step] = [probe.scores(module, phrase, seed) for seed in (seeds or [None])]
    return out
