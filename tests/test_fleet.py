"""A fleet of Textual Inversion concepts trains each concept exactly as its own run would (issue 24)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary, StepCheckpoint
from lightning_custom.data import ConceptDataModule
from lightning_custom.methods import TextualInversion
from lightning_custom.methods.fleet import TextualInversionFleet
from lightning_custom.synthetic.toy_models import make_example_concept_images
from tests.conftest import data_kwargs, ti_kwargs, trainer_kwargs

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def second_concept(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("concept_two")
    make_example_concept_images(folder, n=3, size=32, seed=11)
    return str(folder)


def fleet_of_two(tiny_sd, concept_dir, second_concept, **overrides):
    concepts = [{"name": "a", "instance_data_dir": concept_dir, "placeholder_token": "<a>"},
                {"name": "b", "instance_data_dir": second_concept, "placeholder_token": "<b>",
                 "initializer_token": "cat"}]
    forward = overrides.pop("forward", "batched")
    kwargs = ti_kwargs(tiny_sd, **overrides)
    kwargs.pop("placeholder_token")
    module = TextualInversionFleet(concepts=concepts, forward=forward, **kwargs)
    data = ConceptDataModule(**data_kwargs(concept_dir, concepts=concepts))
    return module, data


def single_run(tiny_sd, folder, token, initializer, **overrides):
    module = TextualInversion(**ti_kwargs(tiny_sd, placeholder_token=token, initializer_token=initializer,
                                          **overrides))
    data = ConceptDataModule(**data_kwargs(folder, placeholder_token=token))
    return module, data


def test_a_concepts_batches_are_those_of_its_own_run(tiny_sd, concept_dir, second_concept):
    fleet, fleet_data = fleet_of_two(tiny_sd, concept_dir, second_concept)
    _, alone_data = single_run(tiny_sd, second_concept, "<b>", "cat")
    alone = alone_data.train_dataloader()
    fleet_batches = iter(fleet_data.fleet_loader(fleet))
    # Over two epochs of the concept's own loader (3 images x 10 repeats / batch 2 = 15 batches per epoch).
    expected = []
    for epoch in range(2):
        alone.sampler.set_epoch(epoch)
        expected += list(alone)
    for step, want in enumerate(expected):
        got = next(fleet_batches)
        assert set(got) == {"a", "b"}
        assert torch.equal(got["b"]["pixel_values"], want["pixel_values"]), step
        assert got["b"]["caption"] == want["caption"], step
    fleet.freeze_concept("a")
    assert set(next(fleet_batches)) == {"b"}  # a stopped concept's samples leave the batch
    fleet.freeze_concept("b")
    assert next(fleet_batches, None) is None  # and the loader ends with the last one


def test_a_concepts_gradient_in_the_fleet_equals_its_own_runs_to_the_bit(tiny_sd, concept_dir, second_concept):
    fleet, fleet_data = fleet_of_two(tiny_sd, concept_dir, second_concept, forward="per_concept")
    batch = next(iter(fleet_data.fleet_loader(fleet)))
    fleet.training_step(batch, 0).backward()
    for name, folder, initializer in (("a", concept_dir, "toy"), ("b", second_concept, "cat")):
        alone, alone_data = single_run(tiny_sd, folder, f"<{name}>", initializer)
        alone_data.train_dataloader().sampler.set_epoch(0)
        own_batch = next(iter(alone_data.train_dataloader()))
        alone.training_loss(own_batch).backward()
        (fleet_vectors,) = fleet.concept_parameters(name)
        assert torch.equal(fleet_vectors.detach(), alone.token_vectors.vectors.detach())  # same start
        assert fleet_vectors.grad is not None and fleet_vectors.grad.abs().sum() > 0
        assert torch.equal(fleet_vectors.grad, alone.token_vectors.vectors.grad), name


def test_a_frozen_concept_keeps_its_vectors_while_the_others_train(tiny_sd, concept_dir, second_concept):
    fleet, fleet_data = fleet_of_two(tiny_sd, concept_dir, second_concept, learning_rate=0.05)
    optimizer = torch.optim.AdamW(fleet.trainable_parameters(), lr=0.05, weight_decay=1e-2)
    batches = iter(fleet_data.fleet_loader(fleet))
    for _ in range(2):
        optimizer.zero_grad()
        fleet.training_step(next(batches), 0).backward()
        optimizer.step()
    fleet.freeze_concept("a")
    (frozen,), (training,) = fleet.concept_parameters("a"), fleet.concept_parameters("b")
    before_a, before_b = frozen.detach().clone(), training.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        fleet.training_step(next(batches), 0).backward()
        optimizer.step()
    assert torch.equal(frozen.detach(), before_a)  # no gradient, no AdamW step, no weight decay
    assert not torch.equal(training.detach(), before_b)


class ExplodeConcept(Callback):
    """Blows up one concept's vectors after a step (a learning rate that diverges, for that concept only)."""

    def __init__(self, name: str, step: int) -> None:
        self.name, self.step = name, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.concept_parameters(self.name)[0].mul_(1e4)


