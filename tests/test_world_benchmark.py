"""benchmarks/table1.py and table1_v2.py: the replay of the variants, the exact-stop probe, the fidelity that can
fail, and the smoke paths end to end."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from lightning_custom.synthetic.world_encoder import WorldEncoder

ROOT = Path(__file__).resolve().parents[1]


def load_table1():
    spec = importlib.util.spec_from_file_location("table1", ROOT / "benchmarks" / "table1.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["table1"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fake_summary() -> dict:
    # L_det falls then flattens: with window 4 and threshold 0.15 DVAR stops at step 8 (replayed below by hand).
    losses = [1.0, 0.8, 0.6, 0.4, 0.3, 0.29, 0.3, 0.29, 0.3, 0.29, 0.3, 0.29]
    probes = [[0, 0.5, 0.40, 0.0], [2, 0.6, 0.50, 0.5], [4, 0.7, 0.60, 0.5], [6, 0.71, 0.61, 1.0], [8, 0.7, 0.6, 1.0],
              [10, 0.7, 0.62, 1.0], [12, 0.7, 0.63, 1.0]]
    return {"max_steps": 12, "dvar_window": 4, "dvar_threshold": 0.15, "dvar_eval_every_n_steps": 1,
            "dvar_history": [[i + 1, v] for i, v in enumerate(losses)], "world_probe_history": probes,
            "world_probe_seconds": 7.0, "wall_seconds": 19.0}


def test_replay_variants_reads_each_stop_and_its_quality():
    from lightning_custom.dvar.rule import first_stop_index

    table1 = load_table1()
    settings = table1.MethodSettings("x.yaml", 12, 4, 0.15, patience=2, min_delta=0.02)
    summary = fake_summary()
    out = table1.replay_variants(summary, settings, few_iters=5)
    dvar_step = first_stop_index([v for _, v in summary["dvar_history"]], 4, 0.15) + 1
    assert out["dvar"]["step"] == dvar_step
    assert out["dvar"]["identity"] == [r for r in summary["world_probe_history"] if r[0] <= dvar_step][-1][2]
    assert out["full_length"] == {"step": 12, "identity": 0.63, "fidelity": 1.0, "identity_train": 0.7,
                                  "seconds": 12.0, "probe_step": 12}
    # Training-prompt identity is best (0.7) at step 4; 0.71 at step 6 and 0.7 at step 8 do not beat it by more than
    # 0.02, so the rule (patience 2) stops at step 8, having paid for 4 probes at 1 s each.
    assert out["encoder_es"]["step"] == 8
    assert out["encoder_es"]["seconds"] == pytest.approx(8 * 1.0 + 4 * 1.0)
    assert out["few_iters"]["step"] == 5 and out["few_iters"]["probe_step"] == 4
    assert out["untrained"]["identity"] == 0.40
    # another window / threshold replaces the run's own, as the rule computes it
    longer = table1.replay_variants(summary, settings, None, dvar_window=6, dvar_threshold=0.05)["dvar"]
    index = first_stop_index([v for _, v in summary["dvar_history"]], 6, 0.05)
    assert longer["step"] == (index + 1 if index is not None else 12)
    assert longer["step"] != dvar_step


def test_fit_trains_an_interrupted_run_again_and_reuses_a_finished_one(tmp_path, monkeypatch):
    """A run stopped by a signal writes summary.json too (stopped_by: interrupted): the benchmark must not take it
    for a finished run (it did, and its probes then refused it)."""
    import json

    import lightning_custom.cli

    v1 = load_table1()
    calls = []

    def fake_main(argv):
        calls.append(argv)
        (tmp_path / "run" / "summary.json").write_text(json.dumps({"stopped_by": "max_steps", "global_step": 30}))

    monkeypatch.setattr(lightning_custom.cli, "main", fake_main)
    config = {"trainer": {"default_root_dir": str(tmp_path / "run")}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"stopped_by": "interrupted", "global_step": 12}))
    assert not v1.finished(tmp_path / "run")
    assert v1.fit(config, tmp_path / "config.yaml")["global_step"] == 30 and len(calls) == 1
    assert v1.finished(tmp_path / "run")
    assert v1.fit(config, tmp_path / "config.yaml")["global_step"] == 30 and len(calls) == 1  # reused


def test_table1_smoke_on_two_concepts(tmp_path):
    WorldEncoder(width=8, dim=16).save(tmp_path / "encoder")
    table1 = load_table1()
    code = table1.main(["--concepts", "2", "--methods", "textual_inversion", "--steps", "12", "--probe-every", "4",
                        "--probe-images", "1", "--probe-inference-steps", "2", "--live", "1",
                        "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                        "--encoder", str(tmp_path / "encoder")])
    assert code == 0  # the live DVAR run stops where the replay says
    text = (tmp_path / "out" / "table1.md").read_text()
    for variant in ("full_length", "dvar", "encoder_es", "few_iters"):
        assert f"| textual_inversion | {variant} |" in text
    # 5 variant rows, 6 replayed DVAR settings, 1 settings row, 1 live check
    assert "## DVAR settings, replayed" in text and text.count("| textual_inversion | ") == 5 + 6 + 1 + 1
    assert (tmp_path / "out" / "table1_dvar_stops.png").stat().st_size > 0
    assert (tmp_path / "out" / "table1_quality_vs_step.png").stat().st_size > 0


def load_table1_v2():
    load_table1()  # table1_v2 imports the first edition as "table1"
    spec = importlib.util.spec_from_file_location("table1_v2", ROOT / "benchmarks" / "table1_v2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["table1_v2"] = module
    spec.loader.exec_module(module)
    return module


def test_exact_stop_probe_equals_a_live_run_stopped_there(tmp_path):
    """Quality read from the snapshot of step 15 of a 20-step run = the probe of a run that stopped at step 15."""
    import argparse
    import json

    import torch

    from lightning_custom.synthetic.world_concepts import heldout_concepts
    from lightning_custom.cli import rebuild_run
    from lightning_custom.world.probe import probe_snapshots, snapshot_steps

    torch.manual_seed(0)  # the same random encoder every time
    WorldEncoder(width=8, dim=16).save(tmp_path / "encoder")
    v2 = load_table1_v2()
    work = tmp_path / "work"
    argv = ["run", "--concepts", "0", "--methods", "textual_inversion", "--steps", "20", "--probe-every", "10",
            "--probe-images", "1", "--probe-inference-steps", "2", "--workdir", str(work),
            "--results", str(tmp_path / "results"), "--encoder", str(tmp_path / "encoder")]
    assert v2.main(argv) == 0
    concept = heldout_concepts(1)[0]
    run_dir, config_file = v2.run_paths(work, "textual_inversion", concept.name)
    assert snapshot_steps(run_dir / "snapshots") == [5, 10, 15, 20]  # one per L_det evaluation
    summary = json.loads((tmp_path / "results" / "probed_runs" / "textual_inversion" / concept.name / "summary.json")
                         .read_text())
    assert [row[0] for row in summary["world_probe_history"]] == [0, 10, 20]
    # The snapshot of a probed step scores what the live probe scored there (same seeds: paired).
    assert probe_snapshots(rebuild_run(config_file), run_dir / "snapshots", [20])[20][0] == pytest.approx(
        summary["world_probe_history"][-1][1:], abs=5e-4)

    # A live run of the same config, stopped at step 15 by DVAR's step cap, probes step 15 when it ends.
    args = argparse.Namespace(steps=20, probe_every=10, probe_images=1, probe_inference_steps=2,
                              workdir=str(tmp_path / "live"), model="embedded", encoder=str(tmp_path / "encoder"),
                              class_images=4, accelerator=None)
    live = v2.long_config("textual_inversion", concept, args)
    live["data"]["init_args"]["instance_data_dir"] = str(work / "concepts" / concept.name)
    live["trainer"]["callbacks"] = live["trainer"]["callbacks"][:1]  # the probe only
    live["dvar"]["max_steps"] = 15
    live_summary = v2.v1.fit(live, tmp_path / "live.yaml")
    assert live_summary["stop_step"] == 15 and live_summary["world_probe_history"][-1][0] == 15
    exact = probe_snapshots(rebuild_run(config_file), run_dir / "snapshots", [15])[15][0]
    # The weights are bit-identical; the samplings differ by float noise (a batch's first images can take another
    # SIMD path: up to ~1e-4 through this random encoder). Step 10's probe, which the first edition would have
    # read for a stop at step 15, is further away.
    tolerance = 5e-4
    assert exact == pytest.approx(live_summary["world_probe_history"][-1][1:], abs=tolerance)
    assert max(abs(a - b) for a, b in zip(exact, summary["world_probe_history"][1][1:])) > 2 * tolerance


def test_replayed_snapshots_equal_the_kept_ones(tmp_path, monkeypatch):
    """Full DreamBooth's snapshots are not kept: a stop the grid did not foresee is read from a replay of the run
    (same config, trained again from step 0 to that step), whose weights are the original run's, bit for bit."""
    import argparse

    import torch
    from safetensors.torch import load_file

    from lightning_custom.synthetic.world_concepts import heldout_concepts
    from lightning_custom.cli import rebuild_run
    from lightning_custom.world.probe import probe_snapshots, snapshot_steps

    torch.manual_seed(0)
    WorldEncoder(width=8, dim=16).save(tmp_path / "encoder")
    v2 = load_table1_v2()
    monkeypatch.setattr(v2, "KEEP_SNAPSHOTS", {"dreambooth"})  # kept here, to compare the replay with them
    work = tmp_path / "work"
    argv = ["run", "--concepts", "0", "--methods", "dreambooth", "--steps", "20", "--probe-every", "10",
            "--probe-images", "1", "--probe-inference-steps", "2", "--class-images", "2", "--workdir", str(work),
            "--results", str(tmp_path / "results"), "--encoder", str(tmp_path / "encoder")]
    assert v2.main(argv) == 0
    name = heldout_concepts(1)[0].name
    run_dir, config_file = v2.run_paths(work, "dreambooth", name)
    kept = run_dir / "snapshots"
    replayed = v2.replay_snapshots(config_file, [10, 15], tmp_path / "replay")
    assert snapshot_steps(replayed) == [10, 15]  # only the asked steps, and the replay ended at the last one
    assert json.loads((tmp_path / "replay" / "run" / "summary.json").read_text())["stop_step"] == 15
    for step in (10, 15):
        original, again = (load_file(str(d / f"step-{step:06d}.safetensors")) for d in (kept, replayed))
        assert original.keys() == again.keys() and len(original) > 10  # the whole UNet
        assert all(torch.equal(original[k], again[k]) for k in original)
    # The table's --probe-missing takes that path when the snapshots are gone: step 15 is read at step 15.
    expected = probe_snapshots(rebuild_run(config_file), kept, [15])[15][0]
    shutil.rmtree(kept)
    from lightning_custom.dvar.calibrate import load_probed_run

    run = load_probed_run(tmp_path / "results" / "probed_runs" / "dreambooth" / name / "summary.json", name)
    run.exact.pop(15, None)
    args = argparse.Namespace(workdir=str(work), results=str(tmp_path / "results"), concept_seed=2024, shard=None)
    v2.probe_missing(args, "dreambooth", [run], {name: {15}})
    assert run.exact[15] == pytest.approx(expected, abs=5e-4)
    assert not kept.exists() and not list(run_dir.parent.glob(".*-replay-*"))  # the replay left nothing behind


