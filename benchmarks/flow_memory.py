"""Estimated GPU memory of FLUX.1-dev and SD3.5 personalization: what fits in 24 / 48 / 80 GiB (issue 13, item 5).

An estimate, not a measurement: GPU measurements go through ``benchmarks/throughput.py --arch random:flux`` (or
``random:sd3``) on a device (``benchmarks/gpu_throughput.sh``). Everything here runs on the CPU in a minute:

* Parameter counts come from the published architectures built on the meta device
  (:func:`lightning_custom.synthetic.architectures.build_random_components` with ``device="meta"``).
* Activations are counted, not guessed: one training forward of the full-size transformer runs on the meta device
  (shapes only, no arithmetic) at the given resolution and batch, and every tensor autograd saves for the backward
  is summed by storage (each storage once, parameters left out), per transformer block. Attention is counted as a
  fused kernel (flash / memory-efficient SDPA, as on a GPU) that keeps q, k, v, its output and a float32
  log-sum-exp, not the L x L matrix.
* Gradient checkpointing (each transformer block, as diffusers' ``enable_gradient_checkpointing``) keeps the blocks'
  inputs, what is saved outside the blocks, and one block's saved tensors while it is recomputed.

Run:  python benchmarks/flow_memory.py   (writes benchmarks/results/flow_memory.md and .json)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_custom.synthetic.architectures import FLOW_ARCHITECTURES, T5_MAX_LENGTH, build_random_components  # noqa: E402

GIB = 2**30
CARDS_GIB = (24, 48, 80)
# Per frozen base precision: bytes per nn.Linear weight value and per output row (bitsandbytes' storage).
#   bf16: 2 bytes. int8 (LLM.int8, load_in_8bit): 1 byte + a float32 scale per row. nf4 (load_in_4bit, nf4, no
#   double quantization): half a byte + a float32 absmax per 64-value block (0.0625 bytes). Everything that is not
#   an nn.Linear weight (biases, norms, embeddings' buffers) stays bf16.
BASE_BYTES = {"bf16": (2.0, 0.0), "int8": (1.0, 4.0), "nf4": (0.5 + 4 / 64, 0.0)}
# Trainable parameters are float32 (the package keeps them so under mixed precision): weight 4 + gradient 4 bytes,
# plus the optimizer's two moments: AdamW 8 bytes, bitsandbytes' 8-bit AdamW 2 bytes.
TRAINABLE_BYTES = {"adamw": 4 + 4 + 8, "adamw8bit": 4 + 4 + 2}
# CUDA context, cuBLAS / attention workspaces: a flat allowance; allocator fragmentation: a share of the rest.
FIXED_OVERHEAD_BYTES = 1.0 * GIB
FRAGMENTATION = 0.10
# diffusers' train_dreambooth_lora_flux.py / _sd3.py default LoRA targets (the families' lora_targets where present).
LORA_TARGETS = {
    "flux": ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2"),
    "sd3": ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
            "attn.to_q", "attn.to_v"),
}
METHODS = {"lora": "DreamBooth-LoRA", "ti": "Textual Inversion", "full": "full DreamBooth"}


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes autograd saves for the backward in one training forward of the transformer.

    Attributes:
        total: every saved storage once (no checkpointing).
        outside_blocks: saved outside the transformer blocks (embedders, final norm, projection, loss).
        block_inputs: the blocks' hidden-state inputs summed over blocks, plus the inputs they share (time
            embedding, rotary tables) once: what checkpointing keeps.
        largest_block: the most any one block saves (what a checkpointed block holds while recomputed).
    """

    total: int
    outside_blocks: int
    block_inputs: int
    largest_block: int


