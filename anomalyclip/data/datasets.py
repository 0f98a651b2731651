"""Readers for the usual anomaly-detection data layouts.

Every reader returns an :class:`AnomalyDataset`: an immutable, deterministic sequence of
:class:`Sample` (image path, mask path or ``None``, label 0 normal / 1 anomalous, class, defect).
Images are not opened while reading a layout; :class:`anomalyclip.data.reader.SampleReader` opens
and preprocesses them exactly as the official AnomalyCLIP code does.

Layouts (``load_dataset(root, format)``):

- ``"mvtec"`` (:func:`read_mvtec`), MVTec AD::

      <root>/<class>/test/good/*.png                       normal
      <root>/<class>/test/<defect>/<stem>.png              anomalous
      <root>/<class>/ground_truth/<defect>/<stem>_mask.png its mask

- ``"visa"`` (:func:`read_visa`), VisA with its split CSV ``<root>/split_csv/1cls.csv``
  (columns ``object,split,label,image,mask``, paths relative to the root).
- ``"meta"`` (:func:`read_meta`), the official AnomalyCLIP repository's ``<root>/meta.json``.
- ``"folder"`` (:func:`read_folder`), a plain folder::

      <root>/good/*                                        normal
      <root>/<defect>/*                                    anomalous
      <root>/ground_truth/<defect>/<stem>_mask.png         its mask (or <stem>.png)

  or a folder of such class folders.

Image files are those with the extensions in :data:`IMAGE_SUFFIXES` (any case); hidden files
(names starting with ``.``) and other files are ignored, and files are sorted by name.

Checks done by every reader: the root must exist and hold images; each anomalous image needs a
mask unless ``require_masks=False`` (then it is kept with ``mask_path=None`` and a warning: its
mask is unknown, it is never treated as normal); listed files must exist; a class without normal
or without anomalous images triggers a warning (image-level metrics are undefined there), except
in a ``"train"`` split, which is normal-only by design in MVTec AD and VisA.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from ..errors import DatasetError, InvalidInputError, with_fix
from ..files import IMAGE_SUFFIXES, list_paths

__all__ = [
    "IMAGE_SUFFIXES",
    "FORMATS",
    "NORMAL_DEFECT",
    "Sample",
    "AnomalyDataset",
    "read_mvtec",
    "read_visa",
    "read_meta",
    "read_folder",
    "load_dataset",
    "load_reference_pool",
    "draw_shots",
]

logger = logging.getLogger(__name__)

#: The layouts :func:`load_dataset` reads.
FORMATS: tuple[str, ...] = ("mvtec", "visa", "meta", "folder")
#: The defect name (and folder name) of normal images.
NORMAL_DEFECT = "good"
#: Name of the mask folder in the MVTec AD and plain-folder layouts.
_GROUND_TRUTH = "ground_truth"

_MVTEC_LAYOUT = (
    "<root>/<class>/{split}/good/*.png (normal), <root>/<class>/{split}/<defect>/*.png (anomalous), "
    "masks at <root>/<class>/ground_truth/<defect>/<stem>_mask.png"
)
_FOLDER_LAYOUT = (
    "<root>/good/* (normal), <root>/<defect>/* (anomalous), optional masks at "
    "<root>/ground_truth/<defect>/<stem>_mask.png or <stem>.png; or a folder of such class folders "
    "(each subfolder containing good/ is a class)"
)


# --------------------------------------------------------------------------------------------
# Samples and data sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One image of a data set.

    Attributes:
        image_path: the image file.
        mask_path: its ground-truth mask (any non-zero pixel is anomalous), or ``None``: always
            ``None`` for normal images (their mask is all zeros), and ``None`` for an anomalous
            image whose mask is unknown (image-level use only).
        label: 0 normal, 1 anomalous.
        class_name: the object / texture class, e.g. ``"bottle"``.
        defect: the defect type, ``"good"`` for normal images.
    """

    image_path: Path
    mask_path: Path | None
    label: int
    class_name: str
    defect: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_path", Path(self.image_path))
        if self.mask_path is not None:
            object.__setattr__(self, "mask_path", Path(self.mask_path))
        if isinstance(self.label, bool) or self.label not in (0, 1):
            raise InvalidInputError(
                f"Sample label must be 0 (normal) or 1 (anomalous), got {self.label!r} for '{self.image_path}'."
            )
        object.__setattr__(self, "label", int(self.label))


