"""Atomic writes: a failure mid-write leaves neither a partial file nor a temporary one behind."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lightning_custom.io import atomic_path, write_json, write_safetensors


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"stop_step": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"stop_st')  # half-written
            raise RuntimeError("crash while writing")
    assert json.loads(target.read_text()) == {"stop_step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_folders_are_replaced_whole(tmp_path):
    target = tmp_path / "pipeline"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]


def test_safetensors_round_trip(tmp_path):
    tensors = {"<tok>": torch.randn(2, 8)}
    write_safetensors(tmp_path / "learned_embeds.safetensors", tensors)
    assert torch.equal(load_file(tmp_path / "learned_embeds.safetensors")["<tok>"], tensors["<tok>"])
