"""The README's support table: every method fits through the CLI and stops by DVAR on each model family.

SD 1.x is the tiny epsilon model of the other test files; SD 2.x is the tiny v-prediction model (``tiny_sd_v``) with
the SD configs; SDXL is the tiny SDXL model with the ``configs/sdxl`` configs. Every cell of the table names a test,
and :func:`test_every_support_table_cell_names_an_existing_test` checks that the test exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from lightning_custom.cli import main
from tests.conftest import RESOLUTION, one_thread

ROOT = Path(__file__).resolve().parents[1]
# Tiny-model overrides per method: learning rates that move the tiny models within a few dozen steps.
METHODS = {
    "textual_inversion": {"learning_rate": 5e-2, "initializer_token": "toy"},
    "dreambooth_lora": {"learning_rate": 1e-2, "initializer_token": "toy", "train_text_encoder": True},
    "dreambooth": {"learning_rate": 1e-3, "gradient_checkpointing": False},  # prior preservation: generated images
    "custom_diffusion": {"learning_rate": 1e-3, "initializer_token": "toy"},  # prior preservation: a class folder
}
FAMILIES = {"sd2": ("tiny_sd_v", "configs/{}.yaml", "v_prediction"),
            "sdxl": ("tiny_sdxl", "configs/sdxl/{}.yaml", "epsilon")}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_fits_through_the_cli_and_stops_by_dvar(family, method, concept_dir, tmp_path, request):
    """The shipped config of the method and family, with the tiny model and short DVAR settings."""
    fixture, config_path, prediction_type = FAMILIES[family]
    model_path = request.getfixturevalue(fixture)
    config = yaml.safe_load((ROOT / config_path.format(method)).read_text())
    config["trainer"].update(accelerator="cpu", precision="32-true", max_steps=120, default_root_dir=str(tmp_path),
                             enable_checkpointing=False, logger=False, enable_progress_bar=False,
                             enable_model_summary=False)
    config["model"]["init_args"].update(pretrained_model_name_or_path=model_path, weight_dtype="float32",
                                        **METHODS[method])
    config["data"]["init_args"].update(instance_data_dir=concept_dir, resolution=RESOLUTION, class_noun="toy",
                                       class_cache_dir=str(tmp_path / "class_cache"), num_class_images=2,
                                       class_inference_steps=2)
    if method == "custom_diffusion":
        config["data"]["init_args"]["class_data_dir"] = concept_dir
    # undertrained_below 0: the tiny random models' L_det barely moves (see tests.test_cli.quick_args)
    config["dvar"] = {"window": 12, "threshold": 0.3, "undertrained_below": 0}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with one_thread():
        cli = main(["fit", "--config", str(path)])
    assert cli.model.prediction_type == prediction_type and cli.model.is_sdxl == (family == "sdxl")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_by"] == "dvar" and summary["stop_step"] < 120, summary["stop_reason"]
    assert summary["model_family"] == ("sdxl" if family == "sdxl" else "sd")
    for artifact in summary["artifacts"]:
        assert (tmp_path / artifact).exists()
    if config["data"]["init_args"].get("with_prior_preservation") and method == "dreambooth":
        assert len(list((tmp_path / "class_cache").rglob("*.png"))) == 2  # generated with the family's pipeline


def test_every_support_table_cell_names_an_existing_test():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| method | SD 1.x | SD 2.x | SDXL | FLUX.1 | SD3.5 | Z-Image | FLUX.2 [klein] | "
                                "Qwen-Image |"):].split("\n\n")[0]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert len(rows) == 4
    sources = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert len(cells) == 8
        for cell in cells:
            names = re.findall(r"`(test_\w+\.py)::(test_\w+)(?:\[[^\]]*\])?`", cell)
            assert names, f"untested cell: {row}"
            for file, test in names:
                assert f"def {test}(" in sources.get(file, ""), f"{file}::{test}"
