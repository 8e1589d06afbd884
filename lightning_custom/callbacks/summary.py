"""Write the method's artifacts and ``summary.json`` at the end of every fit."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_custom.io import write_json

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.png"
log = logging.getLogger(__name__)


class RunSummary(Callback):
    """Export diffusers-native artifacts and a ``summary.json`` under ``trainer.default_root_dir``.

    The summary holds the method, the model, the stop step and why training stopped, the DVAR settings and its
    loss history, the wall time and the artifact file names. Every file is written atomically.

    Args:
        output_dir: where to write; defaults to ``trainer.default_root_dir``.
        export: also call the module's ``export_artifacts`` (turn off to only write the summary).
        report: also draw ``report.png`` (training loss, deterministic loss, variance ratio, stop step).
    """

    def __init__(self, output_dir: str | None = None, export: bool = True, report: bool = True) -> None:
        super().__init__()
        self.output_dir, self.export, self.report = output_dir, export, report
        self.train_loss_history: list[list[float]] = []
        self._start: float | None = None
        self.wall_seconds_before_resume = 0.0
        self.dvar_seconds = 0.0  # wall time inside validation, i.e. computing DVAR's deterministic loss
        self._validation_start: float | None = None

    def resolve_output_dir(self, trainer: L.Trainer) -> Path:
        """The folder every file of this run goes to."""
        return Path(self.output_dir or trainer.default_root_dir)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.train_loss_history.append([trainer.global_step, float(loss)])

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            _synchronize(pl_module)
            self._validation_start = time.perf_counter()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validation_start is not None:
            _synchronize(pl_module)
            self.dvar_seconds += time.perf_counter() - self._validation_start
            self._validation_start = None

    def wall_seconds(self) -> float:
        """Seconds spent in fit, including time before a resume."""
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        return self.wall_seconds_before_resume + elapsed

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wall = self.wall_seconds()
        if not trainer.is_global_zero:
            return
        out = self.resolve_output_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        artifacts = pl_module.export_artifacts(out) if self.export else []
        summary = build_summary(trainer, pl_module, wall, artifacts)
        summary["train_loss_history"] = self.train_loss_history
        summary["dvar_seconds"] = round(self.dvar_seconds, 3)
        summary["dvar_share"] = round(self.dvar_seconds / wall, 4) if wall > 0 else 0.0
        write_json(out / SUMMARY_FILE, summary)
        if self.report:
            from lightning_custom.report import write_report

            try:
                write_report(summary, out / REPORT_FILE)
            except Exception as err:  # noqa: BLE001 - the artifacts and summary are written; a plot must not fail the run
                log.warning("RunSummary: could not draw %s: %s", REPORT_FILE, err)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"train_loss_history": self.train_loss_history, "wall_seconds": self.wall_seconds(),
                "dvar_seconds": self.dvar_seconds}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_loss_history = [list(p) for p in state_dict.get("train_loss_history", [])]
        self.wall_seconds_before_resume = float(state_dict.get("wall_seconds", 0.0))
        self.dvar_seconds = float(state_dict.get("dvar_seconds", 0.0))


def _synchronize(pl_module: L.LightningModule) -> None:
    """Wait for queued GPU work, so wall-clock intervals measure the work itself."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


def stop_information(trainer: L.Trainer) -> tuple[str, Any]:
    """``(stopped_by, deciding callback)``: a callback that stopped the run, else the trainer's own limit."""
    for callback in trainer.callbacks:
        if getattr(callback, "stopped_by", None):
            return callback.stopped_by, callback
    if trainer.max_steps and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return "max_steps", None
    if trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs:
        return "max_epochs", None
    return "other", None


def find_callback(trainer: L.Trainer, name: str) -> Any:
    """The first callback whose class is called ``name`` (None if absent)."""
    return next((c for c in trainer.callbacks if type(c).__name__ == name), None)


def build_summary(trainer: L.Trainer, pl_module: L.LightningModule, wall_seconds: float,
                  artifacts: list[str]) -> dict[str, Any]:
    """The ``summary.json`` contract shared by every method."""
    stopped_by, decider = stop_information(trainer)
    dvar = find_callback(trainer, "DVAREarlyStopping")
    hparams = pl_module.hparams
    summary: dict[str, Any] = {
        "method": type(pl_module).__name__,
        "method_class_path": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
        "pretrained_model_name_or_path": hparams.get("pretrained_model_name_or_path"),
        "placeholder_token": getattr(pl_module, "placeholder_token", None),
        "stop_step": trainer.global_step,
        "max_steps": trainer.max_steps,
        "stopped_by": stopped_by,
        "stop_reason": getattr(decider, "stop_reason", ""),
        "dvar_window": getattr(dvar, "window", None),
        "dvar_threshold": getattr(dvar, "threshold", None),
        "dvar_eval_every_n_steps": getattr(dvar, "eval_every_n_steps", None),
        "dvar_history": dvar.history if dvar else [],
        "wall_seconds": round(wall_seconds, 3),
        "seconds_per_step": round(wall_seconds / max(1, trainer.global_step), 5),
        "steps_saved": None,
        "seconds_saved": None,
        "artifacts": artifacts,
        "seed": hparams.get("seed"),
        "prediction_type": getattr(pl_module, "prediction_type", None),
        "learning_rate": getattr(pl_module, "effective_learning_rate", hparams.get("learning_rate")),
        "instance_data_dir": getattr(getattr(trainer, "datamodule", None), "instance_data_dir", None),
    }
    if trainer.max_steps and trainer.max_steps > 0:
        # Steps not trained against the max_steps budget, and the time they would have cost at the measured rate.
        summary["steps_saved"] = max(0, trainer.max_steps - trainer.global_step)
        summary["seconds_saved"] = round(summary["steps_saved"] * summary["seconds_per_step"], 3)
    for callback in trainer.callbacks:
        if hasattr(callback, "summary_fields"):
            summary.update(callback.summary_fields())
    if dvar is not None and len(dvar.histories) > 1:
        summary["dvar_histories"] = dvar.histories
    return summary