class AnomalyDataset(Sequence[Sample]):
    """An immutable sequence of :class:`Sample` read from one data set.

    Attributes:
        root: the data set root it was read from.
        format: the layout it was read with (one of :data:`FORMATS`, or any tag you choose).
    """

    def __init__(self, samples: Iterable[Sample], *, root: str | os.PathLike, format: str) -> None:
        items = tuple(samples)
        for item in items:
            if not isinstance(item, Sample):
                raise InvalidInputError(
                    f"AnomalyDataset holds Sample objects, got {type(item).__qualname__}; build them with "
                    "anomalyclip.data.datasets.Sample(image_path, mask_path, label, class_name, defect)."
                )
        self._samples = items
        self._root = Path(root)
        self._format = str(format)

    @property
    def root(self) -> Path:
        """The data set root."""
        return self._root

    @property
    def format(self) -> str:
        """The layout the data set was read with."""
        return self._format

    @property
    def samples(self) -> tuple[Sample, ...]:
        """All samples, in order."""
        return self._samples

    @property
    def classes(self) -> list[str]:
        """Sorted class names."""
        return sorted({s.class_name for s in self._samples})

    def __len__(self) -> int:
        return len(self._samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> AnomalyDataset: ...

    def __getitem__(self, index: int | slice) -> Sample | AnomalyDataset:
        if isinstance(index, slice):
            return self._derive(self._samples[index])
        return self._samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AnomalyDataset):
            return NotImplemented
        return (self._root, self._format, self._samples) == (other._root, other._format, other._samples)

    def __hash__(self) -> int:
        return hash((self._root, self._format, self._samples))

    def _derive(self, samples: Iterable[Sample]) -> AnomalyDataset:
        return AnomalyDataset(samples, root=self._root, format=self._format)

    def counts(self) -> dict[str, dict[str, int]]:
        """Class name (sorted) -> ``{"normal": n0, "anomalous": n1}``."""
        out = {name: {"normal": 0, "anomalous": 0} for name in self.classes}
        for s in self._samples:
            out[s.class_name]["anomalous" if s.label else "normal"] += 1
        return out

    def by_class(self) -> dict[str, AnomalyDataset]:
        """Class name (sorted) -> the data set of that class's samples (in their original order)."""
        groups: dict[str, list[Sample]] = {name: [] for name in self.classes}
        for s in self._samples:
            groups[s.class_name].append(s)
        return {name: self._derive(items) for name, items in groups.items()}

    def subset(self, class_names: str | Iterable[str]) -> AnomalyDataset:
        """The samples of the given classes (a name or an iterable of names), in their original order.

        Raises:
            InvalidInputError: a name that is not a class of this data set (the message lists them).
        """
        wanted = [class_names] if isinstance(class_names, str) else list(class_names)
        available = set(self.classes)
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise InvalidInputError(
                f"Unknown class(es) {unknown} in the data set at '{self._root}'. "
                f"Available classes: {', '.join(self.classes)}."
            )
        keep = set(wanted)
        return self._derive(s for s in self._samples if s.class_name in keep)

    def __repr__(self) -> str:
        counts = self.counts()
        n_anomalous = sum(c["anomalous"] for c in counts.values())
        head = (
            f"AnomalyDataset(format={self._format!r}, root='{self._root}', {len(counts)} classes, "
            f"{len(self)} images: {len(self) - n_anomalous} normal, {n_anomalous} anomalous)"
        )
        if not counts:
            return head
        width = max(len(name) for name in counts)
        shown = list(counts.items())[:20]
        lines = [f"  {name:<{width}}  {c['normal']:>5} normal  {c['anomalous']:>5} anomalous" for name, c in shown]
        if len(counts) > len(shown):
            lines.append(f"  ... and {len(counts) - len(shown)} more classes")
        return "\n".join([head, *lines])


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; other and hidden files are ignored."""
    if not folder.is_dir():
        return []
    files = sorted((p for p in folder.iterdir() if _is_image_file(p)), key=lambda p: p.name)
    return files


def _subdirs(folder: Path) -> list[Path]:
    """Non-hidden sub-folders of ``folder``, sorted by name."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _mask_index(folder: Path) -> dict[str, Path]:
    """Stem -> mask file for the image files in ``folder`` (PNG first when a stem has several)."""
    index: dict[str, Path] = {}
    order = {suffix: i for i, suffix in enumerate(IMAGE_SUFFIXES)}
    for path in sorted(_list_images(folder), key=lambda p: (p.stem, order[p.suffix.lower()])):
        index.setdefault(path.stem, path)
    return index


