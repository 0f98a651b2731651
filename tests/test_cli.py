"""The command line: convert, predict, fetch, evaluate (in-process through ``main``)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from anomalyclip import AnomalyCLIP
from anomalyclip.cli import main

from .conftest import IMAGE_A, IMAGE_B, OFFICIAL_PTH, TINY_CLIP_REF


@pytest.fixture
def converted(tmp_path):
    out = tmp_path / "model"
    assert main(["-q", "convert", str(OFFICIAL_PTH), str(out), "--clip", TINY_CLIP_REF]) == 0
    return out


def test_convert_writes_a_loadable_model(converted, golden):
    assert sorted(p.name for p in converted.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model = AnomalyCLIP.from_pretrained(converted, device="cpu")
    assert abs(model.predict(IMAGE_A).score - float(golden["a.top.score"])) < 1e-4


def test_predict_writes_overlays_and_scores(converted, tmp_path, golden):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    shutil.copyfile(IMAGE_A, images / "part.png")
    shutil.copyfile(IMAGE_B, images / "sub" / "part.png")  # same stem in another folder
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = main(["-q", "predict", str(images), "--model", str(converted), "--out", str(out), "--threshold", "0.4"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["image"] for r in rows] == [str(images / "part.png"), str(images / "sub" / "part.png")]
    assert abs(float(rows[0]["score"]) - float(golden["a.top.score"])) < 1e-4
    assert [r["label"] for r in rows] == [str(int(float(r["score"]) > 0.4)) for r in rows]
    assert json.loads((out / "scores.json").read_text())[1]["overlay"] == rows[1]["overlay"]
    overlays = sorted(p.name for p in out.glob("*.png"))
    assert overlays == ["00000_part_overlay.png", "00001_part_overlay.png"]
    # Overlays are at each image's original size.
    assert Image.open(out / rows[0]["overlay"]).size == (400, 300)
    assert Image.open(out / rows[1]["overlay"]).size == (256, 256)


def test_predict_errors_exit_2_with_a_message(converted, tmp_path, capsys):
    assert main(["-q", "predict", str(tmp_path / "missing.png"), "--model", str(converted)]) == 2
    assert "No such file or directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["-q", "predict", str(empty), "--model", str(converted)]) == 2
    assert "No images found" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    # An unreadable image is an error row and exit status 1; --strict stops with status 2.
    assert main(["-q", "predict", str(bad), "--model", str(converted), "--out", str(tmp_path / "o")]) == 1
    rows = list(csv.DictReader(open(tmp_path / "o" / "scores.csv")))
    assert len(rows) == 1 and rows[0]["score"] == "" and "Cannot read image" in rows[0]["error"]
    capsys.readouterr()
    assert main(["-q", "predict", str(bad), "--model", str(converted), "--out", str(tmp_path / "s"), "--strict"]) == 2
    assert "bad.png" in capsys.readouterr().err


def test_convert_rejects_a_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["-q", "convert", str(bad), str(tmp_path / "out"), "--clip", TINY_CLIP_REF]) == 2
    assert "Cannot read" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fetch_rejects_a_file_that_is_not_the_published_one(tmp_path, capsys):
    assert main(["-q", "fetch", "official-visa", "--file", str(OFFICIAL_PTH), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not the published checkpoint" in err and "c90f1d9d" in err


def test_predict_overlay_shows_the_map(converted, tmp_path):
    """An overlay is the image blended with the jet colour of the map (checked on one pixel)."""
    from anomalyclip.visualize import apply_colormap

    out = tmp_path / "o"
    assert main(["-q", "predict", str(IMAGE_B), "--model", str(converted), "--out", str(out), "--alpha", "1"]) == 0
    model = AnomalyCLIP.from_pretrained(converted, device="cpu")
    amap = model.predict(IMAGE_B).anomaly_map
    heat = apply_colormap(amap, vmin=0.0, vmax=1.0)
    overlay = np.asarray(Image.open(out / "image_b_overlay.png").convert("RGB"))
    assert np.abs(overlay.astype(int) - heat.astype(int)).max() <= 1


def test_predict_overlay_range_follows_the_feature_layers(converted, tmp_path):
    """No hard-coded colour range: with 4 output layers the map spans [0, 4] and so does the scale."""
    from anomalyclip.visualize import apply_colormap

    out = tmp_path / "o"
    args = ["-q", "predict", str(IMAGE_B), "--model", str(converted), "--out", str(out), "--alpha", "1"]
    assert main([*args, "--feature-layers", "6", "12", "18", "24"]) == 0
    model = AnomalyCLIP.from_pretrained(converted, device="cpu", feature_layers=(6, 12, 18, 24))
    assert model.map_range == (0.0, 4.0)
    amap = model.predict(IMAGE_B).anomaly_map
    overlay = np.asarray(Image.open(out / "image_b_overlay.png").convert("RGB")).astype(int)
    assert np.abs(overlay - apply_colormap(amap, vmin=0.0, vmax=4.0).astype(int)).max() <= 1
    assert np.abs(overlay - apply_colormap(amap, vmin=0.0, vmax=1.0).astype(int)).max() > 1


def test_predict_applies_the_saved_thresholds(converted, tmp_path):
    model = AnomalyCLIP.from_pretrained(converted, device="cpu")
    model.thresholds = {"image": 0.5, "pixel": 0.5}
    model.save_pretrained(converted)
    base = ["-q", "predict", str(IMAGE_A), str(IMAGE_B), "--model", str(converted)]
    assert main([*base, "--out", str(tmp_path / "saved")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "saved" / "scores.csv")))
    assert [r["label"] for r in rows] == [str(int(float(r["score"]) > 0.5)) for r in rows]
    assert [r["image"] for r in rows] == [str(IMAGE_A), str(IMAGE_B)]
    assert main([*base, "--out", str(tmp_path / "none"), "--no-thresholds"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "none" / "scores.csv")))
    assert "label" not in rows[0]
    assert main([*base, "--out", str(tmp_path / "explicit"), "--threshold", "0.0"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "explicit" / "scores.csv")))
    assert [r["label"] for r in rows] == ["1", "1"]
