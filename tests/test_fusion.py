"""The few-shot fusion rules: the ``"standardized"`` fusion against an independent computation
(torch.cdist nearest neighbours, numpy statistics, scipy's blur), leave-one-out search, pooled
statistics, persistence and old files, and a measured acceptance check on synthetic textures."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from anomalyclip import AnomalyCLIP, InvalidInputError, load_dataset
from anomalyclip.data.datasets import draw_shots, load_reference_pool
from anomalyclip.data.synthetic import make_synthetic_arrays, make_synthetic_dataset
from anomalyclip.preprocessing import mask_array
from anomalyclip.reference_fusion import FusionStatistics, Moments, squash, unsquash
from anomalyclip.references import REFERENCES_NAME, ReferenceMemory, leave_one_out_distances
from anomalyclip.tiling import tile_grid

from .conftest import IMAGE_A, OFFICIAL_PTH, TINY_CLIP_REF

SIZE = 112
GRID = SIZE // 14
MULTI = (6, 12, 18, 24)


@pytest.fixture(scope="module")
def small_model(tiny_clip):
    return AnomalyCLIP.from_official_checkpoint(
        OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu", image_size=SIZE, feature_layers=MULTI
    )


@pytest.fixture
def model(small_model):
    small_model.clear_references()
    yield small_model
    small_model.clear_references()


def _textures(n: int, seed: int) -> list[np.ndarray]:
    return list(make_synthetic_arrays(n, 0, (96, 96), seed, class_name="texture_a")[0])


def _nn_distance(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """1 - max cos via torch.cdist on normalized float64 vectors (|a - b|^2 = 2 - 2 cos)."""
    a, b = F.normalize(queries.double(), dim=-1), F.normalize(memory.double(), dim=-1)
    return (torch.cdist(a, b) ** 2).min(dim=1).values / 2.0


def _explicit_squash(z: np.ndarray) -> np.ndarray:
    return 0.5 + z / (2.0 * (1.0 + np.abs(z)))


# ----------------------------------------------------------------------------- pure functions
def test_squash_is_monotonic_into_the_unit_interval_and_invertible():
    z = torch.tensor([-1e4, -9.0, -1.0, 0.0, 1.0, 3.0, 9.0, 100.0, 1e3])
    s = squash(z)
    assert torch.all(s > 0) and torch.all(s < 1) and torch.all(torch.diff(s) > 0)  # no float32 saturation at 1e3
    assert s[3] == 0.5 and s[4] == 0.75 and s[6] == 0.95
    for value in (0.1, 0.5, 0.75, 0.95):
        assert float(squash(torch.tensor(unsquash(value), dtype=torch.float64))) == pytest.approx(value, abs=1e-12)
    with pytest.raises(InvalidInputError, match=r"\(0, 1\)"):
        unsquash(1.0)


def test_pooled_moments_equal_the_moments_of_the_union():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, generator=g) * s + m for n, s, m in ((5, 1.0, 0.0), (300, 3.0, 2.0), (1, 1.0, -4.0))]
    pooled = Moments()
    for part in parts:
        pooled = pooled.merge(Moments.of(part))
    union = torch.cat(parts).double().numpy()
    assert pooled.count == union.size
    assert pooled.mean == pytest.approx(union.mean(), abs=1e-12)
    assert pooled.std == pytest.approx(union.std(), abs=1e-12)  # population std
    assert Moments().std > 0 and Moments.of(torch.ones(4)).std > 0  # never a division by zero
    stats = FusionStatistics(Moments.of(parts[0]), Moments.of(parts[1]), Moments.of(parts[2]), pooled)
    assert FusionStatistics.from_tensor(stats.to_tensor()) == stats
    with pytest.raises(InvalidInputError, match=r"\[4, 3\]"):
        FusionStatistics.from_tensor(torch.zeros(5, 3))


def test_leave_one_out_distances_match_explicit_loops():
    """Units of 3 images (image 1 cut in two tiles) and rows of an earlier call (-1): each unit's
    distances skip exactly its own image's rows."""
    g = torch.Generator().manual_seed(1)
    units = F.normalize(torch.randn(4, 6, 8, generator=g), dim=-1)  # [U=4, P=6, D=8]
    groups = torch.tensor([1, 0, 2, 1])  # unit -> image; image 1 has two tiles
    earlier = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    order = torch.argsort(groups, stable=True)
    rows = torch.cat([earlier, units[order].reshape(-1, 8)])
    row_groups = torch.cat([torch.full((5,), -1), groups[order].repeat_interleave(6)])
    distances, kept = leave_one_out_distances(units, groups, rows, row_groups, chunk_elements=7)
    assert kept.tolist() == [0, 1, 2, 3]
    for u in range(4):
        others = torch.cat([earlier] + [units[v] for v in range(4) if groups[v] != groups[u]])
        torch.testing.assert_close(distances[u].double(), _nn_distance(units[u], others), atol=1e-6, rtol=0)
    # An image alone in the memory has nothing to leave in: it is not measured.
    alone, kept = leave_one_out_distances(units[:1], torch.tensor([0]), units[0], torch.zeros(6, dtype=torch.long))
    assert alone.shape == (0, 6) and kept.numel() == 0


