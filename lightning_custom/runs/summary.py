"""The one owner of ``summary.json``: its name, reading it, and finding runs' summaries (a fleet's included).

Light on purpose (json and pathlib only): ``gather``, ``replay`` and ``calibrate`` read summaries without importing
torch or diffusers. Writing it is :class:`lightning_custom.callbacks.RunSummary`'s job.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

from lightning_custom.errors import UserInputError
from lightning_custom.runtime.io import write_json

SUMMARY_FILE = "summary.json"

StoppedBy = Literal["dvar", "max_steps", "max_time", "max_epochs", "fixed_budget", "undertrained", "not_training",
                    "diverged", "non_finite", "interrupted", "running", "clip"]


class RunSummaryRecord(TypedDict, total=False):
    """The fields of ``summary.json``: every key a run writes is declared here (a test fails on an undeclared one).

    Readers get this type from :func:`read_summary`; the JSON stays a plain object, so older runs keep loading.
    """

    # what was trained, and on what
    method: str  # the LightningModule's class name
    method_class_path: str  # its import path (old paths keep importing: lightning_custom._moved)
    pretrained_model_name_or_path: str
    model: dict[str, Any]  # name_or_path, resolved_path, revision, variant, weights_fingerprint
    model_family: str  # families registry name: sd, flux, sd3, ...
    prediction_type: str
    placeholder_token: str | None
    initializer_token: str | None
    class_noun: str | None
    class_prompts: list[str]
    prompt_templates: list[str]
    with_prior_preservation: bool
    instance_data_dir: str | None
    learning_rate: float  # the effective rate (after scale_lr)
    configured_learning_rate: float
    scale_lr: bool | None
    seed: int | None
    seeds: dict[str, int]  # model, eval, data, seed_everything
    versions: dict[str, str]  # lightning_custom, torch, diffusers, transformers, ...
    # why and when it stopped (stop_reason is the same in words)
    stop_step: int
    max_steps: int
    stopped_by: StoppedBy
    stop_reason: str
    resumed_at_step: int
    resumed_from: str  # the checkpoint a resumed run started from
    resume_checkpoint: str
    signal_during_export: str
    # DVAR's settings and series
    dvar_window: int | None
    dvar_threshold: float | None
    dvar_eval_every_n_steps: int | None
    dvar_history: list[list[float]]  # [[step, L_det], ...]
    dvar_histories: dict[str, list[list[float]]]  # a fleet's, per concept
    dvar_initial_trainable_norm: float
    dvar_trainable_norm_history: list[list[float]]
    dvar_seconds: float
    dvar_share: float
    train_loss_history: list[list[float]]
    # cost
    wall_seconds: float
    seconds_per_step: float
    steps_saved: int | None
    seconds_saved: float | None
    fleet_wall_seconds: float
    # what it wrote
    artifacts: list[str]
    artifacts_withheld: str  # why a failed run exported nothing
    artifacts_step: int  # a failed run's artifacts: the step of its last healthy weights
    artifacts_note: str  # where those weights are and why not under the usual name
    files: list[str]
    concepts: list[dict[str, Any]]  # a fleet's or a multi-concept run's: name, folder, token, ...
    concept: str  # a fleet concept's own summary: its name
    fleet_note: str
    # the optional callbacks' fields (summary_fields())
    live_report: dict[str, Any]
    live_samples: dict[str, Any]
    clip_best: float
    clip_best_step: int
    clip_history: list[list[float]]
    clip_seconds: float
    world_probe_every_n_steps: int
    world_probe_history: list[list[float]]
    world_probe_seconds: float


class UndeclaredSummaryField(UserWarning):
    """A run wrote a ``summary.json`` key that :class:`RunSummaryRecord` does not declare (the test suite makes this
    an error, so a new field is declared, with its type, where readers look)."""


def undeclared_fields(summary: dict[str, Any]) -> set[str]:
    """Keys of ``summary`` that :class:`RunSummaryRecord` does not declare."""
    return set(summary) - set(RunSummaryRecord.__annotations__)


def write_summary(path: Path, summary: RunSummaryRecord) -> None:
    """Write ``summary`` to ``path`` atomically, as strict JSON; warn on a field the record does not declare."""
    extra = undeclared_fields(dict(summary))
    if extra:
        warnings.warn(f"{path}: summary fields not declared in RunSummaryRecord: {sorted(extra)}",
                      UndeclaredSummaryField, stacklevel=2)
    write_json(path, summary)


def read_summary(run_dir: str | Path, argument: str = "run_dir") -> RunSummaryRecord:
    """The run's ``summary.json``, with a one-line error when the folder or the file is missing or broken."""
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise UserInputError(f"{argument}: no such run folder {str(run_dir)!r}")
    file = run / SUMMARY_FILE
    if not file.is_file():
        raise UserInputError(f"{argument}: {run} has no {SUMMARY_FILE} (is it the default_root_dir of a finished fit?)")
    try:
        summary = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserInputError(f"{argument}: {file} is not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(summary, dict):
        raise UserInputError(f"{argument}: {file} does not hold a JSON object")
    return summary


def read_summary_if_any(folder: Path) -> RunSummaryRecord | None:
    """The folder's ``summary.json`` (``{}`` if unreadable), or ``None`` if there is none (no error: a run folder
    being checked before a fit may hold anything)."""
    path = folder / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def natural_key(path: Path) -> list:
    """Sort key that orders numbers by value: ``run2`` before ``run10`` (text order puts 10 before 2)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(path))]


def find_summaries(paths: Sequence[str | Path], argument: str = "runs") -> list[Path]:
    """``summary.json`` files from run folders, summary files, or parent folders (searched recursively), in
    natural order, each fleet's own summary replaced by its concepts' (each concept is one run).

    A folder that holds none, even in its sub-folders, is a one-line error: a run that did not finish, or a typo.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            found.append(path)
        elif (path / SUMMARY_FILE).is_file():
            found.append(path / SUMMARY_FILE)
        elif path.is_dir():
            nested = sorted(path.rglob(SUMMARY_FILE), key=natural_key)
            if not nested:
                raise UserInputError(f"{argument}: {raw} holds no {SUMMARY_FILE} (searched its sub-folders too; a run "
                                     "that did not finish?)")
            found.extend(nested)
        else:
            raise UserInputError(f"{argument}: no such run folder or file {str(raw)!r}")
    return expand_fleets(found)


def expand_fleets(paths: Iterable[Path]) -> list[Path]:
    """``paths`` with each fleet's own summary replaced by its concepts' summaries (each concept is one run)."""
    out: list[Path] = []
    for path in paths:
        concepts = [path.parent / folder / SUMMARY_FILE for folder in fleet_folders(path)]
        concepts = [c for c in concepts if c.is_file()]
        out.extend(concepts or [path])
    return list(dict.fromkeys(out))


def fleet_folders(path: Path) -> list[str]:
    """The concept folders a fleet's ``summary.json`` names (empty for a single run's)."""
    try:
        concepts = json.loads(path.read_text()).get("concepts") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [str(c["folder"]) for c in concepts if isinstance(c, dict) and c.get("folder")]


def is_fleet_summary(path: Path) -> bool:
    """Whether ``path`` is the run summary of a fleet (its concepts have folders of their own)."""
    return bool(fleet_folders(path))


def check_trained(summary: RunSummaryRecord, run_dir: str | Path, argument: str = "run_dir") -> None:
    """Refuse a run that ended without its trained weights: an interrupted one, or one whose weights were withheld
    (non-finite values). Sampling it would silently show the base model.

    Raises:
        UserInputError: naming the run, why it stopped, and how to go on.
    """
    if summary.get("artifacts"):
        return
    stopped_by = summary.get("stopped_by")
    if stopped_by == "interrupted":
        checkpoint = summary.get("resume_checkpoint")
        hint = f"resume it with --ckpt_path {checkpoint}" if checkpoint else "resume it from its checkpoint"
    elif summary.get("artifacts_withheld"):
        hint = str(summary["artifacts_withheld"]).rstrip(".")
    else:
        return  # a method without artifacts (the base model samples)
    raise UserInputError(f"{argument}: {run_dir} has no trained artifacts (stopped_by: {stopped_by}; {hint})")
