"""Checkpoints taken after a step's DVAR evaluation, so a resumed run continues the loss series without a gap."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class StepCheckpoint(ModelCheckpoint):
    """Save every ``every_n_steps`` optimizer steps, *after* that step's validation (where DVAR evaluates).

    Lightning's ``ModelCheckpoint(every_n_train_steps=...)`` saves in ``on_train_batch_end``, before the step's
    validation, and on resume Lightning does not repeat that validation: the DVAR series would miss one value.
    Saving at ``on_validation_end`` keeps the series and the weights consistent.

    Args:
        every_n_steps: save after every this many optimizer steps.
        **kwargs: other :class:`~lightning.pytorch.callbacks.ModelCheckpoint` arguments (``dirpath``,
            ``save_top_k`` (default: keep all), ``save_last``, ...).
    """

    def __init__(self, every_n_steps: int = 100, **kwargs: Any) -> None:
        kwargs.setdefault("save_top_k", -1)
        super().__init__(every_n_train_steps=0, every_n_epochs=0, train_time_interval=None, **kwargs)
        self.every_n_steps = every_n_steps

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, dirpath=self.dirpath)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer) or trainer.global_step % self.every_n_steps:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
