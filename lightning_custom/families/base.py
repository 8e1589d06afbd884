"""The model-family interface: what the shared base and the data module ask of a text-to-image architecture.

A family knows how its checkpoint is laid out (which tokenizers, text encoders, denoiser and scheduler it has),
how text becomes conditioning, how VAE latents are scaled, how training noise levels are drawn, how the noised
input and the regression target are built, and how the loss is weighted. The personalization methods never
branch on the architecture: they ask :attr:`PersonalizationModule.family <lightning_custom.methods.base.
PersonalizationModule.family>`.

Families: :class:`~lightning_custom.families.stable_diffusion.StableDiffusionFamily` (SD 1.x / 2.x, DDPM
epsilon or v-prediction), :class:`~lightning_custom.families.stable_diffusion.StableDiffusionXLFamily`,
:class:`~lightning_custom.families.flux.FluxFamily` and :class:`~lightning_custom.families.sd3.SD3Family`
(rectified flow). Adding one (FLUX.2, Qwen-Image...) is one module that subclasses :class:`ModelFamily` and
registers itself in :data:`lightning_custom.families.FAMILIES`.

"Noise levels" are what the denoiser is conditioned on: integer DDPM timesteps for SD / SDXL, float sigmas in
(0, 1] for flow models. The evaluation batch stores them under the key ``"timesteps"`` for both, so replay,
resampling (``--data.resample timesteps``) and ``summary.json`` are unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

import torch


class FamilyHost(Protocol):
    """What a family needs from the LightningModule it trains in, written down so that the families import
    nothing from ``methods/`` (:class:`~lightning_custom.methods.base.PersonalizationModule` is the one host).

    Attributes:
        device: where the batch and the module's weights are.
        alphas_cumprod: the DDPM schedule's cumulative alphas (SD / SDXL only).
        unet: the SD / SDXL denoiser; ``None`` on a flow model.
        transformer: the FLUX / SD3 denoiser; ``None`` on SD / SDXL.
        text_encoder: the first (CLIP) text encoder.
        text_encoder_2: SDXL's second CLIP encoder, FLUX's T5 (``None`` where there is none).
        text_encoder_3: SD3's T5 encoder (``None`` where there is none, or dropped).
        tokenizer: the first tokenizer (the Qwen families read their prompt format and padding from it).
    """

    device: torch.device
    alphas_cumprod: torch.Tensor
    unet: Any
    transformer: Any
    text_encoder: Any
    text_encoder_2: Any
    text_encoder_3: Any
    tokenizer: Any

    def frozen_half_precision(self, name: str) -> AbstractContextManager[None]:
        """Run the frozen component ``name`` in its half-precision copy where the module keeps one."""

    def module_dtype(self, name: str) -> torch.dtype:
        """The dtype the component ``name``'s inputs must have."""


@dataclass(frozen=True)
class FlowMatchingOptions:
    """Training settings of the flow families (ignored by SD / SDXL); the names of diffusers' flow scripts.

    Attributes:
        weighting_scheme: sigma density / loss weighting: ``none`` (uniform, weight 1), ``logit_normal``,
            ``mode``, ``sigma_sqrt``, ``cosmap``.
        logit_mean: mean of ``logit_normal``.
        logit_std: standard deviation of ``logit_normal``.
        mode_scale: scale of ``mode``.
        guidance_scale: FLUX's guidance input where the transformer has ``guidance_embeds`` (FLUX.1-dev).
        resolution_shift: FLUX: shift the sigmas by the image's sequence length, as ``FluxPipeline`` does at
            inference (the scheduler's dynamic shifting); ``False`` trains on the unshifted schedule.
    """

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 3.5
    resolution_shift: bool = True

    def density_kwargs(self) -> dict[str, Any]:
        """The sigma-density arguments of :func:`lightning_custom.objectives.flow_matching.sample_sigmas` (and of
        ``fixed_evaluation_sigmas``): training and DVAR's fixed batch draw from the same density."""
        return {"weighting_scheme": self.weighting_scheme, "logit_mean": self.logit_mean,
                "logit_std": self.logit_std, "mode_scale": self.mode_scale}


@dataclass
class ModelParts:
    """A loaded model: its family and its components under the diffusers pipeline's names.

    ``components`` maps e.g. ``"tokenizer"``, ``"text_encoder"``, ``"tokenizer_2"``, ``"text_encoder_2"``,
    ``"vae"``, ``"unet"`` or ``"transformer"`` and ``"scheduler"`` (the training scheduler) to the objects; a
    family's optional part that is absent (SD3 without T5) maps to ``None``. Every module is frozen.
    """

    family: ModelFamily
    components: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        components = self.__dict__.get("components", {})
        if name in components:
            return components[name]
        raise AttributeError(name)


