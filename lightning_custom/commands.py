"""Subcommands beside LightningCLI's fit/validate/...: ``sample``, ``evaluate``, ``replay``, ``gather``,
``before_after`` and ``calibrate`` work on finished runs.

Each is a plain function; its signature is the command line and its docstring the ``--help``. Lists are given
space-separated (``--windows 100 200``), in YAML/JSON form (``--windows '[100, 200]'``) or one item at a time
(``--windows 100 --windows+ 200``); ``--prompts`` takes one template or a list.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_custom.errors import UserInputError


def _read_prompts(prompts: list[str] | str | None, prompts_file: str | None) -> list[str] | None:
    """Prompts given inline (one string or a list), then one per line of ``prompts_file`` (blank lines and ``#``
    comments skipped)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts_file is None:
        return _warn_without_concept(prompts)
    path = Path(prompts_file).expanduser()
    if not path.is_file():
        raise UserInputError(f"--prompts_file: no such file {prompts_file!r}")
    lines = [line.strip() for line in path.read_text().splitlines()]
    listed = [line for line in lines if line and not line.startswith("#")]
    if not listed:
        raise UserInputError(f"--prompts_file: {prompts_file} holds no prompts")
    return _warn_without_concept((prompts or []) + listed)


def _warn_without_concept(prompts: list[str] | None) -> list[str] | None:
    """One line for each prompt without ``{}``: it is sampled as typed, without the learned concept."""
    for prompt in prompts or []:
        if "{}" not in prompt:
            print(f"warning: the prompt {prompt!r} has no '{{}}', so it does not hold the learned concept (write "
                  "'a photo of {} on the moon' to use it)", file=sys.stderr)
    return prompts


