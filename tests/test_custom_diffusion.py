"""Custom Diffusion: only K/V and the modifier rows train, the export round trip, per-concept DVAR, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
from transformers import CLIPTextModel

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.cli import main
from lightning_custom.data import ConceptDataModule
from lightning_custom.errors import UserInputError
from lightning_custom.methods import CustomDiffusion
from lightning_custom.synthetic.toy_models import make_example_concept_images
from tests.conftest import RESOLUTION, trainer_kwargs
from tests.test_dreambooth import check_configs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def second_concept_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("concept_b")
    make_example_concept_images(out, n=3, size=32, seed=7)
    return str(out)


def two_concepts(concept_dir, second_concept_dir):
    return [
        {"instance_data_dir": concept_dir, "placeholder_token": "<new1>", "class_noun": "toy", "name": "a"},
        {"instance_data_dir": second_concept_dir, "placeholder_token": "<new2>", "class_noun": "cat", "name": "b"},
    ]


def cd_data(concepts, **overrides):
    kwargs = dict(concepts=concepts, placeholder_token="<new1>+<new2>", resolution=RESOLUTION, batch_size=2,
                  eval_batch_size=4, repeats=10, seed=59, center_crop=False)
    kwargs.update(overrides)
    return ConceptDataModule(**kwargs)


def cd_module(model_path, **overrides):
    kwargs = dict(pretrained_model_name_or_path=model_path, placeholder_token="<new1>+<new2>",
                  initializer_token="toy+cat", learning_rate=1e-3)
    kwargs.update(overrides)
    return CustomDiffusion(**kwargs)


@pytest.fixture(scope="module")
def trained(tiny_sd, concept_dir, second_concept_dir, tmp_path_factory):
    """Two concepts with prior preservation (class images from folders), trained a few steps and exported."""
    root = tmp_path_factory.mktemp("custom_diffusion")
    class_dir = tmp_path_factory.mktemp("cd_class")
    make_example_concept_images(class_dir, n=2, size=24, seed=5)
    concepts = [dict(c, class_data_dir=str(class_dir)) for c in two_concepts(concept_dir, second_concept_dir)]
    torch.set_num_threads(1)
    module = cd_module(tiny_sd)
    trainer = L.Trainer(max_steps=4, callbacks=[DVAREarlyStopping(window=50), RunSummary()], **trainer_kwargs(root))
    trainer.fit(module, datamodule=cd_data(concepts, with_prior_preservation=True))
    return module, root


def test_only_cross_attention_kv_and_modifier_rows_change(tiny_sd, trained):
    module, _ = trained
    reference = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    kv = {k for k in reference if ".attn2.to_k." in k or ".attn2.to_v." in k}
    assert kv and all(k.endswith(".weight") for k in kv)
    state = module.unet.state_dict()
    assert state.keys() == reference.keys()  # the processors hold no weights
    for key, value in state.items():
        assert torch.equal(value, reference[key]) == (key not in kv), key  # K/V all moved, the rest bit-identical
    text = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").state_dict()
    for key, value in module.text_encoder.state_dict().items():
        assert torch.equal(value[: text[key].shape[0]], text[key]), key
    assert module.placeholder_tokens == ["<new1>", "<new2>"]
    trainable = module.trainable_parameters()
    assert len(trainable) == len(kv) + 1 and all(p.dtype == torch.float32 for p in trainable)


def test_export_round_trips_through_diffusers(tiny_sd, trained):
    module, root = trained
    summary = json.loads((root / "summary.json").read_text())
    assert summary["artifacts"] == ["pytorch_custom_diffusion_weights.bin", "<new1>.safetensors", "<new2>.safetensors"]
    pipe = CustomDiffusion.load_into_pipeline(StableDiffusionPipeline.from_pretrained(tiny_sd), root)
    processors = pipe.unet.attn_processors
    assert all(isinstance(p, CustomDiffusionAttnProcessor) for p in processors.values())
    assert sum(p.train_kv for p in processors.values()) == len(module.cross_attention_layers())
    prompts = ["a photo of a <new1> toy next to a <new2> cat", "a photo of a toy"]
    ids = pipe.tokenizer([pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in prompts], padding="max_length",
                         max_length=77, return_tensors="pt").input_ids
    latents, timesteps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 900])
    module.eval()
    with torch.no_grad():
        hidden = module.encode_prompt(prompts)
        assert torch.allclose(pipe.text_encoder(ids)[0], hidden, atol=1e-5)
        expected = module.unet(latents, timesteps, hidden).sample
        actual = pipe.unet(latents, timesteps, hidden).sample
        base = StableDiffusionPipeline.from_pretrained(tiny_sd).unet(latents, timesteps, hidden).sample
    assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()
    assert not torch.allclose(base, expected, atol=1e-4)  # the trained K/V matter


def test_gradient_norm_is_clipped_at_max_grad_norm(tiny_sd, tmp_path):
    module = cd_module(tiny_sd, placeholder_token="<new1>", initializer_token="toy")
    module.trainer = L.Trainer(**trainer_kwargs(tmp_path))
    optimizer = module.configure_optimizers()
    for p in module.trainable_parameters():
        p.grad = torch.full_like(p, 3.0)
    module.configure_gradient_clipping(optimizer)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.trainable_parameters()]))
    assert norm.item() == pytest.approx(1.0, rel=1e-4)


def test_half_precision_base_keeps_kv_fp32(tiny_sd, concept_dir):
    module = cd_module(tiny_sd, placeholder_token="<new1>", initializer_token="toy", weight_dtype="bfloat16")
    assert module.unet.dtype == torch.bfloat16 or module.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())
    dm = ConceptDataModule(instance_data_dir=concept_dir, placeholder_token="<new1>", resolution=RESOLUTION)
    loss = module.training_loss(dm.build_eval_dataset(module.eval_batch_spec())[0])
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.trainable_parameters())


class Scripted(CustomDiffusion):
    """Adds a scripted series to each concept's real L_det: concept b oscillates until step 24, so it converges late."""

    def deterministic_loss(self, batch):
        step = self.global_step
        trend = 5.0 * np.exp(-step / 4.0)
        bump = 2.0 * (-1) ** step if (batch["concept"] == "b" and step < 24) else 0.0
        return super().deterministic_loss(batch) + trend + bump


