"""DVAR early stopping: stop when the rolling variance of the deterministic loss flattens, and say so truthfully.

A flat variance ratio is read as convergence only when the run is healthy: a non-finite loss, a run that got
worse (diverged) and a run whose loss never moves (nothing trains) stop with their own ``stopped_by``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_custom.runs.final_files import (
    DEFAULT_SNAPSHOT_MAX_MB,
    HealthyWeights,
)
from lightning_custom.dvar.cadence import log_at_step, take_over_validation_cadence, warn_if_window_never_fills
from lightning_custom.dvar.fleet_stops import FleetStops, trainable_norm
from lightning_custom.dvar.rule import (
    DIVERGENCE_LOSS_TOLERANCE,
    DIVERGENCE_NORM_FACTOR,
    UNDERTRAINED_RELATIVE_SPREAD,
    barely_moved,
    head_values,
    is_flat,
    loss_divergence,
    norm_divergence,
    variance_ratio,
    window_in_values,
)
from lightning_custom.errors import UserInputError
from lightning_custom.runtime.ranges import check_ranges

log = logging.getLogger(__name__)

# Why a run stopped, least to most severe: when ranks disagree, all of them take the most severe reason.
STOP_KINDS: tuple[str, ...] = ("max_steps", "dvar", "undertrained", "not_training", "diverged", "non_finite")


class DVAREarlyStopping(Callback):
    """Stop training once ``var(last window of L_det) / var(all L_det) < threshold`` (Voronov et al., 2023).

    The LightningModule logs the deterministic loss (``dvar_loss``; ``dvar_loss/<name>`` for one series per
    concept) in its validation step; this callback collects it in ``on_validation_epoch_end`` and decides there.
    With several series it stops only once every series has converged.

    Before calling a flat ratio convergence it rules out, in this order (``stopped_by``):

    - ``"non_finite"``: the training loss or L_det is NaN or infinite (checked at every evaluation and at the
      end of training, without a host sync per step);
    - ``"diverged"``: the trainable parameters' norm grew more than ``divergence_norm_factor`` times, or, where
      DVAR would stop, L_det's last window is above its first values by more than ``divergence_tolerance``;
    - ``"not_training"``: L_det has not changed at all over a full window (nothing reaches the loss);
    - ``"undertrained"``: where DVAR would stop, L_det has moved by less than ``undertrained_below`` of its level
      (the variance ratio is blind to scale: a slow drift at a far too small learning rate flattens it too).

    At every evaluation that passes these checks it keeps a CPU copy of the trainable weights (up to
    ``healthy_snapshot_max_mb``): a run that diverges or goes NaN exports those, under ``last_healthy/``.

    A run resumed from a checkpoint taken after it stopped ends at once, with the same stop step and reason.

    Args:
        window: window length in optimizer steps (the paper: 310 for Textual Inversion).
        threshold: stop when the variance ratio falls below this (the paper: 0.15).
        eval_every_n_steps: evaluate the deterministic loss every this many optimizer steps (paper: 1). The
            callback runs validation on exactly these optimizer steps, whatever the trainer's own cadence.
        min_steps: never stop by DVAR (or for a loss that does not move) before this many optimizer steps; a
            non-finite loss or exploding weights stop the run at any step.
        max_steps: stop after this many optimizer steps even if DVAR has not fired (``stopped_by="max_steps"``).
        monitor: the logged metric name (series named ``monitor`` or ``monitor/<name>``).
        stop: if ``False``, only observe and record (full-length baselines and fixed budgets keep the series);
            a non-finite loss still stops the run.
        verbose: print the reason for stopping (rank 0).
        divergence_tolerance: where DVAR would stop, call the run diverged if L_det's last-window mean exceeds the
            mean of its first values by more than this share.
        divergence_norm_factor: call the run diverged once the trainable parameters' norm exceeds this many times
            its value before the first step.
        undertrained_below: where DVAR would stop, call the run undertrained if L_det moved by less than this share
            of its level over the whole run (0: never).
        healthy_snapshot_max_mb: keep a copy of the trainable weights at each healthy evaluation if they take at
            most this many MB (0: never; full DreamBooth's are GBs).
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
        divergence_tolerance: float = DIVERGENCE_LOSS_TOLERANCE,
        divergence_norm_factor: float = DIVERGENCE_NORM_FACTOR,
        undertrained_below: float = UNDERTRAINED_RELATIVE_SPREAD,
        healthy_snapshot_max_mb: float = DEFAULT_SNAPSHOT_MAX_MB,
    ) -> None:
        super().__init__()
        check_ranges("dvar", locals())
        self.window, self.threshold = window, threshold
        self.eval_every_n_steps, self.min_steps, self.max_steps = eval_every_n_steps, min_steps, max_steps
        self.monitor, self.stop, self.verbose = monitor, stop, verbose
        self.divergence_tolerance, self.divergence_norm_factor = divergence_tolerance, divergence_norm_factor
        self.undertrained_below, self.healthy_snapshot_max_mb = undertrained_below, healthy_snapshot_max_mb
        self.reset()

    def reset(self) -> None:
        """Forget every run seen so far (called at the start of each fit; a resume restores the state after it)."""
        self.histories: dict[str, list[list[float]]] = {}
        self.ratios: dict[str, list[list[float]]] = {}
        self.norm_history: list[list[float]] = []
        self.initial_norm: float | None = None
        self.first_non_finite_step: int | None = None
        self.stop_step: int | None = None
        self.stopped_by: str | None = None
        self.stop_reason: str = ""
        # Device-side "first step with a non-finite training loss" (-1: none yet), read only at evaluations.
        self._non_finite_step: torch.Tensor | None = None
        self.healthy_weights = HealthyWeights(self.healthy_snapshot_max_mb)
        self.fleet = FleetStops()  # used when the module trains a fleet of concepts

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

    @property
    def last_evaluated_step(self) -> int:
        """The step of the latest evaluation (-1 before the first)."""
        return max((int(series[-1][0]) for series in self.histories.values() if series), default=-1)

    # ----------------------------------------------------------------------------------------- fit lifecycle
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(pl_module, "deterministic_loss"):
            raise UserInputError(
                f"DVAREarlyStopping: {type(pl_module).__name__} has no deterministic_loss(batch) method to evaluate"
            )
        # Lightning calls setup before it restores a checkpoint: a reused instance starts afresh, a resume goes on.
        self.reset()
        take_over_validation_cadence(self, trainer)
        warn_if_window_never_fills(self, trainer)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.initial_norm is None:  # not restored: this is the norm before the first step
            self.initial_norm = trainable_norm(pl_module)
        if getattr(pl_module, "trains_a_fleet", False):
            self.fleet.start(pl_module)
        if self.stop_step is None:
            return
        if self._stop_still_holds():
            # Resumed from a checkpoint taken at (or after) the stop: there is nothing left to train.
            trainer.should_stop = True
            if self.verbose and trainer.is_global_zero:
                print(f"DVAR: this run already stopped at step {self.stop_step} ({self.stopped_by}); "
                      "nothing left to train.")
        else:  # e.g. resumed with a larger --dvar.max_steps, or stop turned off: go on
            self.stop_step, self.stopped_by, self.stop_reason = None, None, ""

    def _stop_still_holds(self) -> bool:
        if self.stopped_by == "max_steps":
            return self.max_steps is not None and self.stop_step >= self.max_steps
        return self.stopped_by == "non_finite" or self.stop

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not torch.is_tensor(loss) or getattr(pl_module, "trains_a_fleet", False):
            return  # a fleet's loss sums its concepts': one concept's NaN shows in its own L_det and norm
        if self._non_finite_step is None or self._non_finite_step.device != loss.device:
            self._non_finite_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        # Stays on the device: no host sync per step; read at the next evaluation.
        bad = ~torch.isfinite(loss.detach()).all() & (self._non_finite_step < 0)
        self._non_finite_step.masked_fill_(bad, trainer.global_step)

    def _read_non_finite_step(self) -> int | None:
        """The first step with a non-finite training loss (syncs with the device once)."""
        if self.first_non_finite_step is None and self._non_finite_step is not None:
            step = int(self._non_finite_step.item())
            self.first_non_finite_step = step if step >= 0 else None
        return self.first_non_finite_step

    # ------------------------------------------------------------------------------------------- evaluation
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
        if getattr(pl_module, "trains_a_fleet", False):  # a stopped concept's L_det is no longer evaluated
            values = {k: v for k, v in values.items() if k.split("/", 1)[-1] in pl_module.active_concepts}
            if not values:
                return
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
        norm = trainable_norm(pl_module)
        self.norm_history.append([step, norm])
        known = [r for r in ratios.values() if r is not None and math.isfinite(r)]
        if known:
            pl_module.log("dvar_ratio", max(known), prog_bar=True, batch_size=1, logger=False)
        log_at_step(trainer, {**values, **({"dvar_ratio": max(known)} if known else {})}, step)
        if getattr(pl_module, "trains_a_fleet", False):  # every concept stops by itself
            self.fleet.decide(self, trainer, pl_module, step, values, ratios)
            return
        verdict = self._verdict(step, values, ratios, norm)
        if trainer.is_global_zero and self._healthy(values, norm):  # only rank 0 exports
            self.healthy_weights.keep(pl_module, step)
        self._decide(trainer, pl_module, step, verdict)

    def _healthy(self, values: dict[str, float], norm: float) -> bool:
        """Whether this evaluation's weights are sound: finite, not exploded, L_det not above where it started."""
        if self._read_non_finite_step() is not None or not math.isfinite(norm):
            return False
        if norm_divergence(self.initial_norm, norm, self.divergence_norm_factor):
            return False
        for key, loss in values.items():
            head = [v for _, v in self.histories[key][: head_values(self.window_values)]]
            if not math.isfinite(loss) or loss > sum(head) / len(head) * (1 + self.divergence_tolerance):
                return False
        return True

    def _verdict(self, step: int, values: dict[str, float], ratios: dict[str, float | None], norm: float,
                 initial_norm: float | None = None, keys: list[str] | None = None) -> tuple[str, str] | None:
        """This rank's ``(stopped_by, reason)`` at ``step``, or ``None`` to go on training.

        ``initial_norm`` and ``keys`` judge part of the run alone (one concept of a fleet): its norm before the
        first step and its series (default: the whole run's).
        """
        non_finite = self._non_finite_reason(step, values, norm)
        if non_finite:
            return "non_finite", non_finite
        if self.stop:
            exploded = norm_divergence(initial_norm if keys else self.initial_norm, norm, self.divergence_norm_factor)
            if exploded:
                return "diverged", f"Diverged: {exploded}; stopping at step {step}."
            series = {key: [v for _, v in points] for key, points in self.histories.items()
                      if keys is None or key in keys}
            full = all(len(s) >= self.window_values for s in series.values())
            if full and step >= self.min_steps:
                flat = [key for key, s in series.items() if is_flat(s)]
                if flat:
                    return "not_training", (
                        f"L_det has not changed: nothing is training ({', '.join(flat)} the same at all "
                        f"{len(series[flat[0]])} evaluations; is the placeholder in the captions, do the trained "
                        f"parameters reach the loss?); stopping at step {step}.")
            converged = all(r is not None and r < self.threshold for r in ratios.values())
            if converged and step >= self.min_steps:
                worse = {key: loss_divergence(s, self.window_values, self.divergence_tolerance)
                         for key, s in series.items()}
                worse = {key: why for key, why in worse.items() if why}
                if worse:
                    detail = "; ".join(f"{key}: {why}" for key, why in worse.items())
                    return "diverged", (f"Diverged: the variance ratio is below {self.threshold} but {detail}; "
                                        f"stopping at step {step}.")
                barely = {key: barely_moved(s, self.undertrained_below) for key, s in series.items()}
                barely = {key: why for key, why in barely.items() if why}
                if barely and self.undertrained_below > 0:
                    detail = "; ".join(f"{key}: {why}" for key, why in barely.items())
                    return "undertrained", (
                        f"Undertrained: the variance ratio is below {self.threshold}, but {detail}: training has "
                        "barely started, it has not converged. Raise the learning rate (--model.init_args."
                        "learning_rate), or let it train longer before DVAR may stop (--dvar.min_steps); "
                        f"--dvar.undertrained_below 0 turns this check off. Stopping at step {step}.")
                detail = ", ".join(f"{k}={r:.4f}" for k, r in ratios.items())
                return "dvar", (f"DVAR: variance ratio {detail} fell below threshold {self.threshold} "
                                f"(window {self.window} steps) at step {step}; stopping.")
        if self.max_steps is not None and step >= self.max_steps:
            return "max_steps", f"DVAR: reached max_steps={self.max_steps} at step {step} without converging; stopping."
        return None

    def _non_finite_reason(self, step: int, values: dict[str, float] | None = None,
                           norm: float | None = None) -> str | None:
        first = self._read_non_finite_step()
        bad_values = [key for key, v in (values or {}).items() if not math.isfinite(v)]
        if first is None and not bad_values and (norm is None or math.isfinite(norm)):
            return None
        parts = []
        if first is not None:
            parts.append(f"the training loss is non-finite from step {first}")
        if bad_values:
            parts.append(f"L_det ({', '.join(bad_values)}) is {values[bad_values[0]]} at step {step}")
        if not parts:
            parts.append(f"the trainable parameters are non-finite at step {step}")
        return f"Non-finite: {' and '.join(parts)}; stopping at step {step} (lower the learning rate)."

    def _decide(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int,
                verdict: tuple[str, str] | None) -> None:
        # Every rank logs the same all-reduced L_det, but a rank's training loss can be its own: reduce the
        # verdict (the most severe reason any rank saw) so that every rank stops at the same step, for that reason.
        code = 0 if verdict is None else 1 + STOP_KINDS.index(verdict[0])
        agreed = int(trainer.strategy.reduce(torch.tensor(code, device=pl_module.device), reduce_op="max"))
        if agreed == 0 or self.stop_step is not None:
            return
        kind = STOP_KINDS[agreed - 1]
        reason = verdict[1] if verdict is not None and verdict[0] == kind else (
            f"{kind}: decided on another rank at step {step}; stopping.")
        self._stop(trainer, step, kind, reason)

    def _stop(self, trainer: L.Trainer, step: int, kind: str, reason: str) -> None:
        trainer.should_stop = True
        self.stop_step, self.stopped_by, self.stop_reason = step, kind, reason
        if self.verbose and trainer.is_global_zero:
            log.info(reason)
            print(reason)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "trains_a_fleet", False):
            self.fleet.finish(trainer, pl_module, trainer.global_step)
            if self.stop_step is None:
                self.stopped_by, self.stop_reason = self.fleet.run_verdict(trainer.global_step)
                self.stop_step = trainer.global_step
            return
        # A non-finite loss after the last evaluation (e.g. the run hit max_steps in between) is still reported.
        reason = self._non_finite_reason(trainer.global_step) if self.stop_step is None else None
        agreed = int(trainer.strategy.reduce(torch.tensor(int(reason is not None), device=pl_module.device),
                                             reduce_op="max"))
        if agreed and self.stop_step is None:
            self._stop(trainer, trainer.global_step, "non_finite",
                       reason or f"non_finite: decided on another rank at step {trainer.global_step}.")

    def summary_fields(self) -> dict[str, Any]:
        """Extra ``summary.json`` fields: the trainable norm at each evaluation (for the divergence guard)."""
        return {"dvar_initial_trainable_norm": self.initial_norm, "dvar_trainable_norm_history": self.norm_history}

    # ------------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        self._read_non_finite_step()
        return {
            "histories": self.histories,
            "ratios": self.ratios,
            "norm_history": self.norm_history,
            "initial_norm": self.initial_norm,
            "first_non_finite_step": self.first_non_finite_step,
            "stop_step": self.stop_step,
            "stopped_by": self.stopped_by,
            "stop_reason": self.stop_reason,
            "healthy_weights": self.healthy_weights.state_dict(),
            "fleet": self.fleet.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.histories = {k: [list(p) for p in v] for k, v in state_dict.get("histories", {}).items()}
        self.ratios = {k: [list(p) for p in v] for k, v in state_dict.get("ratios", {}).items()}
        self.norm_history = [list(p) for p in state_dict.get("norm_history", [])]
        self.initial_norm = state_dict.get("initial_norm")
        self.first_non_finite_step = state_dict.get("first_non_finite_step")
        self.stop_step = state_dict.get("stop_step")
        self.stopped_by = state_dict.get("stopped_by")
        self.stop_reason = state_dict.get("stop_reason", "")
        self.healthy_weights.load_state_dict(state_dict.get("healthy_weights", {}))
        self.fleet.load_state_dict(state_dict.get("fleet", {}))
