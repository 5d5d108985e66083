"""Preprocessing equals timm's evaluation transform exactly; every image mode becomes RGB."""

import os

import numpy as np
import pytest
from PIL import Image

import npconvnext
from npconvnext.preprocessing import DataConfig, open_image, preprocess

DATA = os.path.join(os.path.dirname(__file__), "data")
PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg"]


def timm_transform(config: DataConfig):
    import timm.data

    return timm.data.create_transform(input_size=(3, *config.input_size), crop_pct=config.crop_pct,
                                      interpolation=config.interpolation, mean=config.mean, std=config.std)


@pytest.mark.parametrize("tag", ["convnext_tiny.fb_in1k", "convnext_tiny.in12k_ft_in1k",
                                 "convnext_tiny.fb_in22k_ft_in1k_384", "convnext_nano.r384_in12k_ft_in1k"])
@pytest.mark.parametrize("photo", PHOTOS)
def test_photos_equal_timm_exactly(tag, photo):
    config = npconvnext.data_config(tag)
    image = open_image(os.path.join(DATA, photo))
    expected = timm_transform(config)(image).numpy()
    np.testing.assert_array_equal(preprocess(image, config), expected)


@pytest.mark.parametrize("size", [(225, 224), (224, 225), (257, 301), (3, 500), (500, 3), (100, 80), (1, 1)])
@pytest.mark.parametrize("crop_pct, input_size", [(0.875, 224), (0.95, 224), (1.0, 288)])
def test_odd_sizes_equal_timm_exactly(size, crop_pct, input_size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    config = DataConfig(input_size=(input_size, input_size), crop_pct=crop_pct)
    np.testing.assert_array_equal(preprocess(image, config), timm_transform(config)(image).numpy())


def test_conventions_layout_bgr_and_0_255():
    image = open_image(os.path.join(DATA, "chelsea.png"))
    nchw = preprocess(image)
    assert nchw.shape == (3, 224, 224) and nchw.dtype == np.float32
    np.testing.assert_array_equal(preprocess(image, DataConfig(layout="NHWC")), nchw.transpose(1, 2, 0))
    np.testing.assert_array_equal(preprocess(image, DataConfig(channel_order="BGR")), nchw[::-1])
    openvino = preprocess(image, DataConfig(scale="255", channel_order="BGR"))
    np.testing.assert_allclose(openvino, nchw[::-1], atol=1e-5)  # the same numbers by another route
    np.testing.assert_allclose(np.float32(255) * np.asarray(npconvnext.preprocessing.IMAGENET_STD),
                               [58.395, 57.12, 57.375], rtol=1e-6)


def _modes():
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    palette = base.convert("P")
    with_transparency = palette.copy()
    with_transparency.info["transparency"] = 0
    grey16 = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)  # mode I;16
    return {"L": base.convert("L"), "LA": base.convert("LA"), "P": palette, "P+transparency": with_transparency,
            "RGBA": base.convert("RGBA"), "CMYK": base.convert("CMYK"), "I;16": grey16, "RGB": base}


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_mode_becomes_rgb(mode, tmp_path):
    image = _modes()[mode]
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    image.save(path)
    x = preprocess(path, DataConfig(input_size=(32, 32)))
    assert x.shape == (3, 32, 32) and np.isfinite(x).all()
    if mode == "I;16":  # 16-bit grey scaled to 8 bits: the same as its 8-bit source
        expected = preprocess(Image.fromarray(np.asarray(_modes()["RGB"])[..., 0], "L"), DataConfig(input_size=(32, 32)))
        np.testing.assert_array_equal(x, expected)


def test_exif_orientation_is_opt_in(tmp_path):
    image = Image.fromarray(np.zeros((20, 60, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    image.save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (60, 20)
    assert open_image(tmp_path / "r.jpg", exif_transpose=True).size == (20, 60)


def test_unreadable_and_bomb_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="bad.png: cannot read image"):
        open_image(tmp_path / "bad.png")
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="big.png: refused as a possible decompression bomb"):
        open_image(tmp_path / "big.png")


def test_labels():
    labels = npconvnext.imagenet_labels()
    assert len(labels) == 1000  # names repeat ("crane" the bird and the machine); wnids do not
    assert len({c.wnid for c in npconvnext.imagenet_classes()}) == 1000
    assert labels[281] == "tabby, tabby cat" and labels[967] == "espresso"
    assert npconvnext.imagenet_classes()[0].wnid == "n01440764"