@dataclass(frozen=True)
class ModelSizes:
    """What the estimate needs to know of one model, counted on the meta device.

    Attributes:
        name: architecture (``flux``, ``sd3``, ``sd35-large``).
        transformer_params: the transformer's parameters.
        transformer_buffers: its persistent buffers (stored and resident in bf16, e.g. SD3's positional table).
        linear_weights: values in the transformer's ``nn.Linear`` weights (what bitsandbytes quantizes).
        linear_rows: their output rows (int8 keeps a float32 scale per row).
        lora_params: rank-``r`` LoRA parameters on the family's targets.
        vae_params: the VAE's (bf16, resident for latent caching and samples).
        clip_params: the CLIP encoders' (float32, as the flow families load them).
        t5_params: T5-XXL's (bf16).
        activations: per method (``lora``, ``ti``, ``full``), the measured saved bytes.
    """

    name: str
    transformer_params: int
    transformer_buffers: int
    linear_weights: int
    linear_rows: int
    lora_params: int
    vae_params: int
    clip_params: int
    t5_params: int
    activations: dict[str, ActivationBytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Setting:
    """One training configuration.

    Attributes:
        method: ``lora`` (rank-r LoRA on the transformer), ``ti`` (Textual Inversion in the CLIP encoders, transformer
            frozen), ``full`` (the whole transformer trains).
        base: frozen transformer weights: ``bf16``, ``int8`` or ``nf4`` (bitsandbytes); ``full`` needs ``bf16``.
        checkpointing: gradient checkpointing of the transformer blocks.
        optimizer: ``adamw`` or ``adamw8bit``.
        text_resident: the text encoders stay on the GPU during training (else their states are precomputed and
            they are offloaded; Textual Inversion always keeps CLIP, which it trains through).
    """

    method: str
    base: str = "bf16"
    checkpointing: bool = True
    optimizer: str = "adamw"
    text_resident: bool = False


# ------------------------------------------------------------------------------------------------ pure math
def frozen_transformer_bytes(sizes: ModelSizes, base: str) -> float:
    """Bytes of the frozen transformer held in ``base`` precision (quantized ``nn.Linear`` weights, the rest bf16)."""
    per_value, per_row = BASE_BYTES[base]
    other = sizes.transformer_params - sizes.linear_weights + sizes.transformer_buffers
    return sizes.linear_weights * per_value + sizes.linear_rows * per_row + other * 2


def activation_bytes(act: ActivationBytes, checkpointing: bool) -> float:
    """Peak saved-activation bytes plus the backward's working set (about one block's saved tensors).

    Without checkpointing everything saved is held at the start of the backward; with it, the block inputs, what is
    saved outside the blocks, and one recomputed block.
    """
    if checkpointing:
        return act.outside_blocks + act.block_inputs + 2 * act.largest_block
    return act.total + act.largest_block


def estimate_memory(sizes: ModelSizes, setting: Setting) -> dict[str, float]:
    """The estimated peak GPU memory of ``setting`` by part, in bytes, with its ``total``.

    Raises:
        ValueError: a quantized base for full DreamBooth (quantized weights do not train).
    """
    if setting.method == "full" and setting.base != "bf16":
        raise ValueError("full DreamBooth trains the transformer: its weights cannot be quantized")
    per_trainable = TRAINABLE_BYTES[setting.optimizer]
    parts: dict[str, float] = {}
    if setting.method == "full":
        parts["transformer"] = sizes.transformer_buffers * 2.0
        parts["trainable"] = sizes.transformer_params * per_trainable
    else:
        parts["transformer"] = frozen_transformer_bytes(sizes, setting.base)
        parts["trainable"] = sizes.lora_params * per_trainable if setting.method == "lora" else 0.0
    parts["vae"] = sizes.vae_params * 2.0
    parts["clip"] = sizes.clip_params * 4.0 if (setting.text_resident or setting.method == "ti") else 0.0
    parts["t5"] = sizes.t5_params * 2.0 if setting.text_resident else 0.0
    parts["activations"] = activation_bytes(sizes.activations[setting.method], setting.checkpointing)
    subtotal = sum(parts.values())
    parts["overhead"] = FIXED_OVERHEAD_BYTES + FRAGMENTATION * subtotal
    parts["total"] = subtotal + parts["overhead"]
    return parts


def smallest_card(total_bytes: float, cards: tuple[int, ...] = CARDS_GIB) -> int | None:
    """The smallest card (GiB) that holds ``total_bytes``, or ``None``."""
    return next((card for card in cards if total_bytes <= card * GIB), None)


def fsdp_gpus_needed(sizes: ModelSizes, setting: Setting, card_gib: int = 80) -> int | None:
    """GPUs of ``card_gib`` for full DreamBooth with FSDP fully sharding weights, gradients and optimizer state."""
    parts = estimate_memory(sizes, setting)
    sharded = parts["trainable"] + parts["transformer"]
    rest = (parts["total"] - parts["overhead"] - sharded) * (1 + FRAGMENTATION) + FIXED_OVERHEAD_BYTES
    for gpus in range(1, 65):
        if rest + sharded * (1 + FRAGMENTATION) / gpus <= card_gib * GIB:
            return gpus
    return None


# -------------------------------------------------------------------------------------- meta-device counting
class _FusedAttention(torch.autograd.Function):
    """Shape-only scaled-dot-product attention that saves what a flash / memory-efficient kernel saves."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover - never run
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    original = torch.nn.functional.scaled_dot_product_attention

    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return _FusedAttention.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return [*getattr(transformer, "transformer_blocks", []), *getattr(transformer, "single_transformer_blocks", [])]


def count_saved_activations(transformer: torch.nn.Module, inputs: dict[str, Any]) -> ActivationBytes:
    """Run ``transformer(**inputs)`` and a flow-matching MSE, summing what autograd saves (see the module doc)."""
    params = {_storage_key(t) for t in (*transformer.parameters(), *transformer.buffers())}
    seen: set[int] = set()
    per_scope: dict[int | None, int] = {}
    scope: list[int | None] = [None]
    block_inputs = [0]
    shared: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in params and key not in seen:
            seen.add(key)
            per_scope[scope[-1]] = per_scope.get(scope[-1], 0) + tensor.untyped_storage().nbytes()
        return tensor

    def enter(index: int):
        def hook(module, args, kwargs):
            scope.append(index)
            named = dict(zip(("hidden_states", "encoder_hidden_states"), args)) | kwargs
            for name, value in named.items():
                values = value if isinstance(value, (tuple, list)) else (value,)
                for tensor in (v for v in values if torch.is_tensor(v)):
                    if name in ("hidden_states", "encoder_hidden_states"):
                        block_inputs[0] += tensor.untyped_storage().nbytes()
                    else:  # time embedding, rotary tables: the same tensors for every block
                        shared[_storage_key(tensor)] = tensor.untyped_storage().nbytes()
        return hook

    def leave(module, args, kwargs, output):
        scope.pop()

    handles = []
    for index, block in enumerate(_blocks(transformer)):
        handles.append(block.register_forward_pre_hook(enter(index), with_kwargs=True))
        handles.append(block.register_forward_hook(leave, with_kwargs=True))
    try:
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            prediction = transformer(**inputs, return_dict=False)[0]
            target = torch.empty_like(prediction, dtype=torch.float32)
            loss = ((prediction.float() - target) ** 2).mean()
    finally:
        for handle in handles:
            handle.remove()
    assert loss.requires_grad, "nothing in the forward requires grad"
    blocks = [value for key, value in per_scope.items() if key is not None]
    return ActivationBytes(total=sum(per_scope.values()), outside_blocks=per_scope.get(None, 0),
                           block_inputs=block_inputs[0] + sum(shared.values()), largest_block=max(blocks, default=0))


def transformer_inputs(arch: str, transformer: torch.nn.Module, resolution: int | tuple[int, int], batch_size: int,
                       dtype: torch.dtype, text_requires_grad: bool, text_tokens: int | None = None) -> dict[str, Any]:
    """Meta inputs of one training step at ``resolution`` (FLUX: packed 2x2 latents and ids; SD3: latents).

    ``resolution`` is a side or ``(height, width)``. Text lengths default to the pipelines': FLUX 512 T5 tokens; SD3
    77 CLIP + 256 T5 tokens.
    """
    config = transformer.config
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    rows, columns = height // 8, width // 8  # both VAEs downsample by 8
    meta = dict(device="meta", dtype=dtype)
    batch = batch_size
    if FLOW_ARCHITECTURES[arch]["family"] == "flux":
        tokens, text = (rows // 2) * (columns // 2), text_tokens or T5_MAX_LENGTH
        inputs = dict(hidden_states=torch.empty(batch, tokens, config.in_channels, **meta),
                      encoder_hidden_states=torch.empty(batch, text, config.joint_attention_dim, **meta),
                      pooled_projections=torch.empty(batch, config.pooled_projection_dim, **meta),
                      timestep=torch.empty(batch, **meta), img_ids=torch.empty(tokens, 3, device="meta"),
                      txt_ids=torch.empty(text, 3, device="meta"))
        if config.guidance_embeds:
            inputs["guidance"] = torch.empty(batch, device="meta")
    else:
        text = text_tokens or 77 + 256
        inputs = dict(hidden_states=torch.empty(batch, config.in_channels, rows, columns, **meta),
                      encoder_hidden_states=torch.empty(batch, text, config.joint_attention_dim, **meta),
                      pooled_projections=torch.empty(batch, config.pooled_projection_dim, **meta),
                      timestep=torch.empty(batch, **meta))
    if text_requires_grad:  # Textual Inversion: the gradient reaches the text states through the frozen transformer
        inputs["encoder_hidden_states"].requires_grad_(True)
        inputs["pooled_projections"].requires_grad_(True)
    return inputs


def measure(arch: str, resolution: int | tuple[int, int], batch_size: int, rank: int = 16,
            lora_targets: tuple[str, ...] | None = None, text_tokens: int | None = None,
            methods: tuple[str, ...] = tuple(METHODS)) -> ModelSizes:
    """Count one architecture's parameters and, per method, its saved activations (all on the meta device).

    ``lora_targets`` defaults to the family's; ``text_tokens`` to the pipeline's text length.
    """
    from peft import LoraConfig

    family = FLOW_ARCHITECTURES[arch]["family"]
    parts = build_random_components(arch, dtype=torch.bfloat16, device="meta")
    transformer = parts["transformer"]
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    clip = sum(sum(p.numel() for p in parts[name].parameters()) for name in ("text_encoder", "text_encoder_2")
               if type(parts[name]).__name__.startswith("CLIP"))
    t5_name = "text_encoder_2" if family == "flux" else "text_encoder_3"
    activations: dict[str, ActivationBytes] = {}
    lora_params = 0
    for method in methods:
        model = build_random_components(arch, dtype=torch.bfloat16, device="meta")["transformer"]
        model.requires_grad_(method == "full")  # built trainable; the frozen base of LoRA and TI saves less
        if method == "lora":
            with torch.device("meta"):
                model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                             target_modules=list(lora_targets or _lora_targets(family))))
            lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        inputs = transformer_inputs(arch, model, resolution, batch_size, torch.bfloat16,
                                    text_requires_grad=method == "ti", text_tokens=text_tokens)
        activations[method] = count_saved_activations(model, inputs)
    return ModelSizes(
        name=arch,
        transformer_params=sum(p.numel() for p in transformer.parameters()),
        transformer_buffers=sum(v.numel() for v in transformer.state_dict().values())
        - sum(p.numel() for p in transformer.parameters()),
        linear_weights=sum(m.weight.numel() for m in linears),
        linear_rows=sum(m.out_features for m in linears),
        lora_params=lora_params,
        vae_params=sum(p.numel() for p in parts["vae"].parameters()),
        clip_params=clip,
        t5_params=sum(p.numel() for p in parts[t5_name].parameters()),
        activations=activations,
    )


def _lora_targets(family: str) -> tuple[str, ...]:
    """The family's LoRA targets where its module exists, else diffusers' script defaults (:data:`LORA_TARGETS`)."""
    try:
        from lightning_custom.families import family_named

        return tuple(family_named(family).lora_targets)
    except Exception:  # noqa: BLE001 - the family modules are optional here; the defaults are the same list
        return LORA_TARGETS[family]


# A published measurement to hold the estimate against: diffusers' blog "(LoRA) Fine-Tuning FLUX.1-dev on Consumer
# Hardware" (huggingface.co/blog/flux-qlora, June 2025): RTX 4090, 512x768 px, batch 1, LoRA rank 4 on to_k/to_q/to_v/
# to_out.0 (4.67M parameters), T5 states of 77 tokens precomputed, latents cached, 8-bit AdamW, gradient
# checkpointing: peak about 9 GB with an nf4 base (QLoRA), about 26 GB with a bf16 base.
REFERENCE = dict(resolution=(768, 512), rank=4, lora_targets=("to_k", "to_q", "to_v", "to_out.0"), text_tokens=77,
                 measured_gb={"nf4": 9, "bf16": 26})


def reference_check() -> list[tuple[str, float, float]]:
    """``(base, estimated GiB, measured GB)`` for the blog's QLoRA and bf16 LoRA settings (:data:`REFERENCE`)."""
    sizes = measure("flux", REFERENCE["resolution"], 1, rank=REFERENCE["rank"],
                    lora_targets=REFERENCE["lora_targets"], text_tokens=REFERENCE["text_tokens"], methods=("lora",))
    return [(base, estimate_memory(sizes, Setting("lora", base, True, "adamw8bit", False))["total"] / GIB, measured)
            for base, measured in REFERENCE["measured_gb"].items()]


# ------------------------------------------------------------------------------------------------- report
SETTING_ROWS = [
    (method, base, checkpointing)
    for method in METHODS
    for base in (("bf16",) if method == "full" else ("bf16", "int8", "nf4"))
    for checkpointing in (True, False)
]
SETTING_COLUMNS = [(optimizer, resident) for optimizer in ("adamw", "adamw8bit") for resident in (False, True)]


def _cell(total: float) -> str:
    card = smallest_card(total)
    return f"{total / GIB:.1f} ({card})" if card else f"{total / GIB:.1f} (>80)"


def markdown(models: list[ModelSizes], resolution: int, batch_size: int, rank: int,
             reference: list[tuple[str, float, float]] | None = None) -> str:
    """The estimate tables and their assumptions."""
    lines = [
        "# Estimated GPU memory for FLUX.1 / SD3.5 personalization (issue 13, item 5)",
        "",
        f"**An estimate, not a measurement** (`python benchmarks/flow_memory.py`): {resolution} px, batch "
        f"{batch_size}, LoRA rank {rank}. Each cell is the estimated peak in GiB and, in brackets, the smallest of "
        "24 / 48 / 80 GiB cards it fits (`>80`: none). GPU measurements: `benchmarks/throughput.py --arch "
        "random:flux` / `random:sd3` on a device (`benchmarks/gpu_throughput.sh`).",
        "",
        "Columns: optimizer (AdamW or bitsandbytes' 8-bit AdamW) and whether the text encoders stay on the GPU "
        "(`text resident`; else their states are precomputed once and the encoders offloaded, which works when "
        "nothing in the text path trains). Rows: method, frozen base precision (bf16, or bitsandbytes int8 / nf4 "
        "through diffusers' quantization config), gradient checkpointing of the transformer blocks.",
        "",
    ]
    for sizes in models:
        lines += [f"## {sizes.name}", "",
                  f"Transformer {sizes.transformer_params / 1e9:.3f}B parameters (+{sizes.transformer_buffers / 1e6:.0f}M "
                  f"stored buffer values), {sizes.linear_weights / 1e9:.3f}B of them in nn.Linear weights; LoRA rank "
                  f"{rank}: {sizes.lora_params / 1e6:.1f}M; T5-XXL {sizes.t5_params / 1e9:.2f}B (bf16 "
                  f"{sizes.t5_params * 2 / GIB:.1f} GiB); CLIP {sizes.clip_params / 1e6:.0f}M (float32); VAE "
                  f"{sizes.vae_params / 1e6:.1f}M.", "",
                  "Saved activations, counted on the meta device (GiB): "
                  + "; ".join(f"{METHODS[m]}: all {a.total / GIB:.2f}, outside blocks {a.outside_blocks / GIB:.2f}, "
                              f"block inputs {a.block_inputs / GIB:.2f}, largest block {a.largest_block / GIB:.3f}"
                              for m, a in sizes.activations.items()), "",
                  "| method | base | checkpointing | " + " | ".join(
                      f"{'8-bit AdamW' if o == 'adamw8bit' else 'AdamW'}, text {'resident' if r else 'precomputed'}"
                      for o, r in SETTING_COLUMNS) + " |",
                  "|" + "---|" * (3 + len(SETTING_COLUMNS))]
        for method, base, checkpointing in SETTING_ROWS:
            cells = [_cell(estimate_memory(sizes, Setting(method, base, checkpointing, optimizer, resident))["total"])
                     for optimizer, resident in SETTING_COLUMNS]
            lines.append(f"| {METHODS[method]} | {base} | {'on' if checkpointing else 'off'} | " + " | ".join(cells) + " |")
        full = Setting("full", "bf16", True, "adamw8bit", False)
        gpus = fsdp_gpus_needed(sizes, full)
        gpus_adamw = fsdp_gpus_needed(sizes, Setting("full", "bf16", True, "adamw", False))
        lines += ["", f"Full DreamBooth with FSDP (weights, gradients and optimizer state fully sharded, checkpointing "
                      f"on, text precomputed): {gpus_adamw} x 80 GiB with AdamW, {gpus} x 80 GiB with 8-bit AdamW.", ""]
    if reference:
        lines += ["## Against a published measurement", "",
                  "diffusers' blog *(LoRA) Fine-Tuning FLUX.1-dev on Consumer Hardware* (huggingface.co/blog/flux-qlora) "
                  "measured FLUX.1-dev LoRA on an RTX 4090 at 512x768 px, batch 1, rank 4 on to_k/to_q/to_v/to_out.0, "
                  "77-token T5 states precomputed, latents cached, 8-bit AdamW, gradient checkpointing. This estimate "
                  "for the same settings (the blog does not say whether its GB are 10^9 or 2^30 bytes):", "",
                  "| base | estimated GiB | measured (blog) GB |", "|---|---|---|"]
        lines += [f"| {base} | {estimated:.1f} | ~{measured} |" for base, estimated, measured in reference]
        lines += [""]
    lines += [
        "## Assumptions",
        "",
        "- Frozen weights: transformer bf16, or bitsandbytes int8 (1 byte per nn.Linear weight + a float32 scale per "
        "row) / nf4 (0.5 byte + a float32 absmax per 64 values, no double quantization), as bitsandbytes stores them "
        "(tests/test_architectures.py checks both on one layer); everything that is not an nn.Linear weight stays "
        "bf16. VAE bf16 (always resident, for latent caching and samples). CLIP encoders "
        "float32 (as loaded, since methods may train them), resident when the text is not precomputed and always "
        "for Textual Inversion; T5-XXL bf16, resident only in the `text resident` columns.",
        "- Trainable parameters float32: weight 4 + gradient 4 + optimizer state 8 (AdamW) or 2 (8-bit AdamW) "
        "bytes. Full DreamBooth: the whole transformer; LoRA: the adapters on diffusers' default targets; Textual "
        "Inversion: a few token vectors (negligible).",
        "- Activations: one training forward of the full-size transformer on the meta device, every tensor saved "
        "for the backward summed once per storage (parameters excluded), attention as a fused flash / "
        "memory-efficient kernel (q, k, v, output, float32 log-sum-exp). LoRA applies peft adapters (float32, "
        "so peft casts their inputs to float32 and those copies are saved: a slight overestimate under autocast); Textual Inversion has the text states require grad through a frozen transformer; full "
        "DreamBooth has every weight require grad. Peak = saved + one block's saved tensors (the backward's working "
        "set); with checkpointing: the blocks' inputs + what is saved outside the blocks + twice the largest "
        "block (its recomputation and its backward).",
        "- Text-encoder activations (CLIP, 77 tokens) and the T5 forward (no grad) are left out: small next to the "
        "transformer's. Textual Inversion here trains CLIP vectors; training T5 vectors too adds T5's activations.",
        f"- Overhead: {FIXED_OVERHEAD_BYTES / GIB:.1f} GiB (CUDA context, cuBLAS and attention workspaces) + "
        f"{FRAGMENTATION:.0%} of the rest (allocator fragmentation). Optimizer-step temporaries and the quantized "
        "layers' dequantized weight (one layer at a time) are not counted.",
        "- Cards: 24 GiB (RTX 3090/4090), 48 GiB (RTX 6000 Ada, A6000, L40S), 80 GiB (A100/H100 80GB); a card "
        "reserves a few hundred MiB of its nominal size for the driver.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[ModelSizes]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="flux,sd3,sd35-large", help=f"comma-separated, from {sorted(FLOW_ARCHITECTURES)}")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "flow_memory.md"))
    parser.add_argument("--no-reference", action="store_true", help="skip the check against the blog's measurement")
    args = parser.parse_args(argv)
    from lightning_custom.runtime.io import atomic_path

    models = [measure(arch.strip(), args.resolution, args.batch_size, args.rank) for arch in args.archs.split(",")]
    reference = None if args.no_reference else reference_check()
    text = markdown(models, args.resolution, args.batch_size, args.rank, reference)
    out = Path(args.out)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(text)
    with atomic_path(out.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps([asdict(m) for m in models], indent=1))
    print(text)
    return models


if __name__ == "__main__":
    main()
