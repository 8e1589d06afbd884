"""Every bad value ends in one ``error: --the.argument: ...`` line with exit status 2, before anything is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lightning_custom import run_folder
from lightning_custom.cli import main, one_line_parse_error
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
    line = run_expecting_one_error(capsys, ["test", "--config", str(ROOT / "configs" / "quickstart.yaml")])
    assert "invalid choice: 'test'" in line or "'test'" in line, line


def test_nested_parse_errors_name_the_inner_argument():
    message = (
        'Parser key "data":\n  Does not validate against any of the Union subtypes\n  Subtypes: [<class '
        "'lightning_custom.data.concept.ConceptDataModule'>, <class 'NoneType'>]\n  Errors:\n    - Problem with "
        "given class_path 'lightning_custom.data.ConceptDataModule':\n        Parser key \"resolution\":\n"
        "          Expected a <class 'int'>. Got value: abc\n    - Expected a <class 'NoneType'>\n"
    )
    assert one_line_parse_error(message) == "--data.resolution: Expected a int. Got value: abc (see --help)"
