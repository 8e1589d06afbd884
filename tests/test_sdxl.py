"""SDXL: components, the conditioning that reaches the UNet, every method's export round trip.

Every method's CLI fit with DVAR on SDXL is in ``test_model_families.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.families.components import load_components
from lightning_custom.data import ConceptDataModule
from lightning_custom.data.images import load_rgb_image, resize_shorter_side, to_tensor
from lightning_custom.errors import UserInputError
from lightning_custom.methods import CustomDiffusion, DreamBooth, DreamBoothLoRA, TextualInversion
from tests.conftest import RESOLUTION, data_kwargs, one_thread, ti_kwargs, trainer_kwargs
from tests.doc_blocks import block_with, without_statements

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a <cat-toy> on the grass"


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def fit(module, datamodule, root, max_steps=3):
    with one_thread():
        trainer = L.Trainer(max_steps=max_steps, callbacks=[DVAREarlyStopping(window=50), RunSummary()],
                            **trainer_kwargs(root))
        trainer.fit(module, datamodule=datamodule)
    return trainer


def record_unet_inputs(module) -> tuple[list[dict], object]:
    """Every UNet call's inputs: ``sample``, ``timestep``, ``encoder_hidden_states``, ``text_embeds``, ``time_ids``."""
    calls: list[dict] = []

    def hook(unet, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        calls.append({"sample": args[0].clone(), "timestep": args[1].clone(),
                      "encoder_hidden_states": kwargs["encoder_hidden_states"].clone(),
                      "text_embeds": added["text_embeds"].clone(), "time_ids": added["time_ids"].clone()})

    return calls, module.unet.register_forward_pre_hook(hook, with_kwargs=True)


def pipeline_outputs(pipe, prompts, time_ids):
    """The pipeline's own text conditioning for ``prompts`` and its UNet's output on fixed noisy latents."""
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        return hidden, pooled, unet_output(pipe.unet, hidden, pooled, time_ids)


def unet_output(unet, hidden, pooled, time_ids):
    latents = torch.randn(len(hidden), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700][: len(hidden)]), hidden,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def assert_same_as_pipeline(module, pipe, prompts):
    """The module's text features (hidden + pooled) and UNet output equal the loaded pipeline's."""
    time_ids = torch.tensor([[32.0, 24.0, 4.0, 0.0, 16.0, 16.0]]).repeat(len(prompts), 1)
    module.eval()
    with torch.no_grad():
        text = module.encode_text(prompts)
    expected = unet_output(module.unet, text["encoder_hidden_states"], text["text_embeds"], time_ids)
    hidden, pooled, actual = pipeline_outputs(pipe, prompts, time_ids)
    assert torch.allclose(hidden, text["encoder_hidden_states"], atol=1e-5)
    assert torch.allclose(pooled, text["text_embeds"], atol=1e-5)
    assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()


# ------------------------------------------------------------------------------------------------- components
def test_sdxl_components_two_encoders_fp32_vae_and_scaling(tiny_sdxl, concept_dir):
    parts = load_components(tiny_sdxl, weight_dtype="bfloat16")
    assert parts.is_sdxl and parts.unet.config.addition_embed_type == "text_time"
    assert type(parts.text_encoder) is CLIPTextModel and type(parts.text_encoder_2) is CLIPTextModelWithProjection
    assert parts.tokenizer_2 is not None
    assert parts.unet.dtype == torch.bfloat16 and parts.vae.dtype == torch.float32  # SDXL's VAE overflows in fp16
    assert all(not p.requires_grad for m in (parts.text_encoder, parts.text_encoder_2) for p in m.parameters())
    # an fp16-safe replacement VAE is held in weight_dtype
    assert load_components(tiny_sdxl, weight_dtype="bfloat16", vae_name_or_path=tiny_sdxl).vae.dtype == torch.bfloat16
    with pytest.raises(UserInputError, match="--model.vae_name_or_path: cannot load a VAE"):
        load_components(tiny_sdxl, vae_name_or_path=str(Path(tiny_sdxl) / "missing"))
    assert load_components("embedded:tiny-sdxl").is_sdxl
    assert load_components("embedded").text_encoder_2 is None
    # latents are scaled with SDXL's factor
    module = TextualInversion(**ti_kwargs(tiny_sdxl))
    batch = ConceptDataModule(**data_kwargs(concept_dir)).build_eval_dataset(module.eval_batch_spec())[0]
    dist = module.vae.encode(batch["pixel_values"]).latent_dist
    expected = (dist.mean + dist.std * batch["latent_noise"]) * 0.13025
    assert module.vae.config.scaling_factor == 0.13025
    assert torch.allclose(module.encode_latents(batch["pixel_values"], batch["latent_noise"]), expected, atol=1e-6)