class ModelFamily(ABC):
    """One text-to-image architecture (stateless apart from its scheduler and options; one per module).

    Class attributes name the components so that the shared code can find them without knowing the family.

    Args:
        scheduler: the training noise scheduler (``DDPMScheduler`` or ``FlowMatchEulerDiscreteScheduler``).
        options: the flow-matching settings (unused by SD / SDXL).
    """

    #: Short name used in messages, README and ``summary.json`` (``"sd"``, ``"sdxl"``, ``"flux"``, ``"sd3"``).
    name: ClassVar[str]
    #: The diffusers pipeline class name (``model_index.json``'s ``_class_name``).
    pipeline_class_name: ClassVar[str]
    #: Attribute / pipeline name of the denoiser: ``"unet"`` or ``"transformer"``.
    denoiser_name: ClassVar[str] = "unet"
    #: Attribute / pipeline names of the text encoders, in the pipeline's order.
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    #: The matching tokenizers.
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    #: Text encoders a pipeline can run without (diffusers passes ``None``), e.g. SD3's T5.
    optional_text_encoders: ClassVar[tuple[str, ...]] = ()
    #: The names under which a Textual-Inversion file stores each text encoder's vectors (``clip_l``, ``t5``...);
    #: empty for the single-encoder SD format (one ``<token>`` key per vector file).
    embedding_keys: ClassVar[tuple[str, ...]] = ()
    #: Text encoders that ``train_text_encoder`` trains (LoRA or full); diffusers' scripts never train T5.
    trainable_text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    #: Default LoRA target modules of the denoiser (diffusers' training scripts).
    lora_targets: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    #: Whether Custom Diffusion applies (cross-attention K/V of a UNet).
    supports_custom_diffusion: ClassVar[bool] = False
    #: Whether the noise levels are flow sigmas (else DDPM timesteps).
    is_flow: ClassVar[bool] = False
    #: Sampling's guidance scale when neither the call nor the model folder gives one (``None``: 7.5, SD's).
    default_guidance_scale: ClassVar[float | None] = None
    #: Latents per side that one denoiser token covers (``None``: read from the denoiser's config by
    #: :func:`denoiser_latent_patch`).
    latent_patch: ClassVar[int | None] = None

    def __init__(self, scheduler: Any, options: FlowMatchingOptions | None = None) -> None:
        self.scheduler = scheduler
        self.options = options or FlowMatchingOptions()

    @classmethod
    def from_components(cls, components: dict[str, Any], options: FlowMatchingOptions | None = None) -> ModelFamily:
        """The family of already built components (``random:`` architectures, :meth:`load`): by default just its
        training scheduler; a family that prepares a tokenizer or reads the denoiser's config does it here."""
        return cls(components["scheduler"], options)

    # ------------------------------------------------------------------------------------------ detection
    @classmethod
    @abstractmethod
    def matches(cls, model_index: dict[str, Any], denoiser_config: dict[str, Any]) -> bool:
        """Whether a checkpoint is this family's, from its ``model_index.json`` and its denoiser's config."""

    @classmethod
    @abstractmethod
    def load(
        cls, source: str, *, revision: str | None, variant: str | None, dtype: torch.dtype,
        vae_name_or_path: str | None, options: FlowMatchingOptions | None,
    ) -> ModelParts:
        """Load (frozen) every component from a hub id or a folder, with one-line errors."""

    # ---------------------------------------------------------------------------------------------- text
    @abstractmethod
    def encode_text(self, model: FamilyHost, input_ids: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The text conditioning from one token-id tensor per present text encoder (in :attr:`text_encoder_names`
        order, absent optional ones skipped): a dict of tensors the denoiser's keyword arguments are built from."""

    @abstractmethod
    def denoiser_kwargs(
        self, model: FamilyHost, text: dict[str, torch.Tensor], batch: dict[str, Any]
    ) -> dict[str, Any]:
        """The denoiser's conditioning keyword arguments (besides the noised sample and the noise level)."""

    # --------------------------------------------------------------------------------------------- latents
    def latent_spec(self, vae: Any) -> tuple[int, int]:
        """``(latent channels, downsampling factor)`` of the VAE (before any packing)."""
        config = vae.config
        return config.latent_channels, 2 ** (len(config.block_out_channels) - 1)

    def latent_distribution(self, vae: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of the VAE's latent distribution for images ``(B, 3, H, W)``, float32 ``(B, C, h, w)``
        (a video VAE such as Qwen-Image's takes and gives one frame more: its family drops it)."""
        dist = vae.encode(pixel_values).latent_dist
        return dist.mean.float(), dist.std.float()

    def scale_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents to the denoiser's input scale: ``(z - shift_factor) * scaling_factor``."""
        from lightning_custom.objectives.diffusion import scale_latents

        config = vae.config
        return scale_latents(latents, config.scaling_factor, getattr(config, "shift_factor", None))

    # ------------------------------------------------------------------------------------------ noise levels
    @abstractmethod
    def sample_noise_levels(
        self, batch_size: int, *, generator: torch.Generator, device: torch.device, latent_size: tuple[int, int]
    ) -> torch.Tensor:
        """Training noise levels for one batch, drawn from ``generator`` (timesteps or sigmas, shape ``(B,)``)."""

    @abstractmethod
    def fixed_noise_levels(
        self, batch_size: int, *, generator: torch.Generator, latent_size: tuple[int, int], resample: bool = False
    ) -> torch.Tensor:
        """DVAR's fixed evaluation noise levels, drawn once by the evaluation batch's own generator (on the CPU).

        ``resample=True`` is the ablation that redraws them at every evaluation (``--data.resample timesteps``).
        """

    # ----------------------------------------------------------------------------------------------- loss
    @abstractmethod
    def denoising_loss(
        self, model: FamilyHost, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor,
        conditioning: dict[str, Any], reduction: str = "mean",
    ) -> torch.Tensor:
        """The (weighted) regression loss of the denoiser on ``latents`` noised to ``levels`` with ``noise``.

        ``reduction="none"`` returns one value per sample (prior preservation splits instance and class samples).
        """

    # ---------------------------------------------------------------------------------------------- pipeline
    @abstractmethod
    def pipeline(self, parts: Any, scheduler: Any | None = None) -> Any:
        """A diffusers inference pipeline around live components (anything with the component attributes)."""

    @abstractmethod
    def save_lora(self, output_dir: Any, weight_name: str, layers: dict[str, dict[str, torch.Tensor]],
                  metadata: dict[str, dict[str, Any]]) -> None:
        """Write a LoRA file that this family's pipeline's ``load_lora_weights`` reads.

        ``layers`` / ``metadata`` map a component name (``"unet"``/``"transformer"``, ``"text_encoder"``...) to its
        adapter's diffusers-named weights and its ``LoraConfig`` dict.
        """

    def tokenizer_max_length(self, tokenizer_name: str, tokenizer: Any) -> int:
        """The length captions are padded / truncated to for ``tokenizer`` (the pipeline's; CLIP: 77)."""
        return int(tokenizer.model_max_length)

    def module_buffers(self) -> dict[str, torch.Tensor]:
        """Tensors the module registers as non-persistent buffers, so they follow it to its device (SD's
        ``alphas_cumprod``); read back as ``model.<name>``."""
        return {}

    # ------------------------------------------------------------------------------------------------- help
    def present_text_encoders(self, parts: Any) -> list[str]:
        """The names in :attr:`text_encoder_names` whose encoder is loaded (optional ones may be ``None``)."""
        return [name for name in self.text_encoder_names if getattr(parts, name, None) is not None]

    def present_tokenizers(self, parts: Any) -> list[str]:
        """The tokenizers of :meth:`present_text_encoders`."""
        pairs = zip(self.text_encoder_names, self.tokenizer_names)
        return [tok for enc, tok in pairs if getattr(parts, enc, None) is not None]


def matches_flow_denoiser(model_index: dict[str, Any], denoiser_config: dict[str, Any], class_name: str) -> bool:
    """Whether a checkpoint's denoiser is ``class_name`` with, where the model index names one, a
    ``FlowMatchEulerDiscreteScheduler`` (what tells FLUX and SD3 checkpoints, from their configs alone)."""
    if denoiser_config.get("_class_name") != class_name:
        return False
    scheduler = model_index.get("scheduler")
    return not scheduler or scheduler[-1] in (None, "FlowMatchEulerDiscreteScheduler")


def denoiser_latent_patch(module: Any) -> int:
    """Latents per side that one denoiser token covers: 2 for FLUX (2x2 packing) and SD3 (``patch_size`` 2), else 1.

    Read from the model family's ``latent_patch`` where it has one; otherwise from the denoiser's config: its
    ``patch_size`` times the packing that its input channels imply (FLUX's ``in_channels`` is 4x the VAE's latent
    channels, one token per 2x2 latents). UNets have neither, so 1.
    """
    family_patch = getattr(getattr(module, "family", None), "latent_patch", None)
    if isinstance(family_patch, int):
        return family_patch
    config = getattr(getattr(module, "denoiser", None), "config", None)
    vae_config = getattr(getattr(module, "vae", None), "config", None)
    if config is None or vae_config is None:
        return 1
    patch = int(getattr(config, "patch_size", None) or 1)
    in_channels, latent_channels = getattr(config, "in_channels", None), getattr(vae_config, "latent_channels", None)
    if isinstance(in_channels, int) and isinstance(latent_channels, int) and in_channels % latent_channels == 0:
        packing = int(round((in_channels // latent_channels) ** 0.5))
        if packing > 1 and packing * packing * latent_channels == in_channels:
            patch *= packing
    return patch
