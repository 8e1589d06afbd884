"""DreamBooth (full and LoRA): what trains, what stays bit-identical, export round trips, the CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.cli import main
from lightning_custom.data import ConceptDataModule
from lightning_custom.errors import UserInputError
from lightning_custom.methods import DreamBooth, DreamBoothLoRA
from tests.conftest import data_kwargs, trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]


def fit(module, datamodule, root, max_steps=4):
    trainer = L.Trainer(max_steps=max_steps, callbacks=[DVAREarlyStopping(window=50), RunSummary()],
                        **trainer_kwargs(root))
    trainer.fit(module, datamodule=datamodule)
    return trainer


def same_inputs(module, prompt):
    """A prompt's text features from the module, and a fixed noisy latent and timestep for the UNet."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 700])
    module.eval()
    with torch.no_grad():
        hidden = module.encode_prompt([prompt, "a photo of a toy"])
    return hidden, latents, timesteps


def pipeline_text_features(pipe, prompts):
    ids = pipe.tokenizer([pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in prompts], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def assert_same_outputs(module, pipe, prompt):
    hidden, latents, timesteps = same_inputs(module, prompt)
    assert torch.allclose(pipeline_text_features(pipe, [prompt, "a photo of a toy"]), hidden, atol=1e-5)
    with torch.no_grad():
        expected = module.unet(latents, timesteps, hidden).sample
        actual = pipe.unet(latents, timesteps, hidden).sample
    assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()


# ---------------------------------------------------------------------------------------------- full DreamBooth
@pytest.fixture(scope="module")
def trained_dreambooth(tiny_sd, concept_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dreambooth")
    torch.set_num_threads(1)
    module = DreamBooth(pretrained_model_name_or_path=tiny_sd, placeholder_token="<sks>", initializer_token="toy",
                        train_token_embedding=True, learning_rate=1e-3)
    fit(module, ConceptDataModule(**data_kwargs(concept_dir, placeholder_token="<sks>", class_noun="toy")), root)
    return module, root


def test_full_dreambooth_trains_the_unet_and_the_new_token_only(tiny_sd, trained_dreambooth):
    module, _ = trained_dreambooth
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    text = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    changed = [k for k, v in module.unet.state_dict().items() if not torch.equal(v, unet.state_dict()[k])]
    assert len(changed) > 0.9 * len(unet.state_dict())  # (nearly) every UNet tensor moved
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())
    new_id = module.tokenizer.convert_tokens_to_ids("<sks>")
    for key, value in module.text_encoder.state_dict().items():
        original = text.state_dict()[key]
        if key.endswith("token_embedding.weight"):
            assert torch.equal(value[:new_id], original) and value.shape[0] == new_id + 1
        else:
            assert torch.equal(value, original), key
    init_id = module.tokenizer.encode("toy", add_special_tokens=False)[0]
    assert not torch.equal(module.token_vectors.vectors[0], text.get_input_embeddings().weight[init_id])


def test_full_dreambooth_exports_a_pipeline_that_round_trips(trained_dreambooth, tmp_path):
    module, root = trained_dreambooth
    summary = json.loads((root / "summary.json").read_text())
    assert summary["method"] == "DreamBooth" and summary["artifacts"] == ["pipeline"]
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "pipeline"))
    assert_same_outputs(module, pipe, "a photo of a <sks> toy")
    # the sampling scheduler is the one the base model names, with the training schedule
    base_scheduler = json.loads((Path(module.hparams.pretrained_model_name_or_path) / "model_index.json").read_text())
    assert type(pipe.scheduler).__name__ == base_scheduler["scheduler"][1]
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert pipe.scheduler.config[key] == module.noise_scheduler.config[key]
    via_helper = DreamBooth.load_into_pipeline(pipe, root)
    assert torch.equal(via_helper.unet.conv_in.weight, module.unet.conv_in.weight)


