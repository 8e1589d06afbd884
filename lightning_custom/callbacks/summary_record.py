"""What ``summary.json`` records at the end of a fit, gathered from the trainer, the module and the callbacks; and
the run folder's housekeeping around it (temporaries, the files a summary names)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer

from lightning_custom.dvar.report import REPORT_FILE
from lightning_custom.runs.provenance import run_provenance
from lightning_custom.runtime.io import remove_path


def remove_temporaries(out: Path) -> None:
    """Remove what a killed earlier run left half-written in ``out`` (staging folders, partial checkpoints)."""
    if not out.is_dir():
        return
    for path in [*out.glob(".*.tmp"), *(out / "checkpoints").glob(".*.tmp")]:
        remove_path(path, ignore_errors=True)


def files_named_by(summary_path: Path) -> set[str]:
    """The top-level files an existing ``summary.json`` says belong to its run (empty if there is none)."""
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(summary, dict):
        return set()
    names = {*(summary.get("artifacts") or []), *(summary.get("files") or []), REPORT_FILE}
    return {name for name in names if isinstance(name, str) and name and Path(name).name == name}


def trainable_weights_finite(pl_module: L.LightningModule) -> bool:
    """Whether every trainable parameter holds only finite values (one host synchronization)."""
    checks = [torch.isfinite(p.detach()).all() for p in pl_module.parameters() if p.requires_grad]
    return bool(torch.stack(checks).all()) if checks else True


def synchronize_device(pl_module: L.LightningModule) -> None:
    """Wait for queued GPU work, so wall-clock intervals measure the work itself."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


def stop_information(trainer: L.Trainer) -> tuple[str, str]:
    """``(stopped_by, stop_reason)``: a callback that stopped the run, else the trainer limit that was reached."""
    step = trainer.global_step
    for callback in trainer.callbacks:
        if getattr(callback, "stopped_by", None):
            reason = getattr(callback, "stop_reason", "")
            return callback.stopped_by, reason or f"{type(callback).__name__} stopped training at step {step}."
    if trainer.max_steps and trainer.max_steps > 0 and step >= trainer.max_steps:
        return "max_steps", f"Reached the trainer's max_steps={trainer.max_steps} at step {step}."
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = timer.time_remaining() if timer is not None else None
    if remaining is not None and remaining <= 0:
        elapsed = timer.time_elapsed()
        limit = datetime.timedelta(seconds=round(remaining + elapsed))
        return "max_time", f"Reached the trainer's max_time={limit} after {elapsed:.1f} s of training, at step {step}."
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs > 0 and trainer.current_epoch >= max_epochs:
        return "max_epochs", f"Reached the trainer's max_epochs={max_epochs} at step {step}."
    return "other", (f"Training ended at step {step} before any limit was reached "
                     "(the trainer was told to stop by code outside this package's callbacks).")


def find_callback(trainer: L.Trainer, name: str) -> Any:
    """The first callback whose class is called ``name`` (None if absent)."""
    return next((c for c in trainer.callbacks if type(c).__name__ == name), None)


def build_summary(trainer: L.Trainer, pl_module: L.LightningModule, wall_seconds: float,
                  artifacts: list[str]) -> dict[str, Any]:
    """The ``summary.json`` contract shared by every method."""
    stopped_by, stop_reason = stop_information(trainer)
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
        "stop_reason": stop_reason,
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
        "model_family": getattr(getattr(pl_module, "family", None), "name", None),
        # What the optimizer used: the configured rate x batch size x accumulation x devices with scale_lr (the
        # paper's scaling), beside the configured value, so neither is mistaken for the other.
        "learning_rate": getattr(pl_module, "effective_learning_rate", hparams.get("learning_rate")),
        "configured_learning_rate": hparams.get("learning_rate"),
        "scale_lr": hparams.get("scale_lr"),
        "instance_data_dir": getattr(getattr(trainer, "datamodule", None), "instance_data_dir", None),
    }
    if trainer.max_steps and trainer.max_steps > 0:
        # Steps not trained against the max_steps budget, and the time they would have cost at the measured rate.
        summary["steps_saved"] = max(0, trainer.max_steps - trainer.global_step)
        summary["seconds_saved"] = round(summary["steps_saved"] * summary["seconds_per_step"], 3)
    summary.update(run_provenance(trainer, pl_module))  # model folder + fingerprint, seeds, concepts, versions
    for callback in trainer.callbacks:
        if hasattr(callback, "summary_fields"):
            summary.update(callback.summary_fields())
    if dvar is not None and len(dvar.histories) > 1:
        summary["dvar_histories"] = dvar.histories
    return summary
