"""Write the method's artifacts and ``summary.json`` at the end of every fit."""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_custom.runs.final_files import keep_what_was_trained, last_healthy_artifacts
from lightning_custom.dvar.fleet_stops import concept_summary
from lightning_custom.callbacks.live_samples import SAMPLES_FOLDER
from lightning_custom.runtime.interrupts import (
    CTRL_C_NAME,
    StopSignals,
    exit_code_of,
    stop_lightning_after_this_step,
)
from lightning_custom.runtime.io import publish, replace_path, staging_folder
from lightning_custom.dvar.report import REPORT_FILE
from lightning_custom.runs.summary import SUMMARY_FILE, write_summary
from lightning_custom.callbacks.summary_record import (
    synchronize_device,
    build_summary,
    files_named_by,
    find_callback,
    remove_temporaries,
    stop_information,
    trainable_weights_finite,
)
from lightning_custom.runs.run_folder import lock_run_folder, unlock_run_folder

INTERRUPTED_CHECKPOINT = "checkpoints/interrupted.ckpt"
KEPT_FILES = ("config.yaml",)  # written by the CLI when the fit starts: part of the run, never stale
log = logging.getLogger(__name__)


class RunSummary(Callback):
    """Export diffusers-native artifacts and a ``summary.json`` under ``trainer.default_root_dir``.

    The summary holds the method, the model, the stop step and why training stopped, the DVAR settings and its
    loss history, the wall time and the files of the run. All final files are written into one temporary folder
    inside the run folder and moved into place with ``summary.json`` last; ``summary.json`` names every file that
    belongs to it (``artifacts``, ``files``), so a folder never mixes one run's summary with another's files.

    ``train_loss_history`` holds one ``[step, loss]`` pair per optimizer step: the mean of its micro-batches'
    unnormalized losses, averaged over ranks under DDP. The losses stay on the device and are read in batches
    (at each validation, checkpoint and at the end of fit), so recording them costs no host synchronization.

    Weights that hold NaN or infinite values (or a run stopped with ``stopped_by: "non_finite"`` or
    ``"diverged"``) are not exported: only the last healthy weights, under ``last_healthy/``, or nothing (the
    summary says why in ``artifacts_withheld``).

    On SIGTERM (what SLURM sends before it kills a job) or Ctrl-C, the run stops after the current step (every
    rank after the same one), saves a resumable checkpoint to ``checkpoints/interrupted.ckpt`` in the run folder
    and the summary (``stopped_by: "interrupted"``), and the process exits non-zero (143 after SIGTERM, 130 after
    Ctrl-C; a second Ctrl-C stops at once, with Lightning's exit status 1, saving the state at that point). A
    signal that arrives after training, while the final files are written, waits until they are complete (the
    summary records it in ``signal_during_export``); the fit then ends with ``SystemExit(143)`` (or 130).

    A diverged or non-finite run never exports its broken weights under the usual names: the weights of its last
    healthy evaluation go to ``last_healthy/`` (see ``DVAREarlyStopping``), or nothing is exported. When the final
    files cannot be written (a full disk), what was trained is kept and :class:`FinalFilesNotWritten` says where.

    Args:
        output_dir: where to write; defaults to ``trainer.default_root_dir``.
        export: also call the module's ``export_artifacts`` (turn off to only write the summary).
        report: also draw ``report.png`` (training loss, deterministic loss, variance ratio, stop step).
    """

    def __init__(self, output_dir: str | None = None, export: bool = True, report: bool = True) -> None:
        super().__init__()
        self.output_dir, self.export, self.report = output_dir, export, report
        self._reset()

    def _reset(self) -> None:
        """Forget everything recorded, so a reused instance starts each fit afresh (a resume restores it)."""
        self.train_loss_history: list[list[float]] = []
        self._step_losses: list[tuple[int, torch.Tensor]] = []  # (step, loss) on the device, not read yet
        self._micro_losses: list[torch.Tensor] = []  # the current optimizer step's micro-batch losses
        self._last_step = 0
        self._reduce: Callable[..., torch.Tensor] | None = None
        self._start: float | None = None
        self.wall_seconds_before_resume = 0.0
        self.dvar_seconds = 0.0  # wall time inside validation, i.e. computing DVAR's deterministic loss
        self._validation_start: float | None = None
        self.resumed_from: str | None = None
        self.resumed_at_step: int | None = None
        self._signals = StopSignals()
        self._final_files_written = False

    def resolve_output_dir(self, trainer: L.Trainer) -> Path:
        """The folder every file of this run goes to."""
        return Path(self.output_dir or trainer.default_root_dir)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset()
            self._reduce = trainer.strategy.reduce
            if trainer.is_global_zero:  # one run at a time in the folder (a no-op where the CLI locked it)
                lock_run_folder(self.resolve_output_dir(trainer), self._folder_argument())
            # From here on (before Lightning registers its SIGTERM handler, right before training): ours is then
            # what its teardown puts back, so a SIGTERM during the final export is held too, and one while the
            # model is set up or restored stops the run after its first step (lightning_custom.runtime.interrupts).
            self._signals.announce = trainer.is_global_zero
            self._signals.install(on_first_signal=lambda: self._on_first_signal(trainer))

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        unlock_run_folder(self.resolve_output_dir(trainer))
        self._signals.restore()
        if self._signals.pending is not None:
            # The signal came after training; it was held until the final files were complete. Act on it now.
            code = exit_code_of(self._signals.pending)
            if trainer.is_global_zero:
                print(f"{self._signals.pending} arrived while the final files were written; they are complete in "
                      f"{self.resolve_output_dir(trainer)}. Exiting with status {code}.", file=sys.stderr)
            raise SystemExit(code)

    def _folder_argument(self) -> str:
        return "--summary.output_dir" if self.output_dir else "--trainer.default_root_dir"

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        if trainer.is_global_zero:
            remove_temporaries(self.resolve_output_dir(trainer))

    def _on_first_signal(self, trainer: L.Trainer) -> None:
        launcher = trainer.strategy.launcher
        if launcher is not None:  # ranks this process started (strategy "ddp"): they stop with it
            launcher.kill(signal.SIGTERM)
        if trainer.world_size == 1:  # one process: stop after the step under way (under DDP: see agree())
            stop_lightning_after_this_step(trainer)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The checkpoint (if any) is restored by now: global_step is where this fit resumes.
        self._last_step = trainer.global_step
        if trainer.ckpt_path:
            self.resumed_from, self.resumed_at_step = str(trainer.ckpt_path), trainer.global_step
        self._signals.take_over_from_lightning()
        if self._signals.pending is not None and trainer.world_size == 1:
            stop_lightning_after_this_step(trainer)  # it came while the model loaded (Lightning's flag was reset)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self._micro_losses.append(loss.detach())
        if trainer.global_step > self._last_step:  # this micro-batch ended an optimizer step
            # Lightning divides every micro-batch loss by accumulate_grad_batches (also in a short last group).
            scale = trainer.accumulate_grad_batches / len(self._micro_losses)
            self._step_losses.append((trainer.global_step, torch.stack(self._micro_losses).float().sum() * scale))
            self._micro_losses, self._last_step = [], trainer.global_step
            if self._signals.agree(trainer) is not None:  # every rank, after the same optimizer step
                stop_lightning_after_this_step(trainer)

    def read_losses(self) -> None:
        """Move the recorded step losses to ``train_loss_history``: one host transfer, averaged over ranks.

        Under DDP every rank must call this at the same point (it is a collective).
        """
        if not self._step_losses:
            return
        values = torch.stack([loss for _, loss in self._step_losses])
        if self._reduce is not None:
            values = self._reduce(values, reduce_op="mean")
        steps = [step for step, _ in self._step_losses]
        self.train_loss_history.extend([step, value] for step, value in zip(steps, values.tolist()))
        self._step_losses = []

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            synchronize_device(pl_module)
            self._validation_start = time.perf_counter()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validation_start is not None:
            synchronize_device(pl_module)
            self.dvar_seconds += time.perf_counter() - self._validation_start
            self._validation_start = None
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.read_losses()  # the host waits for the device here anyway

    def wall_seconds(self) -> float:
        """Seconds spent in fit, including time before a resume."""
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        return self.wall_seconds_before_resume + elapsed

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wall = self.wall_seconds()
        self.read_losses()
        if trainer.is_global_zero:
            self.write_final_files(trainer, pl_module, wall)
        self._final_files_written = True

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning's teardown, which runs after this hook, puts back the handlers it found (ours): give it the
        # ones from before the fit instead.
        getattr(trainer._signal_connector, "_original_handlers", {}).update(self._signals.previous_handlers())
        try:
            interrupted = isinstance(exception, (SIGTERMException, KeyboardInterrupt))
            if trainer.state.fn == "fit" and interrupted and not self._final_files_written:
                self.stop_interrupted_run(trainer, pl_module, exception)  # a further SIGTERM is held meanwhile
        finally:
            self._signals.restore()
            # Lightning calls no teardown hook after an exception: release the folder here, once the summary is
            # written, so a later fit in this process (or another process) may use it and no .lock stays behind.
            unlock_run_folder(self.resolve_output_dir(trainer))

    def stop_interrupted_run(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             exception: SIGTERMException | KeyboardInterrupt) -> None:
        """Save the resumable checkpoint and the interrupted summary, and set the exit status after SIGTERM."""
        sigterm = isinstance(exception, SIGTERMException)
        try:
            checkpoint = self.save_interrupted_checkpoint(trainer)
            if trainer.is_global_zero:
                ctrl_c = self._signals.pending == CTRL_C_NAME or not sigterm
                signal_name = "Ctrl-C (SIGINT)" if ctrl_c else "SIGTERM"
                reason = (
                    f"Interrupted by {signal_name} at step {trainer.global_step}; the resumable state is in "
                    f"{checkpoint}. Resume by running the same command with --ckpt_path {checkpoint} "
                    f"(from Python: trainer.fit(..., ckpt_path=...))."
                )
                self.write_final_files(trainer, pl_module, self.wall_seconds(), interrupted={
                    "stopped_by": "interrupted", "stop_reason": reason, "resume_checkpoint": str(checkpoint)})
                print(reason, file=sys.stderr)
        except Exception as err:  # noqa: BLE001 - the interruption must still end the run
            log.error("RunSummary: could not save the interrupted run's state: %s", err)
        if sigterm:
            # Lightning ends a SIGTERM'd fit with SystemExit(None), i.e. exit status 0: a scheduler would take
            # the run for finished. 143 (128 + 15) is what a shell reports for a process ended by SIGTERM, 130
            # (128 + 2) for one ended by Ctrl-C.
            exception.code = exit_code_of(self._signals.pending)

    def save_interrupted_checkpoint(self, trainer: L.Trainer) -> Path:
        """Save a resumable checkpoint (every callback's state) to ``checkpoints/interrupted.ckpt``, atomically.

        Every rank calls ``trainer.save_checkpoint`` (it synchronizes them); only rank 0 writes.
        """
        checkpoint = self.resolve_output_dir(trainer) / INTERRUPTED_CHECKPOINT
        partial = checkpoint.with_name(f".{checkpoint.name}.tmp")
        try:
            trainer.save_checkpoint(partial)
            if trainer.is_global_zero:
                replace_path(partial, checkpoint)
        finally:
            if trainer.is_global_zero:
                partial.unlink(missing_ok=True)
        return checkpoint

    def write_final_files(self, trainer: L.Trainer, pl_module: L.LightningModule, wall: float,
                          interrupted: dict[str, Any] | None = None) -> Path:
        """Write the artifacts, ``report.png`` and ``summary.json`` into a staging folder, then publish them.

        Args:
            interrupted: summary fields of an interrupted run (no artifact is exported then).

        Returns:
            The path of ``summary.json``.
        """
        out = self.resolve_output_dir(trainer)
        earlier = files_named_by(out / SUMMARY_FILE)
        with staging_folder(out) as staging:
            exported = False
            try:
                artifacts, fields = self._export(trainer, pl_module, staging, interrupted)
                exported = True
                self._write_summary(trainer, pl_module, wall, out, staging, artifacts, fields, interrupted)
                publish(staging, out, last=SUMMARY_FILE, stale=earlier - set(KEPT_FILES))
            except OSError as err:
                if interrupted:
                    raise
                raise keep_what_was_trained(out, staging, exported, pl_module, err) from err
        return out / SUMMARY_FILE

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule, staging: Path,
                interrupted: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
        """The artifacts written into ``staging`` and the summary fields that describe them.

        A run that diverged or went NaN exports only the weights of its last healthy evaluation, under
        ``last_healthy/`` (or nothing), never its broken weights under the usual names.
        """
        if interrupted or not self.export:
            return [], {}
        if getattr(pl_module, "trains_a_fleet", False):  # each concept's own stop decides (failed ones: nothing)
            return pl_module.export_artifacts(staging), {}
        stopped_by, _ = stop_information(trainer)
        failure = {"diverged": "diverged", "non_finite": "stopped on a non-finite value"}.get(stopped_by)
        if failure is None and not trainable_weights_finite(pl_module):
            failure = "ended with NaN or infinite weights"
        if failure is None:
            return pl_module.export_artifacts(staging), {}
        dvar = find_callback(trainer, "DVAREarlyStopping")
        return last_healthy_artifacts(pl_module, getattr(dvar, "healthy_weights", None), staging, failure)

    def _write_summary(self, trainer: L.Trainer, pl_module: L.LightningModule, wall: float, out: Path,
                       staging: Path, artifacts: list[str], fields: dict[str, Any],
                       interrupted: dict[str, Any] | None) -> None:
        """Write ``report.png`` and ``summary.json`` into ``staging``."""
        summary = build_summary(trainer, pl_module, wall, artifacts)
        if interrupted:
            # Nothing was saved against the budget: the run is paused, not finished.
            summary.update(interrupted, steps_saved=None, seconds_saved=None)
        summary.update(fields)
        for note in (fields.get("artifacts_withheld"), fields.get("artifacts_note")):
            if note:
                summary["stop_reason"] = f"{summary['stop_reason']} {note}".strip()
        if self._signals.pending is not None and not interrupted:
            summary["signal_during_export"] = (
                f"{self._signals.pending} arrived after training, while these files were written; they were "
                "completed before the process exited.")
        if self.resumed_from is not None:
            summary["resumed_from"], summary["resumed_at_step"] = self.resumed_from, self.resumed_at_step
            summary["stop_reason"] += (
                f" This run was resumed from {self.resumed_from} at step {self.resumed_at_step}."
            )
        summary["train_loss_history"] = self.train_loss_history
        summary["dvar_seconds"] = round(self.dvar_seconds, 3)
        summary["dvar_share"] = round(self.dvar_seconds / wall, 4) if wall > 0 else 0.0
        if self.report:
            from lightning_custom.dvar.report import write_report

            try:
                write_report(summary, staging / REPORT_FILE)
            except Exception as err:  # noqa: BLE001 - a plot must not cost the run its artifacts and summary
                log.warning("RunSummary: could not draw %s: %s", REPORT_FILE, err)
        dvar = find_callback(trainer, "DVAREarlyStopping")
        if getattr(pl_module, "trains_a_fleet", False) and dvar is not None:
            self._write_concept_summaries(summary, pl_module, dvar, staging)
        files = {p.name for p in staging.iterdir()} | {SUMMARY_FILE}
        files |= {name for name in KEPT_FILES if (out / name).exists()}
        if (out / INTERRUPTED_CHECKPOINT).is_file():  # this run's own (a resumed one keeps it)
            files.add(INTERRUPTED_CHECKPOINT)
        # LiveSamples' grids (written during this run: an earlier run's are cleared before it starts).
        files |= {f"{SAMPLES_FOLDER}/{grid.name}" for grid in (out / SAMPLES_FOLDER).glob("*.png")}
        summary["files"] = sorted(files)
        write_summary(staging / SUMMARY_FILE, summary)

    def _write_concept_summaries(self, summary: dict[str, Any], pl_module: L.LightningModule, dvar: Any,
                                 staging: Path) -> None:
        """A fleet: each concept's folder gets the ``summary.json`` (and ``report.png``) its own run would write;
        the run's summary lists every concept with its stop."""
        summary["concepts"] = []
        for spec in pl_module.concept_specs:
            folder = staging / spec.name
            folder.mkdir(exist_ok=True)
            own = concept_summary(summary, pl_module, dvar, spec.name,
                                  sorted(p.name for p in folder.iterdir() if p.is_file()))
            if self.report:
                from lightning_custom.dvar.report import write_report

                try:
                    write_report(own, folder / REPORT_FILE)
                except Exception as err:  # noqa: BLE001 - a plot must not cost the run its summary
                    log.warning("RunSummary: could not draw %s/%s: %s", spec.name, REPORT_FILE, err)
            own["files"] = sorted(p.name for p in folder.iterdir()) + [SUMMARY_FILE]
            write_summary(folder / SUMMARY_FILE, own)
            summary["concepts"].append({"name": spec.name, "folder": spec.name,
                                        **{k: own[k] for k in ("stop_step", "stopped_by", "stop_reason")}})

    @override
    def state_dict(self) -> dict[str, Any]:
        self.read_losses()  # every rank dumps the checkpoint, so the collective is safe here
        return {"train_loss_history": self.train_loss_history, "wall_seconds": self.wall_seconds(),
                "dvar_seconds": self.dvar_seconds}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_loss_history = [list(p) for p in state_dict.get("train_loss_history", [])]
        self.wall_seconds_before_resume = float(state_dict.get("wall_seconds", 0.0))
        self.dvar_seconds = float(state_dict.get("dvar_seconds", 0.0))
