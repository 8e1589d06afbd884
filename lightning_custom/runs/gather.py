"""Gather the summaries of many runs (e.g. a SLURM job array, one concept per task) into one table."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

from lightning_custom.errors import UserInputError
from lightning_custom.runtime.io import atomic_path
from lightning_custom.runs.summary import (  # noqa: F401 - re-exported: gather's names before summary_file
    expand_fleets,
    find_summaries,
    fleet_folders,
    is_fleet_summary,
    natural_key,
)

COLUMNS = ("run", "method", "model", "concept", "placeholder_token", "stopped_by", "stop_step", "max_steps",
           "steps_saved", "wall_seconds", "seconds_per_step", "dvar_share")


def concept_label(summary: dict[str, Any]) -> str | None:
    """The concept(s) trained: the image folders' names, joined by ``+`` for a multi-concept run."""
    folders = [c.get("instance_data_dir") for c in summary.get("concepts") or []] or [summary.get("instance_data_dir")]
    names = [Path(str(folder)).name for folder in folders if folder]
    return "+".join(names) or None


def model_label(summary: dict[str, Any]) -> str | None:
    """The base model as given (``embedded``, a hub id or a folder's name)."""
    name = summary.get("pretrained_model_name_or_path")
    if not name:
        return None
    return Path(name).name if Path(str(name)).is_absolute() else str(name)


def summary_row(path: Path) -> dict[str, Any]:
    """One table row from one run's summary."""
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserInputError(f"gather: {path} is not valid JSON ({err.msg}, line {err.lineno})") from err
    row = {column: summary.get(column) for column in COLUMNS}
    row["run"] = str(path.parent)
    row["model"] = model_label(summary)
    row["concept"] = concept_label(summary)
    if row["steps_saved"] is None and summary.get("max_steps") and summary.get("stop_step") is not None:
        row["steps_saved"] = summary["max_steps"] - summary["stop_step"]
    return row


def gather_table(roots: list[str], output: str | None = None) -> list[dict[str, Any]]:
    """Read every run's summary; write a CSV (if ``output``) and return the rows, with a median row last."""
    rows = [summary_row(path) for path in find_summaries(roots, argument="gather")]
    if output:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        with atomic_path(output) as tmp:
            tmp.write_text(buffer.getvalue())
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table, with the median stop step and wall time underneath."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in COLUMNS) + " |" for r in rows]
    steps = [r["stop_step"] for r in rows if r["stop_step"] is not None]
    walls = [r["wall_seconds"] for r in rows if r["wall_seconds"] is not None]
    stopped = sum(r["stopped_by"] == "dvar" for r in rows)
    if steps and walls:
        lines.append("")
        lines.append(f"{len(rows)} runs, {stopped} stopped by DVAR; median stop step {statistics.median(steps):g}, "
                     f"median wall time {statistics.median(walls):.1f} s, total {sum(walls):.1f} s.")
    return "\n".join(lines) + "\n"
