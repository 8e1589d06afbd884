"""Resuming continues the DVAR series exactly; two DDP processes agree on the loss and the stop step."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary, StepCheckpoint
from lightning_custom.data import ConceptDataModule
from lightning_custom.errors import UserInputError
from lightning_custom.methods import TextualInversion
from lightning_custom.runtime.rng import RNG_KEY as _RNG_KEY
from tests.conftest import data_kwargs, ti_kwargs, trainer_kwargs


def fit(root, tiny_sd, concept_dir, callbacks, ckpt_path=None, dvar_overrides=None, data_overrides=None,
        **trainer_overrides):
    module = TextualInversion(**ti_kwargs(tiny_sd, learning_rate=0.02))
    dm = ConceptDataModule(**data_kwargs(concept_dir, **(data_overrides or {})))
    dvar = DVAREarlyStopping(window=15, threshold=0.15, **{"undertrained_below": 0, **(dvar_overrides or {})})
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


def test_resume_repeats_the_resampled_evaluation_draws(tmp_path, tiny_sd, concept_dir):
    """With ``resample`` (the semi-deterministic study), the redrawn parts continue their sequence on resume."""
    settings = dict(data_overrides=dict(resample=["noise", "timesteps"]), dvar_overrides=dict(max_steps=16))
    checkpoints = StepCheckpoint(dirpath=tmp_path / "ckpt", every_n_steps=8)
    _, straight, _ = fit(tmp_path / "a", tiny_sd, concept_dir, [checkpoints], enable_checkpointing=True, **settings)
    mid = tmp_path / "ckpt" / "epoch=0-step=8.ckpt"
    _, resumed, _ = fit(tmp_path / "b", tiny_sd, concept_dir, [], ckpt_path=str(mid), **settings)
    assert len(straight.history) == 16 and resumed.history == straight.history


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


def as_rank(module, rank: int, world_size: int = 2):
    """``module`` as if attached to rank ``rank`` of a ``world_size``-process trainer (only what the RNG code reads)."""
    module._trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    return module


def test_checkpoint_saves_and_restores_every_ranks_training_rng(tiny_sd):
    """Single-process check of what the 2-process test below checks end to end."""
    module = as_rank(TextualInversion(**ti_kwargs(tiny_sd)), rank=1)
    torch.randn(7, generator=module.generator)  # rank 1 has trained a little
    rank0 = torch.Generator().manual_seed(59)
    torch.randn(5, generator=rank0)
    expected = {0: rank0.get_state(), 1: module.generator.get_state()}
    module.all_gather = lambda state: torch.stack([expected[0], state])  # the other rank's part of the gather
    checkpoint = {"state_dict": module.state_dict()}  # as Lightning hands it over
    module.on_save_checkpoint(checkpoint)
    for rank in (0, 1):
        resumed = as_rank(module, rank)
        resumed.on_load_checkpoint(checkpoint)
        following = torch.Generator().set_state(expected[rank])
        assert torch.equal(torch.randn(4, generator=resumed.generator), torch.randn(4, generator=following))
    # a checkpoint of one process (or an older one, holding a bare state) resumed on two: rank 1 keeps its own
    # seed rather than repeating rank 0's noise, and the user is told the resume is not exact
    with pytest.warns(UserWarning, match="1 process"):
        as_rank(module, 1).on_load_checkpoint({_RNG_KEY: expected[0]})
    own_seed = torch.Generator().manual_seed(59 + 1)
    assert torch.equal(torch.randn(4, generator=module.generator), torch.randn(4, generator=own_seed))


def straight_and_resumed_ddp_runs(tmp_path, tiny_sd, concept_dir, resume_step):
    """What each rank saw in an uninterrupted 2-process run and in one resumed from its step ``resume_step``."""
    torch.set_num_threads(1)
    runs = {}
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
        callbacks = [RecordPerRank(str(tmp_path / name))]
        if name == "straight":
            callbacks.append(StepCheckpoint(dirpath=tmp_path / "ckpt", every_n_steps=resume_step))
        # 40 samples over 2 ranks at batch size 2: 10 steps per epoch
        ckpt = next((tmp_path / "ckpt").glob(f"*-step={resume_step}.ckpt"), None) if name == "resumed" else None
        # at least 25 steps after the resume to compare: no stop before, and no norm guard (the tiny model's
        # initializer row is small, so its norm soon grows many times)
        fit(tmp_path / name, tiny_sd, concept_dir, callbacks, ckpt_path=ckpt and str(ckpt), strategy="ddp_spawn",
            devices=2, enable_checkpointing=name == "straight",
            dvar_overrides=dict(min_steps=resume_step + 25, divergence_norm_factor=1e6))
        runs[name] = [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in (0, 1)]
    return runs["straight"], runs["resumed"], tmp_path / "ckpt"


@pytest.mark.slow
def test_two_process_ddp_resume_is_exact(tmp_path, tiny_sd, concept_dir):
    straight, resumed, ckpt_dir = straight_and_resumed_ddp_runs(tmp_path, tiny_sd, concept_dir, resume_step=15)
    assert straight[0]["stop_step"] >= 40
    for rank in (0, 1):
        assert resumed[rank]["history"] == straight[rank]["history"]  # bit-identical DVAR series
        assert resumed[rank]["stop_step"] == straight[rank]["stop_step"]
        assert resumed[rank]["vectors"] == straight[rank]["vectors"]
    # the checkpoint holds both ranks' training generators, which draw different noise
    states = torch.load(next(ckpt_dir.glob("*-step=15.ckpt")), weights_only=False)[_RNG_KEY]
    assert isinstance(states, list) and len(states) == 2 and not torch.equal(states[0], states[1])


def test_learning_rate_scaling():
    from lightning_custom.objectives.diffusion import scale_learning_rate

    assert scale_learning_rate(5e-3, batch_size=2) == pytest.approx(1e-2)
    assert scale_learning_rate(5e-3, batch_size=2, accumulate_grad_batches=4, num_devices=8) == pytest.approx(0.32)


def test_a_checkpoint_without_the_trained_weights_is_refused(tiny_sd):
    """``strict_loading`` is off (checkpoints leave the frozen model out): without this check Lightning resumed
    another method's checkpoint silently from the base weights, in a run calling itself resumed."""
    module = TextualInversion(**ti_kwargs(tiny_sd))
    module._trainer = SimpleNamespace(ckpt_path="lora.ckpt", global_rank=0, world_size=1)
    trained = module.trained_weight_names()
    assert trained == {name for name, p in module.named_parameters() if p.requires_grad} != set()
    module.on_load_checkpoint({"state_dict": dict.fromkeys(trained, torch.zeros(1))})  # its own kind: accepted
    with pytest.raises(UserInputError, match=rf"^--ckpt_path lora.ckpt: the checkpoint lacks {len(trained)} of "
                                             rf"the {len(trained)} weights this run trains \(e.g. "):
        module.on_load_checkpoint({"state_dict": {"unet.down_blocks.0.lora_A.weight": torch.zeros(1)}})