# ----------------------------------------------------------------------------- the model's fusion
def test_standardized_fusion_matches_an_independent_computation(model):
    refs = _textures(3, seed=1)
    tests = [*_textures(1, seed=2), IMAGE_A]
    model.add_references(refs, batch_size=2, fusion="standardized")  # two batches: groups across batches
    memory = model.references
    assert memory.fusion == "standardized" and model.map_range == (0.0, 1.0)
    pixel_values = model.preprocess(tests)
    with torch.inference_mode():
        out = model(pixel_values)
        ref_features = model.encode_image(model.preprocess(refs)).patch_features
        test_features = model.encode_image(pixel_values).patch_features
    model.clear_references()
    with torch.inference_mode():
        zero_refs = model(model.preprocess(refs))
        zero = model(pixel_values)

    def reference_part(features: dict, i: int, memory_images: list[int]) -> tuple[np.ndarray, float]:
        """(raw reference map [S, S], reference score) of image i of ``features`` against the
        patches of the reference images ``memory_images``, with explicit loops."""
        raw, per_layer = np.zeros((SIZE, SIZE)), []
        for layer in MULTI:
            bank = torch.cat([ref_features[layer][j, 1:] for j in memory_images])
            d = _nn_distance(features[layer][i, 1:], bank).float()
            per_layer.append(d / 2)
            raw += F.interpolate(d.reshape(1, 1, GRID, GRID), size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()
        return raw, float(torch.stack(per_layer).mean(dim=0).max())

    # The statistics over the references, the reference part leave-one-out.
    loo = [reference_part(ref_features, i, [j for j in range(3) if j != i]) for i in range(3)]
    loo_maps = np.stack([gaussian_filter(raw, 4) for raw, _ in loo])
    loo_scores = np.array([score for _, score in loo])
    z_maps, z_scores = zero_refs.anomaly_maps.numpy().astype(np.float64), zero_refs.scores.numpy().astype(np.float64)
    stats = memory.statistics
    assert stats.zero_shot_map.mean == pytest.approx(z_maps.mean(), abs=1e-5)
    assert stats.zero_shot_map.std == pytest.approx(z_maps.std(), abs=1e-5)
    assert stats.reference_map.mean == pytest.approx(loo_maps.mean(), abs=1e-5)
    assert stats.reference_map.std == pytest.approx(loo_maps.std(), abs=1e-5)
    assert stats.zero_shot_score.std == pytest.approx(z_scores.std(), abs=1e-6)
    assert stats.reference_score.mean == pytest.approx(loo_scores.mean(), abs=1e-6)
    assert stats.reference_score.std == pytest.approx(loo_scores.std(), abs=1e-6)

    for i in range(len(tests)):
        raw, score = reference_part(test_features, i, [0, 1, 2])
        reference_map = gaussian_filter(raw, 4)
        z = (zero.anomaly_maps[i].numpy() - z_maps.mean()) / z_maps.std() + (reference_map - loo_maps.mean()) / loo_maps.std()
        assert np.abs(out.anomaly_maps[i].numpy() - _explicit_squash(z / 2)).max() < 1e-5
        zs = (float(zero.scores[i]) - z_scores.mean()) / z_scores.std() + (score - loo_scores.mean()) / loo_scores.std()
        assert float(out.scores[i]) == pytest.approx(float(_explicit_squash(np.array(zs / 2))), abs=1e-5)
        # The parts stay what they were: the zero-shot output and the plain reference part.
        assert np.abs(out.reference_maps[i].numpy() - reference_map).max() < 1e-5
        assert float(out.reference_scores[i]) == pytest.approx(score, abs=1e-6)
    assert torch.equal(out.zero_shot_scores, zero.scores) and torch.equal(out.zero_shot_maps, zero.anomaly_maps)
    assert float(out.anomaly_maps.min()) > 0 and float(out.anomaly_maps.max()) < 1


def test_statistics_accumulate_over_calls(model):
    """A second call pools its statistics with the first call's (which stay as measured then)."""
    refs = _textures(4, seed=3)
    model.add_references(refs[:2])
    first = model.references.statistics
    model.add_references(refs[2:])
    both = model.references.statistics
    solo = ReferenceMemory(image_size=SIZE, feature_layers=MULTI)
    with torch.inference_mode():
        out = model._zero_shot_forward(model.preprocess(refs))
    tokens = {layer: F.normalize(out.patch_features[layer][:, 1:].float(), dim=-1) for layer in MULTI}
    solo.add({layer: t[:2].reshape(-1, 32) for layer, t in tokens.items()}, num_images=2)
    solo.statistics = first  # the state after the first call
    solo.add_units(
        {layer: t[2:] for layer, t in tokens.items()},
        groups=torch.tensor([0, 1]),
        zero_shot_scores=out.scores[2:],
        zero_shot_maps=out.anomaly_maps[2:],
        sigma=model.config.sigma,
    )
    for part in ("zero_shot_map", "reference_map", "zero_shot_score", "reference_score"):
        assert getattr(both, part).count == getattr(first, part).count * 2
        assert getattr(both, part).mean == pytest.approx(getattr(solo.statistics, part).mean, abs=1e-6)
        assert getattr(both, part).m2 == pytest.approx(getattr(solo.statistics, part).m2, rel=1e-5)


def test_one_reference_image_falls_back_to_the_sum(model, caplog):
    with caplog.at_level(logging.WARNING, logger="anomalyclip.model"):
        model.add_references(_textures(1, seed=4))
    assert "at least two reference images" in caplog.text
    assert model.references.fusion_statistics() is None and model.map_range == (0.0, 12.0)
    with torch.inference_mode():
        out = model(model.preprocess(IMAGE_A))
    torch.testing.assert_close(out.anomaly_maps, out.zero_shot_maps + out.reference_maps, atol=1e-5, rtol=0)
    model.add_references(_textures(1, seed=5))  # a second image: now standardized
    assert model.references.fusion_statistics() is not None and model.map_range == (0.0, 1.0)
    one_by_one = model.references.statistics
    model.clear_references()
    model.add_references([*_textures(1, seed=4), *_textures(1, seed=5)])  # the same, in one call
    together = model.references.statistics
    for part in ("zero_shot_map", "reference_map", "zero_shot_score", "reference_score"):
        a, b = getattr(one_by_one, part), getattr(together, part)
        assert a.count == b.count and a.mean == pytest.approx(b.mean, abs=1e-6) and a.m2 == pytest.approx(b.m2, rel=1e-5)
    with pytest.raises(InvalidInputError, match="fusion"):
        model.add_references(_textures(1, seed=6), fusion="sum")
    model.clear_references()
    with pytest.raises(InvalidInputError, match="fusion must be one of"):
        model.add_references(_textures(1, seed=6), fusion="mean")


def test_tiled_references_leave_their_whole_image_out(model):
    """Tiles of one image are one group: a single tiled image has no leave-one-out statistics
    until a second image comes; then both are measured, each against the other's tiles."""
    image = make_synthetic_arrays(2, 0, (200, 300), 0)[0]
    model.add_references(image[0], tile_size=150)
    stats = model.references.statistics
    assert stats.zero_shot_score.count == 6 and stats.reference_score.count == 0
    assert model.references.fusion_statistics() is None
    model.add_references(image[1], tile_size=150)
    stats = model.references.statistics
    assert stats.zero_shot_score.count == 12 and stats.reference_score.count == 12
    assert model.references.fusion_statistics() is not None
    # A tiled predict fuses the largest tile score of each part with the same statistics.
    test = make_synthetic_arrays(1, 0, (200, 300), 9)[0][0]
    crops = [test[t.top : t.top + t.height, t.left : t.left + t.width] for t in tile_grid(200, 300, 150, 0.25).tiles]
    with torch.inference_mode():
        out = model(model.preprocess(crops))
    z = (float(out.zero_shot_scores.max()) - stats.zero_shot_score.mean) / stats.zero_shot_score.std
    z += (float(out.reference_scores.max()) - stats.reference_score.mean) / stats.reference_score.std
    expected = float(_explicit_squash(np.array(z / 2)))
    assert model.predict(test, tile_size=150).score == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- persistence
def test_fusion_round_trips_and_old_files_load_as_the_sum(model, tmp_path):
    model.add_references(_textures(2, seed=7), coreset=0.5)
    out = model.save_pretrained(tmp_path / "profile")
    tensors = load_file(str(out / REFERENCES_NAME))
    assert "fusion_statistics" in tensors and tensors["fusion_statistics"].dtype == torch.float64
    loaded = AnomalyCLIP.from_pretrained(out, device="cpu")
    assert loaded.references.fusion == "standardized"
    assert loaded.references.statistics == model.references.statistics
    px = model.preprocess(IMAGE_A)
    with torch.inference_mode():
        a, b = model(px), loaded(px)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.anomaly_maps, b.anomaly_maps)

    # A file of format 1 (no fusion, no statistics): the plain sum, as when it was written.
    meta = {k: v for k, v in model.references.metadata().items() if k != "fusion"}
    meta["format_version"] = "1"
    save_file({k: v for k, v in tensors.items() if k != "fusion_statistics"}, str(out / REFERENCES_NAME), metadata=meta)
    old = AnomalyCLIP.from_pretrained(out, device="cpu")
    assert old.references.fusion == "sum" and old.references.statistics is None
    assert old.map_range == (0.0, 12.0)
    with torch.inference_mode():
        c = old(px)
    torch.testing.assert_close(c.anomaly_maps, c.zero_shot_maps + c.reference_maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(c.scores, (c.zero_shot_scores + c.reference_scores) / 2)


def test_a_change_of_fusion_or_statistics_changes_the_decision_mode(model):
    """Thresholds chosen with one fusion (or other statistics) are refused with another."""
    from anomalyclip.eval.thresholds import Thresholds
    from anomalyclip.model.predict import decision_mode

    refs = _textures(2, seed=5)
    model.add_references(refs, fusion="sum")
    sum_mode, sum_print = decision_mode(model), model.references.fingerprint()
    chosen = Thresholds(image=0.5, pixel=0.5, mode=sum_mode.to_dict())
    model.predict(IMAGE_A, thresholds=chosen)  # accepted in its own mode
    model.clear_references()
    model.add_references(refs)  # the same tokens, fused with the standardized rule
    assert model.references.fusion == "standardized" and model.references.fusion_statistics() is not None
    assert model.references.fingerprint() != sum_print
    assert decision_mode(model).references != sum_mode.references
    with pytest.raises(InvalidInputError, match="another mode"):
        model.predict(IMAGE_A, thresholds=chosen)

    # Other statistics, same tokens and rule: another identity too.
    memory = model.references
    before, saved = decision_mode(model).references, memory.statistics
    values = saved.to_tensor().clone()
    values[:, 1] += 0.25  # shift every part's mean
    memory.statistics = FusionStatistics.from_tensor(values)
    try:
        assert memory.fingerprint() != before and decision_mode(model).references != before
    finally:
        memory.statistics = saved
    assert decision_mode(model).references == before


# ----------------------------------------------------------------------------- acceptance
@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("fusion") / "mvtec",
        layout="mvtec",
        classes=("texture_a", "texture_b"),
        n_normal=3,
        n_anomalous=3,
        n_train=6,
        seed=3,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_standardized_fusion_keeps_good_references(model, textures, seed):
    """The issue's case: a weak zero-shot map (the tiny random CLIP) and good references. The
    standardized map is at least as good as the plain sum (``zero_shot_maps + reference_maps``:
    the blur is linear) and stays near the better part. Measured (S = 112, 3 shots, draws 0 and 1): standardized 0.988 -
    0.993, reference part 0.990 - 0.993, sum 0.75 - 0.90, zero-shot 0.06 - 0.32."""
    dataset, pool = load_dataset(textures, "mvtec"), load_reference_pool(textures, "mvtec")
    for name in dataset.classes:
        samples = list(dataset.subset(name))
        masks = np.stack([mask_array(s.mask_path, SIZE) if s.mask_path else np.zeros((SIZE, SIZE)) for s in samples]) > 0.5
        model.clear_references()
        model.add_references([s.image_path for s in draw_shots(pool, name, 3, seed=seed)], fusion="standardized")
        with torch.inference_mode():
            out = model(model.preprocess([s.image_path for s in samples]))
        maps = {
            "standardized": out.anomaly_maps,
            "sum": out.zero_shot_maps + out.reference_maps,
            "zero-shot": out.zero_shot_maps,
            "reference": out.reference_maps,
        }
        auroc = {k: roc_auc_score(masks.ravel(), v.numpy().ravel()) for k, v in maps.items()}
        assert auroc["standardized"] >= auroc["sum"], auroc
        assert auroc["standardized"] >= max(auroc["zero-shot"], auroc["reference"]) - 0.05, auroc
