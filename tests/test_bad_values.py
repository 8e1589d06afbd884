"""Every bad value ends in one ``error: --the.argument: ...`` line with exit status 2, before anything is written."""

from __future__ import annotations

import inspect
import json
import logging
import typing
from pathlib import Path

import pytest

from lightning_custom.runs import run_folder
from lightning_custom.cli import main
from lightning_custom.runtime.parse_errors import one_line_parse_error
from lightning_custom.runtime.ranges import check_value
from tests.test_cli import quick_args as tiny_args

ROOT = Path(__file__).resolve().parents[1]


def run_expecting_one_error(capsys, args) -> str:
    """Run the CLI in-process; return its one error line (and check that it is the only one, with no usage dump)."""
    with pytest.raises(SystemExit) as excinfo:
        main(args)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not [line for line in err.splitlines() if line.startswith("usage:")], err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


BAD_VALUES = [
    (["--trainer.max_steps", "0"], "error: --trainer.max_steps: must be at least 1 (or -1 for no step limit), got 0"),
    (["--trainer.max_steps", "-5"], "error: --trainer.max_steps: must be at least 1 (or -1 for no step limit), got -5"),
    (["--dvar.max_steps", "0"], "error: --dvar.max_steps: must be at least 1"),
    (["--data.init_args.resolution", "17"],
     "error: --data.resolution: 17 is not a multiple of 2, the model's VAE downsampling factor; use e.g. 16 or 18"),
    (["--data.init_args.prompt_templates", "[]"], "error: --data.prompt_templates: give at least one template"),
    (["--data.init_args.prompt_templates", "['a {} beside a {}']"],
     "error: --data.prompt_templates: 'a {} beside a {}' must hold exactly one '{}'"),
    (["--data.init_args.prompt_templates", "['a photo of {name}']"], "error: --data.prompt_templates: 'a photo of"),
    (["--dvar.threshold", "nan"], "error: --dvar.threshold: Expected a float. Got value: nan"),
    (["--dvar.threshold", ".nan"], "error: --dvar.threshold: must be between 0 and 1 (the paper: 0.15), got nan"),
    (["--dvar.threshold", "1"], "error: --dvar.threshold: must be between 0 and 1 (the paper: 0.15), got 1.0"),
    (["--dvar.threshold", "2.5"], "error: --dvar.threshold: must be between 0 and 1"),
    (["--dvar.threshold", "0"], "error: --dvar.threshold: must be between 0 and 1"),
    (["--data.init_args.repeats", "many"], "error: --data.repeats: Expected a int. Got value: many"),
    (["--model.init_args.learning_rate", "-1"], "error: --model.learning_rate: must be above 0, got -1.0"),
    (["--model.init_args.adam_betas", "[0.9, 1.5]"], "error: --model.adam_betas: must be in [0, 1), got (0.9, 1.5)"),
    (["--data.init_args.eval_batch_size", "0"], "error: --data.eval_batch_size: must be at least 1, got 0"),
    (["--dvar.undertrained_below", "-0.1"], "error: --dvar.undertrained_below: must be in [0, 1) (0: never)"),
    (["--sample.num_inference_steps", "0"], "error: --sample.num_inference_steps: must be at least 1, got 0"),
    (["--cpu_threads", "0"], "error: --cpu_threads: must be at least 1, got 0"),
    (["--summary.output_dir", "/proc/nope"],
     "error: --summary.output_dir: cannot create /proc/nope: /proc is not writable; choose a folder you can write to"),
]


@pytest.mark.parametrize("extra,expected", BAD_VALUES, ids=[" ".join(extra) for extra, _ in BAD_VALUES])
def test_bad_value_is_one_line_and_writes_nothing(tmp_path, capsys, tiny_sd, concept_dir, single_thread, extra,
                                                  expected):
    root = tmp_path / "run"
    line = run_expecting_one_error(capsys, tiny_args(root, concept_dir, tiny_sd, *extra))
    assert line.startswith(expected), line
    assert not root.exists()


def test_output_locations_are_checked_before_training(tmp_path, capsys, tiny_sd, concept_dir, single_thread):
    (tmp_path / "file.txt").write_text("x")
    root = tmp_path / "run"
    line = run_expecting_one_error(capsys, tiny_args(tmp_path / "file.txt", concept_dir, tiny_sd))
    assert line == (f"error: --trainer.default_root_dir: {tmp_path / 'file.txt'} is a file, not a folder; "
                    "choose a folder")
    line = run_expecting_one_error(capsys, tiny_args(root, concept_dir, tiny_sd,
                                                     "--summary.output_dir", str(tmp_path / "file.txt" / "out")))
    assert line.startswith(f"error: --summary.output_dir: cannot create {tmp_path / 'file.txt' / 'out'}: ")
    assert not root.exists()
    class_cache = tmp_path / "file.txt" / "cache"
    line = run_expecting_one_error(capsys, tiny_args(root, concept_dir, tiny_sd,
                                                     "--data.init_args.class_cache_dir", str(class_cache)))
    assert line.startswith("error: --data.class_cache_dir: cannot create")
    assert not root.exists()


