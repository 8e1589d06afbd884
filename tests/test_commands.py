"""The subcommands on finished runs: forgiving arguments, class nouns and concepts in prompts, offline evaluation on
the world model, before_after on SDXL, replay's windows.

Runs are hand-written ``summary.json`` files over the shipped models (no artifacts: the base model samples), so no
test here trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lightning_custom.cli import main
from lightning_custom.commands import join_space_separated, numeric_list_arguments, replay
from lightning_custom.families.components import embedded_concept_path, embedded_model_path
from lightning_custom.errors import UserInputError
from lightning_custom.inference.sampling import concept_prompts, run_concepts

pytestmark = pytest.mark.usefixtures("single_thread")


def write_run(folder: Path, **summary) -> Path:
    """A run folder holding only ``summary.json`` (a method without artifacts: the base model samples)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"method": "NoArtifacts", "artifacts": [], **summary}))
    return folder


def test_sample_takes_one_prompt_string_and_the_class_noun(tmp_path, tiny_sd):
    run = write_run(tmp_path / "run", pretrained_model_name_or_path=tiny_sd, placeholder_token="sks",
                    class_noun="star")
    manifest = main(["sample", str(run), "--prompts", "a photo of {} on the moon", "--images_per_prompt", "1",
                     "--num_inference_steps", "1", "--device", "cpu"])
    assert [p["prompt"] for p in manifest["prompts"]] == ["a photo of sks star on the moon"]
    assert manifest["prompts"][0]["text"] == "a photo of star on the moon"  # CLIP-T keeps the class noun
    assert len(manifest["images"]) == 1 and (run / "samples" / manifest["images"][0]["file"]).is_file()


