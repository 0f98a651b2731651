"""Image files people have: 16-bit and float files, EXIF orientation, palette and other modes, the
pixel limit, and the options that read them (anomalyclip.decoding, ImageReadOptions).

Each kind of file has a twin (tests/fixtures_images.py): the same picture as an 8-bit, RGB or
upright file. Decoding is checked against numpy references; scores against the twin's through
``model.predict``, the ONNX runtime's preprocessing and the Ray actor's decoding.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyclip import AnomalyCLIP, ImageLoadError, ImageReadOptions, InvalidInputError
from anomalyclip.errors import MissingDependencyError
from anomalyclip.preprocessing import load_image, prepare_image, preprocess_array, preprocess_image

from .conftest import OFFICIAL_PTH, TINY_CLIP_REF
from .fixtures_images import SIZE, TWINS, UNREADABLE, make_input_folder, rgb8, write_png16

S = 224  # a small processing size keeps the tiny CLIP fast (the 16-bit bound is measured there)
SCORE_BOUND = {"exact": 1e-5, "1e-3": 1e-3}  # the 16-bit float path against PIL's rounded 8-bit resize
MAP_BOUND = {"exact": 1e-5, "1e-3": 3e-2}  # map values lie in [0, 1]; measured at most 1.1e-2


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("tifffile")
    return make_input_folder(tmp_path_factory.mktemp("inputs") / "images")


@pytest.fixture(scope="module")
def model(tiny_clip) -> AnomalyCLIP:
    return AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu", image_size=S)


@pytest.fixture(scope="module")
def results(model, folder) -> dict[str, object]:
    names = [n for n in folder if n not in UNREADABLE]
    return dict(zip(names, model.predict([folder[n] for n in names], batch_size=4)))


# ----------------------------------------------------------------------------- decoding
def test_each_file_decodes_as_its_twin(folder):
    picture = np.asarray(rgb8())
    gray = np.asarray(rgb8().convert("L"))
    for name in ("gray16.png", "gray16.tif"):
        decoded = load_image(folder[name])
        assert decoded.dtype == np.float32 and decoded.shape == (SIZE[1], SIZE[0], 1)
        np.testing.assert_array_equal(decoded[:, :, 0], gray.astype(np.float32) / 255)  # x * 257 / 65535
    rgb16 = load_image(folder["rgb16.tif"])
    assert rgb16.shape == (SIZE[1], SIZE[0], 3)
    np.testing.assert_array_equal(rgb16, picture.astype(np.float32) / 255)
    # EXIF orientation 6: stored turned; the twin is the stored pixels turned back with numpy.
    rotated = load_image(folder["rotated.jpg"])
    assert rotated.mode == "RGB" and rotated.size == SIZE
    assert np.array_equal(np.asarray(rotated), np.asarray(Image.open(folder["upright.png"])))
    stored = load_image(folder["rotated.jpg"], ImageReadOptions(exif_transpose=False))
    assert stored.size == (SIZE[1], SIZE[0])
    palette = load_image(folder["palette.png"])
    assert Image.open(folder["palette.png"]).mode == "P" and palette.mode == "RGB"
    assert np.array_equal(np.asarray(palette), np.asarray(Image.open(folder["palette_as_rgb.png"])))
    with pytest.raises(ImageLoadError, match="truncated.png.*truncated"):
        load_image(folder["truncated.png"])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillows_exif_transpose(tmp_path, orientation):
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    rgb8().save(path, exif=exif.tobytes())
    expected = ImageOps.exif_transpose(Image.open(path))
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(expected))
    gray16 = (np.asarray(rgb8().convert("L")).astype(np.uint16) * 257)
    Image.fromarray(gray16).save(tmp_path / "g.png", exif=exif.tobytes())
    turned = ImageOps.exif_transpose(Image.open(tmp_path / "g.png"))
    np.testing.assert_array_equal(load_image(tmp_path / "g.png")[:, :, 0], np.asarray(turned).astype(np.float32) / 65535)


def test_bytes_decode_like_files(folder):
    for name in ("gray16.png", "rgb16.tif", "rotated.jpg", "palette.png"):
        from_file, from_bytes = load_image(folder[name]), load_image(folder[name].read_bytes(), name=name)
        assert np.array_equal(np.asarray(from_file), np.asarray(from_bytes))
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(folder["truncated.png"].read_bytes(), name="truncated.png")


def test_modes_are_converted_before_resizing():
    """P and 1 would be resized nearest-neighbour, CMYK and YCbCr in their own space: not any more."""
    picture = rgb8()
    cases = {
        "P": picture.quantize(colors=32),
        "CMYK": picture.convert("CMYK"),
        "YCbCr": picture.convert("YCbCr"),
        "1": picture.convert("1"),
        "PA": picture.quantize(colors=32).convert("PA"),
    }
    for mode, img in cases.items():
        target = "L" if mode == "1" else "RGBA" if mode == "PA" else "RGB"
        twin = img.convert(target)
        assert np.array_equal(preprocess_array(img, S), preprocess_array(twin, S)), mode
    transparent = picture.quantize(colors=32)
    transparent.info["transparency"] = 0
    assert np.array_equal(preprocess_array(transparent, S), preprocess_array(transparent.convert("RGBA"), S))
    # the old order (resize the palette image, then convert) gives other pixels
    old = np.asarray(cases["P"].resize((S, S), Image.BICUBIC).convert("RGB"), np.float32)
    new = np.asarray(cases["P"].convert("RGB").resize((S, S), Image.BICUBIC), np.float32)
    assert np.abs(old - new).max() > 10


def test_high_bit_depth_arrays_and_pil_images_scale_by_their_range():
    gray = np.asarray(rgb8().convert("L"))
    expected = preprocess_array(gray.astype(np.float32) / 255, S)
    assert np.array_equal(preprocess_array(gray.astype(np.uint16) * 257, S), expected)
    assert np.array_equal(preprocess_array(Image.fromarray(gray.astype(np.uint16) * 257), S), expected)  # I;16
    assert np.array_equal(preprocess_array(Image.fromarray(gray.astype(np.float32) / 255, "F"), S), expected)
    big = gray.astype(np.uint32) * 16843009  # 8-bit x (2**32 - 1) / 255
    np.testing.assert_allclose(preprocess_array(big, S), expected, atol=1e-5)


def test_bit_depth_and_intensity_range(tmp_path):
    gray = np.asarray(rgb8().convert("L")).astype(np.float64)
    mono12 = np.round(gray * 4095 / 255).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(mono12).save(tmp_path / "mono12.png")
    decoded = load_image(tmp_path / "mono12.png", ImageReadOptions(bit_depth=12))
    np.testing.assert_array_equal(decoded[:, :, 0], (mono12 / 4095).astype(np.float32))
    full = load_image(tmp_path / "mono12.png")  # full 16-bit range: 16 times darker
    assert float(full.max()) <= 4095 / 65535 + 1e-7
    with pytest.raises(InvalidInputError, match="bit_depth=10"):
        load_image(tmp_path / "mono12.png", ImageReadOptions(bit_depth=10))

    lo, hi = float(np.percentile(mono12, 10)), float(np.percentile(mono12, 90))  # clips at both ends
    window = load_image(tmp_path / "mono12.png", ImageReadOptions(intensity_range=(lo, hi)))
    np.testing.assert_allclose(window[:, :, 0], np.clip((mono12 - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert window.min() == 0.0 and window.max() == 1.0
    # a window also reads float images outside [0, 1]; 8-bit images are never rescaled
    celsius = Image.fromarray((gray * 0.2 + 20).astype(np.float32), "F")
    with pytest.raises(InvalidInputError, match="intensity-range"):
        preprocess_array(celsius, S)
    windowed = prepare_image(celsius, ImageReadOptions(intensity_range=(20, 71))).array
    np.testing.assert_allclose(windowed[:, :, 0], (np.asarray(celsius) - 20) / 51, atol=1e-6)
    rgb = rgb8()
    untouched = prepare_image(rgb, ImageReadOptions(intensity_range=(0, 100)))
    assert untouched.pil is rgb  # 8-bit: the official path, whatever the window


def test_options_validate_and_round_trip():
    options = ImageReadOptions(exif_transpose=False, intensity_range=(10, 4000), max_image_pixels=10**9)
    assert options.intensity_range == (10.0, 4000.0)
    assert ImageReadOptions.from_dict(options.to_dict()) == options
    for bad, message in [
        (dict(bit_depth=0), "bit_depth"),
        (dict(bit_depth=12.0), "bit_depth"),
        (dict(intensity_range=(5, 5)), "lo < hi"),
        (dict(intensity_range=(0, float("nan"))), "finite"),
        (dict(bit_depth=12, intensity_range=(0, 1)), "not both"),
        (dict(max_image_pixels=-1), "max_image_pixels"),
        (dict(exif_transpose="no"), "exif_transpose"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            ImageReadOptions(**bad)
    with pytest.raises(InvalidInputError, match="Unknown image read options"):
        ImageReadOptions.from_dict({"bits": 12})


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_a_colour_png_of_16_bits_is_read_at_full_depth(tmp_path, channels):
    """Random 16-bit samples (gray + alpha, RGB, RGBA; every row filter type) come back exactly,
    though Pillow alone keeps only their high bytes."""
    samples = np.random.default_rng(channels).integers(0, 65536, (23, 31, channels), dtype=np.uint16)
    write_png16(tmp_path / "colour16.png", samples)
    decoded = load_image(tmp_path / "colour16.png")
    expected = samples.astype(np.float32) / 65535
    if channels == 2:  # gray + alpha: gray repeated as RGB, then alpha
        expected = expected[:, :, [0, 0, 0, 1]]
    assert isinstance(decoded, np.ndarray) and decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, expected)


def test_a_colour_png_of_16_bits_takes_the_bit_depth_and_scores_as_its_8_bit_twin(tmp_path, model):
    picture = np.asarray(rgb8())
    write_png16(tmp_path / "rgb16.png", picture.astype(np.uint16) * 257)
    np.testing.assert_array_equal(load_image(tmp_path / "rgb16.png"), picture.astype(np.float32) / 255)
    twelve = (picture.astype(np.uint16) * 16).astype(np.uint16)  # 12-bit data in a 16-bit container
    write_png16(tmp_path / "rgb12.png", twelve)
    np.testing.assert_allclose(load_image(tmp_path / "rgb12.png", ImageReadOptions(bit_depth=12)), twelve / 4095.0, rtol=0, atol=1e-7)
    with pytest.raises(InvalidInputError, match="do not fit bit_depth=8"):
        load_image(tmp_path / "rgb12.png", ImageReadOptions(bit_depth=8))
    Image.fromarray(picture).save(tmp_path / "rgb8.png")
    scores = [r.score for r in model.predict([tmp_path / "rgb16.png", tmp_path / "rgb8.png"])]
    assert abs(scores[0] - scores[1]) < 1e-3, scores


# ----------------------------------------------------------------------------- pixel limit
def test_pixel_limit_names_the_option_and_can_be_raised(tmp_path, monkeypatch):
    path = tmp_path / "scan.png"
    rgb8().save(path)  # 96 x 64 = 6144 pixels
    with pytest.raises(ImageLoadError, match=r"6,144 pixels, more than max_image_pixels = 6,000.*--max-image-pixels"):
        load_image(path, ImageReadOptions(max_image_pixels=6000))
    assert load_image(path, ImageReadOptions(max_image_pixels=6144)).size == SIZE
    # The default follows Pillow's limit as the program set it (here: 2 x 1000 pixels) ...
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="scan.png' is too large.*max_image_pixels = 2,000"):
        load_image(path)  # Pillow's own error, reworded
    # ... and a higher limit (or none) lifts Pillow's for this file only.
    assert load_image(path, ImageReadOptions(max_image_pixels=0)).size == SIZE
    assert load_image(path, ImageReadOptions(max_image_pixels=10_000)).size == SIZE
    assert Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a program that turned Pillow's guard off
    assert load_image(path).size == SIZE


def test_a_line_scan_above_pillows_limit_gets_the_library_error(tmp_path):
    """15,000 x 15,000 (225 M pixels): refused from the header, before any pixel is decoded."""
    path = tmp_path / "line-scan.png"
    Image.new("1", (15_000, 15_000)).save(path)  # a bilevel PNG: 28 MB in memory, small on disk
    with pytest.raises(ImageLoadError, match=r"line-scan.png. is too large: .*225000000 pixels.*max_image_pixels = 178,956,970.*--max-image-pixels"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="max_image_pixels"):
        preprocess_image(path, S)


def test_a_colour_tiff_without_tifffile_names_the_install(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(MissingDependencyError, match="pip install tifffile"):
        load_image(folder["rgb16.tif"])
    assert load_image(folder["gray16.tif"]).shape[2] == 1  # Pillow reads 16-bit grayscale itself


def test_an_oriented_colour_tiff_is_turned_like_a_jpeg(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    picture = np.asarray(rgb8()).astype(np.uint16) * 257
    stored = np.ascontiguousarray(np.rot90(picture, k=1))  # counter-clockwise, orientation 6
    tifffile.imwrite(tmp_path / "o.tif", stored, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    decoded = load_image(tmp_path / "o.tif")
    np.testing.assert_array_equal(decoded, picture.astype(np.float32) / 65535)
    assert load_image(tmp_path / "o.tif", ImageReadOptions(exif_transpose=False)).shape == (SIZE[0], SIZE[1], 3)


# ----------------------------------------------------------------------------- scores
@pytest.mark.parametrize("name", sorted(TWINS))
def test_model_scores_each_file_as_its_twin(results, name):
    twin, bound = TWINS[name]
    a, b = results[name], results[twin]
    assert a.anomaly_map.shape == b.anomaly_map.shape == (SIZE[1], SIZE[0])  # the oriented size
    assert abs(a.score - b.score) <= SCORE_BOUND[bound]
    assert np.abs(a.anomaly_map - b.anomaly_map).max() <= MAP_BOUND[bound]


def test_predict_takes_read_options_and_reports_unreadable_files(model, folder, tmp_path):
    gray = np.asarray(rgb8().convert("L")).astype(np.float64)
    mono12 = np.round(gray * 4095 / 255).astype(np.uint16)
    Image.fromarray(mono12).save(tmp_path / "mono12.png")
    as12, as8 = model.predict([tmp_path / "mono12.png", folder["gray8.png"]], read_options=ImageReadOptions(bit_depth=12))
    assert abs(as12.score - as8.score) <= 1e-3
    dark = model.predict(tmp_path / "mono12.png")  # read at 16 bits: another picture
    assert abs(dark.score - as8.score) > 1e-3
    turned = model.predict(folder["rotated.jpg"], read_options=ImageReadOptions(exif_transpose=False))
    assert turned.anomaly_map.shape == (SIZE[0], SIZE[1])
    assert model.preprocess(folder["gray16.png"], read_options=ImageReadOptions(intensity_range=(0, 65535))).shape == (1, 3, S, S)
    with pytest.raises(ImageLoadError, match="truncated.png"):
        model.predict([folder["rgb8.png"], folder["truncated.png"]])


def test_onnx_runtime_preprocesses_as_the_model(model, folder):
    """The ONNX runtime's preprocessing (no graph needed) gives the torch model's numbers exactly."""
    from anomalyclip.onnx.runtime import OnnxAnomalyCLIP

    runtime = object.__new__(OnnxAnomalyCLIP)
    runtime.metadata = types.SimpleNamespace(image_size=S, mean=model.config.mean, std=model.config.std, patch_size=14)
    names = [n for n in folder if n not in UNREADABLE]
    paths = [folder[n] for n in names]
    np.testing.assert_array_equal(runtime.preprocess(paths), model.preprocess(paths).numpy())
    options = ImageReadOptions(exif_transpose=False, intensity_range=(1000, 60000))
    np.testing.assert_array_equal(
        runtime.preprocess(paths, read_options=options), model.preprocess(paths, read_options=options).numpy()
    )


def test_ray_actor_decodes_as_the_model(model, results, folder, tmp_path):
    """The Ray actor (in this process) reads paths and bytes with the same decoder: same scores."""
    pytest.importorskip("pyarrow")
    from anomalyclip.distributed import AnomalyCLIPPredictor

    saved = model.save_pretrained(tmp_path / "model")
    actor = AnomalyCLIPPredictor(saved, device="cpu", image_size=S, maps=None, io_threads=2)
    names = sorted(folder)
    paths = np.array([str(folder[n]) for n in names], dtype=object)
    data = np.empty(len(names), dtype=object)  # encoded bytes for every other row, a path for the rest
    data[:] = [folder[n].read_bytes() if i % 2 else None for i, n in enumerate(names)]
    rows = actor({"path": paths, "bytes": data}).to_pylist()
    for name, row in zip(names, rows):
        if name in UNREADABLE:
            assert row["score"] is None and "truncated" in row["error"]
        else:
            assert row["error"] is None and abs(row["score"] - results[name].score) <= 1e-5, name
    assert {n for i, n in enumerate(names) if i % 2} & {"gray16.png", "rotated.jpg"}  # both ways cover the kinds
    arrays = np.empty(1, dtype=object)
    arrays[:] = [np.asarray(Image.open(folder["gray16.png"]))]  # what ray.data.read_images gives: uint16
    row = actor({"path": np.array(["gray16.png"], dtype=object), "image": arrays}).to_pylist()[0]
    assert abs(row["score"] - results["gray16.png"].score) <= 1e-5
