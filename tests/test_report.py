"""The HTML evaluation report (``evaluate(..., details=True)``, ``write_reports(..., html=True)``,
``anomalyclip evaluate --report``): a self-contained page whose curves have the table's areas,
worst cases that are the stream's true extremes, and the ``[report]`` extra's error."""

from __future__ import annotations

import io
import json
import re
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalyclip import AnomalyCLIP, evaluate, load_dataset
from anomalyclip.cli import main
from anomalyclip.data.synthetic import make_synthetic_dataset
from anomalyclip.errors import InvalidInputError, MissingDependencyError
from anomalyclip.eval.details import THUMBNAIL_SIDE, WORST_CASES, WorstCases, thin_curve
from anomalyclip.eval.metrics import image_inputs, pr_points, rank_counts, roc_points
from anomalyclip.eval.protocol import write_reports

from .conftest import OFFICIAL_PTH, TINY_CLIP_REF

SIZE = 112
CLASSES = ("texture_a", "texture_b")
N_NORMAL, N_ANOMALOUS = 4, 4


@pytest.fixture(scope="module")
def model(tiny_clip):
    return AnomalyCLIP.from_official_checkpoint(
        OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu", image_size=SIZE
    )


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "mvtec",
        layout="mvtec",
        classes=CLASSES,
        n_normal=N_NORMAL,
        n_anomalous=N_ANOMALOUS,
        n_train=3,
        seed=5,
    )


@pytest.fixture(scope="module")
def report(model, mvtec_root):
    return evaluate(model, load_dataset(mvtec_root, "mvtec"), batch_size=3, progress=False, details=True)


@pytest.fixture(scope="module")
def plain(model, mvtec_root):
    return evaluate(model, load_dataset(mvtec_root, "mvtec"), batch_size=8, progress=False)


def _trapezoid(y, x) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float((np.diff(x) * (y[1:] + y[:-1]) / 2).sum())


def _step_area(recall, precision) -> float:
    return float(np.dot(np.diff(np.asarray(recall, float), prepend=0.0), precision))


def _page_data(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert block is not None
    return json.loads(block.group(1))


def _assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "@import" not in page and "url(" not in page
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert sources and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources)
    assert all(h.startswith("#") for h in re.findall(r'\bhref="([^"]*)"', page))
    for uri in sources:  # every picture decodes
        Image.open(io.BytesIO(__import__("base64").b64decode(uri.split(",", 1)[1]))).verify()


# ----------------------------------------------------------------------------- curve points


@pytest.mark.parametrize("seed", range(4))
def test_curve_points_have_the_metrics_areas_ties_included(seed):
    rng = np.random.default_rng(seed)
    values = np.round(rng.normal(size=300), 1)  # many ties
    labels = rng.random(300) < 0.3
    c = rank_counts(*image_inputs(values, labels))
    fpr, tpr = roc_points(c)
    recall, precision = pr_points(c)
    assert _trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, values), abs=1e-12)
    assert _step_area(recall, precision) == pytest.approx(average_precision_score(labels, values), abs=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)


def test_thinned_curves_stay_within_the_documented_bound():
    rng = np.random.default_rng(0)
    values = rng.normal(size=200_000).astype(np.float32)
    labels = rng.random(values.size) < 0.1
    values[labels] += 1.0
    c = rank_counts(*image_inputs(values, labels))
    fpr, tpr = roc_points(c)
    for points in (20, 500):
        x, y = thin_curve(fpr, tpr, points)
        assert x.size <= 2 * points + 2 and (x[0], x[-1], y[0], y[-1]) == (fpr[0], fpr[-1], tpr[0], tpr[-1])
        assert abs(_trapezoid(y, x) - roc_auc_score(labels, values)) <= 1 / (2 * points)
    x, y = thin_curve(fpr[:50], tpr[:50], 500)  # short curves are kept whole
    assert np.array_equal(x, fpr[:50]) and np.array_equal(y, tpr[:50])


# ----------------------------------------------------------------------------- details