def _find_mask(index: dict[str, Path], stem: str) -> Path | None:
    """``<stem>_mask.*`` if present, else ``<stem>.*`` from a :func:`_mask_index`."""
    return index.get(f"{stem}_mask", index.get(stem))


def _check_root(root: str | os.PathLike, layout: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"Data set root '{path}' does not exist. Expected layout: {layout}.")
    if not path.is_dir():
        raise DatasetError(f"Data set root '{path}' is not a folder. Expected layout: {layout}.")
    return path


def _check_split(split: str, allowed: Sequence[str], reader: str) -> None:
    if split not in allowed:
        raise InvalidInputError(f"{reader}: split must be one of {', '.join(map(repr, allowed))}, got {split!r}.")


def _finalize(
    samples: list[Sample],
    *,
    root: Path,
    format: str,
    layout: str,
    mask_hint: str,
    require_masks: bool,
    warn_single_label: bool = True,
) -> AnomalyDataset:
    """Apply the checks every reader shares and build the data set.

    Raises:
        DatasetError: no samples; anomalous images without masks when ``require_masks``.
    """
    if not samples:
        raise DatasetError(f"No images found in '{root}' ({format} layout). Expected layout: {layout}.")
    unmasked = [s.image_path for s in samples if s.label == 1 and s.mask_path is None]
    if unmasked:
        what = f"{len(unmasked)} anomalous image(s) in '{root}' have no ground-truth mask: {list_paths(unmasked)}."
        if require_masks:
            raise with_fix(
                DatasetError,
                f"{what} Expected masks {mask_hint}. Add the masks, or {{fix}} to use these images for image-level "
                "scores only (their masks are then unknown, not normal).",
                python="pass require_masks=False",
                cli="pass --no-masks",
            )
        warnings.warn(
            f"{what} They are kept with mask_path=None: image-level use only (pixel metrics skip their classes).",
            UserWarning,
            stacklevel=3,
        )
    dataset = AnomalyDataset(samples, root=root, format=format)
    if warn_single_label:
        counts = dataset.counts()
        no_anomalous = [c for c, n in counts.items() if n["anomalous"] == 0]
        no_normal = [c for c, n in counts.items() if n["normal"] == 0]
        if no_anomalous:
            warnings.warn(
                f"Class(es) {', '.join(no_anomalous)} in '{root}' have no anomalous image: image-level "
                "metrics (AUROC, AP) are undefined for them.",
                UserWarning,
                stacklevel=3,
            )
        if no_normal:
            warnings.warn(
                f"Class(es) {', '.join(no_normal)} in '{root}' have no normal image: image-level metrics "
                "(AUROC, AP) are undefined for them.",
                UserWarning,
                stacklevel=3,
            )
    logger.debug("Read %d samples (%d classes) from %s (%s)", len(dataset), len(dataset.classes), root, format)
    return dataset


def _raise_missing(paths: list[Path], what: str, source: Path) -> None:
    if paths:
        raise DatasetError(
            f"{len(paths)} {what} listed in '{source}' do not exist: {list_paths(paths)}. "
            "Check that the paths in the listing are relative to the data set root and that the files are there."
        )


# --------------------------------------------------------------------------------------------
# MVTec AD
# --------------------------------------------------------------------------------------------


def _read_mvtec_class(class_dir: Path, class_name: str, split: str) -> list[Sample]:
    split_dir = class_dir / split
    samples = [Sample(p, None, 0, class_name, NORMAL_DEFECT) for p in _list_images(split_dir / NORMAL_DEFECT)]
    if split == "train":
        return samples
    for defect_dir in _subdirs(split_dir):
        defect = defect_dir.name
        if defect == NORMAL_DEFECT:
            continue
        masks = _mask_index(class_dir / _GROUND_TRUTH / defect)
        samples.extend(Sample(p, _find_mask(masks, p.stem), 1, class_name, defect) for p in _list_images(defect_dir))
    return samples


