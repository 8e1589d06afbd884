"""Throughput of every method: time per optimizer step, overall steps per second, DVAR's share, peak memory.

CPU, on the embedded tiny model (a minute or two):
    python benchmarks/throughput.py --device cpu --arch embedded --resolution 32 --steps 60

GPU, on the SD 1.5 architecture with random weights built in-process (no download), as in the issue's table:
    python benchmarks/throughput.py --device cuda --arch random:sd15 --resolution 512 --precision 16-mixed \
        --weight-dtype float16 --steps 120
GPU, flow models (issue 13): FLUX.1-dev or SD3.5 Medium architectures, random weights built on the GPU, 1024 px:
    python benchmarks/throughput.py --device cuda --arch random:flux --resolution 1024 --batch-size 1 \
        --precision bf16-mixed --weight-dtype bfloat16 --gradient-checkpointing --methods dreambooth_lora
(`benchmarks/gpu_throughput.sh` runs the whole GPU set in one call.) Any model the methods load works as --arch
(a folder, a hub id, embedded:<name>, random:<arch>); a method the model does not support (Custom Diffusion on a
flow model) is reported as skipped.

Operators per step without a GPU (issue 15): aten ops of one steady-state step by phase, CUDA's fp16 autocast
emulated on the CPU, for each method and for diffusers' Textual Inversion example (a few minutes):
    python benchmarks/throughput.py --profile-ops --arch random:sd15 --weight-dtype float16 --resolution 64

Writes ``<out>/throughput_<tag>.json`` and ``.md``. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_custom.callbacks import DVAREarlyStopping  # noqa: E402
from lightning_custom.families.components import embedded_concept_path  # noqa: E402
from lightning_custom.data import ConceptDataModule  # noqa: E402
from lightning_custom.errors import UserInputError  # noqa: E402
from lightning_custom.runtime.io import write_json  # noqa: E402
from lightning_custom.methods import CustomDiffusion, DreamBooth, DreamBoothLoRA, TextualInversion  # noqa: E402

METHODS = {
    "textual_inversion": (TextualInversion, dict(placeholder_token="<bench>", initializer_token="toy",
                                                 learning_rate=5e-3)),
    "dreambooth_lora": (DreamBoothLoRA, dict(placeholder_token="<bench>", initializer_token="toy",
                                             train_token_embedding=True, rank=4, learning_rate=5e-4)),
    "custom_diffusion": (CustomDiffusion, dict(placeholder_token="<bench>", initializer_token="toy",
                                               learning_rate=1e-5)),
    "dreambooth": (DreamBooth, dict(placeholder_token="sks", learning_rate=5e-6)),
    # The identifier as an existing word, no new token: the families whose stock pipelines cannot load a token
    # (Z-Image, FLUX.2 [klein], Qwen-Image) refuse train_token_embedding (issue 28).
    "dreambooth_lora_sks": (DreamBoothLoRA, dict(placeholder_token="sks", rank=4, learning_rate=5e-4)),
}


class StepTimer(Callback):
    """Wall time of each training batch and of each validation (DVAR) pass, synchronising the GPU.

    ``clock="cpu"`` measures the main thread's CPU time instead: on a shared CPU (one intra-op thread) it counts
    the work of the step, not the time other processes held the cores.
    """

    def __init__(self, clock: str = "wall") -> None:
        self.steps: list[float] = []
        self.validations: list[float] = []
        self.fit_seconds = 0.0
        self.clock = time.thread_time if clock == "cpu" else time.perf_counter

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        return self.clock()

    def on_fit_start(self, trainer, pl_module):
        self._fit = self._now(pl_module)

    def on_fit_end(self, trainer, pl_module):
        self.fit_seconds = self._now(pl_module) - self._fit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(self._now(pl_module) - self._step)

    def on_validation_start(self, trainer, pl_module):
        self._val = self._now(pl_module)

    def on_validation_end(self, trainer, pl_module):
        self.validations.append(self._now(pl_module) - self._val)


def peak_memory_gb(device: str) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on the CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_method(name: str, args: argparse.Namespace) -> dict:
    """Train ``name`` for ``args.steps`` steps with DVAR observing every ``args.dvar_every`` steps."""
    cls, kwargs = METHODS[name]
    gc.collect()  # the previous method's model (FLUX.1: 33 GB of bf16 weights) must be gone before the next loads
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    setup_start = time.perf_counter()
    # Options only passed when asked for, so the command lines of earlier tables stay valid as they were.
    options = {"gradient_checkpointing": True} if args.gradient_checkpointing else {}
    if args.optimizer != "adamw":
        options["optimizer"] = args.optimizer
    if args.frozen_in_autocast:  # the behaviour before issue 15, for the A/B
        import lightning_custom.methods.base as base

        base.autocast_off_for = lambda dtype, device: contextlib.nullcontext()
    try:
        module = cls(pretrained_model_name_or_path=args.arch, weight_dtype=args.weight_dtype,
                     compile_unet=args.compile, cache_latents=not args.no_cache, cache_eval_batch=not args.no_cache,
                     channels_last=args.channels_last, **options, **kwargs)
    except UserInputError as err:  # e.g. Custom Diffusion on a flow model: a row that says why
        return {"method": name, "arch": args.arch, "skipped": str(err)}
    family = getattr(getattr(module, "family", None), "name", "sd")
    data = ConceptDataModule(instance_data_dir=embedded_concept_path(), resolution=args.resolution,
                             batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, center_crop=True,
                             placeholder_token=kwargs["placeholder_token"],
                             class_noun="toy" if name.startswith("dreambooth") else None)
    setup_seconds = time.perf_counter() - setup_start
    timer = StepTimer(args.clock)
    dvar = DVAREarlyStopping(window=10_000, threshold=1e-9, eval_every_n_steps=args.dvar_every, stop=False)
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[dvar, timer], default_root_dir=tempfile.mkdtemp(),
    )
    try:
        trainer.fit(module, datamodule=data)
    except UserInputError as err:  # refused at fit time (Textual Inversion on Z-Image...): a row that says why
        return {"method": name, "arch": args.arch, "skipped": str(err)}
    warmup = min(args.warmup, len(timer.steps) - 1)
    steady = timer.steps[warmup:]
    # on_train_batch_end comes before the step's validation, so step times exclude DVAR.
    dvar_seconds = sum(timer.validations)
    return {
        "method": name,
        "arch": args.arch,
        "family": family,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()}",
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "compile": args.compile,
        "caches": not args.no_cache,
        "channels_last": args.channels_last,
        "frozen_in_autocast": args.frozen_in_autocast,
        "gradient_checkpointing": args.gradient_checkpointing,
        "optimizer": args.optimizer,
        "eval_batch_size": args.eval_batch_size,
        "dvar_every": args.dvar_every,
        "clock": args.clock,
        "steps": trainer.global_step,
        "setup_seconds": round(setup_seconds, 2),
        "first_step_seconds": round(timer.steps[0], 3),
        "ms_per_step": round(1000 * statistics.median(steady), 2),
        "ms_per_dvar_eval": round(1000 * statistics.median(timer.validations[warmup // args.dvar_every:] or
                                                           timer.validations), 2),
        "steps_per_second": round(trainer.global_step / timer.fit_seconds, 3),
        "dvar_share": round(dvar_seconds / timer.fit_seconds, 4),
        "fit_seconds": round(timer.fit_seconds, 2),
        "peak_memory_gb": round(peak_memory_gb(args.device), 3),
    }


# ------------------------------------------------------------------------------------------- --profile-ops
MEASURED_STEP = 2  # steady state: AdamW past its first step (VAE encodes, if a latent is new, count as "vae")
PHASES = ("text encoder", "vae", "unet forward", "loss math", "backward", "optimizer", "framework")
# CUDA's autocast op lists, as compiled into torch (ATen/autocast_mode.h); used when the header is not shipped.
_FALLBACK_RULES = {
    "lower": "_convolution conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d "
             "convolution prelu addmm addmv addr matmul einsum mm mv linalg_vecdot linear addbmm baddbmm bmm "
             "chain_matmul linalg_multi_dot scaled_dot_product_attention _scaled_dot_product_flash_attention",
    "fp32": "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus layer_norm "
            "native_layer_norm group_norm frobenius_norm nuclear_norm cosine_similarity poisson_nll_loss "
            "cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss "
            "mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss triplet_margin_loss "
            "multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp rms_norm "
            "upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_linear1d upsample_bilinear2d "
            "upsample_trilinear3d upsample_bicubic2d",
    "fp32_opt": "prod softmax log_softmax cumprod cumsum linalg_vector_norm linalg_matrix_norm sum",
    "promote": "addcdiv addcmul atan2 bilinear cross dot grid_sampler index_put scatter_add tensordot vdot",
}
# Python entry points whose aten op has another name.
_ALIASES = {"__matmul__": "matmul", "__rmatmul__": "matmul", "__pow__": "pow", "__rpow__": "pow",
            "interpolate": "upsample_nearest2d", "normalize": "linalg_vector_norm"}


def cuda_autocast_rules() -> dict[str, frozenset[str]]:
    """CUDA's autocast cast lists: ``lower`` (run in fp16), ``fp32``, ``fp32_opt`` (fp32 output), ``promote``.

    Read from the ``AT_FORALL_*`` macros of the installed torch's ``ATen/autocast_mode.h`` (the lists CUDA's
    autocast is compiled from); the copy above where the header is missing.
    """
    header = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
    macros = {"lower": "AT_FORALL_LOWER_PRECISION_FP", "fp32": "AT_FORALL_FP32",
              "fp32_opt": "AT_FORALL_FP32_SET_OPT_DTYPE", "promote": "AT_FORALL_PROMOTE"}
    rules = {key: frozenset(value.split()) for key, value in _FALLBACK_RULES.items()}
    if header.exists():
        text = header.read_text()
        for key, macro in macros.items():
            match = re.search(rf"#define {macro}\(_\)(.*?)(?:\n\s*\n|\n#)", text, re.S)
            if match:
                rules[key] = frozenset(re.findall(r"_\(\s*(\w+)", match.group(1)))
    return rules


class CudaAutocastEmulation(torch.overrides.TorchFunctionMode):
    """CUDA's fp16 autocast, emulated on the CPU: where CPU autocast is on, cast each op's inputs as CUDA would.

    Lightning's ``bf16-mixed`` turns CPU autocast on around ``training_step``, and the module turns it off around
    its frozen half-precision parts; this mode reads that switch (``torch.is_autocast_enabled("cpu")``), applies
    CUDA's lists (:func:`cuda_autocast_rules`) with fp16 as the low precision, keeps autocast's cache of casted
    leaf weights that require grad (one cast per region), and runs the op with CPU autocast itself off. The casts
    it inserts are real ``aten._to_copy`` ops, and so are their backward casts.
    """

    def __init__(self, rules: dict[str, frozenset[str]], low: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.rules, self.low = rules, low
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cast(self, value, dtype):
        if not (torch.is_tensor(value) and value.is_floating_point()) or value.dtype in (dtype, torch.float64):
            return value
        cacheable = value.is_leaf and value.requires_grad
        if cacheable and id(value) in self.cache and self.cache[id(value)][0] is value:
            return self.cache[id(value)][1]
        out = value.to(dtype)
        if cacheable:
            self.cache[id(value)] = (value, out)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cpu"):
            self.cache.clear()  # CUDA clears it when the outermost autocast region exits
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        name = _ALIASES.get(name, name)
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)]
        target = None
        if name in self.rules["lower"]:
            target = self.low
        elif name in self.rules["fp32"]:
            target = torch.float32
        elif name in self.rules["fp32_opt"] and "dtype" not in kwargs:
            target = torch.float32 if tensors and tensors[0].dtype in (torch.float16, torch.bfloat16) else None
        elif name in self.rules["promote"]:
            floats = {t.dtype for t in tensors if t.is_floating_point()}
            target = torch.float32 if len(floats) > 1 and torch.float32 in floats else None
        if target is not None:
            args, kwargs = torch.utils._pytree.tree_map(lambda v: self._cast(v, target), (args, kwargs))
        with torch.autocast("cpu", enabled=False):
            return func(*args, **kwargs)


# The ops that hold nearly all of the arithmetic; fp16 ones run ~50x slower than fp32 on a CPU without fp16 units.
_HEAVY_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward",
                        "_scaled_dot_product_flash_attention_for_cpu",
                        "_scaled_dot_product_flash_attention_for_cpu_backward"})


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts dispatched aten ops (and the ``_to_copy`` casts among them) per phase while ``active``.

    With ``skip_math``, the matmuls, convolutions and attention kernels are not computed: their outputs (zeros)
    take shape, dtype and strides from the ops' meta kernels. Counting needs no values, and nothing in a training
    step branches on them, so the counts are those of the real step, at a fraction of the CPU time.
    """

    def __init__(self, skip_math: bool = True) -> None:
        super().__init__()
        self.skip_math = skip_math
        self.active = False
        self.phases: list[str] = ["framework"]
        self.ops: Counter = Counter()
        self.casts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            self.ops[self.phases[-1]] += 1
            if func is torch.ops.aten._to_copy.default:
                self.casts[self.phases[-1]] += 1
        if self.skip_math and func.overloadpacket.__name__ in _HEAVY_OPS:
            to_meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v  # noqa: E731
            try:
                shapes = func(*torch.utils._pytree.tree_map(to_meta, args),
                              **torch.utils._pytree.tree_map(to_meta, kwargs))
            except (NotImplementedError, RuntimeError):
                return func(*args, **kwargs)
            return torch.utils._pytree.tree_map(
                lambda v: torch.zeros_like(v, device="cpu") if isinstance(v, torch.Tensor) else v, shapes)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Attribute the ops in the block to ``name``."""
        self.phases.append(name)
        try:
            yield
        finally:
            self.phases.pop()

    def hook_module(self, module: torch.nn.Module, name: str) -> None:
        """Attribute the forward of ``module`` to ``name`` (its backward goes to the backward phase)."""
        def enter(*_):
            self.phases.append(name)

        def leave(*_):  # returns None: a forward hook's return value would replace the output
            self.phases.pop()

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)

    def wrap(self, function, name: str):
        """``function`` with its ops attributed to ``name``."""
        def wrapped(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)
        return wrapped

    def reset(self) -> None:
        self.ops, self.casts = Counter(), Counter()


class PhaseMarks(Callback):
    """Marks Lightning's phases for :class:`OpCounter` and counts ops of optimizer steps ``measure``."""

    def __init__(self, counter: OpCounter, measure: dict[int, str]) -> None:
        self.counter, self.measure = counter, measure
        self.results: dict[str, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.label = self.measure.get(trainer.global_step)
        self.counter.reset()
        self.counter.phases[:] = ["framework"]
        self.counter.active = self.label is not None

    def on_before_backward(self, trainer, pl_module, loss):
        self.counter.phases.append("backward")

    def on_after_backward(self, trainer, pl_module):
        self.counter.phases.pop()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.counter.phases.append("optimizer")  # gradient clipping included; popped by the step's post hook

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.counter.active:
            self.results[self.label] = {"ops": dict(self.counter.ops), "casts": dict(self.counter.casts)}
        self.counter.active = False


def _optimizer_done(counter: OpCounter):
    def hook(optimizer, args, kwargs):
        if counter.phases[-1] == "optimizer":
            counter.phases.pop()
    return hook


def profile_row(method: str, label: str, counts: dict) -> dict:
    """One table row: ops per phase, casts, total."""
    ops, casts = counts["ops"], counts["casts"]
    row = {"method": method, "variant": label, **{p: ops.get(p, 0) for p in PHASES}}
    row["casts"] = sum(casts.values())
    row["total"] = sum(ops.values())
    return row


def profile_method(name: str, args: argparse.Namespace, counter: OpCounter) -> list[dict]:
    """Ops of one steady-state step of ``name``: the frozen UNet outside autocast (ours) and inside (before)."""
    import lightning_custom.methods.base as base

    cls, kwargs = METHODS[name]
    module = cls(pretrained_model_name_or_path=args.arch, weight_dtype=args.weight_dtype, **kwargs)
    for i, encoder in enumerate(module.text_encoders):
        counter.hook_module(encoder, "text encoder")
    counter.hook_module(module.unet, "unet forward")
    module.vae.encode = counter.wrap(module.vae.encode, "vae")
    original_step, original_optimizers = module.training_step, module.configure_optimizers

    def training_step(batch, batch_idx):
        with counter.phase("loss math"):
            return original_step(batch, batch_idx)

    def configure_optimizers():
        # As on CUDA: fused AdamW where nothing clips gradients before it, else the foreach implementation.
        optimizer = original_optimizers()
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = (True, None) if not module.clips_gradients() else (None, True)
        return optimizer

    module.training_step, module.configure_optimizers = training_step, configure_optimizers
    # No flips: 4 augmented images, whose latents are all cached by the measured steps.
    data = ConceptDataModule(instance_data_dir=embedded_concept_path(), resolution=args.resolution,
                             batch_size=args.batch_size, center_crop=True, random_flip=False,
                             placeholder_token=kwargs["placeholder_token"],
                             class_noun="toy" if name.startswith("dreambooth") else None)
    marks = PhaseMarks(counter, {MEASURED_STEP: "frozen parts outside autocast",
                                 MEASURED_STEP + 1: "everything inside autocast"})

    class InsideAutocastAtStep3(Callback):  # the old behaviour, for the A/B
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            inside = trainer.global_step == MEASURED_STEP + 1
            base.autocast_off_for = (lambda dtype, device: contextlib.nullcontext()) if inside else original_off

    original_off, original_match = base.autocast_off_for, getattr(base, "match_frozen_weights_to_precision", None)
    if original_match is not None:  # keep the fp16 weights CUDA would run (on a CPU, bf16-mixed moves them to bf16)
        base.match_frozen_weights_to_precision = lambda *args, **kwargs: False
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=MEASURED_STEP + 2,
                        logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[InsideAutocastAtStep3(), marks],
                        default_root_dir=tempfile.mkdtemp())
    try:
        trainer.fit(module, datamodule=data)
    finally:
        base.autocast_off_for = original_off
        if original_match is not None:
            base.match_frozen_weights_to_precision = original_match
    return [profile_row(name, label, counts) for label, counts in marks.results.items()]