@pytest.mark.slow  # two 30-step runs, their probes and the post hoc fidelity: ~40 CPU-seconds, 2+ minutes when shared
def test_table1_v2_smoke_on_two_concepts(tmp_path):
    """One calibration-split and one test-split concept, one method: the second edition's table and figures."""
    WorldEncoder(width=8, dim=16).save(tmp_path / "encoder")
    v2 = load_table1_v2()
    common = ["--methods", "textual_inversion", "--steps", "30", "--probe-every", "10", "--probe-images", "1",
              "--probe-inference-steps", "2", "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "out"),
              "--encoder", str(tmp_path / "encoder")]
    assert v2.main(["run", "--concepts", "0,50", *common]) == 0
    assert v2.main(["table", "--probe-missing", *common]) == 0
    text = (tmp_path / "out" / "table1_v2.md").read_text()
    test_part = text.split("## Test split")[1].split("## Goal")[0]
    calibration_part = text.split("## Calibration split")[1].split("## Settings")[0]
    # every row of the method on each split; the fixed budget and few iters are read at their own step
    for variant in ("full_length", "dvar_paper", "fixed_budget", "encoder_es", "few_iters"):
        assert f"| textual_inversion | {variant} |" in test_part
        assert f"| textual_inversion | {variant} |" in calibration_part
    assert "- textual_inversion (1 test concepts)" in text or "- textual_inversion: pending" in text
    rows = (tmp_path / "out" / "table1_v2.csv").read_text().splitlines()
    assert len(rows) > 1 + 2 * 5 and rows[0].startswith("method,split,concept,variant,step")
    for name in ("stops", "quality_vs_step", "oracle"):
        assert (tmp_path / "out" / f"table1_v2_{name}.png").stat().st_size > 0
    # recolour / prior fidelity scored post hoc from the snapshots: the curve (step 0 = before training, half the
    # run, its end) and every row's stop step, in the committed copy of each run
    import json

    for concept in ("c000-new_shape", "c050-off_palette"):
        report = json.loads((tmp_path / "out" / "probed_runs" / "textual_inversion" / concept /
                             "fidelity_probes.json").read_text())
        assert len(report["checks"]) == 5
        assert {"0", "15", "30"} <= set(report["steps"])
        assert all(0 <= v <= 1 for scores in report["steps"].values() for v in scores.values())
    assert "## Prompt fidelity against step" in text and "| textual_inversion | recolour | 2 |" in text
    assert "## Rule variants" in text
    for variant in ("smoothed", "min_windows", "slope"):
        assert f"| textual_inversion | {variant} |" in text
    # a rerun reuses every run (nothing retrained) and writes the same table
    assert v2.main(["run", "--concepts", "0,50", *common]) == 0
    assert v2.v1.TRAINED["runs"] == 2


