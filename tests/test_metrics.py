"""CLIP-I, CLIP-T and DINO: tiny models saved and loaded back, scores against hand-computed cosines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer, ViTModel

from lightning_custom.errors import UserInputError
from lightning_custom.inference.metrics import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    clip_i,
    clip_t,
    dino,
    load_clip,
    load_dino,
    without_placeholder,
)
from lightning_custom.synthetic.toy_models import save_tiny_clip, save_tiny_dino

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return str(save_tiny_clip(tmp_path_factory.mktemp("metrics") / "clip", seed=0))


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory) -> str:
    return str(save_tiny_dino(tmp_path_factory.mktemp("metrics") / "dino", seed=0))


def random_images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def by_hand(images, mean, std):
    """Pixel values of images already at the model's size: (x / 255 - mean) / std, no resizing."""
    arrays = [(np.asarray(im, dtype=np.float64) / 255.0 - np.array(mean)) / np.array(std) for im in images]
    return torch.tensor(np.stack(arrays), dtype=torch.float32).permute(0, 3, 1, 2)


def cosine(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def features(output):
    return output if torch.is_tensor(output) else output.pooler_output


def test_clip_i_and_clip_t_match_hand_computed_cosines(tiny_clip):
    scorer = load_clip(tiny_clip)
    generated, concept = random_images(3, seed=1), random_images(2, seed=2)
    texts = ["a photo of a dog", "a red cat on the grass", "a toy"]
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip)
    with torch.no_grad():
        gen = features(model.get_image_features(pixel_values=by_hand(generated, CLIP_MEAN, CLIP_STD))).numpy()
        ref = features(model.get_image_features(pixel_values=by_hand(concept, CLIP_MEAN, CLIP_STD))).numpy()
        txt = features(model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt"))).numpy()

    result = clip_i(scorer, generated, concept)
    expected = [np.mean([cosine(g, r) for r in ref]) for g in gen]
    np.testing.assert_allclose(result.per_image, expected, atol=1e-5)
    assert result.mean == pytest.approx(np.mean(expected), abs=1e-5)

    result = clip_t(scorer, generated, texts)
    expected = [cosine(g, t) for g, t in zip(gen, txt)]
    np.testing.assert_allclose(result.per_image, expected, atol=1e-5)
    assert result.mean == pytest.approx(np.mean(expected), abs=1e-5)
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        clip_t(scorer, generated, texts[:2])


def test_dino_matches_hand_computed_cls_cosines(tiny_dino):
    scorer = load_dino(tiny_dino)
    generated, concept = random_images(2, seed=3), random_images(3, seed=4)
    model = ViTModel.from_pretrained(tiny_dino, add_pooling_layer=False).eval()
    with torch.no_grad():
        gen = model(pixel_values=by_hand(generated, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0].numpy()
        ref = model(pixel_values=by_hand(concept, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0].numpy()
    result = dino(scorer, generated, concept)
    expected = [np.mean([cosine(g, r) for r in ref]) for g in gen]
    np.testing.assert_allclose(result.per_image, expected, atol=1e-5)


def test_an_image_is_most_similar_to_itself(tiny_clip, tiny_dino):
    image = random_images(1, seed=5)
    assert clip_i(load_clip(tiny_clip), image, image).mean == pytest.approx(1.0, abs=1e-6)
    assert dino(load_dino(tiny_dino), image, image).mean == pytest.approx(1.0, abs=1e-6)


def test_preprocessing_resizes_crops_and_follows_the_processor_config(tiny_clip, tmp_path):
    scorer = load_clip(tiny_clip)
    wide = Image.fromarray(np.random.default_rng(6).integers(0, 256, (40, 64, 3), dtype=np.uint8))
    assert scorer.transform([wide]).shape == (1, 3, 32, 32)
    # A square image at the model size is only normalised: exactly the hand computation.
    image = random_images(1, seed=7)
    torch.testing.assert_close(scorer.transform(image), by_hand(image, CLIP_MEAN, CLIP_STD), atol=1e-6, rtol=0)
    # preprocessor_config.json wins over the defaults (as transformers' processors read it).
    config = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2}
    folder = tmp_path / "clip"
    save_tiny_clip(folder, seed=0)
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    transform = load_clip(str(folder)).transform
    assert (transform.mean, transform.std, transform.mode, transform.crop) == ((0.5,) * 3, (0.5,) * 3, "bilinear", 32)
    torch.testing.assert_close(transform(image), by_hand(image, [0.5] * 3, [0.5] * 3), atol=1e-6, rtol=0)


def test_clip_t_text_drops_the_pseudo_token():
    assert without_placeholder("a photo of <cat-toy> on the beach", "<cat-toy>") == "a photo of on the beach"
    assert without_placeholder("<cat-toy> <cat-toy>_1 in the snow", "<cat-toy>") == "in the snow"
    assert without_placeholder("a {} on the beach", None) == "a on the beach"
    assert without_placeholder("a sks dog", "sks") == "a dog"


def test_bad_model_sources_are_one_line_errors(tmp_path):
    with pytest.raises(UserInputError, match="--clip_model: no such folder"):
        load_clip(str(tmp_path / "missing"))
    with pytest.raises(UserInputError, match="--dino_model: .* is not a transformers model folder"):
        load_dino(str(tmp_path))
    with pytest.raises(UserInputError, match=r"--clip_model: cannot load 'org/not-cached' \(offline"):
        load_clip("org/not-cached")
