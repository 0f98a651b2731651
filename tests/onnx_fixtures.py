"""ONNX exports of the golden model, made once per configuration for the whole test session.

An export of the tiny golden CLIP costs seconds of ``torch.export`` and onnxscript rewriting
whatever the image size, so every test that runs an exported file asks :func:`exported` for
its configuration ``(image size, output layers, few-shot setup, export options)`` and gets the
same file as every other test with that configuration. Under pytest-xdist the workers share
one folder: the first worker to need a configuration exports it (under a file lock), the others
wait for it and read the same file.

Its fixtures (``onnx_model``, ``exported``) are imported into ``tests/conftest.py`` for every test module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

# The golden files, as tests/conftest.py names them (which imports this module: no import back).
_GOLDEN = Path(__file__).parent / "fixtures" / "golden"
OFFICIAL_PTH = _GOLDEN / "official_prompt_learner.pth"
IMAGE_A, IMAGE_B = _GOLDEN / "image_a.png", _GOLDEN / "image_b.png"
TINY_CLIP_REF = f"local-dir:{_GOLDEN / 'tiny-clip'}"

#: Output layers of the exports: the last layer only, or four.
LAYERS = {"top": (24,), "multi": (6, 12, 18, 24)}

#: Few-shot setups of the exports: the reference images, their storage dtype and the rows per
#: block of the nearest-neighbour search (None: the default budget, one block here; 300: uneven
#: blocks, so the graph's block loop and the torch model's chunked search are both exercised).
#: The defective golden image A is never a reference, so it keeps a visible reference map.
REFERENCES = {
    "float32": dict(images=lambda: [IMAGE_B], storage_dtype="float32", rows=None),
    "float16-blocks": dict(
        images=lambda: [np.asarray(Image.open(IMAGE_B))[::-1].copy(), np.asarray(Image.open(IMAGE_B))[:, ::-1].copy()],
        storage_dtype="float16",
        rows=300,
    ),
}


@contextlib.contextmanager
def configured(model, size: int, variant: str, references: str | None = None) -> Iterator:
    """The golden model at ``size`` / ``variant``, with the few-shot setup ``references``; restored after."""
    model.reconfigure(image_size=size, feature_layers=LAYERS[variant])
    try:
        if references is not None:
            setup = REFERENCES[references]
            model.add_references(setup["images"](), storage_dtype=setup["storage_dtype"])
            if setup["rows"] is not None:
                model.references.chunk_elements = setup["rows"] * (size // model.patch_size) ** 2
        yield model
    finally:
        model.clear_references()
        model.reconfigure(image_size=518, feature_layers=(24,))


#: Parity cases of every backend: two sizes, one and four layers, without and with few-shot references.
PARITY_CASES = [(size, variant, None) for size in (224, 518) for variant in LAYERS] + [
    (224, "top", "float32"),
    (224, "multi", "float16-blocks"),
    (518, "top", "float16-blocks"),
    (518, "multi", "float32"),
]
#: The parity batch: both golden images, the defective one twice (batch 3 through a batch-2 example).
BATCH_3 = [IMAGE_A, IMAGE_B, IMAGE_A]

_TORCH_OUTPUTS: dict[tuple, tuple] = {}


def torch_reference(model, size: int, variant: str, images, references: str | None = None):
    """``(pixel_values, model(pixel_values), model.predict(images))`` of the torch model so configured,
    computed once per configuration and image list in a session (read-only: do not modify them)."""
    key = (id(model), size, variant, references, tuple(str(i) for i in images))
    if key not in _TORCH_OUTPUTS:
        with configured(model, size, variant, references):
            pixel_values = model.preprocess(images)
            with torch.inference_mode():
                out = model(pixel_values)
            results = model.predict(images)
        _TORCH_OUTPUTS[key] = (pixel_values, out, results)
    return _TORCH_OUTPUTS[key]


def max_abs(a, b) -> float:
    """Largest absolute difference of two arrays of the same shape (float64)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def _shared_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the session: under xdist, the one all workers' temp folders sit in."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / "onnx-exports"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def onnx_model():
    """A private golden model for the ONNX tests (float32, CPU), reconfigured per export and per
    torch reference by :func:`configured` and always restored: tests may set and reset its
    thresholds, never leave them."""
    from anomalyclip import AnomalyCLIP

    return AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=TINY_CLIP_REF, device="cpu")


@pytest.fixture(scope="session")
def exported(onnx_model, tmp_path_factory) -> Callable[..., Path]:
    """``exported(size, variant, references=None, **options)`` -> the path of the export of the
    golden model at that configuration (``options``: those of ``export_onnx``, e.g. ``dtype``),
    made once for the session."""
    pytest.importorskip("onnxscript")
    from filelock import FileLock

    folder = _shared_folder(tmp_path_factory)
    made: dict[tuple, Path] = {}

    def get(size: int, variant: str, references: str | None = None, **options) -> Path:
        key = (size, variant, references, tuple(sorted(options.items())))
        if key not in made:
            digest = hashlib.sha1(repr(key).encode()).hexdigest()[:10]
            path = folder / f"golden-{size}-{variant}-{references or 'zero-shot'}-{digest}.onnx"
            with FileLock(str(path) + ".lock"):
                if not path.exists():  # the writer renames into place: an existing file is complete
                    with configured(onnx_model, size, variant, references):
                        onnx_model.export_onnx(path, image_size=size, feature_layers=LAYERS[variant], **options)
            made[key] = path
        return made[key]

    return get
