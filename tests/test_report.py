"""The run report: report.png beside summary.json, steps and seconds saved, the ratio on the progress bar."""

from __future__ import annotations

import json

import lightning as L
import pytest
from PIL import Image

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.dvar.report import dvar_ratios, write_report
from tests.conftest import trainer_kwargs
from tests.test_dvar_rule import ScriptedModule, decaying_series

pytestmark = pytest.mark.usefixtures("single_thread")


class LoggingModule(ScriptedModule):
    """The scripted DVAR module, also showing its training loss on the progress bar like the real methods."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, prog_bar=True, batch_size=1)
        return loss

    def export_artifacts(self, output_dir):
        return []


def test_report_png_has_the_expected_size(tmp_path):
    history = [[i + 1, v] for i, v in enumerate(decaying_series(120))]
    summary = {"method": "TextualInversion", "stop_step": 90, "max_steps": 200, "stopped_by": "dvar",
               "dvar_window": 20, "dvar_threshold": 0.15, "dvar_eval_every_n_steps": 1, "dvar_history": history,
               "train_loss_history": [[s, v + 0.1] for s, v in history], "steps_saved": 110, "seconds_saved": 5.5,
               "seconds_per_step": 0.05}
    write_report(summary, tmp_path / "report.png")
    assert Image.open(tmp_path / "report.png").size == (800, 800)
    assert not list(tmp_path.glob(".*.tmp"))
    # no history at all still draws (e.g. a run stopped before the first evaluation)
    write_report({"stop_step": 0, "max_steps": 10}, tmp_path / "empty.png")
    assert Image.open(tmp_path / "empty.png").size == (800, 800)


def test_ratios_are_the_live_callbacks(tmp_path):
    dvar = DVAREarlyStopping(window=25, threshold=0.1, eval_every_n_steps=2, verbose=False)
    trainer = L.Trainer(max_steps=300, callbacks=[dvar, RunSummary(export=False)], **trainer_kwargs(tmp_path))
    trainer.fit(LoggingModule({"dvar_loss": decaying_series(200)}, every=2))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert dvar_ratios(summary) == dvar.ratios["dvar_loss"]  # bit-identical, recomputed from the summary


def test_every_fit_writes_report_and_savings(tmp_path, capfd):
    dvar = DVAREarlyStopping(window=20, threshold=0.15, verbose=False)
    trainer = L.Trainer(max_steps=150, callbacks=[dvar, RunSummary(export=False)],
                        **trainer_kwargs(tmp_path, enable_progress_bar=True))
    trainer.fit(LoggingModule({"dvar_loss": decaying_series(150)}))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_by"] == "dvar" and summary["stop_step"] < 150
    assert summary["steps_saved"] == 150 - summary["stop_step"]
    assert summary["seconds_per_step"] == pytest.approx(summary["wall_seconds"] / summary["stop_step"], rel=0.05)
    assert summary["seconds_saved"] == pytest.approx(summary["steps_saved"] * summary["seconds_per_step"], abs=1e-3)
    assert Image.open(tmp_path / "report.png").size == (800, 800)
    # the live progress bar shows the current ratio next to the loss
    assert {"dvar_ratio", "train_loss"} <= trainer.progress_bar_metrics.keys()
    captured = capfd.readouterr()
    bar = captured.out + captured.err  # Rich (stdout) or TQDM (stderr), whichever is installed
    assert "dvar_ratio" in bar and "train_loss" in bar


def test_a_failing_plot_does_not_fail_the_run(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no backend")

    monkeypatch.setattr("lightning_custom.dvar.report.write_report", broken)
    trainer = L.Trainer(max_steps=5, callbacks=[DVAREarlyStopping(window=50), RunSummary(export=False)],
                        **trainer_kwargs(tmp_path))
    trainer.fit(LoggingModule({"dvar_loss": decaying_series(10)}))
    assert (tmp_path / "summary.json").exists() and not (tmp_path / "report.png").exists()
    assert "could not draw report.png: no backend" in caplog.text


def test_report_spells_out_a_stop_that_is_not_convergence(tmp_path):
    from lightning_custom.dvar.report import report_figure

    history = [[5 * (i + 1), 0.064 + 0.003 * (1 - 0.5 ** i)] for i in range(40)]
    reason = "Diverged: the variance ratio is below 0.15 but dvar_loss: L_det's last window averages 0.067"
    summary = {"method": "TextualInversion", "stop_step": 200, "max_steps": 1000, "stopped_by": "diverged",
               "stop_reason": reason, "dvar_window": 40, "dvar_threshold": 0.15, "dvar_eval_every_n_steps": 5,
               "dvar_history": history, "train_loss_history": [[1, 0.1], [2, None], [3, 0.2]]}
    figure = report_figure(summary)
    title = figure._suptitle.get_text()
    assert "by diverged" in title and "L_det's last window averages 0.067" in title.replace("\n", " ")
    labels = [line.get_label() for line in figure.axes[1].lines]
    assert "L_det at the start" in labels
    write_report(summary, tmp_path / "report.png")  # a null (non-finite) loss in the summary still draws
    assert Image.open(tmp_path / "report.png").size == (800, 800)
