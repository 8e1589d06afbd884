"""DVAR early stopping: stop when the rolling variance of the deterministic loss flattens."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_custom.dvar import variance_ratio, window_in_values
from lightning_custom.errors import UserInputError

log = logging.getLogger(__name__)


class DVAREarlyStopping(Callback):
    """Stop training once ``var(last window of L_det) / var(all L_det) < threshold`` (Voronov et al., 2023).

    The LightningModule logs the deterministic loss (``dvar_loss``; ``dvar_loss/<name>`` for one series per
    concept) in its validation step; this callback collects it in ``on_validation_epoch_end`` and decides there.
    With several series it stops only once every series has converged.

    Args:
        window: window length in optimizer steps (the paper: 310 for Textual Inversion).
        threshold: stop when the variance ratio falls below this (the paper: 0.15).
        eval_every_n_steps: evaluate the deterministic loss every this many optimizer steps (paper: 1). The
            callback sets the trainer's validation cadence to match.
        min_steps: never stop before this many optimizer steps.
        max_steps: stop after this many optimizer steps even if DVAR has not fired (``stopped_by="max_steps"``).
        monitor: the logged metric name (series named ``monitor`` or ``monitor/<name>``).
        stop: if ``False``, only observe and record (full-length baselines and fixed budgets keep the series).
        verbose: log the reason for stopping.
    """

    def __init__(
        self,
        window: int = 310,
        threshold: float = 0.15,
        eval_every_n_steps: int = 1,
        min_steps: int = 0,
        max_steps: int | None = None,
        monitor: str = "dvar_loss",
        stop: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if window < 2:
            raise UserInputError(f"--dvar.window: must be at least 2 steps, got {window}")
        if eval_every_n_steps < 1:
            raise UserInputError(f"--dvar.eval_every_n_steps: must be at least 1, got {eval_every_n_steps}")
        if threshold <= 0:
            raise UserInputError(f"--dvar.threshold: must be positive, got {threshold}")
        self.window, self.threshold = window, threshold
        self.eval_every_n_steps, self.min_steps, self.max_steps = eval_every_n_steps, min_steps, max_steps
        self.monitor, self.stop, self.verbose = monitor, stop, verbose
        self.histories: dict[str, list[list[float]]] = {}
        self.ratios: dict[str, list[list[float]]] = {}
        self.stop_step: int | None = None
        self.stopped_by: str | None = None
        self.stop_reason: str = ""

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    @property
    def window_values(self) -> int:
        """The window in number of loss values."""
        return window_in_values(self.window, self.eval_every_n_steps)

    @property
    def history(self) -> list[list[float]]:
        """The single series (``[[step, loss], ...]``); with several series, the first one."""
        return next(iter(self.histories.values()), [])

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Validation is where L_det is computed; run it every `eval_every_n_steps` optimizer steps.
        trainer.val_check_interval = self.eval_every_n_steps * trainer.accumulate_grad_batches
        trainer.check_val_every_n_epoch = None
        if not hasattr(pl_module, "deterministic_loss"):
            raise UserInputError(
                f"DVAREarlyStopping: {type(pl_module).__name__} has no deterministic_loss(batch) method to evaluate"
            )

    def _series(self, trainer: L.Trainer) -> dict[str, float]:
        metrics = trainer.callback_metrics
        return {
            key: float(value)
            for key, value in metrics.items()
            if key == self.monitor or key.startswith(self.monitor + "/")
        }

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        step = trainer.global_step
        values = self._series(trainer)
        if not values:
            raise RuntimeError(f"DVAREarlyStopping: the module logged no '{self.monitor}' in validation")
        if any(self.histories.get(key) and self.histories[key][-1][0] >= step for key in values):
            return  # this step was already evaluated (Lightning may validate again when stopping)
        ratios: dict[str, float | None] = {}
        for key, loss in values.items():
            series = self.histories.setdefault(key, [])
            series.append([step, loss])
            ratios[key] = variance_ratio([v for _, v in series], self.window_values)
            if ratios[key] is not None:
                self.ratios.setdefault(key, []).append([step, ratios[key]])
        known = [r for r in ratios.values() if r is not None]
        if known:
            pl_module.log("dvar_ratio", max(known), prog_bar=True, batch_size=1)
        self._decide(trainer, step, ratios)

    def _decide(self, trainer: L.Trainer, step: int, ratios: dict[str, float | None]) -> None:
        converged = all(r is not None and r < self.threshold for r in ratios.values())
        by_dvar = self.stop and converged and step >= self.min_steps
        by_cap = self.max_steps is not None and step >= self.max_steps
        # Every rank logs the same all-reduced loss; still reduce the decision so no rank can diverge.
        should_stop = trainer.strategy.reduce_boolean_decision(bool(by_dvar or by_cap), all=False)
        if not should_stop or self.stop_step is not None:
            return
        trainer.should_stop = True
        self.stop_step = step
        if by_dvar:
            self.stopped_by = "dvar"
            detail = ", ".join(f"{k}={r:.4f}" for k, r in ratios.items())
            self.stop_reason = (
                f"DVAR: variance ratio {detail} fell below threshold {self.threshold} "
                f"(window {self.window} steps) at step {step}; stopping."
            )
        else:
            self.stopped_by = "max_steps"
            self.stop_reason = f"DVAR: reached max_steps={self.max_steps} at step {step} without converging; stopping."
        if self.verbose and trainer.is_global_zero:
            log.info(self.stop_reason)
            print(self.stop_reason)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "histories": self.histories,
            "ratios": self.ratios,
            "stop_step": self.stop_step,
            "stopped_by": self.stopped_by,
            "stop_reason": self.stop_reason,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.histories = {k: [list(p) for p in v] for k, v in state_dict.get("histories", {}).items()}
        self.ratios = {k: [list(p) for p in v] for k, v in state_dict.get("ratios", {}).items()}
        self.stop_step = state_dict.get("stop_step")
        self.stopped_by = state_dict.get("stopped_by")
        self.stop_reason = state_dict.get("stop_reason", "")
