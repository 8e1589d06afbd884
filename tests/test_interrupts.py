"""SIGTERM (what SLURM sends before it kills a job) and Ctrl-C: a resumable checkpoint, a summary that says so, a
non-zero exit; resuming from that checkpoint ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.cli import main
from lightning_custom.data import ConceptDataModule
from lightning_custom.methods import TextualInversion
from tests.conftest import data_kwargs, ti_kwargs, trainer_kwargs
from tests.test_cli import quick_args, run_cli

pytestmark = pytest.mark.usefixtures("single_thread")
# Short enough for a test, long enough that DVAR stops well before max_steps.
RUN = ("--dvar.window", "25", "--trainer.max_steps", "300")


class SignalAtStep(Callback):
    """Sends this process a signal once the given optimizer step has trained, as SLURM (or Ctrl-C) would."""

    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step, self.signal_name, self.sent = step, signal_name, False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal_name))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_sd, concept_dir):
    """An uninterrupted run's folder and summary."""
    folder = tmp_path_factory.mktemp("straight")
    main(quick_args(folder, concept_dir, tiny_sd, *RUN))
    return folder, json.loads((folder / "summary.json").read_text())


def interrupt(tmp_path, tiny_sd, concept_dir, step, signal_name):
    signal_config = tmp_path / "signal.yaml"
    signal_config.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.test_interrupts.SignalAtStep\n"
        f"      init_args: {{step: {step}, signal_name: {signal_name}}}\n"
    )
    folder = tmp_path / "run"
    return folder, run_cli(*quick_args(folder, concept_dir, tiny_sd, *RUN, "--config", str(signal_config)))


@pytest.mark.parametrize("step,signal_name,exit_code", [
    pytest.param(12, "SIGTERM", 143, marks=pytest.mark.slow),  # between two DVAR evaluations (every 5 steps)
    pytest.param(15, "SIGTERM", 143, marks=pytest.mark.slow),  # right after an evaluation
    pytest.param(12, "SIGINT", 130, marks=pytest.mark.slow),  # Ctrl-C: also stops after the step
], ids=["sigterm-mid-window", "sigterm-at-evaluation", "sigint"])
def test_interrupted_run_saves_resumable_state_and_resumes_exactly(tmp_path, tiny_sd, concept_dir, straight, step,
                                                                     signal_name, exit_code):
    straight_folder, expected = straight
    assert expected["stopped_by"] == "dvar" and expected["stop_step"] > step

    folder, result = interrupt(tmp_path, tiny_sd, concept_dir, step, signal_name)
    assert result.returncode == exit_code, result.stderr[-3000:]
    summary = json.loads((folder / "summary.json").read_text())
    checkpoint = folder / "checkpoints" / "interrupted.ckpt"
    assert summary["stopped_by"] == "interrupted" and summary["stop_step"] == step
    assert summary["resume_checkpoint"] == str(checkpoint) and checkpoint.is_file()
    assert f"--ckpt_path {checkpoint}" in summary["stop_reason"]
    assert f"--ckpt_path {checkpoint}" in result.stderr  # said where it is, not only in the file
    assert summary["artifacts"] == [] and not (folder / "learned_embeds.safetensors").exists()
    assert [s for s, _ in summary["train_loss_history"]] == list(range(1, step + 1))  # stopped after the step
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    state = torch.load(checkpoint, weights_only=False)
    assert state["global_step"] == step
    assert any(key.startswith("DVAREarlyStopping") for key in state["callbacks"])

    resumed = run_cli(*quick_args(folder, concept_dir, tiny_sd, *RUN, "--ckpt_path", str(checkpoint)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["stopped_by"] == "dvar" and summary["stop_step"] == expected["stop_step"]
    assert summary["dvar_history"] == expected["dvar_history"]
    assert summary["resumed_from"] == str(checkpoint) and summary["resumed_at_step"] == step
    assert f"resumed from {checkpoint} at step {step}" in summary["stop_reason"]
    assert [s for s, _ in summary["train_loss_history"]] == list(range(1, expected["stop_step"] + 1))
    weights = load_file(folder / "learned_embeds.safetensors")
    expected_weights = load_file(straight_folder / "learned_embeds.safetensors")
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights)


def fit(root, tiny_sd, concept_dir, callbacks=(), ckpt_path=None):
    module = TextualInversion(**ti_kwargs(tiny_sd, learning_rate=0.02))
    dvar = DVAREarlyStopping(window=15, threshold=0.15, eval_every_n_steps=3, verbose=False)
    trainer = L.Trainer(max_steps=200, callbacks=[dvar, RunSummary(report=False), *callbacks],
                        **trainer_kwargs(root))
    trainer.fit(module, datamodule=ConceptDataModule(**data_kwargs(concept_dir)), ckpt_path=ckpt_path)
    return json.loads((root / "summary.json").read_text())


def test_sigterm_in_process_exits_143_with_a_checkpoint_and_resumes_to_the_same_stop(tmp_path, tiny_sd, concept_dir):
    expected = fit(tmp_path / "straight", tiny_sd, concept_dir)
    assert expected["stopped_by"] == "dvar" and expected["stop_step"] > 7
    with pytest.raises(SystemExit) as stopped:  # Lightning's SIGTERMException
        fit(tmp_path / "run", tiny_sd, concept_dir, [SignalAtStep(7)])
    assert stopped.value.code == 143
    checkpoint = tmp_path / "run" / "checkpoints" / "interrupted.ckpt"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_by"] == "interrupted" and summary["stop_step"] == 7
    assert summary["resume_checkpoint"] == str(checkpoint) and checkpoint.is_file()
    assert summary["stop_reason"].startswith("Interrupted by SIGTERM at step 7")
    assert summary["steps_saved"] is None and summary["artifacts"] == []  # paused, not finished
    assert summary["files"] == ["checkpoints/interrupted.ckpt", "summary.json"]
    left = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name != ".lock")  # .lock: the run folder's lock
    assert left == ["checkpoints", "summary.json"]
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)  # Lightning restored the handler
    resumed = fit(tmp_path / "run", tiny_sd, concept_dir, ckpt_path=str(checkpoint))
    assert resumed["stop_step"] == expected["stop_step"] and resumed["stopped_by"] == "dvar"
    assert resumed["dvar_history"] == expected["dvar_history"]
    assert resumed["resumed_from"] == str(checkpoint) and resumed["resumed_at_step"] == 7
    assert resumed["files"] == ["checkpoints/interrupted.ckpt", "learned_embeds.safetensors", "summary.json"]