def test_table1_v2_rows_on_synthetic_runs():
    """The second edition's rows: full length = the converged length, every rule capped there, the fixed budget at
    the calibrated DVAR's mean cost, few iters at encoder early stopping's; no training needed."""
    import argparse

    import numpy as np

    from tests.test_calibrate import synthetic_run

    v2 = load_table1_v2()
    calibration = [synthetic_run(at, f"c00{i}-x", max_steps=600) for i, at in enumerate((130, 130, 130, 150, 150))]
    test = [synthetic_run(at, f"c05{i}-x", max_steps=600) for i, at in enumerate((130, 150, 150, 200, 130))]
    for run in calibration + test:  # training-prompt identity (encoder ES reads it) = evaluation identity
        run.probes = {s: [row[1], row[1], row[2]] for s, row in run.probes.items()}
    args = argparse.Namespace(probe_missing=False, workdir="unused", results="unused", calibration_results=None)
    pace = {r.name: 0.5 for r in calibration + test}
    # the table's converged length averages 5 probes: its centred mean first holds only the plateau at 140
    assert v2.method_rows(args, "textual_inversion", calibration, test, pace)["converged_length"] == 140
    v2.SMOOTH_PROBES = 1  # the raw probes: the plateau starts at 130, which the numbers below are built on
    data = v2.method_rows(args, "textual_inversion", calibration, test, pace)
    assert data["converged_length"] == 130
    assert data["smoothed_lengths"] == "130 / 135 / 150"
    assert data["calibrated"] is not None
    rows = data["splits"]["test"]["rows"]
    assert rows["full_length"]["outcome"].steps == (130,) * 5
    assert all(s <= 130 for variant in rows.values() for s in variant["outcome"].steps)
    mean_dvar = np.mean(rows["dvar_calibrated"]["outcome"].steps)
    assert rows["fixed_budget"]["outcome"].steps == (v2.to_eval_step(mean_dvar),) * 5
    assert rows["few_iters"]["outcome"].steps == (v2.to_eval_step(np.mean(rows["encoder_es"]["outcome"].steps)),) * 5
    # at step 130, the concepts learned at 150 and 200 keep 0.5 of their identity: the worst decile shows it
    assert rows["full_length"]["outcome"].median_retention == 0.5
    assert rows["full_length"]["outcome"].worst_decile_retention == 0.5
    assert rows["full_length"]["seconds"] == [65.0] * 5
    assert data["splits"]["test"]["oracle"] == [130, 150, 150, 200, 130]
    # the rule variants: calibrated on the calibration split, replayed on the test split, capped like every rule
    for name in v2.VARIANTS:
        assert data["variants"][name].recommended is not None
        assert all(s <= 130 for s in rows[f"variant_{name}"]["outcome"].steps)
        assert v2.variant_verdict(data, name).startswith("undecided: 5 test concepts")
    # no fidelity_probes.json: recolour / prior are unmeasured (nan), not a made-up value
    assert all(v != v for v in rows["dvar_calibrated"]["recolour"] + rows["dvar_calibrated"]["prior"])
    # the goal line names the distance: calibrated DVAR (130 steps) cannot be 5x faster than the converged length
    goal = v2.goal_lines("textual_inversion", data)[0]
    assert "speed-up 1.0x over the converged length 130 (goal >= 5x: not met, 104 mean steps too many)" in goal
    # the ceiling of any rule: the concepts learned at 150 and 200 count at the cap, 130, like every rule's stop
    assert goal.endswith("would take 130 mean steps (1.0x)")
    data["splits"]["test"]["oracle"] = [50, 100, 130, 200, 130]  # 200 counts as 130: mean 108
    assert v2.goal_lines("textual_inversion", data)[0].endswith("would take 108 mean steps (1.2x)")


