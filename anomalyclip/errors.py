"""Exceptions raised by anomalyclip.

Every error a user can trigger is one of these types. Each also derives from the matching
built-in type (``ValueError``, ``OSError``, ...) so that generic handlers keep working.

An error whose fix is an option names it as the interface spells it: ``str(error)`` speaks
Python (``pass require_masks=False``), :attr:`AnomalyCLIPError.cli_message` the command line
(``pass --no-masks``); the ``anomalyclip`` command prints the latter. :func:`with_fix` builds one.
"""

from __future__ import annotations

__all__ = [
    "with_fix",
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
    """Base class of all errors raised by anomalyclip.

    Args:
        *args: the message (for Python users), as for any exception.
        cli_message: the same message for command-line users, naming the command's flags instead
            of Python keywords; None when the message fits both.
    """

    def __init__(self, *args: object, cli_message: str | None = None) -> None:
        super().__init__(*args)
        self.cli_message = cli_message

    def message_for(self, interface: str) -> str:
        """The message for ``"python"`` or ``"cli"`` users."""
        if interface == "cli" and self.cli_message is not None:
            return self.cli_message
        return str(self)


def with_fix(error_type: type[AnomalyCLIPError], template: str, *, python: str, cli: str) -> AnomalyCLIPError:
    """An ``error_type`` whose message is ``template`` with ``{fix}`` spelled per interface.

    ``with_fix(DatasetError, "... Add the masks, or {fix}.", python="pass require_masks=False",
    cli="pass --no-masks")``: ``str()`` has the first spelling, :attr:`~AnomalyCLIPError.cli_message`
    the second.
    """
    return error_type(template.replace("{fix}", python), cli_message=template.replace("{fix}", cli))


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
