"""Why a run stopped, told truthfully: divergence, non-finite losses, nothing training, a resumed finished run,
reused callbacks, and DVAR's cadence under gradient accumulation and the trainer's own validation settings."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary, StepCheckpoint
from lightning_custom.data import ConceptDataModule
from lightning_custom.dvar.rule import divergence, is_flat, loss_divergence, norm_divergence, variance_ratio
from lightning_custom.methods import TextualInversion
from tests.conftest import data_kwargs, ti_kwargs, trainer_kwargs
from tests.test_dvar_rule import ScriptedModule, decaying_series

pytestmark = pytest.mark.usefixtures("single_thread")


def fit_scripted(root, module, max_steps=400, trainer_overrides=None, **dvar):
    callback = DVAREarlyStopping(verbose=False, **dvar)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback], **trainer_kwargs(root, **(trainer_overrides or {})))
    trainer.fit(module)
    return trainer, callback


# ------------------------------------------------------------------------------------------------- pure checks
def test_loss_divergence_compares_the_last_window_with_the_first_values():
    rising = [1.0] * 5 + [1.1] * 20
    assert "10.0% above its first values" in loss_divergence(rising, window=8)
    assert loss_divergence(rising, window=8, tolerance=0.15) is None
    assert loss_divergence(decaying_series(100), window=20) is None
    assert loss_divergence(rising[:7], window=8) is None  # the window is not full yet


def test_norm_divergence_and_combined_reason():
    assert norm_divergence(0.5, 49.9) is None and "x120" in norm_divergence(0.5, 60.0)
    assert norm_divergence(None, 1e9) is None and norm_divergence(0.0, 1e9) is None
    assert "norm grew" in divergence(decaying_series(50), 10, initial_norm=1.0, norm=1e3)
    assert divergence(decaying_series(50), 10, initial_norm=1.0, norm=1.5) is None


def test_flat_series_is_told_apart_from_convergence():
    assert variance_ratio([0.06] * 10, 5) == 0.0  # the paper's ratio: 0/0 read as 0, i.e. "converged"
    assert is_flat([0.06] * 10) and is_flat([0.06, 0.06 * (1 + 1e-8)] * 5)
    assert not is_flat(decaying_series(10, noise=0.0)) and not is_flat([0.06, 0.0601])


# ------------------------------------------------------------------------------------------------ live stops
class DivergingModule(ScriptedModule):
    """A scripted L_det, and a weight that a huge learning rate blows up (norm 1 -> hundreds)."""

    def __init__(self, series, every=1, lr=100.0):
        super().__init__(series, every)
        self.weight.data.fill_(1.0)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return -self.weight.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_exploding_weights_stop_as_diverged_at_the_first_evaluation(tmp_path):
    trainer, callback = fit_scripted(tmp_path, DivergingModule({"dvar_loss": decaying_series(400)}, every=5),
                                     window=30, threshold=0.15, eval_every_n_steps=5)
    assert callback.stopped_by == "diverged" and callback.stop_step == trainer.global_step == 5
    assert callback.initial_norm == 1.0 and callback.norm_history == [[5, 501.0]]
    assert "norm grew from 1 to 501" in callback.stop_reason


def test_flat_ratio_at_a_worse_loss_stops_as_diverged_not_dvar(tmp_path):
    # L_det rises 5% and settles: the ratio falls below the threshold, but the loss is worse than at the start.
    values = (0.064 + 0.0032 * (1 - np.exp(-np.arange(400) / 5.0))).tolist()
    expected = next(i + 1 for i in range(19, 400) if variance_ratio(values[: i + 1], 20) < 0.15)
    trainer, callback = fit_scripted(tmp_path, ScriptedModule({"dvar_loss": values}), window=20, threshold=0.15)
    assert callback.stopped_by == "diverged" and callback.stop_step == expected
    assert "above its first values" in callback.stop_reason and "training made the model worse" in callback.stop_reason


def test_a_loss_that_never_moves_is_not_training(tmp_path):
    trainer, callback = fit_scripted(tmp_path, ScriptedModule({"dvar_loss": [0.0637] * 400}), window=20,
                                     threshold=0.15)
    assert callback.stopped_by == "not_training" and callback.stop_step == 20
    assert callback.stop_reason.startswith("L_det has not changed: nothing is training")


class NaNModule(ScriptedModule):
    """The training loss turns NaN from step ``nan_from`` (global_step after the optimizer step)."""

    def __init__(self, series, every=1, nan_from=6):
        super().__init__(series, every)
        self.nan_from = nan_from

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step + 1 >= self.nan_from else loss


def test_a_non_finite_training_loss_stops_at_the_next_evaluation_naming_its_step(tmp_path):
    trainer, callback = fit_scripted(tmp_path, NaNModule({"dvar_loss": decaying_series(400)}, every=5),
                                     window=30, threshold=0.15, eval_every_n_steps=5)
    assert callback.stopped_by == "non_finite" and callback.stop_step == trainer.global_step == 10
    assert callback.first_non_finite_step == 6
    assert "non-finite from step 6" in callback.stop_reason and "\n" not in callback.stop_reason


def test_a_non_finite_loss_after_the_last_evaluation_is_still_reported(tmp_path):
    # max_steps 13 with evaluations every 5: the loss turns NaN at 12, after the last evaluation (10).
    trainer, callback = fit_scripted(tmp_path, NaNModule({"dvar_loss": decaying_series(400)}, every=5, nan_from=12),
                                     max_steps=13, window=30, threshold=0.15, eval_every_n_steps=5, stop=False)
    assert callback.stopped_by == "non_finite" and callback.stop_step == 13 and callback.first_non_finite_step == 12


def test_a_non_finite_deterministic_loss_stops(tmp_path):
    values = decaying_series(400)
    values[3] = math.inf
    trainer, callback = fit_scripted(tmp_path, ScriptedModule({"dvar_loss": values}), window=30, threshold=0.15)
    assert callback.stopped_by == "non_finite" and callback.stop_step == 4 and "L_det" in callback.stop_reason


# ------------------------------------------------------------------------------------------- ranks must agree
class TwoRanks:
    """A strategy stub for rank 0 of two: the other rank's verdict code enters the max-reduction."""

    def __init__(self, other_code: int):
        self.other_code = other_code
        self.reductions = 0

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "max"
        self.reductions += 1
        return torch.maximum(tensor, torch.tensor(self.other_code))


