"""Keep the terminal to what matters: silence the messages every run prints by design, at their source.

Each filter below names one message by a precise pattern, so anything else those libraries say (a real warning)
still shows. :func:`quiet_expected_noise` is called by the CLI before anything is loaded.
"""

from __future__ import annotations

import logging
import re
import warnings

# Python warnings that a personalization run triggers by design, as (message regex, category).
EXPECTED_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # Every method keeps its frozen parts (text encoder, VAE, UNet) in eval mode on purpose: no dropout, and
    # frozen norms stay frozen. Lightning warns about it at the start of every fit.
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning),
    # Lightning 2.6's own pytree helper uses torch's deprecated LeafSpec; nothing a user can change.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # diffusers' loaders still pass huggingface_hub's retired argument when a model is fetched; it is ignored.
    (r"The `local_dir_use_symlinks` argument is deprecated and ignored", UserWarning),
)

# Log records (logger name, message regex) that say nothing about this run.
EXPECTED_LOG_MESSAGES: tuple[tuple[str, str], ...] = (
    # Lightning's advertisements for its cloud products, shown on every fit.
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip: "),
    ("lightning_fabric.utilities.rank_zero", r"💡 Tip: "),
    # The CLI brings its own one-line summary (lightning_custom.callbacks.progress.ParameterCountSummary).
    ("lightning.pytorch.utilities.rank_zero", r"Trainer already configured with model summary callbacks: "
                                              r"\[<class '[\w.]+\.ParameterCountSummary'>\]"),
    # transformers 5 without torchvision: the PIL image processor is the one we want (CLIP/DINO scoring).
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back to"),
    # Adding a placeholder token grows the embedding table; the new row is overwritten with the initializer
    # token's vector right after, so how transformers initialises it does not matter.
    ("transformers.modeling_utils", r"The new embeddings will be initialized from a multivariate normal"),
    # bitsandbytes (imported by diffusers at model load, installed by lightning[pytorch-extra]) tries to fetch an
    # optional CPU kernel for 4-bit layers through `kernels`; offline it says so twice. No method here runs 4-bit
    # layers on a CPU, and --model.quantize_base needs a CUDA GPU.
    ("kernels._internals.hf_hub", r"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    # A LoRA trained on the denoiser alone (train_text_encoder false, the default) has no text-encoder keys, by
    # design; diffusers' load_lora_weights says so for each text encoder.
    ("diffusers.loaders.lora_base", r"No LoRA keys associated to \w+ found with the prefix='text_encoder(_2)?'"),
    # Our own StopSignals says what a SIGTERM does to the run (lightning_custom.runtime.interrupts); Lightning's line is a
    # second, bare one.
    ("lightning.pytorch.trainer.connectors.signal_connector", r"Received SIGTERM: \d+"),
)

# Callbacks that print their stop line themselves, so their INFO records are not shown a second time.
_PRINTS_ITS_OWN_INFO = ("lightning_custom.dvar.callback", "lightning_custom.callbacks.clip_early_stopping")


class DropMessages(logging.Filter):
    """A logging filter that drops records whose message matches ``pattern``."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class _NotPrintedElsewhere(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not record.name.startswith(_PRINTS_ITS_OWN_INFO)


def silence_expected_warnings() -> None:
    """Ignore the Python warnings in :data:`EXPECTED_WARNINGS` (this process's warnings filters)."""
    for pattern, category in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)


def silence_expected_log_messages() -> None:
    """Attach a :class:`DropMessages` filter to each logger in :data:`EXPECTED_LOG_MESSAGES` (once)."""
    for name, pattern in EXPECTED_LOG_MESSAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(DropMessages(pattern))


def silence_loading_bars() -> None:
    """No "Loading weights" / "Loading pipeline components" bars: a small model loads in a second, and a large one
    shows its progress in the download (huggingface_hub's own bars, which stay on)."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def show_package_messages(level: int = logging.INFO) -> None:
    """Print this package's log records (e.g. "images composited onto white") as plain lines on stderr.

    Does nothing when the application configured logging itself (the root logger has handlers).
    """
    logger = logging.getLogger("lightning_custom")
    if logging.getLogger().hasHandlers() and not logger.handlers:
        return
    if not any(getattr(h, "_lightning_custom", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_NotPrintedElsewhere())
        handler._lightning_custom = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)


def quiet_expected_noise() -> None:
    """Everything above: what the CLI calls once, before any model or pipeline is loaded."""
    silence_expected_warnings()
    silence_expected_log_messages()
    silence_loading_bars()
    show_package_messages()
