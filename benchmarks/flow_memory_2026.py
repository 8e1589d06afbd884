"""Estimated GPU memory of Z-Image, FLUX.2 [klein] 4B / 9B and Qwen-Image personalization at 1024 px (issue 28, item 6).

Counted exactly as ``benchmarks/flow_memory.py`` counts FLUX.1 and SD3.5 (its functions are reused): parameter
counts from the published architectures built on the meta device (``random:z-image``, ``random:flux2-klein-4b``,
``random:flux2-klein-9b``, ``random:qwen-image``; :mod:`lightning_custom.synthetic.architectures_2026`), saved activations
from one meta-device training forward with a fused attention kernel, per transformer block for gradient
checkpointing. Textual Inversion is not estimated: these families refuse it (their stock pipelines cannot load a
token). The text encoder (a Qwen model, bf16) takes FLUX.1's T5 slot: resident or precomputed-and-offloaded.

Text lengths per training caption: FLUX.2 [klein] pads to 512 tokens (``Flux2KleinPipeline``); Z-Image and Qwen-Image
drop the padding (a caption like "a photo of sks dog" is ~16 chat-template tokens for Z-Image and ~6 after the
dropped template for Qwen-Image): 64 tokens are assumed for both, a generous caption.

Run:  python benchmarks/flow_memory_2026.py   (writes benchmarks/results/flow_memory_2026.md and .json)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flow_memory as fm  # noqa: E402

from lightning_custom.synthetic.architectures_2026 import ARCHITECTURES, build_random  # noqa: E402

TEXT_TOKENS = {"z-image": 64, "flux2-klein-4b": 512, "flux2-klein-9b": 512, "qwen-image": 64}
METHODS = ("lora", "full")


class _ZImageBlocks(torch.nn.Module):
    """Z-Image's transformer seen as flow_memory expects: its refiner and main layers as ``transformer_blocks``, the
    list output stacked into one tensor."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.inner = transformer
        self.transformer_blocks = torch.nn.ModuleList(
            [*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers])

    def forward(self, return_dict: bool = False, **inputs: Any) -> tuple[torch.Tensor]:
        return (torch.stack(self.inner(**inputs, return_dict=False)[0]),)


