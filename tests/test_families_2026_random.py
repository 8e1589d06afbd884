"""The ``random:`` architectures of the 2026 families (issue 28, item 6): published configs, their parameter counts
checked against the published sizes, found by ``architectures`` in ``architectures_2026``."""

from __future__ import annotations

import pytest
import torch

from lightning_custom.synthetic.architectures import architecture_family, architecture_names, build_random_components

# (transformer, text encoder) parameters; the published sizes they round to: Z-Image "6B" (Qwen3-4B), FLUX.2 [klein]
# "4B" / "9B" (Qwen3-4B / Qwen3-8B), Qwen-Image "20B" (Qwen2.5-VL-7B, 8.29B with its vision tower).
EXPECTED = {
    "z-image": ("z_image", 6_154_908_736, 4_022_468_096, "ZImageTransformer2DModel"),
    "flux2-klein-4b": ("flux2", 3_875_544_576, 4_022_468_096, "Flux2Transformer2DModel"),
    "flux2-klein-9b": ("flux2", 9_078_581_248, 8_190_735_360, "Flux2Transformer2DModel"),
    "qwen-image": ("qwen_image", 20_430_401_088, 8_292_166_656, "QwenImageTransformer2DModel"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_random_architecture_has_the_published_size(name):
    family, transformer_params, text_params, transformer_class = EXPECTED[name]
    assert f"random:{name}" in architecture_names() and architecture_family(f"random:{name}") == family
    parts = build_random_components(f"random:{name}", dtype=torch.bfloat16, device="meta")
    assert type(parts["transformer"]).__name__ == transformer_class
    assert sum(p.numel() for p in parts["transformer"].parameters()) == transformer_params
    assert sum(p.numel() for p in parts["text_encoder"].parameters()) == text_params
    assert {p.dtype for p in parts["transformer"].parameters()} == {torch.bfloat16}
    published = {"z-image": 6e9, "flux2-klein-4b": 4e9, "flux2-klein-9b": 9e9, "qwen-image": 20e9}[name]
    assert abs(transformer_params - published) / published < 0.05


def test_from_components_prepares_the_family_as_load_does():
    """load_model's random path goes through ``from_components``: the prompt format and klein's LoRA targets."""
    from lightning_custom.families.flux2 import Flux2KleinFamily, build_tiny_flux2_components
    from lightning_custom.families.qwen_text import format_prompts

    components = build_tiny_flux2_components()
    family = Flux2KleinFamily.from_components(components)
    assert family.lora_targets[-1] == "single_transformer_blocks.0.attn.to_out"
    assert format_prompts(components["tokenizer"], ["a dog"])[0].startswith("<|im_start|>user\na dog<|im_end|>")
