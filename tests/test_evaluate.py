"""The evaluation protocol (``anomalyclip.evaluate``) and ``anomalyclip evaluate``, against an
independent computation: the model's own tensor API on each image, masks preprocessed by hand as
REFERENCE.md says, and scikit-learn's metrics."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from anomalyclip import AnomalyCLIP, DatasetError, evaluate, load_dataset
from anomalyclip.cli import main
from anomalyclip.eval.protocol import METRIC_NAMES, format_table
from anomalyclip.data.synthetic import make_synthetic_dataset

from .conftest import OFFICIAL_PTH, TINY_CLIP_REF

SIZE = 112  # processing size of these tests: 8 x 8 patches of the tiny CLIP
CLASSES = ("texture_a", "texture_b")


@pytest.fixture(scope="module")
def model(tiny_clip):
    return AnomalyCLIP.from_official_checkpoint(
        OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu", image_size=SIZE
    )


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "mvtec", layout="mvtec", classes=CLASSES, n_normal=4, n_anomalous=4, seed=3
    )


def _reference_mask(path, size: int) -> np.ndarray:
    """REFERENCE.md: binarize (> 0 -> 255) as 'L', bilinear resize to S x S, scale, > 0.5."""
    binary = (np.asarray(Image.open(path).convert("L")) > 0).astype(np.uint8) * 255
    resized = Image.fromarray(binary, mode="L").resize((size, size), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0 > 0.5


def _f1_max(truth: np.ndarray, values: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(truth, values)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    return float(f1.max())


def _reference_metrics(model: AnomalyCLIP, samples) -> dict[str, float]:
    with torch.no_grad():
        out = model(model.preprocess([s.image_path for s in samples]))
    scores = out.scores.numpy().astype(np.float64)
    maps = out.anomaly_maps.numpy().astype(np.float64).reshape(-1)
    labels = np.array([s.label for s in samples])
    masks = np.stack(
        [_reference_mask(s.mask_path, SIZE) if s.mask_path else np.zeros((SIZE, SIZE), bool) for s in samples]
    ).reshape(-1)
    return {
        "image_auroc": roc_auc_score(labels, scores),
        "image_ap": average_precision_score(labels, scores),
        "image_f1_max": _f1_max(labels, scores),
        "pixel_auroc": roc_auc_score(masks, maps),
        "pixel_ap": average_precision_score(masks, maps),
        "pixel_f1_max": _f1_max(masks, maps),
    }


def test_evaluate_matches_an_independent_computation(model, mvtec_root):
    dataset = load_dataset(mvtec_root, "mvtec")
    report = evaluate(model, dataset, batch_size=3, progress=False)  # batches that straddle nothing special
    assert list(report.classes) == list(CLASSES)
    for name in CLASSES:
        expected = _reference_metrics(model, list(dataset.subset(name)))
        got = report.classes[name]
        assert set(got) == set(METRIC_NAMES)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6), (name, key)
        assert 0.0 <= got["pixel_aupro"] <= 1.0
        assert report.counts[name] == {"images": 8, "anomalous": 4}
    for key in METRIC_NAMES:
        assert report.mean[key] == pytest.approx(np.mean([report.classes[c][key] for c in CLASSES]), abs=1e-12)
    assert report.settings["image_size"] == SIZE


def test_table_is_percent_with_one_decimal(model, mvtec_root):
    report = evaluate(model, load_dataset(mvtec_root, "mvtec"), progress=False)
    lines = format_table(report).splitlines()
    assert lines[0].split() == ["class", "I-AUROC", "I-AP", "I-F1max", "P-AUROC", "AUPRO", "P-AP", "P-F1max"]
    mean_row = lines[-1].split()
    assert mean_row[0] == "mean"
    assert mean_row[1:] == [f"{100 * report.mean[k]:.1f}" for k in METRIC_NAMES]


def test_cli_evaluate_writes_metrics_json_and_csv(model, mvtec_root, tmp_path, capsys):
    model_dir = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(model_dir), "--data", str(mvtec_root), "--format", "mvtec", "--out", str(out)]
    assert main(["-q", *args, "--batch-size", "5"]) == 0
    printed = capsys.readouterr().out
    assert "I-AUROC" in printed and "mean" in printed

    data = json.loads((out / "metrics.json").read_text())
    assert list(data["mean"]) == list(METRIC_NAMES)
    assert list(data["classes"]) == list(CLASSES)
    expected = evaluate(model, load_dataset(mvtec_root, "mvtec"), progress=False)
    for name in CLASSES:
        for key in METRIC_NAMES:
            value = data["classes"][name][key]
            assert 0.0 <= value <= 1.0
            assert value == pytest.approx(expected.classes[name][key], abs=1e-9)

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["class"] for r in rows] == [*CLASSES, "mean"]
    assert rows[-1]["images"] == "16" and rows[-1]["anomalous"] == "8"
    assert float(rows[0]["pixel_auroc"]) == pytest.approx(data["classes"][CLASSES[0]]["pixel_auroc"])

    # --classes restricts the run.
    assert main(["-q", *args, "--classes", CLASSES[1]]) == 0
    assert list(json.loads((out / "metrics.json").read_text())["classes"]) == [CLASSES[1]]


def test_missing_masks_are_an_error_unless_no_masks(model, mvtec_root, tmp_path, capsys):
    root = tmp_path / "mvtec"
    shutil.copytree(mvtec_root, root)
    missing = sorted((root / CLASSES[0] / "ground_truth").rglob("*_mask.png"))[0]
    missing.unlink()
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(model.save_pretrained(tmp_path / "m")), "--data", str(root)]
    args += ["--format", "mvtec", "--out", str(out)]
    assert main(["-q", *args]) == 2
    assert missing.name.replace("_mask", "") in capsys.readouterr().err  # names the image

    with pytest.warns(UserWarning):
        assert main(["-q", *args, "--no-masks"]) == 0
    data = json.loads((out / "metrics.json").read_text())
    first, second = (data["classes"][c] for c in CLASSES)
    assert first["image_auroc"] is not None and first["pixel_auroc"] is None and first["pixel_aupro"] is None
    assert second["pixel_auroc"] is not None
    assert data["mean"]["pixel_auroc"] == pytest.approx(second["pixel_auroc"])  # mean over defined values


def test_all_normal_class_has_undefined_image_metrics(model, tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", layout="folder", classes=CLASSES, n_normal=3, n_anomalous=3)
    for defect in (root / CLASSES[1]).iterdir():
        if defect.name != "good":
            shutil.rmtree(defect)
    with pytest.warns(UserWarning):  # the reader warns about a class without anomalies
        dataset = load_dataset(root, "folder")
    report = evaluate(model, dataset, progress=False)
    normal_only = report.classes[CLASSES[1]]
    for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max"):
        assert math.isnan(normal_only[key]), key
    assert report.mean["image_auroc"] == pytest.approx(report.classes[CLASSES[0]]["image_auroc"])
    assert report.to_dict()["classes"][CLASSES[1]]["image_auroc"] is None


def test_empty_dataset_is_an_error(model, mvtec_root):
    with pytest.raises(DatasetError, match="empty"):
        evaluate(model, load_dataset(mvtec_root, "mvtec")[:0], progress=False)


@pytest.mark.parametrize("options, message", [({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
                                              ({"num_workers": -1}, r"num_workers must be an int >= 0 \(or None: the default\), got -1")])
def test_bad_loader_options_are_invalid_input(model, mvtec_root, options, message):
    from anomalyclip import InvalidInputError

    with pytest.raises(InvalidInputError, match=message):  # not torch's DataLoader ValueError
        evaluate(model, load_dataset(mvtec_root, "mvtec"), progress=False, **options)
