"""lightning_custom.dvar.calibrate and ``python -m lightning_custom calibrate``: the recommended DVAR setting on synthetic
runs whose best setting is known by construction."""

from __future__ import annotations

import json
import math

import numpy as np

import pytest

from lightning_custom.dvar import calibrate as cal
from lightning_custom.cli import main
from lightning_custom.errors import UserInputError

# L_det falls linearly until step 100, then is exactly constant. With a tiny threshold DVAR stops at the first
# evaluation whose window holds only the constant tail: at step 100 + window - period. Over the grid below:
#   period 5:  W20 -> 115, W40 -> 135, W80 -> 175;   period 10: W20 -> 110, W40 -> 130, W80 -> 170;
#   period 20: W20 -> 120, W40 -> 120, W80 -> 160.
# Identity is 0.5 before the concept is learned, 1.0 after: learned at step 130 for three runs, 150 for two.
# So (40, 1e-6, 10) at 130 steps is the cheapest setting whose median retention is 1; its worst decile is 0.5.
WINDOWS, THRESHOLDS, PERIODS = (20, 40, 80), (1e-6,), (5, 10, 20)


def synthetic_run(learned_at: int, name: str = "run", max_steps: int = 300) -> cal.ProbedRun:
    losses = [(s, max(0.0, 1.0 - s / 100)) for s in range(5, max_steps + 1, 5)]
    probes = {s: [0.0, 1.0 if s >= learned_at else 0.5, 1.0] for s in range(0, max_steps + 1, 5)}
    return cal.ProbedRun(name, max_steps, 5, losses, probes)


def synthetic_runs() -> list[cal.ProbedRun]:
    return [synthetic_run(130, "a"), synthetic_run(130, "b"), synthetic_run(130, "c"), synthetic_run(150, "d"),
            synthetic_run(150, "e")]


def test_stop_steps_follow_window_and_period():
    run = synthetic_run(130)
    assert [cal.stop_steps(run, w, THRESHOLDS, 5)[0] for w in WINDOWS] == [115, 135, 175]
    assert [cal.stop_steps(run, w, THRESHOLDS, 10)[0] for w in WINDOWS] == [110, 130, 170]
    assert [cal.stop_steps(run, w, THRESHOLDS, 20)[0] for w in WINDOWS] == [120, 120, 160]
    assert cal.grid_stop_steps(run, WINDOWS, THRESHOLDS, PERIODS) == {110, 115, 120, 130, 135, 160, 170, 175}
    with pytest.raises(UserInputError, match="--eval_every"):
        cal.stop_steps(run, 40, THRESHOLDS, 7)


def test_calibrate_picks_the_known_best_setting():
    result = cal.calibrate(synthetic_runs(), 0.97, WINDOWS, THRESHOLDS, PERIODS)
    assert result.converged_length == 130  # the median run has learned the concept from step 130 on
    assert result.recommended == (40, 1e-6, 10)
    best = result.outcomes[result.best]
    assert best.steps == (130, 130, 130, 130, 130)
    assert best.median_retention == 1.0 and best.worst_decile_retention == 0.5
    assert best.exact == 5
    # An unreachable target recommends nothing, and the snippet says so instead of a dvar block.
    impossible = cal.calibrate(synthetic_runs(), 1.2, WINDOWS, THRESHOLDS, PERIODS)
    assert impossible.recommended is None
    assert "dvar:" not in cal.yaml_snippet(impossible, 5)
    assert "window: 40" in cal.yaml_snippet(result, 5) and "eval_every_n_steps: 10" in cal.yaml_snippet(result, 5)
    table = cal.trade_off_table(result)
    se = cal.bootstrap_se(np.median, best.retention)  # one concept in five kept half: resampled medians vary
    assert 0 < se < 0.5
    assert f"| 40 | 1e-06 | 10 | 130.0 | 1.000 ({se:.3f}) | 0.500 | 5/5 | **recommended** |" in table


def test_quality_prefers_the_exact_probe_and_marks_the_fallback():
    run = synthetic_run(130)
    run.probes = {s: row for s, row in run.probes.items() if s % 25 == 0}
    assert run.quality(135) == ([0.0, 0.5, 1.0], False)  # the probe of step 125: before the concept was learned
    assert run.identity(135) == 0.5 and run.quality(150) == ([0.0, 1.0, 1.0], True)
    run.exact[135] = [0.0, 0.9, 1.0]
    assert run.quality(135) == ([0.0, 0.9, 1.0], True)


