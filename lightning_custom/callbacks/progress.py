"""What a fit shows on the terminal: a progress bar in optimizer steps with DVAR's state, and a one-line summary.

Lightning's defaults describe epochs ("Epoch 0/-2 ... 70/250": an epoch count and an epoch length that mean
nothing when ``max_steps`` and DVAR end the run) and print a table of every submodule; here the bar counts
optimizer steps against the step budget, shows DVAR's variance ratio against its threshold and an upper bound of
the time left, and the summary is one line: trainable against frozen parameters.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelSummary, ProgressBar, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich.progress import BarColumn, ProgressColumn, Task, TextColumn
from rich.text import Text
from typing_extensions import override

from lightning_custom.dvar.callback import DVAREarlyStopping


def step_budget(trainer: L.Trainer) -> float:
    """The most optimizer steps this fit can run: the trainer's limit, or DVAR's own ``max_steps`` if smaller.

    ``inf`` when nothing bounds the run (``max_steps=-1`` with ``max_epochs=-1``).
    """
    budget = float(trainer.estimated_stepping_batches)
    dvar = find_dvar(trainer)
    if dvar is not None and dvar.max_steps:
        budget = min(budget, dvar.max_steps)
    return budget


def find_dvar(trainer: L.Trainer) -> DVAREarlyStopping | None:
    """The trainer's DVAR callback, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, DVAREarlyStopping)), None)


def dvar_status(dvar: DVAREarlyStopping) -> str:
    """DVAR's state in a few characters: its latest variance ratio against the threshold (``0.312<0.15``: it stops
    once the ratio is below), how full its window is (``30/40 steps``), or ``observing`` when it never stops.

    With several loss series (one per concept) the largest ratio is shown: DVAR stops once every one is below.
    """
    latest = [series[-1][1] for series in dvar.ratios.values() if series]
    if latest and len(latest) == max(1, len(dvar.histories)):
        ratio = f"{max(latest):.3f}"
        return f"{ratio}<{dvar.threshold:g}" if dvar.stop else f"{ratio} (observing)"
    evaluated = max((series[-1][0] for series in dvar.histories.values() if series), default=0)
    return f"{min(evaluated, dvar.window)}/{dvar.window} steps"


def _clock(seconds: float | None) -> str:
    return "-:--:--" if seconds is None or not math.isfinite(seconds) else str(timedelta(seconds=int(seconds)))


