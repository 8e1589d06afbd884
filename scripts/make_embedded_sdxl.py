"""Regenerates the embedded tiny SDXL model shipped inside ``lightning_custom`` (``embedded:tiny-sdxl``).

Writes (fully offline, deterministic) ``<output>/tiny-sdxl/``: a tiny randomly initialised Stable Diffusion XL
pipeline folder (two CLIP text encoders, the second with projection; a UNet with ``text_time`` added conditioning;
a VAE with SDXL's scaling factor). Latents are ``sample_size`` square and images ``2 * sample_size`` square.

Usage::

    python scripts/make_embedded_sdxl.py [--output lightning_custom/assets]
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

from lightning_custom.synthetic.toy_models import save_tiny_sdxl  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "lightning_custom" / "assets")
    parser.add_argument("--sample-size", type=int, default=16, help="latent size (images are 2x this)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true", help="skip the reload + 2-step generation check")
    args = parser.parse_args(argv)

    out = args.output / "tiny-sdxl"
    if out.exists():
        shutil.rmtree(out)
    save_tiny_sdxl(out, seed=args.seed, sample_size=args.sample_size)
    if not args.no_check:
        import torch
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(out)
        pipe.set_progress_bar_config(disable=True)
        size = 2 * args.sample_size
        image = pipe("a photo of a cat toy", num_inference_steps=2, height=size, width=size, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
        print(f"check: generated images of shape {tuple(image.shape)}")
    print(f"{out}: {sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