def test_converged_length_is_the_plateau_or_the_peak():
    rising = synthetic_run(130)
    assert cal.converged_length([rising]) == 130
    untrained_best = synthetic_run(130)
    untrained_best.probes[0][1] = 2.0  # the untrained model is never the converged one
    assert cal.converged_length([untrained_best]) == 130
    peaked = synthetic_run(130)
    peaked.probes = {s: [0.0, 1.0 - 0.001 * max(0, s - 200) if s >= 130 else 0.5, 1.0] for s in peaked.probes}
    peaked.probes[200][1] = 1.05  # a peak at 200, within 1% of nothing after it
    assert cal.converged_length([peaked]) == 200
    slow = [synthetic_run(130)]
    slow[0].probes = {s: [0.0, 0.5 + s / 600, 1.0] for s in slow[0].probes}  # +0.8% per probe at the end
    assert cal.converged_length(slow, tolerance=0.01) == 300 - 5 * 1  # the last probe that gains < 1% to the end
    assert cal.worst_decile([0.2, 0.9, 0.8, 1.0, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0, 0.3]) == pytest.approx(0.25)
    assert cal.oracle_step(rising, reference=1.0, share=0.97) == 130


def write_run(folder, run: cal.ProbedRun, exact: dict | None = None) -> None:
    folder.mkdir(parents=True)
    summary = {"max_steps": run.max_steps, "stopped_by": "max_steps", "dvar_eval_every_n_steps": 5,
               "dvar_history": [[s, v] for s, v in run.losses],
               "world_probe_history": [[s, *row] for s, row in sorted(run.probes.items())]}
    (folder / "summary.json").write_text(json.dumps(summary))
    if exact:
        (folder / cal.EXACT_PROBES_FILE).write_text(json.dumps({"steps": exact}))


def test_calibrate_command_writes_the_snippet(tmp_path, capsys):
    for run in synthetic_runs():
        write_run(tmp_path / "runs" / run.name, run)
    out = tmp_path / "dvar.yaml"
    main(["calibrate", str(tmp_path / "runs"), "--windows", "[20, 40, 80]", "--thresholds", "[1e-6]",
          "--eval_every", "[5, 10, 20]", "--output", str(out)])
    import yaml

    assert yaml.safe_load(out.read_text())["dvar"] == {"window": 40, "threshold": 1e-6, "eval_every_n_steps": 10}
    assert "**recommended**" in capsys.readouterr().out
    # A budget of 125 steps caps every stop before the concepts are learned: nothing keeps 0.97.
    main(["calibrate", str(tmp_path / "runs"), "--windows", "[20, 40, 80]", "--thresholds", "[1e-6]",
          "--eval_every", "[5, 10, 20]", "--budget", "125", "--output", str(out)])
    assert "dvar:" not in out.read_text() and "no setting kept" in out.read_text()
    loaded = cal.load_probed_runs([tmp_path / "runs"])
    assert sorted(r.name for r in loaded) == ["a", "b", "c", "d", "e"]


def test_calibrate_rejects_runs_without_probes_or_stopped_early(tmp_path, capsys):
    run = synthetic_run(130)
    write_run(tmp_path / "r", run, exact={"135": [0.0, 0.9, 1.0]})
    assert cal.load_probed_run(tmp_path / "r" / "summary.json").exact == {135: [0.0, 0.9, 1.0]}
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    (tmp_path / "r" / "summary.json").write_text(json.dumps({**summary, "world_probe_history": []}))
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and "no quality probes" in capsys.readouterr().err
    clip = {**summary, "world_probe_history": [], "clip_history": [[25, 0.6], [50, 0.7]]}  # a real model's probes
    (tmp_path / "r" / "summary.json").write_text(json.dumps(clip))
    assert cal.load_probed_run(tmp_path / "r" / "summary.json").identity(60) == 0.7
    (tmp_path / "r" / "summary.json").write_text(json.dumps({**summary, "stopped_by": "dvar"}))
    with pytest.raises(UserInputError, match="stopped early"):
        cal.load_probed_run(tmp_path / "r" / "summary.json")


