"""The paper's baselines: CLIP early stopping on scripted CLIP-I series and on a real tiny run; the fixed budget."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lightning_custom.callbacks import CLIPEarlyStopping, DVAREarlyStopping, FixedBudget, RunSummary
from lightning_custom.callbacks.clip_early_stopping import patience_stop_index, patience_update
from lightning_custom.data import ConceptDataModule
from lightning_custom.errors import UserInputError
from lightning_custom.methods import TextualInversion
from lightning_custom.data.images import list_image_files, load_rgb_image
from lightning_custom.inference.metrics import clip_i, load_clip
from lightning_custom.inference.pipelines import pipeline_from_module
from lightning_custom.inference.sampling import generate
from lightning_custom.synthetic.toy_models import save_tiny_clip
from tests.conftest import data_kwargs, ti_kwargs, trainer_kwargs

pytestmark = pytest.mark.usefixtures("single_thread")


class DummyModule(L.LightningModule):
    """Trains one parameter; nothing else."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(1000, 1), batch_size=1)

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def export_artifacts(self, output_dir):
        return []


class ScriptedCLIP(CLIPEarlyStopping):
    """CLIP early stopping whose CLIP-I values come from a script instead of sampling."""

    def __init__(self, series, **kwargs):
        super().__init__(**kwargs)
        self.series = list(series)

    def setup_scoring(self, trainer, pl_module):
        pass

    def score(self, trainer, pl_module):
        return self.series[len(self.history)]


# (series, patience, min_delta, index of the check that stops)
SCRIPTS = [
    ([0.50, 0.60, 0.61, 0.615, 0.62, 0.90], 3, 0.02, 4),  # 0.61, 0.615 and 0.62 are within 0.02 of 0.60
    ([0.50, 0.60, 0.61, 0.70, 0.71, 0.715, 0.719, 0.80], 3, 0.02, 6),  # 0.70 resets the count
    ([0.50, 0.60, 0.70, 0.80], 1, 0.02, None),  # always improving
    ([0.50, 0.52, 0.54], 1, 0.02, 1),  # exactly min_delta is not an improvement
    ([0.50, 0.40, 0.45, 0.30], 6, 0.02, None),  # patience not reached
]


@pytest.mark.parametrize("series,patience,min_delta,expected", SCRIPTS)
def test_patience_rule_on_scripted_series(series, patience, min_delta, expected):
    assert patience_stop_index(series, patience, min_delta) == expected
    best, wait, improved = patience_update(None, 0, 0.3, 0.02)
    assert (best, wait, improved) == (0.3, 0, True)


@pytest.mark.parametrize("series,patience,min_delta,expected", SCRIPTS)
def test_callback_stops_at_the_exact_step(tmp_path, series, patience, min_delta, expected):
    every = 3
    callback = ScriptedCLIP(series, every_n_steps=every, patience=patience, min_delta=min_delta, verbose=False)
    max_steps = every * len(series)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback, RunSummary(export=False, report=False)],
                        **trainer_kwargs(tmp_path))
    trainer.fit(DummyModule())
    stop = every * (expected + 1) if expected is not None else max_steps
    assert trainer.global_step == stop
    assert [s for s, _ in callback.history] == list(range(every, stop + 1, every))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_step"] == stop
    assert summary["stopped_by"] == ("clip" if expected is not None else "max_steps")
    assert summary["clip_history"] == callback.history
    if expected is not None:
        assert summary["steps_saved"] == max_steps - stop
        assert f"for {patience} checks" in summary["stop_reason"]


def test_state_dict_resumes_the_count(tmp_path):
    first = ScriptedCLIP([0.5, 0.6, 0.6], every_n_steps=1, patience=3)
    trainer = L.Trainer(max_steps=3, callbacks=[first], **trainer_kwargs(tmp_path))
    trainer.fit(DummyModule())
    assert (first.best, first.wait, first.best_step) == (0.6, 1, 2)
    resumed = ScriptedCLIP([0.5, 0.6, 0.6, 0.61, 0.6], every_n_steps=1, patience=3)
    resumed.load_state_dict(first.state_dict())
    assert resumed.history == first.history and resumed.wait == 1
    assert patience_stop_index(resumed.series, 3, 0.02) == 4


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(UserInputError, match="CLIPEarlyStopping.every_n_steps: must be at least 1"):
        CLIPEarlyStopping(every_n_steps=0)
    with pytest.raises(UserInputError, match="CLIPEarlyStopping.min_delta"):
        CLIPEarlyStopping(min_delta=-1)
    with pytest.raises(UserInputError, match="FixedBudget.steps"):
        FixedBudget(steps=0)


