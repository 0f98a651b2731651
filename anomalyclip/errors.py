"""Exceptions raised by anomalyclip.

Every error a user can trigger is one of these types. Each also derives from the matching
built-in type (``ValueError``, ``OSError``, ...) so that generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "AnomalyCLIPError",
    "InvalidInputError",
    "ImageLoadError",
    "CheckpointError",
    "BackboneError",
    "WeightsNotFoundError",
    "DatasetError",
    "TrainingError",
    "ResourceError",
    "MissingDependencyError",
]


class AnomalyCLIPError(Exception):
    """Base class of all errors raised by anomalyclip."""


class InvalidInputError(AnomalyCLIPError, ValueError):
    """An argument has the wrong type, shape, range or value (images, tensors, options)."""


class ImageLoadError(AnomalyCLIPError, OSError):
    """An image or mask file is missing or cannot be decoded."""


class CheckpointError(AnomalyCLIPError, ValueError):
    """A checkpoint or saved model has missing or unexpected keys, wrong shapes, or bad contents."""


class BackboneError(AnomalyCLIPError, ValueError):
    """The CLIP backbone reference is unknown or names a model this library cannot run."""


class WeightsNotFoundError(AnomalyCLIPError, FileNotFoundError):
    """Weights could not be found locally and could not be downloaded (e.g. offline)."""


class DatasetError(AnomalyCLIPError, ValueError):
    """A data set is empty, malformed, or inconsistent (missing masks, wrong sizes, ...)."""


class TrainingError(AnomalyCLIPError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the prompts are left as they were."""


class ResourceError(AnomalyCLIPError, MemoryError):
    """The work does not fit in the memory of its device (GPU or CPU); the message says what ran
    and how to make it fit (smaller batch_size or image_size, a lower-precision dtype, ...)."""


class MissingDependencyError(AnomalyCLIPError, ImportError):
    """An optional dependency is not installed; the message names the extra to install
    (e.g. ``pip install "anomalyclip[ray]"``)."""
