"""The world's encoder: a small CNN that names an image's shape, colour, pattern and background.

It plays CLIP's and DINO's parts in the micro world. Its heads judge prompt fidelity (does "... on a blue
background" give a blue background?), and its normalised penultimate features give an identity similarity
(generated images against a concept's images, as CLIP-I / DINO do).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lightning_custom.synthetic.world_render import BACKGROUNDS, COLOURS, PATTERNS, SHAPES, Attributes

HEADS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "background": tuple(BACKGROUNDS),
}
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def default_encoder_path() -> str:
    """The encoder shipped in the package."""
    return str(resources.files("lightning_custom") / "assets" / "world-encoder")


class WorldEncoder(nn.Module):
    """Four conv stages (32 px -> 4 px), global average pooling, a ``dim``-wide embedding and one linear head per
    attribute.

    Args:
        width: channels of the first stage (doubled at the second and third).
        dim: embedding width.
        image_size: side of the (square) input images; others are resized.
    """

    def __init__(self, width: int = 24, dim: int = 128, image_size: int = 32):
        super().__init__()
        self.config = {"width": width, "dim": dim, "image_size": image_size}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        w = width
        self.trunk = nn.Sequential(block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2),
                                   block(2 * w, 4 * w), nn.MaxPool2d(2), block(4 * w, 4 * w))
        self.embed = nn.Linear(4 * w, dim)
        self.heads = nn.ModuleDict({name: nn.Linear(dim, len(labels)) for name, labels in HEADS.items()})

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embeddings (before normalisation) of images in [-1, 1], N x 3 x H x W."""
        size = self.config["image_size"]
        if pixels.shape[-1] != size or pixels.shape[-2] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return F.silu(self.embed(self.trunk(pixels).mean(dim=(2, 3))))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head, plus ``"embedding"`` (the L2-normalised features)."""
        h = self.features(pixels)
        out = {name: head(h) for name, head in self.heads.items()}
        out["embedding"] = F.normalize(h, dim=-1)
        return out

    def save(self, path: str | Path) -> Path:
        """Writes ``model.safetensors`` and ``config.json`` to the folder ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS))
        (path / CONFIG).write_text(json.dumps({**self.config, "heads": HEADS}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path | None = None) -> WorldEncoder:
        """Loads a saved encoder (default: the shipped one), in eval mode."""
        from safetensors.torch import load_file

        path = Path(path or default_encoder_path())
        config = json.loads((path / CONFIG).read_text())
        model = cls(width=config["width"], dim=config["dim"], image_size=config["image_size"])
        model.load_state_dict(load_file(str(path / WEIGHTS)))
        return model.eval()


def to_pixels(images: Sequence[Image.Image] | np.ndarray) -> torch.Tensor:
    """PIL images or a uint8 N x H x W x 3 array -> float N x 3 x H x W in [-1, 1]."""
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(img.convert("RGB")) for img in images])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass
class Judgement:
    """What the encoder sees in a batch of images: predicted labels per head and the embeddings."""

    labels: dict[str, list[str]]
    embeddings: torch.Tensor


@torch.no_grad()
def judge(encoder: WorldEncoder, images: Sequence[Image.Image] | np.ndarray, batch_size: int = 256) -> Judgement:
    """Predicted shape / colour / pattern / background names and normalised embeddings of ``images``."""
    pixels = to_pixels(images)
    labels: dict[str, list[str]] = {name: [] for name in HEADS}
    embeddings = []
    for start in range(0, len(pixels), batch_size):
        out = encoder(pixels[start : start + batch_size])
        for name, names in HEADS.items():
            labels[name] += [names[i] for i in out[name].argmax(-1).tolist()]
        embeddings.append(out["embedding"])
    return Judgement(labels, torch.cat(embeddings))


def identity_similarity(encoder: WorldEncoder, generated: Sequence[Image.Image], concept: Sequence[Image.Image]) -> float:
    """Mean cosine similarity of every generated image to every concept image (CLIP-I / DINO's form)."""
    a = judge(encoder, generated).embeddings
    b = judge(encoder, concept).embeddings
    return float((a @ b.T).mean())


def attribute_accuracy(judgement: Judgement, targets: Sequence[Attributes],
                       heads: Sequence[str] = ("shape", "colour", "background")) -> dict[str, float]:
    """Fraction of images whose predicted label equals the target's, per head, plus ``"all"`` (every head right).
    A target whose attribute lies outside the vocabulary (a held-out shape, say) is skipped for that head."""
    result: dict[str, float] = {}
    all_ok = np.ones(len(targets), dtype=bool)
    for head in heads:
        ok = np.array([judgement.labels[head][i] == getattr(t, head) for i, t in enumerate(targets)])
        known = np.array([getattr(t, head) in HEADS[head] for t in targets])
        result[head] = float(ok[known].mean()) if known.any() else float("nan")
        all_ok &= ok | ~known
    result["all"] = float(all_ok.mean())
    return result
