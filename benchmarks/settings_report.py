"""``settings_study.md`` and its figures, from :func:`settings_table.study` (issue 25)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from settings_table import (
    COST_GOAL,
    MEDIAN_GOAL,
    ORACLE_SHARE,
    WORST_GOAL,
    Run,
    loss_informativeness,
    meets,
    rule_of,
    stop_step,
)

RULE_WORDS = {
    "dvar": "DVAR (window in L_det values, threshold)",
    "growing_window": "DVAR with a window growing with the run (fraction, threshold)",
    "late_improvement": "late improvement (fraction, span)",
    "fixed": "best single fixed budget over the calibration settings (steps)",
    "fixed_at_default": "fixed budget tuned at the default setting (steps)",
    "full_length": "every run to its full length (the ceiling: a quality goal it misses, no rule can meet)",
}


def write_report(result: dict, runs: list[Run], out: Path) -> None:
    """Write ``settings_study.md``, ``stops_vs_oracle.png`` and ``loss_vs_identity.png`` into ``out``."""
    method = (runs[0].meta.get("method") if runs else None) or "textual_inversion"
    title = {"textual_inversion": "Textual Inversion", "dreambooth_lora": "DreamBooth-LoRA"}.get(method, method)
    flag = "" if method == "textual_inversion" else f" --method {method}"
    results = "" if method == "textual_inversion" else f" --results {out} --workdir runs/settings-study-lora"
    lines = [f"# Where an adaptive stop earns its keep: {title} across settings (issue 25)", "",
             f"Command: `python benchmarks/settings_study.py run{flag}` (training and probes), then "
             f"`python benchmarks/settings_table.py --probe-stops{results}` (this page).", "",
             "Each setting: one fleet of 10 held-out world concepts, 1200 steps, L_det every 5 steps, probes on a log "
             "schedule (0-1200) with the concept discriminator over 20 images (4 per prompt; training prompt and the "
             "concept on 4 new backgrounds). Quality: the share of the identity gain kept, (identity at the stop - "
             "untrained) / (converged - untrained); converged: mean of the probes at 800-1200. Oracle: the first "
             f"scheduled probe keeping {ORACLE_SHARE:.0%} of the gain. Goals at every test setting: median share >= "
             f"{MEDIAN_GOAL}, worst decile >= {WORST_GOAL} (each capped at what training every run to 1200 steps "
             f"keeps at that setting: the full_length row), mean steps <= {COST_GOAL} x the oracle's. Calibration "
             "settings: concepts 0-9; test settings: concepts 60-69 (neither the concepts nor the settings were used "
             "to choose a rule or its parameters).", ""]
    lines += instrument_section(runs, result)
    lines += rules_section(result)
    lines += informativeness_section(runs)
    (out / "settings_study.md").write_text("\n".join(lines) + "\n")
    stops_figure(result, out / "stops_vs_oracle.png")
    informativeness_figure(runs, out / "loss_vs_identity.png")


def instrument_section(runs: list[Run], result: dict) -> list[str]:
    sd = result.get("probe_sd")
    lines = ["## The instrument: gain against noise, per setting", "",
             (f"One probe's SD: {sd:.3f}, measured over sampling seeds (`benchmarks/results/instrument`, 10 test "
              "concepts at the default setting, untrained and converged). " if sd else "") +
             "Tail SD: the SD of a run's probes from step 400 on (sampling noise plus any late drift: an upper bound). "
             "Low gain: converged - untrained within 3 SE of zero (SE from the measured SD).", "",
             "| setting | split | runs | median untrained | median converged | median gain | median tail SD | "
             "runs with gain >= 8 probe SD | low gain (left out) |", "|---|---|---|---|---|---|---|---|---|"]
    low = {(r.setting, r.concept) for r in result["low_gain"]}
    for setting in sorted({r.setting for r in runs}, key=lambda s: (s.startswith("test"), s)):
        rs = [r for r in runs if r.setting == setting]
        strong = sum(r.gain >= 8 * (sd or r.probe_sd) for r in rs)
        lines.append(f"| {setting} | {rs[0].split} | {len(rs)} | {np.median([r.untrained for r in rs]):.3f} | "
                     f"{np.median([r.converged for r in rs]):.3f} | {np.median([r.gain for r in rs]):.3f} | "
                     f"{np.median([r.probe_sd for r in rs]):.3f} | {strong}/{len(rs)} | "
                     f"{sum((r.setting, r.concept) in low for r in rs)} |")
    strong = sum(r.gain >= 8 * (sd or r.probe_sd) for r in runs)
    lines += ["", f"All runs: {strong}/{len(runs)} ({100 * strong / max(1, len(runs)):.0f}%) have a gain of at least 8 "
              "probe SDs (goal: 90%).", ""]
    return lines


def fmt_params(params: tuple) -> str:
    return ", ".join(f"{p:g}" if isinstance(p, float) else str(p) for p in params)


def rules_section(result: dict) -> list[str]:
    lines = ["## Rules, calibrated once over the calibration settings, at every test setting", "",
             "| rule | parameters | setting | median share (SE) | worst decile | mean steps | oracle mean steps | "
             "steps / oracle | fidelity: background / recolour (n) | exact stops | goals met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = {}
    for name, row in result["rows"].items():
        met = []
        for split in ("calibration", "test"):
            for setting, s in sorted(row[split].items()):
                ok = meets(s)
                if split == "test":
                    met.append((setting, ok, s))
                lines.append(f"| {name} | {fmt_params(row['params'])} | {setting} ({split}) | {s['median']:.2f} "
                             f"({s['median_se']:.2f}) | {s['worst']:.2f} | {s['steps']:.0f} | {s['oracle']:.0f} | "
                             f"{s['cost']:.2f} | {s['background']:.2f} / {s['recolour']:.2f} ({s['recolour_n']}) | "
                             f"{s['exact']}/{s['n']} | "
                             f"{'yes' if ok else 'no'} |")
        verdicts[name] = met
    lines += ["", "Rules: " + "; ".join(f"**{k}**: {v}" for k, v in RULE_WORDS.items()) + ".", "",
              "### Verdict", ""]
    if not result["test"]:
        lines += ["No test setting has finished yet: nothing is claimed.", ""]
        return lines
    from lightning_custom.dvar.calibrate import spearman

    test_runs = [r for rs in result["test"].values() for r in rs]
    for name, met in verdicts.items():
        misses = [f"{s} ({miss_words(st)})" for s, ok, st in met if not ok]
        stops = [stop_step(r, rule_of(name), result["rows"][name]["params"]) for r in test_runs]
        rho = spearman(stops, [r.oracle for r in test_runs])
        follows = f" Its stops follow the oracle's across the test runs with Spearman {rho:.2f}." if rho == rho else ""
        lines.append(f"- **{name}**: " + (f"meets the goals at every test setting ({len(met)})." if not misses else
                                           "misses at " + "; ".join(misses) + ".") + follows)
    fixed = result["fixed_meeting_all"]
    lines += ["", ("No single fixed budget of the grid (10-1200 steps) meets the goals at every test setting."
                   if not fixed else f"Fixed budgets that meet the goals at every test setting: {fixed[0]}-"
                   f"{fixed[-1]} steps ({len(fixed)} of the grid's budgets)."), ""]
    if result["low_gain"]:
        lines += [f"Low-gain runs left out ({len(result['low_gain'])}): " + ", ".join(
            f"{r.setting}/{r.concept} (gain {r.gain:+.3f}, SE {r.gain_se:.3f})" for r in result["low_gain"]) + ".", ""]
    return lines


def miss_words(s: dict) -> str:
    from settings_table import goals

    median, worst = goals(s)
    words = []
    if s["median"] < median:
        words.append(f"median {s['median']:.2f} < {median:.2f}")
    if s["worst"] < worst:
        words.append(f"worst decile {s['worst']:.2f} < {worst:.2f}")
    if s["cost"] > COST_GOAL:
        words.append(f"{s['cost']:.2f}x the oracle's steps")
    return ", ".join(words)


def informativeness_section(runs: list[Run]) -> list[str]:
    rows = [loss_informativeness(r) for r in runs]
    rho = [r["spearman"] for r in rows if not math.isnan(r["spearman"])]
    lt, it = np.log([r["loss_t90"] for r in rows]), np.log([r["identity_t90"] for r in rows])
    corr = float(np.corrcoef(lt, it)[0, 1]) if len(rows) > 2 else math.nan
    ratio = np.exp(np.median(it - lt))
    return ["## Is the loss informative here?", "",
            f"Per run, the Spearman correlation of L_det with identity over the probes: median {np.median(rho):.2f} "
            f"(quartiles {np.percentile(rho, 25):.2f} / {np.percentile(rho, 75):.2f}; negative: the loss falls as "
            "identity rises). The step where L_det (4-value moving average) has made 90% of its drop against the "
            f"oracle step (90% of the identity gain): correlation of their logarithms across runs and settings "
            f"{corr:.2f}; median ratio of the two (identity's step / L_det's) {ratio:.2f} "
            "(`loss_vs_identity.png`). If L_det's time scale does not follow identity's across settings, no rule "
            "on L_det can adapt to them.", ""]


def stops_figure(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(result["rows"])
    fig = Figure(figsize=(3.2 * len(names), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    settings = sorted(result["test"])
    colours = {s: c for s, c in zip(settings, ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7"])}
    for k, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), k + 1)
        rule = rule_of(name)
        for setting in settings:
            rs = result["test"][setting]
            ax.scatter([r.oracle for r in rs], [stop_step(r, rule, result["rows"][name]["params"]) for r in rs],
                       s=12, color=colours[setting], label=setting, alpha=0.8)
        ax.plot([5, 1200], [5, 1200], color="grey", lw=0.8)
        ax.set(xscale="log", yscale="log", xlim=(5, 1500), ylim=(5, 1500), title=name, xlabel="oracle step")
        if k == 0:
            ax.set_ylabel("stop step")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)


def informativeness_figure(runs: list[Run], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k, setting in enumerate(sorted({r.setting for r in runs})):
        rows = [loss_informativeness(r) for r in runs if r.setting == setting]
        ax.scatter([r["loss_t90"] for r in rows], [r["identity_t90"] for r in rows], s=12, label=setting,
                   color=f"C{k % 10}", marker="o" if not setting.startswith("test") else "^")
    ax.plot([5, 1200], [5, 1200], color="grey", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="L_det: 90% of its drop (step)",
           ylabel="identity: 90% of its gain (step)", title="Does L_det keep identity's time?")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
