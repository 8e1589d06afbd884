"""The valid range of every numeric argument of the methods, the data module and the callbacks, in one place.

Each class checks its own arguments against this table when it is built (so Python users get the same one-line
:class:`UserInputError` as the CLI), and the CLI checks the whole parsed config before any model loads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_custom.errors import UserInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Range:
    """An interval of valid values (NaN is never valid); ``optional`` also admits ``None``.

    Args:
        low: the lower bound (``None``: none).
        high: the upper bound (``None``: none).
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.
        optional: ``None`` is valid too (e.g. "no limit").
        unit: follows the bound in the message (``"steps"``).
        note: follows the range in the message (``"(the paper: 0.15)"``).
        why: ends the message, after the value.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    unit: str = ""
    note: str = ""
    why: str = ""

    def describe(self) -> str:
        """The range in words: ``"at least 1"``, ``"above 0"``, ``"between 0 and 1"``, ``"in [0, 1)"``."""
        if self.low is not None and self.high is not None:
            if self.low_open and self.high_open:
                return f"between {self.low:g} and {self.high:g}"
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"above {self.low:g}" if self.low_open else f"at least {self.low:g}"
        return f"below {self.high:g}" if self.high_open else f"at most {self.high:g}"

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is valid."""
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
OPTIONAL_POSITIVE = Range(0, low_open=True, optional=True)
OPTIONAL_AT_LEAST_1 = Range(1, optional=True)
PROBABILITY = Range(0, 1, high_open=True)  # dropout, Adam's betas

# Argument group (the CLI prefix, or the class name for callbacks given with --trainer.callbacks) -> parameter ->
# valid range. Arguments that are not numbers (paths, tokens, choices) are checked where they are used.
RANGES: dict[str, dict[str, Range]] = {
    "model": {
        "learning_rate": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "adam_betas": PROBABILITY,  # each of the two
        "adam_epsilon": POSITIVE,
        "seed": NON_NEGATIVE,
        "logit_std": POSITIVE,
        "mode_scale": NON_NEGATIVE,
        "guidance_scale": NON_NEGATIVE,
        "num_vectors": AT_LEAST_1,
        "t5_num_vectors": Range(0, note="(0: no T5 token)"),
        "rank": AT_LEAST_1,
        "lora_alpha": OPTIONAL_POSITIVE,
        "lora_dropout": PROBABILITY,
        "prior_loss_weight": NON_NEGATIVE,
        "max_grad_norm": OPTIONAL_POSITIVE,
    },
    "data": {
        "resolution": AT_LEAST_1,
        "repeats": AT_LEAST_1,
        "batch_size": AT_LEAST_1,
        "num_workers": NON_NEGATIVE,
        "seed": NON_NEGATIVE,
        "eval_batch_size": AT_LEAST_1,
        "eval_seed": Range(0, optional=True),
        "num_class_images": AT_LEAST_1,
        "class_inference_steps": AT_LEAST_1,
        "class_guidance_scale": NON_NEGATIVE,
    },
    "dvar": {
        "window": Range(2, unit="steps"),
        "threshold": Range(0, 1, low_open=True, high_open=True, note="(the paper: 0.15)", why=(
            "the ratio var(window)/var(all) of a loss that still moves is already below 1, so 1 or more stops at "
            "the first full window")),
        "eval_every_n_steps": AT_LEAST_1,
        "min_steps": NON_NEGATIVE,
        "max_steps": Range(1, optional=True, note="(or null for no cap)"),
        "divergence_tolerance": NON_NEGATIVE,
        "divergence_norm_factor": Range(1, low_open=True),
        "undertrained_below": Range(0, 1, high_open=True, note="(0: never)"),
        "healthy_snapshot_max_mb": NON_NEGATIVE,
    },
    "sample": {
        "every_n_steps": Range(0, note="(0: off)"),
        "images_per_prompt": AT_LEAST_1,
        "seed": NON_NEGATIVE,
        "num_inference_steps": AT_LEAST_1,
        "guidance_scale": Range(0, optional=True),
        "height": OPTIONAL_AT_LEAST_1,
        "width": OPTIONAL_AT_LEAST_1,
    },
    "live_report": {"every_n_seconds": POSITIVE},
    "cpu_threads": {"cpu_threads": OPTIONAL_AT_LEAST_1},
    "CLIPEarlyStopping": {
        "every_n_steps": AT_LEAST_1,
        "num_images": AT_LEAST_1,
        "patience": AT_LEAST_1,
        "min_delta": NON_NEGATIVE,
        "num_inference_steps": AT_LEAST_1,
        "guidance_scale": NON_NEGATIVE,
        "seed": NON_NEGATIVE,
        "batch_size": AT_LEAST_1,
        "min_steps": NON_NEGATIVE,
    },
    "FixedBudget": {"steps": AT_LEAST_1},
    "StepCheckpoint": {"every_n_steps": AT_LEAST_1, "save_top_k": Range(-1, note="(-1: keep every one)")},
}
# Groups named by their CLI option (--model.learning_rate); callbacks given as classes are named by class.
_CLI_GROUPS = ("model", "data", "dvar", "sample", "live_report")


def argument_name(group: str, name: str) -> str:
    """How the error names an argument: ``--model.learning_rate``, ``--cpu_threads``, ``FixedBudget.steps``."""
    if group in _CLI_GROUPS:
        return f"--{group}.{name}"
    return f"--{name}" if group == name else f"{group}.{name}"


def check_value(group: str, name: str, value: Any) -> None:
    """Raise a one-line :class:`UserInputError` if ``value`` is outside the range of ``group``'s ``name``."""
    rule = RANGES[group][name]
    values = value if isinstance(value, (list, tuple)) else [value]
    if all(rule.contains(v) for v in values):
        return
    words = " ".join(part for part in (rule.describe(), rule.unit, rule.note) if part)
    why = f"; {rule.why}" if rule.why else ""
    raise UserInputError(f"{argument_name(group, name)}: must be {words}, got {value!r}{why}")


def check_ranges(group: str, values: Mapping[str, Any]) -> None:
    """Check every argument of ``group`` present in ``values`` (e.g. a class's ``hparams`` or parsed config)."""
    for name in RANGES[group]:
        if name in values:
            check_value(group, name, values[name])


RESOLUTION_LIMIT = 4  # x the model's own size: beyond, a step costs (limit^2)x more and the model sees nothing it knows


def check_resolution(resolution: int | None, native: int | None, model: str) -> None:
    """Refuse a training resolution far above the model's own (``RESOLUTION_LIMIT`` x) in one line, before the
    first step (2048 px on the 32 px embedded model sat at step 0 for minutes); warn above 2x."""
    if not resolution or not native:
        return
    if resolution > RESOLUTION_LIMIT * native:
        raise UserInputError(
            f"--data.resolution: {resolution} px is {resolution / native:.0f}x the {native} px that {model} was made "
            f"for (its config's sample size); train at {native} px (or up to {RESOLUTION_LIMIT * native})")
    if resolution > 2 * native:
        log.warning("--data.resolution: %d px is %.1fx the %d px that %s was made for; each step costs about "
                    "%.0fx more than at its own size", resolution, resolution / native, native, model,
                    (resolution / native) ** 2)
