"""Runs that did not work say so: a signal during the final export, a full disk, a run that barely trained, failure
exit codes, and a diverged run's exported weights (issue 23)."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.runs import summary as summary_module  # owns the summary.json write
from lightning_custom.runs.final_files import LAST_HEALTHY_FOLDER, TRAINED_WEIGHTS_FILE, UNWRITTEN_FOLDER
from lightning_custom.cli import main
from lightning_custom.data import ConceptDataModule
from lightning_custom.dvar.rule import UNDERTRAINED_RELATIVE_SPREAD, barely_moved, relative_spread
from lightning_custom.errors import FAILED_RUN_EXIT_CODES, FinalFilesNotWritten, exit_code_for
from lightning_custom.runtime.interrupts import StopSignals
from lightning_custom.methods import TextualInversion
from lightning_custom.dvar.replay import find_summaries, load_run, replay_stop_indices
from tests.conftest import data_kwargs, ti_kwargs, trainer_kwargs
from tests.test_cli import quick_args, run_cli
from tests.test_dvar_rule import ScriptedModule, decaying_series

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]
EMBEDS = "learned_embeds.safetensors"


def fit_ti(root, tiny_sd, concept_dir, callbacks=(), module=None, max_steps=200, **dvar):
    module = module or TextualInversion(**ti_kwargs(tiny_sd, learning_rate=0.02))
    dvar = DVAREarlyStopping(**{"window": 15, "threshold": 0.15, "eval_every_n_steps": 5, "verbose": False, **dvar})
    summary = RunSummary(report=False)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[dvar, summary, *callbacks], **trainer_kwargs(root))
    trainer.fit(module, datamodule=ConceptDataModule(**data_kwargs(concept_dir)))
    return trainer, module


def read(root):
    return json.loads((Path(root) / "summary.json").read_text())


# ------------------------------------------------------------------------------ a signal during the final export
class SignalDuringExport(TextualInversion):
    """Sends this process SIGTERM (or SIGINT) in the middle of writing its artifacts, as a scheduler would."""

    signal_name = "SIGTERM"

    def export_artifacts(self, output_dir):
        os.kill(os.getpid(), getattr(signal, self.signal_name))
        return super().export_artifacts(output_dir)


@pytest.mark.parametrize("signal_name,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_the_final_export_finishes_it_then_exits(tmp_path, tiny_sd, concept_dir, signal_name, code):
    straight, _ = fit_ti(tmp_path / "straight", tiny_sd, concept_dir)
    module = SignalDuringExport(**ti_kwargs(tiny_sd, learning_rate=0.02))
    module.signal_name = signal_name
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        fit_ti(tmp_path / "run", tiny_sd, concept_dir, module=module)
    assert stopped.value.code == code
    summary, expected = read(tmp_path / "run"), read(tmp_path / "straight")
    assert summary["stopped_by"] == "dvar" and summary["stop_step"] == expected["stop_step"]  # what really happened
    assert summary["artifacts"] == [EMBEDS] and "after training" in summary["signal_during_export"]
    weights, reference = load_file(tmp_path / "run" / EMBEDS), load_file(tmp_path / "straight" / EMBEDS)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.endswith(".tmp")]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


def test_a_sigterm_between_lightnings_teardown_and_on_fit_end_is_held(tmp_path, tiny_sd, concept_dir, monkeypatch):
    """The window the issue names: Lightning restores its handlers in _teardown, before on_fit_end writes the files."""
    original = L.Trainer._teardown
    sent = []

    def teardown_then_sigterm(self):
        original(self)
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # the default action here would kill the process

    monkeypatch.setattr(L.Trainer, "_teardown", teardown_then_sigterm)
    with pytest.raises(SystemExit) as stopped:
        fit_ti(tmp_path, tiny_sd, concept_dir)
    assert stopped.value.code == 143 and sent
    summary = read(tmp_path)
    assert summary["stopped_by"] == "dvar" and summary["artifacts"] == [EMBEDS] and (tmp_path / EMBEDS).is_file()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_cli_sigterm_during_export_exits_143_with_a_complete_final_set(tmp_path, tiny_sd, concept_dir):
    config = tmp_path / "signal.yaml"
    config.write_text("model:\n  class_path: tests.test_run_failures.SignalDuringExport\n")
    folder = tmp_path / "run"
    result = run_cli(*quick_args(folder, concept_dir, tiny_sd, "--dvar.window", "25", "--trainer.max_steps", "300",
                                 "--config", str(config)))
    assert result.returncode == 143, result.stderr[-2000:]
    summary = read(folder)
    assert summary["stopped_by"] == "dvar" and (folder / EMBEDS).is_file() and (folder / "report.png").is_file()
    assert "SIGTERM arrived while the final files were written" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- a full disk
def disk_full_at(name):
    real = summary_module.write_json

    def write_json(path, data):
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    return write_json


def test_a_full_disk_at_summary_json_keeps_the_exported_artifacts(tmp_path, tiny_sd, concept_dir, monkeypatch):
    monkeypatch.setattr(summary_module, "write_json", disk_full_at("summary.json"))
    with pytest.raises(FinalFilesNotWritten) as failed:
        fit_ti(tmp_path, tiny_sd, concept_dir)
    message = str(failed.value)
    kept = tmp_path / UNWRITTEN_FOLDER
    assert "\n" not in message and "No space left on device" in message and f"{kept}/ ({EMBEDS})" in message
    assert not (tmp_path / "summary.json").exists()
    monkeypatch.undo()
    fit_ti(tmp_path / "reference", tiny_sd, concept_dir)
    weights, reference = load_file(kept / EMBEDS), load_file(tmp_path / "reference" / EMBEDS)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)  # the trained weights, not the initial
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_export_keeps_the_trainable_weights(tmp_path, tiny_sd, concept_dir):
    class ExportFails(TextualInversion):
        def export_artifacts(self, output_dir):
            raise OSError(errno.ENOSPC, "No space left on device", str(output_dir / EMBEDS))

    module = ExportFails(**ti_kwargs(tiny_sd, learning_rate=0.02))
    with pytest.raises(FinalFilesNotWritten, match=f"kept in {tmp_path / TRAINED_WEIGHTS_FILE}"):
        fit_ti(tmp_path, tiny_sd, concept_dir, module=module)
    kept = load_file(tmp_path / TRAINED_WEIGHTS_FILE)
    assert torch.equal(kept["token_vectors.vectors"], module.token_vectors.vectors.detach())


def test_cli_full_disk_is_one_line_and_exit_74(tmp_path, tiny_sd, concept_dir, capsys, monkeypatch):
    monkeypatch.setattr(summary_module, "write_json", disk_full_at("summary.json"))
    with pytest.raises(SystemExit) as stopped:
        main(quick_args(tmp_path, concept_dir, tiny_sd, "--dvar.window", "25", "--trainer.max_steps", "300"))
    assert stopped.value.code == 74
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and f"{tmp_path / UNWRITTEN_FOLDER}/" in errors[0]


# --------------------------------------------------------------------------------- undertrained, not converged
def test_barely_moved_tells_a_slow_drift_from_a_converged_series():
    drift = [0.0606 - 1e-7 * i for i in range(20)]  # the quickstart at learning rate 1e-5: 0.11% in 100 steps
    converged = decaying_series(40, noise=0.0)
    assert relative_spread(drift) < UNDERTRAINED_RELATIVE_SPREAD and "moved by only" in barely_moved(drift)
    assert barely_moved(converged) is None and barely_moved(drift, min_spread=1e-5) is None
    assert barely_moved([1.0]) is None


def test_a_run_at_a_far_too_small_learning_rate_is_undertrained_and_exits_6(tmp_path, tiny_sd, concept_dir, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(quick_args(tmp_path, concept_dir, tiny_sd, "--model.init_args.learning_rate", "1e-6",
                        "--trainer.max_steps", "300", "--dvar.undertrained_below", "0.002"))
    assert stopped.value.code == 6
    summary = read(tmp_path)
    assert summary["stopped_by"] == "undertrained" and summary["stop_step"] < 300
    assert "Raise the learning rate" in summary["stop_reason"]
    assert summary["artifacts"] == [EMBEDS]  # sound weights, barely trained: kept, and the reason says so


def test_the_undertrained_guard_never_fires_on_a_committed_study_run():
    """Every committed run of the studies, replayed at its own DVAR setting: L_det always moved far more."""
    spreads = []
    for file in find_summaries([ROOT / "benchmarks" / "results"]):
        try:
            run = load_run(file)
        except ValueError:
            continue
        window, threshold = run.live.get("dvar_window"), run.live.get("dvar_threshold")
        if not window or not threshold:
            continue
        from lightning_custom.dvar.rule import window_in_values

        values = [[v for _, v in points] for points in run.series.values()]
        index = replay_stop_indices(values, window_in_values(int(window), run.eval_every_n_steps), [threshold])[0]
        if index is not None:
            spreads.append(min(relative_spread(v[: index + 1]) for v in values))
    assert len(spreads) >= 190
    assert min(spreads) > 10 * UNDERTRAINED_RELATIVE_SPREAD


# ------------------------------------------------------------------------------------------------ exit codes
def test_failed_runs_have_distinct_non_zero_exit_codes():
    assert {exit_code_for(k) for k in ("dvar", "max_steps", "max_time", "fixed_budget", None)} == {0}
    codes = [exit_code_for(k) for k in ("diverged", "non_finite", "not_training", "undertrained")]
    assert len(set(codes)) == 4 and 0 not in codes and 2 not in codes and set(codes) == set(
        FAILED_RUN_EXIT_CODES.values())


def test_help_documents_the_exit_status():
    result = run_cli("fit", "--help")
    text = " ".join(result.stdout.split())
    assert "Exit status: 0 finished" in text and "3 diverged" in text and "6 undertrained" in text


# ----------------------------------------------------------------------------- a diverged run's exported weights
class Explode(Callback):
    """Multiplies the trainable weights by 1e4 after a step (a learning rate that blows up), and records the
    weights at every evaluation."""

    def __init__(self, step):
        self.step, self.at_evaluation = step, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.token_vectors.vectors.mul_(1e4)

    def on_validation_end(self, trainer, pl_module):
        self.at_evaluation[trainer.global_step] = pl_module.token_vectors.vectors.detach().clone()


def test_a_diverged_run_exports_its_last_healthy_weights_only(tmp_path, tiny_sd, concept_dir):
    explode = Explode(12)
    trainer, module = fit_ti(tmp_path, tiny_sd, concept_dir, callbacks=[explode])
    summary = read(tmp_path)
    assert summary["stopped_by"] == "diverged" and summary["stop_step"] == 15
    assert not (tmp_path / EMBEDS).exists()  # never the exploded weights under the usual name
    assert summary["artifacts"] == [f"{LAST_HEALTHY_FOLDER}/{EMBEDS}"] and summary["artifacts_step"] == 10
    assert "last healthy evaluation, step 10" in summary["stop_reason"]
    exported = load_file(tmp_path / LAST_HEALTHY_FOLDER / EMBEDS)
    assert torch.equal(exported["<cat-toy>"], explode.at_evaluation[10])
    assert not torch.equal(explode.at_evaluation[15], explode.at_evaluation[10])


def test_a_run_that_diverges_at_its_first_evaluation_exports_nothing(tmp_path, tiny_sd, concept_dir):
    fit_ti(tmp_path, tiny_sd, concept_dir, callbacks=[Explode(2)])
    summary = read(tmp_path)
    assert summary["stopped_by"] == "diverged" and summary["artifacts"] == []
    assert "no evaluation before it was healthy" in summary["artifacts_withheld"]
    assert not (tmp_path / LAST_HEALTHY_FOLDER).exists() and not (tmp_path / EMBEDS).exists()


def test_healthy_snapshots_resume_with_the_run(tmp_path, tiny_sd, concept_dir):
    callback = DVAREarlyStopping(healthy_snapshot_max_mb=0)
    module = TextualInversion(**ti_kwargs(tiny_sd))
    callback.healthy_weights.keep(module, 5)
    assert callback.healthy_weights.tensors is None and "larger than" in callback.healthy_weights.why_none()
    kept = DVAREarlyStopping()
    kept.healthy_weights.keep(module, 5)
    restored = DVAREarlyStopping()
    restored.load_state_dict(kept.state_dict())
    assert restored.healthy_weights.step == 5
    assert torch.equal(restored.healthy_weights.tensors["token_vectors.vectors"], module.token_vectors.vectors.detach())


# ---------------------------------------------------------------------------- tests that bite (item 8 mutants)
class InfModule(ScriptedModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.global_step + 1 >= 6 else loss


def test_an_infinite_training_loss_stops_as_non_finite(tmp_path):
    callback = DVAREarlyStopping(window=30, threshold=0.15, eval_every_n_steps=5, verbose=False)
    trainer = L.Trainer(max_steps=400, callbacks=[callback], **trainer_kwargs(tmp_path))
    trainer.fit(InfModule({"dvar_loss": decaying_series(400)}, every=5))
    assert callback.stopped_by == "non_finite" and callback.first_non_finite_step == 6 and callback.stop_step == 10


def test_not_training_waits_for_min_steps(tmp_path):
    callback = DVAREarlyStopping(window=5, threshold=0.15, min_steps=20, verbose=False)
    trainer = L.Trainer(max_steps=400, callbacks=[callback], **trainer_kwargs(tmp_path))
    trainer.fit(ScriptedModule({"dvar_loss": [0.06] * 400}))
    assert callback.stopped_by == "not_training" and callback.stop_step == 20


def test_leftover_staging_folders_are_removed_at_the_next_fit(tmp_path, tiny_sd, concept_dir):
    left = [tmp_path / ".final.abc123.tmp", tmp_path / "checkpoints" / ".interrupted.ckpt.tmp"]
    for path in left:
        path.mkdir(parents=True)
        (path / "half-written").write_text("x")
    fit_ti(tmp_path, tiny_sd, concept_dir)
    assert not any(path.exists() for path in left) and read(tmp_path)["stopped_by"] == "dvar"


def test_the_training_loss_history_is_averaged_over_ranks():
    """Under DDP each rank records its own loss; read_losses all-reduces them with the mean, in one call."""
    other_rank = torch.tensor([3.0, 5.0])
    calls = []

    def reduce(values, reduce_op):
        calls.append(reduce_op)
        return (values + other_rank) / 2 if reduce_op == "mean" else values + other_rank

    callback = RunSummary()
    callback._reduce = reduce
    callback._step_losses = [(1, torch.tensor(1.0)), (2, torch.tensor(2.0))]
    callback.read_losses()
    assert callback.train_loss_history == [[1, 2.0], [2, 3.5]] and calls == ["mean"]


def test_stop_signals_agree_across_ranks_on_the_most_severe_signal():
    class Ranks:
        def __init__(self, other):
            self.other, self.root_device = other, torch.device("cpu")

        def reduce(self, tensor, reduce_op):
            assert reduce_op == "max"
            return torch.maximum(tensor, torch.tensor(self.other))

    signals = StopSignals()
    assert signals.agree(SimpleNamespace(world_size=2, strategy=Ranks(0))) is None
    assert signals.agree(SimpleNamespace(world_size=2, strategy=Ranks(1))) == "SIGTERM"  # another rank got it
    assert signals.pending == "SIGTERM"
    assert signals.agree(SimpleNamespace(world_size=2, strategy=Ranks(2))) == "Ctrl-C"
    lone = StopSignals()
    lone.pending = "SIGTERM"
    assert lone.agree(SimpleNamespace(world_size=1, strategy=None)) == "SIGTERM"


class SignalWhileSettingUp(TextualInversion):
    """Gets SIGTERM while the fit sets the model up (after the callbacks' setup, before training)."""

    def configure_model(self):
        super().configure_model()
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_while_the_fit_sets_up_stops_after_the_first_step_with_a_checkpoint(tmp_path, tiny_sd,
                                                                                       concept_dir):
    module = SignalWhileSettingUp(**ti_kwargs(tiny_sd, learning_rate=0.02))
    with pytest.raises(SystemExit) as stopped:
        fit_ti(tmp_path, tiny_sd, concept_dir, module=module)
    assert stopped.value.code == 143
    summary = read(tmp_path)
    assert summary["stopped_by"] == "interrupted" and summary["stop_step"] == 1
    assert (tmp_path / "checkpoints" / "interrupted.ckpt").is_file()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
