"""Subcommands beside LightningCLI's fit/validate/...: ``sample``, ``evaluate``, ``replay``, ``gather``,
``before_after`` and ``calibrate`` work on finished runs.

Each is a plain function in a module of this folder (:mod:`.generate`: sample, evaluate; :mod:`.stop_settings`:
replay, calibrate; :mod:`.tables`: gather; :mod:`.quickstart`: before_after); its signature is the command line
and its docstring the ``--help``. This module turns arguments into a call. Lists are given space-separated
(``--windows 100 200``), in YAML/JSON form (``--windows '[100, 200]'``) or one item at a time
(``--windows 100 --windows+ 200``); ``--prompts`` takes one template or a list.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_custom.commands.generate import evaluate, sample
from lightning_custom.commands.quickstart import before_after
from lightning_custom.commands.stop_settings import calibrate, replay
from lightning_custom.commands.tables import gather
from lightning_custom.errors import UserInputError


COMMANDS: dict[str, Callable] = {"sample": sample, "evaluate": evaluate, "replay": replay, "gather": gather,
                                 "before_after": before_after, "calibrate": calibrate}
_POSITIONAL = {"sample": ("run_dir", None), "evaluate": ("run_dir", None), "replay": ("runs", "+"),
               "gather": ("runs", "+"), "before_after": ("run_dir", None), "calibrate": ("runs", "+")}


def build_parser(name: str):
    """The jsonargparse parser of one subcommand, from its function's signature and docstring."""
    from jsonargparse import ArgumentParser

    function = COMMANDS[name]
    positional, nargs = _POSITIONAL[name]
    doc = (function.__doc__ or "").split("Args:")[0].strip()  # the summary and any example, not the arguments
    parser = ArgumentParser(prog=f"python -m lightning_custom {name}", description=doc)
    help_line = next(
        (line.split(":", 1)[1].strip() for line in (function.__doc__ or "").splitlines()
         if line.strip().startswith(f"{positional}:")), "",
    )
    parser.add_argument(positional, nargs=nargs, help=help_line) if nargs else parser.add_argument(
        positional, help=help_line
    )
    grouped = option_groups(function)
    parser.add_function_arguments(function, skip={positional, *grouped}, as_positional=False)
    for options in grouped.values():  # their fields are options of their own: --seed, not --sampling.seed
        parser.add_class_arguments(options, as_group=False, instantiate=False)
    return parser


def option_groups(function: Callable) -> dict[str, type]:
    """``function``'s arguments that are a dataclass of options shared between commands (``sampling:
    SamplingOptions``), by name: each field of theirs is one command-line option."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(function)
    return {name: hint for name, hint in hints.items() if dataclasses.is_dataclass(hint)}


def group_options(function: Callable, kwargs: dict) -> dict:
    """The parsed arguments as ``function`` takes them: the fields of each option group gathered into its
    dataclass."""
    import dataclasses

    kwargs = dict(kwargs)
    for name, options in option_groups(function).items():
        fields = {f.name for f in dataclasses.fields(options)}
        kwargs[name] = options(**{key: kwargs.pop(key) for key in fields if key in kwargs})
    return kwargs


def numeric_list_arguments(function: Callable) -> set[str]:
    """The names of ``function``'s arguments typed as lists of numbers (``windows: list[int] | None``)."""
    import typing

    hints = typing.get_type_hints(function)
    for options in option_groups(function).values():
        hints.update(typing.get_type_hints(options))
    numeric = {list[int], list[float]}
    return {name for name, hint in hints.items()
            if hint in numeric or any(arg in numeric for arg in typing.get_args(hint))}


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def join_space_separated(args: Sequence[str], names: set[str]) -> list[str]:
    """``--windows 20 40`` -> ``--windows [20, 40]`` for the given list arguments (jsonargparse wants one value);
    the numbers after the option are taken, so a positional argument may still follow them."""
    joined: list[str] = []
    index = 0
    while index < len(args):
        token = args[index]
        joined.append(token)
        index += 1
        if token.startswith("--") and token[2:].replace("-", "_") in names:
            values = []
            while index < len(args) and _is_number(args[index]):
                values.append(args[index])
                index += 1
            if values:
                joined.append("[" + ", ".join(values) + "]")
    return joined


