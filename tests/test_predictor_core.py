"""The predictor core (issue 18): one threshold resolution with decision modes, the streaming
``predict_iter``, one input rule, frozen config, reference-scale warnings, Ray out-of-memory, and
the same labels and masks from the torch model, the ONNX runtime and the Ray actor."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyclip import AnomalyCLIP, Thresholds
from anomalyclip.errors import InvalidInputError, ResourceError

from .conftest import IMAGE_A, IMAGE_B

S = 112  # the tiny CLIP at a small processing size: fast (the machine is shared)


def _normal_images(seed: int, n: int, size: int = 320) -> list[np.ndarray]:
    """Smooth textured 'normal' images (a fixed pattern plus mild noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.2 * np.sin(12 * xx) * np.cos(9 * yy)
    out = []
    for _ in range(n):
        img = base[..., None] + 0.05 * rng.standard_normal((size, size, 3))
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out


@pytest.fixture
def model(fresh_model) -> AnomalyCLIP:
    return fresh_model.reconfigure(image_size=S)


# ----------------------------------------------------------------------------- item 1: modes
def test_tiled_predict_never_applies_thresholds_calibrated_untiled(model, caplog):
    """Issue 18 item 1: calibrated untiled, predicting tiled applied the thresholds (every image
    labelled anomalous). Now: a warning and no labels or masks; calibrate(tile_size=...) gives
    thresholds that tiled predict applies."""
    calibration, test = _normal_images(0, 4), _normal_images(1, 3)
    model.calibrate(calibration, quantile=0.99)
    untiled = model.predict(test)
    assert all(r.label is not None and r.mask is not None for r in untiled)
    with caplog.at_level(logging.WARNING):
        tiled = model.predict(test, tile_size=160)
    assert all(r.label is None and r.mask is None for r in tiled)
    assert sum("chosen in another mode" in r.message for r in caplog.records) == 1  # once, not per image
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model.predict(test, tile_size=160)
    assert not any("chosen in another mode" in r.message for r in caplog.records)  # warned once per model

    found = model.calibrate(calibration, quantile=0.99, tile_size=160)
    assert found.mode["tile_size"] == 160 and found.mode["tile_overlap"] == 0.25
    tiled = model.predict(test, tile_size=160)
    flagged = np.mean([r.mask.mean() for r in tiled])
    assert all(r.label is not None for r in tiled) and flagged < 0.1
    # ...and now untiled predict is the other mode
    assert model.predict(test[0]).label is None


def test_explicit_thresholds_of_another_mode_are_refused(model):
    chosen = model.calibrate(_normal_images(0, 2), tile_size=160)
    with pytest.raises(InvalidInputError, match="another mode.*tile_size 160 -> None"):
        model.predict(_normal_images(1, 1)[0], thresholds=chosen)
    plain = Thresholds(chosen.image, chosen.pixel)  # no mode: the caller's responsibility
    assert model.predict(_normal_images(1, 1)[0], thresholds=plain).label is not None


def test_threshold_mode_is_saved_and_restored(model, tmp_path):
    model.calibrate(_normal_images(0, 2), tile_size=160)
    model.save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    assert data["format_version"] == 3 and data["threshold_mode"]["tile_size"] == 160
    loaded = AnomalyCLIP.from_pretrained(tmp_path / "m", device="cpu")
    image = _normal_images(1, 1)[0]
    assert loaded.predict(image, tile_size=160).label is not None
    assert loaded.predict(image).label is None


def test_version_2_thresholds_load_and_apply_as_before(model, tmp_path):
    model.thresholds = Thresholds(0.5, 0.6)
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    del data["threshold_mode"]
    data["format_version"] = 2
    path.write_text(json.dumps(data))
    loaded = AnomalyCLIP.from_pretrained(tmp_path / "m", device="cpu")
    assert loaded.thresholds.mode is None and loaded.predict(str(IMAGE_A), tile_size=160).label is not None


# ----------------------------------------------------------------------------- items 5, 13: one resolution
def test_resolution_refuses_nan_infinity_and_values_outside_the_ranges(model):
    image = str(IMAGE_A)
    for bad in (math.nan, math.inf, 50, -0.1):
        with pytest.raises(InvalidInputError, match="image_threshold"):
            model.predict(image, image_threshold=bad)
    with pytest.raises(InvalidInputError, match=r"map range \[0, 1\]"):
        model.predict(image, pixel_threshold=2)
    with pytest.raises(InvalidInputError, match="tile_overlap only applies with tile_size"):
        model.predict(image, tile_overlap=0.5)
    assert model.predict(image, thresholds={"image": 0.3, "pixel": 0.5}).label is not None
    assert model.predict(image, thresholds=False, image_threshold=0.3).mask is None


def test_resolve_thresholds_is_torch_free_and_shared():
    from anomalyclip.predictor import DecisionMode, resolve_thresholds

    mode = DecisionMode(image_size=224, feature_layers=(24,), dpam_layers=19, dpam_mode="vv", sigma=4.0)
    own = {"image": 0.5, "pixel": 0.7, "mode": mode.to_dict()}
    kw = dict(map_range=(0.0, 1.0), mode=mode, image_threshold=None, pixel_threshold=None)
    assert resolve_thresholds(own=own, thresholds=None, **kw) == (0.5, 0.7)
    assert resolve_thresholds(own=own, thresholds=False, **kw) == (None, None)
    assert resolve_thresholds(own=own, thresholds={"image": 0.2}, **kw) == (0.2, None)
    other = dataclasses.replace(mode, tile_size=160)
    assert resolve_thresholds(own=own, thresholds=None, **{**kw, "mode": other}) == (None, None)


# ----------------------------------------------------------------------------- item 7: frozen config
def test_config_is_frozen_and_changes_go_through_reconfigure(model):
    model.thresholds = Thresholds(0.5, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.sigma = 0
    assert model.thresholds is not None
    model.reconfigure(sigma=0)
    assert model.thresholds is None


def test_profile_load_keeps_thresholds_silently_and_quick_gelu_change_drops_them(model, tmp_path, caplog):
    model.add_references([str(IMAGE_B)])
    model.calibrate([str(IMAGE_B)])
    model.save_pretrained(tmp_path / "profile")
    with caplog.at_level(logging.WARNING):
        loaded = AnomalyCLIP.from_pretrained(tmp_path / "profile", device="cpu")
    assert loaded.thresholds == model.thresholds and loaded.num_references == 1
    assert not [r for r in caplog.records if "Dropping" in r.message]
    assert loaded.predict(str(IMAGE_A)).label is not None  # the references' fingerprint matches
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        other = AnomalyCLIP.from_pretrained(tmp_path / "profile", device="cpu", quick_gelu=not model.config.quick_gelu)
    assert other.thresholds is None and other.num_references == 0
    assert any("quick_gelu" in r.message for r in caplog.records)


# ----------------------------------------------------------------------------- item 14: folders
def test_folders_expand_for_predict_and_calibrate(model, tmp_path):
    folder = tmp_path / "good"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(_normal_images(0, 3, size=240)):
        Image.fromarray(img).save(folder / ("sub" if i else "") / f"{i}.png")
    results = model.predict(folder)
    assert isinstance(results, list) and len(results) == 3
    assert model.calibrate(folder).image is not None
    assert len(list(model.predict_iter([folder, str(IMAGE_A)]))) == 4


# ----------------------------------------------------------------------------- item 16: reference scale
def test_reference_scale_mismatch_warns(model, caplog):
    model.add_references([str(IMAGE_B)], tile_size=160)
    with caplog.at_level(logging.WARNING):
        model.predict(str(IMAGE_A))
    assert any("different scales" in r.message for r in caplog.records)
    model.clear_references()
    model.add_references([str(IMAGE_B)])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model.predict(str(IMAGE_A), tile_size=160)
    assert any("different scales" in r.message for r in caplog.records)


# ----------------------------------------------------------------------------- issue 19 item 1: predict_iter
def test_predict_iter_streams_in_order_and_records_unreadable_images(model, tmp_path):
    bad = tmp_path / "truncated.png"
    bad.write_bytes(IMAGE_A.read_bytes()[:200])
    inputs = [str(IMAGE_A), str(bad), str(IMAGE_B), str(tmp_path / "missing.png"), str(IMAGE_A)]
    results = list(model.predict_iter(inputs, batch_size=2, on_error="record"))
    assert [r.path for r in results] == inputs
    assert [r.error is None for r in results] == [True, False, True, False, True]
    failed = results[1]
    assert math.isnan(failed.score) and failed.anomaly_map is None and failed.label is None and failed.mask is None
    reference = model.predict([str(IMAGE_A), str(IMAGE_B)])
    assert results[0].score == pytest.approx(reference[0].score, abs=1e-6)
    assert results[2].score == pytest.approx(reference[1].score, abs=1e-6)
    with pytest.raises(Exception, match="truncated|Cannot read"):
        list(model.predict_iter(inputs, batch_size=2))


def test_predict_iter_reads_a_lazy_stream_with_bounded_look_ahead(model):
    pulled = []

    def stream():
        for i in range(12):
            pulled.append(i)
            yield _normal_images(i, 1, size=64)[0]

    seen = 0
    for result in model.predict_iter(stream(), batch_size=2, num_workers=1):
        seen += 1
        assert len(pulled) - seen <= 2 * 2 + 2  # two batches and the prefetch depth, never the whole stream
        assert result.anomaly_map.shape == (64, 64)
    assert seen == 12


# ----------------------------------------------------------------------------- item 6: Ray out of memory
def test_ray_actor_fails_the_job_on_out_of_memory_but_records_unreadable_images(model, tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    from anomalyclip.distributed import AnomalyCLIPPredictor

    saved = model.save_pretrained(tmp_path / "m")
    actor = AnomalyCLIPPredictor(saved, device="cpu", maps=None, io_threads=0)
    batch = {"path": np.array([str(IMAGE_A), str(tmp_path / "missing.png")], dtype=object)}
    rows = actor(batch).to_pylist()
    assert rows[0]["error"] is None and rows[1]["error"] is not None

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(actor.model, "encode_image", out_of_memory)
    with pytest.raises(ResourceError):
        actor(batch)


# ----------------------------------------------------------------------------- item 13: the CLI
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threshold", "50"], "outside the score range"),
        (["--pixel-threshold", "2"], "outside this model's map range"),
        (["--tile-overlap", "0.5"], "--tile-overlap applies to tiles"),
        (["--coreset", "0.1"], "--coreset applies to --references"),
    ],
)
def test_cli_refuses_options_that_do_nothing(model, tmp_path, capsys, extra, message):
    from anomalyclip.cli import main

    saved = model.save_pretrained(tmp_path / "m")
    code = main(["predict", str(IMAGE_A), "--model", str(saved), "--device", "cpu", "--out", str(tmp_path / "o"), *extra])
    assert code == 2 and message in capsys.readouterr().err


# ----------------------------------------------------------------------------- Done when: parity
def test_torch_onnx_and_ray_decide_the_same_for_one_profile(saved_profile, exported, tmp_path):
    """One profile (prompts + references + thresholds): the torch model, the ONNX runtime and the
    Ray actor (in this process) give the same labels and masks, the thresholds coming from the
    profile in each runtime (not passed).

    The profile is the session's inspection profile (224 px, four layers, one reference image)
    and the ONNX file its CLI export (tests/onnx_fixtures.py), shared with the ONNX tests: an
    export costs 15-20 CPU-seconds."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("pyarrow")
    from anomalyclip.distributed import AnomalyCLIPPredictor
    from anomalyclip.onnx import OnnxAnomalyCLIP

    from .onnx_fixtures import PROFILE

    profile = saved_profile(*PROFILE)
    onnx_path = exported(*PROFILE, profile=True)
    paths = []
    for i, img in enumerate(_normal_images(3, 3, size=200)):
        img[60:110, 80:130] = 255 * (i % 2)  # a defect on some
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    paths += [str(IMAGE_A), str(IMAGE_B)]

    model = AnomalyCLIP.from_pretrained(profile, device="cpu")
    torch_results = model.predict(paths)
    # Every image's score is clear of the profile's image threshold: no label on a knife edge.
    assert min(abs(r.score - model.thresholds.image) for r in torch_results) > 1e-3
    onnx_results = OnnxAnomalyCLIP(onnx_path).predict(paths)
    actor = AnomalyCLIPPredictor(profile, device="cpu", maps="npy", io_threads=0)
    rows = actor({"path": np.array(paths, dtype=object)}).to_pylist()

    pixel = model.thresholds.pixel
    labels = [r.label for r in torch_results]
    assert None not in labels and 0 in labels and 1 in labels
    assert [r.label for r in onnx_results] == labels
    assert [row["label"] for row in rows] == labels
    for t, o, row in zip(torch_results, onnx_results, rows):
        ray_map = np.load(__import__("io").BytesIO(row["map_npy"]))
        clear = np.abs(t.anomaly_map - pixel) > 1e-4  # pixels not on the threshold itself
        assert np.array_equal(t.mask[clear], o.mask[clear])
        assert np.array_equal(t.mask[clear], (ray_map > pixel)[clear])
        assert o.pixel_threshold == pytest.approx(pixel) and t.image_threshold == pytest.approx(o.image_threshold)
