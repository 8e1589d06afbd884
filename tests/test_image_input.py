"""Concept images as users have them: grayscale, palette, 16-bit, CMYK, transparent, rotated, tiny, broken."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_custom.data.concept import ConceptDataModule, check_concept_images
from lightning_custom.data.images import convert_to_rgb, load_rgb_image, parse_background
from lightning_custom.errors import UserInputError
from tests.conftest import data_kwargs


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_grayscale_and_bilevel_become_gray_rgb(tmp_path):
    Image.fromarray(np.array([[0, 7, 200, 255]], dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    Image.fromarray(np.array([[0, 7, 200, 255]], dtype=np.uint8), mode="L").convert("1").save(tmp_path / "bw.png")
    gray = pixels(load_rgb_image(tmp_path / "gray.png"))
    assert gray[0, :, 0].tolist() == [0, 7, 200, 255] and (gray == gray[..., :1]).all()
    assert pixels(load_rgb_image(tmp_path / "bw.png"))[0, :, 1].tolist() == [0, 0, 255, 255]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    # I;16 on disk (PNG 16-bit grayscale): 65535 -> 255, 32896 (= 128 * 257) -> 128, 1000 -> round(3.89) = 4.
    values = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    out = pixels(load_rgb_image(tmp_path / "deep.png"))
    assert out[0, :, 0].tolist() == [0, 1, 4, 128, 255]
    # Pillow's 32-bit integer mode holding 16-bit data is scaled the same way.
    image_i = Image.fromarray(values.astype(np.int32), mode="I")
    rgb, conversion = convert_to_rgb(image_i)
    assert conversion == "16-bit" and pixels(rgb)[0, :, 2].tolist() == [0, 1, 4, 128, 255]


def test_palette_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6)
    image = Image.new("P", (2, 1))
    image.putpalette(palette)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "opaque.png")
    image.save(tmp_path / "clear.png", transparency=0)  # palette entry 0 (red) is fully transparent
    assert pixels(load_rgb_image(tmp_path / "opaque.png")).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    assert pixels(load_rgb_image(tmp_path / "clear.png")).tolist() == [[[255, 255, 255], [0, 0, 255]]]
    assert pixels(load_rgb_image(tmp_path / "clear.png", (0, 0, 0))).tolist() == [[[0, 0, 0], [0, 0, 255]]]


def test_rgba_and_la_are_composited_onto_the_background(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [200, 100, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    white = pixels(load_rgb_image(tmp_path / "alpha.png"))
    assert white[0, :2].tolist() == [[255, 255, 255], [10, 20, 30]]
    # Half transparent: 128/255 of the colour over white, within Pillow's rounding.
    expected = np.array([200, 100, 0]) * 128 / 255 + 255 * 127 / 255
    assert np.abs(white[0, 2] - expected).max() <= 1
    custom = pixels(load_rgb_image(tmp_path / "alpha.png", parse_background("#102030")))
    assert custom[0, 0].tolist() == [16, 32, 48]
    Image.fromarray(np.array([[[90, 0], [90, 255]]], dtype=np.uint8), mode="LA").save(tmp_path / "la.png")
    assert pixels(load_rgb_image(tmp_path / "la.png", (0, 0, 0))).tolist() == [[[0, 0, 0], [90, 90, 90]]]


def test_cmyk_jpeg_converts(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "print.jpg", quality=100)
    out = pixels(load_rgb_image(tmp_path / "print.jpg"))
    assert np.abs(out.astype(int) - [255, 0, 255]).max() <= 2  # magenta, within JPEG's rounding


def test_exif_rotation_is_applied(tmp_path):
    array = np.zeros((2, 3, 3), dtype=np.uint8)
    array[0, 0] = [255, 0, 0]  # top-left red in the stored (landscape) pixels
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "phone.png", exif=exif)
    out = pixels(load_rgb_image(tmp_path / "phone.png"))
    assert out.shape == (3, 2, 3)  # displayed as portrait
    assert out[0, 1].tolist() == [255, 0, 0]  # the stored top-left corner is now top-right


def test_alpha_background_option_and_one_log_line_per_folder(tmp_path, caplog):
    for i in range(3):
        Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(tmp_path / f"{i}.png")
    with caplog.at_level(logging.INFO, logger="lightning_custom"):
        dm = ConceptDataModule(**data_kwargs(str(tmp_path), alpha_background="black"))
    lines = [r.getMessage() for r in caplog.records if "transparency" in r.getMessage()]
    assert len(lines) == 1 and "3 of 3 images" in lines[0] and "#000000" in lines[0]
    assert dm.concept_images[0].images[0].getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(UserInputError, match=r"^--data.alpha_background: 'blurple' is not a colour"):
        ConceptDataModule(**data_kwargs(str(tmp_path), alpha_background="blurple"))


def test_small_images_warn_naming_the_file(tmp_path, caplog):
    Image.new("RGB", (64, 64)).save(tmp_path / "fine.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (40, 7)).save(tmp_path / "strip.png")
    with caplog.at_level(logging.WARNING, logger="lightning_custom"):
        ConceptDataModule(**data_kwargs(str(tmp_path), resolution=16))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned  # one line for the folder, naming each small file (issue 27, item 13)
    assert "dot.png 1x1" in warned[0] and "strip.png 40x7" in warned[0] and "fine.png" not in warned[0]
    assert "2 of 3 concept images" in warned[0] and "\n" not in warned[0]


def truncated_png(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


@pytest.mark.parametrize("name,make,needle", [
    ("broken.png", lambda p: p.write_bytes(b"\x89PNG not really"), "cannot be read as an image"),
    ("cut.png", truncated_png, "cannot be read as an image (truncated)"),
])
def test_unreadable_files_still_fail_in_one_line(tmp_path, name, make, needle):
    Image.new("RGB", (32, 32)).save(tmp_path / "good.png")
    make(tmp_path / name)
    for attempt in (lambda: ConceptDataModule(**data_kwargs(str(tmp_path))),
                    lambda: check_concept_images({"instance_data_dir": str(tmp_path)})):
        with pytest.raises(UserInputError) as excinfo:
            attempt()
        message = str(excinfo.value)
        assert "\n" not in message and name in message and needle in message, message


def test_check_concept_images_covers_concept_lists_and_empty_folders(tmp_path):
    good, empty = tmp_path / "good", tmp_path / "empty"
    good.mkdir(), empty.mkdir()
    Image.new("LA", (32, 32)).save(good / "a.png")
    check_concept_images({"instance_data_dir": str(good)})  # converted, not refused
    with pytest.raises(UserInputError, match=r"^--data.instance_data_dir: folder .*empty holds no images"):
        check_concept_images({"instance_data_dir": str(empty)})
    concepts = [{"instance_data_dir": str(good), "placeholder_token": "<a>"},
                {"instance_data_dir": str(empty), "placeholder_token": "<b>"}]
    with pytest.raises(UserInputError, match=r"^--data.concepts\[1\].instance_data_dir"):
        check_concept_images({"concepts": concepts})


def test_cli_reads_the_images_before_it_loads_the_model(tmp_path, capsys):
    """A bad folder is reported even when the model could not be loaded at all: the images are read first."""
    from lightning_custom.cli import main

    (tmp_path / "empty").mkdir()
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", str(root / "configs" / "quickstart.yaml"),
              "--model.init_args.pretrained_model_name_or_path", str(tmp_path / "no-such-model"),
              "--data.init_args.instance_data_dir", str(tmp_path / "empty"),
              "--trainer.default_root_dir", str(tmp_path / "run")])
    assert excinfo.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --data.instance_data_dir: folder") and "holds no images" in error, error


def test_stray_files_are_skipped_in_one_line_and_a_folder_without_images_is_refused(tmp_path, caplog):
    """Before: one notes.txt refused the whole folder (while .DS_Store and sub-folders were skipped)."""
    import logging

    from lightning_custom.data.images import list_image_files

    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "IMG_0001.heic").write_bytes(b"not decoded here")
    with caplog.at_level(logging.WARNING, logger="lightning_custom"):
        files = list_image_files(tmp_path)
        list_image_files(tmp_path)  # listed again (the CLI checks, then the data module reads): said once
    assert [f.name for f in files] == ["a.png", "b.png", "c.png"]
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 1 and "\n" not in skipped[0]
    assert "IMG_0001.heic" in skipped[0] and "notes.txt" in skipped[0] and "pillow-heif" in skipped[0]
    only_text = tmp_path / "only_text"
    only_text.mkdir()
    (only_text / "notes.txt").write_text("hello")
    with pytest.raises(UserInputError, match="holds no images"):
        list_image_files(only_text)


def test_a_single_image_folder_is_warned_about(tmp_path, caplog):
    import logging

    from lightning_custom.data.images import list_image_files

    Image.new("RGB", (32, 32)).save(tmp_path / "one.png")
    with caplog.at_level(logging.WARNING, logger="lightning_custom"):
        list_image_files(tmp_path)
    assert any("holds one image; 3-5 images" in r.getMessage() for r in caplog.records)


def test_small_images_are_one_line_and_a_resolution_far_above_the_model_is_refused(tmp_path, caplog):
    """Before: 2048 px on the 32 px embedded model warned once per image and sat at step 0 for minutes."""
    import logging

    from lightning_custom.runtime.ranges import check_resolution

    for k in range(5):
        Image.new("RGB", (32, 32)).save(tmp_path / f"{k}.png")
    with caplog.at_level(logging.WARNING, logger="lightning_custom"):
        ConceptDataModule(**data_kwargs(str(tmp_path), resolution=256))
    small = [r.getMessage() for r in caplog.records if "far smaller" in r.getMessage()]
    assert len(small) == 1 and "5 of 5 concept images" in small[0]
    with pytest.raises(UserInputError, match=r"^--data.resolution: 2048 px is 64x the 32 px that embedded was made"):
        check_resolution(2048, 32, "embedded")
    check_resolution(128, 32, "embedded")  # up to 4x is allowed (a warning above 2x)
    check_resolution(512, None, "a model whose config says no size")