def _inputs(name: str, transformer: torch.nn.Module, resolution: int, batch: int, text: int,
            text_grad: bool = False) -> dict[str, Any]:
    config = transformer.config
    meta = dict(device="meta", dtype=torch.bfloat16)
    if name == "z-image":
        side = resolution // 8
        return dict(x=[torch.empty(config.in_channels, 1, side, side, **meta) for _ in range(batch)],
                    t=torch.empty(batch, **meta),
                    cap_feats=[torch.empty(text, config.cap_feat_dim, **meta) for _ in range(batch)])
    tokens = (resolution // 16) ** 2  # 8x VAE, then 2x2 patches
    inputs = dict(hidden_states=torch.empty(batch, tokens, config.in_channels, **meta),
                  encoder_hidden_states=torch.empty(batch, text, config.joint_attention_dim, **meta),
                  timestep=torch.empty(batch, **meta))
    if name.startswith("flux2"):
        inputs.update(img_ids=torch.zeros(batch, tokens, 4, device="meta", dtype=torch.long),
                      txt_ids=torch.zeros(batch, text, 4, device="meta", dtype=torch.long))
    else:
        inputs["img_shapes"] = [(1, resolution // 16, resolution // 16)] * batch
    return inputs


def measure(name: str, resolution: int = 1024, batch: int = 1, rank: int = 16) -> fm.ModelSizes:
    from peft import LoraConfig

    from lightning_custom.families import family_named

    family = family_named(ARCHITECTURES[name]["family"])
    parts = build_random(name, dtype=torch.bfloat16, device="meta")
    transformer = parts["transformer"]
    targets = list(family.lora_targets)
    if name.startswith("flux2"):
        from lightning_custom.families.flux2 import flux2_lora_targets

        targets = list(flux2_lora_targets(transformer.config.num_single_layers))
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    activations, lora_params = {}, 0
    for method in METHODS:
        model = build_random(name, dtype=torch.bfloat16, device="meta")["transformer"]
        model.requires_grad_(method == "full")
        if method == "lora":
            with torch.device("meta"):
                model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                             target_modules=targets))
            lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        inputs = _inputs(name, model, resolution, batch, TEXT_TOKENS[name])
        counted = _ZImageBlocks(model) if name == "z-image" else model
        activations[method] = fm.count_saved_activations(counted, inputs)
    params = sum(p.numel() for p in transformer.parameters())
    return fm.ModelSizes(
        name=name, transformer_params=params,
        transformer_buffers=sum(v.numel() for v in transformer.state_dict().values()) - params,
        linear_weights=sum(m.weight.numel() for m in linears), linear_rows=sum(m.out_features for m in linears),
        lora_params=lora_params, vae_params=sum(p.numel() for p in parts["vae"].parameters()), clip_params=0,
        t5_params=sum(p.numel() for p in parts["text_encoder"].parameters()), activations=activations,
    )


def markdown(models: list[fm.ModelSizes], resolution: int, batch: int, rank: int) -> str:
    rows = [row for row in fm.SETTING_ROWS if row[0] in METHODS]
    lines = ["# Estimated GPU memory, Z-Image / FLUX.2 [klein] / Qwen-Image personalization (issue 28, item 6)", "",
             f"**An estimate, not a measurement** (`python benchmarks/flow_memory_2026.py`, the method of "
             f"`benchmarks/flow_memory.py`): {resolution} px, batch {batch}, LoRA rank {rank} on the diffusers "
             "scripts' targets. Cells: estimated peak GiB (smallest of 24 / 48 / 80 GiB cards that holds it). "
             "`text precomputed`: the Qwen text encoder's states are cached and the encoder offloaded; `text "
             "resident`: it stays on the GPU in bf16.", ""]
    for sizes in models:
        lines += [f"## {sizes.name}", "",
                  f"Transformer {sizes.transformer_params / 1e9:.2f}B parameters; LoRA rank {rank}: "
                  f"{sizes.lora_params / 1e6:.1f}M; text encoder {sizes.t5_params / 1e9:.2f}B (bf16 "
                  f"{sizes.t5_params * 2 / fm.GIB:.1f} GiB); VAE {sizes.vae_params / 1e6:.1f}M; "
                  f"{TEXT_TOKENS[sizes.name]} text tokens.", "",
                  "| method | base | checkpointing | " + " | ".join(
                      f"{'8-bit AdamW' if o == 'adamw8bit' else 'AdamW'}, text {'resident' if r else 'precomputed'}"
                      for o, r in fm.SETTING_COLUMNS) + " |",
                  "|" + "---|" * (3 + len(fm.SETTING_COLUMNS))]
        for method, base, checkpointing in rows:
            cells = [fm._cell(fm.estimate_memory(sizes, fm.Setting(method, base, checkpointing, o, r))["total"])
                     for o, r in fm.SETTING_COLUMNS]
            lines.append(f"| {fm.METHODS[method]} | {base} | {'on' if checkpointing else 'off'} | "
                         + " | ".join(cells) + " |")
        gpus = fm.fsdp_gpus_needed(sizes, fm.Setting("full", "bf16", True, "adamw", False))
        gpus8 = fm.fsdp_gpus_needed(sizes, fm.Setting("full", "bf16", True, "adamw8bit", False))
        lines += ["", f"Full DreamBooth with FSDP (fully sharded, checkpointing on, text precomputed): {gpus} x 80 GiB "
                      f"with AdamW, {gpus8} x 80 GiB with 8-bit AdamW.", ""]
    lines += ["Assumptions: those of `benchmarks/results/flow_memory.md` (bitsandbytes storage, float32 trainables, "
              "fused attention, 1 GiB + 10% overhead); the Qwen text encoder in T5's place.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[fm.ModelSizes]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "flow_memory_2026.md"))
    args = parser.parse_args(argv)
    models = [measure(name.strip(), args.resolution, args.batch_size, args.rank) for name in args.archs.split(",")]
    text = markdown(models, args.resolution, args.batch_size, args.rank)
    out = Path(args.out)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps([asdict(m) for m in models], indent=1))
    print(text)
    return models


if __name__ == "__main__":
    main()