def profile_diffusers_textual_inversion(args: argparse.Namespace, counter: OpCounter) -> dict:
    """Ops of one step of diffusers' ``examples/textual_inversion/textual_inversion.py``, written out here.

    As there: the text encoder (prepared by accelerate) runs under autocast, the fp16 VAE and UNet outside it;
    the VAE encodes every step; AdamW updates the whole embedding matrix, whose other rows are then restored.
    """
    import torch.nn.functional as F

    from lightning_custom.families.components import load_components
    from lightning_custom.data.loader import collate_with_token_ids
    from lightning_custom.methods.tokens import CaptionTokenizer

    parts = load_components(args.arch, weight_dtype=args.weight_dtype)
    tokenizer, text_encoder, vae, unet, scheduler = (parts.tokenizer, parts.text_encoder, parts.vae, parts.unet,
                                                     parts.noise_scheduler)
    tokenizer.add_tokens(["<bench>"])
    text_encoder.resize_token_embeddings(len(tokenizer))
    placeholder = tokenizer.convert_tokens_to_ids("<bench>")
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)  # all but the token embedding matrix, as the example freezes them
    text_encoder.train()
    embeddings = text_encoder.get_input_embeddings()
    embeddings.weight.requires_grad_(True)
    original = embeddings.weight.detach().clone()
    optimizer = torch.optim.AdamW(embeddings.parameters(), lr=5e-4, foreach=True)  # CUDA's default
    weight_dtype = unet.dtype
    counter.hook_module(text_encoder, "text encoder")
    counter.hook_module(unet, "unet forward")
    vae.encode = counter.wrap(vae.encode, "vae")
    data = ConceptDataModule(instance_data_dir=embedded_concept_path(), resolution=args.resolution,
                             batch_size=args.batch_size, center_crop=True, placeholder_token="<bench>")
    dataset = data.train_dataset()
    tokenize = CaptionTokenizer([tokenizer])
    result = {}
    for step in range(3):
        batch = collate_with_token_ids([dataset[2 * step], dataset[2 * step + 1]], tokenize)
        counter.reset()
        counter.active = step == 2
        with counter.phase("loss math"):
            latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample().detach()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
            noisy = scheduler.add_noise(latents, noise, timesteps)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # accelerate's autocast around the text encoder
                hidden = text_encoder(batch["input_ids"])[0]
            hidden = hidden.to(dtype=weight_dtype)
            prediction = unet(noisy, timesteps, hidden).sample
            loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        with counter.phase("backward"):
            loss.backward()
        counter.phases.append("optimizer")  # popped by the optimizer's step post hook
        optimizer.step()
        optimizer.zero_grad()
        keep = torch.ones((len(tokenizer),), dtype=torch.bool)
        keep[placeholder : placeholder + 1] = False
        with torch.no_grad():
            embeddings.weight[keep] = original[keep]
        if counter.active:
            result = profile_row("textual_inversion", "diffusers example", {"ops": dict(counter.ops),
                                                                            "casts": dict(counter.casts)})
        counter.active = False
    return result


