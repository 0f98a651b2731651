"""ONNX exports of the golden model, made once per configuration for the whole test session.

An export of the tiny golden CLIP costs 15-20 CPU-seconds of ``torch.export`` and onnxscript
rewriting whatever the image size, so the suite makes as few as it can: every test that runs an
exported file asks :func:`exported` for its configuration ``(image size, output layers,
few-shot setup, export options)`` and gets the same file as every other test with that
configuration, and the tests ask for few configurations (:data:`PARITY_CASES`, :data:`ANY`).
Under pytest-xdist the workers share one folder: the first worker to need a file makes it
(under a file lock), the others wait for it and read the same file.

One configuration is made as a user deploys an inspection profile: the configured model with
thresholds (:func:`profile_thresholds`) saved by ``save_pretrained`` (:func:`saved_profile`),
then exported by the command line, ``anomalyclip export --model PROFILE`` (``exported(...,
profile=True)``). It is a parity case like the others, and the CLI, ``predict --model FILE.onnx``
and predictor-core tests read the same profile and file.

Its fixtures (``onnx_model``, ``onnx_folder``, ``torch_reference``, ``saved_profile``, ``exported``) are imported into
``tests/conftest.py`` for every test module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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


_CONFIGURED: set[int] = set()


@contextlib.contextmanager
def configured(model, size: int, variant: str, references: str | None = None) -> Iterator:
    """The golden model at ``size`` / ``variant``, with the few-shot setup ``references``; restored after.

    Not nested on one model: the fixtures below configure the session's model when they make
    something, so call them before a ``configured`` block of that model, not inside it."""
    assert id(model) not in _CONFIGURED, "configured() inside configured() on the same model: make what you need first"
    _CONFIGURED.add(id(model))
    model.reconfigure(image_size=size, feature_layers=LAYERS[variant])
    try:
        if references is not None:
            setup = REFERENCES[references]
            model.add_references(setup["images"](), storage_dtype=setup["storage_dtype"])
            if setup["rows"] is not None:
                model.references.chunk_elements = setup["rows"] * (size // model.patch_size) ** 2
        yield model
    finally:
        model.thresholds = None
        model.clear_references()
        model.reconfigure(image_size=518, feature_layers=(24,))
        _CONFIGURED.discard(id(model))


#: The configuration of the session's inspection profile (:func:`saved_profile`), exported by the CLI.
PROFILE = (224, "multi", "float32")

#: Parity cases of every backend, ``(size, variant, references, exported options)``: a covering
#: design of the settings that change the graph rather than their full product (each export
#: costs 15-20 CPU-seconds). Each size, each layer setup and each few-shot setup appears, and
#: each size with both layer setups: 518 px zero-shot with one and four layers (the official
#: golden outputs are at 518 px), 224 px with one layer and two float16-stored references in
#: uneven blocks (the standardized fusion, the graph's block loop), and 224 px with four layers
#: and one float32 reference (the plain sum), this one the CLI's export of the saved profile.
PARITY_CASES = [
    pytest.param(518, "top", None, {}, id="518-top-zero-shot"),
    pytest.param(518, "multi", None, {}, id="518-multi-zero-shot"),
    pytest.param(224, "top", "float16-blocks", {}, id="224-top-float16-blocks"),
    pytest.param(*PROFILE, {"profile": True}, id="224-multi-float32-cli-profile"),
]
#: The export for tests that need any valid file (loading, refusals, threads): the smallest
#: parity case, so such tests add no export of their own.
ANY = (224, "top", "float16-blocks")
#: The parity batch: both golden images, the defective one twice (batch 3 through a batch-2 example).
BATCH_3 = [IMAGE_A, IMAGE_B, IMAGE_A]


def _take(out, index: list[int]):
    """The :class:`~anomalyclip.outputs.AnomalyOutput` of the batch rows ``index`` of ``out``."""
    from anomalyclip.outputs import AnomalyOutput

    def take(value):
        if isinstance(value, dict):
            return {key: tensor[index] for key, tensor in value.items()}
        return None if value is None else value[index]

    return AnomalyOutput(**{f.name: take(getattr(out, f.name)) for f in dataclasses.fields(out)})


def max_abs(a, b) -> float:
    """Largest absolute difference of two arrays of the same shape (float64)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def profile_thresholds(model, defective_score: float):
    """Thresholds for the configured golden model with margins on both golden images: the image
    threshold halfway between the normal image B's score (its ``calibrate(quantile=1.0)``) and
    ``defective_score``, the defective image A's, the pixel threshold 0.25 above B's largest map
    value. No image's own score or map maximum is on a threshold (where another CPU's rounding
    would flip it)."""
    from anomalyclip import Thresholds

    calibrated = model.calibrate([IMAGE_B], quantile=1.0)
    assert defective_score - calibrated.image > 0.02, (defective_score, calibrated.image)
    return Thresholds(image=(calibrated.image + defective_score) / 2, pixel=calibrated.pixel + 0.25)


def made_once(path: Path, make: Callable[[Path], object]) -> Path:
    """``path``, made by ``make(path)`` unless it exists, once for all xdist workers (a file lock).

    ``make`` must put ``path`` in place last and whole (an existing path is complete)."""
    from filelock import FileLock

    with FileLock(str(path) + ".lock"):
        if not path.exists():
            make(path)
    return path


