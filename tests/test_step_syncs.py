"""The steady-state training step (issue 15): frozen half-precision parts outside autocast, the model dtype read
once, no host sync, and tokenization in the data loader."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_custom.data import ConceptDataModule
from lightning_custom.data.loader import collate_with_token_ids
from lightning_custom.methods import CustomDiffusion, DreamBooth, DreamBoothLoRA, TextualInversion
from tests.conftest import data_kwargs, trainer_kwargs

pytestmark = pytest.mark.usefixtures("single_thread")

TOKEN = "<cat-toy>"


def build(method: str, model: str, **overrides) -> L.LightningModule:
    """A module of ``method`` on the tiny model, learning ``TOKEN`` (initialised from "toy")."""
    common = dict(pretrained_model_name_or_path=model, placeholder_token=TOKEN, initializer_token="toy", **overrides)
    if method == "textual_inversion":
        return TextualInversion(**common)
    if method == "dreambooth_lora":
        return DreamBoothLoRA(train_token_embedding=True, **common)
    if method == "custom_diffusion":
        return CustomDiffusion(**common)
    raise ValueError(method)


METHODS = ["textual_inversion", "dreambooth_lora", "custom_diffusion"]


def train_batch(concept_dir: str, module=None) -> dict:
    """Two training samples, collated like the loader does (tokenized when ``module`` is given)."""
    dataset = ConceptDataModule(**data_kwargs(concept_dir)).train_dataset()
    tokenize = module.caption_tokenizer() if module is not None else None
    return collate_with_token_ids([dataset[0], dataset[1]], tokenize=tokenize)


def record_autocast(module: torch.nn.Module) -> list[bool]:
    """Whether CPU autocast was on at each forward of ``module``."""
    states: list[bool] = []
    module.register_forward_pre_hook(lambda *_: states.append(torch.is_autocast_enabled("cpu")))
    return states


# ------------------------------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_unet_and_vae_run_outside_autocast(method, tiny_sd, concept_dir):
    module = build(method, tiny_sd, weight_dtype="bfloat16", cache_latents=False)
    unet, vae = record_autocast(module.unet), record_autocast(module.vae.encoder)
    text = record_autocast(module.text_encoder)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what Lightning's bf16-mixed does around training_step
        loss = module.training_loss(train_batch(concept_dir))
    loss.backward()
    assert unet == [False] and vae == [False]  # the frozen bf16 parts ran outside autocast
    assert text == [True]  # the fp32 text encoder (it holds the trained token) keeps autocast
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        if "lora_A" not in name:  # lora_B starts at zero, so lora_A's first gradient is zero
            assert p.grad.abs().sum() > 0, name


def test_an_fp32_unet_keeps_autocast(tiny_sd, concept_dir):
    # Full DreamBooth trains the UNet in fp32: there autocast is what makes its matmuls half precision.
    module = DreamBooth(pretrained_model_name_or_path=tiny_sd, weight_dtype="bfloat16")
    states = record_autocast(module.unet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module.training_loss(train_batch(concept_dir))
    assert states == [True]


def test_bf16_mixed_fit_trains_with_the_unet_outside_autocast(tiny_sd, concept_dir, tmp_path):
    module = build("custom_diffusion", tiny_sd, weight_dtype="bfloat16")
    states = record_autocast(module.unet)
    kv = module.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
    before = kv.detach().clone()
    trainer = L.Trainer(max_steps=3, precision="bf16-mixed", limit_val_batches=0, **trainer_kwargs(tmp_path))
    trainer.fit(module, datamodule=ConceptDataModule(**data_kwargs(concept_dir, placeholder_token=TOKEN)))
    assert trainer.global_step == 3 and states == [False] * 3
    assert kv.dtype == torch.float32 and not torch.equal(before, kv.detach())


# --------------------------------------------------------------------------------------------------- model dtype
def test_the_unet_dtype_is_read_once(tiny_sd, concept_dir, monkeypatch):
    from diffusers.models.modeling_utils import ModelMixin

    module = build("dreambooth_lora", tiny_sd)
    batch = train_batch(concept_dir, module)
    reads = []
    walk = ModelMixin.dtype.fget

    def counted(model):
        if "lightning_custom" in sys._getframe(1).f_code.co_filename:
            reads.append(type(model).__name__)
        return walk(model)

    monkeypatch.setattr(ModelMixin, "dtype", property(counted))
    module.training_loss(batch)
    assert sorted(reads) == ["AutoencoderKL", "UNet2DConditionModel"]  # once each, at the first step
    reads.clear()
    for _ in range(2):
        module.training_loss(batch)
    assert reads == []  # not at every step
    module.to(torch.float64)  # moving the module forgets the cached dtypes
    assert module.module_dtype("unet") == torch.float64 and reads == ["UNet2DConditionModel"]


# ------------------------------------------------------------------------------------------------------ host syncs
class SyncCounter(Callback):
    """Counts host reads of tensors (``.item()``, ``.tolist()``, ``float()``, ``int()``, ``bool()``) in a window.

    The window runs from the start of optimizer step ``first`` to the end of step ``last`` (0-based), so it covers
    the steps, the backward passes, the optimizer, and Lightning's per-batch bookkeeping in between. On a GPU every one
    of these reads would wait for the device. The optimizer's step counters are left out: torch's AdamW keeps them
    on the CPU (or, fused, reads none), so reading them is no device sync.
    """

    READS = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.reads: list[str] = []
        self._saved: dict[str, object] = {}
        self._cpu_scalars: set[int] = set()

    def _install(self, trainer) -> None:
        self._cpu_scalars = {id(state["step"]) for optimizer in trainer.optimizers
                             for state in optimizer.state.values() if torch.is_tensor(state.get("step"))}
        for name in self.READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                if id(tensor) not in self._cpu_scalars:
                    caller = sys._getframe(1)
                    self.reads.append(f"{_name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)

    def _remove(self) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.first:
            self._install(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.last + 1:  # counted after the optimizer step
            self._remove()

    def teardown(self, trainer, pl_module, stage):
        self._remove()


@pytest.mark.parametrize("method", METHODS)
def test_the_steady_state_step_reads_nothing_back(method, tiny_sd, concept_dir, tmp_path):
    from lightning_custom.callbacks import DVAREarlyStopping

    module = build(method, tiny_sd)
    counter = SyncCounter(first=5, last=15)  # inside the first epoch (20 batches)
    # DVAR evaluates at step 30 only (its reads are outside the window); the logger writes at step 25.
    dvar = DVAREarlyStopping(window=50, eval_every_n_steps=30, verbose=False)
    trainer = L.Trainer(max_steps=31, callbacks=[counter, dvar], **trainer_kwargs(
        tmp_path, logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=25))
    trainer.fit(module, datamodule=ConceptDataModule(**data_kwargs(concept_dir, placeholder_token=TOKEN)))
    assert trainer.global_step == 31
    assert counter.reads == [], counter.reads
    rows = list(csv.DictReader(open(next(Path(tmp_path, "logs").rglob("metrics.csv")))))
    logged = [int(row["step"]) for row in rows if row.get("train_loss")]
    assert logged == [24]  # the loss still reaches the logger, every log_every_n_steps


@pytest.mark.gpu
def test_no_device_sync_in_the_step_on_cuda(tiny_sd, concept_dir, tmp_path):
    """Any device sync inside a steady-state step raises (``torch.cuda.set_sync_debug_mode("error")``)."""

    class SyncDebug(Callback):
        steps = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= 5:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx >= 5:
                torch.cuda.set_sync_debug_mode("default")
                self.steps += 1

    for method in METHODS:
        module = build(method, tiny_sd, weight_dtype="bfloat16")
        debug = SyncDebug()
        trainer = L.Trainer(accelerator="cuda", devices=1, max_steps=12, precision="bf16-mixed", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                            callbacks=[debug], default_root_dir=tmp_path)
        try:
            trainer.fit(module, datamodule=ConceptDataModule(**data_kwargs(concept_dir, placeholder_token=TOKEN)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert debug.steps == 7, method


# ---------------------------------------------------------------------------------------------------- tokenizing
def test_the_loader_tokenizes_and_the_step_does_not(tiny_sd, concept_dir, tmp_path, monkeypatch):
    module = build("textual_inversion", tiny_sd)
    batch = train_batch(concept_dir, module)
    assert torch.equal(batch["input_ids"], module.tokenize(batch["caption"]))
    plain = train_batch(concept_dir)  # no token ids: the module tokenizes (a batch built by hand)
    assert "input_ids" not in plain
    torch.testing.assert_close(module.encode_text(batch["caption"], [batch["input_ids"]]),
                               module.encode_text(plain["caption"]), rtol=0, atol=0)

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized inside the training step")

    monkeypatch.setattr(module, "tokenize", refuse)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, **trainer_kwargs(tmp_path))
    trainer.fit(module, datamodule=ConceptDataModule(**data_kwargs(concept_dir, placeholder_token=TOKEN)))
    assert trainer.global_step == 2


def test_multi_vector_placeholders_are_expanded_in_the_loader(tiny_sd, concept_dir):
    module = build("textual_inversion", tiny_sd, num_vectors=3)
    ids = module.caption_tokenizer()([f"a photo of a {TOKEN}"])["input_ids"][0].tolist()
    new = module.tokenizer.convert_tokens_to_ids(module.placeholder_names)
    assert [i for i in ids if i in new] == new  # all three vectors' tokens, in order


def test_sdxl_batches_carry_both_tokenizers_ids(tiny_sdxl, concept_dir):
    module = build("textual_inversion", tiny_sdxl)
    batch = train_batch(concept_dir, module)
    assert torch.equal(batch["input_ids"], module.tokenize(batch["caption"], module.tokenizer))
    assert torch.equal(batch["input_ids_2"], module.tokenize(batch["caption"], module.tokenizer_2))
    from_ids = module.encode_text(batch["caption"], [batch["input_ids"], batch["input_ids_2"]])
    from_text = module.encode_text(batch["caption"])
    for key in ("encoder_hidden_states", "text_embeds"):
        assert torch.equal(from_ids[key], from_text[key])


def test_class_captions_are_tokenized_too(tiny_sd):
    module = build("dreambooth_lora", tiny_sd)
    items = [{"caption": f"a photo of {TOKEN} toy", "class_caption": "a photo of a toy"}] * 2
    batch = collate_with_token_ids(items, tokenize=module.caption_tokenizer())
    assert torch.equal(batch["class_input_ids"], module.tokenize(["a photo of a toy"] * 2))
