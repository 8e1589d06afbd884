"""Resuming continues the DVAR series exactly; two DDP processes agree on the loss and the stop step."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary, StepCheckpoint
from lightning_custom.data import ConceptDataModule
from lightning_custom.methods import TextualInversion
from tests.conftest import data_kwargs, ti_kwargs, trainer_kwargs


def fit(root, tiny_sd, concept_dir, callbacks, ckpt_path=None, **trainer_overrides):
    module = TextualInversion(**ti_kwargs(tiny_sd, learning_rate=0.02))
    dm = ConceptDataModule(**data_kwargs(concept_dir))
    dvar = DVAREarlyStopping(window=15, threshold=0.15)
    summary = RunSummary()
    kwargs = trainer_kwargs(root, **trainer_overrides)
    trainer = L.Trainer(max_steps=200, callbacks=[dvar, summary, *callbacks], **kwargs)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, dvar, module


def test_resume_from_mid_epoch_checkpoint_stops_at_the_same_step(tmp_path, tiny_sd, concept_dir):
    checkpoints = StepCheckpoint(dirpath=tmp_path / "ckpt", every_n_steps=7)
    trainer, straight, module = fit(tmp_path / "a", tiny_sd, concept_dir, [checkpoints], enable_checkpointing=True)
    assert straight.stopped_by == "dvar" and straight.stop_step > 7
    mid = tmp_path / "ckpt" / "epoch=0-step=7.ckpt"  # 20 batches per epoch: step 7 is mid-epoch
    assert mid.exists()
    state = torch.load(mid, weights_only=False)
    assert set(state["state_dict"]) == {"token_vectors.vectors"}  # only trainable weights are checkpointed
    _, resumed, resumed_module = fit(tmp_path / "b", tiny_sd, concept_dir, [], ckpt_path=str(mid))
    assert resumed.stop_step == straight.stop_step
    assert resumed.history == straight.history  # bit-identical series, continued rather than restarted
    assert torch.equal(resumed_module.token_vectors.vectors, module.token_vectors.vectors)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["stop_step"] == straight.stop_step and len(summary["dvar_history"]) == straight.stop_step


class RecordPerRank(Callback):
    """Writes what each rank saw to rank<k>.json."""

    def __init__(self, out: str):
        self.out, self.raw = out, []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.raw.append(float(outputs))

    def on_fit_end(self, trainer, pl_module):
        dvar = next(c for c in trainer.callbacks if isinstance(c, DVAREarlyStopping))
        record = {"stop_step": trainer.global_step, "history": dvar.history, "raw": self.raw,
                  "stopped_by": dvar.stopped_by, "vectors": pl_module.token_vectors.vectors.tolist(),
                  "lr": pl_module.effective_learning_rate}
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_two_process_ddp_ranks_agree(tmp_path, tiny_sd, concept_dir):
    torch.set_num_threads(1)
    fit(tmp_path, tiny_sd, concept_dir, [RecordPerRank(str(tmp_path))], strategy="ddp_spawn", devices=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["stopped_by"] == ranks[1]["stopped_by"] == "dvar"
    assert ranks[0]["stop_step"] == ranks[1]["stop_step"]
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["raw"] == ranks[1]["raw"]  # the same fixed batch and weights: the same loss on every rank
    assert ranks[0]["vectors"] == ranks[1]["vectors"]
    # the learning rate is scaled by batch size x accumulation x devices: 0.02 x 2 x 1 x 2
    assert ranks[0]["lr"] == ranks[1]["lr"] == pytest.approx(0.08)


def test_learning_rate_scaling():
    from lightning_custom.diffusion import scale_learning_rate

    assert scale_learning_rate(5e-3, batch_size=2) == pytest.approx(1e-2)
    assert scale_learning_rate(5e-3, batch_size=2, accumulate_grad_batches=4, num_devices=8) == pytest.approx(0.32)
