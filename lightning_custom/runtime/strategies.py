"""Multi-device strategies for large denoisers: FSDP sharded by the denoiser's repeated transformer blocks.

``--trainer.strategy fsdp`` on the CLI becomes :class:`DenoiserFSDPStrategy`: Lightning's ``FSDPStrategy`` with

- the module's :meth:`fsdp_blocks` (DreamBooth: the denoiser's transformer blocks) as the wrapping policy, unless
  the user gave one; each block is one FSDP unit, sharded across the ranks and gathered for its forward;
- the frozen components (VAE, T5, frozen CLIP) left out of FSDP (``ignored_states``): they are replicated like
  under DDP. Sharding them would make every call a collective, and the latent and text-state caches call them on
  one rank and not another (a cache miss on one rank only), which would hang;
- CPU support (gloo, ``device_id=cpu``; Lightning refuses a CPU accelerator for ``fsdp`` and torch needs the
  device named);
- gradient-norm clipping (``max_grad_norm``) through ``FullyShardedDataParallel.clip_grad_norm_``, the norm of
  the whole gradient across shards (Lightning's FSDP precision plugin refuses norm clipping);
- the full weights gathered onto rank 0 when training ends, so that the exports (``export_artifacts``, called
  on rank 0 only by the run summary) see a plain module with every weight, not the shards.

Tested (tests/test_fsdp.py, 2 CPU processes, tiny FLUX, fp32): the same DVAR stop step and exported transformer as
DDP. Not tested: ``state_dict_type="sharded"``, gradient checkpointing and ``bf16-mixed`` under FSDP (on a GPU use
``--trainer.precision bf16-mixed``: ``32-true`` makes Lightning cast every component, the frozen T5 too, to fp32),
and ``validate`` with ``fsdp``. Live sample grids (``--sample.every_n_steps``) sample on rank 0 alone from the
shards mid-training: do not combine them with FSDP.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

log = logging.getLogger(__name__)

#: The ``--trainer.strategy`` names the CLI turns into :class:`DenoiserFSDPStrategy` (Lightning's FSDP names).
FSDP_STRATEGY_NAMES = ("fsdp", "fsdp_cpu_offload")
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def repeated_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of ``model``'s repeated blocks: diffusers' ``_repeated_blocks`` names where the model declares
    them (FLUX: ``FluxTransformerBlock``, ``FluxSingleTransformerBlock``; SD3: ``JointTransformerBlock``; the UNet:
    its ``BasicTransformerBlock``), else the classes of the children of its ``ModuleList`` attributes."""
    names = set(getattr(model, "_repeated_blocks", ()) or ())
    classes = {type(module) for module in model.modules() if type(module).__name__ in names}
    if not classes:
        for child in model.children():
            if isinstance(child, nn.ModuleList):
                classes.update(type(block) for block in child)
    return classes


