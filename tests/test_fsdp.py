"""FSDP for full DreamBooth of large transformers (issue 13 item 5): ``--trainer.strategy fsdp``.

The CLI turns ``fsdp`` into :class:`~lightning_custom.runtime.strategies.DenoiserFSDPStrategy`, which wraps each of the
denoiser's transformer blocks as one FSDP unit, leaves the frozen components out of FSDP, runs on a CPU (gloo) and
gathers the full weights on rank 0 for the exports. The slow test fits the tiny FLUX model on 2 CPU processes
under DDP and under FSDP through the CLI and compares the stop step and the exported transformer; another resumes
an FSDP fit from a step checkpoint and compares it with the straight FSDP fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_custom.methods import DreamBooth
from lightning_custom.runtime.strategies import (
    DenoiserFSDPStrategy,
    ShardedNormClipping,
    apply_block_wrap_policy,
    frozen_components,
    plain_parameter_name,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flux_dreambooth() -> DreamBooth:
    return DreamBooth(pretrained_model_name_or_path="embedded:tiny-flux", placeholder_token="sks",
                      weight_dtype="float32")


def test_the_wrapping_policy_is_the_flux_transformer_blocks(flux_dreambooth):
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    strategy = DenoiserFSDPStrategy()
    classes = apply_block_wrap_policy(strategy, flux_dreambooth)
    assert classes == {FluxTransformerBlock, FluxSingleTransformerBlock}
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and set(policy._module_classes) == classes
    # every block of the model is one unit; nothing else matches the policy
    wrapped = [name for name, module in flux_dreambooth.transformer.named_modules() if type(module) in classes]
    assert len(wrapped) == (len(flux_dreambooth.transformer.transformer_blocks)
                            + len(flux_dreambooth.transformer.single_transformer_blocks))


def test_a_policy_the_user_gave_is_kept(flux_dreambooth):
    strategy = DenoiserFSDPStrategy(auto_wrap_policy={nn.Linear})
    before = strategy.kwargs["auto_wrap_policy"]
    assert apply_block_wrap_policy(strategy, flux_dreambooth) == set()
    assert strategy.kwargs["auto_wrap_policy"] is before


def test_frozen_components_are_left_out_of_fsdp_and_the_trained_ones_are_not(flux_dreambooth):
    frozen = {name for name, child in flux_dreambooth.named_children() if any(child is f for f in
                                                                             frozen_components(flux_dreambooth))}
    assert frozen == {"vae", "text_encoder", "text_encoder_2"}  # CLIP-L and T5 frozen without train_text_encoder
    trained = DreamBooth(pretrained_model_name_or_path="embedded:tiny-flux", placeholder_token="sks",
                         weight_dtype="float32", train_text_encoder=True)
    frozen = {name for name, child in trained.named_children() if any(child is f for f in frozen_components(trained))}
    assert frozen == {"vae", "text_encoder_2"}  # a trained CLIP-L stays in FSDP, whose gradients it averages


def test_a_full_checkpoint_without_the_trained_weights_is_refused_before_loading(flux_dreambooth, tmp_path):
    """Lightning's FSDP loader takes the weights out before the module's ``on_load_checkpoint`` sees them, so the
    strategy checks the file first (the module is not wrapped here: no process group is needed to refuse)."""
    from lightning_custom.errors import UserInputError

    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"text_encoder.unrelated.weight": torch.zeros(1)}}, path)
    strategy = DenoiserFSDPStrategy()
    strategy._lightning_module = flux_dreambooth
    trained = len(flux_dreambooth.trained_weight_names())
    with pytest.raises(UserInputError, match=f"lacks {trained} of the {trained} weights this run trains"):
        strategy.load_checkpoint(path)


def test_wrapper_prefixes_are_removed_from_parameter_names():
    name = "transformer.transformer_blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn.to_q.weight"
    assert plain_parameter_name(name) == "transformer.transformer_blocks.0.attn.to_q.weight"
    assert plain_parameter_name("vae.encoder.conv_in.weight") == "vae.encoder.conv_in.weight"


def test_norm_clipping_goes_through_the_sharded_root():
    strategy = DenoiserFSDPStrategy()
    plugin = strategy.precision_plugin
    assert isinstance(plugin, ShardedNormClipping) and plugin.precision == "32-true"

    class Root(nn.Module):
        def clip_grad_norm_(self, max_norm):
            self.clipped = max_norm

    plugin.sharded_root = Root()
    plugin.clip_gradients(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 0.5)
    assert plugin.sharded_root.clipped == 0.5


def fit_on_two_processes(run_dir: Path, strategy: str, *extra_args: str) -> dict:
    """Full DreamBooth on the tiny FLUX model through the CLI, 2 CPU processes (gloo); returns summary.json.

    Args:
        run_dir: the run folder (``--trainer.default_root_dir``); the config is written beside it.
        strategy: ``--trainer.strategy``.
        *extra_args: more CLI arguments, after the config (e.g. a checkpoint callback, ``--ckpt_path``).
    """
    config = {
        "seed_everything": 59, "cpu_threads": 1, "overwrite": True,
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": strategy, "max_steps": 40,
                    "default_root_dir": str(run_dir), "enable_checkpointing": False, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": "lightning_custom.methods.DreamBooth",
                  "init_args": {"pretrained_model_name_or_path": "embedded:tiny-flux", "placeholder_token": "sks",
                                "learning_rate": 1e-3, "weight_dtype": "float32"}},
        "data": {"class_path": "lightning_custom.data.ConceptDataModule",
                 "init_args": {"instance_data_dir": "embedded:cat-toy", "class_noun": "toy", "resolution": 16,
                               "batch_size": 1, "eval_batch_size": 4, "repeats": 100}},
        "dvar": {"window": 6, "threshold": 0.3, "eval_every_n_steps": 2},
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lightning_custom", "fit", "--config", str(path), *extra_args],
                          cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def exported_transformer(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {}
    for path in sorted((run_dir / "pipeline" / "transformer").glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


@pytest.mark.slow
def test_fsdp_stops_at_the_ddp_step_with_the_ddp_weights(tmp_path):
    """~5 min on a shared 2-core CPU (two 2-process fits). Measured: both stop by DVAR at step 12; the exported
    transformers differ by at most 1.2e-7 (abs), having moved 0.023 from the base weights."""
    ddp = fit_on_two_processes(tmp_path / "ddp", "ddp")
    fsdp = fit_on_two_processes(tmp_path / "fsdp", "fsdp")
    assert ddp["stopped_by"] == fsdp["stopped_by"] == "dvar"
    assert fsdp["stop_step"] == ddp["stop_step"] < 40
    assert fsdp["artifacts"] == ddp["artifacts"] == ["pipeline"]
    expected, got = exported_transformer(tmp_path / "ddp"), exported_transformer(tmp_path / "fsdp")
    assert set(got) == set(expected)
    for name, value in expected.items():
        # the ranks' gradient sums run in another order (reduce-scatter vs all-reduce): float32 rounding only
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    from lightning_custom.synthetic.toy_flow import embedded_flow_model
    from safetensors.torch import load_file

    base = {}
    for path in (Path(embedded_flow_model("tiny-flux")) / "transformer").glob("*.safetensors"):
        base.update(load_file(path))
    assert max((expected[k] - base[k]).abs().max().item() for k in expected) > 1e-3  # the weights did train


@pytest.mark.slow
def test_an_fsdp_run_resumed_from_a_step_checkpoint_stops_like_the_straight_one(tmp_path):
    """A straight FSDP fit saves full checkpoints (trainable weights, optimizer, RNG, DVAR state) every 6 steps;
    a second FSDP fit resumed from the step-6 one must stop at the same step, for the same reason, with the same
    transformer, and say in summary.json that it was resumed.

    ~2 min on a shared 2-core CPU (a 12-step and a 6-step 2-process fit). Measured: both stop by DVAR at step 12,
    the exported transformers (66 tensors) are bitwise equal, and they moved 0.0115 (abs) after the checkpoint.
    Controls (by hand): resuming from the same checkpoint with its weights removed stops at step 14 with weights
    0.026 off; with Adam's moments zeroed, at step 12 with weights 0.015 off.
    """
    resume_step = 6
    straight = fit_on_two_processes(
        tmp_path / "straight", "fsdp", "--trainer.enable_checkpointing=true",
        "--trainer.callbacks=lightning_custom.callbacks.StepCheckpoint",
        f"--trainer.callbacks.every_n_steps={resume_step}",
        f"--trainer.callbacks.dirpath={tmp_path / 'checkpoints'}")
    assert straight["stopped_by"] == "dvar" and resume_step < straight["stop_step"] < 40
    assert "resumed_from" not in straight
    checkpoint = tmp_path / "checkpoints" / f"epoch=0-step={resume_step}.ckpt"
    assert checkpoint.is_file(), sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == resume_step
    # only the trained weights, under their plain names (no FSDP wrapper prefix): the whole transformer
    expected = exported_transformer(tmp_path / "straight")
    assert {k.removeprefix("transformer.") for k in state["state_dict"]} == set(expected)

    resumed = fit_on_two_processes(tmp_path / "resumed", "fsdp", f"--ckpt_path={checkpoint}")
    assert resumed["resumed_from"] == str(checkpoint) and resumed["resumed_at_step"] == resume_step
    assert f"resumed from {checkpoint} at step {resume_step}" in resumed["stop_reason"]
    assert resumed["stopped_by"] == straight["stopped_by"] and resumed["stop_step"] == straight["stop_step"]
    assert resumed["artifacts"] == straight["artifacts"] == ["pipeline"]
    # the first 6 steps' losses come from the checkpoint, the rest were recomputed: the same per-step losses
    assert resumed["train_loss_history"] == straight["train_loss_history"]
    got = exported_transformer(tmp_path / "resumed")
    assert set(got) == set(expected)
    for name, value in expected.items():
        # same processes, same reduction order, optimizer state restored in full: the same float32 arithmetic
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
    # the weights moved after the checkpoint, so the resume had work to do
    moved = max((expected[k] - state["state_dict"][f"transformer.{k}"]).abs().max().item() for k in expected)
    assert moved > 1e-4
