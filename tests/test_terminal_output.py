"""What a person at the terminal sees: a bar in optimizer steps with DVAR's state, and no expected noise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L

from lightning_custom.callbacks import DVAREarlyStopping
from lightning_custom.callbacks.progress import (
    BAR_WIDTH,
    ParameterCountSummary,
    StepProgressBar,
    default_terminal_callbacks,
    dvar_status,
    parameter_line,
)
from lightning_custom.data import ConceptDataModule
from lightning_custom.methods import TextualInversion
from tests.conftest import data_kwargs, ti_kwargs, trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]


def test_fit_bar_counts_optimizer_steps_and_shows_dvar(tiny_sd, concept_dir, tmp_path, single_thread):
    bar = StepProgressBar(update_interval_s=0.0)
    dvar = DVAREarlyStopping(window=10, eval_every_n_steps=2, threshold=0.5)
    # 4 images x 10 repeats / batch 2 = 20 batches an epoch: the 60-step budget spans three epochs.
    trainer = L.Trainer(max_steps=60, callbacks=[dvar, bar],
                        **trainer_kwargs(tmp_path, enable_progress_bar=True))
    trainer.fit(TextualInversion(**ti_kwargs(tiny_sd)), ConceptDataModule(**data_kwargs(concept_dir)))
    assert trainer.num_training_batches == 20
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert len(bar.progress.tasks) == 1  # one task for the whole fit: no per-epoch reset, no validation bars
    # The bar ends full at the step the run ended (no time "left" to a budget it will not use).
    assert task.total == max(1, trainer.global_step) and task.completed == trainer.global_step
    assert task.description == f"step {trainer.global_step}/60"
    shown = bar._metric_component._metrics
    assert set(shown) == {"loss", "L_det", "DVAR"}
    assert shown["DVAR"] == dvar_status(dvar)
    if dvar.stop_step is not None:  # stopped by DVAR: the shown ratio is the one that stopped it
        assert float(shown["DVAR"].split("<")[0]) < 0.5
    # One line at 80 columns: step count, bar, time, speed and the metrics, at the widest step count.
    line = " ".join([f"step {60}/{60}", "x" * BAR_WIDTH, "0:00:03", "20.4/s",
                     *(f"{k}: {v}" for k, v in shown.items())])
    assert len(line) <= 80, line


class CountingBar(StepProgressBar):
    """Counts how often the bar reads the metrics (each read is a host-device sync per logged tensor)."""

    reads = 0

    def get_metrics(self, trainer, pl_module):
        self.reads += 1
        return super().get_metrics(trainer, pl_module)


def test_fit_bar_reads_metrics_at_its_own_pace_not_every_step(tiny_sd, concept_dir, tmp_path, single_thread):
    bar = CountingBar(update_interval_s=3600.0)  # only the first step, the evaluations and the end update it
    dvar = DVAREarlyStopping(window=100, eval_every_n_steps=5)
    trainer = L.Trainer(max_steps=20, callbacks=[dvar, bar], **trainer_kwargs(tmp_path, enable_progress_bar=True))
    trainer.fit(TextualInversion(**ti_kwargs(tiny_sd)), ConceptDataModule(**data_kwargs(concept_dir)))
    assert trainer.global_step == 20
    evaluations = len(dvar.history)
    assert evaluations == 4 and bar.reads <= evaluations + 2 < 20  # Lightning's bar reads them at every step
    assert bar.progress.tasks[bar.train_progress_bar_id].completed == 20


def test_dvar_status_before_and_after_the_window_fills():
    dvar = DVAREarlyStopping(window=40, eval_every_n_steps=5, threshold=0.15)
    assert dvar_status(dvar) == "0/40 steps"
    dvar.histories = {"dvar_loss": [[5, 1.0], [10, 0.9], [15, 0.8]]}
    assert dvar_status(dvar) == "15/40 steps"
    dvar.ratios = {"dvar_loss": [[40, 0.5], [45, 0.0961]]}
    assert dvar_status(dvar) == "0.096<0.15"
    observing = DVAREarlyStopping(window=40, eval_every_n_steps=5, threshold=0.15, stop=False)
    observing.histories, observing.ratios = dvar.histories, dvar.ratios
    assert dvar_status(observing) == "0.096 (observing)"  # before: "stops below 0.15" on a run it never stops


def test_parameter_line_is_one_line(tiny_sd):
    line = parameter_line(TextualInversion(**ti_kwargs(tiny_sd)))
    assert "\n" not in line
    assert re.match(r"Parameters: \d+ trainable \(token_vectors\), [\d.]+ [KM]? ?frozen \(text_encoder, vae, unet\)",
                    line), line


def test_cli_adds_the_bar_and_summary_unless_told_otherwise():
    added = default_terminal_callbacks({})
    assert [type(c) for c in added] == [StepProgressBar, ParameterCountSummary]
    assert default_terminal_callbacks({"enable_progress_bar": False, "enable_model_summary": False}) == []
    from lightning.pytorch.callbacks import TQDMProgressBar

    assert [type(c) for c in default_terminal_callbacks({"callbacks": [TQDMProgressBar()]})] == [ParameterCountSummary]


# Lines that a normal run prints by design and that say nothing to the person at the terminal.
NOISE = {
    "litlogger tip": "💡 Tip",
    "eval-mode warning": "in eval mode at the start of training",
    "pytree deprecation": "LeafSpec",
    "torchvision fallback": "requires torchvision",
    "weights bar": "Loading weights",
    "pipeline bar": "Loading pipeline components",
    "embedding resize": "multivariate normal distribution",
    "model summary table": "┃ Name",
    "epoch bar": "Epoch 0/",
    "summary callback notice": "Trainer already configured with model summary",
}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lightning_custom", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_quickstart_output_is_only_what_matters(tmp_path):
    """The quickstart config on the tiny model, in a subprocess: no expected noise, the bar in steps, the stop line."""
    run = tmp_path / "run"
    result = run_cli("fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                     "--model.init_args.pretrained_model_name_or_path", "embedded:tiny-sd",
                     "--data.init_args.resolution", "16", "--trainer.default_root_dir", str(run),
                     "--trainer.max_steps", "200", "--dvar.window", "10",
                     "--dvar.undertrained_below", "0", cwd=tmp_path)  # see tests.test_cli.quick_args
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    found = {name: line for name, needle in NOISE.items() for line in output.splitlines() if needle in line}
    assert not found, found
    assert re.search(r"^DVAR: variance ratio .* at step \d+; stopping\.$", output, re.M), output
    stop = int(re.search(r"at step (\d+); stopping", output).group(1))
    assert re.search(rf"step {stop}/200 ", output), output  # the bar's last frame, in steps
    assert re.search(r"^Parameters: \d+ trainable \(token_vectors\)", output, re.M), output


# ------------------------------------------------------------------ a real-model config (fp16, 16-mixed) on a CPU
def test_frozen_dtype_rule():
    import torch

    from lightning_custom.runtime.precision import frozen_dtype_for_precision

    assert frozen_dtype_for_precision(torch.float16, "bf16-mixed", "cpu") == torch.bfloat16
    assert frozen_dtype_for_precision(torch.float16, "32-true", "cpu") == torch.float32
    assert frozen_dtype_for_precision(torch.float16, "16-mixed", "cuda") == torch.float16
    assert frozen_dtype_for_precision(torch.float32, "bf16-mixed", "cpu") == torch.float32


def test_fp16_weights_follow_the_precision_on_a_cpu(tiny_sd, concept_dir, tmp_path, caplog, single_thread):
    """configs/textual_inversion*.yaml (weight_dtype float16, precision 16-mixed) on a CPU: Lightning runs bf16-mixed
    there, and the frozen fp16 weights become bf16 (they ended in "RuntimeError: mixed dtype (CPU)"), trainable ones
    stay fp32, with one line that says so."""
    import logging

    import torch

    module = TextualInversion(**ti_kwargs(tiny_sd, weight_dtype="float16"))
    assert module.unet.dtype == torch.float16
    dvar = DVAREarlyStopping(window=4, eval_every_n_steps=2)
    trainer = L.Trainer(max_steps=4, precision="16-mixed", callbacks=[dvar], **trainer_kwargs(tmp_path))
    with caplog.at_level(logging.INFO, logger="lightning_custom"):
        trainer.fit(module, ConceptDataModule(**data_kwargs(concept_dir)))
    assert trainer.precision == "bf16-mixed" and trainer.global_step == 4
    assert {p.dtype for p in module.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}
    notes = [r.getMessage() for r in caplog.records if "weight_dtype float16 on a CPU" in r.getMessage()]
    assert len(notes) == 1 and "bfloat16" in notes[0] and "\n" not in notes[0]
    assert len(dvar.history) == 2 and all(torch.isfinite(torch.tensor(loss)) for _, loss in dvar.history)
