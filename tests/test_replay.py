"""Offline DVAR replay: a full-length run replays to exactly the live DVAR stop step; tables, heat-map, errors."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import numpy as np
import pytest

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.cli import main
from lightning_custom.data import ConceptDataModule
from lightning_custom.dvar.rule import first_stop_index
from lightning_custom.errors import UserInputError
from lightning_custom.methods import TextualInversion
from lightning_custom.dvar.replay import replay, replay_stop_indices
from tests.conftest import data_kwargs, one_thread, ti_kwargs, trainer_kwargs
from tests.test_dvar_rule import ScriptedModule, decaying_series

pytestmark = pytest.mark.usefixtures("single_thread")
WINDOW, THRESHOLD, MAX_STEPS = 10, 0.15, 30


def fit_ti(tiny_sd, concept_dir, root, stop):
    module = TextualInversion(**ti_kwargs(tiny_sd))
    dvar = DVAREarlyStopping(window=WINDOW, threshold=THRESHOLD, stop=stop, verbose=False,
                             undertrained_below=0)  # the tiny random model's L_det barely moves: see quick_args
    trainer = L.Trainer(max_steps=MAX_STEPS, callbacks=[dvar, RunSummary(report=False)], **trainer_kwargs(root))
    trainer.fit(module, datamodule=ConceptDataModule(**data_kwargs(concept_dir)))
    return json.loads((root / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny_sd, concept_dir, tmp_path_factory):
    """A full-length Textual Inversion run (DVAR only observing) and a live DVAR run with the same seed."""
    parent = tmp_path_factory.mktemp("runs")
    with one_thread():
        full = fit_ti(tiny_sd, concept_dir, parent / "full", stop=False)
        live = fit_ti(tiny_sd, concept_dir, parent / "live", stop=True)
    return parent, full, live


def test_replay_of_a_full_length_run_gives_the_live_stop_step(runs):
    parent, full, live = runs
    assert full["stopped_by"] == "max_steps" and full["stop_step"] == MAX_STEPS
    assert live["stopped_by"] == "dvar" and live["stop_step"] < MAX_STEPS
    # DVAR only observes: up to the live stop, both runs saw bit-identical deterministic losses
    assert full["dvar_history"][: len(live["dvar_history"])] == live["dvar_history"]
    result = replay([parent / "full"], windows=[WINDOW], thresholds=[THRESHOLD])
    assert result.stop_steps[0, 0, 0] == live["stop_step"]
    values = [v for _, v in full["dvar_history"]]
    assert full["dvar_history"][first_stop_index(values, WINDOW, THRESHOLD)][0] == live["stop_step"]


def test_grid_replay_agrees_with_first_stop_index():
    rng = np.random.default_rng(0)
    for seed in range(3):
        values = decaying_series(150, seed=seed, noise=0.02)
        thresholds = sorted(rng.uniform(0.02, 0.6, size=5).tolist())
        for window in (5, 20, 60):
            for min_index in (0, 70):
                got = replay_stop_indices([values], window, thresholds, min_index)
                assert got == [first_stop_index(values, window, t, min_index) for t in thresholds]


def test_replay_of_several_series_matches_the_live_callback(tmp_path):
    series = {"dvar_loss/a": decaying_series(200, seed=1), "dvar_loss/b": decaying_series(200, seed=2, noise=0.03)}
    dvar = DVAREarlyStopping(window=30, threshold=0.2, eval_every_n_steps=2, min_steps=50, verbose=False)
    trainer = L.Trainer(max_steps=400, callbacks=[dvar, RunSummary(export=False, report=False)],
                        **trainer_kwargs(tmp_path))
    trainer.fit(ScriptedModule(series, every=2))
    assert dvar.stopped_by == "dvar"
    result = replay([tmp_path], windows=[30], thresholds=[0.2], min_steps=50)
    assert result.stop_steps[0, 0, 0] == dvar.stop_step


def test_cli_replay_writes_table_csv_and_heatmap(runs, tmp_path, capsys):
    parent, full, live = runs
    out = tmp_path / "one"
    main(["replay", str(parent / "full"), "--windows", f"[5, {WINDOW}, 25]", "--thresholds", f"[{THRESHOLD}, 0.5]",
          "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert f"| {WINDOW} | {live['stop_step']} |" in printed
    assert {p.name for p in out.iterdir()} == {"replay.md", "replay.csv", "replay.json", "replay.png"}
    rows = list(csv.DictReader((out / "replay.csv").open()))
    assert len(rows) == 3 * 2
    row = next(r for r in rows if r["window"] == str(WINDOW) and r["threshold"] == f"{THRESHOLD:g}")
    assert int(row["stop_step"]) == live["stop_step"] and int(row["steps_saved"]) == MAX_STEPS - live["stop_step"]
    from PIL import Image

    assert Image.open(out / "replay.png").size[0] > 300

    # a parent folder: both runs; settings that would stop after the live run ended are censored
    main(["replay", str(parent), "--windows", f"[{WINDOW}, 25]", "--thresholds", f"[{THRESHOLD}]",
          "--output_dir", str(tmp_path / "both")])
    data = json.loads((tmp_path / "both" / "replay.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["full", "live"]
    live_row = data["runs"][1]
    assert live_row["stop_steps"][0] == [live["stop_step"]]
    assert live_row["stop_steps"][1] == [None] and live_row["censored"][1] == [True]  # 25 > its length
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 25 |"))
    assert "*" in row  # the mean is only a lower bound there


def test_replay_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(UserInputError, match="runs: no such run folder"):
        replay([tmp_path / "missing"])
    with pytest.raises(UserInputError, match="holds no summary.json"):
        replay([tmp_path])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"dvar_history": []}))
    with pytest.raises(UserInputError, match="empty dvar_history"):
        replay([tmp_path / "run"])
    with pytest.raises(SystemExit) as excinfo:
        main(["replay", str(tmp_path / "run"), "--windows", "[1]"])
    assert excinfo.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--windows: every window must be at least 2" in errors[0]


def test_replay_counts_a_window_not_divisible_by_k_in_whole_evaluations(tmp_path):
    # A 33-step window evaluated every 5 steps spans ceil(33 / 5) = 7 values (as the live callback), not 6.
    values = decaying_series(200, seed=3)
    history = [[(i + 1) * 5, v] for i, v in enumerate(values)]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({
        "dvar_history": history, "dvar_eval_every_n_steps": 5, "max_steps": 1000, "stop_step": 1000,
        "stopped_by": "max_steps"}))
    thresholds = [0.05, 0.1, 0.15, 0.2, 0.3]
    ceil = [first_stop_index(values, 7, t) for t in thresholds]
    assert ceil != [first_stop_index(values, 6, t) for t in thresholds]  # the two conversions differ here
    result = replay([tmp_path / "run"], windows=[33], thresholds=thresholds)
    assert result.stop_steps[0, 0].tolist() == [(i + 1) * 5 for i in ceil]
    assert DVAREarlyStopping(window=33, eval_every_n_steps=5).window_values == 7


def test_replay_marks_a_stop_at_a_worse_loss_as_diverged(tmp_path):
    rising = (0.064 + 0.0032 * (1 - np.exp(-np.arange(200) / 5.0))).tolist()
    for name, values in (("rising", rising), ("healthy", decaying_series(200, seed=3))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({
            "dvar_history": [[i + 1, v] for i, v in enumerate(values)], "max_steps": 200, "stop_step": 200,
            "stopped_by": "max_steps"}))
    result = replay([tmp_path], windows=[20], thresholds=[0.15])
    by_name = {run.name: r for r, run in enumerate(result.runs)}
    assert result.diverged[by_name["rising"], 0, 0] and not result.diverged[by_name["healthy"], 0, 0]


def test_replay_explains_its_cells_and_writes_readable_heatmap_labels(tmp_path):
    """Before: '>70' was explained nowhere, and white numbers sat on viridis' yellow cells."""
    from lightning_custom.dvar.replay import markdown_table, replay, write_heatmap

    run = tmp_path / "run"
    run.mkdir()
    history = [[s, 1.0 + math.exp(-s / 20)] for s in range(5, 75, 5)]
    (run / "summary.json").write_text(json.dumps({"dvar_history": history, "max_steps": 70, "stopped_by": "max_steps",
                                                  "dvar_eval_every_n_steps": 5}))
    result = replay([run], windows=[20, 200], thresholds=[0.15])
    text = markdown_table(result)
    assert ">N: the run ended at step N before this window could fill" in text and "never:" in text
    write_heatmap(result, tmp_path / "replay.png")
    assert (tmp_path / "replay.png").stat().st_size > 0
    from matplotlib import colormaps

    from lightning_custom.dvar.replay import text_colour_on

    viridis = colormaps["viridis_r"]
    assert text_colour_on(viridis(0.0)) == "black" and text_colour_on(viridis(1.0)) == "white"