def test_ranks_with_different_values_agree_on_the_stop_and_its_reason():
    from lightning_custom.dvar.callback import STOP_KINDS

    callback = DVAREarlyStopping(window=5, threshold=0.15, verbose=False)
    trainer = SimpleNamespace(strategy=TwoRanks(1 + STOP_KINDS.index("dvar")), should_stop=False, is_global_zero=True)
    module = SimpleNamespace(device=torch.device("cpu"))
    # This rank's ratio is above the threshold: it would go on alone, but the other rank has converged.
    callback._decide(trainer, module, 40, callback._verdict(40, {"dvar_loss": 0.1}, {"dvar_loss": 0.5}, 1.0))
    assert trainer.should_stop and callback.stop_step == 40 and callback.stopped_by == "dvar"
    assert trainer.strategy.reductions == 1
    # A rank that saw a NaN outranks one that converged.
    callback = DVAREarlyStopping(window=5, threshold=0.15, verbose=False)
    trainer = SimpleNamespace(strategy=TwoRanks(1 + STOP_KINDS.index("non_finite")), should_stop=False,
                              is_global_zero=True)
    callback._decide(trainer, module, 40, ("dvar", "DVAR: converged"))
    assert callback.stopped_by == "non_finite" and "another rank" in callback.stop_reason


# ---------------------------------------------------------------------------------- resume, reuse, cadence
def fit_ti(root, tiny_sd, concept_dir, callbacks, ckpt_path=None, **module_overrides):
    module = TextualInversion(**ti_kwargs(tiny_sd, **{"learning_rate": 0.02, **module_overrides}))
    dvar = DVAREarlyStopping(window=15, threshold=0.15, eval_every_n_steps=1, verbose=False,
                             undertrained_below=0)  # the tiny random model's L_det barely moves: see quick_args
    trainer = L.Trainer(max_steps=200, callbacks=[dvar, RunSummary(report=False), *callbacks],
                        **trainer_kwargs(root, enable_checkpointing=bool(callbacks)))
    trainer.fit(module, datamodule=ConceptDataModule(**data_kwargs(concept_dir)), ckpt_path=ckpt_path)
    return trainer, dvar, json.loads((root / "summary.json").read_text())