def read_mvtec(root: str | os.PathLike, split: str = "test", *, require_masks: bool = True) -> AnomalyDataset:
    """Read the MVTec AD layout.

    ``<root>/<class>/<split>/good/*`` are normal; ``<root>/<class>/test/<defect>/<stem>.*`` are
    anomalous with masks ``<root>/<class>/ground_truth/<defect>/<stem>_mask.png`` (``<stem>.png``
    is accepted too). Classes are the sub-folders of ``root`` that contain ``<split>/``; ``root``
    may also be a single class folder (one that contains ``<split>/good/``). Other layouts in the
    MVTec style (MPDD, BTAD, MVTec 3D's RGB images, ...) read the same way.

    Args:
        root: the data set folder.
        split: ``"test"`` (normal and anomalous) or ``"train"`` (the normal ``good`` images only).
        require_masks: raise if an anomalous image has no mask (else warn and keep it mask-less).

    Raises:
        DatasetError: missing root, no images, or missing masks (see the module docstring).
    """
    _check_split(split, ("test", "train"), "read_mvtec")
    layout = _MVTEC_LAYOUT.format(split=split)
    path = _check_root(root, layout)
    if (path / split / NORMAL_DEFECT).is_dir():
        class_dirs = [path]
    else:
        class_dirs = [d for d in _subdirs(path) if (d / split).is_dir()]
    samples: list[Sample] = []
    empty: list[str] = []
    for class_dir in class_dirs:
        found = _read_mvtec_class(class_dir, class_dir.name, split)
        if not found:
            empty.append(class_dir.name)
        samples.extend(found)
    if empty and samples:
        warnings.warn(
            f"Class folder(s) {', '.join(empty)} in '{path}' hold no images under {split}/; they are skipped.",
            UserWarning,
            stacklevel=2,
        )
    return _finalize(
        samples,
        root=path,
        format="mvtec",
        layout=layout,
        mask_hint="at <root>/<class>/ground_truth/<defect>/<stem>_mask.png",
        require_masks=require_masks,
        warn_single_label=split != "train",
    )


# --------------------------------------------------------------------------------------------
# VisA
# --------------------------------------------------------------------------------------------

_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_VISA_LABELS = {"normal": 0, "anomaly": 1}


def read_visa(
    root: str | os.PathLike,
    split: str = "test",
    split_csv: str | os.PathLike = "split_csv/1cls.csv",
    *,
    require_masks: bool = True,
) -> AnomalyDataset:
    """Read VisA through its split CSV.

    The CSV (``split_csv``, relative to ``root`` unless absolute) has the columns
    ``object,split,label,image,mask``; ``label`` is ``normal`` or ``anomaly``; ``image`` and
    ``mask`` are paths relative to ``root``, ``mask`` empty for normal images. Rows keep the
    CSV's order. VisA has no defect types: anomalous samples get ``defect="anomaly"``. Masks
    listed for normal images are ignored.

    Args:
        root: the VisA folder (the one holding ``split_csv/`` and the class folders).
        split: the value of the ``split`` column to read (``"test"`` or ``"train"`` in VisA).
        split_csv: the split CSV.
        require_masks: raise if an anomalous image has an empty mask column (else warn).

    Raises:
        DatasetError: missing root or CSV, malformed CSV, listed files missing, no rows for the
            split, or missing masks.
    """
    layout = f"<root>/{Path(split_csv).as_posix()} with columns {','.join(_VISA_COLUMNS)}"
    path = _check_root(root, layout)
    csv_path = path / split_csv
    if not csv_path.is_file():
        raise DatasetError(
            f"VisA split CSV '{csv_path}' not found. VisA ships it as split_csv/1cls.csv (from the VisA "
            "repository); pass split_csv=... if yours is elsewhere."
        )
    samples: list[Sample] = []
    missing_images: list[Path] = []
    missing_masks: list[Path] = []
    splits_seen: set[str] = set()
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        absent = [c for c in _VISA_COLUMNS if c not in header]
        if absent:
            raise DatasetError(
                f"VisA split CSV '{csv_path}' lacks the column(s) {absent}; it has {header}. "
                f"Expected the columns {','.join(_VISA_COLUMNS)}."
            )
        reader.fieldnames = header
        for line, row in enumerate(reader, start=2):
            row_split = (row["split"] or "").strip()
            splits_seen.add(row_split)
            if row_split != split:
                continue
            label_text = (row["label"] or "").strip().lower()
            if label_text not in _VISA_LABELS:
                raise DatasetError(
                    f"'{csv_path}' line {line}: label {row['label']!r} is neither 'normal' nor 'anomaly'."
                )
            label = _VISA_LABELS[label_text]
            image_rel = (row["image"] or "").strip()
            if not image_rel:
                raise DatasetError(f"'{csv_path}' line {line}: the image column is empty.")
            image = path / image_rel
            if not image.is_file():
                missing_images.append(image)
            mask_rel = (row["mask"] or "").strip()
            mask: Path | None = None
            if label == 1 and mask_rel:
                mask = path / mask_rel
                if not mask.is_file():
                    missing_masks.append(mask)
            defect = "anomaly" if label else NORMAL_DEFECT
            samples.append(Sample(image, mask, label, (row["object"] or "").strip(), defect))
    _raise_missing(missing_images, "image file(s)", csv_path)
    _raise_missing(missing_masks, "mask file(s)", csv_path)
    if not samples:
        raise DatasetError(
            f"No rows with split {split!r} in '{csv_path}' (splits present: {sorted(splits_seen)}). "
            "Pass split=... with one of those."
        )
    return _finalize(
        samples,
        root=path,
        format="visa",
        layout=layout,
        mask_hint=f"in the mask column of '{csv_path}'",
        require_masks=require_masks,
        warn_single_label=split != "train",
    )