def profile_ops(args: argparse.Namespace) -> list[dict]:
    """Count dispatched ops per phase of one steady-state step of each method (and of diffusers' TI example)."""
    rules = cuda_autocast_rules()
    counter = OpCounter(skip_math=not args.profile_real_math)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(_optimizer_done(counter))
    rows = []
    out = Path(args.out)
    tag = args.tag or f"ops_{args.arch.removeprefix('random:')}"
    with CudaAutocastEmulation(rules), counter:
        for name in args.methods.split(","):
            rows.extend(profile_method(name.strip(), args, counter))
            print(json.dumps(rows[-2:]), flush=True)
            if name.strip() == "textual_inversion" and args.arch.startswith("random:"):
                rows.append(profile_diffusers_textual_inversion(args, counter))
                print(json.dumps(rows[-1]), flush=True)
            write_json(out / f"{tag}.json", {"command": " ".join(sys.argv), "rules": {k: sorted(v) for k, v in
                                                                                       rules.items()}, "rows": rows})
            (out / f"{tag}.md").write_text(ops_markdown(rows, args, rules))
    print(ops_markdown(rows, args, rules))
    return rows


def ops_markdown(rows: list[dict], args: argparse.Namespace, rules: dict[str, frozenset[str]]) -> str:
    """The op counts as a markdown table, with how they were counted."""
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             f"Dispatched aten operators in one steady-state training step (the 3rd), {args.arch}, "
             f"{args.resolution} px, batch {args.batch_size}, weights {args.weight_dtype}, counted on the CPU with "
             "a TorchDispatchMode while CUDA's fp16 autocast rules are emulated (see `CudaAutocastEmulation` in "
             "benchmarks/throughput.py; the op lists are read from torch's ATen/autocast_mode.h: "
             f"{len(rules['lower'])} ops run in fp16, {len(rules['fp32'])} in fp32, {len(rules['fp32_opt'])} "
             f"with an fp32 output, {len(rules['promote'])} promote to the widest input). GradScaler's ops "
             "(16-mixed) are not counted (the same in every row); no DVAR evaluation. `vae`: encodes of latents not yet cached.", "",
             "| method | variant | " + " | ".join(PHASES) + " | casts | total | total without VAE |",
             "|" + "---|" * (len(PHASES) + 5)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['variant']} | " + " | ".join(str(r[p]) for p in PHASES)
                     + f" | {r['casts']} | {r['total']} | {r['total'] - r['vae']} |")
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    header = ("| method | device | arch | px | batch | precision | compile | caches | channels last "
              "| frozen in autocast | DVAR every | ms/step | ms/DVAR eval | steps/s (with DVAR) | DVAR share | peak mem GB | first step s |")
    extra = any(r.get("gradient_checkpointing") or r.get("optimizer", "adamw") != "adamw" for r in rows)
    if extra:  # the flow-model rows' memory options
        header += " grad. checkpointing | optimizer |"
    lines = [header, "|" + "---|" * (19 if extra else 17)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | | {r['arch']} | skipped: {r['skipped']} |")
            continue
        lines.append(
            f"| {r['method']} | {r['device']} | {r['arch']} | {r['resolution']} | {r['batch_size']} | {r['precision']} "
            f"| {r['compile']} | {r['caches']} | {r.get('channels_last', False)} "
            f"| {r.get('frozen_in_autocast', False)} "
            f"| {r['dvar_every']} | {r['ms_per_step']} | {r['ms_per_dvar_eval']} "
            f"| {r['steps_per_second']} | {100 * r['dvar_share']:.1f}% | {r['peak_memory_gb']} "
            f"| {r['first_step_seconds']} |"
            + (f" {r.get('gradient_checkpointing', False)} | {r.get('optimizer', 'adamw')} |" if extra else "")
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--arch", default="embedded",
                        help="embedded[:name], a model folder/hub id, or random:sd15|sd21|sdxl|flux|flux-schnell|sd3|"
                             "sd35-large (published architectures, random weights)")
    parser.add_argument("--methods", default="textual_inversion,dreambooth_lora,custom_diffusion",
                        help=f"comma-separated, from {sorted(METHODS)}")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--eval-batch-size", type=int, default=4, help="DVAR's fixed evaluation batch")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute the denoiser's activations in the backward (FLUX.1-dev on 24-80 GB)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the per-step median")
    parser.add_argument("--dvar-every", type=int, default=1, help="evaluate L_det every k optimizer steps")
    parser.add_argument("--precision", default="32-true", help="Lightning precision: 32-true, 16-mixed, bf16-mixed")
    parser.add_argument("--weight-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--compile", default="none", choices=["none", "regional", "full"],
                        help="torch.compile the UNet: its repeated blocks only, or whole")
    parser.add_argument("--no-cache", action="store_true", help="turn off the latent and evaluation caches")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="time steps by the wall clock, or by the main thread's CPU time (a shared CPU)")
    parser.add_argument("--frozen-in-autocast", action="store_true",
                        help="run the frozen half-precision UNet/VAE inside autocast (the behaviour before issue 15)")
    parser.add_argument("--profile-ops", action="store_true",
                        help="count dispatched operators per phase of one step, CUDA autocast emulated on the CPU "
                             "(use with --arch random:sd15 --weight-dtype float16)")
    parser.add_argument("--profile-real-math", action="store_true",
                        help="--profile-ops computes the matmuls and convolutions too (slow; same counts)")
    parser.add_argument("--tag", default=None, help="output file suffix (default: device)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.profile_ops:
        return profile_ops(args)
    rows = []
    tag = args.tag or args.device
    out = Path(args.out)
    for name in args.methods.split(","):
        row = run_method(name.strip(), args)
        print(json.dumps(row), flush=True)
        rows.append(row)
        # Written after every method, so a run cut short (a device call's time limit) keeps what it measured.
        write_json(out / f"throughput_{tag}.json", {"command": " ".join(sys.argv), "rows": rows})
        (out / f"throughput_{tag}.md").write_text(f"Command: `python {' '.join(sys.argv)}`\n\n" + markdown_table(rows))
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
