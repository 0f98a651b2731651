"""File-system helpers without torch: atomic writes, the library's cache directory, image-file
listing, and file lists for messages."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

__all__ = [
    "IMAGE_SUFFIXES",
    "atomic_path",
    "atomic_write",
    "cache_root",
    "current_umask",
    "find_images",
    "give_default_mode",
    "list_paths",
]

#: Extensions of the files read as images (compared in lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def current_umask() -> int:
    """The process's umask (read from ``/proc/self/status`` where there is one, which leaves it
    untouched; elsewhere set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def give_default_mode(path: str | os.PathLike) -> None:
    """Give a finished file the mode a plain ``open(path, "w")`` would have: ``0o666 & ~umask``.

    Writers that go through a temporary file end up with that file's mode (``mkstemp`` and
    safetensors' own temporary files are ``0600``): call this before renaming it into place, so
    that another user, a container with another uid or a cluster node can read what was saved.
    """
    os.chmod(path, 0o666 & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    For writers that take a file name. An interrupted or failed write leaves any existing
    ``path`` untouched and no temporary file behind. The final file gets the umask's mode
    (``0o666 & ~umask``, as ``open`` gives), whatever mode the writer left the temporary file in.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        give_default_mode(tmp)  # after the writer: some (safetensors) replace the file they are given
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on success rename it over ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The library's cache: ``cache_dir/anomalyclip``, else ``$ANOMALYCLIP_CACHE``, else
    ``$XDG_CACHE_HOME/anomalyclip`` (``~/.cache/anomalyclip``). Converted presets and feature
    caches live here."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / "anomalyclip"
    env = os.environ.get("ANOMALYCLIP_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "anomalyclip"


def list_paths(paths: Sequence[Any], limit: int = 5) -> str:
    """Paths for an error or warning message: the first ``limit`` quoted, then ``"and N more"``."""
    shown = ", ".join(f"'{p}'" for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (extensions in :data:`IMAGE_SUFFIXES`, any case) under ``folder``, searched
    recursively, sorted by path; hidden files (names starting with ``.``) are skipped."""
    root = Path(folder)
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
