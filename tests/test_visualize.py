"""Tests of anomalyclip.visualize: colormap tables, overlay geometry and blending, outlines, saving."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyclip.errors import ImageLoadError, InvalidInputError
from anomalyclip.visualize import (
    COLORMAPS,
    apply_colormap,
    colormap_table,
    overlay,
    save_overlay,
    side_by_side,
)

# Entries of cv2.applyColorMap(np.arange(256, dtype=np.uint8), cv2.COLORMAP_JET), BGR turned to RGB,
# read from OpenCV 4.14 and 5.0.
OPENCV_JET_RGB = {
    0: (0, 0, 128),
    1: (0, 0, 132),
    31: (0, 0, 252),
    32: (0, 0, 255),
    33: (0, 4, 255),
    64: (0, 128, 255),
    95: (0, 252, 255),
    96: (2, 255, 254),
    127: (126, 255, 130),
    128: (130, 255, 126),
    159: (254, 255, 1),
    160: (255, 252, 0),
    191: (255, 128, 0),
    192: (255, 124, 0),
    223: (255, 0, 0),
    224: (252, 0, 0),
    254: (132, 0, 0),
    255: (128, 0, 0),
}


def _round_half_even(q: Fraction) -> int:
    floor = q.numerator // q.denominator
    rest = q - floor
    return floor + int(rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2 == 1))


def _jet_exact(i: int) -> tuple[int, ...]:
    """Octave jet at x = i/255 in exact arithmetic, times 255, rounded half to even."""
    x = Fraction(i, 255)
    out = []
    for c in (Fraction(3, 2), Fraction(1, 2), Fraction(-1, 2)):  # red, green, blue
        v = min(max(min(4 * x - c, 3 + c - 4 * x), Fraction(0)), Fraction(1))
        out.append(_round_half_even(255 * v))
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# Colormap tables
# ------------------------------------------------------------------------------------------------


def test_jet_matches_opencv_published_entries() -> None:
    jet = colormap_table("jet")
    assert jet.shape == (256, 3) and jet.dtype == np.uint8
    for i, rgb in OPENCV_JET_RGB.items():
        assert tuple(jet[i]) == rgb, i


def test_jet_equals_exact_control_points_except_float32_tie() -> None:
    # Every non-saturated value is an exact k + 0.5 tie; OpenCV's float32 interp1 breaks the one
    # at i = 159 (blue) downwards, all others round half to even.
    jet = colormap_table("jet")
    for i in range(256):
        expected = _jet_exact(i)
        if i == 159:
            assert expected == (254, 255, 2)
            expected = (254, 255, 1)
        assert tuple(int(v) for v in jet[i]) == expected, i


def test_jet_segments_are_monotonic() -> None:
    # Piecewise linear with knees at x = 1/8, 3/8, 5/8, 7/8 (i ~ 32, 96, 159, 223).
    r, g, b = colormap_table("jet").astype(int).T
    assert np.all(np.diff(b[:33]) > 0) and np.all(b[32:96] == 255)
    assert np.all(np.diff(b[95:161]) < 0) and np.all(b[160:] == 0)
    assert np.all(g[:33] == 0) and np.all(np.diff(g[32:97]) > 0) and np.all(g[96:160] == 255)
    assert np.all(np.diff(g[159:224]) < 0) and np.all(g[223:] == 0)
    assert np.all(r[:96] == 0) and np.all(np.diff(r[95:161]) > 0) and np.all(r[160:224] == 255)
    assert np.all(np.diff(r[223:]) < 0)


def _inferno_poly(t: np.ndarray) -> np.ndarray:
    # Degree-6 fit to matplotlib's inferno by mattz (shadertoy WlfXRN, CC0), independent of the table.
    c = [
        (0.0002189403691192265, 0.001651004631001012, -0.01948089843709184),
        (0.1065134194856116, 0.5639564367884091, 3.932712388889277),
        (11.60249308247187, -3.972853965665698, -15.9423941062914),
        (-41.70399613139459, 17.43639888205313, 44.35414519872813),
        (77.162935699427, -33.40235894210092, -81.80730925738993),
        (-71.31942824499214, 32.62606426397723, 73.20951985803202),
        (25.13112622477341, -12.24266895238567, -23.07032500287172),
    ]
    out = np.asarray(c[6])[None, :] * np.ones((t.size, 1))
    for k in range(5, -1, -1):
        out = np.asarray(c[k]) + t[:, None] * out
    return np.clip(out, 0, 1) * 255


def _turbo_poly(t: np.ndarray) -> np.ndarray:
    # Google's polynomial approximation of Turbo (Ruofei Du, Apache-2.0), independent of the table.
    coefs = [
        (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943),
        (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604),
        (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973),
    ]
    powers = np.stack([t**k for k in range(6)], axis=1)
    return np.clip(powers @ np.asarray(coefs).T, 0, 1) * 255


def test_inferno_and_turbo_tables() -> None:
    inferno, turbo = colormap_table("inferno"), colormap_table("turbo")
    assert tuple(inferno[0]) == (0, 0, 4) and tuple(inferno[255]) == (252, 255, 164)
    assert tuple(turbo[0]) == (48, 18, 59) and tuple(turbo[255]) == (122, 4, 3)
    t = np.arange(256) / 255
    assert np.abs(inferno - _inferno_poly(t)).max() < 10
    turbo_err = np.abs(turbo - _turbo_poly(t))
    assert turbo_err.mean() < 8 and turbo_err[1:].max() < 30  # the fit is loose at the dark end
    # Inferno: luminance-ordered, dark to bright.
    luma = inferno.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luma) > 0)


def test_gray_table_and_tables_are_copies() -> None:
    gray = colormap_table("gray")
    assert np.array_equal(gray, np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1))
    gray[0] = 7
    assert tuple(colormap_table("gray")[0]) == (0, 0, 0)
    assert set(COLORMAPS) == {"jet", "inferno", "turbo", "gray"}


# ------------------------------------------------------------------------------------------------
# apply_colormap
# ------------------------------------------------------------------------------------------------


def test_apply_colormap_quantizes_by_truncation_like_official_code() -> None:
    values = np.array([[0.0, 0.5, 1.0, 0.999]], dtype=np.float32)
    jet = colormap_table("jet")
    out = apply_colormap(values)
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    expected_idx = np.uint8(255 * ((values - values.min()) / (values.max() - values.min())))
    assert list(expected_idx[0]) == [0, 127, 255, 254]
    assert np.array_equal(out[0], jet[expected_idx[0]])


def test_apply_colormap_vmin_vmax_clip_and_constant() -> None:
    gray = apply_colormap(np.array([[-1.0, 0.0, 2.0, 4.0, 9.0]]), vmin=0.0, vmax=4.0, cmap="gray")
    assert list(gray[0, :, 0]) == [0, 0, 127, 255, 255]
    constant = apply_colormap(np.full((3, 4), 0.7), cmap="jet")
    assert np.all(constant == np.array([0, 0, 128], dtype=np.uint8))
    # Explicit vmin == vmax: at or below -> first colour, above -> last colour.
    step = apply_colormap(np.array([[0.1, 0.5, 0.9]]), vmin=0.5, vmax=0.5, cmap="gray")
    assert list(step[0, :, 0]) == [0, 0, 255]


def test_apply_colormap_accepts_torch_and_squeezes_leading_axes() -> None:
    torch = pytest.importorskip("torch")
    values = torch.linspace(0, 1, 12).reshape(1, 1, 3, 4)
    expected = apply_colormap(values.numpy()[0, 0])
    assert np.array_equal(apply_colormap(values), expected)
    assert apply_colormap(values.to(torch.float16), cmap="Turbo").shape == (3, 4, 3)


# ------------------------------------------------------------------------------------------------
# overlay
# ------------------------------------------------------------------------------------------------


def _image(height: int = 30, width: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("map_shape", [(7, 9), (30, 40), (100, 120)])
def test_overlay_is_at_image_size(map_shape: tuple[int, int]) -> None:
    amap = np.random.default_rng(1).random(map_shape)
    out = overlay(_image(), amap)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (40, 30)


def test_overlay_resizes_map_bilinearly_with_original_range() -> None:
    amap = np.random.default_rng(2).random((6, 8)).astype(np.float32)
    out = np.asarray(overlay(_image(), amap, alpha=1.0))
    resized = np.asarray(Image.fromarray(amap, mode="F").resize((40, 30), Image.BILINEAR))
    expected = apply_colormap(resized, vmin=float(amap.min()), vmax=float(amap.max()))
    assert np.array_equal(out, expected)


def test_overlay_blend_by_hand() -> None:
    image = np.array([[[10, 20, 30], [200, 100, 51]]], dtype=np.uint8)  # 1 x 2
    amap = np.array([[0.0, 1.0]])  # -> jet[0] = (0, 0, 128), jet[255] = (128, 0, 0)
    half = np.asarray(overlay(image, amap, alpha=0.5))
    # (10+0)/2, (20+0)/2, (30+128)/2 | (200+128)/2, 100/2, 51/2 = 25.5 -> 26 (halves round up)
    assert half.tolist() == [[[5, 10, 79], [164, 50, 26]]]
    quarter = np.asarray(overlay(image, amap, alpha=0.25))
    # 0.75*10 = 7.5 -> 8, 0.75*20 = 15, 0.75*30 + 0.25*128 = 54.5 -> 55 | 150+32, 75, 38.25 -> 38
    assert quarter.tolist() == [[[8, 15, 55], [182, 75, 38]]]
    assert np.array_equal(np.asarray(overlay(image, amap, alpha=0.0)), image)
    assert np.asarray(overlay(image, amap, alpha=1.0)).tolist() == [[[0, 0, 128], [128, 0, 0]]]


def test_overlay_image_inputs(tmp_path: Path) -> None:
    rgb = _image(5, 6)
    rgba = np.concatenate([rgb, np.full((5, 6, 1), 9, np.uint8)], axis=2)
    amap = np.zeros((5, 6))
    ref = np.asarray(overlay(rgb, amap, alpha=0.0))
    assert np.array_equal(ref, rgb)
    assert np.array_equal(np.asarray(overlay(rgba, amap, alpha=0.0)), rgb)
    assert np.array_equal(np.asarray(overlay(Image.fromarray(rgb), amap, alpha=0.0)), rgb)
    path = tmp_path / "img.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    assert np.array_equal(np.asarray(overlay(path, amap, alpha=0.0)), rgb)
    assert np.array_equal(np.asarray(overlay(str(path), amap, alpha=0.0)), rgb)
    gray = rgb[:, :, 0]
    assert np.array_equal(np.asarray(overlay(gray, amap, alpha=0.0)), np.stack([gray] * 3, axis=2))
    assert np.array_equal(np.asarray(overlay(gray[:, :, None], amap, alpha=0.0)), np.stack([gray] * 3, axis=2))


def test_overlay_accepts_torch_map() -> None:
    torch = pytest.importorskip("torch")
    amap = np.random.default_rng(3).random((1, 6, 8)).astype(np.float32)
    expected = np.asarray(overlay(_image(), amap[0]))
    assert np.array_equal(np.asarray(overlay(_image(), torch.from_numpy(amap))), expected)


def test_mask_outline_pixels() -> None:
    image = np.zeros((7, 7, 3), np.uint8)
    amap = np.zeros((7, 7))
    mask = np.zeros((7, 7), bool)
    mask[2:5, 2:5] = True
    out = np.asarray(overlay(image, amap, alpha=0.0, mask=mask, contour_color=(255, 0, 0), contour_width=1))
    red = np.all(out == (255, 0, 0), axis=2)
    expected = mask.copy()
    expected[3, 3] = False  # interior pixel stays untouched
    assert np.array_equal(red, expected)
    assert np.all(out[~red] == 0)
    # Default width 2 covers this whole 3x3 square; 0/1 integer masks work too.
    out2 = np.asarray(overlay(image, amap, alpha=0.0, mask=mask.astype(np.uint8)))
    assert np.array_equal(np.all(out2 == 255, axis=2), mask)


def test_mask_outline_touching_border_and_at_map_size() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    small = np.zeros((4, 4), bool)
    small[:2, :2] = True  # -> rows/cols 0..3 of the 8x8 image, touching the top-left corner
    out = np.asarray(overlay(image, np.zeros((4, 4)), alpha=0.0, mask=small, contour_width=1))
    white = np.all(out == 255, axis=2)
    expected = np.zeros((8, 8), bool)
    expected[:4, :4] = True
    expected[1:3, 1:3] = False  # the image edge counts as background: the region is closed
    assert np.array_equal(white, expected)


def test_side_by_side() -> None:
    a = Image.new("RGB", (5, 4), (1, 2, 3))
    b = Image.new("L", (3, 6), 200)
    out = side_by_side([a, b], gap=2)
    assert out.size == (10, 6) and out.mode == "RGB"
    px = np.asarray(out)
    assert tuple(px[0, 0]) == (1, 2, 3) and tuple(px[5, 0]) == (255, 255, 255)
    assert tuple(px[0, 5]) == (255, 255, 255) and tuple(px[5, 9]) == (200, 200, 200)
    with pytest.raises(InvalidInputError):
        side_by_side([])


# ------------------------------------------------------------------------------------------------
# save_overlay
# ------------------------------------------------------------------------------------------------


def test_save_overlay_creates_parents_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.png"
    image, amap = _image(), np.random.default_rng(4).random((10, 10))
    returned = save_overlay(target, image, amap, alpha=0.4)
    assert returned == target and target.is_file()
    assert np.array_equal(np.asarray(Image.open(target)), np.asarray(overlay(image, amap, alpha=0.4)))
    assert os.listdir(target.parent) == ["out.png"]
    # Replacing an existing file.
    save_overlay(target, image, amap, cmap="inferno")
    assert np.array_equal(np.asarray(Image.open(target)), np.asarray(overlay(image, amap, cmap="inferno")))
    assert os.listdir(target.parent) == ["out.png"]


def test_save_overlay_failure_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"old")

    def broken_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        fp.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_overlay(target, _image(), np.zeros((3, 3)))
    assert os.listdir(tmp_path) == ["out.png"] and target.read_bytes() == b"old"


def test_save_overlay_requires_png_suffix(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"\.png"):
        save_overlay(tmp_path / "out.jpg", _image(), np.zeros((3, 3)))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.5", None, True, float("nan")])
def test_bad_alpha(alpha: object) -> None:
    with pytest.raises(InvalidInputError, match="alpha"):
        overlay(_image(), np.zeros((3, 3)), alpha=alpha)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_map(bad: float) -> None:
    amap = np.zeros((4, 4))
    amap[1, 2] = bad
    with pytest.raises(InvalidInputError, match="non-finite"):
        overlay(_image(), amap)
    with pytest.raises(InvalidInputError, match="non-finite"):
        apply_colormap(amap)


@pytest.mark.parametrize("shape", [(5,), (2, 4, 4), (4, 4, 3), (0, 4)])
def test_wrong_map_dims(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError, match=re_escape_shape(shape)):
        overlay(_image(), np.zeros(shape))


def re_escape_shape(shape: tuple[int, ...]) -> str:
    return str(shape).replace("(", r"\(").replace(")", r"\)")


def test_unknown_cmap_lists_available() -> None:
    with pytest.raises(InvalidInputError, match="jet, inferno, turbo, gray"):
        overlay(_image(), np.zeros((3, 3)), cmap="viridis")
    with pytest.raises(InvalidInputError, match="viridis"):
        apply_colormap(np.zeros((3, 3)), cmap="viridis")
    with pytest.raises(InvalidInputError):
        colormap_table("nope")


def test_bad_images(tmp_path: Path) -> None:
    amap = np.zeros((3, 3))
    with pytest.raises(InvalidInputError, match="uint8"):
        overlay(np.zeros((4, 4, 3), np.int64), amap)
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        overlay(np.full((4, 4, 3), 2.0, np.float32), amap)
    # float images in [0, 1] (what load_image gives for 16-bit files) show as their 8-bit rounding
    shades = np.linspace(0, 1, 48, dtype=np.float32).reshape(4, 4, 3)
    assert np.array_equal(
        np.asarray(overlay(shades, amap, alpha=0.0)), np.asarray(overlay(np.round(shades * 255).astype(np.uint8), amap, alpha=0.0))
    )
    with pytest.raises(InvalidInputError, match=r"\(4, 4, 2\)"):
        overlay(np.zeros((4, 4, 2), np.uint8), amap)
    with pytest.raises(InvalidInputError, match="file path"):
        overlay(12, amap)  # type: ignore[arg-type]
    with pytest.raises(ImageLoadError, match="not found"):
        overlay(tmp_path / "missing.png", amap)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="junk.png"):
        overlay(tmp_path / "junk.png", amap)


def test_bad_masks_and_options() -> None:
    image, amap = _image(), np.zeros((6, 8))
    with pytest.raises(InvalidInputError, match=r"\(5, 5\)"):
        overlay(image, amap, mask=np.zeros((5, 5), bool))
    with pytest.raises(InvalidInputError, match="only 0 and 1"):
        overlay(image, amap, mask=np.full((6, 8), 255, np.uint8))
    with pytest.raises(InvalidInputError, match="contour_color"):
        overlay(image, amap, contour_color=(256, 0, 0))
    with pytest.raises(InvalidInputError, match="contour_color"):
        overlay(image, amap, contour_color=(1, 2))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="contour_width"):
        overlay(image, amap, contour_width=0)
    with pytest.raises(InvalidInputError, match="swap"):
        overlay(image, amap, vmin=1.0, vmax=0.0)
    with pytest.raises(InvalidInputError, match="vmin"):
        apply_colormap(amap, vmin=float("nan"))
    with pytest.raises(InvalidInputError, match="real numbers"):
        apply_colormap(np.array([["a", "b"]]))