def test_spearman_uses_ranks_and_averages_ties():
    assert cal.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert cal.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # x ranks 1..5, y ranks (1.5, 1.5, 3, 4, 5): Pearson of the ranks
    assert cal.spearman([1, 2, 3, 4, 5], [7, 7, 8, 9, 10]) == pytest.approx(0.9746794, abs=1e-6)
    assert cal.spearman([1, 2], [2, 1]) != cal.spearman([1, 2], [2, 1])  # NaN: too few pairs


def test_rule_variants_replay_the_pure_functions():
    """calibrate's replay of each variant stops where lightning_custom.dvar.rule's pure function does, and each variant's
    own parameter does what it says on series whose answer is known."""
    import numpy as np

    from lightning_custom.dvar import rule as dvar

    rng = np.random.default_rng(0)
    run = synthetic_run(130, max_steps=300)
    run.losses = [(s, v + 0.01 * rng.standard_normal()) for s, v in run.losses]  # noisy: the variants differ
    for period in (5, 10):
        kept = [v for s, v in run.losses if s % period == 0]
        steps = [s for s, v in run.losses if s % period == 0]
        for window in (20, 40, 80):
            w = dvar.window_in_values(window, period)
            for threshold in (0.05, 0.2):
                expected = {"smoothed": dvar.smoothed_stop_index(kept, w, threshold, 4),
                            "min_windows": dvar.min_windows_stop_index(kept, w, threshold, 2.0),
                            "slope": dvar.slope_stop_index(kept, w, threshold)}
                for variant, parameter in (("smoothed", 4), ("min_windows", 2.0), ("slope", 0.0)):
                    index = expected[variant]
                    assert cal.variant_stop_steps(run, variant, window, [threshold], period, parameter) == [
                        steps[index] if index is not None else run.max_steps], (variant, window, threshold, period)
    # hand-computed values
    assert dvar.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert dvar.relative_slope([3.0, 2.0, 1.0], 3) == pytest.approx(1.5)  # slope -1 x 3 values / range 2
    assert dvar.relative_slope([1.0, 1.0], 2) == 0.0 and dvar.relative_slope([1.0], 2) is None
    flat = [1.0] * 30
    assert dvar.first_stop_index(flat, 4, 0.1) == 3
    assert dvar.min_windows_stop_index(flat, 4, 0.1, 3) == 11  # not before 3 windows of values
    # jitter with no trend: every window's variance equals the whole series', so the plain ratio never fires; the
    # 2-value moving average is constant from index 1 on, so the smoothed ratio fires once the window holds only that
    jitter = [1.0, 3.0] * 15
    assert dvar.first_stop_index(jitter, 4, 0.1) is None
    assert dvar.smoothed_stop_index(jitter, 4, 0.1, 2) == 4
    with pytest.raises(UserInputError, match="variant"):
        cal.variant_stop_steps(run, "median", 40, [0.1], 5, 1.0)


def test_calibrate_variant_picks_the_cheapest_setting_that_keeps_the_target():
    """Every synthetic run has the same L_det series, so any setting stops all five at one step; the cheapest one
    keeping median retention 1 stops exactly at step 130 (three of five runs learned the concept there)."""
    for variant in ("smoothed", "min_windows", "slope"):
        result = cal.calibrate_variant(synthetic_runs(), variant, 0.97, WINDOWS, PERIODS)
        best = result.outcomes[result.best]
        assert best.steps == (130,) * 5, variant
        assert best.median_retention == 1.0 and best.worst_decile_retention == 0.5
        assert len(result.recommended) == 4  # window, threshold, eval period, the variant's own parameter
        cheaper = [o for o in result.outcomes if o.mean_steps < 130]
        assert cheaper and all(o.median_retention < 0.97 for o in cheaper)


def test_converged_length_smoothing_ignores_one_lucky_probe():
    """One probe at step 50 that already reads the plateau ends the climb there; averaging 3 probes does not."""
    runs = synthetic_runs()
    for run in runs:
        run.probes[50] = [0.0, 1.0, 1.0]
    assert cal.converged_length(runs) == 50
    assert cal.converged_length(runs, smooth=3) == 135  # the first step whose 3-probe mean (130, 135, 140) is 1.0
    assert cal.converged_length(synthetic_runs(), smooth=3) == 135  # without the spike: 130's mean holds 125's 0.5


