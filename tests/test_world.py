"""The micro world: renderer, captions, held-out concepts and the shipped encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightning_custom.synthetic.toy_models import build_clip_tokenizer
from lightning_custom.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Attributes,
    caption,
    heldout_concepts,
    random_caption,
    render,
    render_dataset,
    training_combinations,
    vocabulary,
)
from lightning_custom.synthetic.world_encoder import HEADS, WorldEncoder, attribute_accuracy, default_encoder_path, judge

ENCODER_ACCURACY_BOUND = 0.95  # per head, on freshly rendered images none of which the encoder trained on


def test_render_is_deterministic_from_the_seed():
    a = Attributes("star", "red", "striped", "grey")
    assert np.array_equal(np.asarray(render(a, 7)), np.asarray(render(a, 7)))
    assert not np.array_equal(np.asarray(render(a, 7)), np.asarray(render(a, 8)))
    images, attrs = render_dataset(6, seed=3)
    again, attrs_again = render_dataset(6, seed=3)
    assert np.array_equal(images, again) and attrs == attrs_again
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8


def test_render_shows_the_background_and_the_object_colour():
    a = Attributes("square", "red", "plain", "blue")
    pixels = np.asarray(render(a, 0, jitter=False)).reshape(-1, 3).astype(int)
    colours = {tuple(c) for c in pixels}
    assert COLOURS["red"] in colours and BACKGROUNDS["blue"] in colours


def test_captions_name_the_attributes_and_are_single_tokens():
    a = Attributes("arrow", "purple", "checkered", "yellow")
    assert caption(a) == "a photo of a purple checkered arrow on a yellow background"
    assert caption(Attributes("star", "red")) == "a photo of a red star on a grey background"
    tokenizer = build_clip_tokenizer(vocabulary())
    for word in vocabulary():
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
    rng = np.random.default_rng(0)
    for attrs in training_combinations()[::97]:
        text = random_caption(attrs, rng)
        assert attrs.shape in text.split()
        for word in text.split():
            assert word in vocabulary()


def test_training_combinations_cover_the_vocabulary_without_invisible_objects():
    combos = training_combinations()
    assert len(combos) == len(set(combos)) == 8 * 4 * (8 * 6 - 5)  # five colours are also background names
    assert all(c.colour != c.background and c.describable for c in combos)


def test_heldout_concepts_are_new_and_have_4_to_6_images():
    concepts = heldout_concepts(120)
    assert len(concepts) >= 100 and len({c.name for c in concepts}) == len(concepts)
    assert len({c.placeholder_token for c in concepts}) == len(concepts)
    seen = set(training_combinations())
    for concept in concepts:
        assert 4 <= len(concept.image_seeds) <= 6
        assert not concept.attrs.describable and concept.attrs not in seen
        assert not set(concept.image_backgrounds) & set(concept.eval_backgrounds)
        assert len(concept.eval_prompts()) >= 2
        assert concept.initializer_token in SHAPES or concept.initializer_token == "shape"
    first = concepts[0]
    images = first.images()
    assert len(images) == len(first.image_seeds) and images[0].size == (32, 32)
    assert np.array_equal(np.asarray(images[0]), np.asarray(heldout_concepts(1)[0].images()[0]))


def test_heldout_concepts_write_their_images(tmp_path):
    concept = heldout_concepts(3)[2]
    folder = concept.write_images(tmp_path / concept.name)
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:02d}.png" for i in range(len(concept.image_seeds))]


def test_encoder_roundtrip(tmp_path):
    model = WorldEncoder(width=8, dim=16)
    model.save(tmp_path / "enc")
    loaded = WorldEncoder.load(tmp_path / "enc")
    images, attrs = render_dataset(4, seed=0)
    a, b = judge(model.eval(), images), judge(loaded, images)
    assert a.labels == b.labels and np.allclose(a.embeddings.numpy(), b.embeddings.numpy())
    assert set(attribute_accuracy(a, attrs)) == {"shape", "colour", "background", "all"}


@pytest.mark.skipif(not (Path(default_encoder_path()) / "model.safetensors").exists(), reason="encoder not trained")
def test_shipped_encoder_names_unseen_rendered_images():
    encoder = WorldEncoder.load()
    images, attrs = render_dataset(300, seed=5)  # its training batches used seeds >= 10000
    accuracy = attribute_accuracy(judge(encoder, images), attrs, heads=tuple(HEADS))
    for head in HEADS:
        assert accuracy[head] >= ENCODER_ACCURACY_BOUND, accuracy


@pytest.mark.slow
def test_world_sd_training_resumes_and_exports_a_diffusers_model(tmp_path):
    import importlib.util
    import json
    import sys

    from lightning_custom.families.components import load_components

    spec = importlib.util.spec_from_file_location("train_world_sd", Path(__file__).resolve().parents[1] / "scripts"
                                                  / "train_world_sd.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules["train_world_sd"] = script
    spec.loader.exec_module(script)
    common = ["--out", str(tmp_path / "model"), "--checkpoint-dir", str(tmp_path / "ckpt"), "--local-dir",
              str(tmp_path / "local"), "--vae-steps", "2", "--dataset-size", "64", "--batch-size", "4"]
    script.main([*common, "--max-steps", "3"])
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 3
    script.main([*common, "--max-steps", "5"])  # resumes at step 3
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 5
    script.main([*common, "--export"])
    components = load_components(str(tmp_path / "model"))
    assert components.unet.config.sample_size == 8 and components.tokenizer.model_max_length == 32


def test_shipped_world_model_draws_the_prompted_attributes(single_thread):
    """A quick look at the bar (96 samples): the embedded model draws what it is asked for."""
    from lightning_custom.world.model import attribute_bar, load_world_pipeline

    result = attribute_bar(load_world_pipeline(), WorldEncoder.load(), n=96)
    assert result["colour"] >= 0.95 and result["background"] >= 0.95, result
    assert result["all"] >= 0.85, result


@pytest.mark.slow
def test_shipped_world_model_passes_the_bar(single_thread):
    """Issue 5's bar on the embedded model: of 512 samples prompted with seen attribute combinations, at least 90%
    show the prompted shape, colour and background (measured: 0.914)."""
    from lightning_custom.world.model import attribute_bar, load_world_pipeline

    result = attribute_bar(load_world_pipeline(), WorldEncoder.load(), n=512)
    assert result["all"] >= 0.90, result