# ------------------------------------------------------------------------------------- time ids and the fixed batch
@pytest.fixture(scope="module")
def non_square_dir(tmp_path_factory) -> str:
    """A portrait (48 x 24) and a landscape (20 x 40) image: their crops move along different axes."""
    out = tmp_path_factory.mktemp("non_square")
    rng = np.random.default_rng(0)
    for name, (height, width) in (("tall.png", (48, 24)), ("wide.png", (20, 40))):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out / name)
    return str(out)


def test_time_ids_follow_the_crop_of_non_square_images(tiny_sdxl, non_square_dir):
    module = TextualInversion(**ti_kwargs(tiny_sdxl))
    dm = ConceptDataModule(**data_kwargs(non_square_dir, center_crop=False, random_flip=False, batch_size=4))
    batch = next(iter(dm.train_dataloader()))
    calls, handle = record_unet_inputs(module)
    module.training_loss(batch)
    handle.remove()
    files = {"tall.png": (48, 24), "wide.png": (20, 40)}
    rows = calls[0]["time_ids"]
    assert rows.shape == (4, 6)
    moved = set()
    for i, row in enumerate(rows.tolist()):
        height, width, top, left, target_h, target_w = (int(v) for v in row)
        assert (target_h, target_w) == (RESOLUTION, RESOLUTION)
        name = next(n for n, size in files.items() if size == (height, width))
        resized = resize_shorter_side(load_rgb_image(Path(non_square_dir) / name), RESOLUTION)
        assert 0 <= top <= resized.height - RESOLUTION and 0 <= left <= resized.width - RESOLUTION
        assert (top == 0) if name == "wide.png" else (left == 0)  # the crop slides along the long side only
        moved.add((top, left) != (0, 0))
        # the crop the UNet is told about is the crop it sees
        assert torch.equal(batch["pixel_values"][i], to_tensor(resized, top, left, RESOLUTION, False))
    assert True in moved
    # a mirrored sample reports its crop in the mirrored image, the one the UNet sees
    flipped = ConceptDataModule(**data_kwargs(non_square_dir, center_crop=False, random_flip=True))
    items = [flipped.train_dataset()[i] for i in range(8)]
    assert any(item["crop_top_left"][1] > 0 for item in items)
    for item in items:
        top, left = item["crop_top_left"].tolist()
        name = next(n for n, size in files.items() if size == tuple(item["original_size"].tolist()))
        resized = resize_shorter_side(load_rgb_image(Path(non_square_dir) / name), RESOLUTION)
        candidates = [to_tensor(resized, top, left, RESOLUTION, False),
                      to_tensor(resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT), top, left, RESOLUTION, False)]
        assert any(torch.allclose(item["pixel_values"], c) for c in candidates)
    # the same order as diffusers' SDXL pipeline: original size + crop top-left + target size
    pipe = StableDiffusionXLPipeline.from_pretrained(module.hparams.pretrained_model_name_or_path)
    row = pipe._get_add_time_ids(tuple(batch["original_size"][0].tolist()), tuple(batch["crop_top_left"][0].tolist()),
                                 (RESOLUTION, RESOLUTION), torch.float32, module.text_encoder_2.config.projection_dim)
    assert torch.equal(row[0], rows[0])


def test_fixed_eval_batch_is_identical_across_evaluations_and_ranks(tiny_sdxl, non_square_dir):
    """Pooled embeddings and time ids included; each "rank" has its own training generator and data module."""
    seen = []
    for rank, cache in ((0, True), (1, False)):
        module = TextualInversion(**ti_kwargs(tiny_sdxl, seed=59 + rank, cache_eval_batch=cache))
        dm = ConceptDataModule(**data_kwargs(non_square_dir, center_crop=False))
        dataset = dm.build_eval_dataset(module.eval_batch_spec())
        calls, handle = record_unet_inputs(module)
        losses = []
        for _ in range(2):
            losses.append(module.deterministic_loss(dataset[0]))
            module.training_loss(next(iter(dm.train_dataloader())))  # advances the training RNG in between
        handle.remove()
        seen.append((losses, calls[0::2]))  # the deterministic passes (training passes interleave)
    reference = seen[0][1][0]
    assert reference["time_ids"][:, :2].tolist() != [[RESOLUTION, RESOLUTION]] * 4  # real original sizes
    for losses, calls in seen:
        assert all(torch.equal(loss, seen[0][0][0]) for loss in losses)
        for call in calls:
            for key, value in reference.items():
                assert torch.equal(call[key], value), key