def run_command(args: Sequence[str]):
    """Run ``args[0]`` (one of :data:`COMMANDS`) with the remaining arguments; return the function's result."""
    name = args[0]
    rest = join_space_separated(list(args[1:]), numeric_list_arguments(COMMANDS[name]))
    parser = build_parser(name)
    config = parser.parse_args(rest)
    kwargs = {k: v for k, v in vars(config).items() if k != "config"}
    kwargs = group_options(COMMANDS[name], {k.replace("-", "_"): v for k, v in kwargs.items()})
    concepts = fleet_concept_folders(kwargs.get("run_dir")) if name in PER_RUN_COMMANDS else []
    if not concepts:
        return COMMANDS[name](**kwargs)
    # A fleet's folder: the command runs on each concept's folder, as on a run of its own.
    chosen = [key for key in ("output", "output_dir") if kwargs.get(key)]
    if chosen:
        raise UserInputError(f"--{chosen[0]}: {kwargs['run_dir']} is a fleet of {len(concepts)} concepts; each "
                             f"concept's {name} goes into its own folder (give one concept's folder to choose)")
    return [COMMANDS[name](**{**kwargs, "run_dir": str(folder)}) for folder in concepts]


PER_RUN_COMMANDS = ("sample", "evaluate", "before_after")


def fleet_concept_folders(run_dir: str | None) -> list[Path]:
    """The concept folders of a fleet's run folder (empty for any other folder)."""
    from lightning_custom.runs.gather import fleet_folders

    if not run_dir:
        return []
    run = Path(run_dir)
    return [run / folder for folder in fleet_folders(run / "summary.json") if (run / folder / "summary.json").is_file()]


# how the user started it: the console script, or the module
PROGRAM = "lightning-custom" if Path(sys.argv[0]).name == "lightning-custom" else "python -m lightning_custom"
TRAINER_SUBCOMMANDS = {"fit": "train a method on a concept; DVAR stops it (--config configs/quickstart.yaml)",
                       "validate": "L_det of a config's model on its fixed evaluation batch"}


def subcommand_listing(given: str | None = None) -> str:
    """Every subcommand with its one line; with ``given`` (an unknown one), an error line first, naming the
    closest subcommand."""
    import difflib

    lines = []
    if given is not None:
        close = difflib.get_close_matches(given, [*TRAINER_SUBCOMMANDS, *COMMANDS], n=1)
        lines.append(f"error: unknown subcommand {given!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    lines.append(f"usage: {PROGRAM} <subcommand> [options]   ({PROGRAM} <subcommand> --help for its options)")
    lines.append("subcommands:")
    for name, words in {**TRAINER_SUBCOMMANDS, **command_summaries()}.items():
        lines.append(f"  {name:<13} {words}")
    return "\n".join(lines)


def command_summaries() -> dict[str, str]:
    """The first line of each run command's docstring (``sample``, ``evaluate``...)."""
    return {name: (function.__doc__ or "").strip().splitlines()[0].rstrip(".") for name, function in COMMANDS.items()}


LIGHT_COMMANDS = ("gather", "replay", "calibrate")  # read summaries only: no torch, Lightning or diffusers import


def top_level_help() -> str:
    """``python -m lightning_custom --help``: every subcommand and the exit statuses, without loading the stack."""
    from lightning_custom.errors import EXIT_STATUS_HELP

    return (f"{subcommand_listing()}\n\nTrain with `{PROGRAM} fit --config configs/quickstart.yaml` "
            f"(`{PROGRAM} fit --help` lists every option).\n\n{EXIT_STATUS_HELP}")