def test_bootstrap_se_is_the_standard_error_over_concepts():
    from lightning_custom.dvar.calibrate import bootstrap_se

    values = np.random.default_rng(3).normal(0.9, 0.05, size=400)
    # the mean's SE is sd / sqrt(n) = 0.0025; the bootstrap estimates it within a few %
    assert bootstrap_se(np.mean, values) == pytest.approx(values.std(ddof=1) / 20, rel=0.1)
    assert bootstrap_se(np.median, [0.97] * 12) == pytest.approx(0.0, abs=1e-12)  # identical concepts: no noise
    # paired samples are resampled together: a constant difference has no noise, an unpaired one would
    shifted = values + 0.01
    assert bootstrap_se(lambda a, b: float(np.mean(a - b)), shifted, values) == pytest.approx(0.0, abs=1e-12)
    assert bootstrap_se(np.median, values, seed=1) != bootstrap_se(np.median, values, seed=2)


def test_calibrate_reads_probes_without_evaluation_prompts_and_writes_beside_the_runs(tmp_path, capsys,
                                                                                    monkeypatch):
    """A WorldProbe with its defaults (no evaluation prompts) records identity_eval and fidelity as NaN, null in
    summary.json: calibrate crashed on float(None). And its YAML went into the current folder."""
    for run in synthetic_runs():
        write_run(tmp_path / "runs" / run.name, run)
        summary_file = tmp_path / "runs" / run.name / "summary.json"
        summary = json.loads(summary_file.read_text())
        summary["world_probe_history"] = [[row[0], row[1], None, None] for row in summary["world_probe_history"]]
        summary_file.write_text(json.dumps(summary))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    main(["calibrate", str(tmp_path / "runs"), "--windows", "[20, 40, 80]", "--thresholds", "[1e-6]",
          "--eval_every", "[5, 10, 20]"])
    written = tmp_path / "runs" / "dvar_calibrated.yaml"
    assert written.is_file() and not list(elsewhere.iterdir())
    assert f"wrote {written}" in capsys.readouterr().out


def decaying_run(name: str, tau: float, max_steps: int = 600) -> cal.ProbedRun:
    """L_det = 1 + exp(-t / tau) with a little noise; identity reaches 1.0 at 3 tau (0.5 before)."""
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    losses = [(s, 1.0 + math.exp(-s / tau) + 1e-4 * rng.standard_normal()) for s in range(5, max_steps + 1, 5)]
    probes = {s: [1.0 if s >= 3 * tau else 0.5, 1.0, 1.0] for s in range(0, max_steps + 1, 5)}
    return cal.ProbedRun(name, max_steps, 5, losses, probes)


def test_calibrate_across_settings_keeps_the_target_at_each_and_never_picks_a_degenerate_window(tmp_path, capsys):
    from lightning_custom.dvar.calibrate_across import calibrate_across, group_by_folder

    runs = [decaying_run(f"fast/c{i}", 20.0) for i in range(4)] + [decaying_run(f"slow/c{i}", 80.0) for i in range(4)]
    groups = group_by_folder(runs)
    assert sorted(groups) == ["fast", "slow"]
    result = calibrate_across(groups, 0.97, windows=[10, 40, 80, 160], thresholds=[0.01, 0.05, 0.15],
                              eval_every=[5], smooth=1)
    assert result.recommended is not None
    assert result.settings.index((10, 0.01, 5)) in result.degenerate  # 2 values: never chosen
    assert result.recommended[0] >= 20
    for c in result.per_setting.values():
        assert c.outcomes[result.best].median_retention >= 0.97
    with pytest.raises(UserInputError, match="at least two settings"):
        calibrate_across({"fast": groups["fast"]})
    # through the command: runs in one folder per setting
    for run in runs:
        write_run(tmp_path / "runs" / run.name, run)
    main(["calibrate", str(tmp_path / "runs"), "--across", "true", "--windows", "[10, 40, 80, 160]",
          "--thresholds", "[0.01, 0.05, 0.15]", "--eval_every", "[5]", "--smooth", "1"])
    out = capsys.readouterr().out
    assert "| fast | 4 |" in out and "| slow | 4 |" in out
    assert "dvar:" in (tmp_path / "runs" / "dvar_calibrated.yaml").read_text()
