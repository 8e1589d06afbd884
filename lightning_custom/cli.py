"""``python -m lightning_custom``: a LightningCLI for every method, with DVAR and the run summary built in.

Besides ``fit`` and ``validate`` (L_det on DVAR's evaluation batch), six subcommands work on finished runs (see
``python -m lightning_custom <name> --help``): ``sample`` (images with the learned concept), ``evaluate`` (CLIP-I,
CLIP-T, DINO into metrics.json), ``replay`` (where DVAR would have stopped, for a grid of window x threshold),
``gather`` (many runs' summaries in one table, e.g. after a SLURM job array), ``before_after`` (on the embedded
world model: the concept sampled before and after training, with the world encoder's identity similarity) and
``calibrate`` (the DVAR window, threshold and evaluation period for a target quality retention, from full-length
runs with quality probes).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import FSDPStrategy

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.callbacks.live_samples import LiveReport, LiveSamples
from lightning_custom.runs.summary import SUMMARY_FILE
from lightning_custom.callbacks.progress import default_terminal_callbacks
from lightning_custom.commands import COMMANDS, PROGRAM, TRAINER_SUBCOMMANDS, run_command, subcommand_listing
from lightning_custom.data.concept import ConceptDataModule, check_data_config
from lightning_custom.data.templates import check_templates
from lightning_custom.errors import (
    BAD_INPUT_EXIT_CODE,
    EXIT_STATUS_HELP,
    FinalFilesNotWritten,
    UserInputError,
    exit_code_for,
)
from lightning_custom.runtime.interrupts import exit_code_of, forward_to_workers, report_exceptions_in_spawned_ranks
from lightning_custom.methods.base import PersonalizationModule
from lightning_custom.runs.provenance import RunFolderSaveConfig
from lightning_custom.runtime.parse_errors import OneLineErrorParser, one_line_parse_error  # noqa: F401 - re-exported
from lightning_custom.runtime.quiet import quiet_expected_noise
from lightning_custom.runtime.ranges import RANGES, check_ranges
from lightning_custom.runs.run_folder import (
    check_finished_run,
    check_output_dir,
    clear_earlier_run,
    is_remote,
    lock_run_folder,
    unlock_run_folder,
)
from lightning_custom.runtime.strategies import FSDP_STRATEGY_NAMES, DenoiserFSDPStrategy, apply_block_wrap_policy

# Trainer defaults for personalization: DVAR validates on its own cadence; no sanity check is needed
# because the evaluation batch is the same before and after the first step.
DEFAULT_EVAL_EVERY_N_STEPS = 10
TRAINER_DEFAULTS = {
    "max_steps": 6100,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
    "default_root_dir": "runs/lightning_custom",
}


class PersonalizationCLI(LightningCLI):
    """LightningCLI with the DVAR callback (``--dvar.*``) and the summary writer (``--summary.*``) always on.

    The placeholder token is given once, on the model, and linked to the data module's prompts. Before training it
    checks what can only be checked together (the resolution against the model's VAE, every output folder), locks
    the run folder and refuses (or, with ``--overwrite``, clears) a folder that holds a finished run.
    """

    def __init__(self, *args, **kwargs) -> None:
        self._locked: list = []  # run folders this CLI locked (LightningCLI.__init__ runs the subcommand)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate`` (DVAR's L_det on the fixed batch); ``test`` and ``predict`` have no data here."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(DVAREarlyStopping, "dvar")
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(LiveSamples, "sample")  # a grid every N steps; off unless every_n_steps > 0
        parser.add_lightning_class_args(LiveReport, "live_report")  # report.png redrawn while training
        parser.link_arguments("model.init_args.placeholder_token", "data.init_args.placeholder_token")
        parser.set_defaults({f"trainer.{k}": v for k, v in TRAINER_DEFAULTS.items()})
        # The paper evaluates L_det after every step: 30-45% of the wall time. Every 10 steps (the window still
        # counted in steps) measured 7% on a CPU (an evaluation costs ~0.8 of a step there) and should be ~3% on a
        # GPU, where it costs ~0.3 of a step; it moves the stop by a median 7 steps
        # (benchmarks/results/dvar_frequency.md). --dvar.eval_every_n_steps 1 reproduces the paper exactly.
        parser.set_defaults({"dvar.eval_every_n_steps": DEFAULT_EVAL_EVERY_N_STEPS})
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="replace a finished run in the run folder (its summary, artifacts, report, config and checkpoints); "
                 "without it such a folder is refused. A resume (--ckpt_path) continues the folder's run instead.",
        )
        parser.add_argument(
            "--cpu_threads", type=Optional[int], default=None,
            help="torch intra-op threads for work on the CPU (default: torch's choice). Small models run fastest with "
                 "1: on a busy machine, spinning OpenMP threads can make each step 10-30x slower.",
        )

    def before_instantiate_classes(self) -> None:
        """Apply ``--cpu_threads`` and check the trainer's step limit before any model is built."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        threads = config.get("cpu_threads") if config is not None else None
        if threads:
            torch.set_num_threads(threads)
        max_steps = config.get("trainer", {}).get("max_steps") if config is not None else None
        if self.subcommand == "fit" and max_steps is not None and (max_steps == 0 or max_steps < -1):
            # Lightning's -1 (no step limit: max_epochs or a callback ends the run) stays allowed.
            raise UserInputError(f"--trainer.max_steps: must be at least 1 (or -1 for no step limit), got {max_steps}")
        if self.subcommand in ("fit", "validate") and config is not None:
            check_config_ranges(config)
        if self.subcommand == "validate" and config is not None and not config.get("ckpt_path"):
            refuse_validating_a_finished_run(config)
        if self.subcommand == "fit" and config is not None:
            # The prompt templates fail before the model's weights load too (checked again where they are used).
            templates = (config.get("data") or {}).get("init_args", {}).get("prompt_templates")
            if templates is not None:
                check_templates(templates, "--data.prompt_templates")
        if self.subcommand in ("fit", "validate") and config is not None and config.get("data") is not None:
            # jsonargparse builds the model (loading its weights) before the data module: read the images first,
            # so a bad folder fails in a second.
            check_data_config(config.get("data"))

    def instantiate_trainer(self, **kwargs):
        """The trainer, with a progress bar in optimizer steps and a one-line parameter summary by default."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        added = default_terminal_callbacks({**trainer_config, **kwargs})
        if added:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or trainer_config.get("callbacks") or []), *added]
        strategy = kwargs.get("strategy", trainer_config.get("strategy"))
        if isinstance(strategy, str) and strategy in FSDP_STRATEGY_NAMES:
            # Lightning's "fsdp" refuses a CPU (and accelerator "auto"), wraps nothing by default and cannot clip
            # gradient norms; the denoiser's FSDP wraps its transformer blocks (lightning_custom.runtime.strategies).
            kwargs["strategy"] = DenoiserFSDPStrategy(cpu_offload=strategy == "fsdp_cpu_offload")
        trainer = super().instantiate_trainer(**kwargs)
        report_exceptions_in_spawned_ranks(trainer.strategy)  # ddp_spawn ranks save their state when interrupted
        return trainer

    def before_fit(self) -> None:
        """Check every output location and lock the run folder before anything is written or trained.

        Lightning's ``SaveConfigCallback`` writes ``config.yaml`` later, in ``setup``, so an earlier run's files
        are cleared (with ``--overwrite``) before the new run writes any.
        """
        trainer, datamodule = self.trainer, self.datamodule
        if isinstance(trainer.strategy, FSDPStrategy):
            # A user's own FSDPStrategy (class_path) without a policy still shards by the transformer blocks.
            apply_block_wrap_policy(trainer.strategy, self.model)
        if hasattr(datamodule, "check_resolution") and hasattr(self.model, "eval_batch_spec"):
            from lightning_custom.families.base import denoiser_latent_patch

            datamodule.check_resolution(self.model.eval_batch_spec().latent_downsample,
                                        denoiser_latent_patch(self.model))
        summary = next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)
        folders: dict[str, str] = {}  # run folder -> the option that set it (local ones; URLs are left to fsspec)
        for value, argument in ((trainer.default_root_dir, "--trainer.default_root_dir"),
                                (getattr(summary, "output_dir", None), "--summary.output_dir")):
            if value and not is_remote(value):
                folders.setdefault(str(check_output_dir(value, argument)), argument)
        checkpoint_dirs = []
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath and not is_remote(callback.dirpath):
                argument = f"--trainer.callbacks ({type(callback).__name__} dirpath)"
                checkpoint_dirs.append(check_output_dir(callback.dirpath, argument))
        class_cache_dir = getattr(datamodule, "hparams", {}).get("class_cache_dir") if datamodule is not None else None
        if class_cache_dir:
            check_output_dir(class_cache_dir, "--data.class_cache_dir")
        if not trainer.is_global_zero:
            return  # rank 0 holds the folder for the run; under DDP it prepared it before the other ranks started
        overwrite = bool(self._get(self.config, "overwrite", False))
        try:
            for folder, argument in folders.items():
                lock_run_folder(folder, argument)
                self._locked.append(folder)
                # Checked under the lock: no other run can finish into the folder in between.
                resuming = self._resuming(Path(folder))
                if check_finished_run(folder, overwrite=overwrite, resuming=resuming, argument=argument):
                    clear_earlier_run(folder, extra=tuple(checkpoint_dirs))
        except BaseException:
            self.after_fit()  # a refused run leaves the folder as it found it
            raise

    def before_validate(self) -> None:
        """``validate`` only measures: it writes no ``config.yaml`` over the one of the run in its folder."""
        self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, SaveConfigCallback)]

    def after_fit(self) -> None:
        """Release the run folder."""
        while self._locked:
            unlock_run_folder(self._locked.pop())

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            if subcommand != "fit":
                super()._run_subcommand(subcommand)
                return
            # With ddp_spawn this process only launches the ranks: it passes SIGTERM and Ctrl-C on to them
            # and waits for them to save their state, then exits as they did.
            with forward_to_workers(self.trainer) as signals:
                try:
                    super()._run_subcommand(subcommand)
                except Exception as err:
                    code = worker_exit_code(err)
                    if code is None and signals.pending is None:
                        raise
                    raise SystemExit(code or exit_code_of(signals.pending)) from None
            if signals.pending is not None:
                raise SystemExit(exit_code_of(signals.pending))
        finally:  # a fit that ends in an exception skips after_fit: release the run folders all the same
            self.after_fit()

    def fit_exit_code(self) -> int:
        """The exit status of the finished fit, from the ``stopped_by`` of the ``summary.json`` it wrote (0 on ranks
        other than 0, which write none; see :mod:`lightning_custom.errors`)."""
        summary = next((c for c in self.trainer.callbacks if isinstance(c, RunSummary)), None)
        if summary is None or not self.trainer.is_global_zero:
            return 0
        try:
            written = json.loads((summary.resolve_output_dir(self.trainer) / SUMMARY_FILE).read_text())
        except (OSError, ValueError):
            return 0
        if isinstance(written, dict):
            print(where_it_went(summary.resolve_output_dir(self.trainer), written))
        return exit_code_for(written.get("stopped_by") if isinstance(written, dict) else None)

    def _resuming(self, folder: Path) -> bool:
        """Whether this fit continues the folder's run: from a checkpoint in it (``--ckpt_path``, ``last``), or
        from SLURM's requeue checkpoint. A checkpoint from elsewhere starts a new run in the folder."""
        ckpt_path = self._get(self.config, "ckpt_path")
        if ckpt_path in ("last", "hpc"):
            return True
        if ckpt_path is not None:
            return folder.expanduser().resolve() in Path(ckpt_path).expanduser().resolve().parents
        return SLURMEnvironment.detect() and any(folder.glob("hpc_ckpt_*.ckpt"))


def main(args: Sequence[str] | None = None) -> PersonalizationCLI | None:
    """Run the CLI; bad input ends with a one-line ``error: ...`` message and exit status 2.

    Args:
        args: command-line arguments (``sys.argv[1:]`` when ``None``), e.g. ``["fit", "--config", "x.yaml"]``.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_expected_noise()
    argv = list(args) if args is not None else sys.argv[1:]
    if not argv or (not argv[0].startswith("-") and argv[0] not in (*TRAINER_SUBCOMMANDS, *COMMANDS)):
        print(subcommand_listing(argv[0] if argv else None), file=sys.stderr)
        raise SystemExit(BAD_INPUT_EXIT_CODE)
    try:
        if argv and argv[0] in COMMANDS:
            return run_command(argv)
        cli = PersonalizationCLI(
            PersonalizationModule,
            ConceptDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=59,
            parser_class=OneLineErrorParser,
            save_config_callback=RunFolderSaveConfig,  # config.yaml also beside summary.json
            save_config_kwargs={"overwrite": True},
            args=argv if args is not None else None,
            parser_kwargs={"prog": PROGRAM, "description": f"{__doc__}\n{EXIT_STATUS_HELP}",
                           "fit": {"description": f"Train a method; DVAR stops it. {EXIT_STATUS_HELP}"}},
        )
    except Exception as err:  # noqa: BLE001 - re-raised unless it is (or wraps) bad user input
        user_error = find_user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        code = BAD_INPUT_EXIT_CODE if isinstance(user_error, UserInputError) else user_error.exit_code
        raise SystemExit(code) from None
    code = cli.fit_exit_code() if cli.subcommand == "fit" else 0
    if code:  # the run ended but did not work: a scheduler must not take it for a success
        raise SystemExit(code)
    return cli


def rebuild_run(config_file: str | Path, overrides: Sequence[str] = ()) -> PersonalizationCLI:
    """The run of ``config_file`` built as ``fit --config`` builds it (model, data module, trainer and callbacks,
    the model's weights before the first step), without fitting: for scoring a run's saved snapshots afterwards
    (:func:`lightning_custom.world.probe.probe_snapshots`). ``overrides``: more command-line arguments, applied
    after the config (``["--trainer.callbacks=[]"]``)."""
    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when sys.argv holds the caller's arguments
    try:
        return PersonalizationCLI(PersonalizationModule, ConceptDataModule, subclass_mode_model=True,
                                  subclass_mode_data=True, seed_everything_default=59, run=False,
                                  args=["--config", str(config_file), *overrides])
    finally:
        sys.argv = saved


def refuse_validating_a_finished_run(config: Any) -> None:
    """``validate`` builds the config's model afresh: on a finished run's folder it would score the untrained
    model, silently. Refuse in one line and say what measures the trained one."""
    root = (config.get("trainer") or {}).get("default_root_dir")
    if not root or not (Path(root) / "summary.json").is_file():
        return
    try:
        summary = json.loads((Path(root) / "summary.json").read_text())
    except (OSError, ValueError):
        return
    if not (isinstance(summary, dict) and summary.get("artifacts")):
        return
    raise UserInputError(
        f"validate: {root} holds a finished run, and validate builds the config's model before training (it would "
        f"score the untrained weights). Pass --ckpt_path with one of the run's checkpoints to score trained "
        f"weights, or score the learned concept with: {PROGRAM} evaluate {root}")


def where_it_went(folder: Path, summary: dict[str, Any]) -> str:
    """Two lines after a fit: what it wrote where, and the command to try next."""
    files = summary.get("artifacts") or []
    wrote = f"Wrote {folder}: " + ", ".join(summary.get("files") or [*files, "summary.json"])
    if summary.get("stopped_by") in ("interrupted",):
        return f"{wrote}\nNext: resume with {PROGRAM} fit --config {folder / 'config.yaml'} --ckpt_path last"
    if not files:
        return f"{wrote}\nNext: read why it stopped in {folder / 'summary.json'} (stop_reason)"
    model = str((summary.get("model") or {}).get("name_or_path", ""))
    command = "before_after" if model.startswith("embedded") else "sample"
    return f"{wrote}\nNext: {PROGRAM} {command} {folder}"


def check_config_ranges(config: Any) -> None:
    """Check every numeric argument of the parsed ``config`` against :data:`lightning_custom.runtime.ranges.RANGES`, before
    any model loads (the classes check them again when built, for Python users)."""
    def as_dict(value: Any) -> dict[str, Any]:
        value = value.as_dict() if hasattr(value, "as_dict") else value
        return value if isinstance(value, dict) else {}

    for group in ("model", "data"):
        check_ranges(group, as_dict(as_dict(config.get(group)).get("init_args")))
    for group in ("dvar", "sample", "live_report"):
        check_ranges(group, as_dict(config.get(group)))
    check_ranges("cpu_threads", {"cpu_threads": config.get("cpu_threads")})
    callbacks = as_dict(config.get("trainer")).get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        callback = as_dict(callback)
        name = str(callback.get("class_path", "")).rsplit(".", 1)[-1]
        if name in RANGES:
            check_ranges(name, as_dict(callback.get("init_args")))


def find_user_error(err: BaseException | None) -> UserInputError | FinalFilesNotWritten | None:
    """The :class:`UserInputError` (or :class:`FinalFilesNotWritten`) behind ``err``; jsonargparse wraps errors
    raised while instantiating classes."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (UserInputError, FinalFilesNotWritten)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def worker_exit_code(err: BaseException) -> int | None:
    """The exit status of a ``ddp_spawn`` rank that ended the fit by exiting (e.g. 143 after SIGTERM), else
    ``None``: what the launching process should exit with, without a traceback of its own."""
    code = getattr(err, "exit_code", None)
    if type(err).__name__ != "ProcessExitedException" or not isinstance(code, int):
        return None
    return code if code > 0 else 128 - code  # killed by a signal: 128 + its number, as a shell reports it


if __name__ == "__main__":  # pragma: no cover
    main()
