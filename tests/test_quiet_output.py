"""The quickstart prints only what a user needs (issue 27, item 9): every line of a fresh install's output is on an
allow-list. bitsandbytes and kernels (through lightning[pytorch-extra]) are installed here as on a fresh install, so
their offline kernel-fetch lines would show up if quiet.py stopped catching them."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = (
    r"Seed set to \d+",
    r"GPU available: (True|False).*",
    r"TPU available: .*",
    r"Parameters: [\d.]+ \w? ?trainable \(.*\), [\d.]+ \w? ?frozen \(.*\), [\d.]+ MB",
    r"DVAR: variance ratio dvar_loss=[\d.]+ fell below threshold [\d.]+ \(window \d+ steps\) at step \d+; stopping\.",
    r"Wrote .*",
    r"Next: .*",
)


def test_the_quickstart_prints_only_allowed_lines(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_custom", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
         "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"],
        capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    unexpected = [line for line in lines if not any(re.fullmatch(p, line) for p in ALLOWED)]
    assert not unexpected, unexpected
    assert any(line.startswith("DVAR: ") for line in lines)


@pytest.mark.parametrize(("logger", "message"), [
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
                                  "because Hugging Face Hub is in offline mode."),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: Version 1 of "
                                      "'kernels-community/quantization-bitsandbytes' is not available"),
    ("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. "
                                    "This is safe to ignore"),
    ("lightning.pytorch.trainer.connectors.signal_connector", "Received SIGTERM: 15"),
])
def test_each_known_noise_is_dropped_at_its_source_and_nothing_else(logger, message, caplog):
    from lightning_custom.runtime.quiet import silence_expected_log_messages

    silence_expected_log_messages()
    log = logging.getLogger(logger)
    with caplog.at_level(logging.INFO, logger=logger):
        log.warning(message)
        log.warning("a real warning from the same library")
    assert [r.getMessage() for r in caplog.records] == ["a real warning from the same library"]