def test_full_dreambooth_can_train_the_text_encoder(tiny_sd):
    module = DreamBooth(pretrained_model_name_or_path=tiny_sd, placeholder_token="sks", train_text_encoder=True)
    trainable = {id(p) for p in module.trainable_parameters()}
    assert all(id(p) in trainable for p in module.text_encoder.parameters())
    assert all(id(p) in trainable for p in module.unet.parameters())
    assert not any(id(p) in trainable for p in module.vae.parameters())
    assert module.token_vectors is None  # "sks" is an existing rare token here


# ------------------------------------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def trained_lora(tiny_sd, concept_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    torch.set_num_threads(1)
    module = DreamBoothLoRA(pretrained_model_name_or_path=tiny_sd, placeholder_token="<sks>", initializer_token="toy",
                            train_token_embedding=True, train_text_encoder=True, rank=4, lora_alpha=8,
                            learning_rate=5e-3)
    fit(module, ConceptDataModule(**data_kwargs(concept_dir, placeholder_token="<sks>", class_noun="toy")), root)
    return module, root


def base_name(key: str) -> str:
    return key.replace(".base_layer", "")


def test_lora_keeps_base_weights_bit_identical(tiny_sd, trained_lora):
    module, _ = trained_lora
    for model, original in ((module.unet, UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")),
                            (module.text_encoder, CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder"))):
        reference = original.state_dict()
        base = {base_name(k): v for k, v in model.state_dict().items() if "lora_" not in k}
        assert base.keys() == reference.keys()
        for key, value in base.items():
            if key.endswith("token_embedding.weight"):
                value = value[: reference[key].shape[0]]  # the new token's row is appended
            assert torch.equal(value, reference[key]), key
    lora = {n: p for n, p in module.unet.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at zero: it trained
    assert {n.split(".")[-4] if "to_out" not in n else "to_out.0" for n in lora} == {"to_q", "to_k", "to_v", "to_out.0"}
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())
    assert any(p is module.token_vectors.vectors for p in module.trainable_parameters())


def test_lora_export_round_trips_through_load_lora_weights(tiny_sd, trained_lora):
    module, root = trained_lora
    summary = json.loads((root / "summary.json").read_text())
    assert summary["artifacts"] == ["pytorch_lora_weights.safetensors", "learned_embeds.safetensors"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(str(root))  # the folder, as diffusers documents it
    pipe.load_textual_inversion(str(root / "learned_embeds.safetensors"))
    assert_same_outputs(module, pipe, "a photo of a <sks> toy")
    # alpha (8) != rank (4) survives the round trip through the saved adapter metadata
    assert pipe.unet.peft_config[next(iter(pipe.unet.peft_config))].lora_alpha == 8
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd)
    DreamBoothLoRA.load_into_pipeline(plain, root)
    assert_same_outputs(module, plain, "a photo of a <sks> toy")


def test_lora_target_modules_and_dropout(tiny_sd, concept_dir):
    module = DreamBoothLoRA(pretrained_model_name_or_path=tiny_sd, target_modules=["to_q"], lora_dropout=0.5)
    wrapped = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in module.unet.named_parameters() if "lora_A" in n}
    assert wrapped == {"to_q"}
    # dropout is active in training, and off for DVAR's deterministic loss even outside Lightning's eval loop
    batch = ConceptDataModule(**data_kwargs(concept_dir, placeholder_token="sks")).build_eval_dataset(
        module.eval_batch_spec())[0]
    with torch.no_grad():
        for p in module.unet.parameters():
            if p.requires_grad:
                p.add_(0.5)  # a non-zero LoRA branch, so dropout matters
    first, second = module.deterministic_loss(batch), module.deterministic_loss(batch)
    assert torch.equal(first, second)
    assert any(m.training for n, m in module.unet.named_modules() if n.endswith("lora_dropout.default"))


@pytest.mark.parametrize("kwargs,needle", [
    ({"target_modules": ["to_q", "to_kk"]}, "--model.target_modules: no layer of the UNet is named 'to_kk'"),
    ({"train_text_encoder": True, "text_encoder_target_modules": ["query"]},
     "--model.text_encoder_target_modules: no layer of the text encoder is named 'query'"),
    ({"target_modules": []}, "--model.target_modules: give at least one module name"),
    ({"rank": 0}, "--model.rank: must be at least 1"),
])
def test_lora_bad_arguments_are_one_line(tiny_sd, kwargs, needle):
    with pytest.raises(UserInputError) as excinfo:
        DreamBoothLoRA(pretrained_model_name_or_path=tiny_sd, **kwargs)
    assert needle in str(excinfo.value) and "\n" not in str(excinfo.value)


# -------------------------------------------------------------------------------------------------------- CLI
def quickstart(name, tmp_path, tiny_sd, concept_dir, *extra):
    return [
        "fit", "--config", str(ROOT / "configs" / f"quickstart_{name}.yaml"),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", "200", "--model.init_args.pretrained_model_name_or_path", tiny_sd,
        "--data.init_args.instance_data_dir", concept_dir, "--data.init_args.resolution", "16",
        "--data.init_args.repeats", "20", "--dvar.window", "10", *extra,
    ]


@pytest.mark.parametrize("name,artifacts", [
    ("dreambooth", ["pipeline"]),
    ("dreambooth_lora", ["pytorch_lora_weights.safetensors", "learned_embeds.safetensors"]),
])
def test_quickstart_stops_by_dvar_through_the_cli(name, artifacts, tmp_path, tiny_sd, concept_dir):
    class_images = ["--data.init_args.num_class_images", "2", "--data.init_args.class_inference_steps", "2",
                    "--data.init_args.class_cache_dir", str(tmp_path / "cache")]
    main(quickstart(name, tmp_path / "run", tiny_sd, concept_dir, *(class_images if name == "dreambooth" else [])))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_by"] == "dvar" and 10 <= summary["stop_step"] < 200 == summary["max_steps"]
    assert summary["artifacts"] == artifacts
    assert all((tmp_path / "run" / a).exists() for a in artifacts)
    every = summary["dvar_eval_every_n_steps"]  # the quickstarts evaluate every 5 steps
    assert [s for s, _ in summary["dvar_history"]] == list(range(every, summary["stop_step"] + 1, every))


def test_bad_input_through_the_cli_is_one_line(tmp_path, tiny_sd, concept_dir, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(quickstart("dreambooth_lora", tmp_path, tiny_sd, concept_dir,
                        "--model.init_args.target_modules", "[to_q, attn9]"))
    assert excinfo.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: --model.target_modules: no layer of the UNet is named 'attn9'; choose layer names such "
                      "as " + errors[0].split("such as ", 1)[1]]


@pytest.mark.parametrize("name,expected", [
    ("dreambooth_lora", {"max_steps": 1000, "learning_rate": 5e-4, "window": 440, "threshold": 0.4, "few": 450}),
    ("dreambooth", {"max_steps": 800, "learning_rate": 5e-6, "window": 440, "threshold": 0.4, "few": 450}),
])
def test_configs_carry_the_paper_settings(name, expected):
    check_configs(name, expected)


def check_configs(name, expected):
    """The DVAR config, its full-length baseline and its fixed budget share every setting but the stop rule."""
    configs = {v: yaml.safe_load((ROOT / "configs" / f"{name}{v}.yaml").read_text())
               for v in ("", "_full_length", "_fixed_budget")}
    for variant, config in configs.items():
        assert config["trainer"]["max_steps"] == expected["max_steps"], variant
        assert config["model"]["init_args"]["learning_rate"] == expected["learning_rate"]
        assert config["dvar"]["window"] == expected["window"] and config["dvar"]["threshold"] == expected["threshold"]
        assert config["data"]["init_args"]["batch_size"] == 2 and config["data"]["init_args"]["eval_batch_size"] == 4
        assert config["seed_everything"] == 59 and config["trainer"]["precision"] == "16-mixed"
        assert config["dvar"].get("stop", True) is (variant == "")
        assert config["model"] == configs[""]["model"] and config["data"] == configs[""]["data"]
    budget = configs["_fixed_budget"]["trainer"]["callbacks"][0]
    assert budget["class_path"].endswith("FixedBudget") and budget["init_args"]["steps"] == expected["few"]