def sample(
    run_dir: str,
    prompts: list[str] | str | None = None,
    prompts_file: str | None = None,
    images_per_prompt: int = 4,
    seed: int = 0,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    scheduler: str = "default",
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    output_dir: str | None = None,
    base_model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Generate images with the concept a finished run learned; write the PNGs, a labelled grid and samples.json.

    Example: python -m lightning_custom sample runs/my-dog --prompts "a photo of {} on the moon" (one template) or
    --prompts '["a photo of {}", "a red {}"]' (several).

    Args:
        run_dir: the run folder (the fit's default_root_dir, holding summary.json and the artifacts).
        prompts: one prompt template or a list; '{}' becomes the run's token with its class noun ("sks dog"), once per
            concept (default: 8 object prompts).
        prompts_file: a text file with one prompt template per line (added after --prompts).
        images_per_prompt: images per prompt; image j of every prompt uses seed + j.
        seed: the first seed.
        guidance_scale: guidance scale (default: the model folder's sampling_defaults.json, 4.0 on the embedded
            world model; else the model's own: 7.5 on SD and SDXL, 3.5 on FLUX.1, 7.0 on SD3).
        num_inference_steps: denoising steps (default: the model folder's recommendation, 25 on the embedded world
            model; else 50).
        scheduler: sampler: default (the model folder's recommendation, DDIM on the embedded world model; else the
            model's own), ddim, dpm++, euler, pndm or ddpm (SD and SDXL only; FLUX.1 and SD3 keep their
            flow-matching sampler).
        height: image height in pixels (default: the model's).
        width: image width in pixels (default: the model's).
        batch_size: images generated at once.
        output_dir: where to write (default: <run_dir>/samples).
        base_model: load this base model instead of the one recorded in summary.json.
        device: auto, cpu, cuda, cuda:1, ...
        dtype: auto (on CUDA float16, bfloat16 for FLUX.1 and SD3; else float32), float32, float16 or bfloat16.
    """
    from lightning_custom.inference.sampling import sample_run

    manifest = sample_run(
        run_dir, _read_prompts(prompts, prompts_file), images_per_prompt=images_per_prompt, seed=seed,
        guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, scheduler=scheduler, height=height,
        width=width, batch_size=batch_size, output_dir=output_dir, base_model=base_model, device=device, dtype=dtype,
    )
    out = Path(output_dir) if output_dir else Path(run_dir) / "samples"
    print(f"wrote {len(manifest['images'])} images and {out / manifest['grid']} in {manifest['seconds']:.1f} s")
    return manifest


def evaluate(
    run_dir: str,
    concept_dir: str | None = None,
    prompts: list[str] | str | None = None,
    prompts_file: str | None = None,
    images_per_prompt: int = 4,
    seed: int = 0,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    scheduler: str = "default",
    height: int | None = None,
    width: int | None = None,
    clip_model: str = "openai/clip-vit-base-patch32",
    dino_model: str = "facebook/dino-vits16",
    metrics: list[str] | None = None,
    batch_size: int = 4,
    device: str = "auto",
    dtype: str = "auto",
    base_model: str | None = None,
    output: str | None = None,
) -> dict:
    """Score a finished run: sample N prompts x M images with fixed seeds, then CLIP-I, CLIP-T and DINO.

    On the embedded world model the default is the world encoder's identity similarity (no download). Each concept
    of a multi-concept run gets its own prompts and is scored against its own images.

    Args:
        run_dir: the run folder (holding summary.json and the artifacts).
        concept_dir: the concept images (default: each concept's instance_data_dir recorded in summary.json).
        prompts: one prompt template or a list, with '{}' for the concept (default: 8 object prompts; on the world
            model, its 2 quickstart prompts).
        prompts_file: a text file with one prompt template per line.
        images_per_prompt: images per prompt (M); image j of every prompt uses seed + j.
        seed: the first seed.
        guidance_scale: guidance scale (default: the model's own: 7.5 on SD and SDXL, 3.5 on FLUX.1, 7.0 on SD3).
        num_inference_steps: denoising steps.
        scheduler: sampler: default, ddim, dpm++, euler, pndm or ddpm (SD and SDXL only).
        height: image height in pixels (default: the model's).
        width: image width in pixels (default: the model's).
        clip_model: CLIP for CLIP-I and CLIP-T: hub id or local folder.
        dino_model: DINO ViT for the DINO score: hub id or local folder (the paper: ViT-S/16).
        metrics: any of clip_i, clip_t, dino, identity (the world encoder; default: identity on the embedded world
            model, else the other three).
        batch_size: images generated at once.
        device: auto, cpu, cuda, ...
        dtype: auto, float32, float16 or bfloat16 (of the diffusion model).
        base_model: load this base model instead of the one recorded in summary.json.
        output: where to write the metrics (default: <run_dir>/metrics.json).
    """
    from lightning_custom.inference.evaluate import METRIC_NAMES, evaluate_run

    result = evaluate_run(
        run_dir, concept_dir=concept_dir, prompts=_read_prompts(prompts, prompts_file),
        images_per_prompt=images_per_prompt, seed=seed, guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps, scheduler=scheduler, height=height, width=width,
        clip_model=clip_model, dino_model=dino_model,
        metrics=metrics, batch_size=batch_size, device=device, dtype=dtype, base_model=base_model,
        output=output,
    )
    scores = ", ".join(f"{name} {result[name]:.4f}" for name in METRIC_NAMES if result.get(name) is not None)
    print(f"{result['num_prompts']} prompts x {images_per_prompt} images: {scores}")
    written = Path(output) if output else Path(run_dir) / "metrics.json"
    print(f"wrote {written} and the samples in {result['samples_dir']}")
    return result


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


def gather(runs: list[str], output: str | None = None) -> list[dict]:
    """Collect the summary.json of many runs (say, one SLURM array task per concept) into one table.

    Args:
        runs: run folders, folders holding run folders, or summary.json files.
        output: also write the table as CSV here.

    Returns:
        One row per run (method, token, stop step, why it stopped, wall time, ...).
    """
    from lightning_custom.runs.gather import gather_table, markdown

    rows = gather_table(list(runs), output)
    print(markdown(rows), end="")
    if output:
        print(f"wrote {output} ({len(rows)} runs)")
    return rows


def before_after(
    run_dir: str,
    before_word: str | None = None,
    prompts: list[str] | str | None = None,
    images_per_prompt: int = 4,
    num_inference_steps: int = 25,
    guidance_scale: float | None = None,
    output: str | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
) -> dict:
    """Samples a run's concept before and after training side by side, scored by the world encoder.

    Made for runs on the embedded world model (the quickstart): "before" prompts the base model with the word the
    concept's token started from (or its class noun), "after" with the learned token and the class noun. Writes a
    labelled grid and prints the identity similarity (world-encoder cosine similarity to the concept images) of
    both sides. SD and SDXL runs sample with DDIM at the concept images' size; FLUX.1 and SD3 runs with their own
    flow-matching sampler at the model's size (or --height / --width).

    Args:
        run_dir: the run folder (the fit's default_root_dir, holding summary.json and the artifacts).
        before_word: the word standing for the concept before training (default: the "after" prompt with the
            identifier removed: the class noun of a DreamBooth-style run, else the token's initializer_token).
        prompts: templates with '{}' for the concept (default: "a photo of a {}" and "a photo of a {} on a grey
            background").
        images_per_prompt: images per prompt and per side; image j uses seed + j on both sides.
        num_inference_steps: denoising steps.
        guidance_scale: guidance scale (default: 4.0 on SD and SDXL runs; the model's own on FLUX.1, 3.5, and SD3,
            7.0).
        output: PNG path of the grid (default: <run_dir>/before_after.png).
        seed: the first seed.
        height: image height in pixels, FLUX.1 and SD3 runs (default: the model's).
        width: image width in pixels, FLUX.1 and SD3 runs (default: the model's).

    Returns:
        ``{"identity_before", "identity_after", "grid"}``.
    """
    from lightning_custom.inference.evaluate import before_after_run, is_flow_run
    from lightning_custom.inference.sampling import check_trained, read_summary
    from lightning_custom.world.quickstart import before_after as sample_before_after

    run = Path(run_dir)
    if not (run / "summary.json").is_file():
        raise UserInputError(f"run_dir: {run_dir} holds no summary.json (is it a finished fit's default_root_dir?)")
    summary = read_summary(run)
    check_trained(summary, run)  # before looking for the word: the more useful error comes first
    if before_word is None:
        before_word = _initializer_token(run)
    prompts = [prompts] if isinstance(prompts, str) else prompts
    prompts = prompts or ["a photo of a {}", "a photo of a {} on a grey background"]
    if is_flow_run(run, summary):  # DDIM (the world model's sampler) does not apply to flow-matching models
        result = before_after_run(run, before_word=before_word, prompts=prompts, num_images=images_per_prompt,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  height=height, width=width, out=output, seed=seed)
    else:
        result = sample_before_after(run, before_word=before_word, prompts=prompts, num_images=images_per_prompt,
                                     num_inference_steps=num_inference_steps,
                                     guidance_scale=4.0 if guidance_scale is None else guidance_scale, out=output,
                                     seed=seed)
    gain = result["identity_after"] - result["identity_before"]
    print(f"identity similarity to the concept images: before {result['identity_before']:.3f} -> after "
          f"{result['identity_after']:.3f} ({gain:+.3f}); grid: {result['grid']}")
    return result


def _initializer_token(run: Path) -> str:
    """The word of the "before" side: the "after" prompt with the identifier removed. A run with a class noun
    (DreamBooth: "a photo of a sks dog") compares with its class noun ("a photo of a dog"); a token without one
    (Textual Inversion) with the word it started from (the run's ``initializer_token``). Else a one-line error asking
    for ``--before_word``."""
    import yaml

    from lightning_custom.inference.sampling import read_summary

    summary = read_summary(run)
    concepts = summary.get("concepts") or [{}]
    class_noun = (concepts[0] or {}).get("class_noun") or summary.get("class_noun")
    if class_noun:
        return class_noun
    config = run / "config.yaml"
    token = None
    if config.is_file():
        loaded = yaml.safe_load(config.read_text()) or {}
        token = ((loaded.get("model") or {}).get("init_args") or {}).get("initializer_token")
    token = token or summary.get("initializer_token")  # a fleet's concept folder
    if not token:
        raise UserInputError(f"--before_word: {run} has no config.yaml naming an initializer_token; give the word "
                             f"the concept's token started from")
    return token


COMMANDS: dict[str, Callable] = {"sample": sample, "evaluate": evaluate, "replay": replay, "gather": gather,
                                 "before_after": before_after, "calibrate": calibrate}
_POSITIONAL = {"sample": ("run_dir", None), "evaluate": ("run_dir", None), "replay": ("runs", "+"),
               "gather": ("runs", "+"), "before_after": ("run_dir", None), "calibrate": ("runs", "+")}


def build_parser(name: str):
    """The jsonargparse parser of one subcommand, from its function's signature and docstring."""
    from jsonargparse import ArgumentParser

    function = COMMANDS[name]
    positional, nargs = _POSITIONAL[name]
    doc = (function.__doc__ or "").split("Args:")[0].strip()  # the summary and any example, not the arguments
    parser = ArgumentParser(prog=f"python -m lightning_custom {name}", description=doc)
    help_line = next(
        (line.split(":", 1)[1].strip() for line in (function.__doc__ or "").splitlines()
         if line.strip().startswith(f"{positional}:")), "",
    )
    parser.add_argument(positional, nargs=nargs, help=help_line) if nargs else parser.add_argument(
        positional, help=help_line
    )
    parser.add_function_arguments(function, skip={positional}, as_positional=False)
    return parser


def numeric_list_arguments(function: Callable) -> set[str]:
    """The names of ``function``'s arguments typed as lists of numbers (``windows: list[int] | None``)."""
    import typing

    hints = typing.get_type_hints(function)
    numeric = {list[int], list[float]}
    return {name for name, hint in hints.items()
            if hint in numeric or any(arg in numeric for arg in typing.get_args(hint))}


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def join_space_separated(args: Sequence[str], names: set[str]) -> list[str]:
    """``--windows 20 40`` -> ``--windows [20, 40]`` for the given list arguments (jsonargparse wants one value);
    the numbers after the option are taken, so a positional argument may still follow them."""
    joined: list[str] = []
    index = 0
    while index < len(args):
        token = args[index]
        joined.append(token)
        index += 1
        if token.startswith("--") and token[2:].replace("-", "_") in names:
            values = []
            while index < len(args) and _is_number(args[index]):
                values.append(args[index])
                index += 1
            if values:
                joined.append("[" + ", ".join(values) + "]")
    return joined


def run_command(args: Sequence[str]):
    """Run ``args[0]`` (one of :data:`COMMANDS`) with the remaining arguments; return the function's result."""
    name = args[0]
    rest = join_space_separated(list(args[1:]), numeric_list_arguments(COMMANDS[name]))
    parser = build_parser(name)
    config = parser.parse_args(rest)
    kwargs = {k: v for k, v in vars(config).items() if k != "config"}
    kwargs = {k.replace("-", "_"): v for k, v in kwargs.items()}
    concepts = fleet_concept_folders(kwargs.get("run_dir")) if name in PER_RUN_COMMANDS else []
    if not concepts:
        return COMMANDS[name](**kwargs)
    # A fleet's folder: the command runs on each concept's folder, as on a run of its own.
    chosen = [key for key in ("output", "output_dir") if kwargs.get(key)]
    if chosen:
        raise UserInputError(f"--{chosen[0]}: {kwargs['run_dir']} is a fleet of {len(concepts)} concepts; each "
                             f"concept's {name} goes into its own folder (give one concept's folder to choose)")
    return [COMMANDS[name](**{**kwargs, "run_dir": str(folder)}) for folder in concepts]


PER_RUN_COMMANDS = ("sample", "evaluate", "before_after")


def fleet_concept_folders(run_dir: str | None) -> list[Path]:
    """The concept folders of a fleet's run folder (empty for any other folder)."""
    from lightning_custom.runs.gather import fleet_folders

    if not run_dir:
        return []
    run = Path(run_dir)
    return [run / folder for folder in fleet_folders(run / "summary.json") if (run / folder / "summary.json").is_file()]


# how the user started it: the console script, or the module
PROGRAM = "lightning-custom" if Path(sys.argv[0]).name == "lightning-custom" else "python -m lightning_custom"
TRAINER_SUBCOMMANDS = {"fit": "train a method on a concept; DVAR stops it (--config configs/quickstart.yaml)",
                       "validate": "L_det of a config's model on its fixed evaluation batch"}


def subcommand_listing(given: str | None = None) -> str:
    """Every subcommand with its one line; with ``given`` (an unknown one), an error line first, naming the
    closest subcommand."""
    import difflib

    lines = []
    if given is not None:
        close = difflib.get_close_matches(given, [*TRAINER_SUBCOMMANDS, *COMMANDS], n=1)
        lines.append(f"error: unknown subcommand {given!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    lines.append(f"usage: {PROGRAM} <subcommand> [options]   ({PROGRAM} <subcommand> --help for its options)")
    lines.append("subcommands:")
    for name, words in {**TRAINER_SUBCOMMANDS, **command_summaries()}.items():
        lines.append(f"  {name:<13} {words}")
    return "\n".join(lines)


def command_summaries() -> dict[str, str]:
    """The first line of each run command's docstring (``sample``, ``evaluate``...)."""
    return {name: (function.__doc__ or "").strip().splitlines()[0].rstrip(".") for name, function in COMMANDS.items()}


LIGHT_COMMANDS = ("gather", "replay", "calibrate")  # read summaries only: no torch, Lightning or diffusers import


def top_level_help() -> str:
    """``python -m lightning_custom --help``: every subcommand and the exit statuses, without loading the stack."""
    from lightning_custom.errors import EXIT_STATUS_HELP

    return (f"{subcommand_listing()}\n\nTrain with `{PROGRAM} fit --config configs/quickstart.yaml` "
            f"(`{PROGRAM} fit --help` lists every option).\n\n{EXIT_STATUS_HELP}")
