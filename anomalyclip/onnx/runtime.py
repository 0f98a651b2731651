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
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import CheckpointError, InvalidInputError, MissingDependencyError, WeightsNotFoundError
from ..outputs import AnomalyResult, resize_map
from ..predictor.stream import expand_inputs, predict_stream
from ..predictor.thresholds import resolve_thresholds
from ..decoding import ImageReadOptions
from ..preprocessing import ImageInput, PreparedImage, check_image_size, prepare_image, preprocess_array
from .metadata import INPUT_NAME, OUTPUT_NAMES, OnnxMetadata

__all__ = ["OnnxAnomalyCLIP", "DEFAULT_PROVIDERS", "BACKENDS"]

#: Providers tried in this order when none are given (those this onnxruntime build has).
#: TensorRT is left to an explicit choice: it builds an engine on first use (minutes).
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
#: What can run the file: onnxruntime (``[onnx]``) or OpenVINO (``[openvino]``, CPU).
BACKENDS = ("onnxruntime", "openvino")


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
    """An exported AnomalyCLIP (``anomalyclip export`` / ``AnomalyCLIP.export_onnx``) run by onnxruntime or OpenVINO.

    Typical use::

        from anomalyclip.onnx import OnnxAnomalyCLIP
        model = OnnxAnomalyCLIP("anomalyclip.onnx")               # CPU, or CUDA with onnxruntime-gpu
        result = model.predict("part.png")                         # AnomalyResult(score, anomaly_map)
        model = OnnxAnomalyCLIP("anomalyclip.onnx", backend="openvino")  # the same file on OpenVINO (CPU)

    Args:
        path: the ``.onnx`` file (with its ``.onnx.data`` next to it, for exports over 2 GiB).
        providers: onnxruntime execution providers in order of preference, names or
            ``(name, options)`` pairs, e.g. ``["TensorrtExecutionProvider",
            "CUDAExecutionProvider", "CPUExecutionProvider"]``. Default: CUDA if this
            onnxruntime build has it, then CPU.
        threads: intra-op threads (CPU); default: the backend's (all cores).
        session_options: an ``onnxruntime.SessionOptions`` for full control (``threads`` is
            applied on top of it).
        backend: ``"onnxruntime"`` (default; ``pip install "anomalyclip[onnx]"``) or
            ``"openvino"`` (CPU; ``pip install "anomalyclip[openvino]"``, see
            :class:`~anomalyclip.onnx.openvino_backend.OpenVINOSession`). Neither needs torch.
        precision: OpenVINO only: ``"f32"`` (default, the golden numerics) or ``"bf16"``
            (faster on CPUs with AVX512-BF16 / AMX; deviation in docs/deployment.md).

    Raises:
        WeightsNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not ONNX, or not an anomalyclip export, or of a newer format.
        InvalidInputError: a provider this onnxruntime build does not have; an unknown backend or
            precision; onnxruntime options given to the OpenVINO backend or the reverse.
        MissingDependencyError: the backend's package is not installed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        *,
        threads: int | None = None,
        session_options: Any = None,
        backend: str = "onnxruntime",
        precision: str | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise InvalidInputError(f"backend must be one of {list(BACKENDS)}, got {backend!r}.")
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsNotFoundError(
                f"No ONNX file at '{self.path}'. Export one with `anomalyclip export --model MODEL --format onnx "
                f"--out {self.path.name}` (or AnomalyCLIP.export_onnx) and copy it here."
            )
        self.backend = backend
        if backend == "openvino":
            self.session = self._openvino_session(providers, session_options, precision, threads)
        else:
            self.session = self._onnxruntime_session(providers, session_options, precision, threads)
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = OnnxMetadata.from_props(props, str(self.path))
        self._threshold_warnings: set = set()
        self._check_signature()

    # ------------------------------------------------------------------ construction helpers
    def _openvino_session(self, providers: Any, session_options: Any, precision: str | None, threads: int | None) -> Any:
        from .openvino_backend import OpenVINOSession

        if providers is not None or session_options is not None:
            raise InvalidInputError(
                "providers and session_options configure onnxruntime; the OpenVINO backend takes precision= and threads=."
            )
        return OpenVINOSession(self.path, precision=precision, threads=threads)

    def _onnxruntime_session(self, providers: Any, session_options: Any, precision: str | None, threads: int | None) -> Any:
        ort = _import_onnxruntime()
        if precision not in (None, "f32", "float32"):
            raise InvalidInputError(
                f"precision={precision!r} is an OpenVINO option (backend='openvino'); onnxruntime runs the file in "
                "its own dtype (export with dtype='float16' for float16)."
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
            return ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"onnxruntime cannot load '{self.path}': {reason}. Expected an ONNX file written by `anomalyclip export` "
                "(a damaged or partial copy fails like this: copy it again, with its .onnx.data file if it has one)."
            ) from exc

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
        """Images -> normalized float32 ``[B, 3, S, S]`` (the torch model's preprocessing, in numpy)."""
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
    def decision_thresholds(
        self, thresholds: Any = None, image_threshold: float | None = None, pixel_threshold: float | None = None
    ) -> tuple[float | None, float | None]:
        """The ``(image, pixel)`` thresholds :meth:`predict` applies with these arguments (None: no
        labels / no masks), resolved as ``AnomalyCLIP.decision_thresholds`` does: the file's stored
        thresholds count when they were chosen in the graph's decision mode."""
        m = self.metadata
        own = None
        if m.image_threshold is not None or m.pixel_threshold is not None:
            own = {"image": m.image_threshold, "pixel": m.pixel_threshold, "mode": m.threshold_mode}
        return resolve_thresholds(
            own=own,
            thresholds=thresholds,
            image_threshold=image_threshold,
            pixel_threshold=pixel_threshold,
            map_range=m.map_range,
            mode=m.decision_mode,
            warned=self._threshold_warnings,
        )

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
            images: one image, a folder (its image files) or a list of them: file paths, PIL
                images or numpy arrays (HxW, HxWx3, HxWx4; uint8 or float in [0, 1]).
            batch_size: images per run of the graph.
            image_threshold: results carry ``label = score > image_threshold`` (in [0, 1]).
            pixel_threshold: results carry ``mask = anomaly_map > pixel_threshold`` (in :attr:`map_range`).
            thresholds: None applies the thresholds stored in the file at export (when they were
                chosen in the graph's decision mode); a :class:`~anomalyclip.Thresholds` or a
                mapping applies those; False applies none. Explicit values take precedence. The
                same resolution as the torch model's (:func:`anomalyclip.predictor.resolve_thresholds`).
            progress: show a tqdm progress bar.
            read_options: how files are read (:class:`~anomalyclip.ImageReadOptions`), as in
                ``AnomalyCLIP.predict``.

        Returns:
            An :class:`~anomalyclip.AnomalyResult` for a single image, a list of them for a list.
        """
        items, single = expand_inputs(images, "predict")
        results = list(self.predict_iter(items, batch_size=batch_size, image_threshold=image_threshold,
                                         pixel_threshold=pixel_threshold, thresholds=thresholds, progress=progress,
                                         read_options=read_options))
        return results[0] if single else results

    def predict_iter(
        self,
        images: Any,
        *,
        batch_size: int = 8,
        on_error: str = "raise",
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        thresholds: Any = None,
        progress: bool = False,
        num_workers: int = 0,
        read_options: ImageReadOptions | None = None,
    ) -> Iterator[AnomalyResult]:
        """Stream results in input order, as ``AnomalyCLIP.predict_iter`` (the same core loop)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}.")
        if isinstance(images, (str, os.PathLike, np.ndarray)) or not hasattr(images, "__iter__"):
            images = [images]
        resolved = self.decision_thresholds(thresholds, image_threshold, pixel_threshold)
        return predict_stream(
            _OnnxBackend(self, read_options),
            images,
            batch_size=batch_size,
            num_workers=num_workers,
            thresholds=resolved,
            on_error=on_error,
            progress=progress,
            total=len(images) if hasattr(images, "__len__") else None,
        )


class _OnnxBatch:
    def __init__(self, scores: np.ndarray, maps: list[np.ndarray]) -> None:
        self.scores, self.maps = scores, maps

    def collect(self) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.scores, self.maps


class _OnnxBackend:
    """:class:`OnnxAnomalyCLIP` as a :class:`~anomalyclip.predictor.Backend` (numpy, no torch)."""

    def __init__(self, model: OnnxAnomalyCLIP, read_options: ImageReadOptions | None = None) -> None:
        self.model, self.read_options = model, read_options

    def load(self, image: Any) -> tuple[tuple[int, int], np.ndarray]:
        prepared = self.model._prepare(image, self.read_options)
        return prepared.size, self.model._preprocess_prepared(prepared)

    def submit(self, pixels: list[np.ndarray], sizes: list[tuple[int, int]]) -> _OnnxBatch:
        scores, maps = self.model.run(np.stack(pixels))
        return _OnnxBatch(scores, [resize_map(m, size) for m, size in zip(maps, sizes)])
