"""SD3Family (issue 13) against diffusers' own StableDiffusion3Pipeline and train_dreambooth_lora_sd3.py, on tiny
random components (offline)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_custom.objectives import flow_matching
from lightning_custom.families import FlowMatchingOptions, detect_family
from lightning_custom.families.sd3 import T5_MAX_SEQUENCE_LENGTH, SD3Family, peft_lora_keys
from lightning_custom.synthetic.toy_flow import build_tiny_sd3_components, save_tiny_sd3

CAPTIONS = ["a photo of a dog", "a red cube on a table"]


class Host(nn.Module):
    """Stands in for the PersonalizationModule: components, module_dtype, frozen_half_precision, device."""

    def __init__(self, components: dict) -> None:
        super().__init__()
        for name, value in components.items():
            setattr(self, name, value)
        self.half_precision_calls: list[str] = []

    def module_dtype(self, name: str) -> torch.dtype:
        return next(getattr(self, name).parameters()).dtype

    def frozen_half_precision(self, name: str):
        self.half_precision_calls.append(name)
        return contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def tokenize(family: SD3Family, host: Host, captions: list[str]) -> list[torch.Tensor]:
    """Token ids per present encoder, padded to max length as the pipeline tokenizes."""
    ids = []
    for name in family.present_tokenizers(host):
        tokenizer = getattr(host, name)
        length = family.tokenizer_max_length(name, tokenizer)
        ids.append(tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids)
    return ids


def two_layer_components(with_t5: bool = False) -> dict:
    """Tiny components with a 2-layer transformer: the last SD3 block has no ``to_add_out`` (context_pre_only), so
    one layer would lack a default LoRA target."""
    from diffusers import SD3Transformer2DModel

    components = build_tiny_sd3_components(with_t5=with_t5)
    config = dict(components["transformer"].config)
    config["num_layers"] = 2
    torch.manual_seed(1)
    components["transformer"] = SD3Transformer2DModel.from_config(config).eval()
    return components


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd3")
    return {"no_t5": save_tiny_sd3(root / "no_t5"), "t5": save_tiny_sd3(root / "t5", with_t5=True)}


# ----------------------------------------------------------------------------------------------- detection / load
@pytest.mark.parametrize("key", ["no_t5", "t5"])
def test_detect_and_load(folders, key):
    folder = folders[key]
    assert detect_family(str(folder)) is SD3Family
    parts = SD3Family.load(str(folder), dtype=torch.float32, options=FlowMatchingOptions(weighting_scheme="cosmap"))
    assert isinstance(parts.family, SD3Family)
    assert parts.family.options.weighting_scheme == "cosmap"
    assert parts.scheduler.config.shift == 3.0 and not parts.scheduler.config.use_dynamic_shifting
    modules = [parts.transformer, parts.vae, parts.text_encoder, parts.text_encoder_2]
    if key == "t5":
        assert parts.text_encoder_3 is not None and parts.tokenizer_3 is not None
        modules.append(parts.text_encoder_3)
    else:
        assert parts.text_encoder_3 is None and parts.tokenizer_3 is None
    assert all(not p.requires_grad for module in modules for p in module.parameters())
    # The loaded weights are the saved ones.
    reference = build_tiny_sd3_components(with_t5=key == "t5")
    for name in ("transformer", "text_encoder", "text_encoder_2") + (("text_encoder_3",) if key == "t5" else ()):
        for (n1, p1), (n2, p2) in zip(getattr(parts, name).state_dict().items(),
                                      reference[name].state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2), (name, n1)


def test_load_dtypes(folders):
    parts = SD3Family.load(str(folders["t5"]), dtype=torch.bfloat16, options=None)
    assert parts.transformer.dtype == torch.bfloat16 and parts.vae.dtype == torch.bfloat16
    assert parts.text_encoder_3.dtype == torch.bfloat16
    assert parts.text_encoder.dtype == torch.float32 and parts.text_encoder_2.dtype == torch.float32


def test_matches_needs_sd3_transformer_and_flow_scheduler():
    config = {"_class_name": "SD3Transformer2DModel"}
    assert SD3Family.matches({}, config)
    assert SD3Family.matches({"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}, config)
    assert not SD3Family.matches({"scheduler": ["diffusers", "DDPMScheduler"]}, config)
    assert not SD3Family.matches({}, {"_class_name": "FluxTransformer2DModel"})


def test_load_without_t5_listed_in_index(folders, tmp_path):
    """A folder whose model index marks T5 absent loads it as None even if a stray subfolder exists."""
    import json
    import shutil

    folder = tmp_path / "stray"
    shutil.copytree(folders["t5"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    parts = SD3Family.load(str(folder))
    assert parts.text_encoder_3 is None and parts.tokenizer_3 is None


# ------------------------------------------------------------------------------------------------------ text
@pytest.mark.parametrize("with_t5", [False, True])
def test_encode_text_matches_pipeline(with_t5):
    from diffusers import StableDiffusion3Pipeline

    components = build_tiny_sd3_components(with_t5=with_t5)
    family = SD3Family(components["scheduler"])
    host = Host(components)
    text = family.encode_text(host, tokenize(family, host, CAPTIONS))
    pipe = StableDiffusion3Pipeline(**components)
    t5_length = family.tokenizer_max_length("tokenizer_3", components["tokenizer_3"]) if with_t5 \
        else T5_MAX_SEQUENCE_LENGTH
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=t5_length)
    assert text["encoder_hidden_states"].shape == (2, 77 + t5_length, 64)
    assert torch.equal(text["encoder_hidden_states"], prompt_embeds)
    assert torch.equal(text["pooled_projections"], pooled)
    assert family.denoiser_kwargs(host, text, {"caption": CAPTIONS}) == {
        "encoder_hidden_states": text["encoder_hidden_states"], "pooled_projections": text["pooled_projections"]}
    assert "text_encoder" in host.half_precision_calls and "text_encoder_2" in host.half_precision_calls
    assert ("text_encoder_3" in host.half_precision_calls) == with_t5


def test_tokenizer_max_length():
    from lightning_custom.synthetic.toy_flow import build_t5_tokenizer

    family = SD3Family(None)
    assert family.tokenizer_max_length("tokenizer_3", build_t5_tokenizer(512)) == 256
    assert family.tokenizer_max_length("tokenizer_3", build_t5_tokenizer(32)) == 32
    components = build_tiny_sd3_components()
    assert family.tokenizer_max_length("tokenizer", components["tokenizer"]) == 77
    assert family.tokenizer_max_length("tokenizer_2", components["tokenizer_2"]) == 77


def test_encode_text_wrong_number_of_ids():
    components = build_tiny_sd3_components()
    family = SD3Family(components["scheduler"])
    host = Host(components)
    with pytest.raises(ValueError, match="one token-id tensor per text encoder"):
        family.encode_text(host, tokenize(family, host, CAPTIONS)[:1])


# ------------------------------------------------------------------------------------------------------ loss
def reference_loss(transformer, scheduler, latents, noise, indices, text, weighting_scheme):
    """train_dreambooth_lora_sd3.py's loss block (no preconditioning), per sample."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[indices].reshape(-1, 1, 1, 1)  # the script's get_sigmas(timesteps, n_dim=4)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    model_pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text[0],
                             pooled_projections=text[1], return_dict=False)[0]
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = noise - latents
    return torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)