def test_resuming_from_the_checkpoint_at_the_stop_ends_at_once(tmp_path, tiny_sd, concept_dir):
    checkpoints = StepCheckpoint(dirpath=tmp_path / "ckpt", every_n_steps=1)
    _, straight, first = fit_ti(tmp_path / "a", tiny_sd, concept_dir, [checkpoints])
    assert straight.stopped_by == "dvar" and first["stop_step"] == straight.stop_step < 200
    [final] = (tmp_path / "ckpt").glob(f"*-step={straight.stop_step}.ckpt")  # taken after the stop's evaluation
    trainer, resumed, second = fit_ti(tmp_path / "b", tiny_sd, concept_dir, [], ckpt_path=str(final))
    assert trainer.global_step == straight.stop_step  # not a step more
    for key in ("stop_step", "stopped_by", "steps_saved", "dvar_history"):
        assert second[key] == first[key], key
    assert second["stop_reason"].startswith(first["stop_reason"])  # (RunSummary adds where it resumed from)
    assert second["steps_saved"] == 200 - straight.stop_step


def test_reusing_one_callback_for_a_second_fit_starts_a_fresh_history(tmp_path):
    values = decaying_series(400, seed=7)
    callback = DVAREarlyStopping(window=30, threshold=0.15, verbose=False)
    stops = []
    for run in ("a", "b"):
        trainer = L.Trainer(max_steps=400, callbacks=[callback], **trainer_kwargs(tmp_path / run))
        trainer.fit(ScriptedModule({"dvar_loss": values}))
        stops.append((callback.stop_step, trainer.global_step, len(callback.history)))
    assert stops[0] == stops[1] and stops[0][0] == stops[0][1] == stops[0][2] < 400


