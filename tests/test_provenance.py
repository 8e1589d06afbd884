"""summary.json pins the run down (model folder, weights fingerprint, seeds, concepts, versions), and config.yaml in
the run folder reproduces it: same stop step, identical weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lightning_custom.cli import main
from lightning_custom.runs.provenance import VERSIONED_PACKAGES, weights_fingerprint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


def fit_args(run: Path, model: str, concept_dir: str, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false", "--model.init_args.pretrained_model_name_or_path", model,
            "--data.init_args.instance_data_dir", concept_dir, "--data.init_args.resolution", "16",
            "--trainer.max_steps", "30", "--dvar.window", "10",
            "--dvar.undertrained_below", "0", *extra]  # the tiny random model: see tests.test_cli.quick_args


def test_weights_fingerprint_changes_with_the_weights(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.safetensors").write_bytes(b"a" * 1000)
    (tmp_path / "config.json").write_text("{}")  # not weights: ignored
    first = weights_fingerprint(tmp_path)
    assert first["files"] == 1 and first["bytes"] == 1000 and re.fullmatch(r"[0-9a-f]{16}", first["sha256"])
    (tmp_path / "config.json").write_text('{"changed": 1}')
    assert weights_fingerprint(tmp_path) == first
    (tmp_path / "unet" / "model.safetensors").write_bytes(b"a" * 999 + b"b")
    assert weights_fingerprint(tmp_path)["sha256"] != first["sha256"]


def test_summary_records_the_model_seeds_and_versions_and_config_yaml_reproduces_the_run(tmp_path, tiny_sd,
                                                                                          concept_dir):
    run, logs = tmp_path / "run", tmp_path / "logs"
    logger = json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(logs)}})
    main(fit_args(run, tiny_sd, concept_dir, "--trainer.logger", logger, "--seed_everything", "3",
                  # model and data seeds differ: the logger gets the data module's as "data_seed" (one "seed"
                  # from each refused the run)
                  "--model.init_args.seed", "7", "--data.init_args.seed", "8", "--data.init_args.eval_seed", "11",
                  "--data.init_args.class_noun", "star"))
    summary = json.loads((run / "summary.json").read_text())
    model = summary["model"]
    assert model["name_or_path"] == tiny_sd and model["resolved_path"] == str(Path(tiny_sd).resolve())
    assert model["revision"] is None and model["variant"] is None
    assert model["weights_fingerprint"] == weights_fingerprint(tiny_sd) and model["weights_fingerprint"]["files"] >= 3
    assert summary["seeds"] == {"model": 7, "eval": 11, "data": 8, "seed_everything": 3}
    logged = yaml.safe_load(next(logs.rglob("hparams.yaml")).read_text())
    assert logged["seed"] == 7 and logged["data_seed"] == 8
    assert summary["class_noun"] == "star" and "a photo of a {}" in summary["prompt_templates"]
    assert summary["concepts"] == [{"name": "concept", "placeholder_token": "<striped-star>", "class_noun": "star",
                                    "instance_data_dir": concept_dir}]
    assert summary["with_prior_preservation"] is False
    assert set(summary["versions"]) == set(VERSIONED_PACKAGES) and all(summary["versions"].values())
    # With a logger on, config.yaml is still written beside summary.json (and listed among the files).
    assert (run / "config.yaml").is_file() and "config.yaml" in summary.get("files", ["config.yaml"])
    assert list(logs.rglob("config.yaml")), "Lightning's own copy in the logger's folder stays"

    again = tmp_path / "again"
    main(["fit", "--config", str(run / "config.yaml"), "--trainer.default_root_dir", str(again)])
    repeated = json.loads((again / "summary.json").read_text())
    assert repeated["stop_step"] == summary["stop_step"] and repeated["seeds"] == summary["seeds"]
    assert repeated["dvar_history"] == summary["dvar_history"]
    first, second = load_file(run / "learned_embeds.safetensors"), load_file(again / "learned_embeds.safetensors")
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)


def test_embedded_alias_resolves_to_the_shipped_folder(tmp_path, concept_dir):
    from lightning_custom.families.components import embedded_model_path

    run = tmp_path / "run"
    main(fit_args(run, "embedded:tiny-sd", concept_dir, "--trainer.max_steps", "2"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pretrained_model_name_or_path"] == "embedded:tiny-sd"
    assert summary["model"]["resolved_path"] == str(Path(embedded_model_path("tiny-sd")).resolve())
    assert summary["model"]["weights_fingerprint"] == weights_fingerprint(embedded_model_path("tiny-sd"))
