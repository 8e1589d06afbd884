"""The DVAR rule: pure functions and the callback, against a direct numpy computation on scripted series."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from lightning_custom.callbacks import DVAREarlyStopping
from lightning_custom.dvar.rule import first_stop_index, variance_ratio, window_in_values
from tests.conftest import trainer_kwargs


def numpy_stop_step(values, window, threshold, every=1, min_steps=0):
    """Independent reference: evaluate after steps every, 2*every, ...; stop at the first ratio < threshold."""
    for i in range(len(values)):
        if i + 1 < window:
            continue
        ratio = np.var(values[i + 1 - window : i + 1]) / np.var(values[: i + 1])
        step = (i + 1) * every
        if ratio < threshold and step >= min_steps:
            return step
    return None


def decaying_series(n, seed=0, noise=0.01):
    rng = np.random.default_rng(seed)
    return (np.exp(-np.arange(n) / 25.0) + noise * rng.standard_normal(n)).tolist()


class ScriptedModule(L.LightningModule):
    """Logs a scripted deterministic-loss value per step; trains a dummy parameter."""

    def __init__(self, series: dict[str, list[float]], every: int = 1):
        super().__init__()
        self.series, self.every = series, every
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(10_000, 1), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1)

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def deterministic_loss(self, batch):
        return torch.tensor(0.0)

    def validation_step(self, batch, batch_idx):
        index = self.global_step // self.every - 1
        for key, values in self.series.items():
            self.log(key, values[index], batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def run(tmp_path, series, max_steps=400, **dvar):
    callback = DVAREarlyStopping(**dvar)
    every = dvar.get("eval_every_n_steps", 1)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback], **trainer_kwargs(tmp_path))
    trainer.fit(ScriptedModule(series, every))
    return trainer, callback


def test_variance_ratio_matches_numpy():
    values = decaying_series(100, seed=1)
    assert variance_ratio(values[:9], 10) is None
    for n in (10, 37, 100):
        expected = np.var(values[n - 10 : n]) / np.var(values[:n])
        assert variance_ratio(values[:n], 10) == pytest.approx(expected, rel=1e-12)
    assert variance_ratio([2.0] * 20, 5) == 0.0


@pytest.mark.parametrize("window,threshold", [(20, 0.1), (40, 0.15), (10, 0.4)])
def test_first_stop_index_matches_numpy(window, threshold):
    values = decaying_series(300, seed=window)
    expected = numpy_stop_step(values, window, threshold)
    index = first_stop_index(values, window, threshold)
    assert expected is not None and index + 1 == expected


def test_window_in_values():
    assert window_in_values(310, 1) == 310
    assert window_in_values(310, 10) == 31
    assert window_in_values(305, 10) == 31
    assert window_in_values(3, 10) == 2


def test_callback_stops_at_exact_step(tmp_path):
    values = decaying_series(400, seed=7)
    expected = numpy_stop_step(values, 30, 0.15)
    trainer, callback = run(tmp_path, {"dvar_loss": values}, window=30, threshold=0.15)
    assert expected is not None and expected < 400
    assert callback.stop_step == expected == trainer.global_step
    assert callback.stopped_by == "dvar"
    assert [s for s, _ in callback.history] == list(range(1, expected + 1))
    assert [v for _, v in callback.history] == pytest.approx(values[:expected])
    assert "fell below threshold 0.15" in callback.stop_reason and f"step {expected}" in callback.stop_reason


def test_callback_respects_min_steps(tmp_path):
    values = decaying_series(400, seed=7)
    early = numpy_stop_step(values, 30, 0.15)
    trainer, callback = run(tmp_path, {"dvar_loss": values}, window=30, threshold=0.15, min_steps=early + 25)
    assert callback.stop_step == numpy_stop_step(values, 30, 0.15, min_steps=early + 25) > early


def test_callback_max_steps_cap_and_no_convergence(tmp_path):
    oscillating = np.sin(np.arange(400) / 3.0).tolist()  # the ratio stays near 1: DVAR never fires
    trainer, callback = run(tmp_path / "a", {"dvar_loss": oscillating}, max_steps=300, window=30, threshold=0.15)
    assert callback.stop_step is None and trainer.global_step == 300
    callback = DVAREarlyStopping(window=30, threshold=0.15, max_steps=120)
    trainer = L.Trainer(max_steps=400, callbacks=[callback], **trainer_kwargs(tmp_path / "b"))
    trainer.fit(ScriptedModule({"dvar_loss": oscillating}))
    assert callback.stop_step == trainer.global_step == 120 and callback.stopped_by == "max_steps"


def test_evaluation_every_k_steps_counts_window_in_steps(tmp_path):
    values = decaying_series(400, seed=9)  # value i is logged after step (i + 1) * 5
    trainer, callback = run(tmp_path, {"dvar_loss": values}, max_steps=2000, window=50, threshold=0.15,
                            eval_every_n_steps=5)
    expected = numpy_stop_step(values, 10, 0.15, every=5)
    assert callback.stop_step == expected
    assert all(step % 5 == 0 for step, _ in callback.history)


def test_observe_only_records_but_never_stops(tmp_path):
    values = decaying_series(200, seed=7)
    trainer, callback = run(tmp_path, {"dvar_loss": values}, max_steps=200, window=30, threshold=0.15, stop=False)
    assert trainer.global_step == 200 and callback.stop_step is None
    assert len(callback.history) == 200


def test_several_series_wait_for_all(tmp_path):
    fast = decaying_series(400, seed=1)
    slow = (np.exp(-np.arange(400) / 60.0) + 0.01 * np.random.default_rng(2).standard_normal(400)).tolist()
    fast_stop, slow_stop = numpy_stop_step(fast, 30, 0.15), numpy_stop_step(slow, 30, 0.15)
    assert fast_stop < slow_stop
    # the rule waits until both ratios are below the threshold at the same evaluation
    both = next(
        i + 1 for i in range(29, 400)
        if np.var(fast[i - 29 : i + 1]) / np.var(fast[: i + 1]) < 0.15
        and np.var(slow[i - 29 : i + 1]) / np.var(slow[: i + 1]) < 0.15
    )
    trainer, callback = run(tmp_path, {"dvar_loss/a": fast, "dvar_loss/b": slow}, window=30, threshold=0.15)
    assert callback.stop_step == both >= slow_stop
    assert set(callback.histories) == {"dvar_loss/a", "dvar_loss/b"}
    assert [v for _, v in callback.histories["dvar_loss/a"]] == pytest.approx(fast[:both])


def test_state_dict_round_trip():
    callback = DVAREarlyStopping(window=5, threshold=0.2)
    callback.histories = {"dvar_loss": [[1, 0.5], [2, 0.4]]}
    callback.stop_step, callback.stopped_by = 2, "dvar"
    restored = DVAREarlyStopping(window=5, threshold=0.2)
    restored.load_state_dict(callback.state_dict())
    assert restored.histories == callback.histories and restored.stop_step == 2 and restored.stopped_by == "dvar"
    restored.load_state_dict({})  # keys added later load with defaults
    assert restored.histories == {} and restored.stop_step is None


@pytest.mark.parametrize("kwargs", [{"window": 1}, {"threshold": 0.0}, {"eval_every_n_steps": 0}])
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError, match="--dvar"):
        DVAREarlyStopping(**kwargs)


def test_stop_step_every_replays_a_coarser_evaluation():
    from lightning_custom.dvar.rule import stop_step_every

    values = decaying_series(600, seed=4)
    history = [[step, v] for step, v in enumerate(values, start=1)]
    assert stop_step_every(history, 30, 0.15, 1) == numpy_stop_step(values, 30, 0.15)
    coarse = values[4::5]  # the values at steps 5, 10, ...
    assert stop_step_every(history, 30, 0.15, 5) == numpy_stop_step(coarse, 6, 0.15, every=5)
    assert stop_step_every(history, 30, 0.15, 5) % 5 == 0


def test_a_ratio_exactly_at_the_threshold_does_not_stop(tmp_path):
    values = np.float32(decaying_series(400, seed=7)).tolist()  # as logged: the live ratios are then the same
    index = first_stop_index(values, 30, 0.15)
    at = variance_ratio(values[: index + 1], 30)  # the first ratio below 0.15, used as the threshold itself
    later = first_stop_index(values, 30, at)
    assert later is not None and later > index  # the rule is `ratio < threshold`: equal is not below
    trainer, callback = run(tmp_path, {"dvar_loss": values}, window=30, threshold=at)
    assert callback.stop_step == later + 1 and callback.stopped_by == "dvar"