def test_worst_cases_keep_the_extremes_of_a_stream_with_their_maps():
    rng = np.random.default_rng(1)
    scores = rng.random(57).astype(np.float32)
    labels = (rng.random(57) < 0.4).astype(np.int8)
    maps = np.arange(57, dtype=np.float32)[:, None, None] * np.ones((1, 3, 3), np.float32)  # map i is all i
    masks = maps > 1e9
    worst = WorstCases(k=3)
    for start in range(0, 57, 5):  # batches of 5 and a last one of 2
        worst.update(start, scores[start : start + 5], labels[start : start + 5], maps[start : start + 5], masks[start : start + 5])
    normal = sorted(np.flatnonzero(labels == 0), key=lambda i: -scores[i])[:3]
    anomalous = sorted(np.flatnonzero(labels == 1), key=lambda i: scores[i])[:3]
    kept_normal = sorted(worst._normal, key=lambda e: -e[0])
    kept_anomalous = sorted(worst._anomalous, key=lambda e: -e[0])
    assert [e[1] for e in kept_normal] == list(normal) and [e[1] for e in kept_anomalous] == list(anomalous)
    assert all(np.all(e[2] == e[1]) for e in kept_normal + kept_anomalous)  # each with its own map, copied
    maps[:] = -1
    assert all(np.all(e[2] == e[1]) for e in kept_normal + kept_anomalous)


def test_details_curves_match_the_table_and_worst_cases_are_the_extremes(report):
    assert list(report.details) == list(CLASSES)
    for name in CLASSES:
        d, metrics = report.details[name], report.classes[name]
        assert set(d.curves) == {"image", "pixel"}
        for level, tolerance in (("image", 1e-12), ("pixel", 1e-3)):
            fpr, tpr = d.curves[level]["roc"]
            recall, precision = d.curves[level]["pr"]
            assert _trapezoid(tpr, fpr) == pytest.approx(metrics[f"{level}_auroc"], abs=tolerance)
            assert _step_area(recall, precision) == pytest.approx(metrics[f"{level}_ap"], abs=tolerance)
        recall, precision = d.curves["image"]["pr"]
        assert np.max(2 * precision * recall / (precision + recall)) == pytest.approx(metrics["image_f1_max"])

        scores, labels = d.scores, d.labels.astype(bool)
        assert scores.shape == (N_NORMAL + N_ANOMALOUS,) and labels.sum() == N_ANOMALOUS
        assert [c.score for c in d.worst_normal] == pytest.approx(np.sort(scores[~labels])[::-1][:WORST_CASES].tolist())
        assert [c.score for c in d.worst_anomalous] == pytest.approx(np.sort(scores[labels])[:WORST_CASES].tolist())
        assert {c.label for c in d.worst_normal} == {0} and {c.label for c in d.worst_anomalous} == {1}
        assert all(f"{name}/test/good/" in c.path for c in d.worst_normal)
        thumbnail = Image.open(io.BytesIO(d.worst_anomalous[0].jpeg))
        assert max(thumbnail.size) <= THUMBNAIL_SIDE and thumbnail.mode == "RGB" and thumbnail.format == "JPEG"
        # the F1-max threshold is a score of the class, and deciding with >= it gives the F1-max
        t = d.f1_threshold
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        assert 2 * tp / (predicted.sum() + labels.sum()) == pytest.approx(metrics["image_f1_max"])


def test_details_are_off_by_default_and_metrics_do_not_change(plain, report):
    assert plain.details is None
    assert plain.classes == report.classes
    assert report.to_dict()["classes"] == plain.to_dict()["classes"]  # details are not in metrics.json


# ----------------------------------------------------------------------------- the page


def test_write_reports_html_is_self_contained_with_the_tables_numbers(report, tmp_path):
    out = write_reports(report, tmp_path / "eval", html=True)
    assert {p.name for p in out.iterdir()} == {"metrics.json", "metrics.csv", "report.html"}
    page = (out / "report.html").read_text(encoding="utf-8")
    _assert_self_contained(page)
    for section in ('id="run"', 'id="metrics"', 'id="classes"', 'id="class-0"', 'id="class-1"'):
        assert section in page
    for text in ("I-AUROC", "AUPRO", "P-F1max", "Highest-scoring normal images", "Lowest-scoring anomalous images",
                 "backbone", "references", "thresholds", "anomalyclip", "date (UTC)", report.settings["dataset_root"]):
        assert text in page
    # one figure per class and the worst-case thumbnails, all inlined
    per_class = 2 * WORST_CASES
    assert len(re.findall(r"<img ", page)) == len(CLASSES) * (1 + per_class)
    assert f"{100 * report.mean['image_auroc']:.1f}" in page

    data = _page_data(page)
    (run,) = data["runs"]
    assert run["label"] == "zero-shot" and run["mean"] == json.loads(json.dumps(report.to_dict()["mean"]))
    for name in CLASSES:
        for level in ("image", "pixel"):
            curve = run["curves"][name][level]
            table = run["classes"][name]
            assert _trapezoid(curve["roc"]["tpr"], curve["roc"]["fpr"]) == pytest.approx(table[f"{level}_auroc"], abs=1e-3)
            assert _step_area(curve["pr"]["recall"], curve["pr"]["precision"]) == pytest.approx(table[f"{level}_ap"], abs=1e-3)
        image = run["curves"][name]["image"]["roc"]
        assert _trapezoid(image["tpr"], image["fpr"]) == pytest.approx(run["classes"][name]["image_auroc"], abs=1e-6)