@pytest.fixture(scope="session")
def onnx_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the session's exports: under xdist, the one all workers' temp folders sit in."""
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
def torch_reference(onnx_model, onnx_folder) -> Callable[..., tuple]:
    """``torch_reference(size, variant, references=None)`` -> ``(pixel_values, model(pixel_values),
    predicted)`` of the golden torch model so configured for the images :data:`BATCH_3`, made
    once for the session and shared by the xdist workers (read-only: do not modify them).

    ``predicted``: per image, what ``model.predict`` gives without thresholds, ``.score`` and
    ``.anomaly_map`` at the image's size: the forward's map resized by ``F.interpolate``
    (bilinear, ``align_corners=False``), as ``AnomalyCLIP.predict`` resizes it (a second torch
    forward of the same images would give the same). The model runs on the two distinct images A
    and B; the third row is A's again (a batch of 3 changes nothing in the torch model, and the
    torch forward is the costliest part of a parity check after the export)."""
    cache: dict[tuple, tuple] = {}

    def get(size: int, variant: str, references: str | None = None) -> tuple:
        key = (size, variant, references)
        if key not in cache:
            path = onnx_folder / f"torch-{size}-{variant}-{references or 'zero-shot'}.pickle"

            def make(path: Path) -> None:
                with configured(onnx_model, size, variant, references):
                    pixel_values = onnx_model.preprocess([IMAGE_A, IMAGE_B])
                    with torch.inference_mode():
                        out = onnx_model(pixel_values)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(pickle.dumps((pixel_values, out)))
                os.replace(tmp, path)

            pixel_values, out = pickle.loads(made_once(path, make).read_bytes())
            predicted = []
            for i, image in enumerate([IMAGE_A, IMAGE_B]):
                width, height = Image.open(image).size
                resized = F.interpolate(out.anomaly_maps[i][None, None], size=(height, width), mode="bilinear", align_corners=False)
                predicted.append(SimpleNamespace(score=float(out.scores[i]), anomaly_map=resized[0, 0].numpy()))
            again = [0, 1, 0]  # BATCH_3 = A, B, A
            cache[key] = (pixel_values[again], _take(out, again), [predicted[i] for i in again])
        return cache[key]

    return get


@pytest.fixture(scope="session")
def saved_profile(onnx_model, onnx_folder, torch_reference) -> Callable[..., Path]:
    """``saved_profile(size, variant, references)`` -> the folder ``save_pretrained`` wrote for the
    golden model at that configuration with :func:`profile_thresholds` (prompts, references,
    thresholds), made once for the session. Load it with ``AnomalyCLIP.from_pretrained``."""

    def get(size: int, variant: str, references: str | None) -> Path:
        def make(folder: Path) -> None:  # saved beside, then renamed: an existing folder is complete
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            defective_score = float(torch_reference(size, variant, references)[1].scores[0])
            with configured(onnx_model, size, variant, references):
                onnx_model.thresholds = profile_thresholds(onnx_model, defective_score)
                onnx_model.save_pretrained(tmp)
            os.replace(tmp, folder)

        return made_once(onnx_folder / f"profile-{size}-{variant}-{references or 'zero-shot'}", make)

    return get


def _state(model) -> tuple:
    """What an export must leave as it was: settings, dtype, device, thresholds, references."""
    memory = model.references
    return (model.config, model.dtype, model.device, model.thresholds, None if memory is None else (memory.num_images, len(memory)))


@pytest.fixture(scope="session")
def exported(onnx_model, onnx_folder, saved_profile) -> Callable[..., Path]:
    """``exported(size, variant, references=None, profile=False, **options)`` -> the path of the
    export of the golden model at that configuration (``options``: those of ``export_onnx``, e.g.
    ``dtype``), made once for the session. Every export made checks that the model is left as it was.

    ``profile=True``: the file ``anomalyclip export --model PROFILE --format onnx --out FILE``
    writes (the command line, in this process) for ``saved_profile(size, variant, references)``,
    which stores the profile's thresholds (no ``options``)."""
    pytest.importorskip("onnxscript")
    made: dict[tuple, Path] = {}

    def get(size: int, variant: str, references: str | None = None, profile: bool = False, **options) -> Path:
        key = (size, variant, references, profile, tuple(sorted(options.items())))
        if key not in made:
            digest = hashlib.sha1(repr(key).encode()).hexdigest()[:10]
            kind = "cli-profile" if profile else "golden"
            path = onnx_folder / f"{kind}-{size}-{variant}-{references or 'zero-shot'}-{digest}.onnx"

            def make(path: Path) -> None:  # the writer renames into place: an existing file is complete
                if profile:
                    assert not options, "a profile's CLI export takes no options here"
                    from anomalyclip.cli import main

                    source = saved_profile(size, variant, references)
                    assert main(["-q", "export", "--model", str(source), "--format", "onnx", "--out", str(path)]) == 0
                    return
                with configured(onnx_model, size, variant, references):
                    before = _state(onnx_model)
                    onnx_model.export_onnx(path, image_size=size, feature_layers=LAYERS[variant], **options)
                    assert _state(onnx_model) == before, "export_onnx changed the model"

            made[key] = made_once(path, make)
        return made[key]

    return get
