"""Issue 5, item 6: the quickstart visibly learns the example concept on the embedded world model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_custom.families.components import embedded_concept_path, embedded_model_path, resolve_model_path
from lightning_custom.errors import UserInputError
from lightning_custom.synthetic.world_encoder import WorldEncoder

ROOT = Path(__file__).resolve().parents[1]
IDENTITY_MARGIN = 0.10  # identity similarity after training minus before, on the example concept (measured: +0.15)


def fit_quickstart(root: Path, *extra: str) -> Path:
    from lightning_custom.cli import main

    out = root / "run"
    main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.default_root_dir", str(out),
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra])
    return out


def test_embedded_aliases_name_the_shipped_models_and_concepts():
    from lightning_custom.synthetic.embedded import resolve_instance_dir
    from lightning_custom.synthetic.world_concepts import make_concept

    assert resolve_model_path("embedded") == embedded_model_path() and embedded_model_path().endswith("world-sd")
    assert resolve_model_path("embedded:world-sd") == embedded_model_path()
    assert resolve_model_path("embedded:tiny-sd").endswith("tiny-sd")
    assert Path(resolve_model_path("embedded:tiny-sdxl"), "unet", "config.json").is_file()
    with pytest.raises(UserInputError, match="unknown embedded model 'nope'"):
        resolve_model_path("embedded:nope")
    assert resolve_instance_dir("embedded") == embedded_concept_path()
    assert resolve_instance_dir("embedded:cat-toy").endswith("cat-toy")
    # the shipped concept is world concept 2, pixel for pixel
    shipped = sorted(Path(embedded_concept_path()).glob("*.png"))
    rendered = make_concept(2).images()
    assert len(shipped) == len(rendered) == 5
    for path, image in zip(shipped, rendered):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image))


def test_quickstart_stops_by_dvar_and_learns_the_example_concept(tmp_path, single_thread, capsys):
    """The README's quickstart, unchanged: DVAR stops it early, and samples move clearly towards the concept."""
    from lightning_custom.cli import main

    run = fit_quickstart(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "dvar" and 20 <= summary["stop_step"] <= 300 < summary["max_steps"]
    assert summary["placeholder_token"] == "<striped-star>"
    main(["before_after", str(run), "--images_per_prompt", "4"])
    printed = capsys.readouterr().out
    assert "identity similarity to the concept images: before" in printed
    before, after = (float(x.split()[0]) for x in printed.split("before ")[1].split("-> after "))
    assert after - before > IDENTITY_MARGIN, printed
    grid = np.asarray(Image.open(run / "before_after.png").convert("RGB"))
    assert grid.shape[1] == 4 * 96 and grid.std() > 0  # four 96-pixel cells a row, not a blank image


def test_before_after_grid_on_the_tiny_model(tmp_path, tiny_sd, single_thread, monkeypatch):
    from lightning_custom.synthetic.world_concepts import make_concept
    from lightning_custom.synthetic.world_encoder import identity_similarity
    from lightning_custom.world.quickstart import before_after

    folder = make_concept(2).write_images(tmp_path / "concept", size=16)
    run = fit_quickstart(tmp_path, "--model.init_args.pretrained_model_name_or_path", tiny_sd,
                         "--data.init_args.instance_data_dir", str(folder), "--trainer.max_steps", "3",
                         "--summary.report", "false", "--dvar.stop", "false")
    WorldEncoder(width=8, dim=16).save(tmp_path / "encoder")
    scored = []  # (generated, concept images, score) of each identity_similarity call

    def recording(model, generated, concept):
        scored.append((list(generated), list(concept), identity_similarity(model, generated, concept)))
        return scored[-1][2]

    monkeypatch.setattr("lightning_custom.synthetic.world_encoder.identity_similarity", recording)
    result = before_after(run, before_word="star", num_images=2, num_inference_steps=2,
                          encoder=str(tmp_path / "encoder"))
    # the scores are those of the before and the after samples against the concept images
    (before, references, before_score), (after, references_again, after_score) = scored
    assert (result["identity_before"], result["identity_after"]) == (before_score, after_score) != (1.0, 1.0)
    concept = [Image.open(f).convert("RGB") for f in sorted(folder.glob("*.png"))]
    assert [np.asarray(i).tolist() for i in references] == [np.asarray(i).tolist() for i in concept]
    assert any(not np.array_equal(np.asarray(b), np.asarray(a)) for b, a in zip(before, after))
    # the identity score is a cosine: 1 for an image against itself, below 1 against another
    model = WorldEncoder.load(str(tmp_path / "encoder"))
    assert identity_similarity(model, concept[:1], concept[:1]) == pytest.approx(1.0, abs=1e-5)
    assert identity_similarity(model, concept[:1], concept[1:2]) < 1.0 - 1e-4
    # the grid shows those very images: each one, enlarged to its 96-pixel cell, is found in its column
    grid = np.asarray(Image.open(result["grid"]).convert("RGB"))
    assert grid.shape[1] == 2 * 96 and grid.std() > 0
    for row in (before, after, concept[:2]):
        for column, image in enumerate(row):
            cell = np.asarray(image.resize((96, 96), Image.Resampling.NEAREST))
            strip = grid[:, column * 96:(column + 1) * 96]
            assert any(np.array_equal(strip[y:y + 96], cell) for y in range(grid.shape[0] - 95))


def test_before_after_needs_a_finished_run(tmp_path):
    from lightning_custom.commands import before_after

    with pytest.raises(UserInputError, match="holds no summary.json"):
        before_after(str(tmp_path))
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(UserInputError, match="--before_word"):
        before_after(str(tmp_path))