def test_table1_v2_probe_shards_split_the_runs_and_write_no_table(tmp_path, monkeypatch):
    """table --probe-missing --shard K/N probes runs K, K+N, ... of each split (full DreamBooth's replays take
    minutes each, so two processes share them) and writes no table, whose rows need every shard's probes."""
    import argparse

    from tests.test_calibrate import synthetic_run

    v2 = load_table1_v2()
    calibration = [synthetic_run(130, f"c00{i}-x", max_steps=600) for i in range(5)]
    test = [synthetic_run(150, f"c05{i}-x", max_steps=600) for i in range(5)]
    probed = []

    def fake_paths(work, method, name):  # record the run, then skip it (no config file): nothing is trained
        probed.append(name)
        return tmp_path / name, tmp_path / name / "missing.yaml"

    monkeypatch.setattr(v2, "run_paths", fake_paths)
    args = argparse.Namespace(probe_missing=True, workdir="unused", results=str(tmp_path), calibration_results=None,
                              shard=(1, 2))
    data = v2.method_rows(args, "textual_inversion", calibration, test, {})
    assert probed == ["c051-x", "c053-x", "c001-x", "c003-x"]  # test split first, then calibration
    assert data["splits"] == {}
    with pytest.raises(SystemExit):  # sharing makes sense only for the probing
        v2.main(["table", "--shard", "0/2"])


