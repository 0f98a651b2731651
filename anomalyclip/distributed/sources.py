"""Local paths and URIs (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ``file://``): listing
images, reading and writing files.

Local paths are handled exactly as ``anomalyclip predict`` does (:mod:`anomalyclip.predict_io`);
URIs go through :mod:`pyarrow.fs` (installed with ``ray[data]``), which resolves credentials
the usual way for each store (environment, instance profile, ...). Pass a configured
``pyarrow.fs.FileSystem`` as ``filesystem`` for anything else (an endpoint, a region, a token);
paths are then taken as paths inside it, with any ``scheme://`` prefix dropped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from ..errors import ImageLoadError, InvalidInputError

__all__ = ["is_uri", "FileAccess", "list_images"]

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")


def is_uri(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URI with a scheme (``s3://bucket/key``), not a local path."""
    return isinstance(path, str) and _URI.match(path) is not None


def _strip_scheme(path: str) -> str:
    return _URI.sub("", path, count=1)


class FileAccess:
    """Read, write and list local paths and URIs; one :mod:`pyarrow.fs` file system per store.

    Args:
        filesystem: a configured ``pyarrow.fs.FileSystem`` to use for every URI, or None to
            resolve each URI's file system with ``pyarrow.fs.FileSystem.from_uri`` (cached by
            scheme and host).
    """

    def __init__(self, filesystem: Any = None) -> None:
        self._filesystem = filesystem
        self._cache: dict[str, tuple[Any, bool]] = {}

    def is_remote(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` goes through pyarrow.fs (a URI, or any path when a file system was given)."""
        return self._filesystem is not None or is_uri(path)

    def resolve(self, uri: str) -> tuple[Any, str]:
        """``(pyarrow file system, path inside it)`` of a URI."""
        if self._filesystem is not None:
            return self._filesystem, _strip_scheme(uri)
        from ._deps import require_pyarrow

        pafs = require_pyarrow().fs
        parts = urlsplit(uri)
        key = f"{parts.scheme}://{parts.netloc}"
        if key not in self._cache:
            try:
                fs, path = pafs.FileSystem.from_uri(uri)
            except (ValueError, OSError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
                raise InvalidInputError(f"Cannot open '{uri}': {exc}") from exc
            # Object stores keep the bucket in the path (s3://b/k -> "b/k"); hdfs://host/p -> "/p".
            keep_netloc = bool(parts.netloc) and path.lstrip("/").startswith(parts.netloc)
            self._cache[key] = (fs, keep_netloc)
            return fs, path
        fs, keep_netloc = self._cache[key]
        return fs, (parts.netloc + parts.path if keep_netloc else parts.path)

    def read(self, path: str | os.PathLike) -> bytes:
        """The bytes of a local file or a URI. Raises :class:`ImageLoadError` naming it on failure."""
        try:
            if self.is_remote(path):
                fs, inner = self.resolve(os.fspath(path))
                with fs.open_input_file(inner) as handle:
                    return handle.read()
            return Path(path).read_bytes()
        except (OSError, ValueError) as exc:
            raise ImageLoadError(f"Cannot read '{os.fspath(path)}': {exc}") from exc

    def write(self, path: str | os.PathLike, data: bytes) -> None:
        """Write ``data`` to a local file (atomically: temporary file + rename) or a URI."""
        if self.is_remote(path):
            fs, inner = self.resolve(os.fspath(path))
            parent = inner.rsplit("/", 1)[0]
            if parent and parent != inner:
                fs.create_dir(parent, recursive=True)
            with fs.open_output_stream(inner) as handle:  # object stores publish the object on close
                handle.write(data)
            return
        from ..files import atomic_write

        with atomic_write(path, "wb") as handle:
            handle.write(data)

    @staticmethod
    def join(directory: str | os.PathLike, name: str) -> str:
        """``directory/name`` for a local directory or a URI prefix."""
        if is_uri(directory):
            return os.fspath(directory).rstrip("/") + "/" + name
        return str(Path(directory) / name)

    def list_images(self, source: str | os.PathLike) -> list[str]:
        """Image files at ``source`` (a file, or a directory searched recursively), sorted.

        Local sources follow ``anomalyclip predict`` (:func:`anomalyclip.predict_io.images_in`).
        """
        from ..files import IMAGE_SUFFIXES

        if not self.is_remote(source):
            from ..predict_io import images_in

            return [str(p) for p in images_in(source)]
        from ._deps import require_pyarrow

        pafs = require_pyarrow().fs
        uri = os.fspath(source).rstrip("/")
        fs, root = self.resolve(uri)
        prefix = uri[: len(uri) - len(root)] if uri.endswith(root) else ""
        try:
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.File:
                return [uri]
            if info.type != pafs.FileType.Directory:
                raise InvalidInputError(f"No such file or directory: '{source}'.")
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        except (OSError, ValueError) as exc:
            if isinstance(exc, InvalidInputError):
                raise
            raise InvalidInputError(f"Cannot list '{source}': {exc}") from exc
        files = sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and not i.base_name.startswith(".")
            and os.path.splitext(i.path)[1].lower() in IMAGE_SUFFIXES
        )
        return [prefix + f for f in files]


def list_images(sources: str | os.PathLike | Sequence[str | os.PathLike], *, filesystem: Any = None) -> list[str]:
    """Every image of ``sources`` in a stable order: files as given, directories searched recursively.

    Local paths give the same list, in the same order, as ``anomalyclip predict``; URIs
    (``s3://bucket/folder``) are listed with :mod:`pyarrow.fs` and sorted by path.

    Raises:
        InvalidInputError: a source does not exist, or no image was found.
    """
    from ..files import IMAGE_SUFFIXES

    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    access = FileAccess(filesystem)
    found = [image for item in items for image in access.list_images(item)]
    if not found:
        raise InvalidInputError(f"No images found in {[os.fspath(i) for i in items]} (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return found
