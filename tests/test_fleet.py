"""A fleet of Textual Inversion concepts trains each concept exactly as its own run would (issue 24)."""

from __future__ import annotations

import pytest
import torch

from lightning_custom.data import ConceptDataModule
from lightning_custom.methods import TextualInversion
from lightning_custom.methods.fleet import TextualInversionFleet
from lightning_custom.toy_models import make_example_concept_images
from tests.conftest import data_kwargs, ti_kwargs

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def second_concept(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("concept_two")
    make_example_concept_images(folder, n=3, size=32, seed=11)
    return str(folder)


def fleet_of_two(tiny_sd, concept_dir, second_concept, **overrides):
    concepts = [{"name": "a", "instance_data_dir": concept_dir, "placeholder_token": "<a>"},
                {"name": "b", "instance_data_dir": second_concept, "placeholder_token": "<b>",
                 "initializer_token": "cat"}]
    kwargs = ti_kwargs(tiny_sd, **overrides)
    kwargs.pop("placeholder_token")
    module = TextualInversionFleet(concepts=concepts, **kwargs)
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
    fleet, fleet_data = fleet_of_two(tiny_sd, concept_dir, second_concept)
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