def test_an_interrupted_cli_fit_releases_its_run_folders_in_process(tmp_path, tiny_sd, concept_dir):
    """The CLI locks --trainer.default_root_dir and --summary.output_dir; a fit ended by an exception skips
    LightningCLI's after_fit, and the folders must still be released (no .lock left, a second fit not refused)."""
    signal_config = tmp_path / "signal.yaml"
    signal_config.write_text("trainer:\n  callbacks:\n    - class_path: tests.test_interrupts.SignalAtStep\n"
                             "      init_args: {step: 3}\n")
    root, out = tmp_path / "root", tmp_path / "out"
    args = quick_args(root, concept_dir, tiny_sd, "--trainer.max_steps", "6", "--summary.output_dir", str(out))
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--config", str(signal_config)])
    assert stopped.value.code == 143
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == "interrupted"
    assert not (root / ".lock").exists() and not (out / ".lock").exists()
    main([*args, "--ckpt_path", str(out / "checkpoints" / "interrupted.ckpt")])  # same process, same folders
    assert json.loads((out / "summary.json").read_text())["stop_step"] == 6
    assert not (root / ".lock").exists() and not (out / ".lock").exists()


def test_first_ctrl_c_stops_after_the_step_and_exits_130(tmp_path, tiny_sd, concept_dir):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path, tiny_sd, concept_dir, [SignalAtStep(4, "SIGINT")])
    assert stopped.value.code == 130
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_by"] == "interrupted" and summary["stop_step"] == 4
    assert summary["stop_reason"].startswith("Interrupted by Ctrl-C (SIGINT) at step 4")
    assert [s for s, _ in summary["train_loss_history"]] == [1, 2, 3, 4]
    assert torch.load(tmp_path / "checkpoints" / "interrupted.ckpt", weights_only=False)["global_step"] == 4
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is given back after the fit


class SigtermToLauncher(Callback):
    """On one rank of a ``ddp_spawn`` fit, sends SIGTERM to the launching process (as SLURM or ``kill`` would)."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank, self.sent = step, rank, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and not self.sent:
            self.sent = True
            os.kill(os.getppid(), signal.SIGTERM)


DDP = ("--trainer.strategy", "ddp_spawn", "--trainer.devices", "2", "--dvar.window", "25", "--trainer.max_steps",
       "300", "--dvar.divergence_norm_factor", "1e6")


@pytest.mark.slow
def test_sigterm_under_two_process_ddp_saves_the_state_and_resumes_exactly(tmp_path, tiny_sd, concept_dir):
    straight = tmp_path / "straight"
    result = run_cli(*quick_args(straight, concept_dir, tiny_sd, *DDP))
    assert result.returncode == 0, result.stderr[-3000:]
    expected = json.loads((straight / "summary.json").read_text())
    assert expected["stopped_by"] == "dvar" and expected["stop_step"] > 20

    signal_config = tmp_path / "signal.yaml"
    signal_config.write_text("trainer:\n  callbacks:\n    - class_path: tests.test_interrupts.SigtermToLauncher\n"
                             "      init_args: {step: 13}\n")
    folder = tmp_path / "run"
    result = run_cli(*quick_args(folder, concept_dir, tiny_sd, *DDP, "--config", str(signal_config)))
    assert result.returncode == 143, result.stderr[-3000:]
    assert "Ctrl-C" not in result.stderr and "Traceback" not in result.stderr
    assert "leaked semaphore" not in result.stderr
    summary = json.loads((folder / "summary.json").read_text())
    checkpoint = folder / "checkpoints" / "interrupted.ckpt"
    assert summary["stopped_by"] == "interrupted" and summary["stop_reason"].startswith("Interrupted by SIGTERM")
    step = summary["stop_step"]
    assert 13 <= step <= 15 and checkpoint.is_file() and torch.load(checkpoint, weights_only=False)[
        "global_step"] == step  # every rank stopped after the same step, where the checkpoint was taken

    resumed = run_cli(*quick_args(folder, concept_dir, tiny_sd, *DDP, "--ckpt_path", str(checkpoint)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["stopped_by"] == "dvar" and summary["stop_step"] == expected["stop_step"]
    assert summary["dvar_history"] == expected["dvar_history"]
    weights = load_file(folder / "learned_embeds.safetensors")
    expected_weights = load_file(straight / "learned_embeds.safetensors")
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights)