@pytest.mark.parametrize("spec", ["2/2", "-1/2", "1/0", "1", "a/b"])
def test_shard_spec_refuses_a_share_outside_0_to_n_minus_1(spec, capsys):
    """--shard 2/2 used to take items 2, 4, ... and silently leave job 0 to no process."""
    v2 = load_table1_v2()
    with pytest.raises(SystemExit):
        v2.main(["run", f"--shard={spec}"])
    assert f"got {spec!r}" in capsys.readouterr().err
    assert v2.v1.shard_spec("1/2") == (1, 2)


def test_table1_v2_held_out_seed_calibrates_on_the_committed_study(tmp_path):
    """--concept-seed S draws other concepts into their own folders; --calibration-results calibrates on another
    study's concepts 0-49 and tests on every run of this one (the check on concepts never used for settings)."""
    from lightning_custom.synthetic.world_concepts import make_concept
    from tests.test_calibrate import synthetic_run, write_run

    v2 = load_table1_v2()
    assert v2.concept_of("c003-x", 7).attrs != v2.concept_of("c003-x").attrs == make_concept(3).attrs
    committed, other = tmp_path / "committed", tmp_path / "other"
    for i, at in enumerate((130, 130, 150)):
        write_run(committed / v2.RESULT_RUNS / "dreambooth_lora" / f"c00{i}-x", synthetic_run(at, max_steps=600))
    write_run(committed / v2.RESULT_RUNS / "dreambooth_lora" / "c050-x", synthetic_run(400, max_steps=600))
    for i, at in enumerate((200, 130)):  # the other seed's indices 0-1 and 50: all of them test runs
        write_run(other / v2.RESULT_RUNS / "dreambooth_lora" / f"c00{i}-x", synthetic_run(at, max_steps=600))
    write_run(other / v2.RESULT_RUNS / "dreambooth_lora" / "c050-x", synthetic_run(150, max_steps=600))
    calibration, test, _ = v2.load_method_runs(other, "dreambooth_lora", committed)
    assert [r.name for r in calibration] == ["c000-x", "c001-x", "c002-x"]
    assert sorted(r.name for r in test) == ["c000-x", "c001-x", "c050-x"]
    assert sorted(r.probes[200][1] for r in test) == [1.0, 1.0, 1.0]  # the other study's runs, not the committed
    assert sorted(r.probes[140][1] for r in calibration) == [0.5, 1.0, 1.0]
    # defaults: another seed gets its own work and results folders, so no committed run is reused for it
    parsed = {}
    v2.table_phase, v2.run_phase = (lambda a: parsed.setdefault("table", a) and 0), (lambda a: 0)
    v2.main(["table", "--concept-seed", "7", "--calibration-results", str(committed)])
    assert parsed["table"].workdir == "runs/table1-v2-seed7"
    assert parsed["table"].results == "benchmarks/results/table1_v2_seed7"


