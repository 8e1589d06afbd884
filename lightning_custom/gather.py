"""Gather the summaries of many runs (e.g. a SLURM job array, one concept per task) into one table."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

from lightning_custom.errors import UserInputError
from lightning_custom.io import atomic_path

COLUMNS = ("run", "method", "placeholder_token", "stopped_by", "stop_step", "max_steps", "steps_saved",
           "wall_seconds", "seconds_per_step", "dvar_share")


def find_summaries(roots: list[str]) -> list[Path]:
    """Every ``summary.json`` under the given folders (or the files themselves), sorted."""
    found: set[Path] = set()
    for root in roots:
        path = Path(root).expanduser()
        if path.is_file() and path.name == "summary.json":
            found.add(path)
        elif path.is_dir():
            found.update(path.rglob("summary.json"))
        else:
            raise UserInputError(f"gather: {root} is neither a folder nor a summary.json")
    if not found:
        raise UserInputError(f"gather: no summary.json under {', '.join(roots)}")
    return sorted(found)


def summary_row(path: Path) -> dict[str, Any]:
    """One table row from one run's summary."""
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserInputError(f"gather: {path} is not valid JSON ({err.msg}, line {err.lineno})") from err
    row = {column: summary.get(column) for column in COLUMNS}
    row["run"] = str(path.parent)
    if row["steps_saved"] is None and summary.get("max_steps") and summary.get("stop_step") is not None:
        row["steps_saved"] = summary["max_steps"] - summary["stop_step"]
    return row


def gather_table(roots: list[str], output: str | None = None) -> list[dict[str, Any]]:
    """Read every run's summary; write a CSV (if ``output``) and return the rows, with a median row last."""
    rows = [summary_row(path) for path in find_summaries(roots)]
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