@pytest.mark.parametrize("weighting_scheme", ["none", "logit_normal", "cosmap"])
def test_denoising_loss_matches_diffusers_script(weighting_scheme):
    from diffusers import FlowMatchEulerDiscreteScheduler

    components = build_tiny_sd3_components()
    family = SD3Family(components["scheduler"], FlowMatchingOptions(weighting_scheme=weighting_scheme))
    host = Host(components)
    text = family.encode_text(host, tokenize(family, host, CAPTIONS))
    conditioning = family.denoiser_kwargs(host, text, {"caption": CAPTIONS})
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    noise = torch.randn(2, 4, 16, 16, generator=generator)
    indices = torch.tensor([100, 850])
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"].config)  # noise_scheduler_copy
    sigmas = scheduler.sigmas[indices]
    with torch.no_grad():
        per_sample = family.denoising_loss(host, latents, noise, sigmas, conditioning, reduction="none")
        mean = family.denoising_loss(host, latents, noise, sigmas, conditioning)
        expected = reference_loss(components["transformer"], scheduler, latents, noise, indices,
                                  (text["encoder_hidden_states"], text["pooled_projections"]), weighting_scheme)
    assert per_sample.shape == (2,) and per_sample.dtype == torch.float32
    torch.testing.assert_close(per_sample, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mean, expected.mean(), rtol=1e-6, atol=1e-7)
    assert per_sample[0] != per_sample[1]
    if weighting_scheme == "cosmap":  # the weight really applies
        weights = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
        plain = SD3Family(components["scheduler"]).denoising_loss(host, latents, noise, sigmas, conditioning,
                                                                  reduction="none").detach()
        torch.testing.assert_close(per_sample, plain * weights, rtol=1e-5, atol=1e-7)
    assert "transformer" in host.half_precision_calls


