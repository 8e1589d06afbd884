"""Textual Inversion: only the new rows train, deterministic loss, prediction types, export round trip, errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from transformers import CLIPTextModel

from lightning_custom.callbacks import DVAREarlyStopping, RunSummary
from lightning_custom.data import ConceptDataModule
from lightning_custom.objectives.diffusion import add_noise, diffusion_target
from lightning_custom.errors import UserInputError
from lightning_custom.methods import TextualInversion
from tests.conftest import data_kwargs, ti_kwargs, trainer_kwargs


def fit(module, datamodule, root, max_steps=8, callbacks=()):
    trainer = L.Trainer(max_steps=max_steps, callbacks=list(callbacks), **trainer_kwargs(root))
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_only_new_embedding_rows_change(tiny_sd, concept_dir, tmp_path):
    module = TextualInversion(**ti_kwargs(tiny_sd, num_vectors=2, learning_rate=0.05))
    original = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    frozen_before = {k: v.clone() for k, v in module.state_dict().items() if "token_vectors" not in k}
    vectors_before = module.token_vectors.vectors.detach().clone()
    fit(module, ConceptDataModule(**data_kwargs(concept_dir)), tmp_path, max_steps=6)
    weight = module.text_encoder.get_input_embeddings().weight
    old_rows = original.get_input_embeddings().weight.shape[0]
    assert weight.shape[0] == old_rows + 2
    assert torch.equal(weight[:old_rows], original.get_input_embeddings().weight)  # bit-identical
    for key, value in module.state_dict().items():
        if key in frozen_before:
            assert torch.equal(value, frozen_before[key]), key
    assert not torch.equal(module.token_vectors.vectors, vectors_before)
    assert module.trainable_parameters() == [module.token_vectors.vectors]
    assert module.token_vectors.vectors.dtype == torch.float32


def test_initialised_from_initializer_token(tiny_sd):
    module = TextualInversion(**ti_kwargs(tiny_sd, num_vectors=3))
    init_id = module.tokenizer.encode("toy", add_special_tokens=False)[0]
    expected = module.text_encoder.get_input_embeddings().weight[init_id]
    assert module.placeholder_names == ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]
    for row in module.token_vectors.vectors:
        assert torch.equal(row, expected)
    ids = module.tokenize(["a photo of a <cat-toy>"])[0].tolist()
    assert all(module.tokenizer.convert_tokens_to_ids(name) in ids for name in module.placeholder_names)


def test_splice_changes_only_the_placeholder_rows(tiny_sd):
    """The trainable vectors replace the new tokens' rows, and every other token's output stays bit-identical."""
    module = TextualInversion(**ti_kwargs(tiny_sd, num_vectors=2)).eval()
    with torch.no_grad():
        module.token_vectors.vectors.add_(torch.randn(module.token_vectors.vectors.shape,
                                                      generator=torch.Generator().manual_seed(0)))  # as if trained
    original = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").eval()
    rows = original.get_input_embeddings().weight
    new_ids = [module.tokenizer.convert_tokens_to_ids(name) for name in module.placeholder_names]
    assert new_ids == [rows.shape[0], rows.shape[0] + 1]
    with torch.no_grad():
        # every token id of the vocabulary, and the new ones, through the spliced embedding layer
        spliced = module.text_encoder.get_input_embeddings()(torch.arange(rows.shape[0] + 2)[None])[0]
        assert torch.equal(spliced[: rows.shape[0]], rows)
        assert torch.equal(spliced[rows.shape[0]:], module.token_vectors.vectors)
        # the encoder's output on prompts without the placeholder, the initializer token ("toy") among them
        prompts = ["a photo of a toy", "toy", "a toy on the grass next to another toy", ""]
        ids = module.tokenize(prompts)
        assert torch.equal(module.encode_prompt(prompts), original(ids)[0])


def test_deterministic_loss_is_repeatable_and_rng_free(tiny_sd, concept_dir):
    module = TextualInversion(**ti_kwargs(tiny_sd))
    dm = ConceptDataModule(**data_kwargs(concept_dir))
    batch = dm.build_eval_dataset(module.eval_batch_spec())[0]
    global_before = torch.get_rng_state()
    train_before = module.generator.get_state()
    losses = [module.deterministic_loss(batch) for _ in range(3)]
    assert losses[0].item() > 0 and all(torch.equal(losses[0], x) for x in losses)
    assert torch.equal(torch.get_rng_state(), global_before)
    assert torch.equal(module.generator.get_state(), train_before)
    # the training loss does draw from the training generator, and is noisy
    assert module.training_loss(batch).item() != module.training_loss(batch).item()
    assert not torch.equal(module.generator.get_state(), train_before)


def test_deterministic_loss_follows_the_batch(tiny_sd, concept_dir):
    module = TextualInversion(**ti_kwargs(tiny_sd))
    batch = ConceptDataModule(**data_kwargs(concept_dir)).build_eval_dataset(module.eval_batch_spec())[0]
    shifted = dict(batch, timesteps=(batch["timesteps"] + 1) % 1000)
    assert module.deterministic_loss(batch) != module.deterministic_loss(shifted)


def test_targets_match_diffusers_scheduler():
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type=prediction_type)
        latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
        t = torch.tensor([0, 500, 999])
        alphas = scheduler.alphas_cumprod
        assert torch.allclose(add_noise(alphas, latents, noise, t), scheduler.add_noise(latents, noise, t), atol=1e-6)
        expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        assert torch.allclose(diffusion_target(prediction_type, alphas, latents, noise, t), expected, atol=1e-6)


def test_v_prediction_model_uses_velocity_target(tiny_sd_v, concept_dir, monkeypatch):
    module = TextualInversion(**ti_kwargs(tiny_sd_v))
    assert module.prediction_type == "v_prediction"
    seen = {}
    original = diffusion_target

    def spy(prediction_type, *args):
        seen["type"] = prediction_type
        return original(prediction_type, *args)

    monkeypatch.setattr("lightning_custom.families.stable_diffusion.diffusion_target", spy)
    batch = ConceptDataModule(**data_kwargs(concept_dir)).build_eval_dataset(module.eval_batch_spec())[0]
    module.deterministic_loss(batch)
    assert seen["type"] == "v_prediction"


def test_half_precision_frozen_parts_keep_trainables_fp32(tiny_sd):
    module = TextualInversion(**ti_kwargs(tiny_sd, weight_dtype="bfloat16"))
    assert module.unet.dtype == module.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())


@pytest.mark.parametrize("num_vectors", [1, 2])
def test_export_round_trip_through_diffusers(tiny_sd, concept_dir, tmp_path, num_vectors):
    module = TextualInversion(**ti_kwargs(tiny_sd, num_vectors=num_vectors, learning_rate=0.05))
    fit(module, ConceptDataModule(**data_kwargs(concept_dir)), tmp_path, max_steps=4,
        callbacks=[DVAREarlyStopping(window=50, threshold=0.1), RunSummary()])
    path = tmp_path / "learned_embeds.safetensors"
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.load_textual_inversion(str(path))
    prompt = "a photo of a <cat-toy> on the grass"
    converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids = pipe.tokenizer(converted, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipe.text_encoder(ids)[0]
        module.eval()
        actual = module.encode_prompt([prompt])
    assert torch.allclose(actual, expected, atol=1e-6)
    # the trained embedding really is different from the initializer's
    init_id = pipe.tokenizer.encode("toy", add_special_tokens=False)[0]
    new_id = pipe.tokenizer.convert_tokens_to_ids("<cat-toy>")
    weight = pipe.text_encoder.get_input_embeddings().weight
    assert not torch.equal(weight[new_id], weight[init_id])


def test_bad_tokens_and_model_path(tiny_sd, tmp_path):
    with pytest.raises(UserInputError, match="--model.placeholder_token: 'toy' is already in the tokenizer"):
        TextualInversion(**ti_kwargs(tiny_sd, placeholder_token="toy"))
    with pytest.raises(UserInputError, match="--model.initializer_token: 'zzqx' is 4 tokens"):
        TextualInversion(**ti_kwargs(tiny_sd, initializer_token="zzqx"))
    with pytest.raises(UserInputError, match="--model.pretrained_model_name_or_path: no such folder"):
        TextualInversion(**ti_kwargs(str(tmp_path / "missing")))
    (tmp_path / "half").mkdir()
    with pytest.raises(UserInputError, match="missing subfolder"):
        TextualInversion(**ti_kwargs(str(tmp_path / "half")))
    with pytest.raises(UserInputError, match="--model.num_vectors"):
        TextualInversion(**ti_kwargs(tiny_sd, num_vectors=0))
