"""Gathering many runs' summaries into one table, and the SLURM examples' command lines."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest

from lightning_custom.cli import main
from lightning_custom.errors import UserInputError
from lightning_custom.runs.gather import gather_table, markdown

ROOT = Path(__file__).resolve().parents[1]


def write_summary(folder: Path, stop_step: int, stopped_by: str = "dvar", wall: float = 10.0, **fields) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "method": "TextualInversion", "placeholder_token": f"<c{stop_step}>", "stopped_by": stopped_by,
        "stop_step": stop_step, "max_steps": 6100, "wall_seconds": wall, "seconds_per_step": wall / stop_step,
        "dvar_share": 0.05, **fields,
    }))


def test_gather_collects_every_run(tmp_path):
    write_summary(tmp_path / "array" / "1", 300, wall=30.0)
    write_summary(tmp_path / "array" / "2", 500, wall=50.0)
    write_summary(tmp_path / "array" / "3", 6100, stopped_by="max_steps", wall=610.0)
    rows = gather_table([str(tmp_path / "array")], str(tmp_path / "table.csv"))
    assert [r["stop_step"] for r in rows] == [300, 500, 6100]
    assert [r["steps_saved"] for r in rows] == [5800, 5600, 0]
    with open(tmp_path / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["placeholder_token"] for t in table] == ["<c300>", "<c500>", "<c6100>"]
    text = markdown(rows)
    assert "3 runs, 2 stopped by DVAR; median stop step 500, median wall time 50.0 s, total 690.0 s." in text


def test_gather_sorts_runs_naturally_and_names_model_and_concept(tmp_path):
    for task in (10, 2, 1):
        write_summary(tmp_path / "array" / f"task{task}", 100 + task, pretrained_model_name_or_path="embedded",
                      instance_data_dir=f"/data/concept{task}")
    write_summary(tmp_path / "array" / "task3", 103, pretrained_model_name_or_path="/models/sd15",
                  concepts=[{"name": "a", "instance_data_dir": "/data/cat"},
                            {"name": "b", "instance_data_dir": "/d/mug"}])
    rows = gather_table([str(tmp_path / "array")])
    assert [Path(r["run"]).name for r in rows] == ["task1", "task2", "task3", "task10"]
    assert [r["model"] for r in rows] == ["embedded", "embedded", "sd15", "embedded"]
    assert [r["concept"] for r in rows] == ["concept1", "concept2", "cat+mug", "concept10"]
    assert "| run | method | model | concept |" in markdown(rows)


def test_gather_errors_are_one_line(tmp_path):
    with pytest.raises(UserInputError, match="holds no summary.json"):
        gather_table([str(tmp_path)])
    write_summary(tmp_path / "done", 100)
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(UserInputError, match="unfinished holds no summary.json"):
        gather_table([str(tmp_path / "done"), str(tmp_path / "unfinished")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{not json")
    with pytest.raises(UserInputError, match="is not valid JSON"):
        gather_table([str(tmp_path)])


def test_gather_subcommand(tmp_path, capsys):
    write_summary(tmp_path / "r1", 120)
    main(["gather", str(tmp_path)])
    assert "| TextualInversion |  |  | <c120> | dvar | 120 |" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["multinode.sbatch", "array.sbatch"])
def test_slurm_examples_use_valid_cli_arguments(script, capsys):
    text = (ROOT / "examples" / "slurm" / script).read_text()
    command = re.search(r"python -m lightning_custom fit (.*?)\n\n", text.replace("\\\n", " ") + "\n\n", re.S)
    args = shlex.split(command.group(1).replace('"', ""))
    values = {"$SLURM_NNODES": "2", "$SLURM_NTASKS_PER_NODE": "4", "$CONCEPT_DIR": "embedded", "$TOKEN": "<x>",
              "$INIT": "toy"}
    args = [values.get(a, re.sub(r"\$\{?\w+\}?", "1", a)) for a in args]
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", *args, "--print_config"])
    assert excinfo.value.code in (None, 0)
    printed = capsys.readouterr().out
    if script == "multinode.sbatch":
        assert "num_nodes: 2" in printed and "strategy: ddp" in printed