def test_recolour_and_prior_fidelity_can_fail():
    """The fidelity that long training can fail: images that follow the prompts pass, images of the concept in its
    own colour (an over-trained token that overrides the colour word; weights that drew the concept for a prior
    prompt) fail. Rendered images scored by the shipped world encoder."""
    from dataclasses import replace

    from lightning_custom.synthetic.world_concepts import heldout_concepts
    from lightning_custom.world.fidelity import FIDELITY_GROUPS, fidelity_checks, fidelity_scores
    from lightning_custom.synthetic.world_render import COLOURS, Attributes, render

    encoder = WorldEncoder.load(None)
    for concept in heldout_concepts(4):
        checks = fidelity_checks(concept)
        assert checks == fidelity_checks(concept)  # deterministic
        assert [c.group for c in checks] == ["recolour"] * 3 + ["prior"] * 2
        for check in checks:
            assert check.targets["colour"] in COLOURS
            assert check.targets["colour"] not in (concept.attrs.colour, concept.attrs.second_colour)
            assert check.targets["colour"] != check.targets["background"]
            assert check.targets["background"] in concept.eval_backgrounds
            assert ("{}" in check.prompt) == (check.group == "recolour")
        followed, overridden, targets, groups = [], [], [], []
        for check in checks:
            background = check.targets["background"]
            if check.group == "recolour":
                right = replace(concept.attrs, colour=check.targets["colour"], second_colour=None, pattern="plain",
                                background=background)
            else:
                right = Attributes(check.targets["shape"], check.targets["colour"], "plain", background)
            for seed in (1, 2):
                followed.append(render(right, seed))
                overridden.append(render(replace(concept.attrs, background=background), seed))
                targets.append(check.targets)
                groups.append(check.group)
        assert fidelity_scores(followed, targets, groups, encoder) == {g: 1.0 for g in FIDELITY_GROUPS}
        failed = fidelity_scores(overridden, targets, groups, encoder)
        # an off-palette colour can land on a far palette name now and then: at most 1 in 3
        assert failed["recolour"] <= 1 / 3 and failed["prior"] == 0.0, concept.name


