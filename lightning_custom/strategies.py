"""Multi-device strategies for large denoisers: FSDP sharded by the denoiser's repeated transformer blocks."""

from __future__ import annotations

from torch import nn


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