class ShortEpochs(ScriptedModule):
    """Five batches per epoch: with accumulation 2, an epoch is not a whole number of optimizer steps."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(10, 1), batch_size=2)


def test_evaluations_fall_on_optimizer_steps_under_gradient_accumulation(tmp_path):
    oscillating = np.sin(np.arange(400) / 3.0).tolist()  # never converges
    trainer, callback = fit_scripted(tmp_path, ShortEpochs({"dvar_loss": oscillating}, every=5), max_steps=60,
                                     trainer_overrides={"accumulate_grad_batches": 2}, window=200, threshold=0.15,
                                     eval_every_n_steps=5)
    assert trainer.global_step == 60
    assert [s for s, _ in callback.history] == list(range(5, 61, 5))


@pytest.mark.parametrize("setting", [{"val_check_interval": "00:00:00:01"}, {"check_val_every_n_epoch": 3},
                                     {"val_check_interval": 7}])
def test_the_trainers_own_validation_cadence_is_overridden_and_said(tmp_path, caplog, setting):
    oscillating = np.sin(np.arange(400) / 3.0).tolist()
    with caplog.at_level(logging.WARNING, logger="lightning_custom.dvar.callback"):
        trainer, callback = fit_scripted(tmp_path, ScriptedModule({"dvar_loss": oscillating}, every=5),
                                         max_steps=40, trainer_overrides=setting, window=200, threshold=0.15,
                                         eval_every_n_steps=5)
    assert [s for s, _ in callback.history] == list(range(5, 41, 5))
    warnings = [r.getMessage() for r in caplog.records if "ignoring the trainer's" in r.getMessage()]
    assert len(warnings) == 1 and "every 5 optimizer steps" in warnings[0] and "\n" not in warnings[0]


def test_step_checkpoint_keeps_every_checkpoint_and_rounds_its_interval(tmp_path, caplog):
    oscillating = np.sin(np.arange(400) / 3.0).tolist()
    checkpoints = StepCheckpoint(dirpath=tmp_path / "ckpt", every_n_steps=7)
    assert checkpoints.save_top_k == -1
    callback = DVAREarlyStopping(window=200, threshold=0.15, eval_every_n_steps=5, verbose=False)
    trainer = L.Trainer(max_steps=40, callbacks=[callback, checkpoints],
                        **trainer_kwargs(tmp_path, enable_checkpointing=True))
    with caplog.at_level(logging.WARNING, logger="lightning_custom.callbacks.checkpoint"):
        trainer.fit(ScriptedModule({"dvar_loss": oscillating}, every=5))
    saved = sorted(int(p.stem.split("step=")[1]) for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert saved == [10, 20, 30, 40]  # every 7 would have saved only at 35
    assert any("saving every 10 steps" in r.getMessage() for r in caplog.records)


def test_step_checkpoint_through_the_cli_keeps_every_checkpoint(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(L.LightningModule, run=False, args=[
        "--trainer.callbacks=lightning_custom.callbacks.StepCheckpoint", "--trainer.callbacks.every_n_steps=5",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
    ])
    checkpoint = next(c for c in cli.trainer.callbacks if isinstance(c, StepCheckpoint))
    assert checkpoint.every_n_steps == 5 and checkpoint.save_top_k == -1


# ------------------------------------------------------------------------------------------- use from Python
def python_api_blocks() -> list[str]:
    """The code blocks of docs/python_api.md: the script, then the subclass."""
    from tests.doc_blocks import ROOT, blocks

    return [block.code for block in blocks(ROOT / "docs" / "python_api.md") if block.language == "python"]


def test_the_python_api_script_trains_and_says_why_it_stopped(tmp_path, capsys):
    script, subclass = python_api_blocks()
    # The tiny random model for speed; everything else as written (the embedded concept, 32 px, DVAR settings).
    fast = script.replace('"embedded", placeholder_token', '"embedded:tiny-sd", placeholder_token')
    fast = fast.replace('"runs/from_python"', repr(str(tmp_path / "plain")))
    # The tiny random model's L_det barely moves (see tests.test_cli.quick_args): no undertrained check here.
    fast = fast.replace("DVAREarlyStopping(", "DVAREarlyStopping(undertrained_below=0, ")
    assert fast.count("embedded:tiny-sd") == 1 and str(tmp_path) in fast and "undertrained_below=0" in fast
    namespace: dict = {}
    exec(compile(fast, "docs/python_api.md", "exec"), namespace)
    dvar, data = namespace["dvar"], namespace["data"]
    assert data.placeholder_token == "<my-star>"  # taken from the model: the captions hold the trained token
    assert dvar.stopped_by == "dvar" and dvar.stop_step < 1000
    assert namespace["moved"] > 0.05  # the embedding trains (it moved by 3e-4 when the captions lacked the token)
    assert f"dvar at step {dvar.stop_step}; the embedding moved by" in capsys.readouterr().out
    summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert summary["stopped_by"] == "dvar" and summary["placeholder_token"] == "<my-star>"
    # The subclass on that page trains in its place.
    exec(compile(subclass, "docs/python_api.md", "exec"), namespace)
    derived = fast.replace("model = TextualInversion(", "model = NormPenalizedInversion(")
    derived = derived.replace(repr(str(tmp_path / "plain")), repr(str(tmp_path / "derived")))
    exec(compile(derived, "docs/python_api.md", "exec"), namespace)
    assert type(namespace["model"]).__name__ == "NormPenalizedInversion" and namespace["moved"] > 0.05
    assert namespace["dvar"].stopped_by == "dvar"


def test_a_data_module_with_another_placeholder_is_refused(tiny_sd, concept_dir, tmp_path):
    from lightning_custom.errors import UserInputError

    module = TextualInversion(**ti_kwargs(tiny_sd, placeholder_token="<my-star>"))
    trainer = L.Trainer(max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(UserInputError, match=r"--data.placeholder_token: '<cat-toy>' differs from the model's"):
        trainer.fit(module, datamodule=ConceptDataModule(**data_kwargs(concept_dir)))


def test_cli_run_with_a_nan_loss_stops_and_writes_strict_json_and_no_artifact(tmp_path, capsys):
    from lightning_custom.cli import main

    def refuse(token):
        raise ValueError(f"summary.json holds the non-JSON token {token}")

    out = tmp_path / "nan"
    try:
        main(["fit", "--config", "configs/quickstart.yaml", "--model.init_args.learning_rate", "1e6",
              "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false"])
    except SystemExit as exit_:
        assert exit_.code not in (0, 2, None), "a NaN run should not look like a success"
    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    # The weights are NaN after step 5's update: the first evaluation (step 5) sees a NaN L_det.
    assert summary["stopped_by"] == "non_finite" and summary["stop_step"] == 5
    assert summary["stop_reason"].startswith("Non-finite: L_det (dvar_loss) is nan at step 5")
    assert not (out / "learned_embeds.safetensors").exists()
    stop_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Non-finite")]
    assert len(stop_lines) == 1
