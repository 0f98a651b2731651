"""Hugging Face Hub access: download single files or one revision's set of files, and turn Hub
failures into clear errors."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

from ._version import __version__
from .errors import WeightsNotFoundError

__all__ = ["is_repo_id", "hub_download", "hub_snapshot", "is_offline"]

logger = logging.getLogger(__name__)

LIBRARY_NAME = "anomalyclip"


def is_offline() -> bool:
    """True when Hub access is disabled (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable() -> str | None:
    """Why the Hub certainly cannot be reached from here, or None when it may be.

    One DNS look-up of the Hub's host (the OS caches it): without a network it fails at once,
    where a download would spend half a minute in huggingface_hub's retries. Behind a proxy
    (``HTTPS_PROXY``...) the host may not resolve locally, so nothing is concluded there.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"{host} does not resolve ({exc.strerror if isinstance(exc, socket.gaierror) else exc}: no network?)"
    except OSError:
        return None
    return None


def is_repo_id(name: str) -> bool:
    """Whether ``name`` looks like a Hub repo id (``org/name``) rather than a local path."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def hub_download(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    what: str = "file",
) -> Path:
    """Download (or find in the cache) one file of a Hub model repo and return its local path.

    ``token``, ``local_files_only`` and ``force_download`` are passed to
    :func:`huggingface_hub.hf_hub_download` (a token for private or gated repos; never download;
    download again even when cached).

    Raises:
        WeightsNotFoundError: the file is not cached and cannot be downloaded (offline, no network,
            unknown repo or file, gated repo), with a message saying how to proceed.
    """
    from huggingface_hub import hf_hub_download

    where = f"'{filename}' of Hub repo '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    unreachable = None if local_files_only or is_offline() else hub_unreachable()
    if unreachable is not None:
        logger.debug("The Hub cannot be reached (%s): looking for %s in the cache only", unreachable, where)
    with _hub_errors(where, what, repo_id, local_files_only, unreachable):
        path = hf_hub_download(
            repo_id=repo_id,
            filename=filename,
            revision=revision,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            token=token,
            local_files_only=local_files_only or unreachable is not None,
            force_download=force_download and unreachable is None,
            library_name=LIBRARY_NAME,
            library_version=__version__,
        )
    logger.debug("Resolved %s to %s", where, path)
    return Path(path)


def hub_snapshot(
    repo_id: str,
    filenames: Sequence[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    what: str = "files",
) -> Path:
    """Download (or find in the cache) the files ``filenames`` of ONE revision of a Hub model repo.

    :func:`huggingface_hub.snapshot_download` with ``allow_patterns=filenames``: the files all come
    from the same commit (a later push cannot mix into an earlier one). Returns the snapshot
    folder; a name the repo does not have is simply absent from it (offline, so is a name that was
    never cached): the caller checks what it needs. Options as in :func:`hub_download`.

    Raises:
        WeightsNotFoundError: the revision cannot be found or reached (offline with nothing
            cached, unknown repo or revision, gated repo), with a message saying how to proceed.
    """
    import huggingface_hub

    where = f"Hub repo '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    unreachable = None if local_files_only or is_offline() else hub_unreachable()
    if unreachable is not None:
        logger.debug("The Hub cannot be reached (%s): looking for %s in the cache only", unreachable, where)
    with _hub_errors(where, what, repo_id, local_files_only, unreachable):
        folder = huggingface_hub.snapshot_download(
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            allow_patterns=list(filenames),
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            token=token,
            local_files_only=local_files_only or unreachable is not None,
            force_download=force_download and unreachable is None,
            library_name=LIBRARY_NAME,
            library_version=__version__,
        )
    logger.debug("Resolved %s (%s) to %s", where, ", ".join(filenames), folder)
    return Path(folder)


@contextlib.contextmanager
def _hub_errors(
    where: str, what: str, repo_id: str, local_files_only: bool, unreachable: str | None = None
) -> Iterator[None]:
    """Turn the Hub's download failures inside the block into :class:`WeightsNotFoundError`
    (``unreachable``: why the Hub cannot be reached, when :func:`hub_unreachable` said so)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError as exc:
        raise WeightsNotFoundError(
            f"Cannot download {where} ({what}): the repo is gated. Accept its terms on huggingface.co "
            "and log in (`hf auth login`)."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise WeightsNotFoundError(
            f"Cannot download {where} ({what}): no such repo on the Hub, or it is private. Check the "
            "name, log in for private repos, or pass a local directory instead."
        ) from exc
    except RevisionNotFoundError as exc:
        raise WeightsNotFoundError(f"Cannot download {where} ({what}): no such revision.") from exc
    except LocalEntryNotFoundError as exc:
        if local_files_only:
            hint = "local_files_only=True and the files are not in the local Hugging Face cache"
        elif is_offline():
            hint = "HF_HUB_OFFLINE=1 is set and the files are not in the local Hugging Face cache"
        elif unreachable is not None:
            hint = f"the Hub cannot be reached ({unreachable}) and the files are not in the local Hugging Face cache"
        else:
            hint = "the Hub cannot be reached and the files are not in the local Hugging Face cache"
        raise WeightsNotFoundError(
            f"Cannot load {where} ({what}): {hint}. Download it once with network access "
            f"(`hf download {repo_id}`), point `cache_dir`/HF_HUB_CACHE at a cache that has it, "
            "or pass a local directory."
        ) from exc
    except EntryNotFoundError as exc:
        raise WeightsNotFoundError(f"Cannot download {where} ({what}): the repo has no such file.") from exc
    except (OSError, ValueError) as exc:  # network errors, bad cache contents, invalid repo ids
        raise WeightsNotFoundError(f"Cannot load {where} ({what}): {exc}") from exc