def test_variant_verdict_wants_a_pareto_gain_larger_than_its_noise():
    from lightning_custom.dvar.calibrate import Outcome

    v2 = load_table1_v2()
    retention = (0.9, 0.95, 0.97, 0.98, 0.99, 1.0, 0.96, 0.97, 0.99, 0.93)
    dvar = Outcome("dvar_calibrated", tuple(range(100, 200, 10)), retention, (1.0,) * 10, 10)

    def verdict(steps, kept):
        variant = Outcome("variant_x", tuple(steps), tuple(kept), (1.0,) * 10, 10)
        data = {"splits": {"test": {"rows": {"dvar_calibrated": {"outcome": dvar}, "variant_x": {"outcome": variant}}}}}
        return v2.variant_verdict(data, "x")

    assert verdict([s - 50 for s in dvar.steps], retention).startswith("beats DVAR: ")  # 50 fewer steps, same quality
    # fewer steps bought with a lower median is no beat, however many steps it saves (the slope variant on CD)
    assert verdict([s - 50 for s in dvar.steps], [r - 0.02 for r in retention]).startswith("does not beat DVAR")
    # 20 steps more or fewer by turns, and 2 fewer in all: fewer on paper, inside the noise of the concepts' steps
    jittered = [s + (20 if i % 2 else -20) - (2 if i == 0 else 0) for i, s in enumerate(dvar.steps)]
    assert verdict(jittered, retention).startswith("beats DVAR only within the noise")


def test_table1_v2_fleet_mode_leaves_each_concept_its_single_runs_folder(tmp_path):
    """``run --fleet 2``: two concepts trained as one fleet leave the folders their single runs leave: the same
    L_det history and bit-identical snapshots (forward=per_concept, each concept with its own run's ``repeats``:
    the two concepts have different image counts), the periodic probes taken afterwards from the snapshots equal
    the single runs' live probes within sampling float noise, and the concept summaries feed the table."""
    import json

    import torch
    from safetensors.torch import load_file

    from lightning_custom.synthetic.world_concepts import heldout_concepts
    from lightning_custom.world.probe import snapshot_steps

    torch.manual_seed(0)
    WorldEncoder(width=8, dim=16).save(tmp_path / "encoder")
    v2 = load_table1_v2()
    concepts = heldout_concepts(52)[50:]
    assert len(concepts[0].image_seeds) != len(concepts[1].image_seeds)  # different repeats in their own runs
    common = ["run", "--concepts", "50-51", "--methods", "textual_inversion", "--steps", "20", "--probe-every", "10",
              "--probe-images", "1", "--probe-inference-steps", "2", "--encoder", str(tmp_path / "encoder")]
    alone, fleet = tmp_path / "alone", tmp_path / "fleet"
    assert v2.main([*common, "--workdir", str(alone), "--results", str(alone / "results")]) == 0
    assert v2.main([*common, "--workdir", str(fleet), "--results", str(fleet / "results"), "--fleet", "2",
                    "--forward", "per_concept"]) == 0
    assert (fleet / "runs" / "fleets").is_dir()  # one fleet trained them
    for concept in concepts:
        single, in_fleet = (v2.run_paths(root, "textual_inversion", concept.name)[0] for root in (alone, fleet))
        a, b = (json.loads((d / "summary.json").read_text()) for d in (single, in_fleet))
        assert b["dvar_history"] == a["dvar_history"] and len(a["dvar_history"]) == 4
        assert b["stopped_by"] == a["stopped_by"] == "max_steps" and b["max_steps"] == 20
        assert snapshot_steps(in_fleet / "snapshots") == snapshot_steps(single / "snapshots") == [5, 10, 15, 20]
        for step in (5, 20):
            x, y = (load_file(str(d / "snapshots" / f"step-{step:06d}.safetensors")) for d in (single, in_fleet))
            assert set(x) == set(y) == {"token_vectors.vectors"} and torch.equal(x["token_vectors.vectors"],
                                                                                   y["token_vectors.vectors"])
        assert [r[0] for r in b["world_probe_history"]] == [0, 10, 20]
        for live, offline in zip(a["world_probe_history"], b["world_probe_history"]):
            assert offline[1:3] == pytest.approx(live[1:3], abs=5e-4)
        copied = fleet / "results" / "probed_runs" / "textual_inversion" / concept.name / "summary.json"
        assert json.loads(copied.read_text())["dvar_history"] == a["dvar_history"]
    moved = load_file(str(v2.run_paths(fleet, "textual_inversion", concepts[0].name)[0] / "snapshots"
                          / "step-000020.safetensors"))["token_vectors.vectors"]
    first = load_file(str(v2.run_paths(fleet, "textual_inversion", concepts[0].name)[0] / "snapshots"
                          / "step-000005.safetensors"))["token_vectors.vectors"]
    assert not torch.equal(moved, first)  # the vectors trained (a snapshot of nothing would also be "equal")