# ---------------------------------------------------------------------------------------------------- methods
@pytest.fixture(scope="module")
def trained_ti(tiny_sdxl, concept_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_ti")
    module = TextualInversion(**ti_kwargs(tiny_sdxl, num_vectors=2, learning_rate=0.05))
    fit(module, ConceptDataModule(**data_kwargs(concept_dir)), root)
    return module, root


def test_textual_inversion_trains_the_token_in_both_encoders_only(trained_ti, tiny_sdxl):
    module, _ = trained_ti
    assert module.trainable_parameters() == [module.token_vectors.vectors, module.token_vectors_2.vectors]
    for encoder, vectors, cls, sub in ((module.text_encoder, module.token_vectors, CLIPTextModel, "text_encoder"),
                                       (module.text_encoder_2, module.token_vectors_2, CLIPTextModelWithProjection,
                                        "text_encoder_2")):
        original = cls.from_pretrained(tiny_sdxl, subfolder=sub)
        init_row = original.get_input_embeddings().weight[module.tokenizer.encode("toy", add_special_tokens=False)[0]]
        assert not torch.equal(vectors.vectors[0], init_row)  # trained
        for key, value in encoder.state_dict().items():
            before = original.state_dict()[key]
            assert torch.equal(value[: before.shape[0]], before), key  # other rows and weights bit-identical


def test_textual_inversion_export_round_trips_through_the_sdxl_pipeline(trained_ti, tiny_sdxl):
    """One file per encoder in diffusers' one-key format (issue 27, item 15): the stock one-liner loads the first
    encoder's vectors under the right token (before: a file keyed clip_l/clip_g, on which it raised a ValueError
    that printed the tensor), and the same call with the second encoder loads the other."""
    module, root = trained_ti
    shapes = {}
    for name in ("learned_embeds.safetensors", "learned_embeds_clip_g.safetensors"):
        with safe_open(str(root / name), framework="pt") as handle:
            assert list(handle.keys()) == ["<cat-toy>"]
            shapes[name] = tuple(handle.get_tensor("<cat-toy>").shape)
    assert shapes == {"learned_embeds.safetensors": (2, 32), "learned_embeds_clip_g.safetensors": (2, 32)}
    # the loading lines of docs/model_families.md, stock diffusers, on the tiny model instead of SDXL base 1.0
    block = block_with(ROOT / "docs" / "model_families.md", "StableDiffusionXLPipeline.from_pretrained")
    lines = without_statements(block.code, "from_pretrained", 'pipe("').replace("runs/my-mug", str(root))
    assert lines.count("pipe.load_textual_inversion(") == 2
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    exec(compile(lines, block.id, "exec"), {"pipe": pipe})
    assert_same_as_pipeline(module, pipe, [PROMPT, "a photo of a toy"])
    # and the package's own loader (used by `sample` and `evaluate`)
    other = TextualInversion.load_into_pipeline(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), root)
    assert_same_as_pipeline(module, other, [PROMPT])


def test_the_older_one_file_sdxl_format_still_loads(trained_ti, tiny_sdxl, tmp_path):
    """Runs written before (one file keyed clip_l / clip_g, the token in its metadata) load as they did."""
    from safetensors.torch import load_file, save_file

    module, root = trained_ti
    first, second = (load_file(str(root / n))["<cat-toy>"] for n in ("learned_embeds.safetensors",
                                                                    "learned_embeds_clip_g.safetensors"))
    save_file({"clip_l": first, "clip_g": second}, str(tmp_path / "learned_embeds.safetensors"),
              metadata={"token": "<cat-toy>"})
    other = TextualInversion.load_into_pipeline(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), tmp_path)
    assert_same_as_pipeline(module, other, [PROMPT])