# --------------------------------------------------------------------------------------------
# Official meta.json
# --------------------------------------------------------------------------------------------

_META_KEYS = ("img_path", "mask_path", "anomaly")


def read_meta(
    root: str | os.PathLike,
    meta: str | os.PathLike = "meta.json",
    split: str = "test",
    *,
    require_masks: bool = True,
) -> AnomalyDataset:
    """Read the official AnomalyCLIP repository's ``meta.json``.

    Its structure is ``{"train" | "test": {class: [{"img_path", "mask_path", "cls_name",
    "specie_name", "anomaly"}, ...]}}`` with paths relative to ``root``. ``anomaly`` is 0 or 1,
    ``specie_name`` is the defect type (``"good"`` is used for normal images whatever it says;
    an empty one on an anomalous image becomes ``"anomaly"``), ``cls_name`` the class (default:
    the key). An anomalous entry whose ``mask_path`` is empty or names a folder has no mask (the
    official code scores it with an all-zero mask "for classification"); here it is mask-less.
    Entries keep the file's order, classes in sorted order.

    Args:
        root: the data set folder.
        meta: the JSON file, relative to ``root`` unless absolute.
        split: the top-level key to read.
        require_masks: raise if an anomalous entry has no mask (else warn).

    Raises:
        DatasetError: missing root or file, invalid JSON or structure, listed files missing, an
            empty split, or missing masks.
    """
    layout = '<root>/meta.json: {"test": {class: [{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}]}}'
    path = _check_root(root, layout)
    meta_path = path / meta
    if not meta_path.is_file():
        raise DatasetError(
            f"meta file '{meta_path}' not found. The official AnomalyCLIP repository writes it with "
            "generate_dataset_json/<dataset>.py; pass meta=... if yours has another name."
        )
    try:
        content = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"'{meta_path}' is not valid JSON: {exc}.") from exc
    if not isinstance(content, dict):
        raise DatasetError(f"'{meta_path}' must hold a JSON object with 'train'/'test' keys.")
    if split not in content:
        raise DatasetError(
            f"'{meta_path}' has no split {split!r} (it has {sorted(map(str, content))}). Pass split=... with one of those."
        )
    classes = content[split]
    if not isinstance(classes, dict):
        raise DatasetError(f"'{meta_path}': {split!r} must map class names to lists of entries.")
    samples: list[Sample] = []
    missing_images: list[Path] = []
    missing_masks: list[Path] = []
    for key in sorted(classes):
        entries = classes[key]
        if not isinstance(entries, list):
            raise DatasetError(f"'{meta_path}': {split}/{key} must be a list of entries.")
        for i, entry in enumerate(entries):
            where = f"'{meta_path}' {split}/{key}[{i}]"
            if not isinstance(entry, dict):
                raise DatasetError(f"{where} must be an object with the keys {list(_META_KEYS)}.")
            absent = [k for k in _META_KEYS if k not in entry]
            if absent:
                raise DatasetError(f"{where} lacks the key(s) {absent}.")
            anomaly = entry["anomaly"]
            if isinstance(anomaly, bool) or anomaly not in (0, 1):
                raise DatasetError(f"{where}: 'anomaly' must be 0 or 1, got {anomaly!r}.")
            label = int(anomaly)
            image = path / str(entry["img_path"])
            if not image.is_file():
                missing_images.append(image)
            mask: Path | None = None
            mask_rel = str(entry["mask_path"] or "")
            if label == 1 and mask_rel:
                candidate = path / mask_rel
                if candidate.is_file():
                    mask = candidate
                elif not candidate.is_dir():
                    missing_masks.append(candidate)
            specie = str(entry.get("specie_name") or "")
            defect = NORMAL_DEFECT if label == 0 else (specie or "anomaly")
            class_name = str(entry.get("cls_name") or key)
            samples.append(Sample(image, mask, label, class_name, defect))
    _raise_missing(missing_images, "image file(s)", meta_path)
    _raise_missing(missing_masks, "mask file(s)", meta_path)
    if not samples:
        raise DatasetError(f"'{meta_path}' lists no entries under {split!r}.")
    return _finalize(
        samples,
        root=path,
        format="meta",
        layout=layout,
        mask_hint=f"as mask_path in '{meta_path}'",
        require_masks=require_masks,
        warn_single_label=split != "train",
    )


