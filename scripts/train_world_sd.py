"""Train the micro text-to-image model of the world, resumably (issue 5, item 2).

Stage 1 trains the VAE (32 px -> 8 x 8 x 4) and writes it, with the tokenizer and scheduler, to the staging model
folder. Stage 2 trains the text encoder and the latent UNet together on VAE latents of rendered images, and keeps
going until ``--max-minutes`` / ``--max-steps`` or a signal. Run it again with the same command to resume:

    OMP_NUM_THREADS=1 setsid nohup nice -n 19 python scripts/train_world_sd.py --max-minutes 600 \
        > runs/world-sd/train.log 2>&1 &

Checkpoints:
  * ``checkpoints/world-sd/trainable.safetensors`` (UNet + text encoder EMA weights in fp16, about 6 MB) and
    ``state.json`` (step, loss and bar history): small, committed to git, overwritten in place.
  * ``runs/world-sd/full.pt`` (fp32 weights, EMA, optimizer): local, preferred when it is at least as recent.
``--export`` writes the EMA weights as a full diffusers folder to the staging path
(``lightning_custom/assets/world-sd``); ``--bar N`` measures the issue's bar on N samples.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lightning_custom.world.model import (
    assemble_pipeline,
    attribute_bar,
    build_world_scheduler,
    build_world_text_encoder,
    build_world_tokenizer,
    build_world_unet,
    build_world_vae,
    staging_model_path,
)
from lightning_custom.synthetic.world_render import random_caption, render_dataset

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "world-sd"
LOCAL = ROOT / "runs" / "world-sd"


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(out: Path, steps: int, batch_size: int, seed: int, latent_channels: int = 4, *,
              num_images: int = 8192, device: torch.device | str = "cpu") -> None:
    """Stage 1: MSE reconstruction with a small KL term; sets ``scaling_factor`` to 1 / std of the latents."""
    device = torch.device(device)
    vae = build_world_vae(seed, latent_channels).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    images, _ = render_dataset(num_images, seed=seed + 1)
    pixels = to_pixels(images).to(device)
    g = torch.Generator().manual_seed(seed)
    g_device = torch.Generator(device).manual_seed(seed)
    start = time.time()
    for step in range(steps):
        x = pixels[torch.randint(len(pixels), (batch_size,), generator=g).to(device)]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=g_device)).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.5f} kl {kl.item():.3f} {time.time() - start:.0f}s")
    vae.eval()
    with torch.no_grad():
        test = to_pixels(render_dataset(512, seed=seed + 2)[0]).to(device)
        dist = vae.encode(test).latent_dist
        mse = F.mse_loss(vae.decode(dist.mean).sample, test).item()
        vae.register_to_config(scaling_factor=float(1.0 / dist.mean.std()))
    psnr = 10 * math.log10(4.0 / mse)
    log(f"vae held-out reconstruction: mse {mse:.5f} (pixels in [-1, 1]), PSNR {psnr:.2f} dB, "
        f"scaling_factor {vae.config.scaling_factor:.4f}")
    vae.to("cpu").save_pretrained(out / "vae")
    build_world_tokenizer().save_pretrained(out / "tokenizer")
    build_world_scheduler().save_pretrained(out / "scheduler")
    CKPT.mkdir(parents=True, exist_ok=True)
    (CKPT / "vae_metrics.json").write_text(json.dumps({"mse": mse, "psnr_db": psnr, "steps": steps,
                                                       "batch_size": batch_size, "images": num_images}, indent=2) + "\n")


def encode_dataset(vae, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Renders ``n`` images and returns their VAE latent means, stds and attributes (cached under runs/)."""
    cache = LOCAL / f"latents-{n}-{seed}.pt"
    if cache.exists():
        blob = torch.load(cache, weights_only=False)
        return blob["mean"], blob["std"], blob["attrs"]
    images, attrs = render_dataset(n, seed=seed)
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, n, 256):
            dist = vae.encode(to_pixels(images[start : start + 256]).to(vae.device)).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    LOCAL.mkdir(parents=True, exist_ok=True)
    torch.save({"mean": mean, "std": std, "attrs": attrs}, cache)
    return mean, std, attrs


