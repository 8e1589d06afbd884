"""The common ground of the 2026 flow families (Z-Image, FLUX.2 [klein], Qwen-Image): one Qwen text encoder, one
flow transformer that is the only part diffusers' LoRA format holds, and the training schedule of diffusers'
DreamBooth-LoRA scripts for them.

All three scripts (``examples/dreambooth/train_dreambooth_lora_z_image.py``, ``train_dreambooth_lora_flux2_klein.py``,
``train_dreambooth_lora_qwen_image.py``) draw ``u`` from ``compute_density_for_timestep_sampling`` and index the
training scheduler's own ``timesteps`` / ``sigmas`` (``noise_scheduler_copy``), with no resolution-dependent shift
at training time (the pipelines shift only at inference); the loss is ``compute_loss_weighting_for_sd3``-weighted
MSE against ``noise - x``. :class:`QwenFlowFamily` implements that once; a family module supplies the text states,
the transformer call and its component classes.

Their tiny offline models (``embedded:tiny-z-image``...) are built by
:mod:`lightning_custom.synthetic.toy_flow_2026`, their ``random:`` architectures by
:mod:`lightning_custom.synthetic.architectures_2026` (in the synthetic layer below the families, so that
``families.components`` and ``synthetic.architectures`` find them without an upward import).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from lightning_custom.objectives import flow_matching as fm
from lightning_custom.errors import UserInputError
from lightning_custom.families.base import (
    FamilyHost,
    FlowMatchingOptions,
    ModelFamily,
    ModelParts,
    matches_flow_denoiser,
)

__all__ = ["QwenFlowFamily"]


class QwenFlowFamily(ModelFamily):
    """A flow family with one (Qwen) text encoder and a transformer-only LoRA format (an abstract base)."""

    denoiser_name: ClassVar[str] = "transformer"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    #: The scripts never train the Qwen text encoder (it is 4B to 8B parameters).
    trainable_text_encoder_names: ClassVar[tuple[str, ...]] = ()
    supports_custom_diffusion: ClassVar[bool] = False
    is_flow: ClassVar[bool] = True
    #: diffusers class names of the transformer, the VAE and the text encoder (in ``diffusers`` / ``transformers``).
    transformer_class: ClassVar[str]
    vae_class: ClassVar[str] = "AutoencoderKL"
    text_encoder_class: ClassVar[str]
    #: The pipeline's ``max_sequence_length`` default (the tokens a caption is padded / truncated to).
    max_sequence_length: ClassVar[int] = 512
    #: Why new tokens (Textual Inversion, ``train_token_embedding``) are refused at fit time, in one line: the stock
    #: pipelines of these families have no ``load_textual_inversion``, so a learned token could not be used outside
    #: this package (the Qwen text encoders themselves could take a new embedding row).
    textual_inversion_refusal: ClassVar[str | None] = (
        "new tokens (TextualInversion, train_token_embedding) are not supported on this family: its stock pipeline "
        "has no load_textual_inversion to load them; use DreamBoothLoRA or DreamBooth with an existing word as the "
        "identifier (placeholder_token: sks)"
    )

    # ------------------------------------------------------------------------------------------ detection
    @classmethod
    def matches(cls, model_index: dict[str, Any], denoiser_config: dict[str, Any]) -> bool:
        """The family's transformer class, with a ``FlowMatchEulerDiscreteScheduler`` where the index names one."""
        return matches_flow_denoiser(model_index, denoiser_config, cls.transformer_class)

    @classmethod
    def load(
        cls, source: str, *, revision: str | None = None, variant: str | None = None,
        dtype: torch.dtype = torch.float32, vae_name_or_path: str | None = None,
        options: FlowMatchingOptions | None = None,
    ) -> ModelParts:
        """Every part from a hub id or a folder, frozen; the transformer, the VAE and the text encoder in ``dtype``.

        ``vae_name_or_path`` names a replacement VAE folder (with or without a ``vae`` subfolder) of the family's VAE
        class. One-line errors name the source.
        """
        import diffusers
        import transformers
        from transformers import AutoTokenizer

        from lightning_custom.families.components import freeze, load_component

        common = {"revision": revision}
        weights = {"variant": variant, "torch_dtype": dtype, **common}
        vae_class = getattr(diffusers, cls.vae_class)
        if vae_name_or_path:
            vae_folder = Path(vae_name_or_path).expanduser()
            vae = load_component(vae_class, vae_name_or_path, "vae" if (vae_folder / "vae").is_dir() else None,
                                 **weights)
        else:
            vae = load_component(vae_class, source, "vae", **weights)
        components: dict[str, Any] = {
            "transformer": load_component(getattr(diffusers, cls.transformer_class), source, "transformer", **weights),
            "vae": vae,
            "text_encoder": load_component(getattr(transformers, cls.text_encoder_class), source, "text_encoder",
                                           **weights),
            "tokenizer": load_component(AutoTokenizer, source, "tokenizer", **common),
            "scheduler": load_component(diffusers.FlowMatchEulerDiscreteScheduler, source, "scheduler", **common),
        }
        for module in components.values():
            if isinstance(module, torch.nn.Module):
                freeze(module)
        return ModelParts(cls.from_components(components, options), components=components)

    @classmethod
    def from_components(cls, components: dict[str, Any], options: FlowMatchingOptions | None = None) -> QwenFlowFamily:
        """The family around built components, its prompt format attached to their tokenizer."""
        family = cls(components["scheduler"], options)
        family.prepare_tokenizer(components["tokenizer"])
        return family

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        """Attach the pipeline's prompt format to the tokenizer (:mod:`lightning_custom.families.qwen_text`)."""

    # ---------------------------------------------------------------------------------------------- text
    def tokenizer_max_length(self, tokenizer_name: str, tokenizer: Any) -> int:
        """The pipeline's ``max_sequence_length`` (512), or the tokenizer's own limit when that is smaller."""
        return min(self.max_sequence_length, int(tokenizer.model_max_length))

    # ------------------------------------------------------------------------------------------ noise levels
    def sample_noise_levels(
        self, batch_size: int, *, generator: torch.Generator, device: torch.device,
        latent_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Training sigmas ``(B,)``: the weighting scheme's density on the scheduler's training schedule (its static
        ``shift`` applied unless it shifts dynamically), as the scripts draw them; no resolution shift."""
        _, sigmas = fm.sample_sigmas(self.scheduler, batch_size, generator=generator, **self.options.density_kwargs())
        return sigmas.to(device=device, dtype=torch.float32)

    def fixed_noise_levels(
        self, batch_size: int, *, generator: torch.Generator, latent_size: tuple[int, int] | None = None,
        resample: bool = False,
    ) -> torch.Tensor:
        """DVAR's B distinct fixed sigmas from the training density (CPU float32 ``(B,)``); ``resample`` draws them
        like training."""
        draw = fm.sample_sigmas if resample else fm.fixed_evaluation_sigmas
        _, sigmas = draw(self.scheduler, batch_size, generator=generator, **self.options.density_kwargs())
        return sigmas.to(device="cpu", dtype=torch.float32)

    # ----------------------------------------------------------------------------------------------- loss
    def velocity_prediction(
        self, model: FamilyHost, noisy: torch.Tensor, sigmas: torch.Tensor, conditioning: dict[str, Any]
    ) -> torch.Tensor:
        """The transformer's velocity prediction (``noise - x``) for noised latents ``(B, C, h, w)``, same shape."""
        raise NotImplementedError

    def denoising_loss(
        self, model: FamilyHost, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor,
        conditioning: dict[str, Any], reduction: str = "mean",
    ) -> torch.Tensor:
        """Weighted velocity MSE on ``x_t = (1 - sigma) x + sigma * noise`` (the scripts' loss block).

        Args:
            model: Provides ``transformer``, ``module_dtype`` and ``frozen_half_precision``.
            latents: Scaled latents ``(B, C, h, w)`` (:meth:`scale_latents`).
            noise: Same shape.
            levels: Sigmas ``(B,)``.
            conditioning: :meth:`denoiser_kwargs`' output.
            reduction: ``"mean"`` or ``"none"`` (per-sample losses).
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        sigmas = levels.to(device=latents.device, dtype=torch.float32)
        noisy = fm.noisy_model_input(latents.float(), noise.float(), sigmas)
        prediction = self.velocity_prediction(model, noisy, sigmas, conditioning)
        target = fm.flow_matching_target(latents.float(), noise.float())
        losses = fm.weighted_mse(prediction, target, fm.loss_weighting(self.options.weighting_scheme, sigmas))
        return losses if reduction == "none" else losses.mean()

    # ---------------------------------------------------------------------------------------------- pipeline
    def pipeline(self, parts: Any, scheduler: Any | None = None) -> Any:
        """The family's pipeline around the live components; by default a fresh copy of the training scheduler."""
        import diffusers

        if scheduler is None:
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        return getattr(diffusers, self.pipeline_class_name)(
            scheduler=scheduler, vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
            transformer=parts.transformer,
        )

    def save_lora(self, output_dir: Any, weight_name: str, layers: dict[str, dict[str, torch.Tensor]],
                  metadata: dict[str, dict[str, Any]]) -> None:
        """Writes ``weight_name`` with the pipeline's ``save_lora_weights``: the transformer's adapter only (the
        family's LoRA loader has no text-encoder slot, and the scripts never train the text encoder)."""
        import diffusers

        from lightning_custom.runtime.io import atomic_path

        unknown = sorted(set(layers) - {"transformer"})
        if unknown or not layers:
            raise UserInputError(f"--model.init_args: {self.pipeline_class_name} LoRA files hold the transformer "
                                 f"only; cannot save {unknown or 'nothing'}")
        with atomic_path(Path(output_dir) / weight_name) as tmp:
            getattr(diffusers, self.pipeline_class_name).save_lora_weights(
                str(tmp.parent), weight_name=tmp.name, transformer_lora_layers=layers["transformer"],
                transformer_lora_adapter_metadata=metadata.get("transformer"),
            )
