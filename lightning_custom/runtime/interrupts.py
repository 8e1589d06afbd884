"""SIGTERM and Ctrl-C during a fit: every rank stops after the same optimizer step, and never mid-export.

Lightning's own SIGTERM handling has three gaps that lose runs:

* its handler is removed in ``Trainer._teardown``, *before* the ``on_fit_end`` hooks that write the final files,
  so a SIGTERM then (under SLURM: during the whole export of a DreamBooth pipeline) kills the process with its
  default action and nothing is kept;
* under DDP its handler broadcasts inside the signal handler, and each rank checks its own flag at the end of a
  step: ranks that got the signal at different moments stop at different steps, or pair a broadcast with a
  gradient all-reduce and hang;
* with ``ddp_spawn`` the launching process (not a rank) has no handler at all: SIGTERM kills it, and its workers
  get SIGINT from the kernel (``PR_SET_PDEATHSIG``) with nobody left to collect them; and the ranks it spawns never
  call the callbacks' ``on_exception`` hooks (Lightning calls them only around ``Trainer.fit`` in the launching
  process), so an interrupted rank saves nothing and exits 0 without a result, and the launcher waits forever.

:class:`StopSignals` closes the first two inside the fit (``RunSummary`` owns one); :func:`forward_to_workers`
and :func:`report_exceptions_in_spawned_ranks` close the third.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.call import _interrupt
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_custom.errors import CTRL_C_EXIT_CODE, SIGTERM_EXIT_CODE

SIGTERM_NAME, CTRL_C_NAME = "SIGTERM", "Ctrl-C"
# Agreed across ranks as a number: the larger wins (a Ctrl-C on any rank is reported as one).
_SIGNAL_CODES = {None: 0, SIGTERM_NAME: 1, CTRL_C_NAME: 2}


def exit_code_of(signal_name: str | None) -> int:
    """The exit status of a process stopped by ``signal_name`` (143 for SIGTERM, 130 for Ctrl-C)."""
    return CTRL_C_EXIT_CODE if signal_name == CTRL_C_NAME else SIGTERM_EXIT_CODE


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class StopSignals:
    """Holds SIGTERM and the first Ctrl-C of one fit until it is safe to act on them.

    * While training, a caught signal stops the run after the current optimizer step: :meth:`agree` (called once
      per optimizer step on every rank) makes all ranks see it at the same step and hands it to Lightning, which
      then saves the resumable state (``RunSummary.on_exception``).
    * After training, a caught signal waits until the final files are written; the fit then ends with
      ``SystemExit(143)`` (``130`` after Ctrl-C).
    * A second Ctrl-C stops at once (Python's ``KeyboardInterrupt``).

    Args:
        announce: print one line when the first Ctrl-C arrives (rank 0 only).
    """

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.pending: str | None = None  # SIGTERM_NAME or CTRL_C_NAME once caught
        self._previous: dict[int, Any] = {}
        self._on_first_signal: Callable[[], None] | None = None

    def install(self, on_first_signal: Callable[[], None] | None = None) -> None:
        """Catch SIGTERM and SIGINT from now on (a no-op outside the main thread, where Python cannot).

        Installed before Lightning registers its handlers, these become what Lightning restores in its teardown,
        so they also cover the final export.

        Args:
            on_first_signal: called once, inside the handler, when the first signal arrives (e.g. to pass it on
                to the worker processes this one launched).
        """
        self.pending, self._on_first_signal = None, on_first_signal
        if not _in_main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)

    def take_over_from_lightning(self) -> None:
        """Replace the SIGTERM handler Lightning registered for training with this one (see the module docstring)."""
        if self._previous and _in_main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        """Give SIGTERM and SIGINT back to the handlers they had before :meth:`install`."""
        if _in_main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def previous_handlers(self) -> dict[int, Any]:
        """The handlers :meth:`restore` gives back, by signal number."""
        return dict(self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            # The first Ctrl-C is held; give SIGINT back, so that a second one stops at once.
            previous = self._previous.get(signal.SIGINT)
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
            if self.announce and self.pending is None:
                print("Ctrl-C: stopping after this step and saving the state; press Ctrl-C again to stop at once.",
                      file=sys.stderr)
        first = self.pending is None
        self.pending = self.pending or (CTRL_C_NAME if signum == signal.SIGINT else SIGTERM_NAME)
        if first and self._on_first_signal is not None:
            self._on_first_signal()

    def agree(self, trainer: L.Trainer) -> str | None:
        """The signal any rank caught so far (the same answer on every rank), or ``None``; call on every rank.

        One process reads its own flag; under DDP the ranks all-reduce it once per optimizer step (a tiny
        collective beside the gradients'; Lightning's own SIGTERM broadcast costs as much).
        """
        code = _SIGNAL_CODES[self.pending]
        if trainer.world_size > 1:
            device = trainer.strategy.root_device
            code = int(trainer.strategy.reduce(torch.tensor(code, device=device), reduce_op="max"))
        agreed = next(name for name, value in _SIGNAL_CODES.items() if value == code)
        if agreed is not None:
            self.pending = agreed
        return agreed


def stop_lightning_after_this_step(trainer: L.Trainer) -> None:
    """Make Lightning stop after the current step as after a SIGTERM (it raises ``SIGTERMException`` there)."""
    trainer._signal_connector.received_sigterm = True


@contextlib.contextmanager
def forward_to_workers(trainer: L.Trainer) -> Iterator[StopSignals]:
    """In a process that launches its ranks with ``ddp_spawn``, pass SIGTERM and Ctrl-C on to them.

    Without this the launching process dies at the first SIGTERM and its ranks are left without a parent. With it,
    the ranks get SIGTERM, stop after the same step and save the resumable state; the caller then exits with
    :func:`exit_code_of` the signal in ``.pending``. Elsewhere (one process, or ranks started by ``ddp`` or SLURM)
    this does nothing.
    """
    signals = StopSignals(announce=False)
    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _MultiProcessingLauncher):
        yield signals
        return
    signals.install(on_first_signal=lambda: launcher.kill(signal.SIGTERM))
    try:
        yield signals
    finally:
        signals.restore()


class _ReportingSpawnLauncher(_MultiProcessingLauncher):
    """``ddp_spawn``'s launcher, whose ranks call the ``on_exception`` hooks (and save their state) as one process
    does, and exit with the interruption's status (143, 130) instead of 0."""

    def _wrapping_function(self, process_idx: int, trainer: L.Trainer | None, function: Callable, *args: Any,
                           **kwargs: Any) -> None:
        def run_with_exception_hooks(*fn_args: Any, **fn_kwargs: Any) -> Any:
            try:
                return function(*fn_args, **fn_kwargs)
            except BaseException as exception:
                if trainer is not None:
                    _interrupt(trainer, exception)
                    # No rank may exit before rank 0 has written the state: torch's launcher terminates the others
                    # as soon as one rank exits non-zero.
                    with contextlib.suppress(Exception):
                        trainer.strategy.barrier("interrupted")
                    trainer._teardown()
                if isinstance(exception, KeyboardInterrupt):  # torch's spawn wrapper would exit 0 on it
                    raise SystemExit(CTRL_C_EXIT_CODE) from None
                if isinstance(exception, SIGTERMException) and exception.code is None:
                    exception.code = SIGTERM_EXIT_CODE
                raise

        super()._wrapping_function(process_idx, trainer, run_with_exception_hooks, *args, **kwargs)


def report_exceptions_in_spawned_ranks(strategy: Any) -> None:
    """Give a ``ddp_spawn`` strategy the launcher whose ranks run the exception hooks (see the module docstring)."""
    launcher = getattr(strategy, "_launcher", None)
    if type(launcher) is _MultiProcessingLauncher:
        strategy._launcher = _ReportingSpawnLauncher(strategy, start_method=launcher._start_method)
