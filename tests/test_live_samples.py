"""Watching a run: sample grids every N steps (same seeds, logged, one at the stop, training untouched) and
report.png redrawn at evaluations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.callbacks.live_samples import SAMPLES_CSV, SAMPLES_FOLDER, LiveReport, LiveSamples
from lightning_custom.cli import main
from lightning_custom.data import ConceptDataModule
from lightning_custom.methods import TextualInversion
from tests.conftest import data_kwargs, ti_kwargs, trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")
MAX_STEPS = 12


def fit(root: Path, tiny_sd: str, concept_dir: str, *callbacks, logger=False, report=False) -> L.Trainer:
    dvar = DVAREarlyStopping(window=10, threshold=0.15, stop=False, eval_every_n_steps=5, verbose=False)
    trainer = L.Trainer(max_steps=MAX_STEPS, callbacks=[dvar, RunSummary(report=report), *callbacks],
                        **trainer_kwargs(root, logger=logger))
    trainer.fit(TextualInversion(**ti_kwargs(tiny_sd)), datamodule=ConceptDataModule(**data_kwargs(concept_dir)))
    return trainer


def test_grids_every_n_steps_and_at_the_stop_without_changing_training(tmp_path, tiny_sd, concept_dir):
    samples = LiveSamples(every_n_steps=5, prompts=["a photo of {}", "{} in the snow"], images_per_prompt=2,
                          num_inference_steps=2)
    trainer = fit(tmp_path / "sampled", tiny_sd, concept_dir, samples, logger=CSVLogger(tmp_path / "logs"))
    assert samples.sampled_steps == [5, 10, MAX_STEPS]  # every 5 steps, and the stop
    folder = tmp_path / "sampled" / SAMPLES_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["step_000005.png", "step_000010.png", "step_000012.png"]
    with open(Path(trainer.logger.log_dir) / SAMPLES_CSV) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [5, 10, 12] and Path(rows[0]["path"]).name == "step_000005.png"
    summary = json.loads((tmp_path / "sampled" / "summary.json").read_text())
    assert [g["step"] for g in summary["live_samples"]["grids"]] == [5, 10, 12]
    assert summary["live_samples"]["seconds"] > 0
    grids = [f"{SAMPLES_FOLDER}/step_0000{n}.png" for n in ("05", "10", "12")]
    assert [name for name in summary["files"] if name.startswith(SAMPLES_FOLDER)] == grids  # the run's files

    # The same seeds every time: drawing the last grid again gives the same pixels.
    last = (folder / "step_000012.png").read_bytes()
    samples.grids.pop()
    samples.sample(trainer, trainer.lightning_module)
    assert (folder / "step_000012.png").read_bytes() == last

    # Sampling does not touch the training RNG: the learned embedding equals a run without samples.
    fit(tmp_path / "plain", tiny_sd, concept_dir)
    sampled = load_file(tmp_path / "sampled" / "learned_embeds.safetensors")
    plain = load_file(tmp_path / "plain" / "learned_embeds.safetensors")
    assert all((sampled[k] == plain[k]).all() for k in plain)


def test_the_live_callbacks_are_exported_with_the_others():
    import lightning_custom.callbacks as callbacks

    assert callbacks.LiveSamples is LiveSamples and callbacks.LiveReport is LiveReport
    assert {"LiveSamples", "LiveReport"} <= set(callbacks.__all__)


def test_tensorboard_gets_the_grid(tmp_path, tiny_sd, concept_dir):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path / "tb")
    fit(tmp_path / "run", tiny_sd, concept_dir, LiveSamples(every_n_steps=10, images_per_prompt=1,
                                                            num_inference_steps=1), logger=logger)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [10, MAX_STEPS]


def test_report_is_redrawn_during_the_run(tmp_path, tiny_sd, concept_dir):
    report = LiveReport(every_n_seconds=1e-6)
    drawn = []
    draw = report.draw
    report.draw = lambda trainer, module, path: drawn.append((trainer.global_step, draw(trainer, module, path).stat()))
    fit(tmp_path / "run", tiny_sd, concept_dir, report, report=True)
    assert [step for step, _ in drawn] == [5, 10]  # at each evaluation while training
    assert all(stat.st_size > 10_000 for _, stat in drawn)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["live_report"]["drawings"] == 2 and "report.png" in summary.get("files", ["report.png"])

    # RunSummary(report=False) means no report at all, also not during training
    quiet = LiveReport(every_n_seconds=1e-6)
    fit(tmp_path / "quiet", tiny_sd, concept_dir, quiet)
    assert quiet.drawings == 0 and not (tmp_path / "quiet" / "report.png").exists()


def test_cli_has_sampling_off_in_the_quickstart_and_on_in_the_real_configs(capsys):
    def printed(config: str) -> str:
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(ROOT / "configs" / config), "--print_config"])
        out = capsys.readouterr().out
        return out[out.index("\nsample:"):].split("\n\n")[0]

    assert "every_n_steps: 0" in printed("quickstart.yaml")
    for config in ("textual_inversion.yaml", "dreambooth_lora.yaml", "custom_diffusion.yaml", "dreambooth.yaml"):
        assert "every_n_steps: 200" in printed(config)