class StepTimeColumn(ProgressColumn):
    """``≤0:00:15`` while training (the time left to the step budget: an upper bound, since DVAR may stop
    earlier), the elapsed time once the run ended."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text(_clock(task.finished_time), style="grey70")
        return Text(f"≤{_clock(task.time_remaining)}", style="grey70")


class StepSpeedColumn(ProgressColumn):
    """Optimizer steps per second."""

    def render(self, task: Task) -> Text:
        if task.finished:  # Rich's speed is a recent-window estimate, gone once the task ends: the run's mean
            speed = task.completed / task.finished_time if task.finished_time else 0.0
        else:
            speed = task.speed or 0.0
        return Text(f"{speed:.1f}/s" if speed >= 1 else f"{speed:.2f}/s", style="grey70")


BAR_WIDTH = 6  # with the step count, time, speed and three metrics, the line fits 80 columns


def compact_metrics(metrics: dict[str, Any], dvar: DVAREarlyStopping | None, pl_module: Any) -> dict[str, Any]:
    """What the bar shows after the bar itself, short enough for one 80-column line: ``loss``, ``L_det`` (one
    series; with several, only DVAR's largest ratio), ``DVAR`` and, in a fleet, ``concepts`` still training."""
    shown: dict[str, Any] = {}
    if "train_loss" in metrics:
        shown["loss"] = f"{float(metrics['train_loss']):.3f}"
    losses = {k: v for k, v in metrics.items() if k == "dvar_loss" or k.startswith("dvar_loss/")}
    if len(losses) == 1:
        shown["L_det"] = f"{float(next(iter(losses.values()))):.4f}"
    if dvar is not None:
        shown["DVAR"] = dvar_status(dvar)
    specs = getattr(pl_module, "concept_specs", None)
    if getattr(pl_module, "trains_a_fleet", False) and specs:  # a fleet: how many concepts still train
        shown["concepts"] = f"{len(pl_module.active_concepts)}/{len(specs)}"
    return shown


class StepProgressBar(RichProgressBar):
    """The fit bar in optimizer steps: ``step 70/1000``, the losses, DVAR's ratio against its threshold, time left.

    It reads the logged metrics (a host-device sync for each tensor) at most every ``update_interval_s`` seconds
    and at every evaluation, not at every step, so it costs the training step no synchronisation.

    Args:
        update_interval_s: least time between two updates of the step count and metrics.
        leave: keep the finished bar on the terminal.
    """

    def __init__(self, update_interval_s: float = 0.25, leave: bool = True) -> None:
        # Rich redraws from its own thread at refresh_rate per second; it reads no tensors. Written to a file or a
        # pipe (a log, a SLURM job), the bar is printed once, at the end: give it one line, not Rich's 80 columns.
        wide = None if sys.stdout.isatty() or "COLUMNS" in os.environ else {"width": 200}
        super().__init__(refresh_rate=4, leave=leave, console_kwargs=wide)
        self.update_interval_s = update_interval_s
        self._last_update = -math.inf
        self._train_loss: float | None = None
        self._ended = False

    @override
    def configure_columns(self, trainer: L.Trainer) -> list:
        return [
            TextColumn("[progress.description]{task.description}"),
            BarColumn(bar_width=BAR_WIDTH),
            StepTimeColumn(),
            StepSpeedColumn(),
        ]

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        # The methods log the training loss without prog_bar=True (that would read it at every step); the bar shows
        # the loss of the step it last updated at.
        if "train_loss" not in metrics and self._train_loss is not None:
            metrics = {"train_loss": self._train_loss, **metrics}
        return compact_metrics(metrics, find_dvar(trainer) if trainer.state.fn == "fit" else None, pl_module)

    def step_description(self, trainer: L.Trainer) -> str:
        """``step <done>/<budget>`` (``step <done>`` when nothing bounds the run)."""
        budget = step_budget(trainer)
        return f"step {trainer.global_step}/{int(budget)}" if math.isfinite(budget) else f"step {trainer.global_step}"

    def show_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Move the bar to the trainer's step and read the metrics (the only place this bar syncs)."""
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:  # e.g. resumed in the middle of an epoch
            self.train_progress_bar_id = self._add_task(step_budget(trainer), self.step_description(trainer))
        self._last_update = time.monotonic()
        total = max(1, trainer.global_step) if self._ended else step_budget(trainer)
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step, total=total,
                             description=self.step_description(trainer))
        self._update_metrics(trainer, pl_module)
        self.refresh()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # One task for the whole fit: epochs are an artifact of `repeats`, not a unit of progress here.
        if self.is_disabled or self.progress is None or self.train_progress_bar_id is not None:
            return
        self.train_progress_bar_id = self._add_task(step_budget(trainer), self.step_description(trainer))
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
        self.refresh()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if time.monotonic() - self._last_update >= self.update_interval_s:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if loss is not None:
                self._train_loss = float(loss.detach())  # a host sync, at this bar's pace only
            self.show_step(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the bar spans epochs; nothing to close here

    @override
    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.state.fn != "fit":  # DVAR's evaluation inside a fit is one batch: no bar of its own
            super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit":
            super().on_validation_end(trainer, pl_module)
            return
        self.reset_dataloader_idx_tracker()
        self.show_step(trainer, pl_module)  # DVAR has just decided: show its ratio now (one read of the metrics)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The run ended where it stopped: the bar ends full there, with no time "left" to a budget it will not use.
        self._ended = True
        self.show_step(trainer, pl_module)


class ParameterCountSummary(ModelSummary):
    """One line instead of Lightning's table: trainable against frozen parameters, with the top-level parts."""

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            rank_zero_info(parameter_line(pl_module))


def parameter_line(module: L.LightningModule) -> str:
    """E.g. ``Parameters: 64 trainable (token_vectors), 3.9 M frozen (text_encoder, vae, unet), 15.5 MB``."""
    trainable_parts, frozen_parts = [], []
    trainable = frozen = size = 0
    for name, child in module.named_children():
        params = list(child.parameters())
        counts = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params if not p.requires_grad)
        trainable, frozen = trainable + counts[0], frozen + counts[1]
        size += sum(p.numel() * p.element_size() for p in params)
        if counts[0]:
            trainable_parts.append(name)
        elif counts[1]:
            frozen_parts.append(name)
    return (f"Parameters: {get_human_readable_count(trainable).strip()} trainable ({', '.join(trainable_parts) or '-'}), "
            f"{get_human_readable_count(frozen).strip()} frozen ({', '.join(frozen_parts) or '-'}), "
            f"{size / 1e6:.1f} MB")


def default_terminal_callbacks(trainer_config: Mapping[str, Any]) -> list[Callback]:
    """The bar and summary the CLI adds, unless the trainer config turns them off or brings its own.

    Args:
        trainer_config: the ``trainer`` section of the CLI config (``enable_progress_bar``, ``enable_model_summary``,
            ``callbacks``).
    """
    given = trainer_config.get("callbacks") or []
    given = list(given) if isinstance(given, Iterable) else [given]
    added: list[Callback] = []
    if trainer_config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
        added.append(StepProgressBar())
    if trainer_config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in given):
        added.append(ParameterCountSummary())
    return added