def numpy_ratio(values, window):
    return np.var(values[-window:]) / np.var(values)


def test_per_concept_series_are_separate_and_the_stop_waits_for_all(tiny_sd, concept_dir, second_concept_dir,
                                                                    tmp_path):
    module = Scripted(**{**dict(pretrained_model_name_or_path=tiny_sd, placeholder_token="<new1>+<new2>",
                                initializer_token="toy", learning_rate=1e-3)})
    dm = cd_data(two_concepts(concept_dir, second_concept_dir))
    callback = DVAREarlyStopping(window=6, threshold=0.2)
    trainer = L.Trainer(max_steps=60, callbacks=[callback, RunSummary()], **trainer_kwargs(tmp_path))
    trainer.fit(module, datamodule=dm)
    series = {k: np.array([v for _, v in h]) for k, h in callback.histories.items()}
    assert set(series) == {"dvar_loss/a", "dvar_loss/b"}
    # each series is its own concept's L_det on its own fixed batch: the last values match a recomputation
    module.eval()
    for index, name in enumerate(("a", "b")):
        batch = dm.build_eval_dataset(module.eval_batch_spec(), index)[0]
        assert batch["concept"] == name and f"<new{index + 1}>" in batch["caption"][0]
        real = CustomDiffusion.deterministic_loss(module, batch).item()
        assert series[f"dvar_loss/{name}"][-1] == pytest.approx(real + 5.0 * np.exp(-trainer.global_step / 4.0),
                                                                rel=1e-5)
    assert not np.allclose(series["dvar_loss/a"][:24], series["dvar_loss/b"][:24])
    # the rule: a alone would have stopped earlier; the run stopped at the first step where both are below
    first = {k: next(i for i in range(6, len(v) + 1) if numpy_ratio(v[:i], 6) < 0.2) for k, v in series.items()}
    both = next(i for i in range(6, len(series["dvar_loss/a"]) + 1)
                if all(numpy_ratio(v[:i], 6) < 0.2 for v in series.values()))
    assert first["dvar_loss/a"] < first["dvar_loss/b"] <= both == callback.stop_step == trainer.global_step
    assert callback.stopped_by == "dvar"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["dvar_histories"]) == {"dvar_loss/a", "dvar_loss/b"}