def save_trainable(unet, text_encoder, state: dict) -> None:
    """The committed checkpoint: fp16 EMA weights + state.json, written to temporary names then renamed."""
    from safetensors.torch import save_file

    CKPT.mkdir(parents=True, exist_ok=True)
    tensors = {f"unet.{k}": v.half().contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v.half().contiguous() for k, v in text_encoder.state_dict().items()})
    tmp = CKPT / "trainable.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(CKPT / "trainable.safetensors")
    tmp = CKPT / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(CKPT / "state.json")


def load_trainable(unet, text_encoder) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(CKPT / "trainable.safetensors"))
    unet.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("unet.")})
    text_encoder.load_state_dict({k[13:]: v.float() for k, v in tensors.items() if k.startswith("text_encoder.")},
                                 strict=False)


def main(argv: list[str] | None = None) -> None:
    """Stage 1 if the staging folder has no VAE, then stage 2 (resumed from the newest checkpoint)."""
    global CKPT, LOCAL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=staging_model_path())
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch-size", type=int, default=None, help="default: --batch-size")
    parser.add_argument("--vae-images", type=int, default=8192, help="rendered images the VAE trains on")
    parser.add_argument("--latent-channels", type=int, default=4, help="VAE latent channels (stage 1 only)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--dataset-size", type=int, default=30000)
    parser.add_argument("--max-steps", type=int, default=10**9)
    parser.add_argument("--max-minutes", type=float, default=600)
    parser.add_argument("--save-every-min", type=float, default=15)
    parser.add_argument("--bar-every-min", type=float, default=60)
    parser.add_argument("--bar-samples", type=int, default=64)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--cosine-minutes", type=float, default=0,
                        help="decay the learning rate to 0 over this many minutes of this session (0: constant)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", action="store_true", help="write the EMA weights as a diffusers folder and exit")
    parser.add_argument("--bar", type=int, default=0, help="measure the bar on this many samples and exit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint-dir", default=str(CKPT), help="the small committed checkpoint")
    parser.add_argument("--local-dir", default=str(LOCAL), help="the full local checkpoint and latent cache")
    args = parser.parse_args(argv)
    CKPT, LOCAL = Path(args.checkpoint_dir), Path(args.local_dir)
    out = Path(args.out)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # small, launch-bound models: TF32 costs nothing in quality here
    torch.backends.cudnn.allow_tf32 = True

    if not (out / "vae" / "config.json").exists():
        train_vae(out, args.vae_steps, args.vae_batch_size or args.batch_size, args.seed, args.latent_channels,
                  num_images=args.vae_images, device=device)

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out, subfolder="vae").eval().requires_grad_(False)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(out, subfolder="tokenizer")
    text_encoder = build_world_text_encoder(tokenizer, args.seed)
    unet = build_world_unet(args.seed, vae.config.latent_channels)
    opt_state, state = None, {"step": 0, "loss_history": [], "bar_history": [], "train_seconds": 0.0}
    if (CKPT / "state.json").exists() and (CKPT / "trainable.safetensors").exists():
        state = json.loads((CKPT / "state.json").read_text())
        load_trainable(unet, text_encoder)
        log(f"resumed the committed checkpoint at step {state['step']}")
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    full = LOCAL / "full.pt"
    if full.exists():
        blob = torch.load(full, weights_only=False)
        if blob["state"]["step"] >= state["step"]:
            unet.load_state_dict(blob["unet"])
            text_encoder.load_state_dict(blob["text_encoder"])
            ema_unet.load_state_dict(blob["ema_unet"])
            ema_text.load_state_dict(blob["ema_text"])
            opt_state, state = blob["optimizer"], blob["state"]
            log(f"resumed the local full checkpoint at step {state['step']}")

    if args.export or args.bar:
        pipe = assemble_pipeline(ema_unet.eval(), vae, ema_text.eval(), tokenizer)
        if args.bar:
            from lightning_custom.synthetic.world_encoder import WorldEncoder

            pipe.to(device)

            log(f"bar at step {state['step']}: {attribute_bar(pipe, WorldEncoder.load(), n=args.bar)}")
        if args.export:
            pipe.to("cpu")
            pipe.scheduler = build_world_scheduler()
            # fp16 UNet and VAE keep the shipped model a few MB (the package loads them in the weight dtype it
            # is asked for); the text encoder stays fp32 since transformers loads it in its saved dtype and the
            # text-side methods train inside it.
            pipe.unet.half()
            pipe.vae.half()
            pipe.save_pretrained(out, safe_serialization=True)
            log(f"exported step {state['step']} to {out}")
        return

    vae.to(device)
    mean, std, attrs = encode_dataset(vae, args.dataset_size, args.seed + 100)
    scaling = vae.config.scaling_factor
    scheduler = build_world_scheduler()
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 (Hang et al., 2023), epsilon target
    for m in (unet, text_encoder, ema_unet, ema_text):
        m.to(device)
    unet.train()
    text_encoder.train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema_params = [*ema_unet.parameters(), *ema_text.parameters()]  # same order as params
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    warmup = 0 if opt_state is not None else 200
    rng = np.random.default_rng([args.seed, state["step"]])
    g = torch.Generator().manual_seed(args.seed * 100003 + state["step"])
    token_cache: dict[str, list[int]] = {}

    def ids_of(texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in token_cache]
        if missing:
            enc = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
            token_cache.update(zip(missing, enc.input_ids))
        return torch.tensor([token_cache[t] for t in texts])

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))

    seconds_before = state.get("train_seconds", 0.0)

    def checkpoint(bar: dict | None = None) -> None:
        state["train_seconds"] = seconds_before + time.time() - start
        if bar is not None:
            state["bar_history"].append([state["step"], bar])
        LOCAL.mkdir(parents=True, exist_ok=True)
        torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                    "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                    "optimizer": opt.state_dict(), "state": state}, LOCAL / "full.pt.tmp")
        (LOCAL / "full.pt.tmp").replace(full)
        save_trainable(ema_unet, ema_text, state)
        log(f"checkpoint at step {state['step']}")

    start = last_save = last_bar = time.time()
    session_start_step = state["step"]
    window: list[float] = []
    while not stop["flag"] and state["step"] < args.max_steps and time.time() - start < 60 * args.max_minutes:
        idx = torch.randint(len(mean), (args.batch_size,), generator=g)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        texts = [random_caption(attrs[i], rng) if rng.random() >= 0.1 else "" for i in idx.tolist()]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch_size,), generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(ids_of(texts).to(device))[0]
        pred = unet(noisy.to(device), t.to(device), hidden).sample
        loss = ((pred - noise.to(device)) ** 2).mean(dim=(1, 2, 3)).mul(weight[t].to(device)).mean()
        lr = args.lr * min(1.0, (state["step"] - session_start_step + 1) / warmup) if warmup else args.lr
        if args.cosine_minutes:
            lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, (time.time() - start) / (60 * args.cosine_minutes))))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + state["step"]) / (10 + state["step"]))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        state["step"] += 1
        window.append(loss.item())
        if state["step"] % 50 == 0:
            elapsed = time.time() - start
            state["loss_history"].append([state["step"], float(np.mean(window))])
            log(f"step {state['step']} loss {np.mean(window):.4f} lr {lr:.2e} "
                f"{elapsed / (state['step'] - session_start_step):.2f} s/step")
            window = []
        now = time.time()
        if now - last_bar > 60 * args.bar_every_min:
            last_bar = last_save = now
            checkpoint(measure_bar(ema_unet, vae, ema_text, tokenizer, args.bar_samples))
            unet.train()
        elif now - last_save > 60 * args.save_every_min:
            last_save = now
            checkpoint()
    checkpoint()


def measure_bar(unet, vae, text_encoder, tokenizer, n: int) -> dict | None:
    """The bar on ``n`` samples from the EMA weights, or ``None`` without a trained encoder."""
    from lightning_custom.synthetic.world_encoder import WorldEncoder, default_encoder_path

    if not (Path(default_encoder_path()) / "model.safetensors").exists():
        return None
    unet.eval()
    text_encoder.eval()
    result = attribute_bar(assemble_pipeline(unet, vae, text_encoder, tokenizer), WorldEncoder.load(), n=n)
    log(f"bar: {result}")
    return result


if __name__ == "__main__":
    main()