# --------------------------------------------------------------------------------------------
# Plain folders
# --------------------------------------------------------------------------------------------


def _read_folder_class(class_dir: Path, class_name: str) -> list[Sample]:
    samples = [Sample(p, None, 0, class_name, NORMAL_DEFECT) for p in _list_images(class_dir / NORMAL_DEFECT)]
    for defect_dir in _subdirs(class_dir):
        defect = defect_dir.name
        if defect in (NORMAL_DEFECT, _GROUND_TRUTH):
            continue
        masks = _mask_index(class_dir / _GROUND_TRUTH / defect)
        images = _list_images(defect_dir)
        if not images:
            logger.debug("Folder %s holds no images; skipped.", defect_dir)
        samples.extend(Sample(p, _find_mask(masks, p.stem), 1, class_name, defect) for p in images)
    return samples


def read_folder(
    root: str | os.PathLike, class_name: str | None = None, *, require_masks: bool = True
) -> AnomalyDataset:
    """Read a plain folder of images sorted into ``good/`` and defect folders.

    Rule: if ``<root>/good/`` exists, ``root`` is one class: ``good/*`` are normal, every other
    sub-folder except ``ground_truth/`` is a defect type whose images are anomalous, with optional
    masks ``<root>/ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``). Otherwise every
    sub-folder of ``root`` that contains ``good/`` is such a class folder, named after it (other
    sub-folders are ignored).

    Args:
        root: a class folder, or a folder of class folders.
        class_name: the class name of a single class folder (default: the folder's name). Not
            allowed for a folder of class folders (select classes with ``.subset(...)``).
        require_masks: raise if an anomalous image has no mask; pass ``False`` for folders
            without masks (image-level use; a warning lists the mask-less images).

    Raises:
        DatasetError: missing root, no class folder, no images, or missing masks.
        InvalidInputError: ``class_name`` given for a folder of class folders.
    """
    path = _check_root(root, _FOLDER_LAYOUT)
    if (path / NORMAL_DEFECT).is_dir():
        samples = _read_folder_class(path, class_name or path.name)
    else:
        class_dirs = [d for d in _subdirs(path) if (d / NORMAL_DEFECT).is_dir()]
        if not class_dirs:
            raise DatasetError(
                f"'{path}' has no good/ folder and no sub-folder with a good/ folder. Expected layout: {_FOLDER_LAYOUT}."
            )
        if class_name is not None:
            raise InvalidInputError(
                f"class_name={class_name!r} applies to a single class folder, but '{path}' holds the class "
                f"folders {[d.name for d in class_dirs]}. Leave class_name out and use .subset([...]) to select classes."
            )
        samples = [s for d in class_dirs for s in _read_folder_class(d, d.name)]
    return _finalize(
        samples,
        root=path,
        format="folder",
        layout=_FOLDER_LAYOUT,
        mask_hint="at <class folder>/ground_truth/<defect>/<stem>_mask.png (or <stem>.png)",
        require_masks=require_masks,
    )


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def load_dataset(
    root: str | os.PathLike,
    format: str,
    *,
    split: str = "test",
    require_masks: bool = True,
) -> AnomalyDataset:
    """Read a data set in one of the :data:`FORMATS` with its reader's default options.

    Args:
        root: the data set folder.
        format: ``"mvtec"`` (:func:`read_mvtec`), ``"visa"`` (:func:`read_visa`, with
            ``split_csv/1cls.csv``), ``"meta"`` (:func:`read_meta`, with ``meta.json``) or
            ``"folder"`` (:func:`read_folder`); case-insensitive.
        split: the split to read; ignored by ``"folder"``, which has none.
        require_masks: raise if an anomalous image has no mask; ``False`` keeps it mask-less for
            image-level use, with a warning.

    Raises:
        InvalidInputError: an unknown format (the message lists the valid ones).
        DatasetError: see the readers.
    """
    name = str(format).strip().lower()
    if name == "mvtec":
        return read_mvtec(root, split, require_masks=require_masks)
    if name == "visa":
        return read_visa(root, split, require_masks=require_masks)
    if name == "meta":
        return read_meta(root, split=split, require_masks=require_masks)
    if name == "folder":
        return read_folder(root, require_masks=require_masks)
    raise InvalidInputError(f"Unknown data set format {format!r}. Valid formats: {', '.join(FORMATS)}.")