def test_concepts_list_errors_are_one_line(concept_dir, tmp_path, tiny_sd, second_concept_dir):
    cases = [
        ([{"placeholder_token": "<new1>"}], "--data.concepts[0]: missing field(s) ['instance_data_dir']"),
        ([{"instance_data_dir": concept_dir, "placeholder_token": "<new1>"}, {"instance_data_dir": concept_dir}],
         "--data.concepts[1]: missing field(s) ['placeholder_token']"),
        ([{"instance_data_dir": concept_dir, "placeholder_token": "<a>", "colour": "red"}],
         "--data.concepts[0]: unknown field(s) ['colour']"),
        ([], "--data.concepts: expected a non-empty list"),
        ([{"instance_data_dir": concept_dir, "placeholder_token": "<a>"}] * 2, "used by more than one concept"),
        ([{"instance_data_dir": str(tmp_path / "nope"), "placeholder_token": "<a>"}],
         "--data.concepts[0].instance_data_dir: folder"),
        ([{"instance_data_dir": concept_dir, "placeholder_token": "<a>"}], "--data.concepts[0].class_prompt"),
    ]
    for concepts, needle in cases:
        with pytest.raises(UserInputError) as excinfo:
            cd_data(concepts, with_prior_preservation=True)
        assert needle in str(excinfo.value) and "\n" not in str(excinfo.value), (needle, str(excinfo.value))
    (tmp_path / "concepts.json").write_text(json.dumps([{"instance_data_dir": concept_dir}]))
    with pytest.raises(UserInputError, match=r"concepts.json\)\[0\]: missing field"):
        cd_data(str(tmp_path / "concepts.json"))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(UserInputError, match="bad.json is not valid JSON"):
        cd_data(str(tmp_path / "bad.json"))
    with pytest.raises(UserInputError, match="--model.initializer_token: 3 initializers for 2 tokens"):
        cd_module(tiny_sd, initializer_token="toy+cat+dog")
    # a concept whose token the model does not learn fails before the first step
    module = cd_module(tiny_sd, placeholder_token="<new1>", initializer_token="toy")
    trainer = L.Trainer(max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(UserInputError, match=r"--data.concepts\[1\].placeholder_token: '<new2>' is not one of"):
        trainer.fit(module, datamodule=cd_data(two_concepts(concept_dir, second_concept_dir)))


def test_quickstart_stops_by_dvar_through_the_cli_with_two_concepts(tmp_path, tiny_sd, concept_dir,
                                                                    second_concept_dir):
    concepts = [dict(c, class_data_dir=concept_dir if c["name"] == "b" else second_concept_dir)
                for c in two_concepts(concept_dir, second_concept_dir)]
    main([
        "fit", "--config", str(ROOT / "configs" / "quickstart_custom_diffusion.yaml"),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", "200", "--model.init_args.pretrained_model_name_or_path", tiny_sd,
        "--model.init_args.placeholder_token", "<new1>+<new2>", "--model.init_args.initializer_token", "toy+cat",
        "--data.init_args.concepts", json.dumps(concepts), "--data.init_args.resolution", "16",
        "--data.init_args.repeats", "20", "--dvar.window", "10",
        "--dvar.undertrained_below", "0",  # the tiny random model's L_det barely moves: see tests.test_cli.quick_args
    ])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "CustomDiffusion" and summary["placeholder_token"] == "<new1>+<new2>"
    assert summary["stopped_by"] == "dvar" and 10 <= summary["stop_step"] < 200 == summary["max_steps"]
    assert set(summary["dvar_histories"]) == {"dvar_loss/a", "dvar_loss/b"}
    assert summary["artifacts"] == ["pytorch_custom_diffusion_weights.bin", "<new1>.safetensors", "<new2>.safetensors"]


def test_configs_carry_the_paper_settings():
    check_configs("custom_diffusion", {"max_steps": 500, "learning_rate": 1e-5, "window": 180, "threshold": 0.15,
                                       "few": 367})
    config = yaml.safe_load((ROOT / "configs" / "custom_diffusion.yaml").read_text())
    assert config["model"]["init_args"]["pretrained_model_name_or_path"] == "CompVis/stable-diffusion-v1-4"
    assert config["model"]["init_args"]["max_grad_norm"] == 1.0
    assert config["data"]["init_args"]["with_prior_preservation"] is True
    assert config["data"]["init_args"]["center_crop"] is False


def test_bad_concepts_through_the_cli_are_one_line(tmp_path, tiny_sd, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart_custom_diffusion.yaml"),
              "--trainer.default_root_dir", str(tmp_path), "--model.init_args.pretrained_model_name_or_path", tiny_sd,
              "--data.init_args.concepts", json.dumps([{"placeholder_token": "<new1>"}])])
    assert excinfo.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: --data.concepts[0]: missing field(s) ['instance_data_dir'] (each concept needs "
                      "['instance_data_dir', 'placeholder_token'])"]


