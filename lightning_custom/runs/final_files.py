"""What a run keeps when it did not end well: the last healthy weights of a failed run, and the trained weights
when its final files cannot be written."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_custom.errors import FinalFilesNotWritten
from lightning_custom.runtime.io import remove_path, write_safetensors

log = logging.getLogger(__name__)

LAST_HEALTHY_FOLDER = "last_healthy"
UNWRITTEN_FOLDER = "final_files_not_written"
TRAINED_WEIGHTS_FILE = "trained_weights.safetensors"
# Snapshots cost host memory at every evaluation: kept up to this size (a token, LoRA or Custom Diffusion weights),
# not for a full DreamBooth UNet (3.4 GB in float32 for SD 1.5).
DEFAULT_SNAPSHOT_MAX_MB = 512.0


def trainable_tensors(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The parameters with ``requires_grad``, by name (what the optimizer changes)."""
    return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}


class HealthyWeights:
    """The trainable weights at the latest evaluation that passed every health check, kept on the CPU.

    A run that diverges or goes NaN exports these (under ``last_healthy/``) instead of its broken weights.

    Args:
        max_megabytes: keep no snapshot of weights larger than this (0: never keep one).
    """

    def __init__(self, max_megabytes: float = DEFAULT_SNAPSHOT_MAX_MB) -> None:
        self.max_bytes = max_megabytes * 2**20
        self.step: int | None = None
        self.tensors: dict[str, torch.Tensor] | None = None
        self.skipped_bytes: int | None = None  # the size that was too large to keep

    def keep(self, pl_module: L.LightningModule, step: int) -> None:
        """Copy the trainable weights of ``pl_module`` as those of ``step`` (if they are small enough)."""
        params = trainable_tensors(pl_module)
        size = sum(p.numel() * p.element_size() for p in params.values())
        if size > self.max_bytes:
            self.skipped_bytes, self.tensors, self.step = size, None, None
            return
        with torch.no_grad():
            self.tensors = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
        self.step = step

    def restore_into(self, pl_module: L.LightningModule) -> bool:
        """Load the kept weights back into ``pl_module``; ``False`` if none are kept or they no longer fit."""
        if self.tensors is None:
            return False
        params = trainable_tensors(pl_module)
        if set(params) != set(self.tensors) or any(params[n].shape != t.shape for n, t in self.tensors.items()):
            return False  # e.g. sharded by FSDP since the snapshot
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        return True

    def why_none(self) -> str:
        """Why no healthy weights are kept, in words."""
        if self.skipped_bytes is not None:
            return (f"the trainable weights ({self.skipped_bytes / 2**20:.0f} MB) are larger than "
                    f"--dvar.healthy_snapshot_max_mb {self.max_bytes / 2**20:g}, so no healthy copy was kept")
        return "no evaluation before it was healthy"

    def state_dict(self) -> dict[str, Any]:
        """The kept step and weights (part of DVAREarlyStopping's checkpoint state)."""
        return {"step": self.step, "tensors": self.tensors, "skipped_bytes": self.skipped_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.step, self.tensors = state.get("step"), state.get("tensors")
        self.skipped_bytes = state.get("skipped_bytes")


def last_healthy_artifacts(pl_module: L.LightningModule, healthy: HealthyWeights | None, staging: Path,
                           failure: str) -> tuple[list[str], dict[str, Any]]:
    """Export the last healthy weights of a failed run into ``staging/last_healthy/``.

    Args:
        pl_module: the module; its trainable weights are replaced by the healthy ones.
        healthy: the snapshot DVAREarlyStopping kept (``None`` without that callback).
        staging: the folder of the final files.
        failure: what went wrong, completing "the run ..." (``"diverged"``).

    Returns:
        The artifact paths (relative to the run folder) and the summary fields that describe them.
    """
    if healthy is None or not healthy.restore_into(pl_module):
        why = healthy.why_none() if healthy is not None else "no DVAR callback kept healthy weights"
        return [], {"artifacts_withheld": f"No artifact was written: the run {failure} and {why}."}
    folder = staging / LAST_HEALTHY_FOLDER
    folder.mkdir()
    names = pl_module.export_artifacts(folder)
    note = (f"The run {failure}; {LAST_HEALTHY_FOLDER}/ holds the weights of its last healthy evaluation, "
            f"step {healthy.step}. They are not a converged result; nothing was exported under the usual names.")
    return [f"{LAST_HEALTHY_FOLDER}/{name}" for name in names], {"artifacts_step": healthy.step,
                                                                  "artifacts_note": note}


def keep_what_was_trained(out: Path, staging: Path, exported: bool, pl_module: L.LightningModule,
                          error: OSError) -> FinalFilesNotWritten:
    """Keep the trained weights when the final files could not be written; the error that says where.

    The staged artifacts, when their export finished, are moved (a rename: it needs no free space) to
    ``final_files_not_written/``; otherwise the trainable weights are saved to ``trained_weights.safetensors``.

    Args:
        out: the run folder.
        staging: the staging folder of the final files.
        exported: whether the artifacts were completely written into ``staging``.
        pl_module: the trained module.
        error: what failed.
    """
    failed = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
    if exported:
        kept = out / UNWRITTEN_FOLDER
        try:
            remove_path(kept)
            os.replace(staging, kept)
            names = ", ".join(sorted(p.name for p in kept.iterdir() if not p.name.startswith(".")))
            return FinalFilesNotWritten(
                f"could not write the final files of {out} ({failed}); the trained artifacts are kept in {kept}/ "
                f"({names}), without a summary.json")
        except OSError as err:
            log.error("RunSummary: could not keep the staged artifacts: %s", err)
    target = out / TRAINED_WEIGHTS_FILE
    try:
        write_safetensors(target, {name: p.detach() for name, p in trainable_tensors(pl_module).items()})
    except OSError as err:
        return FinalFilesNotWritten(f"could not write the final files of {out} ({failed}), nor the trained weights "
                                    f"to {target} ({err.strerror or err}); nothing of this run was kept")
    return FinalFilesNotWritten(f"could not write the final files of {out} ({failed}); the trained weights are "
                                f"kept in {target} (the trainable parameters by name, not a diffusers artifact)")
