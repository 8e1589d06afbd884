"""benchmarks/settings_table.py (issue 25): the share of the gain, the oracle, calibration across settings, and the
report, on synthetic runs whose loss and identity follow known time constants."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "benchmarks" / "settings_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["settings_table"] = module
    spec.loader.exec_module(module)
    from settings_study import PROBE_SCHEDULE

    module.SCHEDULE.update(PROBE_SCHEDULE)
    return module


def synthetic_run(table, setting: str, split: str, tau: float, seed: int):
    """L_det = 1 + 0.1 exp(-t / tau) (+ noise); identity = 0.9 (1 - exp(-t / tau)) on the probe schedule."""
    from settings_study import PROBE_SCHEDULE

    rng = np.random.default_rng(seed)
    steps = list(range(5, 1201, 5))
    losses = [1 + 0.1 * math.exp(-s / tau) + 1e-4 * rng.standard_normal() for s in steps]
    probes = {s: {"discriminator": 0.9 * (1 - math.exp(-s / tau)) + 0.005 * rng.standard_normal(),
                  "cosine": 0.5, "background": 1.0} for s in PROBE_SCHEDULE}
    return table.Run(setting, split, f"c{seed:03d}-x", steps, losses, probes, 1200, {"images": 4})


def test_share_oracle_and_low_gain(table):
    run = synthetic_run(table, "s", "test", 50.0, 1)
    assert run.gain == pytest.approx(0.9, abs=0.02)
    assert run.share(1200) == pytest.approx(1.0, abs=0.03)
    # 90% of the gain at t = tau ln 10 = 115: the first scheduled probe past it is 120
    assert run.oracle == 120
    flat = synthetic_run(table, "s", "test", 50.0, 2)
    flat.probes = {s: {**v, "discriminator": 0.3 + 0.05 * (-1) ** s} for s, v in flat.probes.items()}
    _, _, low = table.split_runs([run, flat])
    assert low == [flat]  # no gain beyond its noise: reported apart, never averaged in


def test_a_time_scale_free_rule_beats_every_fixed_budget_across_learning_rates(table):
    """Settings whose time constants differ 8x: one fixed budget cannot be both cheap at the fast setting and
    enough at the slow one; the late-improvement rule, calibrated on two settings, holds at a third."""
    runs = [synthetic_run(table, name, split, tau, 10 * k + i)
            for k, (name, split, tau) in enumerate([("fast", "calibration", 20.0), ("slow", "calibration", 160.0),
                                                     ("middle", "test", 60.0), ("slowest", "test", 200.0),
                                                     ("fastest", "test", 15.0)])
            for i in range(10)]
    result = table.study(runs)
    late = result["rows"]["late_improvement"]
    assert all(s["median"] >= 0.9 for s in late["test"].values())
    fixed = result["rows"]["fixed"]
    assert not all(table.meets(s) for s in fixed["test"].values())  # some test setting breaks the best budget
    assert result["fixed_meeting_all"] == []


def test_the_report_writes_its_page_and_figures(table, tmp_path):
    from settings_report import write_report

    runs = [synthetic_run(table, name, split, tau, 10 * k + i)
            for k, (name, split, tau) in enumerate([("a", "calibration", 30.0), ("b", "test", 90.0)])
            for i in range(10)]
    write_report(table.study(runs), runs, tmp_path)
    text = (tmp_path / "settings_study.md").read_text()
    assert "| late_improvement |" in text and "b (test)" in text
    assert (tmp_path / "stops_vs_oracle.png").stat().st_size > 0
    assert (tmp_path / "loss_vs_identity.png").stat().st_size > 0


def test_load_runs_reads_the_study_layout(table, tmp_path):
    folder = tmp_path / "runs" / "lr_x1" / "c000-x"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "setting": {"name": "lr_x1", "split": "calibration", "images": 4}, "max_steps": 1200,
        "dvar_history": [[5, 0.5], [10, 0.4]]}))
    (folder / "probes.json").write_text(json.dumps({"steps": {"0": {"discriminator": 0.1}, "1200": {
        "discriminator": 0.8}}}))
    (run,) = table.load_runs(tmp_path)
    assert run.setting == "lr_x1" and run.losses == [0.5, 0.4] and run.gain == pytest.approx(0.7)


def test_measured_probe_sd_is_read_per_method(table, tmp_path):
    rows = tmp_path / "instrument_runs.jsonl"
    rows.write_text("\n".join(json.dumps({"method": m, "images": 4, "discriminator_all_prompts": {"probe_sd": sd}})
                              for m, sd in [("textual_inversion", 0.04), ("textual_inversion", 0.06),
                                            ("dreambooth_lora (test_lr_x1)", 0.03)]) + "\n")
    assert table.measured_probe_sd(rows, "textual_inversion") == pytest.approx(0.05)
    assert table.measured_probe_sd(rows, "dreambooth_lora") == pytest.approx(0.03)
    assert table.measured_probe_sd(rows, "custom_diffusion") is None


@pytest.fixture(scope="module")
def signals(table):
    spec = importlib.util.spec_from_file_location("alternative_signals", ROOT / "benchmarks" / "alternative_signals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_t90_is_where_the_smoothed_signal_made_90_percent_of_its_drop(signals):
    steps = list(range(0, 1201, 10))
    values = [1 + math.exp(-s / 100) for s in steps]
    # 90% of the drop at tau ln 10 = 230; the 4-value causal moving average lags it by 15 steps
    assert 230 <= signals.t90(steps, values, 1200) <= 260
    assert signals.t90(steps, [1.0] * len(steps), 1200) == 1200  # nothing dropped: never


def test_a_signal_on_the_identity_time_scale_follows_the_oracle_and_ldet_on_a_fixed_one_does_not(table, signals):
    """Runs at three time constants: a signal on each run's own time constant correlates with the oracle across
    runs and settings; L_det falling on one time scale whatever the setting does not."""
    runs, rows = [], []
    for k, tau in enumerate((20.0, 60.0, 200.0)):
        for i in range(6):
            run = synthetic_run(table, f"tau{tau:g}", "test", tau, 10 * k + i)
            runs.append(run)
            steps = sorted(set(range(0, 1201, 40)) | set(run.probes))
            own = [1 + math.exp(-s / tau) for s in steps]
            fixed = [1 + math.exp(-s / 50.0) + 1e-3 * ((i + s) % 3) for s in steps]
            rows.append({"setting": run.setting, "concept": run.concept, "steps": steps,
                         "signals": {name: (own if name == "heldout" else fixed) for name in signals.SIGNALS}})
    result = signals.analyse(rows, runs)
    assert result["heldout"]["log_corr"] > 0.9 and result["heldout"]["setting_slope"] > 0.7
    assert abs(result["ldet"]["setting_slope"]) < 0.2
    assert result["heldout"]["median_spearman"] < -0.9
