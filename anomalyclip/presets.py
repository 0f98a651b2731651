"""Named presets for the two published checkpoints of the official AnomalyCLIP repository.

On first use a preset's ``epoch_15.pth`` is downloaded from the official repository at a pinned
commit, verified against its git blob id, converted to this library's format and cached; later
uses load the converted copy. Without network access, fetch the file elsewhere and install it
with ``anomalyclip fetch PRESET --file epoch_15.pth`` (or :func:`fetch_official_checkpoint` with
``source=``), or load it directly with ``AnomalyCLIP.from_official_checkpoint(path)``.

The checkpoints are released under the MIT licence by the AnomalyCLIP authors (Qihang Zhou et al.).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from ._version import __version__
from .config import DEFAULT_BACKBONE
from .errors import CheckpointError, InvalidInputError, WeightsNotFoundError
from .hub import is_offline
from .files import atomic_path, cache_root

__all__ = [
    "OfficialPreset",
    "PRESETS",
    "DEFAULT_PRESET",
    "OFFICIAL_COMMIT",
    "git_blob_sha1",
    "fetch_official_checkpoint",
    "get_preset",
]

logger = logging.getLogger(__name__)

#: Commit of https://github.com/zqhang/AnomalyCLIP the presets are pinned to.
OFFICIAL_COMMIT = "45ed4dd35c05797d854294b5e8d585c545920089"
_RAW = f"https://raw.githubusercontent.com/zqhang/AnomalyCLIP/{OFFICIAL_COMMIT}"


@dataclass(frozen=True)
class OfficialPreset:
    """A published official checkpoint: where to get it and how to verify it."""

    name: str
    url: str
    git_blob_sha1: str
    backbone: str
    trained_on: str
    recommended_for: str


PRESETS: Mapping[str, OfficialPreset] = MappingProxyType(
    {
        "official-visa": OfficialPreset(
            name="official-visa",
            url=f"{_RAW}/checkpoints/9_12_4_multiscale/epoch_15.pth",
            git_blob_sha1="c90f1d9d92d158b436a8fc193f984d4cec8b1fc8",
            backbone=DEFAULT_BACKBONE,
            trained_on="VisA",
            recommended_for="MVTec AD and every domain other than VisA (the paper's default)",
        ),
        "official-mvtec": OfficialPreset(
            name="official-mvtec",
            url=f"{_RAW}/checkpoints/9_12_4_multiscale_visa/epoch_15.pth",
            git_blob_sha1="72adc786e031b49ea288ba5f815f0d38cf158708",
            backbone=DEFAULT_BACKBONE,
            trained_on="MVTec AD",
            recommended_for="VisA",
        ),
    }
)
#: Preset used by ``AnomalyCLIP.from_pretrained()`` with no argument.
DEFAULT_PRESET = "official-visa"


def git_blob_sha1(path: str | os.PathLike) -> str:
    """The git blob id of a file: ``sha1(b"blob <size>\\0" + content)``."""
    path = Path(path)
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def get_preset(preset: str | OfficialPreset) -> OfficialPreset:
    """The :class:`OfficialPreset` named ``preset`` (an instance is returned as it is)."""
    if isinstance(preset, OfficialPreset):
        return preset
    if preset not in PRESETS:
        raise InvalidInputError(f"Unknown preset {preset!r}. Available: {', '.join(sorted(PRESETS))}.")
    return PRESETS[preset]


def _offline_help(preset: OfficialPreset) -> str:
    return (
        f"Without network access, download {preset.url} elsewhere, then install it with "
        f"`anomalyclip fetch {preset.name} --file epoch_15.pth` (or fetch_official_checkpoint("
        f"'{preset.name}', source='epoch_15.pth')), or load it directly with "
        "AnomalyCLIP.from_official_checkpoint('epoch_15.pth')."
    )


def _download(url: str, target: Path, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": f"anomalyclip/{__version__}"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        from tqdm.auto import tqdm

        with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=total is None) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                bar.update(len(chunk))


def fetch_official_checkpoint(
    preset: str | OfficialPreset,
    *,
    source: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    timeout: float = 60.0,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """Return the verified official ``.pth`` of a preset, downloading or installing it if needed.

    Args:
        preset: a preset name or :class:`OfficialPreset`.
        source: a local copy of the file to install instead of downloading.
        cache_dir: cache root (see :func:`cache_root`).
        timeout: network timeout in seconds.
        local_files_only: never download; a preset that is not cached is an error.
        force_download: download (and verify) again even when a verified copy is cached.

    Raises:
        CheckpointError: the file's git blob id is not the published one (it is not kept).
        WeightsNotFoundError: not cached and cannot be downloaded; the message says how to
            install a local copy.
    """
    preset = get_preset(preset)
    target = cache_root(cache_dir) / "official" / preset.name / "epoch_15.pth"
    cached = target.is_file() and git_blob_sha1(target) == preset.git_blob_sha1
    if source is None and cached and not (force_download and not local_files_only):
        return target
    with atomic_path(target) as tmp:
        if source is not None:
            source = Path(source)
            if not source.is_file():
                raise WeightsNotFoundError(f"Checkpoint file not found: '{source}'.")
            shutil.copyfile(source, tmp)
            origin = str(source)
        else:
            if local_files_only or is_offline() or os.environ.get("ANOMALYCLIP_OFFLINE"):
                why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE/ANOMALYCLIP_OFFLINE"
                raise WeightsNotFoundError(
                    f"Preset '{preset.name}' is not cached and downloads are disabled ({why}). {_offline_help(preset)}"
                )
            logger.info("Downloading %s", preset.url)
            try:
                _download(preset.url, tmp, timeout)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise WeightsNotFoundError(
                    f"Could not download preset '{preset.name}' from {preset.url}: {exc}. {_offline_help(preset)}"
                ) from exc
            origin = preset.url
        found = git_blob_sha1(tmp)
        if found != preset.git_blob_sha1:
            raise CheckpointError(
                f"'{origin}' is not the published checkpoint of preset '{preset.name}': git blob id {found}, "
                f"expected {preset.git_blob_sha1} (commit {OFFICIAL_COMMIT}). The file is corrupt or a "
                "different checkpoint; it was not installed."
            )
    logger.info("Verified and cached %s at %s", preset.name, target)
    return target