def test_every_concept_stops_by_itself_and_writes_its_own_run_folder(tmp_path, tiny_sd, concept_dir,
                                                                     second_concept):
    fleet, data = fleet_of_two(tiny_sd, concept_dir, second_concept, learning_rate=0.02)
    # undertrained_below 0: the tiny random model's L_det barely moves (see tests.test_cli.quick_args)
    dvar = DVAREarlyStopping(window=15, threshold=0.15, eval_every_n_steps=5, verbose=False, undertrained_below=0)
    trainer = L.Trainer(max_steps=300, callbacks=[dvar, RunSummary(report=False), ExplodeConcept("a", 7)],
                        **trainer_kwargs(tmp_path))
    trainer.fit(fleet, datamodule=data)
    run = json.loads((tmp_path / "summary.json").read_text())
    stops = {c["name"]: c for c in run["concepts"]}
    assert stops["a"]["stopped_by"] == "diverged" and stops["a"]["stop_step"] == 10  # the first evaluation after
    assert stops["b"]["stopped_by"] == "dvar" and stops["b"]["stop_step"] > 10  # b went on alone
    assert run["stopped_by"] == "diverged" and run["stop_step"] == stops["b"]["stop_step"] == trainer.global_step
    for name, stop in stops.items():
        own = json.loads((tmp_path / name / "summary.json").read_text())
        assert own["stop_step"] == stop["stop_step"] and own["stopped_by"] == stop["stopped_by"]
        assert own["placeholder_token"] == f"<{name}>" and own["dvar_history"][-1][0] == stop["stop_step"]
    assert not (tmp_path / "a" / "learned_embeds.safetensors").exists()  # the exploded vectors are not exported
    embeds = load_file(tmp_path / "b" / "learned_embeds.safetensors")
    assert torch.equal(embeds["<b>"][0], fleet.concept_parameters("b")[0].detach()[0])


def test_the_fleet_quickstart_runs_through_the_cli(tmp_path, tiny_sd, concept_dir, second_concept):
    """configs/quickstart_fleet.yaml as shipped, on the tiny model and two concepts (the shipped eight take ~40 s)."""
    from lightning_custom.cli import main

    concepts = json.dumps([{"name": "a", "instance_data_dir": concept_dir, "placeholder_token": "<a>"},
                           {"name": "b", "instance_data_dir": second_concept, "placeholder_token": "<b>"}])
    main(["fit", "--config", str(ROOT / "configs" / "quickstart_fleet.yaml"), "--trainer.default_root_dir",
          str(tmp_path), "--trainer.enable_progress_bar", "false", "--model.init_args.pretrained_model_name_or_path",
          tiny_sd, "--model.init_args.initializer_token", "toy", "--model.init_args.concepts", concepts,
          "--data.init_args.concepts", concepts, "--data.init_args.resolution", "16", "--trainer.max_steps", "300",
          "--dvar.window", "15", "--dvar.undertrained_below", "0"])  # the tiny random model: see quick_args
    run = json.loads((tmp_path / "summary.json").read_text())
    assert [c["name"] for c in run["concepts"]] == ["a", "b"] and run["method"] == "TextualInversionFleet"
    assert all(c["stopped_by"] == "dvar" and c["stop_step"] < 300 for c in run["concepts"])
    assert run["stop_step"] == max(c["stop_step"] for c in run["concepts"])
    for name in ("a", "b"):
        assert (tmp_path / name / "learned_embeds.safetensors").is_file()
    from lightning_custom.runs.gather import gather_table

    rows = gather_table([str(tmp_path)])  # one row per concept, not the fleet's own summary beside them
    assert sorted(row["placeholder_token"] for row in rows) == ["<a>", "<b>"]
    from lightning_custom.dvar.replay import find_summaries

    assert find_summaries([tmp_path]) == [tmp_path / "a" / "summary.json", tmp_path / "b" / "summary.json"]
    # sample on the fleet's folder samples every concept into its own folder
    main(["sample", str(tmp_path), "--prompts", "a photo of a {}", "--images_per_prompt", "1",
          "--num_inference_steps", "2", "--device", "cpu"])
    assert all((tmp_path / name / "samples" / "grid.png").is_file() for name in ("a", "b"))
    walls = [json.loads((tmp_path / n / "summary.json").read_text())["wall_seconds"] for n in ("a", "b")]
    assert sum(walls) == pytest.approx(run["wall_seconds"], abs=0.01)  # the fleet's time, shared out by steps


