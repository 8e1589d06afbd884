"""The model-family seam of the shared base: detection, text-state caching, quantization options (issue 13)."""

from __future__ import annotations

import pytest
import torch

from lightning_custom.errors import UserInputError
from lightning_custom.families import detect_family, load_model
from lightning_custom.methods import DreamBoothLoRA, TextualInversion


@pytest.mark.parametrize("name, family", [("embedded:tiny-sd", "sd"), ("embedded:tiny-sdxl", "sdxl"),
                                          ("embedded:tiny-flux", "flux"), ("embedded:tiny-sd3", "sd3")])
def test_load_model_reads_the_family_from_the_checkpoint(name, family):
    parts = load_model(name)
    assert parts.family.name == family
    denoiser = parts.components[parts.family.denoiser_name]
    assert all(not p.requires_grad for p in denoiser.parameters())


def test_an_unknown_transformer_is_one_line(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text('{"_class_name": "HunyuanDiT2DModel"}')
    with pytest.raises(UserInputError) as err:
        detect_family(str(tmp_path))
    assert "HunyuanDiT2DModel" in str(err.value) and "\n" not in str(err.value)
    assert "z_image (ZImagePipeline)" in str(err.value)  # the families name themselves (issue 28)


def lora_module(model: str, **kwargs) -> DreamBoothLoRA:
    return DreamBoothLoRA(pretrained_model_name_or_path=model, placeholder_token="sks", rank=2, **kwargs)


def test_flow_models_cache_text_states_and_sd_does_not_by_default(tiny_sd):
    assert not lora_module(tiny_sd).caches_text_states()
    assert lora_module(tiny_sd, cache_text_states=True).caches_text_states()
    assert lora_module("embedded:tiny-flux").caches_text_states()
    # a trained text path never reuses stale states
    assert not lora_module("embedded:tiny-flux", train_text_encoder=True).caches_text_states()


def test_cached_text_states_equal_fresh_ones_and_skip_the_encoders():
    module = lora_module("embedded:tiny-flux")
    captions = ["a photo of sks object", "a sks object", "a photo of sks object"]
    fresh = {k: torch.cat([module.encode_text([c])[k] for c in captions]) for k in ("encoder_hidden_states",
                                                                                  "pooled_projections")}
    calls = []
    handle = module.text_encoder_2.register_forward_hook(lambda *_: calls.append(1))
    first = module.cached_text_states({"caption": captions})
    assert len(calls) == 2  # two distinct captions, each encoded once
    second = module.cached_text_states({"caption": list(reversed(captions))})
    handle.remove()
    assert len(calls) == 2
    for key, value in fresh.items():
        torch.testing.assert_close(first[key], value, rtol=0, atol=0)
        torch.testing.assert_close(second[key], value.flip(0), rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU case is test_quantized_base_loads_on_a_gpu")
def test_quantized_base_is_refused_in_one_line_without_a_gpu():
    with pytest.raises(UserInputError) as err:
        lora_module("embedded:tiny-flux", quantize_base="4bit")
    assert "quantize_base" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.gpu
def test_quantized_base_loads_on_a_gpu():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    module = lora_module("embedded:tiny-flux", quantize_base="4bit", weight_dtype="bfloat16")
    base = module.transformer.transformer_blocks[0].attn.to_q.base_layer
    assert isinstance(base, bnb.nn.Linear4bit)
    assert any(p.requires_grad for n, p in module.transformer.named_parameters() if "lora_" in n)


def test_a_bad_quantization_mode_is_one_line():
    with pytest.raises(UserInputError, match="quantize_base"):
        load_model("embedded:tiny-flux", quantize_denoiser="2bit")


def test_textual_inversion_on_sd_keeps_the_unet_family(tiny_sd):
    module = TextualInversion(pretrained_model_name_or_path=tiny_sd, placeholder_token="<c>",
                              initializer_token="object")
    assert module.denoiser is module.unet and module.family.name == "sd" and not module.caches_text_states()
