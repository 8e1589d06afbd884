"""Textual Inversion and new identifier tokens on FLUX.1 and SD3 (issue 13, item 3), on tiny offline models.

The FLUX model's T5 tokenizer is a real ``T5Tokenizer`` (SentencePiece unigram, ``▁`` word marks) with fewer
pieces than T5's embedding has rows, as FLUX.1's own T5 (32100 tokens, 32128 rows); SD3's T5 uses the toy
word-level tokenizer, whose vocabulary fills its embedding (the new tokens grow it).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors import safe_open

from lightning_custom.data import ConceptDataModule
from lightning_custom.errors import UserInputError
from lightning_custom.methods import DreamBoothLoRA, TextualInversion
from lightning_custom.methods.token_files import load_textual_inversion, pipeline_prompts
from lightning_custom.synthetic.toy_flow import save_tiny_flux, save_tiny_sd3
from tests.conftest import data_kwargs, one_thread, ti_kwargs, trainer_kwargs
from tests.doc_blocks import block_with, without_statements

TOKEN = "<cat-toy>"
PROMPT = f"a photo of {TOKEN} toy on the grass"
SEQUENCE_LENGTH = 32  # the tiny T5 tokenizers' model_max_length: the module pads T5 ids to it


def sentencepiece_t5_tokenizer():
    """A real ``T5Tokenizer`` (SentencePiece unigram) over a few pieces: ``toy`` is one piece, ``grass`` two."""
    from transformers import T5Tokenizer

    words = ["▁", "▁a", "▁photo", "▁of", "▁toy", "▁on", "▁the", "▁gr", "ass", "▁dog", "▁red", "▁object"]
    pieces = ["<pad>", "</s>", "<unk>", *words, *string.ascii_lowercase, "<", ">", "-", "_", *string.digits]
    vocab = [(piece, 0.0 if i < 3 else -1.0 - 0.01 * i) for i, piece in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=SEQUENCE_LENGTH)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """FLUX.1-dev-style (T5 with a SentencePiece tokenizer, guidance embedding); SD3 with and without T5."""
    root = tmp_path_factory.mktemp("flow_ti")
    with one_thread():
        flux = save_tiny_flux(root / "flux", seed=0, with_t5=True, guidance_embeds=True)
        sentencepiece_t5_tokenizer().save_pretrained(flux / "tokenizer_2")
        index = json.loads((flux / "model_index.json").read_text())
        index["tokenizer_2"] = ["transformers", "T5Tokenizer"]
        (flux / "model_index.json").write_text(json.dumps(index))
        return {"flux": flux, "sd3": save_tiny_sd3(root / "sd3", with_t5=True),
                "sd3_no_t5": save_tiny_sd3(root / "sd3_no_t5", with_t5=False)}


STOCK = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
# (family, t5_num_vectors): CLIP gets 2 vectors; T5 none, or 3 (another count than CLIP's, expanded per tokenizer)
CASES = [("flux", 0), ("flux", 3), ("sd3", 0), ("sd3", 3)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-t5_{n}" for f, n in CASES])
def trained(request, folders, concept_dir, tmp_path_factory):
    """A TextualInversion fitted 3 steps, its export folder, and its stock pipeline before training."""
    family, t5_vectors = request.param
    root = tmp_path_factory.mktemp(f"{family}_{t5_vectors}")
    with one_thread():
        module = TextualInversion(**ti_kwargs(str(folders[family]), num_vectors=2, t5_num_vectors=t5_vectors,
                                              learning_rate=0.05))
        before = {name: p.detach().clone() for name, p in module.named_parameters()}
        trainer = L.Trainer(max_steps=3, **trainer_kwargs(root))
        trainer.fit(module, datamodule=ConceptDataModule(**data_kwargs(concept_dir)))
        module.export_artifacts(root)
    return module.eval(), root, before, family, t5_vectors


def _stock(folders, family):
    return STOCK[family].from_pretrained(str(folders[family]))


def test_only_the_new_embedding_rows_change(trained, folders):
    module, _, before, family, t5_vectors = trained
    stock = _stock(folders, family)
    slots = {slot.text_encoder: slot for slot in module.token_slots}
    expected = ["text_encoder"] + (["text_encoder_2"] if family == "sd3" else [])
    t5_name = "text_encoder_2" if family == "flux" else "text_encoder_3"
    assert [s.text_encoder for s in module.token_slots] == expected + ([t5_name] if t5_vectors else [])
    vectors = [getattr(module, slot.vectors_attribute).vectors for slot in module.token_slots]
    assert module.trainable_parameters() == vectors
    for name in module.text_encoder_names:
        encoder, original = getattr(module, name), getattr(stock, name)
        tokenizer = name.replace("text_encoder", "tokenizer")
        new_ids = set(getattr(module, tokenizer).convert_tokens_to_ids(module.names_by_tokenizer[tokenizer])) \
            if name in slots else set()
        trained_state = encoder.state_dict()
        for key, value in original.state_dict().items():
            if key.endswith(("shared.weight", "embed_tokens.weight", "token_embedding.weight")):
                # every row but the new tokens' bit-identical (T5's padding rows beyond its tokenizer included:
                # FLUX's new T5 tokens take some of them, SD3's grow the matrix)
                rows = [r for r in range(min(value.shape[0], trained_state[key].shape[0])) if r not in new_ids]
                assert torch.equal(trained_state[key][rows], value[rows]), (name, key)
            else:
                assert torch.equal(trained_state[key], value), (name, key)
        if name not in slots:  # no token added to this encoder's tokenizer
            assert len(getattr(module, tokenizer)) == len(getattr(stock, tokenizer))
    for name, p in module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name]), name
    for slot, v in zip(module.token_slots, vectors):
        assert v.dtype == torch.float32
        assert v.shape[0] == (t5_vectors if slot.is_t5 else 2)
        assert not torch.equal(v, before[f"{slot.vectors_attribute}.vectors"]), slot  # trained
    for key in ("transformer", "vae"):
        for name, value in getattr(stock, key).state_dict().items():
            assert torch.equal(getattr(module, key).state_dict()[name], value), (key, name)


def test_the_loader_tokenizes_like_the_module(trained):
    """The data loader's collate expands the placeholder per tokenizer (T5 may have another count) as
    ``tokenize`` does, so training and the fixed evaluation batch read the same ids."""
    module, _, _, _, t5_vectors = trained
    collated = module.caption_tokenizer()([PROMPT, "a red dog"])
    for key, tokenizer in zip(("input_ids", "input_ids_2", "input_ids_3"), module.tokenizers):
        assert torch.equal(collated[key], module.tokenize([PROMPT, "a red dog"], tokenizer)), key
    for slot in module.token_slots:
        tokenizer = getattr(module, slot.tokenizer)
        ids = module.tokenize([PROMPT], tokenizer)[0].tolist()
        count = t5_vectors if slot.is_t5 else 2
        assert all(tokenizer.convert_tokens_to_ids(n) in ids for n in module.names_by_tokenizer[slot.tokenizer])
        assert len(module.names_by_tokenizer[slot.tokenizer]) == count


def test_export_holds_one_tensor_per_encoder(trained):
    """One file per encoder, each keyed by the token (the stock one-liner loads the first)."""
    module, root, _, family, t5_vectors = trained
    shapes = {}
    for path in sorted(root.glob("learned_embeds*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            assert list(handle.keys()) == [TOKEN]
            shapes[path.name] = tuple(handle.get_tensor(TOKEN).shape)
    expected = {"learned_embeds.safetensors": (2, 32)}
    if family == "sd3":
        expected["learned_embeds_clip_g.safetensors"] = (2, 32)
    if t5_vectors:
        expected["learned_embeds_t5.safetensors"] = (t5_vectors, 32 if family == "flux" else 64)
    assert shapes == expected


def _doc_lines(pipe, root, family, t5_vectors):
    """The loading lines of docs/model_families.md, run on the tiny pipeline and this run's folder. FLUX: stock
    ``pipe.load_textual_inversion`` per file (the first is the stock one-liner; the T5 file's line only where T5
    vectors trained, as its comment says). SD3: its pipeline lacks diffusers' ``TextualInversionLoaderMixin``
    (0.42), so the page adds the tokens and sets their rows."""
    page = Path(__file__).resolve().parents[1] / "docs" / "model_families.md"
    block = block_with(page, "pipe.load_textual_inversion(\"runs/my-toy" if family == "flux" else "tokenizer_3")
    drop = ['pipe("'] + ([] if (root / "learned_embeds_t5.safetensors").is_file() or family != "flux" else
                         ["learned_embeds_t5"])
    lines = without_statements(block.code, *drop).replace("runs/my-toy", str(root)).replace("<my-toy>", TOKEN)
    assert "load_textual_inversion" in lines or family == "sd3"
    exec(compile(lines, block.id, "exec"), {"pipe": pipe})


def _pipeline_text(pipe, family, prompts):
    """``(T5/joint states, pooled)`` from the pipeline's own ``encode_prompt`` (multi-vector prompts converted as
    the pipeline does: FLUX itself, SD3 by :func:`pipeline_prompts`)."""
    if family == "flux":
        states, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=SEQUENCE_LENGTH)
        return states, pooled
    states, _, pooled, _ = pipe.encode_prompt(**pipeline_prompts(pipe, prompts), do_classifier_free_guidance=False,
                                              max_sequence_length=SEQUENCE_LENGTH)
    return states, pooled


def test_export_round_trips_through_the_stock_pipeline(trained, folders):
    module, root, _, family, t5_vectors = trained
    prompts = [PROMPT, "a red dog"]
    with torch.no_grad():
        mine = module.encode_text(prompts)
        pipe = _stock(folders, family)
        _doc_lines(pipe, root, family, t5_vectors)
        states, pooled = _pipeline_text(pipe, family, prompts)
        torch.testing.assert_close(pooled, mine["pooled_projections"], atol=1e-5, rtol=0)
        torch.testing.assert_close(states, mine["encoder_hidden_states"], atol=1e-5, rtol=0)
        # the package's loader (`sample`, `evaluate`) gives the same
        other = TextualInversion.load_into_pipeline(_stock(folders, family), root)
        states, pooled = _pipeline_text(other, family, prompts)
        torch.testing.assert_close(states, mine["encoder_hidden_states"], atol=1e-5, rtol=0)
        torch.testing.assert_close(pooled, mine["pooled_projections"], atol=1e-5, rtol=0)
        # and the token matters: the stock encoders read the placeholder as text
        stock_states, stock_pooled = _pipeline_text(_stock(folders, family), family, prompts)
        assert not torch.allclose(stock_pooled[0], mine["pooled_projections"][0], atol=1e-3)
        # FLUX's text sequence is T5's alone: the CLIP token changes it only with T5 vectors
        changed = family == "sd3" or t5_vectors > 0
        assert torch.allclose(stock_states[0], mine["encoder_hidden_states"][0], atol=1e-3) is not changed


def test_t5_vectors_stay_float32_with_a_bfloat16_t5(folders):
    with one_thread():
        module = TextualInversion(**ti_kwargs(str(folders["flux"]), t5_num_vectors=1, weight_dtype="bfloat16"))
        assert module.text_encoder_2.dtype == torch.bfloat16
        assert module.token_vectors_2.vectors.dtype == torch.float32
        module.encode_text([PROMPT])["encoder_hidden_states"].float().square().sum().backward()
    grad = module.token_vectors_2.vectors.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
    assert module.text_encoder_2.get_input_embeddings().weight.grad is None


# ---------------------------------------------------------------------------------------------------- errors
def _one_line_error(match: str, **kwargs) -> str:
    with pytest.raises(UserInputError, match=match) as info, one_thread():
        TextualInversion(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_t5_token_on_sd3_without_t5_is_a_one_line_error(folders):
    message = _one_line_error(r"^--model\.t5_num_vectors: .* has no T5 text encoder",
                              **ti_kwargs(str(folders["sd3_no_t5"]), t5_num_vectors=1))
    assert str(folders["sd3_no_t5"]) in message
    TextualInversion(**ti_kwargs(str(folders["sd3_no_t5"])))  # without T5 vectors it trains the CLIP ones


def test_multi_token_initializer_in_t5_is_a_one_line_error(folders):
    # "grass" is one token in the CLIP vocabulary, two pieces in the SentencePiece T5 one ("▁gr", "ass")
    _one_line_error(r"^--model\.initializer_token: 'grass' is 2 tokens in the T5 tokenizer \(tokenizer_2\)",
                    **ti_kwargs(str(folders["flux"]), initializer_token="grass", t5_num_vectors=1))
    TextualInversion(**ti_kwargs(str(folders["flux"]), initializer_token="grass"))  # CLIP only: fine


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_placeholder_already_in_a_vocabulary_is_a_one_line_error(folders, family):
    # "dog" is a word of every tokenizer here: a CLIP word, and the SentencePiece piece "▁dog" in FLUX's T5
    _one_line_error(r"^--model\.placeholder_token: 'dog' is already in the tokenizer's vocabulary",
                    **ti_kwargs(str(folders[family]), placeholder_token="dog", t5_num_vectors=1))


def test_sentencepiece_words_count_as_in_the_vocabulary():
    from lightning_custom.methods.tokens import token_in_vocabulary

    tokenizer = sentencepiece_t5_tokenizer()
    assert token_in_vocabulary(tokenizer, "dog") and token_in_vocabulary(tokenizer, "toy")
    assert not token_in_vocabulary(tokenizer, TOKEN) and not token_in_vocabulary(tokenizer, "grass")


# ------------------------------------------------------------------------------------- identifier tokens
@pytest.mark.parametrize("family,t5", [("flux", True), ("sd3", False)])
def test_dreambooth_lora_identifier_tokens_round_trip(folders, family, t5, tmp_path):
    with one_thread():
        module = DreamBoothLoRA(pretrained_model_name_or_path=str(folders[family]), placeholder_token=TOKEN,
                                initializer_token="toy", train_token_embedding=True, t5_token_embedding=t5)
        with torch.no_grad():
            for vectors in module.token_vector_modules:  # as if trained
                vectors.vectors.add_(torch.randn(vectors.vectors.shape, generator=torch.Generator().manual_seed(0)))
        names = [slot.text_encoder for slot in module.token_slots]
        expected = {"flux": ["text_encoder", "text_encoder_2"], "sd3": ["text_encoder", "text_encoder_2"]}[family]
        assert names == expected
        files = module.export_token_embeddings(tmp_path)
        second = "learned_embeds_t5.safetensors" if family == "flux" else "learned_embeds_clip_g.safetensors"
        assert files == ["learned_embeds.safetensors", second]
        for name in files:  # each keyed by the token: the stock one-liner never registers a token named "clip_l"
            with safe_open(str(tmp_path / name), framework="pt") as handle:
                assert list(handle.keys()) == [TOKEN]
        pipe = _stock(folders, family)
        from lightning_custom.methods.finetuning import FineTuningModule

        assert FineTuningModule.load_token_embeddings(pipe, tmp_path) == [TOKEN]
        with torch.no_grad():
            mine = module.encode_text([PROMPT])
            states, pooled = _pipeline_text(pipe, family, [PROMPT])
    torch.testing.assert_close(states, mine["encoder_hidden_states"], atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, mine["pooled_projections"], atol=1e-5, rtol=0)


def test_t5_identifier_token_without_t5_is_a_one_line_error(folders):
    with pytest.raises(UserInputError, match=r"^--model\.t5_token_embedding: .* has no T5 text encoder"), \
            one_thread():
        DreamBoothLoRA(pretrained_model_name_or_path=str(folders["sd3_no_t5"]), placeholder_token=TOKEN,
                       initializer_token="toy", train_token_embedding=True, t5_token_embedding=True)


def test_load_textual_inversion_helper_works_on_sd3(folders):
    """SD3's pipeline has no ``load_textual_inversion``; the helper runs diffusers' own on it."""
    pipe = _stock(folders, "sd3")
    assert not hasattr(pipe, "load_textual_inversion")
    load_textual_inversion(pipe, torch.ones(2, 32), [TOKEN, f"{TOKEN}_1"], pipe.text_encoder, pipe.tokenizer)
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], torch.ones(2, 32))
    assert pipeline_prompts(pipe, [f"a {TOKEN}"])["prompt"] == [f"a {TOKEN} {TOKEN}_1"]
    assert pipeline_prompts(pipe, [f"a {TOKEN}"])["prompt_2"] == [f"a {TOKEN}"]  # CLIP-G has no such token


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_prior_preservation_generates_class_images_with_the_flow_pipeline(folders, family, concept_dir, tmp_path):
    """DreamBooth-LoRA with new identifier tokens (FLUX: in T5 too) and prior preservation: the class images come
    from the family's pipeline and flow scheduler, then both losses train the token vectors."""
    with one_thread():
        module = DreamBoothLoRA(pretrained_model_name_or_path=str(folders[family]), placeholder_token=TOKEN,
                                initializer_token="toy", train_token_embedding=True,
                                t5_token_embedding=family == "flux")
        before = [v.vectors.detach().clone() for v in module.token_vector_modules]
        datamodule = ConceptDataModule(**data_kwargs(
            concept_dir, batch_size=1, repeats=2, with_prior_preservation=True, class_noun="toy", num_class_images=2,
            class_inference_steps=2, class_cache_dir=str(tmp_path / "class_images")))
        L.Trainer(max_steps=2, **trainer_kwargs(tmp_path)).fit(module, datamodule=datamodule)
    assert len(list((tmp_path / "class_images").rglob("*.png"))) == 2
    for vectors, start in zip(module.token_vector_modules, before):
        assert not torch.equal(vectors.vectors, start)
