"""High-resolution tiling: the tile grid, the blending (against an explicit weighted average),
seamless maps, exactness for one tile, defects on tile borders, references from tiles, bounded
memory, and the CLI options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalyclip import AnomalyCLIP, InvalidInputError
from anomalyclip.cli import main
from anomalyclip.data.synthetic import make_synthetic_arrays
from anomalyclip.tiling import TileStitcher, axis_weights, tile_grid

from .conftest import IMAGE_A, IMAGE_B, OFFICIAL_PTH, TINY_CLIP_REF

SIZE = 112


@pytest.fixture(scope="module")
def tiling_model(tiny_clip):
    return AnomalyCLIP.from_official_checkpoint(
        OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu", image_size=SIZE
    )


@pytest.fixture
def model(tiling_model):
    tiling_model.clear_references()
    yield tiling_model
    tiling_model.clear_references()


@pytest.fixture
def neutral_model(tiny_clip):
    """Identical normal and anomalous text features: the zero-shot map is the constant 0.5 per
    layer, so the map is the reference map plus a constant (isolates the reference part)."""
    model = AnomalyCLIP.from_official_checkpoint(
        OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu", image_size=224
    )
    with torch.inference_mode():
        text = model.encode_text()
    neutral = text[:1].expand(2, -1).clone()
    model.encode_text = lambda: neutral  # instance attribute: this model only
    return model


# ----------------------------------------------------------------------------- the grid and weights
@pytest.mark.parametrize("height,width", [(1000, 700), (513, 1025), (300, 256), (256, 256)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_tiles_cover_the_image_with_the_requested_overlap(height, width, overlap):
    grid = tile_grid(height, width, 256, overlap)
    covered = np.zeros((height, width), dtype=int)
    for tile in grid.tiles:
        assert tile.height == min(256, height) and tile.width == min(256, width)
        assert 0 <= tile.top and tile.top + tile.height <= height and 0 <= tile.left and tile.left + tile.width <= width
        covered[tile.top : tile.top + tile.height, tile.left : tile.left + tile.width] += 1
    assert covered.min() >= 1
    for starts, tile in ((grid.tops, grid.tile_height), (grid.lefts, grid.tile_width)):
        steps = np.diff(starts)
        assert len(steps) == 0 or steps.max() <= tile * (1 - overlap) + 1  # at least the overlap asked for


def test_a_tile_as_large_as_the_image_is_the_image():
    grid = tile_grid(300, 400, 400, 0.25)
    assert len(grid) == 1 and grid.tiles[0].height == 300 and grid.tiles[0].width == 400


def test_axis_weights_are_positive_ramps_that_sum_to_one_on_overlaps():
    starts, tile = (0, 150, 300), 200
    weights = axis_weights(starts, tile)
    total = torch.zeros(500, dtype=torch.float64)
    for start, w in zip(starts, weights):
        assert float(w.min()) > 0
        total[start : start + tile] += w.double()
    assert torch.allclose(total, torch.ones(500, dtype=torch.float64), atol=1e-6)
    assert float(weights[0][0]) == 1.0 and float(weights[-1][-1]) == 1.0  # no ramp at the image border


def test_stitcher_is_the_explicit_weighted_average():
    grid = tile_grid(230, 310, 100, 0.3)
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(t.height, t.width, generator=g) for t in grid.tiles]
    stitcher = TileStitcher(grid)
    for tile, m in zip(grid.tiles, maps):
        stitcher.add(tile, m)
    got = stitcher.result().numpy()

    rows, cols = axis_weights(grid.tops, grid.tile_height), axis_weights(grid.lefts, grid.tile_width)
    num = np.zeros((230, 310))
    den = np.zeros((230, 310))
    for tile, m in zip(grid.tiles, maps):
        w = np.outer(rows[tile.row].numpy(), cols[tile.col].numpy())
        num[tile.top : tile.top + tile.height, tile.left : tile.left + tile.width] += w * m.numpy()
        den[tile.top : tile.top + tile.height, tile.left : tile.left + tile.width] += w
    assert np.abs(got - num / den).max() < 1e-6


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.6])
def test_constant_tile_maps_give_a_constant_map(overlap):
    grid = tile_grid(517, 389, 128, overlap)
    stitcher = TileStitcher(grid)
    for tile in grid.tiles:
        stitcher.add(tile, torch.full((tile.height, tile.width), 0.7312))
    out = stitcher.result()
    assert float((out - 0.7312).abs().max()) < 1e-6


# ----------------------------------------------------------------------------- through the model
def test_tile_as_large_as_the_image_gives_exactly_the_untiled_result(model):
    for references in (False, True):
        if references:
            model.add_references(IMAGE_B)
        plain = model.predict(IMAGE_A)
        for tile_size in (400, 4000):
            tiled = model.predict(IMAGE_A, tile_size=tile_size)
            assert tiled.score == plain.score
            assert np.array_equal(tiled.anomaly_map, plain.anomaly_map)


def test_constant_image_gives_a_constant_map(neutral_model):
    """With neutral prompts and the same constant image as reference, every tile's map is
    constant; the blended map is constant across every tile border."""
    image = np.full((500, 700, 3), 128, dtype=np.uint8)
    neutral_model.add_references(image, tile_size=224, tile_overlap=0.25)
    result = neutral_model.predict(image, tile_size=224, tile_overlap=0.25)
    assert result.anomaly_map.shape == (500, 700)
    assert float(np.ptp(result.anomaly_map)) < 1e-5
    assert result.anomaly_map.mean() == pytest.approx(0.5, abs=1e-4)  # neutral: p_anomalous = 0.5


def test_blended_zero_shot_map_of_a_constant_image_has_no_seams(model):
    """Every tile of a constant image has the same zero-shot map M; blending may only interpolate
    between tiles: values stay within M's range, and a step between neighbouring pixels is at most
    M's own largest step plus M's range spread over the narrowest overlap (a hard seam would jump
    by up to M's full range in one pixel)."""
    image = np.full((480, 480, 3), 90, dtype=np.uint8)
    tile_size, overlap = 200, 0.25
    result = model.predict(image, tile_size=tile_size, tile_overlap=overlap)
    with torch.inference_mode():
        out = model(model.preprocess(Image.fromarray(np.full((tile_size, tile_size, 3), 90, np.uint8))))
    tile_map = F.interpolate(out.anomaly_maps[None], size=(tile_size, tile_size), mode="bilinear", align_corners=False)[0, 0]
    tile_map = tile_map.numpy()
    lo, hi = float(tile_map.min()), float(tile_map.max())
    amap = result.anomaly_map
    assert lo - 1e-6 <= float(amap.min()) and float(amap.max()) <= hi + 1e-6
    grid = tile_grid(480, 480, tile_size, overlap)
    narrowest = min(a + tile_size - b for a, b in zip(grid.tops, grid.tops[1:]))
    step = max(np.abs(np.diff(tile_map, axis=0)).max(), np.abs(np.diff(tile_map, axis=1)).max())
    bound = step + (hi - lo) / narrowest + 1e-6
    assert np.abs(np.diff(amap, axis=0)).max() <= bound
    assert np.abs(np.diff(amap, axis=1)).max() <= bound
    assert (hi - lo) > 5 * bound  # the bound is tight enough to catch a seam


def _defect_on_tile_corner(size: int = 448) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two normal textures (references) and a third with a blob defect centred on the point where
    the tiles of 224 px meet; returns (references, test image, defect mask)."""
    normal, _, _ = make_synthetic_arrays(3, 0, (size, size), 0, class_name="texture_a")
    anomalous, masks, _ = make_synthetic_arrays(0, 2, (size, size), 0, class_name="texture_a")
    blob, mask = anomalous[1], masks[1] > 0
    ys, xs = np.nonzero(mask)
    shift = (size // 2 - int(ys.mean()), size // 2 - int(xs.mean()))
    mask = np.roll(mask, shift, axis=(0, 1))
    test = normal[0].copy()
    test[mask] = np.roll(blob, shift, axis=(0, 1))[mask]
    return normal[1:], test, mask


@pytest.mark.parametrize("overlap", [0.0, 0.25])
def test_a_defect_on_a_tile_border_is_found(neutral_model, overlap):
    references, test, mask = _defect_on_tile_corner()
    neutral_model.add_references(list(references), tile_size=224, tile_overlap=overlap)
    result = neutral_model.predict(test, tile_size=224, tile_overlap=overlap)
    assert roc_auc_score(mask.ravel(), result.anomaly_map.ravel()) > 0.95
    assert mask.ravel()[np.argmax(result.anomaly_map)]  # the peak is on the defect


def test_references_are_taken_from_tiles(model):
    image = make_synthetic_arrays(1, 0, (300, 500), 0)[0][0]
    model.add_references(image, tile_size=200, tile_overlap=0.25)
    grid = tile_grid(300, 500, 200, 0.25)
    assert len(grid) == 6
    assert model.num_references == 1 and len(model.references) == len(grid) * (SIZE // 14) ** 2
    assert model.references.tile_size == 200 and model.references.tile_overlap == 0.25
    # The memory holds the tokens of exactly those tiles.
    crops = [image[t.top : t.top + t.height, t.left : t.left + t.width] for t in grid.tiles]
    with torch.inference_mode():
        tokens = model.encode_image(model.preprocess(crops)).patch_features[24][:, 1:]
    expected = F.normalize(tokens.float(), dim=-1).reshape(-1, tokens.shape[-1])
    assert torch.allclose(model.references.memories[24], expected, atol=1e-6)


def test_tiled_score_is_the_largest_tile_score(model):
    image = np.asarray(Image.open(IMAGE_A).convert("RGB"))
    grid = tile_grid(300, 400, 160, 0.25)
    crops = [image[t.top : t.top + t.height, t.left : t.left + t.width] for t in grid.tiles]
    with torch.inference_mode():
        out = model(model.preprocess(crops))
    assert model.predict(image, tile_size=160).score == pytest.approx(float(out.scores.max()), abs=1e-6)
    model.add_references(IMAGE_B, tile_size=160)
    with torch.inference_mode():
        out = model(model.preprocess(crops))
    expected = (float(out.zero_shot_scores.max()) + float(out.reference_scores.max())) / 2
    assert model.predict(image, tile_size=160).score == pytest.approx(expected, abs=1e-6)


def _peak_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def test_tiled_memory_stays_bounded(model):
    """64 tiles of a 2400 x 2400 image: the peak resident memory grows by a few full-size float
    maps (accumulator, result), not by one per tile (64 x 22 MiB)."""
    image = np.full((2400, 2400, 3), 100, dtype=np.uint8)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident set
    except OSError:
        pytest.skip("cannot reset the peak-RSS counter on this system")
    before = _peak_rss_mib()
    if before is None:
        pytest.skip("no /proc/self/status on this system")
    result = model.predict(image, tile_size=300, tile_overlap=0.0, batch_size=16)
    grown = _peak_rss_mib() - before
    full_map_mib = 2400 * 2400 * 4 / 2**20  # 22 MiB
    assert result.anomaly_map.shape == (2400, 2400)
    assert grown < 8 * full_map_mib, grown


def test_tiling_errors(model):
    with pytest.raises(InvalidInputError, match="tile_size"):
        model.predict(IMAGE_A, tile_size=10)
    with pytest.raises(InvalidInputError, match="tile_overlap"):
        model.predict(IMAGE_A, tile_size=200, tile_overlap=1.0)
    with pytest.raises(InvalidInputError, match="tile_overlap"):
        model.add_references(IMAGE_B, tile_size=200, tile_overlap=-0.1)


def test_cli_predict_with_tiles_and_references(model, tmp_path):
    saved = model.save_pretrained(tmp_path / "model")
    normal = tmp_path / "normal.png"
    Image.fromarray(make_synthetic_arrays(1, 0, (300, 400), 1)[0][0]).save(normal)
    out = tmp_path / "out"
    args = ["-q", "predict", str(IMAGE_A), "--model", str(saved), "--out", str(out)]
    assert main([*args, "--references", str(normal), "--tile-size", "200", "--tile-overlap", "0.3"]) == 0
    row = json.loads((out / "scores.json").read_text())[0]
    model.add_references(normal, tile_size=200, tile_overlap=0.3)
    assert row["score"] == pytest.approx(model.predict(IMAGE_A, tile_size=200, tile_overlap=0.3).score, abs=1e-6)
    overlay = Image.open(out / row["overlay"])
    assert overlay.size == (400, 300)


def test_cli_predict_with_tiles_applies_a_profile_calibrated_with_the_same_tiles(model, tmp_path):
    """A profile calibrated with tiles (overlap left at its default) is applied by `predict
    --tile-size` without `--tile-overlap`: the CLI's columns come from the same resolution as
    predict's (both take overlap 0.25), so labels and the flagged-pixel fraction are written."""
    import csv

    images = tmp_path / "images"
    images.mkdir()
    for source in (IMAGE_A, IMAGE_B):
        (images / source.name).write_bytes(source.read_bytes())
    profile = tmp_path / "profile"
    try:  # the module's shared model: its thresholds are reset after
        model.calibrate([IMAGE_B], quantile=0.9, tile_size=200)
        model.save_pretrained(profile)
    finally:
        model.thresholds = None
    out = tmp_path / "out"
    assert main(["-q", "predict", str(images), "--model", str(profile), "--tile-size", "200", "--out", str(out), "--no-overlays"]) == 0
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = AnomalyCLIP.from_pretrained(profile, device="cpu").predict([images / "image_a.png", images / "image_b.png"], tile_size=200)
    assert [int(r["label"]) for r in rows] == [int(e.label) for e in expected]
    assert [float(r["anomalous_fraction"]) for r in rows] == pytest.approx([float(e.mask.mean()) for e in expected], abs=1e-6)