def plain_parameter_name(name: str) -> str:
    """``name`` without the wrappers' prefixes FSDP and activation checkpointing put in ``named_parameters()``
    (``transformer.transformer_blocks.0._fsdp_wrapped_module.attn.to_q.weight`` -> ``...0.attn.to_q.weight``): the
    name the gathered state dict uses."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def frozen_components(module: nn.Module) -> list[nn.Module]:
    """The direct children of ``module`` that have parameters, none of them trainable (VAE, T5, frozen CLIP)."""
    frozen = []
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.append(child)
    return frozen


def apply_block_wrap_policy(strategy: FSDPStrategy, module: Any) -> set[type[nn.Module]]:
    """Give ``strategy`` the module's :meth:`fsdp_blocks` as its ``auto_wrap_policy`` when it has none.

    Returns:
        The block classes set (empty when the strategy has a policy, or the module names no blocks).
    """
    if "auto_wrap_policy" in strategy.kwargs or not hasattr(module, "fsdp_blocks"):
        return set()
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    classes = set(module.fsdp_blocks())
    if classes:
        strategy.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
    return classes


class ShardedNormClipping(FSDPPrecision):
    """Lightning's FSDP precision plugin, with norm clipping by the root FSDP module's ``clip_grad_norm_`` (the norm
    of the whole gradient, summed over every rank's shard), which :class:`DenoiserFSDPStrategy` sets."""

    def __init__(self, precision: Any = "32-true", scaler: Any = None) -> None:
        super().__init__(precision, scaler)
        self.sharded_root: nn.Module | None = None

    def clip_grad_by_norm(self, optimizer: torch.optim.Optimizer, clip_val: float) -> None:
        """Clip the sharded gradients to total norm ``clip_val`` (a collective: every rank calls it)."""
        if self.sharded_root is None:
            super().clip_grad_by_norm(optimizer, clip_val)
        self.sharded_root.clip_grad_norm_(clip_val)


class DenoiserFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy for full fine-tuning of a large denoiser (see the module docstring).

    Arguments are ``FSDPStrategy``'s. ``state_dict_type="full"`` (the default) is what resuming and the exports are
    tested with.
    """

    @property
    def precision_plugin(self) -> FSDPPrecision:
        """The FSDP precision plugin, as :class:`ShardedNormClipping` (so that norm clipping works)."""
        plugin = self._precision_plugin
        if plugin is None or type(plugin) is FSDPPrecision:
            plugin = ShardedNormClipping(plugin.precision if plugin else "32-true",
                                         plugin.scaler if plugin else None)
            self._precision_plugin = plugin
        return plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        already_wrapped = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if not already_wrapped:
            classes = apply_block_wrap_policy(self, self.lightning_module)
            if classes:
                log.info("FSDP wraps each of: %s", ", ".join(sorted(c.__name__ for c in classes)))
            if not {"ignored_modules", "ignored_states"} & set(self.kwargs):
                frozen = frozen_components(self.lightning_module)
                if frozen:
                    self.kwargs["ignored_states"] = frozen
        if self.root_device.type != "cpu" or already_wrapped:
            wrapped = super()._setup_model(model)
        else:
            # Lightning passes device_id=None on a CPU, which FSDP refuses ("needs a non-CPU accelerator device").
            from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing

            wrapped = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device,
                **self.kwargs,
            )
            _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        plugin = self.precision_plugin
        if isinstance(plugin, ShardedNormClipping):
            plugin.sharded_root = wrapped
        return wrapped

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's, after checking that a full checkpoint holds every weight the module trains (Lightning takes
        the weights out of it before the module's ``on_load_checkpoint`` could look)."""
        check = getattr(self.lightning_module, "check_checkpoint_weights", None)
        path = Path(checkpoint_path)
        if check is not None and path.is_file():
            check(torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("state_dict", {}))
        return super().load_checkpoint(checkpoint_path, weights_only)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full state dict on rank 0 (Lightning's), gathered without CPU offload where the shards are already on
        the CPU: FSDP's offload of CPU shards frees memory the state dict still points to (a segfault in torch 2.13)."""
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with self._full_state_dict_on_cpu():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The full optimizer state on rank 0, keyed by parameter id as Lightning's (CPU: see
        :meth:`lightning_module_state_dict`)."""
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's
        with self._full_state_dict_on_cpu():
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    def _full_state_dict_on_cpu(self) -> Any:
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.state_dict_type(
            self.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        )

    def on_train_end(self) -> None:
        """Gather the full weights (on every rank: a collective) and, on rank 0, make the module plain again.

        The run summary exports on rank 0 only, after training; the exports save ``state_dict``s and build
        pipelines, which need every weight in place. Rank 0 holds the gathered weights on the CPU afterwards, the
        module too; the other ranks keep their shards and do nothing more with them.
        """
        super().on_train_end()
        if self.model is None or self.lightning_module is None:
            return
        state = self.lightning_module_state_dict()  # rank 0: the full state on the CPU; the others: empty
        if self.is_global_zero:
            unwrap_fsdp_modules(self.lightning_module, state)
        self.barrier("fsdp_full_weights")


def unwrap_fsdp_modules(module: nn.Module, full_state: dict[str, torch.Tensor]) -> nn.Module:
    """Replace each FSDP unit inside ``module`` by the module it wraps and load ``full_state`` (the gathered
    weights, plain names) in place of the shards; the module ends up on the CPU, where the state is.

    Returns:
        ``module``, now free of FSDP units.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    for name, child in list(module.named_modules()):
        if isinstance(child, FullyShardedDataParallel):
            parent_name, _, attribute = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            parent._modules[attribute] = child.module
    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):  # nested units: unwrap inner ones
        return unwrap_fsdp_modules(module, full_state)
    full_state = {plain_parameter_name(k): v for k, v in full_state.items()}
    module.to("cpu")
    missing = []
    for name, param in list(module.named_parameters()):
        value = full_state.get(name)
        if value is None:
            missing.append(name)
            continue
        # The shards are views of a flat buffer with the wrong shape: replace the parameter (load_state_dict
        # checks shapes, even with assign=True).
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[attribute] = nn.Parameter(value.detach().to("cpu"), requires_grad=param.requires_grad)
    sharded_missing = [name for name in missing if dict(module.named_parameters())[name].numel() == 0]
    if sharded_missing:
        raise RuntimeError(f"the gathered FSDP state lacks {len(sharded_missing)} sharded weights, e.g. "
                           f"{sharded_missing[0]}")
    return module
