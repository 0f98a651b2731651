"""Data set readers and the synthetic data generator (reading samples: tests/test_reader.py)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyclip.data.datasets import (
    FORMATS,
    AnomalyDataset,
    Sample,
    load_dataset,
    read_folder,
    read_meta,
    read_mvtec,
    read_visa,
)
from anomalyclip.errors import DatasetError, InvalidInputError
from anomalyclip.data.synthetic import DEFECT_TYPES, make_synthetic_arrays, make_synthetic_dataset

SIZE = (32, 40)  # (H, W): small and not square, so width/height mix-ups show
CLASSES = ("texture_a", "texture_b")


def _make(tmp_path: Path, layout: str, **kwargs) -> Path:
    options = dict(layout=layout, classes=CLASSES, n_normal=3, n_anomalous=4, size=SIZE, seed=1)
    options.update(kwargs)
    return make_synthetic_dataset(tmp_path / layout, **options)


def _write_png(path: Path, size_wh: tuple[int, int] = (20, 16), mode: str = "RGB", value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size_wh, value).save(path)
    return path


def _check_synthetic(ds: AnomalyDataset, fmt: str, n_normal: int = 3, n_anomalous: int = 4) -> None:
    assert ds.format == fmt
    assert ds.classes == list(CLASSES)
    assert len(ds) == len(CLASSES) * (n_normal + n_anomalous)
    assert ds.counts() == {c: {"normal": n_normal, "anomalous": n_anomalous} for c in CLASSES}
    for s in ds:
        assert s.image_path.is_file()
        if s.label == 0:
            assert s.defect == "good" and s.mask_path is None
        else:
            assert s.mask_path is not None and s.mask_path.is_file()
            assert s.class_name in s.image_path.parts and s.class_name in s.mask_path.parts
            if fmt != "visa":
                assert s.defect in DEFECT_TYPES
                assert s.mask_path.parent.name == s.defect == s.image_path.parent.name
                assert s.mask_path.name == f"{s.image_path.stem}_mask.png"
            else:
                assert s.defect == "anomaly" and s.mask_path.name == s.image_path.name


# ---------------------------------------------------------------- readers on synthetic layouts


def test_read_mvtec(tmp_path):
    root = _make(tmp_path, "mvtec", n_train=2)
    ds = read_mvtec(root)
    _check_synthetic(ds, "mvtec")
    # Sorted deterministically: class, then good first, then defect folders, then file name.
    first = ds.by_class()["texture_a"]
    assert [s.image_path.relative_to(root).as_posix() for s in first][:4] == [
        "texture_a/test/good/000.png",
        "texture_a/test/good/001.png",
        "texture_a/test/good/002.png",
        "texture_a/test/blob/000.png",
    ]
    train = read_mvtec(root, split="train")
    assert len(train) == 4 and all(s.label == 0 and "train" in s.image_path.parts for s in train)
    single = read_mvtec(root / "texture_b")  # a class folder on its own
    assert single.classes == ["texture_b"] and len(single) == 7
    with pytest.raises(InvalidInputError, match="split"):
        read_mvtec(root, split="val")


def test_read_visa(tmp_path):
    root = _make(tmp_path, "visa", n_train=2)
    ds = read_visa(root)
    _check_synthetic(ds, "visa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal-only train split is expected: no warning
        train = read_visa(root, split="train")
    assert len(train) == 4 and all(s.label == 0 for s in train)


def test_read_meta(tmp_path):
    root = _make(tmp_path, "meta", n_train=1)
    ds = read_meta(root)
    _check_synthetic(ds, "meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_meta(root, split="train")) == 2


def test_read_folder_of_classes_and_single_class(tmp_path):
    root = _make(tmp_path, "folder")
    ds = read_folder(root)
    _check_synthetic(ds, "folder")
    single = read_folder(root / "texture_a")
    assert single.classes == ["texture_a"] and len(single) == 7
    renamed = read_folder(root / "texture_a", class_name="widget")
    assert renamed.classes == ["widget"]
    with pytest.raises(InvalidInputError, match="subset"):
        read_folder(root, class_name="widget")


def test_load_dataset_dispatches_every_format(tmp_path):
    for fmt in FORMATS:
        root = _make(tmp_path, fmt)
        ds = load_dataset(root, fmt.upper() if fmt == "mvtec" else fmt)
        assert ds.format == fmt and len(ds) == 14
    with pytest.raises(InvalidInputError) as info:
        load_dataset(tmp_path, "coco")
    assert "coco" in str(info.value) and all(f in str(info.value) for f in FORMATS)


def test_readers_agree_on_the_same_images(tmp_path):
    def rel(ds: AnomalyDataset) -> list[tuple[str, int, str]]:
        return sorted((s.class_name, s.label, s.image_path.name) for s in ds)

    mvtec = read_mvtec(_make(tmp_path, "mvtec"))
    assert rel(mvtec) == rel(read_meta(_make(tmp_path, "meta"))) == rel(read_folder(_make(tmp_path, "folder")))


# ---------------------------------------------------------------- AnomalyDataset


def test_dataset_sequence_api(tmp_path):
    ds = read_mvtec(_make(tmp_path, "mvtec"))
    assert isinstance(ds[0], Sample) and ds[-1] == list(ds)[-1]
    part = ds[:3]
    assert isinstance(part, AnomalyDataset) and len(part) == 3 and part.root == ds.root
    groups = ds.by_class()
    assert list(groups) == list(CLASSES) and all(len(g) == 7 for g in groups.values())
    assert ds.subset(["texture_b"]) == groups["texture_b"] == ds.subset("texture_b")
    with pytest.raises(InvalidInputError, match="texture_a, texture_b"):
        ds.subset(["nope"])
    text = repr(ds)
    assert "14 images: 6 normal, 8 anomalous" in text and "texture_a" in text and "mvtec" in text
    with pytest.raises(AttributeError):
        ds[0].label = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        ds[0] = ds[1]  # type: ignore[index]
    with pytest.raises(InvalidInputError, match="label"):
        Sample(Path("x.png"), None, 2, "c", "good")


# ---------------------------------------------------------------- hand-made layouts: edge cases


def test_extensions_hidden_files_and_order(tmp_path):
    root = tmp_path / "part"
    for name in ("b.JPG", "a.png", "c.Tiff", "d.webp", ".hidden.png", "notes.txt", "e.jpeg"):
        if name.endswith(".txt"):
            (root / "good").mkdir(parents=True, exist_ok=True)
            (root / "good" / name).write_text("not an image")
        else:
            _write_png(root / "good" / name)
    _write_png(root / "crack" / "x.bmp")
    _write_png(root / "ground_truth" / "crack" / "x.png", mode="L", value=255)  # <stem>.png is accepted
    ds = read_folder(root)
    assert [s.image_path.name for s in ds] == ["a.png", "b.JPG", "c.Tiff", "d.webp", "e.jpeg", "x.bmp"]
    assert ds.classes == ["part"] and ds[-1].mask_path == root / "ground_truth" / "crack" / "x.png"


def test_missing_root_and_empty_layouts(tmp_path):
    for reader in (read_mvtec, read_visa, read_meta, read_folder):
        with pytest.raises(DatasetError, match="does not exist") as info:
            reader(tmp_path / "nowhere")
        assert "nowhere" in str(info.value)
    (tmp_path / "empty" / "cls" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="No images found") as info:
        read_mvtec(tmp_path / "empty")
    assert "<root>/<class>/test/<defect>" in str(info.value)
    with pytest.raises(DatasetError, match="good/"):
        read_folder(tmp_path / "empty")
    (tmp_path / "empty2" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="No images found"):
        read_folder(tmp_path / "empty2")


def test_missing_masks_error_or_warning(tmp_path):
    root = tmp_path / "part"
    _write_png(root / "good" / "n.png")
    for i in range(7):
        _write_png(root / "crack" / f"{i}.png")
    with pytest.raises(DatasetError) as info:
        read_folder(root)
    message = str(info.value)
    assert "7 anomalous image(s)" in message and "0.png" in message and "and 2 more" in message
    assert "require_masks=False" in message
    with pytest.warns(UserWarning, match="7 anomalous image") as record:
        ds = load_dataset(root, "folder", require_masks=False)
    assert "mask_path=None" in str(record[0].message)
    assert [s.label for s in ds] == [0] + [1] * 7 and all(s.mask_path is None for s in ds if s.label)


def test_single_label_classes_warn(tmp_path):
    _write_png(tmp_path / "d" / "only_good" / "good" / "a.png")
    _write_png(tmp_path / "d" / "only_bad" / "good" / "a.png")
    (tmp_path / "d" / "only_bad" / "good" / "a.png").unlink()
    _write_png(tmp_path / "d" / "only_bad" / "hole" / "a.png")
    _write_png(tmp_path / "d" / "only_bad" / "ground_truth" / "hole" / "a_mask.png", mode="L", value=255)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = read_folder(tmp_path / "d")
    messages = [str(w.message) for w in record]
    assert any("only_good" in m and "no anomalous image" in m for m in messages)
    assert any("only_bad" in m and "no normal image" in m for m in messages)
    assert ds.counts() == {"only_bad": {"normal": 0, "anomalous": 1}, "only_good": {"normal": 1, "anomalous": 0}}
    # The train split is normal by design: no warning.
    root = _make(tmp_path, "mvtec", n_train=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_mvtec(root, split="train")


def _write_visa_csv(root: Path, rows: list[list[str]], header=("object", "split", "label", "image", "mask")) -> None:
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_visa_errors(tmp_path):
    root = tmp_path / "visa"
    _write_png(root / "c" / "n.png")
    _write_png(root / "c" / "a.png")
    with pytest.raises(DatasetError, match="1cls.csv"):
        read_visa(root)
    _write_visa_csv(root, [["c", "test", "normal", "c/n.png", ""], ["c", "test", "anomaly", "c/a.png", "c/gone.png"]])
    with pytest.raises(DatasetError, match="gone.png"):
        read_visa(root)
    _write_visa_csv(root, [["c", "test", "normal", "c/missing.png", ""]])
    with pytest.raises(DatasetError, match="missing.png"):
        read_visa(root)
    _write_visa_csv(root, [["c", "test", "broken", "c/n.png", ""]])
    with pytest.raises(DatasetError, match="line 2.*'broken'"):
        read_visa(root)
    _write_visa_csv(root, [["c", "test", "c/n.png"]], header=("object", "split", "image"))
    with pytest.raises(DatasetError, match=r"\['label', 'mask'\]"):
        read_visa(root)
    _write_visa_csv(root, [["c", "train", "normal", "c/n.png", ""]])
    with pytest.raises(DatasetError, match="splits present: \\['train'\\]"):
        read_visa(root)
    _write_visa_csv(root, [["c", "test", "normal", "c/n.png", ""], ["c", "test", "anomaly", "c/a.png", ""]])
    with pytest.raises(DatasetError, match="require_masks=False"):
        read_visa(root)
    with pytest.warns(UserWarning, match="a.png"):
        ds = read_visa(root, require_masks=False)
    assert [(s.label, s.mask_path) for s in ds] == [(0, None), (1, None)]


def test_meta_errors(tmp_path):
    root = tmp_path / "meta"
    _write_png(root / "c" / "n.png")
    _write_png(root / "c" / "a.png")
    with pytest.raises(DatasetError, match="meta.json"):
        read_meta(root)

    def entry(img, mask, anomaly, specie="x"):
        return {"img_path": img, "mask_path": mask, "cls_name": "c", "specie_name": specie, "anomaly": anomaly}

    def write(content) -> None:
        (root / "meta.json").write_text(json.dumps(content) if not isinstance(content, str) else content)

    write("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_meta(root)
    write({"train": {}})
    with pytest.raises(DatasetError, match="no split 'test'"):
        read_meta(root)
    write({"test": {"c": [{"img_path": "c/n.png"}]}})
    with pytest.raises(DatasetError, match=r"test/c\[0\] lacks"):
        read_meta(root)
    write({"test": {"c": [entry("c/n.png", "", 0), entry("c/a.png", "c/gone_mask.png", 1)]}})
    with pytest.raises(DatasetError, match="gone_mask.png"):
        read_meta(root)
    write({"test": {"c": [entry("c/n.png", "", 0), entry("c/a.png", "", 1, specie="")]}})
    with pytest.raises(DatasetError, match="a.png"):
        read_meta(root)
    with pytest.warns(UserWarning):
        ds = read_meta(root, require_masks=False)
    assert [(s.label, s.defect, s.mask_path) for s in ds] == [(0, "good", None), (1, "anomaly", None)]
    write({"test": {"c": [entry("c/n.png", "", 5)]}})
    with pytest.raises(DatasetError, match="'anomaly' must be 0 or 1"):
        read_meta(root)


# ---------------------------------------------------------------- synthetic generator


def test_synthetic_arrays():
    images, masks, labels = make_synthetic_arrays(3, 4, SIZE, seed=5)
    assert images.shape == (7, *SIZE, 3) and images.dtype == np.uint8
    assert masks.shape == (7, *SIZE) and masks.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert set(np.unique(masks).tolist()) <= {0, 255}
    assert not masks[:3].any() and all(m.any() for m in masks[3:])
    # The defect differs visibly from the texture around it.
    for img, mask in zip(images[3:], masks[3:] > 0):
        inside = img[mask].astype(np.float32).mean(axis=0)
        outside = img[~mask].astype(np.float32).mean(axis=0)
        assert np.abs(inside - outside).max() > 50
    again = make_synthetic_arrays(3, 4, SIZE, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip((images, masks, labels), again))
    assert not np.array_equal(images, make_synthetic_arrays(3, 4, SIZE, seed=6)[0])
    # Image k does not depend on how many others are drawn.
    assert np.array_equal(make_synthetic_arrays(1, 1, SIZE, seed=5)[0], images[[0, 3]])
    with pytest.raises(InvalidInputError):
        make_synthetic_arrays(1, 1, (8, 8))


def test_synthetic_dataset_is_deterministic_and_matches_arrays(tmp_path):
    a = _make(tmp_path / "1", "mvtec")
    b = _make(tmp_path / "2", "mvtec")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    images, masks, _ = make_synthetic_arrays(3, 4, SIZE, seed=1, class_name="texture_b")
    assert np.array_equal(np.asarray(Image.open(a / "texture_b/test/good/002.png")), images[2])
    assert np.array_equal(np.asarray(Image.open(a / "texture_b/test/blob/000.png")), images[4])
    mask = Image.open(a / "texture_b/ground_truth/blob/000_mask.png")
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), masks[4])
    with pytest.raises(InvalidInputError, match="empty folder"):
        _make(tmp_path / "1", "mvtec")
    with pytest.raises(InvalidInputError, match="Valid layouts"):
        make_synthetic_dataset(tmp_path / "x", layout="coco")
