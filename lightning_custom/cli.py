"""``python -m lightning_custom``: a LightningCLI for every method, with DVAR and the run summary built in.

Besides fit/validate/..., five subcommands work on finished runs (see ``python -m lightning_custom <name> --help``):
``sample`` (images with the learned concept), ``evaluate`` (CLIP-I, CLIP-T, DINO into metrics.json),
``replay`` (where DVAR would have stopped, for a grid of window x threshold), ``gather`` (many runs'
summaries in one table, e.g. after a SLURM job array) and ``before_after`` (on the embedded world model: the
concept sampled before and after training, with the world encoder's identity similarity).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Optional

import torch

from lightning.pytorch.cli import LightningCLI

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.callbacks.live_samples import LiveReport, LiveSamples
from lightning_custom.callbacks.progress import default_terminal_callbacks
from lightning_custom.commands import COMMANDS, run_command
from lightning_custom.data.concept import ConceptDataModule, check_data_config
from lightning_custom.errors import UserInputError
from lightning_custom.methods.base import PersonalizationModule
from lightning_custom.provenance import RunFolderSaveConfig
from lightning_custom.quiet import quiet_expected_noise

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

    The placeholder token is given once, on the model, and linked to the data module's prompts.
    """

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
            "--cpu_threads", type=Optional[int], default=None,
            help="torch intra-op threads for work on the CPU (default: torch's choice). Small models run fastest with "
                 "1: on a busy machine, spinning OpenMP threads can make each step 10-30x slower.",
        )

    def before_instantiate_classes(self) -> None:
        """Apply ``--cpu_threads`` before any model is built."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        threads = config.get("cpu_threads") if config is not None else None
        if threads:
            torch.set_num_threads(threads)
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
        return super().instantiate_trainer(**kwargs)


def main(args: Sequence[str] | None = None) -> PersonalizationCLI | None:
    """Run the CLI; bad input ends with a one-line ``error: ...`` message and exit status 2.

    Args:
        args: command-line arguments (``sys.argv[1:]`` when ``None``), e.g. ``["fit", "--config", "x.yaml"]``.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_expected_noise()
    argv = list(args) if args is not None else sys.argv[1:]
    try:
        if argv and argv[0] in COMMANDS:
            return run_command(argv)
        return PersonalizationCLI(
            PersonalizationModule,
            ConceptDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=59,
            save_config_callback=RunFolderSaveConfig,  # config.yaml also beside summary.json
            save_config_kwargs={"overwrite": True},
            args=argv if args is not None else None,
            parser_kwargs={"description": __doc__},
        )
    except Exception as err:  # noqa: BLE001 - re-raised unless it is (or wraps) bad user input
        user_error = find_user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


def find_user_error(err: BaseException | None) -> UserInputError | None:
    """The :class:`UserInputError` behind ``err``; jsonargparse wraps errors raised while instantiating classes."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserInputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":  # pragma: no cover
    main()
