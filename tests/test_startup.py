"""--help, an unknown subcommand and the summary-reading commands start without the model stack (issue 27, item
10): they import neither torch, Lightning nor diffusers (5-13 s on a busy 2-core machine before)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "diffusers", "transformers")


def imported_modules(args: list[str], cwd: Path) -> tuple[set[str], int]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "lightning_custom", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    names = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return names, result.returncode


@pytest.mark.parametrize("args", [["--help"], [], ["fitt"], ["gather", "RUN"], ["replay", "--help"],
                                  ["calibrate", "--help"], ["gather", "/no/such/folder"]])
def test_light_commands_import_no_model_stack(args, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"method": "TextualInversion", "stopped_by": "dvar",
                                                  "stop_step": 70, "placeholder_token": "<s>"}))
    names, code = imported_modules([str(run) if a == "RUN" else a for a in args], tmp_path)
    assert "lightning_custom" in names
    assert not {n for n in names if n.split(".")[0] in HEAVY}, sorted(n for n in names if n.split(".")[0] in HEAVY)[:5]
    assert code == (0 if args[:1] in (["--help"], ["gather"], ["replay"], ["calibrate"]) and "/no/such/folder"
                    not in args else 2)


def test_the_package_still_exports_its_classes_on_first_use():
    import lightning_custom

    assert lightning_custom.TextualInversion.__name__ == "TextualInversion"
    assert "DVAREarlyStopping" in dir(lightning_custom)
    with pytest.raises(AttributeError):
        lightning_custom.NoSuchName  # noqa: B018


def test_the_console_script_takes_the_light_path_and_names_itself():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lightning-custom": "lightning_custom.__main__:main"}
    result = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = '/venv/bin/lightning-custom'; "
                             "from lightning_custom.__main__ import main; main()"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("usage: lightning-custom <subcommand>")
