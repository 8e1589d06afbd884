"""Regenerates the random tiny-sd assets shipped inside ``lightning_custom`` (``embedded:tiny-sd`` and the
``embedded:cat-toy`` concept). The embedded default (``embedded``) is the trained world model, written by
``scripts/train_world_sd.py --export``; its concept ``striped-star`` is ``lightning_custom.world`` concept 2.

Writes (fully offline, deterministic):

* ``<output>/tiny-sd/``: a tiny randomly initialised Stable Diffusion pipeline
  folder (diffusers ``save_pretrained`` layout, safetensors weights). Latents are
  ``sample_size`` square and images ``2 * sample_size`` square (VAE factor 2).
* ``<output>/concepts/cat-toy/``: procedural example images of one concept.

Usage::

    python scripts/make_embedded_default.py [--output lightning_custom/assets]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning_custom.synthetic.toy_models import make_example_concept_images, save_tiny_sd  # noqa: E402


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "lightning_custom" / "assets")
    parser.add_argument("--sample-size", type=int, default=16, help="latent size (images are 2x this)")
    parser.add_argument("--image-size", type=int, default=64, help="concept image size in pixels")
    parser.add_argument("--num-images", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip the reload + 2-step generation check")
    args = parser.parse_args(argv)

    sd_dir = args.output / "tiny-sd"
    concept_dir = args.output / "concepts" / "cat-toy"
    for d in (sd_dir, concept_dir):
        if d.exists():
            shutil.rmtree(d)
    save_tiny_sd(sd_dir, seed=args.seed, sample_size=args.sample_size)
    make_example_concept_images(concept_dir, n=args.num_images, size=args.image_size, seed=args.seed)

    if not args.no_check:
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            "a photo of a cat toy", num_inference_steps=2, output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        print(f"check: generated images of shape {tuple(image.shape)}")

    for d in (sd_dir, concept_dir):
        print(f"{d}: {_du(d) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