def test_dreambooth_lora_round_trips_through_load_lora_weights(tiny_sdxl, concept_dir, tmp_path):
    module = DreamBoothLoRA(pretrained_model_name_or_path=tiny_sdxl, placeholder_token="<cat-toy>",
                            initializer_token="toy", train_token_embedding=True, train_text_encoder=True,
                            learning_rate=1e-2)
    trainable = {name.split(".")[0] for name, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"unet", "text_encoder", "text_encoder_2", "token_vectors", "token_vectors_2"}
    fit(module, ConceptDataModule(**data_kwargs(concept_dir, class_noun="toy")), tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["artifacts"] == [
        "pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "learned_embeds_clip_g.safetensors"]
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        prefixes = {key.split(".")[0] for key in list(handle.keys())}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    pipe = DreamBoothLoRA.load_into_pipeline(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), tmp_path)
    assert_same_as_pipeline(module, pipe, ["a photo of a <cat-toy> toy", "a photo of a toy"])
    plain = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert DreamBoothLoRA.load_token_embeddings(plain, tmp_path) == ["<cat-toy>"]
    with pytest.raises(AssertionError):  # without the LoRA weights the outputs differ: the LoRA did train
        assert_same_as_pipeline(module, plain, ["a photo of a <cat-toy> toy"])


def test_full_dreambooth_exports_an_sdxl_pipeline(tiny_sdxl, concept_dir, tmp_path):
    module = DreamBooth(pretrained_model_name_or_path=tiny_sdxl, placeholder_token="<cat-toy>", initializer_token="toy",
                        train_token_embedding=True, train_text_encoder=True, learning_rate=1e-3)
    assert all(p.requires_grad for p in module.text_encoder_2.parameters())
    fit(module, ConceptDataModule(**data_kwargs(concept_dir, class_noun="toy")), tmp_path, max_steps=2)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "pipeline"))
    assert_same_as_pipeline(module, pipe, ["a photo of a <cat-toy> toy", "a photo of a toy"])
    loaded = DreamBooth.load_into_pipeline(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), tmp_path)
    assert type(loaded) is StableDiffusionXLPipeline
    assert torch.equal(loaded.text_encoder_2.get_input_embeddings().weight,
                       module.text_encoder_2.get_input_embeddings().weight)


def test_custom_diffusion_round_trips_on_sdxl(tiny_sdxl, concept_dir, tmp_path):
    module = CustomDiffusion(pretrained_model_name_or_path=tiny_sdxl, placeholder_token="<new1>",
                             initializer_token="toy", learning_rate=1e-2)
    assert len(module.cross_attention_layers()) > 0
    fit(module, ConceptDataModule(**data_kwargs(concept_dir, placeholder_token="<new1>", class_noun="toy")), tmp_path)
    for name in ("<new1>.safetensors", "<new1>_clip_g.safetensors"):  # one file per encoder, keyed by the token
        with safe_open(str(tmp_path / name), framework="pt") as handle:
            assert list(handle.keys()) == ["<new1>"]
    pipe = CustomDiffusion.load_into_pipeline(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), tmp_path)
    assert_same_as_pipeline(module, pipe, ["a photo of a <new1> toy", "a photo of a toy"])


class RecordEvalInputs(L.Callback):
    """Writes, per rank, the UNet inputs of every DVAR evaluation and its loss to rank<k>.json."""

    def __init__(self, out: str):
        self.out, self.evaluations, self.losses = out, [], []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.calls, self.handle = record_unet_inputs(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.handle.remove()
        self.evaluations.append({k: v.tolist() for k, v in self.calls[0].items()})
        self.losses.append(float(outputs))

    def on_fit_end(self, trainer, pl_module):
        record = {"evaluations": self.evaluations, "losses": self.losses}
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_two_process_ddp_ranks_see_the_same_fixed_batch(tmp_path, tiny_sdxl, non_square_dir):
    module = TextualInversion(**ti_kwargs(tiny_sdxl, learning_rate=0.05))
    dm = ConceptDataModule(**data_kwargs(non_square_dir, center_crop=False))
    trainer = L.Trainer(max_steps=3, callbacks=[DVAREarlyStopping(window=50), RecordEvalInputs(str(tmp_path))],
                        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2))
    trainer.fit(module, datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["evaluations"]) == 3 and ranks[0] == ranks[1]
    first = ranks[0]["evaluations"]
    for later in first[1:]:  # only the trained token moves between evaluations: sizes, crops and noise stay
        for key in ("sample", "timestep", "time_ids"):
            assert later[key] == first[0][key], key


def test_sdxl_quickstart_runs_offline_and_its_run_loads_for_sampling(tmp_path):
    """The shipped quickstart as written (embedded tiny SDXL, embedded concept), then ``load_run_pipeline``."""
    from lightning_custom.cli import main
    from lightning_custom.inference.pipelines import load_run_pipeline

    with one_thread():
        main(["fit", "--config", str(ROOT / "configs" / "sdxl" / "quickstart_sdxl.yaml"),
              "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    # Random weights learn nothing (DVAR would call it undertrained): the quickstart runs a fixed 100 steps.
    assert summary["stopped_by"] == "max_steps" and summary["stop_step"] == 100 and len(summary["dvar_history"]) == 10
    pipe, _ = load_run_pipeline(tmp_path, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert "<cat-toy>" in pipe.tokenizer.get_vocab() and "<cat-toy>" in pipe.tokenizer_2.get_vocab()
