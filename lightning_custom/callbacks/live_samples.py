"""Watching a run: a grid of samples every N steps (``--sample.*``) and ``report.png`` redrawn while it trains.

Samples come from the module's live components (:func:`lightning_custom.inference.sampling.pipeline_from_module`, the code
the ``sample`` command uses) with the same prompts and seeds every time, so consecutive grids differ only by what
training changed. Sampling never touches the training RNG (:func:`~lightning_custom.inference.sampling.generate` forks it).
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_custom.dvar.report import REPORT_FILE
from lightning_custom.runtime.io import atomic_path

SAMPLES_FOLDER = "samples_during_training"
SAMPLES_CSV = "samples_during_training.csv"
log = logging.getLogger(__name__)


def run_folder(trainer: L.Trainer) -> Path:
    """Where the run's files go: the summary writer's folder, else ``trainer.default_root_dir``."""
    summary = next((c for c in trainer.callbacks if type(c).__name__ == "RunSummary"), None)
    return summary.resolve_output_dir(trainer) if summary is not None else Path(trainer.default_root_dir)


@contextmanager
def inference_mode(module: L.LightningModule) -> Iterator[None]:
    """Every submodule in eval mode, each restored to its own mode afterwards (frozen parts stay in eval)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class LiveSamples(Callback):
    """Sample the concept every ``every_n_steps`` optimizer steps and once more when training stops.

    Each grid is ``<run>/samples_during_training/step_XXXXXX.png`` (one labelled row per prompt and concept) and goes
    to the active loggers: TensorBoard (``add_image``), W&B (``log_image``), and for a CSV logger its path in
    ``samples_during_training.csv`` in the logger's folder. Off by default (``every_n_steps: 0``).

    Args:
        every_n_steps: sample after every this many optimizer steps (0: never; the last grid is then also skipped).
        prompts: templates with ``{}`` for the concept (its token and class noun; once per concept).
        images_per_prompt: images per prompt; image ``j`` uses seed ``seed + j`` in every grid.
        seed: the first seed.
        num_inference_steps: denoising steps.
        guidance_scale: guidance scale (default: the model's own: 7.5 on SD and SDXL, 3.5 on FLUX.1, 7.0 on SD3).
        scheduler: sampler: default (the model's own), ddim, dpm++, euler, pndm or ddpm (SD and SDXL only: FLUX.1
            and SD3 keep their flow-matching sampler, and a DDPM one is refused before training starts).
        at_stop: also sample when training stops (unless that step was just sampled).
        height: image height in pixels (default: the model's; FLUX.1's pipeline makes 1024 px images).
        width: image width in pixels (default: the model's).
    """

    def __init__(self, every_n_steps: int = 0, prompts: list[str] | None = None, images_per_prompt: int = 2,
                 seed: int = 0, num_inference_steps: int = 25, guidance_scale: float | None = None,
                 scheduler: str = "default", at_stop: bool = True, height: int | None = None,
                 width: int | None = None) -> None:
        super().__init__()
        from lightning_custom.runtime.ranges import check_ranges

        check_ranges("sample", locals())
        self.every_n_steps, self.prompts = every_n_steps, list(prompts or ["a photo of {}"])
        self.images_per_prompt, self.seed = images_per_prompt, seed
        self.num_inference_steps, self.guidance_scale, self.scheduler = num_inference_steps, guidance_scale, scheduler
        self.at_stop = at_stop
        self.height, self.width = height, width
        self.grids: list[dict[str, Any]] = []  # {"step", "file", "seconds"} per grid, kept across a resume

    @property
    def sampled_steps(self) -> list[int]:
        """The steps a grid was drawn at."""
        return [grid["step"] for grid in self.grids]

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse a DDPM sampler on a flow-matching model before training, not at the first grid."""
        if self.every_n_steps and getattr(pl_module, "noise_scheduler", None) is not None:
            from lightning_custom.inference.pipelines import check_sampler

            check_sampler(self.scheduler, type(pl_module.noise_scheduler).__name__,
                          f"{type(pl_module).__name__}'s model", "--sample.scheduler")

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step not in self.sampled_steps:
            self.sample(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps and self.at_stop and trainer.global_step not in self.sampled_steps:
            self.sample(trainer, pl_module)

    def prompt_list(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        """The filled-in prompts: each template for each concept of the data module (token + class noun)."""
        from lightning_custom.runs.provenance import concept_records
        from lightning_custom.inference.sampling import concept_prompts

        concepts = concept_records(getattr(trainer, "datamodule", None))
        if not concepts:
            token = getattr(trainer.lightning_module, "placeholder_token", None)
            concepts = [{"name": "concept", "placeholder_token": token, "class_noun": None}]
        return concept_prompts(self.prompts, concepts)

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """Draw, save and log one grid at the current step (rank 0 only); returns its path."""
        if not trainer.is_global_zero:
            return None
        from lightning_custom.inference.grid import labelled_grid, write_png
        from lightning_custom.inference.pipelines import pipeline_from_module
        from lightning_custom.inference.sampling import generate

        start = time.perf_counter()
        entries = self.prompt_list(trainer)
        prompts = [e["prompt"] for e in entries for _ in range(self.images_per_prompt)]
        seeds = [self.seed + j for _ in entries for j in range(self.images_per_prompt)]
        with inference_mode(pl_module):
            pipe = pipeline_from_module(pl_module, self.scheduler, "--sample.scheduler")
            images = generate(pipe, prompts, seeds, guidance_scale=self.guidance_scale,
                              num_inference_steps=self.num_inference_steps, height=self.height, width=self.width,
                              batch_size=len(prompts))
        grid = labelled_grid(images, [f"step {trainer.global_step}: {e['prompt']}" for e in entries],
                             self.images_per_prompt)
        path = write_png(grid, run_folder(trainer) / SAMPLES_FOLDER / f"step_{trainer.global_step:06d}.png")
        self.log_grid(trainer, grid, path)
        seconds = time.perf_counter() - start
        self.grids.append({"step": trainer.global_step, "file": f"{SAMPLES_FOLDER}/{path.name}",
                           "seconds": round(seconds, 3)})
        return path

    def log_grid(self, trainer: L.Trainer, grid: Any, path: Path) -> None:
        """Send the grid to every active logger that can take it."""
        step = trainer.global_step
        for logger in trainer.loggers:
            experiment_name = type(logger).__name__
            try:
                if experiment_name == "TensorBoardLogger":
                    logger.experiment.add_image("samples", np.asarray(grid), step, dataformats="HWC")
                elif hasattr(logger, "log_image"):  # W&B, Neptune, ...
                    logger.log_image(key="samples", images=[str(path)], step=step)
                elif experiment_name == "CSVLogger":
                    csv_path = Path(logger.log_dir) / SAMPLES_CSV
                    csv_path.parent.mkdir(parents=True, exist_ok=True)
                    new = not csv_path.exists()
                    with open(csv_path, "a", newline="") as handle:
                        writer = csv.writer(handle)
                        if new:
                            writer.writerow(["step", "path"])
                        writer.writerow([step, str(path)])
            except Exception as err:  # noqa: BLE001 - a logger that cannot take images must not stop training
                log.warning("LiveSamples: could not log the grid to %s: %s", experiment_name, err)

    def summary_fields(self) -> dict[str, Any]:
        """``live_samples`` in ``summary.json``: settings, every grid, and the seconds they cost."""
        if not self.every_n_steps:
            return {}
        return {"live_samples": {
            "every_n_steps": self.every_n_steps, "prompts": self.prompts, "images_per_prompt": self.images_per_prompt,
            "seed": self.seed, "num_inference_steps": self.num_inference_steps, "grids": self.grids,
            "seconds": round(sum(g["seconds"] for g in self.grids), 3),
        }}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"grids": self.grids}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.grids = [dict(g) for g in state_dict.get("grids", [])]


class LiveReport(Callback):
    """Redraw ``report.png`` after a DVAR evaluation while the run trains, at most every ``every_n_seconds``.

    The final report (drawn by :class:`~lightning_custom.callbacks.RunSummary`) replaces it at the end.

    Args:
        every_n_seconds: least wall time between two drawings (0: never redraw during training).
    """

    def __init__(self, every_n_seconds: float = 30.0) -> None:
        from lightning_custom.runtime.ranges import check_ranges

        check_ranges("live_report", locals())
        super().__init__()
        self.every_n_seconds = every_n_seconds
        self._last: float | None = None
        self.drawings = 0
        self.seconds = 0.0

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()  # the first drawing waits one period: there is nothing to plot yet

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (not self.every_n_seconds or trainer.sanity_checking or trainer.state.fn != "fit"
                or not trainer.is_global_zero):
            return
        now = time.perf_counter()
        if self._last is not None and now - self._last < self.every_n_seconds:
            return
        summary = next((c for c in trainer.callbacks if type(c).__name__ == "RunSummary"), None)
        if summary is not None and not summary.report:
            return
        try:
            self.draw(trainer, pl_module, run_folder(trainer) / REPORT_FILE)
        except Exception as err:  # noqa: BLE001 - a plot must not stop training
            log.warning("LiveReport: could not draw %s: %s", REPORT_FILE, err)
        self._last = time.perf_counter()
        self.seconds += self._last - now

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule, path: Path) -> Path:
        """The report of the run so far (the losses recorded up to this evaluation), saved atomically."""
        from lightning_custom.dvar.report import DPI, report_figure

        dvar = next((c for c in trainer.callbacks if type(c).__name__ == "DVAREarlyStopping"), None)
        summary = next((c for c in trainer.callbacks if type(c).__name__ == "RunSummary"), None)
        partial = {
            "method": type(pl_module).__name__, "stop_step": None, "max_steps": trainer.max_steps,
            "stopped_by": "running", "dvar_window": getattr(dvar, "window", None),
            "dvar_threshold": getattr(dvar, "threshold", None),
            "dvar_eval_every_n_steps": getattr(dvar, "eval_every_n_steps", None),
            "dvar_history": list(getattr(dvar, "history", []) or []),
            "train_loss_history": list(getattr(summary, "train_loss_history", []) or []),
        }
        figure = report_figure(partial)
        figure.suptitle(f"{partial['method']}: training, step {trainer.global_step} of {trainer.max_steps}",
                        fontsize=10)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=DPI)
        self.drawings += 1
        return path

    def summary_fields(self) -> dict[str, Any]:
        """How often the live report was drawn and what it cost."""
        return {"live_report": {"every_n_seconds": self.every_n_seconds, "drawings": self.drawings,
                                "seconds": round(self.seconds, 3)}}
