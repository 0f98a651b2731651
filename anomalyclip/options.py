"""Option records: the inference options of a model and the options of a prediction run.

Two small frozen dataclasses replace the keyword lists that the model, the CLI, ``predict_io``,
``finetune`` and the Ray actor used to spell out one by one. Public functions keep their keyword
signatures; the records are what travels inside (and, being frozen and flat, what survives JSON
and pickling to a Ray worker). Torch-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .decoding import ImageReadOptions

__all__ = ["InferenceOptions", "PredictOptions"]


@dataclass(frozen=True)
class InferenceOptions:
    """Overrides of the options that change what the model outputs for an image.

    ``None`` keeps the model's (or the saved config's) value. The field names are those of
    :data:`anomalyclip.config.INFERENCE_OPTIONS` and of ``AnomalyCLIP.reconfigure``.

    Attributes:
        image_size: processing size S in pixels (a multiple of the patch size).
        feature_layers: 1-based vision blocks whose patch tokens make the map.
        dpam_layers: number of final vision blocks with DPAM.
        dpam_mode: ``"vv"``, ``"qq"`` or ``"kk"``.
        sigma: standard deviation of the final Gaussian blur, in pixels of the S x S map.
    """

    image_size: int | None = None
    feature_layers: tuple[int, ...] | None = None
    dpam_layers: int | None = None
    dpam_mode: str | None = None
    sigma: float | None = None

    def __post_init__(self) -> None:
        if self.feature_layers is not None:
            if isinstance(self.feature_layers, (str, bytes)) or not hasattr(self.feature_layers, "__iter__"):
                raise InvalidInputError(
                    f"feature_layers must be a sequence of ints, e.g. (24,) or [6, 12, 18, 24]; got {self.feature_layers!r}."
                )
            object.__setattr__(self, "feature_layers", tuple(self.feature_layers))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "InferenceOptions":
        """From a mapping (e.g. ``vars(args)``): the known names only, missing ones None."""
        values = values or {}
        return cls(**{f.name: values.get(f.name) for f in dataclasses.fields(cls)})

    def as_kwargs(self) -> dict[str, Any]:
        """The keywords of ``reconfigure`` / ``from_pretrained`` (None values included)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def is_empty(self) -> bool:
        """True when no option is overridden."""
        return all(v is None for v in self.as_kwargs().values())


@dataclass(frozen=True)
class PredictOptions:
    """How a prediction run batches, tiles and reports (not what the model computes).

    Attributes:
        batch_size: images (or tiles, with ``tile_size``) per forward pass.
        num_workers: threads that load and preprocess the next images; None: the device's default.
        tile_size: cut images larger than this many pixels into overlapping tiles; None: no tiling.
        tile_overlap: fraction of a tile its neighbours share, in [0, 1); only with ``tile_size``.
        progress: show a tqdm progress bar.
        on_error: ``"raise"`` (stop at an unreadable image) or ``"record"`` (a result with
            ``error`` set, score NaN, no map).
        read_options: how image files are read (:class:`~anomalyclip.ImageReadOptions`);
            None: its defaults.
    """

    batch_size: int = 8
    num_workers: int | None = None
    tile_size: int | None = None
    tile_overlap: float = 0.25
    progress: bool = False
    on_error: str = "raise"
    read_options: "ImageReadOptions | None" = None

    def __post_init__(self) -> None:
        _check_positive_int(self.batch_size, "batch_size")
        if self.num_workers is not None and (
            isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0
        ):
            raise InvalidInputError(f"num_workers must be an int >= 0 or None, got {self.num_workers!r}.")
        if self.tile_size is not None:
            _check_positive_int(self.tile_size, "tile_size")
        if isinstance(self.tile_overlap, bool) or not isinstance(self.tile_overlap, (int, float)) or not (
            0 <= self.tile_overlap < 1
        ):
            raise InvalidInputError(f"tile_overlap must be a number in [0, 1), got {self.tile_overlap!r}.")
        if self.on_error not in ("raise", "record"):
            raise InvalidInputError(f"on_error must be 'raise' or 'record', got {self.on_error!r}.")

    def replace(self, **changes: Any) -> "PredictOptions":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive int, got {value!r}.")

