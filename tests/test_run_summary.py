"""RunSummary: one training loss per optimizer step, the stop reason in words, no artifact from NaN weights,
strict JSON, resumed runs that say so, and a final set of files that belongs to one run."""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary, StepCheckpoint
from lightning_custom.runtime.io import write_json, write_safetensors
from tests.conftest import trainer_kwargs

pytestmark = pytest.mark.usefixtures("single_thread")
WEIGHTS = "weights.safetensors"


class Regression(L.LightningModule):
    """A one-parameter model with a different loss on every batch; records each micro-batch's loss."""

    def __init__(self, fail_export: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.fail_export = fail_export
        self.micro_losses: list[float] = []

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.linspace(0.1, 3.0, 30).reshape(-1, 1), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(1, 1), batch_size=1)

    def training_step(self, batch, batch_idx):
        loss = ((self.weight * batch - 2.0) ** 2).mean()
        self.micro_losses.append(float(loss.detach()))
        return loss

    def deterministic_loss(self, batch):
        return ((self.weight * batch - 2.0) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("dvar_loss", self.deterministic_loss(batch), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def export_artifacts(self, output_dir):
        write_safetensors(output_dir / WEIGHTS, {"weight": self.weight})
        if self.fail_export:
            (output_dir / "half-written.bin").write_bytes(b"\0" * 10)
            raise RuntimeError("disk full while exporting")
        return [WEIGHTS]


def fit(root, module=None, callbacks=(), summary=None, ckpt_path=None, **trainer_overrides):
    module = module or Regression()
    summary = summary or RunSummary()
    trainer_overrides.setdefault("max_steps", 6)
    trainer = L.Trainer(callbacks=[summary, *callbacks], **trainer_kwargs(root, **trainer_overrides))
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module, summary


def read_summary(folder):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads((folder / "summary.json").read_text(), parse_constant=refuse)


# --- training loss history ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_one_unnormalized_training_loss_per_optimizer_step(tmp_path, accumulate):
    _, module, _ = fit(tmp_path, accumulate_grad_batches=accumulate, max_steps=12)
    history = read_summary(tmp_path)["train_loss_history"]
    assert [step for step, _ in history] == list(range(1, 13))
    # 30 batches per epoch: with accumulation 3 every group is full; with 2 as well
    groups = [module.micro_losses[i * accumulate : (i + 1) * accumulate] for i in range(12)]
    assert [loss for _, loss in history] == pytest.approx([sum(g) / len(g) for g in groups], rel=1e-6)


def test_short_last_accumulation_group_is_averaged_over_its_own_micro_batches(tmp_path):
    # 30 batches per epoch, accumulation 4: the epoch's last optimizer step has 2 micro-batches
    _, module, _ = fit(tmp_path, accumulate_grad_batches=4, max_steps=9)
    history = read_summary(tmp_path)["train_loss_history"]
    assert [step for step, _ in history] == list(range(1, 10))
    assert history[7][1] == pytest.approx(sum(module.micro_losses[28:30]) / 2, rel=1e-6)
    assert history[8][1] == pytest.approx(sum(module.micro_losses[30:34]) / 4, rel=1e-6)


class NoHostSync(torch.Tensor):
    """A loss tensor that fails if anything reads it on the host while ``reading`` is off."""

    reading = False

    def _refuse(self, what):
        if not NoHostSync.reading:
            raise AssertionError(f"{what}: a host synchronization per step")

    def __float__(self):
        self._refuse("float(loss)")
        return super().__float__()

    def item(self):
        self._refuse("loss.item()")
        return super().item()

    def tolist(self):
        self._refuse("loss.tolist()")
        return super().tolist()


def test_recording_a_step_loss_reads_nothing_on_the_host():
    summary = RunSummary()
    trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=2, world_size=1)
    for step, value in ((0, 1.0), (1, 3.0), (1, 5.0), (2, 7.0)):
        trainer.global_step = step
        summary.on_train_batch_end(trainer, None, {"loss": torch.tensor(value).as_subclass(NoHostSync)}, None, 0)
    assert summary.train_loss_history == []  # nothing read yet
    NoHostSync.reading = True
    try:
        summary.read_losses()  # one transfer for the batch of steps
    finally:
        NoHostSync.reading = False
    assert summary.train_loss_history == [[1, 4.0], [2, 12.0]]


# --- why the run stopped -----------------------------------------------------------------------------------------


class StopAt(Callback):
    def __init__(self, step, stopped_by=None):
        self.step, self.stopped_by_value = step, stopped_by
        self.stopped_by, self.stop_reason = None, ""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True
            self.stopped_by = self.stopped_by_value


class Dawdle(Callback):
    """Makes each step take a while, so a time limit is reached after a few steps."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import time

        time.sleep(0.05)


@pytest.mark.parametrize("limits,callbacks,stopped_by,words", [
    ({"max_steps": 5}, [], "max_steps", "max_steps=5"),
    ({"max_steps": -1, "max_epochs": 1}, [], "max_epochs", "max_epochs=1"),
    ({"max_steps": 100_000, "max_time": "00:00:00:01"}, [Dawdle()], "max_time", "max_time=0:00:01"),
    ({"max_steps": 100_000}, [StopAt(3)], "other", "before any limit"),
    ({"max_steps": 100_000}, [StopAt(3, stopped_by="custom")], "custom", "StopAt stopped training"),
], ids=["max_steps", "max_epochs", "max_time", "other", "callback-without-reason"])
def test_every_stop_is_named_with_a_reason(tmp_path, limits, callbacks, stopped_by, words):
    trainer, _, _ = fit(tmp_path, callbacks=callbacks, **limits)
    summary = read_summary(tmp_path)
    assert summary["stopped_by"] == stopped_by
    assert words in summary["stop_reason"] and summary["stop_reason"].endswith(".")
    assert f"step {trainer.global_step}" in summary["stop_reason"]


# --- NaN: no artifact, strict JSON -------------------------------------------------------------------------------


class PoisonWeights(Callback):
    """Sets the trainable weights to NaN after a step (what a diverging learning rate ends in)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.weight.fill_(float("nan"))


def test_nan_weights_export_nothing_and_the_summary_is_strict_json(tmp_path):
    fit(tmp_path, callbacks=[PoisonWeights(2)], max_steps=5)
    summary = read_summary(tmp_path)  # fails on bare NaN tokens
    assert not (tmp_path / WEIGHTS).exists()
    assert summary["artifacts"] == []
    assert "NaN or infinite" in summary["artifacts_withheld"]
    assert summary["artifacts_withheld"] in summary["stop_reason"]
    losses = [loss for _, loss in summary["train_loss_history"]]
    assert losses[:2] == [pytest.approx(v) for v in losses[:2]] and None not in losses[:2]
    assert losses[2:] == [None, None, None]  # NaN losses are written as null
    assert WEIGHTS not in summary["files"]


def test_a_run_stopped_as_non_finite_exports_nothing(tmp_path):
    fit(tmp_path, callbacks=[StopAt(2, stopped_by="non_finite")])
    summary = read_summary(tmp_path)
    assert summary["stopped_by"] == "non_finite" and summary["artifacts"] == []
    assert not (tmp_path / WEIGHTS).exists()
    assert "non-finite" in summary["artifacts_withheld"]


def test_write_json_writes_null_for_non_finite_values(tmp_path):
    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": (2.0,)})
    assert read_summary_file(tmp_path / "x.json") == {"a": None, "b": [1.5, None, None], "c": [2.0]}


def read_summary_file(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


# --- resumed runs ------------------------------------------------------------------------------------------------


def test_a_resumed_run_says_so(tmp_path):
    def callbacks(checkpoints=()):
        return [DVAREarlyStopping(window=50, stop=False, eval_every_n_steps=2, verbose=False), *checkpoints]

    straight, _, _ = fit(tmp_path / "a", max_steps=8, enable_checkpointing=True,
                         callbacks=callbacks([StepCheckpoint(dirpath=tmp_path / "ckpt", every_n_steps=4)]))
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert checkpoint.exists()
    fit(tmp_path / "b", max_steps=8, callbacks=callbacks(), ckpt_path=str(checkpoint))
    resumed, first = read_summary(tmp_path / "b"), read_summary(tmp_path / "a")
    assert resumed["resumed_from"] == str(checkpoint) and resumed["resumed_at_step"] == 4
    assert f"resumed from {checkpoint} at step 4" in resumed["stop_reason"]
    assert "resumed_from" not in first
    # the history before the checkpoint came back with it
    assert [s for s, _ in resumed["train_loss_history"]] == list(range(1, 9))
    assert resumed["train_loss_history"][:4] == first["train_loss_history"][:4]


def test_a_reused_instance_starts_each_fit_afresh(tmp_path):
    summary = RunSummary()
    fit(tmp_path / "a", summary=summary, max_steps=4)
    fit(tmp_path / "b", summary=summary, max_steps=3)
    assert [s for s, _ in read_summary(tmp_path / "b")["train_loss_history"]] == [1, 2, 3]


# --- the final set of files --------------------------------------------------------------------------------------


def test_the_summary_names_every_file_of_the_run_and_old_files_go(tmp_path):
    # an earlier run's files in the same folder: a LoRA weight, a report, its summary; and this run's config
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"old")
    (tmp_path / "report.png").write_bytes(b"old")
    (tmp_path / "config.yaml").write_text("trainer: {}\n")
    write_json(tmp_path / "summary.json", {"artifacts": ["pytorch_lora_weights.safetensors"], "stop_step": 1})
    (tmp_path / "notes.txt").write_text("the user's own file")
    fit(tmp_path, summary=RunSummary(report=False))
    summary = read_summary(tmp_path)
    assert summary["artifacts"] == [WEIGHTS]
    assert summary["files"] == ["config.yaml", "summary.json", WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "notes.txt", "summary.json", WEIGHTS]


def test_a_crash_while_exporting_leaves_the_earlier_set_untouched(tmp_path):
    write_json(tmp_path / "summary.json", {"artifacts": ["learned_embeds.safetensors"], "stop_step": 7})
    (tmp_path / "learned_embeds.safetensors").write_bytes(b"old")
    (tmp_path / "report.png").write_bytes(b"old")
    def files():
        return {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}  # .lock: the folder's lock

    before = files()
    with pytest.raises(RuntimeError, match="disk full"):
        fit(tmp_path, module=Regression(fail_export=True))
    assert files() == before  # no temporaries, no new weights


class StopAtStep(Callback):
    """Ends the fit after the given optimizer step: with an error (a crash) or with SIGTERM (an interruption)."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.how == "crash":
            raise RuntimeError("crashed on purpose")
        if trainer.global_step == self.step and self.how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("how,raised", [("crash", RuntimeError), ("sigterm", SystemExit)])
def test_a_fit_ended_by_an_exception_releases_the_run_folder(tmp_path, how, raised):
    from lightning_custom.runs.run_folder import _held

    with pytest.raises(raised):
        fit(tmp_path, callbacks=[StopAtStep(2, how)])
    # Lightning calls no teardown after an exception: RunSummary.on_exception releases the folder.
    assert not (tmp_path / ".lock").exists() and (tmp_path.resolve() / ".lock") not in _held
    if how == "sigterm":
        assert read_summary(tmp_path)["stopped_by"] == "interrupted"  # written before the release
    fit(tmp_path)  # a second fit into the folder, in the same process
    assert read_summary(tmp_path)["stop_step"] == 6 and not (tmp_path / ".lock").exists()


def test_every_file_gets_the_umasks_default_mode(tmp_path):
    fit(tmp_path)
    expected = 0o666 & ~current_umask()
    for name in (WEIGHTS, "summary.json", "report.png"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(expected), name


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


# --- DDP ---------------------------------------------------------------------------------------------------------


class RecordMicroLosses(Callback):
    """Writes each rank's micro-batch losses to rank<k>.json."""

    def __init__(self, out):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        path = os.path.join(self.out, f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump(pl_module.micro_losses, f)


@pytest.mark.slow  # two spawned processes: ~100 s on a busy 2-core CPU
def test_ddp_training_loss_is_the_mean_over_ranks(tmp_path):
    fit(tmp_path, callbacks=[RecordMicroLosses(str(tmp_path))], max_steps=4, accumulate_grad_batches=2,
        strategy="ddp_spawn", devices=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] != ranks[1]  # each rank trains on its own batches
    expected = [(sum(ranks[0][2 * i : 2 * i + 2]) + sum(ranks[1][2 * i : 2 * i + 2])) / 4 for i in range(4)]
    history = read_summary(tmp_path)["train_loss_history"]
    assert [s for s, _ in history] == [1, 2, 3, 4]
    assert [v for _, v in history] == pytest.approx(expected, rel=1e-6)


def test_summary_json_has_one_typed_record_and_an_undeclared_field_is_caught(tmp_path):
    """runs/summary.py owns summary.json's fields: every stop kind the DVAR callback names is a declared
    ``stopped_by`` value, and writing a field the record does not declare warns (an error in this test suite)."""
    import typing
    import warnings

    from lightning_custom.dvar.callback import STOP_KINDS
    from lightning_custom.runs.summary import (RunSummaryRecord, StoppedBy, UndeclaredSummaryField, read_summary,
                                               write_summary)

    assert set(STOP_KINDS) <= set(typing.get_args(StoppedBy))
    write_summary(tmp_path / "summary.json", RunSummaryRecord(stop_step=3, stopped_by="dvar"))
    assert read_summary(tmp_path) == {"stop_step": 3, "stopped_by": "dvar"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UndeclaredSummaryField, match="stop_stepp"):
            write_summary(tmp_path / "summary.json", {"stop_stepp": 3})
