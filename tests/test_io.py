"""Atomic writes: a failure mid-write leaves neither a partial file nor a temporary one behind; modes, strict JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_custom.runtime import io
from lightning_custom.runtime.io import atomic_path, publish, staging_folder, write_json, write_safetensors


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


def umask_mode(directory=False):
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def test_every_written_file_gets_the_umasks_default_mode(tmp_path):
    write_safetensors(tmp_path / "learned_embeds.safetensors", {"<tok>": torch.randn(2, 8)})  # safetensors: 0600
    write_json(tmp_path / "summary.json", {})
    with atomic_path(tmp_path / "pipeline") as tmp:
        tmp.mkdir(mode=0o700)
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "weights.bin").chmod(0o600)
    for path in (tmp_path / "learned_embeds.safetensors", tmp_path / "summary.json", tmp_path / "pipeline/weights.bin"):
        assert oct(path.stat().st_mode & 0o777) == oct(umask_mode()), path.name
    assert oct((tmp_path / "pipeline").stat().st_mode & 0o777) == oct(umask_mode(directory=True))


def test_json_is_strict(tmp_path):
    write_json(tmp_path / "s.json", {"loss": float("nan"), "history": [[1, float("inf")], [2, 0.5]]})
    text = (tmp_path / "s.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "loss": None, "history": [[1, None], [2, 0.5]]}


def test_publish_moves_the_set_with_the_naming_file_last(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("summary.json", "report.png", "old_lora.safetensors", "config.yaml"):
        (run / name).write_text("old")
    moved = []
    real_replace = io.replace_path
    monkeypatch.setattr(io, "replace_path", lambda s, t: (moved.append(Path(t).name), real_replace(s, t)))
    with staging_folder(run) as staging:
        for name in ("summary.json", "report.png", "learned_embeds.safetensors"):
            (staging / name).write_text("new")
        publish(staging, run, last="summary.json", stale={"old_lora.safetensors", "report.png"})
    assert moved == ["learned_embeds.safetensors", "report.png", "summary.json"]
    assert {p.name: p.read_text() for p in run.iterdir()} == {
        "summary.json": "new", "report.png": "new", "learned_embeds.safetensors": "new", "config.yaml": "old"}


def test_a_crash_while_publishing_leaves_no_summary_and_no_temporaries(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("old")
    real_replace = io.replace_path

    def crash_on_the_second(source, target):
        if Path(target).name == "report.png":
            raise OSError("killed midway")
        real_replace(source, target)

    monkeypatch.setattr(io, "replace_path", crash_on_the_second)
    with pytest.raises(OSError, match="killed midway"):
        with staging_folder(run) as staging:
            for name in ("summary.json", "report.png", "learned_embeds.safetensors"):
                (staging / name).write_text("new")
            publish(staging, run, last="summary.json")
    # no summary claims a set that is incomplete; nothing temporary is left
    assert sorted(p.name for p in run.iterdir()) == ["learned_embeds.safetensors"]
