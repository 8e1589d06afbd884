"""Checkpoints taken after a step's DVAR evaluation, so a resumed run continues the loss series without a gap."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from lightning_custom.runtime.ranges import check_ranges

log = logging.getLogger(__name__)


class StepCheckpoint(ModelCheckpoint):
    """Save every ``every_n_steps`` optimizer steps, *after* that step's validation (where DVAR evaluates).

    Lightning's ``ModelCheckpoint(every_n_train_steps=...)`` saves in ``on_train_batch_end``, before the step's
    validation, and on resume Lightning does not repeat that validation: the DVAR series would miss one value.
    Saving at ``on_validation_end`` keeps the series and the weights consistent.

    Saving happens only at evaluations, so with a DVAR callback attached an ``every_n_steps`` that is not a
    multiple of its ``eval_every_n_steps`` is rounded up to one (and said so in one line).

    Args:
        every_n_steps: save after every this many optimizer steps.
        save_top_k: how many checkpoints to keep; ``-1`` (the default) keeps every one.
        **kwargs: other :class:`~lightning.pytorch.callbacks.ModelCheckpoint` arguments (``dirpath``,
            ``save_last``, ...).
    """

    def __init__(self, every_n_steps: int = 100, save_top_k: int = -1, **kwargs: Any) -> None:
        check_ranges("StepCheckpoint", locals())
        super().__init__(every_n_train_steps=0, every_n_epochs=0, train_time_interval=None, save_top_k=save_top_k,
                         **kwargs)
        self.requested_every_n_steps = self.every_n_steps = every_n_steps

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.requested_every_n_steps, dirpath=self.dirpath)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        from lightning_custom.dvar.callback import DVAREarlyStopping

        dvar = next((c for c in trainer.callbacks if isinstance(c, DVAREarlyStopping)), None)
        every = dvar.eval_every_n_steps if dvar is not None else 1
        self.every_n_steps = math.ceil(self.requested_every_n_steps / every) * every
        if self.every_n_steps != self.requested_every_n_steps and trainer.is_global_zero:
            log.warning("StepCheckpoint: every_n_steps=%d is not a multiple of --dvar.eval_every_n_steps=%d, where "
                        "checkpoints are taken: saving every %d steps", self.requested_every_n_steps, every,
                        self.every_n_steps)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer) or trainer.global_step % self.every_n_steps:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
