"""Preprocessing equals timm's evaluation transform exactly; every image mode becomes RGB; every
image that cannot be used is refused with an ImageError naming the file."""

import json
import os
import threading
import time
from functools import lru_cache

import numpy as np
import pytest
from PIL import Image

import npconvnext
from npconvnext.errors import CheckpointError, ImageError, InputError
from npconvnext.formats.data_config import data_config_for_weights
from npconvnext.preprocessing import DataConfig, from_timm_cfg, open_image, preprocess

from tests.support import DATA
PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg"]


def timm_transform(config: DataConfig):
    import timm.data

    return timm.data.create_transform(input_size=(3, *config.input_size), crop_pct=config.crop_pct,
                                      crop_mode=config.crop_mode, interpolation=config.interpolation,
                                      mean=config.mean, std=config.std)


@lru_cache(maxsize=None)
def timm_own_transform(tag: str):
    """timm's eval transform as timm resolves it for the model `tag` (not from our registry)."""
    import timm
    import timm.data

    model = timm.create_model(tag, pretrained=False)
    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))


# center at 0.875 and 0.95, center at 384 with crop_pct 1.0, and two squash fine-tunes
@pytest.mark.parametrize("tag", ["convnext_atto.d2_in1k", "convnext_tiny.in12k_ft_in1k",
                                 "convnext_nano.r384_in12k_ft_in1k", "convnext_tiny.fb_in22k_ft_in1k_384",
                                 "convnextv2_nano.fcmae_ft_in22k_in1k_384"])
@pytest.mark.parametrize("photo", PHOTOS)
def test_photos_equal_timm_exactly(tag, photo):
    config = npconvnext.data_config(tag)
    image = open_image(os.path.join(DATA, photo))
    expected = timm_own_transform(tag)(image).numpy()
    np.testing.assert_array_equal(preprocess(image, config), expected)
    np.testing.assert_array_equal(preprocess(os.path.join(DATA, photo), config), expected)


@pytest.mark.parametrize("size", [(225, 224), (224, 225), (257, 301), (3, 500), (500, 3), (100, 80), (1, 1)])
@pytest.mark.parametrize("crop_pct, input_size, crop_mode", [
    (0.875, (224, 224), "center"), (0.95, (224, 224), "center"), (1.0, (288, 288), "center"),
    (1.0, (96, 128), "center"), (1.0, (384, 384), "squash"), (0.875, (96, 128), "squash")])
def test_odd_sizes_equal_timm_exactly(size, crop_pct, input_size, crop_mode):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    config = DataConfig(input_size=input_size, crop_pct=crop_pct, crop_mode=crop_mode)
    np.testing.assert_array_equal(preprocess(image, config), timm_transform(config)(image).numpy())


@pytest.mark.parametrize("setting, message", [
    (dict(crop_mode="border"), "crop_mode must be one of center, squash"),
    (dict(interpolation="lanczos9"), "interpolation must be one of"),
    (dict(scale="percent"), "scale must be 'unit' or '255'"),
    (dict(channel_order="GBR"), "channel_order must be 'RGB' or 'BGR'"),
    (dict(layout="CHWN"), "layout must be 'NCHW' or 'NHWC'"),
])
def test_unknown_preprocessing_settings_are_refused(setting, message):
    with pytest.raises(InputError, match=message):
        preprocess(np.zeros((8, 8, 3), np.uint8), DataConfig(**setting))


@pytest.mark.parametrize("cfg, message", [(dict(input_size=(1, 224, 224)), "is not \\[3, H, W\\]"),
                                          (dict(crop_pct=1.5), "unusable preprocessing")])