def test_an_unwritable_summary_folder_is_found_before_training(tmp_path, capsys, tiny_sd, concept_dir, single_thread,
                                                               monkeypatch):
    # Before: a PermissionError traceback after the whole run had trained, and the weights lost. Tests run as root,
    # whom file modes do not stop, so the folder is made unwritable for the check.
    locked = tmp_path / "readonly"
    locked.mkdir()
    monkeypatch.setattr(run_folder, "is_writable", lambda folder: folder != locked)
    root = tmp_path / "run"
    line = run_expecting_one_error(capsys, tiny_args(root, concept_dir, tiny_sd,
                                                     "--summary.output_dir", str(locked / "out")))
    assert line.startswith(f"error: --summary.output_dir: cannot create {locked / 'out'}: {locked} is not writable")
    assert not root.exists() and not list(locked.iterdir())


def test_a_window_longer_than_max_steps_warns_once(tmp_path, capsys, caplog, tiny_sd, concept_dir, single_thread):
    with caplog.at_level(logging.WARNING, logger="lightning_custom"):
        main(tiny_args(tmp_path, concept_dir, tiny_sd, "--trainer.max_steps", "10", "--dvar.window", "40"))
    warnings = [r.getMessage() for r in caplog.records if "can never fire" in r.getMessage()]
    assert warnings == ["DVAREarlyStopping: --dvar.window 40 is longer than max_steps 10: DVAR can never fire; "
                        "the run ends at max_steps"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_by"] == "max_steps" and summary["stop_step"] == 10
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_custom"):
        main(tiny_args(tmp_path, concept_dir, tiny_sd, "--trainer.max_steps", "10", "--dvar.window", "10"))
    assert not [r for r in caplog.records if "can never fire" in r.getMessage()]


def test_only_working_subcommands_are_listed(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code in (None, 0)
    out = capsys.readouterr().out
    assert "{fit,validate}" in out and "predict" not in out and "test" not in out.split("subcommands:")[1]
    # An unknown subcommand: one error line naming it, then the listing of those that work (issue 27, item 6)
    with pytest.raises(SystemExit) as excinfo:
        main(["test", "--config", str(ROOT / "configs" / "quickstart.yaml")])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[0].startswith("error: unknown subcommand 'test'")
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[0]]
    listed = [line.split()[0] for line in err.splitlines() if line.startswith("  ")]
    assert "fit" in listed and "test" not in listed and "predict" not in listed


def test_nested_parse_errors_name_the_inner_argument():
    message = (
        'Parser key "data":\n  Does not validate against any of the Union subtypes\n  Subtypes: [<class '
        "'lightning_custom.data.concept.ConceptDataModule'>, <class 'NoneType'>]\n  Errors:\n    - Problem with "
        "given class_path 'lightning_custom.data.ConceptDataModule':\n        Parser key \"resolution\":\n"
        "          Expected a <class 'int'>. Got value: abc\n    - Expected a <class 'NoneType'>\n"
    )
    assert one_line_parse_error(message) == "--data.resolution: Expected a int. Got value: abc (see --help)"


# ------------------------------------------------------------------------- every numeric argument has a range
def numeric_parameters(cls) -> dict[str, object]:
    """The ``__init__`` parameters of ``cls`` (and its bases) annotated with int or float (optional or not)."""
    found = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or not klass.__module__.startswith("lightning_custom"):  # Lightning's own check theirs
            continue
        hints = typing.get_type_hints(init)
        for name, param in inspect.signature(init).parameters.items():
            hint = hints.get(name)
            args = set(typing.get_args(hint)) - {type(None)} or {hint}
            inner = {a for t in args for a in (typing.get_args(t) or (t,))}  # tuple[float, float]
            if inner and inner <= {int, float} and param.default is not inspect.Parameter.empty:
                found[name] = param.default
    return found


# Numbers that may take any finite value: a mean on the logit scale (negative shifts the density to low noise).
UNBOUNDED = {"logit_mean"}


def checked_classes():
    from lightning_custom.callbacks import CLIPEarlyStopping, DVAREarlyStopping, FixedBudget, LiveReport, LiveSamples
    from lightning_custom.callbacks import StepCheckpoint
    from lightning_custom.data import ConceptDataModule
    from lightning_custom.methods import CustomDiffusion, DreamBooth, DreamBoothLoRA, TextualInversion

    return {
        "model": [TextualInversion, DreamBoothLoRA, CustomDiffusion, DreamBooth],
        "data": [ConceptDataModule],
        "dvar": [DVAREarlyStopping],
        "sample": [LiveSamples],
        "live_report": [LiveReport],
        "CLIPEarlyStopping": [CLIPEarlyStopping],
        "FixedBudget": [FixedBudget],
        "StepCheckpoint": [StepCheckpoint],
    }


def test_every_numeric_argument_has_a_range_that_admits_its_default():
    from lightning_custom.runtime.ranges import RANGES

    for group, classes in checked_classes().items():
        for cls in classes:
            numbers = numeric_parameters(cls)
            assert numbers, cls
            for name, default in numbers.items():
                if name in UNBOUNDED:
                    continue
                assert name in RANGES[group], f"{cls.__name__}.{name} has no range in lightning_custom.runtime.ranges"
                check_value(group, name, default)  # the default itself is valid


@pytest.mark.parametrize("group,name", [(g, n) for g, rules in __import__("lightning_custom.runtime.ranges", fromlist=[
    "RANGES"]).RANGES.items() for n in rules])
def test_each_range_refuses_values_outside_it_in_one_line(group, name):
    from lightning_custom.errors import UserInputError
    from lightning_custom.runtime.ranges import RANGES, argument_name

    rule = RANGES[group][name]
    bad = [float("nan")]
    if rule.low is not None:
        bad.append(rule.low if rule.low_open else rule.low - 1)
    if rule.high is not None:
        bad.append(rule.high if rule.high_open else rule.high + 1)
    if not rule.optional:
        bad.append(None)
    for value in bad:
        with pytest.raises(UserInputError) as refused:
            check_value(group, name, value)
        assert str(refused.value).startswith(f"{argument_name(group, name)}: must be ") and "\n" not in str(
            refused.value)


def test_the_classes_check_their_ranges_when_built(tiny_sd):
    from lightning_custom.callbacks import DVAREarlyStopping, LiveSamples
    from lightning_custom.data import ConceptDataModule
    from lightning_custom.errors import UserInputError
    from lightning_custom.methods import DreamBoothLoRA, TextualInversion

    cases = [
        (lambda: TextualInversion(pretrained_model_name_or_path="/no/such/model", learning_rate=-1.0),
         "--model.learning_rate: must be above 0"),  # refused before any weights load
        (lambda: DreamBoothLoRA(pretrained_model_name_or_path=tiny_sd, lora_dropout=1.0), "--model.lora_dropout"),
        (lambda: TextualInversion(pretrained_model_name_or_path=tiny_sd, num_vectors=0), "--model.num_vectors"),
        (lambda: ConceptDataModule(instance_data_dir="embedded", num_workers=-1), "--data.num_workers"),
        (lambda: DVAREarlyStopping(healthy_snapshot_max_mb=-1), "--dvar.healthy_snapshot_max_mb"),
        (lambda: LiveSamples(images_per_prompt=0), "--sample.images_per_prompt"),
    ]
    for build, needle in cases:
        with pytest.raises(UserInputError, match=needle.replace(".", r"\.")):
            build()


def test_a_window_of_fewer_than_four_values_warns_that_it_is_a_fixed_budget(tmp_path, caplog, tiny_sd, concept_dir,
                                                                            single_thread):
    """Table 1 v2's calibrated Textual Inversion setting (window 20, every 10) held 2 L_det values: its ratio falls
    below any threshold after a few evaluations, whatever the loss does (issue 25)."""
    with caplog.at_level(logging.WARNING, logger="lightning_custom"):
        main(tiny_args(tmp_path, concept_dir, tiny_sd, "--trainer.max_steps", "40", "--dvar.window", "20",
                       "--dvar.eval_every_n_steps", "10"))
    warned = [r.getMessage() for r in caplog.records if "fixed budget in disguise" in r.getMessage()]
    assert len(warned) == 1 and "holds 2 L_det values" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_custom"):
        main(tiny_args(tmp_path, concept_dir, tiny_sd, "--trainer.max_steps", "40", "--dvar.window", "20",
                       "--dvar.eval_every_n_steps", "5"))
    assert not [r for r in caplog.records if "fixed budget in disguise" in r.getMessage()]  # 4 values: fine