def test_world_concepts_resolve_to_rendered_folders(tmp_path, monkeypatch):
    from lightning_custom.synthetic.embedded import resolve_instance_dir

    monkeypatch.setenv("LIGHTNING_CUSTOM_CACHE", str(tmp_path))
    folder = Path(resolve_instance_dir("world:3"))
    assert folder.parent.name == "seed2024" and folder.name.startswith("c003-") and len(list(folder.glob("*.png"))) >= 4
    assert Path(resolve_instance_dir("world:3@7")).parent.name == "seed7"
    assert resolve_instance_dir("world:3") == str(folder)  # rendered once


def fleet_fit(root, tiny_sd, concept_dir, second_concept, callbacks=(), ckpt_path=None):
    fleet, data = fleet_of_two(tiny_sd, concept_dir, second_concept, learning_rate=0.02)
    dvar = DVAREarlyStopping(window=15, threshold=0.15, eval_every_n_steps=5, verbose=False, undertrained_below=0)
    trainer = L.Trainer(max_steps=300, callbacks=[dvar, RunSummary(report=False), *callbacks],
                        **trainer_kwargs(root, enable_checkpointing=any(isinstance(c, StepCheckpoint)
                                                                        for c in callbacks)))
    trainer.fit(fleet, datamodule=data, ckpt_path=ckpt_path)
    return fleet, json.loads((root / "summary.json").read_text())


def test_a_fleet_resumed_after_some_concepts_stopped_ends_with_the_same_stops_and_vectors(
        tmp_path, tiny_sd, concept_dir, second_concept):
    checkpoints = StepCheckpoint(dirpath=tmp_path / "ckpt", every_n_steps=15)
    straight, expected = fleet_fit(tmp_path / "straight", tiny_sd, concept_dir, second_concept,
                                   [ExplodeConcept("a", 7), checkpoints])
    stops = {c["name"]: c["stop_step"] for c in expected["concepts"]}
    assert stops["a"] == 10 and stops["b"] > 20  # the checkpoint at 15 has one concept stopped, one training
    resumed, summary = fleet_fit(tmp_path / "resumed", tiny_sd, concept_dir, second_concept,
                                 ckpt_path=str(next((tmp_path / "ckpt").glob("*step=15*.ckpt"))))
    assert summary["concepts"] == expected["concepts"]
    for name in ("a", "b"):
        assert torch.equal(resumed.concept_parameters(name)[0], straight.concept_parameters(name)[0]), name
    own = json.loads((tmp_path / "resumed" / "b" / "summary.json").read_text())
    assert own["dvar_history"] == json.loads((tmp_path / "straight" / "b" / "summary.json").read_text())[
        "dvar_history"]