def test_resume_continues_every_concept_series_exactly(tiny_sd, concept_dir, second_concept_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    concepts = [dict(c, class_data_dir=second_concept_dir) for c in two_concepts(concept_dir, second_concept_dir)]

    def run(root, callbacks, ckpt_path=None):
        module, dvar = cd_module(tiny_sd), DVAREarlyStopping(window=50)
        trainer = L.Trainer(max_steps=6, callbacks=[dvar, *callbacks],
                            **trainer_kwargs(root, enable_checkpointing=bool(callbacks)))
        trainer.fit(module, datamodule=cd_data(concepts, with_prior_preservation=True), ckpt_path=ckpt_path)
        return module, dvar

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    straight, straight_dvar = run(tmp_path / "a", [saver])
    mid = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"  # 35 batches per epoch: mid-epoch
    state = torch.load(mid, weights_only=False)["state_dict"]
    assert set(state) == {n for n, p in straight.named_parameters() if p.requires_grad}
    assert len(state) == 2 * len(straight.cross_attention_layers()) + 1  # K/V weights and the token vectors
    resumed, resumed_dvar = run(tmp_path / "b", [], ckpt_path=str(mid))
    # Lightning's ModelCheckpoint saves before step 3's DVAR evaluation, so the resumed series skips step 3;
    # every other value continues bit-identically, for both concepts.
    assert set(resumed_dvar.histories) == {"dvar_loss/a", "dvar_loss/b"}
    for key, series in straight_dvar.histories.items():
        assert resumed_dvar.histories[key] == [point for point in series if point[0] != 3], key
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_the_readme_stock_diffusers_lines_load_the_run(tiny_sd, trained):
    """The README's Custom Diffusion row: stock diffusers calls alone (with ``_pipeline=pipe``,
    huggingface/diffusers#9320) load what the package's helper loads."""
    _, root = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.unet.load_attn_procs(str(root), weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=pipe)
    for token in ("<new1>", "<new2>"):
        pipe.load_textual_inversion(str(root), weight_name=f"{token}.safetensors")
    helper = CustomDiffusion.load_into_pipeline(StableDiffusionPipeline.from_pretrained(tiny_sd), root)
    assert all(isinstance(p, CustomDiffusionAttnProcessor) for p in pipe.unet.attn_processors.values())
    prompt = pipe.maybe_convert_prompt("a photo of a <new1> toy next to a <new2> cat", pipe.tokenizer)
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents, timesteps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        assert torch.equal(hidden, helper.text_encoder(ids)[0])
        assert torch.equal(pipe.unet(latents, timesteps, hidden).sample, helper.unet(latents, timesteps, hidden).sample)
