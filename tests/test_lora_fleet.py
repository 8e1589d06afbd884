"""A fleet of DreamBooth-LoRA concepts trains each concept as its own run would (issue 24, item 6)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.data import ConceptDataModule
from lightning_custom.errors import UserInputError
from lightning_custom.methods import DreamBoothLoRA, DreamBoothLoRAFleet
from lightning_custom.methods.lora import LORA_WEIGHT_NAME
from lightning_custom.synthetic.toy_models import make_example_concept_images
from tests.conftest import data_kwargs, trainer_kwargs

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


@pytest.fixture(scope="module")
def second_concept(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("lora_concept_two")
    make_example_concept_images(folder, n=3, size=32, seed=11)
    return str(folder)


def concepts_of(concept_dir: str, second_concept: str) -> list[dict[str, str]]:
    return [{"name": "a", "instance_data_dir": concept_dir, "placeholder_token": "<a>"},
            {"name": "b", "instance_data_dir": second_concept, "placeholder_token": "<b>", "initializer_token": "cat"}]


def lora_kwargs(tiny_sd: str) -> dict:
    return dict(pretrained_model_name_or_path=tiny_sd, rank=4, learning_rate=5e-3, max_grad_norm=1e-3)


def fit(module, data, root: Path) -> None:
    # DVAR observing (no stop): the runs compare at a fixed step; undertrained_below 0: the tiny random model's
    # L_det barely moves (see tests.test_cli.quick_args)
    dvar = DVAREarlyStopping(window=10, threshold=0.15, eval_every_n_steps=5, verbose=False, stop=False,
                             undertrained_below=0)
    trainer = L.Trainer(max_steps=STEPS, callbacks=[dvar, RunSummary(report=False)], **trainer_kwargs(root))
    trainer.fit(module, datamodule=data)


@pytest.mark.parametrize("forward", ["per_concept", "batched"])
def test_each_concept_of_a_lora_fleet_trains_as_its_own_run(forward, tmp_path, tiny_sd, concept_dir, second_concept):
    """Exported LoRA and token after 12 steps: to the bit with the per-concept forward, to float rounding batched.

    The clipping limit is tiny so that every step clips: a fleet clipping by the joint norm of both concepts (or a
    concept's LoRA drawn from the wrong random state, or its token's export reading another tensor) fails here."""
    concepts = concepts_of(concept_dir, second_concept)
    L.seed_everything(59)
    fleet = DreamBoothLoRAFleet(concepts=concepts, initializer_token="toy", forward=forward, **lora_kwargs(tiny_sd))
    fit(fleet, ConceptDataModule(**data_kwargs(concept_dir, concepts=concepts)), tmp_path / "fleet")
    for spec in concepts:
        L.seed_everything(59)
        alone = DreamBoothLoRA(placeholder_token=spec["placeholder_token"], train_token_embedding=True,
                               initializer_token=spec.get("initializer_token", "toy"), **lora_kwargs(tiny_sd))
        data = ConceptDataModule(**data_kwargs(spec["instance_data_dir"], placeholder_token=spec["placeholder_token"]))
        fit(alone, data, tmp_path / spec["name"])
        for file in (LORA_WEIGHT_NAME, "learned_embeds.safetensors"):
            own, in_fleet = load_file(tmp_path / spec["name"] / file), load_file(tmp_path / "fleet" / spec["name"] / file)
            assert set(own) == set(in_fleet) and own
            for key in own:
                if forward == "per_concept":
                    assert torch.equal(own[key], in_fleet[key]), (spec["name"], key)
                else:
                    torch.testing.assert_close(in_fleet[key], own[key], rtol=1e-4, atol=1e-5)
        lora = load_file(tmp_path / "fleet" / spec["name"] / LORA_WEIGHT_NAME)
        assert any(k.endswith("lora.up.weight") and v.abs().sum() > 0 for k, v in lora.items())  # it trained
        summary = json.loads((tmp_path / "fleet" / spec["name"] / "summary.json").read_text())
        assert summary["stop_step"] == STEPS and len(summary["dvar_history"]) == STEPS // 5


def test_a_stopped_lora_concept_keeps_its_weights_while_the_other_trains(tiny_sd, concept_dir, second_concept):
    concepts = concepts_of(concept_dir, second_concept)
    fleet = DreamBoothLoRAFleet(concepts=concepts, **lora_kwargs(tiny_sd))
    data = ConceptDataModule(**data_kwargs(concept_dir, concepts=concepts))
    optimizer = torch.optim.AdamW(fleet.trainable_parameters(), lr=0.05, weight_decay=1e-2)
    batches = iter(data.fleet_loader(fleet))

    def step() -> None:
        optimizer.zero_grad()
        fleet.training_step(next(batches), 0).backward()
        optimizer.step()

    step()
    fleet.freeze_concept("a")
    frozen = [p.detach().clone() for p in fleet.concept_parameters("a")]
    training = [p.detach().clone() for p in fleet.concept_parameters("b")]
    assert len(frozen) > 1  # its LoRA weights and its token vector
    step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(fleet.concept_parameters("a"), frozen))
    assert not all(torch.equal(p.detach(), q) for p, q in zip(fleet.concept_parameters("b"), training))


def test_the_lora_fleet_routes_each_sample_through_its_own_concepts_adapter(tiny_sd, concept_dir, second_concept):
    """Changing concept a's LoRA changes a's samples' loss and never b's (and the denoiser refuses to run without
    knowing whose samples it holds)."""
    concepts = concepts_of(concept_dir, second_concept)
    fleet = DreamBoothLoRAFleet(concepts=concepts, **lora_kwargs(tiny_sd))
    data = ConceptDataModule(**data_kwargs(concept_dir, concepts=concepts))
    batch = next(iter(data.fleet_loader(fleet)))
    before = {k: v.detach() for k, v in fleet.concept_losses(batch).items()}
    fleet._concept_generators = {}  # the same draws again
    with torch.no_grad():
        for param in fleet.concept_parameters("a")[:-1]:  # a's LoRA (its token vector is the last)
            param.add_(0.5)
    after = {k: v.detach() for k, v in fleet.concept_losses(batch).items()}
    assert not torch.equal(after["a"], before["a"])
    assert torch.equal(after["b"], before["b"])
    with pytest.raises(RuntimeError, match="samples_of"):
        fleet.training_loss(batch["a"])


def test_a_lora_fleet_refuses_class_images(tmp_path, tiny_sd, concept_dir, second_concept):
    concepts = [{**c, "class_prompt": "a photo of a toy", "class_data_dir": concept_dir}
                for c in concepts_of(concept_dir, second_concept)]
    fleet = DreamBoothLoRAFleet(concepts=concepts, **lora_kwargs(tiny_sd))
    data = ConceptDataModule(**data_kwargs(concept_dir, concepts=concepts, with_prior_preservation=True,
                                           num_class_images=2))
    trainer = L.Trainer(max_steps=2, **trainer_kwargs(tmp_path))
    with pytest.raises(UserInputError, match="with_prior_preservation"):
        trainer.fit(fleet, datamodule=data)


def test_the_lora_fleet_quickstart_then_sample_and_evaluate_each_concept(tmp_path):
    """configs/quickstart_lora_fleet.yaml as shipped (embedded world model), two of its concepts for 20 steps; then
    ``sample`` and ``evaluate`` on the fleet's folder load each concept's files with diffusers' own loaders
    (``load_lora_weights``, ``load_textual_inversion``) and score each against its own images."""
    from lightning_custom.cli import main

    concepts = json.dumps([{"name": f"c00{i}", "instance_data_dir": f"world:{i}", "placeholder_token": f"<c00{i}>"}
                           for i in (0, 1)])
    main(["fit", "--config", str(ROOT / "configs" / "quickstart_lora_fleet.yaml"), "--trainer.default_root_dir",
          str(tmp_path), "--trainer.enable_progress_bar", "false", "--model.init_args.concepts", concepts,
          "--data.init_args.concepts", concepts, "--trainer.max_steps", "20"])
    run = json.loads((tmp_path / "summary.json").read_text())
    assert run["method"] == "DreamBoothLoRAFleet" and [c["name"] for c in run["concepts"]] == ["c000", "c001"]
    assert all(c["stop_step"] == 20 and c["stopped_by"] == "max_steps" for c in run["concepts"])
    main(["sample", str(tmp_path), "--prompts", "a photo of a {}", "--images_per_prompt", "1",
          "--num_inference_steps", "2", "--device", "cpu"])
    assert all((tmp_path / n / "samples" / "grid.png").is_file() for n in ("c000", "c001"))
    main(["evaluate", str(tmp_path), "--images_per_prompt", "1", "--num_inference_steps", "2", "--device", "cpu"])
    for name in ("c000", "c001"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert 0 < metrics["identity"] <= 1 and metrics["per_concept"][0]["concept_images"] >= 4


def test_a_lora_fleet_resumed_from_a_checkpoint_ends_with_the_same_weights(tmp_path, tiny_sd, concept_dir,
                                                                           second_concept):
    """Every concept's LoRA, token, AdamW state and RNG travel in the checkpoint: the resumed fleet's exported files
    equal the uninterrupted one's to the bit."""
    from lightning_custom.callbacks import StepCheckpoint

    concepts = concepts_of(concept_dir, second_concept)

    def run(root: Path, callbacks=(), ckpt_path=None) -> None:
        L.seed_everything(59)
        fleet = DreamBoothLoRAFleet(concepts=concepts, forward="per_concept", **lora_kwargs(tiny_sd))
        dvar = DVAREarlyStopping(window=10, threshold=0.15, eval_every_n_steps=5, verbose=False, stop=False,
                                 undertrained_below=0)
        trainer = L.Trainer(max_steps=STEPS, callbacks=[dvar, RunSummary(report=False), *callbacks],
                            **trainer_kwargs(root, enable_checkpointing=bool(callbacks)))
        trainer.fit(fleet, datamodule=ConceptDataModule(**data_kwargs(concept_dir, concepts=concepts)),
                    ckpt_path=ckpt_path)

    run(tmp_path / "straight", [StepCheckpoint(dirpath=tmp_path / "ckpt", every_n_steps=5)])
    run(tmp_path / "resumed", ckpt_path=str(next((tmp_path / "ckpt").glob("*step=5*.ckpt"))))
    for name in ("a", "b"):
        for file in (LORA_WEIGHT_NAME, "learned_embeds.safetensors"):
            x, y = (load_file(tmp_path / d / name / file) for d in ("straight", "resumed"))
            assert all(torch.equal(x[k], y[k]) for k in x), (name, file)
