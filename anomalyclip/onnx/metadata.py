"""What an exported file tells its runtime: the ``anomalyclip.*`` metadata of the ONNX model.

Each entry of the model's ``metadata_props`` is ``"anomalyclip.<field>": <JSON value>``. The key
``anomalyclip.format_version`` marks a file as an anomalyclip export; a runtime refuses files
without it and files of a newer format. numpy/json only: no torch, no onnx.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from ..errors import CheckpointError

__all__ = [
    "OnnxMetadata",
    "FORMAT_VERSION",
    "FORMAT_KEY",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "EXPORT_DTYPES",
    "REFERENCE_BUFFER_PREFIX",
]

#: Version of the exported file's layout (inputs, outputs, metadata); bumped on incompatible changes.
FORMAT_VERSION = 1
#: The metadata key that identifies an anomalyclip export.
FORMAT_KEY = "anomalyclip.format_version"
_PREFIX = "anomalyclip."
#: The graph's input and outputs.
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("scores", "anomaly_maps")
#: Weight / compute dtypes an export can have (inputs and outputs are float32 either way).
EXPORT_DTYPES = ("float32", "float16")
#: Name prefix of the graph's few-shot reference memory constants (``<prefix><layer>_<block>``);
#: the int8 quantization leaves the matrix products that read them in float32.
REFERENCE_BUFFER_PREFIX = "reference_memory_"

_EXPORT_HINT = (
    "Export one with `anomalyclip export --model MODEL --format onnx --out FILE` or AnomalyCLIP.export_onnx(FILE)."
)


@dataclass(frozen=True)
class OnnxMetadata:
    """Everything a runtime needs besides the graph, stored in the file.

    Attributes:
        image_size: processing size S; the graph takes ``[B, 3, S, S]`` and returns ``[B, S, S]`` maps.
        mean, std: per-channel normalization of ``[0, 1]`` RGB images.
        feature_layers: the output layers summed in the maps (maps range over ``[0, n]`` with
            ``n = len(feature_layers)``; with references ``[0, 1]`` or ``[0, 3 n]``; see :attr:`map_range`).
        patch_size: the ViT patch size; images must be at least this large on each side.
        dtype: ``"float32"`` or ``"float16"`` weights and compute (inputs and outputs are float32).
        library_version: the anomalyclip version that wrote the file.
        image_threshold, pixel_threshold: decision thresholds stored at export (None if not set).
        quantization: ``None``, or ``"int8-dynamic"`` for a :func:`~anomalyclip.onnx.quantize_int8` copy.
        references: number of few-shot reference images whose patch features are constants
            of the graph (0: zero-shot); their scores and maps are fused, as the torch model's.
        decision_mode: the :class:`~anomalyclip.predictor.DecisionMode` of the graph's outputs
            (a dict; None in files of anomalyclip 0.2).
        threshold_mode: the decision mode the stored thresholds were chosen in; the runtime
            applies them only in that mode, as ``AnomalyCLIP.predict`` does.
        fusion: how (``"sum"`` or ``"standardized"``, as the model's references fused in the
            graph); None without references, and in files written before it was recorded
            (they fuse with the sum).
        model: provenance, for people (backbone reference, DPAM layers and mode, blur sigma,
            temperature); the runtime does not use it.
        format_version: :data:`FORMAT_VERSION` of the writer.
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    feature_layers: tuple[int, ...]
    patch_size: int
    dtype: str
    library_version: str
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    quantization: str | None = None
    references: int = 0
    decision_mode: dict[str, Any] | None = None
    threshold_mode: dict[str, Any] | None = None
    fusion: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def map_range(self) -> tuple[float, float]:
        """The range of the anomaly maps, for a fixed overlay colour scale (as ``AnomalyCLIP.map_range``)."""
        n = float(len(self.feature_layers))
        if not self.references:
            return (0.0, n)
        return (0.0, 1.0) if self.fusion == "standardized" else (0.0, 3.0 * n)

    def to_props(self) -> dict[str, str]:
        """``metadata_props`` entries: ``anomalyclip.<field>`` -> JSON (None fields are left out)."""
        return {
            _PREFIX + key: json.dumps(list(value) if isinstance(value, tuple) else value, sort_keys=True)
            for key, value in asdict(self).items()
            if value is not None
        }

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str) -> "OnnxMetadata":
        """Read and validate the metadata of the file ``source``; :class:`CheckpointError` naming the fix."""
        if FORMAT_KEY not in props:
            raise CheckpointError(f"'{source}' is an ONNX model but not an anomalyclip export (no '{FORMAT_KEY}' metadata). {_EXPORT_HINT}")
        values: dict[str, Any] = {}
        for key, text in props.items():
            if key.startswith(_PREFIX):
                try:
                    values[key[len(_PREFIX) :]] = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise CheckpointError(f"'{source}': metadata '{key}' is not valid JSON ({exc}); re-export the model.") from exc
        version = values["format_version"]
        if not isinstance(version, int) or version < 1:
            raise CheckpointError(f"'{source}': invalid {FORMAT_KEY} {version!r}; re-export the model.")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"'{source}' is an anomalyclip export of format {version}, newer than this library reads ({FORMAT_VERSION}). "
                'Upgrade: pip install -U "anomalyclip[onnx]".'
            )
        known = {f.name for f in fields(cls)}
        required = {"image_size", "mean", "std", "feature_layers", "patch_size", "dtype", "library_version"}
        missing = sorted(required - set(values))
        if missing:
            raise CheckpointError(f"'{source}': anomalyclip metadata lacks {missing}; the file is damaged or incomplete. Re-export it.")
        data = {k: v for k, v in values.items() if k in known}  # newer writers of the same format may add fields
        try:
            meta = cls(
                **{
                    **data,
                    "mean": tuple(float(x) for x in data["mean"]),
                    "std": tuple(float(x) for x in data["std"]),
                    "feature_layers": tuple(int(x) for x in data["feature_layers"]),
                }
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"'{source}': invalid anomalyclip metadata ({exc}); re-export the model.") from exc
        meta.validate(source)
        return meta

    def validate(self, source: str = "metadata") -> None:
        """Check types and ranges; :class:`CheckpointError` if anything is off."""
        problems = []
        if not (isinstance(self.image_size, int) and self.image_size > 0):
            problems.append(f"image_size {self.image_size!r}")
        elif not (isinstance(self.patch_size, int) and 0 < self.patch_size <= self.image_size):
            problems.append(f"patch_size {self.patch_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append("mean/std (3 values each, std > 0)")
        if not self.feature_layers:
            problems.append("feature_layers (empty)")
        if self.dtype not in EXPORT_DTYPES:
            problems.append(f"dtype {self.dtype!r}")
        for name in ("image_threshold", "pixel_threshold"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                problems.append(f"{name} {value!r}")
        if not (isinstance(self.references, int) and self.references >= 0):
            problems.append(f"references {self.references!r}")
        if self.fusion not in (None, "sum", "standardized"):
            problems.append(f"fusion {self.fusion!r}")
        if problems:
            raise CheckpointError(f"'{source}': invalid anomalyclip metadata: {', '.join(problems)}. Re-export the model.")
