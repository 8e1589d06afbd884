"""When DVAR evaluates L_det: after exactly the optimizer steps k, 2k, ... (it takes the trainer's validation
schedule over), what it logs there, and a warning when the window can never fill."""

from __future__ import annotations

import logging
import types
from typing import TYPE_CHECKING

import lightning as L

from lightning_custom.dvar.rule import MIN_RULE_VALUES

if TYPE_CHECKING:  # pragma: no cover
    from lightning_custom.dvar.callback import DVAREarlyStopping

log = logging.getLogger(__name__)


def log_at_step(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` to every logger at ``step``: an evaluation after optimizer step 5 is logged at 5, where
    DVAR's history, ``summary.json`` and the report put it."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def take_over_validation_cadence(callback: DVAREarlyStopping, trainer: L.Trainer) -> None:
    """Validate (evaluate L_det) after exactly the optimizer steps k, 2k, ... and at no other time.

    Lightning counts ``val_check_interval`` in batches of the epoch (or in seconds), which drifts off the
    optimizer steps under gradient accumulation when an epoch is not a multiple of it, so the epoch loop's
    check is replaced by one on ``global_step``.
    """
    ours = callback.eval_every_n_steps * trainer.accumulate_grad_batches
    seconds = getattr(trainer, "_val_check_time_interval", None)
    interval = f"{seconds:g} s" if seconds is not None else getattr(trainer, "val_check_interval", None)
    user_interval = interval not in (None, 1.0, ours)
    user_epochs = trainer.check_val_every_n_epoch not in (None, 1)
    if (user_interval or user_epochs) and trainer.is_global_zero:
        log.warning(
            "DVAREarlyStopping: ignoring the trainer's val_check_interval=%s / check_val_every_n_epoch=%s: "
            "L_det is evaluated every %d optimizer steps (--dvar.eval_every_n_steps)",
            interval, trainer.check_val_every_n_epoch, callback.eval_every_n_steps,
        )
    trainer.val_check_interval = ours
    trainer.check_val_every_n_epoch = None
    trainer._val_check_time_interval = None
    epoch_loop = trainer.fit_loop.epoch_loop
    lightning_check = getattr(epoch_loop, "_lightning_should_check_val_fx", epoch_loop._should_check_val_fx)
    epoch_loop._lightning_should_check_val_fx = lightning_check

    def should_check_val(loop, data_fetcher) -> bool:
        if loop.trainer.should_stop:  # Lightning's own rule: validate once more when stopping early
            return lightning_check(data_fetcher)
        step = loop.trainer.global_step
        return (loop._should_check_val_epoch() and not loop._should_accumulate() and step > 0
                and step % callback.eval_every_n_steps == 0 and step > callback.last_evaluated_step)

    epoch_loop._should_check_val_fx = types.MethodType(should_check_val, epoch_loop)


def warn_if_window_never_fills(callback: DVAREarlyStopping, trainer: L.Trainer) -> None:
    """Say so in one line when the step limit comes before the first full window: DVAR can never fire then."""
    limits = [s for s in (trainer.max_steps, callback.max_steps) if s is not None and s > 0]
    if callback.stop and limits and callback.window > min(limits) and trainer.is_global_zero:
        log.warning(
            "DVAREarlyStopping: --dvar.window %d is longer than max_steps %d: DVAR can never fire; the run "
            "ends at max_steps", callback.window, min(limits),
        )
    if callback.stop and callback.window_values < MIN_RULE_VALUES and trainer.is_global_zero:
        log.warning(
            "DVAREarlyStopping: --dvar.window %d at --dvar.eval_every_n_steps %d holds %d L_det values; with fewer "
            "than %d the ratio falls below any threshold after a few evaluations, whatever the loss does (a fixed "
            "budget in disguise, benchmarks/results/settings_study): widen the window or evaluate more often",
            callback.window, callback.eval_every_n_steps, callback.window_values, MIN_RULE_VALUES,
        )