def test_unusable_timm_configs_are_refused(cfg, message):
    with pytest.raises(InputError, match=message):
        from_timm_cfg(cfg)


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
    """mode -> (image, file suffix, the RGB pixels it must become), each expectation built in NumPy
    from the source values, not by the conversion under test."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    alpha = Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8))  # dropped, not composited
    base = Image.fromarray(rgb)
    grey = base.convert("L")
    grey3 = np.repeat(np.asarray(grey)[..., None], 3, axis=2)
    palette = base.convert("P")
    colours = np.asarray(palette.getpalette(), np.uint8).reshape(-1, 3)[np.asarray(palette)]  # (H, W, 3)
    with_transparency = palette.copy()
    with_transparency.info["transparency"] = int(np.asarray(palette)[0, 0])
    red3 = np.repeat(rgb[..., :1], 3, axis=2)
    extremes = np.where(rgb[..., 1] < 50, -5.0, np.where(rgb[..., 1] > 200, 300.0, rgb[..., 1])).astype(np.float32)
    clipped3 = np.repeat(np.clip(extremes, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return {
        "RGB": (base, "png", rgb),
        "L": (grey, "png", grey3),
        "LA": (Image.merge("LA", (grey, alpha)), "png", grey3),
        "RGBA": (Image.merge("RGBA", (*base.split(), alpha)), "png", rgb),
        "P": (palette, "png", colours),
        "P+transparency": (with_transparency, "png", colours),
        "CMYK": (base.convert("CMYK"), "tif", rgb),  # K = 0: C, M, Y are 255 - R, G, B exactly
        "I;16": (Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "png", red3),  # 16-bit v*257 -> v
        "I": (Image.fromarray(rgb[..., 0].astype(np.int32)), "tif", red3),  # 32-bit grey within 0-255: as is
        "F": (Image.fromarray(extremes), "tif", clipped3),  # float grey clipped to [0, 255]
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_mode_becomes_rgb(mode, tmp_path):
    image, suffix, expected = _modes()[mode]
    path = tmp_path / f"x.{suffix}"
    image.save(path)
    assert Image.open(path).mode == image.mode  # the file holds the mode under test
    rgb = open_image(path)
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb), expected)
    config = DataConfig(input_size=(32, 32))
    np.testing.assert_array_equal(preprocess(path, config), preprocess(expected, config))


def test_exif_orientation_is_opt_in(tmp_path):
    image = Image.fromarray(np.zeros((20, 60, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    image.save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (60, 20)
    assert open_image(tmp_path / "r.jpg", exif_transpose=True).size == (20, 60)


def test_every_read_failure_is_an_image_error_naming_the_file(tmp_path, monkeypatch):
    from PIL import ImageFile

    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "big.png")
    whole = (tmp_path / "big.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "folder.png").mkdir()
    for name, message in [("bad.png", "cannot read image"), ("empty.jpg", "cannot read image"),
                          ("truncated.png", "cannot read image"), ("missing.png", "no such file"),
                          ("folder.png", "is a directory")]:
        with pytest.raises(ImageError, match=f"{name}: {message}"):
            open_image(tmp_path / name)
        with pytest.raises(ImageError, match=f"{name}: {message}"):
            preprocess(tmp_path / name)
    with pytest.raises(ImageError) as caught:
        open_image(tmp_path / "bad.png")
    assert "name=" not in str(caught.value)  # the same text on every run, not a file descriptor's number
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="big.png: refused as a possible decompression bomb"):
        open_image(tmp_path / "big.png")
    monkeypatch.undo()

    def out_of_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)
    with pytest.raises(ImageError, match="big.png: too large to decode"):
        open_image(tmp_path / "big.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="os.mkfifo: POSIX only")
def test_fifo_and_device_are_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            open_image(fifo)
        except Exception as exc:  # noqa: BLE001 - the type is checked below
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=5)
    if reader.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the blocked reader
        pytest.fail("open_image blocked on a FIFO")
    assert isinstance(outcome[0], ImageError) and "pipe.png: is not a regular file" in str(outcome[0])
    if os.path.exists("/dev/zero"):  # a device that never ends
        with pytest.raises(ImageError, match="/dev/zero: is not a regular file"):
            open_image("/dev/zero")


def test_extreme_aspect_ratio_is_refused_before_resizing(tmp_path, monkeypatch):
    from PIL import ImageFile

    Image.fromarray(np.zeros((20000, 1, 3), np.uint8)).save(tmp_path / "tall.png")  # a few hundred bytes
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"tall.png: a 1x20000 image would be resized to 256x5120000, "
                                         r"past the limit .*max_resized_pixels"):
        preprocess(tmp_path / "tall.png")
    assert time.perf_counter() - start < 2
    with monkeypatch.context() as patch:  # refused from the header: never decoded
        patch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
        with pytest.raises(ImageError, match="tall.png: a 1x20000 image would be resized"):
            preprocess(tmp_path / "tall.png", DataConfig(exif_transpose=True))
    # the limit is the user's to set: a 300:2 image at input 32 is resized to 5400x36 = 194400 pixels
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (2, 300, 3), dtype=np.uint8))
    config = DataConfig(input_size=(32, 32))
    with pytest.raises(ImageError, match="image: a 300x2 image would be resized to 5400x36"):
        preprocess(wide, DataConfig(input_size=(32, 32), max_resized_pixels=194399))
    np.testing.assert_array_equal(preprocess(wide, config), timm_transform(config)(wide).numpy())


def test_weights_carry_their_preprocessing(tmp_path):
    """A timm fine-tune saved as timm saves it for the hub: config.json beside the weights."""
    import timm
    import timm.data
    from safetensors.numpy import save_file
    from timm.models import save_for_hf

    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    folder = tmp_path / "ft384"
    save_for_hf(model, folder, safe_serialization=True,
                data_config={"input_size": (3, 384, 384), "crop_pct": 1.0, "crop_mode": "squash"})
    config = data_config_for_weights(folder / "model.safetensors")
    assert config == DataConfig(input_size=(384, 384), crop_pct=1.0, crop_mode="squash")
    pretrained_cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg))
    image = open_image(os.path.join(DATA, "rocket.jpg"))
    np.testing.assert_array_equal(preprocess(image, config), transform(image).numpy())

    # npconvnext's own metadata in the file wins over a config.json beside it
    own = {"input_size": [3, 288, 288], "crop_pct": 0.95, "crop_mode": "center", "interpolation": "bilinear"}
    save_file({"x": np.zeros(1, np.float32)}, folder / "mine.safetensors", metadata={"data_config": json.dumps(own)})
    assert data_config_for_weights(folder / "mine.safetensors") == DataConfig(
        input_size=(288, 288), crop_pct=0.95, interpolation="bilinear")

    alone = tmp_path / "alone"
    alone.mkdir()
    save_file({"x": np.zeros(1, np.float32)}, alone / "model.safetensors")
    assert data_config_for_weights(alone / "model.safetensors") is None  # nothing says
    (alone / "config.json").write_text(json.dumps({"model_type": "convnext"}))  # transformers' own
    assert data_config_for_weights(alone / "model.safetensors") is None
    (alone / "config.json").write_text('{"pretrained_cfg": {"input_size": [3, 384]}}')
    with pytest.raises(CheckpointError, match="config.json: input_size"):
        data_config_for_weights(alone / "model.safetensors")
    (alone / "config.json").write_text('{"pretrained_cfg": ')
    with pytest.raises(CheckpointError, match="config.json: cannot read"):
        data_config_for_weights(alone / "model.safetensors")


def test_labels():
    labels = npconvnext.imagenet_labels()
    assert len(labels) == 1000  # names repeat ("crane" the bird and the machine); wnids do not
    assert len({c.wnid for c in npconvnext.imagenet_classes()}) == 1000
    assert labels[281] == "tabby, tabby cat" and labels[967] == "espresso"
    assert npconvnext.imagenet_classes()[0].wnid == "n01440764"