# --------------------------------------------------------------------------------------------
# Few-shot references: each class's normal training images
# --------------------------------------------------------------------------------------------


def load_reference_pool(root: str | os.PathLike, format: str, *, split: str = "train") -> AnomalyDataset:
    """The normal images that few-shot references are drawn from, per class.

    - ``"mvtec"``: ``<class>/train/good/`` (:func:`read_mvtec` with ``split="train"``);
    - ``"visa"``: the ``normal`` rows of the ``train`` split of ``split_csv/1cls.csv``;
    - ``"meta"``: the normal entries of the ``"train"`` split of ``meta.json``;
    - ``"folder"``: the ``good/`` images (a plain folder has no training split: the evaluation
      holds the drawn images out of the test set, see :func:`anomalyclip.evaluate`).

    Args:
        root: the data set folder.
        format: one of :data:`FORMATS`.
        split: the training split's name (``"mvtec"``, ``"visa"``, ``"meta"``).

    Raises:
        DatasetError: no normal training images (the message names the layout expected).
    """
    name = str(format).strip().lower()
    if name not in FORMATS:
        raise InvalidInputError(f"Unknown data set format {format!r}. Valid formats: {', '.join(FORMATS)}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # normal-only by design; anomalies are dropped
            if name == "folder":
                dataset = read_folder(root, require_masks=False)
            else:
                dataset = load_dataset(root, name, split=split, require_masks=False)
    except DatasetError as exc:
        raise DatasetError(
            f"Few-shot references are drawn from the normal images of each class's {split!r} split, which "
            f"could not be read: {exc}"
        ) from exc
    normals = [s for s in dataset if s.label == 0]
    if not normals:
        raise DatasetError(f"The {split!r} split of '{root}' ({name} layout) has no normal images to draw references from.")
    return AnomalyDataset(normals, root=dataset.root, format=dataset.format)


def draw_shots(pool: AnomalyDataset, class_name: str, shots: int, seed: int = 0) -> list[Sample]:
    """``shots`` normal images of ``class_name`` drawn without replacement from ``pool``.

    The draw depends only on ``(seed, class_name)`` and the pool's order (readers list files
    sorted): ``numpy.random.default_rng([seed, crc32(class_name)]).choice(n, shots, replace=False)``.

    Raises:
        InvalidInputError: ``shots`` is not a positive int.
        DatasetError: the class has no or too few normal images in the pool.
    """
    import zlib

    import numpy as np

    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise InvalidInputError(f"shots must be a positive int, got {shots!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed must be an int >= 0, got {seed!r}.")
    candidates = [s for s in pool if s.class_name == class_name and s.label == 0]
    if len(candidates) < shots:
        raise DatasetError(
            f"Class {class_name!r} has {len(candidates)} normal training image(s) in '{pool.root}', fewer than "
            f"shots={shots}. Use fewer shots or add normal images to its training split."
        )
    rng = np.random.default_rng([int(seed), zlib.crc32(class_name.encode("utf-8"))])
    return [candidates[int(i)] for i in rng.choice(len(candidates), size=shots, replace=False)]
