"""Custom Diffusion (Kumari et al., 2023): train only the cross-attention key/value projections and modifier tokens.

The text features enter the UNet only through the cross-attention keys and values, so updating ``attn2.to_k`` and
``attn2.to_v`` (about 5% of the UNet) plus a new token per concept is enough to learn one or several concepts.
As in the reference code, the start token's keys and values pass no gradient, and the gradient norm is clipped
at 1.0. Several concepts train in one run from the data module's ``concepts`` list.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_custom.errors import UserInputError
from lightning_custom.runtime.io import atomic_path
from lightning_custom.methods.finetuning import FineTuningModule

WEIGHT_NAME = "pytorch_custom_diffusion_weights.bin"


def _input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype), *args[1:])


def _output_to(dtype: torch.dtype, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(dtype)


class CustomDiffusion(FineTuningModule):
    """Custom Diffusion: cross-attention K/V of every UNet transformer block, plus the modifier token(s).

    Every other weight, and every other row of the embedding matrix, stays bit-identical. Exports
    ``pytorch_custom_diffusion_weights.bin`` (diffusers' Custom Diffusion attention-processor format) and one
    ``<token>.safetensors`` per modifier token for ``pipe.load_textual_inversion``; see :meth:`load_into_pipeline`.

    Args:
        placeholder_token: the modifier token(s), one per concept, joined by ``+``: ``"<new1>+<new2>"``.
        initializer_token: word(s) initialising the modifier tokens (one, or one per token joined by ``+``);
            the reference code uses rare tokens such as ``ktn``, ``pll``, ``ucd``.
        train_token_embedding: learn the modifier tokens (off: the tokens must already exist and stay fixed).
        prior_loss_weight: weight of the class-image loss under prior preservation.
        max_grad_norm: gradient-norm clipping (the paper: 1.0; ``None``: off).
        **kwargs: see :class:`~lightning_custom.methods.base.PersonalizationModule`.
    """

    token_file_per_token = True

    def __init__(
        self,
        placeholder_token: str = "<new1>",
        initializer_token: str = "ktn",
        train_token_embedding: bool = True,
        prior_loss_weight: float = 1.0,
        max_grad_norm: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(placeholder_token=placeholder_token, initializer_token=initializer_token,
                         train_token_embedding=train_token_embedding, prior_loss_weight=prior_loss_weight,
                         max_grad_norm=max_grad_norm, **kwargs)

    def cross_attention_layers(self) -> dict[str, nn.Module]:
        """``{name: Attention}`` of the UNet's cross-attention layers (``...attn2``)."""
        from diffusers.models.attention_processor import Attention

        return {
            name: module for name, module in self.unet.named_modules()
            if isinstance(module, Attention) and module.is_cross_attention and name.endswith("attn2")
        }

    def configure_trainable(self) -> None:
        """Add the modifier tokens; unfreeze ``to_k``/``to_v`` of every cross-attention layer (kept fp32)."""
        if not self.family.supports_custom_diffusion:
            raise UserInputError(
                f"--model.pretrained_model_name_or_path: Custom Diffusion trains a UNet's cross-attention K/V and has "
                f"no standard counterpart on a {self.family.name} model ({self.hparams.pretrained_model_name_or_path}):"
                f" use DreamBoothLoRA or TextualInversion"
            )
        from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

        self.configure_tokens()
        unet_dtype = self.unet.dtype
        for attention in self.cross_attention_layers().values():
            # The reference code's attention: the start token's keys and values are detached (same values).
            attention.set_processor(CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False))
            for projection in (attention.to_k, attention.to_v):
                projection.requires_grad_(True)
                if unet_dtype != torch.float32:
                    projection.float()
                    projection.register_forward_pre_hook(_input_to_weight_dtype)
                    projection.register_forward_hook(partial(_output_to, unet_dtype))

    def custom_diffusion_state_dict(self) -> dict[str, Any]:
        """The trained K/V weights under diffusers' Custom Diffusion processor keys; ``{}`` for other processors.

        The empty entries make diffusers replace every attention processor (its loader requires them all).
        """
        trained = self.cross_attention_layers()
        state: dict[str, Any] = {}
        for processor_name in self.unet.attn_processors:
            attention = trained.get(processor_name.removesuffix(".processor"))
            if attention is None:
                state[processor_name] = {}
                continue
            if attention.to_k.bias is not None or attention.to_v.bias is not None:
                raise ValueError("Custom Diffusion's export format holds bias-free key/value projections only")
            state[f"{processor_name}.to_k_custom_diffusion.weight"] = attention.to_k.weight.detach().float().cpu()
            state[f"{processor_name}.to_v_custom_diffusion.weight"] = attention.to_v.weight.detach().float().cpu()
        return state

    def export_artifacts(self, output_dir: Path) -> list[str]:
        """Write ``pytorch_custom_diffusion_weights.bin`` and ``<token>.safetensors`` per modifier token."""
        with atomic_path(Path(output_dir) / WEIGHT_NAME) as tmp:
            torch.save(self.custom_diffusion_state_dict(), tmp)
        return [WEIGHT_NAME, *self.export_token_embeddings(Path(output_dir))]

    @staticmethod
    def load_into_pipeline(pipe: Any, run_dir: str | Path) -> Any:
        """Load a run's K/V weights and modifier tokens into ``pipe`` (the way diffusers' Custom Diffusion does).

        ``pipe.unet.load_attn_procs(run_dir, weight_name=...)`` alone installs nothing in diffusers 0.42
        (huggingface/diffusers#9320: the processors are set only when ``_pipeline`` is passed), so it is passed.
        """
        pipe.unet.load_attn_procs(str(run_dir), weight_name=WEIGHT_NAME, _pipeline=pipe)
        FineTuningModule.load_token_embeddings(pipe, run_dir)
        return pipe
