"""Export an :class:`~anomalyclip.AnomalyCLIP` model to one ONNX file (the torch side of deployment).

The exported graph is :class:`DeployedAnomalyCLIP`: the model's own DPAM vision forward
(:func:`anomalyclip.vision.encode_image`) and scoring (:func:`anomalyclip.scoring.image_scores`,
:func:`anomalyclip.scoring.anomaly_maps`, blur included), with the text features, which are
fixed at inference, as a constant. It is captured with PyTorch's ``torch.export``-based ONNX
exporter (``torch.onnx.export(..., dynamo=True)``) with a dynamic batch axis; the processing
size S is fixed per export.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .._version import __version__
from ..errors import InvalidInputError, MissingDependencyError
from ..files import give_default_mode
from ..references import FusionStatistics, fuse_references, nearest_neighbor_distance_blocks, normalize_patch_tokens
from ..scoring import anomaly_maps, image_scores
from ..ops import get_cpu_low_precision_matmul, set_cpu_low_precision_matmul
from ..vision import encode_image
from .metadata import EXPORT_DTYPES, INPUT_NAME, OUTPUT_NAMES, REFERENCE_BUFFER_PREFIX, OnnxMetadata

__all__ = ["DeployedAnomalyCLIP", "export_onnx", "DEFAULT_OPSET", "MIN_OPSET"]

logger = logging.getLogger(__name__)

#: ONNX opset of an export unless asked otherwise (onnxruntime >= 1.14 runs it).
DEFAULT_OPSET = 18
#: The lowest opset the exporter writes (``LayerNormalization`` needs 17; PyTorch's exporter 18).
MIN_OPSET = 18
#: Initializers above this many bytes go to an external data file next to the model: a single
#: protobuf file cannot exceed 2 GiB (the graph itself needs a little room too).
MAX_INLINE_BYTES = 2**31 - 2**26


class DeployedAnomalyCLIP(nn.Module):
    """The inference graph that is exported: ``pixel_values [B, 3, S, S] -> (scores [B], anomaly_maps [B, S, S])``.

    The same computation as :meth:`AnomalyCLIP.forward <anomalyclip.AnomalyCLIP.forward>` (the
    same functions, called the same way), with the text features, fixed at inference, held as a
    constant buffer. ``encode_image(..., traceable=True)`` runs the batch in one pass without
    in-place updates, so the graph is valid for any batch size.

    Few-shot references are constants too: each output layer's memory of normal patch tokens,
    as float32 ``[D, m]`` blocks (:meth:`ReferenceMemory.blocks
    <anomalyclip.references.ReferenceMemory.blocks>`, buffers named
    ``reference_memory_<layer>_<block>``). The nearest-neighbour search reads them block by
    block (:func:`~anomalyclip.references.nearest_neighbor_distance_blocks`) and the fusion is
    the torch model's (:func:`~anomalyclip.reference_fusion.fuse_references`, with the blur),
    its ``"standardized"`` statistics embedded as constants (Python floats in the trace).

    Args:
        visual: the CLIP vision tower (``clip.visual``), in the export dtype.
        text_features: ``[2, D]`` normalized text features (normal, anomalous).
        image_size: processing size S.
        feature_layers, dpam_layers, dpam_mode, temperature, sigma: as in :class:`~anomalyclip.AnomalyCLIPConfig`.
        reference_blocks: layer -> float32 ``[D, m]`` memory blocks, for every output layer,
            or None (zero-shot).
        fusion_statistics: the memory's :meth:`ReferenceMemory.fusion_statistics
            <anomalyclip.references.ReferenceMemory.fusion_statistics>` (None: the plain sum).
    """

    def __init__(
        self,
        visual: nn.Module,
        text_features: torch.Tensor,
        *,
        image_size: int,
        feature_layers: Sequence[int],
        dpam_layers: int,
        dpam_mode: str,
        temperature: float,
        sigma: float,
        reference_blocks: Mapping[int, Sequence[torch.Tensor]] | None = None,
        fusion_statistics: FusionStatistics | None = None,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("text_features", text_features.detach().float().clone())
        self.image_size = int(image_size)
        self.feature_layers = tuple(int(x) for x in feature_layers)
        self.dpam_layers = int(dpam_layers)
        self.dpam_mode = dpam_mode
        self.temperature = float(temperature)
        self.sigma = float(sigma)
        self.fusion_statistics = fusion_statistics
        self._reference_names: dict[int, list[str]] = {}
        if reference_blocks is not None:
            missing = [layer for layer in self.feature_layers if not reference_blocks.get(layer)]
            if missing:
                raise InvalidInputError(f"DeployedAnomalyCLIP: no reference memory for output layer(s) {missing}.")
            for layer in self.feature_layers:
                names = []
                for index, block in enumerate(reference_blocks[layer]):
                    name = f"{REFERENCE_BUFFER_PREFIX}{layer}_{index}"
                    self.register_buffer(name, block.detach().float().contiguous())
                    names.append(name)
                self._reference_names[layer] = names

    @property
    def has_references(self) -> bool:
        """Whether the graph fuses few-shot references."""
        return bool(self._reference_names)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = encode_image(
            self.visual,
            pixel_values,
            feature_layers=self.feature_layers,
            dpam_layers=self.dpam_layers,
            dpam_mode=self.dpam_mode,
            traceable=True,
        )
        scores = image_scores(features.image_features, self.text_features, self.temperature)
        raw, maps = anomaly_maps(
            features.patch_features,
            self.text_features,
            temperature=self.temperature,
            image_size=self.image_size,
            sigma=self.sigma,
        )
        if not self.has_references:
            return scores, maps
        distances = {
            layer: nearest_neighbor_distance_blocks(
                normalize_patch_tokens(tokens), [getattr(self, name) for name in self._reference_names[layer]]
            )
            for layer, tokens in features.patch_features.items()
        }
        fused = fuse_references(
            scores, raw, distances, sigma=self.sigma, statistics=self.fusion_statistics, with_reference_maps=False
        )
        return fused.scores, fused.maps


def _check_export_dependencies() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"ONNX export needs {', '.join(missing)}: pip install \"anomalyclip[onnx]\" (onnx, onnxruntime, onnxscript)."
        )
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2] if part.isdigit())
    if version < (2, 6):
        raise MissingDependencyError(f"ONNX export needs torch >= 2.6 (its torch.export-based exporter); this is torch {torch.__version__}.")


def _export_dtype(dtype: str | torch.dtype) -> tuple[str, torch.dtype]:
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    name = names.get(dtype, dtype) if isinstance(dtype, torch.dtype) else str(dtype).lower()
    name = {"fp32": "float32", "fp16": "float16", "half": "float16"}.get(name, name)
    if name not in EXPORT_DTYPES:
        raise InvalidInputError(
            f"Cannot export dtype {dtype!r} to ONNX; use 'float32' (any onnxruntime provider) or 'float16' "
            "(for GPU providers such as CUDA or TensorRT). bfloat16 has too few onnxruntime kernels to deploy."
        )
    return name, {"float32": torch.float32, "float16": torch.float16}[name]


def _check_opset(opset: int | None) -> int:
    if opset is None:
        return DEFAULT_OPSET
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise InvalidInputError(
            f"opset must be an int from {MIN_OPSET} to {newest} (the newest this onnx package knows), got {opset!r}; "
            f"leave it unset for {DEFAULT_OPSET}."
        )
    return opset


def _model_thresholds(model: Any, config: Any) -> Any:
    """The model's own thresholds, when the export computes the outputs they were chosen for."""
    own = getattr(model, "thresholds", None)
    if own is None:
        return None
    changed = [name for name in ("image_size", "feature_layers") if getattr(config, name) != getattr(model.config, name)]
    if changed:
        logger.warning(
            "Not storing the model's thresholds %s: they were chosen for another %s than the export's. Calibrate at "
            "the export's settings, or give the thresholds to store (thresholds= / --threshold / --pixel-threshold).",
            own,
            " and ".join(changed),
        )
        return None
    return own


def _export_mode(model: Any, config: Any) -> Any:
    """The decision mode of the exported graph (untiled; the export's size and layers)."""
    from ..model.predict import decision_mode

    return dataclasses.replace(decision_mode(model), image_size=config.image_size, feature_layers=config.feature_layers)


def _stored_thresholds(
    model: Any,
    config: Any,
    thresholds: Any,
    image_threshold: float | None,
    pixel_threshold: float | None,
    export_mode: Any,
) -> tuple[float | None, float | None]:
    """``(image, pixel)`` to store, resolved by :func:`anomalyclip.predictor.resolve_thresholds`
    as ``predict`` resolves them: explicit values win, field by field, over ``thresholds``;
    ``thresholds=None`` means the model's own, when chosen in the export's mode."""
    from ..predictor.thresholds import resolve_thresholds

    own = _model_thresholds(model, config)
    memory = getattr(model, "references", None)
    map_range = (0.0, float(len(config.feature_layers))) if memory is None else memory.map_range
    return resolve_thresholds(
        own=own,
        thresholds=thresholds,
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        map_range=map_range,
        mode=export_mode,
    )


@contextlib.contextmanager
def _native_low_precision() -> Iterator[None]:
    """Export float16 matrix products as float16 (not the CPU's float32 fallback of :mod:`anomalyclip.vision`)."""
    previous = get_cpu_low_precision_matmul()
    set_cpu_low_precision_matmul("native")
    try:
        yield
    finally:
        set_cpu_low_precision_matmul(previous)


def _initializer_bytes(model: Any) -> int:
    """Total size of an ``onnx_ir`` model's initializers."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += int(tensor.nbytes)
    return total


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: int | None = None,
    feature_layers: Sequence[int] | None = None,
    dtype: str | torch.dtype = "float32",
    opset: int | None = None,
    thresholds: Any = None,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    progress: bool = True,
) -> Path:
    """Write ``model`` as one ONNX file for :class:`~anomalyclip.onnx.OnnxAnomalyCLIP` (or any onnxruntime).

    The graph: input ``pixel_values`` float32 ``[B, 3, S, S]`` (dynamic batch B, normalized as
    :meth:`AnomalyCLIP.preprocess <anomalyclip.AnomalyCLIP.preprocess>` does), outputs ``scores``
    float32 ``[B]`` and ``anomaly_maps`` float32 ``[B, S, S]`` (blurred; the same values as
    ``model(pixel_values)``). The text features and the Gaussian blur are in the graph, and so
    are the model's few-shot references when it has them (:meth:`AnomalyCLIP.add_references
    <anomalyclip.AnomalyCLIP.add_references>`): their patch tokens are float32 constants
    searched in blocks of the memory's ``chunk_elements`` per image, and the outputs are the
    fused score and map. The metadata (:class:`~anomalyclip.onnx.OnnxMetadata`) holds S,
    mean/std, the output layers, the thresholds when given, the number of reference images and
    the library version. Weights go to ``<path>.data`` only when they exceed the 2 GiB protobuf
    limit (never for ViT-L/14 in float32, 1.2 GB; references add ``4 * D`` bytes per patch and
    output layer, 4.2 MB per 518 px image and layer for ViT-L/14).

    The model itself is not changed. The file is written to a temporary name and renamed.

    Args:
        model: the :class:`~anomalyclip.AnomalyCLIP` to export (this module does not import
            the model module: the model calls up into deployment, never the other way).
        path: the ``.onnx`` file to write.
        image_size: processing size S of the export (default: the model's); fixed in the file.
        feature_layers: output layers (default: the model's).
        dtype: ``"float32"`` (default; runs on every onnxruntime provider) or ``"float16"``
            (weights and vision compute in float16, for GPU providers; inputs and outputs stay
            float32, the scoring runs in float32 as in the torch model).
        opset: ONNX opset, :data:`MIN_OPSET` or newer (default :data:`DEFAULT_OPSET`).
        thresholds: the :class:`~anomalyclip.thresholds.Thresholds` to store (the runtime then
            labels and masks by default); ``None`` (default): the model's own
            :attr:`~anomalyclip.AnomalyCLIP.thresholds`, unless the export changes the image
            size or the output layers they were chosen for (then none, with a warning);
            ``False``: none.
        image_threshold, pixel_threshold: store these instead, field by field (the other field
            still comes from ``thresholds``), as ``AnomalyCLIP.predict`` applies them.

    ``progress`` shows a tqdm bar over the export's steps (tracing and conversion take minutes
    for ViT-L/14), so a Python session without logging configured does not sit silent.

    Returns:
        ``path``.

    Raises:
        InvalidInputError: an unsupported dtype or opset, an image size that is not a multiple
            of the patch size, output layers out of range; references computed at another
            image size or with other output layers than the export's, or from tiles.
        ImportError: onnx / onnxscript are not installed (``pip install "anomalyclip[onnx]"``).
    """
    _check_export_dependencies()
    dtype_name, torch_dtype = _export_dtype(dtype)
    opset = _check_opset(opset)
    config = model.config.replace(
        image_size=image_size, feature_layers=tuple(feature_layers) if feature_layers is not None else None
    )

    patch = model.patch_size
    if config.image_size % patch:
        raise InvalidInputError(
            f"image_size={config.image_size} is not a multiple of the patch size {patch} "
            f"(e.g. {max(1, round(config.image_size / patch)) * patch})."
        )
    memory = getattr(model, "references", None)
    if memory is not None:
        _check_references(memory, config, model.dtype, torch_dtype)
    export_mode = _export_mode(model, config)
    image_threshold, pixel_threshold = _stored_thresholds(
        model, config, thresholds, image_threshold, pixel_threshold, export_mode
    )
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"'{path}' is a directory; pass the .onnx file to write, e.g. {path / 'anomalyclip.onnx'}.")

    with torch.no_grad():
        text_features = model.encode_text().detach().float().cpu()
    visual = model.clip.visual
    if model.device.type != "cpu" or model.dtype != torch_dtype:
        visual = copy.deepcopy(visual).to(device="cpu", dtype=torch_dtype)  # the model itself stays as it is
    deployed = DeployedAnomalyCLIP(
        visual,
        text_features,
        image_size=config.image_size,
        feature_layers=config.feature_layers,
        dpam_layers=config.dpam_layers,
        dpam_mode=config.dpam_mode,
        temperature=config.temperature,
        sigma=config.sigma,
        reference_blocks=None if memory is None else memory.blocks((config.image_size // patch) ** 2, device="cpu"),
        fusion_statistics=None if memory is None else memory.fusion_statistics(),
    ).eval()
    # Batch 2: an example batch of 1 would let torch.export specialize the batch axis to 1.
    example = torch.zeros(2, 3, config.image_size, config.image_size)
    batch = torch.export.Dim("batch", min=1)
    logger.info("Exporting %s at %d px (%s, opset %d)...", config.backbone, config.image_size, dtype_name, opset)
    from tqdm.auto import tqdm

    bar = tqdm(total=2, desc="ONNX export", unit="step", disable=not progress)
    bar.set_postfix_str("tracing and converting")
    try:
        with torch.no_grad(), _native_low_precision():
            program = torch.onnx.export(
                deployed,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
        metadata = OnnxMetadata(
            image_size=config.image_size,
            mean=tuple(config.mean),
            std=tuple(config.std),
            feature_layers=tuple(config.feature_layers),
            patch_size=patch,
            dtype=dtype_name,
            library_version=__version__,
            image_threshold=image_threshold,
            pixel_threshold=pixel_threshold,
            references=0 if memory is None else memory.num_images,
            decision_mode=export_mode.to_dict(),
            threshold_mode=None if image_threshold is None and pixel_threshold is None else export_mode.to_dict(),
            fusion=None if memory is None else ("sum" if memory.fusion_statistics() is None else "standardized"),
            model={
                "backbone": config.backbone,
                "dpam_layers": config.dpam_layers,
                "dpam_mode": config.dpam_mode,
                "sigma": config.sigma,
                "temperature": config.temperature,
            },
        )
        program.model.metadata_props.update(metadata.to_props())
        program.model.producer_name = "anomalyclip"
        program.model.producer_version = __version__
        bar.update(1)
        bar.set_postfix_str("saving")
        external = _initializer_bytes(program.model) > MAX_INLINE_BYTES
        _save_atomically(program, path, external)
        bar.update(1)
    finally:
        bar.close()
    logger.info("Wrote %s (%.1f MB%s)", path, path.stat().st_size / 1e6, ", weights in " + path.name + ".data" if external else "")
    return path


def _check_references(memory: Any, config: Any, model_dtype: torch.dtype, export_dtype: torch.dtype) -> None:
    """The model's reference memory must fit the export's settings and the runtime's untiled images."""
    found = memory.mismatches(
        image_size=config.image_size,
        feature_layers=config.feature_layers,
        embed_dim=config.embed_dim,
        dpam_layers=config.dpam_layers,
        dpam_mode=config.dpam_mode,
    )
    if found:
        asked = " and ".join(f"{name} {given}" for name, _, given in found)
        taken = " and ".join(f"{name} {ours}" for name, ours, _ in found)
        raise InvalidInputError(
            f"The model's few-shot references were taken with {taken}; this export asks for {asked}, where their "
            "patch tokens do not match. Export at the references' settings (leave image_size / feature_layers "
            "unset: drop --image-size / --feature-layers), or take the references again at the export's settings "
            "(model.clear_references(), model.reconfigure(...), model.add_references(...))."
        )
    if memory.tile_size is not None:
        # The runtime scores whole images; tile-scale reference patches would not match theirs.
        raise InvalidInputError(
            f"The references were taken from {memory.tile_size} px tiles, but an ONNX export scores whole images "
            "(the runtime does not tile). Add the references without tile_size (model.clear_references(), then "
            "model.add_references(images)) to export them, or keep tiled inspection on the torch model."
        )
    if model_dtype != export_dtype:
        logger.warning(
            "The references' patch tokens come from this %s model; the export computes the test images' tokens in %s. "
            "For the export's own numerics, add the references with the model in %s (model.to(%s), "
            "clear_references(), add_references(...)).",
            str(model_dtype).replace("torch.", ""),
            str(export_dtype).replace("torch.", ""),
            str(export_dtype).replace("torch.", ""),
            str(export_dtype),
        )


def _save_atomically(program: Any, path: Path, external: bool) -> None:
    """Save an ``ONNXProgram`` to ``path`` (and ``path.data`` if ``external``) via a temporary directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        program.save(tmp_dir / path.name, external_data=external)
        for written in tmp_dir.iterdir():
            give_default_mode(written)  # the umask's mode, as any file the library saves
        if external:
            os.replace(tmp_dir / data.name, data)
        os.replace(tmp_dir / path.name, path)
        if not external and data.exists():
            data.unlink()  # an earlier export's weights, now in the file itself
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
