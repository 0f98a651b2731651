"""Run an exported AnomalyCLIP with onnxruntime, numpy and Pillow: no torch, no open_clip.

:class:`OnnxAnomalyCLIP` mirrors the torch model's API: ``preprocess`` (the same numpy/Pillow
preprocessing, :func:`anomalyclip.preprocessing.preprocess_array`), ``run`` (the graph on
``[B, 3, S, S]``) and ``predict`` (paths, PIL images or arrays in, the same
:class:`~anomalyclip.AnomalyResult` objects out, built by the same
:meth:`~anomalyclip.AnomalyResult.from_map`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import CheckpointError, InvalidInputError, MissingDependencyError, WeightsNotFoundError
from ..outputs import AnomalyResult
from ..decoding import ImageReadOptions
from ..preprocessing import ImageInput, PreparedImage, check_image_size, prepare_image, preprocess_array
from .metadata import INPUT_NAME, OUTPUT_NAMES, OnnxMetadata

__all__ = ["OnnxAnomalyCLIP", "DEFAULT_PROVIDERS"]

#: Providers tried in this order when none are given (those this onnxruntime build has).
#: TensorRT is left to an explicit choice: it builds an engine on first use (minutes).
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            'OnnxAnomalyCLIP needs onnxruntime: pip install "anomalyclip[onnx]" (or onnxruntime-gpu for CUDA / TensorRT).'
        ) from exc
    return onnxruntime


def _is_image_list(images: Any) -> bool:
    return isinstance(images, (list, tuple))


class OnnxAnomalyCLIP:
    """An exported AnomalyCLIP (``anomalyclip export`` / ``AnomalyCLIP.export_onnx``) run by onnxruntime.

    Typical use::

        from anomalyclip.onnx import OnnxAnomalyCLIP
        model = OnnxAnomalyCLIP("anomalyclip.onnx")               # CPU, or CUDA with onnxruntime-gpu
        result = model.predict("part.png")                         # AnomalyResult(score, anomaly_map)

    Args:
        path: the ``.onnx`` file (with its ``.onnx.data`` next to it, for exports over 2 GiB).
        providers: onnxruntime execution providers in order of preference, names or
            ``(name, options)`` pairs, e.g. ``["TensorrtExecutionProvider",
            "CUDAExecutionProvider", "CPUExecutionProvider"]``. Default: CUDA if this
            onnxruntime build has it, then CPU.
        threads: onnxruntime intra-op threads (CPU); default: onnxruntime's (all cores).
        session_options: an ``onnxruntime.SessionOptions`` for full control (``threads`` is
            applied on top of it).

    Raises:
        WeightsNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not ONNX, or not an anomalyclip export, or of a newer format.
        InvalidInputError: a provider this onnxruntime build does not have.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        *,
        threads: int | None = None,
        session_options: Any = None,
    ) -> None:
        ort = _import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsNotFoundError(
                f"No ONNX file at '{self.path}'. Export one with `anomalyclip export --model MODEL --format onnx "
                f"--out {self.path.name}` (or AnomalyCLIP.export_onnx) and copy it here."
            )
        if session_options is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # onnxruntime's own warnings (graph rewrites it skips) are noise here
        else:
            options = session_options
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise InvalidInputError(f"threads must be a positive int, got {threads!r}.")
            options.intra_op_num_threads = threads
        providers = self._resolve_providers(ort, providers)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"onnxruntime cannot load '{self.path}': {reason}. Expected an ONNX file written by `anomalyclip export` "
                "(a damaged or partial copy fails like this: copy it again, with its .onnx.data file if it has one)."
            ) from exc
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = OnnxMetadata.from_props(props, str(self.path))
        self._check_signature()

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _resolve_providers(ort: Any, providers: Sequence[str | tuple[str, dict]] | None) -> list:
        available = ort.get_available_providers()
        if providers is None:
            return [p for p in DEFAULT_PROVIDERS if p in available]
        if isinstance(providers, str):
            providers = [providers]
        resolved = list(providers)
        for entry in resolved:
            name = entry[0] if isinstance(entry, tuple) else entry
            if name not in available:
                raise InvalidInputError(
                    f"onnxruntime provider {name!r} is not available in this onnxruntime build (available: "
                    f"{', '.join(available)}). CUDA and TensorRT need the onnxruntime-gpu package "
                    "(pip install onnxruntime-gpu) and a matching CUDA / TensorRT installation."
                )
        if not resolved:
            raise InvalidInputError("providers is empty; pass None for the default or e.g. ['CPUExecutionProvider'].")
        return resolved

    def _check_signature(self) -> None:
        size = self.metadata.image_size
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        expected_shape = [3, size, size]
        if (
            len(inputs) != 1
            or inputs[0].name != INPUT_NAME
            or len(inputs[0].shape) != 4
            or list(inputs[0].shape[1:]) != expected_shape
        ):
            found = [(i.name, i.shape) for i in inputs]
            raise CheckpointError(
                f"'{self.path}': expected one input '{INPUT_NAME}' of shape [B, 3, {size}, {size}], found {found}; "
                "the file does not match its anomalyclip metadata. Re-export it."
            )
        names = [o.name for o in outputs]
        if any(name not in names for name in OUTPUT_NAMES):
            raise CheckpointError(f"'{self.path}': expected outputs {list(OUTPUT_NAMES)}, found {names}. Re-export it.")

    # ------------------------------------------------------------------ properties
    @property
    def image_size(self) -> int:
        """The processing size S fixed at export."""
        return self.metadata.image_size

    @property
    def num_references(self) -> int:
        """How many few-shot reference images the export holds (0: zero-shot)."""
        return self.metadata.references

    @property
    def map_range(self) -> tuple[float, float]:
        """The anomaly maps' range, ``(0, n)`` for n output layers or ``(0, 3 n)`` with references:
        a fixed overlay colour scale, as ``AnomalyCLIP.map_range``."""
        return self.metadata.map_range

    @property
    def providers(self) -> list[str]:
        """The execution providers the session uses, in order."""
        return list(self.session.get_providers())

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"OnnxAnomalyCLIP('{self.path}', image_size={m.image_size}, feature_layers={list(m.feature_layers)}, "
            f"dtype={m.dtype}{', ' + m.quantization if m.quantization else ''}"
            f"{f', references={m.references}' if m.references else ''}, providers={self.providers})"
        )

    # ------------------------------------------------------------------ array API
    def _prepare(self, image: ImageInput, read_options: ImageReadOptions | None = None) -> PreparedImage:
        return check_image_size(prepare_image(image, read_options), self.metadata.patch_size)

    def _preprocess_prepared(self, prepared: PreparedImage) -> np.ndarray:
        m = self.metadata
        return preprocess_array(prepared, m.image_size, m.mean, m.std)

    def preprocess(
        self, images: ImageInput | Sequence[ImageInput], *, read_options: ImageReadOptions | None = None
    ) -> np.ndarray:
        """Images -> normalized float32 ``[B, 3, S, S]`` (the torch model's preprocessing, in numpy;
        files read as ``read_options`` say, see :class:`~anomalyclip.ImageReadOptions`)."""
        items = list(images) if _is_image_list(images) else [images]
        if not items:
            raise InvalidInputError("Got an empty list of images; pass at least one image.")
        return np.stack([self._preprocess_prepared(self._prepare(img, read_options)) for img in items])

    def run(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores and maps of preprocessed images.

        Args:
            pixel_values: float ``[B, 3, S, S]`` from :meth:`preprocess`.

        Returns:
            ``(scores [B], anomaly_maps [B, S, S])``, float32 numpy arrays at the processing size.
        """
        size = self.metadata.image_size
        if not isinstance(pixel_values, np.ndarray):
            raise InvalidInputError(
                f"run() takes a numpy array [B, 3, {size}, {size}] (see .preprocess), got {type(pixel_values).__name__}; "
                "for paths, PIL images or arrays use .predict()."
            )
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise InvalidInputError(f"Expected pixel_values of shape [B, 3, {size}, {size}], got {list(pixel_values.shape)}.")
        if pixel_values.shape[0] == 0:
            raise InvalidInputError("Got an empty batch (B = 0).")
        if pixel_values.shape[2:] != (size, size):
            h, w = pixel_values.shape[2:]
            raise InvalidInputError(
                f"This export processes {size}x{size} images (fixed at export), got {h}x{w}. Preprocess with "
                f".preprocess() / .predict(), or export at that size: anomalyclip export ... --image-size {h}."
            )
        if not np.issubdtype(pixel_values.dtype, np.floating):
            raise InvalidInputError(f"pixel_values must be floating point (normalized), got {pixel_values.dtype}.")
        if not np.isfinite(pixel_values).all():
            raise InvalidInputError("pixel_values contains NaN or infinite values.")
        feed = {INPUT_NAME: np.ascontiguousarray(pixel_values, dtype=np.float32)}
        scores, maps = self.session.run(list(OUTPUT_NAMES), feed)
        return scores.astype(np.float32, copy=False), maps.astype(np.float32, copy=False)

    # ------------------------------------------------------------------ friendly API
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 8,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        thresholds: Any = None,
        progress: bool = False,
        read_options: ImageReadOptions | None = None,
    ) -> AnomalyResult | list[AnomalyResult]:
        """Score images and map anomalies at each image's original size, as ``AnomalyCLIP.predict``.

        Args:
            images: one image or a list: file paths, PIL images or numpy arrays (HxW, HxWx3,
                HxWx4; uint8, uint16 or float in [0, 1]), read as ``AnomalyCLIP.predict`` reads them.
            batch_size: images per run of the graph.
            image_threshold: results carry ``label = score > image_threshold``.
            pixel_threshold: results carry ``mask = anomaly_map > pixel_threshold``.
            thresholds: both at once (a :class:`~anomalyclip.thresholds.Thresholds`); explicit
                thresholds take precedence, and thresholds stored in the file at export apply
                when neither is given.
            progress: show a tqdm progress bar.
            read_options: how files are read (:class:`~anomalyclip.ImageReadOptions`), as in
                ``AnomalyCLIP.predict``.

        Returns:
            An :class:`~anomalyclip.AnomalyResult` for a single image, a list of them for a list.
        """
        single = not _is_image_list(images)
        items = [images] if single else list(images)
        if not items:
            raise InvalidInputError("Got an empty list of images; pass at least one image.")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")
        if thresholds is not None:
            image_threshold = thresholds.image if image_threshold is None else image_threshold
            pixel_threshold = thresholds.pixel if pixel_threshold is None else pixel_threshold
        if image_threshold is None:
            image_threshold = self.metadata.image_threshold
        if pixel_threshold is None:
            pixel_threshold = self.metadata.pixel_threshold
        results: list[AnomalyResult] = []
        batches = range(0, len(items), batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="AnomalyCLIP (ONNX)", unit="batch")
        for start in batches:
            chunk = items[start : start + batch_size]
            prepared = [self._prepare(img, read_options) for img in chunk]
            scores, maps = self.run(np.stack([self._preprocess_prepared(p) for p in prepared]))
            for i, p in enumerate(prepared):
                path = os.fspath(chunk[i]) if isinstance(chunk[i], (str, os.PathLike)) else None
                results.append(
                    AnomalyResult.from_map(
                        scores[i], maps[i], p.size, image_threshold=image_threshold, pixel_threshold=pixel_threshold, path=path
                    )
                )
        return results[0] if single else results
