"""The paper's "few iters" baseline: a fixed, short training budget."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_custom.runtime.ranges import check_ranges


class FixedBudget(Callback):
    """Stop after exactly ``steps`` optimizer steps (``stopped_by="fixed_budget"`` in ``summary.json``).

    The paper's "few iters" baseline uses the mean stop step of CLIP early stopping: 475 steps for Textual
    Inversion, 367 for Custom Diffusion, 450 for DreamBooth-LoRA. Unlike lowering ``max_steps``, the summary keeps
    the full-length ``max_steps``, so ``steps_saved`` is measured against the same budget as every other rule.

    Args:
        steps: the number of optimizer steps to train.
    """

    def __init__(self, steps: int = 475) -> None:
        super().__init__()
        check_ranges("FixedBudget", locals())
        self.steps = steps
        self.stop_step: int | None = None
        self.stopped_by: str | None = None
        self.stop_reason = ""

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step < self.steps or self.stop_step is not None:
            return
        trainer.should_stop = True
        self.stop_step, self.stopped_by = trainer.global_step, "fixed_budget"
        self.stop_reason = f"Fixed budget: trained the {self.steps} steps of the budget; stopping."

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stop_step": self.stop_step, "stopped_by": self.stopped_by, "stop_reason": self.stop_reason}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stop_step = state_dict.get("stop_step")
        self.stopped_by = state_dict.get("stopped_by")
        self.stop_reason = state_dict.get("stop_reason", "")