def test_sample_help_shows_a_prompt_example(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert '--prompts "a photo of {} on the moon"' in capsys.readouterr().out


def test_every_concept_gets_its_own_prompts():
    summary = {"placeholder_token": "<new1>+<new2>", "concepts": [
        {"name": "cat", "placeholder_token": "<new1>", "class_noun": "cat", "instance_data_dir": "a"},
        {"name": "chair", "placeholder_token": "<new2>", "class_noun": None, "instance_data_dir": "b"}]}
    entries = concept_prompts(["a photo of {}", "a plain photo"], run_concepts(summary))
    assert [(e["prompt"], e["concept"]) for e in entries] == [
        ("a photo of <new1> cat", "cat"), ("a plain photo", None), ("a photo of <new2>", "chair")]
    # Summaries written before "concepts" existed: one concept per token, never the literal "<new1>+<new2>".
    old = run_concepts({"placeholder_token": "<new1>+<new2>", "instance_data_dir": "a"})
    assert [c["placeholder_token"] for c in old] == ["<new1>", "<new2>"]
    assert [c["instance_data_dir"] for c in old] == ["a", None]


def test_evaluate_on_the_world_model_is_offline_and_scores_each_concept_against_its_own_images(tmp_path):
    from lightning_custom.data.images import load_rgb_image
    from lightning_custom.inference.evaluate import concept_images, evaluate_run, world_identity
    from lightning_custom.synthetic.world_encoder import WorldEncoder

    star, cat = embedded_concept_path("striped-star"), embedded_concept_path("cat-toy")
    run = write_run(tmp_path / "run", pretrained_model_name_or_path="embedded", placeholder_token="star+square",
                    concepts=[
                        {"name": "star", "placeholder_token": "star", "class_noun": None, "instance_data_dir": star},
                        {"name": "other", "placeholder_token": "square", "class_noun": None,
                         "instance_data_dir": cat}])
    result = main(["evaluate", str(run), "--images_per_prompt", "2", "--num_inference_steps", "2",
                   "--device", "cpu"])
    assert result["metrics"] == ["identity"] and result["clip_model"] is None and result["dino_model"] is None
    # the world model's own prompts, once per concept
    assert [p["prompt"] for p in result["per_prompt"]] == [
        "a photo of a star", "a photo of a star on a grey background",
        "a photo of a square", "a photo of a square on a grey background"]
    by_name = {c["name"]: c for c in result["per_concept"]}
    assert by_name["star"]["concept_images"] == len(list(Path(star).iterdir()))
    assert by_name["other"]["concept_images"] == len(list(Path(cat).iterdir()))
    # the second concept's samples are compared with the second concept's images, not the first's
    encoder = WorldEncoder.load()
    samples = Path(result["samples_dir"])
    other = [r for r in result["per_image"] if r["concept"] == "other"]
    expected = world_identity(encoder, [load_rgb_image(samples / r["file"]) for r in other],
                              concept_images(run, {}, cat))
    assert [r["identity"] for r in other] == pytest.approx(expected.per_image)
    assert by_name["other"]["identity"] == pytest.approx(expected.mean)
    assert result["identity"] == pytest.approx(sum(r["identity"] for r in result["per_image"]) / 8)
    with pytest.raises(UserInputError, match="--concept_dir: the run has 2 concepts"):
        evaluate_run(run, concept_dir=star, device="cpu")


def test_before_after_runs_on_an_sdxl_model(tmp_path):
    run = write_run(tmp_path / "run", pretrained_model_name_or_path="embedded:tiny-sdxl", placeholder_token="toy",
                    instance_data_dir=embedded_concept_path("cat-toy"))
    result = main(["before_after", str(run), "--before_word", "toy", "--prompts", "a photo of a {}",
                   "--images_per_prompt", "1", "--num_inference_steps", "2"])
    assert math.isfinite(result["identity_before"]) and math.isfinite(result["identity_after"])
    # no artifacts: "after" is the base model with the same prompt and seed, so both sides match
    assert result["identity_after"] == pytest.approx(result["identity_before"], abs=1e-5)
    assert Path(result["grid"]).is_file()


def test_before_after_of_a_dreambooth_style_run_uses_the_class_noun(tmp_path, tiny_sd):
    run = write_run(tmp_path / "run", pretrained_model_name_or_path=tiny_sd, placeholder_token="sks", class_noun="cat",
                    instance_data_dir=embedded_concept_path("cat-toy"))
    result = main(["before_after", str(run), "--prompts", "a photo of a {}", "--images_per_prompt", "1",
                   "--num_inference_steps", "1"])
    assert result["prompts"] == {"before": ["a photo of a cat"], "after": ["a photo of a sks cat"]}


def test_space_separated_numbers_become_one_list():
    assert numeric_list_arguments(replay) == {"windows", "thresholds"}
    args = ["runs/a", "--windows", "20", "40", "--thresholds", "0.1", "--min_steps", "3", "runs/b"]
    assert join_space_separated(args, {"windows", "thresholds"}) == [
        "runs/a", "--windows", "[20, 40]", "--thresholds", "[0.1]", "--min_steps", "3", "runs/b"]
    assert join_space_separated(["--windows", "[20,40]"], {"windows"}) == ["--windows", "[20,40]"]


def test_replay_takes_space_separated_windows_and_says_when_one_is_rounded_up(tmp_path, capsys):
    losses = [1.0 / (1 + 0.3 * i) for i in range(1, 31)]
    run = write_run(tmp_path / "run", dvar_history=[[10 * i, v] for i, v in enumerate(losses, 1)],
                    dvar_eval_every_n_steps=10, max_steps=300, stop_step=300, stopped_by="max_steps")
    out = main(["replay", str(run), "--windows", "20", "25", "--thresholds", "0.1", "0.2",
                "--output_dir", str(tmp_path / "replay")])
    assert out["result"].windows == [20, 25] and out["result"].thresholds == [0.1, 0.2]
    printed = capsys.readouterr().out
    assert "| 20 |" in printed and "| 25 (-> 30) |" in printed
    assert "not a multiple of the evaluation period (10 steps) is rounded up" in printed


def test_class_image_generation_shows_progress_and_a_log_line(tmp_path, caplog, capsys):
    import logging

    from PIL import Image

    from lightning_custom.data.class_images import ClassImageRequest, ensure_class_images

    class FakePipeline:
        def __call__(self, prompt, **kwargs):
            return type("Out", (), {"images": [Image.new("RGB", (8, 8), "red") for _ in prompt]})()

    request = ClassImageRequest(model="m", prompt="a photo of a dog", count=6, resolution=8)
    with caplog.at_level(logging.INFO, logger="lightning_custom"):
        files = ensure_class_images(request, tmp_path, FakePipeline, batch_size=4)
    assert len(files) == 6
    messages = [r.getMessage() for r in caplog.records]
    assert any("generating 6 class images of 'a photo of a dog' (0 cached)" in m for m in messages)
    assert any("6 class images generated in" in m for m in messages)
    assert "class images:   0%|          | 0/6" in capsys.readouterr().err  # a progress bar


def test_summary_records_prior_preservation_and_every_concept():
    from types import SimpleNamespace

    from lightning_custom.data.concepts_list import ConceptSpec
    from lightning_custom.runs.provenance import run_provenance

    star = embedded_concept_path("striped-star")
    datamodule = SimpleNamespace(
        hparams={"with_prior_preservation": True}, eval_seed=5, seed=6, class_noun=None, templates=["a {}"],
        class_prompts=["a photo of a cat", "a photo of a chair"], instance_data_dir=star,
        concept_specs=[ConceptSpec("cat", star, "<new1>", "cat"), ConceptSpec("chair", "embedded:cat-toy", "<new2>")])
    module = SimpleNamespace(hparams={"pretrained_model_name_or_path": "embedded:tiny-sd", "seed": 4})
    fields = run_provenance(SimpleNamespace(datamodule=datamodule), module)
    assert fields["with_prior_preservation"] is True
    assert fields["class_prompts"] == ["a photo of a cat", "a photo of a chair"]
    assert [(c["name"], c["placeholder_token"], c["class_noun"]) for c in fields["concepts"]] == [
        ("cat", "<new1>", "cat"), ("chair", "<new2>", None)]
    assert fields["concepts"][1]["instance_data_dir"] == embedded_concept_path("cat-toy")  # the alias, resolved
    assert fields["seeds"]["model"] == 4 and fields["seeds"]["eval"] == 5 and fields["seeds"]["data"] == 6


def test_pipelines_get_the_safety_checker_keywords_only_where_they_take_them(capfd):
    from lightning_custom.inference.pipelines import load_pipeline

    sdxl = load_pipeline(embedded_model_path("tiny-sdxl"))
    sd = load_pipeline(embedded_model_path("tiny-sd"))
    assert type(sdxl).__name__ == "StableDiffusionXLPipeline" and sd.safety_checker is None
    assert "are not expected by" not in capfd.readouterr().err  # diffusers' warning about safety_checker on SDXL


UNTRAINED_RUNS = {
    "interrupted": ({"stopped_by": "interrupted", "resume_checkpoint": "RUN/checkpoints/interrupted.ckpt"},
                    "(stopped_by: interrupted; resume it with --ckpt_path RUN/checkpoints/interrupted.ckpt)"),
    "non_finite": ({"stopped_by": "non_finite",
                    "artifacts_withheld": "No artifact was written: the run stopped on a non-finite value."},
                   "(stopped_by: non_finite; No artifact was written: the run stopped on a non-finite value)"),
}


@pytest.mark.parametrize("command", ["sample", "evaluate", "before_after"])
@pytest.mark.parametrize("stopped_by", sorted(UNTRAINED_RUNS))
def test_commands_on_a_run_without_trained_artifacts_end_in_one_line(tmp_path, tiny_sd, capsys, command,
                                                                     stopped_by):
    fields, reason = UNTRAINED_RUNS[stopped_by]
    run = write_run(tmp_path / "run", method="TextualInversion", pretrained_model_name_or_path=tiny_sd,
                    placeholder_token="<s>", class_noun="star", **fields)
    with pytest.raises(SystemExit) as stopped:
        main([command, str(run), "--device", "cpu"] if command != "before_after" else [command, str(run)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: run_dir: {run} has no trained artifacts {reason}"]
    assert not (run / "samples").exists() and not (run / "before_after.png").exists()


def test_a_prompt_without_the_concept_is_warned_in_one_line(capsys):
    from lightning_custom.commands.generate import _read_prompts

    assert _read_prompts(["a photo of {}", "a red car"], None) == ["a photo of {}", "a red car"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'a red car' has no '{}'" in err[0]


def test_gather_prints_where_it_wrote(tmp_path, capsys):
    run = write_run(tmp_path / "run", method="TextualInversion", placeholder_token="<s>", stopped_by="dvar",
                    stop_step=70)
    main(["gather", str(run), "--output", str(tmp_path / "table.csv")])
    assert f"wrote {tmp_path / 'table.csv'} (1 runs)" in capsys.readouterr().out
    assert (tmp_path / "table.csv").is_file()


@pytest.mark.parametrize(("summary", "config_initializer", "expected"), [
    # DreamBooth with the unused default initializer in its config: "a photo of a sks star" -> "a photo of a star"
    ({"placeholder_token": "sks", "class_noun": "star"}, "object", "star"),
    ({"placeholder_token": "<sks>", "concepts": [{"placeholder_token": "<sks>", "class_noun": "star"}]}, "star",
     "star"),
    # Textual Inversion has no class noun: the word its token started from
    ({"placeholder_token": "<striped-star>", "class_noun": None}, "star", "star"),
])
def test_before_after_compares_with_the_after_prompt_without_its_identifier(tmp_path, summary, config_initializer,
                                                                          expected):
    """Before: a DreamBooth run compared "a photo of a object" (its unused default initializer) with "a photo of a
    sks star", which inflated the printed gain."""
    from lightning_custom.commands.quickstart import _initializer_token

    run = write_run(tmp_path / "run", **summary)
    (run / "config.yaml").write_text(f"model:\n  init_args:\n    initializer_token: {config_initializer}\n")
    assert _initializer_token(run) == expected


def test_grid_labels_keep_whole_words_and_visible_spaces():
    """Before: 'a photoofa' (the font's 2 px space) and '<striped-' / 'star>' split across lines at 128 px."""
    from lightning_custom.inference.grid import label_font, word_gap, wrap_label

    font = label_font()
    text = "a photo of a <striped-star> on a grey background"
    lines = wrap_label(text, font, 120)
    assert len(lines) > 1 and all(lines)
    assert [w for line in lines for w in line] == text.split()  # every word, whole, in order
    assert word_gap(font) >= 4
    for line in lines[:-1]:  # each line is as full as it can be: the next word would not fit
        width = sum(font.getlength(w) for w in line) + word_gap(font) * (len(line) - 1)
        assert width <= 120


def test_the_report_writes_loss_ticks_as_plain_numbers():
    from lightning_custom.dvar.report import report_figure

    summary = {"dvar_history": [[5, 0.1081234], [10, 0.1081233], [15, 0.1081232]], "train_loss_history": [[1, 0.1]],
               "dvar_window": 10, "dvar_threshold": 0.15, "stop_step": 15, "stopped_by": "max_steps"}
    fig = report_figure(summary)
    fig.canvas.draw()
    assert fig.axes[1].yaxis.get_major_formatter().get_offset() == ""


def test_sampling_defaults_come_from_the_model_folder(tmp_path, tiny_sd):
    """Before: the embedded model sampled with its training DDPM scheduler at guidance 7.5 (olive fragments); its
    folder now recommends DDIM, guidance 4, 25 steps. A model without the file keeps its own."""
    from lightning_custom.families.components import resolve_model_path
    from lightning_custom.inference.pipelines import recommended_sampling

    assert recommended_sampling(resolve_model_path("embedded")) == {
        "scheduler": "ddim", "guidance_scale": 4.0, "num_inference_steps": 25}
    assert recommended_sampling(tiny_sd) == {}
    for model, expected in (("embedded", ("DDIMScheduler", 4.0, 25)), (tiny_sd, ("DDPMScheduler", 7.5, 50))):
        run = write_run(tmp_path / Path(model).name, pretrained_model_name_or_path=model, placeholder_token="star",
                        class_noun=None)
        manifest = main(["sample", str(run), "--prompts", "a photo of a {}", "--images_per_prompt", "1",
                         "--device", "cpu"] + (["--num_inference_steps", "2"] if model == tiny_sd else []))
        steps = 2 if model == tiny_sd else expected[2]
        assert (manifest["scheduler"], manifest["guidance_scale"], manifest["num_inference_steps"]) == (
            expected[0], expected[1], steps)