def test_denoising_loss_bf16_transformer_and_gradient():
    """A bf16 transformer gets bf16 inputs (no autocast) and the loss stays float32, close to the fp32 loss;
    gradients reach the text states (Textual Inversion / text-encoder LoRA train through them)."""
    components = build_tiny_sd3_components()
    family = SD3Family(components["scheduler"])
    host = Host(components)
    text = family.encode_text(host, tokenize(family, host, CAPTIONS))
    generator = torch.Generator().manual_seed(4)
    latents, noise = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 4, 16, 16, generator=generator)
    sigmas = torch.tensor([0.3, 0.9])
    states = text["encoder_hidden_states"].detach().requires_grad_(True)
    conditioning = {"encoder_hidden_states": states, "pooled_projections": text["pooled_projections"].detach()}
    full = family.denoising_loss(host, latents, noise, sigmas, conditioning)
    full.backward()
    assert states.grad is not None and states.grad.abs().sum() > 0
    components["transformer"].to(torch.bfloat16)
    with torch.no_grad():
        half = family.denoising_loss(host, latents, noise, sigmas, conditioning)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full.detach(), rtol=5e-2, atol=1e-3)


def test_denoising_loss_sd35_medium_style_transformer():
    """SD3.5 Medium's transformer (dual attention layers, RMS QK norm) runs through the same code."""
    from diffusers import SD3Transformer2DModel

    components = build_tiny_sd3_components()
    config = dict(components["transformer"].config)
    config.update(num_layers=2, dual_attention_layers=(0,), qk_norm="rms_norm")
    torch.manual_seed(2)
    components["transformer"] = SD3Transformer2DModel.from_config(config).eval()
    family = SD3Family(components["scheduler"])
    host = Host(components)
    text = family.encode_text(host, tokenize(family, host, CAPTIONS))
    generator = torch.Generator().manual_seed(5)
    latents, noise = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 4, 16, 16, generator=generator)
    indices = torch.tensor([10, 500])
    scheduler = components["scheduler"]
    with torch.no_grad():
        loss = family.denoising_loss(host, latents, noise, scheduler.sigmas[indices],
                                     family.denoiser_kwargs(host, text, {}), reduction="none")
        expected = reference_loss(components["transformer"], scheduler, latents, noise, indices,
                                  (text["encoder_hidden_states"], text["pooled_projections"]), "none")
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- noise levels
@pytest.mark.parametrize("scheme", ["none", "logit_normal"])
def test_sample_noise_levels_shifted_and_deterministic(scheme):
    components = build_tiny_sd3_components()
    options = FlowMatchingOptions(weighting_scheme=scheme, logit_mean=0.2, logit_std=0.8)
    family = SD3Family(components["scheduler"], options)
    first = family.sample_noise_levels(6, generator=torch.Generator().manual_seed(7), device=torch.device("cpu"),
                                       latent_size=(16, 16))
    again = family.sample_noise_levels(6, generator=torch.Generator().manual_seed(7), device=torch.device("cpu"),
                                       latent_size=(64, 64))  # no resolution shift on SD3
    assert torch.equal(first, again) and first.shape == (6,)
    _, expected = flow_matching.sample_sigmas(components["scheduler"], 6, generator=torch.Generator().manual_seed(7),
                                              weighting_scheme=scheme, logit_mean=0.2, logit_std=0.8)
    assert torch.equal(first, expected)
    # Independently: u picks index floor(1000 u) of the descending 1000-step schedule, then the static shift 3.0.
    u = flow_matching.sample_density(scheme, 6, generator=torch.Generator().manual_seed(7), logit_mean=0.2,
                                     logit_std=0.8)
    unshifted = (1000 - torch.floor(u * 1000)) / 1000
    torch.testing.assert_close(first, 3.0 * unshifted / (1 + 2.0 * unshifted))
    assert (first > unshifted).all()


