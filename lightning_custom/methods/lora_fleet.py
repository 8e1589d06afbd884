"""Many DreamBooth-LoRA concepts in one process: one LoRA adapter and one new token per concept (issue 24).

The denoiser is loaded once, frozen, and gets one peft LoRA adapter per concept. Every sample of a step goes through
its own concept's adapter, through peft's per-sample adapter routing (``LoraLayer.forward(x, adapter_names=...)``,
the layer-level path of peft's mixed-adapter batches; the model-level entry point refuses training mode, the layers
do not). Each concept also learns its own token, as ``DreamBoothLoRA`` with ``train_token_embedding`` does (the
DVAR paper's setting: rank 4 plus the new token), and everything else is :class:`TextualInversionFleet`'s: its
batches, RNG, optimizer state, L_det series and stop. A concept's LoRA starts from its own run's random draw, and its
gradient is clipped by its own norm, so each concept trains as its own run: to float rounding with the batched
forward, and with ``forward="per_concept"`` as each run's shapes compute it.

Each concept's folder gets ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``) and
``learned_embeds.safetensors`` (``pipe.load_textual_inversion``), what its own run writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_custom.errors import UserInputError
from lightning_custom.methods.fleet import TextualInversionFleet
from lightning_custom.methods.lora import ADAPTER, add_lora, lora_dropout_disabled, save_lora


class DreamBoothLoRAFleet(TextualInversionFleet):
    """DreamBooth-LoRA (with a learned token per concept) for several independent concepts at once.

    Args:
        concepts: the concepts list, as for :class:`TextualInversionFleet` (one ``placeholder_token`` each: a new
            token, learned as ``DreamBoothLoRA(train_token_embedding=True)`` learns it).
        initializer_token: the initializer of concepts that name none.
        rank: LoRA rank.
        lora_alpha: LoRA scaling numerator (``alpha / rank``); defaults to ``rank``.
        lora_dropout: dropout on the LoRA branch during training.
        target_modules: denoiser layers that get LoRA (default: the family's, as ``DreamBoothLoRA``).
        max_grad_norm: clip each concept's gradient norm to this, as its own run clips (``None``: off).
        forward: ``"batched"`` (one forward over every concept's samples) or ``"per_concept"``.
        **kwargs: see :class:`~lightning_custom.methods.base.PersonalizationModule`.
    """

    def __init__(self, concepts: list[dict[str, Any]] | str, initializer_token: str = "object", rank: int = 4,
                 lora_alpha: float | None = None, lora_dropout: float = 0.0, target_modules: list[str] | None = None,
                 max_grad_norm: float | None = 1.0, forward: Literal["batched", "per_concept"] = "batched",
                 **kwargs: Any) -> None:
        self.rank, self.lora_dropout = rank, lora_dropout
        self.lora_alpha = lora_alpha if lora_alpha is not None else rank
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.max_grad_norm = max_grad_norm
        self._sample_adapters: list[str] | None = None
        super().__init__(concepts=concepts, initializer_token=initializer_token, forward=forward, **kwargs)

    # ------------------------------------------------------------------------------------------- trainables
    def configure_trainable(self) -> None:
        """Each concept's token (as the Textual Inversion fleet), then one LoRA adapter per concept, each drawn
        from the random state its own run would draw it from."""
        super().configure_trainable()
        rng = self.rng_after_one_concept  # a single run draws its LoRA right after adding its token
        if self.target_modules is None:
            self.target_modules = list(self.family.lora_targets)
        self.adapters = {spec.name: f"concept{i}" for i, spec in enumerate(self.concept_specs)}
        after_one = None
        for name, adapter in self.adapters.items():
            torch.set_rng_state(rng)
            add_lora(self.denoiser, self.rank, self.lora_alpha, self.lora_dropout, self.target_modules,
                     "--model.target_modules", "UNet" if self.denoiser_name == "unet" else self.denoiser_name,
                     adapter=adapter)
            after_one = torch.get_rng_state() if after_one is None else after_one
        torch.set_rng_state(after_one)
        from peft.tuners.lora import LoraLayer

        self._lora_parameters: dict[str, list[nn.Parameter]] = {name: [] for name in self.adapters}
        by_adapter = {adapter: name for name, adapter in self.adapters.items()}
        for param_name, param in self.denoiser.named_parameters():
            adapter = next((a for a in by_adapter if f".{a}." in param_name and ".lora_" in param_name), None)
            if adapter is not None:
                param.requires_grad_(True)  # adding an adapter leaves peft's others inactive
                self._lora_parameters[by_adapter[adapter]].append(param)
        for module in self.denoiser.modules():
            if isinstance(module, LoraLayer):
                module.register_forward_pre_hook(self._route_samples, with_kwargs=True)

    def _route_samples(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if self._sample_adapters is None:
            raise RuntimeError("DreamBoothLoRAFleet: the denoiser ran outside samples_of(...): which concept's LoRA "
                               "each sample takes is unknown (sample a concept from its exported folder)")
        return args, {**kwargs, "adapter_names": self._sample_adapters}

    @contextlib.contextmanager
    def samples_of(self, names: list[str]) -> Iterator[None]:
        """Inside the block, sample ``i`` goes through concept ``names[i]``'s LoRA."""
        previous, self._sample_adapters = self._sample_adapters, [self.adapters[n] for n in names]
        try:
            yield
        finally:
            self._sample_adapters = previous

    def concept_parameters(self, name: str) -> list[nn.Parameter]:
        """Concept ``name``'s LoRA weights, then its token vectors: its own run's order of trainables (the order
        of the per-tensor norms that gradient clipping sums)."""
        return [*self._lora_parameters[name], *super().concept_parameters(name)]

    def trained_weight_names(self) -> set[str]:
        """Every concept's vectors and LoRA weights, stopped ones included."""
        lora = {f"{self.denoiser_name}.{n}" for n, _ in self.denoiser.named_parameters()
                if ".lora_" in n and any(f".{a}." in n for a in self.adapters.values())}
        return super().trained_weight_names() | lora

    def single_run_weights(self, name: str) -> dict[str, torch.Tensor]:
        """Concept ``name``'s trainables under ``DreamBoothLoRA``'s parameter names (its own run's snapshot)."""
        adapter = self.adapters[name]
        weights = super().single_run_weights(name)
        for param_name, param in self.denoiser.named_parameters():
            if ".lora_" in param_name and f".{adapter}." in param_name:
                key = f"{self.denoiser_name}.{param_name.replace(f'.{adapter}.', f'.{ADAPTER}.')}"
                weights[key] = param.detach().to("cpu", copy=True).contiguous()
        return weights

    # ----------------------------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        """Refuse class images (see :func:`refuse_prior_preservation`), then the fleet's set-up."""
        if self._trainer is not None:
            refuse_prior_preservation(getattr(self.trainer, "datamodule", None))
        super().setup(stage)

    @torch.no_grad()
    def deterministic_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """L_det with LoRA dropout off."""
        with lora_dropout_disabled(self.denoiser):
            return super().deterministic_loss(batch)

    @torch.no_grad()
    def concept_deterministic_losses(self, batches: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Every active concept's L_det from one forward, with LoRA dropout off."""
        with lora_dropout_disabled(self.denoiser):
            return super().concept_deterministic_losses(batches)

    def clips_gradients(self) -> bool:
        """Whether gradients are clipped (each concept by its own norm)."""
        return self.max_grad_norm is not None or super().clips_gradients()

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip each active concept's gradient by its own norm, as its own run clips the whole of its trainables."""
        limit = gradient_clip_val if gradient_clip_val is not None else self.max_grad_norm
        if limit is None:
            return
        for name in self.active_concepts:
            params = [p for p in self.concept_parameters(name) if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, limit)

    # ----------------------------------------------------------------------------------------------- export
    def export_concept(self, name: str, output_dir: Path) -> list[str]:
        """``pytorch_lora_weights.safetensors`` and ``learned_embeds.safetensors`` of concept ``name``."""
        weights = save_lora(output_dir, self.family, {self.denoiser_name: self.denoiser}, adapter=self.adapters[name])
        return [weights, *super().export_concept(name, output_dir)]

    @staticmethod
    def load_into_pipeline(pipe: Any, run_dir: str | Path) -> Any:
        """Load one concept's folder (its LoRA and token) into ``pipe``."""
        from lightning_custom.methods.dreambooth import DreamBoothLoRA

        return DreamBoothLoRA.load_into_pipeline(pipe, run_dir)


def refuse_prior_preservation(datamodule: Any) -> None:
    """A fleet trains without class images (each concept would need its own class set in the batch)."""
    if getattr(getattr(datamodule, "hparams", None), "with_prior_preservation", False):
        raise UserInputError("--data.with_prior_preservation: a DreamBoothLoRAFleet trains without class images; "
                             "train concepts that need prior preservation as separate DreamBoothLoRA runs")