def test_fixed_budget_uses_the_summary_contract(tmp_path):
    trainer = L.Trainer(max_steps=20, callbacks=[FixedBudget(steps=7), RunSummary(export=False, report=False)],
                        **trainer_kwargs(tmp_path))
    trainer.fit(DummyModule())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["stop_step"], summary["stopped_by"], summary["max_steps"]) == (7, "fixed_budget", 20)
    assert summary["steps_saved"] == 13 and summary["stop_reason"].startswith("Fixed budget")


def test_clip_early_stopping_samples_the_live_run_without_changing_training(tiny_sd, concept_dir, tmp_path):
    clip = save_tiny_clip(tmp_path / "clip")
    trained = []
    for name, callbacks in [
        # patience 1 with an unreachable min_delta: the second check (step 4) stops the run
        ("clip", [CLIPEarlyStopping(clip_model=str(clip), every_n_steps=2, num_images=3, patience=1, min_delta=1.0,
                                    num_inference_steps=1, batch_size=2, verbose=False)]),
        ("plain", []),
    ]:
        module = TextualInversion(**ti_kwargs(tiny_sd, learning_rate=0.05))
        out = tmp_path / name
        trainer = L.Trainer(max_steps=10 if name == "clip" else 4,
                            callbacks=[*callbacks, DVAREarlyStopping(window=50, stop=False), RunSummary(report=False)],
                            **trainer_kwargs(out))
        trainer.fit(module, datamodule=ConceptDataModule(**data_kwargs(concept_dir)))
        trained.append(module.token_vectors.vectors.detach().clone())
        summary = json.loads((out / "summary.json").read_text())
        if name == "clip":
            assert (summary["stop_step"], summary["stopped_by"]) == (4, "clip")
            assert [s for s, _ in summary["clip_history"]] == [2, 4]
            assert summary["clip_seconds"] > 0 and summary["clip_best_step"] == 2
            # the check at step 4 scored the final weights (the run stopped right after it): sampling them again
            # with the callback's prompts and seeds and scoring by hand gives the same CLIP-I
            check = callbacks[0]
            images = generate(pipeline_from_module(module, check.sampler_name(module)), check.sample_prompts(trainer), [0, 1, 2],
                              guidance_scale=check.guidance_scale, num_inference_steps=1, batch_size=2)
            concept = [load_rgb_image(f) for f in list_image_files(concept_dir)]
            assert summary["clip_history"][1][1] == pytest.approx(clip_i(load_clip(str(clip)), images, concept).mean,
                                                                  abs=1e-6)
            assert summary["clip_history"][0][1] != summary["clip_history"][1][1]  # the samples follow training
    # sampling draws from its own generators: the 4 trained steps are bit-identical to a run without the callback
    assert torch.equal(trained[0], trained[1])


def test_checks_sample_flow_models_with_their_own_sampler_and_refuse_ddim():
    """Unset, the checks sample with DDIM on SD (the paper's) and the model's own sampler on FLUX / SD3; an explicit
    DDPM-family sampler on a flow model fails in one line when the fit starts, not at the first check."""
    from types import SimpleNamespace

    from lightning_custom.callbacks.clip_early_stopping import CLIPEarlyStopping
    from lightning_custom.errors import UserInputError
    from lightning_custom.families.flux import FluxFamily
    from lightning_custom.families.stable_diffusion import StableDiffusionFamily

    class FlowMatchEulerDiscreteScheduler:  # only the class name is read
        pass

    flow = SimpleNamespace(family=FluxFamily(None), noise_scheduler=FlowMatchEulerDiscreteScheduler())
    sd = SimpleNamespace(family=StableDiffusionFamily(None), noise_scheduler=object())
    assert CLIPEarlyStopping().sampler_name(flow) == "default"
    assert CLIPEarlyStopping().sampler_name(sd) == "ddim"
    assert CLIPEarlyStopping(scheduler="euler").sampler_name(sd) == "euler"
    with pytest.raises(UserInputError) as err:
        CLIPEarlyStopping(scheduler="ddim").on_fit_start(None, flow)
    assert "CLIPEarlyStopping.scheduler" in str(err.value) and "\n" not in str(err.value)