def test_fixed_noise_levels_distinct_and_reproducible():
    components = build_tiny_sd3_components()
    options = FlowMatchingOptions(weighting_scheme="logit_normal")
    first = SD3Family(components["scheduler"], options)
    from diffusers import FlowMatchEulerDiscreteScheduler

    second = SD3Family(FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"].config), options)
    levels = first.fixed_noise_levels(8, generator=torch.Generator().manual_seed(11), latent_size=(16, 16))
    assert levels.dtype == torch.float32 and levels.device.type == "cpu" and levels.shape == (8,)
    assert len(set(levels.tolist())) == 8 and ((levels > 0) & (levels <= 1)).all()
    assert torch.equal(levels, first.fixed_noise_levels(8, generator=torch.Generator().manual_seed(11),
                                                         latent_size=(16, 16)))
    assert torch.equal(levels, second.fixed_noise_levels(8, generator=torch.Generator().manual_seed(11),
                                                          latent_size=(16, 16)))
    _, expected = flow_matching.fixed_evaluation_sigmas(components["scheduler"], 8,
                                                        generator=torch.Generator().manual_seed(11),
                                                        weighting_scheme="logit_normal")
    assert torch.equal(levels, expected)
    resampled = first.fixed_noise_levels(8, generator=torch.Generator().manual_seed(11), latent_size=(16, 16),
                                         resample=True)
    _, drawn = flow_matching.sample_sigmas(components["scheduler"], 8, generator=torch.Generator().manual_seed(11),
                                           weighting_scheme="logit_normal")
    assert torch.equal(resampled, drawn)
    other_seed = first.fixed_noise_levels(8, generator=torch.Generator().manual_seed(12), latent_size=(16, 16))
    assert not torch.equal(levels, other_seed)


# ------------------------------------------------------------------------------------------ pipeline and LoRA
def test_pipeline_generates_like_stock_pipeline(folders):
    from diffusers import StableDiffusion3Pipeline

    parts = SD3Family.load(str(folders["no_t5"]))
    pipe = parts.family.pipeline(parts)
    assert pipe.transformer is parts.transformer and pipe.text_encoder is parts.text_encoder
    assert pipe.scheduler is not parts.scheduler and dict(pipe.scheduler.config) == dict(parts.scheduler.config)
    image = pipe("a dog", num_inference_steps=2, height=16, width=16, guidance_scale=2.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    stock = StableDiffusion3Pipeline.from_pretrained(str(folders["no_t5"]), text_encoder_3=None, tokenizer_3=None)
    expected = stock("a dog", num_inference_steps=2, height=16, width=16, guidance_scale=2.0, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3)
    assert (image == expected).all()


@pytest.mark.parametrize("with_text_encoder", [False, True])
def test_save_lora_round_trip(tmp_path, with_text_encoder):
    from diffusers import StableDiffusion3Pipeline

    from lightning_custom.methods.lora import (
        ADAPTER, LORA_WEIGHT_NAME, TEXT_ENCODER_TARGETS, add_lora, lora_layers,
    )

    StableDiffusion3Pipeline(**two_layer_components()).save_pretrained(tmp_path / "base")
    parts = SD3Family.load(str(tmp_path / "base"))
    family = parts.family
    add_lora(parts.transformer, 4, 4, 0.0, SD3Family.lora_targets, "--model.target_modules", "transformer")
    trained = {"transformer": parts.transformer}
    if with_text_encoder:
        add_lora(parts.text_encoder, 4, 4, 0.0, TEXT_ENCODER_TARGETS, "--model.text_encoder_target_modules",
                 "text encoder")
        trained["text_encoder"] = parts.text_encoder
    torch.manual_seed(9)
    for module in trained.values():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.1)
    family.save_lora(tmp_path / "lora", LORA_WEIGHT_NAME, {k: lora_layers(m) for k, m in trained.items()},
                     {k: m.peft_config[ADAPTER].to_dict() for k, m in trained.items()})
    assert (tmp_path / "lora" / LORA_WEIGHT_NAME).is_file()
    assert [p.name for p in (tmp_path / "lora").iterdir()] == [LORA_WEIGHT_NAME]  # no temporaries left
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / LORA_WEIGHT_NAME), "pt") as saved:
        keys = set(saved.keys())
    expected_keys = {f"{component}.{key}" for component, module in trained.items()
                     for key in peft_lora_keys(lora_layers(module))}
    assert keys == expected_keys  # peft naming, as diffusers' SD3 script saves; every layer present
    assert any(".attn.to_q.lora_A." in key for key in keys)

    fresh = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "base"), text_encoder_3=None, tokenizer_3=None)
    fresh.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_WEIGHT_NAME)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, 16, 16, generator=generator)
    states = torch.randn(1, 20, 64, generator=generator)
    pooled = torch.randn(1, 64, generator=generator)
    ids = fresh.tokenizer(["a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        kwargs = dict(hidden_states=hidden, timestep=torch.tensor([500.0]), encoder_hidden_states=states,
                      pooled_projections=pooled, return_dict=False)
        ours, theirs = parts.transformer(**kwargs)[0], fresh.transformer(**kwargs)[0]
        base = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "base"), text_encoder_3=None,
                                                        tokenizer_3=None).transformer(**kwargs)[0]
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
        assert (ours - base).abs().max() > 1e-3  # the LoRA changed the output
        if with_text_encoder:
            ours_text = parts.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            theirs_text = fresh.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            torch.testing.assert_close(theirs_text, ours_text, atol=1e-5, rtol=0)


def test_save_lora_rejects_t5(tmp_path):
    family = SD3Family(None)
    with pytest.raises(ValueError, match="text_encoder_3"):
        family.save_lora(tmp_path, "x.safetensors", {"text_encoder_3": {}}, {})


def test_peft_lora_keys_undoes_diffusers_naming():
    value = torch.zeros(1)
    layers = {"transformer_blocks.0.attn.to_q.lora.down.weight": value,
              "transformer_blocks.0.attn.to_q.lora.up.weight": value,
              "text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": value,
              "transformer_blocks.0.attn.add_k_proj.lora_B.weight": value}
    assert list(peft_lora_keys(layers)) == [
        "transformer_blocks.0.attn.to_q.lora_A.weight", "transformer_blocks.0.attn.to_q.lora_B.weight",
        "text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
        "transformer_blocks.0.attn.add_k_proj.lora_B.weight"]


def test_load_missing_clip_g_is_one_line_error(folders, tmp_path):
    import shutil

    from lightning_custom.errors import UserInputError

    folder = tmp_path / "broken"
    shutil.copytree(folders["no_t5"], folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(UserInputError) as caught:
        SD3Family.load(str(folder))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--model.pretrained_model_name_or_path:")
    assert "text_encoder_2" in message
