"""Shared fixtures: tiny diffusers models saved to temp folders and loaded back through the real loaders."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread per process, inherited by DDP workers and CLI subprocesses: the tiny test models are
# overhead-bound, and two processes with two spinning threads each on a 2-core machine run 10-70x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_custom.synthetic.toy_models import make_example_concept_images, save_tiny_sd, save_tiny_sdxl  # noqa: E402

torch.set_num_threads(1)  # see OMP_NUM_THREADS above; tests that need more threads ask for them

# Small enough for many fits per test session on a 2-core CPU: 16 px images, 8x8 latents.
RESOLUTION = 16


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip where no CUDA device exists."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads run the tiny models ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread():
    """Run the test with :func:`one_thread`."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """A tiny SD 1.x-style (epsilon) model folder written with ``save_pretrained``."""
    return str(save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> str:
    """A tiny SD 2.x-style (v_prediction) model folder."""
    return str(save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-v", seed=1, prediction_type="v_prediction"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    """A tiny SDXL model folder (two text encoders, a ``text_time`` UNet) written with ``save_pretrained``."""
    return str(save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0))


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory) -> str:
    """Four 32x32 RGB concept images."""
    out = tmp_path_factory.mktemp("concept")
    make_example_concept_images(out, n=4, size=32, seed=3)
    return str(out)


def data_kwargs(concept_dir: str, **overrides) -> dict:
    """ConceptDataModule arguments for the tiny setting."""
    kwargs = dict(instance_data_dir=concept_dir, placeholder_token="<cat-toy>", resolution=RESOLUTION,
                  batch_size=2, eval_batch_size=4, repeats=10, seed=59)
    kwargs.update(overrides)
    return kwargs


def ti_kwargs(model_path: str, **overrides) -> dict:
    """TextualInversion arguments for the tiny setting."""
    kwargs = dict(pretrained_model_name_or_path=model_path, placeholder_token="<cat-toy>", initializer_token="toy",
                  learning_rate=5e-3)
    kwargs.update(overrides)
    return kwargs


def trainer_kwargs(root: Path, **overrides) -> dict:
    """Quiet CPU Trainer arguments."""
    kwargs = dict(accelerator="cpu", devices=1, default_root_dir=str(root), logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    kwargs.update(overrides)
    return kwargs