def test_bad_concept_lists_are_one_line_and_train_nothing(tmp_path, tiny_sd, concept_dir, capsys):
    from lightning_custom.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "bad.json").write_text("[{")
    good = {"instance_data_dir": concept_dir, "placeholder_token": "<a>", "name": "a"}
    cases = {
        "same token": ([good, {**good, "name": "b"}], "placeholder_token ['<a>'] used by more than one concept"),
        "same name": ([good, {**good, "placeholder_token": "<b>"}], "name ['a'] used by more than one concept"),
        "empty folder": ([{**good, "instance_data_dir": str(empty)}], "holds no images"),
        "not JSON": (str(tmp_path / "bad.json"), "is not valid JSON"),
        "no concepts": ([], "expected a non-empty list of concepts"),
    }
    for label, (concepts, needle) in cases.items():
        value = concepts if isinstance(concepts, str) else json.dumps(concepts)
        root = tmp_path / label.replace(" ", "_")
        with pytest.raises(SystemExit) as refused:
            main(["fit", "--config", str(ROOT / "configs" / "quickstart_fleet.yaml"), "--trainer.default_root_dir",
                  str(root), "--model.init_args.pretrained_model_name_or_path", tiny_sd,
                  "--model.init_args.concepts", value, "--data.init_args.concepts", value])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert refused.value.code == 2 and len(errors) == 1 and needle in errors[0], (label, err[-1500:])
        assert "Traceback" not in err and not root.exists(), label


@pytest.mark.slow
def test_under_two_process_ddp_each_concept_stops_where_its_own_ddp_run_stops(tmp_path, tiny_sd, concept_dir,
                                                                             second_concept):
    fleet, data = fleet_of_two(tiny_sd, concept_dir, second_concept, learning_rate=0.02)
    ddp = dict(strategy="ddp_spawn", devices=2)
    dvar = dict(window=15, threshold=0.15, eval_every_n_steps=5, verbose=False, undertrained_below=0)
    trainer = L.Trainer(max_steps=300, callbacks=[DVAREarlyStopping(**dvar), RunSummary(report=False)],
                        **trainer_kwargs(tmp_path / "fleet", **ddp))
    trainer.fit(fleet, datamodule=data)
    run = json.loads((tmp_path / "fleet" / "summary.json").read_text())
    for name, folder, initializer in (("a", concept_dir, "toy"), ("b", second_concept, "cat")):
        module, alone_data = single_run(tiny_sd, folder, f"<{name}>", initializer, learning_rate=0.02)
        trainer = L.Trainer(max_steps=300, callbacks=[DVAREarlyStopping(**dvar), RunSummary(report=False)],
                            **trainer_kwargs(tmp_path / name, **ddp))
        trainer.fit(module, datamodule=alone_data)
        alone = json.loads((tmp_path / name / "summary.json").read_text())
        together = json.loads((tmp_path / "fleet" / name / "summary.json").read_text())
        assert together["stop_step"] == alone["stop_step"] and together["stopped_by"] == alone["stopped_by"]
        assert together["dvar_history"] == alone["dvar_history"]  # the ranks' shares are the single run's
    assert len(run["concepts"]) == 2


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_multi_encoder_fleets_match_their_single_runs_to_the_bit(family, tiny_sdxl, concept_dir, second_concept):
    """SDXL (CLIP-L + CLIP-G) and FLUX.1's pivotal variant (CLIP-L + T5): every encoder's vectors, per concept."""
    model = tiny_sdxl if family == "sdxl" else "embedded:tiny-flux"
    extra = {"t5_num_vectors": 1} if family == "flux" else {}
    fleet, fleet_data = fleet_of_two(model, concept_dir, second_concept, forward="per_concept", **extra)
    batch = next(iter(fleet_data.fleet_loader(fleet)))
    fleet.training_step(batch, 0).backward()
    alone, alone_data = single_run(model, second_concept, "<b>", "cat", **extra)
    alone_data.train_dataloader().sampler.set_epoch(0)
    alone.training_loss(next(iter(alone_data.train_dataloader()))).backward()
    together = fleet.concept_parameters("b")
    own = [module.vectors for module in alone.token_vector_modules]
    assert len(together) == len(own) == 2
    for mine, theirs in zip(together, own):
        assert mine.grad is not None and torch.equal(mine.grad, theirs.grad)
    keys = set(fleet.concept_embeddings("b"))
    assert keys == ({"clip_l", "clip_g"} if family == "sdxl" else {"clip_l", "t5"})