def test_cli_report_with_shots_shows_zero_shot_beside_few_shot(model, plain, mvtec_root, tmp_path, capsys):
    model_dir = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    args = ["-q", "evaluate", "--model", str(model_dir), "--data", str(mvtec_root), "--format", "mvtec",
            "--out", str(out), "--classes", CLASSES[0], "--shots", "2", "--report"]
    assert main(args) == 0
    assert "I-AUROC" in capsys.readouterr().out
    page = (out / "report.html").read_text(encoding="utf-8")
    _assert_self_contained(page)
    zero, few = _page_data(page)["runs"]
    assert (zero["label"], few["label"]) == ("zero-shot", "2-shot")
    assert (zero["settings"]["shots"], few["settings"]["shots"]) == (0, 2)
    assert zero["settings"]["model"] == str(model_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["shots"] == 2 and metrics["mean"] == few["mean"]  # metrics.json: the few-shot run
    assert zero["mean"] != few["mean"]
    for run in (zero, few):
        curve = run["curves"][CLASSES[0]]["pixel"]["roc"]
        assert _trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(run["classes"][CLASSES[0]]["pixel_auroc"], abs=1e-3)
    # the zero-shot side is the model without references: the plain evaluation's numbers
    for key, value in zero["classes"][CLASSES[0]].items():
        assert value == pytest.approx(plain.classes[CLASSES[0]][key], abs=1e-9)
    assert len(re.findall(r"Highest-scoring normal images", page)) == 2  # one set of worst cases per run


def test_zero_shots_puts_the_models_references_aside_and_restores_them(tiny_clip, plain, mvtec_root):
    fresh_model = AnomalyCLIP.from_official_checkpoint(
        OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu", image_size=SIZE
    )
    dataset = load_dataset(mvtec_root, "mvtec").subset([CLASSES[1]])
    fresh_model.add_references(sorted((mvtec_root / CLASSES[1] / "train" / "good").glob("*.png"))[:2])
    memory = fresh_model.references
    zero = evaluate(fresh_model, dataset, progress=False, shots=0)
    assert zero.classes[CLASSES[1]] == pytest.approx(plain.classes[CLASSES[1]], abs=1e-9)
    assert zero.settings["shots"] == 0
    assert fresh_model.references is memory


# ----------------------------------------------------------------------------- errors


def test_html_needs_details(plain, tmp_path):
    with pytest.raises(InvalidInputError, match=r"details=True"):
        write_reports(plain, tmp_path / "a", html=True)
    with pytest.raises(InvalidInputError, match=r"html=True"):
        write_reports(plain, tmp_path / "b", compare=plain)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_matplotlib_names_the_extra(report, model, mvtec_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(MissingDependencyError, match=r'pip install "anomalyclip\[report\]"'):
        write_reports(report, tmp_path / "eval", html=True)
    assert not (tmp_path / "eval").exists()  # checked before anything is written
    model_dir = model.save_pretrained(tmp_path / "model")
    args = ["-q", "evaluate", "--model", str(model_dir), "--data", str(mvtec_root), "--format", "mvtec",
            "--out", str(tmp_path / "cli"), "--report"]
    assert main(args) == 2
    assert 'pip install "anomalyclip[report]"' in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()  # refused before the evaluation ran


def test_the_run_records_the_mode_of_the_thresholds_in_words():
    from types import SimpleNamespace

    from anomalyclip.eval.protocol import _mode_text

    assert _mode_text(SimpleNamespace(threshold_mode=None)) is None
    mode = {"image_size": 224, "feature_layers": [6, 12], "tile_size": 336, "tile_overlap": 0.25, "references": "0123456789abcdef"}
    assert _mode_text(SimpleNamespace(threshold_mode=mode)) == (
        "224 px, layers 6, 12, tiles of 336 px, overlap 0.25, with references 0123456789ab"
    )
    assert _mode_text(SimpleNamespace(threshold_mode={**mode, "tile_size": None, "references": None})).endswith("untiled, zero-shot")
