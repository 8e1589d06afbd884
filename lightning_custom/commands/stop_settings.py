"""``replay`` and ``calibrate``: DVAR's settings tried on finished runs, without retraining."""

from __future__ import annotations

from pathlib import Path


def replay(
    runs: list[str],
    windows: list[int] | None = None,
    thresholds: list[float] | None = None,
    min_steps: int = 0,
    output_dir: str | None = None,
) -> dict:
    """Where would DVAR have stopped? Replay finished runs' deterministic-loss histories for a grid of settings.

    A full-length run (e.g. --dvar.stop false) gives exactly the stop step a live DVAR run of the same seed would
    have had; tune window and threshold here without retraining.

    Args:
        runs: run folders, summary.json files, or folders searched for them recursively.
        windows: DVAR windows in optimizer steps (default: 50, 100, 200, 310, 440).
        thresholds: DVAR thresholds (default: 0.05, 0.1, 0.15, 0.2, 0.3, 0.4).
        min_steps: never stop before this step (as --dvar.min_steps).
        output_dir: where to write replay.md/.csv/.json/.png (default: <run>/replay for one run, else ./replay).
    """
    from lightning_custom.dvar.replay import DEFAULT_THRESHOLDS, DEFAULT_WINDOWS, markdown_table, write_replay
    from lightning_custom.dvar.replay import replay as replay_runs

    result = replay_runs(runs, windows or DEFAULT_WINDOWS, thresholds or DEFAULT_THRESHOLDS, min_steps)
    if output_dir is None:
        single = len(result.runs) == 1
        output_dir = str(Path(result.runs[0].path).parent / "replay") if single else "replay"
    files = write_replay(result, output_dir)
    print(markdown_table(result))
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    return {"result": result, "files": files}


def calibrate(
    runs: list[str],
    target: float = 0.97,
    windows: list[int] | None = None,
    thresholds: list[float] | None = None,
    eval_every: list[int] | None = None,
    budget: int | None = None,
    output: str | None = None,
    smooth: int = 5,
    across: bool = False,
) -> dict:
    """Recommend DVAR's (window, threshold, eval period) from finished full-length runs that carry quality probes.

    The pick has the fewest mean steps among the settings whose median retention of the converged identity is at
    least --target (see lightning_custom.dvar.calibrate for the definitions). Prints the trade-off table.

    Args:
        runs: full-length run folders (DVAR observing, a WorldProbe attached), or folders searched for them.
        target: the share of the converged identity to keep (median over runs).
        windows: DVAR windows in optimizer steps (default: 20, 40, 60, 80, 120, 160, 240, 320, 440).
        thresholds: DVAR thresholds (default: 0.05, 0.1, 0.15, 0.2, 0.3, 0.4).
        eval_every: evaluation periods in steps, multiples of the runs' own (default: 5, 10, 20).
        budget: the most steps you would train (a rule stops here at the latest; default: each run's length).
        output: where to write the YAML snippet (the dvar: block to paste into a config; default:
            dvar_calibrated.yaml beside the runs, in the folder that holds them all).
        smooth: average the median identity over this many probes before the 1% plateau criterion that defines
            the converged length (1: raw probes, which one lucky probe can end early; Table 1's second edition
            uses 5).
        across: the runs are of several training settings, one folder per setting (learning rates, image counts,
            batch sizes): recommend one setting of DVAR that keeps --target at every one of them, and print each
            setting's table (lightning_custom.dvar.calibrate_across).
    """
    from lightning_custom.dvar import calibrate as cal

    probed = cal.load_probed_runs(runs)
    if across:
        return _calibrate_across(probed, runs, target, windows, thresholds, eval_every, budget, output, smooth)
    result = cal.calibrate(probed, target, windows or cal.DEFAULT_WINDOWS, thresholds or cal.DEFAULT_THRESHOLDS,
                           eval_every or cal.DEFAULT_EVAL_EVERY, budget=budget, smooth=smooth)
    snippet = cal.yaml_snippet(result, len(probed))
    if output is None:
        output = str(_common_folder(runs) / "dvar_calibrated.yaml")
    from lightning_custom.runtime.io import atomic_path

    with atomic_path(output) as tmp:
        Path(tmp).write_text(snippet)
    print(f"{len(probed)} runs, converged length {result.converged_length} steps, target {target:g}\n")
    print(cal.trade_off_table(result))
    print(f"\n{snippet}\nwrote {output}")
    return {"result": result, "snippet": snippet}


def _calibrate_across(probed, runs, target, windows, thresholds, eval_every, budget, output, smooth) -> dict:
    """``calibrate --across true``: one DVAR setting for runs of several training settings."""
    import yaml

    from lightning_custom.dvar import calibrate as cal
    from lightning_custom.dvar.calibrate_across import across_table, calibrate_across, group_by_folder

    groups = group_by_folder(probed)
    result = calibrate_across(groups, target, windows or cal.DEFAULT_WINDOWS, thresholds or cal.DEFAULT_THRESHOLDS,
                              eval_every or cal.DEFAULT_EVAL_EVERY, budget=budget, smooth=smooth)
    if result.recommended is None:
        snippet = (f"# calibrate --across: no setting kept a median {target:g} of the converged identity at every "
                   f"one of {len(groups)} settings ({', '.join(sorted(groups))})\n")
    else:
        window, threshold, period = result.recommended
        snippet = (f"# calibrated across {len(groups)} settings ({', '.join(sorted(groups))}), {len(probed)} runs\n"
                   + yaml.safe_dump({"dvar": {"window": window, "threshold": threshold,
                                              "eval_every_n_steps": period}}, sort_keys=False))
    output = output or str(_common_folder(runs) / "dvar_calibrated.yaml")
    from lightning_custom.runtime.io import atomic_path

    with atomic_path(output) as tmp:
        Path(tmp).write_text(snippet)
    print(f"{len(probed)} runs in {len(groups)} settings, target {target:g}\n")
    print(across_table(result))
    print(f"\n{snippet}\nwrote {output}")
    return {"result": result, "snippet": snippet}


def _common_folder(runs: list[str]) -> Path:
    """The folder holding every one of ``runs`` (folders or summary files)."""
    import os

    folders = [str(Path(r).resolve() if Path(r).is_dir() else Path(r).resolve().parent) for r in runs]
    return Path(os.path.commonpath(folders))