def test_a_fleet_of_one_stops_where_its_single_run_stops(tmp_path, tiny_sd, concept_dir):
    concepts = [{"name": "a", "instance_data_dir": concept_dir, "placeholder_token": "<a>"}]
    kwargs = ti_kwargs(tiny_sd, learning_rate=0.02)
    kwargs.pop("placeholder_token")
    dvar = dict(window=15, threshold=0.15, eval_every_n_steps=5, verbose=False, undertrained_below=0)
    fleet = TextualInversionFleet(concepts=concepts, **kwargs)
    trainer = L.Trainer(max_steps=300, callbacks=[DVAREarlyStopping(**dvar), RunSummary(report=False)],
                        **trainer_kwargs(tmp_path / "fleet"))
    trainer.fit(fleet, datamodule=ConceptDataModule(**data_kwargs(concept_dir, concepts=concepts)))
    module, data = single_run(tiny_sd, concept_dir, "<a>", "toy", learning_rate=0.02)
    trainer = L.Trainer(max_steps=300, callbacks=[DVAREarlyStopping(**dvar), RunSummary(report=False)],
                        **trainer_kwargs(tmp_path / "alone"))
    trainer.fit(module, datamodule=data)
    together = json.loads((tmp_path / "fleet" / "a" / "summary.json").read_text())
    alone = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert together["stopped_by"] == alone["stopped_by"] == "dvar" and together["stop_step"] == alone["stop_step"]
    assert together["dvar_history"] == alone["dvar_history"]



def test_the_batched_forward_draws_the_same_noise_and_matches_the_exact_gradient(tiny_sd, concept_dir,
                                                                                 second_concept):
    """One forward over every concept's samples: the same per-concept draws, the gradient up to float rounding."""
    grads = {}
    for forward in ("per_concept", "batched"):
        fleet, data = fleet_of_two(tiny_sd, concept_dir, second_concept, forward=forward)
        batch = next(iter(data.fleet_loader(fleet)))
        losses = fleet.concept_losses(batch)
        torch.stack(list(losses.values())).sum().backward()
        grads[forward] = ({n: fleet.concept_parameters(n)[0].grad.clone() for n in ("a", "b")},
                          {n: loss.detach() for n, loss in losses.items()})
        assert {str(g.get_state().sum().item()) for g in fleet._concept_generators.values()} == {
            str(fleet.concept_generator("a").get_state().sum().item())}  # each concept drew the same amount
    for name in ("a", "b"):
        exact, batched = grads["per_concept"][0][name], grads["batched"][0][name]
        assert torch.allclose(batched, exact, rtol=1e-4, atol=1e-8) and exact.abs().sum() > 0
        assert torch.allclose(grads["batched"][1][name], grads["per_concept"][1][name], rtol=1e-5)


def test_the_batched_fleet_evaluates_every_concept_in_one_forward_with_each_ones_own_l_det(tmp_path, tiny_sd,
                                                                                           concept_dir,
                                                                                           second_concept):
    """forward=batched: the data module serves every concept's fixed batch as one, and each concept's L_det from
    the one forward equals its own evaluation (float rounding); a stopped concept is no longer computed."""
    fleet, data = fleet_of_two(tiny_sd, concept_dir, second_concept)
    trainer = L.Trainer(max_steps=1, **trainer_kwargs(tmp_path))
    trainer.strategy.connect(fleet)
    data.trainer, fleet.trainer = trainer, trainer
    data.setup("fit")
    together = data.val_dataloader()
    batch = next(iter(together))
    assert set(batch["concepts"]) == {"a", "b"}
    losses = fleet.concept_deterministic_losses(batch["concepts"])
    for name in ("a", "b"):
        alone = fleet.deterministic_loss(batch["concepts"][name])
        torch.testing.assert_close(losses[name], alone, rtol=1e-5, atol=0)
    assert not torch.equal(losses["a"], losses["b"])
    fleet.freeze_concept("a")
    assert set(fleet.concept_deterministic_losses(batch["concepts"])) == {"b"}
    per_concept, _ = fleet_of_two(tiny_sd, concept_dir, second_concept, forward="per_concept")
    trainer.strategy.connect(per_concept)
    per_concept.trainer = trainer
    assert isinstance(data.val_dataloader(), list)  # one loader per concept: each concept's own forward, bit-exact