def test_fleet_config_turns_single_lora_runs_into_one_lora_fleet(tmp_path):
    """benchmarks/fleet_runs.py: DreamBooth-LoRA runs (a new token each) become one DreamBoothLoRAFleet; each
    concept keeps its class noun and repeats; runs of different settings, or LoRA without a learned token, are
    refused."""
    import copy
    import importlib.util

    load_table1()
    spec = importlib.util.spec_from_file_location("fleet_runs", ROOT / "benchmarks" / "fleet_runs.py")
    fleet_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fleet_runs)
    base = {"model": {"class_path": "lightning_custom.methods.DreamBoothLoRA",
                      "init_args": {"pretrained_model_name_or_path": "embedded", "placeholder_token": "<c000>",
                                    "initializer_token": "star", "train_token_embedding": True, "rank": 4,
                                    "learning_rate": 5e-4}},
            "data": {"class_path": "lightning_custom.data.ConceptDataModule",
                     "init_args": {"instance_data_dir": "a", "class_noun": "shape", "repeats": 7, "batch_size": 2}},
            "trainer": {"default_root_dir": str(tmp_path / "runs" / "c000"), "callbacks": [
                {"class_path": fleet_runs.SNAPSHOT_CLASS, "init_args": {"dirpath": "x"}}]},
            "dvar": {"window": 40, "stop": False}}
    other = copy.deepcopy(base)
    other["model"]["init_args"].update(placeholder_token="<c001>", initializer_token="shape")
    other["data"]["init_args"].update(instance_data_dir="b", repeats=9)
    other["trainer"]["default_root_dir"] = str(tmp_path / "runs" / "c001")
    config = fleet_runs.fleet_config({"c000": base, "c001": other}, tmp_path / "fleet")
    assert config["model"]["class_path"] == "lightning_custom.methods.DreamBoothLoRAFleet"
    model = config["model"]["init_args"]
    assert "placeholder_token" not in model and "train_token_embedding" not in model and model["rank"] == 4
    assert [c["class_noun"] for c in model["concepts"]] == ["shape", "shape"]
    assert [c["repeats"] for c in model["concepts"]] == [7, 9] and "class_noun" not in config["data"]["init_args"]
    assert config["trainer"]["callbacks"][0]["init_args"]["dirpath"] == str(tmp_path / "runs" / "{concept}" /
                                                                            "snapshots")
    different = copy.deepcopy(other)
    different["model"]["init_args"]["rank"] = 16
    with pytest.raises(ValueError, match="differs"):
        fleet_runs.fleet_config({"c000": base, "c001": different}, tmp_path / "fleet")
    no_token = copy.deepcopy(base)
    no_token["model"]["init_args"]["train_token_embedding"] = False
    with pytest.raises(ValueError, match="token per concept"):
        fleet_runs.fleet_config({"c000": no_token}, tmp_path / "fleet")
