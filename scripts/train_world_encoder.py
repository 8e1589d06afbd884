"""Train the world's encoder (lightning_custom/assets/world-encoder) on freshly rendered images.

    OMP_NUM_THREADS=1 nice -n 19 python scripts/train_world_encoder.py --steps 2000

Each step renders a new batch (so there is no overfitting to a fixed set), lightly degraded (blur, noise) so the
heads also judge the imperfect images a small diffusion model draws. Prints accuracy on a held-out rendered set.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from lightning_custom.synthetic.world_encoder import HEADS, WorldEncoder, attribute_accuracy, default_encoder_path, judge, to_pixels
from lightning_custom.synthetic.world_render import render_dataset


def degrade(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur and Gaussian noise on half of the batch."""
    n = pixels.shape[0]
    pick = torch.rand(n, generator=generator) < 0.5
    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    alpha = torch.rand(n, 1, 1, 1, generator=generator)
    out = torch.where(pick[:, None, None, None], alpha * blurred + (1 - alpha) * pixels, pixels)
    noise = torch.randn(out.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.15
    return (out + noise).clamp(-1, 1)


def main(argv: list[str] | None = None) -> None:
    """Train, evaluate on a held-out rendered set, save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default=default_encoder_path())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", default=None, help="start from this saved encoder (fine-tuning)")
    parser.add_argument("--vae", default=None, help="diffusers model folder whose VAE reconstructs a share of each "
                        "batch, so the heads judge a generator's blur as the rendered object")
    parser.add_argument("--vae-share", type=float, default=0.5)
    parser.add_argument("--step-offset", type=int, default=0, help="first render seed offset (use new images)")
    args = parser.parse_args(argv)
    vae = None
    if args.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, subfolder="vae").eval().requires_grad_(False)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = WorldEncoder.load(args.init).train() if args.init else WorldEncoder()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    index = {name: {label: i for i, label in enumerate(labels)} for name, labels in HEADS.items()}
    start = time.time()
    for step in range(args.steps):
        images, attrs = render_dataset(args.batch_size, seed=10_000 + args.step_offset + step)
        pixels = to_pixels(images)
        if vae is not None:
            k = int(args.batch_size * args.vae_share)
            with torch.no_grad():
                pixels[:k] = vae.decode(vae.encode(pixels[:k]).latent_dist.sample(generator)).sample.clamp(-1, 1)
        pixels = degrade(pixels, generator)
        out = model(pixels)
        loss = sum(F.cross_entropy(out[name], torch.tensor([index[name][getattr(a, name)] for a in attrs]))
                   for name in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    model.eval()
    images, attrs = render_dataset(2000, seed=1)  # training batches use seeds >= 10000
    acc = attribute_accuracy(judge(model, images), attrs, heads=tuple(HEADS))
    print("held-out rendered accuracy:", {k: round(v, 4) for k, v in acc.items()})
    if vae is not None:
        with torch.no_grad():
            recon = torch.cat([vae.decode(vae.encode(to_pixels(images[i : i + 250])).latent_dist.mean).sample
                               for i in range(0, len(images), 250)])
        recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        acc = attribute_accuracy(judge(model, recon), attrs, heads=tuple(HEADS))
        print("held-out VAE-reconstruction accuracy:", {k: round(v, 4) for k, v in acc.items()})
    model.save(args.out)
    print("saved", args.out)


if __name__ == "__main__":
    main()
